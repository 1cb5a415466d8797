//! [`overwrite`]: a tensor's values written into another's memory, for the inputs of a step
//! recorded as a graph of launches.

use burn::prelude::*;
use burn::tensor::DType;

/// `src`'s values written over `dst`'s memory, returned as `dst`'s memory under a new handle.
///
/// A step recorded as a graph ([`burn::tensor::capture`]) replays its launches against the
/// buffers it was recorded with, so each step's inputs must be written into those buffers:
/// on cuda and wgpu (f32, `dst` contiguous) this writes them there, whatever else holds the
/// memory (the graph does), in order with the device's other work. Elsewhere, where no graph
/// is recorded, it is `src` itself. The shapes must be equal.
pub fn overwrite<const D: usize>(dst: Tensor<D>, src: Tensor<D>) -> Tensor<D> {
    assert_eq!(dst.dims(), src.dims(), "overwrite: the shapes differ");
    #[cfg(feature = "cube")]
    {
        use crate::sgd::cube_float;
        if dst.dtype() == DType::F32 && src.dtype() == DType::F32 {
            let (dst, src) = (dst.into_dispatch(), src.into_dispatch());
            let autodiff = dst.autodiff;
            return match (cube_float(dst.clone()), cube_float(src.clone())) {
                (Some(d), Some(s)) => {
                    let mut out = crate::sgd::cube_dispatch(crate::cube::overwrite(d, s));
                    out.autodiff = autodiff;
                    Tensor::from_dispatch(out)
                }
                _ => Tensor::from_dispatch(src),
            };
        }
    }
    let _ = (dst, DType::F32);
    src
}

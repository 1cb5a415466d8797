//! [`overwrite`]: a tensor's values written into another's memory, for the inputs of a step
//! recorded as a graph of launches; [`write_values`]: single values written into a held buffer.

use burn::prelude::*;
use burn::tensor::{DType, s};

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

/// Each of `values` (`[1]` tensors) written into `dst` (`[L]`) at `at[k]`, the rest of `dst`
/// kept: on cuda and wgpu (f32) one launch writes them into `dst`'s memory, where a
/// concatenation and a slice write would take a launch per value and one more; elsewhere a
/// slice assign per value. `dst` must be held by nobody else (the write may be in place), and
/// every place within it.
pub fn write_values(dst: Tensor<1>, at: &[usize], values: Vec<Tensor<1>>) -> Tensor<1> {
    assert_eq!(at.len(), values.len(), "write_values: one place per value");
    let len = dst.dims()[0];
    assert!(
        at.iter().all(|&i| i < len),
        "write_values: a place past the end"
    );
    #[cfg(feature = "cube")]
    {
        use crate::sgd::{cube_dispatch, cube_float};
        let floats = dst.dtype() == DType::F32
            && values
                .iter()
                .all(|v| v.dtype() == DType::F32 && v.dims() == [1]);
        if floats {
            let dst = dst.into_dispatch();
            let cube_values: Option<Vec<_>> = values
                .iter()
                .map(|v| cube_float(v.clone().into_dispatch()))
                .collect();
            match (cube_float(dst.clone()), cube_values) {
                (Some(d), Some(vs)) => {
                    let mut out = cube_dispatch(crate::cube::write_values(d, at.to_vec(), vs));
                    out.autodiff = dst.autodiff;
                    return Tensor::from_dispatch(out);
                }
                _ => return slice_assigned(Tensor::from_dispatch(dst), at, values),
            }
        }
    }
    slice_assigned(dst, at, values)
}

fn slice_assigned(dst: Tensor<1>, at: &[usize], values: Vec<Tensor<1>>) -> Tensor<1> {
    values
        .into_iter()
        .zip(at)
        .fold(dst, |dst, (v, &i)| dst.slice_assign(s![i..i + 1], v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_at_their_places_and_the_rest_stays() {
        let device = Device::default();
        let dst = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0], &device);
        let values = vec![
            Tensor::from_floats([-1.0], &device),
            Tensor::from_floats([-4.0], &device),
        ];
        let out = write_values(dst, &[0, 3], values);
        assert_eq!(
            out.into_data().try_to_vec::<f32>().unwrap(),
            vec![-1.0, 2.0, 3.0, -4.0, 5.0]
        );
    }
}

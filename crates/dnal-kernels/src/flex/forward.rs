//! [`DnalKernels`] on flex itself: the forward passes only (inference, or an untracked
//! autodiff operation).

use super::conv::{conv_affine, conv_affine_add_into, conv_forward};
use super::norm::{norm_forward, norm_forward_into};
use super::{Affine, DnalKernels, NormOutput, f32s, select_planes, tensor};
use crate::cpu::{self, Clamp};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;

impl DnalKernels for Flex {
    fn dnal_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(x, weight, stride, padding, None)
    }

    fn dnal_max_pool2x2(x: FlexTensor) -> FlexTensor {
        max_pool_forward(&x, false).0
    }

    fn dnal_fold_batch_norm(
        a: FlexTensor,
        b: FlexTensor,
        mean: FlexTensor,
        var: FlexTensor,
        epsilon: f64,
    ) -> Affine<Flex> {
        super::fold::fold_batch_norm(a, b, mean, var, epsilon)
    }

    fn dnal_depthwise_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let g = super::depthwise_geometry(&x, &weight, stride, padding);
        super::depthwise_forward(x, weight, &g, None, Clamp::NONE)
    }

    fn dnal_depthwise_conv2d_affine(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FlexTensor {
        let g = super::depthwise_geometry(&x, &weight, stride, padding);
        let (scale, shift) = (super::vec_of(&scale), super::vec_of(&shift));
        super::depthwise_forward(x, weight, &g, Some((&scale, &shift)), Clamp { lo, hi })
    }

    fn dnal_conv2d_affine(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FlexTensor {
        conv_affine(
            x,
            weight,
            (scale, shift),
            None,
            stride,
            padding,
            Clamp { lo, hi },
        )
    }

    fn dnal_conv2d_affine_add(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        residual: FlexTensor,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FlexTensor {
        let clamp = Clamp { lo, hi };
        conv_affine(
            x,
            weight,
            (scale, shift),
            Some(residual),
            stride,
            padding,
            clamp,
        )
    }

    fn dnal_conv2d_affine_add_into(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        stream: FlexTensor,
        channels: Vec<usize>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FlexTensor {
        let y = conv_affine(
            x,
            weight,
            (scale, shift),
            None,
            stride,
            padding,
            Clamp::NONE,
        );
        conv_affine_add_into(&y, stream, &channels, Clamp { lo, hi })
    }

    fn dnal_batch_norm_train(
        x: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Flex> {
        norm_forward(&x, (&a, &b), None, epsilon, Clamp { lo, hi })
    }

    fn dnal_batch_norm_add_train(
        x: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        residual: FlexTensor,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Flex> {
        norm_forward(&x, (&a, &b), Some(&residual), epsilon, Clamp { lo, hi })
    }

    fn dnal_select_channels(x: FlexTensor, sources: Vec<Option<usize>>) -> FlexTensor {
        select_planes(&x, &sources)
    }

    fn dnal_batch_norm_add_into_train(
        x: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        stream: FlexTensor,
        channels: Vec<usize>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Flex> {
        let clamp = Clamp { lo, hi };
        norm_forward_into(&x, (&a, &b), &stream, &channels, epsilon, clamp)
    }
}

/// The pooled output, which input won each window (if `winners`, else nothing), and the
/// input's shape `[N, C, H, W]`.
pub(super) fn max_pool_forward(x: &FlexTensor, winners: bool) -> (FlexTensor, Vec<u8>, [usize; 4]) {
    let x = f32s(x);
    let [n, c, h, w]: [usize; 4] = x.layout().shape()[..]
        .try_into()
        .expect("max-pool of a rank-4 tensor");
    let values = x.storage::<f32>();
    let (y, at) = if winners {
        cpu::max_pool2x2(values, n * c, [h, w])
    } else {
        (cpu::max_pool2x2_values(values, n * c, [h, w]), Vec::new())
    };
    (tensor(y, &[n, c, h / 2, w / 2]), at, [n, c, h, w])
}

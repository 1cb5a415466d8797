//! [`DnalKernels`] on flex itself: the forward passes only (inference, or an untracked
//! autodiff operation).

use super::conv::{conv_affine, conv_forward};
use super::norm::norm_forward;
use super::{DnalKernels, NormOutput, f32s, tensor};
use crate::cpu::{self, Clamp};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;

impl DnalKernels for Flex {
    fn dnal_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(x, weight, stride, padding, None)
    }

    fn dnal_max_pool2x2(x: FlexTensor) -> FlexTensor {
        max_pool_forward(&x).0
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
}

/// The pooled output, which input won each window, and the input's shape `[N, C, H, W]`.
pub(super) fn max_pool_forward(x: &FlexTensor) -> (FlexTensor, Vec<u8>, [usize; 4]) {
    let x = f32s(x);
    let [n, c, h, w]: [usize; 4] = x.layout().shape()[..]
        .try_into()
        .expect("max-pool of a rank-4 tensor");
    let (y, at) = cpu::max_pool2x2(x.storage::<f32>(), n * c, [h, w]);
    (tensor(y, &[n, c, h / 2, w / 2]), at, [n, c, h, w])
}

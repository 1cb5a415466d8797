//! Convolutions routed to dnal's engines: the plain and the depthwise convolution, and a
//! `Conv2d` layer's forward through whichever of them fits it.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
#[cfg(any(feature = "flex", feature = "cube"))]
use burn::tensor::DType;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;

#[cfg(feature = "cube")]
use crate::{cube, takes_cube_path};
#[cfg(feature = "flex")]
use crate::{flex, takes_fast_path};

/// `(stride, padding)` of a convolution without bias or dilation, with a square kernel, equal
/// strides and symmetric padding smaller than the kernel: the shapes dnal's convolutions take.
fn square_shape(conv: &Conv2d) -> Option<(usize, usize)> {
    let [_, _, kh, kw] = conv.weight.dims();
    let [sh, sw] = conv.stride;
    let pad = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let fits = conv.bias.is_none() && conv.dilation == [1, 1] && kh == kw && sh == sw && pad < kh;
    fits.then_some((sh, pad))
}

/// `(stride, padding)` when `conv` fits dnal's convolution: one group and [`square_shape`].
pub(crate) fn fast_conv_shape(conv: &Conv2d) -> Option<(usize, usize)> {
    square_shape(conv).filter(|_| conv.groups == 1)
}

/// `(stride, padding)` when `conv` fits dnal's depthwise convolution: one group per channel
/// (weight `[C, 1, k, k]`) and [`square_shape`].
pub(crate) fn depthwise_shape(conv: &Conv2d) -> Option<(usize, usize)> {
    let [co, per_group, _, _] = conv.weight.dims();
    square_shape(conv).filter(|_| conv.groups > 1 && conv.groups == co && per_group == 1)
}

/// `conv.forward(x)`, through [`conv2d`] or [`depthwise_conv2d`] when the layer fits one of
/// dnal's convolutions.
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if let Some((stride, padding)) = fast_conv_shape(conv) {
        conv2d(x, conv.weight.val(), stride, padding)
    } else if let Some((stride, padding)) = depthwise_shape(conv) {
        depthwise_conv2d(x, conv.weight.val(), stride, padding)
    } else {
        conv.forward(x)
    }
}

/// Depthwise convolution without bias: `weight` `[C, 1, k, k]` (one filter per channel of `x`
/// `[N, C, H, W]`), `stride` and `padding` on both axes. On flex (f32) dnal's plane-by-plane
/// kernels, forward and backward; on cuda and wgpu (f32) dnal's CubeCL kernels; elsewhere
/// burn's grouped conv2d.
pub fn depthwise_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if takes_fast_path(&x) && weight.dtype() == DType::F32 {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        return Tensor::from_dispatch(<Dispatch as DnalKernels>::dnal_depthwise_conv2d(
            x.into_dispatch(),
            weight.into_dispatch(),
            stride,
            padding,
        ));
    }
    #[cfg(feature = "cube")]
    if takes_cube_path(&x)
        && weight.dtype() == DType::F32
        && (cube::pointwise(weight.dims()[2], stride, padding)
            || (weight.dims()[2] > 1 && x.device().is_autodiff()))
    {
        use burn::backend::Dispatch;
        use cube::CubeDepthwise;
        return Tensor::from_dispatch(<Dispatch as CubeDepthwise>::dnal_cube_depthwise(
            x.into_dispatch(),
            weight.into_dispatch(),
            stride,
            padding,
        ));
    }
    let groups = weight.dims()[0];
    burn_conv2d(
        x,
        weight,
        None,
        ConvOptions::new([stride; 2], [padding; 2], [1; 2], groups),
    )
}

/// 2-D convolution without bias: square kernel, `stride` and `padding` on both axes, one
/// group. On flex (f32) dnal's image-by-image im2col + matrix product, forward and backward;
/// on cuda and wgpu (f32) `cube/conv.rs`: a 1x1 stride-1 kernel as matrix products, forward
/// and backward, and in training a wider one as burn's convolution and input gradient with
/// dnal's weight gradient; elsewhere burn's conv2d.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, stride: usize, padding: usize) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if takes_fast_path(&x) && weight.dtype() == DType::F32 {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        return Tensor::from_dispatch(<Dispatch as DnalKernels>::dnal_conv2d(
            x.into_dispatch(),
            weight.into_dispatch(),
            stride,
            padding,
        ));
    }
    #[cfg(feature = "cube")]
    if takes_cube_path(&x) && weight.dtype() == DType::F32 {
        use burn::backend::Dispatch;
        use cube::CubeConv;
        return Tensor::from_dispatch(<Dispatch as CubeConv>::dnal_cube_conv2d(
            x.into_dispatch(),
            weight.into_dispatch(),
            stride,
            padding,
        ));
    }
    burn_conv2d(
        x,
        weight,
        None,
        ConvOptions::new([stride; 2], [padding; 2], [1; 2], 1),
    )
}

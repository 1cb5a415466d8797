//! The conv -> BN (-> gate) (-> activation) unit, with or without a residual: in inference on
//! flex one convolution that applies BatchNorm, the gate, the residual and the activation as
//! it writes; elsewhere the convolution, then [`crate::batch_norm`]'s path.

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::{relu, relu6};

use crate::channels;
use crate::conv::conv_forward;
use crate::cpu::Clamp;
use crate::norm::{Residual, batch_norm_gated};
#[cfg(feature = "flex")]
use crate::{
    conv::{depthwise_shape, fast_conv_shape},
    flex,
    norm::Affine,
    takes_fast_path,
};
#[cfg(feature = "flex")]
use burn::tensor::DType;

/// The activation that ends a conv -> BN (-> gate) unit. The unit applies it itself, so that
/// on flex it costs no pass of its own: it is fused into BatchNorm in training and into the
/// convolution's output in inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// None.
    #[default]
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl Activation {
    /// The activation as a clamp to `[lo, hi]`.
    pub fn clamp(self) -> Clamp {
        match self {
            Self::Identity => Clamp::NONE,
            Self::Relu => Clamp {
                lo: 0.0,
                hi: f32::INFINITY,
            },
            Self::Relu6 => Clamp { lo: 0.0, hi: 6.0 },
        }
    }

    /// The activation with burn's operations.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Identity => x,
            Self::Relu => relu(x),
            Self::Relu6 => relu6(x),
        }
    }
}

/// `act(batch_norm(bn, factor, conv(x)))`. In inference on flex (no autodiff device, f32, a
/// convolution that fits [`crate::conv2d`]) BatchNorm, the factor and the activation are folded into
/// the convolution itself: `act(y * scale + shift)` per channel,
/// `scale = gamma * g / sqrt(var + eps)`, `shift = beta * g - mean * scale`, is applied as the
/// convolution writes its output, so the unit makes no pass over its output besides the
/// convolution's.
pub fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
) -> Tensor<4> {
    conv_bn_residual(conv, bn, factor, act, x, Residual::None)
}

/// `act(batch_norm(bn, factor, conv(x)) + residual)`: the last unit of a residual block, with
/// the shortcut (`residual`, shaped like the output) added before the activation. On flex the
/// addition and the activation cost no pass of their own: in training they are fused into
/// BatchNorm (forward and backward), in inference into the convolution's output.
pub fn conv_bn_add(
    conv: &Conv2d,
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
    residual: Tensor<4>,
) -> Tensor<4> {
    conv_bn_residual(conv, bn, factor, act, x, Residual::Whole(residual))
}

/// `act(stream + scatter(batch_norm(bn, factor, conv(x))))`: the last unit of a pruned residual
/// block, whose output channels are added into the channels `pos` of the residual stream
/// (`[N, C, H, W]`, [`channels::add_into`]), every channel of the sum then going through the
/// activation. [`conv_bn_add`] when `pos` is the whole stream in order; on flex, instead of the
/// slices, concatenation or index add and the activation's pass, in inference the convolution
/// as in [`conv_bn`] and then one pass over the stream, in training BatchNorm, the add and the
/// activation in one pass over the stream (and their gradients in BatchNorm's backward); in
/// training on cuda and wgpu likewise, with dnal's CubeCL kernels.
pub fn conv_bn_add_into(
    conv: &Conv2d,
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
    stream: Tensor<4>,
    pos: &[usize],
) -> Tensor<4> {
    let residual = if channels::covers(pos, stream.dims()[1]) {
        Residual::Whole(stream)
    } else {
        Residual::Into(stream, pos)
    };
    conv_bn_residual(conv, bn, factor, act, x, residual)
}

fn conv_bn_residual(
    conv: &Conv2d,
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
    residual: Residual,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if !x.device().is_autodiff()
        && takes_fast_path(&x)
        && conv.weight.dtype() == DType::F32
        && residual.tensor().is_none_or(|r| r.dtype() == DType::F32)
    {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        // Depthwise (without a residual) or a plain convolution dnal computes.
        let depthwise = matches!(residual, Residual::None)
            .then(|| depthwise_shape(conv))
            .flatten();
        let shape = depthwise
            .map(|s| (true, s))
            .or_else(|| fast_conv_shape(conv).map(|s| (false, s)));
        if let Some((depthwise, (stride, padding))) = shape
            && let Some((scale, shift)) = folded_running_affine(bn, factor.clone(), &x.device())
        {
            let Clamp { lo, hi } = act.clamp();
            let (x, w) = (x.into_dispatch(), conv.weight.val().into_dispatch());
            let (scale, shift) = (scale.into_dispatch(), shift.into_dispatch());
            return Tensor::from_dispatch(match residual {
                Residual::None if depthwise => {
                    <Dispatch as DnalKernels>::dnal_depthwise_conv2d_affine(
                        x, w, scale, shift, stride, padding, lo, hi,
                    )
                }
                Residual::None => <Dispatch as DnalKernels>::dnal_conv2d_affine(
                    x, w, scale, shift, stride, padding, lo, hi,
                ),
                Residual::Into(s, pos) => <Dispatch as DnalKernels>::dnal_conv2d_affine_add_into(
                    x,
                    w,
                    scale,
                    shift,
                    s.into_dispatch(),
                    pos.to_vec(),
                    stride,
                    padding,
                    lo,
                    hi,
                ),
                Residual::Whole(r) => <Dispatch as DnalKernels>::dnal_conv2d_affine_add(
                    x,
                    w,
                    scale,
                    shift,
                    r.into_dispatch(),
                    stride,
                    padding,
                    lo,
                    hi,
                ),
            });
        }
    }
    let y = conv_forward(conv, x);
    batch_norm_gated(bn, factor, act, y, residual)
}

/// `(scale, shift)` of BatchNorm's inference transform with `factor` folded in, the running
/// statistics folded by one flex operation; `None` where BatchNorm's tensors are not all f32.
#[cfg(feature = "flex")]
fn folded_running_affine(
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    device: &Device,
) -> Option<(Tensor<1>, Tensor<1>)> {
    use burn::backend::Dispatch;
    use flex::DnalKernels;
    let (a, b) = Affine::of(bn, factor).folded();
    let mean = bn.running_mean.value().to_device(device);
    let var = bn.running_var.value().to_device(device);
    if [&a, &b, &mean, &var]
        .iter()
        .any(|t| t.dtype() != DType::F32)
    {
        return None;
    }
    let out = <Dispatch as DnalKernels>::dnal_fold_batch_norm(
        a.into_dispatch(),
        b.into_dispatch(),
        mean.into_dispatch(),
        var.into_dispatch(),
        bn.epsilon,
    );
    Some((
        Tensor::from_dispatch(out.scale),
        Tensor::from_dispatch(out.shift),
    ))
}

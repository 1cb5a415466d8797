//! # dnal-kernels
//!
//! The convolution and the BatchNorm (with a channel gate folded in, and the unit's
//! activation fused) that every conv -> BN (-> gate) (-> ReLU) unit of dnal's networks runs
//! through. Depends on burn only; knows nothing of gates or networks beyond a per-channel factor.
//!
//! **The gate folded into BatchNorm**, on every backend: [`batch_norm`] takes the gate's
//! per-channel factor `g` (dnal-core's `ChannelGate::factor`) and
//! uses the affine transform `a = gamma * g`, `b = beta * g`, so the gate costs two `[C]`-sized
//! multiplies instead of a pass over the activation forward and two backward; on the CubeCL
//! backends the BatchNorm kernels take `g` and make those products themselves (and the three
//! gradients where the backward's sums are finished), so the gate costs no launch. In
//! evaluation the running statistics are folded too: `x * scale + shift`.
//!
//! **dnal's own operations on flex** (f32), declared with burn's `#[backend_extension]` and
//! differentiated by hand-written `Backward` implementations on burn's autodiff graph:
//!
//! * BatchNorm in training: the batch statistics in one pass (shifted sum and sum of squares
//!   per channel, accumulated in f64), the output in a second, with the [`Activation`] (a
//!   clamp) applied in the same pass; the backward in two (the two per-channel sums, then the
//!   input gradient), the activation's gradient mask applied on the fly. burn's generic
//!   BatchNorm, which flex uses, makes about ten passes with copies for the channel-first
//!   reductions. On the CubeCL backends (cuda, wgpu; feature `cube`) the same fused unit is
//!   dnal's own CubeCL kernels (`cube/`): three launches forward (per-channel partial sums,
//!   per-channel coefficients and running statistics, the output with residual and clamp)
//!   and three backward, two and two on cuda where the partial sums' last cube finishes the
//!   reduction ([`Finish`]), read and written in the channel-last memory CubeCL's
//!   convolutions use; added into some channels of a wider residual stream, the output pass
//!   runs over the stream and the backward gathers BatchNorm's gradient in one launch more.
//!   ndarray uses burn's `batch_norm_train` with the folded `a`, `b`.
//! * [`depthwise_conv2d`]: on flex plane-by-plane kernels; on the CubeCL backends one launch
//!   forward, one for the input gradient and two for the weight gradient (one on cuda), in the memory
//!   layout the input comes in, where burn's grouped convolution autotunes among its general
//!   convolution kernels per shape and copies between layouts around them.
//! * [`conv2d`] (one group, square kernel, symmetric padding, no dilation, no bias), with two
//!   engines. Stride-1 "same" convolutions take direct AVX-512 or AVX2 micro-kernels where
//!   the CPU has them and they are faster (`direct/`: no column matrix; the input is read through
//!   shifted, masked vector loads). The rest is im2col into a buffer that stays in cache and
//!   one matrix product per image or group of small images (`gemm.rs`, the `gemm` crate flex
//!   itself uses), whose `[Co, OH * OW]` result is already the image's NCHW output. The weight
//!   gradient is summed in a fixed order so that it does not depend on the number of threads;
//!   the input gradient of a stride-1 convolution is the convolution of the output gradient
//!   with the flipped, transposed kernel, and of a strided one col2im of `W^T x grad_i`. On
//!   the CubeCL backends in training, burn's convolution and input gradient with dnal's weight
//!   gradient: one column-matrix launch and a depth-split matrix product (`cube/conv.rs`).
//!   Other backends, and other convolutions, use burn's.
//! * [`conv_bn`] in inference: BatchNorm, the gate and the activation applied as the
//!   convolution writes its output; [`conv_bn_add`] and [`conv_bn_add_into`] with a residual,
//!   the latter added into some channels of a wider residual stream in one pass.
//!
//! * [`cross_entropy`]: the training loss and the batch's correct predictions; on the CubeCL
//!   backends one launch, and one for the logits' gradient.
//! * [`sgd_momentum_steps`]: SGD's update of many parameters with momentum and weight decay;
//!   on the CubeCL backends one operation for all of them (one launch per group of up to 32),
//!   the velocities in place ([`sgd_momentum_step`] for one parameter).
//!
//! [`set_enabled`]`(false)` turns dnal's flex operations off process-wide, [`set_direct`]`(false)`
//! only the direct kernels (the benchmarks time all three).

#[cfg(feature = "mimalloc")]
pub mod allocator;
pub mod channels;
pub mod check;
pub mod cpu;
#[cfg(feature = "cube")]
mod cube;
// The depthwise kernels in `cpu` use its tap masks on every build; the rest serves flex. Off
// x86-64 the kernels are compiled out and only the routing (which never picks them) is left.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_variables)
)]
mod direct;
mod factors;
#[cfg(feature = "flex")]
mod flex;
pub mod frozen;
#[cfg(feature = "flex")]
pub mod gemm;
#[cfg(target_arch = "x86_64")]
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
mod lane_masks;
mod loss;
mod memo;
#[cfg(feature = "flex")]
mod outputs;
mod penalty;
mod planes;
mod refresh;
mod sgd;
mod simd;
pub mod subnormals;

use burn::module::{ModuleMapper, Param, RunningState};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{relu, relu6};
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use cpu::Clamp;
use std::sync::atomic::{AtomicBool, Ordering};

pub use factors::{GateChain, factor_gradients, gate_factors};
pub use loss::cross_entropy;
pub use penalty::{PenaltyTerm, gate_operations_fold, penalty_gradients};
pub use refresh::{overwrite, write_values};
pub use sgd::{
    Rate, decayed, memory_strides, sgd_momentum_step, sgd_momentum_steps, step_layout,
    steps_together,
};
pub use simd::{AVX2_WIDTH_VAR, ISA_VAR, Isa, avx2_halved, isa, set_avx512};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns dnal's own operations (on flex, and the CubeCL kernels on cuda and wgpu) on (the
/// default) or off for the whole process; off, every layer uses burn's convolution and
/// `batch_norm_train` (the gate stays folded), and SGD's step burn's tensor operations.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether dnal's flex operations are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

static DIRECT: AtomicBool = AtomicBool::new(true);

/// Lets dnal's flex convolution use its direct kernels (AVX-512 or AVX2, [`isa`]) where they
/// are faster (the default), or makes it use im2col and `gemm` everywhere (the benchmarks time
/// both).
pub fn set_direct(on: bool) {
    DIRECT.store(on, Ordering::Relaxed);
}

/// Whether the direct kernels may be used.
pub fn direct_enabled() -> bool {
    DIRECT.load(Ordering::Relaxed)
}

/// How dnal's CubeCL reductions over the batch (BatchNorm's statistics and their gradients,
/// the depthwise convolution's weight gradient) add up their partial sums: in a second launch, or in the launch that makes them, by the
/// last cube to store its share (one launch fewer per reduction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// In the same launch where the runtime promises that one cube's writes reach another
    /// within a launch (cuda) and the finishing cube's share is small; else a second launch.
    Auto,
    /// Always in the same launch. Where the runtime does not promise that one cube's writes
    /// reach another (WGSL), only correct where memory is coherent anyway, as on a CPU Vulkan
    /// driver (lavapipe): for testing the folded kernels there.
    Folded,
    /// Always in a second launch.
    Separate,
}

impl std::str::FromStr for Finish {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Finish::Auto),
            "folded" => Ok(Finish::Folded),
            "separate" => Ok(Finish::Separate),
            _ => Err(format!(
                "unknown reduction finish `{s}`; choose one of auto, folded, separate"
            )),
        }
    }
}

static FINISH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets how dnal's CubeCL reductions finish, process-wide ([`Finish::Auto`] by default).
pub fn set_reduction_finish(finish: Finish) {
    let code = match finish {
        Finish::Auto => 0,
        Finish::Folded => 1,
        Finish::Separate => 2,
    };
    FINISH.store(code, Ordering::Relaxed);
}

/// How dnal's CubeCL reductions finish.
pub fn reduction_finish() -> Finish {
    match FINISH.load(Ordering::Relaxed) {
        1 => Finish::Folded,
        2 => Finish::Separate,
        _ => Finish::Auto,
    }
}

/// Whether `x` takes the flex operation: it is on, `x` is f32 and lives on flex (with or
/// without autodiff).
pub fn takes_fast_path<const D: usize>(x: &Tensor<D>) -> bool {
    enabled() && x.dtype() == DType::F32 && flex_device(x.device())
}

/// Whether `device` is flex (with or without autodiff).
pub fn is_flex(device: &Device) -> bool {
    flex_device(device.clone())
}

fn flex_device(device: Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        matches!(device.inner().as_dispatch(), DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Whether `x` takes dnal's CubeCL kernels: it is f32 on a cubecl device (cuda, wgpu), with or
/// without autodiff, and not empty.
#[cfg(feature = "cube")]
pub(crate) fn takes_cube_path<const D: usize>(x: &Tensor<D>) -> bool {
    use burn::backend::DispatchDevice;
    enabled()
        && x.dtype() == DType::F32
        && x.shape().num_elements() > 0
        && matches!(x.device().inner().as_dispatch(), DispatchDevice::Cube(_))
}

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
fn fast_conv_shape(conv: &Conv2d) -> Option<(usize, usize)> {
    square_shape(conv).filter(|_| conv.groups == 1)
}

/// `(stride, padding)` when `conv` fits dnal's depthwise convolution: one group per channel
/// (weight `[C, 1, k, k]`) and [`square_shape`].
fn depthwise_shape(conv: &Conv2d) -> Option<(usize, usize)> {
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

/// The global average pool of `x` (`[N, C, H, W]`), as `[N, C]`: the mean of each plane.
///
/// One reduction over the last axis of the `[N, C, H * W]` view. burn's adaptive average pool
/// to 1x1 computes the same, but on flex hands every call to rayon's pool, and at batch 1
/// waiting for a worker to wake took a fifth of a thin pruned ResNet-56's forward.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}

/// `pool.forward(x)`; on flex (f32) a 2x2, stride-2 max-pool without padding or dilation (a
/// VGG's) is dnal's own, forward and backward (one pass each; burn's generic pooling costs
/// several times as much).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if takes_fast_path(&x)
        && pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && !pool.ceil_mode
        && matches!(
            pool.padding,
            PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
        )
    {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        return Tensor::from_dispatch(<Dispatch as DnalKernels>::dnal_max_pool2x2(
            x.into_dispatch(),
        ));
    }
    pool.forward(x)
}

/// `act(batch_norm(bn, factor, conv(x)))`. In inference on flex (no autodiff device, f32, a
/// convolution that fits [`conv2d`]) BatchNorm, the factor and the activation are folded into
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

/// What a conv -> BN unit adds to its output before the activation.
enum Residual<'a> {
    None,
    /// A tensor shaped like the output.
    Whole(Tensor<4>),
    /// A stream into whose channels (the positions) the output is added.
    Into(Tensor<4>, &'a [usize]),
}

impl Residual<'_> {
    #[cfg(any(feature = "flex", feature = "cube"))]
    fn tensor(&self) -> Option<&Tensor<4>> {
        match self {
            Self::None => None,
            Self::Whole(r) | Self::Into(r, _) => Some(r),
        }
    }
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

/// `act(bn(x) * factor)`: BatchNorm followed by a per-channel `factor` (a channel gate's,
/// `None` for no gate), with the factor folded into BatchNorm's affine transform, and the
/// activation `act`.
///
/// Training (an autodiff device and a BatchNorm not frozen) uses the batch statistics and
/// updates the running ones exactly as burn's BatchNorm does; evaluation uses the running
/// statistics.
pub fn batch_norm(
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
) -> Tensor<4> {
    batch_norm_gated(bn, factor, act, x, Residual::None)
}

/// A per-channel affine transform `(a, b)` (BatchNorm's `gamma`, `beta`), both multiplied by a
/// per-channel `factor` where there is one.
struct Affine {
    a: Tensor<1>,
    b: Tensor<1>,
    factor: Option<Tensor<1>>,
}

impl Affine {
    /// `bn`'s transform with `factor`.
    fn of(bn: &BatchNorm, factor: Option<Tensor<1>>) -> Self {
        Self {
            a: bn.gamma.val(),
            b: bn.beta.val(),
            factor,
        }
    }

    /// A transform without a factor.
    fn plain(a: Tensor<1>, b: Tensor<1>) -> Self {
        Self { a, b, factor: None }
    }

    /// The transform with the factor multiplied in: `(a * f, b * f)`.
    fn folded(self) -> (Tensor<1>, Tensor<1>) {
        let Self { a, b, factor } = self;
        match factor {
            Some(f) => {
                let f = f.cast(a.dtype());
                (a * f.clone(), b * f)
            }
            None => (a, b),
        }
    }
}

/// `(scale, shift)` of the inference transform `x * scale + shift` with the running statistics.
fn running_affine(
    bn: &BatchNorm,
    a: Tensor<1>,
    b: Tensor<1>,
    device: &Device,
) -> (Tensor<1>, Tensor<1>) {
    let mean = bn.running_mean.value().to_device(device);
    let var = bn.running_var.value().to_device(device);
    let scale = a * (var + bn.epsilon).sqrt().recip();
    let shift = b - mean * scale.clone();
    (scale, shift)
}

/// `act(bn(x) * factor (+ residual))`, in training or evaluation as the device and `bn` say.
fn batch_norm_gated(
    bn: &BatchNorm,
    factor: Option<Tensor<1>>,
    act: Activation,
    x: Tensor<4>,
    residual: Residual,
) -> Tensor<4> {
    let affine = Affine::of(bn, factor);
    let training = x.device().is_autodiff() && bn.training.is_enabled();
    if !training {
        let (a, b) = affine.folded();
        let (scale, shift) = running_affine(bn, a, b, &x.device());
        let [_, c, _, _] = x.dims();
        let y = x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1]);
        return act.apply(match residual {
            Residual::None => y,
            Residual::Whole(r) => y + r,
            Residual::Into(s, pos) => channels::add_into(s, pos, y),
        });
    }
    let device = x.device();
    // Taken out of the network for the step (the gain stands in meanwhile), so that kernels
    // moving them in place hold their only handles.
    let stand_in = || affine.a.clone().detach();
    let running = Running::Due {
        mean: swap_running(&bn.running_mean, stand_in()).to_device(&device),
        var: swap_running(&bn.running_var, stand_in()).to_device(&device),
        momentum: bn.momentum,
    };
    let Trained {
        output,
        mean,
        variance,
        running,
    } = batch_norm_train_residual(x, affine, bn.epsilon, act, residual, Some(running));
    // The CubeCL kernels move the running statistics themselves; elsewhere tensor operations.
    let (mean, var) = match running {
        Some(Running::Moved { mean, var }) => (mean, var),
        Some(Running::Due {
            mean: old_mean,
            var: old_var,
            momentum: m,
        }) => {
            let moved = |old: Tensor<1>, stat: Tensor<1>| {
                old.mul_scalar(1.0 - m) + stat.detach().mul_scalar(m)
            };
            (moved(old_mean, mean), moved(old_var, variance))
        }
        None => unreachable!("the running statistics passed in come back"),
    };
    drop(swap_running(&bn.running_mean, mean.detach()));
    drop(swap_running(&bn.running_var, var.detach()));
    output
}

/// Makes `value` the running statistic `state` holds, and returns the one it held.
///
/// burn's `RunningState::update` keeps a value per thread and averages them on the next read:
/// with one thread a division by one, which on the CubeCL backends is an element-wise launch
/// per BatchNorm and step (fusion cannot merge it into the opaque kernels around it). A
/// network in dnal is stepped on one thread per replica (data parallelism forks the
/// statistics per replica and averages them itself), so the value is stored directly.
fn swap_running(state: &RunningState<Tensor<1>>, value: Tensor<1>) -> Tensor<1> {
    /// Replaces the one tensor it maps, keeping it.
    struct Swap {
        value: Option<Tensor<1>>,
        held: Option<Tensor<1>>,
    }

    impl ModuleMapper for Swap {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(value) = self.value.take() else {
                return param;
            };
            let (id, held, mapper) = param.consume();
            // Running statistics are one-dimensional: `D` is 1.
            self.held = Some(Tensor::from_dispatch(held.into_dispatch()));
            Param::from_mapped_value(id, Tensor::from_dispatch(value.into_dispatch()), mapper)
        }
    }

    // Any per-thread values folded in first (none where dnal steps the network).
    drop(state.value_sync());
    let mut swap = Swap {
        value: Some(value),
        held: None,
    };
    // A clone shares the state's value, so mapping it writes the network's statistic; once
    // it is written, the held one is the only handle left.
    let _ = state.clone().map(&mut swap);
    swap.held.expect("a running state maps its one value")
}

/// A BatchNorm's running statistics: due to move in a training step (with the momentum that
/// moves them), or moved by the backend's kernels.
enum Running {
    Due {
        mean: Tensor<1>,
        var: Tensor<1>,
        momentum: f64,
    },
    #[cfg_attr(not(feature = "cube"), allow(dead_code))]
    Moved { mean: Tensor<1>, var: Tensor<1> },
}

/// A training BatchNorm's output, its batch statistics (mean, biased variance), and the running
/// statistics passed in: moved where the backend's kernels move them, else still due.
struct Trained {
    output: Tensor<4>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    running: Option<Running>,
}

impl Trained {
    fn statistics(self) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
        (self.output, self.mean, self.variance)
    }
}

/// `act((x - mean) / sqrt(var + eps) * a + b)` with the batch's statistics, and those
/// statistics (mean, biased variance; detached). On flex the activation is applied in the same
/// pass, and its gradient in BatchNorm's backward passes.
pub fn batch_norm_train(
    x: Tensor<4>,
    a: Tensor<1>,
    b: Tensor<1>,
    epsilon: f64,
    act: Activation,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let affine = Affine::plain(a, b);
    batch_norm_train_residual(x, affine, epsilon, act, Residual::None, None).statistics()
}

/// A flex BatchNorm extension's output as tensors (the running statistics left to move).
#[cfg(feature = "flex")]
fn norm_tensors(
    out: outputs::NormOutput<burn::backend::Dispatch>,
    running: Option<Running>,
) -> Trained {
    Trained {
        output: Tensor::from_dispatch(out.output),
        mean: Tensor::from_dispatch(out.mean),
        variance: Tensor::from_dispatch(out.variance),
        running,
    }
}

/// [`batch_norm_train`] with `residual` (shaped like `x`: a residual block's shortcut) added
/// before the activation.
pub fn batch_norm_add_train(
    x: Tensor<4>,
    a: Tensor<1>,
    b: Tensor<1>,
    residual: Tensor<4>,
    epsilon: f64,
    act: Activation,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let affine = Affine::plain(a, b);
    batch_norm_train_residual(x, affine, epsilon, act, Residual::Whole(residual), None).statistics()
}

/// BatchNorm in training with the batch's statistics and the transform `affine`; `running`
/// comes back in [`Trained::running`], moved where the backend's kernels move it (in place
/// where they hold its only handles), else still due (the caller moves it with tensor
/// operations). The CubeCL kernels apply a factor themselves; elsewhere it is multiplied into
/// the transform first.
fn batch_norm_train_residual(
    x: Tensor<4>,
    affine: Affine,
    epsilon: f64,
    act: Activation,
    residual: Residual,
    running: Option<Running>,
) -> Trained {
    #[cfg(feature = "cube")]
    if takes_cube_path(&x)
        && affine.a.dtype() == DType::F32
        && affine.b.dtype() == DType::F32
        && affine
            .factor
            .as_ref()
            .is_none_or(|f| f.dtype() == DType::F32)
        && residual.tensor().is_none_or(|r| r.dtype() == DType::F32)
        && running.as_ref().is_none_or(|r| match r {
            Running::Due { mean, var, .. } => {
                mean.dtype() == DType::F32 && var.dtype() == DType::F32
            }
            Running::Moved { .. } => false,
        })
    {
        use burn::backend::Dispatch;
        use cube::CubeNorm;
        let Clamp { lo, hi } = act.clamp();
        let device = x.device();
        // Without running statistics to move, the kernel moves zeros by nothing.
        let moves = running.is_some();
        let (rm, rv, momentum) = match running {
            Some(Running::Due {
                mean,
                var,
                momentum,
            }) => (mean, var, momentum),
            _ => {
                let zeros = || Tensor::<1>::zeros([affine.a.dims()[0]], &device);
                (zeros(), zeros(), 0.0)
            }
        };
        let Affine { a, b, factor } = affine;
        // Without a factor, a one-element stand-in the kernels never read.
        let gated = factor.is_some();
        let f = factor.unwrap_or_else(|| factor_stand_in(&device));
        let (x, a, b, f) = (
            x.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            f.into_dispatch(),
        );
        let (rm, rv) = (rm.into_dispatch(), rv.into_dispatch());
        let out = match residual {
            Residual::None => <Dispatch as CubeNorm>::dnal_cube_norm_train(
                x, a, b, f, gated, rm, rv, momentum, epsilon, lo, hi,
            ),
            Residual::Whole(r) => <Dispatch as CubeNorm>::dnal_cube_norm_add_train(
                x,
                a,
                b,
                f,
                gated,
                r.into_dispatch(),
                rm,
                rv,
                momentum,
                epsilon,
                lo,
                hi,
            ),
            Residual::Into(s, pos) => {
                let map = channels::held_map(pos, s.dims()[1], &s.device());
                <Dispatch as CubeNorm>::dnal_cube_norm_add_into_train(
                    x,
                    a,
                    b,
                    f,
                    gated,
                    s.into_dispatch(),
                    map.into_dispatch(),
                    rm,
                    rv,
                    momentum,
                    epsilon,
                    lo,
                    hi,
                )
            }
        };
        return Trained {
            output: Tensor::from_dispatch(out.output),
            mean: Tensor::from_dispatch(out.mean),
            variance: Tensor::from_dispatch(out.variance),
            running: moves.then(|| Running::Moved {
                mean: Tensor::from_dispatch(out.running_mean),
                var: Tensor::from_dispatch(out.running_var),
            }),
        };
    }
    let (a, b) = affine.folded();
    #[cfg(feature = "flex")]
    if takes_fast_path(&x)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && residual.tensor().is_none_or(|r| r.dtype() == DType::F32)
    {
        use burn::backend::Dispatch;
        use flex::DnalKernels;
        let Clamp { lo, hi } = act.clamp();
        let (x, a, b) = (x.into_dispatch(), a.into_dispatch(), b.into_dispatch());
        let out = match residual {
            Residual::None => {
                <Dispatch as DnalKernels>::dnal_batch_norm_train(x, a, b, epsilon, lo, hi)
            }
            Residual::Whole(r) => <Dispatch as DnalKernels>::dnal_batch_norm_add_train(
                x,
                a,
                b,
                r.into_dispatch(),
                epsilon,
                lo,
                hi,
            ),
            Residual::Into(s, pos) => <Dispatch as DnalKernels>::dnal_batch_norm_add_into_train(
                x,
                a,
                b,
                s.into_dispatch(),
                pos.to_vec(),
                epsilon,
                lo,
                hi,
            ),
        };
        return norm_tensors(out, running);
    }
    // Elsewhere a stream is added into after BatchNorm, with tensor operations.
    let residual = match residual {
        Residual::None => None,
        Residual::Whole(r) => Some(r),
        Residual::Into(s, pos) => {
            let t = batch_norm_train_residual(
                x,
                Affine::plain(a, b),
                epsilon,
                Activation::Identity,
                Residual::None,
                running,
            );
            return Trained {
                output: act.apply(channels::add_into(s, pos, t.output)),
                ..t
            };
        }
    };
    let out = burn::tensor::module::batch_norm_train(x, a, b, epsilon);
    let y = match residual {
        Some(r) => out.output + r,
        None => out.output,
    };
    Trained {
        output: act.apply(y),
        mean: out.mean,
        variance: out.variance,
        running,
    }
}

/// The factor an ungated BatchNorm hands dnal's CubeCL kernels, which never read it: one
/// element, made once per device and held (a step would otherwise allocate one per ungated
/// BatchNorm, 55 in a ResNet-56 step). Held, it is never a custom operation's last use, so
/// fusion neither frees nor reuses it.
#[cfg(feature = "cube")]
fn factor_stand_in(device: &Device) -> Tensor<1> {
    static STAND_INS: memo::Memo<memo::DeviceKey, Tensor<1>> = memo::Memo::kept();
    Tensor::clone(&STAND_INS.get(memo::device_key(device), || Tensor::zeros([1], device)))
}

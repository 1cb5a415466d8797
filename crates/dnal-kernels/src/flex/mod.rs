//! dnal's operations as a burn backend extension on flex (burn 0.22's `extension` feature):
//! the trait ([`DnalKernels`]), its flex implementation ([`forward`]-only passes), and its
//! autodiff implementation with hand-written backward passes registered on burn's graph
//! ([`backward`]). The passes themselves are in [`conv`] and [`norm`].

mod backward;
pub(crate) mod conv;
mod fold;
mod forward;
mod norm;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{ExtensionType, backend_extension};
use burn::tensor::{DType, TensorData};

pub(crate) use crate::outputs::NormOutput;

/// BatchNorm's inference transform, `x * scale + shift` per channel.
#[derive(ExtensionType)]
pub struct Affine<B: burn::backend::Backend> {
    /// Per-channel scale.
    pub scale: FloatTensor<B>,
    /// Per-channel shift.
    pub shift: FloatTensor<B>,
}

/// The operations dnal computes itself on flex.
#[backend_extension(Flex, Autodiff)]
pub trait DnalKernels: burn::backend::Backend {
    /// 2-D convolution without bias (f32, square kernel, one group, no dilation), computed
    /// image by image as im2col + one matrix product, forward and backward.
    fn dnal_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// [`dnal_conv2d`](Self::dnal_conv2d) followed by a per-output-channel
    /// `y * scale + shift`, clamped to `[lo, hi]` (BatchNorm and an activation folded into the
    /// convolution for inference), applied while the output is written.
    #[allow(clippy::too_many_arguments)]
    fn dnal_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self>;

    /// [`dnal_conv2d_affine`](Self::dnal_conv2d_affine) with `residual` (shaped like the
    /// output: a residual block's shortcut) added before the clamp.
    #[allow(clippy::too_many_arguments)]
    fn dnal_conv2d_affine_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self>;

    /// [`dnal_conv2d_affine`](Self::dnal_conv2d_affine) added into the channels `channels` of
    /// `stream` (`[N, C, H, W]`, `C` at least the convolution's output channels; a residual
    /// stream a pruned block writes part of), then every channel of the sum clamped to `[lo,
    /// hi]`: `clamp(stream + scatter(y))`, in one pass over the stream.
    #[allow(clippy::too_many_arguments)]
    fn dnal_conv2d_affine_add_into(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stream: FloatTensor<Self>,
        channels: Vec<usize>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self>;

    /// Batch-statistics BatchNorm with a per-channel affine transform `a`, `b` (the caller
    /// folds gamma, beta and any gate into them), its output clamped to `[lo, hi]` (an
    /// activation: ReLU is `[0, inf]`): two passes forward, two backward.
    fn dnal_batch_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Self>;

    /// [`dnal_batch_norm_train`](Self::dnal_batch_norm_train) with `residual` (shaped like
    /// `x`: a residual block's shortcut) added before the clamp; one more backward pass, for
    /// the shortcut's gradient, when there is a clamp.
    #[allow(clippy::too_many_arguments)]
    fn dnal_batch_norm_add_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Self>;

    /// [`dnal_batch_norm_train`](Self::dnal_batch_norm_train) added into the channels
    /// `channels` of `stream` (`[N, C, H, W]`, `C` at least `x`'s channels: a residual stream
    /// a pruned block writes part of), then every channel of the sum clamped to `[lo, hi]`:
    /// `clamp(stream + scatter(bn(x)))`, shaped like the stream, in one pass over it (and one
    /// backward pass over it for the stream's gradient when there is a clamp).
    #[allow(clippy::too_many_arguments)]
    fn dnal_batch_norm_add_into_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        stream: FloatTensor<Self>,
        channels: Vec<usize>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Self>;

    /// Depthwise convolution without bias (f32, `weight` `[C, 1, k, k]`, one group per channel,
    /// square kernel, no dilation), plane by plane, forward and backward.
    fn dnal_depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// [`dnal_depthwise_conv2d`](Self::dnal_depthwise_conv2d) followed by a per-channel
    /// `y * scale + shift`, clamped to `[lo, hi]` (BatchNorm and an activation folded in for
    /// inference), in one pass over each plane.
    #[allow(clippy::too_many_arguments)]
    fn dnal_depthwise_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self>;

    /// BatchNorm's inference transform from its affine parameters `a`, `b` (gamma and beta,
    /// any gate folded in) and running statistics: `scale = a / sqrt(var + epsilon)`, `shift =
    /// b - mean * scale`, in f32 and in the order burn's operations compute them, but in one
    /// pass (at batch 1 the six small operations took a tenth of a thin network's forward).
    fn dnal_fold_batch_norm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
    ) -> Affine<Self>;

    /// `x`'s channels rearranged, `[N, C, H, W]` -> `[N, sources.len(), H, W]`: output
    /// channel `o` is input channel `sources[o]`, or zeros where that is `None`; no input
    /// channel is read twice, so the backward pass moves each gradient plane back (zeros for
    /// the channels not read). Plane copies both ways.
    fn dnal_select_channels(x: FloatTensor<Self>, sources: Vec<Option<usize>>)
    -> FloatTensor<Self>;

    /// 2x2 max-pool with stride 2 (f32, `[N, C, H, W]`, an odd last row or column dropped),
    /// its backward sending each output's gradient to the input that won the window.
    fn dnal_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The geometry of a depthwise convolution of `x` `[N, C, H, W]` by `weight` `[C, 1, k, k]`.
pub(super) fn depthwise_geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
) -> crate::cpu::DepthwiseGeometry {
    let xs = x.layout().shape();
    let ws = weight.layout().shape();
    assert!(
        xs.num_dims() == 4 && ws.num_dims() == 4 && ws[0] == xs[1] && ws[1] == 1 && ws[2] == ws[3],
        "a depthwise convolution of [N, C, H, W] by [C, 1, k, k]"
    );
    crate::cpu::DepthwiseGeometry {
        channels: xs[1],
        in_hw: [xs[2], xs[3]],
        kernel: ws[2],
        stride,
        padding,
    }
}

/// The depthwise forward pass on flex tensors, dnal's plane kernel: with `affine`
/// (`(scale, shift)` per channel) and `clamp` applied as each output is stored (inference), or
/// without (the identity transform: `x * 1 + 0` is exact) for training.
pub(super) fn depthwise_forward(
    x: FlexTensor,
    weight: FlexTensor,
    g: &crate::cpu::DepthwiseGeometry,
    affine: Option<(&[f32], &[f32])>,
    clamp: crate::cpu::Clamp,
) -> FlexTensor {
    let (x, weight) = (f32s(&x), f32s(&weight));
    let n = x.layout().shape()[0];
    let [oh, ow] = g.out_hw();
    let identity = (vec![1.0; g.channels], vec![0.0; g.channels]);
    let (scale, shift) = affine.unwrap_or((&identity.0, &identity.1));
    let y = crate::cpu::depthwise_forward_affine(
        x.storage::<f32>(),
        weight.storage::<f32>(),
        scale,
        shift,
        clamp,
        g,
    );
    tensor(y, &[n, g.channels, oh, ow])
}

/// `x`'s channels picked by `sources` (zeros where `None`) as a flex tensor
/// ([`DnalKernels::dnal_select_channels`]).
pub(super) fn select_planes(x: &FlexTensor, sources: &[Option<usize>]) -> FlexTensor {
    let x = f32s(x);
    let [n, c, h, w]: [usize; 4] = x.layout().shape()[..]
        .try_into()
        .expect("channels of a rank-4 tensor");
    let y = crate::cpu::select_channels(x.storage::<f32>(), [c, h, w], sources, 1);
    tensor(y, &[n, sources.len(), h, w])
}

pub(super) fn f32s(t: &FlexTensor) -> FlexTensor {
    let t = t.to_contiguous();
    assert_eq!(t.dtype(), DType::F32, "dnal kernels take f32 tensors");
    t
}

pub(super) fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

pub(super) fn per_channel(x: &FlexTensor) -> (usize, usize) {
    let s = x.layout().shape();
    let c = s[1];
    (c, s.num_elements() / (s[0] * c).max(1))
}

/// The values of an f32 tensor in row-major order: borrowed when they are stored so (no clone
/// of the tensor, whose layout is a few hundred bytes to copy: at batch 1 such clones were a
/// visible part of a thin network's forward), copied otherwise.
pub(super) fn vec_of(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "dnal kernels take f32 tensors");
    match t.as_slice::<f32>() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(f32s(t).storage::<f32>().to_vec()),
    }
}

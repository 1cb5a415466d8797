//! The kernels as a burn backend extension on flex, with hand-written backward passes
//! registered on burn's autodiff graph (burn 0.22's `extension` feature).

use super::cpu::{self, Clamp, ConvGeometry, Epilogue};
use super::direct;
use super::gemm::{MatMut, MatRef, matmul};
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, ExtensionType, Flex, backend_extension};
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

/// Groups of images whose weight-gradient contributions are summed in sequence.
const WEIGHT_GRAD_RUN: usize = 8;

/// A BatchNorm output with the batch statistics it used.
#[derive(ExtensionType)]
pub struct NormOutput<B: burn::backend::Backend> {
    /// `(x - mean) * inv_std * a + b`.
    pub output: FloatTensor<B>,
    /// Per-channel batch mean.
    pub mean: FloatTensor<B>,
    /// Per-channel biased batch variance.
    pub variance: FloatTensor<B>,
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

    /// [`dnal_conv2d`](Self::dnal_conv2d) followed by a per-output-channel `y * scale + shift`
    /// clamped to `[lo, hi]` (a BatchNorm and an activation folded into the convolution for
    /// inference), applied while the output is written.
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
}

fn f32s(t: &FlexTensor) -> FlexTensor {
    let t = t.to_contiguous();
    assert_eq!(t.dtype(), DType::F32, "dnal kernels take f32 tensors");
    t
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn geometry(x: &FlexTensor, weight: &FlexTensor, stride: usize, padding: usize) -> ConvGeometry {
    let xs = x.layout().shape();
    let ws = weight.layout().shape();
    ConvGeometry {
        in_channels: xs[1],
        out_channels: ws[0],
        in_hw: [xs[2], xs[3]],
        kernel: ws[2],
        stride,
        padding,
    }
}

/// Output positions a matrix product should see at least: images whose maps are smaller are
/// processed in groups, side by side, so that the product stays efficient (a 4x4 map alone
/// would give `gemm` 16 columns).
const GROUP_POSITIONS: usize = 256;

/// Images per group for `g` (1 when a map alone has enough positions).
fn group_size(g: &ConvGeometry, batch: usize) -> usize {
    GROUP_POSITIONS
        .div_ceil(g.positions())
        .clamp(1, batch.max(1))
}

/// Whether `gemm` itself should run its `m x k x n` products in parallel: when there are
/// fewer groups of images than threads (batch 1 in inference), the groups alone would leave
/// threads idle, and the products are large enough to share (flex's own threshold).
fn parallel_products(groups: usize, [m, k, n]: [usize; 3]) -> bool {
    groups < rayon::current_num_threads() && m * k * n >= 192 * 192 * 192
}

/// Fewest groups of images (forward) or runs of groups (weight gradient) the AVX-512 kernels
/// take: they spread whole groups over the threads, so fewer (small batches) are left to
/// `gemm`, which splits a product itself. A constant, not the number of threads, so that the
/// result does not depend on the number of threads.
const DIRECT_MIN_GROUPS: usize = 2;

/// Whether the AVX-512 kernels take `groups` groups of images (or runs of groups).
fn direct_path(groups: usize) -> bool {
    super::direct_enabled() && direct::available() && groups >= DIRECT_MIN_GROUPS
}

/// Per-thread buffers of the convolution, reused across the images a thread processes.
#[derive(Default)]
struct Scratch {
    /// Column matrix of a group of images.
    cols: Vec<f32>,
    /// A group's `[Co, n * L]` matrix (product or gathered output gradient).
    wide: Vec<f32>,
}

/// Fills `scratch.cols` with the column matrix `[P, count * L]` of `images`.
fn columns_into(images: &[f32], g: &ConvGeometry, cols: &mut Vec<f32>) {
    let images: Vec<&[f32]> = images.chunks(g.image()).collect();
    cols.clear();
    cpu::im2col(&images, g, cols);
}

/// Images `[count, C, L]` side by side as the matrix `[C, count * L]`, into `out`.
fn gather_group(images: &[f32], c: usize, l: usize, out: &mut Vec<f32>) {
    let count = images.len() / (c * l);
    out.clear();
    out.reserve(c * count * l);
    for ch in 0..c {
        for i in 0..count {
            out.extend_from_slice(&images[(i * c + ch) * l..][..l]);
        }
    }
}

/// The forward pass on slices: `x` `[N, Ci, H, W]`, `w` `[Co, P]`, result `[N, Co, OH, OW]`.
/// Groups of images in parallel: im2col into a per-thread buffer, then `W x cols`, written
/// straight into the image's output (one image per group) or through the group's product.
fn conv_forward_slices(
    x: &[f32],
    w: &[f32],
    g: &ConvGeometry,
    epilogue: Option<Epilogue>,
) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let batch = x.len() / g.image().max(1);
    let per = group_size(g, batch);
    let groups = batch.div_ceil(per);
    if batch * co * l > 0 && direct_path(groups) && direct::takes_forward(g) {
        let w = direct::PackedWeights::new(w, g);
        return direct::conv_forward(x, &w, g, per, epilogue);
    }
    let mut out = vec![0.0f32; batch * co * l];
    if out.is_empty() {
        return out;
    }
    let parallel = parallel_products(groups, [co, p, per * l]);
    let lhs = MatRef::row_major(w, co, p);
    out.par_chunks_mut(per * co * l)
        .zip(x.par_chunks(per * g.image()))
        .for_each_init(Scratch::default, |s, (dst, images)| {
            let count = dst.len() / (co * l);
            columns_into(images, g, &mut s.cols);
            let cols = MatRef::row_major(&s.cols, p, count * l);
            if count == 1 {
                matmul(MatMut::row_major(dst, co, l), lhs, cols, false, parallel);
                if let Some(e) = epilogue {
                    for (ch, plane) in dst.chunks_mut(l).enumerate() {
                        e.apply(ch, plane);
                    }
                }
                return;
            }
            s.wide.resize(co * count * l, 0.0);
            let wide = MatMut::row_major(&mut s.wide, co, count * l);
            matmul(wide, lhs, cols, false, parallel);
            for (at, plane) in dst.chunks_mut(l).enumerate() {
                let (i, ch) = (at / co, at % co);
                plane.copy_from_slice(&s.wide[(ch * count + i) * l..][..l]);
                if let Some(e) = epilogue {
                    e.apply(ch, plane);
                }
            }
        });
    out
}

/// The forward pass on flex tensors.
fn conv_forward(
    x: FlexTensor,
    weight: FlexTensor,
    stride: usize,
    padding: usize,
    epilogue: Option<Epilogue>,
) -> FlexTensor {
    let x = f32s(&x);
    let weight = f32s(&weight);
    let g = geometry(&x, &weight, stride, padding);
    let batch = x.layout().shape()[0];
    let out = conv_forward_slices(x.storage::<f32>(), weight.storage::<f32>(), &g, epilogue);
    let [oh, ow] = g.out_hw();
    tensor(out, &[batch, g.out_channels, oh, ow])
}

/// The weight gradient `sum_i dy_i [Co, L] x cols_i^T [L, P]`, as `[Co * P]`. Runs of
/// [`WEIGHT_GRAD_RUN`] groups are summed in parallel, each in sequence into its own buffer,
/// and the runs then in sequence, so the result does not depend on the number of threads.
fn conv_weight_grad(x: &[f32], dy: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let batch = x.len() / g.image().max(1);
    let per = group_size(g, batch);
    let groups: Vec<(usize, usize)> = (0..batch)
        .step_by(per)
        .map(|first| (first, per.min(batch - first)))
        .collect();
    let runs = groups.len().div_ceil(WEIGHT_GRAD_RUN);
    let direct = direct_path(runs) && direct::takes_weight_grad(g);
    let parallel = parallel_products(runs, [co, per * l, p]);
    let partial = |run: &[(usize, usize)]| {
        if direct {
            // The run's groups are consecutive images.
            let first = run[0].0;
            let images: usize = run.iter().map(|&(_, count)| count).sum();
            return direct::conv_weight_grad_images(
                &x[first * g.image()..][..images * g.image()],
                &dy[first * co * l..][..images * co * l],
                g,
            );
        }
        let mut s = Scratch::default();
        let mut dw = vec![0.0f32; co * p];
        for (n, &(first, count)) in run.iter().enumerate() {
            columns_into(&x[first * g.image()..][..count * g.image()], g, &mut s.cols);
            let cols_t = MatRef::row_major(&s.cols, p, count * l).t();
            let dy_group = &dy[first * co * l..][..count * co * l];
            let dy_group = if count == 1 {
                MatRef::row_major(dy_group, co, l)
            } else {
                gather_group(dy_group, co, l, &mut s.wide);
                MatRef::row_major(&s.wide, co, count * l)
            };
            let dst = MatMut::row_major(&mut dw, co, p);
            matmul(dst, dy_group, cols_t, n > 0, parallel);
        }
        dw
    };
    let sums: Vec<Vec<f32>> = groups.par_chunks(WEIGHT_GRAD_RUN).map(partial).collect();
    let mut sums = sums.into_iter();
    let mut dw = sums.next().unwrap_or_else(|| vec![0.0; co * p]);
    for run in sums {
        for (d, v) in dw.iter_mut().zip(&run) {
            *d += v;
        }
    }
    dw
}

/// The input gradient of a strided convolution: per group, `W^T [P, Co] x dy [Co, n * L]`,
/// then col2im of each image's columns.
fn conv_input_grad_strided(dy: &[f32], w: &[f32], g: &ConvGeometry, batch: usize) -> Vec<f32> {
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let per = group_size(g, batch);
    let parallel = parallel_products(batch.div_ceil(per), [p, co, per * l]);
    let w_t = MatRef::row_major(w, co, p).t();
    let mut dx = vec![0.0f32; batch * g.image()];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(per * g.image())
        .zip(dy.par_chunks(per * co * l))
        .for_each_init(Scratch::default, |s, (dst, dy)| {
            let count = dst.len() / g.image();
            let dy = if count == 1 {
                MatRef::row_major(dy, co, l)
            } else {
                gather_group(dy, co, l, &mut s.wide);
                MatRef::row_major(&s.wide, co, count * l)
            };
            s.cols.resize(p * count * l, 0.0);
            matmul(
                MatMut::row_major(&mut s.cols, p, count * l),
                w_t,
                dy,
                false,
                parallel,
            );
            for (i, image) in dst.chunks_mut(g.image()).enumerate() {
                cpu::col2im(&s.cols, g, count, i, image);
            }
        });
    dx
}

/// `(dx, dweight)`, each only when asked for.
fn conv_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    g: ConvGeometry,
    want_x: bool,
    want_w: bool,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let x = f32s(x);
    let grad = f32s(grad);
    let (xv, dy) = (x.storage::<f32>(), grad.storage::<f32>());
    let batch = x.layout().shape()[0];
    let dw = want_w.then(|| {
        let dw = conv_weight_grad(xv, dy, &g);
        tensor(dw, &[g.out_channels, g.in_channels, g.kernel, g.kernel])
    });
    let dx = want_x.then(|| {
        if g.stride == 1 {
            // The input gradient of a stride-1 convolution is the convolution of the output
            // gradient with the transposed, flipped kernel and padding k - 1 - p.
            let flipped = cpu::flip_transpose(f32s(weight).storage::<f32>(), &g);
            let k = g.kernel;
            let flipped = tensor(flipped, &[g.in_channels, g.out_channels, k, k]);
            return conv_forward(grad.clone(), flipped, 1, k - 1 - g.padding, None);
        }
        let dx = conv_input_grad_strided(dy, f32s(weight).storage::<f32>(), &g, batch);
        tensor(dx, &[batch, g.in_channels, g.in_hw[0], g.in_hw[1]])
    });
    (dx, dw)
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 2> for ConvBackward {
    type State = (FlexTensor, FlexTensor, ConvGeometry);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight, g) = ops.state;
        let (dx, dw) = conv_backward(&x, &weight, &grad, g, node_x.is_some(), node_w.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, dx);
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<Flex>(node.id, dw);
        }
    }
}

fn per_channel(x: &FlexTensor) -> (usize, usize) {
    let s = x.layout().shape();
    let c = s[1];
    (c, s.num_elements() / (s[0] * c).max(1))
}

fn vec_of(t: &FlexTensor) -> Vec<f32> {
    f32s(t).storage::<f32>().to_vec()
}

fn inv_std(variance: &[f32], epsilon: f64) -> Vec<f32> {
    variance
        .iter()
        .map(|&v| (1.0 / (f64::from(v) + epsilon).sqrt()) as f32)
        .collect()
}

fn norm_forward(
    x: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    epsilon: f64,
    clamp: Clamp,
) -> NormOutput<Flex> {
    let x = f32s(x);
    let (c, l) = per_channel(&x);
    let xv = x.storage::<f32>();
    let (mean, var) = cpu::channel_stats(xv, c, l);
    let r = inv_std(&var, epsilon);
    let (a, b) = (vec_of(a), vec_of(b));
    let scale: Vec<f32> = (0..c).map(|i| a[i] * r[i]).collect();
    let shift: Vec<f32> = (0..c).map(|i| b[i] - mean[i] * scale[i]).collect();
    let y = cpu::normalize(xv, c, l, &scale, &shift, clamp);
    NormOutput {
        output: tensor(y, x.layout().shape()),
        mean: tensor(mean, &[c]),
        variance: tensor(var, &[c]),
    }
}

impl DnalKernels for Flex {
    fn dnal_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(x, weight, stride, padding, None)
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
        let (scale, shift) = (vec_of(&scale), vec_of(&shift));
        let epilogue = Epilogue {
            scale: &scale,
            shift: &shift,
            clamp: Clamp { lo, hi },
        };
        conv_forward(x, weight, stride, padding, Some(epilogue))
    }

    fn dnal_batch_norm_train(
        x: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Flex> {
        norm_forward(&x, &a, &b, epsilon, Clamp { lo, hi })
    }
}

#[derive(Debug)]
struct NormBackward;

/// What [`NormBackward`] keeps: input, `a`, batch mean, batch variance, epsilon, and the
/// clamp with the output it cut (only when there is a clamp).
type NormState = (
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    f64,
    Option<(FlexTensor, Clamp)>,
);

impl Backward<Flex, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let grad = f32s(&grads.consume::<Flex>(&ops.node));
        let (x, a, mean, var, epsilon, clamped) = ops.state;
        let x = f32s(&x);
        let (c, l) = per_channel(&x);
        let (xv, gv) = (x.storage::<f32>(), grad.storage::<f32>());
        let (mean, var) = (vec_of(&mean), vec_of(&var));
        let r = inv_std(&var, epsilon);
        let output = clamped.map(|(y, clamp)| (f32s(&y), clamp));
        let clamp = output
            .as_ref()
            .map(|(y, clamp)| (y.storage::<f32>(), *clamp));
        let stats = (mean.as_slice(), r.as_slice());
        let (sum_dy, sum_dy_xhat) = cpu::batch_norm_grad_sums(xv, gv, c, l, stats, clamp);
        if let Some(node) = node_x {
            let sums = (sum_dy.as_slice(), sum_dy_xhat.as_slice());
            let dx = cpu::batch_norm_input_grad(xv, gv, c, l, stats, &vec_of(&a), sums, clamp);
            grads.register::<Flex>(node.id, tensor(dx, x.layout().shape()));
        }
        if let Some(node) = node_a {
            grads.register::<Flex>(node.id, tensor(sum_dy_xhat, &[c]));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, tensor(sum_dy, &[c]));
        }
    }
}

impl<C: CheckpointStrategy> DnalKernels for Autodiff<Flex, C> {
    /// Composed of differentiable operations: the convolution, the affine transform, the clamp.
    fn dnal_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self> {
        let y = Self::dnal_conv2d(x, weight, stride, padding);
        let c = shift.shape().num_elements();
        let per_channel = |t| Self::float_reshape(t, [1, c, 1, 1].into());
        let y = Self::float_add(Self::float_mul(y, per_channel(scale)), per_channel(shift));
        if (Clamp { lo, hi }).is_none() {
            y
        } else {
            Self::float_clamp(y, lo.into(), hi.into())
        }
    }

    fn dnal_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        match ConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let g = geometry(&x, &weight, stride, padding);
                let out = conv_forward(x.clone(), weight.clone(), stride, padding, None);
                prep.finish((x, weight, g), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
                None,
            )),
        }
    }

    fn dnal_batch_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Self> {
        let clamp = Clamp { lo, hi };
        match NormBackward
            .prepare::<C>([x.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, a, b) = (x.into_primitive(), a.into_primitive(), b.into_primitive());
                let out = norm_forward(&x, &a, &b, epsilon, clamp);
                let clamped = (!clamp.is_none()).then(|| (out.output.clone(), clamp));
                let state = (
                    x,
                    a,
                    out.mean.clone(),
                    out.variance.clone(),
                    epsilon,
                    clamped,
                );
                NormOutput {
                    output: prep.finish(state, out.output),
                    mean: Self::from_inner(out.mean),
                    variance: Self::from_inner(out.variance),
                }
            }
            OpsKind::UnTracked(prep) => {
                let out = norm_forward(x.primitive(), a.primitive(), b.primitive(), epsilon, clamp);
                NormOutput {
                    output: prep.finish(out.output),
                    mean: Self::from_inner(out.mean),
                    variance: Self::from_inner(out.variance),
                }
            }
        }
    }
}

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

    /// 2x2 max-pool with stride 2 (f32, `[N, C, H, W]`, an odd last row or column dropped),
    /// its backward sending each output's gradient to the input that won the window.
    fn dnal_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self>;
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

/// Fills `cols` with the column matrix `[P, count * L]` of `images` (`table`: the geometry's
/// gather table, built once per convolution).
fn columns_into(
    images: &[f32],
    g: &ConvGeometry,
    table: Option<&cpu::GatherTable>,
    cols: &mut Vec<f32>,
) {
    let images: Vec<&[f32]> = images.chunks(g.image()).collect();
    cols.clear();
    cpu::im2col_with(&images, g, table, cols);
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
    let table = cpu::GatherTable::new(g);
    let lhs = MatRef::row_major(w, co, p);
    out.par_chunks_mut(per * co * l)
        .zip(x.par_chunks(per * g.image()))
        .enumerate()
        .for_each_init(Scratch::default, |s, (n, (dst, images))| {
            // Offset of this group in the output (where a residual's values are).
            let first = n * per * co * l;
            let count = dst.len() / (co * l);
            columns_into(images, g, table.as_ref(), &mut s.cols);
            let cols = MatRef::row_major(&s.cols, p, count * l);
            if count == 1 {
                matmul(MatMut::row_major(dst, co, l), lhs, cols, false, parallel);
                if let Some(e) = epilogue {
                    for (ch, plane) in dst.chunks_mut(l).enumerate() {
                        e.apply(ch, plane, first + ch * l);
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
                    e.apply(ch, plane, first + at * l);
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
    let table = (!direct).then(|| cpu::GatherTable::new(g)).flatten();
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
            columns_into(
                &x[first * g.image()..][..count * g.image()],
                g,
                table.as_ref(),
                &mut s.cols,
            );
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
    (a, b): (&FlexTensor, &FlexTensor),
    residual: Option<&FlexTensor>,
    epsilon: f64,
    clamp: Clamp,
) -> NormOutput<Flex> {
    let x = f32s(x);
    let (c, l) = per_channel(&x);
    let xv = x.storage::<f32>();
    let (mean, var) = cpu::channel_stats(xv, c, l);
    let (scale, shift) = norm_affine(&vec_of(a), &vec_of(b), &mean, &var, epsilon);
    let residual = residual.map(f32s);
    let res = residual.as_ref().map(|t| t.storage::<f32>());
    let y = cpu::normalize(xv, c, l, (&scale, &shift), res, clamp);
    NormOutput {
        output: tensor(y, x.layout().shape()),
        mean: tensor(mean, &[c]),
        variance: tensor(var, &[c]),
    }
}

/// BatchNorm's per-channel `(scale, shift)`: `y = x * scale + shift`, `scale = a * inv_std`,
/// `shift = b - mean * scale` (the forward pass and the backward's recomputed clamp mask use
/// this one function, so they agree bit for bit).
fn norm_affine(
    a: &[f32],
    b: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>) {
    let r = inv_std(var, epsilon);
    let scale: Vec<f32> = a.iter().zip(&r).map(|(a, r)| a * r).collect();
    let shift = b
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

impl DnalKernels for Flex {
    fn dnal_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(x, weight, stride, padding, None)
    }

    fn dnal_max_pool2x2(x: FlexTensor) -> FlexTensor {
        max_pool_forward(&x).0
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

/// The inference convolution with BatchNorm, an optional residual and the clamp applied as
/// its output is written.
fn conv_affine(
    x: FlexTensor,
    weight: FlexTensor,
    (scale, shift): (FlexTensor, FlexTensor),
    residual: Option<FlexTensor>,
    stride: usize,
    padding: usize,
    clamp: Clamp,
) -> FlexTensor {
    let (scale, shift) = (vec_of(&scale), vec_of(&shift));
    let residual = residual.map(|r| f32s(&r));
    let epilogue = Epilogue {
        scale: &scale,
        shift: &shift,
        residual: residual.as_ref().map(|r| r.storage::<f32>()),
        clamp,
    };
    conv_forward(x, weight, stride, padding, Some(epilogue))
}

/// What the BatchNorm backward passes keep: input, `a`, `b`, batch mean, batch variance,
/// epsilon, and the clamp (its gradient mask is recomputed from the input).
type NormState = (
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    f64,
    Clamp,
);

/// `(dx, da, db, g)` of BatchNorm for the output gradient `grad`, passed back through the
/// state's clamp first (`g`, the clamp's input gradient); `dx` only when asked for. With
/// `output`, the clamp's input included a residual, so its mask comes from the output, and the
/// pass that applies it also sums what the weight gradients need; without, the mask is
/// recomputed from the input.
fn norm_grads(
    state: NormState,
    grad: FlexTensor,
    want_x: bool,
    output: Option<FlexTensor>,
) -> (Option<FlexTensor>, FlexTensor, FlexTensor, FlexTensor) {
    let (x, a, b, mean, var, epsilon, clamp) = state;
    let grad = f32s(&grad);
    let x = f32s(&x);
    let (c, l) = per_channel(&x);
    let (xv, gv) = (x.storage::<f32>(), grad.storage::<f32>());
    let (a, mean, var) = (vec_of(&a), vec_of(&mean), vec_of(&var));
    let r = inv_std(&var, epsilon);
    let stats = (mean.as_slice(), r.as_slice());
    let (scale, shift) = norm_affine(&a, &vec_of(&b), &mean, &var, epsilon);
    let (through, (sum_dy, sum_dy_xhat), mask) = match output {
        Some(y) if !clamp.is_none() => {
            let y = f32s(&y);
            let (g, sd, sdx) =
                cpu::through_clamp_grad_sums(gv, y.storage::<f32>(), xv, c, l, stats, clamp);
            (Some(g), (sd, sdx), None)
        }
        _ => {
            let mask = (!clamp.is_none()).then_some(cpu::ClampOf {
                scale: &scale,
                shift: &shift,
                clamp,
            });
            (
                None,
                cpu::batch_norm_grad_sums(xv, gv, c, l, stats, mask),
                mask,
            )
        }
    };
    let dx = want_x.then(|| {
        let sums = (sum_dy.as_slice(), sum_dy_xhat.as_slice());
        let gv = through.as_deref().unwrap_or(gv);
        let dx = cpu::batch_norm_input_grad(xv, gv, c, l, stats, &a, sums, mask);
        tensor(dx, x.layout().shape())
    });
    let g = match through {
        Some(g) => tensor(g, x.layout().shape()),
        None => grad,
    };
    (dx, tensor(sum_dy_xhat, &[c]), tensor(sum_dy, &[c]), g)
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Flex, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, da, db, _) = norm_grads(ops.state, grad, node_x.is_some(), None);
        let ids = [node_x, node_a, node_b].map(|n| n.map(|n| n.id));
        register(grads, ids, [dx, Some(da), Some(db)]);
    }
}

/// BatchNorm plus a residual, then the clamp: the residual's gradient is the clamp's input
/// gradient, which is also what BatchNorm's own backward passes start from.
#[derive(Debug)]
struct NormAddBackward;

impl Backward<Flex, 4> for NormAddBackward {
    /// BatchNorm's state and the output (clamped after the residual was added).
    type State = (NormState, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b, node_r] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (state, y) = ops.state;
        let (dx, da, db, g) = norm_grads(state, grad, node_x.is_some(), Some(y));
        let ids = [node_x, node_a, node_b, node_r].map(|n| n.map(|n| n.id));
        register(grads, ids, [dx, Some(da), Some(db), Some(g)]);
    }
}

/// The pooled output, which input won each window, and the input's shape `[N, C, H, W]`.
fn max_pool_forward(x: &FlexTensor) -> (FlexTensor, Vec<u8>, [usize; 4]) {
    let x = f32s(x);
    let [n, c, h, w]: [usize; 4] = x.layout().shape()[..]
        .try_into()
        .expect("max-pool of a rank-4 tensor");
    let (y, at) = cpu::max_pool2x2(x.storage::<f32>(), n * c, [h, w]);
    (tensor(y, &[n, c, h / 2, w / 2]), at, [n, c, h, w])
}

#[derive(Debug)]
struct PoolBackward;

impl Backward<Flex, 1> for PoolBackward {
    /// Which input won each window, and the input's shape.
    type State = (std::sync::Arc<Vec<u8>>, [usize; 4]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (at, [n, c, h, w]) = ops.state;
        if let Some(node) = node_x {
            let grad = f32s(&grad);
            let dx = cpu::max_pool2x2_backward(grad.storage::<f32>(), &at, n * c, [h, w]);
            grads.register::<Flex>(node.id, tensor(dx, &[n, c, h, w]));
        }
    }
}

/// Registers each gradient whose parent is tracked.
fn register<const N: usize>(
    grads: &mut Gradients,
    ids: [Option<burn::backend::autodiff::NodeId>; N],
    values: [Option<FlexTensor>; N],
) {
    for (id, grad) in ids.into_iter().zip(values) {
        if let (Some(id), Some(grad)) = (id, grad) {
            grads.register::<Flex>(id, grad);
        }
    }
}

impl<C: CheckpointStrategy> DnalKernels for Autodiff<Flex, C> {
    fn dnal_max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match PoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, at, shape) = max_pool_forward(&x.into_primitive());
                prep.finish((std::sync::Arc::new(at), shape), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(max_pool_forward(&x.into_primitive()).0),
        }
    }

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
        clamp_tensor::<C>(y, Clamp { lo, hi })
    }

    /// Composed of differentiable operations, as [`Self::dnal_conv2d_affine`].
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
    ) -> FloatTensor<Self> {
        let none = Clamp::NONE;
        let y =
            Self::dnal_conv2d_affine(x, weight, scale, shift, stride, padding, none.lo, none.hi);
        clamp_tensor::<C>(Self::float_add(y, residual), Clamp { lo, hi })
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
                let (state, out) = tracked_norm(x, a, b, None, epsilon, clamp);
                let output = prep.finish(state, out.output.clone());
                norm_output::<C>(output, out)
            }
            OpsKind::UnTracked(prep) => {
                let (x, a, b) = (x.primitive(), a.primitive(), b.primitive());
                let out = norm_forward(x, (a, b), None, epsilon, clamp);
                norm_output::<C>(prep.finish(out.output.clone()), out)
            }
        }
    }

    fn dnal_batch_norm_add_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
        lo: f32,
        hi: f32,
    ) -> NormOutput<Self> {
        let clamp = Clamp { lo, hi };
        match NormAddBackward
            .prepare::<C>([x.node(), a.node(), b.node(), residual.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, a, b) = (x.into_primitive(), a.into_primitive(), b.into_primitive());
                let r = residual.into_primitive();
                let (state, out) = tracked_norm(x, a, b, Some(r), epsilon, clamp);
                let output = prep.finish((state, out.output.clone()), out.output.clone());
                norm_output::<C>(output, out)
            }
            OpsKind::UnTracked(prep) => {
                let (x, a, b) = (x.primitive(), a.primitive(), b.primitive());
                let out = norm_forward(x, (a, b), Some(residual.primitive()), epsilon, clamp);
                norm_output::<C>(prep.finish(out.output.clone()), out)
            }
        }
    }
}

/// `y` clamped with differentiable operations (unchanged without a clamp).
fn clamp_tensor<C: CheckpointStrategy>(
    y: FloatTensor<Autodiff<Flex, C>>,
    clamp: Clamp,
) -> FloatTensor<Autodiff<Flex, C>> {
    if clamp.is_none() {
        y
    } else {
        Autodiff::<Flex, C>::float_clamp(y, clamp.lo.into(), clamp.hi.into())
    }
}

/// A tracked BatchNorm's forward: the state its backward keeps, and its output.
fn tracked_norm(
    x: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    residual: Option<FlexTensor>,
    epsilon: f64,
    clamp: Clamp,
) -> (NormState, NormOutput<Flex>) {
    let out = norm_forward(&x, (&a, &b), residual.as_ref(), epsilon, clamp);
    let state = (
        x,
        a,
        b,
        out.mean.clone(),
        out.variance.clone(),
        epsilon,
        clamp,
    );
    (state, out)
}

/// The autodiff output of a BatchNorm: the tracked `output`, the untracked statistics.
fn norm_output<C: CheckpointStrategy>(
    output: FloatTensor<Autodiff<Flex, C>>,
    out: NormOutput<Flex>,
) -> NormOutput<Autodiff<Flex, C>> {
    NormOutput {
        output,
        mean: Autodiff::<Flex, C>::from_inner(out.mean),
        variance: Autodiff::<Flex, C>::from_inner(out.variance),
    }
}

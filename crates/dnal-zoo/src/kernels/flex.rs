//! The kernels as a burn backend extension on flex, with hand-written backward passes
//! registered on burn's autodiff graph (burn 0.22's `extension` feature).

use super::cpu::{self, ConvGeometry};
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
    /// (a BatchNorm folded into the convolution for inference), applied while the output is
    /// written.
    fn dnal_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// Batch-statistics BatchNorm with a per-channel affine transform `a`, `b` (the caller
    /// folds gamma, beta and any gate into them): two passes forward, two backward.
    fn dnal_batch_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        epsilon: f64,
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

/// Images `first..first + count` of a contiguous `[N, C, L]` tensor as one `[C, count * L]`
/// matrix (a view when `count` is 1).
fn group_matrix(t: &FlexTensor, first: usize, count: usize, c: usize, l: usize) -> FlexTensor {
    if count == 1 {
        return t.narrow(0, first, 1).reshape([c, l].into());
    }
    let v = t.storage::<f32>();
    let mut out = Vec::with_capacity(c * count * l);
    for ch in 0..c {
        for i in first..first + count {
            out.extend_from_slice(&v[(i * c + ch) * l..][..l]);
        }
    }
    tensor(out, &[c, count * l])
}

/// Per-output-channel `(scale, shift)` applied as the output is written.
type ChannelAffine<'a> = Option<(&'a [f32], &'a [f32])>;

/// Writes `[C, count * L]` back as `count` images `[C, L]` into `dst`, applying
/// `v * scale[ch] + shift[ch]` to channel `ch` when given.
fn ungroup(y: &[f32], c: usize, l: usize, count: usize, affine: ChannelAffine, dst: &mut [f32]) {
    for (at, out) in dst.chunks_mut(l).enumerate() {
        let (i, ch) = (at / c, at % c);
        let src = &y[ch * count * l + i * l..][..l];
        match affine {
            Some((scale, shift)) => {
                let (m, b) = (scale[ch], shift[ch]);
                for (o, v) in out.iter_mut().zip(src) {
                    *o = v * m + b;
                }
            }
            None => out.copy_from_slice(src),
        }
    }
}

/// The column matrix `[P, count * L]` of images `first..first + count` of `x`.
fn columns(x: &[f32], g: &ConvGeometry, first: usize, count: usize) -> FlexTensor {
    let images: Vec<&[f32]> = x[first * g.image()..(first + count) * g.image()]
        .chunks(g.image())
        .collect();
    let mut cols = Vec::new();
    cpu::im2col(&images, g, &mut cols);
    tensor(cols, &[g.patch(), count * g.positions()])
}

/// The forward pass, groups of images in parallel: im2col into a buffer that stays in cache,
/// then `W [Co, P] x cols [P, n * L]`, which is already NCHW for one image.
fn conv_forward(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
    conv_forward_affine(x, weight, None, stride, padding)
}

/// [`conv_forward`] with `v * scale[co] + shift[co]` applied to output channel `co`.
fn conv_forward_affine(
    x: FlexTensor,
    weight: FlexTensor,
    affine: ChannelAffine,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let x = f32s(&x);
    let g = geometry(&x, &weight, stride, padding);
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let w2d = f32s(&weight).reshape([co, p].into());
    let xv = x.storage::<f32>();
    let batch = x.layout().shape()[0];
    let per = group_size(&g, batch);
    let mut out = vec![0.0f32; batch * co * l];
    out.par_chunks_mut(per * co * l)
        .enumerate()
        .for_each(|(n, dst)| {
            let count = dst.len() / (co * l);
            let y = f32s(&Flex::float_matmul(
                w2d.clone(),
                columns(xv, &g, n * per, count),
            ));
            ungroup(y.storage::<f32>(), co, l, count, affine, dst);
        });
    let [oh, ow] = g.out_hw();
    tensor(out, &[batch, co, oh, ow])
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
    let xv = x.storage::<f32>();
    let batch = x.layout().shape()[0];
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let per = group_size(&g, batch);
    let groups: Vec<(usize, usize)> = (0..batch)
        .step_by(per)
        .map(|first| (first, per.min(batch - first)))
        .collect();
    // dW = sum over groups of grad [Co, n * L] x cols^T [n * L, P], summed in a fixed order
    // (runs of groups in parallel, each run and then the runs in sequence) so that the result
    // does not depend on the number of threads.
    let dw = want_w.then(|| {
        let partial = |run: &[(usize, usize)]| {
            run.iter()
                .map(|&(first, count)| {
                    let cols = columns(xv, &g, first, count);
                    let dy = group_matrix(&grad, first, count, co, l);
                    Flex::float_matmul(dy, cols.transpose(0, 1))
                })
                .reduce(Flex::float_add)
                .expect("a non-empty run")
        };
        let sum = groups
            .par_chunks(WEIGHT_GRAD_RUN)
            .map(partial)
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(Flex::float_add)
            .expect("a non-empty batch");
        f32s(&sum).reshape([co, g.in_channels, g.kernel, g.kernel].into())
    });
    let dx = want_x.then(|| {
        if g.stride == 1 {
            // The input gradient of a stride-1 convolution is the convolution of the output
            // gradient with the transposed, flipped kernel and padding k - 1 - p.
            let flipped = Flex::float_flip(Flex::float_swap_dims(weight.clone(), 0, 1), &[2, 3]);
            return conv_forward(grad.clone(), f32s(&flipped), 1, g.kernel - 1 - g.padding);
        }
        // Strided: col2im of W^T [P, Co] x grad [Co, n * L], group by group.
        let w2d_t = f32s(weight).reshape([co, p].into()).transpose(0, 1);
        let mut dx = vec![0.0f32; batch * g.image()];
        dx.par_chunks_mut(per * g.image())
            .enumerate()
            .for_each(|(n, dst)| {
                let count = dst.len() / g.image();
                let dy = group_matrix(&grad, n * per, count, co, l);
                let dcols = f32s(&Flex::float_matmul(w2d_t.clone(), dy));
                for (i, image) in dst.chunks_mut(g.image()).enumerate() {
                    cpu::col2im(dcols.storage::<f32>(), &g, count, i, image);
                }
            });
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

fn norm_forward(x: &FlexTensor, a: &FlexTensor, b: &FlexTensor, epsilon: f64) -> NormOutput<Flex> {
    let x = f32s(x);
    let (c, l) = per_channel(&x);
    let xv = x.storage::<f32>();
    let (mean, var) = cpu::channel_stats(xv, c, l);
    let r = inv_std(&var, epsilon);
    let (a, b) = (vec_of(a), vec_of(b));
    let scale: Vec<f32> = (0..c).map(|i| a[i] * r[i]).collect();
    let shift: Vec<f32> = (0..c).map(|i| b[i] - mean[i] * scale[i]).collect();
    let y = cpu::normalize(xv, c, l, &scale, &shift);
    NormOutput {
        output: tensor(y, x.layout().shape()),
        mean: tensor(mean, &[c]),
        variance: tensor(var, &[c]),
    }
}

impl DnalKernels for Flex {
    fn dnal_conv2d(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(x, weight, stride, padding)
    }

    fn dnal_conv2d_affine(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let (scale, shift) = (vec_of(&scale), vec_of(&shift));
        conv_forward_affine(x, weight, Some((&scale, &shift)), stride, padding)
    }

    fn dnal_batch_norm_train(
        x: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        epsilon: f64,
    ) -> NormOutput<Flex> {
        norm_forward(&x, &a, &b, epsilon)
    }
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Flex, 3> for NormBackward {
    /// Input, `a`, batch mean, batch variance, epsilon.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let grad = f32s(&grads.consume::<Flex>(&ops.node));
        let (x, a, mean, var, epsilon) = ops.state;
        let x = f32s(&x);
        let (c, l) = per_channel(&x);
        let (xv, gv) = (x.storage::<f32>(), grad.storage::<f32>());
        let (mean, var) = (vec_of(&mean), vec_of(&var));
        let r = inv_std(&var, epsilon);
        let (sum_dy, sum_dy_xhat) = cpu::batch_norm_grad_sums(xv, gv, c, l, &mean, &r);
        if let Some(node) = node_x {
            let dx = cpu::batch_norm_input_grad(
                xv,
                gv,
                c,
                l,
                &mean,
                &r,
                &vec_of(&a),
                (&sum_dy, &sum_dy_xhat),
            );
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
    /// Composed of differentiable operations: the convolution, then the affine transform.
    fn dnal_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let y = Self::dnal_conv2d(x, weight, stride, padding);
        let c = shift.shape().num_elements();
        let per_channel = |t| Self::float_reshape(t, [1, c, 1, 1].into());
        Self::float_add(Self::float_mul(y, per_channel(scale)), per_channel(shift))
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
                let out = conv_forward(x.clone(), weight.clone(), stride, padding);
                prep.finish((x, weight, g), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
            )),
        }
    }

    fn dnal_batch_norm_train(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        epsilon: f64,
    ) -> NormOutput<Self> {
        match NormBackward
            .prepare::<C>([x.node(), a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, a, b) = (x.into_primitive(), a.into_primitive(), b.into_primitive());
                let out = norm_forward(&x, &a, &b, epsilon);
                let state = (x, a, out.mean.clone(), out.variance.clone(), epsilon);
                NormOutput {
                    output: prep.finish(state, out.output),
                    mean: Self::from_inner(out.mean),
                    variance: Self::from_inner(out.variance),
                }
            }
            OpsKind::UnTracked(prep) => {
                let out = norm_forward(x.primitive(), a.primitive(), b.primitive(), epsilon);
                NormOutput {
                    output: prep.finish(out.output),
                    mean: Self::from_inner(out.mean),
                    variance: Self::from_inner(out.variance),
                }
            }
        }
    }
}

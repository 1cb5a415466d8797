//! The kernels as a burn backend extension on flex, with hand-written backward passes
//! registered on burn's autodiff graph (burn 0.22's `extension` feature).

use super::cpu::{self, ConvGeometry};
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

/// Images per group whose weight-gradient contributions are summed in sequence.
const WEIGHT_GRAD_GROUP: usize = 8;

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

/// Image `i` of a contiguous `[N, ...]` tensor as a `[rows, cols]` matrix view.
fn image_matrix(t: &FlexTensor, i: usize, rows: usize, cols: usize) -> FlexTensor {
    t.narrow(0, i, 1).reshape([rows, cols].into())
}

/// The column matrix `[P, L]` of image `i` of `x`.
fn columns(x: &[f32], g: &ConvGeometry, i: usize) -> FlexTensor {
    let mut cols = Vec::new();
    cpu::im2col(&x[i * g.image()..(i + 1) * g.image()], g, &mut cols);
    tensor(cols, &[g.patch(), g.positions()])
}

/// The forward pass, image by image in parallel: im2col into a buffer that stays in cache,
/// then `W [Co, P] x cols [P, L]`, which is already the image's NCHW output.
fn conv_forward(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
    let x = f32s(&x);
    let g = geometry(&x, &weight, stride, padding);
    let (co, p, l) = (g.out_channels, g.patch(), g.positions());
    let w2d = f32s(&weight).reshape([co, p].into());
    let xv = x.storage::<f32>();
    let batch = x.layout().shape()[0];
    let mut out = vec![0.0f32; batch * co * l];
    out.par_chunks_mut(co * l).enumerate().for_each(|(i, dst)| {
        let y = Flex::float_matmul(w2d.clone(), columns(xv, &g, i));
        dst.copy_from_slice(f32s(&y).storage::<f32>());
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
    // dW = sum over images of grad_i [Co, L] x cols_i^T [L, P], summed in a fixed order
    // (groups of images in parallel, each group and then the groups in sequence) so that the
    // result does not depend on the number of threads.
    let dw = want_w.then(|| {
        let images: Vec<usize> = (0..batch).collect();
        let partial = |ids: &[usize]| {
            ids.iter()
                .map(|&i| {
                    let cols = columns(xv, &g, i);
                    Flex::float_matmul(image_matrix(&grad, i, co, l), cols.transpose(0, 1))
                })
                .reduce(Flex::float_add)
                .expect("a non-empty group")
        };
        let sum = images
            .par_chunks(WEIGHT_GRAD_GROUP)
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
        // Strided: col2im of W^T [P, Co] x grad_i [Co, L], image by image.
        let w2d_t = f32s(weight).reshape([co, p].into()).transpose(0, 1);
        let mut dx = vec![0.0f32; batch * g.image()];
        dx.par_chunks_mut(g.image())
            .enumerate()
            .for_each(|(i, dst)| {
                let dcols = f32s(&Flex::float_matmul(
                    w2d_t.clone(),
                    image_matrix(&grad, i, co, l),
                ));
                cpu::col2im(dcols.storage::<f32>(), &g, dst);
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

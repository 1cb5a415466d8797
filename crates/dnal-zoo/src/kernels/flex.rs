//! The kernels as a burn backend extension on flex, with hand-written backward passes
//! registered on burn's autodiff graph (burn 0.22's `extension` feature).

use super::cpu;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, ExtensionType, Flex, backend_extension};
use burn::tensor::{DType, TensorData};

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

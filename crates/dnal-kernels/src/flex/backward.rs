//! [`DnalKernels`] on flex with autodiff: each operation's backward pass, registered on burn's
//! autodiff graph.

use super::conv::{conv_backward, conv_forward, geometry};
use super::forward::max_pool_forward;
use super::norm::{NormState, norm_forward, norm_forward_into, norm_grads, norm_grads_into};
use super::{
    Affine, DnalKernels, NormOutput, depthwise_forward, depthwise_geometry, f32s, select_planes,
    tensor,
};
use crate::cpu::{self, Clamp, ConvGeometry, DepthwiseGeometry};
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Flex};
use burn::tensor::{IndexingUpdateOp, TensorData};

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

#[derive(Debug)]
struct DepthwiseBackward;

impl Backward<Flex, 2> for DepthwiseBackward {
    type State = (FlexTensor, FlexTensor, DepthwiseGeometry);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = f32s(&grads.consume::<Flex>(&ops.node));
        let (x, weight, g) = ops.state;
        let dy = grad.storage::<f32>();
        if let Some(node) = node_x {
            let w = f32s(&weight);
            let dx = cpu::depthwise_input_grad(dy, w.storage::<f32>(), &g);
            grads.register::<Flex>(node.id, tensor(dx, &x.layout().shape()[..]));
        }
        if let Some(node) = node_w {
            let x = f32s(&x);
            let dw = cpu::depthwise_weight_grad(x.storage::<f32>(), dy, &g);
            grads.register::<Flex>(node.id, tensor(dw, &weight.layout().shape()[..]));
        }
    }
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

/// BatchNorm added into some channels of a residual stream, then the clamp: the stream's
/// gradient is the clamp's input gradient, BatchNorm's output gradient that at its channels.
#[derive(Debug)]
struct NormIntoBackward;

impl Backward<Flex, 4> for NormIntoBackward {
    /// BatchNorm's state (its clamp the identity), the output, the stream channels BatchNorm's
    /// output went into and the clamp after the add.
    type State = (NormState, FlexTensor, Vec<usize>, Clamp);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b, node_s] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (state, y, channels, clamp) = ops.state;
        let (dx, da, db, ds) =
            norm_grads_into(state, grad, node_x.is_some(), (y, &channels, clamp));
        let ids = [node_x, node_a, node_b, node_s].map(|n| n.map(|n| n.id));
        register(grads, ids, [dx, Some(da), Some(db), Some(ds)]);
    }
}

/// Channels picked (or zeros): each gradient plane goes back to the channel it came from.
#[derive(Debug)]
struct SelectBackward;

impl Backward<Flex, 1> for SelectBackward {
    /// The input's channels and the sources of the output's.
    type State = (usize, Vec<Option<usize>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (channels, sources) = ops.state;
        if let Some(node) = node_x {
            let mut back = vec![None; channels];
            for (o, s) in sources.iter().enumerate() {
                if let Some(i) = *s {
                    back[i] = Some(o);
                }
            }
            grads.register::<Flex>(node.id, select_planes(&grad, &back));
        }
    }
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
                let (y, at, shape) = max_pool_forward(&x.into_primitive(), true);
                prep.finish((std::sync::Arc::new(at), shape), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(max_pool_forward(&x.into_primitive(), false).0),
        }
    }

    /// Composed of differentiable operations, one by one.
    fn dnal_fold_batch_norm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
    ) -> Affine<Self> {
        let inv_std = Self::float_recip(Self::float_sqrt(Self::float_add_scalar(
            var,
            epsilon.into(),
        )));
        let scale = Self::float_mul(a, inv_std);
        let shift = Self::float_sub(b, Self::float_mul(mean, scale.clone()));
        Affine { scale, shift }
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
        affine_clamp::<C>(y, scale, shift, Clamp { lo, hi })
    }

    /// Composed of differentiable operations, as [`Self::dnal_conv2d_affine`].
    fn dnal_depthwise_conv2d_affine(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        lo: f32,
        hi: f32,
    ) -> FloatTensor<Self> {
        let y = Self::dnal_depthwise_conv2d(x, weight, stride, padding);
        affine_clamp::<C>(y, scale, shift, Clamp { lo, hi })
    }

    /// Composed of differentiable operations: the convolution and affine transform, an index
    /// add, the clamp.
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
    ) -> FloatTensor<Self> {
        let y = unclamped_conv_affine::<C>(x, weight, [scale, shift], stride, padding);
        let device = stream.device();
        let at: Vec<i64> = channels.iter().map(|&c| c as i64).collect();
        let at = Self::int_from_data(TensorData::new(at, [channels.len()]), &device);
        let sum = Self::float_select_assign(stream, 1, at, y, IndexingUpdateOp::Add);
        clamp_tensor::<C>(sum, Clamp { lo, hi })
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
        let y = unclamped_conv_affine::<C>(x, weight, [scale, shift], stride, padding);
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

    fn dnal_depthwise_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        match DepthwiseBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let g = depthwise_geometry(&x, &weight, stride, padding);
                let out = depthwise_forward(x.clone(), weight.clone(), &g, None, Clamp::NONE);
                prep.finish((x, weight, g), out)
            }
            OpsKind::UnTracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let g = depthwise_geometry(&x, &weight, stride, padding);
                prep.finish(depthwise_forward(x, weight, &g, None, Clamp::NONE))
            }
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

    fn dnal_select_channels(
        x: FloatTensor<Self>,
        sources: Vec<Option<usize>>,
    ) -> FloatTensor<Self> {
        match SelectBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let channels = x.layout().shape()[1];
                let out = select_planes(&x, &sources);
                prep.finish((channels, sources), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(select_planes(x.primitive(), &sources)),
        }
    }

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
    ) -> NormOutput<Self> {
        let clamp = Clamp { lo, hi };
        match NormIntoBackward
            .prepare::<C>([x.node(), a.node(), b.node(), stream.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, a, b) = (x.into_primitive(), a.into_primitive(), b.into_primitive());
                let s = stream.into_primitive();
                let out = norm_forward_into(&x, (&a, &b), &s, &channels, epsilon, clamp);
                // The clamp comes after the add: the backward applies it to the stream.
                let state = norm_state((x, a, b), &out, epsilon, Clamp::NONE);
                let output = prep.finish(
                    (state, out.output.clone(), channels, clamp),
                    out.output.clone(),
                );
                norm_output::<C>(output, out)
            }
            OpsKind::UnTracked(prep) => {
                let (x, a, b) = (x.primitive(), a.primitive(), b.primitive());
                let s = stream.primitive();
                let out = norm_forward_into(x, (a, b), s, &channels, epsilon, clamp);
                norm_output::<C>(prep.finish(out.output.clone()), out)
            }
        }
    }
}

/// The convolution with the per-channel affine transform and no clamp, tracked.
fn unclamped_conv_affine<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    weight: FloatTensor<Autodiff<Flex, C>>,
    [scale, shift]: [FloatTensor<Autodiff<Flex, C>>; 2],
    stride: usize,
    padding: usize,
) -> FloatTensor<Autodiff<Flex, C>> {
    let Clamp { lo, hi } = Clamp::NONE;
    Autodiff::<Flex, C>::dnal_conv2d_affine(x, weight, scale, shift, stride, padding, lo, hi)
}

/// `clamp(y * scale + shift)` per channel of `y` (`[N, C, H, W]`), in differentiable operations.
fn affine_clamp<C: CheckpointStrategy>(
    y: FloatTensor<Autodiff<Flex, C>>,
    scale: FloatTensor<Autodiff<Flex, C>>,
    shift: FloatTensor<Autodiff<Flex, C>>,
    clamp: Clamp,
) -> FloatTensor<Autodiff<Flex, C>> {
    type B<C> = Autodiff<Flex, C>;
    let c = shift.shape().num_elements();
    let per_channel = |t| B::<C>::float_reshape(t, [1, c, 1, 1].into());
    let y = B::<C>::float_add(B::<C>::float_mul(y, per_channel(scale)), per_channel(shift));
    clamp_tensor::<C>(y, clamp)
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
    (norm_state((x, a, b), &out, epsilon, clamp), out)
}

/// What a tracked BatchNorm's backward keeps: its input and affine parameters, the batch
/// statistics of its output `out`, epsilon and the clamp its backward applies.
fn norm_state(
    (x, a, b): (FlexTensor, FlexTensor, FlexTensor),
    out: &NormOutput<Flex>,
    epsilon: f64,
    clamp: Clamp,
) -> NormState {
    let (mean, variance) = (out.mean.clone(), out.variance.clone());
    (x, a, b, mean, variance, epsilon, clamp)
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

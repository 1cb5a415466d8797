//! The training loss on the CubeCL backends as a burn backend extension: the mean
//! cross-entropy of a batch's logits and its count of correct top-1 predictions in one launch,
//! the logits' gradient in one more. Built from burn's operations (log-softmax's reductions, a
//! gather, a mean, an argmax and a comparison, and their backward passes) the loss took about
//! twenty launches per step, each a request the host issues.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Cube, ExtensionType, backend_extension};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::layout::{empties, empty};
use super::norm_kernels::lane_sums;

/// The loss of a batch, its correct predictions, and what the backward reads.
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct LossOutput<B: burn::backend::Backend> {
    /// The mean cross-entropy, `[1]`.
    pub loss: FloatTensor<B>,
    /// How many rows' largest logit is their label's (the first of equal ones), `[1]`.
    pub hits: FloatTensor<B>,
    /// Each row's log-sum-exp, `[N]`.
    pub lse: FloatTensor<B>,
}

fn loss_meta(logits: &TensorSpec) -> LossOutputMetadata {
    let one = TensorSpec::new(Shape::new([1]), logits.dtype);
    LossOutputMetadata {
        loss: one.clone(),
        hits: one,
        lse: TensorSpec::new(Shape::new([logits.shape[0]]), logits.dtype),
    }
}

/// The cross-entropy of `[N, C]` f32 logits against labels given as f32 class indices `[N]`
/// (exact below 2^24). A label outside `0..C` is read as `C - 1`: the trainer's data sets
/// reject such labels when they load, and the kernels must not read outside the logits.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait CubeLoss: burn::backend::Backend {
    /// The mean loss, the number of correct predictions and each row's log-sum-exp.
    #[fusion(meta = |logits, _labels| loss_meta(logits))]
    fn dnal_cube_cross_entropy(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
    ) -> LossOutput<Self>;

    /// The logits' gradient from the loss's gradient `dloss` (`[1]`):
    /// `(softmax(logits) - onehot(labels)) * dloss / N`.
    #[fusion(dtype = logits, shape = Shape::new([logits[0], logits[1]]))]
    fn dnal_cube_cross_entropy_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// One cube walks the rows, `block` units apart: per row its largest logit (the first of
/// equal ones) and log-sum-exp, and the row's loss and hit; then the units' sums are added
/// in shared memory ([`lane_sums`], one lane per unit) and unit 0 writes the mean loss and
/// the hits.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_forward(
    logits: &[f32],
    labels: &[f32],
    lse: &mut [f32],
    loss: &mut [f32],
    hits: &mut [f32],
    rows: usize,
    classes: usize,
    #[comptime] block: u32,
) {
    let u = UNIT_POS_X as usize;
    let mut loss_sum = 0.0f32;
    let mut hit_sum = 0.0f32;
    let mut r = u;
    while r < rows {
        let base = r * classes;
        let mut top = logits[base];
        let mut best = 0usize;
        for k in 1..classes {
            let v = logits[base + k];
            if v > top {
                top = v;
                best = k;
            }
        }
        let mut sum = 0.0f32;
        for k in 0..classes {
            sum += f32::exp(logits[base + k] - top);
        }
        let s = top + f32::ln(sum);
        lse[r] = s;
        let label = label_of(labels[r], classes);
        loss_sum += s - logits[base + label];
        if best == label {
            hit_sum += 1.0;
        }
        r += block as usize;
    }
    let (loss_sum, hit_sum) = lane_sums(loss_sum, hit_sum, 1, block);
    if u == 0 {
        loss[0] = loss_sum / f32::cast_from(rows);
        hits[0] = hit_sum;
    }
}

/// A label as an index into a row of `classes` logits (one past the end read as the last).
#[cube]
fn label_of(label: f32, classes: usize) -> usize {
    let k = u32::cast_from(label) as usize;
    select(k < classes, k, classes - 1)
}

/// `dlogits = (exp(logits - lse) - onehot(labels)) * dloss / rows`, per element.
#[cube(launch)]
fn cross_entropy_backward(
    logits: &[f32],
    labels: &[f32],
    lse: &[f32],
    dloss: &[f32],
    dlogits: &mut [f32],
    rows: usize,
    classes: usize,
) {
    let i = ABSOLUTE_POS;
    if i >= dlogits.len() {
        terminate!();
    }
    let r = i / classes;
    let mut d = f32::exp(logits[i] - lse[r]);
    if i - r * classes == label_of(labels[r], classes) {
        d -= 1.0;
    }
    dlogits[i] = d * dloss[0] / f32::cast_from(rows);
}

/// Units of the forward's one cube: the rows rounded up to a power of two, 32 to 256.
fn forward_block(rows: usize) -> u32 {
    rows.next_power_of_two().clamp(32, 256) as u32
}

impl CubeLoss for CubeBackend {
    fn dnal_cube_cross_entropy(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
    ) -> LossOutput<Self> {
        let (logits, labels) = (into_contiguous(logits), into_contiguous(labels));
        let [rows, classes] = [logits.meta.shape()[0], logits.meta.shape()[1]];
        let [loss, hits, lse] = empties(
            &logits,
            [Shape::new([1]), Shape::new([1]), Shape::new([rows])],
        );
        let block = forward_block(rows);
        cross_entropy_forward::launch(
            &logits.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(block),
            logits.clone().into_buffer_arg(),
            labels.into_buffer_arg(),
            lse.clone().into_buffer_arg(),
            loss.clone().into_buffer_arg(),
            hits.clone().into_buffer_arg(),
            rows,
            classes,
            block,
        );
        LossOutput { loss, hits, lse }
    }

    fn dnal_cube_cross_entropy_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (logits, labels) = (into_contiguous(logits), into_contiguous(labels));
        let (lse, dloss) = (into_contiguous(lse), into_contiguous(dloss));
        let [rows, classes] = [logits.meta.shape()[0], logits.meta.shape()[1]];
        let dlogits: CubeTensor = empty(&logits, logits.meta.shape().clone());
        let client = logits.client.clone();
        let elements = rows * classes;
        let dim = CubeDim::new(&client, elements);
        cross_entropy_backward::launch(
            &client,
            calculate_cube_count_elemwise(&client, elements, dim),
            dim,
            logits.into_buffer_arg(),
            labels.into_buffer_arg(),
            lse.into_buffer_arg(),
            dloss.into_buffer_arg(),
            dlogits.clone().into_buffer_arg(),
            rows,
            classes,
        );
        dlogits
    }
}

/// What the backward keeps: the logits, the labels and the rows' log-sum-exp.
type LossState = (FloatTensor<Cube>, FloatTensor<Cube>, FloatTensor<Cube>);

#[derive(Debug)]
struct LossBackward;

impl Backward<Cube, 1> for LossBackward {
    type State = LossState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dloss = grads.consume::<Cube>(&ops.node);
        if let Some(node) = node {
            let (logits, labels, lse) = ops.state;
            let dlogits = Cube::dnal_cube_cross_entropy_backward(logits, labels, lse, dloss);
            grads.register::<Cube>(node.id, dlogits);
        }
    }
}

impl<C: CheckpointStrategy> CubeLoss for Autodiff<Cube, C> {
    fn dnal_cube_cross_entropy(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
    ) -> LossOutput<Self> {
        let prep = LossBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful();
        let (logits, labels) = (logits.into_primitive(), labels.into_primitive());
        let out = Cube::dnal_cube_cross_entropy(logits.clone(), labels.clone());
        let loss = match prep {
            OpsKind::Tracked(prep) => prep.finish((logits, labels, out.lse.clone()), out.loss),
            OpsKind::UnTracked(prep) => prep.finish(out.loss),
        };
        LossOutput {
            loss,
            hits: Autodiff::<Cube, C>::from_inner(out.hits),
            lse: Autodiff::<Cube, C>::from_inner(out.lse),
        }
    }

    fn dnal_cube_cross_entropy_backward(
        logits: FloatTensor<Self>,
        labels: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // Not differentiated itself.
        Autodiff::<Cube, C>::from_inner(Cube::dnal_cube_cross_entropy_backward(
            logits.into_primitive(),
            labels.into_primitive(),
            lse.into_primitive(),
            dloss.into_primitive(),
        ))
    }
}

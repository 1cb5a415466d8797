//! The sparsity penalty's gradient added to alpha's gradients on the CubeCL backends, for all
//! of a network's gates at once: one operation in fusion's stream, and one launch per group of
//! up to [`MAX_GROUP`](super::custom::MAX_GROUP) gates. Through autodiff the penalty costs a reduction and a few
//! element-wise kernels per gate each way, and an addition per gate where its gradient meets
//! the gate's own.
//!
//! Gate `k` with coefficient `c` and temperature `t` (its `[1]` temperature tensor, or 1): its
//! gradient gains `c * t * m * s * (1 - s)` with `s = sigmoid(t * alpha)` and `m` its mask, and
//! each channel's share of the penalty, `c * m * s`, is written for the caller to sum.

use burn::backend::fusion::FusionTensor;
use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::custom::{custom_op, gate_sigmoid, per_launch};
use super::layout::{empty, writable};
use super::sgd::Runtime;

/// For each `[alpha, grad, mask]` slot (f32, `[C]` each) with its coefficient and, where
/// `temperatures` holds them, its `[1]` temperature (else 1): the gradient with the penalty's
/// added (written over `grad` where the slot holds its only handle), and one `[total]` tensor
/// of every channel's share of the penalty, slot after slot.
pub fn penalty_steps(
    slots: Vec<[FusionTensor<Runtime>; 3]>,
    coefficients: Vec<f32>,
    temperatures: Option<Vec<FusionTensor<Runtime>>>,
) -> (Vec<FusionTensor<Runtime>>, FusionTensor<Runtime>) {
    assert_eq!(slots.len(), coefficients.len(), "one coefficient per gate");
    let tempered = temperatures.is_some();
    let temperatures = temperatures.unwrap_or_default();
    assert!(
        !tempered || temperatures.len() == slots.len(),
        "one temperature per gate"
    );
    let gates = slots.len();
    let total: usize = slots.iter().map(|[a, ..]| a.shape.num_elements()).sum();
    let mut shapes: Vec<Shape> = slots
        .iter()
        .map(|[_, grad, _]| grad.shape.clone())
        .collect();
    shapes.push(Shape::new([total]));
    let inputs = slots.into_iter().flatten().chain(temperatures).collect();
    let mut tensors = custom_op("dnal_penalty_gradients", inputs, shapes, move |tensors| {
        let mut tensors = tensors.into_iter();
        let slots: Vec<[CubeTensor; 3]> = (0..gates)
            .map(|_| [(); 3].map(|_| tensors.next().expect("three tensors per gate")))
            .collect();
        let temperatures = tempered.then(|| tensors.collect::<Vec<CubeTensor>>());
        let (grads, values) = penalised(slots, &coefficients, temperatures);
        grads.into_iter().chain([values]).collect()
    });
    let values = tensors.pop().expect("the shares come last");
    (tensors, values)
}

/// [`penalty_steps`] on the device.
fn penalised(
    slots: Vec<[CubeTensor; 3]>,
    coefficients: &[f32],
    temperatures: Option<Vec<CubeTensor>>,
) -> (Vec<CubeTensor>, CubeTensor) {
    let like = &slots[0][0];
    let client = like.client.clone();
    let total: usize = slots.iter().map(|[a, ..]| a.meta.num_elements()).sum();
    let values = empty(like, Shape::new([total]));
    // Three or four bindings per gate, the shares, and two for the launch's metadata and
    // scalars.
    let tempered = temperatures.is_some();
    let per_gate = if tempered { 4 } else { 3 };
    let per_launch = per_launch(like, per_gate, 3);
    let temperatures: Vec<CubeTensor> = temperatures.unwrap_or_default();
    let slots: Vec<[CubeTensor; 3]> = slots
        .into_iter()
        .map(|[alpha, grad, mask]| {
            [
                into_contiguous(alpha),
                writable(into_contiguous(grad)),
                into_contiguous(mask),
            ]
        })
        .collect();
    let mut offset = 0;
    for (n, chunk) in slots.chunks(per_launch).enumerate() {
        let first = n * per_launch;
        let mut starts = SequenceArg::new();
        let mut factors = SequenceArg::new();
        let [mut alphas, mut grads, mut masks, mut temps] =
            [(); 4].map(|_| SequenceArg::<OwnedTensor<f32>>::new());
        let mut count = 0;
        starts.push(0);
        for (k, [alpha, grad, mask]) in chunk.iter().enumerate() {
            count += alpha.meta.num_elements();
            starts.push(count);
            factors.push(coefficients[first + k]);
            if let Some(t) = temperatures.get(first + k) {
                temps.push(t.clone().into_tensor_arg());
            }
            alphas.push(alpha.clone().into_tensor_arg());
            grads.push(grad.clone().into_tensor_arg());
            masks.push(mask.clone().into_tensor_arg());
        }
        let dim = CubeDim::new(&client, count);
        let cubes = calculate_cube_count_elemwise(&client, count, dim);
        penalty_kernel::launch(
            &client,
            cubes,
            dim,
            alphas,
            grads,
            masks,
            temps,
            values.clone().into_tensor_arg(),
            starts,
            factors,
            offset,
            chunk.len(),
            tempered,
        );
        offset += count;
    }
    let grads = slots.into_iter().map(|[_, grad, _]| grad).collect();
    (grads, values)
}

/// Up to [`MAX_GROUP`](super::custom::MAX_GROUP) gates: gate `k` owns the positions `starts[k]..starts[k + 1]` of the
/// launch, and writes its channels' shares at `offset` plus those positions.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn penalty_kernel(
    alphas: &Sequence<OwnedTensor<f32>>,
    grads: &mut Sequence<OwnedTensor<f32>>,
    masks: &Sequence<OwnedTensor<f32>>,
    temperatures: &Sequence<OwnedTensor<f32>>,
    values: &mut Tensor<f32>,
    starts: Sequence<usize>,
    coefficients: Sequence<f32>,
    offset: usize,
    #[comptime] count: usize,
    #[comptime] tempered: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= starts[count] {
        terminate!();
    }
    #[unroll]
    for k in 0..count {
        let start = starts[k];
        if pos >= start && pos < starts[comptime!(k + 1)] {
            let i = pos - start;
            let mut t = 1.0;
            if tempered {
                t = temperatures.index(k).as_slice()[0];
            }
            let c = coefficients[k] * masks.index(k).as_slice()[i];
            let s = gate_sigmoid(t, alphas.index(k).as_slice()[i]);
            let grad = grads.index_mut(k).as_mut_slice();
            grad[i] += c * t * (s * (1.0 - s));
            values[offset + pos] = c * s;
        }
    }
}

//! Searching gates' factors and their gradients carried back to alpha on the CubeCL backends,
//! for all of a network's gates at once: one operation in fusion's stream each way, and one
//! launch per group of up to [`MAX_GROUP`](super::custom::MAX_GROUP) gates. Through autodiff every gate's chain
//! `mask * sigmoid(t * alpha)` is a fused launch of its own forward and another backward,
//! since the BatchNorm operation it feeds sits between any two of them.
//!
//! Gate `k` with temperature `t` (its `[1]` temperature tensor) and mask `m`: forward its factor
//! `m * s`, `s = sigmoid(t * alpha)`; backward, from the factor's gradient `df`, alpha's
//! `df * t * m * s * (1 - s)`.

use burn::backend::fusion::FusionTensor;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::custom::{custom_op, gate_sigmoid, per_launch};
use super::layout::empty;
use super::sgd::Runtime;

/// For each gate's `[alpha, mask, temperature]` (f32; `[C]`, `[C]`, `[1]`): its factor `mask *
/// sigmoid(temperature * alpha)` where `dfactors` is `None`; else, with each gate's factor
/// gradient `[C]`, alpha's gradient through the factor.
pub fn factor_steps(
    gates: Vec<[FusionTensor<Runtime>; 3]>,
    dfactors: Option<Vec<FusionTensor<Runtime>>>,
) -> Vec<FusionTensor<Runtime>> {
    let backward = dfactors.is_some();
    let dfactors = dfactors.unwrap_or_default();
    assert!(
        !backward || dfactors.len() == gates.len(),
        "one factor gradient per gate"
    );
    let count = gates.len();
    let shapes = gates
        .iter()
        .map(|[alpha, ..]| alpha.shape.clone())
        .collect();
    let inputs = gates.into_iter().flatten().chain(dfactors).collect();
    let name = if backward {
        "dnal_factor_gradients"
    } else {
        "dnal_gate_factors"
    };
    custom_op(name, inputs, shapes, move |tensors| {
        let mut tensors = tensors.into_iter();
        let gates: Vec<[CubeTensor; 3]> = (0..count)
            .map(|_| [(); 3].map(|_| tensors.next().expect("three tensors per gate")))
            .collect();
        factored(gates, backward.then(|| tensors.collect()))
    })
}

/// [`factor_steps`] on the device.
fn factored(gates: Vec<[CubeTensor; 3]>, dfactors: Option<Vec<CubeTensor>>) -> Vec<CubeTensor> {
    let client = gates[0][0].client.clone();
    let backward = dfactors.is_some();
    let dfactors: Vec<CubeTensor> = dfactors
        .unwrap_or_default()
        .into_iter()
        .map(into_contiguous)
        .collect();
    let gates: Vec<[CubeTensor; 3]> = gates.into_iter().map(|g| g.map(into_contiguous)).collect();
    // Each output in memory of its own, not one reservation for all: the penalty then adds to
    // a gradient in place, where a tensor whose memory others share is copied first (one
    // launch per gate).
    let outputs: Vec<CubeTensor> = gates
        .iter()
        .map(|[alpha, ..]| empty(alpha, alpha.meta.shape().clone()))
        .collect();
    // Four or five bindings per gate, and two for the launch's metadata and scalars.
    let per_gate = if backward { 5 } else { 4 };
    let per_launch = per_launch(&gates[0][0], per_gate, 2);
    for (n, chunk) in gates.chunks(per_launch).enumerate() {
        let first = n * per_launch;
        let mut starts = SequenceArg::new();
        let [mut alphas, mut masks, mut temps, mut dfs, mut outs] =
            [(); 5].map(|_| SequenceArg::<OwnedTensor<f32>>::new());
        let mut count = 0;
        starts.push(0);
        for (k, [alpha, mask, temperature]) in chunk.iter().enumerate() {
            count += alpha.meta.num_elements();
            starts.push(count);
            alphas.push(alpha.clone().into_tensor_arg());
            masks.push(mask.clone().into_tensor_arg());
            temps.push(temperature.clone().into_tensor_arg());
            if let Some(df) = dfactors.get(first + k) {
                dfs.push(df.clone().into_tensor_arg());
            }
            outs.push(outputs[first + k].clone().into_tensor_arg());
        }
        let dim = CubeDim::new(&client, count);
        let cubes = calculate_cube_count_elemwise(&client, count, dim);
        factor_kernel::launch(
            &client,
            cubes,
            dim,
            alphas,
            masks,
            temps,
            dfs,
            outs,
            starts,
            chunk.len(),
            backward,
        );
    }
    outputs
}

/// Up to [`MAX_GROUP`](super::custom::MAX_GROUP) gates: gate `k` owns the positions `starts[k]..starts[k + 1]` of the
/// launch. Forward its factor, with `backward` alpha's gradient from the factor's.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn factor_kernel(
    alphas: &Sequence<OwnedTensor<f32>>,
    masks: &Sequence<OwnedTensor<f32>>,
    temperatures: &Sequence<OwnedTensor<f32>>,
    dfactors: &Sequence<OwnedTensor<f32>>,
    outputs: &mut Sequence<OwnedTensor<f32>>,
    starts: Sequence<usize>,
    #[comptime] count: usize,
    #[comptime] backward: bool,
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
            let t = temperatures.index(k).as_slice()[0];
            let m = masks.index(k).as_slice()[i];
            let s = gate_sigmoid(t, alphas.index(k).as_slice()[i]);
            let out = outputs.index_mut(k).as_mut_slice();
            if backward {
                out[i] = dfactors.index(k).as_slice()[i] * t * m * (s * (1.0 - s));
            } else {
                out[i] = m * s;
            }
        }
    }
}

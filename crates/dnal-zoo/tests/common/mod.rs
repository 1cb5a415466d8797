//! Helpers shared by the zoo's tests.
#![allow(dead_code)]

pub mod families;

use burn::module::RunningState;
use burn::prelude::*;
use dnal_core::{Architecture, GateKind, GatedModel};
use dnal_zoo::ConvBnGate;

pub fn device() -> Device {
    Device::flex()
}

pub fn within(actual: u64, paper: f64, tol: f64) -> bool {
    ((actual as f64 - paper) / paper).abs() <= tol
}

/// Deterministic pseudo-random values in [lo, hi).
pub fn noise(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

pub fn vec1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

pub fn input(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    Tensor::from_data(
        TensorData::new(noise(shape.iter().product(), seed, -1.0, 1.0), shape),
        device,
    )
}

/// Gives a unit's BN non-trivial statistics and affine parameters, so that slicing them is
/// tested.
pub fn randomise_unit(unit: &mut ConvBnGate, seed: u64, device: &Device) {
    let c = unit.out_channels();
    let seed = seed * 4;
    unit.bn.running_mean = RunningState::new(vec1(noise(c, seed, -0.5, 0.5), device));
    unit.bn.running_var = RunningState::new(vec1(noise(c, seed + 1, 0.5, 2.0), device));
    let beta = vec1(noise(c, seed + 2, -0.2, 0.2), device);
    unit.bn.beta = unit.bn.beta.clone().map(|_| beta);
    let gamma = vec1(noise(c, seed + 3, 0.5, 1.5), device);
    unit.bn.gamma = unit.bn.gamma.clone().map(|_| gamma);
}

/// Keeps a pseudo-random subset of every gate: at least one channel of a main-path gate; a
/// branch gate is closed completely when `close_branch(gate index)` says so.
pub fn random_architecture<M: GatedModel>(
    model: &M,
    seed: u64,
    close_branch: impl Fn(usize) -> bool,
) -> Architecture {
    let mut arch = Architecture::full(model);
    for (g, (_, gate)) in arch.gates.iter_mut().enumerate() {
        let r = noise(gate.width, seed + g as u64, 0.0, 1.0);
        gate.kept = (0..gate.width).filter(|&c| r[c] < 0.4).collect();
        if gate.kind == GateKind::Branch && close_branch(g) {
            gate.kept.clear();
        } else if gate.kept.is_empty() {
            gate.kept.push(g % gate.width);
        }
    }
    arch
}

pub fn max_abs_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// Prunes `model` with `arch` and checks that, in eval mode, the pruned network's logits on `x`
/// equal the masked network's, that its parameter count is its cost model's, and that
/// `arch_cost` priced it right and smaller than the full network. Returns the pruned network.
pub fn check_pruned<N: dnal_zoo::Network>(model: N, arch: &Architecture, x: Tensor<4>) -> N {
    let masked = arch.apply_masks(model.clone()).unwrap();
    let pruned = dnal_zoo::prune(model.clone(), arch).unwrap();
    let diff = max_abs_diff(masked.valid().forward(x.clone()), pruned.valid().forward(x));
    assert!(diff < 1e-4, "pruned vs masked logits differ by {diff}");
    let cost = pruned.cost_model().cost(None);
    assert_eq!(
        dnal_zoo::counted_params(&pruned) as u64,
        cost.params,
        "pruned params = cost model"
    );
    assert_eq!(model.arch_cost(arch).unwrap(), cost);
    assert!(cost.macs < model.cost_model().cost(None).macs);
    pruned
}

//! Helpers shared by the integration tests.
#![allow(dead_code, missing_docs)]

use burn::prelude::*;
use dnal_core::{ChannelGate, ChannelGateConfig, GateKind, GatedModel};

/// Two gates, one on the main path and one on a residual branch.
#[derive(Module, Debug)]
pub struct TwoGates {
    pub main: ChannelGate,
    pub branch: ChannelGate,
}

impl TwoGates {
    pub fn new(main: usize, branch: usize, device: &Device) -> Self {
        Self {
            main: ChannelGateConfig::new(main).init(device),
            branch: ChannelGateConfig::new(branch)
                .with_kind(GateKind::Branch)
                .init(device),
        }
    }
}

impl GatedModel for TwoGates {
    fn for_each_gate(&mut self, f: &mut dyn FnMut(&str, &mut ChannelGate)) {
        f("main", &mut self.main);
        f("branch", &mut self.branch);
    }
}

pub fn tensor1(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn set_alpha(gate: ChannelGate, alpha: &[f32]) -> ChannelGate {
    let mut gate = gate;
    let device = gate.alpha.device();
    let data = tensor1(alpha, &device);
    gate.alpha = gate
        .alpha
        .map(|old| data.set_require_grad(old.is_require_grad()));
    gate
}

pub fn assert_close(a: &[f32], b: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}[{i}]: {x} vs {y} (atol {atol}, rtol {rtol})"
        );
    }
}

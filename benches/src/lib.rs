//! Shared helpers for dnal's criterion benchmarks (the benchmarks are in `benches/benches/`).

use burn::prelude::*;
use dnal_core::BackendKind;

/// Keeps freed memory for reuse, as the trainer does; every benchmark and example sets the
/// trainer's allocator (`dnal_kernels::global_allocator!()`) and calls this first.
pub fn keep_freed_memory() {
    dnal_kernels::allocator::keep_freed_memory();
}

/// The CPU backends compiled into this build, with their devices.
pub fn cpu_backends() -> Vec<(BackendKind, Device)> {
    [BackendKind::Flex, BackendKind::Ndarray]
        .into_iter()
        .filter_map(|b| b.device().ok().map(|d| (b, d)))
        .collect()
}

/// A synthetic architecture that keeps the first `ceil(ratio * width)` channels of every gate
/// (at least one), so that residual streams shrink with their blocks. Used to time pruned
/// networks at a given MACs reduction without a trained architecture.
pub fn uniform_architecture<M: dnal_core::GatedModel>(
    model: &M,
    ratio: f64,
) -> dnal_core::Architecture {
    let mut arch = dnal_core::Architecture::full(model);
    for gate in arch.gates.values_mut() {
        let keep = ((gate.width as f64 * ratio).ceil() as usize).clamp(1, gate.width);
        gate.kept = (0..keep).collect();
    }
    arch
}

/// A training batch of CIFAR shapes: `batch` random images `[batch, 3, 32, 32]` and labels
/// cycling through 10 classes.
pub fn cifar_batch(batch: usize, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let x = Tensor::<4>::random(
        [batch, 3, 32, 32],
        burn::tensor::Distribution::Default,
        device,
    );
    let labels = (0..batch as i64).map(|i| i % 10).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), device);
    (x, y)
}

/// Gate states like a searched network's: every gate keeps a different fraction (15 to 60 %)
/// of its channels, at irregular widths, with alphas that rank the closed channels. A fixed
/// pseudo-random draw from `seed`. Derive them with `dnal_core::derive_from_states`, round
/// them with `Architecture::round_widths`.
pub fn searched_states<M: dnal_core::GatedModel>(
    model: &M,
    seed: u64,
) -> Vec<(String, dnal_core::GateState)> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    model
        .gate_states()
        .into_iter()
        .map(|(name, mut state)| {
            let closed = 0.4 + 0.45 * next();
            state.alpha = state.alpha.iter().map(|_| next() - closed).collect();
            state.temperature = 1e4;
            (name, state)
        })
        .collect()
}

//! Shared helpers for dnal's criterion benchmarks (the benchmarks are in `benches/benches/`).

use burn::prelude::*;
use dnal_core::BackendKind;

/// The CPU backends compiled into this build, with their devices.
pub fn cpu_backends() -> Vec<(BackendKind, Device)> {
    [BackendKind::Flex, BackendKind::Ndarray]
        .into_iter()
        .filter_map(|b| b.device().ok().map(|d| (b, d)))
        .collect()
}

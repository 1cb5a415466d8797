//! The whole pipeline on wgpu: every stage, derivation, pruning, evaluation and the report, on
//! a few hundred digits, following the same trajectory as on flex; and dnal's CubeCL kernels
//! against flex (`dnal_kernels::check`).
//!
//! Built only with `--features wgpu` (`cargo xtask test` runs it). Without a usable adapter the
//! test prints why it was skipped and passes, unless `DNAL_REQUIRE_WGPU=1` (set by CI, which
//! installs Mesa's software Vulkan) makes a missing adapter a failure.
#![cfg(feature = "wgpu")]

mod common;

use dnal_core::BackendKind;
use dnal_kernels::check::{self, Comparison};
use dnal_train::progress::paths;

use common::{demo, finished, history, opts};

/// The wgpu device, or `None` (the test skipped, saying why) where no usable adapter is found;
/// with `DNAL_REQUIRE_WGPU=1` (CI, which installs Mesa's software Vulkan) a missing adapter
/// fails the test instead.
fn wgpu_device() -> Option<burn::prelude::Device> {
    match BackendKind::Wgpu.probe() {
        Ok(device) => Some(device),
        Err(e) if std::env::var("DNAL_REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("DNAL_REQUIRE_WGPU=1 but wgpu is unusable: {e}")
        }
        Err(e) => {
            eprintln!("skipped, no usable wgpu adapter: {e}");
            None
        }
    }
}

#[test]
fn the_pipeline_runs_on_wgpu_as_on_flex() {
    if wgpu_device().is_none() {
        return;
    }
    // Every batch of one size, so that each kernel is compiled once per network (on software
    // Vulkan compiling the kernels is most of the time): 256 + 128 images in batches of 32.
    let cfg = demo(&[
        "data.train_limit=256",
        "data.test_limit=128",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "report.latency_batch=32",
        "weights.epochs=1",
        "arch.epochs=2",
        "final.epochs=1",
    ]);
    let run = |backend: BackendKind| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), false, None);
        o.backend = backend;
        let report = finished(dnal_train::run(&cfg, &o).unwrap());
        assert!(dir.path().join(paths::PRUNED).join("model.bpk").is_file());
        (report, history(dir.path()))
    };
    let (gpu, gpu_log) = run(BackendKind::Wgpu);
    let (cpu, cpu_log) = run(BackendKind::Flex);
    assert!(gpu.pruned.is_some(), "the wgpu run derived and pruned");
    assert_eq!(gpu_log.len(), cpu_log.len());
    // Same seeded weights and data order; only the float rounding of the kernels differs.
    for (g, c) in gpu_log.iter().zip(&cpu_log) {
        let (g, c) = (g["loss"].as_f64().unwrap(), c["loss"].as_f64().unwrap());
        assert!(
            g.is_finite() && (g - c).abs() <= 0.02 * c.abs(),
            "loss {g} on wgpu, {c} on flex"
        );
    }
    let (g, c) = (gpu.baseline.top1, cpu.baseline.top1);
    assert!(
        (g - c).abs() <= 3.0,
        "dense top-1 {g} % on wgpu, {c} % on flex"
    );
}

/// Asserts that every comparison is within tolerance, listing those that are not.
fn all_within(comparisons: Vec<Comparison>) {
    assert!(!comparisons.is_empty());
    let failed: Vec<String> = comparisons
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn flex() -> burn::prelude::Device {
    BackendKind::Flex.probe().unwrap()
}

#[test]
fn batch_norm_kernels_on_wgpu_match_flex() {
    if let Some(device) = wgpu_device() {
        all_within(check::batch_norm(&device, &flex()));
    }
}

#[test]
fn depthwise_kernels_on_wgpu_match_burn_on_flex() {
    if let Some(device) = wgpu_device() {
        all_within(check::depthwise(&device, &flex()));
    }
}

#[test]
fn convolutions_on_wgpu_match_burn_on_flex() {
    if let Some(device) = wgpu_device() {
        all_within(check::convolution(&device, &flex()));
    }
}

#[test]
fn sgd_step_on_wgpu_matches_burn_on_flex() {
    if let Some(device) = wgpu_device() {
        all_within(check::sgd(&device, &flex()));
    }
}

//! Helpers shared by the pipeline tests.
#![allow(dead_code)]

use std::path::Path;

use dnal_core::BackendKind;
use dnal_train::{Outcome, Report, RunOptions, TrainConfig, recipes};

/// A tiny demo: 2 + 2 + 2 epochs on 300 digits (seconds in release mode).
pub const TINY: &[&str] = &[
    "data.train_limit=300",
    "data.test_limit=200",
    "weights.epochs=2",
    "arch.epochs=2",
    "final.epochs=2",
    "arch.penalty.lambda=5e-2",
    "report.latency_runs=1",
    "report.plots=false",
];

/// The epoch log of the run in `out` (`metrics.jsonl`) without timings.
pub fn history(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join(dnal_train::progress::paths::METRICS))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

pub fn demo(overrides: &[&str]) -> TrainConfig {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    recipes::resolve(Some("mnist-demo"), None, &sets).unwrap()
}

pub fn opts(out: &Path, resume: bool, stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        backend: BackendKind::Flex,
        devices: Vec::new(),
        resume,
        quiet: true,
        stop_after_epochs: stop_after,
        stop: None,
        graph: false,
    }
}

pub fn finished(outcome: Outcome) -> Report {
    match outcome {
        Outcome::Finished(r) => *r,
        Outcome::Stopped => panic!("the run stopped early"),
    }
}

//! Helpers shared by the pipeline tests.
#![allow(dead_code)]

use std::path::Path;

use dnal_core::BackendKind;
use dnal_train::{Outcome, Report, RunOptions, TrainConfig, recipes};

pub fn demo(overrides: &[&str]) -> TrainConfig {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    recipes::resolve(Some("mnist-demo"), None, &sets).unwrap()
}

pub fn opts(out: &Path, resume: bool, stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        backend: BackendKind::Flex,
        resume,
        quiet: true,
        stop_after_epochs: stop_after,
        stop: None,
    }
}

pub fn finished(outcome: Outcome) -> Report {
    match outcome {
        Outcome::Finished(r) => *r,
        Outcome::Stopped => panic!("the run stopped early"),
    }
}

//! Seeded runs are reproducible whatever else runs in the same process: other runs, and other
//! code drawing from burn's process-wide generator or building networks.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;
use common::{demo, finished, history, opts};
use dnal_train::{Report, TrainConfig, recipes};

fn cfg() -> TrainConfig {
    demo(common::TINY)
}

/// What a run ended with, without timings.
type Ended = (Report, Vec<serde_json::Value>);

fn outcome(cfg: &TrainConfig) -> Ended {
    let dir = tempfile::tempdir().unwrap();
    let report = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| finished(dnal_train::run(cfg, &opts(dir.path(), false, None)).unwrap()));
    (report, history(dir.path()))
}

fn assert_same(a: &Ended, b: &Ended) {
    assert_eq!(a.1, b.1, "epoch histories differ");
    assert_eq!(a.0.pruned, b.0.pruned);
    assert_eq!(a.0.baseline, b.0.baseline);
    assert_eq!(a.0.layers, b.0.layers);
}

/// Two seeded runs training at the same time, each on its own one-thread pool, while a third
/// thread reseeds burn's generator, draws from it and builds every preset's network (what
/// used to perturb the initial weights: burn draws lazily from one generator per process),
/// end exactly where the same run ends alone.
#[test]
fn concurrent_runs_equal_a_run_alone() {
    let cfg = cfg();
    let alone = outcome(&cfg);
    let done = AtomicBool::new(false);
    let (a, b) = std::thread::scope(|s| {
        s.spawn(|| {
            let device = Device::default();
            let presets = recipes::presets().unwrap();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                device.seed(i);
                let _ = Tensor::<2>::random([64, 64], burn::tensor::Distribution::Default, &device)
                    .sum()
                    .into_scalar::<f32>();
                let p = &presets[i as usize % presets.len()];
                let c = recipes::resolve(Some(&p.name), None, &[]).unwrap();
                dnal_train::dry_run(&c).unwrap();
                i += 1;
            }
        });
        let a = s.spawn(|| outcome(&cfg));
        let b = s.spawn(|| outcome(&cfg));
        let ended = (a.join().unwrap(), b.join().unwrap());
        done.store(true, Ordering::Relaxed);
        ended
    });
    assert_same(&alone, &a);
    assert_same(&alone, &b);
}

/// With two threads, the same run twice gives the same result bit for bit: the kernels' and
/// flex's parallel reductions add in an order fixed by the thread count, not by scheduling.
#[test]
fn multi_threaded_runs_repeat_bitwise() {
    let cfg = cfg();
    let run = || {
        let dir = tempfile::tempdir().unwrap();
        let report = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(|| finished(dnal_train::run(&cfg, &opts(dir.path(), false, None)).unwrap()));
        (report, history(dir.path()))
    };
    let first = run();
    assert_same(&first, &run());
}

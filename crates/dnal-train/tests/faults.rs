//! A checkpoint write that fails part-way (the disk full, say) leaves the previous checkpoint
//! usable. Failures are injected with the `fail` crate's fail points, which are process-wide:
//! this file is a test binary of its own.

mod common;

use common::{demo, finished, opts};
use dnal_train::Outcome;

#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let scenario = fail::FailScenario::setup();
    let cfg = demo(&[
        "data.train_limit=200",
        "data.test_limit=100",
        "weights.epochs=2",
        "arch.epochs=1",
        "final.epochs=1",
        "arch.penalty.lambda=5e-2",
        "report.latency_runs=1",
        "report.plots=false",
    ]);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let straight = pool.install(|| {
        finished(dnal_train::run(&cfg, &opts(&tmp.path().join("straight"), false, None)).unwrap())
    });
    for point in ["checkpoint-write", "checkpoint-swap"] {
        let dir = tmp.path().join(point);
        // Two epochs' checkpoints succeed; the third write fails.
        let stopped = pool.install(|| dnal_train::run(&cfg, &opts(&dir, false, Some(1))).unwrap());
        assert!(matches!(stopped, Outcome::Stopped));
        fail::cfg(point, "return").unwrap();
        let err = pool
            .install(|| dnal_train::run(&cfg, &opts(&dir, true, None)))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        fail::remove(point);
        assert!(err.contains("injected"), "{point}: {err}");
        let resumed =
            pool.install(|| finished(dnal_train::run(&cfg, &opts(&dir, true, None)).unwrap()));
        assert_eq!(resumed.pruned, straight.pruned, "{point}");
        assert_eq!(resumed.layers, straight.layers, "{point}");
    }
    scenario.teardown();
}

//! Data-parallel training: replicas on one flex device stand in for several devices (the
//! scheme does not depend on the devices being distinct).

mod common;

use std::path::Path;

use common::{demo, finished, history, opts};
use dnal_train::progress::paths;

fn progress(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join(paths::CHECKPOINT).join("progress.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn alphas(out: &Path) -> Vec<f64> {
    progress(out)["final_alpha"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn arch_losses(out: &Path) -> Vec<f64> {
    history(out)
        .iter()
        .filter(|h| h["stage"] == "arch")
        .map(|h| h["loss"].as_f64().unwrap())
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + x.abs()),
            "{what}[{i}]: {x} against {y}"
        );
    }
}

/// The architecture stage of the run in `out` is the one in `reference` up to float rounding:
/// epoch losses within 1e-4 (relative) and alphas within 2e-2, and the same derived
/// architecture. A gate whose alpha passes near zero at a large beta amplifies rounding: on
/// CPUs with AVX-512 the two runs' losses agreed within 1e-5 and their alphas within 2e-3; on
/// an AVX2-only AMD EPYC (dnal's portable CPU paths) the second epoch's loss differed by 2.0e-5
/// and 4 of 192 alphas by 1.2e-3 to 1.4e-2.
fn assert_same_search(out: &Path, reference: &Path) {
    assert_close(
        &arch_losses(out),
        &arch_losses(reference),
        1e-4,
        "arch loss",
    );
    assert_close(&alphas(out), &alphas(reference), 2e-2, "alpha");
    assert_eq!(
        progress(out)["architecture"],
        progress(reference)["architecture"]
    );
}

/// The architecture stage with BatchNorm frozen (`arch.update_bn_stats=false`) depends on the
/// batch only through the mean loss, so replicas must reproduce one device's run exactly up
/// to float rounding; the final stage then runs data-parallel with BatchNorm in training mode.
#[test]
fn replicas_reproduce_one_device_and_resume_on_another_count() {
    let small = ["data.train_limit=256", "data.test_limit=200"];
    let base = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        "data.train_limit=600",
        small[1],
        "data.batch_size=32",
        "mode=\"dense\"",
        "weights.epochs=3",
    ]);
    finished(dnal_train::run(&cfg, &opts(base.path(), false, None)).unwrap());
    let init = format!(
        "weights.init={}",
        base.path().join(paths::DENSE).join("model.bpk").display()
    );
    let cfg = demo(&[
        small[0],
        small[1],
        &init,
        "data.batch_size=32",
        "weights.epochs=0",
        "arch.epochs=2",
        "arch.update_bn_stats=false",
        "final.epochs=1",
        "report.latency_runs=1",
    ]);
    let with = |n: usize, out: &Path, resume: bool, stop: Option<usize>| {
        let mut o = opts(out, resume, stop);
        o.devices = vec![None; n];
        dnal_train::run(&cfg, &o).unwrap()
    };

    let one = tempfile::tempdir().unwrap();
    let one_report = finished(with(1, one.path(), false, None));
    let two = tempfile::tempdir().unwrap();
    let two_report = finished(with(2, two.path(), false, None));
    assert_same_search(two.path(), one.path());
    // The final stage trained on (BatchNorm per replica): a network that still classifies.
    let (one_pruned, two_pruned) = (one_report.pruned.unwrap(), two_report.pruned.unwrap());
    assert_eq!(one_pruned.macs, two_pruned.macs);
    assert!(two_pruned.top1 > 30.0, "{}", two_pruned.top1);

    // Stopped on two replicas after one epoch, resumed on three (shares of 11, 11, 10).
    let moved = tempfile::tempdir().unwrap();
    assert!(matches!(
        with(2, moved.path(), false, Some(1)),
        dnal_train::Outcome::Stopped
    ));
    finished(with(3, moved.path(), true, None));
    assert_same_search(moved.path(), one.path());
}

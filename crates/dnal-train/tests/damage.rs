//! A damaged or foreign checkpoint is a clear error naming the file and what is wrong: never a
//! panic, never a run that trains on from corrupted state.

mod common;

use std::path::{Path, PathBuf};

use common::{demo, opts};
use dnal_train::{Outcome, TrainConfig, checkpoint};

fn cfg() -> TrainConfig {
    demo(&[
        "data.train_limit=200",
        "data.test_limit=100",
        "weights.epochs=1",
        "arch.epochs=2",
        "final.epochs=1",
        "arch.penalty.lambda=5e-2",
        "report.latency_runs=1",
        "report.plots=false",
    ])
}

/// A run stopped after its weight stage and one architecture epoch.
fn stopped_run(root: &Path) -> PathBuf {
    let dir = root.join("run");
    let outcome = dnal_train::run(&cfg(), &opts(&dir, false, Some(2))).unwrap();
    assert!(matches!(outcome, Outcome::Stopped));
    dir
}

/// A copy of the run folder with `damage` applied to its checkpoint; resumed, the error text.
fn resume_after(run: &Path, name: &str, cfg: &TrainConfig, damage: impl FnOnce(&Path)) -> String {
    let copy = run.with_file_name(name);
    copy_dir(run, &copy);
    damage(&copy.join("checkpoint"));
    match dnal_train::run(cfg, &opts(&copy, true, None)) {
        Ok(_) => panic!("{name}: the damaged checkpoint was accepted"),
        Err(e) => e.to_string(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Edits `progress.json` as JSON, then re-seals the checksums, as a tool or a bug would.
fn edit_progress(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("progress.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    checkpoint::write_checksums(dir).unwrap();
}

#[test]
fn every_kind_of_damage_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = stopped_run(tmp.path());
    let cfg = cfg();
    let expect = |msg: &str, parts: &[&str]| {
        for p in parts {
            assert!(msg.contains(p), "`{p}` not in: {msg}");
        }
    };

    // One byte flipped in the middle of the weights.
    let msg = resume_after(&run, "flipped", &cfg, |d| {
        let path = d.join("model").join("model.bpk");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
    });
    expect(&msg, &["model.bpk", "checksum"]);

    // Truncated optimiser state; a missing file; no checksum list at all.
    let msg = resume_after(&run, "truncated", &cfg, |d| {
        let path = d.join("optim-alpha.bpk");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    });
    expect(&msg, &["optim-alpha.bpk", "checksum"]);
    let msg = resume_after(&run, "missing", &cfg, |d| {
        std::fs::remove_file(d.join("optim-weights.bpk")).unwrap();
    });
    expect(&msg, &["optim-weights.bpk", "missing"]);
    let msg = resume_after(&run, "unsealed", &cfg, |d| {
        std::fs::remove_file(d.join("SHA256SUMS")).unwrap();
    });
    expect(&msg, &["SHA256SUMS", "without --resume"]);

    // progress.json out of range for the recipe, even with matching checksums.
    let msg = resume_after(&run, "phase99", &cfg, |d| {
        edit_progress(d, |v| v["phase_index"] = 99.into())
    });
    expect(&msg, &["progress.json", "phase_index 99"]);
    let msg = resume_after(&run, "epochs1e9", &cfg, |d| {
        edit_progress(d, |v| v["epochs_done"] = 1_000_000_000u64.into())
    });
    expect(&msg, &["progress.json", "epochs_done 1000000000"]);
    let msg = resume_after(&run, "history", &cfg, |d| {
        edit_progress(d, |v| {
            v["history"].as_array_mut().unwrap().pop();
        })
    });
    expect(&msg, &["progress.json", "history"]);
    let msg = resume_after(&run, "partial", &cfg, |d| {
        edit_progress(d, |v| {
            v["partial"] = serde_json::json!({
                "batches_done": 10_000, "loss_sum": 0.0, "pen_sum": 0.0, "correct": 0,
                "seen": 0, "lr": 0.01, "beta": null, "seconds": 0.0
            })
        })
    });
    expect(&msg, &["10000 batches done"]);
    let msg = resume_after(&run, "arch", &cfg, |d| {
        edit_progress(d, |v| {
            v["architecture"] = serde_json::json!({
                "threshold": 0.5,
                "gates": { "no.such.gate": { "kind": "main", "width": 3, "kept": [0], "forced_open": false } }
            })
        })
    });
    expect(&msg, &["architecture does not fit", "no.such.gate"]);
    let msg = resume_after(&run, "kept", &cfg, |d| {
        edit_progress(d, |v| {
            v["architecture"] = serde_json::json!({
                "threshold": 0.5,
                "gates": { "conv0": { "kind": "main", "width": 32, "kept": [40], "forced_open": false } }
            })
        })
    });
    expect(&msg, &["architecture does not fit", "conv0.kept"]);

    // The network's config with a wrong width.
    let msg = resume_after(&run, "width", &cfg, |d| {
        let path = d.join("model").join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let wider = text.replacen("32", "48", 1);
        assert_ne!(text, wider);
        std::fs::write(&path, wider).unwrap();
        checkpoint::write_checksums(d).unwrap();
    });
    expect(&msg, &["model"]);

    // A checkpoint of another recipe.
    let other = demo(&["data.train_limit=200", "arch.penalty.lambda=1e-3"]);
    let msg = resume_after(&run, "recipe", &other, |_| {});
    expect(&msg, &["another config"]);

    // Intact, it resumes and finishes.
    let outcome = dnal_train::run(&cfg, &opts(&run, true, None)).unwrap();
    assert!(matches!(outcome, Outcome::Finished(_)));
}

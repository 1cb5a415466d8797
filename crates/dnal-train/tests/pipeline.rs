//! The whole pipeline on the bundled real MNIST digits: the pruning effect, a diverging run,
//! resuming exactly, and every preset.

use std::path::Path;

use dnal_core::BackendKind;
use dnal_train::progress::paths;
use dnal_train::{Outcome, TrainError, recipes};

mod common;

use common::{TINY, demo, finished, history, opts};

/// A reduced demo: 2,000 of the 4,000 training digits, batches of 32, 4 + 5 + 4 epochs, lambda
/// 4e-2 (measured: 85 % fewer MACs, 0.3 points below the baseline's 96.0 %). DNAL must remove
/// most of the network's MACs and the final stage must bring the accuracy back.
#[test]
fn reduced_demo_prunes_most_macs_and_keeps_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        "data.train_limit=2000",
        "data.batch_size=32",
        "weights.epochs=4",
        "arch.epochs=5",
        "final.epochs=4",
        "arch.penalty.lambda=4e-2",
        "report.latency_runs=3",
    ]);
    let report = finished(dnal_train::run(&cfg, &opts(tmp.path(), false, None)).unwrap());
    let pruned = report.pruned.clone().unwrap();
    let r = report.reduction.clone().unwrap();
    eprintln!("{}", report.markdown());
    assert_eq!(report.baseline.macs, 18_289_792);
    assert!(
        report.baseline.top1 > 90.0,
        "baseline {:.1} %",
        report.baseline.top1
    );
    assert!(
        r.macs_pct > 70.0,
        "only {:.1} % of MACs removed",
        r.macs_pct
    );
    assert!(pruned.top1 > 93.0, "pruned {:.1} %", pruned.top1);
    assert!(
        pruned.top1 > report.baseline.top1 - 2.0,
        "pruned {:.1} % vs baseline {:.1} %",
        pruned.top1,
        report.baseline.top1
    );
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.after >= 1 && l.after <= l.before)
    );
    // Every export is there, and the pruned network loads back on its own.
    for f in [
        "report.json",
        "report.md",
        "curves.svg",
        "gates.svg",
        "alpha.svg",
        "widths.svg",
        "architecture.json",
        "metrics.jsonl",
        "pruned/model.bpk",
        "pruned/config.json",
        "pruned/model.safetensors",
        "pruned.onnx",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("report.json")).unwrap())
            .unwrap();
    for key in [
        "/baseline/top1",
        "/baseline/macs",
        "/baseline/params",
        "/pruned/top1",
        "/pruned/macs",
        "/pruned/params",
        "/latency_ms/dense",
        "/latency_ms/pruned",
        "/layers/0/before",
        "/layers/0/after",
        "/config/name",
        "/seconds",
    ] {
        assert!(json.pointer(key).is_some(), "report.json lacks {key}");
    }
    let lines = std::fs::read_to_string(tmp.path().join(paths::METRICS)).unwrap();
    assert_eq!(lines.lines().count(), 13);
    let loaded: dnal_zoo::PlainCnn = dnal_zoo::load(&tmp.path().join(paths::PRUNED), |c| {
        <dnal_zoo::PlainCnn as dnal_zoo::Network>::build(c, &Default::default())
    })
    .unwrap();
    assert_eq!(
        dnal_zoo::Network::cost_model(&loaded).cost(None).macs,
        pruned.macs
    );

    // The ONNX file, run by tract, classifies the 1,000 test digits as the report says.
    let top1 = onnx_top1(&tmp.path().join("pruned.onnx"));
    assert!(
        (top1 - pruned.top1).abs() <= 0.2,
        "pruned.onnx in tract: {top1:.1} %, the report: {:.1} %",
        pruned.top1
    );
}

/// Top-1 of an exported MNIST network on the bundled test digits, run by tract.
fn onnx_top1(path: &Path) -> f64 {
    use tract_onnx::prelude::{
        Framework, InferenceModelExt, IntoRunnable, IntoTValue, tract_ndarray, tvec,
    };
    let test = dnal_data::bundled_mnist(dnal_data::Split::Test).unwrap();
    let n = test.len();
    let norm = dnal_data::Normalize::mnist();
    let mut x = vec![0f32; n * 784];
    for (i, chunk) in x.chunks_mut(784).enumerate() {
        norm.write_planar(&test.example(i).image, chunk);
    }
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = tract_ndarray::Array4::from_shape_vec((n, 1, 28, 28), x).unwrap();
    let out = model
        .run(tvec!(
            tract_onnx::prelude::Tensor::from(input).into_tvalue()
        ))
        .unwrap();
    let logits: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    let correct = logits
        .chunks(10)
        .zip(test.labels())
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            best == *label
        })
        .count();
    100.0 * correct as f64 / n as f64
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        "data.train_limit=200",
        "weights.epochs=2",
        "weights.lr=1e30",
        "weights.schedule={kind=\"constant\"}",
    ]);
    let err = dnal_train::run(&cfg, &opts(tmp.path(), false, None)).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("weights epoch") && msg.contains("--resume"),
        "{msg}"
    );
    assert!(
        tmp.path()
            .join(paths::CHECKPOINT)
            .join("progress.json")
            .is_file()
    );
}

#[test]
fn resuming_without_a_checkpoint_or_with_another_config_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        "data.train_limit=100",
        "data.test_limit=100",
        "weights.epochs=1",
    ]);
    let msg = dnal_train::run(&cfg, &opts(tmp.path(), true, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no checkpoint"), "{msg}");
    assert!(matches!(
        dnal_train::run(&cfg, &opts(tmp.path(), false, Some(1))).unwrap(),
        Outcome::Stopped
    ));
    let other = demo(&[
        "data.train_limit=100",
        "data.test_limit=100",
        "weights.epochs=2",
    ]);
    let msg = dnal_train::run(&other, &opts(tmp.path(), true, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("another config"), "{msg}");
}

#[test]
fn every_preset_parses_and_builds_its_network() {
    let presets = recipes::presets().unwrap();
    assert!(presets.len() > 10);
    for p in presets {
        let cfg = recipes::resolve(Some(&p.name), None, &[]).unwrap();
        assert_eq!(cfg.name, p.name);
        if let Some(l) = p.lambda {
            assert_eq!(cfg.arch.penalty.lambda, l);
        }
        let summary = dnal_train::dry_run(&cfg).unwrap_or_else(|e| panic!("{}: {e}", p.name));
        assert!(summary.contains("MACs"), "{summary}");
    }
}

/// The registry and `configs/` agree: every recipe file names a registered model (it would not
/// parse otherwise) and every registered model has a recipe.
#[test]
fn every_model_has_a_recipe_and_every_recipe_a_model() {
    let recipe_models: Vec<_> = recipes::RECIPES
        .iter()
        .map(|r| {
            let cfg = recipes::resolve(Some(r.name), None, &[])
                .unwrap_or_else(|e| panic!("configs/{}.toml: {e}", r.name));
            cfg.model.name
        })
        .collect();
    let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert_eq!(
        recipes::RECIPES.len(),
        on_disk,
        "every recipe file is compiled in"
    );
    for model in dnal_train::registry::ModelName::ALL {
        assert!(
            recipe_models.contains(model),
            "{model:?} is registered but no recipe in configs/ uses it"
        );
    }
}

/// Every numeric setting, fed values outside its range: the error names that key.
#[test]
fn every_out_of_range_setting_is_named_in_its_error() {
    let cases: &[(&str, &[&str])] = &[
        ("data.batch_size", &["0"]),
        ("data.eval_batch_size", &["0"]),
        ("data.crop_size", &["0"]),
        ("data.train_limit", &["0"]),
        ("data.test_limit", &["0"]),
        (
            "data.crop_scale",
            &["[0.0, 1.0]", "[0.5, 0.2]", "[0.1, 1.5]"],
        ),
        ("weights.epochs", &["0"]),
        ("weights.lr", &["0", "-0.1", "nan", "inf"]),
        ("weights.momentum", &["-0.1", "1", "nan"]),
        ("weights.weight_decay", &["-1e-4", "nan"]),
        ("final.lr", &["0", "-1"]),
        ("final.momentum", &["1.5"]),
        ("final.weight_decay", &["-1"]),
        ("arch.epochs", &["0"]),
        ("arch.lr", &["0", "-1", "inf"]),
        ("arch.momentum", &["-0.5", "1"]),
        ("arch.classifier_weight_decay", &["-1", "nan"]),
        ("arch.threshold", &["0", "1", "-0.2", "nan"]),
        ("arch.round_to", &["0"]),
        (
            "model.width_multiplier",
            &["0", "-0.5", "1.5", "nan", "inf"],
        ),
        ("arch.penalty.lambda", &["-1", "nan", "inf"]),
        ("arch.continuation.schedule.start", &["0", "-1", "inf"]),
        ("arch.continuation.schedule.end", &["0", "nan"]),
        ("report.latency_batch", &["0"]),
        ("report.latency_runs", &["0"]),
    ];
    for (key, values) in cases {
        for value in *values {
            let set = vec![format!("{key}={value}")];
            let msg = match recipes::resolve(Some("mnist-demo"), None, &set) {
                Ok(_) => panic!("{key}={value} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(msg.contains(&format!("`{key}`")), "{key}={value}: {msg}");
        }
    }
    // Schedules: the step factor and the cosine floor.
    for (sets, key) in [
        (
            &["final.schedule={ kind = \"step\", milestones = [1], gamma = 0.0 }"][..],
            "final.schedule.gamma",
        ),
        (
            &["weights.schedule={ kind = \"cosine\", min_lr = 1.0 }"][..],
            "weights.schedule.min_lr",
        ),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let msg = recipes::resolve(Some("mnist-demo"), None, &sets)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(key), "{msg}");
    }
}

#[test]
fn bad_configs_are_rejected_before_any_work() {
    let err = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        recipes::resolve(Some("mnist-demo"), None, &sets)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["arch.penalty.lambda=-1"]).contains("arch.penalty.lambda"));
    assert!(err(&["final.init=w.pth"]).contains("`final.init`"));
    assert!(err(&["weights.init=w.pth", "weights.init_keys=timm"]).contains("`weights.init_keys`"));
    assert!(err(&["weights.init=w.pth", "weights.init_exclude=['(']"]).contains("init_exclude"));
    // Zero weight epochs only with weights to start from.
    assert!(err(&["weights.epochs=0"]).contains("weights.init"));
    assert!(err(&["arch.threshold=1"]).contains("arch.threshold"));
    assert!(err(&["mode=\"scratch\""]).contains("compare.architecture"));
    assert!(err(&["weights.lr=0"]).contains("weights.lr"));
    assert!(err(&["nonsense=1"]).contains("unknown field `nonsense`"));
    assert!(err(&["data.dataset=\"svhn\""]).contains("unknown variant"));
    assert!(err(&["no-equals-sign"]).contains("key=value"));
    let msg = recipes::resolve(Some("resnet9000"), None, &[])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown preset") && msg.contains("--list"),
        "{msg}"
    );
    let msg = "cuda"
        .parse::<BackendKind>()
        .unwrap()
        .device()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("--features cuda"), "{msg}");
}

/// The scratch mode checks its architecture before any training: a missing file, and one of
/// another network, are named with the setting to fix.
#[test]
fn a_scratch_run_rejects_a_missing_or_foreign_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |arch: &std::path::Path| {
        let cfg = demo(&[
            "mode=\"scratch\"",
            &format!("compare.architecture={:?}", arch.display().to_string()),
        ]);
        let out = tmp.path().join("out");
        let msg = dnal_train::run(&cfg, &opts(&out, false, None))
            .unwrap_err()
            .to_string();
        assert!(
            !out.join("metrics.jsonl").exists(),
            "no epoch may run before the check"
        );
        msg
    };
    let missing = tmp.path().join("nowhere.json");
    let msg = run(&missing);
    assert!(
        msg.contains("compare.architecture") && msg.contains("nowhere.json"),
        "{msg}"
    );
    // The demo CNN's gates are conv0..conv3 of widths 32, 32, 64, 64.
    let foreign = tmp.path().join("foreign.json");
    let gate =
        |w: usize| format!(r#"{{"kind":"main","width":{w},"kept":[0],"forced_open":false}}"#);
    std::fs::write(
        &foreign,
        format!(
            r#"{{"threshold":0.9,"gates":{{"conv0":{},"conv1":{},"conv2":{},"stage9":{}}}}}"#,
            gate(32),
            gate(16),
            gate(64),
            gate(64)
        ),
    )
    .unwrap();
    let msg = run(&foreign);
    assert!(
        msg.contains("compare.architecture")
            && msg.contains("does not fit")
            && msg.contains("conv1")
            && msg.contains("conv3"),
        "{msg}"
    );
}

#[test]
fn missing_cifar_names_the_download_command() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = vec![format!("data.path=\"{}\"", tmp.path().display())];
    let cfg = recipes::resolve(Some("vgg16-cifar10"), None, &sets).unwrap();
    let msg = dnal_train::run(&cfg, &opts(&tmp.path().join("out"), false, None))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cargo xtask data download cifar10"), "{msg}");
}

/// Joint mode (beyond the paper): weights and alpha from scratch together, then derivation,
/// the final stage, and a dense baseline trained from scratch for comparison.
#[test]
fn joint_mode_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        "mode=\"joint\"",
        "data.train_limit=300",
        "data.test_limit=200",
        "weights.epochs=2",
        "final.epochs=1",
        "report.latency_runs=1",
        "report.plots=false",
    ]);
    assert_eq!(
        dnal_train::phase::phases(&cfg),
        [
            dnal_train::Phase::Joint,
            dnal_train::Phase::Final,
            dnal_train::Phase::Weights
        ]
    );
    let report = finished(dnal_train::run(&cfg, &opts(tmp.path(), false, None)).unwrap());
    let stages: Vec<String> = std::fs::read_to_string(tmp.path().join(paths::METRICS))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(stages, ["joint", "joint", "final", "weights", "weights"]);
    assert!(report.pruned.is_some());
    assert_eq!(report.baseline.macs, 18_289_792);
}

/// Writes `per_class` bundled MNIST digits of each class of `split` as PNG files into
/// `root/<train|val>/<digit>/`.
fn mnist_image_folder(root: &Path, split: dnal_data::Split, per_class: usize) {
    let set = dnal_data::bundled_mnist(split)
        .unwrap()
        .balanced_head(per_class);
    let sub = if split == dnal_data::Split::Train {
        "train"
    } else {
        "val"
    };
    for i in 0..set.len() {
        let e = set.example(i);
        let dir = root.join(sub).join(e.label.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        image::GrayImage::from_raw(28, 28, e.image.pixels)
            .unwrap()
            .save(dir.join(format!("{i}.png")))
            .unwrap();
    }
}

/// An image folder's labels must fit the network's outputs: `model.num_classes` below the
/// folder's class count is an error naming both; a larger head is allowed.
#[test]
fn an_image_folder_with_more_classes_than_outputs_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("digits");
    mnist_image_folder(&data, dnal_data::Split::Train, 1);
    mnist_image_folder(&data, dnal_data::Split::Test, 1);
    let cfg = demo(&[
        "data.dataset=\"image-folder\"",
        &format!("data.path=\"{}\"", data.display()),
        "data.crop_size=14",
    ]);
    let err = match dnal_train::data::load(&cfg.data, Some(5), 0) {
        Ok(_) => panic!("5 outputs for 10 classes were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("model.num_classes") && err.contains("has 10 classes"),
        "{err}"
    );
    let loaded = dnal_train::data::load(&cfg.data, Some(12), 0).map(|d| d.classes.len());
    assert_eq!(loaded.ok(), Some(10));
}

/// The tiny supernet on real MNIST digits laid out as an ImageNet-style folder tree (so the
/// image-folder path is exercised, here with 14x14 crops to stay fast): the whole pipeline runs
/// and DNAL removes whole candidate operations. Accuracy is not asserted: a few epochs of this
/// supernet on 400 digits reach only 20-40 % (the MNIST demo test covers accuracy).
#[test]
fn tiny_supernet_on_an_image_folder_removes_candidates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("digits");
    mnist_image_folder(&data, dnal_data::Split::Train, 40);
    mnist_image_folder(&data, dnal_data::Split::Test, 10);
    let cfg = demo(&[
        "model.name=\"supernet-tiny\"",
        "data.dataset=\"image-folder\"",
        &format!("data.path=\"{}\"", data.display()),
        "data.crop_size=14",
        "data.augment=false",
        "data.batch_size=32",
        "weights.epochs=3",
        "weights.lr=0.05",
        "arch.epochs=3",
        "final.epochs=1",
        "final.lr=0.02",
        "arch.penalty.lambda=0.1",
        "report.latency_runs=1",
    ]);
    let report =
        finished(dnal_train::run(&cfg, &opts(&tmp.path().join("out"), false, None)).unwrap());
    assert!(tmp.path().join("out/structure.svg").is_file());
    let structure = report
        .structure
        .clone()
        .expect("the supernet describes its candidates");
    eprintln!("{}", report.markdown());
    let removed = report
        .layers
        .iter()
        .filter(|l| l.name.ends_with(".proj") && l.after == 0)
        .count();
    assert!(removed >= 1, "no candidate removed:\n{structure}");
    assert!(structure.contains(" - |"));
    assert!(report.pruned.as_ref().unwrap().params < report.baseline.params);
    let classes = std::fs::read_to_string(tmp.path().join("out").join(paths::CLASSES)).unwrap();
    assert_eq!(
        classes.lines().collect::<Vec<_>>(),
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    );
}

/// A run stopped after every epoch and resumed each time ends exactly where an uninterrupted
/// run ends (on one thread; see `concurrent.rs` for what holds with several).
#[test]
fn a_stopped_run_resumes_to_the_same_result() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(stopped_run_resumes_to_the_same_result);
}

fn stopped_run_resumes_to_the_same_result() {
    let cfg = demo(common::TINY);
    let straight = tempfile::tempdir().unwrap();
    let a = finished(dnal_train::run(&cfg, &opts(straight.path(), false, None)).unwrap());

    let stopped = tempfile::tempdir().unwrap();
    let mut outcome = dnal_train::run(&cfg, &opts(stopped.path(), false, Some(1))).unwrap();
    let mut resumes = 0;
    while let Outcome::Stopped = outcome {
        resumes += 1;
        outcome = dnal_train::run(&cfg, &opts(stopped.path(), true, Some(1))).unwrap();
    }
    let b = finished(outcome);
    assert_eq!(resumes, 5);
    assert_eq!(a.pruned, b.pruned);
    assert_eq!(a.baseline, b.baseline);
    assert_eq!(a.layers, b.layers);
    assert_eq!(a.derived_top1, b.derived_top1);
    assert!(a.derived_top1_before_recalibration.is_some());
    assert_eq!(
        a.derived_top1_before_recalibration,
        b.derived_top1_before_recalibration
    );
    assert_eq!(
        common::history(straight.path()),
        common::history(stopped.path())
    );
}

/// The history of a tiny run with `extra` settings, split at the architecture stage: the epochs
/// before it and those of it.
fn arch_history(extra: &[&str]) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let sets: Vec<&str> = TINY.iter().chain(extra).copied().collect();
    let cfg = demo(&[&sets[..], &["final.epochs=1"]].concat());
    finished(dnal_train::run(&cfg, &opts(tmp.path(), false, None)).unwrap());
    let h = history(tmp.path());
    let weights: Vec<_> = h
        .iter()
        .filter(|l| l["stage"] == "weights")
        .cloned()
        .collect();
    let arch: Vec<_> = h.iter().filter(|l| l["stage"] == "arch").cloned().collect();
    (weights, arch)
}

/// The released code's architecture stage is the default: the classifier trains without weight
/// decay, and the optimisers restart every epoch (momentum from zero); both are one setting away.
#[test]
fn the_architecture_stage_follows_the_released_code_by_default() {
    let cfg = demo(&[]);
    assert_eq!(cfg.arch.classifier_weight_decay, 0.0);
    assert!(cfg.arch.momentum_restart);
    assert!(cfg.arch.train_classifier);

    // A restart changes nothing in the first epoch, and everything after it.
    let (w_restart, restart) = arch_history(&["arch.epochs=2"]);
    let (w_kept, kept) = arch_history(&["arch.epochs=2", "arch.momentum_restart=false"]);
    assert_eq!(w_restart, w_kept);
    assert_eq!(
        restart[0], kept[0],
        "the first epoch starts from zero momentum either way"
    );
    assert_ne!(
        restart[1]["loss"], kept[1]["loss"],
        "the second epoch restarts momentum"
    );

    // The classifier's decay acts in the architecture stage only.
    let (w_decay, decay) = arch_history(&["arch.epochs=2", "arch.classifier_weight_decay=0.05"]);
    assert_eq!(w_decay, w_restart);
    assert_ne!(decay[1]["loss"], restart[1]["loss"]);
}

/// Recalibrating BatchNorm after derivation (on by default) changes the evaluations before the
/// final stage and nothing that trains: the weight and architecture stages, and the final
/// stage's losses, are those of a run without it.
#[test]
fn batch_norm_recalibration_changes_no_training() {
    let run = |extra: &[&str]| {
        let tmp = tempfile::tempdir().unwrap();
        let sets: Vec<&str> = TINY
            .iter()
            .chain(&["arch.penalty.lambda=1e-2"])
            .chain(extra)
            .copied()
            .collect();
        let report =
            finished(dnal_train::run(&demo(&sets), &opts(tmp.path(), false, None)).unwrap());
        let md = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
        (report, history(tmp.path()), md)
    };
    let (on, h_on, md_on) = run(&[]);
    let (off, h_off, md_off) = run(&["arch.bn_recalibration_batches=0"]);
    assert_eq!(demo(&[]).arch.bn_recalibration_batches, 100);

    let stage = |h: &[serde_json::Value], name: &str| -> Vec<serde_json::Value> {
        h.iter().filter(|l| l["stage"] == name).cloned().collect()
    };
    for name in ["weights", "arch"] {
        assert_eq!(stage(&h_on, name), stage(&h_off, name), "{name} stage");
    }
    let (f_on, f_off) = (stage(&h_on, "final"), stage(&h_off, "final"));
    assert_eq!(f_on.len(), 2);
    for (a, b) in f_on.iter().zip(&f_off) {
        for key in ["loss", "train_top1", "lr", "macs"] {
            assert_eq!(a[key], b[key], "final stage, {key}");
        }
    }
    // The network as derived, evaluated with the statistics it had, is the same in both runs.
    assert_eq!(off.derived_top1_before_recalibration, None);
    assert_eq!(on.derived_top1_before_recalibration, off.derived_top1);
    assert!(on.derived_top1.is_some());
    assert!(
        md_on.contains("re-estimated on 100 training batches"),
        "{md_on}"
    );
    assert!(!md_off.contains("re-estimated"), "{md_off}");
}

/// The ImageNet recipes follow the released scripts' learning rates, and each `-baseline`
/// preset trains for the paper's baseline epochs.
#[test]
fn recipes_follow_the_released_schedules_and_the_papers_baselines() {
    use dnal_train::config::Mode;
    use dnal_train::phase::learning_rate;
    let cfg = |p: &str| recipes::resolve(Some(p), None, &[]).unwrap();
    // The rate where the weight stage ends.
    let end = |p: &str| {
        let c = cfg(p);
        learning_rate(&c.weights, c.weights.epochs, 0, 100)
    };
    assert!((end("mobilenetv2-imagenet") - 0.05).abs() < 1e-12);
    assert!((end("proxyless-imagenet") - 0.0125).abs() < 1e-12);
    assert_eq!(end("resnet50-imagenet"), 0.1);
    assert_eq!(end("vgg16-imagenet"), 0.01);
    assert_eq!(cfg("mobilenetv2-imagenet").final_stage.lr, 0.085);
    assert_eq!(cfg("proxyless-imagenet").final_stage.lr, 0.042);
    for (preset, epochs) in [
        ("vgg16-cifar10-baseline", 200),
        ("resnet56-cifar10-baseline", 200),
        ("mobilenetv2-cifar10-baseline", 300),
        ("vgg16-imagenet-baseline", 90),
        ("resnet50-imagenet-baseline", 90),
        ("mobilenetv2-imagenet-baseline", 120),
        ("proxyless-imagenet-baseline", 150),
    ] {
        let c = cfg(preset);
        assert_eq!(c.mode, Mode::Dense, "{preset}");
        assert_eq!(c.weights.epochs, epochs, "{preset}");
    }
    // A baseline's cosine runs its whole course.
    assert!(end("mobilenetv2-imagenet-baseline") < 1e-12);
    assert!(end("proxyless-imagenet-baseline") < 1e-12);
    // The ImageNet ResNet-50 / VGG-16 baselines step /10 at epochs 30 and 60 (torchvision's
    // reference schedule); their DNAL weight stages stay constant.
    for (preset, lr) in [
        ("resnet50-imagenet-baseline", 0.1),
        ("vgg16-imagenet-baseline", 0.01),
    ] {
        let c = cfg(preset);
        let at = |epoch| learning_rate(&c.weights, epoch, 0, 100);
        for (epoch, want) in [(29, lr), (30, lr * 0.1), (60, lr * 0.01)] {
            assert!((at(epoch) - want).abs() < 1e-12, "{preset} epoch {epoch}");
        }
    }
}

/// A MobileNetV2 run reports, beside its exact MACs, the count of the released code (which
/// also takes a closed residual output's channels from the next conv): never more than the
/// exact count, and shown in the markdown report. The MNIST CNN has no such second figure.
#[test]
fn mobilenet_runs_report_the_released_count_too() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = common::TINY.to_vec();
    sets.extend([
        "model.name=\"mobilenetv2-cifar\"",
        "data.train_limit=64",
        "data.test_limit=32",
        "weights.epochs=1",
        "arch.epochs=1",
        "final.epochs=1",
        "arch.penalty.lambda=2e-1",
    ]);
    let report = finished(dnal_train::run(&demo(&sets), &opts(tmp.path(), false, None)).unwrap());
    let pruned = report.pruned.as_ref().unwrap();
    let released = pruned
        .macs_released
        .expect("MobileNetV2 has a released count");
    assert!(released <= pruned.macs, "{released} > {}", pruned.macs);
    assert!(
        report
            .markdown()
            .contains("Counted as the released code counts")
    );
    let json = std::fs::read_to_string(tmp.path().join("report.json")).unwrap();
    assert!(json.contains("macs_released"));

    let plain = finished(
        dnal_train::run(
            &demo(common::TINY),
            &opts(&tmp.path().join("cnn"), false, None),
        )
        .unwrap(),
    );
    assert_eq!(plain.pruned.unwrap().macs_released, None);
}

/// `arch.round_to = 8`: every derived width is a multiple of 8, the full width, or 0 (a closed
/// gate stays closed), and the report says how many channels were added back.
#[test]
fn rounded_widths_are_multiples_of_round_to() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = TINY.to_vec();
    sets.push("arch.round_to=8");
    let report = finished(dnal_train::run(&demo(&sets), &opts(tmp.path(), false, None)).unwrap());
    for l in &report.layers {
        assert!(
            l.after % 8 == 0 || l.after == l.before,
            "{}: {} of {}",
            l.name,
            l.after,
            l.before
        );
    }
    let added = report.rounding_added.expect("rounding reported");
    assert!(report.markdown().contains("multiples of 8"));
    let plain = finished(
        dnal_train::run(&demo(TINY), &opts(&tmp.path().join("plain"), false, None)).unwrap(),
    );
    let kept = |r: &dnal_train::Report| r.layers.iter().map(|l| l.after).sum::<usize>();
    assert_eq!(kept(&report), kept(&plain) + added);
    assert_eq!(plain.rounding_added, None);
}

/// `model.width_multiplier = 0.25`: the demo CNN searched from a quarter of its widths,
/// 8-8-16-16, with those widths' MACs, and pruned from there.
#[test]
fn width_multiplier_scales_every_gated_width() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = TINY.to_vec();
    sets.push("model.width_multiplier=0.25");
    let cfg = demo(&sets);
    let report = finished(dnal_train::run(&cfg, &opts(tmp.path(), false, None)).unwrap());
    let before: Vec<usize> = report.layers.iter().map(|l| l.before).collect();
    assert_eq!(before, [8, 8, 16, 16]);
    // 3x3 convs on 28x28 (two) and 14x14 (two) maps, then the 16 -> 10 classifier.
    let macs = 28 * 28 * 9 * (8 + 8 * 8) + 14 * 14 * 9 * (8 * 16 + 16 * 16) + 16 * 10;
    assert_eq!(report.baseline.macs, macs);
    let pruned = report.pruned.as_ref().expect("pruned");
    assert!(pruned.macs < macs);
    assert!(report.layers.iter().all(|l| l.after <= l.before));
    // The factor is part of the run's config: a resumed run builds the same network.
    let saved = std::fs::read_to_string(tmp.path().join("checkpoint/config.toml")).unwrap();
    assert!(saved.contains("width_multiplier = 0.25"), "{saved}");
}

/// `predict` on PNG files written from the test digits a run was evaluated on classifies them
/// as the run's report says; an unreadable file is named and the others are still classified.
#[test]
fn predict_classifies_png_digits_as_the_report_says() {
    use dnal_train::export::Which;
    use dnal_train::predict::{PredictOptions, predict};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Batches of 64: predict reads the 201 files in four batches.
    let mut sets = TINY.to_vec();
    sets.push("data.eval_batch_size=64");
    let report = finished(dnal_train::run(&demo(&sets), &opts(&run, false, None)).unwrap());
    // TINY evaluates on 200 test digits: the first 20 of each class.
    let test = dnal_data::bundled_mnist(dnal_data::Split::Test)
        .unwrap()
        .balanced_head(20);
    let pngs = tmp.path().join("digits");
    std::fs::create_dir(&pngs).unwrap();
    for i in 0..test.len() {
        let e = test.example(i);
        image::GrayImage::from_raw(28, 28, e.image.pixels)
            .unwrap()
            .save(pngs.join(format!("{i:03}-{}.png", e.label)))
            .unwrap();
    }
    std::fs::write(pngs.join("zzz-broken.png"), b"not a png").unwrap();
    let opts = PredictOptions {
        which: Which::Pruned,
        top: 3,
        quiet: true,
    };
    let (predictions, errors) =
        predict(&run, &[pngs, tmp.path().join("missing.png")], &opts).unwrap();
    assert_eq!(predictions.len(), 200);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("missing.png"), "{errors:?}");
    assert_eq!(errors[1].matches("zzz-broken.png").count(), 1, "{errors:?}");
    let mut correct = 0;
    for p in &predictions {
        let name = p.file.file_stem().unwrap().to_string_lossy().into_owned();
        let label: usize = name.split('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(p.top.len(), 3);
        assert!(
            p.top
                .windows(2)
                .all(|w| w[0].probability >= w[1].probability)
        );
        assert_eq!(p.top[0].class, p.top[0].index.to_string());
        correct += usize::from(p.top[0].index == label);
    }
    let top1 = 100.0 * correct as f64 / 200.0;
    let reported = report.pruned.unwrap().top1;
    assert!(
        (top1 - reported).abs() <= 0.5,
        "predict: {top1} %, the report: {reported} %"
    );
    // A run stopped before its final stage has no pruned network: the message says which
    // network it has.
    std::fs::rename(run.join(paths::PRUNED), run.join("moved")).unwrap();
    let err = predict(&run, &[tmp.path().join("x.png")], &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no pruned network (yet); --which dense"),
        "{err}"
    );
}

/// A run that starts from another run's dense weights (`weights.init`, the `.bpk` a run
/// writes) with `weights.epochs = 0` skips the weight stage and evaluates the same dense
/// network; a file that does not fit stops the run with the tensors named.
#[test]
fn a_run_starts_from_saved_weights_and_skips_the_weight_stage() {
    let first = tempfile::tempdir().unwrap();
    let small = ["data.train_limit=600", "data.test_limit=200"];
    let cfg = demo(&[
        small[0],
        small[1],
        "data.batch_size=32",
        "mode=\"dense\"",
        "weights.epochs=3",
    ]);
    let dense = finished(dnal_train::run(&cfg, &opts(first.path(), false, None)).unwrap());
    let weights = first.path().join(paths::DENSE).join("model.bpk");

    let second = tempfile::tempdir().unwrap();
    let init = format!("weights.init={}", weights.display());
    let cfg = demo(&[
        small[0],
        small[1],
        &init,
        "weights.epochs=0",
        "arch.epochs=1",
        "final.epochs=1",
    ]);
    let report = finished(dnal_train::run(&cfg, &opts(second.path(), false, None)).unwrap());
    assert_eq!(report.baseline.top1, dense.baseline.top1);
    // Trained, not at chance (10 %).
    assert!(report.baseline.top1 > 30.0, "{}", report.baseline.top1);
    let phases: Vec<String> = history(second.path())
        .iter()
        .map(|h| h["stage"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(phases, ["arch", "final"]);

    // Weights of another network: refused, naming the file and a tensor.
    let third = tempfile::tempdir().unwrap();
    let cfg = demo(&[
        small[0],
        small[1],
        &init,
        "weights.epochs=0",
        "model.name=\"resnet20-cifar\"",
    ]);
    let msg = dnal_train::run(&cfg, &opts(third.path(), false, None))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.bpk") && msg.contains("do not fit"),
        "{msg}"
    );
}

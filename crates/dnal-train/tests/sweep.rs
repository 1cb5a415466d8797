//! A reduced lambda sweep on the bundled digits (3 lambdas, both comparison methods, tiny
//! runs): the table and plot are written, DNAL's MACs fall as lambda rises, the comparison
//! methods land at their DNAL point's MACs, the table agrees with the runs' reports, a second
//! invocation runs nothing again, and one failed run does not lose the others.

mod common;

use std::path::Path;

use dnal_train::Report;
use dnal_train::sweep::{self, Method, SweepOptions, SweepTable};

fn options(out: &Path, lambdas: &[f64], baselines: Vec<Method>) -> SweepOptions {
    SweepOptions {
        recipe: "mnist-demo".into(),
        lambdas: Some(lambdas.to_vec()),
        seeds: vec![0],
        baselines,
        jobs: 2,
        out: out.to_path_buf(),
        sets: common::TINY.iter().map(|s| s.to_string()).collect(),
        backend: "flex".into(),
        devices: None,
        trainer: env!("CARGO_BIN_EXE_dnal-train").into(),
        quiet: true,
    }
}

fn report(dir: &Path) -> Report {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_reduced_sweep_writes_its_table_and_compares_at_equal_macs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let lambdas = [5e-3, 5e-2, 5e-1];
    let opts = options(
        &out,
        &lambdas,
        vec![Method::Uniform, Method::Magnitude, Method::Scratch],
    );
    let (table, failed) = sweep::run(&opts).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    for file in ["sweep.md", "sweep.json", "pareto.svg"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let saved: SweepTable =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(saved, table);
    assert_eq!(table.rows.len(), 12);
    let dnal: Vec<_> = table
        .rows
        .iter()
        .filter(|r| r.method == Method::Dnal)
        .collect();
    assert_eq!(
        dnal.iter().map(|r| r.lambda).collect::<Vec<_>>(),
        lambdas.to_vec()
    );
    for pair in dnal.windows(2) {
        assert!(
            pair[1].macs.mean < pair[0].macs.mean,
            "MACs must fall as lambda rises: {} then {}",
            pair[0].macs.mean,
            pair[1].macs.mean
        );
    }
    for row in &table.rows {
        let folder = match row.method {
            Method::Dnal => format!("l{}-s0", dnal_train::recipes::lambda_label(row.lambda)),
            m => format!(
                "l{}-s0-{}",
                dnal_train::recipes::lambda_label(row.lambda),
                m.name()
            ),
        };
        let run = report(&out.join(&folder));
        let pruned = run.pruned.as_ref().unwrap();
        assert_eq!(
            row.top1.mean, pruned.top1,
            "{folder}: the table is the run's report"
        );
        assert_eq!(row.macs.mean, pruned.macs as f64, "{folder}");
        // Right after derivation: both figures for the methods that inherit weights.
        let derived = |s: Option<dnal_train::sweep::Stat>| s.map(|s| s.mean);
        if matches!(row.method, Method::Dnal | Method::Magnitude) {
            assert!(run.derived_top1_before_recalibration.is_some(), "{folder}");
            assert_eq!(
                derived(row.derived_top1),
                run.derived_top1_before_recalibration,
                "{folder}"
            );
            assert_eq!(
                derived(row.derived_top1_recalibrated),
                run.derived_top1,
                "{folder}"
            );
        } else {
            assert_eq!(row.derived_top1, None, "{folder}");
            assert_eq!(row.derived_top1_recalibrated, None, "{folder}");
        }
        if row.method == Method::Dnal {
            assert_eq!(row.vs_dnal, None, "{folder}");
        } else {
            let matched = dnal.iter().find(|d| d.lambda == row.lambda).unwrap();
            let (target, dnal_top1) = (matched.macs.mean, matched.top1.mean);
            let vs = row
                .vs_dnal
                .expect("a comparison row is paired with its DNAL run");
            assert!(
                (vs.mean - (pruned.top1 - dnal_top1)).abs() < 1e-9,
                "{folder}: {vs:?} against {} - {dnal_top1}",
                pruned.top1
            );
            if row.method == Method::Scratch {
                // The DNAL run's own architecture, rebuilt: the same MACs to the unit.
                assert_eq!(row.macs.mean, target, "{folder}");
                let arch = |dir: &str| -> serde_json::Value {
                    let path = out.join(dir).join("architecture.json");
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
                };
                let dnal_folder = folder.trim_end_matches("-scratch");
                assert_eq!(arch(&folder), arch(dnal_folder), "{folder}");
            }
            if matches!(row.method, Method::Uniform | Method::Scratch) {
                // From scratch, for as many epochs as the whole DNAL run.
                let c = &run.config;
                let finals = std::fs::read_to_string(out.join(&folder).join("metrics.jsonl"))
                    .unwrap()
                    .lines()
                    .filter(|l| l.contains("\"stage\":\"final\""))
                    .count();
                assert_eq!(
                    finals,
                    c.weights.epochs + c.arch.epochs + c.final_stage.epochs,
                    "{folder}"
                );
            }
            let off = (row.macs.mean - target).abs() / target;
            assert!(
                off < 0.1,
                "{folder}: {} MACs against {target}",
                row.macs.mean
            );
        }
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| dnal |")).count(), 3);
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| uniform |")).count(),
        3
    );
    let before_final = md
        .split("## Before the final stage")
        .nth(1)
        .unwrap_or_else(|| panic!("no derivation table: {md}"));
    for method in ["dnal", "magnitude"] {
        let rows = before_final
            .lines()
            .filter(|l| l.contains(&format!(" | {method} | ")))
            .count();
        assert_eq!(rows, 3, "{method}: {before_final}");
    }
    assert!(!before_final.contains(" | uniform | "), "{before_final}");

    // Everything is done: a second invocation runs nothing and gives the same table.
    let stamp = |f: &str| {
        std::fs::metadata(out.join(f).join("report.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp("l5e-2-s0");
    let (again, failed) = sweep::run(&opts).unwrap();
    assert!(failed.is_empty());
    assert_eq!(again, table);
    assert_eq!(stamp("l5e-2-s0"), before);
}

#[test]
fn a_failed_run_is_named_and_the_others_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    std::fs::create_dir_all(&out).unwrap();
    // A file where the second run's folder should go: that run cannot start.
    std::fs::write(out.join("l5e-1-s0"), "in the way").unwrap();
    let (table, failed) = sweep::run(&options(&out, &[5e-3, 5e-1], Vec::new())).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].starts_with("l5e-1-s0"), "{}", failed[0]);
    assert_eq!(table.rows.len(), 1);
    assert_eq!(table.rows[0].lambda, 5e-3);
    // The same command again: the finished run is skipped, the failed one tried again, and its
    // log keeps both attempts.
    let (_, failed) = sweep::run(&options(&out, &[5e-3, 5e-1], Vec::new())).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let log = std::fs::read_to_string(out.join("l5e-1-s0.log")).unwrap();
    assert_eq!(log.matches("error:").count(), 2, "{log}");
    assert!(log.contains("--- started again ---"), "{log}");
    // A run of another recipe in the folder: the table would mix them, so it is refused.
    let other = out.join("other-recipe");
    std::fs::create_dir(&other).unwrap();
    let mut report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("l5e-3-s0/report.json")).unwrap())
            .unwrap();
    report["name"] = "vgg16-cifar10".into();
    std::fs::write(other.join("report.json"), report.to_string()).unwrap();
    let err = sweep::write_report(&out).unwrap_err().to_string();
    assert!(err.contains("two recipes, mnist-demo"), "{err}");
    assert!(err.contains("vgg16-cifar10"), "{err}");
}

/// `--emit`: a Slurm array script that bash accepts, whose array covers the DNAL tasks and
/// whose second submission covers the comparison tasks; a shell list with every task once.
/// Two of its commands run by hand make the same run folders the sweep makes: the sweep then
/// finds them finished.
#[test]
fn an_emitted_sweep_runs_task_by_task_into_the_sweeps_folders() {
    use dnal_train::cluster::{self, Emit};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let opts = options(&out, &[5e-3, 5e-1], vec![Method::Uniform]);

    let script = cluster::emit(&opts, Emit::Slurm, 2).unwrap();
    let path = tmp.path().join("sweep.sbatch");
    std::fs::write(&path, &script).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap();
    assert!(check.success(), "bash -n rejects:\n{script}");
    assert!(script.contains("#SBATCH --array=0-1\n"), "{script}");
    assert!(script.contains("--array=2-3 \"$0\""), "{script}");
    assert!(script.contains("#SBATCH --gres=gpu:2\n"), "{script}");
    assert!(!script.contains("--devices"), "{script}");
    // On a GPU backend, a task's GPUs all train its run.
    let mut cuda = opts.clone();
    cuda.backend = "cuda".into();
    let on_cuda = cluster::emit(&cuda, Emit::Slurm, 2).unwrap();
    assert!(on_cuda.contains(" --devices '0,1' "), "{on_cuda}");
    assert!(
        script.contains("--task \"$SLURM_ARRAY_TASK_ID\""),
        "{script}"
    );
    // A folder that an #SBATCH line cannot hold is refused; the shell list quotes it.
    let mut spaced = opts.clone();
    spaced.out = tmp.path().join("my sweep");
    let err = cluster::emit(&spaced, Emit::Slurm, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("#SBATCH --output"), "{err}");
    assert!(cluster::emit(&spaced, Emit::Shell, 0).is_ok());

    let list = cluster::emit(&opts, Emit::Shell, 0).unwrap();
    let commands: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(commands.len(), 4, "{list}");
    for (i, c) in commands.iter().enumerate() {
        assert!(c.ends_with(&format!("--task {i}")), "{c}");
    }
    // A comparison task before its DNAL run: a clear error, nothing run.
    let err = cluster::run_task(&opts, 2).unwrap_err().to_string();
    assert!(err.contains("has not finished"), "{err}");
    let err = cluster::run_task(&opts, 4).unwrap_err().to_string();
    assert!(err.contains("past the last task"), "{err}");

    // Task 0 (DNAL at 5e-3) and task 2 (uniform at its MACs), as the emitted lines.
    for i in [0, 2] {
        let status = std::process::Command::new("bash")
            .arg("-c")
            .arg(commands[i])
            .status()
            .unwrap();
        assert!(status.success(), "task {i}: {}", commands[i]);
    }
    let dnal = out.join("l5e-3-s0");
    let uniform = out.join("l5e-3-s0-uniform");
    let stamp = |d: &Path| {
        std::fs::metadata(d.join("report.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = [stamp(&dnal), stamp(&uniform)];
    let target = report(&dnal).pruned.unwrap().macs as f64;
    let matched = report(&uniform).pruned.unwrap().macs as f64;
    assert!(
        (matched - target).abs() / target < 0.1,
        "{matched} vs {target}"
    );
    // The sweep itself (one lambda) finds both runs done.
    let (table, failed) = sweep::run(&options(&out, &[5e-3], vec![Method::Uniform])).unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(table.rows.len(), 2);
    assert_eq!([stamp(&dnal), stamp(&uniform)], before);
}

/// A recipe that does not exist and a report folder that does not exist are named, with what
/// to pass instead; nothing is written.
#[test]
fn a_wrong_recipe_or_report_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let mut opts = options(&out, &[5e-3], Vec::new());
    opts.recipe = "resnet57-cifar10".into();
    let err = sweep::run(&opts).unwrap_err().to_string();
    assert!(
        err.starts_with("unknown recipe `resnet57-cifar10`"),
        "{err}"
    );
    assert!(err.contains("resnet56-cifar10"), "{err}");
    assert!(!out.exists());

    let err = sweep::write_report(&out).unwrap_err().to_string();
    assert!(err.contains("no such folder"), "{err}");
    assert!(err.contains("--out folder of a sweep"), "{err}");
}

/// What would fail in every run, or run one point twice, is refused before any run starts and
/// before the sweep's folder is made.
#[test]
fn a_sweep_checks_its_points_before_it_runs_any() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let refused = |opts: &SweepOptions, expected: &str| {
        let err = sweep::run(opts).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        let err = dnal_train::cluster::emit(opts, dnal_train::cluster::Emit::Shell, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(!out.exists());
    };
    refused(
        &options(&out, &[5e-3, f64::NAN], Vec::new()),
        "NaN is not a finite number",
    );
    refused(
        &options(&out, &[-1.0], Vec::new()),
        "-1 is not a finite number",
    );
    refused(
        &options(&out, &[1e-4, 1.0e-4], Vec::new()),
        "1e-4 is listed twice",
    );
    let mut opts = options(&out, &[5e-3], vec![Method::Uniform, Method::Uniform]);
    refused(&opts, "uniform is listed twice");
    opts.baselines.clear();
    opts.seeds = vec![1, 2, 1];
    refused(&opts, "1 is listed twice");
    opts.seeds = vec![0];
    opts.jobs = 0;
    refused(&opts, "--jobs");
    opts.jobs = 1;
    opts.sets.push("arch.threshold=2".into());
    refused(&opts, "arch.threshold");
}

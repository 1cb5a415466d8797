//! A lambda sweep: every lambda of a recipe (times every seed) as an ordinary run in its own
//! folder, optionally the comparison methods at each DNAL point's MACs, then one table
//! (`sweep.md`, `sweep.json`) and one trade-off plot (`pareto.svg`) of all of them.
//!
//! Runs are separate `dnal-train train` processes, `jobs` at a time. A finished run (its
//! `report.json` exists) is not run again and a stopped one is resumed, so the same command
//! continues an interrupted sweep. A failed run is reported and the others still are.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::progress::{EpochLog, paths};
use crate::recipes::{lambda_label, lambdas_and_paper};
use crate::report::Report;

/// How the channels of a point were chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// DNAL.
    Dnal,
    /// Every gated width scaled by one factor, trained from scratch (mode `uniform`).
    Uniform,
    /// The largest |BatchNorm gamma| after the weight stage (mode `magnitude`).
    Magnitude,
    /// The DNAL run's own architecture trained from scratch as `uniform` trains its network
    /// (mode `scratch`): what the learned widths are worth without DNAL's training.
    Scratch,
}

impl Method {
    /// The name in tables, folders and `--baselines`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dnal => "dnal",
            Method::Uniform => "uniform",
            Method::Magnitude => "magnitude",
            Method::Scratch => "scratch",
        }
    }

    /// A comparison method by name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "uniform" => Ok(Method::Uniform),
            "magnitude" => Ok(Method::Magnitude),
            "scratch" => Ok(Method::Scratch),
            other => Err(TrainError::from(dnal_core::CoreError::invalid(
                "--baselines",
                format!(
                    "`{other}` is not a comparison method; use uniform, magnitude, scratch or a \
                     comma-separated list of them"
                ),
            ))),
        }
    }
}

/// What to sweep.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// The recipe (a file stem of `configs/`).
    pub recipe: String,
    /// Lambdas (default: the recipe's `[presets] lambdas`).
    pub lambdas: Option<Vec<f64>>,
    /// Seeds; every point is run once per seed.
    pub seeds: Vec<u64>,
    /// Comparison methods run at each DNAL point's MACs.
    pub baselines: Vec<Method>,
    /// Runs at once.
    pub jobs: usize,
    /// The sweep folder.
    pub out: PathBuf,
    /// `key=value` overrides for every run.
    pub sets: Vec<String>,
    /// Backend name passed to every run.
    pub backend: String,
    /// Devices each run trains on data-parallel (`--devices`), if more than the default one.
    pub devices: Option<String>,
    /// The `dnal-train` executable that runs each point.
    pub trainer: PathBuf,
    /// No progress lines.
    pub quiet: bool,
}

/// One run of the sweep.
#[derive(Clone, Debug)]
pub(crate) struct Point {
    pub(crate) method: Method,
    pub(crate) lambda: f64,
    pub(crate) seed: u64,
    pub(crate) dir: PathBuf,
}

impl Point {
    fn folder(method: Method, lambda: f64, seed: u64) -> String {
        let base = format!("l{}-s{seed}", lambda_label(lambda));
        match method {
            Method::Dnal => base,
            m => format!("{base}-{}", m.name()),
        }
    }

    /// The folder name.
    pub(crate) fn name(&self) -> String {
        self.dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    }
}

/// How one run of the sweep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// It had finished before (its `report.json` exists); nothing was run.
    AlreadyDone,
    /// It ran to its end.
    Done,
    /// A signal stopped it after a checkpoint; running it again continues it.
    Stopped,
}

/// Every run of the sweep in a fixed order: the DNAL points (lambda by lambda, seed by seed),
/// then, for each of them, every comparison method. The comparison runs need their DNAL run's
/// report (they match its MACs).
pub(crate) fn plan(opts: &SweepOptions) -> Result<(Vec<Point>, Vec<Point>)> {
    let (recipe_lambdas, _) = lambdas_and_paper(&opts.recipe)?;
    let lambdas = opts.lambdas.clone().unwrap_or(recipe_lambdas);
    if lambdas.is_empty() || opts.seeds.is_empty() {
        return Err(TrainError::from(dnal_core::CoreError::invalid(
            "--lambdas",
            "nothing to run: give --lambdas (the recipe lists none) and at least one seed",
        )));
    }
    let invalid = |flag: &str, message: String| {
        Err(TrainError::from(dnal_core::CoreError::invalid(
            flag, message,
        )))
    };
    if opts.jobs == 0 {
        return invalid("--jobs", "0 runs at once: it must be at least 1".into());
    }
    if let Some(l) = lambdas.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        return invalid("--lambdas", format!("{l} is not a finite number >= 0"));
    }
    if let Some(l) = repeated(lambdas.iter().map(|&l| lambda_label(l))) {
        return invalid("--lambdas", format!("{l} is listed twice"));
    }
    if let Some(s) = repeated(opts.seeds.iter()) {
        return invalid("--seeds", format!("{s} is listed twice"));
    }
    if let Some(m) = repeated(opts.baselines.iter().map(|m| m.name())) {
        return invalid("--baselines", format!("{m} is listed twice"));
    }
    let point = |method, lambda, seed| Point {
        method,
        lambda,
        seed,
        dir: opts.out.join(Point::folder(method, lambda, seed)),
    };
    let dnal: Vec<Point> = lambdas
        .iter()
        .flat_map(|&l| opts.seeds.iter().map(move |&s| point(Method::Dnal, l, s)))
        .collect();
    // Every run's config is checked now, not by each run as it starts.
    for p in &dnal {
        crate::recipes::resolve(Some(&opts.recipe), None, &run_sets(opts, p, &[]))?;
    }
    let compare = dnal
        .iter()
        .flat_map(|p| opts.baselines.iter().map(|&m| point(m, p.lambda, p.seed)))
        .collect();
    Ok((dnal, compare))
}

/// Runs the sweep, then writes its report; returns the table and the runs that failed.
pub fn run(opts: &SweepOptions) -> Result<(SweepTable, Vec<String>)> {
    let (dnal, compare) = plan(opts)?;
    std::fs::create_dir_all(&opts.out).map_err(dnal_core::CoreError::io(&opts.out))?;
    let mut failed = execute(opts, &dnal);
    let compare: Vec<Point> = compare
        .into_iter()
        .filter(|p| dnal_dir(opts, p).join("report.json").is_file())
        .collect();
    failed.extend(execute(opts, &compare));
    let table = write_report(&opts.out)?;
    Ok((table, failed))
}

/// The DNAL run a point belongs to (itself, for a DNAL point).
fn dnal_dir(opts: &SweepOptions, point: &Point) -> PathBuf {
    opts.out
        .join(Point::folder(Method::Dnal, point.lambda, point.seed))
}

/// The overrides that make `point` what it is beyond lambda and seed: for a comparison method,
/// its mode and the MACs of its DNAL run.
fn point_sets(opts: &SweepOptions, point: &Point) -> Result<Vec<String>> {
    if point.method == Method::Dnal {
        return Ok(Vec::new());
    }
    let dnal = dnal_dir(opts, point);
    if !dnal.join("report.json").is_file() {
        return Err(TrainError::Config {
            origin: format!("run {}", point.dir.display()),
            message: format!(
                "it is compared with the DNAL run {}, which has not finished: run that first",
                dnal.display()
            ),
        });
    }
    if point.method == Method::Scratch {
        let arch = dnal.join(paths::ARCHITECTURE).display().to_string();
        return Ok(vec![
            format!("mode=\"{}\"", point.method.name()),
            format!("compare.architecture={}", toml::Value::String(arch)),
        ]);
    }
    let macs =
        read_report(&dnal)?
            .pruned
            .map(|p| p.macs)
            .ok_or_else(|| TrainError::Checkpoint {
                path: dnal.join("report.json"),
                message: "the DNAL run has no pruned network to match".into(),
            })?;
    Ok(vec![
        format!("mode=\"{}\"", point.method.name()),
        format!("compare.target_macs={macs}"),
    ])
}

/// A point's `--set` overrides: the caller's, then the sweep's own (which win), then `extra`.
fn run_sets(opts: &SweepOptions, point: &Point, extra: &[String]) -> Vec<String> {
    let mut sets = opts.sets.clone();
    sets.push(format!("arch.penalty.lambda={:e}", point.lambda));
    sets.push(format!("seed={}", point.seed));
    sets.extend_from_slice(extra);
    sets
}

/// The first item that appears twice.
fn repeated<T: std::fmt::Display>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let mut seen = std::collections::BTreeSet::new();
    items.find(|i| !seen.insert(i.to_string()))
}

/// Runs `points`, `jobs` at a time; returns a line per run that failed or was stopped.
fn execute(opts: &SweepOptions, points: &[Point]) -> Vec<String> {
    let queue = Mutex::new(points.iter().collect::<VecDeque<_>>());
    let failed = Mutex::new(Vec::new());
    let total = points.len();
    let done = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let Some(point) = queue.lock().expect("queue").pop_front() else {
                        break;
                    };
                    let name = point.name();
                    let result = run_point(opts, point);
                    let mut n = done.lock().expect("counter");
                    *n += 1;
                    match result {
                        Ok(Ran::Stopped) => {
                            let line = format!(
                                "{name}: stopped by a signal; the same command continues it"
                            );
                            eprintln!("sweep: [{}/{total}] {line}", *n);
                            failed.lock().expect("failures").push(line);
                        }
                        Ok(ran) => {
                            if !opts.quiet {
                                let what = if ran == Ran::AlreadyDone {
                                    "already done"
                                } else {
                                    "done"
                                };
                                eprintln!("sweep: [{}/{total}] {name} {what}", *n);
                            }
                        }
                        Err(e) => {
                            let line = format!("{name}: {e}");
                            eprintln!("sweep: [{}/{total}] {line}", *n);
                            failed.lock().expect("failures").push(line);
                        }
                    }
                }
            });
        }
    });
    failed.into_inner().expect("failures")
}

/// Exit status of a `dnal-train` run stopped by a signal (it wrote a checkpoint first).
const STOPPED_STATUS: i32 = 130;

/// Runs (or resumes) one point.
pub(crate) fn run_point(opts: &SweepOptions, point: &Point) -> Result<Ran> {
    if point.dir.join("report.json").is_file() {
        return Ok(Ran::AlreadyDone);
    }
    let extra = point_sets(opts, point)?;
    let mut cmd = Command::new(&opts.trainer);
    cmd.args(["train", "--quiet", "--backend", &opts.backend]);
    if let Some(devices) = &opts.devices {
        cmd.args(["--devices", devices]);
    }
    if point.dir.join(paths::CHECKPOINT).is_dir() {
        cmd.arg("--resume").arg(&point.dir);
    } else {
        cmd.args(["--preset", &opts.recipe]);
        for s in run_sets(opts, point, &extra) {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("--out").arg(&point.dir);
    }
    let log = opts.out.join(format!(
        "{}.log",
        point.dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    // Appended to: a run started again (resumed, or after a failure) keeps its earlier log.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(dnal_core::CoreError::io(&log))?;
    if file.metadata().is_ok_and(|m| m.len() > 0) {
        use std::io::Write;
        writeln!(file, "\n--- started again ---").map_err(dnal_core::CoreError::io(&log))?;
    }
    let err = file.try_clone().map_err(dnal_core::CoreError::io(&log))?;
    let status = cmd
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .status()
        .map_err(dnal_core::CoreError::io(&opts.trainer))?;
    if status.code() == Some(STOPPED_STATUS) {
        return Ok(Ran::Stopped);
    }
    if !status.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let last = tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(TrainError::Config {
            origin: format!("run {}", point.dir.display()),
            message: format!("exited with {status}: {last} (log: {})", log.display()),
        });
    }
    Ok(Ran::Done)
}

fn read_report(dir: &Path) -> Result<Report> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(dnal_core::CoreError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path,
        message: format!("not a dnal report: {e}"),
    })
}

/// A mean and a sample standard deviation (0 for one value).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Self { mean, sd }
    }

    fn show(&self, digits: usize) -> String {
        if self.sd > 0.0 {
            format!("{:.digits$} ± {:.digits$}", self.mean, self.sd)
        } else {
            format!("{:.digits$}", self.mean)
        }
    }

    /// As [`Stat::show`], with the mean's sign always written.
    fn show_signed(&self, digits: usize) -> String {
        let sign = if self.mean >= 0.0 { "+" } else { "" };
        format!("{sign}{}", self.show(digits))
    }
}

/// One row: a method at one lambda, over its seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// How the channels were chosen.
    pub method: Method,
    /// The DNAL lambda (for a comparison method: of the DNAL point whose MACs it matches).
    pub lambda: f64,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Top-1 after the last epoch, percent.
    pub top1: Stat,
    /// Best top-1 of any epoch of the last stage: chosen on the test set, so optimistic (the
    /// authors' code reports this one).
    pub best_top1: Stat,
    /// Top-1 drop against the baseline, points.
    pub top1_drop: Stat,
    /// A comparison method's top-1 minus DNAL's at the same lambda and seed, points (positive:
    /// the comparison method is more accurate), over the seeds; absent on DNAL rows and where
    /// some seed's DNAL run is missing. Pairing by seed removes the spread that the seeds'
    /// shared data order and weight stage put into both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_dnal: Option<Stat>,
    /// Top-1 right after derivation (or `magnitude` pruning), before the final stage, with the
    /// BatchNorm statistics the network had then; absent for the methods that train from
    /// scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_top1: Option<Stat>,
    /// The same after BatchNorm recalibration; absent unless every run of the row recalibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_top1_recalibrated: Option<Stat>,
    /// MACs per image.
    pub macs: Stat,
    /// MACs removed, percent.
    pub macs_reduction_pct: Stat,
    /// MACs as the authors' released code counts them, where that differs (see
    /// [`crate::report::NetSummary::macs_released`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macs_released: Option<Stat>,
    /// Parameters.
    pub params: Stat,
    /// Parameters removed, percent.
    pub params_reduction_pct: Stat,
    /// Dense latency, ms per batch.
    pub dense_ms: Stat,
    /// Pruned latency, ms per batch.
    pub pruned_ms: Stat,
    /// The paper's published row for this lambda, if the recipe has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paper: Option<String>,
}

/// The whole sweep (`sweep.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepTable {
    /// The recipe.
    pub recipe: String,
    /// What the drops are measured against (`weight-stage` or `extended`), with its top-1 and
    /// MACs.
    pub baseline_kind: String,
    /// The dense baseline's top-1 over the seeds of the DNAL runs (one value per seed).
    pub baseline_top1: Stat,
    /// The dense baseline's MACs.
    pub baseline_macs: u64,
    /// The paper's baseline row, if the recipe has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paper_baseline: Option<String>,
    /// Rows: DNAL by rising lambda, then each comparison method.
    pub rows: Vec<SweepRow>,
}

/// The best test top-1 of the last stage of a run (from its `metrics.jsonl`).
fn best_top1(dir: &Path, last: f64) -> f64 {
    let Ok(text) = std::fs::read_to_string(dir.join(paths::METRICS)) else {
        return last;
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<EpochLog>(l).ok())
        .filter(|l| l.stage == "final")
        .map(|l| l.test_top1)
        .fold(last, f64::max)
}

/// A finished run of a sweep folder.
struct Finished {
    method: Method,
    lambda: f64,
    seed: u64,
    dir: PathBuf,
    report: Report,
}

/// Reads every finished run in `dir` and writes `sweep.json`, `sweep.md` and `pareto.svg`.
pub fn write_report(dir: &Path) -> Result<SweepTable> {
    let mut runs: Vec<Finished> = Vec::new();
    if !dir.is_dir() {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: "no such folder; pass the --out folder of a sweep".into(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(dnal_core::CoreError::io(dir))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("report.json").is_file())
        .collect();
    dirs.sort();
    for d in dirs {
        let report = read_report(&d)?;
        let method = match report.config.mode {
            crate::config::Mode::Magnitude => Method::Magnitude,
            crate::config::Mode::Uniform => Method::Uniform,
            crate::config::Mode::Scratch => Method::Scratch,
            _ => Method::Dnal,
        };
        // A comparison run carries the lambda of the DNAL point it was matched to.
        let lambda = report.config.arch.penalty.lambda;
        runs.push(Finished {
            method,
            lambda,
            seed: report.config.seed,
            dir: d,
            report,
        });
    }
    let Some(Finished { report: first, .. }) = runs.first() else {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: "no finished run (no */report.json) in the sweep folder".into(),
        });
    };
    let recipe = first.name.clone();
    if let Some(other) = runs.iter().find(|r| r.report.name != recipe) {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "the folder holds runs of two recipes, {recipe} ({}) and {} ({}); a sweep's \
                 table compares one recipe's runs: move the others to a folder of their own",
                runs[0].dir.display(),
                other.report.name,
                other.dir.display()
            ),
        });
    }
    let (_, paper) = lambdas_and_paper(&recipe).unwrap_or_default();
    let baseline_kind = first.baseline_kind.clone();
    // One dense network per seed (every lambda of a seed shares its weight stage).
    let mut by_seed = BTreeMap::new();
    for r in runs.iter().filter(|r| r.method == Method::Dnal) {
        by_seed.entry(r.seed).or_insert(r.report.baseline.top1);
    }
    let dnal_bases: Vec<f64> = by_seed.into_values().collect();
    let baseline_macs = first.baseline.macs;
    let mut groups: BTreeMap<(Method, String), Vec<&Finished>> = BTreeMap::new();
    for r in &runs {
        groups
            .entry((r.method, lambda_key(r.lambda)))
            .or_default()
            .push(r);
    }
    let dnal_top1: BTreeMap<(String, u64), f64> = runs
        .iter()
        .filter(|r| r.method == Method::Dnal)
        .filter_map(|r| {
            let top1 = r.report.pruned.as_ref()?.top1;
            Some(((lambda_key(r.lambda), r.seed), top1))
        })
        .collect();
    let mut rows = Vec::new();
    for ((method, key), group) in groups {
        let pick = |f: &dyn Fn(&Report) -> Option<f64>| -> Stat {
            Stat::of(
                &group
                    .iter()
                    .filter_map(|r| f(&r.report))
                    .collect::<Vec<_>>(),
            )
        };
        // Over every run of the group, or absent if one lacks it.
        let pick_all = |f: &dyn Fn(&Report) -> Option<f64>| -> Option<Stat> {
            let values: Option<Vec<f64>> = group.iter().map(|r| f(&r.report)).collect();
            values.map(|v| Stat::of(&v))
        };
        let inherits = !group[0].report.config.mode.trains_from_scratch();
        let lambda = group[0].lambda;
        rows.push(SweepRow {
            method,
            lambda,
            seeds: group.iter().map(|r| r.seed).collect(),
            top1: pick(&|r| r.pruned.as_ref().map(|p| p.top1)),
            best_top1: Stat::of(
                &group
                    .iter()
                    .filter_map(|r| r.report.pruned.as_ref().map(|p| best_top1(&r.dir, p.top1)))
                    .collect::<Vec<_>>(),
            ),
            top1_drop: pick(&|r| r.reduction.as_ref().map(|x| x.top1_drop)),
            vs_dnal: (method != Method::Dnal)
                .then(|| {
                    let ours: Vec<(u64, Option<f64>)> = group
                        .iter()
                        .map(|r| (r.seed, r.report.pruned.as_ref().map(|p| p.top1)))
                        .collect();
                    paired_difference(&ours, |seed| dnal_top1.get(&(key.clone(), seed)).copied())
                })
                .flatten(),
            derived_top1: inherits
                .then(|| pick_all(&|r| r.derived_top1_before_recalibration.or(r.derived_top1)))
                .flatten(),
            derived_top1_recalibrated: inherits
                .then(|| pick_all(&|r| r.derived_top1_before_recalibration.and(r.derived_top1)))
                .flatten(),
            macs: pick(&|r| r.pruned.as_ref().map(|p| p.macs as f64)),
            macs_reduction_pct: pick(&|r| r.reduction.as_ref().map(|x| x.macs_pct)),
            macs_released: group
                .iter()
                .all(|r| released(&r.report).is_some())
                .then(|| pick(&|r| released(r).map(|m| m as f64))),
            params: pick(&|r| r.pruned.as_ref().map(|p| p.params as f64)),
            params_reduction_pct: pick(&|r| r.reduction.as_ref().map(|x| x.params_pct)),
            dense_ms: pick(&|r| Some(r.latency_ms.dense)),
            pruned_ms: pick(&|r| r.latency_ms.pruned),
            paper: (method == Method::Dnal)
                .then(|| paper.get(&lambda_label(lambda)).cloned())
                .flatten(),
        });
    }
    let table = SweepTable {
        recipe,
        baseline_kind,
        baseline_top1: Stat::of(&dnal_bases),
        baseline_macs,
        paper_baseline: paper.get("baseline").cloned(),
        rows,
    };
    let json = serde_json::to_string_pretty(&table).expect("tables serialise");
    dnal_core::io::write_atomic(&dir.join("sweep.json"), json.as_bytes())?;
    dnal_core::io::write_atomic(&dir.join("sweep.md"), table.markdown().as_bytes())?;
    crate::plots::plot_pareto(&dir.join("pareto.svg"), &table)?;
    Ok(table)
}

/// A lambda as a map key that sorts as the number does.
fn lambda_key(lambda: f64) -> String {
    format!("{lambda:020.12}")
}

/// `ours - theirs(seed)` over the seeds of `ours`, or `None` unless every seed has both values.
fn paired_difference(
    ours: &[(u64, Option<f64>)],
    theirs: impl Fn(u64) -> Option<f64>,
) -> Option<Stat> {
    let diffs: Option<Vec<f64>> = ours
        .iter()
        .map(|&(seed, top1)| Some(top1? - theirs(seed)?))
        .collect();
    diffs.filter(|d| !d.is_empty()).map(|d| Stat::of(&d))
}

/// The pruned network's MACs under the released code's count, if the run has that figure.
fn released(report: &Report) -> Option<u64> {
    report.pruned.as_ref().and_then(|p| p.macs_released)
}

/// A MACs figure as 1.23M.
fn macs(v: f64) -> String {
    crate::report::human(v.round() as u64)
}

impl SweepTable {
    /// The paper-style table.
    pub fn markdown(&self) -> String {
        let mut s = format!("# Sweep of {}\n\n", self.recipe);
        s += &format!(
            "Baseline ({}): top-1 {} %, {} MACs{}. Drops are measured against it; mean ± sample \
             standard deviation over the seeds listed.\n\n",
            self.baseline_kind,
            self.baseline_top1.show(2),
            macs(self.baseline_macs as f64),
            self.paper_baseline
                .as_ref()
                .map(|p| format!(" (paper: {p})"))
                .unwrap_or_default()
        );
        s += "| method | lambda | seeds | top-1 % (last) | top-1 % (best, test-chosen) | drop (points) | vs dnal, same seed (points) | MACs | MACs removed | params | params removed | latency dense / pruned (ms) | paper |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} % | {} / {} | {} |\n",
                r.method.name(),
                lambda_label(r.lambda),
                r.seeds.len(),
                r.top1.show(2),
                r.best_top1.show(2),
                r.top1_drop.show(2),
                r.vs_dnal
                    .map(|d| d.show_signed(2))
                    .unwrap_or_else(|| "-".into()),
                macs(r.macs.mean),
                r.macs_reduction_pct.show(1),
                macs(r.params.mean),
                r.params_reduction_pct.show(1),
                r.dense_ms.show(1),
                r.pruned_ms.show(1),
                r.paper.as_deref().unwrap_or("-"),
            );
        }
        let counted: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| {
                r.macs_released.map(|m| {
                    format!(
                        "{} at lambda {}: {}",
                        r.method.name(),
                        lambda_label(r.lambda),
                        macs(m.mean)
                    )
                })
            })
            .collect();
        if !counted.is_empty() {
            s += &format!(
                "\nMACs as the released code counts them (a closed residual output also leaves the next conv's input; compare these with the paper's rows): {}.\n",
                counted.join("; ")
            );
        }
        s += "\nComparison methods (beyond the paper) run at the MACs of the DNAL point with the same \
              lambda and seed, for the same total epochs: `uniform` scales every gated width by one \
              factor and trains from scratch; `magnitude` keeps the largest |BatchNorm gamma| after \
              the same weight stage and trains on; `scratch` trains the DNAL run's own architecture from \
              scratch as `uniform` trains its network. `vs dnal` is a comparison run's top-1 minus that \
              DNAL run's, seed by seed (positive: the comparison method is more accurate).\n";
        s += &self.derivation_markdown();
        s
    }

    /// What the architecture stage (or magnitude pruning) costs before the final stage wins it
    /// back, by lambda; empty when no row has the figure.
    fn derivation_markdown(&self) -> String {
        let mut rows: Vec<&SweepRow> = self
            .rows
            .iter()
            .filter(|r| r.derived_top1.is_some())
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        rows.sort_by(|a, b| a.lambda.total_cmp(&b.lambda));
        let mut s = "\n## Before the final stage\n\nTop-1 % of the pruned network right after \
                     derivation (`magnitude`: right after pruning), with the BatchNorm statistics \
                     it had then and with statistics re-estimated on training batches \
                     (`arch.bn_recalibration_batches`), and after the final stage.\n\n"
            .to_string();
        s += "| lambda | method | seeds | statistics as derived | recalibrated | after the final stage |\n";
        s += "|---|---|---|---|---|---|\n";
        for r in rows {
            let show = |x: Option<Stat>| x.map(|v| v.show(2)).unwrap_or_else(|| "-".into());
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                lambda_label(r.lambda),
                r.method.name(),
                r.seeds.len(),
                show(r.derived_top1),
                show(r.derived_top1_recalibrated),
                r.top1.show(2),
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paired_difference_is_taken_seed_by_seed() {
        let dnal = |seed| {
            [(0, 97.0), (1, 98.0), (2, 96.5)]
                .iter()
                .find(|(s, _)| *s == seed)
                .map(|p| p.1)
        };
        // Seed by seed the differences are +0.5, +0.5, +0.5: no spread, although the methods'
        // own top-1s spread by a point.
        let ours = [(0, Some(97.5)), (1, Some(98.5)), (2, Some(97.0))];
        let d = paired_difference(&ours, dnal).unwrap();
        assert!((d.mean - 0.5).abs() < 1e-9 && d.sd < 1e-9, "{d:?}");
        // Seeds in another order pair the same way.
        let d = paired_difference(&[(2, Some(96.0)), (0, Some(97.0))], dnal).unwrap();
        assert!((d.mean + 0.25).abs() < 1e-9, "{d:?}");
        // A seed without its DNAL run, or a run without a pruned top-1: no figure.
        assert_eq!(
            paired_difference(&[(0, Some(97.0)), (7, Some(97.0))], dnal),
            None
        );
        assert_eq!(paired_difference(&[(0, None)], dnal), None);
        assert_eq!(paired_difference(&[], dnal), None);
    }
}

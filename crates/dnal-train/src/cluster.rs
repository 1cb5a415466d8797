//! A sweep handed to the scheduler a cluster already has: every run of a sweep is one task,
//! numbered in [`crate::sweep`]'s fixed order, run by `dnal-train sweep ... --task I`; `--emit`
//! writes those tasks as a Slurm job array or as a plain list of commands.
//!
//! Runs resume from their checkpoints, so a task that a signal stopped (a time limit, a
//! preemption) continues where it stopped when it runs again; the Slurm script requeues itself
//! in that case. The comparison runs match the MACs of their DNAL run, so they start after the
//! DNAL runs have finished.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Result, TrainError};
use crate::sweep::{self, Ran, SweepOptions};

/// What `--emit` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// A Slurm job-array script.
    Slurm,
    /// One command per line, for GNU parallel, xargs or any runner.
    Shell,
}

impl Emit {
    /// `slurm` or `shell`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "slurm" => Ok(Emit::Slurm),
            "shell" => Ok(Emit::Shell),
            other => Err(TrainError::from(dnal_core::CoreError::invalid(
                "--emit",
                format!("`{other}` is not an output kind; use slurm or shell"),
            ))),
        }
    }
}

/// Runs task `index` of the sweep (one run), without writing the sweep's table.
pub fn run_task(opts: &SweepOptions, index: usize) -> Result<Ran> {
    let (dnal, compare) = sweep::plan(opts)?;
    let total = dnal.len() + compare.len();
    let point = dnal.iter().chain(&compare).nth(index).ok_or_else(|| {
        TrainError::from(dnal_core::CoreError::invalid(
            "--task",
            format!(
                "{index} is past the last task: this sweep has {total} (0 to {})",
                total - 1
            ),
        ))
    })?;
    std::fs::create_dir_all(&opts.out).map_err(dnal_core::CoreError::io(&opts.out))?;
    sweep::run_point(opts, point)
}

/// The sweep's tasks as a script of kind `kind`. `opts.out` and `opts.trainer` should be
/// absolute paths on a file system every node sees; `gpus` is the GPUs each Slurm task asks
/// for.
pub fn emit(opts: &SweepOptions, kind: Emit, gpus: usize) -> Result<String> {
    let (dnal, compare) = sweep::plan(opts)?;
    let (first, total) = (dnal.len(), dnal.len() + compare.len());
    let trainer = quote(&opts.trainer.to_string_lossy())?;
    let out = quote(&opts.out.to_string_lossy())?;
    // A Slurm task with several GPUs sees them as devices 0..gpus and trains on all of them.
    let gpu_backend = matches!(
        opts.backend.parse(),
        Ok(dnal_core::BackendKind::Cuda | dnal_core::BackendKind::Wgpu)
    );
    let devices = opts.devices.clone().or_else(|| {
        (kind == Emit::Slurm && gpus > 1 && gpu_backend).then(|| {
            (0..gpus)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
    });
    let args = task_args(opts, &dnal, devices.as_deref())?;
    let task = |index: &str| format!("{args} --task {index}");
    let mut s = String::new();
    match kind {
        Emit::Shell => {
            let _ = writeln!(
                s,
                "# Sweep of {} as one command per run: {first} DNAL runs, then {} comparison runs.\n\
                 # Each command resumes its run if it was stopped. Run the DNAL group first (in any\n\
                 # order, in parallel if you like); the comparison group matches the DNAL runs' MACs.\n\
                 # DNAL runs:",
                opts.recipe,
                compare.len()
            );
            for i in 0..first {
                let _ = writeln!(s, "{trainer} {}", task(&i.to_string()));
            }
            if !compare.is_empty() {
                let _ = writeln!(s, "# Comparison runs, after every DNAL run above finished:");
                for i in first..total {
                    let _ = writeln!(s, "{trainer} {}", task(&i.to_string()));
                }
            }
            let _ = writeln!(
                s,
                "# Then the table and plot:\n# {trainer} sweep --report {out}"
            );
        }
        Emit::Slurm => {
            // `#SBATCH` lines are not a shell's: the folder goes in unquoted, and Slurm reads
            // `%` in --output as a pattern.
            let shown = opts.out.to_string_lossy();
            if shown
                .chars()
                .any(|c| c.is_whitespace() || "%\"'\\".contains(c))
            {
                return Err(TrainError::from(dnal_core::CoreError::invalid(
                    "--out",
                    format!(
                        "{shown:?} cannot stand in a Slurm script's #SBATCH --output line; \
                         choose a folder whose path has no spaces, quotes, backslashes or %"
                    ),
                )));
            }
            let gres = if gpus > 0 {
                format!("#SBATCH --gres=gpu:{gpus}\n")
            } else {
                String::new()
            };
            let (tasks, rest) = if compare.is_empty() {
                (
                    format!("# {first} DNAL runs, tasks 0-{}.", first - 1),
                    String::new(),
                )
            } else {
                (
                    format!(
                        "# {first} DNAL runs, tasks 0-{}; {} comparison runs, tasks {first}-{}, which match\n\
                         # the DNAL runs' MACs and so start after them.",
                        first - 1,
                        compare.len(),
                        total - 1
                    ),
                    format!(
                        "    sbatch --parsable --dependency=afterany:\"${{first%%;*}}\" --array={first}-{} \"$0\"\n",
                        total - 1
                    ),
                )
            };
            let _ = write!(
                s,
                r#"#!/bin/bash
# Sweep of {recipe} as a Slurm job array, one task per run.
{tasks}
#   bash THIS_FILE     submits the DNAL tasks, then the comparison tasks depending on them;
#   sbatch THIS_FILE   submits the DNAL tasks only.
# Scheduler options (partition, time, account) go on the command line: sbatch -p gpu -t 8:00:00 ...
# A task stopped by its time limit or a preemption writes a checkpoint and requeues itself;
# the requeued task continues the run. Logs: {out}/slurm-<job>_<task>.log; runs: {out}/<run>/.
#SBATCH --job-name=dnal-{recipe}
#SBATCH --array=0-{last_dnal}
{gres}#SBATCH --output={out}/slurm-%A_%a.log
#SBATCH --requeue
#SBATCH --signal=TERM@180
set -u
DNAL_TRAIN=${{DNAL_TRAIN:-{trainer}}}
if [ -z "${{SLURM_ARRAY_TASK_ID:-}}" ]; then
    first=$(sbatch --parsable "$0") || exit 1
    echo "DNAL tasks: job $first"
{rest}    exit 0
fi
srun "$DNAL_TRAIN" {task}
status=$?
if [ "$status" -eq 130 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"#,
                recipe = opts.recipe,
                last_dnal = first - 1,
                out = opts.out.display(),
                task = task("\"$SLURM_ARRAY_TASK_ID\""),
            );
        }
    }
    Ok(s)
}

/// The `sweep` arguments that name this sweep's task list (shell-quoted, without `--task`);
/// `dnal` is its DNAL points.
fn task_args(opts: &SweepOptions, dnal: &[sweep::Point], devices: Option<&str>) -> Result<String> {
    let mut lambdas: Vec<String> = dnal.iter().map(|p| format!("{:e}", p.lambda)).collect();
    lambdas.dedup();
    let seeds: Vec<String> = opts.seeds.iter().map(|s| s.to_string()).collect();
    let mut args = vec![
        "sweep".to_string(),
        "--recipe".into(),
        quote(&opts.recipe)?,
        "--lambdas".into(),
        lambdas.join(","),
        "--seeds".into(),
        seeds.join(","),
        "--backend".into(),
        quote(&opts.backend)?,
        "--out".into(),
        quote(&opts.out.to_string_lossy())?,
        "--quiet".into(),
    ];
    if let Some(devices) = devices {
        args.extend(["--devices".into(), quote(devices)?]);
    }
    if !opts.baselines.is_empty() {
        let names: Vec<&str> = opts.baselines.iter().map(|m| m.name()).collect();
        args.extend(["--baselines".into(), names.join(",")]);
    }
    for set in &opts.sets {
        args.extend(["--set".into(), quote(set)?]);
    }
    Ok(args.join(" "))
}

/// `text` quoted for a POSIX shell.
fn quote(text: &str) -> Result<String> {
    shlex::try_quote(text).map(|q| q.into_owned()).map_err(|e| {
        TrainError::from(dnal_core::CoreError::invalid(
            "--emit",
            format!("cannot quote {text:?} for a shell: {e}"),
        ))
    })
}

/// `path` made absolute against the current directory (emitted scripts run elsewhere).
pub fn absolute(path: &Path) -> Result<std::path::PathBuf> {
    std::path::absolute(path).map_err(|e| dnal_core::CoreError::io(path)(e).into())
}

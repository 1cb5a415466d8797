//! `cargo xtask`: the project's automation, in Rust, with no dependency heavier than clap.
//!
//! * `cargo xtask train [ARGS]`: the DNAL trainer (no argument: the offline MNIST demo), built
//!   in release mode with the cargo feature of the backend chosen by `--backend`;
//! * `cargo xtask sweep --recipe NAME [...]`: every lambda of a recipe (and the comparison methods
//!   at equal MACs), then the sweep's table and plot;
//! * `cargo xtask export RUN_DIR [...]`: a run's pruned (or dense) network as an ONNX model;
//! * `cargo xtask predict RUN_DIR IMAGES...`: classify image files with a run's network;
//! * `cargo xtask data download cifar10|cifar100`: fetch a data set with its checksum checked;
//! * `cargo xtask test`: the whole test suite (what CI runs after fmt and clippy);
//! * `cargo xtask demo`: the toy demo of the DNAL core (gates on a 32-input problem).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dnal project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every test: the workspace in release mode (one profile for tests and binaries),
    /// each benchmark once, then the wgpu tests (skipped with a message when no adapter exists).
    Test {
        /// Skip the wgpu build and tests (they add several minutes to a cold build).
        #[arg(long)]
        no_wgpu: bool,
    },
    /// Train with DNAL: `--preset NAME`, `--list`, `--config FILE`, `--set key=value`,
    /// `--backend flex|ndarray|wgpu|cuda`, `--out DIR`, `--resume DIR`, `--dry-run`. With no
    /// argument: the offline demo on the bundled MNIST digits.
    Train {
        /// Arguments for `dnal-train train` (see `cargo xtask train --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A lambda sweep of a recipe: `--recipe NAME [--lambdas 1e-4,2e-4] [--seeds 0,1,2]
    /// [--baselines uniform,magnitude,scratch] [--jobs N] [--out DIR] [--set key=value]`, or
    /// `--report DIR` to rewrite a sweep's table and plot.
    Sweep {
        /// Arguments for `dnal-train sweep` (see `cargo xtask sweep --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Classify images with a run's network: `cargo xtask predict RUN_DIR IMAGE_OR_FOLDER...
    /// [--which pruned|dense] [--top 5] [--json]`.
    Predict {
        /// Arguments for `dnal-train predict`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A run's network as ONNX: `cargo xtask export RUN_DIR [--which pruned|dense] [--out FILE]
    /// [--opset N]`.
    Export {
        /// Arguments for `dnal-train export`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Time a training step: `cargo xtask bench-step [--model resnet56-cifar] [--batch 128]
    /// [--size 32] [--backend flex|wgpu|cuda] [--search | --architecture FILE] [--json]`.
    BenchStep {
        /// Arguments for `dnal-train bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// dnal's own GPU operations against the CPU: `cargo xtask check --backend wgpu|cuda
    /// [--quiet]` builds the trainer with that backend and runs `dnal-train check`.
    Check {
        /// Arguments for `dnal-train check`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Which backends start on this machine: builds the trainer with the named backends'
    /// cargo features (`cargo xtask backends wgpu cuda`; flex is always in) and runs
    /// `dnal-train backends`.
    Backends {
        /// Backends to build in besides flex: ndarray, wgpu, cuda.
        features: Vec<String>,
        /// One JSON line per backend.
        #[arg(long)]
        json: bool,
    },
    /// Data sets: `cargo xtask data download cifar10 [--dir DIR] [--url MIRROR]`.
    Data {
        /// `download` followed by its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the DNAL core's toy demo: learn which inputs a small gated network needs.
    Demo,
}

fn main() -> std::process::ExitCode {
    // The message and its causes, never a backtrace (RUST_BACKTRACE is often set for builds).
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Test { no_wgpu } => {
            // --all-targets also builds the examples and runs each criterion benchmark once.
            cargo(
                &root,
                &["test", "--workspace", "--release", "--all-targets"],
            )?;
            // The kernels' tests again with their hand-written kernels kept to AVX2 (as on a
            // CPU with 256-bit units, then as on one that runs AVX2 in 128-bit halves, whose
            // 3x3 convolutions take the padded-rows kernel), then to plain code, which this
            // CPU would otherwise not run (the same test binaries).
            for (isa, width) in [("avx2", "256"), ("avx2", "128"), ("none", "256")] {
                cargo_with(
                    &root,
                    &[
                        "test",
                        "--release",
                        "-p",
                        "dnal-kernels",
                        "--lib",
                        "--tests",
                    ],
                    // `DNAL_AVX2_WIDTH` overrides what the CPU reports.
                    &[("DNAL_ISA", isa), ("DNAL_AVX2_WIDTH", width)],
                )?;
            }
            if no_wgpu {
                println!("xtask: wgpu tests skipped (--no-wgpu)");
            } else {
                // One build of burn with wgpu for both crates' `wgpu` tests (the gate and the
                // whole pipeline); it is also the trainer's `--backend wgpu` build.
                cargo(
                    &root,
                    &[
                        "test",
                        "--release",
                        "-p",
                        "dnal-core",
                        "-p",
                        "dnal-train",
                        "--features",
                        "dnal-core/wgpu,dnal-train/wgpu",
                        "--test",
                        "wgpu",
                    ],
                )?;
            }
            Ok(())
        }
        Task::Train { args } => trainer(&root, "train", &args),
        Task::Sweep { args } => trainer(&root, "sweep", &args),
        Task::Export { args } => trainer(&root, "export", &args),
        Task::Predict { args } => trainer(&root, "predict", &args),
        Task::BenchStep { args } => trainer(&root, "bench", &args),
        Task::Check { args } => trainer(&root, "check", &args),
        Task::Backends { features, json } => {
            let mut names = Vec::new();
            for f in &features {
                match backend_named(f) {
                    Ok(name) if name != "flex" => names.push(name),
                    _ => bail!(
                        "unknown backend `{f}`: name ndarray, wgpu or cuda (flex is always built)"
                    ),
                }
            }
            let args = if json { vec!["--json".into()] } else { vec![] };
            run_trainer(&root, &names, "backends", &args)
        }
        Task::Data { args } => {
            match args.first().map(String::as_str) {
                Some("download") => {}
                _ => bail!(
                    "usage: cargo xtask data download cifar10|cifar100 [--dir DIR] [--url MIRROR]"
                ),
            }
            run_trainer(&root, &[], "download", &args[1..])
        }
        Task::Demo => cargo(
            &root,
            &[
                "run",
                "--release",
                "-p",
                "dnal-core",
                "--example",
                "gate_demo",
            ],
        ),
    }
}

/// The backend named by `--backend X` or `--backend=X` (default flex), checked against the
/// trainer's cargo features.
fn backend_of(args: &[String]) -> Result<&'static str> {
    let mut name = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--backend=") {
            name = Some(v.to_string());
        } else if a == "--backend" {
            name = args.get(i + 1).cloned();
        }
    }
    backend_named(name.as_deref().unwrap_or("flex"))
}

/// The trainer's backends, each also its cargo feature.
const BACKENDS: [&str; 4] = ["flex", "ndarray", "wgpu", "cuda"];

/// `name` as one of [`BACKENDS`], or an error listing them.
fn backend_named(name: &str) -> Result<&'static str> {
    match BACKENDS.into_iter().find(|b| *b == name) {
        Some(b) => Ok(b),
        None => bail!("unknown backend `{name}`: use flex, ndarray, wgpu or cuda"),
    }
}

fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time; prefer it to the compile-time value,
    // which is stale when a shared target directory holds an xtask built in another checkout.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cargo_with(root, args, &[])
}

/// [`cargo`] with environment variables `vars` set.
fn cargo_with(root: &Path, args: &[&str], vars: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let shown: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    eprintln!("xtask: {}cargo {}", shown.concat(), args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(vars.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("could not start `{cargo}`"))?;
    if !status.success() {
        // The command has printed its own error; pass its exit status on without another one.
        eprintln!("xtask: `cargo {}` failed ({status})", args.join(" "));
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Builds the trainer with the backend's cargo feature and runs `dnal-train <command> <args>`.
fn trainer(root: &Path, command: &str, args: &[String]) -> Result<()> {
    let features = match backend_of(args)? {
        "flex" => vec![],
        backend => vec![backend],
    };
    run_trainer(root, &features, command, args)
}

/// Builds the trainer with these cargo features besides its default (flex) and runs
/// `dnal-train <command> <args>`.
fn run_trainer(root: &Path, features: &[&str], command: &str, args: &[String]) -> Result<()> {
    let features = features.join(",");
    let mut cmd = vec!["run", "--release", "-p", "dnal-train"];
    if !features.is_empty() {
        cmd.extend(["--features", &features]);
    }
    cmd.extend(["--", command]);
    cmd.extend(args.iter().map(String::as_str));
    cargo(root, &cmd)
}

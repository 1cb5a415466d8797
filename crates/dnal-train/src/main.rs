//! `dnal-train`: the command-line front end of the DNAL pipeline (started by `cargo xtask
//! train`, which picks the cargo features of the backend).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dnal_core::BackendKind;
use dnal_train::pipeline::{Outcome, RunOptions, StopToken};
use dnal_train::{checkpoint, recipes};

#[derive(Parser)]
#[command(
    name = "dnal-train",
    about = "Differentiable neural architecture learning: train, prune, report",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The families of operations `dnal-train check` compares.
#[derive(Clone, Copy, ValueEnum)]
enum CheckFamily {
    /// The training BatchNorm with its running statistics.
    BatchNorm,
    /// The depthwise convolution and its gradients.
    Depthwise,
    /// The one-group convolution and its gradients.
    Convolution,
    /// SGD's momentum step.
    Sgd,
    /// The sparsity penalty's gradient added to alpha's.
    Penalty,
    /// The searching gates' factors and alpha's gradient through them.
    Gates,
    /// The training loss (cross-entropy, correct predictions, the logits' gradient) and the
    /// tally's writes.
    Loss,
    /// Channels placed into a wider stream (a residual stream widened, a shortcut subsampled).
    Channels,
    /// Training steps recorded and replayed as `train --graph` runs them, against the same
    /// steps issued one by one on the same device (cuda and wgpu).
    Graph,
}

#[derive(Subcommand)]
enum Command {
    /// Run a preset or a config file (default: the offline MNIST demo).
    Train(TrainArgs),
    /// Run every lambda of a recipe (and the comparison methods at the same MACs), then write
    /// the sweep's table (`sweep.md`, `sweep.json`) and plot (`pareto.svg`).
    Sweep(SweepArgs),
    /// Write a run's network as an ONNX model (BatchNorm and gates folded; input `images`
    /// `[batch, C, H, W]`, output `logits`; class names and the run's config as metadata).
    Export {
        /// The run folder.
        run: PathBuf,
        /// `pruned` (after the final stage) or `dense` (after the weight stage).
        #[arg(long, default_value = "pruned")]
        which: String,
        /// Output file, or a folder to write <which>.onnx in (default: RUN/<which>.onnx).
        #[arg(long)]
        out: Option<PathBuf>,
        /// ONNX opset (11 to 21).
        #[arg(long, default_value_t = dnal_onnx::DEFAULT_OPSET)]
        opset: i64,
    },
    /// Time one training step of a network on a backend, on random images (no data set):
    /// forward, cross-entropy, backward, SGD; the median and fastest of the timed steps.
    Bench {
        /// The network (a `[model] name`, e.g. resnet56-cifar, resnet50-imagenet).
        #[arg(long, default_value = "resnet56-cifar")]
        model: String,
        /// Images per step.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Image side.
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Image channels.
        #[arg(long, default_value_t = 3)]
        channels: usize,
        /// Classes.
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Untimed steps first (on a GPU: kernel compilation and autotuning).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Gates searching (as in the architecture stage) instead of bypassed.
        #[arg(long)]
        search: bool,
        /// With --search: the paper's sparsity penalty at this lambda added to the loss (e.g.
        /// 1e-4), as the architecture stage adds it.
        #[arg(long, value_name = "LAMBDA")]
        penalty: Option<f64>,
        /// flex, ndarray, wgpu or cuda (must be compiled in).
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Turn dnal's own operations off (on flex its convolutions and fused BatchNorm, on
        /// cuda and wgpu its BatchNorm kernels): burn's operations throughout, for comparison.
        #[arg(long)]
        burn_ops: bool,
        /// burn's SGD instead of dnal's (which issues one operation per parameter and step
        /// where burn's issues seven), for comparison.
        #[arg(long)]
        burn_sgd: bool,
        /// How dnal's CubeCL reductions (BatchNorm's statistics and gradients, the depthwise
        /// weight gradient) add up their partial sums: `auto` (as training does), `folded` (by the last cube of the launch
        /// that makes them) or `separate` (in a second launch), for comparison.
        #[arg(long, default_value = "auto")]
        reduction_finish: dnal_kernels::Finish,
        /// Record the step once as a graph of launches (a CUDA graph on cuda, re-encoded
        /// dispatches on wgpu) and time its replays: the step without the host's per-launch
        /// work.
        #[arg(long)]
        graph: bool,
        /// Time the network pruned to this architecture (a run's `architecture.json`), with
        /// the final stage's step (gates gone), instead of the dense network.
        #[arg(long, value_name = "FILE")]
        architecture: Option<PathBuf>,
        /// One JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare dnal's own operations on a backend with the CPU (flex): training BatchNorm
    /// with its running statistics, the depthwise convolution, the convolution's backward,
    /// SGD's momentum step, the sparsity penalty's gradient, the searching gates' factors and
    /// their gradient, the training loss and the placement of channels into a wider stream,
    /// over shapes that reach every branch of the GPU kernels; on cuda and wgpu also training
    /// steps recorded and replayed as `train --graph` runs them, against the same steps issued
    /// one by one. Prints each quantity's largest difference; fails if any exceeds 2e-4 of the
    /// reference's largest value (1e-2 for the one-group convolutions, whose products are
    /// burn's and may run in TF32 on cuda).
    Check {
        /// wgpu or cuda (flex compares dnal's flex operations with burn's).
        #[arg(long)]
        backend: String,
        /// Print only the comparisons that fail, and the summary.
        #[arg(long)]
        quiet: bool,
        /// Compare one family of operations only (default: all of them).
        #[arg(long, value_enum)]
        only: Option<CheckFamily>,
        /// How dnal's CubeCL reductions finish (see `bench`): `folded` checks the folded
        /// kernels where `auto` would not take them (on WGSL, correct only on a CPU driver
        /// such as lavapipe), `separate` the second launch's.
        #[arg(long, default_value = "auto")]
        reduction_finish: dnal_kernels::Finish,
    },
    /// Which backends this build contains and whether each starts here (runs a tiny
    /// computation on each compiled backend's default device).
    Backends {
        /// One JSON line per backend instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Classify image files with a run's network, preprocessed as the run's evaluation did
    /// (grey or RGB, resize and centre crop, normalisation); prints the top classes.
    Predict {
        /// The run folder.
        run: PathBuf,
        /// Image files (PNG, JPEG, BMP, WebP) or folders of them (sub-folders are read too).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// `pruned` or `dense`.
        #[arg(long, default_value = "pruned")]
        which: String,
        /// Classes per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// One JSON document (predictions and errors) instead of lines.
        #[arg(long)]
        json: bool,
    },

    /// Download CIFAR-10 or CIFAR-100 (checked against the archive's MD5) and unpack it.
    Download {
        /// `cifar10` or `cifar100`.
        dataset: String,
        /// Where to put it (default: $DNAL_DATA or data/).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A mirror's address instead of the official one.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(clap::Args)]
struct SweepArgs {
    /// The recipe (see `train --list`; a preset without its `-l<lambda>` suffix).
    #[arg(long, required_unless_present = "report")]
    recipe: Option<String>,
    /// Lambdas, comma-separated (default: the recipe's `[presets] lambdas`).
    #[arg(long, value_delimiter = ',')]
    lambdas: Option<Vec<f64>>,
    /// Seeds, comma-separated; every point runs once per seed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Comparison methods at each DNAL point's MACs: uniform, magnitude, scratch (comma-separated).
    #[arg(long, value_delimiter = ',')]
    baselines: Vec<String>,
    /// Runs at once (one process each).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Sweep folder (default: runs/sweep-<recipe>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config value in every run (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// flex, ndarray, wgpu or cuda (must be compiled in).
    #[arg(long, default_value = "flex")]
    backend: String,
    /// Only (re)write the report of the sweep in this folder from its finished runs.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["recipe", "lambdas", "baselines", "out", "set"])]
    report: Option<PathBuf>,
    /// Run only task I of the sweep (one run; DNAL runs first, then the comparison runs, in
    /// the order `--emit` lists them) and write no table: how a cluster's array task runs.
    #[arg(long, value_name = "I", conflicts_with_all = ["report", "emit"])]
    task: Option<usize>,
    /// Print the sweep's tasks for another runner instead of running them: `slurm` (a job-array
    /// script) or `shell` (one command per line).
    #[arg(long, value_name = "KIND")]
    emit: Option<String>,
    /// GPUs each Slurm task asks for (with `--emit slurm`; default 1 on cuda/wgpu, else 0).
    /// With more than one, each run trains data-parallel on all of them.
    #[arg(long, requires = "emit")]
    gpus: Option<usize>,
    /// Devices each run trains on data-parallel, as `train --devices`.
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// A preset (see --list); default `mnist-demo`.
    #[arg(long)]
    preset: Option<String>,
    /// A TOML config file instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Override a config value, e.g. `--set arch.penalty.lambda=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// flex, ndarray, wgpu or cuda (must be compiled in).
    #[arg(long, default_value = "flex")]
    backend: String,
    /// Output folder (default: runs/<preset name>, or runs/<preset name>-2, ... if taken).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Train data-parallel on these devices of the backend, one replica each, e.g.
    /// `cuda:0,cuda:1` or `0,1` (a device may repeat: `flex,flex`). The batch size stays the
    /// global batch. May differ between a run and its resumption.
    #[arg(long, value_name = "LIST")]
    devices: Option<String>,
    /// Resume the run in this output folder from its last checkpoint.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["preset", "config", "set", "out"])]
    resume: Option<PathBuf>,
    /// Record each epoch's training step as a graph of launches and replay it (cuda and wgpu,
    /// one device): the same run at a fraction of the host's cost per step. Every stage
    /// replays; the search runs as usual with Adam for alpha or a temperature that changes
    /// every iteration.
    #[arg(long)]
    graph: bool,
    /// Print the resolved config and the network summary, train nothing.
    #[arg(long)]
    dry_run: bool,
    /// List every preset.
    #[arg(long)]
    list: bool,
    /// No progress bars or per-epoch lines.
    #[arg(long)]
    quiet: bool,
}

dnal_kernels::global_allocator!();

/// Exit status of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it).
const STOPPED: u8 = 130;

fn main() -> ExitCode {
    dnal_kernels::allocator::keep_freed_memory();
    dnal_kernels::subnormals::flush_subnormals();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(STOPPED),
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: dnal's errors already print their
/// I/O cause after the file name, so a cause whose text is already there is not repeated.
fn message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Runs the command; `Ok(false)` when a run was stopped by a signal.
fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Train(args) => train(args),
        Command::Sweep(args) => sweep(args),
        Command::Bench {
            model,
            batch,
            size,
            channels,
            classes,
            warmup,
            steps,
            search,
            penalty,
            backend,
            burn_ops,
            burn_sgd,
            reduction_finish,
            graph,
            architecture,
            json,
        } => {
            let pruned = match architecture {
                Some(path) => Some(dnal_train::bench::Pruned {
                    name: path
                        .file_stem()
                        .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
                    architecture: dnal_core::Architecture::load(&path).map_err(|e| {
                        dnal_core::CoreError::invalid(
                            "--architecture",
                            format!("{e}; give the architecture.json that a run wrote"),
                        )
                    })?,
                }),
                None => None,
            };
            let bench = dnal_train::bench::StepBench {
                model: dnal_train::registry::ModelName::parse(&model)?,
                batch,
                shape: dnal_train::registry::ImageShape {
                    channels,
                    size,
                    classes,
                },
                warmup,
                steps,
                search,
                penalty,
                backend: backend.parse()?,
                burn_ops,
                burn_sgd,
                reduction_finish,
                graph,
                pruned,
            };
            let t = dnal_train::bench::bench_step(&bench)?;
            if json {
                println!("{}", serde_json::to_string(&t)?);
            } else {
                println!(
                    "{}{} on {}, batch {} of {}x{}, gates {}: median {:.1} ms, fastest {:.1} ms ({} steps); \
                     issuing a step took {:.1} ms (median); {:.1} s before the timed steps",
                    t.model,
                    match &t.architecture {
                        Some(a) => format!(
                            " pruned to {a} ({:.2}M MACs per image)",
                            t.macs as f64 / 1e6
                        ),
                        None => String::new(),
                    },
                    t.backend,
                    t.batch,
                    t.size,
                    t.size,
                    match t.penalty {
                        Some(lambda) => format!("{} (penalty {lambda:e})", t.gates),
                        None => t.gates.clone(),
                    },
                    t.median_ms,
                    t.min_ms,
                    t.steps,
                    t.issue_ms,
                    t.warmup_s
                );
                if !t.threads.is_empty() {
                    let busy: Vec<String> = t
                        .threads
                        .iter()
                        .map(|b| format!("{} ({}) {:.0} %", b.name, b.tid, b.busy * 100.0))
                        .collect();
                    println!("threads on a CPU over the timed steps: {}", busy.join(", "));
                }
            }
            Ok(true)
        }
        Command::Check {
            backend,
            quiet,
            only,
            reduction_finish,
        } => {
            dnal_kernels::set_reduction_finish(reduction_finish);
            let kind: BackendKind = backend.parse()?;
            let device = kind.probe()?;
            let reference = BackendKind::Flex.probe()?;
            use dnal_kernels::check;
            // flex records no graphs: by default its check compares operations only.
            let families: Vec<CheckFamily> = match only {
                Some(family) => vec![family],
                None => CheckFamily::value_variants()
                    .iter()
                    .copied()
                    .filter(|f| !matches!(f, CheckFamily::Graph) || kind != BackendKind::Flex)
                    .collect(),
            };
            let (mut total, mut failed) = (0, 0);
            for family in families {
                let comparisons = match family {
                    CheckFamily::BatchNorm => check::batch_norm(&device, &reference),
                    CheckFamily::Depthwise => check::depthwise(&device, &reference),
                    CheckFamily::Convolution => check::convolution(&device, &reference),
                    CheckFamily::Sgd => check::sgd(&device, &reference),
                    CheckFamily::Penalty => check::penalty(&device, &reference),
                    CheckFamily::Gates => check::gates(&device, &reference),
                    CheckFamily::Loss => check::loss(&device, &reference),
                    CheckFamily::Channels => check::channels(&device, &reference),
                    CheckFamily::Graph => dnal_train::graph_check::graph(&device),
                };
                // Printed family by family, so that a check stopped part-way has said what it
                // found so far.
                for c in comparisons.iter().filter(|c| !quiet || !c.ok()) {
                    println!("{c}");
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                total += comparisons.len();
                failed += comparisons.iter().filter(|c| !c.ok()).count();
            }
            println!(
                "{} of {} quantities on {} within tolerance of flex ({:e} of the largest value; \
                 {:e} for burn's convolutions, which may compute in TF32; replayed steps \
                 against the same device's plain steps)",
                total - failed,
                total,
                kind.name(),
                dnal_kernels::check::TOLERANCE,
                dnal_kernels::check::CONVOLUTION_TOLERANCE
            );
            if failed > 0 {
                anyhow::bail!(
                    "{failed} quantities on {} differ from their reference beyond the tolerance",
                    kind.name()
                );
            }
            Ok(true)
        }
        Command::Backends { json } => {
            for kind in BackendKind::ALL {
                let s = kind.status();
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    let took = s
                        .probe_seconds
                        .map(|t| format!(" ({t:.2} s)"))
                        .unwrap_or_default();
                    println!(
                        "{:<8} {:<13} {}{took}",
                        kind.name(),
                        s.state.label(),
                        s.detail
                    );
                }
            }
            if let (false, Some(cache)) = (json, BackendKind::kernel_cache()) {
                println!("kernel cache: {cache}");
            }
            Ok(true)
        }
        Command::Predict {
            run,
            images,
            which,
            top,
            json,
        } => {
            let opts = dnal_train::predict::PredictOptions {
                which: dnal_train::export::Which::parse(&which)?,
                top,
                quiet: json,
            };
            let (predictions, errors) = dnal_train::predict::predict(&run, &images, &opts)?;
            if json {
                let doc = serde_json::json!({ "predictions": predictions, "errors": errors });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                for p in &predictions {
                    let guesses: Vec<String> = p
                        .top
                        .iter()
                        .map(|g| format!("{} {:.1} %", g.class, 100.0 * g.probability))
                        .collect();
                    println!("{}: {}", p.file.display(), guesses.join(", "));
                }
                for e in &errors {
                    eprintln!("error: {e}");
                }
            }
            if !errors.is_empty() {
                anyhow::bail!(
                    "{} of {} inputs could not be classified",
                    errors.len(),
                    errors.len() + predictions.len()
                );
            }
            Ok(true)
        }
        Command::Export {
            run,
            which,
            out,
            opset,
        } => {
            let which = dnal_train::export::Which::parse(&which)?;
            let path = dnal_train::export::export_run(&run, which, out.as_deref(), opset)?;
            println!("wrote {}", path.display());
            Ok(true)
        }
        Command::Download { dataset, dir, url } => {
            let kind = match dataset.as_str() {
                "cifar10" => dnal_data::CifarKind::Cifar10,
                "cifar100" => dnal_data::CifarKind::Cifar100,
                other => anyhow::bail!(
                    "cannot download `{other}`: only cifar10 and cifar100 are downloadable (MNIST ships in datasets/, ImageNet must be prepared by hand)"
                ),
            };
            let mut archive = dnal_data::Archive::cifar(kind);
            if let Some(u) = url {
                archive = archive.with_url(u);
            }
            let dir = dir.unwrap_or_else(dnal_train::data::default_data_dir);
            let folder = dnal_data::download(&archive, &dir)?;
            println!("{} is ready in {}", dataset, folder.display());
            Ok(true)
        }
    }
}

/// `runs/<name>`, or `runs/<name>-2`, `-3`, ... if taken: a default output never overwrites an
/// earlier run.
fn fresh_run_dir(name: &str) -> PathBuf {
    let base = PathBuf::from("runs").join(name);
    (1..)
        .map(|i| {
            if i == 1 {
                base.clone()
            } else {
                PathBuf::from("runs").join(format!("{name}-{i}"))
            }
        })
        .find(|p| !p.exists())
        .expect("an unused name")
}

/// A token set by the first SIGINT/SIGTERM/SIGHUP: the run finishes its step, checkpoints
/// and stops. A second signal exits at once; the last complete checkpoint stays intact (every
/// checkpoint replaces the previous one only when complete).
fn stop_on_signals() -> anyhow::Result<StopToken> {
    let token = StopToken::new();
    let handler = token.clone();
    ctrlc::set_handler(move || {
        if handler.request() {
            eprintln!("\ndnal-train: second signal, exiting now; the last complete checkpoint is kept");
            std::process::exit(STOPPED.into());
        }
        eprintln!(
            "\ndnal-train: stopping after the current step and writing a checkpoint (signal again to exit at once)"
        );
    })
    .context("could not install the SIGINT/SIGTERM handler")?;
    Ok(token)
}

fn train(args: TrainArgs) -> anyhow::Result<bool> {
    if args.list {
        println!("{:<32} description", "preset");
        for p in recipes::presets()? {
            println!("{:<32} {}", p.name, p.description);
        }
        return Ok(true);
    }
    let backend: BackendKind = args.backend.parse()?;
    let (cfg, out, resume) = match &args.resume {
        Some(dir) => (
            checkpoint::config(&dir.join(dnal_train::progress::paths::CHECKPOINT))?,
            dir.clone(),
            true,
        ),
        None => {
            let cfg = recipes::resolve(args.preset.as_deref(), args.config.as_deref(), &args.set)?;
            let out = args.out.clone().unwrap_or_else(|| fresh_run_dir(&cfg.name));
            (cfg, out, false)
        }
    };
    if args.dry_run {
        println!("{}", dnal_train::dry_run(&cfg)?);
        return Ok(true);
    }
    // A backend that is not compiled in is reported before any work.
    backend.device()?;
    let devices = match &args.devices {
        Some(list) => backend.parse_devices(list)?,
        None => Vec::new(),
    };
    if !resume && out.join(dnal_train::progress::paths::CHECKPOINT).exists() {
        anyhow::bail!(
            "{} already holds a run; resume it with `--resume {}`, or choose another --out",
            out.display(),
            out.display()
        );
    }
    let on = match devices.len() {
        0 | 1 => backend.name().to_string(),
        n => format!(
            "{n} replicas ({})",
            args.devices.as_deref().unwrap_or_default()
        ),
    };
    eprintln!("dnal-train: {} on {on} -> {}", cfg.name, out.display());
    let opts = RunOptions {
        out: out.clone(),
        backend,
        devices,
        resume,
        quiet: args.quiet,
        stop_after_epochs: None,
        stop: Some(stop_on_signals()?),
        graph: args.graph,
    };
    match dnal_train::run(&cfg, &opts).with_context(|| format!("run {}", cfg.name))? {
        Outcome::Finished(report) => {
            println!("{}", report.markdown());
            println!(
                "Outputs in {}: report.json, report.md, plots (*.svg), pruned/ (burnpack, config, safetensors), pruned.onnx, architecture.json",
                out.display()
            );
        }
        Outcome::Stopped => {
            eprintln!(
                "dnal-train: stopped with a checkpoint of the point reached; continue with\n  cargo xtask train --resume {}",
                out.display()
            );
            return Ok(false);
        }
    }
    Ok(true)
}

fn sweep(args: SweepArgs) -> anyhow::Result<bool> {
    if let Some(dir) = &args.report {
        let table = dnal_train::sweep::write_report(dir)?;
        println!("{}", table.markdown());
        return Ok(true);
    }
    let recipe = args.recipe.clone().expect("clap requires --recipe");
    let backend: BackendKind = args.backend.parse()?;
    if args.emit.is_none() {
        // An emitted script runs elsewhere; the machine writing it needs no device.
        backend.device()?;
    }
    let baselines = args
        .baselines
        .iter()
        .map(|b| dnal_train::sweep::Method::parse(b))
        .collect::<Result<Vec<_>, _>>()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("sweep-{recipe}")));
    let out = if args.emit.is_some() {
        dnal_train::cluster::absolute(&out)?
    } else {
        out
    };
    if let Some(list) = &args.devices {
        backend.parse_devices(list)?;
    }
    let opts = dnal_train::sweep::SweepOptions {
        recipe,
        lambdas: args.lambdas.clone(),
        seeds: args.seeds.clone(),
        baselines,
        jobs: args.jobs,
        out: out.clone(),
        sets: args.set.clone(),
        backend: args.backend.clone(),
        devices: args.devices.clone(),
        trainer: std::env::current_exe().context("cannot find the dnal-train executable")?,
        quiet: args.quiet,
    };
    if let Some(kind) = &args.emit {
        let kind = dnal_train::cluster::Emit::parse(kind)?;
        let gpu_backend = matches!(backend, BackendKind::Cuda | BackendKind::Wgpu);
        let gpus = args.gpus.unwrap_or(usize::from(gpu_backend));
        if gpus == 0 && gpu_backend {
            anyhow::bail!(
                "--gpus 0 with --backend {}: each task needs at least one GPU",
                args.backend
            );
        }
        print!("{}", dnal_train::cluster::emit(&opts, kind, gpus)?);
        return Ok(true);
    }
    if let Some(index) = args.task {
        // The run is a child process that gets the same signal (a terminal's Ctrl-C, a
        // scheduler's signal to the job step) and stops at a checkpoint; this process waits
        // for it and reports how it ended.
        let _stop = stop_on_signals()?;
        let ran = dnal_train::cluster::run_task(&opts, index)?;
        return Ok(ran != dnal_train::sweep::Ran::Stopped);
    }
    let (table, failed) = dnal_train::sweep::run(&opts)?;
    println!("{}", table.markdown());
    println!(
        "Outputs in {}: sweep.md, sweep.json, pareto.svg, one folder per run",
        out.display()
    );
    if !failed.is_empty() {
        anyhow::bail!(
            "{} run(s) failed (the table holds the others):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(true)
}

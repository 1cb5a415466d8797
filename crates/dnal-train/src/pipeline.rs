//! The DNAL pipeline as a sequence of phases over one network type, checkpointed after every
//! epoch, at every phase change and, when asked to stop (a [`StopToken`]: SIGINT or SIGTERM in
//! the binary), after the current step, so that a run stopped at any moment resumes to the
//! same result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::ParamId;
use burn::prelude::*;
use dnal_core::{Architecture, BackendKind, SparsityPenalty};
use dnal_data::HostBatch;
use dnal_kernels::Rate;
use dnal_zoo::Network;

use crate::config::{Mode, TrainConfig};
use crate::data::RunData;
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, latency_ms};
use crate::export::Which;
use crate::phase::{
    Optimizers, Phase, configure, learning_rate, optimizers, phase_epochs, phase_stage, phases,
};
use crate::progress::{EpochLog, PartialEpoch, Progress, paths};
use crate::recalibrate::recalibrate_batch_norm;
use crate::replay::{Recorder, replays};
use crate::replicas::{Replicas, StepOut, StepSpec, device_step};
use crate::report::{self, Report};
use crate::tally::{NonFinite, Tally};

/// What an epoch came to: its end, or a stop part-way.
enum EpochEnd<N> {
    Done(N, EpochLog),
    Stopped(N, PartialEpoch),
}

/// Asks a run to stop: the run finishes its current step, writes a checkpoint of that exact
/// point and returns [`Outcome::Stopped`]. Clones share one flag (the binary sets it from its
/// SIGINT/SIGTERM handler).
#[derive(Clone, Debug, Default)]
pub struct StopToken(Arc<AtomicBool>);

impl StopToken {
    /// A token not yet set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop; returns whether it had been asked already.
    pub fn request(&self) -> bool {
        self.0.swap(true, Ordering::SeqCst)
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Options of one invocation (not part of the recipe).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Output folder.
    pub out: PathBuf,
    /// Backend.
    pub backend: BackendKind,
    /// The backend's devices to train on data-parallel, one replica each (a device may repeat;
    /// `None` is the backend's default device). Empty: one replica on the default device.
    pub devices: Vec<Option<usize>>,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// No progress bars or per-epoch lines on stderr.
    pub quiet: bool,
    /// Stop (as a kill would) after this many epochs in this invocation; for tests.
    pub stop_after_epochs: Option<usize>,
    /// Checked after every step: when set, the run checkpoints where it is and stops.
    pub stop: Option<StopToken>,
    /// Record each epoch's training step as a graph of launches and replay it (cuda and wgpu,
    /// one device; the phases [`crate::replay::replays`] allows): the same run, issued at a
    /// fraction of the host's cost ([`crate::replay`]).
    pub graph: bool,
}

impl RunOptions {
    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(StopToken::requested)
    }
}

/// How an invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The run is complete; here is its report.
    Finished(Box<Report>),
    /// Stopped by `stop_after_epochs` or a [`StopToken`], with a checkpoint of the point
    /// reached; resume with `--resume`.
    Stopped,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| dnal_core::CoreError::io(path)(source).into()
}

/// Everything a run needs besides the recipe.
pub struct Runner<'a, N: Network> {
    cfg: &'a TrainConfig,
    net_config: N::Config,
    data: &'a RunData,
    opts: &'a RunOptions,
    device: Device,
    train_device: Device,
    replicas: Replicas,
}

impl<'a, N: Network> Runner<'a, N> {
    /// A runner for `cfg` on the data, building networks from `net_config`.
    pub fn new(
        cfg: &'a TrainConfig,
        net_config: N::Config,
        data: &'a RunData,
        opts: &'a RunOptions,
    ) -> Result<Self> {
        check_options(opts)?;
        let indices = if opts.devices.is_empty() {
            vec![None]
        } else {
            opts.devices.clone()
        };
        let devices = indices
            .iter()
            .map(|&i| Ok(opts.backend.probe_at(i)?.autodiff()))
            .collect::<Result<Vec<Device>>>()?;
        let train_device = devices[0].clone();
        let device = train_device.clone().inner();
        Ok(Self {
            cfg,
            net_config,
            data,
            opts,
            device,
            train_device,
            replicas: Replicas::new(devices),
        })
    }

    /// The network with its initial weights, drawn from the run's own seeded generator (never
    /// from burn's, which is shared by the whole process).
    ///
    /// With `weights.init`, the file's weights replace them (except what `init_exclude` keeps).
    fn fresh(&self) -> Result<N> {
        let model = N::build(&self.net_config, &self.train_device)?;
        let model = dnal_zoo::init::seeded(model, self.cfg.seed);
        let stage = &self.cfg.weights;
        let Some(path) = &stage.init else {
            return Ok(model);
        };
        let (model, loaded) =
            dnal_zoo::load_pretrained(model, path, &stage.init_key_map()?, &stage.init_exclude)?;
        if !self.opts.quiet {
            eprintln!("weights from {}: {loaded}", path.display());
        }
        Ok(model)
    }

    fn load_model(&self, dir: &Path) -> Result<N> {
        Ok(dnal_zoo::load(dir, |c| N::build(c, &self.train_device))?)
    }

    /// What a run can check before its data set is read: options of this invocation
    /// (`--graph`), and on a new run its output folder, the weights file it starts from and the
    /// architecture the `scratch` mode trains (a resumed run's weights come from its
    /// checkpoint).
    pub fn preflight(cfg: &TrainConfig, net_config: &N::Config, opts: &RunOptions) -> Result<()> {
        check_options(opts)?;
        if opts.resume {
            return Ok(());
        }
        if opts.out.exists() && !opts.out.is_dir() {
            return Err(TrainError::Config {
                origin: "--out".into(),
                message: format!(
                    "{} is a file, not a folder: name a folder for the run's outputs",
                    opts.out.display()
                ),
            });
        }
        if let Some(path) = cfg.weights.init.as_deref() {
            // Built, never drawn (burn's parameters are lazy).
            let model = N::build(net_config, &BackendKind::host_device())?;
            let keys = cfg.weights.init_key_map()?;
            dnal_zoo::check_pretrained(&model, path, &keys, &cfg.weights.init_exclude)?;
        }
        if cfg.mode == Mode::Scratch {
            scratch_architecture::<N>(cfg, net_config)?;
        }
        Ok(())
    }

    /// Runs (or resumes) the whole pipeline.
    pub fn run(&self) -> Result<Outcome> {
        if self.cfg.mode == Mode::Scratch {
            // Before the weight stage, not after it.
            scratch_architecture::<N>(self.cfg, &self.net_config)?;
        }
        let out = &self.opts.out;
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        // The class list: line i is the name of class i (for an image folder, its i-th
        // sub-folder in sorted order).
        let mut classes = self.data.classes.join("\n");
        classes.push('\n');
        dnal_core::io::write_atomic(&out.join(paths::CLASSES), classes.as_bytes())?;
        let phases = phases(self.cfg);
        let ckpt_dir = out.join(paths::CHECKPOINT);
        let (mut progress, mut model, mut saved_optims) = if self.opts.resume {
            let (p, m, o) =
                crate::checkpoint::load::<N>(&ckpt_dir, self.cfg, |d| self.load_model(d))?;
            if let Some(arch) = &p.architecture {
                // Built, never drawn (burn's parameters are lazy): only the gates are read.
                let dense = N::build(&self.net_config, &self.device)?;
                arch.validate()
                    .and_then(|()| arch.check_matches(&dense))
                    .map_err(|e| TrainError::Checkpoint {
                    path: ckpt_dir.join("progress.json"),
                    message: format!(
                        "its architecture does not fit the network: {e}; start the run again without --resume"
                    ),
                })?;
            }
            (p, m, o)
        } else {
            (Progress::default(), None, None)
        };
        let mut epochs_this_call = 0usize;
        while progress.phase_index < phases.len() {
            let phase = phases[progress.phase_index];
            let started = Instant::now();
            if !progress.entered {
                model = Some(self.enter(phase, model.take(), &progress)?);
                progress.entered = true;
                progress.epochs_done = 0;
                saved_optims = None;
                progress.seconds += started.elapsed().as_secs_f64();
                crate::checkpoint::save(&ckpt_dir, self.cfg, &progress, model.as_ref(), None)?;
            }
            let mut net = configure(
                self.cfg,
                phase,
                model.take().expect("entered phase has a model"),
            );
            let mut optims = optimizers(self.cfg, phase);
            if let Some((w, a)) = saved_optims.take() {
                if let (Some(o), Some(rec)) = (optims.weights.take(), w) {
                    optims.weights = Some(o.load_record(rec));
                }
                if let (Some(o), Some(rec)) = (optims.alpha.take(), a) {
                    optims.alpha = Some(o.load_record(rec));
                }
            }
            let mut penalty = if phase.searches() {
                let mut p = SparsityPenalty::new(self.cfg.arch.penalty, Some(&net.cost_model()))?;
                if let Some(l) = progress.lambda {
                    p.set_lambda(l);
                }
                Some(p)
            } else {
                None
            };
            let epochs = phase_epochs(self.cfg, phase);
            while progress.epochs_done < epochs {
                if self
                    .opts
                    .stop_after_epochs
                    .is_some_and(|n| epochs_this_call >= n)
                    || self.opts.stop_requested()
                {
                    // The last checkpoint is this very point.
                    return Ok(Outcome::Stopped);
                }
                let epoch = progress.epochs_done;
                let t0 = Instant::now();
                let resumed = progress.partial.take();
                if phase == Phase::Arch && self.cfg.arch.momentum_restart && resumed.is_none() {
                    // A new epoch of the architecture stage starts with fresh optimisers.
                    optims = optimizers(self.cfg, phase);
                }
                let before = resumed.as_ref().map_or(0.0, |p| p.seconds);
                let end = self.epoch(
                    phase,
                    epoch,
                    net,
                    &mut optims,
                    penalty.as_mut(),
                    &ckpt_dir,
                    resumed,
                )?;
                let (next, mut log) = match end {
                    EpochEnd::Done(next, log) => (next, log),
                    EpochEnd::Stopped(next, mut partial) => {
                        partial.seconds = before + t0.elapsed().as_secs_f64();
                        progress.seconds += t0.elapsed().as_secs_f64();
                        progress.partial = Some(partial);
                        crate::checkpoint::save(
                            &ckpt_dir,
                            self.cfg,
                            &progress,
                            Some(&next),
                            Some(optims.records()),
                        )?;
                        return Ok(Outcome::Stopped);
                    }
                };
                net = next;
                log.seconds = before + t0.elapsed().as_secs_f64();
                if let Some(p) = penalty.as_ref() {
                    progress.lambda = Some(p.lambda());
                }
                if !self.opts.quiet {
                    eprintln!("{}", report::epoch_line(&log));
                }
                progress.history.push(log);
                progress.epochs_done += 1;
                progress.seconds += t0.elapsed().as_secs_f64();
                crate::checkpoint::save(
                    &ckpt_dir,
                    self.cfg,
                    &progress,
                    Some(&net),
                    Some(optims.records()),
                )?;
                report::write_metrics(&out.join(paths::METRICS), &progress.history)?;
                epochs_this_call += 1;
            }
            let t1 = Instant::now();
            let next = self.leave(phase, net, &mut progress)?;
            progress.phase_index += 1;
            progress.entered = false;
            progress.epochs_done = 0;
            progress.seconds += t1.elapsed().as_secs_f64();
            crate::checkpoint::save(&ckpt_dir, self.cfg, &progress, Some(&next), None)?;
            model = Some(next);
        }
        let report = self.finish(&progress)?;
        Ok(Outcome::Finished(Box::new(report)))
    }

    /// The one-off step when a phase begins.
    fn enter(&self, phase: Phase, previous: Option<N>, progress: &Progress) -> Result<N> {
        let _ = progress;
        Ok(match phase {
            Phase::Weights => self.fresh()?,
            Phase::Joint => self.fresh()?.with_alpha(0.0),
            Phase::Arch => previous
                .expect("the weight stage comes first")
                .with_alpha(0.0),
            Phase::Final => previous.expect("derivation comes first"),
            Phase::BaselineExtend => self.load_model(&self.opts.out.join(paths::DENSE))?,
        })
    }

    /// The one-off step when a phase ends: evaluation, derivation and pruning, exports.
    fn leave(&self, phase: Phase, net: N, progress: &mut Progress) -> Result<N> {
        let out = &self.opts.out;
        match phase {
            Phase::Weights => {
                let acc = evaluate(&net, &self.data.test, &self.device)?;
                progress.dense = Some((acc, net.cost_model().cost(None)));
                dnal_zoo::save(&net, &out.join(paths::DENSE))?;
                let target = self.cfg.compare.target_macs.unwrap_or(0);
                match self.cfg.mode {
                    Mode::Magnitude => {
                        let arch = dnal_zoo::compare::magnitude_architecture(&net, target)?;
                        let pruned = net.clone().prune(&arch)?;
                        self.adopt(&net, arch, pruned, progress)
                    }
                    Mode::Uniform | Mode::Scratch => {
                        let arch = if self.cfg.mode == Mode::Scratch {
                            scratch_architecture::<N>(self.cfg, &self.net_config)?
                        } else {
                            dnal_zoo::compare::uniform_architecture(&net, target)?
                        };
                        // Built at its own widths and initialised afresh: trained from scratch.
                        let config = net.clone().prune(&arch)?.config().clone();
                        let thin = N::build(&config, &self.train_device)?;
                        let thin = dnal_zoo::init::seeded(thin, self.cfg.seed);
                        self.adopt(&net, arch, thin, progress)
                    }
                    _ => Ok(net),
                }
            }
            Phase::Arch | Phase::Joint => {
                let mut arch = net.derive(self.cfg.arch.threshold)?;
                if self.cfg.arch.round_to > 1 {
                    let states = net.gate_states();
                    let added = arch.round_widths(
                        states.iter().map(|(n, s)| (n.as_str(), s)),
                        self.cfg.arch.round_to,
                    )?;
                    progress.rounding_added = Some(added);
                }
                let pruned = net.clone().prune(&arch)?;
                self.adopt(&net, arch, pruned, progress)
            }
            Phase::Final => {
                let acc = evaluate(&net, &self.data.test, &self.device)?;
                progress.pruned = Some((acc, net.cost_model().cost(None)));
                dnal_zoo::save(&net, &out.join(paths::PRUNED))?;
                dnal_zoo::save_safetensors(&net, &out.join(paths::PRUNED))?;
                // The weights are saved: an export that fails loses nothing, and
                // `dnal-train export` can write it again.
                if let Err(e) = crate::export::write(&net, out, self.cfg, Which::Pruned) {
                    eprintln!("warning: pruned.onnx not written: {e}");
                }
                Ok(net)
            }
            Phase::BaselineExtend => {
                progress.baseline_extended = Some(evaluate(&net, &self.data.test, &self.device)?);
                dnal_zoo::save(&net, &out.join(paths::BASELINE))?;
                Ok(net)
            }
        }
    }

    /// Records `arch`, chosen on `source`, with what the report needs of it, and readies
    /// `pruned` (the network of that architecture) for the final stage.
    fn adopt(
        &self,
        source: &N,
        arch: Architecture,
        pruned: N,
        progress: &mut Progress,
    ) -> Result<N> {
        arch.save(self.opts.out.join(paths::ARCHITECTURE))?;
        progress.final_alpha = source
            .gate_states()
            .into_iter()
            .flat_map(|(_, s)| s.alpha)
            .collect();
        progress.gate_order = source.gate_names();
        progress.released_macs = source
            .released_cost_model()
            .map(|c| c.cost(Some(&arch)).macs);
        progress.architecture = Some(arch);
        let mut pruned = configure(self.cfg, Phase::Final, pruned);
        let batches = self.cfg.arch.bn_recalibration_batches;
        progress.derived_before_recalibration = None;
        if batches > 0 && !self.cfg.mode.trains_from_scratch() {
            progress.derived_before_recalibration =
                Some(evaluate(&pruned, &self.data.test, &self.device)?);
            let stream = self.recalibration_batches(batches);
            pruned = recalibrate_batch_norm(pruned, stream, &self.train_device)?;
            pruned = configure(self.cfg, Phase::Final, pruned);
        }
        progress.derived = Some(evaluate(&pruned, &self.data.test, &self.device)?);
        Ok(pruned)
    }

    /// `n` training batches from a data stream no phase reads: the final stage sees the same
    /// batches whether or not BatchNorm is recalibrated.
    fn recalibration_batches(&self, n: usize) -> impl Iterator<Item = Result<HostBatch>> + '_ {
        let loader = &self.data.train;
        (0u64..)
            .flat_map(move |epoch| loader.epoch((RECALIBRATION_STREAM << 32) | epoch))
            .take(n)
            .map(|b| b.map_err(TrainError::from))
    }

    #[allow(clippy::too_many_arguments)]
    fn epoch(
        &self,
        phase: Phase,
        epoch: usize,
        mut net: N,
        optims: &mut Optimizers,
        mut penalty: Option<&mut SparsityPenalty>,
        ckpt_dir: &Path,
        resumed: Option<PartialEpoch>,
    ) -> Result<EpochEnd<N>> {
        let cfg = self.cfg;
        let loader = &self.data.train;
        let iters = loader.len();
        let stage = &phase_stage(cfg, phase);
        let epochs = phase_epochs(cfg, phase);
        let alpha_ids: Vec<ParamId> = net.alpha_ids();
        let bar = report::progress_bar(
            self.opts.quiet,
            iters as u64,
            &format!("{} {}/{}", phase.name(), epoch + 1, epochs),
        );
        let start = resumed.unwrap_or_default();
        if start.batches_done > iters {
            return Err(TrainError::Checkpoint {
                path: ckpt_dir.to_path_buf(),
                message: format!(
                    "the stopped epoch had {} batches done, but an epoch has {iters}: the data changed since the run was stopped; resume with the same data",
                    start.batches_done
                ),
            });
        }
        bar.inc(start.batches_done as u64);
        let mut tally = Tally::resume(&start);
        let diverged = |e: NonFinite| {
            bar.abandon();
            TrainError::NonFinite {
                stage: phase.name().into(),
                epoch,
                iteration: e.iteration,
                value: e.value,
                checkpoint: ckpt_dir.to_path_buf(),
            }
        };
        let (mut lr, mut beta) = (start.lr, start.beta);
        // Each phase has its own stream of epochs for the data order and augmentation.
        let data_epoch = (progress_key(phase) << 32) | epoch as u64;
        let batches = loader.epoch_from(data_epoch, start.batches_done);
        let mut recorder = (self.opts.graph && replays(cfg, phase, optims))
            .then(|| Recorder::new(self.replicas.main()));
        let spec = StepSpec::of(phase, &net, penalty.as_deref(), &alpha_ids);
        // The optimisers' steps after a batch, and the batch's figures for the tally.
        let mut update =
            |net: N, out: StepOut, rate: Rate| out.apply(net, &spec, optims, cfg.arch.lr, rate);
        // The temperature last set in the gates: set again only when it changes (every
        // iteration or once an epoch, as the continuation says).
        let mut temperature = None;
        for (iter, batch) in (start.batches_done..).zip(batches) {
            let batch = batch?;
            if phase.searches() {
                let b = cfg.arch.continuation.beta(epoch, epochs, iter, iters);
                if temperature != Some(b) {
                    net = net.with_temperature(b);
                    temperature = Some(b);
                }
                beta = Some(b);
            }
            lr = match phase {
                Phase::Arch => cfg.arch.lr,
                _ => learning_rate(stage, epoch, iter, iters),
            };
            let (next, n, figures) = match recorder.as_mut() {
                Some(recorder) => {
                    let mut step = |net: N, images, labels, rate| {
                        let out = device_step(&net, images, labels, &spec, None);
                        update(net, out, rate)
                    };
                    let n = batch.len();
                    let (net, figures) = recorder.step(net, batch, lr, &mut step)?;
                    (net, n, figures)
                }
                None => {
                    let out = self.replicas.step(&mut net, batch, &spec);
                    let n = out.n;
                    let (net, figures) = update(net, out, lr.into());
                    (net, n, figures)
                }
            };
            net = next;
            tally.push(iter, n, figures.loss, figures.penalty, figures.hits);
            bar.inc(1);
            let stop = self.opts.stop_requested();
            if tally.due() || stop {
                tally.read_back().map_err(diverged)?;
                bar.set_message(format!(
                    "loss {:.4}",
                    tally.loss_sum / tally.seen.max(1) as f64
                ));
            }
            if stop {
                bar.abandon();
                let partial = PartialEpoch {
                    batches_done: iter + 1,
                    loss_sum: tally.loss_sum,
                    pen_sum: tally.pen_sum,
                    correct: tally.correct,
                    seen: tally.seen,
                    lr,
                    beta,
                    seconds: 0.0,
                };
                return Ok(EpochEnd::Stopped(net, partial));
            }
        }
        // The recording ends with the epoch's steps: what follows reads the network freely.
        drop(recorder);
        tally.read_back().map_err(diverged)?;
        bar.finish_and_clear();
        let Tally {
            loss_sum,
            pen_sum,
            correct,
            seen,
            ..
        } = tally;
        let full_macs = net.cost_model().cost(None).macs;
        // The architecture derived now: its MACs move lambda in the adaptive-target mode and go
        // into the log. Derived and priced once per epoch.
        let (open_gates, open_by_layer, macs) = if phase.searches() {
            let arch = net.derive(cfg.arch.threshold)?;
            let macs = net.arch_cost(&arch)?.macs;
            if let Some(p) = penalty.as_deref_mut() {
                p.adapt(macs as f64 / full_macs.max(1) as f64);
            }
            let by_layer: BTreeMap<String, usize> = arch
                .gates
                .iter()
                .map(|(n, g)| (n.clone(), g.kept.len()))
                .collect();
            (arch.kept_channels(), by_layer, macs)
        } else {
            (net.gated_channels(), BTreeMap::new(), full_macs)
        };
        let test = evaluate(&net, &self.data.test, &self.device)?;
        let log = EpochLog {
            stage: phase.name().into(),
            epoch,
            lr,
            beta,
            loss: loss_sum / seen.max(1) as f64,
            penalty: pen_sum / seen.max(1) as f64,
            lambda: penalty.map_or(cfg.arch.penalty.lambda, |p| p.lambda()),
            train_top1: 100.0 * correct as f64 / seen.max(1) as f64,
            test_top1: test.top1,
            test_loss: test.loss,
            open_gates,
            open_by_layer,
            macs,
            seconds: 0.0,
        };
        Ok(EpochEnd::Done(net, log))
    }

    /// Evaluates, times and exports at the end of the run.
    fn finish(&self, progress: &Progress) -> Result<Report> {
        let out = &self.opts.out;
        let dense = self.load_model(&out.join(paths::DENSE))?;
        let pruned = match progress.pruned {
            Some(_) => Some(self.load_model(&out.join(paths::PRUNED))?),
            None => None,
        };
        let input = [
            self.cfg.report.latency_batch,
            self.data.channels,
            self.data.image_size,
            self.data.image_size,
        ];
        let runs = self.cfg.report.latency_runs;
        let dense_ms = latency_ms(
            &configure(self.cfg, Phase::Weights, dense),
            input,
            runs,
            &self.device,
        )?;
        let pruned_ms = pruned
            .clone()
            .map(|p| {
                latency_ms(
                    &configure(self.cfg, Phase::Final, p),
                    input,
                    runs,
                    &self.device,
                )
            })
            .transpose()?;
        let mut report = Report::new(self.cfg, progress, dense_ms, pruned_ms, self.opts.backend)?;
        report.structure = pruned.as_ref().and_then(|p| p.describe());
        report.structure_grid = pruned.as_ref().and_then(|p| p.structure_grid());
        report.write(out, progress)?;
        Ok(report)
    }
}

/// The data stream of BatchNorm recalibration, beside the phases' (see [`progress_key`]).
const RECALIBRATION_STREAM: u64 = 6;

fn progress_key(phase: Phase) -> u64 {
    match phase {
        Phase::Weights => 1,
        Phase::Joint => 2,
        Phase::Arch => 3,
        Phase::Final => 4,
        Phase::BaselineExtend => 5,
    }
}

/// The architecture the `scratch` mode trains (`compare.architecture`), read and checked
/// against the network.
fn scratch_architecture<N: Network>(
    cfg: &TrainConfig,
    net_config: &N::Config,
) -> Result<Architecture> {
    let path = cfg.compare.architecture.as_deref().unwrap_or(Path::new(""));
    let wrong = |message: String| TrainError::Config {
        origin: "compare.architecture".into(),
        message: format!("{message}; give the architecture.json of a finished run of this network"),
    };
    let arch = Architecture::load(path).map_err(|e| wrong(e.to_string()))?;
    // Built, never drawn (burn's parameters are lazy): only the gates are read.
    let dense = N::build(net_config, &BackendKind::host_device())?;
    arch.check_matches(&dense)
        .map_err(|e| wrong(format!("{} does not fit the network: {e}", path.display())))?;
    Ok(arch)
}

/// The options of an invocation that do not fit each other.
fn check_options(opts: &RunOptions) -> Result<()> {
    if opts.graph && !matches!(opts.backend, BackendKind::Cuda | BackendKind::Wgpu) {
        return Err(dnal_core::CoreError::invalid(
            "--graph",
            format!(
                "{} records no graphs of launches; use --backend cuda or wgpu, or train without --graph",
                opts.backend.name()
            ),
        )
        .into());
    }
    if opts.graph && opts.devices.len() > 1 {
        return Err(dnal_core::CoreError::invalid(
            "--graph",
            "a recorded step trains on one device; give one device or train without --graph",
        )
        .into());
    }
    Ok(())
}

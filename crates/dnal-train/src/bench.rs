//! `dnal-train bench`: the time of one training step of a registered network on a backend,
//! with no data set: what the weight stage does per batch (forward, cross-entropy, backward,
//! an SGD step with momentum and weight decay), on random images, with the gates bypassed (the
//! weight stage) or searching (the architecture stage's forward and backward, all weights
//! updated, with the paper's sparsity penalty if given a lambda); or, given an architecture (a
//! run's `architecture.json`), of the network pruned to it, as the final stage trains it.
//! Prints the median and the fastest of the timed steps.

use std::time::Instant;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use dnal_core::{Architecture, BackendKind, GateMode, PenaltyConfig, SparsityPenalty};
use dnal_zoo::Network;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::registry::{ImageShape, ModelName, WithNetwork};
use crate::threads::{Snapshot, ThreadBusy};

/// What to time.
#[derive(Clone, Debug)]
pub struct StepBench {
    /// The network.
    pub model: ModelName,
    /// Images, channels, side and classes.
    pub batch: usize,
    /// Image shape.
    pub shape: ImageShape,
    /// Untimed steps first (kernel compilation and autotuning on a GPU).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Gates bypassed (the weight stage) or searching.
    pub search: bool,
    /// With `search`: the paper's sparsity penalty at this lambda added to the loss, as the
    /// architecture stage adds it.
    pub penalty: Option<f64>,
    /// The backend.
    pub backend: BackendKind,
    /// dnal's own operations off (`dnal_kernels::set_enabled(false)`, for the whole process):
    /// every unit runs on burn's operations, for comparison.
    pub burn_ops: bool,
    /// burn's `Sgd` instead of dnal's (`crate::sgd`), for comparison: seven tensor operations
    /// per parameter and step where dnal's issues one.
    pub burn_sgd: bool,
    /// How dnal's CubeCL reductions finish (`dnal_kernels::set_reduction_finish`, for the
    /// whole process): `Auto` as in training, the others for comparison.
    pub reduction_finish: dnal_kernels::Finish,
    /// The step recorded once as a graph of launches and replayed (see [`burn::tensor::capture`]).
    pub graph: bool,
    /// The network pruned to an architecture (gates bypassed, as in the final stage) instead
    /// of the dense one.
    pub pruned: Option<Pruned>,
}

/// An architecture to prune the timed network to, and the name its rows carry (e.g. the
/// file's stem).
#[derive(Clone, Debug)]
pub struct Pruned {
    /// The name in [`StepTimes::architecture`].
    pub name: String,
    /// The channels kept.
    pub architecture: Architecture,
}

/// Timings of [`bench_step`].
#[derive(Clone, Debug, Serialize)]
pub struct StepTimes {
    /// The network (its registry name).
    pub model: String,
    /// The backend, followed by ` (burn ops)` when dnal's own operations were off, by
    /// ` (burn sgd)` with burn's optimiser, and by ` (folded finish)` or ` (separate finish)`
    /// where the reductions' finish was set.
    pub backend: String,
    /// Batch size.
    pub batch: usize,
    /// Image side.
    pub size: usize,
    /// `bypass` or `search`.
    pub gates: String,
    /// The sparsity penalty's lambda, where the step added it.
    pub penalty: Option<f64>,
    /// The name of the architecture the network was pruned to; `None` for the dense network.
    pub architecture: Option<String>,
    /// Multiply-accumulates of one image's forward through the timed network at the timed
    /// image size (dnal-zoo's cost model).
    pub macs: u64,
    /// Median step, milliseconds.
    pub median_ms: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
    /// Median time the calling thread took to issue a step (forward, backward and update
    /// handed to the backend, before waiting for the device), milliseconds. On burn's GPU
    /// backends a full task channel stalls the caller, so a value close to `median_ms` says the
    /// step was held up after the caller (fusion, CubeCL's device server or the device), and
    /// `threads` tells which.
    pub issue_ms: f64,
    /// The threads of this process that were on a CPU at least 1 % of the timed steps' wall
    /// time, busiest first (Linux only; empty elsewhere).
    pub threads: Vec<ThreadBusy>,
    /// Timed steps.
    pub steps: usize,
    /// Seconds from building the network to the end of the untimed steps: on a GPU, mostly
    /// compiling kernels and autotuning (less where a persistence build finds them on disk).
    pub warmup_s: f64,
}

/// Times `bench`'s training step.
pub fn bench_step(bench: &StepBench) -> Result<StepTimes> {
    let s = bench.shape;
    if [bench.steps, bench.batch, s.size, s.classes].contains(&0) {
        return Err(TrainError::from(dnal_core::CoreError::invalid(
            "bench",
            "--steps, --batch, --size and --classes must be at least 1",
        )));
    }
    match bench.penalty {
        Some(_) if !bench.search => {
            return Err(TrainError::from(dnal_core::CoreError::invalid(
                "bench",
                "--penalty adds the sparsity penalty of searching gates; give --search with it",
            )));
        }
        Some(lambda) => PenaltyConfig::paper(lambda).validate().map_err(|e| {
            dnal_core::CoreError::invalid("--penalty", format!("{e} (the paper's: 1e-5 to 5e-4)"))
        })?,
        None => {}
    }
    if bench.search && bench.pruned.is_some() {
        return Err(TrainError::from(dnal_core::CoreError::invalid(
            "bench",
            "--search times the gated network's architecture stage, --architecture a pruned \
             network (which has no gates left to search); give one of them",
        )));
    }
    let device = bench.backend.probe()?;
    if bench.burn_ops {
        dnal_kernels::set_enabled(false);
    }
    dnal_kernels::set_reduction_finish(bench.reduction_finish);
    let (steps, threads, warmup_s, macs) = bench.model.with(bench.shape, Timed(bench, device))?;
    let (ms, issue): (Vec<f64>, Vec<f64>) = steps.into_iter().unzip();
    let sorted_of = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted
    };
    let sorted = sorted_of(&ms);
    Ok(StepTimes {
        model: bench.model.name(),
        backend: format!(
            "{}{}{}{}{}",
            bench.backend.name(),
            if bench.burn_ops { " (burn ops)" } else { "" },
            if bench.burn_sgd { " (burn sgd)" } else { "" },
            match bench.reduction_finish {
                dnal_kernels::Finish::Auto => "",
                dnal_kernels::Finish::Folded => " (folded finish)",
                dnal_kernels::Finish::Separate => " (separate finish)",
            },
            if bench.graph { " (graph)" } else { "" },
        ),
        batch: bench.batch,
        size: bench.shape.size,
        gates: if bench.search { "search" } else { "bypass" }.into(),
        penalty: bench.penalty,
        architecture: bench.pruned.as_ref().map(|p| p.name.clone()),
        macs,
        median_ms: sorted[sorted.len() / 2],
        min_ms: sorted[0],
        issue_ms: sorted_of(&issue)[issue.len() / 2],
        threads,
        steps: sorted.len(),
        warmup_s,
    })
}

struct Timed<'a>(&'a StepBench, Device);

impl WithNetwork for Timed<'_> {
    /// Per timed step, the whole step and the part spent issuing it (milliseconds); how busy
    /// each thread was over the timed steps; the seconds until the timed steps began; and the
    /// timed network's MACs per image.
    type Output = (Vec<(f64, f64)>, Vec<ThreadBusy>, f64, u64);

    fn run<N: Network>(self, config: N::Config) -> Result<Self::Output> {
        let Timed(b, device) = self;
        let start = Instant::now();
        let device = device.autodiff();
        let mut net = dnal_zoo::init::seeded(N::build(&config, &device)?, 0);
        if let Some(Pruned {
            architecture: arch, ..
        }) = &b.pruned
        {
            arch.check_matches(&net).map_err(|e| {
                dnal_core::CoreError::invalid(
                    "--architecture",
                    format!(
                        "it does not fit {}: {e}; give the architecture.json of a run of this network",
                        b.model.name()
                    ),
                )
            })?;
            net = net.prune(arch)?;
        }
        let macs = net.cost_model().cost(None).macs;
        let penalty = b
            .penalty
            .map(|lambda| SparsityPenalty::new(PenaltyConfig::paper(lambda), None))
            .transpose()?;
        if b.search {
            net = net.with_gate_mode(GateMode::Search).with_temperature(100.0);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let s = b.shape;
        let pixels: Vec<f32> = (0..b.batch * s.channels * s.size * s.size)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let labels: Vec<i64> = (0..b.batch)
            .map(|_| rng.random_range(0..s.classes as i64))
            .collect();
        let x = Tensor::<4>::from_data(
            TensorData::new(pixels, [b.batch, s.channels, s.size, s.size]),
            &device,
        );
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [b.batch]), &device);
        // The paper's CIFAR weight stage: momentum 0.9 (dampening 0), weight decay 5e-4.
        // dnal's SGD holds convolution weights channel-last on cuda and wgpu; from the start,
        // so that the warm-up tunes each convolution once.
        if !b.burn_sgd {
            net = crate::sgd::lay_out(net);
        }
        let sgd = if b.burn_sgd {
            crate::phase::Optim::Burn(
                SgdConfig::new()
                    .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
                    .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
                    .init(),
            )
        } else {
            crate::phase::sgd(0.9, 5e-4)
        };
        let mut times = Vec::with_capacity(b.steps);
        let mut first = None;
        let mut warmup_s = 0.0;
        let sync = || {
            device
                .sync()
                .map_err(|e| dnal_core::CoreError::Backend(format!("the device failed: {e:?}")))
        };
        let folded = penalty
            .as_ref()
            .is_some_and(|p| crate::penalty::folds(p, &net));
        let leaves = b.search && crate::leaves::fold(&net);
        let mut state = Some((net, sgd));
        // One training step of the network and optimiser in `state`, the loss and the correct
        // predictions computed as in training: its loss.
        let mut step = || {
            let (net, mut sgd) = state.take().expect("the step always puts its state back");
            let installed = leaves.then(|| crate::leaves::install(&net));
            let logits = match &installed {
                Some((step, _)) => step.forward(x.clone()),
                None => net.forward(x.clone()),
            };
            let (mut loss, _hits) = dnal_kernels::cross_entropy(logits, y.clone());
            let unfolded = penalty.as_ref().filter(|_| !folded);
            if let Some(p) = unfolded {
                loss = loss + p.loss(&net);
            }
            let mut backward = loss.backward();
            let carried = installed.map(|(_, leaves)| leaves.alpha_gradients(&mut backward));
            let mut grads = GradientsParams::from_grads(backward, &net);
            if let Some(carried) = carried {
                carried.add_to(&mut grads);
            }
            if let (true, Some(p)) = (folded, &penalty) {
                loss = loss.detach() + crate::penalty::add_gradients(p, &net, &mut grads);
            }
            state = Some((sgd.step(0.01, net, grads), sgd));
            loss
        };
        if b.graph {
            for _ in 0..b.warmup {
                let loss = step();
                sync()?;
                drop(loss);
            }
            // Recorded on the device under autodiff, whose backend records no graph itself.
            let mut graph = burn::tensor::capture(&device.clone().inner(), step);
            if !graph.is_hardware() {
                return Err(TrainError::from(dnal_core::CoreError::Backend(format!(
                    "{} recorded no graph of the step; --graph needs cuda or wgpu",
                    b.backend.name()
                ))));
            }
            first = Some(Snapshot::take());
            warmup_s = start.elapsed().as_secs_f64();
            for _ in 0..b.steps {
                let t = Instant::now();
                // SAFETY: the recorded launches read and write the images and labels (alive
                // until the end of this function) and the network and optimiser in `state`,
                // which only the graph's step reaches; nothing else runs on the device meanwhile.
                #[allow(unsafe_code)]
                unsafe {
                    graph.replay();
                }
                let issued = t.elapsed();
                sync()?;
                times.push((t.elapsed().as_secs_f64() * 1e3, issued.as_secs_f64() * 1e3));
            }
        } else {
            for i in 0..b.warmup + b.steps {
                if i == b.warmup {
                    first = Some(Snapshot::take());
                    warmup_s = start.elapsed().as_secs_f64();
                }
                let t = Instant::now();
                let loss = step();
                let issued = t.elapsed();
                sync()?;
                drop(loss);
                if i >= b.warmup {
                    times.push((t.elapsed().as_secs_f64() * 1e3, issued.as_secs_f64() * 1e3));
                }
            }
        }
        let threads = match first {
            Some(first) => Snapshot::take().busy_since(&first),
            None => Vec::new(),
        };
        Ok((times, threads, warmup_s, macs))
    }
}

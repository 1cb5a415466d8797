//! The phases of a run and their rules: which phases a mode runs, their epochs and learning
//! rates, which parameters each trains (gate modes, frozen groups) and its optimisers.

use burn::module::{Module, ParamGroup};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use dnal_core::GateMode;
use dnal_kernels::Rate;
use dnal_zoo::Network;
use serde::{Deserialize, Serialize};

use crate::config::{ArchOptimizer, Baseline, LrSchedule, Mode, StageConfig, TrainConfig};

/// One phase of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Dense weights from scratch, gates in bypass (also the dense baseline of a joint run).
    Weights,
    /// Weights and alpha together from scratch (beyond the paper).
    Joint,
    /// Alpha only (and the classifier, if configured), weights frozen, beta rising.
    Arch,
    /// The pruned network trained from its inherited weights.
    Final,
    /// The dense weight-stage network trained on for the final stage's epochs.
    BaselineExtend,
}

impl Phase {
    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Weights => "weights",
            Phase::Joint => "joint",
            Phase::Arch => "arch",
            Phase::Final => "final",
            Phase::BaselineExtend => "baseline",
        }
    }

    pub(crate) fn searches(self) -> bool {
        matches!(self, Phase::Arch | Phase::Joint)
    }
}

/// The phases of a run, in order.
pub fn phases(cfg: &TrainConfig) -> Vec<Phase> {
    let extend = cfg.baseline == Baseline::Extended;
    let mut v = match cfg.mode {
        Mode::Dense => return vec![Phase::Weights],
        Mode::Decoupled => vec![Phase::Weights, Phase::Arch, Phase::Final],
        Mode::Joint => vec![Phase::Joint, Phase::Final, Phase::Weights],
        // The comparison methods choose their architecture when the weight stage ends.
        Mode::Magnitude | Mode::Uniform | Mode::Scratch => vec![Phase::Weights, Phase::Final],
    };
    if extend {
        v.push(Phase::BaselineExtend);
    }
    v
}

/// Epochs of `phase` in `cfg`.
pub fn phase_epochs(cfg: &TrainConfig, phase: Phase) -> usize {
    match phase {
        Phase::Weights | Phase::Joint => cfg.weights.epochs,
        Phase::Arch => cfg.arch.epochs,
        Phase::Final => match cfg.mode {
            // As many epochs after the weight stage as DNAL's architecture and final stages.
            Mode::Magnitude => cfg.arch.epochs + cfg.final_stage.epochs,
            // From scratch: as many epochs as the whole DNAL run.
            m if m.trains_from_scratch() => {
                cfg.weights.epochs + cfg.arch.epochs + cfg.final_stage.epochs
            }
            _ => cfg.final_stage.epochs,
        },
        Phase::BaselineExtend => cfg.final_stage.epochs,
    }
}

/// The stage settings `phase` trains with, its epochs being the phase's.
pub(crate) fn phase_stage(cfg: &TrainConfig, phase: Phase) -> StageConfig {
    let from_scratch = phase == Phase::Final && cfg.mode.trains_from_scratch();
    let mut stage = match phase {
        Phase::Weights | Phase::Joint | Phase::Arch => cfg.weights.clone(),
        Phase::Final if from_scratch => cfg.weights.clone(),
        Phase::Final | Phase::BaselineExtend => cfg.final_stage.clone(),
    };
    let epochs = phase_epochs(cfg, phase);
    if let LrSchedule::Cosine {
        span: Some(span), ..
    } = &mut stage.schedule
    {
        // Stretched with the stage (the uniform baseline's from-scratch run is longer).
        *span = (*span * epochs).div_ceil(stage.epochs.max(1)).max(epochs);
    }
    stage.epochs = epochs;
    stage
}

/// Learning rate at iteration `iter` of epoch `epoch` of a stage.
pub fn learning_rate(stage: &StageConfig, epoch: usize, iter: usize, iters: usize) -> f64 {
    match &stage.schedule {
        LrSchedule::Constant => stage.lr,
        LrSchedule::Cosine { min_lr, span } => {
            let total = (span.unwrap_or(stage.epochs) * iters).max(1) as f64;
            let t = (epoch * iters + iter) as f64 / total;
            min_lr + (stage.lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
        LrSchedule::Step { milestones, gamma } => {
            let drops = milestones.iter().filter(|&&m| m <= epoch).count();
            stage.lr * gamma.powi(drops as i32)
        }
    }
}

/// The optimiser states of the weights and of alpha, as a checkpoint keeps them.
pub type OptimRecords = (Option<OptimizerRecord>, Option<OptimizerRecord>);

pub(crate) struct Optimizers {
    pub(crate) weights: Option<Optim>,
    pub(crate) alpha: Option<Optim>,
}

impl Optimizers {
    /// The steps after a batch: alpha's with its gradients `alpha` at the architecture stage's
    /// rate `arch_lr`, then, where the phase trains weights, theirs with `rest` at `rate`.
    pub(crate) fn step<N: Network>(
        &mut self,
        arch_lr: f64,
        rate: Rate,
        net: N,
        alpha: Option<GradientsParams>,
        rest: GradientsParams,
    ) -> N {
        let mut net = net;
        if let Some(g) = alpha {
            let o = self
                .alpha
                .as_mut()
                .expect("an alpha optimiser in a searching phase");
            net = o.step(arch_lr, net, g);
        }
        match self.weights.as_mut() {
            Some(o) => o.step(rate, net, rest),
            None => net,
        }
    }

    /// Whether every optimiser of the phase is dnal's SGD with momentum, which writes its
    /// parameters and velocities in place and can take its rate from a tensor: what a recorded
    /// step needs.
    pub(crate) fn in_place(&self) -> bool {
        [&self.weights, &self.alpha]
            .into_iter()
            .flatten()
            .all(|o| matches!(o, Optim::Sgd(sgd) if sgd.writes_in_place()))
    }

    /// The optimiser states, for a checkpoint.
    pub(crate) fn records(&self) -> OptimRecords {
        (
            self.weights.as_ref().map(|o| o.to_record()),
            self.alpha.as_ref().map(|o| o.to_record()),
        )
    }
}

/// An optimiser: dnal's SGD ([`crate::sgd::Sgd`], every parameter in one step) or one of
/// burn's (Adam for alpha; burn's own SGD for `dnal-train bench --burn-sgd`).
pub(crate) enum Optim {
    Sgd(crate::sgd::Sgd),
    Burn(ModuleOptimizer),
}

impl Optim {
    /// One step with learning rate `lr` and the gradients `grads`. Only dnal's SGD takes a
    /// rate held in a tensor (a recorded step's; [`Optimizers::in_place`]).
    pub(crate) fn step<M: Module>(
        &mut self,
        lr: impl Into<Rate>,
        module: M,
        grads: GradientsParams,
    ) -> M {
        match (self, lr.into()) {
            (Optim::Sgd(o), lr) => o.step(lr, module, grads),
            (Optim::Burn(o), Rate::Value(lr)) => o.step(lr, module, grads),
            (Optim::Burn(_), Rate::Held(_)) => {
                unreachable!("a recorded step runs dnal's SGD only (Optimizers::in_place)")
            }
        }
    }

    /// The state, as burn's `ModuleOptimizer` records it.
    pub(crate) fn to_record(&self) -> OptimizerRecord {
        match self {
            Optim::Sgd(o) => o.to_record(),
            Optim::Burn(o) => o.to_record(),
        }
    }

    /// The optimiser with the state of `record`.
    pub(crate) fn load_record(self, record: OptimizerRecord) -> Self {
        match self {
            Optim::Sgd(o) => Optim::Sgd(o.load_record(record)),
            Optim::Burn(o) => Optim::Burn(o.load_record(record)),
        }
    }
}

/// SGD with `momentum` and `weight_decay` (0 turns either off): [`crate::sgd::Sgd`], burn's
/// update for all parameters in one step.
pub(crate) fn sgd(momentum: f64, weight_decay: f64) -> Optim {
    Optim::Sgd(crate::sgd::Sgd::new(momentum, weight_decay))
}

pub(crate) fn optimizers(cfg: &TrainConfig, phase: Phase) -> Optimizers {
    let stage = &phase_stage(cfg, phase);
    let alpha = || match cfg.arch.optimizer {
        ArchOptimizer::Sgd => sgd(cfg.arch.momentum, 0.0),
        ArchOptimizer::Adam => Optim::Burn(AdamConfig::new().with_epsilon(1e-8).init()),
    };
    match phase {
        Phase::Arch => Optimizers {
            weights: cfg
                .arch
                .train_classifier
                .then(|| sgd(stage.momentum, cfg.arch.classifier_weight_decay)),
            alpha: Some(alpha()),
        },
        Phase::Joint => Optimizers {
            weights: Some(sgd(stage.momentum, stage.weight_decay)),
            alpha: Some(alpha()),
        },
        _ => Optimizers {
            weights: Some(sgd(stage.momentum, stage.weight_decay)),
            alpha: None,
        },
    }
}

/// The frozen internals of the gates (mask and temperature), never trained.
pub(crate) fn gate_internals() -> ParamGroup {
    ParamGroup::from_regex(r"gate\.(mask|temperature)$").expect("a valid pattern")
}

/// Sets gate modes, trainability and BatchNorm behaviour for a phase, and puts the weights in
/// the memory layout the phase's SGD steps them in ([`crate::sgd::lay_out`]). Applied on every
/// (re)start of a phase, since modes, flags and layouts are not part of a checkpoint.
pub(crate) fn configure<N: Network>(cfg: &TrainConfig, phase: Phase, model: N) -> N {
    crate::sgd::lay_out(configured(cfg, phase, model))
}

/// [`configure`]'s modes and flags.
fn configured<N: Network>(cfg: &TrainConfig, phase: Phase, model: N) -> N {
    match phase {
        Phase::Arch => {
            let alpha = ParamGroup::from_ids(model.alpha_ids());
            let classifier = model.classifier_group();
            let frozen = if cfg.arch.update_bn_stats {
                model.no_grad()
            } else {
                model.freeze()
            };
            let model = frozen.set_require_grad_group(alpha, true);
            let model = if cfg.arch.train_classifier {
                model.unfreeze_group(classifier)
            } else {
                model
            };
            model.with_gate_mode(GateMode::Search)
        }
        Phase::Joint => model
            .unfreeze()
            .set_require_grad_group(gate_internals(), false)
            .with_gate_mode(GateMode::Search),
        Phase::Weights | Phase::Final | Phase::BaselineExtend => model
            .unfreeze()
            .set_require_grad_group(gate_internals(), false)
            .with_gate_mode(GateMode::Bypass),
    }
}

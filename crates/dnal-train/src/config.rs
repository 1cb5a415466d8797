//! The run configuration: one TOML recipe per model and data set, a preset being a recipe plus
//! its lambda, and `key=value` overrides on top.

use std::path::PathBuf;

use dnal_core::{Continuation, CoreError, PenaltyConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::registry::ModelName;

/// How the weights and the architecture are optimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The paper: weight stage, architecture stage, derivation, final stage.
    Decoupled,
    /// Beyond the paper: weights and alpha trained together from scratch (gates in search mode,
    /// beta raised over the joint stage), then derivation and the final stage.
    Joint,
    /// The unpruned baseline only: the weight stage and an evaluation.
    Dense,
    /// Beyond the paper, a comparison method: after the weight stage, keep the channels with
    /// the largest |BatchNorm gamma| under one global threshold chosen to match
    /// `compare.target_macs`, prune, and train on for the architecture and final stages' epochs.
    Magnitude,
    /// Beyond the paper, a comparison method: the network with every gated width scaled by one
    /// factor, chosen to match `compare.target_macs`, trained from scratch for the weight,
    /// architecture and final stages' epochs with the weight stage's schedule (the dense weight
    /// stage runs first, as the baseline).
    Uniform,
    /// Beyond the paper, a control: the architecture of `compare.architecture` (a DNAL run's
    /// `architecture.json`) built at its widths and trained from scratch exactly as `uniform`
    /// trains its network, so that learned widths and uniform ones meet with the same training.
    Scratch,
}

impl Mode {
    /// Whether the final phase trains a newly built network from scratch, for as many epochs
    /// as the whole DNAL run and with the weight stage's schedule.
    pub(crate) fn trains_from_scratch(self) -> bool {
        matches!(self, Mode::Uniform | Mode::Scratch)
    }
}

/// The comparison methods' settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// The MACs per image the `magnitude` and `uniform` modes aim at (a DNAL run's pruned MACs).
    #[serde(default)]
    pub target_macs: Option<u64>,
    /// The architecture the `scratch` mode trains (a DNAL run's `architecture.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<PathBuf>,
}

/// The network section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Which network.
    pub name: ModelName,
    /// Number of classes (default: the data set's). MNIST and CIFAR take only their own
    /// count; an image folder takes at least its number of class folders.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Every gated width scaled by this factor in `(0, 1]`, `ceil(factor * width)` channels (at
    /// least one) per gate: a narrower network of the same family to search from (quick runs,
    /// smoke tests). The layers without a gate keep their widths. Default 1, the paper's.
    #[serde(default = "full_width", skip_serializing_if = "is_full_width")]
    pub width_multiplier: f64,
}

fn full_width() -> f64 {
    1.0
}

fn is_full_width(v: &f64) -> bool {
    *v == 1.0
}

/// The data set to train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// The bundled 5,000 real MNIST digits (4,000 train / 1,000 test).
    #[serde(rename = "mnist-5k")]
    Mnist5k,
    /// MNIST from its IDX files.
    Mnist,
    /// Fashion-MNIST from its IDX files.
    FashionMnist,
    /// CIFAR-10, official binary files.
    Cifar10,
    /// CIFAR-100 (fine labels), official binary files.
    Cifar100,
    /// An ImageNet-style folder: `path/train/<class>/*`, `path/val/<class>/*`.
    ImageFolder,
}

/// The data section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Which data set.
    pub dataset: DatasetName,
    /// Where it is (default: `$DNAL_DATA` or `data/` for downloads; the bundled folder for
    /// mnist-5k).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Training batch size.
    pub batch_size: usize,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Training augmentation (CIFAR: pad-crop-flip; image folders: RandomResizedCrop + flip).
    #[serde(default = "yes")]
    pub augment: bool,
    /// RandomResizedCrop area range for image folders.
    #[serde(default = "default_scale")]
    pub crop_scale: (f64, f64),
    /// Side of the image-folder crops (224 for ImageNet).
    #[serde(default = "default_crop")]
    pub crop_size: usize,
    /// Use only the first N training examples (class-balanced for quick runs).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[serde(default)]
    pub test_limit: Option<usize>,
}

fn default_eval_batch() -> usize {
    256
}
fn yes() -> bool {
    true
}
fn default_scale() -> (f64, f64) {
    (0.08, 1.0)
}
fn default_crop() -> usize {
    224
}

/// Learning-rate schedule of a weight-training stage (stepped per iteration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Constant.
    Constant,
    /// Cosine from `lr` to `min_lr` over `span` epochs (default: the stage's); a span longer
    /// than the stage stops part-way down, as the released ImageNet scripts' weight stages do.
    Cosine {
        /// Final learning rate.
        #[serde(default)]
        min_lr: f64,
        /// Epochs of the whole cosine.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        span: Option<usize>,
    },
    /// Multiply by `gamma` at each milestone epoch.
    Step {
        /// Epochs (within the stage) at which the rate drops.
        milestones: Vec<usize>,
        /// Factor.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

fn default_gamma() -> f64 {
    0.1
}

/// A weight-training stage (weight stage, final stage, or the joint stage).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Epochs.
    pub epochs: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// SGD momentum (dampening 0, as in PyTorch).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Weight decay (L2 added to the gradient).
    #[serde(default)]
    pub weight_decay: f64,
    /// Schedule.
    pub schedule: LrSchedule,
    /// Weights to start from (the weight stage only): a PyTorch checkpoint (`.pth`, `.pt`), a
    /// safetensors file or a dnal run's `model.bpk`. With them, `epochs = 0` skips the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// How the names in `init` become dnal's: `torchvision` (torchvision's VGG-16-BN,
    /// ResNet-50 and MobileNetV2 names; the default, except for `.bpk` files), `dnal` (a run's
    /// `model.bpk` or `model.safetensors`; the default for `.bpk`), or the path of a
    /// key-mapping file (`.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_keys: Option<String>,
    /// Tensors of the network (regular expressions over dnal's paths) that keep their initial
    /// values instead, e.g. `['^classifier\.']` for a new number of classes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_exclude: Vec<String>,
}

impl StageConfig {
    /// How the names of `init` are mapped.
    pub fn init_key_map(&self) -> Result<dnal_zoo::KeyMap> {
        let burnpack = self
            .init
            .as_ref()
            .is_some_and(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("bpk")));
        Ok(match self.init_keys.as_deref() {
            None if burnpack => dnal_zoo::KeyMap::Dnal,
            None | Some("torchvision") => dnal_zoo::KeyMap::Torchvision,
            Some("dnal") => dnal_zoo::KeyMap::Dnal,
            Some(file) => {
                dnal_zoo::KeyMap::Rules(dnal_zoo::KeyRules::from_file(std::path::Path::new(file))?)
            }
        })
    }
}

fn default_momentum() -> f64 {
    0.9
}

/// The optimiser of alpha.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchOptimizer {
    /// SGD with momentum (the paper: lr 0.01, momentum 0.9, no weight decay).
    Sgd,
    /// Adam (epsilon 1e-8).
    Adam,
}

/// The architecture stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchConfig {
    /// Epochs.
    pub epochs: usize,
    /// Optimiser of alpha.
    #[serde(default = "default_arch_optimizer")]
    pub optimizer: ArchOptimizer,
    /// Learning rate of alpha (constant).
    #[serde(default = "default_arch_lr")]
    pub lr: f64,
    /// Momentum of alpha's SGD.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Continuation schedule of beta.
    #[serde(default)]
    pub continuation: Continuation,
    /// The sparsity penalty (lambda and variants).
    pub penalty: PenaltyConfig,
    /// Keep a channel iff sigmoid(beta * alpha) > threshold.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// After thresholding, round every gate's kept count up to a multiple of this with its
    /// strongest closed channels (1: no rounding, the paper; 8 or 16 suit SIMD lanes and
    /// tensor cores).
    #[serde(default = "one")]
    pub round_to: usize,
    /// Keep training the classifier (at `arch.lr`, with the weight stage's momentum) while
    /// alpha is learned; the released code does.
    #[serde(default = "yes")]
    pub train_classifier: bool,
    /// Weight decay of the classifier in this stage: 0 as in the released code, whose
    /// architecture-stage optimiser has none.
    #[serde(default)]
    pub classifier_weight_decay: f64,
    /// Build the stage's optimisers afresh at every epoch, so that momentum restarts each
    /// epoch, as the released code does; `false` keeps one optimiser for the whole stage.
    #[serde(default = "yes")]
    pub momentum_restart: bool,
    /// Let BatchNorm update its running statistics (train mode); the released code does.
    #[serde(default = "yes")]
    pub update_bn_stats: bool,
    /// Training batches run forward (train mode, no gradients) through the network that
    /// derivation leaves (and the one `magnitude` pruning leaves), before it is evaluated and
    /// trained on, so that its BatchNorm statistics are its own and not those of the gates'
    /// last settings in the architecture stage; 0: none, as in the released code. Only the
    /// evaluations before the final stage change: training normalises with each batch's own
    /// statistics, and the batches come from a data stream of their own.
    #[serde(default = "default_bn_recalibration")]
    pub bn_recalibration_batches: usize,
}

fn default_arch_optimizer() -> ArchOptimizer {
    ArchOptimizer::Sgd
}
fn default_arch_lr() -> f64 {
    0.01
}
fn one() -> usize {
    1
}
fn default_bn_recalibration() -> usize {
    100
}
fn default_threshold() -> f64 {
    dnal_core::DEFAULT_THRESHOLD
}

/// What the pruned network is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// The dense network at the end of the weight stage.
    WeightStage,
    /// The dense network of the weight stage trained on for the final stage's epochs with the
    /// final stage's schedule, so it gets the same number of weight epochs as the pruned one.
    Extended,
}

/// The report section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Batch size of the latency measurement.
    #[serde(default = "default_latency_batch")]
    pub latency_batch: usize,
    /// Timed forward passes (after two warm-up passes); the median is reported.
    #[serde(default = "default_latency_runs")]
    pub latency_runs: usize,
    /// Write the plots (SVG).
    #[serde(default = "yes")]
    pub plots: bool,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            latency_batch: default_latency_batch(),
            latency_runs: default_latency_runs(),
            plots: true,
        }
    }
}

fn default_latency_batch() -> usize {
    64
}
fn default_latency_runs() -> usize {
    10
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run name (the preset's).
    pub name: String,
    /// One line on what the run reproduces.
    #[serde(default)]
    pub description: String,
    /// Seed of the weights' initialisation, the data order and the augmentation.
    #[serde(default)]
    pub seed: u64,
    /// Decoupled (the paper), joint, or dense.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// The network.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The weight stage (in joint mode: the joint stage).
    pub weights: StageConfig,
    /// The architecture stage.
    pub arch: ArchConfig,
    /// The final stage (training the pruned network).
    #[serde(rename = "final")]
    pub final_stage: StageConfig,
    /// What the pruned network is compared with.
    #[serde(default = "default_baseline")]
    pub baseline: Baseline,
    /// Report options.
    #[serde(default)]
    pub report: ReportConfig,
    /// The comparison methods' settings (modes `magnitude`, `uniform` and `scratch`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub compare: CompareConfig,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_mode() -> Mode {
    Mode::Decoupled
}
fn default_baseline() -> Baseline {
    Baseline::WeightStage
}

impl TrainConfig {
    /// Parses a TOML document (unknown keys are errors).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let value: toml::Value = toml::from_str(text).map_err(|e| TrainError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        Self::from_value(value, origin)
    }

    /// Deserialises a TOML value tree (after overrides).
    pub fn from_value(value: toml::Value, origin: &str) -> Result<Self> {
        let cfg: TrainConfig =
            value
                .try_into()
                .map_err(|e: toml::de::Error| TrainError::Config {
                    origin: origin.into(),
                    message: e.to_string(),
                })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configs serialise")
    }

    /// Checks every value; each error names the key and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |key: &str, message: String| Err(TrainError::from(CoreError::invalid(key, message)));
        let factor = self.model.width_multiplier;
        if !(factor > 0.0 && factor <= 1.0) {
            return bad(
                "model.width_multiplier",
                format!(
                    "{factor} is outside (0, 1]; widths can only be scaled down (1 keeps them)"
                ),
            );
        }
        for (key, value) in [
            ("data.batch_size", self.data.batch_size),
            ("data.eval_batch_size", self.data.eval_batch_size),
            ("data.crop_size", self.data.crop_size),
            ("report.latency_batch", self.report.latency_batch),
            ("report.latency_runs", self.report.latency_runs),
            ("model.num_classes", self.model.num_classes.unwrap_or(1)),
        ] {
            if value == 0 {
                return bad(key, "0 is not allowed; it must be at least 1".into());
            }
        }
        // A limit of 0 would leave a stage without data (a run on no examples, a report on
        // no test digits): leave the key out to use every example.
        for (key, limit) in [
            ("data.train_limit", self.data.train_limit),
            ("data.test_limit", self.data.test_limit),
        ] {
            if limit == Some(0) {
                return bad(
                    key,
                    "0 examples leaves a stage without data; give at least 1, or leave the key out to use every example".into(),
                );
            }
        }
        for (key, stage) in [("weights", &self.weights), ("final", &self.final_stage)] {
            if !(stage.lr.is_finite() && stage.lr > 0.0) {
                return bad(&format!("{key}.lr"), format!("{} must be > 0", stage.lr));
            }
            if !(0.0..1.0).contains(&stage.momentum) {
                return bad(
                    &format!("{key}.momentum"),
                    format!("{} is outside [0, 1)", stage.momentum),
                );
            }
            if !(stage.weight_decay.is_finite() && stage.weight_decay >= 0.0) {
                return bad(
                    &format!("{key}.weight_decay"),
                    format!("{} must be >= 0", stage.weight_decay),
                );
            }
            match stage.schedule {
                LrSchedule::Step { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => {
                    return bad(
                        &format!("{key}.schedule.gamma"),
                        format!("{gamma} is outside (0, 1]"),
                    );
                }
                LrSchedule::Cosine {
                    span: Some(span), ..
                } if span < stage.epochs => {
                    return bad(
                        &format!("{key}.schedule.span"),
                        format!(
                            "{span} is shorter than the stage ({} epochs); the rate would rise again",
                            stage.epochs
                        ),
                    );
                }
                LrSchedule::Cosine { min_lr, .. } if !(min_lr >= 0.0 && min_lr <= stage.lr) => {
                    return bad(
                        &format!("{key}.schedule.min_lr"),
                        format!("{min_lr} is outside [0, {key}.lr = {}]", stage.lr),
                    );
                }
                _ => {}
            }
        }
        if self.weights.epochs == 0 && self.weights.init.is_none() {
            return bad(
                "weights.epochs",
                "must be at least 1 (0 skips the stage only when weights.init names weights to start from)".into(),
            );
        }
        let fin = &self.final_stage;
        if fin.init.is_some() || fin.init_keys.is_some() || !fin.init_exclude.is_empty() {
            return bad(
                "final.init",
                "only the weight stage starts from a weights file; use weights.init".into(),
            );
        }
        if let Some(keys) = self.weights.init_keys.as_deref()
            && !matches!(keys, "torchvision" | "dnal")
            && !keys.ends_with(".toml")
        {
            return bad(
                "weights.init_keys",
                format!("{keys:?} is neither torchvision, dnal nor a key-mapping file (.toml)"),
            );
        }
        for p in &self.weights.init_exclude {
            if let Err(e) = regex::Regex::new(p) {
                return bad(
                    "weights.init_exclude",
                    format!("`{p}` is not a pattern: {e}"),
                );
            }
        }
        if matches!(self.mode, Mode::Magnitude | Mode::Uniform)
            && self.compare.target_macs.is_none_or(|m| m == 0)
        {
            return bad(
                "compare.target_macs",
                "the magnitude and uniform modes need the MACs to match, e.g. --set compare.target_macs=3858432".into(),
            );
        }
        if self.mode == Mode::Scratch && self.compare.architecture.is_none() {
            return bad(
                "compare.architecture",
                "the scratch mode needs the architecture to train, e.g. --set compare.architecture=\"runs/mnist-demo/architecture.json\"".into(),
            );
        }
        if self.mode == Mode::Decoupled && self.arch.epochs == 0 {
            return bad("arch.epochs", "must be at least 1 in decoupled mode".into());
        }
        if !(self.arch.classifier_weight_decay.is_finite()
            && self.arch.classifier_weight_decay >= 0.0)
        {
            return bad(
                "arch.classifier_weight_decay",
                format!("{} must be >= 0", self.arch.classifier_weight_decay),
            );
        }
        if !(self.arch.lr.is_finite() && self.arch.lr > 0.0) {
            return bad("arch.lr", format!("{} must be > 0", self.arch.lr));
        }
        if !(0.0..1.0).contains(&self.arch.momentum) {
            return bad(
                "arch.momentum",
                format!("{} is outside [0, 1)", self.arch.momentum),
            );
        }
        if !(self.arch.threshold > 0.0 && self.arch.threshold < 1.0) {
            return bad(
                "arch.threshold",
                format!("{} is outside (0, 1)", self.arch.threshold),
            );
        }
        if self.arch.round_to == 0 {
            return bad(
                "arch.round_to",
                "0 is not a width multiple; use 1 (no rounding), 8 or 16".to_string(),
            );
        }
        if !(self.arch.penalty.lambda >= 0.0 && self.arch.penalty.lambda.is_finite()) {
            return bad(
                "arch.penalty.lambda",
                format!("{} is not a finite number >= 0", self.arch.penalty.lambda),
            );
        }
        // dnal-core names its keys relative to the penalty and the schedule.
        let in_arch = |e: CoreError| -> TrainError {
            match e {
                CoreError::InvalidValue { key, message } => {
                    CoreError::invalid(format!("arch.{key}"), message).into()
                }
                other => other.into(),
            }
        };
        self.arch.penalty.validate().map_err(in_arch)?;
        self.arch.continuation.validate().map_err(in_arch)?;
        let (lo, hi) = self.data.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(
                "data.crop_scale",
                format!("({lo}, {hi}) must satisfy 0 < min <= max <= 1"),
            );
        }
        Ok(())
    }
}

/// Applies `key=value` overrides (dotted keys, TOML values; a value that does not parse as
/// TOML is taken as a string) to a TOML tree. Unknown keys are caught when the tree is
/// deserialised.
pub fn apply_overrides(value: &mut toml::Value, overrides: &[String]) -> Result<()> {
    for item in overrides {
        let (key, raw) = item.split_once('=').ok_or_else(|| {
            TrainError::from(CoreError::invalid(
                item.as_str(),
                "an override is key=value, e.g. arch.penalty.lambda=1e-4",
            ))
        })?;
        let key = key.trim();
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let mut node = &mut *value;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let table = node.as_table_mut().ok_or_else(|| {
                TrainError::from(CoreError::invalid(
                    key,
                    format!("`{}` is not a table", parts[..i].join(".")),
                ))
            })?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), parsed.clone());
                break;
            }
            node = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
    Ok(())
}

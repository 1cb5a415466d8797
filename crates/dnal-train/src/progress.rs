//! What a run has done so far: the epoch log, a part-done epoch, the [`Progress`] every
//! checkpoint saves and the report reads, and the layout of the output folder.

use std::collections::BTreeMap;

use dnal_core::{Architecture, CostReport};
use serde::{Deserialize, Serialize};

use crate::eval::Accuracy;

/// One line of the training log (also one JSON line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// Phase name.
    pub stage: String,
    /// Epoch within the phase.
    pub epoch: usize,
    /// Learning rate at the end of the epoch (alpha's in the architecture stage).
    pub lr: f64,
    /// beta at the end of the epoch (searching phases only).
    pub beta: Option<f64>,
    /// Mean training loss (cross-entropy + penalty).
    pub loss: f64,
    /// Mean penalty term.
    pub penalty: f64,
    /// lambda in force.
    pub lambda: f64,
    /// Training top-1, percent (on augmented batches).
    pub train_top1: f64,
    /// Test top-1, percent.
    pub test_top1: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Open gate channels of the architecture derived now (all channels outside search).
    pub open_gates: usize,
    /// Open channels per gated layer (searching phases only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub open_by_layer: BTreeMap<String, usize>,
    /// MACs of the architecture derived now (of the network itself outside search).
    pub macs: u64,
    /// Seconds of this epoch.
    pub seconds: f64,
}

/// An epoch stopped part-way: where it stopped and its running sums, so that a resumed run
/// continues it with the next batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Batches (steps) done.
    pub batches_done: usize,
    /// Sum of the loss over the examples seen.
    pub loss_sum: f64,
    /// Sum of the penalty over the examples seen.
    pub pen_sum: f64,
    /// Training examples classified correctly.
    pub correct: usize,
    /// Training examples seen.
    pub seen: usize,
    /// Learning rate of the last step.
    pub lr: f64,
    /// beta of the last step (searching phases).
    pub beta: Option<f64>,
    /// Seconds spent in the epoch so far.
    pub seconds: f64,
}

/// Results of the run so far; saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Index of the current phase.
    pub phase_index: usize,
    /// Whether the current phase's entry step (fresh weights, alpha reset, ...) is done.
    pub entered: bool,
    /// Epochs completed in the current phase.
    pub epochs_done: usize,
    /// Every epoch so far.
    pub history: Vec<EpochLog>,
    /// lambda (it moves in the adaptive-target mode).
    pub lambda: Option<f64>,
    /// The dense network: accuracy and cost at the end of its weight stage.
    pub dense: Option<(Accuracy, CostReport)>,
    /// The extended baseline's accuracy.
    pub baseline_extended: Option<Accuracy>,
    /// The derived architecture.
    pub architecture: Option<Architecture>,
    /// Channels that `arch.round_to` added back after thresholding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounding_added: Option<usize>,
    /// Accuracy of the pruned network right after derivation (after BatchNorm recalibration,
    /// where it runs).
    pub derived: Option<Accuracy>,
    /// The same with the BatchNorm statistics the network had when derived (only where
    /// `arch.bn_recalibration_batches` re-estimates them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_before_recalibration: Option<Accuracy>,
    /// The pruned network after the final stage.
    pub pruned: Option<(Accuracy, CostReport)>,
    /// The pruned network's MACs as the authors' released code counts them, for the families
    /// where that count differs (`dnal_zoo::Network::released_cost_model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_macs: Option<u64>,
    /// Final alpha values (for the histogram).
    pub final_alpha: Vec<f64>,
    /// Gate names in network order.
    pub gate_order: Vec<String>,
    /// Seconds spent so far.
    pub seconds: f64,
    /// The current epoch, if the run was stopped in the middle of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
}

/// Sub-folders and files of the output folder.
pub mod paths {
    /// Checkpoint folder.
    pub const CHECKPOINT: &str = "checkpoint";
    /// The dense network (weight stage).
    pub const DENSE: &str = "dense";
    /// The pruned network after the final stage.
    pub const PRUNED: &str = "pruned";
    /// The extended baseline.
    pub const BASELINE: &str = "baseline";
    /// The derived architecture.
    pub const ARCHITECTURE: &str = "architecture.json";
    /// One JSON line per epoch.
    pub const METRICS: &str = "metrics.jsonl";
    /// The class names, one per line, in label order.
    pub const CLASSES: &str = "classes.txt";
}

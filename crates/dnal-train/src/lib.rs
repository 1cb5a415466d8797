//! # dnal-train
//!
//! The DNAL pipeline end to end (`docs/ARCHITECTURE.md` explains the design):
//!
//! 1. weight stage: gates in bypass, SGD (momentum, dampening 0, weight decay, cosine or step
//!    learning rate), from scratch or from pretrained weights (`weights.init`);
//! 2. architecture stage: conv and BN weights frozen, alpha reset to 0 and trained with its own
//!    optimiser on cross-entropy + sparsity penalty while beta follows the continuation schedule;
//! 3. derivation and physical pruning, BatchNorm statistics re-estimated for what is left;
//! 4. final stage: the pruned network trained from its inherited weights;
//! 5. evaluation (top-1, top-5), latency of the dense and the pruned network, exports
//!    (burnpack + config JSON + safetensors + architecture JSON), `report.json`, `report.md`,
//!    plots.
//!
//! Every epoch ends with a checkpoint; a run resumes from it to the same result.

pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod graph_check;
pub mod leaves;
pub mod models;
pub mod penalty;
pub mod phase;
pub mod pipeline;
mod plots;
pub mod predict;
pub mod progress;
pub mod recalibrate;
pub mod recipes;
pub mod registry;
pub mod replay;
mod replicas;
pub mod report;
pub mod sgd;
pub mod sweep;
mod tally;
pub mod threads;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use models::{dry_run, run};
pub use phase::Phase;
pub use pipeline::{Outcome, RunOptions, StopToken};
pub use report::Report;

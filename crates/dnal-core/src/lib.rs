//! # dnal-core
//!
//! The architecture-parameter core of DNAL (Guo et al., *Differentiable Neural Architecture
//! Learning for Efficient Neural Network Design*, arXiv 2103.02126):
//!
//! * [`ChannelGate`]: `x * sigmoid(beta * alpha) * mask` per channel, in bypass, search or
//!   masked mode;
//! * [`Continuation`]: the schedule that raises `beta` until the gates are binary;
//! * [`SparsityPenalty`]: the paper's `lambda * sum sigmoid(alpha)` and MACs-aware variants;
//! * [`derive_architecture`]: thresholding the gates into an [`Architecture`];
//! * [`CostModel`]: MACs and parameters of a network under an architecture;
//! * [`GatedModel`]: what a network implements so that all of the above works on it;
//! * [`BackendKind`]: mapping a backend name to a burn `Device`.

pub mod architecture;
pub mod backend;
pub mod continuation;
pub mod cost;
pub mod error;
pub mod gate;
pub mod gated;
pub mod io;
pub mod penalty;

pub use architecture::{
    Architecture, DEFAULT_THRESHOLD, GateArchitecture, derive_architecture, derive_from_states,
};
pub use backend::{BackendKind, BackendState, BackendStatus};
pub use continuation::{Continuation, Granularity, Schedule};
pub use cost::{CostModel, CostReport, Groups, LayerCost, LayerKind, LayerSpec, MacsTerm, Width};
pub use error::{CoreError, Result};
pub use gate::{ChannelGate, ChannelGateConfig, GateKind, GateMode, GateState, stable_sigmoid};
pub use gated::GatedModel;
pub use penalty::{
    GateTerm, MacsTarget, PenaltyConfig, Relaxation, SparsityPenalty, Weighting, soft_macs,
};

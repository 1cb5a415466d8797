//! Errors of dnal-train.

use std::path::PathBuf;

/// Result with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What can stop a run; each message names the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config document does not parse or has unknown keys.
    #[error("{origin}: {message}")]
    Config {
        /// The file or preset.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// No preset of that name.
    #[error("unknown preset `{name}`; `cargo xtask train --list` shows them all{suggestion}")]
    UnknownPreset {
        /// The name given.
        name: String,
        /// "; did you mean ...?" or nothing.
        suggestion: String,
    },
    /// No recipe of that name (`sweep --recipe`).
    #[error("unknown recipe `{name}`; recipes: {known}")]
    UnknownRecipe {
        /// The name given.
        name: String,
        /// Every recipe, comma-separated.
        known: String,
    },
    /// The loss became NaN or infinite.
    #[error(
        "the loss became {value} at {stage} epoch {epoch}, iteration {iteration}; the last good checkpoint is kept in {checkpoint} (lower the learning rate, then resume with --resume)"
    )]
    NonFinite {
        /// Stage name.
        stage: String,
        /// Epoch within the stage.
        epoch: usize,
        /// Iteration within the epoch.
        iteration: usize,
        /// The loss value.
        value: f32,
        /// The checkpoint folder.
        checkpoint: PathBuf,
    },
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// From dnal-core: a file that could not be read or written, a value out of range, an
    /// architecture that does not fit.
    #[error(transparent)]
    Core(#[from] dnal_core::CoreError),
    /// From dnal-zoo.
    #[error(transparent)]
    Zoo(#[from] dnal_zoo::ZooError),
    /// From dnal-data.
    #[error(transparent)]
    Data(#[from] dnal_data::DataError),
    /// From dnal-onnx: a network that cannot be exported.
    #[error(transparent)]
    Onnx(#[from] dnal_onnx::OnnxError),
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

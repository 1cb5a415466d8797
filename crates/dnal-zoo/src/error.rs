//! Errors of dnal-zoo.

use std::path::PathBuf;

/// Result with [`ZooError`].
pub type Result<T, E = ZooError> = std::result::Result<T, E>;

/// What can go wrong building, pruning, saving or loading a network.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// A network config that cannot be built.
    #[error("invalid network config: {0}")]
    Config(String),
    /// Images a network cannot take (wrong size or shape).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from dnal-core (e.g. an architecture that does not fit the network).
    #[error(transparent)]
    Core(#[from] dnal_core::CoreError),
    /// A saved model that cannot be read into its config's network.
    #[error("{path}: {message}")]
    Record {
        /// The weights file.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
    },
}

//! Errors of dnal-core.

use std::path::{Path, PathBuf};

/// Result with [`CoreError`].
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// What can go wrong in dnal-core; each message names the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document did not parse.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// What the document should have been.
        what: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid value for `{key}`: {message}")]
    InvalidValue {
        /// The configuration key.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// An architecture does not fit the model it is applied to.
    #[error("architecture does not match the model: {0}")]
    ArchitectureMismatch(String),
    /// A cost model refers to a gate it does not know.
    #[error("cost model: layer `{layer}` refers to unknown gate `{gate}`")]
    UnknownGate {
        /// The layer.
        layer: String,
        /// The gate name.
        gate: String,
    },
    /// A backend was requested that this build does not contain or cannot start.
    #[error("{0}")]
    Backend(String),
    /// An error in the file `path`.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: Box<CoreError>,
    },
}

impl CoreError {
    /// A [`CoreError::Io`] for `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A [`CoreError::InvalidValue`] for the setting `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::InvalidValue {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Attaches the file this error came from.
    pub fn in_file(self, path: &Path) -> Self {
        CoreError::InFile {
            path: path.to_path_buf(),
            source: Box::new(self),
        }
    }
}

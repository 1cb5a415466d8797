//! Errors of dnal-data.

use std::path::{Path, PathBuf};

use dnal_core::CoreError;

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// What can go wrong while reading, checking or downloading data; each message names the file
/// and says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written, or an option is out of range (the
    /// variants dnal-core shares with every crate).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A file or folder that should be there is not.
    #[error("{path} not found: {hint}")]
    Missing {
        /// What was looked for.
        path: PathBuf,
        /// What is expected there and how to get it.
        hint: String,
    },
    /// A file is not in the format it should be (wrong size, bad header, bad label, ...).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A file's checksum differs from the published one.
    #[error(
        "{path}: {algorithm} checksum mismatch (expected {expected}, found {actual}); the file is corrupt or incomplete: {fix}"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// `md5` or `sha256`.
        algorithm: &'static str,
        /// The published checksum.
        expected: String,
        /// The checksum of the file on disk.
        actual: String,
        /// What to do about it.
        fix: String,
    },
    /// A download failed.
    #[error("downloading {url}: {message}")]
    Download {
        /// The address.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl DataError {
    /// A [`CoreError::Io`] for `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Core(CoreError::io(path)(source))
    }

    /// A [`DataError::Format`] for `path`.
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// A [`CoreError::InvalidValue`] for the option `key`.
    pub fn invalid(key: &str, message: impl Into<String>) -> Self {
        Self::Core(CoreError::invalid(key, message))
    }
}

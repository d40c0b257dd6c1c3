//! The crate's error type: everything a user can get wrong (configs, inputs, files) ends here,
//! with the offending value named.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by `dape`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The configuration field, e.g. `n_heads`.
        field: String,
        /// The offending value, as written.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A positional-encoding name that the crate does not know.
    #[error("unknown positional encoding `{name}`; known encodings: {known}")]
    UnknownEncoding {
        /// The name that was given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// An input sequence is longer than what a module supports.
    #[error("{what}: sequence positions up to {length} exceed the maximum length {max}")]
    SequenceTooLong {
        /// The module that refused the input.
        what: String,
        /// The end position that was asked for.
        length: usize,
        /// The largest supported length.
        max: usize,
    },
    /// An input tensor or argument is unusable (empty, wrong shape, misuse of a cache).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A plot could not be drawn or written.
    #[error("plot {}: {message}", path.display())]
    Plot {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A JSON document could not be parsed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    /// A write failed because the disk (or the user's quota on it) is full. Every file is
    /// written whole or not at all, so what was written before is intact.
    #[error(
        "{}: the disk is full ({source}); the files written before are intact: free some \
         space, then run the same command again (a training run with --resume)",
        path.display()
    )]
    DiskFull {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error on `path`: [`Error::DiskFull`] when the disk is full, else [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if crate::disk::is_full(&source) {
            Error::DiskFull { path, source }
        } else {
            Error::Io { path, source }
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub fn invalid(field: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Returns `Err(Error::InvalidConfig)` naming `field` when `items` is empty.
#[cfg(feature = "harness")]
pub(crate) fn ensure_non_empty<T>(items: &[T], field: &str) -> Result<()> {
    ensure(!items.is_empty(), field, "[]", "must not be empty")
}

/// Returns `Err(Error::InvalidConfig)` unless `ok`.
pub(crate) fn ensure(
    ok: bool,
    field: &str,
    value: impl std::fmt::Display,
    reason: &str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, value, reason))
    }
}

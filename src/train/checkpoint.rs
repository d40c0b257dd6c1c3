//! Model files and burn-train checkpoints written so that nothing is ever half-written under
//! its final name (through [`AtomicRecorder`]); plain files go through
//! [`crate::util::write_atomic`].

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::{DefaultRecorder, FileRecorder, Recorder, RecorderError};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};
use crate::util::partial_name;

/// A file recorder that writes through a temporary file and renames it into place, so a crash
/// mid-write leaves the previous checkpoint intact instead of a truncated file. The default
/// inner recorder keeps full precision, so that a resumed run continues exactly (burn's
/// `CompactRecorder` would round weights and optimiser moments to f16).
#[derive(Clone, Debug, Default)]
pub struct AtomicRecorder<R = DefaultRecorder> {
    inner: R,
}

impl<R> AtomicRecorder<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }
}

impl<B: Backend, R: FileRecorder<B>> Recorder<B> for AtomicRecorder<R> {
    type Settings = R::Settings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let tmp = partial_name(&file);
        self.inner.save_item(item, tmp.clone())?;
        let ext = <R as FileRecorder<B>>::file_extension();
        let from = tmp.with_extension(ext);
        // Flush to disk before the rename makes the file visible under its final name.
        std::fs::File::open(&from)
            .and_then(|f| f.sync_all())
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", from.display())))?;
        let to = file.with_extension(ext);
        std::fs::rename(&from, &to)
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", to.display())))
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        self.inner.load_item(file)
    }
}

impl<B: Backend, R: FileRecorder<B>> FileRecorder<B> for AtomicRecorder<R> {
    fn file_extension() -> &'static str {
        R::file_extension()
    }
}

/// Saves a module atomically as `path.mpk`.
pub fn save_module<B: Backend, M: Module<B>>(module: M, path: &Path) -> Result<()> {
    module
        .save_file(path, &AtomicRecorder::<DefaultRecorder>::default())
        .map_err(|e| Error::InvalidInput(format!("cannot save {}: {e}", path.display())))
}

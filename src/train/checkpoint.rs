//! Model files and burn-train checkpoints written so that nothing is ever half-written under
//! its final name (through [`AtomicRecorder`]); plain files go through
//! [`crate::util::write_atomic`].

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::{
    DefaultRecorder, FileRecorder, FullPrecisionSettings, NamedMpkBytesRecorder, Recorder,
    RecorderError,
};
use serde::{de::DeserializeOwned, Serialize};

use super::failure::WriteFailure;
use crate::error::{Error, Result};
use crate::util::write_bytes_atomic;

/// A file recorder for Burn's default format (named MessagePack, full precision, `.mpk`) that
/// writes each record whole or not at all: the record is encoded in memory, then written
/// through [`write_bytes_atomic`] (a temporary file, flushed, renamed into place; removed when
/// the write fails). A crash or a full disk mid-write leaves the previous checkpoint intact.
/// Full precision keeps a resumed run exact (burn's `CompactRecorder` would round weights and
/// optimiser moments to f16).
///
/// burn-train calls the recorder from its checkpointer thread, where an error only stops the
/// Learner with a message; [`reporting_to`](Self::reporting_to) also records the error in the
/// run's [`WriteFailure`], so that the training function returns it by name.
#[derive(Clone, Default)]
pub struct AtomicRecorder {
    failure: Option<WriteFailure>,
}

impl std::fmt::Debug for AtomicRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtomicRecorder")
    }
}

impl AtomicRecorder {
    /// A recorder whose failed writes are also recorded in `failure`.
    pub fn reporting_to(failure: WriteFailure) -> Self {
        Self {
            failure: Some(failure),
        }
    }
}

impl<B: Backend> Recorder<B> for AtomicRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let bytes = Recorder::<B>::save_item(
            &NamedMpkBytesRecorder::<FullPrecisionSettings>::default(),
            item,
            (),
        )?;
        let path = file.with_extension(<Self as FileRecorder<B>>::file_extension());
        write_bytes_atomic(&path, &bytes).map_err(|error| {
            let message = error.to_string();
            if let Some(failure) = &self.failure {
                failure.record(error);
            }
            RecorderError::Unknown(message)
        })
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        Recorder::<B>::load_item(&DefaultRecorder::default(), file)
    }
}

impl<B: Backend> FileRecorder<B> for AtomicRecorder {
    fn file_extension() -> &'static str {
        <DefaultRecorder as FileRecorder<B>>::file_extension()
    }
}

/// Saves a module atomically as `path.mpk`.
pub fn save_module<B: Backend, M: Module<B>>(module: M, path: &Path) -> Result<()> {
    let failure = WriteFailure::default();
    module
        .save_file(path, &AtomicRecorder::reporting_to(failure.clone()))
        .map_err(|e| {
            failure.take().unwrap_or_else(|| {
                Error::InvalidInput(format!("cannot save {}: {e}", path.display()))
            })
        })
}

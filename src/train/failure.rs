//! The first write that failed during a training run, kept so that the run can return it by
//! name once burn-train's Learner has stopped.
//!
//! burn-train writes its metric logs and checkpoints from threads of its own, where an error
//! cannot be returned to the caller. Our writers ([`super::metric_log::RunMetricLogger`],
//! [`super::checkpoint::AtomicRecorder`]) record the error here instead and ask the Learner to
//! stop through its [`Interrupter`]; the training function then returns the error (a full disk
//! is [`Error::DiskFull`], naming the file) rather than a result.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::train::Interrupter;

use crate::error::{Error, Result};

/// Shared slot for the first failed write of a run, and the handle that stops the run.
#[derive(Clone, Default)]
pub struct WriteFailure {
    first: Arc<Mutex<Option<Error>>>,
    interrupter: Option<Interrupter>,
}

impl WriteFailure {
    /// A slot whose [`record`](Self::record) also stops the Learner of `interrupter`.
    pub fn stopping(interrupter: Interrupter) -> Self {
        Self {
            first: Arc::default(),
            interrupter: Some(interrupter),
        }
    }

    /// Keeps `error` if it is the run's first, and asks the Learner to stop (it does so at its
    /// next iteration).
    pub fn record(&self, error: Error) {
        let message = error.to_string();
        let mut first = self
            .first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if first.is_none() {
            *first = Some(error);
        }
        if let Some(interrupter) = &self.interrupter {
            interrupter.stop(Some(&message));
        }
    }

    /// Whether a write has failed.
    pub fn failed(&self) -> bool {
        self.first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    /// The first failed write, if any (taken out of the slot).
    pub fn take(&self) -> Option<Error> {
        self.first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// What a training function returns once the Learner of `run` is back: `Ok` when it ran to its
/// last epoch; the first failed write when one stopped it; else the reason it was stopped with
/// (the model it returned is then not the run's result and must not be saved as one).
pub fn finished(failure: &WriteFailure, interrupter: &Interrupter, run: &Path) -> Result<()> {
    if let Some(error) = failure.take() {
        return Err(error);
    }
    if interrupter.should_stop() {
        return Err(Error::InvalidInput(format!(
            "training of {} stopped before its end ({}); --resume continues from its newest \
             checkpoint",
            run.display(),
            interrupter
                .get_message()
                .unwrap_or_else(|| "no reason given".into())
        )));
    }
    Ok(())
}

//! The lengths a retrieval evaluation has finished, kept in `<run>/retrieval.partial.json`
//! after each one, so that an interrupted evaluation (a long grid cell stopped at 8192) goes on
//! from the first unfinished length instead of from the start; and, within the length it was
//! evaluating, the passes (batches of test items) it had done with their tallies
//! ([`InProgress`], saved at most every [`SAVE_EVERY`]), so that it goes on from the next pass:
//! a passkey length of 8192 takes hours on a CPU.
//!
//! A length's result depends on the run and on the evaluation's settings, never on the other
//! lengths asked for: the test items of each length have their own seed. The file therefore
//! holds one entry per finished length (its accuracy and its gap tallies) under a fingerprint,
//! the training config and the evaluation's settings without the list of lengths, and an entry
//! is reused only when the fingerprint matches. [`super::retrieval::write_report`] removes the
//! file once the report is written. Writes are atomic.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::retrieval::{LengthAccuracy, RetrievalEvalConfig, SkippedLength, Tally};
use crate::error::Result;
use crate::experiment::lm::LmTrainConfig;
use crate::util::{io_error, say_err, write_json_atomic};

/// The file's name in the run folder.
pub const PARTIAL_FILE: &str = "retrieval.partial.json";

/// One finished length: evaluated, with its share of the gap tallies (indexed by gap bucket),
/// or skipped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Finished {
    /// Evaluated.
    Evaluated {
        /// Its accuracy.
        accuracy: LengthAccuracy,
        /// Its answers' tallies by gap bucket.
        gaps: Vec<Tally>,
    },
    /// Left out.
    Skipped(SkippedLength),
}

/// How often, at most, the length in progress is saved.
pub const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// A length stopped part-way: the first `passes` batches of its test items are done, with these
/// tallies. Items and batches are the same on every run of the same settings (each length's
/// items have their own seed, `batch_tokens` fixes the batch), so the next pass goes on exactly
/// where the interrupted one stopped.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InProgress {
    /// The length being evaluated.
    pub length: usize,
    /// Batches of test items done.
    pub passes: usize,
    /// Units scored so far.
    pub tally: Tally,
    /// Answers (digits, queries) scored so far.
    pub answers: Tally,
    /// Passkey: units by depth so far (empty for MQAR).
    pub depths: Vec<Tally>,
    /// Units by gap bucket so far.
    pub gaps: Vec<Tally>,
    /// Seconds spent on the length so far.
    pub seconds: f64,
}

/// The contents of `retrieval.partial.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Partial {
    /// The run's training config, as JSON.
    pub train: serde_json::Value,
    /// The evaluation's settings without `lengths`, as JSON.
    pub eval: serde_json::Value,
    /// The finished lengths, in the order they finished.
    pub finished: Vec<Finished>,
    /// The length stopped part-way, if any.
    #[serde(default)]
    pub in_progress: Option<InProgress>,
}

impl Finished {
    /// The length it is about.
    pub fn length(&self) -> usize {
        match self {
            Self::Evaluated { accuracy, .. } => accuracy.length,
            Self::Skipped(s) => s.length,
        }
    }
}

/// The fingerprint of a run's evaluation: its training config and the evaluation's settings
/// without the list of lengths.
fn fingerprint(
    train: &LmTrainConfig,
    eval: &RetrievalEvalConfig,
) -> Result<(serde_json::Value, serde_json::Value)> {
    let mut eval = serde_json::to_value(eval)?;
    if let Some(fields) = eval.as_object_mut() {
        fields.remove("lengths");
    }
    Ok((serde_json::to_value(train)?, eval))
}

/// Where a run's partial results live.
pub fn partial_path(run: &Path) -> PathBuf {
    run.join(PARTIAL_FILE)
}

impl Partial {
    /// The partial results at `path` for this run and these settings; empty when there are
    /// none, when they were written for another run or other settings, or when the file cannot
    /// be read as partial results (each said on stderr, never an error: the lengths are then
    /// evaluated again).
    pub fn load(path: &Path, train: &LmTrainConfig, eval: &RetrievalEvalConfig) -> Result<Self> {
        let (train, eval) = fingerprint(train, eval)?;
        let fresh = Self {
            train: train.clone(),
            eval: eval.clone(),
            finished: Vec::new(),
            in_progress: None,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
            Err(e) => return Err(io_error(path)(e)),
        };
        let stored: Self = match serde_json::from_str(&text) {
            Ok(stored) => stored,
            Err(e) => {
                say_err!(
                    "{}: not partial results ({e}); evaluating every length",
                    path.display()
                );
                return Ok(fresh);
            }
        };
        let other = if stored.train != train {
            Some("another training config")
        } else if stored.eval != eval {
            Some("other evaluation settings")
        } else {
            None
        };
        if let Some(what) = other {
            say_err!(
                "{}: written for {what}; evaluating every length",
                path.display()
            );
            return Ok(fresh);
        }
        Ok(stored)
    }

    /// The finished entry for `length`, if any.
    pub fn get(&self, length: usize) -> Option<&Finished> {
        self.finished.iter().find(|f| f.length() == length)
    }

    /// Records a finished length (no longer in progress) and writes the file.
    pub fn record(&mut self, path: &Path, finished: Finished) -> Result<()> {
        self.finished.retain(|f| f.length() != finished.length());
        if self
            .in_progress
            .as_ref()
            .is_some_and(|p| p.length == finished.length())
        {
            self.in_progress = None;
        }
        self.finished.push(finished);
        write_json_atomic(path, self)
    }

    /// The passes done of `length` by an interrupted evaluation, if it stopped part-way there.
    pub fn progress(&self, length: usize) -> Option<&InProgress> {
        self.in_progress.as_ref().filter(|p| p.length == length)
    }

    /// Records the length in progress and writes the file.
    pub fn save_progress(&mut self, path: &Path, progress: InProgress) -> Result<()> {
        self.in_progress = Some(progress);
        write_json_atomic(path, self)
    }
}

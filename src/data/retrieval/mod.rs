//! Retrieval tasks that ask whether a causal model *uses* what lies past its training length:
//! multi-query associative recall ([`mqar`], Arora et al., 2023, "Zoology") and passkey
//! retrieval ([`passkey`], Mohtashami & Jaggi, 2023).
//!
//! Both are exact, seeded generators over the byte tokenizer's ids (`0..=255`), so that their
//! items mix with byte-level text and train the same [`crate::model::LanguageModel`]. A
//! generated item is a *window* of `length + 1` tokens, as the LM's training windows are: the
//! model reads the first `length` and is scored on predicting the last `length`. Each item says
//! which target positions carry the answer, so that evaluation is exact match on those.
//!
//! Perplexity rewards a model that ignores far tokens; these tasks cannot be solved without
//! reading them: the answer is fixed by one earlier occurrence (the key's pair, the needle),
//! at a distance the generator states.

pub mod mqar;
pub mod passkey;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A retrieval task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetrievalTask {
    /// Multi-query associative recall ([`mqar`]).
    Mqar,
    /// Passkey retrieval ([`passkey`]).
    Passkey,
}

impl RetrievalTask {
    /// Both tasks, in table order.
    pub const ALL: [RetrievalTask; 2] = [RetrievalTask::Mqar, RetrievalTask::Passkey];

    /// The task's name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mqar => "mqar",
            Self::Passkey => "passkey",
        }
    }

    /// Parses a task name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown retrieval task '{name}' (expected mqar or passkey)"
                ))
            })
    }
}

impl fmt::Display for RetrievalTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RetrievalTask {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

/// One generated item: a window of `length + 1` tokens and the target positions that carry
/// the answer.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievalItem {
    /// `length + 1` byte ids: the model reads `tokens[..length]` and predicts `tokens[1..]`.
    pub tokens: Vec<u16>,
    /// Target indices `t` (the model predicts `tokens[t + 1]` after reading `tokens[..=t]`)
    /// that are scored, in order. MQAR: one per query; passkey: one per answer digit.
    pub answer_targets: Vec<usize>,
    /// Per answer: its distance in tokens to the occurrence it must be retrieved from (MQAR:
    /// the query key's position minus its pair's key position; passkey: the position that
    /// reads the question's last byte minus the needle's start, the same for every digit).
    pub gaps: Vec<usize>,
}

impl RetrievalItem {
    /// The number of tokens the model reads.
    pub fn length(&self) -> usize {
        self.tokens.len() - 1
    }

    /// A `0/1` loss mask over the `length` targets, 1 on the answers.
    pub fn answer_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.length()];
        for &t in &self.answer_targets {
            mask[t] = true;
        }
        mask
    }
}

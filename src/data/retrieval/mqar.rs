//! Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology: Measuring and Improving
//! Recall in Efficient Language Models").
//!
//! An item of `length` (+1) tokens with `n` pairs:
//!
//! ```text
//! k_1 v_1 k_2 v_2 … k_n v_n   · · k_σ(1) v_σ(1) · · · k_σ(2) v_σ(2) · …   (· = FILLER)
//! └──── 2n tokens: pairs ───┘ └──── n queries, each a key then its value, at random slots ──┘
//! ```
//!
//! - keys are `n` distinct ids from `KEY_BASE..KEY_BASE + keys`, values ids from
//!   `VALUE_BASE..VALUE_BASE + values` (repeats allowed), so every key has exactly one value;
//! - every key is queried once, in a random order σ, each query a 2-token slot `[k, v]` placed
//!   uniformly among the `length + 1 − 2n` positions after the pairs (stars and bars over the
//!   `length + 1 − 4n` filler tokens);
//! - the answer is the value after each query key: scored at the target index of the query key,
//!   with gap `position(query key) − position(pair key)`.
//!
//! Training items of the study's length 128 hold up to 8 pairs, so no gap exceeds 127; test
//! items of 256 … 4096 tokens hold more pairs and gaps up to their length.

use serde::{Deserialize, Serialize};

use super::RetrievalItem;
use crate::error::ensure;
use crate::util::Rng;
use crate::Result;

/// The id that fills the positions no pair or query takes (the byte `.`).
pub const FILLER: u16 = b'.' as u16;
/// The first key id (the byte `A`): keys are `KEY_BASE..KEY_BASE + keys`.
pub const KEY_BASE: u16 = b'A' as u16;
/// The largest key vocabulary: `A`..=`~` (62 ids, none of them `.` or a value).
pub const MAX_KEYS: usize = (b'~' - b'A' + 1) as usize;
/// The first value id: values are `VALUE_BASE..VALUE_BASE + values` (bytes 128..=255).
pub const VALUE_BASE: u16 = 128;
/// The largest value vocabulary (bytes 128..=255).
pub const MAX_VALUES: usize = 128;

/// The MQAR generator's settings (`"mqar": {...}` in an LM config: train on MQAR items instead
/// of the corpus).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqarConfig {
    /// Pairs per training item: each item draws `n` uniformly from `1..=pairs`.
    pub pairs: usize,
    /// Distinct key ids (at most [`MAX_KEYS`]).
    pub keys: usize,
    /// Distinct value ids (at most [`MAX_VALUES`]).
    pub values: usize,
}

impl Default for MqarConfig {
    fn default() -> Self {
        Self {
            pairs: 8,
            keys: MAX_KEYS,
            values: 64,
        }
    }
}

impl MqarConfig {
    /// Checks the vocabulary sizes and that `pairs` fits them and the training length.
    pub fn validate(&self, train_length: usize) -> Result<()> {
        self.check_vocabulary()?;
        check_pairs(self.pairs, self.keys, train_length)
    }

    fn check_vocabulary(&self) -> Result<()> {
        ensure(
            (1..=MAX_KEYS).contains(&self.keys),
            "mqar.keys",
            self.keys,
            &format!("must be in 1..={MAX_KEYS} (the key ids are the bytes A..=~)"),
        )?;
        ensure(
            (1..=MAX_VALUES).contains(&self.values),
            "mqar.values",
            self.values,
            &format!("must be in 1..={MAX_VALUES} (the value ids are the bytes 128..=255)"),
        )
    }

    /// A training item: `1..=pairs` pairs, drawn from `rng`.
    pub fn train_item(&self, length: usize, rng: &mut Rng) -> Result<RetrievalItem> {
        let n = rng.range_inclusive(1, self.pairs as u64) as usize;
        self.item(length, n, rng)
    }

    /// One item of `length` (+1) tokens with exactly `pairs` pairs.
    pub fn item(&self, length: usize, pairs: usize, rng: &mut Rng) -> Result<RetrievalItem> {
        self.check_vocabulary()?;
        check_pairs(pairs, self.keys, length)?;
        let window = length + 1;
        let keys = distinct_sample(self.keys, pairs, rng);
        let values: Vec<u16> = (0..pairs)
            .map(|_| VALUE_BASE + rng.below(self.values as u64) as u16)
            .collect();
        let mut tokens = vec![FILLER; window];
        for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
            tokens[2 * i] = KEY_BASE + k as u16;
            tokens[2 * i + 1] = v;
        }
        // Query slots: `pairs` two-token slots among the `free` filler tokens after the pairs,
        // uniform over placements (stars and bars: choose the slots' ranks among
        // `free + pairs` items).
        let free = window - 4 * pairs;
        let ranks = distinct_sample(free + pairs, pairs, rng);
        let mut ranks = ranks;
        ranks.sort_unstable();
        let order = distinct_sample(pairs, pairs, rng);
        let mut answer_targets = Vec::with_capacity(pairs);
        let mut gaps = Vec::with_capacity(pairs);
        for (slot, (&rank, &pair)) in ranks.iter().zip(&order).enumerate() {
            // `rank - slot` filler tokens precede this slot; `slot` slots of 2 tokens do.
            let position = 2 * pairs + (rank - slot) + 2 * slot;
            tokens[position] = tokens[2 * pair];
            tokens[position + 1] = tokens[2 * pair + 1];
            answer_targets.push(position);
            gaps.push(position - 2 * pair);
        }
        Ok(RetrievalItem {
            tokens,
            answer_targets,
            gaps,
        })
    }
}

/// Checks that `pairs` distinct keys exist and that the pairs and their queries fit `length`
/// (+1) tokens.
fn check_pairs(pairs: usize, keys: usize, length: usize) -> Result<()> {
    ensure(pairs >= 1, "mqar pairs", pairs, "must be at least 1")?;
    ensure(
        pairs <= keys,
        "mqar pairs",
        pairs,
        &format!("is more than the {keys} distinct keys of the vocabulary"),
    )?;
    ensure(
        4 * pairs <= length + 1,
        "mqar pairs",
        pairs,
        &format!(
            "do not fit a window of {length} tokens: the pairs and their queries take 4 tokens each"
        ),
    )
}

/// `k` distinct integers from `0..n` in random order (a partial Fisher–Yates shuffle).
fn distinct_sample(n: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

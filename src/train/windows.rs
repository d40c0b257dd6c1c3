//! The training windows of a language-model run: random windows of the corpus's training
//! stream, with passkey items mixed in (`"passkey"`), or generated MQAR items (`"mqar"`).
//!
//! Window `i` depends only on `(seed, i)`, so a resumed run sees the same data in the same
//! order. The passkey draw and its item come from a stream of their own
//! (`seed ^ PASSKEY_STREAM`), so the corpus windows a passkey run keeps are exactly those of the
//! same run without passkeys.

use std::sync::Arc;

use burn::data::dataset::Dataset;

use crate::data::retrieval::mqar::MqarConfig;
use crate::data::retrieval::passkey::PasskeyConfig;
use crate::data::retrieval::RetrievalItem;
use crate::encoding::RandomizedConfig;
use crate::error::ensure;
use crate::experiment::lm::{sample_positions, Window};
use crate::experiment::stream_seed;
use crate::util::Rng;
use crate::Result;

/// Salt of the passkey stream.
const PASSKEY_STREAM: u64 = 0x9A55_4E71_0000_0003;

/// Salt of the validation items of an MQAR run (disjoint from the training items).
const MQAR_VALID_STREAM: u64 = 0x3DA7_0000_0000_0004;

/// Where the windows come from.
#[derive(Clone, Debug)]
enum Source {
    /// Random offsets of a token stream.
    Corpus(Arc<Vec<u16>>),
    /// Generated MQAR items.
    Mqar(MqarConfig),
}

/// `count` training windows of `length` (+1) tokens; window `i` depends only on `(seed, i)`.
#[derive(Clone, Debug)]
pub struct RandomWindows {
    source: Source,
    length: usize,
    count: usize,
    seed: u64,
    randomized: Option<RandomizedConfig>,
    passkey: Option<PasskeyConfig>,
}

impl RandomWindows {
    /// Windows at random offsets of `stream`, which must hold at least `length + 1` tokens.
    pub fn new(stream: Arc<Vec<u16>>, length: usize, count: usize, seed: u64) -> Result<Self> {
        ensure(
            stream.len() > length,
            "train_length",
            length,
            &format!(
                "the training split holds only {} tokens, too few for one window",
                stream.len()
            ),
        )?;
        Ok(Self {
            source: Source::Corpus(stream),
            length,
            count,
            seed,
            randomized: None,
            passkey: None,
        })
    }

    /// Generated MQAR items of `length` (+1) tokens, the loss on their answers only.
    pub fn mqar(mqar: MqarConfig, length: usize, count: usize, seed: u64) -> Result<Self> {
        mqar.validate(length)?;
        Ok(Self {
            source: Source::Mqar(mqar),
            length,
            count,
            seed,
            randomized: None,
            passkey: None,
        })
    }

    /// Window `i` at randomized positions drawn from `(seed, i)` (a batch takes its first
    /// window's); `None`: at `0..length`.
    pub fn randomized(mut self, randomized: Option<RandomizedConfig>) -> Self {
        self.randomized = randomized;
        self
    }

    /// Replaces a `passkey.fraction` share of the windows by passkey items (a uniform depth,
    /// a fresh key each), the loss on every token as for text.
    pub fn with_passkey(mut self, passkey: Option<PasskeyConfig>) -> Self {
        self.passkey = passkey;
        self
    }

    /// Window `index`'s tokens and loss mask.
    fn tokens(&self, index: usize) -> Option<(Vec<u16>, Option<Vec<bool>>)> {
        if let Some(p) = &self.passkey {
            let mut rng = Rng::new(stream_seed(self.seed ^ PASSKEY_STREAM, index as u64));
            let draw = rng.below(1 << 24) as f64 / f64::from(1 << 24);
            if draw < p.fraction {
                return Some((p.train_item(self.length, &mut rng).ok()?.tokens, None));
            }
        }
        let mut rng = Rng::new(stream_seed(self.seed, index as u64));
        match &self.source {
            Source::Corpus(stream) => {
                let start = rng.below((stream.len() - self.length) as u64) as usize;
                Some((stream[start..start + self.length + 1].to_vec(), None))
            }
            Source::Mqar(mqar) => {
                let item = mqar.train_item(self.length, &mut rng).ok()?;
                Some(masked(item))
            }
        }
    }
}

/// An item's tokens and its answer mask.
fn masked(item: RetrievalItem) -> (Vec<u16>, Option<Vec<bool>>) {
    let mask = item.answer_mask();
    (item.tokens, Some(mask))
}

impl Dataset<Window> for RandomWindows {
    fn get(&self, index: usize) -> Option<Window> {
        if index >= self.count {
            return None;
        }
        let (tokens, mask) = self.tokens(index)?;
        let positions = match &self.randomized {
            Some(r) => Some(sample_positions(r, self.length, self.seed, index as u64).ok()?),
            None => None,
        };
        Some(Window {
            tokens,
            positions,
            mask,
        })
    }

    fn len(&self) -> usize {
        self.count
    }
}

/// Validation windows of an MQAR run at `length`: `count` items with as many pairs as the
/// training items' most (fewer where `length` cannot hold them), the loss on the answers.
pub fn mqar_validation(
    mqar: &MqarConfig,
    length: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Window>> {
    let pairs = mqar.pairs.min((length + 1) / 4).max(1);
    (0..count)
        .map(|i| {
            let mut rng = Rng::new(stream_seed(
                seed ^ MQAR_VALID_STREAM ^ length as u64,
                i as u64,
            ));
            let (tokens, mask) = masked(mqar.item(length, pairs, &mut rng)?);
            Ok(Window {
                tokens,
                positions: None,
                mask,
            })
        })
        .collect()
}

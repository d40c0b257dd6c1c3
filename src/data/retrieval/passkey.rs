//! Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"), in the standard form:
//! repeated filler sentences with one needle at a chosen depth, then the question.
//!
//! An item of `length` (+1) bytes:
//!
//! ```text
//! F[..a] ‖ "The pass key is N. Remember it. N is the pass key. " ‖ F[a..f] ‖ "What is the pass key? The pass key is " ‖ N
//! ```
//!
//! - `F` is [`FILLER`] repeated and cut to the `f` bytes that make the window exactly
//!   `length + 1` bytes; `a = round(depth · f)`, so the needle starts at depth `a / f` of the
//!   filler (the exact depth, within `1 / (2f)` of the one asked for);
//! - `N` is a random number of `digits` digits (the first not 0), the only digits in the item
//!   apart from the answer;
//! - the answer is `N` itself, the item's last `digits` bytes: scored, by exact match of every
//!   digit, at the last `digits` target positions (teacher-forced, which for greedy decoding is
//!   the same verdict: a wrong digit fails the item either way).
//!
//! Training mixes such items, at a uniform depth and the training length, into the corpus's
//! windows (`"passkey": {"fraction": 0.5, "digits": 5}` in an LM config). Half of the windows:
//! at a tenth, a Kerple model of the study's size did not learn the format in 2,000 steps
//! (0% of keys and 10% of digits, chance, at the training length); at half it retrieved
//! every key at the training length.

use serde::{Deserialize, Serialize};

use super::RetrievalItem;
use crate::error::ensure;
use crate::util::Rng;
use crate::Result;

/// The filler sentences, repeated (Mohtashami & Jaggi's haystack).
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// The question after the haystack; the answer follows it.
pub const QUESTION: &str = "What is the pass key? The pass key is ";

/// The most digits a passkey may have.
pub const MAX_DIGITS: usize = 32;

/// The needle that hides passkey `key`.
pub fn needle(key: &str) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// Passkey items mixed into LM training (`"passkey": {"fraction": 0.5, "digits": 5}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasskeyConfig {
    /// Share of training windows replaced by a passkey item, in `(0, 1]`.
    pub fraction: f64,
    /// Digits of the passkey.
    pub digits: usize,
}

impl Default for PasskeyConfig {
    fn default() -> Self {
        Self {
            fraction: 0.5,
            digits: 5,
        }
    }
}

impl PasskeyConfig {
    /// Checks the fraction, the digits, and that an item fits the training length.
    pub fn validate(&self, train_length: usize) -> Result<()> {
        ensure(
            self.fraction > 0.0 && self.fraction <= 1.0,
            "passkey.fraction",
            self.fraction,
            "must be in (0, 1]",
        )?;
        check_digits(self.digits)?;
        check_length(train_length, self.digits)
    }

    /// A training item: a uniform depth and a random passkey, drawn from `rng`.
    pub fn train_item(&self, length: usize, rng: &mut Rng) -> Result<RetrievalItem> {
        let depth = rng.below(1 << 24) as f64 / f64::from(1 << 24);
        Ok(item(length, depth, self.digits, rng)?.item)
    }
}

/// A passkey item and where its parts sit.
#[derive(Clone, Debug, PartialEq)]
pub struct PasskeyItem {
    /// The window and its scored answer digits.
    pub item: RetrievalItem,
    /// The passkey.
    pub key: String,
    /// Index of the needle's first byte.
    pub needle_start: usize,
    /// Filler bytes in the item (`f`).
    pub filler: usize,
    /// The needle's exact depth in the filler, `a / f` (0 when there is no filler).
    pub depth: f64,
}

/// The shortest window (`length`) that holds a needle, the question and a `digits`-digit
/// answer with no filler.
pub fn min_length(digits: usize) -> usize {
    needle(&"0".repeat(digits)).len() + QUESTION.len() + digits - 1
}

fn check_digits(digits: usize) -> Result<()> {
    ensure(
        (1..=MAX_DIGITS).contains(&digits),
        "passkey digits",
        digits,
        &format!("must be in 1..={MAX_DIGITS}"),
    )
}

fn check_length(length: usize, digits: usize) -> Result<()> {
    let min = min_length(digits);
    ensure(
        length >= min,
        "passkey length",
        length,
        &format!("is too short for the needle, the question and a {digits}-digit answer (at least {min})"),
    )
}

/// One item of `length` (+1) bytes with the needle at `depth` (in `0..=1`) of the filler and
/// a random `digits`-digit passkey drawn from `rng`.
pub fn item(length: usize, depth: f64, digits: usize, rng: &mut Rng) -> Result<PasskeyItem> {
    ensure(
        (0.0..=1.0).contains(&depth),
        "passkey depth",
        depth,
        "must be in 0..=1",
    )?;
    check_digits(digits)?;
    check_length(length, digits)?;
    let key: String = (0..digits)
        .map(|i| {
            let d = if i == 0 {
                1 + rng.below(9)
            } else {
                rng.below(10)
            };
            char::from(b'0' + d as u8)
        })
        .collect();
    let needle = needle(&key);
    let filler = length + 1 - needle.len() - QUESTION.len() - digits;
    let haystack: String = FILLER.chars().cycle().take(filler).collect();
    let at = (depth * filler as f64).round() as usize;
    let text = format!(
        "{}{needle}{}{QUESTION}{key}",
        &haystack[..at],
        &haystack[at..]
    );
    debug_assert_eq!(text.len(), length + 1);
    let tokens: Vec<u16> = text.bytes().map(u16::from).collect();
    let first_answer = length - digits; // target t predicts tokens[t + 1]
    let gap = (length - digits) - at;
    Ok(PasskeyItem {
        item: RetrievalItem {
            tokens,
            answer_targets: (first_answer..length).collect(),
            gaps: vec![gap; digits],
        },
        key,
        needle_start: at,
        filler,
        depth: if filler == 0 {
            0.0
        } else {
            at as f64 / filler as f64
        },
    })
}

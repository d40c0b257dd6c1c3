//! Randomized positions (Ruoss et al., ACL 2023, "Randomized Positional Encodings Boost Length
//! Generalization of Transformers"; the DAPE paper's "Randomized RoPE").
//!
//! A sequence of `N` tokens normally sits at positions `0..N`. With randomized positions it sits
//! at a sorted random sample of `N` distinct integers from `0..max_position`, `max_position`
//! much larger than the training length, so that the model meets, during training, every
//! position (and every distance) it will meet on longer test sequences.
//!
//! Which rule this crate follows, from the paper's code (`google-deepmind/
//! randomized_positional_encodings`, `models/transformer.py` and `models/positional_encodings.py`):
//! - one sample per forward pass, shared by every sequence of the batch (the reference draws
//!   one per attention layer for its rotary variant; here every layer of a forward sees the
//!   same positions, the paper's description);
//! - **evaluation samples too**: the reference applies the trained model with a random key at
//!   every test length, so test sequences also sit at a sorted random sample from
//!   `0..max_position` (a test length above `max_position` is an error). The harness draws
//!   those samples from the run's seed and the test length, so an evaluation is reproducible.
//!
//! A [`Positions`] is the absolute position of every token of a sequence; the attention layer
//! carries it in its [`Span`](super::Span), so the rotary tables, the relative offsets of every
//! bias and the absolute tables all read the same numbers, and a KV-cache decode or a chunked
//! forward over the same positions equals the full forward.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{ensure, Error, Result};
use crate::util::Rng;

/// `randomized: {"max_position": M}` in an encoding's JSON: positions of every sequence are a
/// sorted random sample of distinct integers from `0..max_position`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomizedConfig {
    /// Positions are drawn from `0..max_position`; also the longest sequence the model can
    /// take. Ruoss et al. use a range much larger than the training length (2048 for training
    /// lengths up to 40).
    pub max_position: usize,
}

impl RandomizedConfig {
    /// Positions drawn from `0..max_position`.
    pub fn new(max_position: usize) -> Self {
        Self { max_position }
    }

    /// Checks the range.
    pub fn validate(&self) -> Result<()> {
        ensure(
            self.max_position >= 1,
            "randomized.max_position",
            self.max_position,
            "must be at least 1",
        )
    }

    /// An error naming `max_position` unless a sequence of `tokens` tokens (`what` says which)
    /// fits in the range.
    pub fn check_fits(&self, tokens: usize, what: &str) -> Result<()> {
        ensure(
            self.max_position >= tokens,
            "randomized.max_position",
            self.max_position,
            &format!("{what} holds {tokens} tokens; max_position must be at least that"),
        )
    }

    /// The positions of a sequence of `len` tokens drawn from a generator seeded with `seed`
    /// (see [`Positions::sample`]).
    pub fn sample(&self, len: usize, seed: u64) -> Result<Positions> {
        Positions::sample(len, self.max_position, &mut Rng::new(seed))
    }
}

/// The absolute positions of the tokens of a sequence: strictly increasing, non-negative.
/// Cheap to clone (shared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Positions(Arc<[i64]>);

impl Positions {
    /// Checked positions: an error names the first entry that is negative or not above the one
    /// before it.
    pub fn new(positions: Vec<i64>) -> Result<Self> {
        for (i, &p) in positions.iter().enumerate() {
            if p < 0 {
                return Err(Error::invalid(
                    &format!("positions[{i}]"),
                    p,
                    "positions must be non-negative",
                ));
            }
            if i > 0 && p <= positions[i - 1] {
                return Err(Error::invalid(
                    &format!("positions[{i}]"),
                    p,
                    format!(
                        "positions must be strictly increasing; the one before is {}",
                        positions[i - 1]
                    ),
                ));
            }
        }
        Ok(Self(positions.into()))
    }

    /// `0..len`, the positions of a plain forward.
    pub fn sequential(len: usize) -> Self {
        Self((0..len as i64).collect())
    }

    /// A sorted sample of `len` distinct integers from `0..max_position`, every such set equally
    /// likely (Floyd's algorithm), from `rng`. An error if `len > max_position`.
    pub fn sample(len: usize, max_position: usize, rng: &mut Rng) -> Result<Self> {
        if len > max_position {
            return Err(Error::invalid(
                "randomized.max_position",
                max_position,
                format!(
                    "a sequence of {len} tokens needs {len} distinct positions; raise max_position to at least {len}"
                ),
            ));
        }
        let (n, m) = (len as u64, max_position as u64);
        let mut chosen = BTreeSet::new();
        for j in m - n..m {
            let t = rng.range_inclusive(0, j);
            if !chosen.insert(t) {
                chosen.insert(j);
            }
        }
        Ok(Self(chosen.into_iter().map(|p| p as i64).collect()))
    }

    /// The positions, one per token.
    pub fn as_slice(&self) -> &[i64] {
        &self.0
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Positions of tokens `start..start + len`, or an error when there are fewer tokens.
    pub fn window(&self, start: usize, len: usize) -> Result<&[i64]> {
        self.0.get(start..start + len).ok_or_else(|| {
            Error::InvalidInput(format!(
                "positions for tokens {start}..{} were asked of a sequence of {} positions",
                start + len,
                self.0.len()
            ))
        })
    }

    /// A hash of the positions, for names of cached tables.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut h);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_sorted_distinct_in_range_and_seeded() {
        for (len, max) in [(1, 1), (5, 5), (7, 2048), (40, 64), (100, 101)] {
            let a = RandomizedConfig::new(max).sample(len, 3).unwrap();
            let p = a.as_slice();
            assert_eq!(p.len(), len);
            assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
            assert!(p.iter().all(|&x| (0..max as i64).contains(&x)), "{p:?}");
            assert_eq!(a, RandomizedConfig::new(max).sample(len, 3).unwrap());
        }
        // A full range is every position; other seeds give other samples.
        assert_eq!(
            RandomizedConfig::new(6).sample(6, 9).unwrap(),
            Positions::sequential(6)
        );
        let draws: BTreeSet<Vec<i64>> = (0..20)
            .map(|s| {
                RandomizedConfig::new(2048)
                    .sample(8, s)
                    .unwrap()
                    .as_slice()
                    .to_vec()
            })
            .collect();
        assert_eq!(draws.len(), 20);
    }

    #[test]
    fn samples_cover_the_range_uniformly() {
        // Each of 10 positions is in a 3-sample with probability 3/10.
        let mut counts = [0usize; 10];
        let mut rng = Rng::new(1);
        let draws = 20_000;
        for _ in 0..draws {
            for &p in Positions::sample(3, 10, &mut rng).unwrap().as_slice() {
                counts[p as usize] += 1;
            }
        }
        for c in counts {
            let share = c as f64 / draws as f64;
            assert!((share - 0.3).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn bad_positions_and_ranges_are_errors_naming_them() {
        let e = Positions::new(vec![0, 3, 3]).unwrap_err().to_string();
        assert!(
            e.contains("positions[2]") && e.contains("strictly increasing"),
            "{e}"
        );
        let e = Positions::new(vec![-1]).unwrap_err().to_string();
        assert!(e.contains("positions[0]"), "{e}");
        let e = RandomizedConfig::new(8)
            .sample(9, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_position") && e.contains('9'), "{e}");
        assert!(RandomizedConfig::new(0).validate().is_err());
        let p = Positions::sequential(4);
        assert_eq!(p.window(1, 3).unwrap(), &[1, 2, 3]);
        assert!(p.window(2, 3).is_err());
    }
}

//! What training ([`crate::train`]) and evaluation ([`crate::eval`]) share, so that neither
//! reaches into the other: run configs, batches, the per-step loss, and loading a run folder.

pub mod che;
pub mod lm;
pub mod retrieval;

use crate::data::che::Rng;
use crate::error::{ensure, Result};

/// Mixes a seed and an index into an independent stream seed: data item `index` of a run
/// depends only on `(seed, index)`, so a resumed run sees the same data in the same order.
pub fn stream_seed(seed: u64, index: u64) -> u64 {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.next_u64()
}

/// The longest of the training length and the validation lengths.
pub(crate) fn longest(train: usize, valid: &[usize]) -> usize {
    valid.iter().copied().fold(train, usize::max)
}

/// Checks the settings LM and CHE runs share: the gradient-clipping threshold and the
/// validation lengths.
pub(crate) fn validate_shared(grad_clip: f64, valid_lengths: &[usize]) -> Result<()> {
    ensure(grad_clip > 0.0, "grad_clip", grad_clip, "must be positive")?;
    ensure(
        !valid_lengths.is_empty() && valid_lengths.iter().all(|&l| l > 0),
        "valid_lengths",
        format!("{valid_lengths:?}"),
        "must be a non-empty list of positive lengths",
    )
}

//! Stick-breaking attention (Tan et al., ICLR 2025, arXiv 2410.17980), a normaliser of the
//! attention layer in place of the softmax.
//!
//! Row `i` breaks a stick of length 1 over its keys from the nearest outward: key `j` takes the
//! fraction `σ(z_ij)` of what the nearer keys left, so, in log space,
//!
//! ```text
//! log A_ij = log σ(z_ij) − Σ_{j<k<i} softplus(z_ik),     o_i = Σ_j A_ij v_j
//! ```
//!
//! (`log(1 − σ(z)) = −softplus(z)`), with `z` the logits after the encoding's hook. The weights
//! come from [`crate::kernel::stick_breaking`]: one fused pass on ndarray, the tensor path
//! elsewhere. A row's
//! weights sum to at most 1; the rest of the stick goes nowhere. Key `i` itself is on the stick
//! only with `attend_current` (then it breaks first); without it the first token attends to
//! nothing and its output is 0, as in the authors' and fla's reference (`attend_current=False`
//! there too).
//!
//! The sums run over keys between `j` and the query only, so a row's weights depend on the keys
//! it sees and not on how many rows are computed with it: a KV-cache decode step and a query
//! chunk give what the full forward gives. Both `softplus` and `log σ` are taken in the stable
//! form `max(±z, 0) + ln(1 + e^{−|z|})`, and the sum over `k` is a cumulative sum from the
//! query backwards (flip, cumsum, flip), whose terms near the query are summed first: the
//! weights that matter are not the difference of two large sums.
//!
//! Bidirectional layers (the CHE model) break two sticks, one over the keys before the query
//! and one over the keys after it, each outward from the query, and weigh each by ½; the query's
//! own key (with `attend_current`) breaks first on both. This form is this crate's (the paper
//! defines the causal one).

use burn::prelude::*;

use crate::encoding::Span;
use crate::kernel::{stick_breaking, Sticks};

/// Stick-breaking attention in place of the softmax. In JSON: `{"attend_current": false}`
/// (every field optional; an unknown field is an error).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StickBreakingConfig {
    /// Whether a query's own key is on its stick (breaking first). Default `false`, as in the
    /// paper and fla's `naive_stickbreaking_attn`.
    pub attend_current: bool,
}

impl StickBreakingConfig {
    /// The defaults (the query's own key off the stick).
    pub fn new() -> Self {
        Self::default()
    }

    /// With the query's own key on the stick, or not.
    pub fn with_attend_current(mut self, attend_current: bool) -> Self {
        self.attend_current = attend_current;
        self
    }
}

/// The attention weights `[batch, heads, rows, keys]` of the logits `z` of `span` (see the
/// module docs); keys off the stick get exactly 0. One fused pass on ndarray
/// ([`crate::kernel::stick_breaking`]), the tensor path elsewhere.
pub(super) fn stick_breaking_weights<B: Backend>(
    logits: Tensor<B, 4>,
    span: &Span,
    config: &StickBreakingConfig,
) -> Tensor<B, 4> {
    stick_breaking(
        logits,
        Sticks {
            query_start: span.query_start,
            causal: span.causal,
            attend_current: config.attend_current,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// The last rows of a causal span over 8192 keys, with logits up to ±40, against the stick
    /// broken key by key in f64: finite, and equal where the weights are not negligible.
    #[test]
    fn stable_at_8192_keys_with_saturated_logits() {
        let keys = 8192;
        let rows = 2;
        let span = Span {
            query_start: keys - rows,
            query_len: rows,
            key_len: keys,
            causal: true,
            positions: None,
        };
        let mut state = 7u64;
        let z: Vec<f32> = (0..rows * keys)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Mostly strongly negative (the stick survives far), now and then saturated.
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                if u < 0.02 {
                    40.0 * u / 0.02
                } else {
                    -8.0 - 32.0 * u
                }
            })
            .collect();
        let logits = Tensor::<B, 1>::from_floats(z.as_slice(), &Default::default())
            .reshape([1, 1, rows, keys]);
        let got: Vec<f32> = stick_breaking_weights(logits, &span, &StickBreakingConfig::new())
            .into_data()
            .to_vec()
            .unwrap();
        assert!(got.iter().all(|w| w.is_finite() && *w >= 0.0));
        for r in 0..rows {
            let i = keys - rows + r;
            let mut left = 1.0f64;
            let mut sum = 0.0f32;
            for j in (0..i).rev() {
                let zz = f64::from(z[r * keys + j]);
                let take = left / (1.0 + (-zz).exp());
                left -= take;
                let g = got[r * keys + j];
                sum += g;
                assert!(
                    (f64::from(g) - take).abs() <= 1e-4 * take + 1e-7,
                    "row {i}, key {j}: {g} vs {take}"
                );
            }
            assert!(sum <= 1.0 + 1e-5, "row {i} sums to {sum}");
            assert_eq!(
                got[r * keys + i],
                0.0,
                "row {i}: its own key is off the stick"
            );
        }
    }
}

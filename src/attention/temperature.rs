//! Attention temperature tuning (Llama 4, on its NoPE layers): the query of the token at
//! position `p` is multiplied by
//!
//! ```text
//! 1 + α · ln(1 + ⌊(p + 1) / F⌋)
//! ```
//!
//! so that attention sharpens as the context grows past multiples of `F`. Llama 4 uses α = 0.1
//! and F = 8192. This crate's studies train at 128 tokens and test to 8192, where F = 8192 would
//! leave the factor at 1 for every length tested. `configs/lm/irope.json` therefore sets F to the
//! training length, so the factor is 1 inside training and grows beyond it. The factor depends
//! only on the query's own position, so decoding and chunks stay exact.

use burn::prelude::*;

/// Temperature tuning. In JSON: `{"alpha": 0.1, "floor": 8192}` (every field optional; an
/// unknown field is an error).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemperatureConfig {
    /// α, the strength (Llama 4: 0.1). Finite and at least 0.
    pub alpha: f64,
    /// F, the position scale (Llama 4: 8192). At least 1.
    pub floor: usize,
}

impl Default for TemperatureConfig {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            floor: 8192,
        }
    }
}

impl TemperatureConfig {
    /// Llama 4's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// With another α.
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// With another F.
    pub fn with_floor(mut self, floor: usize) -> Self {
        self.floor = floor;
        self
    }

    /// The factor of the query at position `p`.
    pub fn factor(&self, p: usize) -> f64 {
        1.0 + self.alpha * (1.0 + ((p + 1) / self.floor.max(1)) as f64).ln()
    }

    /// The factors `[1, 1, len, 1]` of the queries at positions `start..start + len`.
    pub(super) fn factors<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let f: Vec<f32> = (start..start + len)
            .map(|p| self.factor(p) as f32)
            .collect();
        Tensor::<B, 1>::from_floats(f.as_slice(), device).reshape([1, 1, len, 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama4_factors() {
        let t = TemperatureConfig::new();
        // ⌊(p + 1) / 8192⌋ is 0 up to p = 8190, 1 from p = 8191.
        assert_eq!(t.factor(0), 1.0);
        assert_eq!(t.factor(8190), 1.0);
        assert!((t.factor(8191) - (1.0 + 0.1 * 2f64.ln())).abs() < 1e-12);
        assert!((t.factor(3 * 8192 - 1) - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-12);
        let short = TemperatureConfig::new().with_floor(128).with_alpha(0.5);
        assert_eq!(short.factor(126), 1.0);
        assert!((short.factor(255) - (1.0 + 0.5 * 3f64.ln())).abs() < 1e-12);
    }
}

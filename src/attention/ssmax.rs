//! Scalable-Softmax, an option of the attention layer: row `i`'s logits times `s_h · ln n_i`.

use burn::module::Param;
use burn::prelude::*;

use crate::encoding::Span;
use crate::error::{ensure, Result};

/// 2501.19399): the softmax of row `i` reads `(s_h · ln n_i) · z_ij` instead of `z_ij`, where
/// `z` are the logits after the encoding's hook (scaled `QKᵀ`, plus any bias), `n_i` is the
/// number of keys row `i` sees (`i + 1` under the causal mask, all keys otherwise) and `s_h` is
/// a learned scale per head. It keeps attention from flattening as the context grows.
///
/// It depends on a row's absolute position only through `n_i`, so a KV-cache decode step and a
/// query chunk give what the full forward gives. A row that sees one key gets the factor 0,
/// which changes nothing (its softmax is 1 either way).
///
/// In JSON: `{"init_length": 256}` (every field optional; an unknown field is an error).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SsmaxConfig {
    /// Each `s_h` starts at `1 / ln(init_length)`, so that a row seeing `init_length` keys
    /// starts with the plain softmax (the paper learns `s` per head and layer; this makes its
    /// starting point explicit). At least 2; default 256.
    pub init_length: usize,
}

impl Default for SsmaxConfig {
    fn default() -> Self {
        Self { init_length: 256 }
    }
}

impl SsmaxConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// With another `init_length`.
    pub fn with_init_length(mut self, init_length: usize) -> Self {
        self.init_length = init_length;
        self
    }

    /// The per-head scales `[n_heads]`, or an error naming a bad `init_length`.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, 1>>> {
        ensure(
            self.init_length >= 2,
            "ssmax.init_length",
            self.init_length,
            "must be at least 2 (ln 1 = 0)",
        )?;
        let s = 1.0 / (self.init_length as f64).ln();
        Ok(Param::from_tensor(Tensor::full([n_heads], s, device)))
    }
}

/// `s_h · ln n_i` as `[1, heads, rows, 1]` for the rows of `span`.
pub(super) fn ssmax_factor<B: Backend>(
    s: Tensor<B, 1>,
    span: &Span,
    device: &B::Device,
) -> Tensor<B, 4> {
    let heads = s.dims()[0];
    let ln_n: Vec<f32> = (0..span.query_len)
        .map(|r| (span.visible_keys(r) as f32).ln())
        .collect();
    let ln_n =
        Tensor::<B, 1>::from_floats(ln_n.as_slice(), device).reshape([1, 1, span.query_len, 1]);
    s.reshape([1, heads, 1, 1]) * ln_n
}

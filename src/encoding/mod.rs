//! Positional encodings: one family per file, one config enum to name them all.
//!
//! | family | file | where it acts |
//! | --- | --- | --- |
//! | NoPE, sinusoidal, learned | [`absolute`] | added to the token embeddings before the first block |
//! | RoPE (+ linear, NTK, dynamic NTK, YaRN), xPos | [`rotary`] | rotates `q` and `k` by absolute position |
//! | T5, ALiBi, Kerple, FIRE | [`bias`] | adds a data-independent `B[h, i, j]` to the logits |
//! | Shaw | [`shaw`] | adds `q_i · a_clip(j-i) / sqrt(d_head)` |
//! | CoPE | [`cope`] | adds `q_i · e(p_ij)` with contextual positions `p_ij` |
//! | Sandwich | [`sandwich`] | adds `(Σ_k cos((i-j)/10000^(2k/d')) - d'/2) / r_h` (a data-independent bias) |
//! | Transformer-XL | [`transformer_xl`] | adds `(u·k_j + (q_i + v)·W_R R_(i-j)) / sqrt(d_head)` |
//! | DAPE, DAPE V2 | [`dape`] | `A + B + f([A ‖ B])` with an MLP (V1) or 1×k convolutions (V2); `B` is any bias above (T5, ALiBi, Kerple, FIRE, Sandwich) |
//! | Forgetting attention, DAPE over it | [`fox`] | adds `D_ij = Σ_{l=j+1..i} ln σ(w_h·x_l + b_h)` from the layer's input `x` (a data-dependent bias); `dape_fox`: `A + D + f([A ‖ D])` |
//! | BiPE (ALiBi, RoPE) | [`bipe`] | in-segment positions added to the token embeddings; ALiBi bias or RoPE rotation by segment index |
//!
//! All logit hooks receive *scaled* logits `A = QKᵀ/√d_head` of shape
//! `[batch, heads, queries, keys]` before the causal mask, together with a [`Span`] that says
//! which absolute positions the rows and columns hold (so a KV-cache decode step or a query chunk
//! sees exactly what the full forward sees). BiPE's hooks also receive the segment indices of
//! the rows and columns ([`SegmentIds`]), computed by the model from the token ids. Forgetting
//! attention's hook ([`Hook::InputGate`]) reads the attention layer's input: the layer computes
//! the gates' cumulative sums from it ([`PositionalEncoding::forget_gate`]) and hands the bias
//! to [`PositionalEncoding::adjust_logits_gated`].

pub mod absolute;
pub mod bias;
pub mod bipe;
pub mod cache;
pub mod cope;
pub mod dape;
pub mod fox;
pub mod positions;
pub mod rotary;
pub mod sandwich;
pub mod shaw;
pub mod transformer_xl;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ensure, Error, Result};
pub use absolute::{LearnedConfig, LearnedPositions, NoPe, Sinusoidal, SinusoidalConfig};
pub use bias::{
    AdditiveBias, Alibi, AlibiConfig, Fire, FireActivation, FireConfig, Kerple, KerpleConfig,
    KerpleKind, T5Bias, T5Config,
};
pub use bipe::{Bipe, BipeConfig, BipeInter, SegmentIds, SegmentState, Segments};
pub use cache::{clear_table_cache, table_cache_stats, TableCacheStats};
pub use cope::{Cope, CopeConfig};
pub use dape::{Dape, DapeConfig, DapeV2, DapeV2Config};
pub use fox::{DapeFox, Fox, FoxConfig};
pub use positions::{Positions, RandomizedConfig};
pub use rotary::{RopeConfig, RopeLayout, RopeScaling, Rotary, XposConfig};
pub use sandwich::{Sandwich, SandwichConfig};
pub use shaw::{Shaw, ShawConfig};
pub use transformer_xl::{TransformerXl, TransformerXlConfig};

/// Implements `Default` as `Config::new()` for configs whose fields all have defaults.
macro_rules! default_from_new {
    ($($t:ty),* $(,)?) => {
        $(impl Default for $t {
            fn default() -> Self {
                <$t>::new()
            }
        })*
    };
}
pub(crate) use default_from_new;

/// Which absolute positions a block of attention logits covers.
///
/// Rows are the queries of tokens `query_start .. query_start + query_len`; columns are the keys
/// of tokens `0 .. key_len`. A full forward has `query_start = 0` and `key_len = query_len`; a
/// KV-cache decode step has `query_len = 1` and `key_len = query_start + 1`; a causal query
/// chunk stops its keys after its last row. Token `t` sits at position `t`, or at
/// `positions[t]` with [randomized positions](positions) (then every offset, distance and
/// rotary angle is taken between those positions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Index of the token of the first query row.
    pub query_start: usize,
    /// Number of query rows.
    pub query_len: usize,
    /// Number of key columns (the keys of tokens `0..key_len`).
    pub key_len: usize,
    /// Whether attention is causal (keys after a row's own token are masked).
    pub causal: bool,
    /// The position of every token, at least `query_start + query_len` and `key_len` of them;
    /// `None`: token `t` is at position `t`.
    pub positions: Option<Positions>,
}

impl Span {
    /// The span of a full causal forward over `len` tokens.
    pub fn full(len: usize) -> Self {
        Self {
            query_start: 0,
            query_len: len,
            key_len: len,
            causal: true,
            positions: None,
        }
    }

    /// The same span with the tokens at `positions` (`None`: at their indices).
    pub fn with_positions(mut self, positions: Option<Positions>) -> Self {
        self.positions = positions;
        self
    }

    /// The position of token `t`.
    ///
    /// # Panics
    ///
    /// If the span's positions have no entry `t` (the attention layer checks their length).
    pub fn position(&self, t: usize) -> i64 {
        self.positions
            .as_ref()
            .map_or(t as i64, |p| p.as_slice()[t])
    }

    /// The positions of the query rows.
    pub fn query_position_values(&self) -> Vec<i64> {
        (self.query_start..self.query_start + self.query_len)
            .map(|t| self.position(t))
            .collect()
    }

    /// The positions of the key columns.
    pub fn key_position_values(&self) -> Vec<i64> {
        (0..self.key_len).map(|t| self.position(t)).collect()
    }

    /// The smallest and largest offset `i - j` between a row's and a column's position in this
    /// block (future columns included); `(0, 0)` for a block without rows or columns.
    pub fn offset_range(&self) -> (i64, i64) {
        if self.query_len == 0 || self.key_len == 0 {
            return (0, 0);
        }
        let last_row = self.query_start + self.query_len - 1;
        (
            self.position(self.query_start) - self.position(self.key_len - 1),
            self.position(last_row) - self.position(0),
        )
    }

    /// Query positions `i` broadcast over keys: `[queries, keys]`.
    pub fn query_positions<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let rows = self.query_position_values();
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [self.query_len]), device)
            .reshape([self.query_len, 1])
            .expand([self.query_len, self.key_len])
    }

    /// Key positions `j` broadcast over queries: `[queries, keys]`.
    pub fn key_positions<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let cols = self.key_position_values();
        Tensor::<B, 1, Int>::from_data(TensorData::new(cols, [self.key_len]), device)
            .reshape([1, self.key_len])
            .expand([self.query_len, self.key_len])
    }

    /// A name for this span in table-cache keys.
    pub(crate) fn cache_key(&self) -> String {
        format!(
            "{}+{}x{}{}{}",
            self.query_start,
            self.query_len,
            self.key_len,
            if self.causal { "c" } else { "" },
            self.positions
                .as_ref()
                .map_or(String::new(), |p| format!(" at {:x}", p.fingerprint()))
        )
    }

    /// Relative offsets `i - j` as integers: `[queries, keys]`. Cached per span.
    pub fn offsets<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        cache::cached::<B, _>(
            device,
            || format!("offsets {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.query_positions::<B>(device) - self.key_positions::<B>(device),
        )
    }

    /// Signed distance `i - j` as floats: `[queries, keys]`. Cached per span.
    pub fn signed_distance<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        cache::cached::<B, _>(
            device,
            || format!("signed_distance {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.offsets::<B>(device).float(),
        )
    }

    /// Distance `|i - j|` as floats: `[queries, keys]`. Finite everywhere, also at future keys.
    /// Cached per span.
    pub fn distance<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        cache::cached::<B, _>(
            device,
            || format!("distance {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.signed_distance::<B>(device).abs(),
        )
    }

    /// `true` where the key lies in the future of the query (`j > i`): `[queries, keys]`.
    /// Cached per span. Positions increase with the token index, so this is the same mask with
    /// randomized positions.
    pub fn future_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Bool> {
        cache::cached::<B, _>(
            device,
            || format!("future_mask {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.offsets::<B>(device).lower_elem(0),
        )
    }

    /// How many keys row `row` of this block sees: up to its own position under the causal
    /// mask, all of them otherwise.
    pub fn visible_keys(&self, row: usize) -> usize {
        if self.causal {
            (self.query_start + row + 1).min(self.key_len)
        } else {
            self.key_len
        }
    }

    /// Whether any entry of this block lies in the future (and needs masking).
    pub fn has_future(&self) -> bool {
        self.causal && self.query_start + 1 < self.key_len
    }
}

/// Configuration of any positional encoding. Serialises as `{"type": "<name>", ...fields}`.
///
/// Build one from its name with [`PositionalEncodingConfig::from_name`] (all defaults), from JSON
/// with [`PositionalEncodingConfig::from_json`], or directly from its variant.
/// DAPE variants carry their base bias under `bias` and DAPE's own settings under `dape`:
/// `{"type": "dape_kerple_log", "dape": {"mlp_width": 32}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum PositionalEncodingConfig {
    /// No positional encoding.
    Nope,
    /// Fixed sinusoidal absolute positions (Vaswani et al., 2017).
    Sinusoidal(SinusoidalConfig),
    /// Learned absolute position embeddings.
    Learned(LearnedConfig),
    /// RoPE (Su et al., 2021) without frequency scaling.
    Rope(RopeConfig),
    /// RoPE with linear position interpolation (Chen et al., 2023).
    RopeLinear(RopeConfig),
    /// RoPE with NTK-aware base scaling.
    RopeNtk(RopeConfig),
    /// RoPE with dynamic NTK scaling (base grows with the sequence length seen).
    RopeDynamicNtk(RopeConfig),
    /// RoPE with YaRN scaling and attention factor (Peng et al., 2023).
    RopeYarn(RopeConfig),
    /// xPos (Sun et al., 2022): RoPE with exponential decay.
    Xpos(XposConfig),
    /// T5 bucketed relative bias (Raffel et al., 2020).
    T5(T5Config),
    /// ALiBi (Press et al., 2022).
    Alibi(AlibiConfig),
    /// Kerple logarithmic kernel (Chi et al., 2022).
    KerpleLog(KerpleConfig),
    /// Kerple power kernel (Chi et al., 2022).
    KerplePower(KerpleConfig),
    /// FIRE (Li et al., 2024).
    Fire(FireConfig),
    /// Shaw et al. (2018) clipped relative keys.
    Shaw(ShawConfig),
    /// CoPE (Golovneva et al., 2024).
    Cope(CopeConfig),
    /// Sandwich (Chi et al., 2023): shifted inner products of sinusoids as a bias.
    Sandwich(SandwichConfig),
    /// Transformer-XL relative positions (Dai et al., 2019).
    TransformerXl(TransformerXlConfig),
    /// BiPE-ALiBi (He et al., 2024): in-segment sinusoids + ALiBi over segment indices.
    BipeAlibi {
        #[serde(default)]
        segments: BipeConfig,
        #[serde(default)]
        alibi: AlibiConfig,
    },
    /// BiPE-RoPE (He et al., 2024): in-segment sinusoids + RoPE over segment indices. `rope`
    /// sets the base, layout and rotary fraction; its scaling fields are not used (plain RoPE).
    BipeRope {
        #[serde(default)]
        segments: BipeConfig,
        #[serde(default)]
        rope: RopeConfig,
    },
    DapeNope {
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeAlibi {
        #[serde(default)]
        bias: AlibiConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeKerpleLog {
        #[serde(default)]
        bias: KerpleConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeKerplePower {
        #[serde(default)]
        bias: KerpleConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeFire {
        #[serde(default = "FireConfig::for_dape")]
        bias: FireConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeT5 {
        #[serde(default)]
        bias: T5Config,
        #[serde(default)]
        dape: DapeConfig,
    },
    DapeSandwich {
        #[serde(default)]
        bias: SandwichConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    Dapev2Nope {
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2Alibi {
        #[serde(default)]
        bias: AlibiConfig,
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2KerpleLog {
        #[serde(default)]
        bias: KerpleConfig,
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2KerplePower {
        #[serde(default)]
        bias: KerpleConfig,
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2Fire {
        #[serde(default = "FireConfig::for_dape")]
        bias: FireConfig,
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2T5 {
        #[serde(default)]
        bias: T5Config,
        #[serde(default)]
        dape: DapeV2Config,
    },
    Dapev2Sandwich {
        #[serde(default)]
        bias: SandwichConfig,
        #[serde(default)]
        dape: DapeV2Config,
    },
    /// Forgetting attention (Lin et al., 2025): a data-dependent decay bias from a forget gate
    /// on the layer's input.
    Fox(FoxConfig),
    /// DAPE V1 over forgetting attention's bias.
    DapeFox {
        #[serde(default)]
        fox: FoxConfig,
        #[serde(default)]
        dape: DapeConfig,
    },
    /// Any encoding driven by integer positions, at randomized positions (Ruoss et al., 2023):
    /// `{"type": "rope", "randomized": {"max_position": 2048}}` in JSON. Build it with
    /// [`PositionalEncodingConfig::with_randomized`], which checks that the encoding takes it.
    #[serde(skip)]
    Randomized {
        base: Box<PositionalEncodingConfig>,
        randomized: RandomizedConfig,
    },
}

/// A data-independent additive bias, as the base of a DAPE variant or on its own.
#[derive(Clone, Debug, PartialEq)]
pub enum BiasConfig {
    /// ALiBi.
    Alibi(AlibiConfig),
    /// Kerple log.
    KerpleLog(KerpleConfig),
    /// Kerple power.
    KerplePower(KerpleConfig),
    /// FIRE.
    Fire(FireConfig),
    /// T5 buckets.
    T5(T5Config),
    /// Sandwich.
    Sandwich(SandwichConfig),
}

/// Which DAPE function sits on top of a base bias.
#[derive(Clone, Debug, PartialEq)]
pub enum DapeKind {
    /// DAPE V1 (MLP over heads, pointwise in (i, j)).
    V1(DapeConfig),
    /// DAPE V2 (1×k convolutions along the key axis).
    V2(DapeV2Config),
}

/// Where an encoding acts on the attention computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Nothing at all (NoPE).
    None,
    /// Added to the token embeddings before the first block.
    Embedding,
    /// Rotates queries and keys.
    Rotary,
    /// Acts on the scaled logits.
    Logits,
    /// BiPE: in-segment positions on the token embeddings (from the token ids), and a relative
    /// encoding over segment indices in attention (logits or rotation).
    Segments,
    /// Acts on the scaled logits with a bias computed from the attention layer's input `x`
    /// (forgetting attention's gates), so the layer hands the encoding its input.
    InputGate,
}

/// Every encoding name that [`PositionalEncodingConfig::from_name`] accepts.
pub const ENCODING_NAMES: &[&str] = &[
    "nope",
    "sinusoidal",
    "learned",
    "rope",
    "rope_linear",
    "rope_ntk",
    "rope_dynamic_ntk",
    "rope_yarn",
    "xpos",
    "t5",
    "alibi",
    "kerple_log",
    "kerple_power",
    "fire",
    "shaw",
    "cope",
    "sandwich",
    "transformer_xl",
    "bipe_alibi",
    "bipe_rope",
    "dape_nope",
    "dape_alibi",
    "dape_kerple_log",
    "dape_kerple_power",
    "dape_fire",
    "dape_t5",
    "dape_sandwich",
    "dapev2_nope",
    "dapev2_alibi",
    "dapev2_kerple_log",
    "dapev2_kerple_power",
    "dapev2_fire",
    "dapev2_t5",
    "dapev2_sandwich",
    "fox",
    "dape_fox",
];

impl PositionalEncodingConfig {
    /// The config of the encoding `name` (see [`ENCODING_NAMES`]) with all defaults.
    pub fn from_name(name: &str) -> Result<Self> {
        use PositionalEncodingConfig as C;
        Ok(match name {
            "nope" => C::Nope,
            "sinusoidal" => C::Sinusoidal(Default::default()),
            "learned" => C::Learned(Default::default()),
            "rope" => C::Rope(Default::default()),
            "rope_linear" => C::RopeLinear(Default::default()),
            "rope_ntk" => C::RopeNtk(Default::default()),
            "rope_dynamic_ntk" => C::RopeDynamicNtk(Default::default()),
            "rope_yarn" => C::RopeYarn(Default::default()),
            "xpos" => C::Xpos(Default::default()),
            "t5" => C::T5(Default::default()),
            "alibi" => C::Alibi(Default::default()),
            "kerple_log" => C::KerpleLog(Default::default()),
            "kerple_power" => C::KerplePower(Default::default()),
            "fire" => C::Fire(Default::default()),
            "shaw" => C::Shaw(Default::default()),
            "cope" => C::Cope(Default::default()),
            "sandwich" => C::Sandwich(Default::default()),
            "transformer_xl" => C::TransformerXl(Default::default()),
            "bipe_alibi" => C::BipeAlibi {
                segments: Default::default(),
                alibi: Default::default(),
            },
            "bipe_rope" => C::BipeRope {
                segments: Default::default(),
                rope: Default::default(),
            },
            "dape_nope" => C::DapeNope {
                dape: Default::default(),
            },
            "dape_alibi" => C::DapeAlibi {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dape_kerple_log" => C::DapeKerpleLog {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dape_kerple_power" => C::DapeKerplePower {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dape_fire" => C::DapeFire {
                bias: FireConfig::for_dape(),
                dape: Default::default(),
            },
            "dape_t5" => C::DapeT5 {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dape_sandwich" => C::DapeSandwich {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dapev2_nope" => C::Dapev2Nope {
                dape: Default::default(),
            },
            "dapev2_alibi" => C::Dapev2Alibi {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dapev2_kerple_log" => C::Dapev2KerpleLog {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dapev2_kerple_power" => C::Dapev2KerplePower {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dapev2_fire" => C::Dapev2Fire {
                bias: FireConfig::for_dape(),
                dape: Default::default(),
            },
            "dapev2_t5" => C::Dapev2T5 {
                bias: Default::default(),
                dape: Default::default(),
            },
            "dapev2_sandwich" => C::Dapev2Sandwich {
                bias: Default::default(),
                dape: Default::default(),
            },
            "fox" => C::Fox(Default::default()),
            "dape_fox" => C::DapeFox {
                fox: Default::default(),
                dape: Default::default(),
            },
            _ => {
                return Err(Error::UnknownEncoding {
                    name: name.to_string(),
                    known: ENCODING_NAMES.join(", "),
                })
            }
        })
    }

    /// Parses a JSON config such as `{"type": "dape_kerple_log", "dape": {"mlp_width": 64}}`.
    /// Fields left out take their defaults; unknown names and fields are errors.
    pub fn from_json(json: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(json)?;
        Self::from_value(value)
    }

    /// Parses a JSON value: the `type` names the encoding, the other fields override its
    /// defaults. Unknown names give [`Error::UnknownEncoding`]; unknown fields an
    /// [`Error::InvalidConfig`] naming them.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let name = match &value {
            serde_json::Value::String(name) => name.clone(),
            serde_json::Value::Object(map) => match map.get("type") {
                Some(serde_json::Value::String(name)) => name.clone(),
                other => {
                    return Err(Error::invalid(
                        "type",
                        other.map_or("(missing)".to_string(), |v| v.to_string()),
                        "an encoding config needs a string `type` naming the encoding",
                    ))
                }
            },
            other => {
                return Err(Error::invalid(
                    "encoding",
                    other,
                    "expected an encoding name or an object with a `type`",
                ))
            }
        };
        let mut value = value;
        let randomized = match &mut value {
            serde_json::Value::Object(map) => map.remove("randomized"),
            _ => None,
        };
        let mut merged = Self::to_value(&Self::from_name(&name)?);
        if value.is_object() {
            overlay(&mut merged, value, &name)?;
        }
        let config = Self::deserialize(merged)?;
        match randomized {
            None | Some(serde_json::Value::Null) => Ok(config),
            Some(r) => {
                let r: RandomizedConfig = serde_json::from_value(r.clone()).map_err(|e| {
                    Error::invalid(
                        &format!("{name}.randomized"),
                        r,
                        format!("expected {{\"max_position\": M}}: {e}"),
                    )
                })?;
                config.with_randomized(Some(r))
            }
        }
    }

    fn to_value(&self) -> serde_json::Value {
        if let Self::Randomized { base, randomized } = self {
            let mut value = base.to_value();
            if let serde_json::Value::Object(map) = &mut value {
                map.insert(
                    "randomized".into(),
                    serde_json::to_value(randomized).expect("a randomized config serialises"),
                );
            }
            return value;
        }
        Self::serialize(self, serde_json::value::Serializer)
            .expect("encoding configs serialise to JSON")
    }

    /// The encoding itself, without its randomized positions.
    pub fn base(&self) -> &Self {
        match self {
            Self::Randomized { base, .. } => base,
            other => other,
        }
    }

    /// The randomized-position setting; `None` when tokens sit at `0..N`.
    pub fn randomized(&self) -> Option<&RandomizedConfig> {
        match self {
            Self::Randomized { randomized, .. } => Some(randomized),
            _ => None,
        }
    }

    /// Whether the encoding is driven by integer positions, so that it can take randomized
    /// positions: the absolute encodings, the rotary family, the position-driven biases (T5,
    /// ALiBi, Kerple, FIRE, Sandwich, Shaw, Transformer-XL) and DAPE over any of these biases.
    /// Not NoPE, CoPE (contextual positions), BiPE (segment indices), forgetting attention
    /// (data-dependent), nor DAPE over NoPE or forgetting attention.
    pub fn takes_randomized(&self) -> bool {
        use PositionalEncodingConfig as C;
        match self.base() {
            C::Nope | C::Cope(_) | C::BipeAlibi { .. } | C::BipeRope { .. } => false,
            C::Fox(_) | C::DapeFox { .. } => false,
            c if c.dape_parts().is_some() => c.dape_parts().is_some_and(|(bias, _)| bias.is_some()),
            _ => true,
        }
    }

    /// The same encoding at randomized positions (`None`: at `0..N`). An error naming the
    /// encoding when it is not driven by integer positions ([`Self::takes_randomized`]), for a
    /// `max_position` of 0, and for learned positions whose table is shorter than
    /// `max_position`.
    pub fn with_randomized(self, randomized: Option<RandomizedConfig>) -> Result<Self> {
        let base = match self {
            Self::Randomized { base, .. } => *base,
            other => other,
        };
        let Some(randomized) = randomized else {
            return Ok(base);
        };
        randomized.validate()?;
        if !base.takes_randomized() {
            let takers: Vec<&str> = ENCODING_NAMES
                .iter()
                .copied()
                .filter(|n| Self::from_name(n).is_ok_and(|c| c.takes_randomized()))
                .collect();
            return Err(Error::invalid(
                "randomized",
                base.name(),
                format!(
                    "this encoding is not driven by integer positions, so it cannot take randomized positions; those that can: {}",
                    takers.join(", ")
                ),
            ));
        }
        if let Self::Learned(l) = &base {
            ensure(
                randomized.max_position <= l.max_len,
                "randomized.max_position",
                randomized.max_position,
                &format!(
                    "learned positions have a table of max_len = {} rows; max_position may not exceed it",
                    l.max_len
                ),
            )?;
        }
        Ok(Self::Randomized {
            base: Box::new(base),
            randomized,
        })
    }

    /// A name for runs, tables and plots: [`Self::name`], with `+randomized` at randomized
    /// positions.
    pub fn label(&self) -> String {
        match self.randomized() {
            Some(_) => format!("{}+randomized", self.name()),
            None => self.name(),
        }
    }

    /// The snake_case name of this encoding (its `type` tag).
    pub fn name(&self) -> String {
        self.to_value()
            .get("type")
            .and_then(|t| t.as_str())
            .map_or_else(|| "nope".to_string(), str::to_string)
    }

    /// Where this encoding acts.
    pub fn hook(&self) -> Hook {
        use PositionalEncodingConfig as C;
        match self.base() {
            C::Nope => Hook::None,
            C::Sinusoidal(_) | C::Learned(_) => Hook::Embedding,
            C::Rope(_)
            | C::RopeLinear(_)
            | C::RopeNtk(_)
            | C::RopeDynamicNtk(_)
            | C::RopeYarn(_)
            | C::Xpos(_) => Hook::Rotary,
            C::BipeAlibi { .. } | C::BipeRope { .. } => Hook::Segments,
            C::Fox(_) | C::DapeFox { .. } => Hook::InputGate,
            _ => Hook::Logits,
        }
    }

    /// Whether DAPE's MLP runs over every (query, key) pair (DAPE V1 and V2 over any base, and
    /// over forgetting attention).
    pub fn is_dape(&self) -> bool {
        self.dape_parts().is_some() || matches!(self.base(), Self::DapeFox { .. })
    }

    /// The base bias and DAPE function of a DAPE variant; `None` for other encodings.
    /// The bias is `None` for DAPE over NoPE.
    pub fn dape_parts(&self) -> Option<(Option<BiasConfig>, DapeKind)> {
        use PositionalEncodingConfig as C;
        let v1 = |d: &DapeConfig| DapeKind::V1(d.clone());
        let v2 = |d: &DapeV2Config| DapeKind::V2(d.clone());
        Some(match self.base() {
            C::DapeNope { dape } => (None, v1(dape)),
            C::DapeAlibi { bias, dape } => (Some(BiasConfig::Alibi(bias.clone())), v1(dape)),
            C::DapeKerpleLog { bias, dape } => {
                (Some(BiasConfig::KerpleLog(bias.clone())), v1(dape))
            }
            C::DapeKerplePower { bias, dape } => {
                (Some(BiasConfig::KerplePower(bias.clone())), v1(dape))
            }
            C::DapeFire { bias, dape } => (Some(BiasConfig::Fire(bias.clone())), v1(dape)),
            C::DapeT5 { bias, dape } => (Some(BiasConfig::T5(bias.clone())), v1(dape)),
            C::DapeSandwich { bias, dape } => (Some(BiasConfig::Sandwich(bias.clone())), v1(dape)),
            C::Dapev2Nope { dape } => (None, v2(dape)),
            C::Dapev2Alibi { bias, dape } => (Some(BiasConfig::Alibi(bias.clone())), v2(dape)),
            C::Dapev2KerpleLog { bias, dape } => {
                (Some(BiasConfig::KerpleLog(bias.clone())), v2(dape))
            }
            C::Dapev2KerplePower { bias, dape } => {
                (Some(BiasConfig::KerplePower(bias.clone())), v2(dape))
            }
            C::Dapev2Fire { bias, dape } => (Some(BiasConfig::Fire(bias.clone())), v2(dape)),
            C::Dapev2T5 { bias, dape } => (Some(BiasConfig::T5(bias.clone())), v2(dape)),
            C::Dapev2Sandwich { bias, dape } => {
                (Some(BiasConfig::Sandwich(bias.clone())), v2(dape))
            }
            _ => return None,
        })
    }

    /// Builds the module for attention with `n_heads` heads of size `head_dim`.
    /// Absolute encodings act on `d_model = n_heads * head_dim` features.
    pub fn init<B: Backend>(
        &self,
        n_heads: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Result<PositionalEncoding<B>> {
        use PositionalEncoding as P;
        use PositionalEncodingConfig as C;
        ensure(n_heads > 0, "n_heads", n_heads, "must be at least 1")?;
        ensure(head_dim > 0, "head_dim", head_dim, "must be at least 1")?;
        let d_model = n_heads * head_dim;
        if let Self::Randomized { base, .. } = self {
            return base.init(n_heads, head_dim, device);
        }
        if let Some((bias, kind)) = self.dape_parts() {
            let bias = bias.map(|b| b.init::<B>(n_heads, device)).transpose()?;
            return Ok(match kind {
                DapeKind::V1(c) => P::Dape(c.init(n_heads, bias, device)?),
                DapeKind::V2(c) => P::DapeV2(c.init(n_heads, bias, device)?),
            });
        }
        Ok(match self {
            C::Nope => P::Nope(NoPe),
            C::Sinusoidal(c) => P::Sinusoidal(c.init(d_model)?),
            C::Learned(c) => P::Learned(c.init(d_model, device)?),
            C::Rope(c) => P::Rotary(c.init(head_dim, RopeScaling::None)?),
            C::RopeLinear(c) => P::Rotary(c.init(head_dim, RopeScaling::Linear)?),
            C::RopeNtk(c) => P::Rotary(c.init(head_dim, RopeScaling::Ntk)?),
            C::RopeDynamicNtk(c) => P::Rotary(c.init(head_dim, RopeScaling::DynamicNtk)?),
            C::RopeYarn(c) => P::Rotary(c.init(head_dim, RopeScaling::Yarn)?),
            C::Xpos(c) => P::Rotary(c.init(head_dim)?),
            C::T5(c) => P::Bias(BiasConfig::T5(c.clone()).init(n_heads, device)?),
            C::Alibi(c) => P::Bias(BiasConfig::Alibi(c.clone()).init(n_heads, device)?),
            C::KerpleLog(c) => P::Bias(BiasConfig::KerpleLog(c.clone()).init(n_heads, device)?),
            C::KerplePower(c) => P::Bias(BiasConfig::KerplePower(c.clone()).init(n_heads, device)?),
            C::Fire(c) => P::Bias(BiasConfig::Fire(c.clone()).init(n_heads, device)?),
            C::Shaw(c) => P::Shaw(c.init(head_dim, device)?),
            C::Cope(c) => P::Cope(c.init(head_dim, device)?),
            C::Sandwich(c) => P::Bias(BiasConfig::Sandwich(c.clone()).init(n_heads, device)?),
            C::TransformerXl(c) => P::TransformerXl(c.init(n_heads, head_dim, device)?),
            C::BipeAlibi { segments, alibi } => {
                P::Bipe(segments.init_alibi(alibi, n_heads, head_dim, device)?)
            }
            C::BipeRope { segments, rope } => P::Bipe(segments.init_rope(rope, n_heads, head_dim)?),
            C::Fox(c) => P::Fox(c.init(n_heads, d_model, device)?),
            C::DapeFox { fox, dape } => {
                P::DapeFox(DapeFox::new(fox, dape, n_heads, d_model, device)?)
            }
            _ => unreachable!("DAPE and randomized variants are handled above"),
        })
    }
}

impl std::str::FromStr for PositionalEncodingConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

impl burn::config::Config for PositionalEncodingConfig {}

impl Serialize for PositionalEncodingConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Randomized { .. } => self.to_value().serialize(serializer),
            _ => Self::serialize(self, serializer),
        }
    }
}

impl<'de> Deserialize<'de> for PositionalEncodingConfig {
    /// Accepts `"name"` or `{"type": "name", ...overrides}`; see
    /// [`PositionalEncodingConfig::from_value`].
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Self::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// Writes the fields of `over` into `base` (recursively for objects); a field that `base` does
/// not have is an error naming it.
fn overlay(base: &mut serde_json::Value, over: serde_json::Value, path: &str) -> Result<()> {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => overlay(slot, value, &format!("{path}.{key}"))?,
                    None => {
                        let known: Vec<&str> = base.keys().map(String::as_str).collect();
                        return Err(Error::invalid(
                            &format!("{path}.{key}"),
                            value,
                            format!("unknown field; known fields: {}", known.join(", ")),
                        ));
                    }
                }
            }
            Ok(())
        }
        (slot, value) => {
            *slot = value;
            Ok(())
        }
    }
}

impl BiasConfig {
    /// Builds the bias module for `n_heads` heads.
    pub fn init<B: Backend>(&self, n_heads: usize, device: &B::Device) -> Result<AdditiveBias<B>> {
        Ok(match self {
            BiasConfig::Alibi(c) => AdditiveBias::Alibi(c.init(n_heads, device)?),
            BiasConfig::KerpleLog(c) => {
                AdditiveBias::Kerple(c.init(n_heads, KerpleKind::Log, device)?)
            }
            BiasConfig::KerplePower(c) => {
                AdditiveBias::Kerple(c.init(n_heads, KerpleKind::Power, device)?)
            }
            BiasConfig::Fire(c) => AdditiveBias::Fire(c.init(n_heads, device)?),
            BiasConfig::T5(c) => AdditiveBias::T5(c.init(n_heads, device)?),
            BiasConfig::Sandwich(c) => AdditiveBias::Sandwich(c.init(n_heads, device)?),
        })
    }
}

/// Any positional encoding, as a Burn module. Built by [`PositionalEncodingConfig::init`].
///
/// The attention layer calls the hook that matches [`PositionalEncoding::hook`]:
/// [`embed`](Self::embed) for absolute encodings, [`rotate`](Self::rotate) for rotary ones and
/// [`adjust_logits`](Self::adjust_logits) for everything that acts on the logits. Each method is
/// the identity for encodings that do not act there.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing would hide the modules from Burn
pub enum PositionalEncoding<B: Backend> {
    /// No positional information.
    Nope(NoPe),
    /// Sinusoidal absolute positions.
    Sinusoidal(Sinusoidal),
    /// Learned absolute positions.
    Learned(LearnedPositions<B>),
    /// RoPE with any scaling, or xPos.
    Rotary(Rotary),
    /// T5, ALiBi, Kerple, FIRE or Sandwich.
    Bias(AdditiveBias<B>),
    /// Shaw relative keys.
    Shaw(Shaw<B>),
    /// CoPE.
    Cope(Cope<B>),
    /// DAPE V1 over a bias or NoPE.
    Dape(Dape<B>),
    /// DAPE V2 over a bias or NoPE.
    DapeV2(DapeV2<B>),
    /// Transformer-XL relative positions.
    TransformerXl(TransformerXl<B>),
    /// BiPE (ALiBi or RoPE over segments).
    Bipe(Bipe<B>),
    /// Forgetting attention.
    Fox(Fox<B>),
    /// DAPE over forgetting attention.
    DapeFox(DapeFox<B>),
}

impl<B: Backend> PositionalEncoding<B> {
    /// Where this encoding acts.
    pub fn hook(&self) -> Hook {
        match self {
            Self::Nope(_) => Hook::None,
            Self::Sinusoidal(_) | Self::Learned(_) => Hook::Embedding,
            Self::Rotary(_) => Hook::Rotary,
            Self::Bipe(_) => Hook::Segments,
            Self::Fox(_) | Self::DapeFox(_) => Hook::InputGate,
            _ => Hook::Logits,
        }
    }

    /// The forget gate whose cumulative sums over the layer's input make the bias of
    /// forgetting attention (`fox`, `dape_fox`); `None` for every other encoding.
    pub fn forget_gate(&self) -> Option<&Fox<B>> {
        match self {
            Self::Fox(f) => Some(f),
            Self::DapeFox(d) => Some(&d.fox),
            _ => None,
        }
    }

    /// The input-gate hook: adds forgetting attention's bias `gate` `[batch, heads, rows, keys]`
    /// (from [`Fox::bias`] over [`Self::forget_gate`]'s sums) to the scaled logits of `span`'s
    /// rows and keys, or DAPE over it for `dape_fox`. Identity for every other encoding.
    pub fn adjust_logits_gated(
        &self,
        logits: Tensor<B, 4>,
        gate: Tensor<B, 4>,
        span: &Span,
    ) -> Tensor<B, 4> {
        match self {
            Self::Fox(_) => logits + gate,
            Self::DapeFox(d) => d.forward(logits, gate, span),
            _ => logits,
        }
    }

    /// Whether the logits of row `i` depend on key column `i + 1` existing (DAPE V2 in the
    /// reference's form). The chunked attention path then keeps one extra (masked) column per
    /// chunk so that it stays equal to the unchunked forward.
    pub fn reads_next_column(&self) -> bool {
        matches!(self, Self::DapeV2(d) if d.reads_next_column())
    }

    /// The token-id hook: BiPE's segments of `tokens: [batch, seq]`, continuing `carried` (the
    /// state a KV cache holds; `None` starts fresh), and the state after them. `None` for every
    /// other encoding.
    pub fn segments(
        &self,
        tokens: &Tensor<B, 2, Int>,
        carried: Option<&SegmentState>,
    ) -> Result<Option<(Segments<B>, SegmentState)>> {
        match self {
            Self::Bipe(b) => b.segment(tokens, carried).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether this encoding reads the tokens' positions, so that it can run at randomized
    /// [`Positions`] (see [`PositionalEncodingConfig::takes_randomized`]).
    pub fn takes_positions(&self) -> bool {
        match self {
            Self::Sinusoidal(_)
            | Self::Learned(_)
            | Self::Rotary(_)
            | Self::Bias(_)
            | Self::Shaw(_)
            | Self::TransformerXl(_) => true,
            Self::Dape(d) => d.bias.is_some(),
            Self::DapeV2(d) => d.bias.is_some(),
            Self::Nope(_) | Self::Cope(_) | Self::Bipe(_) | Self::Fox(_) | Self::DapeFox(_) => {
                false
            }
        }
    }

    /// Adds the absolute positions of tokens `start .. start + seq` to embeddings
    /// `x: [batch, seq, d_model]`: token `t` at position `t`, or at `positions[t]`
    /// (randomized positions). BiPE adds its in-segment positions from `segments` (from
    /// [`Self::segments`]) instead. Identity for encodings that do not act on embeddings.
    pub fn embed(
        &self,
        x: Tensor<B, 3>,
        start: usize,
        positions: Option<&Positions>,
        segments: Option<&Segments<B>>,
    ) -> Result<Tensor<B, 3>> {
        let at = positions
            .map(|p| p.window(start, x.dims()[1]))
            .transpose()?;
        match (self, segments) {
            (Self::Sinusoidal(s), _) => Ok(match at {
                Some(at) => s.forward_at(x, at),
                None => s.forward(x, start),
            }),
            (Self::Learned(l), _) => match at {
                Some(at) => l.forward_at(x, at),
                None => l.forward(x, start),
            },
            (Self::Bipe(b), Some(segments)) => Ok(b.embed(x, segments)),
            (Self::Bipe(_), None) => Err(Error::InvalidInput(
                "BiPE needs the segments of the tokens to embed them".into(),
            )),
            _ => Ok(x),
        }
    }

    /// Whether [`rotate`](Self::rotate) changes q and k (rotary encodings, and BiPE's
    /// segment rotation).
    pub fn rotates(&self) -> bool {
        matches!(self, Self::Rotary(_) | Self::Bipe(_))
    }

    /// Rotates queries `q: [batch, heads, seq_q, d_head]` of tokens
    /// `q_start .. q_start + seq_q` and keys `k: [batch, heads, seq_k, d_head]` of tokens
    /// `0 .. seq_k`, token `t` at position `t` or at `positions[t]` (randomized positions; it
    /// needs an entry for every token); BiPE-RoPE rotates them by the segment indices in
    /// `segments`. Identity for non-rotary encodings.
    pub fn rotate(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        q_start: usize,
        positions: Option<&Positions>,
        segments: Option<&SegmentIds<B>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match (self, segments) {
            (Self::Rotary(r), _) => r.rotate_tokens(q, k, q_start, positions.map(|p| p.as_slice())),
            (Self::Bipe(b), Some(ids)) => b.rotate(q, k, ids),
            _ => (q, k),
        }
    }

    /// What the encoding does to the scaled logits, for a fused attention kernel that takes the
    /// bias apart from the logits ([`crate::kernel::attention`]): `Some(None)` when it leaves
    /// them alone (NoPE, absolute and rotary encodings), `Some(Some(bias))` when it adds a bias
    /// `[1, heads, rows, keys]` that reads neither q, k nor the logits (T5, ALiBi, Kerple, FIRE,
    /// Sandwich), and `None` when it needs the logits or the queries themselves (Shaw, CoPE,
    /// DAPE, Transformer-XL, BiPE): those take [`adjust_logits`](Self::adjust_logits).
    pub fn additive_logit_bias(
        &self,
        span: &Span,
        device: &B::Device,
    ) -> Option<Option<Tensor<B, 4>>> {
        match self {
            Self::Nope(_) | Self::Sinusoidal(_) | Self::Learned(_) | Self::Rotary(_) => Some(None),
            Self::Bias(b) => Some(Some(b.forward(span, device))),
            _ => None,
        }
    }

    /// Adds this encoding's terms to scaled logits `[batch, heads, seq_q, seq_k]` (before the
    /// causal mask). `q: [batch, heads, seq_q, d_head]` and `k: [batch, heads, seq_k, d_head]`
    /// are the (rotated) queries and keys of this block; `segments` the segment indices of its
    /// rows and columns (BiPE only).
    pub fn adjust_logits(
        &self,
        logits: Tensor<B, 4>,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        span: &Span,
        segments: Option<&SegmentIds<B>>,
    ) -> Tensor<B, 4> {
        match (self, segments) {
            (Self::Bias(b), _) => logits + b.forward(span, &q.device()),
            (Self::Shaw(s), _) => s.forward(logits, q, span),
            (Self::Cope(c), _) => c.forward(logits, q, span),
            (Self::Dape(d), _) => d.forward(logits, span),
            (Self::DapeV2(d), _) => d.forward(logits, span),
            (Self::TransformerXl(t), _) => t.forward(logits, q, k, span),
            (Self::Bipe(b), Some(ids)) => b.adjust_logits(logits, ids),
            _ => logits,
        }
    }
}

/// Uniform initialisation of a parameter tensor in `[low, high)`.
pub(crate) fn uniform_param<B: Backend, const D: usize>(
    shape: [usize; D],
    low: f64,
    high: f64,
    device: &B::Device,
) -> burn::module::Param<Tensor<B, D>> {
    burn::nn::Initializer::Uniform {
        min: low,
        max: high,
    }
    .init(shape, device)
}

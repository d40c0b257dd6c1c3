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
//! | PaTH, PaTH-FoX, DAPE over PaTH | [`path`] (parameters), [`householder`] (the blockwise products) | replaces `q_iᵀk_j` by `q_iᵀ H_i ⋯ H_{j+1} k_j` with data-dependent Householder-like `H_t` from the layer's input; PaTH-FoX adds FoX's gate; `dape_path`: `A + f(A)` over PaTH's scaled logits `A` |
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
//!
//! # Adding an encoding
//!
//! One file plus one enum arm: the family's file holds its config and its module (with its
//! tests); [`PositionalEncodingConfig`] gets a variant (its JSON `type` is the variant's
//! snake_case name) and [`PositionalEncoding`] one for the module. The `match`es over them then
//! take one line each: the name in [`ENCODING_NAMES`] and
//! [`PositionalEncodingConfig::from_name`] (`names.rs`), the module the config builds and where
//! it acts (`config.rs`), and the hook that runs it (`hooks.rs`).
//!
//! | file | holds |
//! | --- | --- |
//! | `mod.rs` | the config and module enums, [`Hook`], [`BiasConfig`], [`DapeKind`] |
//! | `span.rs` | [`Span`]: which positions a block of logits covers |
//! | `names.rs` | [`ENCODING_NAMES`] and the config of each name |
//! | `json.rs` | configs from and to JSON: `{"type": "<name>", ...fields}` over the defaults |
//! | `config.rs` | what a config says (hook, DAPE parts, randomized positions) and what it builds |
//! | `hooks.rs` | [`PositionalEncoding`]'s hooks, which the attention layer calls |

pub mod absolute;
pub mod bias;
pub mod bipe;
pub mod cache;
pub mod cope;
pub mod dape;
pub mod fox;
pub mod householder;
pub mod path;
pub mod positions;
pub mod rotary;
pub mod sandwich;
pub mod shaw;
pub mod transformer_xl;

mod config;
mod hooks;
mod json;
mod names;
mod span;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

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
pub use names::ENCODING_NAMES;
pub use path::{Path, PathConfig, Transforms};
pub use positions::{Positions, RandomizedConfig};
pub use rotary::{RopeConfig, RopeLayout, RopeScaling, Rotary, XposConfig};
pub use sandwich::{Sandwich, SandwichConfig};
pub use shaw::{Shaw, ShawConfig};
pub use span::Span;
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
    /// PaTH (Yang et al., 2025): data-dependent Householder-like transforms between each query
    /// and key.
    Path(PathConfig),
    /// PaTH with FoX's forget gate.
    PathFox(PathConfig),
    /// DAPE V1 over PaTH's logits, as DAPE over NoPE wraps bias-free logits:
    /// `A + f(A)` with `A_ij = q_iᵀ H_i ⋯ H_{j+1} k_j / √d`.
    DapePath {
        #[serde(default)]
        path: PathConfig,
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
    /// Replaces the logits `q_iᵀ k_j` by `q_iᵀ H_i ⋯ H_{j+1} k_j`, with transforms from the
    /// layer's input (PaTH): the layer computes the logits blockwise and its cache holds the
    /// transformed keys.
    Householder,
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
    /// PaTH or PaTH-FoX.
    Path(Path<B>),
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

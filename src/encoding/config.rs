//! What a [`PositionalEncodingConfig`] says about its encoding (where it acts, whether it is
//! DAPE and over which bias, whether it takes randomized positions) and the module it builds
//! ([`PositionalEncodingConfig::init`]).

use burn::prelude::*;

use super::{
    AdditiveBias, BiasConfig, DapeConfig, DapeFox, DapeKind, DapeV2Config, Hook, KerpleKind, NoPe,
    PositionalEncoding, PositionalEncodingConfig, RandomizedConfig, RopeScaling, ENCODING_NAMES,
};
use crate::error::{ensure, Error, Result};

impl PositionalEncodingConfig {
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
    /// (data-dependent), PaTH (data-dependent), nor DAPE over NoPE or forgetting attention.
    pub fn takes_randomized(&self) -> bool {
        use PositionalEncodingConfig as C;
        match self.base() {
            C::Nope | C::Cope(_) | C::BipeAlibi { .. } | C::BipeRope { .. } => false,
            C::Fox(_) | C::DapeFox { .. } => false,
            C::Path(_) | C::PathFox(_) | C::DapePath { .. } => false,
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
            C::Path(_) | C::PathFox(_) | C::DapePath { .. } => Hook::Householder,
            _ => Hook::Logits,
        }
    }

    /// Whether DAPE's MLP runs over every (query, key) pair (DAPE V1 and V2 over any base, and
    /// over forgetting attention).
    pub fn is_dape(&self) -> bool {
        self.dape_parts().is_some()
            || matches!(self.base(), Self::DapeFox { .. } | Self::DapePath { .. })
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
            C::Path(c) => P::Path(c.init(n_heads, head_dim, false, device)?),
            C::PathFox(c) => P::Path(c.init(n_heads, head_dim, true, device)?),
            C::DapePath { path, dape } => P::Path(
                path.init(n_heads, head_dim, false, device)?
                    .with_dape(dape.init(n_heads, None, device)?),
            ),
            _ => unreachable!("DAPE and randomized variants are handled above"),
        })
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

//! Hybrid layer patterns: a per-layer encoding schedule over a stack of blocks, as in Llama 4's
//! iRoPE (three RoPE layers, then one NoPE layer) and SWAN-GPT / RNoPE-SWA.
//!
//! A schedule names the *scheduled* layers and their encoding; every other layer keeps the
//! stack's own encoding. In JSON, either a period,
//! `"layer_encodings": {"every": 4, "encoding": "nope"}` (layers 3, 7, 11, … counted from 0),
//! or one encoding per layer, `"layer_encodings": ["rope", "rope", "rope", "nope"]` (then the
//! scheduled layers are those whose encoding differs from the stack's).
//!
//! In a hybrid stack the layer options follow Llama 4: QK-norm and the sliding window act on the
//! unscheduled layers (the RoPE layers), and temperature tuning on the scheduled ones (the NoPE
//! layers). Without a schedule they act on every layer.

use serde::{Deserialize, Serialize};

use crate::encoding::{Hook, PositionalEncodingConfig};
use crate::error::{Error, Result};

/// Every `every`-th layer (1-based: layers `every − 1`, `2·every − 1`, … from 0) gets `encoding`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EveryNth {
    /// The period, at least 1.
    pub every: usize,
    /// The scheduled layers' encoding.
    pub encoding: PositionalEncodingConfig,
}

/// A per-layer encoding schedule; see the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerEncodings {
    /// Every n-th layer.
    Every(EveryNth),
    /// One encoding per layer.
    List(Vec<PositionalEncodingConfig>),
}

impl LayerEncodings {
    /// Every `every`-th layer with `encoding`.
    pub fn every(every: usize, encoding: PositionalEncodingConfig) -> Self {
        Self::Every(EveryNth { every, encoding })
    }

    /// Checks the schedule against a stack of `n_layers`: a positive period, one entry per
    /// layer, and encodings that act inside attention (absolute and BiPE encodings act on the
    /// embeddings, once for the whole stack).
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        let bad = |value: String, reason: &str| Error::InvalidConfig {
            field: "layer_encodings".into(),
            value,
            reason: reason.into(),
        };
        let encodings: Vec<&PositionalEncodingConfig> = match self {
            Self::Every(e) => {
                if e.every == 0 {
                    return Err(bad("every: 0".into(), "the period must be at least 1"));
                }
                vec![&e.encoding]
            }
            Self::List(list) => {
                if list.len() != n_layers {
                    return Err(bad(
                        format!("{} entries", list.len()),
                        &format!("one encoding per layer: n_layers is {n_layers}"),
                    ));
                }
                list.iter().collect()
            }
        };
        for e in encodings {
            if matches!(e.hook(), Hook::Embedding | Hook::Segments) {
                return Err(bad(
                    e.name(),
                    "acts on the embeddings, once for the whole stack; a layer schedule takes \
                     encodings that act inside attention",
                ));
            }
        }
        Ok(())
    }

    /// Layer `layer`'s encoding, and whether the schedule put it there (a scheduled layer), given
    /// the stack's own `base` encoding.
    pub fn layer(
        &self,
        layer: usize,
        base: &PositionalEncodingConfig,
    ) -> (PositionalEncodingConfig, bool) {
        match self {
            Self::Every(e) if (layer + 1).is_multiple_of(e.every.max(1)) => {
                (e.encoding.clone(), true)
            }
            Self::Every(_) => (base.clone(), false),
            Self::List(list) => {
                let e = list.get(layer).unwrap_or(base);
                (e.clone(), e != base)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> PositionalEncodingConfig {
        PositionalEncodingConfig::from_name(n).unwrap()
    }

    #[test]
    fn every_fourth_layer_is_scheduled_counting_from_zero() {
        let s: LayerEncodings =
            serde_json::from_str(r#"{"every": 4, "encoding": "nope"}"#).unwrap();
        s.validate(8).unwrap();
        let rope = name("rope");
        let scheduled: Vec<bool> = (0..8).map(|l| s.layer(l, &rope).1).collect();
        assert_eq!(
            scheduled,
            [false, false, false, true, false, false, false, true]
        );
        assert_eq!(s.layer(3, &rope).0, name("nope"));
        let back: LayerEncodings =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_list_names_every_layer_and_bad_schedules_are_named() {
        let s: LayerEncodings = serde_json::from_str(r#"["rope", "nope", "rope"]"#).unwrap();
        s.validate(3).unwrap();
        assert_eq!(s.layer(1, &name("rope")), (name("nope"), true));
        assert_eq!(s.layer(2, &name("rope")), (name("rope"), false));
        let short = s.validate(4).unwrap_err().to_string();
        assert!(
            short.contains("layer_encodings") && short.contains("3 entries"),
            "{short}"
        );
        let zero = LayerEncodings::every(0, name("nope"))
            .validate(4)
            .unwrap_err();
        assert!(zero.to_string().contains("every: 0"), "{zero}");
        let abs = LayerEncodings::every(2, name("sinusoidal"))
            .validate(4)
            .unwrap_err();
        assert!(abs.to_string().contains("embeddings"), "{abs}");
    }
}

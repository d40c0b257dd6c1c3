//! The encodings by name: [`ENCODING_NAMES`], the config of each name with all defaults
//! ([`PositionalEncodingConfig::from_name`], also `str::parse`), and a config's name back
//! ([`PositionalEncodingConfig::name`], [`PositionalEncodingConfig::label`]).

use super::{FireConfig, PositionalEncodingConfig};
use crate::error::{Error, Result};

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
    "path",
    "path_fox",
    "dape_path",
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
            "path" => C::Path(Default::default()),
            "path_fox" => C::PathFox(Default::default()),
            "dape_path" => C::DapePath {
                path: Default::default(),
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
}

impl std::str::FromStr for PositionalEncodingConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

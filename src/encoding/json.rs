//! Encoding configs from and to JSON. A config serialises as `{"type": "<name>", ...fields}`;
//! parsing starts from the named encoding's defaults ([`PositionalEncodingConfig::from_name`])
//! and writes the given fields over them, so fields left out keep their defaults and unknown
//! fields are errors that name them. Randomized positions travel as a `randomized` field.

use serde::{Deserialize, Serialize};

use super::{PositionalEncodingConfig, RandomizedConfig};
use crate::error::{Error, Result};

impl PositionalEncodingConfig {
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

    /// The config as a JSON value (with `randomized` as a field).
    pub(super) fn to_value(&self) -> serde_json::Value {
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

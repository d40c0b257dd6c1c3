//! The LM run that learns a retrieval task: the study's language model (byte-level, 4 blocks of
//! width 128, 8 heads, windows of 128, batch 16, AdamW with warmup and cosine decay) with
//! MQAR items as its data, or passkey items mixed into the books corpus.

use std::path::PathBuf;

use crate::attention::{QkNormConfig, SsmaxConfig, StickBreakingConfig, TemperatureConfig};
use crate::data::retrieval::mqar::MqarConfig;
use crate::data::retrieval::passkey::PasskeyConfig;
use crate::data::retrieval::RetrievalTask;
use crate::encoding::PositionalEncodingConfig;
use crate::experiment::lm::LmTrainConfig;
use crate::schedule::LayerEncodings;
use crate::Result;

/// What a retrieval run trains: an encoding and the attention settings of the LM config around
/// it (stick-breaking, a hybrid stack, QK-norm, ...), under a row label. Every other field of
/// the run (width, data, steps, ...) is the retrieval task's.
#[derive(Clone, Debug)]
pub struct RetrievalModel {
    /// The row's label and run folder name (an encoding's [`label`](PositionalEncodingConfig::label),
    /// or the name of the LM config it came from).
    pub label: String,
    /// The encoding (of every layer, or of the layers that `layer_encodings` leaves to it).
    pub encoding: PositionalEncodingConfig,
    /// Scalable-Softmax ([`LmTrainConfig::ssmax`]).
    pub ssmax: Option<SsmaxConfig>,
    /// Stick-breaking attention ([`LmTrainConfig::stick_breaking`]).
    pub stick_breaking: Option<StickBreakingConfig>,
    /// A per-layer encoding schedule ([`LmTrainConfig::layer_encodings`]).
    pub layer_encodings: Option<LayerEncodings>,
    /// QK-norm ([`LmTrainConfig::qk_norm`]).
    pub qk_norm: Option<QkNormConfig>,
    /// Temperature tuning ([`LmTrainConfig::temperature`]).
    pub temperature: Option<TemperatureConfig>,
    /// Sliding-window attention ([`LmTrainConfig::sliding_window`]).
    pub sliding_window: Option<usize>,
}

impl RetrievalModel {
    /// `encoding` alone, labelled by its label.
    pub fn encoding(encoding: PositionalEncodingConfig) -> Self {
        Self {
            label: encoding.label(),
            encoding,
            ssmax: None,
            stick_breaking: None,
            layer_encodings: None,
            qk_norm: None,
            temperature: None,
            sliding_window: None,
        }
    }

    /// The encoding and attention settings of the LM config `lm`, labelled `label`.
    pub fn from_lm_config(label: impl Into<String>, lm: &LmTrainConfig) -> Self {
        Self {
            label: label.into(),
            encoding: lm.encoding.clone(),
            ssmax: lm.ssmax.clone(),
            stick_breaking: lm.stick_breaking.clone(),
            layer_encodings: lm.layer_encodings.clone(),
            qk_norm: lm.qk_norm.clone(),
            temperature: lm.temperature.clone(),
            sliding_window: lm.sliding_window,
        }
    }

    /// Sets the model's encoding and attention settings in `config`.
    fn apply(&self, config: &mut LmTrainConfig) {
        config.encoding = self.encoding.clone();
        config.ssmax = self.ssmax.clone();
        config.stick_breaking = self.stick_breaking.clone();
        config.layer_encodings = self.layer_encodings.clone();
        config.qk_norm = self.qk_norm.clone();
        config.temperature = self.temperature.clone();
        config.sliding_window = self.sliding_window;
    }
}

/// What a retrieval run sets beyond the LM defaults ([`LmTrainConfig::default`]).
#[derive(Clone, Debug)]
pub struct RetrievalTrainSettings {
    /// Optimiser steps (warmup is the default 100, or a tenth of fewer steps).
    pub steps: usize,
    /// Steps between checkpoints and validation rounds (capped at `steps`).
    pub checkpoint_every: usize,
    /// Tokens per validation length and round.
    pub valid_tokens: usize,
    /// Seed of the weights and the data.
    pub seed: u64,
    /// The corpus the passkey items are mixed into.
    pub data: PathBuf,
    /// The passkey share and digits.
    pub passkey: PasskeyConfig,
    /// The MQAR generator.
    pub mqar: MqarConfig,
}

impl Default for RetrievalTrainSettings {
    fn default() -> Self {
        Self {
            steps: 2000,
            checkpoint_every: 250,
            valid_tokens: LmTrainConfig::default().valid_tokens,
            seed: 0,
            data: PathBuf::from("data/books"),
            passkey: PasskeyConfig::default(),
            mqar: MqarConfig::default(),
        }
    }
}

/// The LM config that trains `model` for `task`, checked.
pub fn train_config(
    task: RetrievalTask,
    model: &RetrievalModel,
    settings: &RetrievalTrainSettings,
) -> Result<LmTrainConfig> {
    let defaults = LmTrainConfig::default();
    let mut config = LmTrainConfig {
        data: settings.data.clone(),
        steps: settings.steps,
        warmup_steps: defaults.warmup_steps.min(settings.steps / 10),
        checkpoint_every: settings.checkpoint_every.min(settings.steps).max(1),
        valid_tokens: settings.valid_tokens,
        seed: settings.seed,
        ..defaults
    };
    model.apply(&mut config);
    match task {
        RetrievalTask::Passkey => config.passkey = Some(settings.passkey.clone()),
        RetrievalTask::Mqar => {
            config.mqar = Some(settings.mqar.clone());
            // Validation on answers only: at the training length and 4x beyond it.
            config.valid_lengths = vec![config.train_length, 4 * config.train_length];
        }
    }
    config.validate()?;
    Ok(config)
}

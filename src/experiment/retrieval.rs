//! The LM run that learns a retrieval task: the study's language model (byte-level, 4 blocks of
//! width 128, 8 heads, windows of 128, batch 16, AdamW with warmup and cosine decay) with
//! MQAR items as its data, or passkey items mixed into the books corpus.

use std::path::PathBuf;

use crate::data::retrieval::mqar::MqarConfig;
use crate::data::retrieval::passkey::PasskeyConfig;
use crate::data::retrieval::RetrievalTask;
use crate::encoding::PositionalEncodingConfig;
use crate::experiment::lm::LmTrainConfig;
use crate::Result;

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

/// The LM config that trains `encoding` for `task`, checked.
pub fn train_config(
    task: RetrievalTask,
    encoding: PositionalEncodingConfig,
    settings: &RetrievalTrainSettings,
) -> Result<LmTrainConfig> {
    let defaults = LmTrainConfig::default();
    let mut config = LmTrainConfig {
        encoding,
        data: settings.data.clone(),
        steps: settings.steps,
        warmup_steps: defaults.warmup_steps.min(settings.steps / 10),
        checkpoint_every: settings.checkpoint_every.min(settings.steps).max(1),
        valid_tokens: settings.valid_tokens,
        seed: settings.seed,
        ..defaults
    };
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

//! What training and evaluation of a language model share: the run's config, the windows of
//! tokens and their batches, the per-token loss, the evaluation chunking, and loading a
//! finished run from its folder.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::DefaultRecorder;
use serde::{Deserialize, Serialize};

use crate::attention::{QkNormConfig, SsmaxConfig, StickBreakingConfig, TemperatureConfig};
use crate::data::corpus::{Manifest, SplitConfig, Tokenizer};
use crate::data::retrieval::mqar::MqarConfig;
use crate::data::retrieval::passkey::PasskeyConfig;
use crate::data::retrieval::RetrievalTask;
use crate::encoding::{PositionalEncodingConfig, Positions, RandomizedConfig};
use crate::error::{ensure, Error, Result};
use crate::model::{LanguageModel, LanguageModelConfig, TransformerConfig};
use crate::schedule::LayerEncodings;

/// Configuration of a language-model run (`configs/lm/*.json`; saved as `config.json` in the
/// run folder). Every field but `encoding` has a default, so a config names only what differs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmTrainConfig {
    /// The positional encoding.
    pub encoding: PositionalEncodingConfig,
    /// `bytes` (257 ids) or `gpt2` (50,257 ids).
    pub tokenizer: Tokenizer,
    /// The corpus folder (any folder of `.txt` files).
    pub data: PathBuf,
    /// How documents are split into train, valid and test.
    pub split: SplitConfig,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Heads per block.
    pub n_heads: usize,
    /// Feed-forward expansion ratio.
    pub ffn_ratio: usize,
    /// Tokens per training window.
    pub train_length: usize,
    /// Windows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accumulation: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Final learning rate of the cosine decay.
    pub min_learning_rate: f64,
    /// Optimiser steps of linear warmup.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta_1: f32,
    /// AdamW β2.
    pub beta_2: f32,
    /// Gradient-norm clipping threshold.
    pub grad_clip: f32,
    /// Optimiser steps between checkpoints (and validation rounds).
    pub checkpoint_every: usize,
    /// Lengths at which each validation round measures perplexity (`ppl@L`).
    pub valid_lengths: Vec<usize>,
    /// Validation tokens per length (at least one window).
    pub valid_tokens: usize,
    /// Seed of weights and data order.
    pub seed: u64,
    /// Scalable-Softmax in every attention layer, e.g. `"ssmax": {"init_length": 128}`
    /// (absent: the plain softmax).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssmax: Option<SsmaxConfig>,
    /// Stick-breaking attention in place of the softmax in every layer, e.g.
    /// `"stick_breaking": {}` or `{"attend_current": true}` (absent: the softmax).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stick_breaking: Option<StickBreakingConfig>,
    /// A per-layer encoding schedule (a hybrid stack), e.g.
    /// `"layer_encodings": {"every": 4, "encoding": "nope"}` or one encoding per layer
    /// (absent: `encoding` in every layer). See [`crate::schedule`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_encodings: Option<LayerEncodings>,
    /// QK-norm, e.g. `"qk_norm": {"learned": false}` (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNormConfig>,
    /// Temperature tuning of the queries, e.g. `"temperature": {"alpha": 0.1, "floor": 128}`
    /// (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<TemperatureConfig>,
    /// Sliding-window attention of width `W` (absent: every key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Passkey items mixed into the corpus's training windows, e.g.
    /// `"passkey": {"fraction": 0.5, "digits": 5}` (bytes tokenizer only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passkey: Option<PasskeyConfig>,
    /// Train on generated MQAR items instead of the corpus (`data` and `split` are then not
    /// read; the loss counts the answers only), e.g. `"mqar": {"pairs": 8}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqar: Option<MqarConfig>,
}

impl Default for LmTrainConfig {
    fn default() -> Self {
        Self {
            encoding: PositionalEncodingConfig::Nope,
            tokenizer: Tokenizer::Bytes,
            data: PathBuf::from("data/books"),
            split: SplitConfig::default(),
            d_model: 128,
            n_layers: 4,
            n_heads: 8,
            ffn_ratio: 4,
            train_length: 128,
            batch_size: 16,
            grad_accumulation: 1,
            steps: 2000,
            learning_rate: 1e-3,
            min_learning_rate: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta_1: 0.9,
            beta_2: 0.95,
            grad_clip: 1.0,
            checkpoint_every: 250,
            valid_lengths: vec![128, 512, 2048],
            valid_tokens: 8192,
            seed: 0,
            ssmax: None,
            stick_breaking: None,
            layer_encodings: None,
            qk_norm: None,
            temperature: None,
            sliding_window: None,
            passkey: None,
            mqar: None,
        }
    }
}

impl LmTrainConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::io(path.to_path_buf(), source))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("config {}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("ffn_ratio", self.ffn_ratio),
            ("train_length", self.train_length),
            ("batch_size", self.batch_size),
            ("grad_accumulation", self.grad_accumulation),
            ("steps", self.steps),
            ("checkpoint_every", self.checkpoint_every),
            ("valid_tokens", self.valid_tokens),
        ];
        for (field, value) in positive {
            ensure(value > 0, field, value, "must be at least 1")?;
        }
        if let Some(schedule) = &self.layer_encodings {
            schedule.validate(self.n_layers)?;
        }
        if let Some(w) = self.sliding_window {
            ensure(w > 0, "sliding_window", w, "must be at least 1")?;
        }
        ensure(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "learning_rate",
            self.learning_rate,
            "must be positive",
        )?;
        ensure(
            (0.0..=self.learning_rate).contains(&self.min_learning_rate),
            "min_learning_rate",
            self.min_learning_rate,
            "must be in [0, learning_rate]",
        )?;
        ensure(
            self.warmup_steps < self.steps,
            "warmup_steps",
            self.warmup_steps,
            &format!("must be below steps ({})", self.steps),
        )?;
        ensure(
            self.weight_decay >= 0.0,
            "weight_decay",
            self.weight_decay,
            "must be non-negative",
        )?;
        for (field, value) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            ensure(
                (0.0..1.0).contains(&value),
                field,
                value,
                "must be in [0, 1)",
            )?;
        }
        super::validate_shared(f64::from(self.grad_clip), &self.valid_lengths)?;
        if let Some(r) = self.encoding.randomized() {
            let longest = super::longest(self.train_length, &self.valid_lengths);
            r.check_fits(longest, "the longest training or validation window")?;
        }
        self.split.validate()?;
        self.validate_retrieval()?;
        // One block is enough to check the shape and the encoding's own settings.
        let mut one = self.model().transformer;
        one.n_layers = 1;
        one.init::<burn::backend::NdArray>(1, true, &Default::default())?;
        Ok(())
    }

    /// Checks the retrieval settings: at most one task, on the bytes tokenizer, fitting the
    /// training length.
    fn validate_retrieval(&self) -> Result<()> {
        if self.passkey.is_some() && self.mqar.is_some() {
            return Err(Error::InvalidInput(
                "config: set at most one of \"passkey\" and \"mqar\"".into(),
            ));
        }
        if let Some(task) = self.retrieval_task() {
            ensure(
                self.tokenizer == Tokenizer::Bytes,
                "tokenizer",
                self.tokenizer.name(),
                &format!("must be bytes for the {task} task (its items are byte strings)"),
            )?;
        }
        if let Some(p) = &self.passkey {
            p.validate(self.train_length)?;
        }
        if let Some(m) = &self.mqar {
            m.validate(self.train_length)?;
        }
        Ok(())
    }

    /// The retrieval task this run trains for, if any.
    pub fn retrieval_task(&self) -> Option<RetrievalTask> {
        match (&self.passkey, &self.mqar) {
            (Some(_), _) => Some(RetrievalTask::Passkey),
            (None, Some(_)) => Some(RetrievalTask::Mqar),
            (None, None) => None,
        }
    }

    /// The model this run trains.
    pub fn model(&self) -> LanguageModelConfig {
        LanguageModelConfig::new(
            self.tokenizer.vocab_size(),
            TransformerConfig::new(self.d_model, self.n_layers, self.n_heads)
                .with_ffn_ratio(self.ffn_ratio)
                .with_encoding(self.encoding.clone())
                .with_ssmax(self.ssmax.clone())
                .with_stick_breaking(self.stick_breaking.clone())
                .with_layer_encodings(self.layer_encodings.clone())
                .with_qk_norm(self.qk_norm.clone())
                .with_temperature(self.temperature.clone())
                .with_sliding_window(self.sliding_window),
        )
    }

    /// Learner epochs: one per checkpoint.
    pub fn epochs(&self) -> usize {
        self.steps.div_ceil(self.checkpoint_every)
    }
}

/// A window of `length + 1` tokens: inputs are the first `length`, targets the last `length`.
#[derive(Clone, Debug)]
pub struct Window {
    /// The tokens.
    pub tokens: Vec<u16>,
    /// Randomized positions of the `length` input tokens (a batch takes its first window's);
    /// `None`: at `0..length`.
    pub positions: Option<Positions>,
    /// Which of the `length` targets the loss counts (MQAR: the answers); `None`: all.
    pub mask: Option<Vec<bool>>,
}

/// Consecutive non-overlapping windows of `length` (+1) tokens of a stream, at most `max`.
pub fn tiled_windows(stream: &[u16], length: usize, max: usize) -> Vec<Window> {
    (0..)
        .map(|k| k * length)
        .take_while(|&s| s + length < stream.len())
        .take(max)
        .map(|s| Window {
            tokens: stream[s..s + length + 1].to_vec(),
            positions: None,
            mask: None,
        })
        .collect()
}

/// A batch of windows on a device.
#[derive(Clone, Debug)]
pub struct LmBatch<B: Backend> {
    /// `[batch, length]`.
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, length]`.
    pub targets: Tensor<B, 2, Int>,
    /// Factor on the loss before `backward` (`1 / grad_accumulation`, so that accumulated
    /// gradients are the mean over micro-batches).
    pub loss_scale: f64,
    /// Randomized positions of the inputs, shared by the batch; `None`: at `0..length`.
    pub positions: Option<Positions>,
    /// `[batch, length]` 0/1 weights of the targets the loss counts, when some window has a
    /// mask; `None`: every target counts.
    pub weights: Option<Tensor<B, 2>>,
    /// The number of targets the loss counts.
    pub scored: usize,
}

impl<B: Backend> LmBatch<B> {
    /// Stacks windows of one length.
    pub fn from_windows(windows: &[Window], loss_scale: f64, device: &B::Device) -> Self {
        let n = windows.len();
        assert!(n > 0, "an LM batch needs at least one window");
        let len = windows[0].tokens.len() - 1;
        let mut inputs = Vec::with_capacity(n * len);
        let mut targets = Vec::with_capacity(n * len);
        let masked = windows.iter().any(|w| w.mask.is_some());
        let mut weights = Vec::with_capacity(if masked { n * len } else { 0 });
        for w in windows {
            assert_eq!(
                w.tokens.len(),
                len + 1,
                "all windows of a batch share one length"
            );
            inputs.extend(w.tokens[..len].iter().map(|&t| i64::from(t)));
            targets.extend(w.tokens[1..].iter().map(|&t| i64::from(t)));
            if masked {
                match &w.mask {
                    Some(mask) => weights.extend(mask.iter().map(|&m| if m { 1.0 } else { 0.0 })),
                    None => weights.extend(std::iter::repeat_n(1.0f32, len)),
                }
            }
        }
        let scored = if masked {
            weights.iter().filter(|&&w| w > 0.0).count()
        } else {
            n * len
        };
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [n, len]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, len]), device),
            loss_scale,
            positions: windows[0].positions.clone(),
            weights: masked.then(|| Tensor::from_data(TensorData::new(weights, [n, len]), device)),
            scored,
        }
    }

    /// The same batch with its inputs at `positions`.
    pub fn with_positions(mut self, positions: Option<Positions>) -> Self {
        self.positions = positions;
        self
    }
}

/// Salt of the randomized-position stream (independent of the data stream of the same seed).
pub const POSITION_STREAM: u64 = 0x9051_7105_5EED_0002;

/// The randomized positions for forward pass `index` over windows of `length` tokens, from
/// `seed`: a sorted sample from `0..max_position` (see [`crate::encoding::positions`]).
pub fn sample_positions(
    randomized: &RandomizedConfig,
    length: usize,
    seed: u64,
    index: u64,
) -> Result<Positions> {
    randomized.sample(
        length,
        super::stream_seed(seed ^ POSITION_STREAM ^ length as u64, index),
    )
}

/// Per-token negative log-likelihood `[batch, length]` of `targets` after `inputs`, the
/// inputs at `positions` (randomized positions; `None`: at `0..length`).
pub fn token_nll<B: Backend>(
    model: &LanguageModel<B>,
    inputs: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
    positions: Option<&Positions>,
) -> Result<Tensor<B, 2>> {
    let logits = model.forward_at(inputs, positions)?;
    Ok(crate::kernel::token_nll(logits, targets))
}

/// The sum of `nll` (`[batch, length]`) over the targets a batch counts: `Σ nll·w` with the
/// batch's 0/1 `weights`, or `Σ nll` when it has none. Divided by [`LmBatch::scored`], the mean
/// loss.
pub fn counted_nll_sum<B: Backend>(
    nll: Tensor<B, 2>,
    weights: Option<Tensor<B, 2>>,
) -> Tensor<B, 1> {
    match weights {
        Some(w) => (nll * w).sum(),
        None => nll.sum(),
    }
}

/// The attention chunk used to evaluate `rows` windows of `length` tokens: none while the
/// largest per-pair tensor (`[rows, chunk, length, 32]`, DAPE's MLP at its default width) stays
/// under 2^24 floats, otherwise the largest multiple of 16 query rows that keeps it there (at
/// least 16). Chunking is exact; this bounds memory (and stays under software Vulkan's 128 MiB
/// buffer limit).
pub fn auto_chunk(rows: usize, length: usize) -> Option<usize> {
    const BUDGET: usize = 1 << 24;
    let per_row = rows.max(1) * length * 32;
    if per_row * length <= BUDGET {
        return None;
    }
    Some(((BUDGET / per_row) / 16 * 16).max(16))
}

/// Tokens per forward pass during validation and evaluation.
pub const EVAL_BATCH_TOKENS: usize = 8192;

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::io(path.to_path_buf(), source))?;
    Ok(serde_json::from_str(&text)?)
}

/// Loads a trained run: its config, manifest and model.
pub fn load<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> Result<(LmTrainConfig, Manifest, LanguageModel<B>)> {
    let (config, model) = load_model(run, device)?;
    if config.mqar.is_some() {
        return Err(Error::InvalidInput(format!(
            "{} is an MQAR run: it has no corpus to evaluate on (use dape retrieval eval)",
            run.display()
        )));
    }
    let manifest: Manifest = serde_json::from_value(read_json(&run.join("manifest.json"))?)?;
    Ok((config, manifest, model))
}

/// Loads a trained run's config and model (an MQAR run has no manifest).
pub fn load_model<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> Result<(LmTrainConfig, LanguageModel<B>)> {
    let config: LmTrainConfig = serde_json::from_value(read_json(&run.join("config.json"))?)?;
    let model = config
        .model()
        .init::<B>(device)?
        .load_file(run.join("model"), &DefaultRecorder::default(), device)
        .map_err(|e| {
            Error::InvalidInput(format!(
                "cannot load the model of {}: {e} (was the run trained to the end?)",
                run.display()
            ))
        })?;
    Ok((config, model))
}

//! What training and evaluation on a CHE task share: the run's config, batches of samples,
//! the forward pass with its loss, and loading a finished run from its folder.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::DefaultRecorder;

use crate::attention::{SsmaxConfig, StickBreakingConfig};
use crate::data::che::{Sample, Task};
use crate::encoding::{PositionalEncodingConfig, Positions};
use crate::error::{ensure, Error, Result};
use crate::model::{SequenceModel, SequenceModelConfig, StackOptions, TransformerConfig};

/// Configuration of a CHE training run (saved as `config.json` in the run folder).
#[derive(Config, Debug)]
pub struct CheTrainConfig {
    /// The task.
    pub task: Task,
    /// The positional encoding.
    pub encoding: PositionalEncodingConfig,
    /// Model width.
    #[config(default = 64)]
    pub d_model: usize,
    /// Number of blocks.
    #[config(default = 5)]
    pub n_layers: usize,
    /// Heads per block.
    #[config(default = 8)]
    pub n_heads: usize,
    /// Optimiser steps.
    #[config(default = 10000)]
    pub steps: usize,
    /// Sequences per step.
    #[config(default = 128)]
    pub batch_size: usize,
    /// Adam learning rate.
    #[config(default = 1e-3)]
    pub learning_rate: f64,
    /// Gradient-norm clipping threshold.
    #[config(default = 1.0)]
    pub grad_clip: f64,
    /// Shortest training length.
    #[config(default = 1)]
    pub min_train_length: usize,
    /// Longest training length.
    #[config(default = 40)]
    pub max_train_length: usize,
    /// Held-out lengths for the validation round at the end of training.
    #[config(default = "vec![41, 50, 60]")]
    pub valid_lengths: Vec<usize>,
    /// Sequences per validation length.
    #[config(default = 64)]
    pub valid_sequences: usize,
    /// Seed of weights and data.
    #[config(default = 0)]
    pub seed: u64,
    /// Scalable-Softmax in every attention layer (`None`: the plain softmax).
    #[config(default = "None")]
    pub ssmax: Option<SsmaxConfig>,
    /// Stick-breaking attention in place of the softmax (`None`: the softmax); the CHE model
    /// is bidirectional, so each query breaks a stick on either side.
    #[config(default = "None")]
    pub stick_breaking: Option<StickBreakingConfig>,
    /// A hybrid stack: a per-layer encoding schedule and the layer options (`None`: the
    /// encoding in every layer, no options).
    #[config(default = "None")]
    pub stack: Option<StackOptions>,
}

impl CheTrainConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        ensure(self.steps > 0, "steps", self.steps, "must be at least 1")?;
        ensure(
            self.batch_size > 0,
            "batch_size",
            self.batch_size,
            "must be at least 1",
        )?;
        ensure(
            self.min_train_length >= 1 && self.min_train_length <= self.max_train_length,
            "min_train_length",
            self.min_train_length,
            &format!(
                "must be in 1..=max_train_length ({})",
                self.max_train_length
            ),
        )?;
        ensure(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "learning_rate",
            self.learning_rate,
            "must be positive",
        )?;
        super::validate_shared(self.grad_clip, &self.valid_lengths)?;
        ensure(
            self.valid_sequences > 0,
            "valid_sequences",
            self.valid_sequences,
            "must be at least 1",
        )?;
        if let Some(r) = self.encoding.randomized() {
            let longest = super::longest(self.max_train_length, &self.valid_lengths);
            r.check_fits(
                longest + self.task.output_len(longest),
                &format!("the longest training or validation input ({longest}), with its outputs,"),
            )?;
        }
        Ok(())
    }

    /// The randomized positions of the `tokens` tokens (inputs and outputs) of item `index` of
    /// the data stream seeded with `seed`; `None` without randomized positions. Every sequence
    /// of one step shares them.
    pub fn positions(&self, tokens: usize, seed: u64, index: u64) -> Result<Option<Positions>> {
        self.encoding
            .randomized()
            .map(|r| r.sample(tokens, super::stream_seed(seed ^ POSITION_STREAM, index)))
            .transpose()
    }

    /// The model this run trains.
    pub fn model(&self) -> SequenceModelConfig {
        SequenceModelConfig::new(
            self.task.input_vocab(),
            self.task.output_vocab(),
            TransformerConfig::new(self.d_model, self.n_layers, self.n_heads)
                .with_encoding(self.encoding.clone())
                .with_ssmax(self.ssmax.clone())
                .with_stick_breaking(self.stick_breaking.clone())
                .with_stack(self.stack.clone().unwrap_or_default()),
        )
    }
}

/// Salt of the randomized-position stream (independent of the data stream of the same seed).
pub const POSITION_STREAM: u64 = 0x9051_7105_5EED_0001;

/// A batch on a device: inputs without the output placeholders, targets and mask.
#[derive(Clone, Debug)]
pub struct CheBatch<B: Backend> {
    /// `[batch, input_len]`.
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, output_len]`.
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, output_len]`, 1 where a position counts.
    pub mask: Tensor<B, 2>,
    /// Factor on the loss before `backward` (multi-device training).
    pub loss_scale: f64,
    /// Randomized positions of the `input_len + output_len` tokens, shared by the batch;
    /// `None`: token `t` at position `t`.
    pub positions: Option<Positions>,
}

impl<B: Backend> CheBatch<B> {
    /// The same batch with its tokens at `positions`.
    pub fn with_positions(mut self, positions: Option<Positions>) -> Self {
        self.positions = positions;
        self
    }

    /// Stacks samples of equal input and output length.
    pub fn from_samples(samples: &[Sample], device: &B::Device) -> Self {
        let n = samples.len();
        assert!(n > 0, "a CHE batch needs at least one sample");
        let (lin, lout) = (samples[0].input.len(), samples[0].target.len());
        assert!(
            samples
                .iter()
                .all(|s| s.input.len() == lin && s.target.len() == lout),
            "all samples of a CHE batch share one length"
        );
        let flat =
            |f: &dyn Fn(&Sample) -> Vec<i64>| -> Vec<i64> { samples.iter().flat_map(f).collect() };
        let inputs = flat(&|s| s.input.clone());
        let targets = flat(&|s| s.target.clone());
        let mask: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.mask.iter().map(|&m| m as f32))
            .collect();
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [n, lin]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n, lout]), device),
            mask: Tensor::from_data(TensorData::new(mask, [n, lout]), device),
            loss_scale: 1.0,
            positions: None,
        }
    }
}

/// The output of a CHE step.
pub struct CheOutput<B: Backend> {
    /// Cross-entropy summed over output positions, mean over the batch: `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[batch, output_len, classes]`.
    pub logits: Tensor<B, 3>,
    /// `[batch, output_len]`.
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, output_len]`.
    pub mask: Tensor<B, 2>,
}

impl<B: Backend> CheOutput<B> {
    /// Correct masked-in positions and masked-in positions.
    pub fn counts(&self) -> (f64, f64) {
        let predicted = self.logits.clone().argmax(2).squeeze_dim::<2>(2);
        let correct = predicted.equal(self.targets.clone()).float() * self.mask.clone();
        (
            correct.sum().into_scalar().elem::<f64>(),
            self.mask.clone().sum().into_scalar().elem::<f64>(),
        )
    }
}

/// Forward pass and loss of a batch.
pub fn che_forward<B: Backend>(model: &SequenceModel<B>, batch: CheBatch<B>) -> CheOutput<B> {
    let [n, out_len] = batch.targets.dims();
    let logits = model
        .predict_at(batch.inputs, out_len, batch.positions.as_ref())
        .unwrap_or_else(|e| panic!("CHE batch rejected by the model: {e}"));
    let loss = crate::kernel::token_nll(logits.clone(), batch.targets.clone()).sum() / n as f64;
    CheOutput {
        loss,
        logits,
        targets: batch.targets,
        mask: batch.mask,
    }
}

/// The file the trained model is stored in (full precision; the recorder adds `.mpk`).
pub fn model_path(run: &Path) -> PathBuf {
    run.join("model")
}

/// Loads a trained run: its config and model.
pub fn load<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> Result<(CheTrainConfig, SequenceModel<B>)> {
    let path = run.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::io(path.clone(), source))?;
    let config: CheTrainConfig = serde_json::from_str(&text)?;
    let model = config
        .model()
        .init::<B>(device)?
        .load_file(model_path(run), &DefaultRecorder::default(), device)
        .map_err(|e| {
            Error::InvalidInput(format!(
                "cannot load the model of {}: {e} (was the run trained to the end?)",
                run.display()
            ))
        })?;
    Ok((config, model))
}

//! Training the bidirectional [`SequenceModel`] on a CHE task with burn-train's Learner.
//!
//! The protocol of Delétang et al. (2023) and Ruoss et al. (2023): each step draws one length
//! `L ~ U{1..40}` for the whole batch of 128 sequences; Adam at 1e-3 with gradient-norm
//! clipping at 1.0; the loss is the cross-entropy summed over the output positions, averaged
//! over the batch. A dataset item is one whole step (one length, one batch), so burn-train's
//! data loader runs with batch size 1 and every step keeps its single length.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::grad_clipping::GradientClippingConfig;
use burn::lr_scheduler::constant::ConstantLr;
use burn::optim::AdamConfig;
use burn::prelude::*;
use burn::record::DefaultRecorder;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{
    ExecutionStrategy, InferenceStep, ItemLazy, Learner, MultiDeviceOptim, SupervisedTraining,
    TrainOutput, TrainStep,
};

pub use super::checkpoint::{save_module, write_atomic};
use super::metrics::{LossMetric, MaskedAccuracyMetric, StepStats};
use super::renderer::LineRenderer;
use crate::data::che::{Rng, Sample, Task};
use crate::encoding::PositionalEncodingConfig;
use crate::error::{ensure, Error, Result};
use crate::model::{SequenceModel, SequenceModelConfig, TransformerConfig};

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
        ensure(
            self.grad_clip > 0.0,
            "grad_clip",
            self.grad_clip,
            "must be positive",
        )?;
        ensure(
            !self.valid_lengths.is_empty() && self.valid_lengths.iter().all(|&l| l > 0),
            "valid_lengths",
            format!("{:?}", self.valid_lengths),
            "must be a non-empty list of positive lengths",
        )?;
        ensure(
            self.valid_sequences > 0,
            "valid_sequences",
            self.valid_sequences,
            "must be at least 1",
        )?;
        Ok(())
    }

    /// The model this run trains.
    pub fn model(&self) -> SequenceModelConfig {
        SequenceModelConfig::new(
            self.task.input_vocab(),
            self.task.output_vocab(),
            TransformerConfig::new(self.d_model, self.n_layers, self.n_heads)
                .with_encoding(self.encoding.clone()),
        )
    }
}

/// One optimiser step's data: one length, a batch of samples.
#[derive(Clone, Debug)]
pub struct CheItem {
    /// The length all samples share.
    pub length: usize,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// Mixes a seed and an index into an independent stream seed.
pub(crate) fn stream_seed(seed: u64, index: u64) -> u64 {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.next_u64()
}

/// A dataset whose item `i` is a whole step: either a random length in a range (training) or
/// the `i`-th of a list of lengths (validation). Deterministic in `(seed, i)`.
#[derive(Clone, Debug)]
pub struct CheStepDataset {
    task: Task,
    lengths: StepLengths,
    batch: usize,
    seed: u64,
    shards: usize,
}

#[derive(Clone, Debug)]
enum StepLengths {
    Random {
        min: usize,
        max: usize,
        steps: usize,
    },
    Fixed(Vec<usize>),
}

impl CheStepDataset {
    /// `steps` items, each of `batch` samples at one length drawn from `U{min..max}`.
    pub fn random(
        task: Task,
        min: usize,
        max: usize,
        steps: usize,
        batch: usize,
        seed: u64,
    ) -> Self {
        Self {
            task,
            lengths: StepLengths::Random { min, max, steps },
            batch,
            seed,
            shards: 1,
        }
    }

    /// For `n` devices: `n × steps` items of `batch / n` samples, where item `s + k·steps`
    /// shares step `s`'s length (burn-train gives device `k` the `k`-th block of items, so the
    /// devices of one step see one length, as the protocol asks). Shard 0 is the one-device
    /// data.
    pub fn sharded(mut self, n: usize) -> Self {
        self.shards = n.max(1);
        self.batch /= self.shards;
        self
    }

    /// One item per length, each of `batch` samples.
    pub fn fixed(task: Task, lengths: Vec<usize>, batch: usize, seed: u64) -> Self {
        Self {
            task,
            lengths: StepLengths::Fixed(lengths),
            batch,
            seed,
            shards: 1,
        }
    }
}

impl Dataset<CheItem> for CheStepDataset {
    fn get(&self, index: usize) -> Option<CheItem> {
        let (step, shard) = match &self.lengths {
            StepLengths::Random { steps, .. } => (index % steps, index / steps),
            StepLengths::Fixed(_) => (index, 0),
        };
        if shard >= self.shards {
            return None;
        }
        let mut rng = Rng::new(stream_seed(self.seed, step as u64));
        let length = match &self.lengths {
            StepLengths::Random { min, max, .. } => {
                rng.range_inclusive(*min as u64, *max as u64) as usize
            }
            StepLengths::Fixed(lengths) => *lengths.get(index)?,
        };
        if shard > 0 {
            rng = Rng::new(stream_seed(
                self.seed ^ (shard as u64).wrapping_mul(0xA24B_AED4_963E_E407),
                step as u64,
            ));
        }
        let samples = (0..self.batch)
            .map(|_| self.task.sample(length, &mut rng))
            .collect::<Result<Vec<_>>>()
            .ok()?;
        Some(CheItem { length, samples })
    }

    fn len(&self) -> usize {
        match &self.lengths {
            StepLengths::Random { steps, .. } => *steps * self.shards,
            StepLengths::Fixed(lengths) => lengths.len(),
        }
    }
}

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
}

impl<B: Backend> CheBatch<B> {
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
        }
    }
}

/// Turns step items into batches (all samples of all items must share one length).
#[derive(Clone, Debug, Default)]
pub struct CheBatcher {
    /// Factor on the loss before `backward`: `1 / devices`, as burn-train sums the devices'
    /// gradients (`0` is taken as 1).
    pub loss_scale: f64,
}

impl<B: Backend> Batcher<B, CheItem, CheBatch<B>> for CheBatcher {
    fn batch(&self, items: Vec<CheItem>, device: &B::Device) -> CheBatch<B> {
        let samples: Vec<Sample> = items.into_iter().flat_map(|i| i.samples).collect();
        let mut batch = CheBatch::from_samples(&samples, device);
        if self.loss_scale > 0.0 {
            batch.loss_scale = self.loss_scale;
        }
        batch
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

impl<B: Backend> ItemLazy for CheOutput<B> {
    type ItemSync = StepStats;

    fn sync(self) -> StepStats {
        let (correct, counted) = self.counts();
        StepStats {
            loss: self.loss.clone().into_scalar().elem::<f64>(),
            correct,
            counted,
            sequences: self.targets.dims()[0],
        }
    }
}

/// Forward pass and loss of a batch.
pub fn che_forward<B: Backend>(model: &SequenceModel<B>, batch: CheBatch<B>) -> CheOutput<B> {
    let [n, out_len] = batch.targets.dims();
    let logits = model
        .predict(batch.inputs, out_len)
        .unwrap_or_else(|e| panic!("CHE batch rejected by the model: {e}"));
    let picked = log_softmax(logits.clone(), 2).gather(2, batch.targets.clone().unsqueeze_dim(2));
    let loss = picked.sum().neg() / n as f64;
    CheOutput {
        loss,
        logits,
        targets: batch.targets,
        mask: batch.mask,
    }
}

impl<B: AutodiffBackend> TrainStep for SequenceModel<B> {
    type Input = CheBatch<B>;
    type Output = CheOutput<B>;

    fn step(&self, batch: CheBatch<B>) -> TrainOutput<CheOutput<B>> {
        let scale = batch.loss_scale;
        let output = che_forward(self, batch);
        let grads = (output.loss.clone() * scale).backward();
        TrainOutput::new(self, grads, output)
    }
}

impl<B: Backend> InferenceStep for SequenceModel<B> {
    type Input = CheBatch<B>;
    type Output = CheOutput<B>;

    fn step(&self, batch: CheBatch<B>) -> CheOutput<B> {
        che_forward(self, batch)
    }
}

/// How to show progress while training.
#[derive(Clone, Debug)]
pub enum Progress {
    /// burn-train's default: its TUI on a terminal, its CLI renderer otherwise.
    Default,
    /// One line every this many steps, each starting with the prefix.
    Lines(String, usize),
}

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheTrainSummary {
    /// Run folder.
    pub out: PathBuf,
    /// Seconds of training (including the validation round).
    pub seconds: f64,
    /// Optimiser steps.
    pub steps: usize,
}

/// The file the trained model is stored in (full precision; the recorder adds `.mpk`).
pub fn model_path(run: &Path) -> PathBuf {
    run.join("model")
}

/// Trains a model on `config.task` and stores `config.json` and `model.mpk` in `out`.
pub fn train<B: AutodiffBackend>(
    config: &CheTrainConfig,
    out: &Path,
    device: &B::Device,
    progress: Progress,
) -> Result<(SequenceModel<B::InnerBackend>, CheTrainSummary)> {
    train_on::<B>(config, out, std::slice::from_ref(device), progress)
}

/// [`train`] on several devices with burn-train's multi-device strategy: each step's batch is
/// split across them (one length per step on all), gradients are summed on the first device,
/// and the model is saved from it (it loads on any one device).
pub fn train_on<B: AutodiffBackend>(
    config: &CheTrainConfig,
    out: &Path,
    devices: &[B::Device],
    progress: Progress,
) -> Result<(SequenceModel<B::InnerBackend>, CheTrainSummary)> {
    config.validate()?;
    let n_devices = devices.len();
    ensure(
        n_devices >= 1 && config.batch_size.is_multiple_of(n_devices),
        "batch_size",
        config.batch_size,
        &format!("must be a multiple of the number of devices ({n_devices})"),
    )?;
    let device = &devices[0];
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_atomic(
        &out.join("config.json"),
        &serde_json::to_string_pretty(config)?,
    )?;
    B::seed(device, config.seed);
    let model = config.model().init::<B>(device)?;

    let train_data = CheStepDataset::random(
        config.task,
        config.min_train_length,
        config.max_train_length,
        config.steps,
        config.batch_size,
        config.seed,
    )
    .sharded(n_devices);
    let valid_data = CheStepDataset::fixed(
        config.task,
        config.valid_lengths.clone(),
        config.valid_sequences,
        config.seed ^ 0x5EED_0FDA,
    );
    let train_loader = DataLoaderBuilder::<B, _, _>::new(CheBatcher {
        loss_scale: 1.0 / n_devices as f64,
    })
    .batch_size(1)
    .set_device(device.clone())
    .build(train_data);
    let valid_loader = DataLoaderBuilder::<B::InnerBackend, _, _>::new(CheBatcher::default())
        .batch_size(1)
        .set_device(device.clone())
        .build(valid_data);

    let optimizer = AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(config.grad_clip as f32)))
        .init();
    let mut training = SupervisedTraining::new(out, train_loader, valid_loader)
        .metric_train_numeric(LossMetric::new())
        .metric_train_numeric(MaskedAccuracyMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .metric_valid_numeric(MaskedAccuracyMetric::new())
        .num_epochs(1);
    if let Progress::Lines(prefix, every) = progress {
        training = training.renderer(LineRenderer::new(prefix, every).with_steps(
            config.steps,
            config.steps,
            n_devices,
        ));
    }
    if n_devices > 1 {
        training = training.with_training_strategy(
            ExecutionStrategy::MultiDevice(devices.to_vec(), MultiDeviceOptim::OptimMainDevice)
                .into(),
        );
    }
    let start = Instant::now();
    let result = training.launch(Learner::new(
        model,
        optimizer,
        ConstantLr::new(config.learning_rate),
    ));
    let seconds = start.elapsed().as_secs_f64();
    save_module(result.model.clone(), &model_path(out))?;
    Ok((
        result.model,
        CheTrainSummary {
            out: out.to_path_buf(),
            seconds,
            steps: config.steps,
        },
    ))
}

/// Loads a trained run: its config and model.
pub fn load<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> Result<(CheTrainConfig, SequenceModel<B>)> {
    let path = run.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
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

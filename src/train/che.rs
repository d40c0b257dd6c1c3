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
use burn::tensor::backend::AutodiffBackend;
use burn::train::{
    ExecutionStrategy, InferenceStep, ItemLazy, Learner, MultiDeviceOptim, SupervisedTraining,
    TrainOutput, TrainStep,
};

use super::checkpoint::save_module;
use super::failure::{finished, WriteFailure};
use super::metric_log::RunMetricLogger;
use super::metrics::{LossMetric, MaskedAccuracyMetric, StepStats};
use super::renderer::LineRenderer;
use crate::data::che::{Rng, Sample, Task};
use crate::encoding::{Positions, RandomizedConfig};
use crate::error::{ensure, Error, Result};
use crate::experiment::che::{
    che_forward, model_path, CheBatch, CheOutput, CheTrainConfig, POSITION_STREAM,
};
use crate::experiment::stream_seed;
use crate::model::SequenceModel;
use crate::util::write_atomic;

/// One optimiser step's data: one length, a batch of samples.
#[derive(Clone, Debug)]
pub struct CheItem {
    /// The length all samples share.
    pub length: usize,
    /// The samples.
    pub samples: Vec<Sample>,
    /// The randomized positions every sample of the step sits at; `None`: at `0..N`.
    pub positions: Option<Positions>,
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
    randomized: Option<RandomizedConfig>,
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
            randomized: None,
        }
    }

    /// Each step's samples at a sorted random sample of positions from `0..max_position`
    /// (randomized positions), drawn from `(seed, step)` and shared by every sample and shard
    /// of the step; `None`: at `0..N`.
    pub fn randomized(mut self, randomized: Option<RandomizedConfig>) -> Self {
        self.randomized = randomized;
        self
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
            randomized: None,
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
        let positions = match &self.randomized {
            Some(r) => {
                let tokens = length + self.task.output_len(length);
                let seed = stream_seed(self.seed ^ POSITION_STREAM, step as u64);
                Some(r.sample(tokens, seed).ok()?)
            }
            None => None,
        };
        Some(CheItem {
            length,
            samples,
            positions,
        })
    }

    fn len(&self) -> usize {
        match &self.lengths {
            StepLengths::Random { steps, .. } => *steps * self.shards,
            StepLengths::Fixed(lengths) => lengths.len(),
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
        let positions = items.first().and_then(|i| i.positions.clone());
        let samples: Vec<Sample> = items.into_iter().flat_map(|i| i.samples).collect();
        let mut batch = CheBatch::from_samples(&samples, device).with_positions(positions);
        if self.loss_scale > 0.0 {
            batch.loss_scale = self.loss_scale;
        }
        batch
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
    std::fs::create_dir_all(out).map_err(|source| Error::io(out.to_path_buf(), source))?;
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
    .randomized(config.encoding.randomized().cloned())
    .sharded(n_devices);
    let valid_data = CheStepDataset::fixed(
        config.task,
        config.valid_lengths.clone(),
        config.valid_sequences,
        config.seed ^ 0x5EED_0FDA,
    )
    .randomized(config.encoding.randomized().cloned());
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
    let training = SupervisedTraining::new(out, train_loader, valid_loader);
    let failure = WriteFailure::stopping(training.interrupter());
    let interrupter = training.interrupter();
    let mut training = training
        .with_metric_logger(RunMetricLogger::new(out, failure.clone()))
        // burn-train's `experiment.log` appender panics when it cannot open its file (a full
        // disk): our errors are returned instead, and our progress goes to the terminal.
        .with_application_logger(None)
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
    finished(&failure, &interrupter, out)?;
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

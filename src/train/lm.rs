//! Training a [`LanguageModel`] on real text with burn-train's Learner.
//!
//! AdamW ([`crate::optim::FusedAdamW`]: β 0.9/0.95, weight decay 0.1), a linear warmup then cosine decay, gradient clipping
//! at 1.0, gradient accumulation and a fixed seed. Training windows of `train_length + 1`
//! tokens are drawn at random offsets of the training stream; window `i` depends only on
//! `(seed, i)`, so a resumed run sees the same data in the same order.
//!
//! Each "epoch" of the Learner is `checkpoint_every` optimiser steps: at its end burn-train
//! runs a validation round, where the [`PerplexityMetric::at_length`] plugin reports `ppl@L`
//! for every length in `valid_lengths`, and writes a checkpoint (model, optimiser, scheduler)
//! through [`AtomicRecorder`]. `resume` continues from the newest checkpoint that loads. A
//! failed write (a full disk) stops the run with the error naming the file ([`super::failure`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder, DataLoaderIterator};
use burn::data::dataset::Dataset;
use burn::lr_scheduler::LrScheduler;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::Recorder;
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::LearningRateMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, ItemLazy, Learner, MultiDeviceOptim, SupervisedTraining,
    TrainOutput, TrainStep,
};
use serde::{Deserialize, Serialize};

use super::che::Progress;
use super::checkpoint::{save_module, AtomicRecorder};
use super::failure::{finished, WriteFailure};
use super::metric_log::RunMetricLogger;
use super::metrics::{LmLossMetric, LmStats, PerplexityMetric, TokensPerSecondMetric};
use super::renderer::LineRenderer;
use super::windows::mqar_validation;
use crate::backend::DeviceSpec;
use crate::data::corpus::{Corpus, Manifest, Part, TokenizedCorpus};
use crate::encoding::RandomizedConfig;
use crate::error::{ensure, Error, Result};
use crate::experiment::lm::{
    auto_chunk, counted_nll_sum, read_json, sample_positions, tiled_windows, token_nll, LmBatch,
    LmTrainConfig, Window, EVAL_BATCH_TOKENS,
};
use crate::model::LanguageModel;
use crate::optim::FusedAdamWConfig;
use crate::sysmem;
use crate::util::{portable_path, say, say_err, write_atomic};

/// A linear warmup to `peak`, then a cosine decay to `min` at `total` (in scheduler steps).
#[derive(Clone, Debug)]
pub struct WarmupCosineLr {
    peak: f64,
    min: f64,
    warmup: usize,
    total: usize,
    step: usize,
}

impl WarmupCosineLr {
    /// A schedule over `total` scheduler steps, `warmup` of them linear.
    pub fn new(peak: f64, min: f64, warmup: usize, total: usize) -> Self {
        Self {
            peak,
            min,
            warmup,
            total: total.max(1),
            step: 0,
        }
    }

    /// The rate at scheduler step `t` (1-based).
    pub fn rate(&self, t: usize) -> f64 {
        if t <= self.warmup {
            return self.peak * t as f64 / self.warmup.max(1) as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((t - self.warmup) as f64 / span).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

impl LrScheduler for WarmupCosineLr {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        self.step += 1;
        self.rate(self.step)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}

pub use super::windows::RandomWindows;

/// All windows of one length: one validation item, so that a round's `ppl@L` is exact.
#[derive(Clone, Debug)]
pub struct WindowGroup {
    /// The shared length.
    pub length: usize,
    /// The windows.
    pub windows: Vec<Window>,
}

/// Validation data: one item per length.
#[derive(Clone, Debug)]
pub struct GroupDataset(pub Vec<WindowGroup>);

impl Dataset<WindowGroup> for GroupDataset {
    fn get(&self, index: usize) -> Option<WindowGroup> {
        self.0.get(index).cloned()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Stacks training windows.
#[derive(Clone, Debug)]
pub struct LmBatcher {
    /// See [`LmBatch::loss_scale`].
    pub loss_scale: f64,
}

impl<B: Backend> Batcher<B, Window, LmBatch<B>> for LmBatcher {
    fn batch(&self, items: Vec<Window>, device: &B::Device) -> LmBatch<B> {
        LmBatch::from_windows(&items, self.loss_scale, device)
    }
}

/// Stacks a validation group (the loader's batch size is 1); with randomized positions, every
/// window of a length sits at one sample drawn from `(seed, length)`.
#[derive(Clone, Debug, Default)]
pub struct GroupBatcher {
    /// Randomized positions of the run; `None`: at `0..length`.
    pub randomized: Option<RandomizedConfig>,
    /// Seed of the position samples.
    pub seed: u64,
}

impl<B: Backend> Batcher<B, WindowGroup, LmBatch<B>> for GroupBatcher {
    fn batch(&self, items: Vec<WindowGroup>, device: &B::Device) -> LmBatch<B> {
        let windows: Vec<Window> = items.into_iter().flat_map(|g| g.windows).collect();
        let positions = self.randomized.as_ref().map(|r| {
            let length = windows[0].tokens.len() - 1;
            sample_positions(r, length, self.seed, 0)
                .unwrap_or_else(|e| panic!("validation positions: {e}"))
        });
        LmBatch::from_windows(&windows, 1.0, device).with_positions(positions)
    }
}

/// The output of an LM step.
pub struct LmOutput<B: Backend> {
    /// Mean cross-entropy per counted target: `[1]`.
    pub loss: Tensor<B, 1>,
    /// Targets the loss counted (every token, or the answers of a masked batch).
    pub tokens: usize,
    /// Tokens the model read.
    pub read: usize,
    /// Window length.
    pub length: usize,
}

impl<B: Backend> ItemLazy for LmOutput<B> {
    type ItemSync = LmStats;

    fn sync(self) -> LmStats {
        LmStats {
            loss: self.loss.into_scalar().elem::<f64>(),
            tokens: self.tokens,
            read: self.read,
            length: self.length,
        }
    }
}

impl<B: AutodiffBackend> TrainStep for LanguageModel<B> {
    type Input = LmBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> TrainOutput<LmOutput<B>> {
        let [n, length] = batch.inputs.dims();
        let nll = token_nll(self, batch.inputs, batch.targets, batch.positions.as_ref())
            .unwrap_or_else(|e| panic!("LM batch rejected by the model: {e}"));
        let loss = counted_nll_sum(nll, batch.weights) / batch.scored.max(1) as f64;
        let grads = (loss.clone() * batch.loss_scale).backward();
        TrainOutput::new(
            self,
            grads,
            LmOutput {
                loss,
                tokens: batch.scored,
                read: n * length,
                length,
            },
        )
    }
}

impl<B: Backend> InferenceStep for LanguageModel<B> {
    type Input = LmBatch<B>;
    type Output = LmOutput<B>;

    /// The whole group, in slices of [`EVAL_BATCH_TOKENS`] with [`auto_chunk`]ed attention.
    fn step(&self, batch: LmBatch<B>) -> LmOutput<B> {
        let [n, length] = batch.inputs.dims();
        let rows = (EVAL_BATCH_TOKENS / length).max(1);
        let model = self
            .clone()
            .with_chunk_size(auto_chunk(rows.min(n), length));
        let mut nll = 0.0;
        for start in (0..n).step_by(rows) {
            let end = (start + rows).min(n);
            let slice = token_nll(
                &model,
                batch.inputs.clone().slice(start..end),
                batch.targets.clone().slice(start..end),
                batch.positions.as_ref(),
            )
            .unwrap_or_else(|e| panic!("LM batch rejected by the model: {e}"));
            let weights = batch.weights.clone().map(|w| w.slice(start..end));
            nll += counted_nll_sum(slice, weights).into_scalar().elem::<f64>();
        }
        let tokens = batch.scored.max(1);
        let device = batch.inputs.device();
        LmOutput {
            loss: Tensor::from_floats([(nll / tokens as f64) as f32], &device),
            tokens,
            read: n * length,
            length,
        }
    }
}

/// A train loader that serves the next epoch's slice of one long, seeded window sequence on
/// every pass, so that epoch `e` sees the same windows whether or not the run was resumed.
struct EpochLoader<B: Backend, O> {
    epochs: Vec<Arc<dyn DataLoader<B, O>>>,
    next: Arc<AtomicUsize>,
}

impl<B: Backend, O: 'static> DataLoader<B, O> for EpochLoader<B, O> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        let e = self.next.fetch_add(1, Ordering::SeqCst);
        self.epochs[e.min(self.epochs.len() - 1)].iter()
    }

    fn num_items(&self) -> usize {
        let e = self.next.load(Ordering::SeqCst);
        self.epochs[e.min(self.epochs.len() - 1)].num_items()
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, O>> {
        Arc::new(Self {
            epochs: self.epochs.iter().map(|l| l.to_device(device)).collect(),
            next: self.next.clone(),
        })
    }

    /// A slice per device (multi-device training): each slice counts its epochs itself.
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, O>> {
        Arc::new(Self {
            epochs: self.epochs.iter().map(|l| l.slice(start, end)).collect(),
            next: Arc::new(AtomicUsize::new(self.next.load(Ordering::SeqCst))),
        })
    }
}

/// Options of a run that are not part of its config.
#[derive(Clone, Debug)]
pub struct LmTrainOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Where tokens are cached.
    pub cache_dir: PathBuf,
    /// How to show progress.
    pub progress: Progress,
    /// Devices to train on (more than one: burn-train's multi-device strategy, each device
    /// taking `batch_size / N` windows of every step, gradients summed on the first).
    pub devices: DeviceSpec,
}

/// What a finished run reports (also written as `train.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LmTrainSummary {
    /// Run folder, as [`portable_path`] records it (relative, or the run's name: no machine
    /// paths in committed results).
    pub out: String,
    /// Backend name.
    pub backend: String,
    /// Optimiser steps of the run.
    pub steps: usize,
    /// Optimiser step the run (re)started from.
    pub started_at_step: usize,
    /// Training tokens per optimiser step.
    pub tokens_per_step: usize,
    /// Wall-clock seconds of this invocation (training and validation rounds).
    pub seconds: f64,
    /// CPU seconds (user + system, all threads) of this invocation, where the system reports
    /// them (Linux); unlike `seconds`, not inflated by other processes on the machine.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Validation lengths that were measured each round.
    pub valid_lengths: Vec<usize>,
}

fn checkpoint_files(out: &Path, epoch: usize) -> [PathBuf; 3] {
    ["model", "optim", "scheduler"].map(|n| out.join("checkpoint").join(format!("{n}-{epoch}.mpk")))
}

/// The epochs whose three checkpoint files all exist, newest first.
fn complete_checkpoints(out: &Path) -> Vec<usize> {
    let Ok(dir) = std::fs::read_dir(out.join("checkpoint")) else {
        return Vec::new();
    };
    let mut epochs: Vec<usize> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_prefix("model-")?
                .strip_suffix(".mpk")?
                .parse::<usize>()
                .ok()
        })
        .filter(|&e| checkpoint_files(out, e).iter().all(|p| p.is_file()))
        .collect();
    epochs.sort_unstable_by(|a, b| b.cmp(a));
    epochs
}

/// The newest epoch whose three checkpoint files all exist.
pub fn latest_checkpoint(out: &Path) -> Option<usize> {
    complete_checkpoints(out).first().copied()
}

/// Loads the three files of checkpoint `epoch` once, so that a damaged or mismatched one is
/// found here rather than in a panic inside burn-train. The error names the file that failed.
fn check_checkpoint<B: AutodiffBackend, O: Optimizer<LanguageModel<B>, B>>(
    out: &Path,
    epoch: usize,
    model: &LanguageModel<B>,
    _optimizer: &O,
    device: &B::Device,
) -> std::result::Result<(), (PathBuf, String)> {
    let recorder = AtomicRecorder::default();
    let [m, o, s] = checkpoint_files(out, epoch);
    let bad = |path: &Path, e: &dyn std::fmt::Display| (path.to_path_buf(), e.to_string());
    model
        .clone()
        .load_file(&m, &recorder, device)
        .map_err(|e| bad(&m, &e))?;
    Recorder::<B>::load::<O::Record>(&recorder, o.clone(), device).map_err(|e| bad(&o, &e))?;
    Recorder::<B>::load::<usize>(&recorder, s.clone(), device).map_err(|e| bad(&s, &e))?;
    Ok(())
}

/// The checkpoint a resumed run starts from: the newest one that loads. A newer one that does
/// not (damaged from outside: our own writes are atomic) is passed over with a warning naming
/// its file. When none loads, the newest one's error; when there is none, `None` (the run
/// starts from step 0).
fn resumable_checkpoint<B: AutodiffBackend, O: Optimizer<LanguageModel<B>, B>>(
    out: &Path,
    model: &LanguageModel<B>,
    optimizer: &O,
    device: &B::Device,
) -> Result<Option<usize>> {
    let mut newest_failure = None;
    for epoch in complete_checkpoints(out) {
        match check_checkpoint(out, epoch, model, optimizer, device) {
            Ok(()) => return Ok(Some(epoch)),
            Err((path, e)) => {
                say_err!(
                    "warning: checkpoint {} cannot be loaded ({e}); trying the one before it",
                    path.display()
                );
                newest_failure.get_or_insert((path, e));
            }
        }
    }
    match newest_failure {
        None => Ok(None),
        Some((path, e)) => Err(Error::InvalidInput(format!(
            "checkpoint {} cannot be loaded ({e}), nor any before it; they are damaged or belong \
             to another model. Delete the checkpoint folder to start over, or choose another --out",
            path.display()
        ))),
    }
}

/// The top-level keys whose values differ.
fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| k.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        _ => vec!["(whole document)".into()],
    }
}

/// Validation groups: up to `valid_tokens / L` tiled windows per length from the validation
/// stream. Lengths the split is too short for are reported and left out.
pub fn validation_groups(config: &LmTrainConfig, stream: &[u16]) -> Vec<WindowGroup> {
    config
        .valid_lengths
        .iter()
        .filter_map(|&length| {
            let windows = tiled_windows(stream, length, (config.valid_tokens / length).max(1));
            if windows.is_empty() {
                say_err!(
                    "ppl@{length} is not measured: the validation split holds {} tokens, too \
                     few for one window",
                    stream.len()
                );
                None
            } else {
                Some(WindowGroup { length, windows })
            }
        })
        .collect()
}

/// The run's `count` training windows and its validation groups: from the corpus's train and
/// valid streams (with passkey items mixed into the former), or generated MQAR items.
fn training_data(
    config: &LmTrainConfig,
    corpus: Option<&(Corpus, Manifest)>,
    count: usize,
    options: &LmTrainOptions,
) -> Result<(RandomWindows, Vec<WindowGroup>)> {
    let randomized = config.encoding.randomized().cloned();
    let Some((corpus, manifest)) = corpus else {
        let mqar = config.mqar.clone().unwrap_or_default();
        let windows = RandomWindows::mqar(mqar.clone(), config.train_length, count, config.seed)?;
        let groups = config
            .valid_lengths
            .iter()
            .map(|&length| {
                let n = (config.valid_tokens / length).max(1);
                Ok(WindowGroup {
                    length,
                    windows: mqar_validation(&mqar, length, n, config.seed)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok((windows.randomized(randomized), groups));
    };
    let tokens = TokenizedCorpus::load(corpus, config.tokenizer, &options.cache_dir)?;
    let train_stream = Arc::new(tokens.stream(manifest, Part::Train)?);
    let valid_stream = tokens.stream(manifest, Part::Valid)?;
    let windows = RandomWindows::new(train_stream, config.train_length, count, config.seed)?
        .randomized(randomized)
        .with_passkey(config.passkey.clone());
    Ok((windows, validation_groups(config, &valid_stream)))
}

/// Trains `config` into `options.out`: `config.json`, `manifest.json`, burn-train's metric
/// logs (`train/`, `valid/`), `checkpoint/`, then `model.mpk` and `train.json`.
pub fn train<B: AutodiffBackend>(
    config: &LmTrainConfig,
    options: &LmTrainOptions,
    device: &B::Device,
    backend: &str,
) -> Result<(LanguageModel<B::InnerBackend>, LmTrainSummary)> {
    config.validate()?;
    let out = &options.out;
    // An MQAR run generates its data: no corpus, no manifest.
    let corpus = match config.mqar {
        Some(_) => None,
        None => {
            let corpus = Corpus::open(&config.data)?;
            let manifest = Manifest::split(&corpus, &config.split)?;
            Some((corpus, manifest))
        }
    };
    let config_json = serde_json::to_value(config)?;
    let config_path = out.join("config.json");
    let manifest_path = out.join("manifest.json");

    let resuming = if options.resume {
        if !config_path.is_file() {
            return Err(Error::InvalidInput(format!(
                "--resume: {} holds no run to resume",
                out.display()
            )));
        }
        // Both sides go through the struct, so that number formatting cannot differ.
        let saved: LmTrainConfig = serde_json::from_value(read_json(&config_path)?)?;
        let keys = differing_keys(&serde_json::to_value(&saved)?, &config_json);
        if !keys.is_empty() {
            return Err(Error::InvalidInput(format!(
                "--resume: the config differs from the run's {} in: {}",
                config_path.display(),
                keys.join(", ")
            )));
        }
        if let Some((_, manifest)) = &corpus {
            if read_json(&manifest_path)? != serde_json::to_value(manifest)? {
                return Err(Error::InvalidInput(format!(
                    "--resume: the corpus or its split differs from the run's {}",
                    manifest_path.display()
                )));
            }
        }
        true
    } else {
        if config_path.exists() {
            return Err(Error::InvalidInput(format!(
                "{} already holds a run; pass --resume to continue it, or choose another --out",
                out.display()
            )));
        }
        false
    };
    std::fs::create_dir_all(out).map_err(|source| Error::io(out.clone(), source))?;
    write_atomic(&config_path, &serde_json::to_string_pretty(config)?)?;
    if let Some((_, manifest)) = &corpus {
        write_atomic(&manifest_path, &serde_json::to_string_pretty(manifest)?)?;
    }

    // Scheduler steps are micro-batches (burn-train steps the scheduler on each).
    let accum = config.grad_accumulation;
    let total_micro = config.steps * accum;
    let (windows, groups) = training_data(
        config,
        corpus.as_ref(),
        total_micro * config.batch_size,
        options,
    )?;
    ensure(
        !groups.is_empty(),
        "valid_lengths",
        format!("{:?}", config.valid_lengths),
        "the validation split is too short for every one of them",
    )?;
    let valid_lengths: Vec<usize> = groups.iter().map(|g| g.length).collect();

    B::seed(device, config.seed);
    let model = config.model().init::<B>(device)?;
    let optimizer = FusedAdamWConfig::new()
        .with_beta_1(config.beta_1)
        .with_beta_2(config.beta_2)
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clip_norm(Some(config.grad_clip))
        .init::<B, LanguageModel<B>>()?;
    let resume_from = if resuming {
        resumable_checkpoint(out, &model, &optimizer, device)?
    } else {
        None
    };
    let done_epochs = resume_from.unwrap_or(0);

    let devices = options.devices.devices(device);
    let n_devices = devices.len();
    ensure(
        n_devices >= 1 && config.batch_size.is_multiple_of(n_devices),
        "batch_size",
        config.batch_size,
        &format!("must be a multiple of the number of devices ({n_devices})"),
    )?;
    let micro_per_epoch = config.checkpoint_every * accum;
    // Gradients are summed over micro-batches and devices: scale each loss so that the sum is
    // the mean over the whole step.
    let full = DataLoaderBuilder::<B, _, _>::new(LmBatcher {
        loss_scale: 1.0 / (accum * n_devices) as f64,
    })
    .batch_size(config.batch_size / n_devices)
    .set_device(device.clone())
    .build(windows);
    let epochs: Vec<_> = (0..config.epochs())
        .map(|e| {
            let start = e * micro_per_epoch * config.batch_size;
            let end = ((e + 1) * micro_per_epoch).min(total_micro) * config.batch_size;
            full.slice(start, end)
        })
        .collect();
    let train_loader: Arc<dyn DataLoader<B, LmBatch<B>>> = Arc::new(EpochLoader {
        epochs,
        next: Arc::new(AtomicUsize::new(done_epochs)),
    });
    let valid_loader = DataLoaderBuilder::<B::InnerBackend, _, _>::new(GroupBatcher {
        randomized: config.encoding.randomized().cloned(),
        seed: config.seed,
    })
    .batch_size(1)
    .set_device(device.clone())
    .build(GroupDataset(groups));

    let scheduler = WarmupCosineLr::new(
        config.learning_rate,
        config.min_learning_rate,
        config.warmup_steps * accum,
        total_micro,
    );
    let training = SupervisedTraining::new(out, train_loader, valid_loader);
    let failure = WriteFailure::stopping(training.interrupter());
    let mut training = training
        .with_metric_logger(RunMetricLogger::new(out, failure.clone()))
        // burn-train's `experiment.log` appender panics when it cannot open its file (a full
        // disk): our errors are returned instead, and our progress goes to the terminal.
        .with_application_logger(None)
        .metric_train_numeric(LmLossMetric::new())
        .metric_train_numeric(PerplexityMetric::new())
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(TokensPerSecondMetric::new())
        .metric_valid_numeric(LmLossMetric::new())
        .num_epochs(config.epochs())
        .with_file_checkpointer(AtomicRecorder::reporting_to(failure.clone()))
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(2));
    for &length in &valid_lengths {
        training = training.metric_valid_numeric(PerplexityMetric::at_length(length));
    }
    if accum > 1 {
        training = training.grads_accumulation(accum);
    }
    if n_devices > 1 {
        say!("training on {n_devices} devices: {devices:?}");
        training = training.with_training_strategy(
            ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice).into(),
        );
    }
    if let Some(epoch) = resume_from {
        say!(
            "resuming {} from step {} (checkpoint {epoch})",
            out.display(),
            (epoch * config.checkpoint_every).min(config.steps)
        );
        training = training.checkpoint(epoch);
    }
    if let Progress::Lines(prefix, every) = &options.progress {
        training = training.renderer(LineRenderer::new(prefix.clone(), *every).with_steps(
            config.checkpoint_every,
            config.steps,
            accum * n_devices,
        ));
    }
    let start = Instant::now();
    let cpu_start = sysmem::process_cpu_seconds();
    let interrupter = training.interrupter();
    let result = training.launch(Learner::new(model, optimizer, scheduler));
    finished(&failure, &interrupter, out)?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = cpu_start
        .zip(sysmem::process_cpu_seconds())
        .map(|(a, b)| b - a);
    save_module(result.model.clone(), &out.join("model"))?;
    let summary = LmTrainSummary {
        out: portable_path(out),
        backend: backend.to_string(),
        steps: config.steps,
        started_at_step: (done_epochs * config.checkpoint_every).min(config.steps),
        tokens_per_step: config.batch_size * accum * config.train_length,
        seconds,
        cpu_seconds,
        valid_lengths,
    };
    write_atomic(
        &out.join("train.json"),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    Ok((result.model, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_minimum() {
        let s = WarmupCosineLr::new(1.0, 0.1, 10, 110);
        assert!((s.rate(5) - 0.5).abs() < 1e-12);
        assert!((s.rate(10) - 1.0).abs() < 1e-12);
        assert!((s.rate(60) - 0.55).abs() < 1e-12);
        assert!((s.rate(110) - 0.1).abs() < 1e-12);
        assert!((s.rate(500) - 0.1).abs() < 1e-12);
    }
}

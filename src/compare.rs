//! Backend comparison: one model, saved once on ndarray and loaded on every backend, run on the
//! same tokens. Reports how far each backend's logits and loss are from ndarray's, and its
//! forward and forward+backward throughput after warm-up.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::encoding::PositionalEncodingConfig;
use crate::error::{ensure, Error, Result};
use crate::model::{LanguageModel, LanguageModelConfig, TransformerConfig};

/// Shape of the compared model and batch.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Sequence length.
    pub length: usize,
    /// Batch size.
    pub batch: usize,
    /// Model width.
    pub d_model: usize,
    /// Blocks.
    pub layers: usize,
    /// Heads.
    pub heads: usize,
    /// Vocabulary (bytes).
    pub vocab: usize,
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Timed runs.
    pub iterations: usize,
    /// Seed of weights and tokens.
    pub seed: u64,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            length: 128,
            batch: 4,
            d_model: 128,
            layers: 2,
            heads: 8,
            vocab: 256,
            warmup: 2,
            iterations: 5,
            seed: 0,
        }
    }
}

impl CompareConfig {
    fn model(&self, encoding: &PositionalEncodingConfig) -> LanguageModelConfig {
        LanguageModelConfig::new(
            self.vocab,
            TransformerConfig::new(self.d_model, self.layers, self.heads)
                .with_encoding(encoding.clone()),
        )
    }

    fn validate(&self) -> Result<()> {
        ensure(self.length > 0, "length", self.length, "must be at least 1")?;
        ensure(self.batch > 0, "batch", self.batch, "must be at least 1")?;
        ensure(
            self.iterations > 0,
            "iterations",
            self.iterations,
            "must be at least 1",
        )?;
        Ok(())
    }
}

/// What every backend is compared against: ndarray's weights (serialised), tokens and outputs.
#[derive(Clone, Debug)]
pub struct Reference {
    /// The encoding.
    pub encoding: PositionalEncodingConfig,
    /// The weights, serialised at full precision.
    pub weights: Vec<u8>,
    /// Tokens `[batch, length]`, row-major.
    pub tokens: Vec<i64>,
    /// ndarray's logits, row-major.
    pub logits: Vec<f32>,
    /// ndarray's loss.
    pub loss: f32,
}

/// One row of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct CompareResult {
    /// Backend name.
    pub backend: String,
    /// Encoding name.
    pub encoding: String,
    /// max |logits - ndarray logits|.
    pub max_abs_diff: f32,
    /// `max_abs_diff` over max |ndarray logits|.
    pub max_rel_diff: f32,
    /// |loss - ndarray loss|.
    pub loss_abs_diff: f32,
    /// Forward tokens per second (no autodiff).
    pub forward_tokens_per_second: f64,
    /// Forward + backward tokens per second.
    pub train_tokens_per_second: f64,
}

fn tokens<B: Backend>(
    ids: &[i64],
    config: &CompareConfig,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [config.batch, config.length]),
        device,
    )
}

fn loss<B: Backend>(
    model: &LanguageModel<B>,
    ids: Tensor<B, 2, Int>,
    config: &CompareConfig,
) -> Result<(Tensor<B, 3>, Tensor<B, 1>)> {
    let logits = model.forward(ids.clone())?;
    let n = config.batch * config.length;
    let targets = (ids + 1).remainder_scalar(config.vocab as i64).reshape([n]);
    let loss = burn::nn::loss::CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.clone().reshape([n, config.vocab]), targets);
    Ok((logits, loss))
}

/// Builds the reference on backend `B` (ndarray in the CLI).
pub fn reference<B: Backend>(
    encoding: &PositionalEncodingConfig,
    config: &CompareConfig,
    device: &B::Device,
) -> Result<Reference> {
    config.validate()?;
    B::seed(device, config.seed);
    let model = config.model(encoding).init::<B>(device)?;
    let mut rng = crate::data::che::Rng::new(config.seed);
    let ids: Vec<i64> = (0..config.batch * config.length)
        .map(|_| rng.below(config.vocab as u64) as i64)
        .collect();
    let (logits, loss) = loss(&model, tokens(&ids, config, device), config)?;
    let weights = Recorder::<B>::record(
        &BinBytesRecorder::<FullPrecisionSettings>::default(),
        model.into_record(),
        (),
    )
    .map_err(|e| Error::InvalidInput(format!("cannot serialise the weights: {e}")))?;
    Ok(Reference {
        encoding: encoding.clone(),
        weights,
        tokens: ids,
        logits: logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| Error::InvalidInput(format!("{e:?}")))?,
        loss: loss.into_scalar().elem::<f32>(),
    })
}

fn seconds_per_run(
    warmup: usize,
    iterations: usize,
    mut run: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        run()?;
    }
    let start = Instant::now();
    for _ in 0..iterations {
        run()?;
    }
    Ok(start.elapsed().as_secs_f64() / iterations as f64)
}

/// Loads the reference weights on backend `B`, compares outputs and measures throughput.
pub fn measure<B: AutodiffBackend>(
    reference: &Reference,
    config: &CompareConfig,
    backend: &str,
    device: &B::Device,
) -> Result<CompareResult> {
    let record = Recorder::<B>::load(
        &BinBytesRecorder::<FullPrecisionSettings>::default(),
        reference.weights.clone(),
        device,
    )
    .map_err(|e| Error::InvalidInput(format!("cannot load the weights on {backend}: {e}")))?;
    let model = config
        .model(&reference.encoding)
        .init::<B>(device)?
        .load_record(record);
    let inference = model.valid();
    let ids = tokens::<B::InnerBackend>(&reference.tokens, config, device);
    let (logits, loss_value) = loss(&inference, ids.clone(), config)?;
    let logits: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::InvalidInput(format!("{e:?}")))?;
    let max_abs_diff = logits
        .iter()
        .zip(&reference.logits)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = reference.logits.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let loss_abs_diff = (loss_value.into_scalar().elem::<f32>() - reference.loss).abs();

    let tokens_per_run = (config.batch * config.length) as f64;
    let forward = seconds_per_run(config.warmup, config.iterations, || {
        let (logits, _) = loss(&inference, ids.clone(), config)?;
        let _ = logits.into_data();
        Ok(())
    })?;
    let train_ids = tokens::<B>(&reference.tokens, config, device);
    let train = seconds_per_run(config.warmup, config.iterations, || {
        let (_, loss) = loss(&model, train_ids.clone(), config)?;
        let grads = loss.backward();
        // Read one gradient back so that the backward pass has really run.
        let head = model.head.weight.val().grad(&grads);
        let _ = head.map(|g| g.sum().into_data());
        Ok(())
    })?;
    Ok(CompareResult {
        backend: backend.to_string(),
        encoding: reference.encoding.name(),
        max_abs_diff,
        max_rel_diff: max_abs_diff / scale,
        loss_abs_diff,
        forward_tokens_per_second: tokens_per_run / forward,
        train_tokens_per_second: tokens_per_run / train,
    })
}

/// The results as a markdown table.
pub fn markdown(results: &[CompareResult]) -> String {
    let mut out = String::from(
        "| backend | encoding | max abs diff | max rel diff | loss diff | forward tok/s | train tok/s |\n|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.2e} | {:.2e} | {:.2e} | {:.0} | {:.0} |\n",
            r.backend,
            r.encoding,
            r.max_abs_diff,
            r.max_rel_diff,
            r.loss_abs_diff,
            r.forward_tokens_per_second,
            r.train_tokens_per_second
        ));
    }
    out
}

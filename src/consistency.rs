//! A self-check that anyone can run on any backend: for each encoding, a small random LM is run
//! three ways — full forward, query-chunked forward, and prompt + token-by-token KV-cache
//! decoding — and the largest differences and the timings are reported.

use std::time::Instant;

use burn::prelude::*;

use crate::encoding::PositionalEncodingConfig;
use crate::error::{ensure, Result};
use crate::model::{LanguageModelConfig, TransformerConfig};

/// Settings of [`check_encoding`].
#[derive(Clone, Debug)]
pub struct ConsistencyConfig {
    /// Sequence length.
    pub length: usize,
    /// Tokens decoded one at a time after the prompt (the prompt is `length - decode`).
    pub decode: usize,
    /// Query rows per chunk for the chunked forward.
    pub chunk: usize,
    /// Model width.
    pub d_model: usize,
    /// Heads.
    pub n_heads: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Seed for weights and tokens.
    pub seed: u64,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        Self {
            length: 128,
            decode: 16,
            chunk: 32,
            d_model: 64,
            n_heads: 4,
            n_layers: 2,
            seed: 0,
        }
    }
}

/// The result for one encoding.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConsistencyReport {
    /// Encoding name.
    pub encoding: String,
    /// max |chunked - full| over all logits.
    pub chunked_max_abs_diff: f32,
    /// max |decoded - full| over the decoded positions' logits.
    pub decode_max_abs_diff: f32,
    /// Seconds of the full forward.
    pub full_seconds: f64,
    /// Seconds of the chunked forward.
    pub chunked_seconds: f64,
    /// Seconds per decoded token.
    pub decode_seconds_per_token: f64,
}

fn max_abs<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

/// Runs the three paths for `encoding` on `device`.
pub fn check_encoding<B: Backend>(
    encoding: &PositionalEncodingConfig,
    config: &ConsistencyConfig,
    device: &B::Device,
) -> Result<ConsistencyReport> {
    ensure(
        config.length >= 2,
        "length",
        config.length,
        "must be at least 2",
    )?;
    ensure(
        config.decode >= 1 && config.decode < config.length,
        "decode",
        config.decode,
        "must be at least 1 and below the length",
    )?;
    B::seed(device, config.seed);
    let vocab = 256;
    let model = LanguageModelConfig::new(
        vocab,
        TransformerConfig::new(config.d_model, config.n_layers, config.n_heads)
            .with_encoding(encoding.clone()),
    )
    .init::<B>(device)?;
    let tokens = Tensor::<B, 2>::random(
        [1, config.length],
        burn::tensor::Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int()
    .clamp(0, vocab as i64 - 1);

    let start = Instant::now();
    let full = model.forward(tokens.clone())?;
    let _ = full.clone().into_data();
    let full_seconds = start.elapsed().as_secs_f64();

    let chunked_model = model.clone().with_chunk_size(Some(config.chunk));
    let start = Instant::now();
    let chunked = chunked_model.forward(tokens.clone())?;
    let _ = chunked.clone().into_data();
    let chunked_seconds = start.elapsed().as_secs_f64();

    let prompt = config.length - config.decode;
    let mut cache = model.new_cache();
    model.forward_cached(tokens.clone().narrow(1, 0, prompt), &mut cache)?;
    let start = Instant::now();
    let mut steps = Vec::with_capacity(config.decode);
    for t in prompt..config.length {
        steps.push(model.forward_cached(tokens.clone().narrow(1, t, 1), &mut cache)?);
    }
    let decoded = Tensor::cat(steps, 1);
    let _ = decoded.clone().into_data();
    let decode_seconds_per_token = start.elapsed().as_secs_f64() / config.decode as f64;

    Ok(ConsistencyReport {
        encoding: encoding.name(),
        chunked_max_abs_diff: max_abs(chunked, full.clone()),
        decode_max_abs_diff: max_abs(decoded, full.narrow(1, prompt, config.decode)),
        full_seconds,
        chunked_seconds,
        decode_seconds_per_token,
    })
}

//! `dape bench`: one measurement of a training or evaluation step of the model that
//! `../shared/bench/torch_ref.py` (PyTorch eager, the peer to beat) also builds — 4 layers,
//! d_model 256, 8 heads, vocabulary 256, GELU MLP 4× — printed as one JSON line with the same
//! keys (`seconds_per_step`, `tokens_per_second`, `peak_rss_mib`, `encoding`, `mode`, `length`,
//! `batch`, ...), so the two can be compared side by side (`scripts/bench-vs-pytorch.sh`).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::attention::{attention_path_counts, SsmaxConfig, StickBreakingConfig};
use crate::encoding::{table_cache_stats, PositionalEncodingConfig};
use crate::error::{ensure, Result};
use crate::experiment::lm::{auto_chunk, token_nll};
use crate::model::{LanguageModel, LanguageModelConfig, TransformerConfig};
use crate::optim::FusedAdamWConfig;
use crate::sysmem;

/// What is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Forward, cross-entropy, backward, gradient clipping and an AdamW step.
    Train,
    /// Forward and cross-entropy without gradients (query-chunked attention).
    Eval,
}

/// A measurement.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Train or eval.
    pub mode: BenchMode,
    /// The encoding.
    pub encoding: PositionalEncodingConfig,
    /// Tokens per sequence.
    pub length: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Attention chunk for eval (`None`: [`auto_chunk`]); training never chunks.
    pub chunk: Option<usize>,
    /// Vocabulary (torch_ref: 256).
    pub vocab: usize,
    /// Width (torch_ref: 256).
    pub d_model: usize,
    /// Blocks (torch_ref: 4).
    pub layers: usize,
    /// Heads (torch_ref: 8).
    pub heads: usize,
    /// Train mode: also time the forward pass (with the loss), the backward pass and the
    /// optimizer step (clipping and AdamW) apart, waiting for the device after each, and report
    /// them as [`BenchResult::phases`]. The waits cost a little on asynchronous backends.
    pub phases: bool,
    /// Stick-breaking attention in place of the softmax.
    pub stick_breaking: bool,
    /// Scalable-Softmax in every attention layer ([`crate::SsmaxConfig`]'s defaults).
    pub ssmax: bool,
}

impl BenchConfig {
    /// torch_ref.py's model and defaults.
    pub fn new(mode: BenchMode, encoding: PositionalEncodingConfig) -> Self {
        Self {
            mode,
            encoding,
            length: 128,
            batch: 8,
            steps: 10,
            warmup: 2,
            chunk: None,
            vocab: 256,
            d_model: 256,
            layers: 4,
            heads: 8,
            phases: false,
            stick_breaking: false,
            ssmax: false,
        }
    }
}

/// One JSON line; the keys of torch_ref.py plus `impl`, `backend` and `chunk`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    /// `dape`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Backend name.
    pub backend: String,
    /// Threads available to the process.
    pub threads: usize,
    /// Threads of the rayon pool that the ndarray kernels run on (`RAYON_NUM_THREADS`, or one
    /// per core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_threads: Option<usize>,
    /// Whether the steps ran on a worker of that pool ([`crate::kernel::join_compute_pool`]:
    /// each parallel op forks from the step's own thread) rather than hopping to it from
    /// outside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_on_pool: Option<bool>,
    /// Encoding name.
    pub encoding: String,
    /// The attention's normaliser: `softmax` or `stick_breaking`.
    #[serde(default = "softmax_name")]
    pub normaliser: String,
    /// Whether the layers had Scalable-Softmax.
    #[serde(default)]
    pub ssmax: bool,
    /// `train` or `eval`.
    pub mode: BenchMode,
    /// Tokens per sequence.
    pub length: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Width.
    pub d_model: usize,
    /// Blocks.
    pub layers: usize,
    /// Heads.
    pub heads: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Attention chunk used (eval).
    pub chunk: Option<usize>,
    /// Mean wall-clock seconds per timed step.
    pub seconds_per_step: f64,
    /// Mean CPU seconds (user + system, every thread) of the process per timed step (Linux).
    /// Near `seconds_per_step` × threads when every thread computes all the time; near
    /// `seconds_per_step` when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds_per_step: Option<f64>,
    /// Share of the whole machine's CPU time that the hypervisor gave to other guests during
    /// the timed steps (0..=1, from `/proc/stat`; Linux). A slow step with a high steal share was
    /// slowed by the host, not by the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_fraction: Option<f64>,
    /// `batch * length / seconds_per_step`.
    pub tokens_per_second: f64,
    /// Peak resident set size of the process (MiB; Linux), as torch_ref's `ru_maxrss`.
    pub peak_rss_mib: Option<f64>,
    /// Data-independent tables (distances, masks, bias buckets, RoPE cos/sin) built during the
    /// timed steps; 0 once the warm-up has filled the cache (see [`crate::encoding::cache`]).
    #[serde(default)]
    pub table_builds: u64,
    /// Table lookups answered from the cache during the timed steps.
    #[serde(default)]
    pub table_hits: u64,
    /// Which path the attention took in the timed steps: `fused` (one node per chunk of query
    /// rows; no `[batch, heads, rows, keys]` logits kept), `tensor` (the logits are tensors:
    /// an encoding or option without a fused form on this backend) or `mixed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_path: Option<String>,
    /// Mean seconds per timed step in each phase, when [`BenchConfig::phases`] asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// The normaliser of results written before the field existed.
fn softmax_name() -> String {
    "softmax".into()
}

/// Where a training step's time goes (mean seconds per step).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Forward pass and the loss.
    pub forward: f64,
    /// Backward pass, up to the parameters' gradients.
    pub backward: f64,
    /// Gradient clipping and the AdamW step.
    pub optimizer: f64,
}

fn batch_tokens<B: Backend>(
    config: &BenchConfig,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let (n, l) = (config.batch, config.length);
    let data = Tensor::<B, 2, Int>::random(
        [n, l + 1],
        burn::tensor::Distribution::Uniform(0.0, config.vocab as f64),
        device,
    )
    .clamp(0, config.vocab as i64 - 1);
    (
        data.clone().slice([0..n, 0..l]),
        data.slice([0..n, 1..l + 1]),
    )
}

/// Runs the measurement on backend `B`.
pub fn run<B: AutodiffBackend>(
    config: &BenchConfig,
    device: &B::Device,
    backend: &str,
) -> Result<BenchResult> {
    for (field, value) in [
        ("length", config.length),
        ("batch", config.batch),
        ("steps", config.steps),
    ] {
        ensure(value > 0, field, value, "must be at least 1")?;
    }
    B::seed(device, 0);
    let model_config = LanguageModelConfig::new(
        config.vocab,
        TransformerConfig::new(config.d_model, config.layers, config.heads)
            .with_encoding(config.encoding.clone())
            .with_stick_breaking(config.stick_breaking.then(StickBreakingConfig::new))
            .with_ssmax(config.ssmax.then(SsmaxConfig::new)),
    );
    let model: LanguageModel<B> = model_config.init(device)?;
    let (inputs, targets) = batch_tokens::<B>(config, device);
    let mut chunk = None;
    let mut phases = Phases::default();
    // Waits for the model's parameters to be computed (asynchronous backends).
    let sync = |model: &LanguageModel<B>| {
        let _ = model.head.weight.val().slice([0..1, 0..1]).into_scalar();
    };
    let mut timed = |steps: usize| -> Result<f64> {
        phases = Phases::default();
        let start = Instant::now();
        match config.mode {
            BenchMode::Train => {
                let mut model = model.clone();
                let mut optim = FusedAdamWConfig::new()
                    .with_beta_1(0.9)
                    .with_beta_2(0.95)
                    .with_weight_decay(0.1)
                    .with_grad_clip_norm(Some(1.0))
                    .init::<B, LanguageModel<B>>()?;
                for _ in 0..steps {
                    let t0 = Instant::now();
                    let loss = token_nll(&model, inputs.clone(), targets.clone(), None)?.mean();
                    if config.phases {
                        let _ = loss.clone().into_scalar();
                    }
                    let t1 = Instant::now();
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    if config.phases {
                        sync(&model);
                    }
                    let t2 = Instant::now();
                    model = optim.step(6e-4, model, grads);
                    sync(&model);
                    let t3 = Instant::now();
                    phases.forward += (t1 - t0).as_secs_f64();
                    phases.backward += (t2 - t1).as_secs_f64();
                    phases.optimizer += (t3 - t2).as_secs_f64();
                }
            }
            BenchMode::Eval => {
                let c = config
                    .chunk
                    .or_else(|| auto_chunk(config.batch, config.length));
                chunk = c;
                let model = model.valid().with_chunk_size(c);
                let (x, y) = (inputs.clone().inner(), targets.clone().inner());
                for _ in 0..steps {
                    let _ = token_nll(&model, x.clone(), y.clone(), None)?
                        .mean()
                        .into_scalar();
                }
            }
        }
        Ok(start.elapsed().as_secs_f64())
    };
    if config.warmup > 0 {
        timed(config.warmup)?;
    }
    let before = table_cache_stats();
    let (cpu_before, ticks_before) = (sysmem::process_cpu_seconds(), sysmem::machine_cpu_ticks());
    let paths_before = attention_path_counts();
    let seconds = timed(config.steps)? / config.steps as f64;
    let paths = attention_path_counts().since(&paths_before);
    let (cpu_after, ticks_after) = (sysmem::process_cpu_seconds(), sysmem::machine_cpu_ticks());
    let after = table_cache_stats();
    let per_step = |x: f64| x / config.steps as f64;
    let phases = (config.phases && config.mode == BenchMode::Train).then(|| Phases {
        forward: per_step(phases.forward),
        backward: per_step(phases.backward),
        optimizer: per_step(phases.optimizer),
    });
    Ok(BenchResult {
        implementation: "dape".into(),
        backend: backend.into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pool_threads: (backend == "ndarray").then(rayon::current_num_threads),
        step_on_pool: (backend == "ndarray").then(|| rayon::current_thread_index().is_some()),
        encoding: config.encoding.name(),
        normaliser: if config.stick_breaking {
            "stick_breaking"
        } else {
            "softmax"
        }
        .into(),
        ssmax: config.ssmax,
        mode: config.mode,
        length: config.length,
        batch: config.batch,
        d_model: config.d_model,
        layers: config.layers,
        heads: config.heads,
        vocab: config.vocab,
        chunk,
        seconds_per_step: seconds,
        cpu_seconds_per_step: cpu_before.zip(cpu_after).map(|(a, b)| per_step(b - a)),
        steal_fraction: ticks_before
            .zip(ticks_after)
            .and_then(|(a, b)| b.steal_since(&a)),
        tokens_per_second: (config.batch * config.length) as f64 / seconds,
        peak_rss_mib: sysmem::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        table_builds: after.builds.saturating_sub(before.builds),
        table_hits: after.hits.saturating_sub(before.hits),
        attention_path: paths.name().map(str::to_string),
        phases,
    })
}

/// Our encoding name for a name of torch_ref.py (`kerple` is Kerple-log there), or the name
/// itself.
pub fn encoding_from_torch_name(name: &str) -> &str {
    match name {
        "kerple" => "kerple_log",
        "dape-kerple" => "dape_kerple_log",
        "dape-alibi" => "dape_alibi",
        "dape-fire" => "dape_fire",
        other => other,
    }
}

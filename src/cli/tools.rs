//! `dape encodings`, `config`, `check`, `compare-backends` and `bench`: the encodings, their
//! consistency, backend agreement and step timings.

use burn::tensor::backend::AutodiffBackend;

use super::parse_encodings;
use dape::backend::{dispatch, BackendKind, BackendTask};
use dape::bench::{BenchConfig, BenchMode, BenchResult};
use dape::compare::{self, CompareConfig, CompareResult, Reference};
use dape::consistency::{check_encoding, ConsistencyConfig, ConsistencyReport};
use dape::encoding::Hook;
use dape::{PositionalEncodingConfig, Result, ENCODING_NAMES};

/// `dape config`.
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// Encoding name, e.g. dape_kerple_log.
    name: String,
}

/// `dape check`.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// Comma-separated encoding names, or `all`.
    #[arg(long, default_value = "all")]
    encodings: String,
    /// Sequence length.
    #[arg(long, default_value_t = 128)]
    length: usize,
    /// Tokens decoded one at a time at the end.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Query rows per chunk.
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
    backend: BackendKind,
    /// Largest absolute difference that still passes.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Write the reports as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// `dape compare-backends`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// Comma-separated backends: ndarray, wgpu, tch-cpu, tch-cuda.
    #[arg(long, default_value = "ndarray")]
    backends: String,
    /// Comma-separated encoding names, or `all`.
    #[arg(
        long,
        default_value = "nope,rope,alibi,kerple_log,fire,cope,dape_kerple_log,dapev2_kerple_log"
    )]
    encodings: String,
    /// Sequence length.
    #[arg(long, default_value_t = 128)]
    length: usize,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed runs (after 2 warm-up runs).
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Also write `{results: [...]}` as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// `dape bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// train: forward, backward, clipping and AdamW; eval: forward without gradients.
    #[arg(long, value_enum, default_value_t = BenchMode::Train)]
    mode: BenchMode,
    /// Encoding: our names, torch_ref.py's (kerple, dape-kerple, ...), or a JSON config file.
    #[arg(long, default_value = "dape_kerple_log")]
    encoding: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    length: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps first (torch_ref.py: 2).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Attention chunk in eval mode [default: automatic, bounded per-pair tensors].
    #[arg(long)]
    chunk: Option<usize>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
    backend: BackendKind,
    /// Train mode: also report the forward, backward and optimizer seconds per step apart
    /// (`phases` in the JSON line), waiting for the device after each.
    #[arg(long)]
    phases: bool,
    /// Stick-breaking attention in place of the softmax (`"normaliser"` in the JSON line).
    #[arg(long)]
    stick_breaking: bool,
    /// Scalable-Softmax in every attention layer (`"ssmax": true` in the JSON line).
    #[arg(long)]
    ssmax: bool,
}

struct ReferenceTask {
    encoding: PositionalEncodingConfig,
    config: CompareConfig,
}

impl BackendTask for ReferenceTask {
    type Output = Reference;
    fn run<B: AutodiffBackend>(self, device: B::Device, _: BackendKind) -> Result<Reference> {
        compare::reference::<B::InnerBackend>(&self.encoding, &self.config, &device)
    }
}

struct MeasureTask<'a> {
    reference: &'a Reference,
    config: &'a CompareConfig,
}

impl BackendTask for MeasureTask<'_> {
    type Output = CompareResult;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<CompareResult> {
        compare::measure::<B>(self.reference, self.config, kind.name(), &device)
    }
}

fn parse_backends(list: &str) -> Result<Vec<BackendKind>> {
    use clap::ValueEnum;
    list.split(',')
        .map(|b| {
            BackendKind::from_str(b.trim(), true).map_err(|_| {
                dape::Error::invalid(
                    "backends",
                    b.trim(),
                    "expected ndarray, wgpu, tch-cpu or tch-cuda",
                )
            })
        })
        .collect()
}

struct BenchTask(BenchConfig);

impl BackendTask for BenchTask {
    type Output = BenchResult;
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<BenchResult> {
        dape::bench::run::<B>(&self.0, &device, kind.name())
    }
}

struct CheckTask {
    encodings: Vec<PositionalEncodingConfig>,
    config: ConsistencyConfig,
}

impl BackendTask for CheckTask {
    type Output = Vec<ConsistencyReport>;
    fn run<B: AutodiffBackend>(self, device: B::Device, _: BackendKind) -> Result<Self::Output> {
        self.encodings
            .iter()
            .map(|e| check_encoding::<B::InnerBackend>(e, &self.config, &device))
            .collect()
    }
}

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::None => "none",
        Hook::Embedding => "token embeddings",
        Hook::Rotary => "rotates q, k",
        Hook::Logits => "attention logits",
        Hook::Segments => "token embeddings (in-segment) + segments in attention",
        Hook::InputGate => "attention logits (a bias from the layer's input)",
        Hook::Householder => "q·k through transforms from the layer's input",
    }
}

/// Writes `text` to the `--json` file, when one was given.
fn write_json(
    path: Option<std::path::PathBuf>,
    text: impl FnOnce() -> Result<String>,
) -> Result<()> {
    if let Some(path) = path {
        dape::util::write_atomic(&path, &text()?)?;
    }
    Ok(())
}

/// `dape encodings`: every encoding and where it acts.
pub fn encodings() -> Result<bool> {
    say!("| encoding | acts on | randomized positions |\n| --- | --- | --- |");
    for name in ENCODING_NAMES {
        let config = PositionalEncodingConfig::from_name(name)?;
        let randomized = if config.takes_randomized() {
            "yes"
        } else {
            "no"
        };
        say!("| {name} | {} | {randomized} |", hook_name(config.hook()));
    }
    say!(
        "\nAttention options that compose with every encoding:\n\n\
         | option | acts on |\n| --- | --- |\n\
         | ssmax (`--ssmax`; `\"ssmax\": {{\"init_length\": 256}}` in an LM config) | \
         each row's logits after the encoding's hook, times s_h · ln(keys the row sees) |\n\
         | stick-breaking (`--stick-breaking`; `\"stick_breaking\": {{}}` in an LM config) | \
         replaces the softmax: each row breaks a stick over its keys from the nearest outward, \
         A_ij = σ(z_ij) · Π (1 − σ(z_ik)) over the keys k between j and the row |\n\n\
         Hybrid stacks (an LM config's `\"layer_encodings\"`, e.g. {{\"every\": 4, \"encoding\": \
         \"nope\"}}; `configs/lm/irope.json`) give their layers different encodings, with \
         `\"qk_norm\"` and `\"sliding_window\"` on the unscheduled layers and `\"temperature\"` \
         (q times 1 + α ln(1 + ⌊(p+1)/F⌋)) on the scheduled ones.\n\n\
         Randomized positions (Ruoss et al., 2023), for the encodings marked yes: `--randomized M` \
         on `dape che train` / `che suite`, or `\"randomized\": {{\"max_position\": M}}` in an \
         encoding's JSON (an LM config's `encoding`). Each training step and each test forward \
         pass puts its tokens at a sorted random sample of distinct positions from 0..M."
    );
    Ok(true)
}

/// `dape config`: an encoding's default JSON config.
pub fn config(args: ConfigArgs) -> Result<bool> {
    let config = PositionalEncodingConfig::from_name(&args.name)?;
    say!("{}", serde_json::to_string_pretty(&config)?);
    Ok(true)
}

/// `dape check`: chunked and KV-cache decoding against the full forward, per encoding;
/// `Ok(false)` when one exceeds the tolerance.
pub fn check(args: CheckArgs) -> Result<bool> {
    let CheckArgs {
        encodings,
        length,
        decode,
        chunk,
        backend,
        tolerance,
        json,
    } = args;
    let config = ConsistencyConfig {
        length,
        decode,
        chunk,
        ..Default::default()
    };
    let task = CheckTask {
        encodings: parse_encodings(&encodings)?,
        config,
    };
    say!(
        "Consistency on {backend}: length {length}, chunk {chunk}, last {decode} tokens decoded with the KV cache"
    );
    let reports = dispatch(backend, task)?;
    say!("| encoding | chunked max abs diff | decode max abs diff | full s | chunked s | decode s/token | ok |");
    say!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut all_ok = true;
    for r in &reports {
        let ok = r.chunked_max_abs_diff <= tolerance && r.decode_max_abs_diff <= tolerance;
        all_ok &= ok;
        say!(
            "| {} | {:.2e} | {:.2e} | {:.3} | {:.3} | {:.4} | {} |",
            r.encoding,
            r.chunked_max_abs_diff,
            r.decode_max_abs_diff,
            r.full_seconds,
            r.chunked_seconds,
            r.decode_seconds_per_token,
            if ok { "yes" } else { "NO" }
        );
    }
    write_json(json, || Ok(serde_json::to_string_pretty(&reports)?))?;
    Ok(all_ok)
}

/// `dape compare-backends`: one model's logits, loss and speed on each backend, against
/// ndarray.
pub fn compare_backends(args: CompareArgs) -> Result<bool> {
    let CompareArgs {
        backends,
        encodings,
        length,
        batch,
        iterations,
        json,
    } = args;
    let backends = parse_backends(&backends)?;
    let config = CompareConfig {
        length,
        batch,
        iterations,
        ..Default::default()
    };
    say!(
        "Comparing {} backends against ndarray: batch {batch} × length {length}, d_model {}, {} layers, {} heads",
        backends.len(),
        config.d_model,
        config.layers,
        config.heads
    );
    let mut results = Vec::new();
    for encoding in parse_encodings(&encodings)? {
        let reference = dispatch(
            BackendKind::Ndarray,
            ReferenceTask {
                encoding,
                config: config.clone(),
            },
        )?;
        for &backend in &backends {
            let result = dispatch(
                backend,
                MeasureTask {
                    reference: &reference,
                    config: &config,
                },
            )?;
            say!(
                "{backend} / {}: max abs diff {:.2e}, forward {:.0} tok/s, train {:.0} tok/s",
                result.encoding,
                result.max_abs_diff,
                result.forward_tokens_per_second,
                result.train_tokens_per_second
            );
            results.push(result);
        }
    }
    say!("\n{}", compare::markdown(&results));
    write_json(json, || {
        Ok(serde_json::to_string_pretty(
            &serde_json::json!({ "results": results }),
        )?)
    })?;
    Ok(true)
}

/// `dape bench`: one JSON line with torch_ref.py's keys.
pub fn bench(args: BenchArgs) -> Result<bool> {
    let encoding = super::encoding_arg(dape::bench::encoding_from_torch_name(&args.encoding))?;
    let config = BenchConfig {
        length: args.length,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        chunk: args.chunk,
        phases: args.phases,
        stick_breaking: args.stick_breaking,
        ssmax: args.ssmax,
        ..BenchConfig::new(args.mode, encoding)
    };
    let result = dispatch(args.backend, BenchTask(config))?;
    say!("{}", serde_json::to_string(&result)?);
    Ok(true)
}

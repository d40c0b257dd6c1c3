//! The `dape` command line.

use std::process::ExitCode;

/// Tensors of tens of MiB are allocated and freed at every step. By default glibc's malloc maps
/// each one fresh from the kernel and unmaps it on free (page faults every time), which made a
/// DAPE training step 1.7× slower here (25.3 s vs 14.9 s for 10 CHE steps). Keep freed memory in
/// the process instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

use std::io::IsTerminal;
use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};

use dape::backend::{dispatch, BackendKind, BackendTask, DeviceSpec};
use dape::bench::{BenchConfig, BenchMode};
use dape::compare::{self, CompareConfig, CompareResult, Reference};
use dape::consistency::{check_encoding, ConsistencyConfig, ConsistencyReport};
use dape::data::che::Task;
use dape::data::corpus::default_cache_dir;
use dape::encoding::Hook;
use dape::eval::che::{
    evaluate_run, parse_lengths, run_suite, write_report, CheEvalConfig, CheEvalReport,
    SuiteConfig, SuiteReport,
};
use dape::eval::lm::{self as lm_eval, LmEvalConfig};
use dape::train::che::{self as che_train, CheTrainConfig, Progress};
use dape::train::lm::{self as lm_train, LmTrainConfig, LmTrainOptions};
use dape::{PositionalEncodingConfig, Result, ENCODING_NAMES};

#[derive(Parser)]
#[command(
    name = "dape",
    version,
    about = "Positional encodings for length extrapolation, on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every positional encoding and where it acts.
    Encodings,
    /// Print the default JSON config of an encoding.
    Config {
        /// Encoding name, e.g. dape_kerple_log.
        name: String,
    },
    /// Check, for each encoding, that chunked and KV-cache decoding equal the full forward.
    Check {
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
    },
    /// Run one model (weights saved once on ndarray) on several backends: differences of
    /// logits and loss against ndarray, and forward / forward+backward tokens per second.
    CompareBackends {
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
    },
    /// Train a language model on a folder of .txt documents (burn-train Learner, AdamW, cosine
    /// schedule, checkpoints); writes config, manifest, metric logs and the model into --out.
    Train {
        /// The run's JSON config, e.g. configs/lm/dape_kerple_log.json.
        #[arg(long)]
        config: PathBuf,
        /// Corpus folder [default: the config's `data`, data/books].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
        /// Run folder [default: runs/<config name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Optimiser steps, overriding the config's (warmup shrinks to a tenth if it would not
        /// fit).
        #[arg(long)]
        steps: Option<usize>,
        /// Steps between checkpoints and validation rounds, overriding the config's.
        #[arg(long)]
        checkpoint_every: Option<usize>,
        /// Continue the run in --out from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// One progress line every N steps [default: burn-train's TUI on a terminal, a line
        /// every 50 steps otherwise].
        #[arg(long)]
        lines: Option<usize>,
        /// Token cache folder [default: $DAPE_CACHE/tokens or ~/.cache/dape/tokens].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Devices: a count (the first N of the backend) or indices (0,1); more than one uses
        /// burn-train's multi-device strategy (batch_size is split across them).
        #[arg(long, default_value = "1")]
        devices: DeviceSpec,
    },
    /// Perplexity by evaluation length on the test documents of trained runs; writes eval.json,
    /// eval.csv and ppl_by_length.svg into each run, and with several runs one combined plot.
    Eval {
        /// Run folder of `dape train` (repeat for several runs).
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Evaluation lengths: a list, `a..b` or `a..b:step`.
        #[arg(long, default_value = "128,256,512,1024,2048,4096,8192")]
        lengths: String,
        /// Perplexity on the last N tokens of each window (the paper: 256), and on all.
        #[arg(long, default_value_t = 256)]
        last: usize,
        /// Query rows per attention chunk [default: as many as keep the per-pair tensors under
        /// 2^24 floats].
        #[arg(long)]
        chunk: Option<usize>,
        /// Tokens evaluated per length, at most.
        #[arg(long, default_value_t = 65536)]
        max_tokens: usize,
        /// Corpus folder [default: the one in each run's manifest].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
        /// Folder of the combined plot and table when there are several runs [default: the
        /// first run's parent].
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Token cache folder.
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Time a training or evaluation step of torch_ref.py's model (4 layers, d_model 256,
    /// 8 heads, vocabulary 256); prints one JSON line with torch_ref.py's keys.
    Bench {
        /// train: forward, backward, clipping and AdamW; eval: forward without gradients.
        #[arg(long, value_enum, default_value_t = BenchMode::Train)]
        mode: BenchMode,
        /// Encoding (our names, or torch_ref.py's: kerple, dape-kerple, ...).
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
    },
    /// Draw the perplexity-by-length curves of evaluated runs in one plot, with a table.
    Plot {
        /// Run folder with an eval.json (repeat for several runs).
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Output folder for ppl_by_length.svg and results.md.
        #[arg(long)]
        out: PathBuf,
    },
    /// The CHE (Chomsky hierarchy) length-generalisation tasks.
    Che {
        #[command(subcommand)]
        command: CheCommand,
    },
}

#[derive(Subcommand)]
enum CheCommand {
    /// Print samples of a task, one JSON object per line.
    Sample {
        /// Task name, e.g. reverse_string.
        #[arg(long)]
        task: String,
        /// Input length.
        #[arg(long)]
        length: usize,
        /// Number of samples.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Train the bidirectional sequence model on a task (lengths 1..40 per step, batch 128).
    Train {
        /// Task name.
        #[arg(long)]
        task: String,
        /// Encoding name (see `dape encodings`), or a path to a JSON encoding config.
        #[arg(long)]
        encoding: String,
        #[command(flatten)]
        train: TrainArgs,
        /// Run folder [default: runs/che/<task>/<encoding>].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
        /// One progress line every N steps instead of burn-train's TUI.
        #[arg(long)]
        lines: Option<usize>,
        /// Devices: a count or indices; more than one uses burn-train's multi-device strategy
        /// (each step's batch is split across them).
        #[arg(long, default_value = "1")]
        devices: DeviceSpec,
    },
    /// Accuracy by length of a trained run; writes che.json, che.csv and che.svg into it.
    Eval {
        /// Run folder of `dape che train`.
        #[arg(long)]
        run: std::path::PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
    /// Train and evaluate a grid of tasks × encodings; writes suite.md, suite.json and plots.
    /// With no arguments: the built-in default run (a few minutes on 2 CPU cores).
    Suite {
        /// Comma-separated task names, or `all`.
        #[arg(long, default_value = "reverse_string")]
        tasks: String,
        /// Comma-separated encoding names.
        #[arg(long, default_value = "rope,kerple_log,dape_kerple_log")]
        encodings: String,
        #[command(flatten)]
        train: TrainArgs,
        /// Test lengths: `a..b`, `a..b:step` or a list.
        #[arg(long, default_value = "41..200:8")]
        lengths: String,
        /// Sequences per test length.
        #[arg(long, default_value_t = 64)]
        sequences: usize,
        /// Output folder.
        #[arg(long, default_value = "runs/che-suite")]
        out: std::path::PathBuf,
        /// Reuse finished cells of an earlier, interrupted run in the same folder.
        #[arg(long)]
        resume: bool,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
}

/// Training settings. Unset values take the protocol's defaults for `che train` (10000 steps,
/// batch 128, 5 layers) and the quick CPU defaults for `che suite` (1000 steps, batch 32,
/// 2 layers).
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Optimiser steps [train: 10000; suite: 1000].
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per step [train: 128; suite: 32].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Blocks [train: 5; suite: 2].
    #[arg(long)]
    layers: Option<usize>,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of weights and data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Defaults of [`TrainArgs`] that differ between the paper protocol and quick CPU runs.
struct TrainDefaults {
    steps: usize,
    batch_size: usize,
    layers: usize,
}

const PROTOCOL: TrainDefaults = TrainDefaults {
    steps: 10000,
    batch_size: 128,
    layers: 5,
};

const QUICK: TrainDefaults = TrainDefaults {
    steps: 1000,
    batch_size: 32,
    layers: 2,
};

#[derive(clap::Args, Clone)]
struct EvalArgs {
    /// Test lengths: `a..b`, `a..b:step` or a list.
    #[arg(long, default_value = "41..500")]
    lengths: String,
    /// Sequences per test length (512 in the papers).
    #[arg(long, default_value_t = 512)]
    sequences: usize,
}

fn encoding_arg(text: &str) -> Result<PositionalEncodingConfig> {
    let path = std::path::Path::new(text);
    if text.ends_with(".json") || path.is_file() {
        let json = std::fs::read_to_string(path).map_err(|source| dape::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        return PositionalEncodingConfig::from_json(&json);
    }
    PositionalEncodingConfig::from_name(text)
}

impl TrainArgs {
    fn config(
        &self,
        task: Task,
        encoding: PositionalEncodingConfig,
        defaults: &TrainDefaults,
    ) -> CheTrainConfig {
        CheTrainConfig::new(task, encoding)
            .with_steps(self.steps.unwrap_or(defaults.steps))
            .with_batch_size(self.batch_size.unwrap_or(defaults.batch_size))
            .with_d_model(self.d_model)
            .with_n_layers(self.layers.unwrap_or(defaults.layers))
            .with_n_heads(self.heads)
            .with_learning_rate(self.lr)
            .with_seed(self.seed)
    }
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

struct LmTrainTask {
    config: LmTrainConfig,
    options: LmTrainOptions,
}

impl BackendTask for LmTrainTask {
    type Output = ();
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<()> {
        let c = &self.config;
        println!(
            "Training {} ({} layers, d {}, {} heads, {} tokenizer) on {kind}: {} steps of {} x {} tokens into {}",
            c.encoding.name(),
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.tokenizer.name(),
            c.steps,
            c.batch_size * c.grad_accumulation,
            c.train_length,
            self.options.out.display()
        );
        let (_, summary) = lm_train::train::<B>(c, &self.options, &device, kind.name())?;
        println!(
            "Trained in {:.1}s. Next: dape eval --run {}",
            summary.seconds,
            self.options.out.display()
        );
        Ok(())
    }
}

struct BenchTask(BenchConfig);

impl BackendTask for BenchTask {
    type Output = dape::bench::BenchResult;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<dape::bench::BenchResult> {
        dape::bench::run::<B>(&self.0, &device, kind.name())
    }
}

struct LmEvalTask {
    run: PathBuf,
    data: Option<PathBuf>,
    config: LmEvalConfig,
    cache: PathBuf,
}

impl BackendTask for LmEvalTask {
    type Output = lm_eval::LmEvalReport;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<lm_eval::LmEvalReport> {
        println!("Evaluating {} on {kind}", self.run.display());
        let report = lm_eval::evaluate_run::<B::InnerBackend>(
            &self.run,
            self.data.as_deref(),
            &self.config,
            &self.cache,
            kind.name(),
            &device,
        )?;
        println!(
            "Wrote eval.json, eval.csv and ppl_by_length.svg into {}",
            self.run.display()
        );
        Ok(report)
    }
}

struct CheTrainTask {
    config: CheTrainConfig,
    out: std::path::PathBuf,
    progress: Progress,
    devices: DeviceSpec,
}

impl BackendTask for CheTrainTask {
    type Output = ();
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<()> {
        println!(
            "Training {} with {} on {kind} for {} steps into {}",
            self.config.task,
            self.config.encoding.name(),
            self.config.steps,
            self.out.display()
        );
        let devices = self.devices.devices(&device);
        let (_, summary) =
            che_train::train_on::<B>(&self.config, &self.out, &devices, self.progress)?;
        println!(
            "Trained in {:.1}s; model and config in {}. Next: dape che eval --run {}",
            summary.seconds,
            self.out.display(),
            self.out.display()
        );
        Ok(())
    }
}

struct CheEvalTask {
    run: std::path::PathBuf,
    eval: CheEvalConfig,
}

impl BackendTask for CheEvalTask {
    type Output = CheEvalReport;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<CheEvalReport> {
        let (config, model) = che_train::load::<B::InnerBackend>(&self.run, &device)?;
        println!(
            "Evaluating {} / {} on {kind}: {} lengths × {} sequences",
            config.task,
            config.encoding.name(),
            self.eval.lengths.len(),
            self.eval.sequences
        );
        let report = evaluate_run(
            &model,
            &config,
            &self.eval,
            &self.run,
            kind.name(),
            &device,
            |l| {
                println!(
                    "length {:>4}  accuracy {:>6.2}%  ({:.1}s)",
                    l.length,
                    100.0 * l.accuracy,
                    l.seconds
                )
            },
        )?;
        write_report(&self.run, &report)?;
        Ok(report)
    }
}

struct CheSuiteTask {
    config: SuiteConfig,
}

impl BackendTask for CheSuiteTask {
    type Output = SuiteReport;
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<SuiteReport> {
        run_suite::<B>(&self.config, kind.name(), &device)
    }
}

fn parse_tasks(list: &str) -> Result<Vec<Task>> {
    if list == "all" {
        return Ok(Task::ALL.to_vec());
    }
    list.split(',').map(|t| Task::from_name(t.trim())).collect()
}

fn run_che(command: CheCommand) -> Result<bool> {
    match command {
        CheCommand::Sample {
            task,
            length,
            count,
            seed,
        } => {
            let task = Task::from_name(&task)?;
            /// One line of `che sample`, fields in the documented order.
            #[derive(serde::Serialize)]
            struct Line<'a> {
                task: &'a str,
                length: usize,
                input: &'a [i64],
                target: &'a [i64],
                mask: &'a [u8],
            }
            for sample in task.samples(length, count, seed)? {
                let line = Line {
                    task: task.name(),
                    length,
                    input: &sample.input,
                    target: &sample.target,
                    mask: &sample.mask,
                };
                println!("{}", serde_json::to_string(&line)?);
            }
        }
        CheCommand::Train {
            task,
            encoding,
            train,
            out,
            backend,
            lines,
            devices,
        } => {
            let task = Task::from_name(&task)?;
            let encoding = encoding_arg(&encoding)?;
            let out = out.unwrap_or_else(|| {
                std::path::Path::new("runs/che")
                    .join(task.name())
                    .join(encoding.name())
            });
            let progress = match lines {
                Some(every) => Progress::Lines(String::new(), every),
                None => Progress::Default,
            };
            let config = train.config(task, encoding, &PROTOCOL);
            dispatch(
                backend,
                CheTrainTask {
                    config,
                    out,
                    progress,
                    devices,
                },
            )?;
        }
        CheCommand::Eval { run, eval, backend } => {
            let eval = CheEvalConfig {
                lengths: parse_lengths(&eval.lengths)?,
                sequences: eval.sequences,
                ..Default::default()
            };
            let report = dispatch(
                backend,
                CheEvalTask {
                    run: run.clone(),
                    eval,
                },
            )?;
            println!(
                "score (mean accuracy over {} lengths): {:.2}%; wrote che.json, che.csv and che.svg into {}",
                report.lengths.len(),
                100.0 * report.score,
                run.display()
            );
        }
        CheCommand::Suite {
            tasks,
            encodings,
            train,
            lengths,
            sequences,
            out,
            resume,
            backend,
        } => {
            let tasks = parse_tasks(&tasks)?;
            let encodings = encodings
                .split(',')
                .map(|e| encoding_arg(e.trim()))
                .collect::<Result<Vec<_>>>()?;
            let config = SuiteConfig {
                train: train.config(tasks[0], encodings[0].clone(), &QUICK),
                tasks,
                encodings,
                eval: CheEvalConfig {
                    lengths: parse_lengths(&lengths)?,
                    sequences,
                    ..Default::default()
                },
                out: out.clone(),
                resume,
            };
            println!(
                "CHE suite on {backend}: {} tasks × {} encodings, {} steps each, tested on {} lengths × {} sequences",
                config.tasks.len(),
                config.encodings.len(),
                config.train.steps,
                config.eval.lengths.len(),
                config.eval.sequences
            );
            let report = dispatch(backend, CheSuiteTask { config })?;
            println!(
                "\nMean accuracy (%) over the test lengths:\n\n{}",
                report.markdown()
            );
            println!(
                "Wrote {0}/suite.md, {0}/suite.json and one accuracy-by-length plot per task ({0}/<task>.svg).",
                out.display()
            );
        }
    }
    Ok(true)
}

fn parse_encodings(list: &str) -> Result<Vec<PositionalEncodingConfig>> {
    if list == "all" {
        return ENCODING_NAMES
            .iter()
            .map(|n| PositionalEncodingConfig::from_name(n))
            .collect();
    }
    list.split(',')
        .map(|n| PositionalEncodingConfig::from_name(n.trim()))
        .collect()
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
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Che { command } => run_che(command),
        Command::CompareBackends {
            backends,
            encodings,
            length,
            batch,
            iterations,
            json,
        } => {
            let backends = parse_backends(&backends)?;
            let config = CompareConfig {
                length,
                batch,
                iterations,
                ..Default::default()
            };
            println!(
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
                    println!(
                        "{backend} / {}: max abs diff {:.2e}, forward {:.0} tok/s, train {:.0} tok/s",
                        result.encoding,
                        result.max_abs_diff,
                        result.forward_tokens_per_second,
                        result.train_tokens_per_second
                    );
                    results.push(result);
                }
            }
            println!("\n{}", compare::markdown(&results));
            if let Some(path) = json {
                let text =
                    serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?;
                std::fs::write(&path, text).map_err(|source| dape::Error::Io { path, source })?;
            }
            Ok(true)
        }
        Command::Train {
            config,
            data,
            backend,
            out,
            steps,
            checkpoint_every,
            resume,
            lines,
            cache,
            devices,
        } => {
            let mut train = LmTrainConfig::load(&config)?;
            if let Some(data) = data {
                train.data = data;
            }
            if let Some(steps) = steps {
                train.steps = steps;
                if train.warmup_steps >= steps {
                    train.warmup_steps = steps / 10;
                }
            }
            if let Some(every) = checkpoint_every {
                train.checkpoint_every = every;
            }
            train.validate()?;
            let name = config
                .file_stem()
                .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
            let progress = match lines {
                Some(every) => Progress::Lines(String::new(), every),
                None if std::io::stdout().is_terminal() => Progress::Default,
                None => Progress::Lines(String::new(), 50),
            };
            let options = LmTrainOptions {
                out: out.unwrap_or_else(|| PathBuf::from("runs").join(name)),
                resume,
                cache_dir: cache.unwrap_or_else(default_cache_dir),
                progress,
                devices,
            };
            dispatch(
                backend,
                LmTrainTask {
                    config: train,
                    options,
                },
            )?;
            Ok(true)
        }
        Command::Eval {
            runs,
            lengths,
            last,
            chunk,
            max_tokens,
            data,
            backend,
            plot,
            cache,
        } => {
            let config = LmEvalConfig {
                lengths: parse_lengths(&lengths)?,
                last,
                chunk,
                max_tokens,
                ..Default::default()
            };
            config.validate()?;
            let cache = cache.unwrap_or_else(default_cache_dir);
            let mut reports = Vec::new();
            for run in &runs {
                reports.push(dispatch(
                    backend,
                    LmEvalTask {
                        run: run.clone(),
                        data: data.clone(),
                        config: config.clone(),
                        cache: cache.clone(),
                    },
                )?);
            }
            if reports.len() > 1 {
                let out = plot.unwrap_or_else(|| {
                    runs[0]
                        .parent()
                        .map_or_else(|| PathBuf::from("."), PathBuf::from)
                });
                let (svg, md) = lm_eval::plot_runs(&reports, &out)?;
                println!("Wrote {} and {}", svg.display(), md.display());
            }
            println!("{}", lm_eval::results_markdown(&reports));
            Ok(true)
        }
        Command::Bench {
            mode,
            encoding,
            length,
            batch,
            steps,
            warmup,
            chunk,
            backend,
        } => {
            let encoding = PositionalEncodingConfig::from_name(
                dape::bench::encoding_from_torch_name(&encoding),
            )?;
            let config = BenchConfig {
                length,
                batch,
                steps,
                warmup,
                chunk,
                ..BenchConfig::new(mode, encoding)
            };
            let result = dispatch(backend, BenchTask(config))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(true)
        }
        Command::Plot { runs, out } => {
            let reports = runs
                .iter()
                .map(|r| lm_eval::read_report(r))
                .collect::<Result<Vec<_>>>()?;
            let (svg, md) = lm_eval::plot_runs(&reports, &out)?;
            println!("{}", lm_eval::results_markdown(&reports));
            println!("Wrote {} and {}", svg.display(), md.display());
            Ok(true)
        }
        Command::Encodings => {
            println!("| encoding | acts on |\n| --- | --- |");
            for name in ENCODING_NAMES {
                let hook = PositionalEncodingConfig::from_name(name)?.hook();
                println!("| {name} | {} |", hook_name(hook));
            }
            Ok(true)
        }
        Command::Config { name } => {
            let config = PositionalEncodingConfig::from_name(&name)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(true)
        }
        Command::Check {
            encodings,
            length,
            decode,
            chunk,
            backend,
            tolerance,
            json,
        } => {
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
            println!(
                "Consistency on {backend}: length {length}, chunk {chunk}, last {decode} tokens decoded with the KV cache"
            );
            let reports = dispatch(backend, task)?;
            println!("| encoding | chunked max abs diff | decode max abs diff | full s | chunked s | decode s/token | ok |");
            println!("| --- | --- | --- | --- | --- | --- | --- |");
            let mut all_ok = true;
            for r in &reports {
                let ok = r.chunked_max_abs_diff <= tolerance && r.decode_max_abs_diff <= tolerance;
                all_ok &= ok;
                println!(
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
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&reports)?;
                std::fs::write(&path, text).map_err(|source| dape::Error::Io { path, source })?;
            }
            Ok(all_ok)
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some checks exceeded the tolerance");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

//! `dape che sample | train | eval | suite`: the Chomsky-hierarchy length-generalisation tasks.

use burn::tensor::backend::AutodiffBackend;
use clap::Subcommand;

use super::encoding_arg;
use dape::backend::{dispatch, BackendKind, BackendTask, DeviceSpec};
use dape::data::che::Task;
use dape::encoding::RandomizedConfig;
use dape::eval::che::{evaluate_run, parse_lengths, write_report, CheEvalConfig, CheEvalReport};
use dape::experiment::che::{self as che_run, CheTrainConfig};
use dape::suite::{run_suite, SuiteConfig, SuiteReport};
use dape::train::che::{self as che_train, Progress};
use dape::{PositionalEncodingConfig, Result, SsmaxConfig, StackOptions, StickBreakingConfig};

/// The `dape che` subcommands.
#[derive(Subcommand)]
pub enum CheCommand {
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
    /// Redraw a finished suite's plots (<task>.svg) and suite.md from its suite.json,
    /// without training or evaluating anything.
    Plot {
        /// Suite folder (the --out of `dape che suite`, holding suite.json).
        #[arg(long)]
        suite: std::path::PathBuf,
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
        /// Train at most N new cells, then write the table with the rest listed as pending and
        /// stop; with --resume, repeated calls work through the grid one step at a time (the
        /// last line says how many cells of the grid have finished).
        #[arg(long, value_name = "N")]
        cells: Option<usize>,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
}

/// Training settings. Unset values take the protocol's defaults for `che train` (10000 steps,
/// batch 128, 5 layers) and the quick CPU defaults for `che suite` (1000 steps, batch 32,
/// 2 layers).
#[derive(clap::Args, Clone)]
pub struct TrainArgs {
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
    /// Scalable-Softmax in every attention layer (composes with any encoding); the run folder
    /// name gets `+ssmax`.
    #[arg(long)]
    ssmax: bool,
    /// Stick-breaking attention in place of the softmax (composes with any encoding; the CHE
    /// model is bidirectional, so each query breaks a stick on either side); the run folder
    /// name gets `+sb`.
    #[arg(long)]
    stick_breaking: bool,
    /// A hybrid stack: a JSON object, inline or in a file, with any of `layer_encodings`,
    /// `qk_norm`, `temperature` and `sliding_window`, e.g.
    /// '{"layer_encodings": {"every": 2, "encoding": "nope"}, "qk_norm": {}}'; the run folder name
    /// gets `+hybrid`.
    #[arg(long, value_name = "JSON", value_parser = parse_stack)]
    hybrid: Option<StackOptions>,
    /// Randomized positions (Ruoss et al., 2023): every step's sequences sit at a sorted random
    /// sample of distinct positions from `0..M`, and so do the test sequences (their inputs and
    /// outputs must fit in M; Ruoss et al. use 2048). For encodings driven by integer positions
    /// (`dape encodings` says which); the run folder name gets `+randomized`.
    #[arg(long, value_name = "M")]
    randomized: Option<usize>,
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
pub struct EvalArgs {
    /// Test lengths: `a..b`, `a..b:step` or a list.
    #[arg(long, default_value = "41..500")]
    lengths: String,
    /// Sequences per test length (512 in the papers).
    #[arg(long, default_value_t = 512)]
    sequences: usize,
}

impl TrainArgs {
    /// The encoding at the randomized positions of `--randomized`, or as given.
    fn encoding(&self, encoding: PositionalEncodingConfig) -> Result<PositionalEncodingConfig> {
        match self.randomized {
            Some(m) => encoding.with_randomized(Some(RandomizedConfig::new(m))),
            None => Ok(encoding),
        }
    }

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
            .with_ssmax(self.ssmax.then(SsmaxConfig::new))
            .with_stick_breaking(self.stick_breaking.then(StickBreakingConfig::new))
            .with_stack(self.hybrid.clone())
    }

    /// What a run folder's name gets for the normaliser options: `+ssmax`, `+sb`.
    fn suffix(&self) -> String {
        let mut out = String::new();
        if self.ssmax {
            out.push_str("+ssmax");
        }
        if self.stick_breaking {
            out.push_str("+sb");
        }
        if self.hybrid.is_some() {
            out.push_str("+hybrid");
        }
        out
    }
}

/// `--hybrid`: a JSON object inline, or the path of a file holding one.
fn parse_stack(text: &str) -> std::result::Result<StackOptions, String> {
    let json = if text.trim_start().starts_with('{') {
        text.to_string()
    } else {
        std::fs::read_to_string(text).map_err(|e| format!("{text}: {e}"))?
    };
    serde_json::from_str(&json).map_err(|e| format!("--hybrid: {e}"))
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
        say!(
            "Training {} with {} on {kind} for {} steps into {}",
            self.config.task,
            self.config.encoding.label(),
            self.config.steps,
            self.out.display()
        );
        let devices = self.devices.devices(&device);
        let (_, summary) =
            che_train::train_on::<B>(&self.config, &self.out, &devices, self.progress)?;
        say!(
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
        let (config, model) = che_run::load::<B::InnerBackend>(&self.run, &device)?;
        say!(
            "Evaluating {} / {} on {kind}: {} lengths × {} sequences",
            config.task,
            config.encoding.label(),
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
                say!(
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

/// Runs a `dape che` subcommand.
pub fn run(command: CheCommand) -> Result<bool> {
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
                say!("{}", serde_json::to_string(&line)?);
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
            let encoding = train.encoding(encoding_arg(&encoding)?)?;
            let out = out.unwrap_or_else(|| {
                std::path::Path::new("runs/che")
                    .join(task.name())
                    .join(format!("{}{}", encoding.label(), train.suffix()))
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
            say!(
                "score (mean accuracy over {} lengths): {:.2}%; wrote che.json, che.csv and che.svg into {}",
                report.lengths.len(),
                100.0 * report.score,
                run.display()
            );
        }
        CheCommand::Plot { suite } => {
            let report = dape::suite::replot(&suite)?;
            say!("{}", report.markdown());
            say!(
                "Redrew {0}/suite.md and one plot per task ({0}/<task>.svg).",
                suite.display()
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
            cells,
            backend,
        } => {
            let tasks = parse_tasks(&tasks)?;
            let encodings = encodings
                .split(',')
                .map(|e| train.encoding(encoding_arg(e.trim())?))
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
                max_new_cells: cells,
            };
            say!(
                "CHE suite on {backend}: {} tasks × {} encodings, {} steps each, tested on {} lengths × {} sequences",
                config.tasks.len(),
                config.encodings.len(),
                config.train.steps,
                config.eval.lengths.len(),
                config.eval.sequences
            );
            let report = dispatch(backend, CheSuiteTask { config })?;
            say!(
                "\nMean accuracy (%) over the test lengths:\n\n{}",
                report.markdown()
            );
            if !report.pending.is_empty() {
                say!(
                    "{} cells pending: run the same command with --resume to go on.",
                    report.pending.len()
                );
            }
            say!(
                "Wrote {0}/suite.md, {0}/suite.json and one accuracy-by-length plot per task ({0}/<task>.svg).",
                out.display()
            );
        }
    }
    Ok(true)
}

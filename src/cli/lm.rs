//! `dape train`, `dape eval`, `dape plot` and `dape bias`: language models on real text, and the learned bias of any run.

use std::io::IsTerminal;
use std::path::PathBuf;

use burn::tensor::backend::AutodiffBackend;

use dape::backend::{dispatch, BackendKind, BackendTask, DeviceSpec};
use dape::data::corpus::default_cache_dir;
use dape::eval::bias::{learned_bias, write_bias, BiasReport, BiasRequest};
use dape::eval::che::parse_lengths;
use dape::eval::lm::{self as lm_eval, KeyTokens, LmEvalConfig, LmEvalReport};
use dape::eval::longppl::{KeyTokenStore, LongPplConfig};
use dape::experiment::lm::{load_model, LmTrainConfig, Window};
use dape::results;
use dape::train::che::Progress;
use dape::train::lm::{self as lm_train, LmTrainOptions};
use dape::Result;

/// `dape train`.
#[derive(clap::Args)]
pub struct TrainArgs {
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
    /// Seed of the weights and the training-window order, overriding the config's (the
    /// train/valid/test split keeps its own `split.seed`, so seeds share their test documents).
    #[arg(long)]
    seed: Option<u64>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stick-breaking attention in place of the softmax, overriding the config's
    /// `stick_breaking` (absent there: the softmax).
    #[arg(long)]
    stick_breaking: bool,
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
}

/// `dape eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
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
    /// Also LongPPL (Fang et al., 2025): perplexity on the key tokens, those whose prediction
    /// the evaluator's long context helps (long–short difference > 2 nats, long-context
    /// log-likelihood > −2 nats, short context the last 128 tokens).
    #[arg(long)]
    longppl: bool,
    /// LongPPL: the fixed evaluator run that finds key tokens a --key-tokens folder lacks.
    #[arg(long, requires = "longppl")]
    evaluator: Option<PathBuf>,
    /// LongPPL: the folder of key-tokens-<length>.json [default: <evaluator>/key-tokens].
    #[arg(long, requires = "longppl")]
    key_tokens: Option<PathBuf>,
}

/// `dape plot`.
#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folder with an eval.json (repeat for several runs). Runs whose configs differ only
    /// in `seed` are one row: the mean, with the seed-to-seed spread in a second table.
    #[arg(long = "run", required = true)]
    runs: Vec<PathBuf>,
    /// A run of the plan that has not finished (repeatable): listed as pending, with no
    /// numbers.
    #[arg(long)]
    pending: Vec<String>,
    /// Output folder for ppl_by_length.svg, results.md and train_cost.svg.
    #[arg(long)]
    out: PathBuf,
}

struct LmTrainTask {
    config: LmTrainConfig,
    options: LmTrainOptions,
}

impl BackendTask for LmTrainTask {
    type Output = ();
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<()> {
        let c = &self.config;
        say!(
            "Training {} ({} layers, d {}, {} heads, {} tokenizer) on {kind}: {} steps of {} x {} tokens into {}",
            c.encoding.label(),
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
        say!(
            "Trained in {:.1}s. Next: dape eval --run {}",
            summary.seconds,
            self.options.out.display()
        );
        Ok(())
    }
}

struct LmEvalTask {
    run: PathBuf,
    data: Option<PathBuf>,
    config: LmEvalConfig,
    cache: PathBuf,
    longppl: Option<LongPplArgs>,
}

/// Where LongPPL's key tokens come from.
#[derive(Clone)]
struct LongPplArgs {
    evaluator: Option<PathBuf>,
    key_tokens: PathBuf,
}

impl BackendTask for LmEvalTask {
    type Output = LmEvalReport;
    fn run<B: AutodiffBackend>(self, device: B::Device, kind: BackendKind) -> Result<LmEvalReport> {
        say!("Evaluating {} on {kind}", self.run.display());
        let evaluator = match self.longppl.as_ref().and_then(|l| l.evaluator.as_ref()) {
            Some(run) => Some((run, load_model::<B::InnerBackend>(run, &device)?)),
            None => None,
        };
        let mut store = self.longppl.as_ref().map(|l| KeyTokenStore {
            dir: l.key_tokens.clone(),
            evaluator: evaluator
                .as_ref()
                .map(|(run, (config, model))| (run.as_path(), config, model)),
            config: LongPplConfig::default(),
            device: device.clone(),
        });
        let mut find = |length: usize, windows: &[Window]| match store.as_mut() {
            Some(store) => store.keys(length, windows),
            None => Ok(Vec::new()),
        };
        let keys: Option<&mut KeyTokens<'_>> = match self.longppl {
            Some(_) => Some(&mut find),
            None => None,
        };
        let report = lm_eval::evaluate_run_with_keys::<B::InnerBackend>(
            &self.run,
            self.data.as_deref(),
            &self.config,
            &self.cache,
            kind.name(),
            keys,
            &device,
        )?;
        say!(
            "Wrote eval.json, eval.csv and ppl_by_length.svg into {}",
            self.run.display()
        );
        Ok(report)
    }
}

/// How training shows progress: `--lines N`, else the TUI on a terminal, else a line every 50.
fn progress(lines: Option<usize>) -> Progress {
    match lines {
        Some(every) => Progress::Lines(String::new(), every),
        None if std::io::stdout().is_terminal() => Progress::Default,
        None => Progress::Lines(String::new(), 50),
    }
}

/// `dape train`: the config file, with the command line's overrides, trained into `--out`.
pub fn train(args: TrainArgs) -> Result<bool> {
    let mut train = LmTrainConfig::load(&args.config)?;
    if let Some(data) = args.data {
        train.data = data;
    }
    if let Some(steps) = args.steps {
        train.steps = steps;
        if train.warmup_steps >= steps {
            train.warmup_steps = steps / 10;
        }
    }
    if let Some(every) = args.checkpoint_every {
        train.checkpoint_every = every;
    }
    if let Some(seed) = args.seed {
        train.seed = seed;
    }
    if args.stick_breaking && train.stick_breaking.is_none() {
        train.stick_breaking = Some(dape::StickBreakingConfig::new());
    }
    train.validate()?;
    let name = args
        .config
        .file_stem()
        .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
    let options = LmTrainOptions {
        out: args.out.unwrap_or_else(|| PathBuf::from("runs").join(name)),
        resume: args.resume,
        cache_dir: args.cache.unwrap_or_else(default_cache_dir),
        progress: progress(args.lines),
        devices: args.devices,
    };
    dispatch(
        args.backend,
        LmTrainTask {
            config: train,
            options,
        },
    )?;
    Ok(true)
}

/// `dape eval`: every run evaluated, then (with several) one combined plot and table.
pub fn eval(args: EvalArgs) -> Result<bool> {
    let config = LmEvalConfig {
        lengths: parse_lengths(&args.lengths)?,
        last: args.last,
        chunk: args.chunk,
        max_tokens: args.max_tokens,
        ..Default::default()
    };
    config.validate()?;
    let cache = args.cache.unwrap_or_else(default_cache_dir);
    let longppl = if args.longppl {
        let key_tokens =
            match (&args.key_tokens, &args.evaluator) {
                (Some(dir), _) => dir.clone(),
                (None, Some(evaluator)) => evaluator.join("key-tokens"),
                (None, None) => return Err(dape::Error::InvalidInput(
                    "--longppl needs --evaluator RUN (the fixed model that finds the key tokens) \
                     or --key-tokens DIR (key tokens found before)"
                        .into(),
                )),
            };
        Some(LongPplArgs {
            evaluator: args.evaluator.clone(),
            key_tokens,
        })
    } else {
        None
    };
    for run in &args.runs {
        dispatch(
            args.backend,
            LmEvalTask {
                run: run.clone(),
                data: args.data.clone(),
                config: config.clone(),
                cache: cache.clone(),
                longppl: longppl.clone(),
            },
        )?;
    }
    if args.runs.len() > 1 {
        let out = args.plot.unwrap_or_else(|| {
            args.runs[0]
                .parent()
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        });
        let groups = read_groups(&args.runs)?;
        let files = results::plot_runs(&groups, &[], &out)?;
        say!("{}", results::results_markdown(&groups, &[]));
        print_files(&files);
    } else {
        let groups = read_groups(&args.runs)?;
        say!("{}", results::results_markdown(&groups, &[]));
    }
    Ok(true)
}

fn read_groups(runs: &[PathBuf]) -> Result<Vec<results::RunGroup>> {
    let records = runs
        .iter()
        .map(|r| results::RunRecord::read(r))
        .collect::<Result<Vec<_>>>()?;
    results::group_runs(records)
}

fn print_files(files: &results::PlotFiles) {
    let mut written = vec![
        files.curves.display().to_string(),
        files.table.display().to_string(),
    ];
    if let Some(cost) = &files.cost {
        written.push(cost.display().to_string());
    }
    say!("Wrote {}", written.join(", "));
}

/// `dape plot`: the evaluated runs' curves in one plot, and their table.
pub fn plot(args: PlotArgs) -> Result<bool> {
    let groups = read_groups(&args.runs)?;
    let files = results::plot_runs(&groups, &args.pending, &args.out)?;
    say!("{}", results::results_markdown(&groups, &args.pending));
    print_files(&files);
    Ok(true)
}

/// `dape bias`.
#[derive(clap::Args)]
pub struct BiasArgs {
    /// Run folder of `dape train` or `dape che train`.
    #[arg(long)]
    run: PathBuf,
    /// The query position P.
    #[arg(long)]
    position: usize,
    /// Block whose attention is read (0 = the first).
    #[arg(long, default_value_t = 0)]
    layer: usize,
    /// Output picture [default: <run>/bias-p<P>-layer<K>.svg]; the values go next to it as .json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Corpus folder of an LM run [default: the one in its manifest].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed of the sample a CHE run reads.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Token cache folder.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
    backend: BackendKind,
}

struct BiasTask(BiasRequest);

impl BackendTask for BiasTask {
    type Output = BiasReport;
    fn run<B: AutodiffBackend>(self, device: B::Device, _kind: BackendKind) -> Result<BiasReport> {
        learned_bias::<B::InnerBackend>(&self.0, &device)
    }
}

/// `dape bias`: the bias one query puts on every key it sees, one line per head.
pub fn bias(args: BiasArgs) -> Result<bool> {
    let out = args.out.clone().unwrap_or_else(|| {
        args.run
            .join(format!("bias-p{}-layer{}.svg", args.position, args.layer))
    });
    let request = BiasRequest {
        run: args.run,
        position: args.position,
        layer: args.layer,
        data: args.data,
        cache_dir: args.cache.unwrap_or_else(default_cache_dir),
        seed: args.seed,
    };
    let report = dispatch(args.backend, BiasTask(request))?;
    write_bias(&report, &out)?;
    say!(
        "{} heads of {} (layer {}, query at {}; input: {}): wrote {} and {}",
        report.bias.len(),
        report.encoding,
        report.layer,
        report.position,
        report.input,
        out.display(),
        out.with_extension("json").display()
    );
    Ok(true)
}

//! A CHE suite: train and evaluate a grid of tasks × encodings, one run folder per cell, then
//! the table (`suite.md`, `suite.json`) and one accuracy-by-length plot per task. An
//! interrupted suite resumes: finished cells are read back, never retrained.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::data::che::Task;
use crate::encoding::PositionalEncodingConfig;
use crate::error::{ensure, Result};
use crate::eval::che::{
    accuracy_series, evaluate_run, plot_accuracy, write_report, CheEvalConfig, CheEvalReport,
};
use crate::eval::plot::Series;
use crate::experiment::che::CheTrainConfig;
use crate::train::che::{train, Progress};
use crate::util::{io_error, write_atomic};

/// Settings of a suite run.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Tasks (rows).
    pub tasks: Vec<Task>,
    /// Encodings (columns).
    pub encodings: Vec<PositionalEncodingConfig>,
    /// Training settings shared by every cell (task and encoding are set per cell).
    pub train: CheTrainConfig,
    /// Evaluation settings shared by every cell.
    pub eval: CheEvalConfig,
    /// Output folder: one run folder per cell plus `suite.md`, `suite.json` and one plot per task.
    pub out: PathBuf,
    /// Reuse cells whose `che.json` already exists (resume an interrupted suite).
    pub resume: bool,
}

/// One cell of the suite table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuiteCell {
    /// Task name.
    pub task: String,
    /// Encoding name.
    pub encoding: String,
    /// Mean accuracy over the test lengths.
    pub score: f64,
    /// Training seconds.
    pub train_seconds: f64,
    /// The cell's evaluation.
    pub report: CheEvalReport,
}

/// The whole suite.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuiteReport {
    /// Backend.
    pub backend: String,
    /// Training steps per cell.
    pub steps: usize,
    /// Test lengths.
    pub lengths: Vec<usize>,
    /// Sequences per length.
    pub sequences_per_length: usize,
    /// Cells, row by row.
    pub cells: Vec<SuiteCell>,
}

impl SuiteReport {
    /// The tasks × encodings table of mean accuracy (%) in markdown; the best score of each
    /// row is in bold.
    pub fn markdown(&self) -> String {
        let mut encodings: Vec<&str> = Vec::new();
        let mut tasks: Vec<&str> = Vec::new();
        for c in &self.cells {
            if !encodings.contains(&c.encoding.as_str()) {
                encodings.push(&c.encoding);
            }
            if !tasks.contains(&c.task.as_str()) {
                tasks.push(&c.task);
            }
        }
        let mut out = format!(
            "| task | {} |\n|---|{}\n",
            encodings.join(" | "),
            "---|".repeat(encodings.len())
        );
        for task in &tasks {
            let scores: Vec<Option<f64>> = encodings
                .iter()
                .map(|e| {
                    self.cells
                        .iter()
                        .find(|c| c.task == *task && c.encoding == *e)
                        .map(|c| 100.0 * c.score)
                })
                .collect();
            let best = scores
                .iter()
                .flatten()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let cells: Vec<String> = scores
                .iter()
                .map(|s| match s {
                    Some(v) if (*v - best).abs() < 1e-9 => format!("**{v:.1}**"),
                    Some(v) => format!("{v:.1}"),
                    None => "–".into(),
                })
                .collect();
            out.push_str(&format!("| {task} | {} |\n", cells.join(" | ")));
        }
        out
    }
}

/// Trains and evaluates every (task, encoding) pair, writing each run into
/// `out/<task>/<encoding>/`, then `suite.md`, `suite.json` and `out/<task>.svg`.
pub fn run_suite<B: AutodiffBackend>(
    config: &SuiteConfig,
    backend: &str,
    device: &B::Device,
) -> Result<SuiteReport> {
    config.eval.validate()?;
    ensure(!config.tasks.is_empty(), "tasks", "[]", "must not be empty")?;
    ensure(
        !config.encodings.is_empty(),
        "encodings",
        "[]",
        "must not be empty",
    )?;
    let mut cells = Vec::new();
    let total = config.tasks.len() * config.encodings.len();
    for task in &config.tasks {
        for encoding in &config.encodings {
            // The cell's name: the encoding's (with `+randomized` at randomized positions), with
            // `+ssmax` when the runs use Scalable-Softmax.
            let name = format!(
                "{}{}",
                encoding.label(),
                if config.train.ssmax.is_some() {
                    "+ssmax"
                } else {
                    ""
                }
            );
            let dir = config.out.join(task.name()).join(&name);
            let index = cells.len() + 1;
            let existing = dir.join("che.json");
            let (report, train_seconds) = if config.resume && existing.exists() {
                let text = std::fs::read_to_string(&existing).map_err(io_error(&existing))?;
                println!(
                    "[{index}/{total}] {task} / {name}: reusing {}",
                    existing.display()
                );
                (serde_json::from_str::<CheEvalReport>(&text)?, 0.0)
            } else {
                let mut train_config = config.train.clone();
                train_config.task = *task;
                train_config.encoding = encoding.clone();
                let prefix = format!("[{index}/{total}] {task} / {name}: ");
                let every = (train_config.steps / 10).max(1);
                let (model, summary) = train::<B>(
                    &train_config,
                    &dir,
                    device,
                    Progress::Lines(prefix.clone(), every),
                )?;
                let mut report = evaluate_run(
                    &model,
                    &train_config,
                    &config.eval,
                    &dir,
                    backend,
                    device,
                    |l| {
                        if l.length == *config.eval.lengths.last().unwrap_or(&0) {
                            println!("{prefix}evaluated up to length {}", l.length);
                        }
                    },
                )?;
                // Cells are named relative to the suite folder, which may move.
                report.run = format!("{}/{name}", task.name());
                write_report(&dir, &report)?;
                println!(
                    "{prefix}score {:.1}% (trained {:.0}s, evaluated {:.0}s)",
                    100.0 * report.score,
                    summary.seconds,
                    report.seconds
                );
                (report, summary.seconds)
            };
            cells.push(SuiteCell {
                task: task.name().to_string(),
                encoding: name,
                score: report.score,
                train_seconds,
                report,
            });
        }
        let row: Vec<&SuiteCell> = cells.iter().filter(|c| c.task == task.name()).collect();
        plot_task(&config.out, task.name(), &row)?;
    }
    let report = SuiteReport {
        backend: backend.to_string(),
        steps: config.train.steps,
        lengths: config.eval.lengths.clone(),
        sequences_per_length: config.eval.sequences,
        cells,
    };
    write_atomic(
        &config.out.join("suite.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    write_atomic(&config.out.join("suite.md"), &report.markdown())?;
    Ok(report)
}

/// Draws `out/<task>.svg`: accuracy by length, one line per encoding of the task's row.
fn plot_task(out: &Path, task: &str, row: &[&SuiteCell]) -> Result<()> {
    let Some(first) = row.first() else {
        return Ok(());
    };
    let series: Vec<Series> = row
        .iter()
        .map(|cell| accuracy_series(&cell.report))
        .collect();
    plot_accuracy(
        &out.join(format!("{task}.svg")),
        task,
        first.report.train_lengths[1],
        &series,
    )
}

/// Redraws a finished suite's plots and `suite.md` from its `suite.json`, without training
/// or evaluating anything (`dape che plot`).
pub fn replot(dir: &Path) -> Result<SuiteReport> {
    let path = dir.join("suite.json");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let report: SuiteReport = serde_json::from_str(&text)?;
    let mut tasks: Vec<&str> = Vec::new();
    for cell in &report.cells {
        if !tasks.contains(&cell.task.as_str()) {
            tasks.push(&cell.task);
        }
    }
    for task in tasks {
        let row: Vec<&SuiteCell> = report.cells.iter().filter(|c| c.task == task).collect();
        plot_task(dir, task, &row)?;
    }
    write_atomic(&dir.join("suite.md"), &report.markdown())?;
    Ok(report)
}

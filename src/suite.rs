//! A CHE suite: train and evaluate a grid of tasks × encodings, one run folder per cell, then
//! the table (`suite.md`, `suite.json`) and one accuracy-by-length plot per task. An
//! interrupted suite resumes: finished cells are read back, never retrained.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::data::che::Task;
use crate::encoding::PositionalEncodingConfig;
use crate::error::{ensure, ensure_non_empty, Result};
use crate::eval::che::{
    accuracy_series, evaluate_run, plot_accuracy, write_report, CheEvalConfig, CheEvalReport,
};
use crate::eval::plot::Series;
use crate::experiment::che::{self as che_run, CheTrainConfig};
use crate::train::che::{train, Progress};
use crate::util::{io_error, say, write_atomic, write_json_atomic};

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
    /// Train at most this many new cells, then write the table with the rest listed as pending
    /// and stop (`None`: every cell). With `resume`, repeated calls work through the grid.
    pub max_new_cells: Option<usize>,
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
    /// Training seconds (0 where a resumed cell's time is not known).
    pub train_seconds: f64,
    /// Mean accuracy over the training lengths (every length from the shortest to the longest
    /// trained on), which tells "did not learn" from "did not extrapolate"; `None` in suites
    /// written before it was measured.
    #[serde(default)]
    pub in_distribution: Option<f64>,
    /// The cell's evaluation.
    pub report: CheEvalReport,
}

/// A cell of the grid that has not finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingCell {
    /// Task name.
    pub task: String,
    /// Encoding name.
    pub encoding: String,
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
    /// Finished cells, row by row.
    pub cells: Vec<SuiteCell>,
    /// Cells of the grid still to run (never guessed: the table says "pending").
    #[serde(default)]
    pub pending: Vec<PendingCell>,
}

/// Chance accuracy (%) of a task: uniform guessing over its output classes.
pub fn chance(task: Task) -> f64 {
    100.0 / task.output_vocab() as f64
}

/// Whether an accuracy (%) at the training lengths counts as learned: at least halfway from
/// chance to 100%.
pub fn learned(task: Task, in_distribution: f64) -> bool {
    in_distribution >= chance(task) + (100.0 - chance(task)) / 2.0
}

impl SuiteReport {
    /// Tasks (in order of appearance) and encodings (likewise), over finished and pending cells.
    fn axes(&self) -> (Vec<&str>, Vec<&str>) {
        let mut tasks: Vec<&str> = Vec::new();
        let mut encodings: Vec<&str> = Vec::new();
        let all = self
            .cells
            .iter()
            .map(|c| (c.task.as_str(), c.encoding.as_str()))
            .chain(
                self.pending
                    .iter()
                    .map(|p| (p.task.as_str(), p.encoding.as_str())),
            );
        for (t, e) in all {
            if !tasks.contains(&t) {
                tasks.push(t);
            }
            if !encodings.contains(&e) {
                encodings.push(e);
            }
        }
        // Rows in the papers' order (R, then DCF, then CS), whatever order they ran in.
        let rank = |t: &str| {
            Task::ALL
                .iter()
                .position(|x| x.name() == t)
                .unwrap_or(usize::MAX)
        };
        tasks.sort_by_key(|t| rank(t));
        (tasks, encodings)
    }

    fn cell(&self, task: &str, encoding: &str) -> Option<&SuiteCell> {
        self.cells
            .iter()
            .find(|c| c.task == task && c.encoding == encoding)
    }

    /// The table in the papers' layout, in markdown: one row per task, grouped by level
    /// (R, DCF, CS), with its chance level; mean accuracy (%) over the test lengths, the best of
    /// each row in bold; `†` on a cell that did not learn even at the training lengths (below
    /// halfway from chance to 100% there); `pending` for a cell not finished. A second table
    /// gives the accuracy at the training lengths.
    pub fn markdown(&self) -> String {
        let (tasks, encodings) = self.axes();
        let header = format!(
            "| level | task | chance | {} |\n|---|---|---:|{}\n",
            encodings.join(" | "),
            "---:|".repeat(encodings.len())
        );
        let mut out = header.clone();
        let mut inside = header;
        let mut marked = false;
        for task in &tasks {
            let parsed = Task::from_name(task).ok();
            let level = parsed.map_or("?", |t| t.level());
            let chance_text = parsed.map_or("?".into(), |t| format!("{:.0}", chance(t)));
            let best = encodings
                .iter()
                .filter_map(|e| self.cell(task, e))
                .map(|c| 100.0 * c.score)
                .fold(f64::NEG_INFINITY, f64::max);
            let best_inside = encodings
                .iter()
                .filter_map(|e| self.cell(task, e)?.in_distribution)
                .map(|v| 100.0 * v)
                .fold(f64::NEG_INFINITY, f64::max);
            let mut row = Vec::new();
            let mut row_inside = Vec::new();
            for e in &encodings {
                let pending = self
                    .pending
                    .iter()
                    .any(|p| p.task == *task && p.encoding == *e);
                let Some(c) = self.cell(task, e) else {
                    let text = if pending { "pending" } else { "–" };
                    row.push(text.to_string());
                    row_inside.push(text.to_string());
                    continue;
                };
                let v = 100.0 * c.score;
                let mut text = if (v - best).abs() < 1e-9 {
                    format!("**{v:.1}**")
                } else {
                    format!("{v:.1}")
                };
                match (parsed, c.in_distribution) {
                    (Some(t), Some(d)) if !learned(t, 100.0 * d) => {
                        text.push_str(" †");
                        marked = true;
                    }
                    _ => {}
                }
                row.push(text);
                row_inside.push(match c.in_distribution {
                    Some(d) if (100.0 * d - best_inside).abs() < 1e-9 => {
                        format!("**{:.1}**", 100.0 * d)
                    }
                    Some(d) => format!("{:.1}", 100.0 * d),
                    None => "–".into(),
                });
            }
            out.push_str(&format!(
                "| {level} | {task} | {chance_text} | {} |\n",
                row.join(" | ")
            ));
            inside.push_str(&format!(
                "| {level} | {task} | {chance_text} | {} |\n",
                row_inside.join(" | ")
            ));
        }
        if marked {
            out.push_str(
                "\n† did not learn even at the training lengths (accuracy there below halfway \
                 from chance to 100%): read it as \"not learned\", not as \"did not extrapolate\".\n",
            );
        }
        if !self.pending.is_empty() {
            out.push_str(&format!(
                "\n{} of {} cells finished; the others are pending (no numbers until they finish).\n",
                self.cells.len(),
                self.cells.len() + self.pending.len()
            ));
        }
        if self.cells.iter().any(|c| c.in_distribution.is_some()) {
            let range = self
                .cells
                .first()
                .map(|c| c.report.train_lengths)
                .unwrap_or_default();
            out.push_str(&format!(
                "\nAccuracy (%) at the training lengths {}–{} (in distribution):\n\n{inside}",
                range[0], range[1]
            ));
        }
        out
    }
}

/// The run folder's name of a cell: the encoding's label (with `+randomized` at randomized
/// positions), with `+ssmax` when the runs use Scalable-Softmax, `+sb` with stick-breaking
/// attention and `+hybrid` with a hybrid stack.
fn cell_name(config: &SuiteConfig, encoding: &PositionalEncodingConfig) -> String {
    let ssmax = if config.train.ssmax.is_some() {
        "+ssmax"
    } else {
        ""
    };
    let sb = if config.train.stick_breaking.is_some() {
        "+sb"
    } else {
        ""
    };
    let hybrid = if config.train.stack.is_some() {
        "+hybrid"
    } else {
        ""
    };
    format!("{}{ssmax}{sb}{hybrid}", encoding.label())
}

/// The evaluation settings of the in-distribution check: every training length.
fn in_distribution_eval(config: &SuiteConfig, train: &CheTrainConfig) -> CheEvalConfig {
    CheEvalConfig {
        lengths: (train.min_train_length..=train.max_train_length).collect(),
        ..config.eval.clone()
    }
}

const IN_DISTRIBUTION: &str = "in_distribution.json";

/// Trains and evaluates every (task, encoding) pair, writing each run into
/// `out/<task>/<encoding>/`, then `suite.md`, `suite.json` and `out/<task>.svg`. Each cell is
/// also scored at its training lengths (`in_distribution.json`). The table is rewritten after
/// every cell, with the cells still to come listed as pending, so an interrupted suite leaves a
/// true table behind.
pub fn run_suite<B: AutodiffBackend>(
    config: &SuiteConfig,
    backend: &str,
    device: &B::Device,
) -> Result<SuiteReport> {
    config.eval.validate()?;
    ensure_non_empty(&config.tasks, "tasks")?;
    ensure_non_empty(&config.encodings, "encodings")?;
    if let Some(n) = config.max_new_cells {
        ensure(n > 0, "cells", n, "must be at least 1")?;
    }
    // Training times of cells finished by an earlier call (resume).
    let earlier: Vec<SuiteCell> = std::fs::read_to_string(config.out.join("suite.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<SuiteReport>(&t).ok())
        .map(|r| r.cells)
        .unwrap_or_default();
    let grid: Vec<(Task, &PositionalEncodingConfig, String)> = config
        .tasks
        .iter()
        .flat_map(|t| {
            config
                .encodings
                .iter()
                .map(move |e| (*t, e, cell_name(config, e)))
        })
        .collect();
    let total = grid.len();
    let mut report = SuiteReport {
        backend: backend.to_string(),
        steps: config.train.steps,
        lengths: config.eval.lengths.clone(),
        sequences_per_length: config.eval.sequences,
        cells: Vec::new(),
        pending: grid
            .iter()
            .map(|(t, _, name)| PendingCell {
                task: t.name().to_string(),
                encoding: name.clone(),
            })
            .collect(),
    };
    let mut trained = 0;
    for (index, (task, encoding, name)) in grid.iter().enumerate() {
        let dir = config.out.join(task.name()).join(name);
        let prefix = format!("[{}/{total}] {task} / {name}: ", index + 1);
        let mut train_config = config.train.clone();
        train_config.task = *task;
        train_config.encoding = (*encoding).clone();
        let existing = dir.join("che.json");
        let cell = if config.resume && existing.exists() {
            let text = std::fs::read_to_string(&existing).map_err(io_error(&existing))?;
            say!("{prefix}reusing {}", existing.display());
            let report: CheEvalReport = serde_json::from_str(&text)?;
            let inside = match read_in_distribution(&dir)? {
                Some(r) => r,
                None => {
                    let (saved, model) = che_run::load::<B::InnerBackend>(&dir, device)?;
                    let eval = in_distribution_eval(config, &saved);
                    let r = evaluate_run(&model, &saved, &eval, &dir, backend, device, |_| {})?;
                    write_in_distribution(&dir, &r)?;
                    r
                }
            };
            let train_seconds = earlier
                .iter()
                .find(|c| c.task == task.name() && c.encoding == *name)
                .map_or(0.0, |c| c.train_seconds);
            SuiteCell {
                task: task.name().to_string(),
                encoding: name.clone(),
                score: report.score,
                train_seconds,
                in_distribution: Some(inside.score),
                report,
            }
        } else if config.max_new_cells.is_some_and(|n| trained >= n) {
            continue;
        } else {
            trained += 1;
            let every = (train_config.steps / 10).max(1);
            let (model, summary) = train::<B>(
                &train_config,
                &dir,
                device,
                Progress::Lines(prefix.clone(), every),
            )?;
            let mut cell_report = evaluate_run(
                &model,
                &train_config,
                &config.eval,
                &dir,
                backend,
                device,
                |l| {
                    if l.length == *config.eval.lengths.last().unwrap_or(&0) {
                        say!("{prefix}evaluated up to length {}", l.length);
                    }
                },
            )?;
            let eval = in_distribution_eval(config, &train_config);
            let inside = evaluate_run(&model, &train_config, &eval, &dir, backend, device, |_| {})?;
            write_in_distribution(&dir, &inside)?;
            // Cells are named relative to the suite folder, which may move.
            cell_report.run = format!("{}/{name}", task.name());
            // che.json last: its presence marks the cell finished.
            write_report(&dir, &cell_report)?;
            say!(
                "{prefix}score {:.1}% (at the training lengths {:.1}%; trained {:.0}s, evaluated {:.0}s)",
                100.0 * cell_report.score,
                100.0 * inside.score,
                summary.seconds,
                cell_report.seconds
            );
            SuiteCell {
                task: task.name().to_string(),
                encoding: name.clone(),
                score: cell_report.score,
                train_seconds: summary.seconds,
                in_distribution: Some(inside.score),
                report: cell_report,
            }
        };
        report
            .pending
            .retain(|p| !(p.task == cell.task && p.encoding == cell.encoding));
        report.cells.push(cell);
        let row: Vec<&SuiteCell> = report
            .cells
            .iter()
            .filter(|c| c.task == task.name())
            .collect();
        plot_task(&config.out, task.name(), &row)?;
        write_suite(&config.out, &report)?;
    }
    write_suite(&config.out, &report)?;
    say!("suite: {} of {total} cells finished", report.cells.len());
    Ok(report)
}

fn write_suite(out: &Path, report: &SuiteReport) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_json_atomic(&out.join("suite.json"), report)?;
    write_atomic(&out.join("suite.md"), &report.markdown())
}

fn read_in_distribution(dir: &Path) -> Result<Option<CheEvalReport>> {
    let path = dir.join(IN_DISTRIBUTION);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).map_err(|e| {
            crate::error::Error::InvalidInput(format!("{}: {e}", path.display()))
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

fn write_in_distribution(dir: &Path, report: &CheEvalReport) -> Result<()> {
    write_json_atomic(&dir.join(IN_DISTRIBUTION), report)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(task: &str, encoding: &str, score: f64, inside: Option<f64>) -> SuiteCell {
        SuiteCell {
            task: task.into(),
            encoding: encoding.into(),
            score,
            train_seconds: 1.0,
            in_distribution: inside,
            report: CheEvalReport {
                run: format!("{task}/{encoding}"),
                task: task.into(),
                encoding: encoding.into(),
                backend: "ndarray".into(),
                train_lengths: [1, 40],
                train_steps: 10,
                sequences_per_length: 4,
                score,
                lengths: vec![],
                seconds: 0.0,
            },
        }
    }

    #[test]
    fn the_table_groups_tasks_by_level_with_chance_best_and_unlearned_marks() {
        let report = SuiteReport {
            backend: "ndarray".into(),
            steps: 10,
            lengths: vec![41],
            sequences_per_length: 4,
            // Out of the papers' order on purpose: bucket_sort (CS) before even_pairs (R).
            cells: vec![
                cell("bucket_sort", "rope", 0.30, Some(0.95)),
                cell("bucket_sort", "alibi", 0.62, Some(0.99)),
                cell("even_pairs", "rope", 0.51, Some(0.70)),
            ],
            pending: vec![PendingCell {
                task: "even_pairs".into(),
                encoding: "alibi".into(),
            }],
        };
        let md = report.markdown();
        let even = md.find("| R | even_pairs | 50 | **51.0** † | pending |");
        let bucket = md.find("| CS | bucket_sort | 20 | 30.0 | **62.0** |");
        assert!(even.is_some() && bucket.is_some(), "{md}");
        assert!(even < bucket, "R rows come before CS rows: {md}");
        // even_pairs at 70% in distribution is below halfway from 50% to 100%: marked.
        assert!(
            md.contains("† did not learn even at the training lengths"),
            "{md}"
        );
        assert!(md.contains("3 of 4 cells finished"), "{md}");
        assert!(
            md.contains("| CS | bucket_sort | 20 | 95.0 | **99.0** |"),
            "{md}"
        );
        assert!(learned(Task::BucketSort, 60.0) && !learned(Task::BucketSort, 59.9));
    }
}

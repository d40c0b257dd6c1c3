//! A retrieval suite: train and evaluate a grid of tasks × encodings × seeds, one LM run folder
//! per cell (`out/<task>/<encoding>[-seedN]/`), then the tables (`suite.md`, `suite.json`) and
//! one accuracy-by-length plot per task (`out/<task>.svg`, one line per encoding, the mean
//! over its seeds). Each passkey cell also leaves its depth × length heatmap in its folder.
//!
//! Everything resumes: a cell with `retrieval.json` is read back, a trained model is only
//! evaluated, an interrupted training continues from its newest checkpoint.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::data::corpus::default_cache_dir;
use crate::data::retrieval::RetrievalTask;
use crate::error::{ensure, ensure_non_empty, Result};
use crate::eval::plot::Series;
use crate::eval::retrieval::{
    evaluate_run, plot_by_length, write_report, RetrievalEvalConfig, RetrievalReport,
};
use crate::experiment::lm::load_model;
use crate::experiment::retrieval::{train_config, RetrievalModel, RetrievalTrainSettings};
use crate::train::che::Progress;
use crate::train::lm::{train, LmTrainOptions};
use crate::util::{io_error, say, write_atomic, write_json_atomic};

/// Settings of a retrieval suite.
#[derive(Clone, Debug)]
pub struct RetrievalSuiteConfig {
    /// Tasks.
    pub tasks: Vec<RetrievalTask>,
    /// The rows: encodings, with the attention settings of an LM config where a row has them.
    pub encodings: Vec<RetrievalModel>,
    /// Seeds of every cell.
    pub seeds: Vec<u64>,
    /// More seeds for some encodings (the key rows), run after every cell of `seeds`:
    /// `(labels, seeds)`.
    pub extra_seeds: Option<(Vec<String>, Vec<u64>)>,
    /// Training settings shared by every cell (the seed is set per cell).
    pub train: RetrievalTrainSettings,
    /// Evaluation settings shared by every cell.
    pub eval: RetrievalEvalConfig,
    /// Output folder.
    pub out: PathBuf,
    /// Reuse finished cells (and continue interrupted ones).
    pub resume: bool,
    /// Finish at most this many new cells, then write the tables with the rest pending.
    pub max_new_cells: Option<usize>,
    /// One training progress line every this many steps.
    pub progress_every: usize,
}

/// One finished cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalCell {
    /// The row: the encoding's label.
    pub encoding: String,
    /// The run folder's name.
    pub name: String,
    /// The cell's evaluation.
    pub report: RetrievalReport,
}

/// A cell still to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingRetrievalCell {
    /// Task name.
    pub task: RetrievalTask,
    /// The run folder's name.
    pub name: String,
}

/// The suite's tables.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalSuiteReport {
    /// Backend.
    pub backend: String,
    /// Training steps per cell.
    pub steps: usize,
    /// Finished cells, in grid order.
    pub cells: Vec<RetrievalCell>,
    /// Cells still to run.
    pub pending: Vec<PendingRetrievalCell>,
}

/// The run folder's name of a cell: the row's label, with `-seedN` for seeds above 0.
pub fn cell_name(model: &RetrievalModel, seed: u64) -> String {
    match seed {
        0 => model.label.clone(),
        s => format!("{}-seed{s}", model.label),
    }
}

/// `mean` and `max − min` of `values`.
fn mean_spread(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    (mean, max - min)
}

impl RetrievalSuiteReport {
    /// The finished cells of `task`, grouped by encoding in order of appearance.
    fn rows(&self, task: RetrievalTask) -> Vec<(String, Vec<&RetrievalCell>)> {
        let mut rows: Vec<(String, Vec<&RetrievalCell>)> = Vec::new();
        for c in self.cells.iter().filter(|c| c.report.task == task) {
            match rows.iter_mut().find(|(e, _)| *e == c.encoding) {
                Some((_, cells)) => cells.push(c),
                None => rows.push((c.encoding.clone(), vec![c])),
            }
        }
        rows
    }

    /// One table per task: exact-match accuracy (%) by length, the mean over a row's seeds
    /// with `± spread` (max − min) where it has several, and the score (the mean beyond the
    /// training length).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for task in RetrievalTask::ALL {
            let rows = self.rows(task);
            let pending: Vec<&str> = self
                .pending
                .iter()
                .filter(|p| p.task == task)
                .map(|p| p.name.as_str())
                .collect();
            if rows.is_empty() && pending.is_empty() {
                continue;
            }
            if rows.is_empty() {
                out.push_str(&format!(
                    "### {task}\n\nNo cell has finished yet. Pending: {}.\n\n",
                    pending.join(", ")
                ));
                continue;
            }
            let mut lengths: Vec<usize> = rows
                .iter()
                .flat_map(|(_, cells)| cells.iter())
                .flat_map(|c| c.report.lengths.iter().map(|l| l.length))
                .collect();
            lengths.sort_unstable();
            lengths.dedup();
            let unit = match task {
                RetrievalTask::Mqar => "queries answered",
                RetrievalTask::Passkey => "passkeys retrieved, every depth",
            };
            out.push_str(&format!(
                "### {task}: exact-match accuracy (%, {unit}) by length\n\n| encoding | seeds | {} | beyond training |\n|---|---:|{}---:|\n",
                lengths.iter().map(usize::to_string).collect::<Vec<_>>().join(" | "),
                "---:|".repeat(lengths.len())
            ));
            for (encoding, cells) in &rows {
                let mut line = format!("| {encoding} | {} |", cells.len());
                for &length in &lengths {
                    let values: Vec<f64> = cells
                        .iter()
                        .filter_map(|c| c.report.lengths.iter().find(|l| l.length == length))
                        .map(|l| 100.0 * l.accuracy)
                        .collect();
                    line.push_str(&cell_text(&values));
                }
                let scores: Vec<f64> = cells.iter().map(|c| 100.0 * c.report.score).collect();
                line.push_str(&cell_text(&scores));
                out.push_str(&line);
                out.push('\n');
            }
            if !pending.is_empty() {
                out.push_str(&format!("\nPending: {}.\n", pending.join(", ")));
            }
            out.push('\n');
        }
        out
    }
}

/// ` mean ± spread |` (the spread only with several values), or ` – |` with none.
fn cell_text(values: &[f64]) -> String {
    match values.len() {
        0 => " – |".into(),
        1 => format!(" {:.1} |", values[0]),
        _ => {
            let (mean, spread) = mean_spread(values);
            format!(" {mean:.1} ± {spread:.1} |")
        }
    }
}

/// The cells in the order they run: every task × encoding × seed of `seeds`, then the extra
/// seeds of the key rows.
fn grid(config: &RetrievalSuiteConfig) -> Result<Vec<(RetrievalTask, &RetrievalModel, u64)>> {
    let mut grid = Vec::new();
    for &task in &config.tasks {
        for encoding in &config.encodings {
            grid.extend(config.seeds.iter().map(|&s| (task, encoding, s)));
        }
    }
    if let Some((labels, seeds)) = &config.extra_seeds {
        for label in labels {
            ensure(
                config.encodings.iter().any(|e| e.label == *label),
                "extra-seed encoding",
                label,
                "is not one of the suite's encodings",
            )?;
        }
        for &task in &config.tasks {
            for encoding in config
                .encodings
                .iter()
                .filter(|e| labels.contains(&e.label))
            {
                for &seed in seeds.iter().filter(|s| !config.seeds.contains(s)) {
                    grid.push((task, encoding, seed));
                }
            }
        }
    }
    Ok(grid)
}

/// Trains and evaluates every (task, encoding, seed) cell, rewriting the tables after each.
pub fn run_retrieval_suite<B: AutodiffBackend>(
    config: &RetrievalSuiteConfig,
    backend: &str,
    device: &B::Device,
) -> Result<RetrievalSuiteReport> {
    config.eval.validate()?;
    ensure_non_empty(&config.tasks, "tasks")?;
    ensure_non_empty(&config.encodings, "encodings")?;
    ensure_non_empty(&config.seeds, "seeds")?;
    if let Some(n) = config.max_new_cells {
        ensure(n > 0, "cells", n, "must be at least 1")?;
    }
    let grid = grid(config)?;
    let total = grid.len();
    let mut report = RetrievalSuiteReport {
        backend: backend.to_string(),
        steps: config.train.steps,
        cells: Vec::new(),
        pending: Vec::new(),
    };
    let mut new_cells = 0;
    for (index, &(task, encoding, seed)) in grid.iter().enumerate() {
        let name = cell_name(encoding, seed);
        let dir = config.out.join(task.name()).join(&name);
        let prefix = format!("[{}/{total}] {task} / {name}: ", index + 1);
        let existing = dir.join("retrieval.json");
        if config.resume && existing.is_file() {
            let text = std::fs::read_to_string(&existing).map_err(io_error(&existing))?;
            say!("{prefix}reusing {}", existing.display());
            report.cells.push(RetrievalCell {
                encoding: encoding.label.clone(),
                name,
                report: serde_json::from_str(&text)?,
            });
            continue;
        }
        if config.max_new_cells.is_some_and(|n| new_cells >= n) {
            report.pending.push(PendingRetrievalCell { task, name });
            continue;
        }
        let cell = run_cell::<B>(config, task, encoding, seed, &dir, &prefix, backend, device)?;
        report.cells.push(RetrievalCell {
            encoding: encoding.label.clone(),
            name,
            report: cell,
        });
        new_cells += 1;
        write_suite(&config.out, &report, &grid, index + 1)?;
    }
    write_suite(&config.out, &report, &grid, total)?;
    say!("suite: {} of {total} cells finished", report.cells.len());
    Ok(report)
}

/// Trains (or resumes) one cell's run, then evaluates it into `dir`.
#[allow(clippy::too_many_arguments)]
fn run_cell<B: AutodiffBackend>(
    config: &RetrievalSuiteConfig,
    task: RetrievalTask,
    encoding: &RetrievalModel,
    seed: u64,
    dir: &Path,
    prefix: &str,
    backend: &str,
    device: &B::Device,
) -> Result<RetrievalReport> {
    let settings = RetrievalTrainSettings {
        seed,
        ..config.train.clone()
    };
    let train_config = train_config(task, encoding, &settings)?;
    let model = if dir.join("model.mpk").is_file() && dir.join("train.json").is_file() {
        say!("{prefix}trained already; evaluating");
        load_model::<B::InnerBackend>(dir, device)?.1
    } else {
        say!(
            "{prefix}training {} steps into {}",
            train_config.steps,
            dir.display()
        );
        let options = LmTrainOptions {
            out: dir.to_path_buf(),
            resume: dir.join("config.json").is_file(),
            cache_dir: default_cache_dir(),
            progress: Progress::Lines(prefix.to_string(), config.progress_every),
            devices: Default::default(),
        };
        train::<B>(&train_config, &options, device, backend)?.0
    };
    let report = evaluate_run(
        &model,
        &train_config,
        &config.eval,
        dir,
        backend,
        device,
        |l| {
            say!(
                "{prefix}length {:>5}  accuracy {:>6.2}%  ({:.1}s)",
                l.length,
                100.0 * l.accuracy,
                l.seconds
            )
        },
    )?;
    write_report(dir, &report)?;
    Ok(report)
}

/// Writes `suite.json`, `suite.md` and one plot per task, with the cells of the grid after
/// `done` (and those skipped by `--cells`) listed as pending.
fn write_suite(
    out: &Path,
    report: &RetrievalSuiteReport,
    grid: &[(RetrievalTask, &RetrievalModel, u64)],
    done: usize,
) -> Result<()> {
    let mut full = report.clone();
    for &(task, encoding, seed) in &grid[done..] {
        let name = cell_name(encoding, seed);
        if !full
            .pending
            .iter()
            .any(|p| p.task == task && p.name == name)
        {
            full.pending.push(PendingRetrievalCell { task, name });
        }
    }
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_json_atomic(&out.join("suite.json"), &full)?;
    write_atomic(&out.join("suite.md"), &full.markdown())?;
    for task in RetrievalTask::ALL {
        let rows = full.rows(task);
        if rows.is_empty() {
            continue;
        }
        let series: Vec<Series> = rows
            .iter()
            .map(|(encoding, cells)| mean_series(encoding, cells))
            .collect();
        let train_length = rows[0].1[0].report.train_length;
        plot_by_length(
            &out.join(format!("{task}.svg")),
            task,
            train_length,
            &series,
        )?;
    }
    Ok(())
}

/// Accuracy (%) by length of a row, the mean over its seeds.
fn mean_series(encoding: &str, cells: &[&RetrievalCell]) -> Series {
    let lengths: Vec<usize> = cells[0].report.lengths.iter().map(|l| l.length).collect();
    Series {
        name: match cells.len() {
            1 => encoding.to_string(),
            n => format!("{encoding} ({n} seeds)"),
        },
        points: lengths
            .iter()
            .map(|&length| {
                let values: Vec<f64> = cells
                    .iter()
                    .filter_map(|c| c.report.lengths.iter().find(|l| l.length == length))
                    .map(|l| 100.0 * l.accuracy)
                    .collect();
                (length as f64, mean_spread(&values).0)
            })
            .collect(),
    }
}

/// Redraws a suite's tables and plots from its `suite.json`.
pub fn replot(dir: &Path) -> Result<RetrievalSuiteReport> {
    let path = dir.join("suite.json");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let report: RetrievalSuiteReport = serde_json::from_str(&text)?;
    write_suite(dir, &report, &[], 0)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::retrieval::{LengthAccuracy, Tally};

    fn cell(encoding: &str, seed: u64, accuracy: f64) -> RetrievalCell {
        let lengths = vec![LengthAccuracy {
            length: 256,
            accuracy,
            tally: Tally::default(),
            answer_accuracy: Some(accuracy),
            by_depth: Vec::new(),
            seconds: 0.0,
        }];
        RetrievalCell {
            encoding: encoding.into(),
            name: format!("{encoding}-seed{seed}"),
            report: RetrievalReport {
                run: String::new(),
                task: RetrievalTask::Mqar,
                encoding: encoding.into(),
                backend: "ndarray".into(),
                train_length: 128,
                seed,
                eval: RetrievalEvalConfig::default(),
                pairs: Some(16),
                score: accuracy,
                lengths,
                gaps: Vec::new(),
                skipped: Vec::new(),
                seconds: 0.0,
            },
        }
    }

    #[test]
    fn the_table_gives_seed_means_with_spreads_and_lists_pending_cells() {
        let report = RetrievalSuiteReport {
            backend: "ndarray".into(),
            steps: 10,
            cells: vec![
                cell("alibi", 0, 0.5),
                cell("alibi", 1, 0.7),
                cell("rope", 0, 0.1),
            ],
            pending: vec![PendingRetrievalCell {
                task: RetrievalTask::Passkey,
                name: "rope".into(),
            }],
        };
        let md = report.markdown();
        assert!(
            md.contains("| alibi | 2 | 60.0 ± 20.0 | 60.0 ± 20.0 |"),
            "{md}"
        );
        assert!(md.contains("| rope | 1 | 10.0 | 10.0 |"), "{md}");
        assert!(
            md.contains("### passkey\n\nNo cell has finished yet. Pending: rope."),
            "{md}"
        );
    }
}

//! Retrieval evaluation of a causal LM run trained for MQAR or passkey retrieval: exact-match
//! accuracy by length (and, for passkey, by needle depth; for MQAR, by gap), written as
//! `retrieval.json`, `retrieval.csv` and plots.
//!
//! Every item is one forward pass over its `length` tokens (query-chunked attention where the
//! length needs it, which is exact), or the same rows read after a prefix the item shares with
//! its neighbours (a passkey depth's filler and needle text, run once: see
//! `src/eval/retrieval_prefix.rs`); the prediction at a scored target is the argmax of its
//! logits. A passkey item counts as correct when every digit is; an MQAR item contributes each
//! of its queries.

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::heatmap::{heatmap_svg, Heatmap};
use super::plot::{line_chart_svg, Chart, Series};
use super::retrieval_prefix::{tail_logits, token_rows, SharedPrefix};
use super::retrieval_resume::{partial_path, Finished, InProgress, Partial, SAVE_EVERY};
use crate::data::retrieval::mqar::MqarConfig;
use crate::data::retrieval::passkey;
use crate::data::retrieval::{RetrievalItem, RetrievalTask};
use crate::error::{ensure, ensure_non_empty, Error, Result};
use crate::experiment::lm::{auto_chunk, sample_positions, LmTrainConfig, EVAL_BATCH_TOKENS};
use crate::experiment::stream_seed;
use crate::model::LanguageModel;
use crate::progress::ProgressBar;
use crate::util::{io_error, portable_path, say_err, write_atomic, write_json_atomic, Rng};

/// Seed of the test items (independent of the training items).
const TEST_SEED: u64 = 0x07E5_74E7;

/// Settings of a retrieval evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalEvalConfig {
    /// Test lengths (tokens the model reads).
    pub lengths: Vec<usize>,
    /// Passkey: needle depths in `0..=1`.
    pub depths: Vec<f64>,
    /// Items per cell (passkey: per length and depth; MQAR: per length).
    pub trials: usize,
    /// MQAR: pairs per test item beyond the training length (fewer where a length cannot
    /// hold them); `None`: twice the training items' most. Up to the training length the
    /// items hold the training most, as in training.
    pub pairs: Option<usize>,
    /// Tokens per forward pass.
    pub batch_tokens: usize,
    /// Seed of the test items.
    pub seed: u64,
}

impl Default for RetrievalEvalConfig {
    fn default() -> Self {
        Self {
            lengths: vec![128, 256, 512, 1024, 2048, 4096, 8192],
            depths: (0..=10).map(|d| f64::from(d) / 10.0).collect(),
            trials: 20,
            pairs: None,
            batch_tokens: EVAL_BATCH_TOKENS,
            seed: TEST_SEED,
        }
    }
}

impl RetrievalEvalConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        ensure_non_empty(&self.lengths, "lengths")?;
        ensure_non_empty(&self.depths, "depths")?;
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            return Err(Error::invalid("depths", d, "each depth must be in 0..=1"));
        }
        ensure(self.trials > 0, "trials", self.trials, "must be at least 1")?;
        ensure(
            self.batch_tokens > 0,
            "batch_tokens",
            self.batch_tokens,
            "must be at least 1",
        )?;
        if let Some(p) = self.pairs {
            ensure(p > 0, "pairs", p, "must be at least 1")?;
        }
        Ok(())
    }
}

/// Parses a comma-separated list of depths such as `0,0.1,0.5,1`.
pub fn parse_depths(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|d| {
            let value: f64 = d.trim().parse().map_err(|_| {
                Error::invalid("depths", text, "expected comma-separated numbers in 0..=1")
            })?;
            ensure(
                (0.0..=1.0).contains(&value),
                "depths",
                value,
                "each depth must be in 0..=1",
            )?;
            Ok(value)
        })
        .collect()
}

/// Correct answers over scored answers, for one group of items.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Scored units (passkey: items; MQAR: queries).
    pub total: usize,
    /// Correct units.
    pub correct: usize,
}

impl Tally {
    /// `correct / total` (0 when empty).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }

    fn add(&mut self, correct: bool) {
        self.total += 1;
        self.correct += usize::from(correct);
    }
}

/// Accuracy at one length.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LengthAccuracy {
    /// Tokens the model read.
    pub length: usize,
    /// Exact-match accuracy.
    pub accuracy: f64,
    /// The counts behind it.
    pub tally: Tally,
    /// Accuracy over the scored answer tokens one by one (passkey: per digit, a graded
    /// signal where exact match is 0; MQAR: the same as `accuracy`); `None` in reports
    /// written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_accuracy: Option<f64>,
    /// Passkey: accuracy per depth, in the order of the config's depths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_depth: Vec<f64>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Accuracy over the answers whose gap falls in `min..=max` (powers of two).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GapAccuracy {
    /// Smallest gap of the bucket.
    pub min: usize,
    /// Largest gap of the bucket.
    pub max: usize,
    /// Exact-match accuracy.
    pub accuracy: f64,
    /// The counts behind it.
    pub tally: Tally,
}

/// A length that could not be evaluated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedLength {
    /// The length.
    pub length: usize,
    /// Why.
    pub reason: String,
}

/// What `dape retrieval eval` writes as `retrieval.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// The run folder.
    pub run: String,
    /// The task.
    pub task: RetrievalTask,
    /// The encoding's label.
    pub encoding: String,
    /// The backend.
    pub backend: String,
    /// The training length.
    pub train_length: usize,
    /// The run's seed.
    pub seed: u64,
    /// The evaluation's settings.
    pub eval: RetrievalEvalConfig,
    /// MQAR: pairs per test item beyond the training length, before capping to what a length
    /// holds (up to it: the training most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<usize>,
    /// Accuracy by length.
    pub lengths: Vec<LengthAccuracy>,
    /// Accuracy by gap (MQAR: query to its pair; passkey: question to the needle).
    pub gaps: Vec<GapAccuracy>,
    /// Lengths left out, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedLength>,
    /// Mean accuracy over the evaluated lengths beyond the training length (over all lengths
    /// when none is beyond it).
    pub score: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The gap bucket of `gap`: `[2^k, 2^(k+1) - 1]`.
fn gap_bucket(gap: usize) -> usize {
    (usize::BITS - 1 - gap.max(1).leading_zeros()) as usize
}

/// The items of one length, with the depth index of each (passkey).
fn test_items(
    task: RetrievalTask,
    train: &LmTrainConfig,
    eval: &RetrievalEvalConfig,
    length: usize,
) -> Result<Vec<(RetrievalItem, usize)>> {
    let rng = |cell: usize, trial: usize| {
        Rng::new(stream_seed(
            eval.seed ^ ((length as u64) << 20) ^ cell as u64,
            trial as u64,
        ))
    };
    match task {
        RetrievalTask::Passkey => {
            let digits = train.passkey.clone().unwrap_or_default().digits;
            let mut items = Vec::new();
            for (d, &depth) in eval.depths.iter().enumerate() {
                for t in 0..eval.trials {
                    let p = passkey::item(length, depth, digits, &mut rng(d, t))?;
                    items.push((p.item, d));
                }
            }
            Ok(items)
        }
        RetrievalTask::Mqar => {
            let mqar = train.mqar.clone().unwrap_or_default();
            // In distribution up to the training length; more pairs beyond it.
            let pairs = if length <= train.train_length {
                mqar.pairs
            } else {
                mqar_pairs(&mqar, eval)
            };
            let pairs = pairs.min((length + 1) / 4).max(1);
            (0..eval.trials)
                .map(|t| Ok((mqar.item(length, pairs, &mut rng(0, t))?, 0)))
                .collect()
        }
    }
}

/// MQAR pairs per test item before capping: the given number, or twice the training most
/// (within the key vocabulary).
fn mqar_pairs(mqar: &MqarConfig, eval: &RetrievalEvalConfig) -> usize {
    eval.pairs.unwrap_or((2 * mqar.pairs).min(mqar.keys))
}

/// Whether each scored answer of `items` is predicted, per item: the argmax of the logits at
/// every answer target equals the next token. A prefix that the items share with the `next`
/// pass's is read once and kept in `shared` (see [`super::retrieval_prefix`]); at randomized
/// positions every pass is whole.
fn predict<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    items: &[&RetrievalItem],
    next: &[&RetrievalItem],
    pass: u64,
    shared: &mut Option<SharedPrefix<B>>,
    device: &B::Device,
) -> Result<Vec<Vec<bool>>> {
    let n = items.len();
    let length = items[0].length();
    // Only the rows from the first scored target on are needed for the argmax.
    let first = items
        .iter()
        .flat_map(|i| i.answer_targets.first().copied())
        .min()
        .unwrap_or(0);
    let logits = match train.encoding.randomized() {
        None => tail_logits(model, items, next, first, shared, device)?,
        Some(r) => {
            let positions = sample_positions(r, length, TEST_SEED, pass)?;
            let inputs = token_rows(items, 0..length, device);
            let logits = model.forward_at(inputs, Some(&positions))?;
            let vocab = logits.dims()[2];
            logits.slice([0..n, first..length, 0..vocab])
        }
    };
    let best = logits
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| Error::InvalidInput(format!("cannot read the predictions: {e:?}")))?;
    let width = length - first;
    Ok(items
        .iter()
        .enumerate()
        .map(|(row, item)| {
            item.answer_targets
                .iter()
                .map(|&t| best[row * width + t - first] == i64::from(item.tokens[t + 1]))
                .collect()
        })
        .collect())
}

/// Evaluates `model`, trained by `train`, on `eval`'s lengths, calling `on_length` after each.
/// With `resume` (a run's [`partial_path`]), lengths finished by an interrupted evaluation of
/// the same run and settings are taken from there, and each new one is recorded there as it
/// finishes (see [`super::retrieval_resume`]).
pub fn evaluate<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    eval: &RetrievalEvalConfig,
    device: &B::Device,
    resume: Option<&Path>,
    mut on_length: impl FnMut(&LengthAccuracy),
) -> Result<(Vec<LengthAccuracy>, Vec<GapAccuracy>, Vec<SkippedLength>)> {
    eval.validate()?;
    let task = train.retrieval_task().ok_or_else(|| {
        Error::InvalidInput(
            "the run was not trained for a retrieval task (its config has no \"passkey\" or \"mqar\")"
                .into(),
        )
    })?;
    let (mut lengths, mut skipped) = (Vec::new(), Vec::new());
    let mut gaps: Vec<Tally> = Vec::new();
    let mut partial = resume
        .map(|path| Partial::load(path, train, eval).map(|p| (path, p)))
        .transpose()?;
    for &length in &eval.lengths {
        let earlier = partial.as_ref().and_then(|(_, p)| p.get(length).cloned());
        let finished = match earlier {
            Some(finished) => {
                if let Finished::Evaluated { accuracy, .. } = &finished {
                    say_err!("length {length}: taken from an interrupted evaluation");
                    on_length(accuracy);
                }
                finished
            }
            None => {
                let progress = partial.as_mut().map(|(path, p)| (*path, p));
                let finished = evaluate_length(model, train, eval, task, length, device, progress)?;
                if let Finished::Evaluated { accuracy, .. } = &finished {
                    on_length(accuracy);
                }
                if let Some((path, p)) = partial.as_mut() {
                    p.record(path, finished.clone())?;
                }
                finished
            }
        };
        match finished {
            Finished::Skipped(s) => {
                say_err!("length {length}: skipped: {}", s.reason);
                skipped.push(s);
            }
            Finished::Evaluated {
                accuracy,
                gaps: length_gaps,
            } => {
                if gaps.len() < length_gaps.len() {
                    gaps.resize(length_gaps.len(), Tally::default());
                }
                for (total, t) in gaps.iter_mut().zip(length_gaps) {
                    total.total += t.total;
                    total.correct += t.correct;
                }
                lengths.push(accuracy);
            }
        }
    }
    let gaps = gaps
        .into_iter()
        .enumerate()
        .filter(|(_, t)| t.total > 0)
        .map(|(k, tally)| GapAccuracy {
            min: 1 << k,
            max: (1 << (k + 1)) - 1,
            accuracy: tally.accuracy(),
            tally,
        })
        .collect();
    Ok((lengths, gaps, skipped))
}

/// One length's accuracy and its gap tallies (or why it was left out). With `progress` (the
/// run's partial results), passes done by an interrupted evaluation of this length are taken
/// from there, and the passes done now are saved there as they go (at most every
/// [`SAVE_EVERY`]).
fn evaluate_length<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    eval: &RetrievalEvalConfig,
    task: RetrievalTask,
    length: usize,
    device: &B::Device,
    mut progress: Option<(&Path, &mut Partial)>,
) -> Result<Finished> {
    let items = match test_items(task, train, eval, length) {
        Ok(items) => items,
        Err(e) => {
            return Ok(Finished::Skipped(SkippedLength {
                length,
                reason: e.to_string(),
            }));
        }
    };
    let start = Instant::now();
    let rows = (eval.batch_tokens / length).max(1);
    let model = model
        .clone()
        .with_chunk_size(auto_chunk(rows.min(items.len()), length));
    let mut done = progress
        .as_ref()
        .and_then(|(_, p)| p.progress(length).cloned())
        .unwrap_or(InProgress {
            length,
            ..InProgress::default()
        });
    done.depths.resize(eval.depths.len(), Tally::default());
    let InProgress {
        passes: skip,
        mut tally,
        answers: mut answers_tally,
        depths: mut depth_tallies,
        mut gaps,
        seconds: before,
        ..
    } = done;
    let mut bar = ProgressBar::new(format!("{task} length {length}"), items.len());
    if skip > 0 {
        let taken = (skip * rows).min(items.len());
        say_err!("length {length}: {taken} items taken from an interrupted evaluation");
        bar.inc(taken);
    }
    let mut saved = Instant::now();
    let mut shared = None;
    let batches: Vec<&[(RetrievalItem, usize)]> = items.chunks(rows).collect();
    for (pass, batch) in batches.iter().enumerate().skip(skip) {
        let this: Vec<&RetrievalItem> = batch.iter().map(|(i, _)| i).collect();
        let next: Vec<&RetrievalItem> = batches
            .get(pass + 1)
            .map_or(&[][..], |b| b)
            .iter()
            .map(|(i, _)| i)
            .collect();
        let verdicts = predict(
            &model,
            train,
            &this,
            &next,
            pass as u64,
            &mut shared,
            device,
        )?;
        for ((item, depth), answers) in batch.iter().zip(verdicts) {
            for &a in &answers {
                answers_tally.add(a);
            }
            let units: Vec<(bool, usize)> = match task {
                // One unit per item: every digit right; its gap is the needle's.
                RetrievalTask::Passkey => {
                    vec![(answers.iter().all(|&a| a), item.gaps[0])]
                }
                RetrievalTask::Mqar => answers.into_iter().zip(item.gaps.clone()).collect(),
            };
            for (correct, gap) in units {
                tally.add(correct);
                if task == RetrievalTask::Passkey {
                    depth_tallies[*depth].add(correct);
                }
                let b = gap_bucket(gap);
                if gaps.len() <= b {
                    gaps.resize(b + 1, Tally::default());
                }
                gaps[b].add(correct);
            }
        }
        bar.inc(batch.len());
        if let Some((path, partial)) = progress.as_mut() {
            if saved.elapsed() >= SAVE_EVERY {
                let now = InProgress {
                    length,
                    passes: pass + 1,
                    tally: tally.clone(),
                    answers: answers_tally.clone(),
                    depths: depth_tallies.clone(),
                    gaps: gaps.clone(),
                    seconds: before + start.elapsed().as_secs_f64(),
                };
                partial.save_progress(path, now)?;
                saved = Instant::now();
            }
        }
    }
    bar.finish();
    let result = LengthAccuracy {
        length,
        accuracy: tally.accuracy(),
        tally,
        answer_accuracy: Some(answers_tally.accuracy()),
        by_depth: match task {
            RetrievalTask::Passkey => depth_tallies.iter().map(Tally::accuracy).collect(),
            RetrievalTask::Mqar => Vec::new(),
        },
        seconds: before + start.elapsed().as_secs_f64(),
    };
    Ok(Finished::Evaluated {
        accuracy: result,
        gaps,
    })
}

/// Mean accuracy beyond the training length (over every length when none is beyond it).
pub fn score(lengths: &[LengthAccuracy], train_length: usize) -> f64 {
    let beyond: Vec<f64> = lengths
        .iter()
        .filter(|l| l.length > train_length)
        .map(|l| l.accuracy)
        .collect();
    let pool: Vec<f64> = if beyond.is_empty() {
        lengths.iter().map(|l| l.accuracy).collect()
    } else {
        beyond
    };
    pool.iter().sum::<f64>() / pool.len().max(1) as f64
}

/// Evaluates a run and assembles its report (not yet written).
pub fn evaluate_run<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    eval: &RetrievalEvalConfig,
    run: &Path,
    backend: &str,
    device: &B::Device,
    on_length: impl FnMut(&LengthAccuracy),
) -> Result<RetrievalReport> {
    let start = Instant::now();
    let resume = partial_path(run);
    let (lengths, gaps, skipped) = evaluate(model, train, eval, device, Some(&resume), on_length)?;
    let task = train.retrieval_task().expect("checked by evaluate");
    Ok(RetrievalReport {
        run: portable_path(run),
        task,
        encoding: train.encoding.label(),
        backend: backend.to_string(),
        train_length: train.train_length,
        seed: train.seed,
        eval: eval.clone(),
        pairs: train.mqar.as_ref().map(|m| mqar_pairs(m, eval)),
        score: score(&lengths, train.train_length),
        lengths,
        gaps,
        skipped,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes `retrieval.json`, `retrieval.csv` (one row per length, and per depth for passkey),
/// `retrieval.svg` (accuracy by length) and, for passkey, `passkey_heatmap.svg` into `dir`.
pub fn write_report(dir: &Path, report: &RetrievalReport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    write_json_atomic(&dir.join("retrieval.json"), report)?;
    let mut csv =
        String::from("task,length,depth,accuracy,correct,total,answer_accuracy,seconds\n");
    for l in &report.lengths {
        csv.push_str(&format!(
            "{},{},all,{:.6},{},{},{},{:.3}\n",
            report.task,
            l.length,
            l.accuracy,
            l.tally.correct,
            l.tally.total,
            l.answer_accuracy
                .map_or(String::new(), |a| format!("{a:.6}")),
            l.seconds
        ));
        for (depth, accuracy) in report.eval.depths.iter().zip(&l.by_depth) {
            csv.push_str(&format!(
                "{},{},{depth},{accuracy:.6},,,,\n",
                report.task, l.length
            ));
        }
    }
    write_atomic(&dir.join("retrieval.csv"), &csv)?;
    plot_by_length(
        &dir.join("retrieval.svg"),
        report.task,
        report.train_length,
        &[length_series(report)],
    )?;
    if report.task == RetrievalTask::Passkey {
        plot_heatmap(&dir.join("passkey_heatmap.svg"), report)?;
    }
    // The report holds every length now: the partial results have served.
    let partial = partial_path(dir);
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&partial)(e)),
        _ => Ok(()),
    }
}

/// A report's accuracy (%) by length as one line, named after its encoding.
pub fn length_series(report: &RetrievalReport) -> Series {
    Series {
        name: report.encoding.clone(),
        points: report
            .lengths
            .iter()
            .map(|l| (l.length as f64, 100.0 * l.accuracy))
            .collect(),
    }
}

/// Draws accuracy (%) by length on a log2 axis, one line per series, the training length
/// marked.
pub fn plot_by_length(
    path: &Path,
    task: RetrievalTask,
    train_length: usize,
    series: &[Series],
) -> Result<()> {
    let title = format!("{task}: exact-match accuracy by length (trained at {train_length})");
    line_chart_svg(
        path,
        &Chart {
            title: &title,
            x_label: "tokens read",
            y_label: "accuracy (%)",
            log2_x: true,
            marker: Some((train_length as f64, "training length")),
            log_y: false,
            y_range: Some((0.0, 100.0)),
        },
        series,
    )
}

/// Draws a passkey report's depth × length grid (the needle-in-a-haystack picture).
pub fn plot_heatmap(path: &Path, report: &RetrievalReport) -> Result<()> {
    let title = format!(
        "passkey retrieval, {} (trained at {}): accuracy % by depth and length",
        report.encoding, report.train_length
    );
    let values = report
        .eval
        .depths
        .iter()
        .enumerate()
        .map(|(d, _)| {
            report
                .lengths
                .iter()
                .map(|l| l.by_depth.get(d).copied())
                .collect()
        })
        .collect();
    heatmap_svg(
        path,
        &Heatmap {
            title: &title,
            x_label: "tokens read",
            y_label: "needle depth",
            columns: report
                .lengths
                .iter()
                .map(|l| l.length.to_string())
                .collect(),
            rows: report
                .eval
                .depths
                .iter()
                .map(|d| format!("{:.0}%", 100.0 * d))
                .collect(),
            values,
        },
    )
}

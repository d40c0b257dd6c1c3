//! CHE evaluation: accuracy by length on unseen lengths, written as `che.json`, `che.csv` and
//! `che.svg`; and the tasks × encodings suite table of mean accuracy, like the papers'.

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::plot::{line_chart_svg, Chart, Series};
use crate::data::che::{Rng, Task};
use crate::encoding::{Positions, RandomizedConfig};
use crate::error::{ensure, Error, Result};
use crate::experiment::che::{che_forward, CheBatch, CheTrainConfig, POSITION_STREAM};
use crate::experiment::stream_seed;
use crate::model::SequenceModel;
use crate::util::{io_error, portable_path, write_atomic, write_json_atomic};

/// Settings of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheEvalConfig {
    /// The lengths to test.
    pub lengths: Vec<usize>,
    /// Sequences per length (512 in the papers).
    pub sequences: usize,
    /// Largest number of sequences per forward pass (smaller for long inputs).
    pub batch: usize,
    /// Seed of the test data (independent of the training data).
    pub seed: u64,
}

impl Default for CheEvalConfig {
    fn default() -> Self {
        Self {
            lengths: (41..=500).collect(),
            sequences: 512,
            batch: 128,
            seed: 0x7E57,
        }
    }
}

impl CheEvalConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        ensure(
            !self.lengths.is_empty(),
            "lengths",
            "[]",
            "must not be empty",
        )?;
        if let Some(bad) = self.lengths.iter().find(|&&l| l == 0) {
            return Err(Error::invalid("lengths", bad, "CHE lengths start at 1"));
        }
        ensure(
            self.sequences > 0,
            "sequences",
            self.sequences,
            "must be at least 1",
        )?;
        ensure(self.batch > 0, "batch", self.batch, "must be at least 1")?;
        Ok(())
    }
}

/// Parses `a..b` (inclusive), `a..b:step` or a comma list such as `41,100,200`.
pub fn parse_lengths(text: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| Error::invalid("lengths", text, why.to_string());
    let number = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad("expected `a..b`, `a..b:step` or a comma-separated list of integers"))
    };
    let lengths: Vec<usize> = if let Some((range, step)) = text.split_once(':') {
        let (a, b) = range
            .split_once("..")
            .ok_or_else(|| bad("a step needs a range `a..b:step`"))?;
        let step = number(step)?;
        ensure(step > 0, "lengths", text, "the step must be at least 1")?;
        (number(a)?..=number(b.trim_start_matches('='))?)
            .step_by(step)
            .collect()
    } else if let Some((a, b)) = text.split_once("..") {
        (number(a)?..=number(b.trim_start_matches('='))?).collect()
    } else {
        text.split(',').map(number).collect::<Result<_>>()?
    };
    ensure(!lengths.is_empty(), "lengths", text, "the range is empty")?;
    if lengths.contains(&0) {
        return Err(bad("CHE lengths start at 1"));
    }
    Ok(lengths)
}

/// Accuracy at one length.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LengthAccuracy {
    /// Input length.
    pub length: usize,
    /// Correct masked-in output positions over all masked-in positions.
    pub accuracy: f64,
    /// Sequences evaluated.
    pub sequences: usize,
    /// Seconds spent on this length.
    pub seconds: f64,
}

/// The evaluation of one trained run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheEvalReport {
    /// Run folder.
    pub run: String,
    /// Task name.
    pub task: String,
    /// Encoding name.
    pub encoding: String,
    /// Backend name.
    pub backend: String,
    /// Training lengths `[min, max]`.
    pub train_lengths: [usize; 2],
    /// Training steps.
    pub train_steps: usize,
    /// Sequences per length.
    pub sequences_per_length: usize,
    /// Mean accuracy over the test lengths (the papers' score).
    pub score: f64,
    /// Accuracy by length.
    pub lengths: Vec<LengthAccuracy>,
    /// Seconds of the whole evaluation.
    pub seconds: f64,
}

/// Query rows per attention chunk for inputs of `total` tokens (`None`: no chunking).
fn chunk_for(total: usize) -> Option<usize> {
    (total > 128).then_some(64)
}

/// Sequences per forward pass for inputs of `total` tokens: keeps the largest attention-side
/// tensor, `[batch, rows, keys, 32]` (DAPE's hidden map), near 16 MiB — well inside the 128 MiB
/// buffers that software Vulkan allows, and cache-friendly on CPUs.
fn batch_for(total: usize, max: usize) -> usize {
    let rows = chunk_for(total).unwrap_or(total);
    let budget = 1usize << 22; // f32 elements
    (budget / (rows * total * 32).max(1)).clamp(1, max)
}

/// Accuracy of `model` on `task` at every length of `config`; with `randomized`, each forward
/// pass sits at a fresh seeded sample of positions (an error for a length whose tokens outnumber
/// `max_position`).
pub fn accuracy_by_length<B: Backend>(
    model: &SequenceModel<B>,
    task: Task,
    config: &CheEvalConfig,
    randomized: Option<&RandomizedConfig>,
    device: &B::Device,
    mut on_length: impl FnMut(&LengthAccuracy),
) -> Result<Vec<LengthAccuracy>> {
    config.validate()?;
    let mut results = Vec::with_capacity(config.lengths.len());
    for &length in &config.lengths {
        let start = Instant::now();
        let mut rng = Rng::new(config.seed ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let total = length + task.output_len(length);
        // Query-chunk long inputs: exact, and bounded memory.
        let model = model.clone().with_chunk_size((total > 256).then_some(128));
        let per_batch = batch_for(total, config.batch);
        // Randomized positions: a fresh sample for every forward pass, as Ruoss et al.'s
        // evaluation draws one; seeded by the length and the pass.
        let mut position_rng = Rng::new(stream_seed(config.seed ^ POSITION_STREAM, length as u64));
        let (mut correct, mut counted, mut done) = (0.0, 0.0, 0);
        while done < config.sequences {
            let n = per_batch.min(config.sequences - done);
            let samples = (0..n)
                .map(|_| task.sample(length, &mut rng))
                .collect::<Result<Vec<_>>>()?;
            let positions = randomized
                .map(|r| Positions::sample(total, r.max_position, &mut position_rng))
                .transpose()?;
            let batch = CheBatch::from_samples(&samples, device).with_positions(positions);
            let output = che_forward(&model, batch);
            let (c, m) = output.counts();
            correct += c;
            counted += m;
            done += n;
        }
        let result = LengthAccuracy {
            length,
            accuracy: if counted > 0.0 {
                correct / counted
            } else {
                0.0
            },
            sequences: done,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_length(&result);
        results.push(result);
    }
    Ok(results)
}

/// Mean accuracy over lengths.
pub fn mean_accuracy(lengths: &[LengthAccuracy]) -> f64 {
    lengths.iter().map(|l| l.accuracy).sum::<f64>() / lengths.len().max(1) as f64
}

/// Writes `che.json`, `che.csv` and `che.svg` into `dir`.
pub fn write_report(dir: &Path, report: &CheEvalReport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    write_json_atomic(&dir.join("che.json"), report)?;
    let mut csv = String::from("length,accuracy,sequences,seconds\n");
    for l in &report.lengths {
        csv.push_str(&format!(
            "{},{:.6},{},{:.3}\n",
            l.length, l.accuracy, l.sequences, l.seconds
        ));
    }
    write_atomic(&dir.join("che.csv"), &csv)?;
    let series = [accuracy_series(report)];
    plot_accuracy(
        &dir.join("che.svg"),
        &report.task,
        report.train_lengths[1],
        &series,
    )
}

/// A report's accuracy (%) by length as one line of a plot, named after its encoding.
pub fn accuracy_series(report: &CheEvalReport) -> Series {
    Series {
        name: report.encoding.clone(),
        points: report
            .lengths
            .iter()
            .map(|l| (l.length as f64, 100.0 * l.accuracy))
            .collect(),
    }
}

/// Draws accuracy (%) by input length for one task, one line per series, with the longest
/// training length marked.
pub fn plot_accuracy(path: &Path, task: &str, train_max: usize, series: &[Series]) -> Result<()> {
    let title = format!("{task}: accuracy by length (trained on lengths ≤ {train_max})");
    line_chart_svg(
        path,
        &Chart {
            title: &title,
            x_label: "input length",
            y_label: "accuracy (%)",
            log2_x: false,
            marker: Some((train_max as f64, "longest training length")),
            log_y: false,
            y_range: Some((0.0, 100.0)),
        },
        series,
    )
}

/// Evaluates a trained model and assembles its report (not yet written).
pub fn evaluate_run<B: Backend>(
    model: &SequenceModel<B>,
    train_config: &CheTrainConfig,
    eval: &CheEvalConfig,
    run: &Path,
    backend: &str,
    device: &B::Device,
    on_length: impl FnMut(&LengthAccuracy),
) -> Result<CheEvalReport> {
    let start = Instant::now();
    let lengths = accuracy_by_length(
        model,
        train_config.task,
        eval,
        train_config.encoding.randomized(),
        device,
        on_length,
    )?;
    Ok(CheEvalReport {
        run: portable_path(run),
        task: train_config.task.name().to_string(),
        encoding: train_config.encoding.label(),
        backend: backend.to_string(),
        train_lengths: [train_config.min_train_length, train_config.max_train_length],
        train_steps: train_config.steps,
        sequences_per_length: eval.sequences,
        score: mean_accuracy(&lengths),
        lengths,
        seconds: start.elapsed().as_secs_f64(),
    })
}

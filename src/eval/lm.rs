//! Length extrapolation of a trained language model: perplexity on the test documents as the
//! evaluation length grows past the training length.
//!
//! For each length `L` the evaluator takes non-overlapping windows of `L + 1` tokens inside
//! the test documents (round-robin over documents, so that no single document dominates), lets
//! the model read each whole window and reports perplexity on its last `last` tokens — the
//! DAPE paper's protocol, `last = 256` — and on all tokens. Lengths it cannot evaluate are
//! reported with the reason (no document long enough, not enough memory, a backend failure).

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::plot::{line_chart_svg, Chart, Series};
use crate::data::corpus::{Corpus, Part, TokenizedCorpus};
use crate::encoding::RandomizedConfig;
use crate::error::{ensure, Error, Result};
use crate::experiment::lm::{
    auto_chunk, load, sample_positions, token_nll, LmBatch, LmTrainConfig, Window,
};
use crate::model::LanguageModel;
use crate::progress::ProgressBar;
use crate::sysmem;
use crate::util::{portable_path, say, say_err, write_atomic, write_json_atomic};

/// Settings of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LmEvalConfig {
    /// Evaluation lengths.
    pub lengths: Vec<usize>,
    /// Perplexity is also reported on the last this many tokens of each window (256 in the
    /// paper; the whole window when it is shorter).
    pub last: usize,
    /// Query rows per attention chunk; `None`: [`auto_chunk`] (bounded per-pair tensors).
    pub chunk: Option<usize>,
    /// Tokens evaluated per length, at most (at least one window).
    pub max_tokens: usize,
    /// Tokens per forward pass (at least one window).
    pub batch_tokens: usize,
}

impl Default for LmEvalConfig {
    fn default() -> Self {
        Self {
            lengths: vec![128, 256, 512, 1024, 2048, 4096, 8192],
            last: 256,
            chunk: None,
            max_tokens: 65536,
            batch_tokens: 8192,
        }
    }
}

impl LmEvalConfig {
    /// Checks the values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        ensure(
            !self.lengths.is_empty() && self.lengths.iter().all(|&l| l > 0),
            "lengths",
            format!("{:?}", self.lengths),
            "must be a non-empty list of positive lengths",
        )?;
        ensure(self.last > 0, "last", self.last, "must be at least 1")?;
        if let Some(c) = self.chunk {
            ensure(c > 0, "chunk", c, "must be at least 1")?;
        }
        ensure(
            self.max_tokens > 0,
            "max_tokens",
            self.max_tokens,
            "must be at least 1",
        )?;
        ensure(
            self.batch_tokens > 0,
            "batch_tokens",
            self.batch_tokens,
            "must be at least 1",
        )
    }
}

/// Perplexity at one length.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LengthPerplexity {
    /// Evaluation length.
    pub length: usize,
    /// Perplexity on the last `last` tokens of each window.
    pub ppl_last: f64,
    /// Perplexity on every token.
    pub ppl_all: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens predicted (all positions).
    pub tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Peak resident set size of the process while evaluating this length (Linux).
    pub peak_rss_bytes: Option<u64>,
    /// LongPPL: perplexity on the key tokens (`None` without `--longppl`, or when the length
    /// has no key token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longppl: Option<f64>,
    /// Key tokens of the length (`--longppl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_tokens: Option<usize>,
}

/// A length that could not be evaluated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedLength {
    /// The length.
    pub length: usize,
    /// Why.
    pub reason: String,
}

/// `eval.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LmEvalReport {
    /// The run folder.
    pub run: String,
    /// Encoding name.
    pub encoding: String,
    /// Training window length.
    pub train_length: usize,
    /// Backend name.
    pub backend: String,
    /// Tokenizer name.
    pub tokenizer: String,
    /// `last` of the protocol.
    pub last: usize,
    /// Where windows come from.
    pub window_source: String,
    /// Per-length results.
    pub lengths: Vec<LengthPerplexity>,
    /// Lengths that could not be evaluated, with the reason.
    pub skipped: Vec<SkippedLength>,
}

/// Non-overlapping windows of `length + 1` tokens inside documents, taken round-robin over the
/// documents (window 0 of each, then window 1, ...), at most `max`.
pub fn document_windows(docs: &[&[u16]], length: usize, max: usize) -> Vec<Window> {
    let per_doc: Vec<usize> = docs
        .iter()
        .map(|d| d.len().saturating_sub(1) / length)
        .collect();
    let rounds = per_doc.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for r in 0..rounds {
        for (doc, &n) in docs.iter().zip(&per_doc) {
            if out.len() == max {
                return out;
            }
            if r < n {
                let s = r * length;
                out.push(Window {
                    positions: None,
                    mask: None,
                    tokens: doc[s..s + length + 1].to_vec(),
                });
            }
        }
    }
    out
}

/// A rough upper bound of the transient memory of one forward pass, in bytes: the attention
/// logits of one chunk (and DAPE's per-pair MLP activations) and the output logits.
fn memory_estimate(config: &LmTrainConfig, rows: usize, length: usize, chunk: usize) -> u64 {
    let h = config.n_heads as u64;
    let per_pair = 4 * h
        + if config.encoding.is_dape() {
            3 * (2 * h + 32)
        } else {
            0
        };
    let pairs = (rows * chunk.min(length) * length) as u64;
    let logits = (rows * length * config.tokenizer.vocab_size()) as u64 * 3;
    4 * (pairs * per_pair + logits)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Seed of the evaluation's randomized positions (the same samples for every run).
const EVAL_POSITION_SEED: u64 = 0x7E57_0905;

/// Calls `visit(i, nll)` with the per-target negative log-likelihoods (`length` values) of
/// every window `i`, `rows` windows per forward pass.
pub(crate) fn for_each_window_nll<B: Backend>(
    model: &LanguageModel<B>,
    randomized: Option<&RandomizedConfig>,
    windows: &[Window],
    rows: usize,
    bar: &mut ProgressBar,
    device: &B::Device,
    mut visit: impl FnMut(usize, &[f32]),
) -> Result<()> {
    for (pass, group) in windows.chunks(rows).enumerate() {
        // Randomized positions: a fresh seeded sample for every forward pass, as Ruoss et
        // al.'s evaluation draws one.
        let positions = randomized
            .map(|r| {
                sample_positions(
                    r,
                    group[0].tokens.len() - 1,
                    EVAL_POSITION_SEED,
                    pass as u64,
                )
            })
            .transpose()?;
        let batch = LmBatch::<B>::from_windows(group, 1.0, device).with_positions(positions);
        let nll = token_nll(model, batch.inputs, batch.targets, batch.positions.as_ref())?;
        let [_, length] = nll.dims();
        let values: Vec<f32> = nll.into_data().convert::<f32>().to_vec().map_err(|e| {
            Error::InvalidInput(format!("cannot read the evaluation results: {e:?}"))
        })?;
        for (k, row) in values.chunks(length).enumerate() {
            visit(pass * rows + k, row);
        }
        bar.inc(group.len());
    }
    Ok(())
}

/// Negative log-likelihood sums over a length's windows.
#[derive(Clone, Copy, Debug, Default)]
struct NllSums {
    /// Over the last `last` targets of each window.
    last: f64,
    /// Over every target.
    all: f64,
    /// Over the key tokens (LongPPL).
    key: f64,
    /// Key tokens counted.
    key_count: usize,
}

/// The sums over `windows`; `keys[i]`, when given, lists window `i`'s key targets.
#[allow(clippy::too_many_arguments)]
fn nll_sums<B: Backend>(
    model: &LanguageModel<B>,
    randomized: Option<&RandomizedConfig>,
    windows: &[Window],
    rows: usize,
    last: usize,
    keys: Option<&[Vec<u32>]>,
    bar: &mut ProgressBar,
    device: &B::Device,
) -> Result<NllSums> {
    let mut sums = NllSums::default();
    for_each_window_nll(model, randomized, windows, rows, bar, device, |i, row| {
        let length = row.len();
        sums.all += row.iter().map(|&v| f64::from(v)).sum::<f64>();
        sums.last += row[length - last..]
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>();
        if let Some(keys) = keys {
            sums.key += keys[i]
                .iter()
                .map(|&t| f64::from(row[t as usize]))
                .sum::<f64>();
            sums.key_count += keys[i].len();
        }
    })?;
    Ok(sums)
}

/// Perplexity by length of `model` on `docs`.
pub fn perplexity_by_length<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    docs: &[&[u16]],
    config: &LmEvalConfig,
    device: &B::Device,
) -> Result<(Vec<LengthPerplexity>, Vec<SkippedLength>)> {
    perplexity_with_keys(model, train, docs, config, None, device)
}

/// The key tokens of a length's windows (LongPPL): `keys(length, windows)` lists, per window,
/// the target indices that are key tokens ([`super::longppl`]).
pub type KeyTokens<'a> = dyn FnMut(usize, &[Window]) -> Result<Vec<Vec<u32>>> + 'a;

/// [`perplexity_by_length`], and with `keys` also the perplexity on each length's key tokens
/// (LongPPL).
pub fn perplexity_with_keys<B: Backend>(
    model: &LanguageModel<B>,
    train: &LmTrainConfig,
    docs: &[&[u16]],
    config: &LmEvalConfig,
    mut keys: Option<&mut KeyTokens<'_>>,
    device: &B::Device,
) -> Result<(Vec<LengthPerplexity>, Vec<SkippedLength>)> {
    config.validate()?;
    let longest = docs.iter().map(|d| d.len()).max().unwrap_or(0);
    let (mut done, mut skipped) = (Vec::new(), Vec::new());
    for &length in &config.lengths {
        let windows = document_windows(docs, length, (config.max_tokens / length).max(1));
        if windows.is_empty() {
            let reason = format!(
                "no test document holds {} tokens (the longest holds {longest})",
                length + 1
            );
            say_err!("length {length}: skipped: {reason}");
            skipped.push(SkippedLength { length, reason });
            continue;
        }
        let rows = (config.batch_tokens / length).max(1);
        let chunk = config.chunk.or(auto_chunk(rows.min(windows.len()), length));
        let need = memory_estimate(train, rows, length, chunk.unwrap_or(length));
        if let Some(available) = sysmem::available_bytes() {
            if need > available {
                let reason = format!(
                    "out of memory: one forward pass needs about {:.1} GiB, {:.1} GiB are \
                     available (try a smaller --chunk)",
                    need as f64 / (1u64 << 30) as f64,
                    available as f64 / (1u64 << 30) as f64
                );
                say_err!("length {length}: skipped: {reason}");
                skipped.push(SkippedLength { length, reason });
                continue;
            }
        }
        let key_lists = match keys.as_mut() {
            Some(find) => Some(find(length, &windows)?),
            None => None,
        };
        let model = model.clone().with_chunk_size(chunk);
        let last = config.last.min(length);
        sysmem::reset_peak_rss();
        let start = Instant::now();
        let mut bar = ProgressBar::new(format!("eval length {length}"), windows.len());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            nll_sums(
                &model,
                train.encoding.randomized(),
                &windows,
                rows,
                last,
                key_lists.as_deref(),
                &mut bar,
                device,
            )
        }));
        bar.finish();
        let sums = match outcome {
            Ok(Ok(sums)) => sums,
            Ok(Err(e)) => {
                let reason = format!("the model refused it: {e}");
                say_err!("length {length}: skipped: {reason}");
                skipped.push(SkippedLength { length, reason });
                continue;
            }
            Err(payload) => {
                let reason = format!("the backend failed: {}", panic_message(payload.as_ref()));
                say_err!("length {length}: skipped: {reason}");
                skipped.push(SkippedLength { length, reason });
                continue;
            }
        };
        let n = windows.len();
        let result = LengthPerplexity {
            length,
            ppl_last: (sums.last / (n * last) as f64).exp(),
            ppl_all: (sums.all / (n * length) as f64).exp(),
            longppl: key_lists
                .as_ref()
                .map(|_| (sums.key / sums.key_count.max(1) as f64).exp())
                .filter(|_| sums.key_count > 0),
            key_tokens: key_lists.as_ref().map(|_| sums.key_count),
            windows: n,
            tokens: n * length,
            seconds: start.elapsed().as_secs_f64(),
            peak_rss_bytes: sysmem::peak_rss_bytes(),
        };
        let longppl = match (result.longppl, result.key_tokens) {
            (Some(p), Some(k)) => format!("  LongPPL {p:>9.3} ({k} key tokens)"),
            (None, Some(_)) => "  LongPPL – (no key token)".to_string(),
            _ => String::new(),
        };
        say!(
            "length {:>6}  ppl(last {last}) {:>10.3}  ppl(all) {:>10.3}  windows {:>5}  {:>7.1}s{longppl}",
            length, result.ppl_last, result.ppl_all, n, result.seconds
        );
        done.push(result);
    }
    Ok((done, skipped))
}

/// Evaluates the run in `run` on its test documents (read from `data`, or the corpus recorded
/// in its manifest) and writes `eval.json`, `eval.csv` and `ppl_by_length.svg` into it.
pub fn evaluate_run<B: Backend>(
    run: &Path,
    data: Option<&Path>,
    config: &LmEvalConfig,
    cache_dir: &Path,
    backend: &str,
    device: &B::Device,
) -> Result<LmEvalReport> {
    evaluate_run_with_keys::<B>(run, data, config, cache_dir, backend, None, device)
}

/// [`evaluate_run`], with LongPPL on the key tokens that `keys` names for each length.
pub fn evaluate_run_with_keys<B: Backend>(
    run: &Path,
    data: Option<&Path>,
    config: &LmEvalConfig,
    cache_dir: &Path,
    backend: &str,
    keys: Option<&mut KeyTokens<'_>>,
    device: &B::Device,
) -> Result<LmEvalReport> {
    let (train, manifest, model) = load::<B>(run, device)?;
    let corpus = Corpus::open(data.unwrap_or(&manifest.corpus))?;
    for doc in &manifest.test {
        let found = corpus.documents.iter().find(|d| d.name == doc.name);
        if found.is_none_or(|d| d.sha256 != doc.sha256) {
            return Err(Error::InvalidInput(format!(
                "test document {} of {} is missing or changed in {}",
                doc.name,
                run.join("manifest.json").display(),
                corpus.root.display()
            )));
        }
    }
    let tokens = TokenizedCorpus::load(&corpus, train.tokenizer, cache_dir)?;
    let docs = tokens.part(&manifest, Part::Test)?;
    let (lengths, skipped) = perplexity_with_keys(&model, &train, &docs, config, keys, device)?;
    let report = LmEvalReport {
        run: portable_path(run),
        encoding: train.encoding.label(),
        train_length: train.train_length,
        backend: backend.to_string(),
        tokenizer: train.tokenizer.name().to_string(),
        last: config.last,
        window_source: format!(
            "non-overlapping windows inside the {} test documents",
            docs.len()
        ),
        lengths,
        skipped,
    };
    write_report(run, &report)?;
    Ok(report)
}

/// Writes `eval.json`, `eval.csv` and `ppl_by_length.svg` into `dir`.
pub fn write_report(dir: &Path, report: &LmEvalReport) -> Result<()> {
    write_json_atomic(&dir.join("eval.json"), report)?;
    // LongPPL's two columns only when it was measured, so that plain evaluations keep the
    // format they always had.
    let longppl = report.lengths.iter().any(|l| l.key_tokens.is_some());
    let mut csv = String::from("length,ppl_last,ppl_all,windows,tokens,seconds,peak_rss_bytes");
    csv.push_str(if longppl {
        ",longppl,key_tokens\n"
    } else {
        "\n"
    });
    for l in &report.lengths {
        csv.push_str(&format!(
            "{},{:.6},{:.6},{},{},{:.3},{}",
            l.length,
            l.ppl_last,
            l.ppl_all,
            l.windows,
            l.tokens,
            l.seconds,
            l.peak_rss_bytes.map_or(String::new(), |b| b.to_string())
        ));
        if longppl {
            csv.push_str(&format!(
                ",{},{}",
                l.longppl.map_or(String::new(), |p| format!("{p:.6}")),
                l.key_tokens.map_or(String::new(), |k| k.to_string())
            ));
        }
        csv.push('\n');
    }
    write_atomic(&dir.join("eval.csv"), &csv)?;
    let points = |f: fn(&LengthPerplexity) -> f64| -> Vec<(f64, f64)> {
        report
            .lengths
            .iter()
            .map(|l| (l.length as f64, f(l)))
            .collect()
    };
    let mut series = vec![
        Series {
            name: format!("{}: last {} tokens", report.encoding, report.last),
            points: points(|l| l.ppl_last),
        },
        Series {
            name: format!("{}: all tokens", report.encoding),
            points: points(|l| l.ppl_all),
        },
    ];
    if longppl {
        series.push(Series {
            name: format!("{}: key tokens (LongPPL)", report.encoding),
            points: report
                .lengths
                .iter()
                .filter_map(|l| Some((l.length as f64, l.longppl?)))
                .collect(),
        });
    }
    plot_perplexity(&dir.join("ppl_by_length.svg"), report.train_length, &series)
}

/// Draws perplexity-by-length curves (log axes, the training length marked) into `path`.
pub fn plot_perplexity(path: &Path, train_length: usize, series: &[Series]) -> Result<()> {
    line_chart_svg(
        path,
        &Chart {
            title: "Perplexity by evaluation length",
            x_label: "evaluation length (tokens)",
            y_label: "perplexity",
            log2_x: true,
            marker: Some((train_length as f64, "training length")),
            log_y: true,
            y_range: None,
        },
        series,
    )
}

/// Reads a run's `eval.json`.
pub fn read_report(run: &Path) -> Result<LmEvalReport> {
    let path = run.join("eval.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::io(path.clone(), source))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::InvalidInput(format!(
            "{}: {e} (run `dape eval --run {}` first)",
            path.display(),
            run.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_windows_alternate_between_documents_and_respect_max() {
        let a: Vec<u16> = (0..25).collect();
        let b: Vec<u16> = (100..111).collect();
        let docs = [a.as_slice(), b.as_slice()];
        let w = document_windows(&docs, 10, 100);
        // a holds 2 windows of 10 (+1), b holds 1.
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].tokens[0], 0);
        assert_eq!(w[1].tokens[0], 100);
        assert_eq!(w[2].tokens[0], 10);
        assert_eq!(w[2].tokens.len(), 11);
        assert_eq!(document_windows(&docs, 10, 2).len(), 2);
        assert!(document_windows(&docs, 30, 10).is_empty());
    }
}

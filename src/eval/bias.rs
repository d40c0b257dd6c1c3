//! The learned positional bias of one query over its keys, per head: the DAPE paper's Figure 1
//! (its local and "anti-local" heads), for any trained LM or CHE run.
//!
//! The bias is what the encoding adds to one layer's attention logits on a real input
//! ([`crate::model::Transformer::positional_logits`]): `B + f([A ‖ B])` for DAPE, with `A` the
//! logits of that input, and `B` for a static bias. The input is the run's own data: the start
//! of the first test document long enough (LM runs), or a sample of the run's task (CHE runs,
//! seeded; the model reads the sample's input and its output placeholders).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::plot::{line_chart_svg, Chart, Series};
use crate::data::che::Task;
use crate::data::corpus::{Corpus, Part, TokenizedCorpus};
use crate::error::{Error, Result};
use crate::experiment::{che as che_run, lm as lm_run};
use crate::util::{portable_path, write_atomic};

/// What to draw.
#[derive(Clone, Debug)]
pub struct BiasRequest {
    /// The run folder (of `dape train` or `dape che train`).
    pub run: PathBuf,
    /// The query position `P`.
    pub position: usize,
    /// The block whose attention is read (0 = the first).
    pub layer: usize,
    /// The corpus folder of an LM run (default: the one its manifest records).
    pub data: Option<PathBuf>,
    /// The token cache of an LM run's corpus.
    pub cache_dir: PathBuf,
    /// Seed of the CHE sample.
    pub seed: u64,
}

/// The bias one query puts on the keys it sees, per head.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BiasReport {
    /// The run folder.
    pub run: String,
    /// Its encoding's name.
    pub encoding: String,
    /// The block read.
    pub layer: usize,
    /// The query position.
    pub position: usize,
    /// What the model read.
    pub input: String,
    /// Whether the query sees only earlier keys (LM) or every key (the CHE encoder).
    pub causal: bool,
    /// `bias[h][j]`: head `h`'s bias on key `j`, for the keys the query sees.
    pub bias: Vec<Vec<f32>>,
}

/// Computes the bias of `request` on the ndarray-like backend `B`.
pub fn learned_bias<B: Backend>(request: &BiasRequest, device: &B::Device) -> Result<BiasReport> {
    let config_path = request.run.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|source| Error::io(config_path.clone(), source))?;
    let config: serde_json::Value = serde_json::from_str(&text)?;
    let p = request.position;
    let (encoding, input, causal, logits) = if config.get("task").is_some() {
        let (train, model) = che_run::load::<B>(&request.run, device)?;
        let task: Task = train.task;
        // An input of P + 1 symbols, then its output placeholders: at least P + 1 positions.
        let sample = task
            .samples(p + 1, 1, request.seed)?
            .pop()
            .expect("one sample");
        let mut ids = sample.input.clone();
        ids.extend(std::iter::repeat_n(
            model.placeholder as i64,
            sample.target.len(),
        ));
        if ids.len() <= p {
            return Err(Error::invalid(
                "position",
                p,
                format!("the {task} sample holds {} positions", ids.len()),
            ));
        }
        let n = ids.len();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let input = format!(
            "a {task} sample (seed {}): {} input symbols and {} output placeholders",
            request.seed,
            sample.input.len(),
            sample.target.len()
        );
        let logits = model.transformer.positional_logits(tokens, request.layer)?;
        (train.encoding.name(), input, false, logits)
    } else {
        let (train, manifest, model) = lm_run::load::<B>(&request.run, device)?;
        let corpus = Corpus::open(request.data.as_deref().unwrap_or(&manifest.corpus))?;
        let tokens = TokenizedCorpus::load(&corpus, train.tokenizer, &request.cache_dir)?;
        let docs = tokens.part(&manifest, Part::Test)?;
        let (index, doc) = docs
            .iter()
            .enumerate()
            .find(|(_, d)| d.len() > p)
            .ok_or_else(|| {
                Error::invalid(
                    "position",
                    p,
                    format!(
                        "no test document of {} holds {} tokens",
                        request.run.display(),
                        p + 1
                    ),
                )
            })?;
        let ids: Vec<i64> = doc[..=p].iter().map(|&t| i64::from(t)).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, p + 1]), device);
        let input = format!(
            "the first {} tokens of test document {} of {}",
            p + 1,
            index,
            portable_path(&corpus.root)
        );
        let logits = model.transformer.positional_logits(tokens, request.layer)?;
        (train.encoding.name(), input, true, logits)
    };
    let [_, heads, _, keys] = logits.dims();
    let seen = if causal { p + 1 } else { keys };
    let row: Vec<f32> = logits
        .narrow(2, p, 1)
        .narrow(3, 0, seen)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::InvalidInput(format!("bias values: {e:?}")))?;
    let bias = row.chunks(seen).take(heads).map(<[f32]>::to_vec).collect();
    Ok(BiasReport {
        run: portable_path(&request.run),
        encoding,
        layer: request.layer,
        position: p,
        input,
        causal,
        bias,
    })
}

/// Writes the picture to `svg` (one line per head over the key positions) and the values next
/// to it (`.json`), both atomically.
pub fn write_bias(report: &BiasReport, svg: &Path) -> Result<()> {
    let series: Vec<Series> = report
        .bias
        .iter()
        .enumerate()
        .map(|(h, values)| Series {
            name: format!("head {h}"),
            points: values
                .iter()
                .enumerate()
                .map(|(j, &v)| (j as f64, f64::from(v)))
                .collect(),
        })
        .collect();
    let title = format!(
        "{}: learned bias of the query at {} (layer {})",
        report.encoding, report.position, report.layer
    );
    let partial = crate::util::partial_name(svg);
    line_chart_svg(
        &partial,
        &Chart {
            title: &title,
            x_label: "key position j",
            y_label: "bias added to the logit",
            log2_x: false,
            marker: Some((report.position as f64, "query position")),
            log_y: false,
            y_range: None,
        },
        &series,
    )?;
    std::fs::rename(&partial, svg).map_err(crate::util::io_error(svg))?;
    write_atomic(
        &svg.with_extension("json"),
        &serde_json::to_string_pretty(report)?,
    )
}

//! LongPPL (Fang et al., "What is Wrong with Perplexity for Long-context Language Modeling?",
//! ICLR 2025): perplexity on the *key tokens*, the ones whose prediction needs the long context.
//!
//! One fixed evaluator model scores every target `t` of an evaluation window twice: with the
//! whole window before it (`ℓ_full(t)`, the negative log-likelihood) and with only the last
//! `short` tokens (`ℓ_short(t)`). The long–short difference `LSD(t) = ℓ_short(t) − ℓ_full(t)`
//! says how much the far context helps, the long-context likelihood `LCL(t) = −ℓ_full(t)` that
//! the evaluator does predict the token. As in the paper (and its code, PKU-ML/LongPPL), `t` is
//! a key token when
//!
//! ```text
//! LSD(t) > α = 2   and   LCL(t) > β = −2
//! ```
//!
//! The paper's short context is 4,096 tokens for models of 32k and more; ours is 128, the
//! study's training length. Where the paper lets 1,024 consecutive targets share one short
//! context, every target here gets exactly its own last `short` tokens. Targets with no more
//! than `short` tokens before them have `LSD = 0` and are never key.
//!
//! The key tokens are found once per evaluator and length and stored as
//! `<dir>/key-tokens-<length>.json` with a digest of the windows they belong to, so that every
//! evaluated model is scored on the same tokens and a changed corpus or split is an error, not a
//! silent mismatch.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::lm::for_each_window_nll;
use crate::error::{ensure, Error, Result};
use crate::experiment::lm::{auto_chunk, LmTrainConfig, Window, EVAL_BATCH_TOKENS};
use crate::model::LanguageModel;
use crate::progress::ProgressBar;
use crate::util::{io_error, portable_path, say, write_atomic};

/// The paper's thresholds and our short context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LongPplConfig {
    /// Tokens of the short context.
    pub short: usize,
    /// Threshold on the long–short difference (nats).
    pub alpha: f64,
    /// Threshold on the long-context log-likelihood (nats).
    pub beta: f64,
}

impl Default for LongPplConfig {
    fn default() -> Self {
        Self {
            short: 128,
            alpha: 2.0,
            beta: -2.0,
        }
    }
}

/// The key tokens of one length, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyTokenFile {
    /// The evaluator run.
    pub evaluator: String,
    /// The evaluator's encoding.
    pub evaluator_encoding: String,
    /// The evaluation length.
    pub length: usize,
    /// Thresholds and short context.
    pub config: LongPplConfig,
    /// SHA-256 over the windows' tokens, in order.
    pub windows_sha256: String,
    /// Targets scored (windows × length).
    pub tokens: usize,
    /// Key tokens found.
    pub key_tokens: usize,
    /// Per window, its key targets.
    pub keys: Vec<Vec<u32>>,
}

/// SHA-256 over the windows' tokens (little-endian `u16`s), lowercase hex.
pub fn windows_sha256(windows: &[Window]) -> String {
    let mut hash = Sha256::new();
    for w in windows {
        for t in &w.tokens {
            hash.update(t.to_le_bytes());
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The key targets of each window, found with `evaluator`.
pub fn find_key_tokens<B: Backend>(
    evaluator: &LanguageModel<B>,
    train: &LmTrainConfig,
    windows: &[Window],
    config: &LongPplConfig,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    ensure(
        config.short > 0,
        "short",
        config.short,
        "must be at least 1",
    )?;
    let Some(first) = windows.first() else {
        return Ok(Vec::new());
    };
    let length = first.tokens.len() - 1;
    let randomized = train.encoding.randomized();
    // ℓ_full: one pass over the whole windows.
    let rows = (EVAL_BATCH_TOKENS / length).max(1);
    let full_model = evaluator
        .clone()
        .with_chunk_size(auto_chunk(rows.min(windows.len()), length));
    let mut full = vec![Vec::new(); windows.len()];
    let mut bar = ProgressBar::new(format!("key tokens {length}: long context"), windows.len());
    for_each_window_nll(
        &full_model,
        randomized,
        windows,
        rows,
        &mut bar,
        device,
        |i, row| {
            full[i] = row.to_vec();
        },
    )?;
    bar.finish();
    // ℓ_short: target t (t ≥ short) after its last `short` tokens alone, one short window
    // `tokens[t + 1 - short ..= t + 1]` per target.
    let short = config.short;
    let short_rows = (EVAL_BATCH_TOKENS / short).max(1);
    let per_window = length.saturating_sub(short);
    let mut bar = ProgressBar::new(
        format!("key tokens {length}: short context"),
        windows.len() * per_window,
    );
    let mut keys = Vec::with_capacity(windows.len());
    for (w, window) in windows.iter().enumerate() {
        let shorts: Vec<Window> = (short..length)
            .map(|t| Window {
                tokens: window.tokens[t + 1 - short..=t + 1].to_vec(),
                positions: None,
                mask: None,
            })
            .collect();
        let mut found = Vec::new();
        for_each_window_nll(
            evaluator,
            randomized,
            &shorts,
            short_rows,
            &mut bar,
            device,
            |k, row| {
                let t = short + k;
                let (l_short, l_full) = (f64::from(row[short - 1]), f64::from(full[w][t]));
                if l_short - l_full > config.alpha && -l_full > config.beta {
                    found.push(t as u32);
                }
            },
        )?;
        keys.push(found);
    }
    bar.finish();
    Ok(keys)
}

/// Where the key tokens of each length live, and the evaluator that finds missing ones.
pub struct KeyTokenStore<'a, B: Backend> {
    /// The folder of `key-tokens-<length>.json`.
    pub dir: PathBuf,
    /// The evaluator run, its config and model; `None`: every length must be stored already.
    pub evaluator: Option<(&'a Path, &'a LmTrainConfig, &'a LanguageModel<B>)>,
    /// Thresholds and short context.
    pub config: LongPplConfig,
    /// The device of the evaluator.
    pub device: B::Device,
}

impl<B: Backend> KeyTokenStore<'_, B> {
    fn path(&self, length: usize) -> PathBuf {
        self.dir.join(format!("key-tokens-{length}.json"))
    }

    /// The key targets of `windows` (all of one `length`): read from the store, or found with
    /// the evaluator and stored.
    pub fn keys(&mut self, length: usize, windows: &[Window]) -> Result<Vec<Vec<u32>>> {
        let path = self.path(length);
        let digest = windows_sha256(windows);
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
            let file: KeyTokenFile = serde_json::from_str(&text)?;
            if file.windows_sha256 != digest || file.config != self.config {
                return Err(Error::InvalidInput(format!(
                    "{} was made for other windows or other thresholds (another corpus, split, \
                     --max-tokens or --short?); remove it to find the key tokens again",
                    path.display()
                )));
            }
            return Ok(file.keys);
        }
        let Some((run, train, model)) = self.evaluator else {
            return Err(Error::InvalidInput(format!(
                "no key tokens for length {length} in {} (pass --evaluator RUN to find them)",
                self.dir.display()
            )));
        };
        say!(
            "finding the key tokens of length {length} with the evaluator {} ({})",
            run.display(),
            train.encoding.label()
        );
        let keys = find_key_tokens(model, train, windows, &self.config, &self.device)?;
        let file = KeyTokenFile {
            evaluator: portable_path(run),
            evaluator_encoding: train.encoding.label(),
            length,
            config: self.config.clone(),
            windows_sha256: digest,
            tokens: windows.len() * length,
            key_tokens: keys.iter().map(Vec::len).sum(),
            keys,
        };
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        write_atomic(&path, &serde_json::to_string(&file)?)?;
        say!(
            "length {length}: {} key tokens of {} ({:.2}%), stored in {}",
            file.key_tokens,
            file.tokens,
            100.0 * file.key_tokens as f64 / file.tokens.max(1) as f64,
            path.display()
        );
        Ok(file.keys)
    }
}

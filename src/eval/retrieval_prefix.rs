//! Items that begin with the same tokens read them once.
//!
//! Passkey items of one length and depth share every token up to the needle's digits: the
//! filler before the needle and "The pass key is ". An evaluation pass whose items share a long
//! prefix with the next pass's items runs the model over that prefix once and keeps its KV cache
//! ([`SharedPrefix`]). Each pass then reads only its items' remaining tokens, from a copy of the
//! cache ([`LanguageModel::forward_rows`], whose rows equal the full forward pass's: the
//! property the crate's cache tests hold every encoding to, and `tests` below holds this to).
//! In every pass the model's last block skips the attention and feed-forward network of the
//! rows before the first answer (their keys and values still reach its cache), a quarter of the
//! remaining work in a model of four blocks.
//!
//! With the needle at depth `d` of an item of length `L`, the remaining tokens are about
//! `(1 − d) L`, and their attention reads `(1 − d²)` of the pairs a whole pass reads: over the
//! standard depths 0, 0.1, …, 1 an item costs about two thirds of its whole pass, once the
//! attention dominates (at the long lengths, where the time goes). MQAR items share no prefix
//! and take the whole pass, as do items at randomized positions (each pass draws its own).

use burn::prelude::*;

use crate::data::retrieval::RetrievalItem;
use crate::error::{Error, Result};
use crate::model::{LanguageModel, LmCache};

/// A shared prefix is cached only when it holds at least `1 / MIN_SHARE` of the length: a
/// shorter one saves little, and below the lengths that need query chunks the whole pass takes
/// the packed kernel, which the cached pass cannot.
const MIN_SHARE: usize = 4;

/// The KV cache of a prefix that every row of a batch starts with.
pub(super) struct SharedPrefix<B: Backend> {
    /// The prefix's tokens.
    tokens: Vec<u16>,
    /// Rows of the batch the cache was built for.
    rows: usize,
    /// Every layer's keys and values (and the encodings' state) after the prefix.
    cache: LmCache<B>,
}

impl<B: Backend> SharedPrefix<B> {
    /// Whether this prefix serves a batch of `items` whose rows are read from `from` on: the
    /// same number of rows, each starting with the prefix, and no row that is read inside it.
    fn serves(&self, items: &[&RetrievalItem], from: usize) -> bool {
        self.rows == items.len()
            && self.tokens.len() <= from
            && items.iter().all(|i| i.tokens.starts_with(&self.tokens))
    }

    /// The number of cached tokens.
    pub(super) fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// The number of leading tokens that every item of `items` shares, at most `limit`.
fn common_prefix<'a>(items: impl IntoIterator<Item = &'a RetrievalItem>, limit: usize) -> usize {
    let mut items = items.into_iter();
    let Some(head) = items.next() else {
        return 0;
    };
    items.fold(limit.min(head.tokens.len()), |n, item| {
        head.tokens[..n]
            .iter()
            .zip(&item.tokens)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// Tokens `span` of every item, `[items, span.len()]`.
pub(super) fn token_rows<B: Backend>(
    items: &[&RetrievalItem],
    span: std::ops::Range<usize>,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = items
        .iter()
        .flat_map(|i| i.tokens[span.clone()].iter().map(|&t| i64::from(t)))
        .collect();
    Tensor::from_data(TensorData::new(ids, [items.len(), span.len()]), device)
}

/// The logits of rows `from ..` of a batch of `items` (all of one length), `[items, length −
/// from, vocab]`, read after `shared` where it serves them. `shared` is first extended to the
/// prefix the batch shares with the `next` pass's items (see [`extend_shared`]).
pub(super) fn tail_logits<B: Backend>(
    model: &LanguageModel<B>,
    items: &[&RetrievalItem],
    next: &[&RetrievalItem],
    from: usize,
    shared: &mut Option<SharedPrefix<B>>,
    device: &B::Device,
) -> Result<Tensor<B, 3>> {
    let length = items
        .first()
        .ok_or_else(|| Error::InvalidInput("no items to evaluate".into()))?
        .length();
    if from >= length {
        return Err(Error::invalid(
            "from",
            from,
            format!("the first row read must be below the length {length}"),
        ));
    }
    if !shared.as_ref().is_some_and(|s| s.serves(items, from)) {
        *shared = None;
    }
    extend_shared(model, items, next, from, shared, device)?;
    // The last block reads the rows before `from` only for their keys and values.
    match shared {
        Some(prefix) => {
            let mut cache = prefix.cache.clone();
            let start = prefix.len();
            let rest = token_rows(items, start..length, device);
            model.forward_rows(rest, Some(&mut cache), from - start)
        }
        None => model.forward_rows(token_rows(items, 0..length, device), None, from),
    }
}

/// Grows `shared` (which serves `items`, or is `None`) to the prefix that `items` share with
/// the `next` pass's items, up to row `from` (every row read stays after it), when that prefix
/// is longer and holds at least `1 / MIN_SHARE` of the length: only the new tokens are run,
/// through a copy of the cache. The last pass of a run has no `next` and grows nothing.
fn extend_shared<B: Backend>(
    model: &LanguageModel<B>,
    items: &[&RetrievalItem],
    next: &[&RetrievalItem],
    from: usize,
    shared: &mut Option<SharedPrefix<B>>,
    device: &B::Device,
) -> Result<()> {
    if next.is_empty() {
        return Ok(());
    }
    let length = items[0].length();
    let common = common_prefix(items.iter().chain(next).copied(), from);
    let have = shared.as_ref().map_or(0, SharedPrefix::len);
    if common <= have || common < (length / MIN_SHARE).max(1) {
        return Ok(());
    }
    let mut cache = match shared.as_ref() {
        Some(s) => s.cache.clone(),
        None => model.new_cache(),
    };
    model.forward_cached(token_rows(items, have..common, device), &mut cache)?;
    *shared = Some(SharedPrefix {
        tokens: items[0].tokens[..common].to_vec(),
        rows: items.len(),
        cache,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::data::retrieval::passkey;
    use crate::encoding::PositionalEncodingConfig;
    use crate::model::{LanguageModelConfig, TransformerConfig};
    use crate::util::Rng;

    type B = NdArray<f32>;

    /// Passkey items of `length`: `trials` at each of `depths`, in the evaluation's order.
    fn items(length: usize, depths: &[f64], trials: usize) -> Vec<RetrievalItem> {
        let mut rng = Rng::new(7);
        depths
            .iter()
            .flat_map(|&d| (0..trials).map(move |_| d))
            .map(|d| passkey::item(length, d, 5, &mut rng).unwrap().item)
            .collect()
    }

    fn model(transformer: TransformerConfig) -> LanguageModel<B> {
        LanguageModelConfig::new(256, transformer.with_chunk_size(Some(24)))
            .init::<B>(&Default::default())
            .unwrap()
    }

    fn transformer(encoding: &str) -> TransformerConfig {
        TransformerConfig::new(32, 2, 4)
            .with_encoding(PositionalEncodingConfig::from_name(encoding).unwrap())
    }

    /// Every pass, through the shared prefix or not, gives the whole forward pass's rows from
    /// `from` on (the last block skipping the rows before it), and the prefix is taken where it
    /// should be: from a depth's second item on, and not across depths.
    #[test]
    fn passes_through_a_shared_prefix_are_the_whole_pass() {
        // The models' weights come from the backend's shared random state, which the tests that
        // reseed it and draw twice hold this lock around.
        let _rng = crate::util::autodiff_test_lock();
        let device = Default::default();
        // The grid's rows that differ in what the cache carries: a bias table, DAPE's MLP
        // and its convolutions over the keys, an MLP bias by row position, FoX's gates, PaTH's
        // carried keys, stick-breaking, and a hybrid with QK-norm and temperature tuning.
        let mut configs: Vec<(String, TransformerConfig)> = [
            "kerple_log",
            "dape_kerple_log",
            "dapev2_kerple_log",
            "fire",
            "dape_fox",
            "path_fox",
        ]
        .iter()
        .map(|&e| (e.to_string(), transformer(e)))
        .collect();
        configs.push((
            "stick-breaking".into(),
            transformer("nope").with_stick_breaking(Some(Default::default())),
        ));
        let irope = crate::experiment::lm::LmTrainConfig::load(std::path::Path::new(
            "configs/lm/irope.json",
        ))
        .unwrap()
        .model()
        .transformer;
        configs.push((
            "irope".into(),
            TransformerConfig {
                d_model: 32,
                n_layers: 2,
                n_heads: 4,
                ..irope
            }
            .with_layer_encodings(Some(crate::schedule::LayerEncodings::every(
                2,
                PositionalEncodingConfig::Nope,
            ))),
        ));
        let items = items(136, &[0.0, 0.5, 1.0], 3);
        for (name, config) in configs {
            let model = model(config);
            let mut shared = None;
            // One item a pass (every pass at 0.5 and 1 reads through the prefix), then two.
            for (rows, at_least) in [(1, 6), (2, 1)] {
                let batches: Vec<Vec<&RetrievalItem>> =
                    items.chunks(rows).map(|c| c.iter().collect()).collect();
                let mut cached = Vec::new();
                for (i, batch) in batches.iter().enumerate() {
                    let next = batches.get(i + 1).map_or(&[][..], Vec::as_slice);
                    let from = batch.iter().map(|i| i.answer_targets[0]).min().unwrap();
                    let got = tail_logits(&model, batch, next, from, &mut shared, &device).unwrap();
                    let length = batch[0].length();
                    let whole = model
                        .forward(token_rows(batch, 0..length, &device))
                        .unwrap()
                        .slice([0..batch.len(), from..length, 0..256]);
                    let diff = (got - whole).abs().max().into_scalar();
                    assert!(diff < 1e-4, "{name}, batch {rows}, pass {i}: {diff}");
                    cached.push(shared.as_ref().map_or(0, SharedPrefix::len));
                }
                // Depth 0: the needle is at the start, nothing long is shared.
                let through = cached.iter().filter(|&&n| n >= 34).count();
                assert!(through >= at_least, "{name}, batch {rows}: {cached:?}");
                assert_eq!(cached[0], 0, "{name}: {cached:?}");
            }
        }
    }

    #[test]
    fn the_common_prefix_stops_at_the_first_difference_and_the_limit() {
        let items = items(256, &[0.5], 2);
        let n = common_prefix(&items, 256);
        assert!(n > 64 && n < 256, "{n}");
        assert_ne!(items[0].tokens[n], items[1].tokens[n]);
        assert_eq!(common_prefix(&items, 10), 10);
        assert_eq!(common_prefix(&items[..1], 300), 257);
    }
}

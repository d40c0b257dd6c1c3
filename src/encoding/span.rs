//! [`Span`]: which absolute positions a block of attention logits covers (query rows, key
//! columns, causality, randomized positions), and the position tables every relative encoding
//! reads from it (`[queries, keys]` offsets, distances, the future mask), cached per span.

use burn::prelude::*;

use super::{cache, Positions};

/// Which absolute positions a block of attention logits covers.
///
/// Rows are the queries of tokens `query_start .. query_start + query_len`; columns are the keys
/// of tokens `0 .. key_len`. A full forward has `query_start = 0` and `key_len = query_len`; a
/// KV-cache decode step has `query_len = 1` and `key_len = query_start + 1`; a causal query
/// chunk stops its keys after its last row. Token `t` sits at position `t`, or at
/// `positions[t]` with [randomized positions](super::positions) (then every offset, distance and
/// rotary angle is taken between those positions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Index of the token of the first query row.
    pub query_start: usize,
    /// Number of query rows.
    pub query_len: usize,
    /// Number of key columns (the keys of tokens `0..key_len`).
    pub key_len: usize,
    /// Whether attention is causal (keys after a row's own token are masked).
    pub causal: bool,
    /// The position of every token, at least `query_start + query_len` and `key_len` of them;
    /// `None`: token `t` is at position `t`.
    pub positions: Option<Positions>,
}

impl Span {
    /// The span of a full causal forward over `len` tokens.
    pub fn full(len: usize) -> Self {
        Self {
            query_start: 0,
            query_len: len,
            key_len: len,
            causal: true,
            positions: None,
        }
    }

    /// The same span with the tokens at `positions` (`None`: at their indices).
    pub fn with_positions(mut self, positions: Option<Positions>) -> Self {
        self.positions = positions;
        self
    }

    /// The position of token `t`.
    ///
    /// # Panics
    ///
    /// If the span's positions have no entry `t` (the attention layer checks their length).
    pub fn position(&self, t: usize) -> i64 {
        self.positions
            .as_ref()
            .map_or(t as i64, |p| p.as_slice()[t])
    }

    /// The positions of the query rows.
    pub fn query_position_values(&self) -> Vec<i64> {
        (self.query_start..self.query_start + self.query_len)
            .map(|t| self.position(t))
            .collect()
    }

    /// The positions of the key columns.
    pub fn key_position_values(&self) -> Vec<i64> {
        (0..self.key_len).map(|t| self.position(t)).collect()
    }

    /// The smallest and largest offset `i - j` between a row's and a column's position in this
    /// block (future columns included); `(0, 0)` for a block without rows or columns.
    pub fn offset_range(&self) -> (i64, i64) {
        if self.query_len == 0 || self.key_len == 0 {
            return (0, 0);
        }
        let last_row = self.query_start + self.query_len - 1;
        (
            self.position(self.query_start) - self.position(self.key_len - 1),
            self.position(last_row) - self.position(0),
        )
    }

    /// Query positions `i` broadcast over keys: `[queries, keys]`.
    pub fn query_positions<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let rows = self.query_position_values();
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [self.query_len]), device)
            .reshape([self.query_len, 1])
            .expand([self.query_len, self.key_len])
    }

    /// Key positions `j` broadcast over queries: `[queries, keys]`.
    pub fn key_positions<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let cols = self.key_position_values();
        Tensor::<B, 1, Int>::from_data(TensorData::new(cols, [self.key_len]), device)
            .reshape([1, self.key_len])
            .expand([self.query_len, self.key_len])
    }

    /// A name for this span in table-cache keys.
    pub(crate) fn cache_key(&self) -> String {
        format!(
            "{}+{}x{}{}{}",
            self.query_start,
            self.query_len,
            self.key_len,
            if self.causal { "c" } else { "" },
            self.positions
                .as_ref()
                .map_or(String::new(), |p| format!(" at {:x}", p.fingerprint()))
        )
    }

    /// Relative offsets `i - j` as integers: `[queries, keys]`. Cached per span.
    pub fn offsets<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        cache::cached::<B, _>(
            device,
            || format!("offsets {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.query_positions::<B>(device) - self.key_positions::<B>(device),
        )
    }

    /// Signed distance `i - j` as floats: `[queries, keys]`. Cached per span.
    pub fn signed_distance<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        cache::cached::<B, _>(
            device,
            || format!("signed_distance {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.offsets::<B>(device).float(),
        )
    }

    /// Distance `|i - j|` as floats: `[queries, keys]`. Finite everywhere, also at future keys.
    /// Cached per span.
    pub fn distance<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        cache::cached::<B, _>(
            device,
            || format!("distance {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.signed_distance::<B>(device).abs(),
        )
    }

    /// `true` where the key lies in the future of the query (`j > i`): `[queries, keys]`.
    /// Cached per span. Positions increase with the token index, so this is the same mask with
    /// randomized positions.
    pub fn future_mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Bool> {
        cache::cached::<B, _>(
            device,
            || format!("future_mask {}", self.cache_key()),
            self.query_len * self.key_len,
            || self.offsets::<B>(device).lower_elem(0),
        )
    }

    /// How many keys row `row` of this block sees: up to its own position under the causal
    /// mask, all of them otherwise.
    pub fn visible_keys(&self, row: usize) -> usize {
        if self.causal {
            (self.query_start + row + 1).min(self.key_len)
        } else {
            self.key_len
        }
    }

    /// Whether any entry of this block lies in the future (and needs masking).
    pub fn has_future(&self) -> bool {
        self.causal && self.query_start + 1 < self.key_len
    }
}

//! The KV cache of one attention layer: keys and values of the positions seen so far, and
//! what the encodings carry beside them (BiPE's segment indices, FoX's cumulative gates, PaTH's
//! convolution inputs; PaTH's keys are stored carried through the cached tokens' transforms).

use burn::prelude::*;

use crate::encoding::SegmentState;

/// Keys and values of the positions seen so far, for incremental decoding. Keys are stored
/// before the rotary hook, so that rotary encodings whose frequencies depend on the length
/// (dynamic NTK) stay exact. For BiPE it also holds the keys' segment indices and the segment
/// state the next token continues from.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    pub(super) keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    key_segments: Option<Tensor<B, 2, Int>>,
    segment_state: Option<SegmentState>,
    /// Forgetting attention: the keys' cumulative log forget gates `[batch, heads, keys]`.
    forget_sums: Option<Tensor<B, 3>>,
    /// PaTH: the convolution's input of the last tokens `[batch, taps − 1, d_model]` (the keys
    /// are then stored carried through every cached token's transform).
    conv_tail: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self {
            keys: None,
            values: None,
            key_segments: None,
            segment_state: None,
            forget_sums: None,
            conv_tail: None,
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the next token's segment starts (BiPE); `None` before any BiPE forward.
    pub fn segment_state(&self) -> Option<&SegmentState> {
        self.segment_state.as_ref()
    }

    /// Records the segment state after the tokens just appended (set by the model).
    pub fn set_segment_state(&mut self, state: SegmentState) {
        self.segment_state = Some(state);
    }

    /// Appends the segment indices `[batch, new]` of new keys; returns those of all keys.
    pub(super) fn append_segments(&mut self, s: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        let s = match self.key_segments.take() {
            Some(old) => Tensor::cat(vec![old, s], 1),
            None => s,
        };
        self.key_segments = Some(s.clone());
        s
    }

    /// The last cached key's cumulative log forget gate `[batch, heads, 1]` (forgetting
    /// attention), which the next tokens' sums continue.
    pub(super) fn last_forget_sum(&self) -> Option<Tensor<B, 3>> {
        self.forget_sums.as_ref().map(|c| {
            let len = c.dims()[2];
            c.clone().narrow(2, len - 1, 1)
        })
    }

    /// Appends the cumulative log forget gates `[batch, heads, new]` of new keys; returns
    /// those of all keys.
    pub(super) fn append_forget_sums(&mut self, c: Tensor<B, 3>) -> Tensor<B, 3> {
        let c = match self.forget_sums.take() {
            Some(old) => Tensor::cat(vec![old, c], 2),
            None => c,
        };
        self.forget_sums = Some(c.clone());
        c
    }

    /// PaTH: the cached keys, carried to the last cached token `[batch, heads, keys, d_head]`,
    /// and the convolution's last inputs.
    pub(super) fn householder_state(&self) -> (Option<Tensor<B, 4>>, Option<Tensor<B, 3>>) {
        (self.keys.clone(), self.conv_tail.clone())
    }

    /// PaTH: replaces the keys by `keys` (all of them, carried to the newest token), appends
    /// the new `values`, and keeps the convolution's last inputs; returns all values.
    pub(super) fn store_householder(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        conv_tail: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 4> {
        let v = match self.values.take() {
            Some(old) => Tensor::cat(vec![old, values], 2),
            None => values,
        };
        self.keys = Some(keys);
        self.values = Some(v.clone());
        self.conv_tail = conv_tail;
        v
    }

    pub(super) fn append(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = match self.keys.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        };
        let v = match self.values.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        };
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        (k, v)
    }
}

//! Which path the attention layer took: counters of the attention computations (one per chunk
//! of query rows) that ran as one fused node, whose `[batch, heads, rows, keys]` logits are
//! never kept, and of those that took the tensor path, where the logits and probabilities are
//! tensors of their own (an encoding that reads or rewrites the logits, such as DAPE V2, PaTH,
//! CoPE or Shaw's; an option without a fused form, such as a sliding window; a backend without
//! the kernels). `dape bench` reports them as its `attention_path`.
//! Tests can turn the fused nodes off on their thread (`on_tensor_path`), so that the
//! layer's tensor path is the reference for its fused path on the same backend.

use std::sync::atomic::{AtomicU64, Ordering};

static FUSED: AtomicU64 = AtomicU64::new(0);
static TENSOR: AtomicU64 = AtomicU64::new(0);

/// Counts of attention computations since the start of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AttentionPathCounts {
    /// Computed by a fused node.
    pub fused: u64,
    /// Computed on the tensor path.
    pub tensor: u64,
}

impl AttentionPathCounts {
    /// The counts since `before`.
    pub fn since(&self, before: &AttentionPathCounts) -> AttentionPathCounts {
        AttentionPathCounts {
            fused: self.fused.saturating_sub(before.fused),
            tensor: self.tensor.saturating_sub(before.tensor),
        }
    }

    /// `"fused"` or `"tensor"` when every computation took that path, `"mixed"` when both
    /// occurred, `None` when none did.
    pub fn name(&self) -> Option<&'static str> {
        match (self.fused > 0, self.tensor > 0) {
            (true, false) => Some("fused"),
            (false, true) => Some("tensor"),
            (true, true) => Some("mixed"),
            (false, false) => None,
        }
    }
}

/// The counters now.
pub fn attention_path_counts() -> AttentionPathCounts {
    AttentionPathCounts {
        fused: FUSED.load(Ordering::Relaxed),
        tensor: TENSOR.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
thread_local! {
    static TENSOR_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the layer may take a fused node on this thread: always, except inside
/// `on_tensor_path` in tests.
pub(super) fn fused_allowed() -> bool {
    #[cfg(test)]
    return !TENSOR_ONLY.with(std::cell::Cell::get);
    #[cfg(not(test))]
    true
}

/// Runs `f` with every attention computation on this thread on the tensor path (tests only).
#[cfg(test)]
pub(super) fn on_tensor_path<T>(f: impl FnOnce() -> T) -> T {
    TENSOR_ONLY.with(|t| t.set(true));
    let out = f();
    TENSOR_ONLY.with(|t| t.set(false));
    out
}

/// Counts one attention computation on the fused path (`true`) or the tensor path.
pub(super) fn record(fused: bool) {
    let counter = if fused { &FUSED } else { &TENSOR };
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_which_paths_ran() {
        let none = AttentionPathCounts::default();
        let fused = AttentionPathCounts {
            fused: 3,
            tensor: 0,
        };
        let both = AttentionPathCounts {
            fused: 3,
            tensor: 1,
        };
        assert_eq!(none.name(), None);
        assert_eq!(fused.name(), Some("fused"));
        assert_eq!(both.since(&fused).name(), Some("tensor"));
        assert_eq!(both.name(), Some("mixed"));
    }
}

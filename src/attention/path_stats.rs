//! Which path the attention layer took: counters of the attention computations (one per chunk
//! of query rows) that ran as one fused node, whose `[batch, heads, rows, keys]` logits are
//! never kept, and of those that took the tensor path, where the logits and probabilities are
//! tensors of their own (an encoding that reads or rewrites the logits, such as DAPE, PaTH,
//! CoPE or Shaw's; an option without a fused form, such as Scalable-Softmax or a sliding
//! window; a backend without the kernels). `dape bench` reports them as its `attention_path`.

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

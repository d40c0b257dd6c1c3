//! Training with burn-train's Learner: the CHE task trainer, its metrics and a compact
//! line renderer for non-interactive runs.

pub mod che;
pub mod checkpoint;
pub mod failure;
pub mod lm;
pub mod metric_log;
pub mod metrics;
pub mod renderer;
pub mod windows;

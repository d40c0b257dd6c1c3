//! Training with burn-train's Learner: the CHE task trainer, its metrics and a compact
//! line renderer for non-interactive runs.

pub mod che;
pub mod checkpoint;
pub mod lm;
pub mod metrics;
pub mod renderer;
pub mod windows;

//! Length-extrapolation evaluation: LM perplexity by length, CHE accuracy by length, tables
//! and plots, and the learned bias of one query (`bias`).

pub mod bias;
pub mod che;
pub mod heatmap;
pub mod lm;
pub mod longppl;
pub mod plot;
pub mod retrieval;
mod retrieval_prefix;
pub mod retrieval_resume;

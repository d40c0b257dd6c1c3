//! Length-extrapolation evaluation: LM perplexity by length, CHE accuracy by length, tables
//! and plots.

pub mod che;
pub mod lm;
pub mod plot;

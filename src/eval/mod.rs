//! Length-extrapolation evaluation: CHE accuracy by length, tables and plots.

pub mod che;
pub mod plot;

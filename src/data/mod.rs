//! Data: the CHE (Chomsky hierarchy) task generators.

pub mod che;

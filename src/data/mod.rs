//! Data: real-text corpora (split, tokenized, cached) and the CHE (Chomsky hierarchy) task
//! generators.

pub mod che;
pub mod corpus;

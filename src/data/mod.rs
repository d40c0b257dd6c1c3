//! Data: real-text corpora (split, tokenized, cached), the CHE (Chomsky hierarchy) task
//! generators and the retrieval tasks (MQAR, passkey).

pub mod che;
pub mod corpus;
pub mod retrieval;

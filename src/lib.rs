//! # dape
//!
//! The positional encodings behind Transformer length extrapolation as Burn modules, generic
//! over `B: Backend`: DAPE (Data-Adaptive Positional Encoding, NeurIPS 2024) and the baselines it
//! is measured against — NoPE, sinusoidal, learned, RoPE with its scaling methods (linear, NTK,
//! dynamic NTK, YaRN), xPos, T5, ALiBi, Kerple, FIRE, Shaw, CoPE, Sandwich, Transformer-XL,
//! BiPE (bilevel: in-segment positions plus ALiBi or RoPE over segments) and DAPE V2.
//!
//! * [`encoding`]: one config enum ([`PositionalEncodingConfig`]) names and builds any encoding;
//!   one module enum ([`PositionalEncoding`]) holds it.
//! * [`attention`]: causal (or bidirectional) multi-head self-attention with the positional
//!   hook, an exact KV cache for every encoding, and an exact query-chunked path whose memory
//!   is bounded by the chunk size.
//! * [`model`]: a decoder-only language model and the bidirectional sequence model of the CHE
//!   tasks, built from the same blocks.
//!
//! ## Use in your Burn model
//!
//! Put DAPE-Kerple attention into your own module:
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::prelude::*;
//! use dape::{AttentionConfig, MultiHeadAttention, PositionalEncodingConfig};
//!
//! #[derive(Module, Debug)]
//! struct MyBlock<B: Backend> {
//!     attention: MultiHeadAttention<B>,
//!     proj: burn::nn::Linear<B>,
//! }
//!
//! impl<B: Backend> MyBlock<B> {
//!     fn new(device: &B::Device) -> dape::Result<Self> {
//!         let encoding = PositionalEncodingConfig::from_name("dape_kerple_log")?;
//!         let attention = AttentionConfig::new(64, 4) // d_model 64, 4 heads
//!             .with_encoding(encoding)
//!             .init(device)?;
//!         Ok(Self { attention, proj: burn::nn::LinearConfig::new(64, 64).init(device) })
//!     }
//!
//!     fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
//!         x.clone() + self.proj.forward(self.attention.forward(x))
//!     }
//! }
//!
//! let device = Default::default();
//! let block = MyBlock::<NdArray>::new(&device).unwrap();
//! let x = Tensor::<NdArray, 3>::random([2, 10, 64], burn::tensor::Distribution::Default, &device);
//! assert_eq!(block.forward(x).dims(), [2, 10, 64]);
//! ```
//!
//! Decode incrementally with a [`KvCache`] ([`MultiHeadAttention::forward_cached`]), or set
//! `chunk_size` to evaluate long sequences in bounded memory; both give the full forward's
//! result.

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The library a Burn model author depends on (`default-features = false`): bottom to top.
pub mod attention;
pub mod disk;
pub mod encoding;
pub mod error;
pub mod kernel;
pub mod model;
pub mod norm;
pub mod optim;
pub mod schedule;
pub mod util;

// The harness (feature `harness`, on by default): data, training, evaluation and the tools the
// `dape` binary is made of. Layers only point down: data → experiment → {train, eval} →
// {suite, results, bench, compare, consistency} → the CLI (src/cli/).
#[cfg(feature = "harness")]
pub mod backend;
#[cfg(feature = "harness")]
pub mod bench;
#[cfg(feature = "harness")]
pub mod compare;
#[cfg(feature = "harness")]
pub mod consistency;
#[cfg(feature = "harness")]
pub mod data;
#[cfg(feature = "harness")]
pub mod eval;
#[cfg(feature = "harness")]
pub mod experiment;
#[cfg(feature = "harness")]
pub mod progress;
#[cfg(feature = "harness")]
pub mod results;
#[cfg(feature = "harness")]
pub mod retrieval_suite;
#[cfg(feature = "harness")]
pub mod suite;
#[cfg(feature = "harness")]
pub mod sysmem;
#[cfg(feature = "harness")]
pub mod train;

pub use attention::{
    AttentionConfig, KvCache, MultiHeadAttention, QkNormConfig, SsmaxConfig, StickBreakingConfig,
    TemperatureConfig,
};
pub use encoding::{PositionalEncoding, PositionalEncodingConfig, Span, ENCODING_NAMES};
pub use error::{Error, Result};
pub use model::{
    LanguageModel, LanguageModelConfig, LmCache, SequenceModel, SequenceModelConfig, StackOptions,
    TransformerConfig,
};
pub use schedule::LayerEncodings;

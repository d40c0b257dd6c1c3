//! Put DAPE-Kerple attention into your own Burn model, run it, then decode token by token with
//! the KV cache and check that the result equals the full forward.
//!
//! `cargo run --release --example dape_attention`

use burn::backend::NdArray;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use dape::{AttentionConfig, KvCache, MultiHeadAttention, PositionalEncodingConfig};

type B = NdArray<f32>;

/// A user's own block: pre-norm attention with a residual connection.
#[derive(Module, Debug)]
struct MyBlock<B: Backend> {
    norm: LayerNorm<B>,
    attention: MultiHeadAttention<B>,
}

impl<B: Backend> MyBlock<B> {
    fn new(d_model: usize, heads: usize, device: &B::Device) -> dape::Result<Self> {
        let encoding = PositionalEncodingConfig::from_json(
            r#"{"type": "dape_kerple_log", "dape": {"mlp_width": 32}}"#,
        )?;
        Ok(Self {
            norm: LayerNormConfig::new(d_model).init(device),
            attention: AttentionConfig::new(d_model, heads)
                .with_encoding(encoding)
                .init(device)?,
        })
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x.clone() + self.attention.forward(self.norm.forward(x))
    }

    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> dape::Result<Tensor<B, 3>> {
        Ok(x.clone() + self.attention.forward_cached(self.norm.forward(x), cache)?)
    }
}

fn main() -> dape::Result<()> {
    // On ndarray, run the model on a worker of the kernels' thread pool: each parallel op then
    // forks from this thread instead of waking the pool and waiting (a no-op with one core).
    dape::kernel::join_compute_pool();
    let device = Default::default();
    let block = MyBlock::<B>::new(64, 8, &device)?;
    println!("{block}");

    let x = Tensor::<B, 3>::random([1, 24, 64], Distribution::Normal(0.0, 1.0), &device);
    let full = block.forward(x.clone());

    let mut cache = KvCache::new();
    let mut rows = vec![block.forward_cached(x.clone().narrow(1, 0, 16), &mut cache)?];
    for t in 16..24 {
        rows.push(block.forward_cached(x.clone().narrow(1, t, 1), &mut cache)?);
    }
    let decoded = Tensor::cat(rows, 1);
    let diff = (decoded - full).abs().max().into_scalar();
    println!("KV-cache decode vs full forward: max |difference| = {diff:e}");
    Ok(())
}

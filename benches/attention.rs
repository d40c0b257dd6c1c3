//! Attention forward and forward+backward per encoding and length, on ndarray.
//!
//! `cargo bench --bench attention` (criterion; add `-- dape_kerple` to filter).

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dape::{AttentionConfig, PositionalEncodingConfig};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

const ENCODINGS: &[&str] = &[
    "nope",
    "rope",
    "alibi",
    "kerple_log",
    "fire",
    "t5",
    "cope",
    "dape_kerple_log",
    "dapev2_kerple_log",
];

fn bench_attention(c: &mut Criterion) {
    let device = Default::default();
    let mut group = c.benchmark_group("attention_forward");
    group.sample_size(10);
    for &length in &[128usize, 512] {
        for name in ENCODINGS {
            let encoding = PositionalEncodingConfig::from_name(name).unwrap();
            let attention = AttentionConfig::new(256, 8)
                .with_encoding(encoding)
                .init::<B>(&device)
                .unwrap();
            let x = Tensor::<B, 3>::random([1, length, 256], Distribution::Default, &device);
            group.bench_with_input(BenchmarkId::new(*name, length), &length, |b, _| {
                b.iter(|| attention.forward(x.clone()).into_data())
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("attention_forward_backward");
    group.sample_size(10);
    for name in ENCODINGS {
        let length = 128;
        let encoding = PositionalEncodingConfig::from_name(name).unwrap();
        let attention = AttentionConfig::new(256, 8)
            .with_encoding(encoding)
            .init::<AD>(&device)
            .unwrap();
        let x = Tensor::<AD, 3>::random([1, length, 256], Distribution::Default, &device);
        group.bench_with_input(BenchmarkId::new(*name, length), &length, |b, _| {
            b.iter(|| attention.forward(x.clone()).sum().backward())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);

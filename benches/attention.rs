//! Attention forward, and forward+backward, per encoding at lengths 128, 512 and 2048: on
//! ndarray, and on WGPU / LibTorch CPU when those features are on.
//!
//! `cargo bench --bench attention` (criterion; filter with e.g. `-- dape_kerple`;
//! `DAPE_BENCH_LENGTHS=128,512` to shorten). `cargo bench --features wgpu,tch --bench attention`
//! adds the other backends (each group is named after its backend).
//!
//! The `table_cache` group shows what caching the data-independent tables saves: the same
//! forward with the cache warm (tables built once per length and shared by layers and steps, as
//! in training) and cold (the cache cleared before every call, so every table is rebuilt).

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dape::{AttentionConfig, PositionalEncodingConfig};

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

fn lengths() -> Vec<usize> {
    std::env::var("DAPE_BENCH_LENGTHS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![128, 512, 2048])
}

/// Sequences of `length` tokens; long ones go through 256-row query chunks, as evaluation does.
fn attention<B: Backend>(
    name: &str,
    length: usize,
    device: &B::Device,
) -> dape::MultiHeadAttention<B> {
    AttentionConfig::new(256, 8)
        .with_encoding(PositionalEncodingConfig::from_name(name).unwrap())
        .with_chunk_size((length > 512).then_some(256))
        .init::<B>(device)
        .unwrap()
}

fn bench_backend<B: AutodiffBackend>(c: &mut Criterion, backend: &str, device: B::Device) {
    let mut group = c.benchmark_group(format!("{backend}/attention_forward"));
    group.sample_size(10);
    for length in lengths() {
        for name in ENCODINGS {
            let layer = attention::<B::InnerBackend>(name, length, &device);
            let x = Tensor::random([1, length, 256], Distribution::Default, &device);
            group.bench_with_input(BenchmarkId::new(*name, length), &length, |b, _| {
                b.iter(|| layer.forward(x.clone()).into_data())
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{backend}/attention_forward_backward"));
    group.sample_size(10);
    for length in lengths() {
        for name in ENCODINGS {
            let layer = attention::<B>(name, length, &device);
            let x = Tensor::<B, 3>::random([1, length, 256], Distribution::Default, &device);
            group.bench_with_input(BenchmarkId::new(*name, length), &length, |b, _| {
                b.iter(|| {
                    let grads = layer.forward(x.clone()).sum().backward();
                    drop(grads);
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{backend}/table_cache"));
    group.sample_size(10);
    for name in ["rope", "t5", "alibi", "dape_kerple_log"] {
        let length = 512;
        let layer = attention::<B::InnerBackend>(name, length, &device);
        let x = Tensor::random([1, length, 256], Distribution::Default, &device);
        group.bench_with_input(
            BenchmarkId::new(format!("{name}/warm"), length),
            &length,
            |b, _| b.iter(|| layer.forward(x.clone()).into_data()),
        );
        group.bench_with_input(
            BenchmarkId::new(format!("{name}/cold"), length),
            &length,
            |b, _| {
                b.iter(|| {
                    dape::encoding::clear_table_cache();
                    layer.forward(x.clone()).into_data()
                })
            },
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    use burn::backend::{Autodiff, NdArray};
    bench_backend::<Autodiff<NdArray<f32>>>(c, "ndarray", Default::default());
    #[cfg(feature = "wgpu")]
    bench_backend::<Autodiff<burn::backend::Wgpu>>(c, "wgpu", Default::default());
    #[cfg(feature = "tch")]
    bench_backend::<Autodiff<burn::backend::LibTorch<f32>>>(
        c,
        "tch-cpu",
        burn::backend::libtorch::LibTorchDevice::Cpu,
    );
}

criterion_group!(attention_benches, benches);
criterion_main!(attention_benches);

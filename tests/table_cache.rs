//! The cache of data-independent tables (distances, masks, T5 buckets, RoPE cos/sin, Sandwich):
//! a second forward at the same length builds no table at all (they are shared across layers
//! and steps), a new length builds new ones, cached values equal the formulas, and outputs do
//! not change when served from the cache. One test function: the counters are process-wide.

use burn::backend::NdArray;
use burn::prelude::*;

use dape::encoding::cache::MAX_TABLE_ELEMENTS;
use dape::encoding::{clear_table_cache, table_cache_stats, Span};
use dape::{LanguageModel, LanguageModelConfig, PositionalEncodingConfig, TransformerConfig};

type B = NdArray<f32>;

fn model(name: &str) -> LanguageModel<B> {
    let encoding = PositionalEncodingConfig::from_name(name).expect("known encoding");
    LanguageModelConfig::new(11, TransformerConfig::new(16, 3, 4).with_encoding(encoding))
        .init::<B>(&Default::default())
        .expect("valid config")
}

fn tokens(len: usize) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = (0..len as i64).map(|i| (i * 7 + 3) % 11).collect();
    Tensor::from_data(TensorData::new(ids, [1, len]), &Default::default())
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

#[test]
fn tables_are_built_once_per_length_and_shared_by_layers_and_steps() {
    let device = Default::default();

    // Cached values equal the formulas, for a chunk-like span (rows 5..8, keys 0..8).
    clear_table_cache();
    let span = Span {
        query_start: 5,
        query_len: 3,
        key_len: 8,
        causal: true,
        positions: None,
    };
    for _ in 0..2 {
        let d: Vec<f32> = span
            .signed_distance::<B>(&device)
            .into_data()
            .to_vec()
            .unwrap();
        let a: Vec<f32> = span.distance::<B>(&device).into_data().to_vec().unwrap();
        let m: Vec<bool> = span.future_mask::<B>(&device).into_data().to_vec().unwrap();
        for (n, ((d, a), m)) in d.iter().zip(&a).zip(&m).enumerate() {
            let (i, j) = (5 + n / 8, n % 8);
            assert_eq!(*d, i as f32 - j as f32, "signed distance at ({i}, {j})");
            assert_eq!(*a, (i as f32 - j as f32).abs(), "distance at ({i}, {j})");
            assert_eq!(*m, j > i, "future mask at ({i}, {j})");
        }
    }
    let stats = table_cache_stats();
    assert!(stats.hits >= 3, "second lookups must hit: {stats:?}");

    for name in [
        "t5",
        "rope",
        "rope_yarn",
        "xpos",
        "sandwich",
        "shaw",
        "transformer_xl",
    ] {
        clear_table_cache();
        let model = model(name);
        let first = values(model.forward(tokens(24)).expect("forward"));
        let warm = table_cache_stats();
        assert!(
            warm.builds > 0,
            "{name}: the first forward builds its tables"
        );
        let second = values(model.forward(tokens(24)).expect("forward"));
        let again = table_cache_stats();
        assert_eq!(
            again.builds, warm.builds,
            "{name}: a second forward at the same length must build no table"
        );
        assert!(
            again.hits > warm.hits,
            "{name}: the second forward reads the cache"
        );
        assert_eq!(
            first, second,
            "{name}: cached tables must give the same outputs"
        );
        // Three layers, one build per table: the layers after the first hit the cache.
        assert!(
            warm.hits > 0,
            "{name}: layers 2 and 3 reuse layer 1's tables"
        );
        let _ = model.forward(tokens(25)).expect("forward");
        assert!(
            table_cache_stats().builds > again.builds,
            "{name}: a new length builds new tables"
        );
    }

    // ALiBi and Kerple (also as DAPE's base, whose kernels mask by index) look their
    // bias up from one value per distance, computed per forward from the (possibly learned)
    // parameters: no span-sized table is built or kept, and the outputs stay the same from call
    // to call.
    for name in [
        "alibi",
        "kerple_log",
        "dape_kerple_log",
        "dapev2_kerple_log",
    ] {
        clear_table_cache();
        let model = model(name);
        let first = values(model.forward(tokens(24)).expect("forward"));
        let second = values(model.forward(tokens(24)).expect("forward"));
        assert_eq!(first, second, "{name}");
        assert_eq!(
            table_cache_stats().builds,
            0,
            "{name}: {:?}",
            table_cache_stats()
        );
    }

    // A table over the size limit is built every time and never kept.
    clear_table_cache();
    let side = (MAX_TABLE_ELEMENTS as f64).sqrt() as usize + 1;
    let big = Span::full(side);
    let _ = big.distance::<B>(&device);
    let _ = big.distance::<B>(&device);
    let stats = table_cache_stats();
    assert_eq!(stats.hits, 0, "oversized tables are not cached: {stats:?}");
    assert_eq!(stats.entries, 0, "oversized tables are not kept: {stats:?}");
}

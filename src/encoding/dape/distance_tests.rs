//! DAPE V1's bias and first layer by distance in the evaluation tile (`fused/distance_half.rs`)
//! against the tile over the bias map, for every base bias of the distance alone: the same bits
//! where the batch shares the map (both sum the bias's half in the same order), float32
//! rounding at batch 1, over a full causal forward, a causal chunk and a decode row, with one
//! block of rows and one row per block. Against the tensor path the tile is held by
//! `attention_tests.rs` (whose Kerple cases take this path in evaluation).

use burn::backend::NdArray;
use burn::prelude::*;

use super::fused::{dape_attention, DapeAttentionInputs};
use super::tests::{normal, AUTODIFF_SPANS};
use super::tile::{Qkv, TiledCorrection};
use super::{Dape, DapeConfig, Span, ATTENTION_TILE};
use crate::encoding::{
    AdditiveBias, AlibiConfig, KerpleConfig, KerpleKind, SandwichConfig, T5Config,
};

type Nd = NdArray<f32>;

const HEADS: usize = 4;
const D_HEAD: usize = 8;

/// Every base bias of the distance alone, over `HEADS` heads.
fn distance_biases(
    device: &burn::backend::ndarray::NdArrayDevice,
) -> Vec<(&'static str, AdditiveBias<Nd>)> {
    vec![
        (
            "alibi",
            AdditiveBias::Alibi(AlibiConfig::new().init(HEADS, device).unwrap()),
        ),
        (
            "kerple",
            AdditiveBias::Kerple(
                KerpleConfig::new()
                    .init(HEADS, KerpleKind::Log, device)
                    .unwrap(),
            ),
        ),
        (
            "t5",
            AdditiveBias::T5(T5Config::new().init(HEADS, device).unwrap()),
        ),
        (
            "sandwich",
            AdditiveBias::Sandwich(SandwichConfig::new().init(HEADS, device).unwrap()),
        ),
    ]
}

/// The tile in evaluation over `dape`'s own bias, its first layer by distance or per pair.
fn tile(
    dape: &Dape<Nd>,
    qkv: &[Tensor<Nd, 4>; 3],
    span: &Span,
    by_distance: bool,
    budget: usize,
) -> Tensor<Nd, 4> {
    let device = Default::default();
    let inputs = DapeAttentionInputs {
        qkv: Qkv::Separate(qkv.clone()),
        heads: HEADS,
        bias: (!by_distance)
            .then(|| dape.own_bias(span, &device))
            .flatten(),
        bias_by_distance: by_distance
            .then(|| dape.own_bias_by_distance(span, &device))
            .flatten(),
        f: dape.tile_weights(),
        row_scale: None,
        scale: (D_HEAD as f32).sqrt().recip(),
        budget,
    };
    dape_attention(inputs, span).expect("the tile applies on NdArray<f32>")
}

#[test]
fn first_layer_by_distance_is_the_per_pair_first_layer() {
    let _rng = crate::util::autodiff_test_lock();
    let device = Default::default();
    let decode = Span {
        query_start: 40,
        query_len: 1,
        key_len: 41,
        causal: true,
        positions: None,
    };
    for (name, bias) in distance_biases(&device) {
        let dape = DapeConfig::new()
            .with_negative_slope(0.1)
            .init::<Nd>(HEADS, Some(bias), &device)
            .unwrap();
        for span in AUTODIFF_SPANS.into_iter().chain([decode.clone()]) {
            let table = dape.own_bias_by_distance(&span, &device);
            // Only a causal span with its tokens at their indices has a table.
            assert_eq!(table.is_some(), span.causal, "{name}, {span:?}");
            let Some(table) = table else { continue };
            let n = span.query_start + span.query_len;
            assert_eq!(table.dims(), [HEADS, n], "{name}, {span:?}");
            for batch in [1, 2] {
                let qkv = [span.query_len, span.key_len, span.key_len]
                    .map(|len| Tensor::random([batch, HEADS, len, D_HEAD], normal(), &device));
                for budget in [ATTENTION_TILE, batch * HEADS * span.key_len] {
                    let label = format!("{name}, {span:?}, batch {batch}, budget {budget}");
                    let ours = tile(&dape, &qkv, &span, true, budget);
                    let want = tile(&dape, &qkv, &span, false, budget);
                    if batch > 1 {
                        // The shared-map path sums the bias's half in the same order.
                        let (a, b) = (ours.to_data(), want.to_data());
                        assert_eq!(
                            a.as_slice::<f32>().unwrap(),
                            b.as_slice::<f32>().unwrap(),
                            "{label}"
                        );
                    } else {
                        let diff = (ours - want).abs().max().into_scalar();
                        assert!(diff < 1e-5, "{label}: differs by {diff}");
                    }
                }
            }
        }
    }
}

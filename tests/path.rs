//! PaTH and PaTH-FoX through a whole attention layer: against fla's own reference
//! (`naive_path_attn`, `tests/fixtures/path_fla.json` from `scripts/path-cases.py`), and the
//! gradients of every parameter of the transforms.

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::prelude::*;
use dape::encoding::{Path, PositionalEncoding};
use dape::{AttentionConfig, MultiHeadAttention, PositionalEncodingConfig};

type B = NdArray<f32>;

fn dev() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), &dev())
}

fn path_of(layer: &mut MultiHeadAttention<B>) -> &mut Path<B> {
    match &mut layer.encoding {
        PositionalEncoding::Path(p) => p,
        other => panic!("not PaTH: {other:?}"),
    }
}

/// The layer with every parameter set to the fixture case's (the output projection the
/// identity, so the layer's output is fla's `o`), and the case's input.
fn layer_of(case: &serde_json::Value) -> (MultiHeadAttention<B>, Tensor<B, 3>) {
    let heads = case["heads"].as_u64().unwrap() as usize;
    let rank = case["rank"].as_u64().unwrap() as usize;
    let shape = case["shape"].as_array().unwrap();
    let (t, d) = (
        shape[0].as_u64().unwrap() as usize,
        shape[1].as_u64().unwrap() as usize,
    );
    let encoding = PositionalEncodingConfig::from_json(&format!(
        r#"{{"type": "{}", "rank": {rank}, "block": 4}}"#,
        case["encoding"].as_str().unwrap()
    ))
    .unwrap();
    let mut layer = AttentionConfig::new(d, heads)
        .with_encoding(encoding)
        .init::<B>(&dev())
        .unwrap();
    layer.qkv.weight = Param::from_tensor(tensor(floats(&case["qkv_weight"]), [d, 3 * d]));
    layer.qkv.bias = Some(Param::from_tensor(tensor(
        floats(&case["qkv_bias"]),
        [3 * d],
    )));
    layer.output.weight = Param::from_tensor(Tensor::eye(d, &dev()));
    layer.output.bias = Some(Param::from_tensor(Tensor::zeros([d], &dev())));
    let p = path_of(&mut layer);
    p.w_down.weight = Param::from_tensor(tensor(floats(&case["w_down"]), [d, rank]));
    p.w_up.weight = Param::from_tensor(tensor(floats(&case["w_up"]), [rank, d]));
    p.conv = Param::from_tensor(tensor(floats(&case["conv"]), [3, d]));
    p.beta.weight = Param::from_tensor(tensor(floats(&case["beta_weight"]), [d, heads]));
    p.beta.bias = Some(Param::from_tensor(tensor(
        floats(&case["beta_bias"]),
        [heads],
    )));
    if let Some(gate) = p.gate.as_mut() {
        gate.gate.weight = Param::from_tensor(tensor(floats(&case["gate_weight"]), [d, heads]));
        gate.gate.bias = Some(Param::from_tensor(tensor(
            floats(&case["gate_bias"]),
            [heads],
        )));
    }
    let x = tensor(floats(&case["x"]), [t, d]).reshape([1, t, d]);
    (layer, x)
}

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/path_fla.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Our layer's output equals fla's reference for PaTH and PaTH-FoX, through the whole
/// sequence, through query chunks, and one token at a time through the KV cache.
#[test]
fn path_matches_fla_reference() {
    let fixture = fixture();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4, "fixture has {} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let want = floats(&case["o"]);
        let (layer, x) = layer_of(case);
        let [_, t, d] = x.dims();
        let full: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
        let chunked: Vec<f32> = layer
            .clone()
            .with_chunk_size(Some(3))
            .forward(x.clone())
            .into_data()
            .to_vec()
            .unwrap();
        let mut cache = dape::KvCache::new();
        let mut decoded = Vec::new();
        for i in 0..t {
            let step = layer
                .forward_cached(x.clone().narrow(1, i, 1), &mut cache)
                .unwrap();
            decoded.extend(step.into_data().to_vec::<f32>().unwrap());
        }
        for (how, got) in [("full", full), ("chunked", chunked), ("decoded", decoded)] {
            assert_eq!(got.len(), want.len(), "{name} {how}: output size");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
                    "{name} {how}: o[{}, {}] = {g}, fla {w}",
                    i / d,
                    i % d
                );
            }
        }
    }
}

/// A bidirectional PaTH layer (the CHE encoder's) against its formula on the host: row `i`
/// sees key `j` through the transforms of the tokens in `(min(i, j), max(i, j)]`, the query's
/// side first, and the softmax runs over every key.
#[test]
fn bidirectional_path_matches_its_formula() {
    let fixture = fixture();
    let case = &fixture["cases"][0];
    let (causal, x) = layer_of(case);
    let mut layer = AttentionConfig::new(causal.head_dim * causal.n_heads, causal.n_heads)
        .with_causal(false)
        .with_encoding(
            PositionalEncodingConfig::from_json(r#"{"type": "path", "rank": 4}"#).unwrap(),
        )
        .init::<B>(&dev())
        .unwrap();
    layer.qkv = causal.qkv.clone();
    layer.output = causal.output.clone();
    layer.encoding = causal.encoding.clone();
    let [_, t, d] = x.dims();
    let (h, dh) = (layer.n_heads, layer.head_dim);
    let p = path_of(&mut layer).clone();
    let tr = p.transforms(x.clone(), None);
    let w: Vec<f32> = tr.w.into_data().to_vec().unwrap(); // [1, h, t, dh]
    let beta: Vec<f32> = tr.beta.into_data().to_vec().unwrap(); // [1, h, t]
    let qkv: Vec<f32> = dape::kernel::linear_layer(&layer.qkv, x.clone())
        .into_data()
        .to_vec()
        .unwrap();
    let at = |part: usize, i: usize, head: usize| -> Vec<f64> {
        (0..dh)
            .map(|c| f64::from(qkv[i * 3 * d + part * d + head * dh + c]))
            .collect()
    };
    let apply = |head: usize, s: usize, v: &mut Vec<f64>| {
        let ws = &w[(head * t + s) * dh..][..dh];
        let dot: f64 = ws
            .iter()
            .zip(v.iter())
            .map(|(a, b)| f64::from(*a) * b)
            .sum();
        let b = f64::from(beta[head * t + s]);
        v.iter_mut()
            .zip(ws)
            .for_each(|(x, wi)| *x -= b * dot * f64::from(*wi));
    };
    let mut want = vec![0.0f64; t * d];
    for head in 0..h {
        for i in 0..t {
            let q = at(0, i, head);
            let logits: Vec<f64> = (0..t)
                .map(|j| {
                    let mut v = at(1, j, head);
                    if j <= i {
                        (j + 1..=i).for_each(|s| apply(head, s, &mut v));
                    } else {
                        (i + 1..=j).rev().for_each(|s| apply(head, s, &mut v));
                    }
                    q.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>() / (dh as f64).sqrt()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|z| (z - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                let v = at(2, j, head);
                for c in 0..dh {
                    want[i * d + head * dh + c] += ej / sum * v[c];
                }
            }
        }
    }
    let got: Vec<f32> = layer.forward(x).into_data().to_vec().unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "o[{}, {}] = {g}, formula {w}",
            i / d,
            i % d
        );
    }
}

/// Every parameter of PaTH's and PaTH-FoX's transforms gets a finite, nonzero gradient from a
/// loss over a causal layer's output.
#[test]
fn gradients_reach_every_transform_parameter() {
    type A = Autodiff<B>;
    for name in ["path", "path_fox", "dape_path"] {
        let json = match name {
            "dape_path" => r#"{"type": "dape_path", "path": {"block": 4}}"#.to_string(),
            _ => format!(r#"{{"type": "{name}", "block": 4}}"#),
        };
        let encoding = PositionalEncodingConfig::from_json(&json).unwrap();
        let layer = AttentionConfig::new(16, 2)
            .with_encoding(encoding)
            .init::<A>(&dev())
            .unwrap();
        let x = Tensor::<A, 3>::random(
            [2, 11, 16],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &dev(),
        );
        let grads = layer.forward(x).powi_scalar(2).sum().backward();
        let PositionalEncoding::Path(p) = &layer.encoding else {
            panic!("{name}: not PaTH")
        };
        let mut checked = vec![
            (
                "w_down",
                p.w_down.weight.grad(&grads).map(|g| g.into_data()),
            ),
            ("w_up", p.w_up.weight.grad(&grads).map(|g| g.into_data())),
            ("conv", p.conv.grad(&grads).map(|g| g.into_data())),
            (
                "beta.weight",
                p.beta.weight.grad(&grads).map(|g| g.into_data()),
            ),
            (
                "beta.bias",
                p.beta
                    .bias
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .map(|g| g.into_data()),
            ),
        ];
        if let Some(gate) = &p.gate {
            checked.push((
                "gate.weight",
                gate.gate.weight.grad(&grads).map(|g| g.into_data()),
            ));
        }
        if let Some(dape) = &p.dape {
            checked.push((
                "dape.mlp_in",
                dape.mlp_in.weight.grad(&grads).map(|g| g.into_data()),
            ));
            checked.push((
                "dape.mlp_out",
                dape.mlp_out.weight.grad(&grads).map(|g| g.into_data()),
            ));
        }
        assert_eq!(p.gate.is_some(), name == "path_fox", "{name}: forget gate");
        assert_eq!(p.dape.is_some(), name == "dape_path", "{name}: DAPE's MLP");
        for (param, grad) in checked {
            let grad: Vec<f32> = grad
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"))
                .to_vec()
                .unwrap();
            assert!(
                grad.iter().all(|g| g.is_finite()),
                "{name}: {param} not finite"
            );
            assert!(grad.iter().any(|g| *g != 0.0), "{name}: {param} all zero");
        }
    }
}

/// `dape_path` is PaTH with DAPE's `A + f(A)` on the scaled logits: with `f`'s output layer
/// zeroed it is exactly PaTH (same transforms, same projections), and with `f` live the
/// output moves, so the MLP is on the path the layer takes, for full and chunked queries.
#[test]
fn dape_path_is_path_plus_dape_over_its_logits() {
    let encoding =
        PositionalEncodingConfig::from_json(r#"{"type": "dape_path", "path": {"block": 4}}"#)
            .unwrap();
    let mut layer = AttentionConfig::new(16, 2)
        .with_encoding(encoding)
        .init::<B>(&dev())
        .unwrap();
    let x = Tensor::<B, 3>::random(
        [2, 11, 16],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev(),
    );
    let live: Vec<f32> = layer.forward(x.clone()).into_data().to_vec().unwrap();
    let mut plain = layer.clone();
    path_of(&mut plain).dape = None;
    let without: Vec<f32> = plain.forward(x.clone()).into_data().to_vec().unwrap();
    let moved = live
        .iter()
        .zip(&without)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        moved > 1e-3,
        "DAPE's MLP does not reach the output ({moved})"
    );
    let dape = path_of(&mut layer).dape.as_mut().unwrap();
    dape.mlp_out.weight = Param::from_tensor(dape.mlp_out.weight.val().zeros_like());
    dape.mlp_out.bias = Some(Param::from_tensor(Tensor::zeros([2], &dev())));
    for chunk in [0, 3] {
        let (mut a, mut b) = (layer.clone(), plain.clone());
        a.chunk_size = chunk;
        b.chunk_size = chunk;
        let got: Vec<f32> = a.forward(x.clone()).into_data().to_vec().unwrap();
        let want: Vec<f32> = b.forward(x.clone()).into_data().to_vec().unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6,
                "o[{i}] = {g}, PaTH {w} (chunk {chunk})"
            );
        }
    }
}

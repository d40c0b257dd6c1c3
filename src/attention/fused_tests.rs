//! The layer's fused nodes against its own tensor path on the same backend (ndarray, with
//! autodiff): the layer run as it chooses, and again inside [`on_tensor_path`]. Outputs and
//! every parameter's gradient (the projections, the encoding's parameters, Scalable-Softmax's
//! scales) agree, over Scalable-Softmax with and without a bias, with stick-breaking, and
//! over DAPE; causal and bidirectional, whole and in chunks of query rows; and a KV-cache
//! decode after a prefill. Each case also checks which path the fused run took.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;

use super::path_stats::{attention_path_counts, on_tensor_path};
use super::{AttentionConfig, KvCache, MultiHeadAttention, SsmaxConfig, StickBreakingConfig};
use crate::encoding::PositionalEncodingConfig;

type Ad = Autodiff<NdArray>;

const D_MODEL: usize = 16;
const HEADS: usize = 4;
const LEN: usize = 9;

/// Every float parameter's gradient, in visiting order (empty where a parameter has none).
struct Grads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = param.val().grad(self.grads);
        self.out
            .push(g.map_or_else(Vec::new, |g| g.into_data().to_vec().unwrap()));
    }
}

/// The output of a forward pass over `x` and the parameters' gradients of `Σ out ⊙ w` (a fixed
/// random weighting, so that no gradient is a plain sum that cancels).
fn run(layer: &MultiHeadAttention<Ad>, x: Tensor<Ad, 3>) -> (Vec<f32>, Vec<Vec<f32>>) {
    let out = layer.forward(x);
    let w = Tensor::<Ad, 3>::random(out.dims(), Distribution::Normal(0.0, 1.0), &out.device());
    let grads = (out.clone() * w).sum().backward();
    let mut visitor = Grads::<Ad> {
        grads: &grads,
        out: Vec::new(),
    };
    layer.visit(&mut visitor);
    (out.into_data().to_vec().unwrap(), visitor.out)
}

/// max |a − b| / max(max |b|, 1e-3).
fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A layer with `encoding`, Scalable-Softmax (scales set apart per head, so that a head
/// mix-up shows) and optionally stick-breaking.
fn layer(
    encoding: &str,
    causal: bool,
    chunk: Option<usize>,
    sticks: bool,
) -> MultiHeadAttention<Ad> {
    let device = Default::default();
    <Ad as Backend>::seed(&device, 5);
    let mut layer = AttentionConfig::new(D_MODEL, HEADS)
        .with_encoding(PositionalEncodingConfig::from_name(encoding).unwrap())
        .with_causal(causal)
        .with_chunk_size(chunk)
        .with_ssmax(Some(SsmaxConfig::new().with_init_length(4)))
        .with_stick_breaking(sticks.then(StickBreakingConfig::new))
        .init::<Ad>(&device)
        .unwrap();
    let scales = Tensor::<Ad, 1>::from_floats([0.5, 0.8, 1.1, 1.6], &device);
    layer.ssmax = Some(Param::from_tensor(scales.require_grad()));
    layer
}

/// How far a gradient may be from the tensor path's, relative to its largest entry. DAPE's
/// tile gets the tolerance of its own tests (`dape/attention_tests.rs`: two float32 orders of a
/// softmax's backward pass behind an MLP, up to 1.6e-4 apart, and sums over pairs that cancel);
/// the other nodes are one product and one softmax away from the tensor path.
fn tolerance(encoding: &str) -> f32 {
    if encoding.starts_with("dape") {
        1e-3
    } else {
        2e-4
    }
}

#[test]
fn ssmax_on_the_fused_nodes_matches_the_tensor_path() {
    let _graphs = crate::util::autodiff_test_lock();
    let cases = [
        ("nope", false),
        ("alibi", false),
        ("kerple_log", false),
        ("t5", false),
        ("fox", false),
        ("dape_kerple_log", false),
        ("dape_fox", false),
        ("nope", true),
        ("alibi", true),
    ];
    let device = Default::default();
    for (encoding, sticks) in cases {
        for causal in [true, false] {
            for chunk in [None, Some(4)] {
                let name = format!("{encoding} sticks {sticks} causal {causal} chunk {chunk:?}");
                let layer = layer(encoding, causal, chunk, sticks);
                let x = Tensor::<Ad, 3>::random(
                    [2, LEN, D_MODEL],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                <Ad as Backend>::seed(&device, 9);
                let before = attention_path_counts();
                let (out, grads) = run(&layer, x.clone());
                let paths = attention_path_counts().since(&before);
                <Ad as Backend>::seed(&device, 9);
                let (out_ref, grads_ref) = on_tensor_path(|| run(&layer, x.clone()));
                assert_eq!(paths.name(), Some("fused"), "{name}: path");
                let d = relative(&out, &out_ref);
                assert!(d < 1e-4, "{name}: outputs differ by {d:e}");
                assert_eq!(grads.len(), grads_ref.len());
                let tol = tolerance(encoding);
                let mut worst = 0f32;
                for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
                    assert_eq!(g.is_empty(), r.is_empty(), "{name}: parameter {i}");
                    let d = relative(g, r);
                    worst = worst.max(d);
                    assert!(
                        d < tol,
                        "{name}: gradient of parameter {i} differs by {d:e}"
                    );
                }
                println!("{name}: outputs {d:.1e}, gradients {worst:.1e}");
                let scales = grads.last().unwrap();
                assert!(
                    scales.iter().all(|g| g.abs() > 1e-6),
                    "{name}: Scalable-Softmax's scales get a gradient: {scales:?}"
                );
            }
        }
    }
}

/// A KV-cache decode with Scalable-Softmax on the fused node: a prefill of 5 tokens, then
/// one token at a time, each step's output against the tensor path's.
#[test]
fn ssmax_decode_on_the_fused_node_matches_the_tensor_path() {
    let _graphs = crate::util::autodiff_test_lock();
    let device = Default::default();
    for encoding in ["alibi", "kerple_log", "nope"] {
        let layer = layer(encoding, true, None, false).valid();
        let x = Tensor::<NdArray, 3>::random(
            [2, LEN, D_MODEL],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let decode = |layer: &MultiHeadAttention<NdArray>| {
            let mut cache = KvCache::new();
            let mut outs = vec![layer
                .forward_cached(x.clone().narrow(1, 0, 5), &mut cache)
                .unwrap()];
            for t in 5..LEN {
                outs.push(
                    layer
                        .forward_cached(x.clone().narrow(1, t, 1), &mut cache)
                        .unwrap(),
                );
            }
            Tensor::cat(outs, 1).into_data().to_vec::<f32>().unwrap()
        };
        let got = decode(&layer);
        let want = on_tensor_path(|| decode(&layer));
        let d = relative(&got, &want);
        assert!(d < 1e-4, "{encoding}: decode differs by {d:e}");
    }
}

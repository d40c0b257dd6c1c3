//! DAPE V1 and V2 inside the attention tile ([`tile_attention`]) against the layer's tensor
//! path: the scaled logits, DAPE's tensor path, the masked softmax and the product with V.
//! Values in evaluation and under autodiff, every gradient (q, k, v, the map, both layers or
//! convolutions, Kerple's parameters, Scalable-Softmax's factors), bit-identical reruns, over a
//! full causal forward, a causal chunk, a decode row and a non-causal block, with one block of
//! rows, ragged blocks of three rows, and one row per block; and the same for the packed
//! projection of a whole sequence.

use super::tests::{
    assert_fused_node_matches_within, kerple_grads, kink_free_bias, normal, outputs_and_grads,
    random_kerple, Ad, AdGrads, AUTODIFF_SPANS,
};
use super::*;
use burn::backend::NdArray;
use burn::module::AutodiffModule;
use burn::tensor::activation::softmax;
use burn::tensor::Distribution;

use super::tile::{tile_attention, whole_sequence, Qkv, TiledCorrection};

const HEADS: usize = 4;
const BATCH: usize = 2;
const D_HEAD: usize = 8;

/// The spans: [`AUTODIFF_SPANS`] and a one-row decode step.
fn spans() -> Vec<Span> {
    let mut spans = AUTODIFF_SPANS.to_vec();
    spans.push(Span {
        query_start: 40,
        query_len: 1,
        key_len: 41,
        causal: true,
        positions: None,
    });
    spans
}

/// DAPE's `Z` on the tensor path, V1's or V2's.
trait TensorPathZ<T: Backend> {
    /// `Z` for the scaled logits over `span`, over `map` when given (V1 only).
    fn z(&self, logits: Tensor<T, 4>, map: Option<Tensor<T, 4>>, span: &Span) -> Tensor<T, 4>;
}

impl<T: Backend> TensorPathZ<T> for Dape<T> {
    fn z(&self, logits: Tensor<T, 4>, map: Option<Tensor<T, 4>>, span: &Span) -> Tensor<T, 4> {
        match map {
            Some(m) => self.forward_with_map_tensor_path(logits, m),
            None => self.forward_tensor_path(logits, span, HIDDEN_BLOCK),
        }
    }
}

impl<T: Backend> TensorPathZ<T> for DapeV2<T> {
    fn z(&self, logits: Tensor<T, 4>, map: Option<Tensor<T, 4>>, span: &Span) -> Tensor<T, 4> {
        assert!(map.is_none(), "DAPE V2 has no form over an outside map");
        self.forward_tensor_path(logits, span, HIDDEN_BLOCK)
    }
}

/// A DAPE module under test: the tile's and the tensor path's views of it, under autodiff and
/// in evaluation.
trait Subject:
    AutodiffModule<Ad, InnerModule = Self::Valid> + TiledCorrection<Ad> + TensorPathZ<Ad>
{
    type Valid: TiledCorrection<NdArray<f32>> + TensorPathZ<NdArray<f32>>;
    /// How far the node's gradients may be from the tensor path's, relative to each one's
    /// largest entry.
    const TOLERANCE: f32;
}

impl Subject for Dape<Ad> {
    type Valid = Dape<NdArray<f32>>;
    // Two float32 computations of a softmax's backward pass behind DAPE's: over 14 runs the
    // widest gap was 1.6e-4 of a gradient's largest entry (the node's own errors, when broken
    // on purpose, were 0.03 to 1 of it).
    const TOLERANCE: f32 = 5e-4;
}

impl Subject for DapeV2<Ad> {
    type Valid = DapeV2<NdArray<f32>>;
    // The first convolution's bias gradient sums `δ` over a row's keys, which cancels but for
    // the keys near the row's ends (the padding): 9.3e-4 of its largest entry was seen. Broken
    // by 1% on purpose it is off by 1e-2.
    const TOLERANCE: f32 = 2.5e-3;
}

/// The layer's tensor path: `softmax(mask(c ⊙ Z)) · v` with `Z` from DAPE's tensor path over
/// the scaled logits and `c` the row factors `[H, rows]` when given, `[batch, rows, heads,
/// d_v]`.
fn reference<T: Backend>(
    dape: &dyn TensorPathZ<T>,
    [q, k, v]: [Tensor<T, 4>; 3],
    [map, row_scale]: [Option<Tensor<T, 4>>; 2],
    span: &Span,
    scale: f32,
) -> Tensor<T, 4> {
    let logits = q.matmul(k.transpose()) * scale;
    let mut z = dape.z(logits, map, span);
    if let Some(c) = row_scale {
        z = z * c;
    }
    if span.has_future() {
        let mask = span
            .future_mask::<T>(&z.device())
            .unsqueeze::<4>()
            .expand(z.dims());
        z = z.mask_fill(mask, f32::NEG_INFINITY);
    }
    softmax(z, 3).matmul(v).swap_dims(1, 2)
}

/// Budgets of floats for one block, `[batch, H, rb, keys]`: the default (one block), three
/// rows (ragged), one row.
fn budgets(span: &Span) -> [usize; 3] {
    let row = BATCH * HEADS * span.key_len;
    [ATTENTION_TILE, 3 * row, 1]
}

/// A DAPE with non-zero layer biases kept away from LeakyReLU's kink (see `kink_free_bias`),
/// and its second layer scaled by 0.1: with hidden values near ±8 the correction would
/// otherwise reach ±10, and a softmax that peaked leaves its gradient `P ⊙ (dP − δ)` to
/// cancellation, which measures float32 rounding rather than the tile.
fn dape_with_biases(dape: Dape<Ad>) -> Dape<Ad> {
    let device = Default::default();
    let mut dape = dape;
    dape.mlp_out.weight =
        burn::module::Param::from_tensor((dape.mlp_out.weight.val() * 0.1).detach().require_grad());
    dape.mlp_in.bias = Some(kink_free_bias(32));
    dape.mlp_out.bias = Some(burn::module::Param::from_tensor(Tensor::random(
        [HEADS],
        normal(),
        &device,
    )));
    dape
}

/// For each span and budget: random q, k, v (and a map of `maps` planes when `maps > 0`),
/// the tile against the tensor path in evaluation (values) and under autodiff (values, the
/// gradients of q, k, v, the map and of `params`), and a second run bit-identical.
fn check<M: Subject>(
    label: &str,
    dape: &M,
    [maps, row_scale]: [usize; 2],
    params: impl Fn(&AdGrads) -> Vec<(&'static str, Option<Tensor<NdArray<f32>, 1>>)>,
) {
    let device = Default::default();
    let scale = (D_HEAD as f32).sqrt().recip();
    for span in spans() {
        let (lq, lk) = (span.query_len, span.key_len);
        // `[batch, seq, H, d]` seen as `[batch, H, seq, d]`, as the layer's projections give
        // them: the tile reads them through their strides.
        let heads_view = |seq| {
            Tensor::<Ad, 4>::random([BATCH, seq, HEADS, D_HEAD], normal(), &device).swap_dims(1, 2)
        };
        let (q0, k0, v0) = (heads_view(lq), heads_view(lk), heads_view(lk));
        // Forgetting attention's bias is never positive.
        let m0 = (maps > 0).then(|| {
            Tensor::<Ad, 4>::random([maps, HEADS, lq, lk], normal(), &device)
                .abs()
                .neg()
        });
        // Scalable-Softmax's factors `[H, rows]`, positive, as `s_h · ln n_i` is past a
        // row's first key.
        let c0 = (row_scale > 0).then(|| {
            Tensor::<Ad, 2>::random([HEADS, lq], Distribution::Uniform(0.5, 2.0), &device)
        });
        for budget in budgets(&span) {
            let label = format!("{label}, {span:?}, budget {budget}");

            // Evaluation: the tile on NdArray.
            let inner = dape.valid();
            let qkv = [&q0, &k0, &v0].map(|t| t.clone().inner());
            let map = m0.clone().map(|m| m.inner());
            let c = c0.clone().map(|c| c.inner());
            let tile = tile_attention(
                &inner,
                Qkv::Separate(qkv.clone()),
                map.clone(),
                c.clone(),
                &span,
                scale,
                budget,
            )
            .expect("the tile applies on NdArray<f32>");
            let want = reference(
                &inner,
                qkv,
                [map, c.map(|c| c.reshape([1, HEADS, lq, 1]))],
                &span,
                scale,
            );
            let diff = (tile - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "{label}: evaluation differs by {diff}");

            // Training: one graph node.
            let weights = Tensor::<Ad, 4>::random([BATCH, lq, HEADS, D_HEAD], normal(), &device);
            let run = |fused: bool| {
                let [q, k, v] = [&q0, &k0, &v0].map(|t| t.clone().detach().require_grad());
                let m = m0.clone().map(|m| m.detach().require_grad());
                let c = c0.clone().map(|c| c.detach().require_grad());
                let qkv = [q.clone(), k.clone(), v.clone()];
                let out = if fused {
                    tile_attention(
                        dape,
                        Qkv::Separate(qkv),
                        m.clone(),
                        c.clone(),
                        &span,
                        scale,
                        budget,
                    )
                    .expect("the node applies on Autodiff<NdArray<f32>>")
                } else {
                    reference(
                        dape,
                        qkv,
                        [m.clone(), c.clone().map(|c| c.reshape([1, HEADS, lq, 1]))],
                        &span,
                        scale,
                    )
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let mut named = vec![
                    ("d q", q.grad(&grads).map(|g| g.flatten(0, 3))),
                    ("d k", k.grad(&grads).map(|g| g.flatten(0, 3))),
                    ("d v", v.grad(&grads).map(|g| g.flatten(0, 3))),
                ];
                if let Some(m) = &m {
                    named.push(("d map", m.grad(&grads).map(|g| g.flatten(0, 3))));
                }
                if let Some(c) = &c {
                    named.push(("d row scale", c.grad(&grads).map(|g| g.flatten(0, 1))));
                }
                named.extend(params(&grads));
                outputs_and_grads(out, &weights, named)
            };
            let [fused, again, reference] = [run(true), run(true), run(false)].map(zero_sums);
            assert_fused_node_matches_within(&label, fused, again, reference, M::TOLERANCE);
        }
    }
}

/// Takes out the gradients of the layers' biases, after checking that they are zero to
/// rounding: each sums `dZ` (through the second layer, times a slope that is the same for every
/// pair: see `kink_free_bias`) over a row of keys, and the softmax's gradient sums to zero
/// over every row. Nothing is left of them to compare but rounding: 6e-5 seen in one draw, up to
/// 1.2e-3 over the draws the test harness's other threads leave (the backend's random state is
/// shared), so the bound is 5e-3, where a missing term leaves O(0.1).
fn zero_sums(named: Vec<(String, Vec<f32>)>) -> Vec<(String, Vec<f32>)> {
    named
        .into_iter()
        .filter(|(name, g)| {
            let sum = name == "d b1" || name == "d b2";
            let max = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(!sum || max <= 5e-3, "{name} is {max}, not zero");
            !sum
        })
        .collect()
}

/// The packed form over the whole sequence ([`Dape::attention_packed`]'s kernel): a random
/// projection `[batch, seq, 3 · H, d]` against the tensor path over its three parts, in
/// evaluation and under autodiff (the packed gradient, the map's and `params`), causal and
/// not, with one block and with ragged blocks.
fn check_packed<M: Subject>(
    label: &str,
    dape: &M,
    maps: usize,
    params: impl Fn(&AdGrads) -> Vec<(&'static str, Option<Tensor<NdArray<f32>, 1>>)>,
) {
    let device = Default::default();
    let scale = (D_HEAD as f32).sqrt().recip();
    for (seq, causal) in [(35, true), (9, false)] {
        let span = Span {
            query_start: 0,
            query_len: seq,
            key_len: seq,
            causal,
            positions: None,
        };
        let p0 = Tensor::<Ad, 4>::random([BATCH, seq, 3 * HEADS, D_HEAD], normal(), &device);
        let m0 = (maps > 0).then(|| {
            Tensor::<Ad, 4>::random([maps, HEADS, seq, seq], normal(), &device)
                .abs()
                .neg()
        });
        let parts = |p: &Tensor<Ad, 4>| {
            [0, 1, 2].map(|i| p.clone().narrow(2, i * HEADS, HEADS).swap_dims(1, 2))
        };
        for budget in budgets(&span) {
            let label = format!("{label}, packed, {span:?}, budget {budget}");
            let inner = dape.valid();
            let (p, map) = (p0.clone().inner(), m0.clone().map(|m| m.inner()));
            let packed = whole_sequence(p.clone(), &span).expect("a whole sequence");
            let tile = tile_attention(&inner, packed, map.clone(), None, &span, scale, budget)
                .expect("the tile applies on NdArray<f32>");
            let qkv = [0, 1, 2].map(|i| p.clone().narrow(2, i * HEADS, HEADS).swap_dims(1, 2));
            let want = reference(&inner, qkv, [map, None], &span, scale);
            let diff = (tile - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "{label}: evaluation differs by {diff}");

            let weights = Tensor::<Ad, 4>::random([BATCH, seq, HEADS, D_HEAD], normal(), &device);
            let run = |fused: bool| {
                let p = p0.clone().detach().require_grad();
                let m = m0.clone().map(|m| m.detach().require_grad());
                let out = if fused {
                    let packed = whole_sequence(p.clone(), &span).expect("a whole sequence");
                    tile_attention(dape, packed, m.clone(), None, &span, scale, budget)
                        .expect("the node applies on Autodiff<NdArray<f32>>")
                } else {
                    reference(dape, parts(&p), [m.clone(), None], &span, scale)
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let mut named = vec![("d qkv", p.grad(&grads).map(|g| g.flatten(0, 3)))];
                if let Some(m) = &m {
                    named.push(("d map", m.grad(&grads).map(|g| g.flatten(0, 3))));
                }
                named.extend(params(&grads));
                outputs_and_grads(out, &weights, named)
            };
            let [fused, again, reference] = [run(true), run(true), run(false)].map(zero_sums);
            assert_fused_node_matches_within(&label, fused, again, reference, M::TOLERANCE);
        }
    }
}

/// Both layers' gradients, and Kerple's when the base bias is Kerple.
fn layer_grads(
    dape: &Dape<Ad>,
    grads: &AdGrads,
) -> Vec<(&'static str, Option<Tensor<NdArray<f32>, 1>>)> {
    let mut named = vec![
        (
            "d w1",
            dape.mlp_in.weight.grad(grads).map(|g| g.flatten(0, 1)),
        ),
        ("d b1", dape.mlp_in.bias.as_ref().unwrap().grad(grads)),
        // `Σ dZ · hidden` over the pairs, with hidden values near ±8 (`kink_free_bias`) and
        // `Σ dZ = 0` along each row: the sum cancels to a few parts in 10^4 of its terms.
        (
            "d w2 (sums cancel)",
            dape.mlp_out.weight.grad(grads).map(|g| g.flatten(0, 1)),
        ),
        ("d b2", dape.mlp_out.bias.as_ref().unwrap().grad(grads)),
    ];
    named.extend(kerple_grads(&dape.bias, grads));
    named
}

/// DAPE over Kerple (learned parameters) and over NoPE.
#[test]
fn tile_matches_tensor_path_over_a_bias_and_nope() {
    let _graphs = crate::util::autodiff_test_lock();
    let device = Default::default();
    for with_bias in [true, false] {
        let dape = dape_with_biases(
            DapeConfig::new()
                .with_negative_slope(0.1)
                .init::<Ad>(HEADS, with_bias.then(random_kerple), &device)
                .unwrap(),
        );
        let label = format!("bias {with_bias}");
        check(&label, &dape, [0, 0], |g| layer_grads(&dape, g));
        check_packed(&label, &dape, 0, |g| layer_grads(&dape, g));
    }
}

/// DAPE over a map computed outside (forgetting attention's): one per sequence, or one shared
/// by the batch.
#[test]
fn tile_matches_tensor_path_over_a_map() {
    let _graphs = crate::util::autodiff_test_lock();
    let device = Default::default();
    let dape = dape_with_biases(
        DapeConfig::new()
            .with_negative_slope(0.1)
            .init_over_external::<Ad>(HEADS, &device)
            .unwrap(),
    );
    for maps in [BATCH, 1] {
        let label = format!("{maps} map(s)");
        check(&label, &dape, [maps, 0], |g| layer_grads(&dape, g));
        check_packed(&label, &dape, maps, |g| layer_grads(&dape, g));
    }
}

/// Scalable-Softmax's row factors inside the tile ([`Dape::attention_row_scaled`]'s kernel):
/// over Kerple and over a map, values and every gradient, the factors' included.
#[test]
fn tile_matches_tensor_path_with_row_factors() {
    let _graphs = crate::util::autodiff_test_lock();
    let device = Default::default();
    let over_kerple = dape_with_biases(
        DapeConfig::new()
            .with_negative_slope(0.1)
            .init::<Ad>(HEADS, Some(random_kerple()), &device)
            .unwrap(),
    );
    check("row factors, Kerple", &over_kerple, [0, 1], |g| {
        layer_grads(&over_kerple, g)
    });
    let over_map = dape_with_biases(
        DapeConfig::new()
            .with_negative_slope(0.1)
            .init_over_external::<Ad>(HEADS, &device)
            .unwrap(),
    );
    check("row factors, a map", &over_map, [BATCH, 1], |g| {
        layer_grads(&over_map, g)
    });
}

/// DAPE V2 over Kerple and over NoPE, both masking modes, kernel widths 3 and 5, with
/// Scalable-Softmax's row factors once: the tile against the tensor path in values and every
/// gradient (both convolutions' weights and biases, Kerple's parameters, the factors').
#[test]
fn tile_matches_tensor_path_for_dape_v2() {
    let _graphs = crate::util::autodiff_test_lock();
    let device = Default::default();
    for (with_bias, mask_hidden, k, row_scale) in [
        (true, true, 3, 0),
        (false, false, 5, 0),
        (true, false, 3, 1),
    ] {
        let mut dape = DapeV2Config::new()
            .with_kernel_size(k)
            .with_negative_slope(0.1)
            .with_mask_future_hidden(mask_hidden)
            .init::<Ad>(HEADS, with_bias.then(random_kerple), &device)
            .unwrap();
        // As `dape_with_biases`: hidden values away from the kink, a small second layer.
        dape.conv_out.weight = burn::module::Param::from_tensor(
            (dape.conv_out.weight.val() * 0.1).detach().require_grad(),
        );
        dape.conv_in.bias = Some(kink_free_bias(32));
        dape.conv_out.bias = Some(burn::module::Param::from_tensor(Tensor::random(
            [HEADS],
            normal(),
            &device,
        )));
        let label = format!("V2, bias {with_bias}, mask {mask_hidden}, k {k}, ssmax {row_scale}");
        let params = |grads: &AdGrads| {
            let mut named = vec![
                (
                    "d conv w1",
                    dape.conv_in.weight.grad(grads).map(|g| g.flatten(0, 3)),
                ),
                // Not a zero sum: the keys at a row's ends see the padding.
                ("d conv b1", dape.conv_in.bias.as_ref().unwrap().grad(grads)),
                (
                    "d conv w2",
                    dape.conv_out.weight.grad(grads).map(|g| g.flatten(0, 3)),
                ),
                ("d b2", dape.conv_out.bias.as_ref().unwrap().grad(grads)),
            ];
            named.extend(kerple_grads(&dape.bias, grads));
            named
        };
        check(&label, &dape, [0, row_scale], params);
        if row_scale == 0 {
            check_packed(&label, &dape, 0, params);
        }
    }
}

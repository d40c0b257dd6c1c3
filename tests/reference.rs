//! Reference values from the formulas: ALiBi slopes, Kerple, FIRE, T5 buckets, sinusoidal
//! tables, and the rotary family (relative property, agreement with burn-nn's RoPE, scaling
//! rules).

use burn::backend::NdArray;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;

use dape::encoding::bias::{alibi_slopes, t5_bucket};
use dape::encoding::{
    AlibiConfig, FireActivation, FireConfig, KerpleConfig, KerpleKind, RopeConfig, RopeLayout,
    RopeScaling, Rotary, SinusoidalConfig, T5Config, XposConfig,
};
use dape::Span;

type B = NdArray<f32>;

fn dev() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn alibi_slopes_for_8_and_12_heads() {
    let eight: Vec<f64> = (1..=8).map(|h| 2f64.powi(-h)).collect();
    assert_eq!(alibi_slopes(8), eight);
    // 12 heads: the 8-head slopes, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...).
    let mut twelve = eight.clone();
    twelve.extend([-0.5f64, -1.5, -2.5, -3.5].iter().map(|e| 2f64.powf(*e)));
    let got = alibi_slopes(12);
    assert_eq!(got.len(), 12);
    for (g, w) in got.iter().zip(&twelve) {
        assert!(close(*g, *w, 1e-12), "slopes {got:?} != {twelve:?}");
    }
}

#[test]
fn alibi_bias_is_minus_slope_times_distance() {
    let alibi = AlibiConfig::new().init::<B>(8, &dev()).unwrap();
    let span = Span::full(6);
    let bias = values(alibi.forward(&span, &dev())); // [1, 8, 6, 6]
    for h in 0..8 {
        for i in 0..6 {
            for j in 0..=i {
                let got = bias[(h * 6 + i) * 6 + j] as f64;
                let want = -2f64.powi(-(h as i32 + 1)) * (i - j) as f64;
                assert!(close(got, want, 1e-6), "h{h} ({i},{j}): {got} vs {want}");
            }
        }
    }
}

#[test]
fn kerple_log_and_power_match_their_formulas_with_clamping() {
    let ps = [0.5f64, 1.3, -2.0]; // the last is clamped to eps = 0.01
    let as_ = [0.2f64, 0.9, 5.0]; // power: clamped to 2
    for kind in [KerpleKind::Log, KerpleKind::Power] {
        let mut kerple = KerpleConfig::new().init::<B>(3, kind, &dev()).unwrap();
        let t = |v: &[f64]| {
            Param::from_tensor(Tensor::<B, 1>::from_floats(
                TensorData::new(v.iter().map(|x| *x as f32).collect::<Vec<_>>(), [3]),
                &dev(),
            ))
        };
        kerple.p = t(&ps);
        kerple.a = t(&as_);
        let span = Span {
            query_start: 3,
            query_len: 4,
            key_len: 7,
            causal: true,
            positions: None,
        };
        let bias = values(kerple.forward(&span, &dev()));
        for h in 0..3 {
            let p = ps[h].max(0.01);
            for r in 0..4 {
                for j in 0..7 {
                    let d = ((3 + r) as f64 - j as f64).abs();
                    let want = match kind {
                        KerpleKind::Log => -p * (1.0 + as_[h].max(0.01) * d).ln(),
                        KerpleKind::Power => -p * d.powf(as_[h].clamp(0.01, 2.0)),
                    };
                    let got = bias[(h * 4 + r) * 7 + j] as f64;
                    assert!(
                        close(got, want, 1e-5),
                        "{kind:?} h{h} r{r} j{j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn fire_matches_its_formula() {
    let mut fire = FireConfig::new()
        .with_mlp_width(4)
        .with_init_l(6.0)
        .with_activation(FireActivation::Relu)
        .init::<B>(2, &dev())
        .unwrap();
    fire.c = Param::from_tensor(Tensor::from_floats([0.3], &dev()));
    fire.l_multiplier = Param::from_tensor(Tensor::from_floats([-1.5], &dev()));
    let w1 = values(fire.mlp_in.weight.val()); // [1, 4]
    let b1 = values(fire.mlp_in.bias.as_ref().unwrap().val());
    let w2 = values(fire.mlp_out.weight.val()); // [4, 2]
    let b2 = values(fire.mlp_out.bias.as_ref().unwrap().val());
    let len = 12;
    let bias = values(fire.forward(&Span::full(len), &dev()));
    let psi = |x: f64| (0.3 * x).abs().ln_1p();
    let threshold = (-1.5f64 * 6.0).abs();
    for i in 0..len {
        for j in 0..=i {
            let x = psi((i - j) as f64) / (psi((i as f64).max(threshold)) + 1e-6);
            let hidden: Vec<f64> = (0..4)
                .map(|k| (w1[k] as f64 * x + b1[k] as f64).max(0.0))
                .collect();
            for h in 0..2 {
                let want: f64 = b2[h] as f64
                    + (0..4)
                        .map(|k| hidden[k] * w2[k * 2 + h] as f64)
                        .sum::<f64>();
                let got = bias[(h * len + i) * len + j] as f64;
                assert!(close(got, want, 1e-5), "h{h} ({i},{j}): {got} vs {want}");
            }
        }
    }
}

#[test]
fn t5_buckets_follow_the_t5_rule() {
    // Causal, 32 buckets, max distance 128: exact below 16, logarithmic up to 31.
    let causal = |n: i64| t5_bucket(-n, true, 32, 128);
    for n in 0..16 {
        assert_eq!(causal(n), n as usize);
    }
    assert_eq!(causal(16), 16);
    assert_eq!(causal(20), 17); // 16 + floor(ln(20/16) / ln(8) * 16) = 16 + 1
    assert_eq!(causal(64), 26); // 16 + floor(16 * 2/3)
    assert_eq!(causal(127), 31);
    assert_eq!(causal(128), 31);
    assert_eq!(causal(10_000), 31);
    assert_eq!(t5_bucket(5, true, 32, 128), 0, "future keys share bucket 0");
    // Bidirectional: 16 buckets per direction, keys ahead offset by 16.
    assert_eq!(t5_bucket(-3, false, 32, 128), 3);
    assert_eq!(t5_bucket(3, false, 32, 128), 19);
    assert_eq!(t5_bucket(-8, false, 32, 128), 8);
    assert_eq!(t5_bucket(-100, false, 32, 128), 15);
    assert_eq!(t5_bucket(200, false, 32, 128), 31);

    // The module looks the buckets up per head.
    let t5 = T5Config::new().init::<B>(2, &dev()).unwrap();
    let table = values(t5.embedding.val()); // [32, 2]
    let bias = values(t5.forward(&Span::full(40), &dev()));
    let (i, j) = (37, 1); // distance 36
    let bucket = causal(36);
    for h in 0..2 {
        assert_eq!(bias[(h * 40 + i) * 40 + j], table[bucket * 2 + h]);
    }
}

#[test]
fn sinusoidal_table_values() {
    let sin = SinusoidalConfig::new().init(8).unwrap();
    let table = values(sin.table::<B>(3, 2, &dev())); // positions 3 and 4
    for (row, p) in [3.0f64, 4.0].iter().enumerate() {
        for i in 0..4 {
            let angle = p / 10000f64.powf(2.0 * i as f64 / 8.0);
            assert!(close(table[row * 8 + 2 * i] as f64, angle.sin(), 1e-6));
            assert!(close(table[row * 8 + 2 * i + 1] as f64, angle.cos(), 1e-6));
        }
    }
    assert!(
        SinusoidalConfig::new().init(7).is_err(),
        "odd width must be rejected"
    );
}

fn rotaries() -> Vec<(&'static str, Rotary)> {
    let rope = |layout, fraction, scaling| {
        RopeConfig::new()
            .with_layout(layout)
            .with_rotary_fraction(fraction)
            .with_original_max_len(8)
            .init(16, scaling)
            .unwrap()
    };
    vec![
        (
            "rope half-split",
            rope(RopeLayout::HalfSplit, 1.0, RopeScaling::None),
        ),
        (
            "rope interleaved",
            rope(RopeLayout::Interleaved, 1.0, RopeScaling::None),
        ),
        (
            "rope partial",
            rope(RopeLayout::HalfSplit, 0.5, RopeScaling::None),
        ),
        (
            "rope linear",
            rope(RopeLayout::HalfSplit, 1.0, RopeScaling::Linear),
        ),
        (
            "rope ntk",
            rope(RopeLayout::Interleaved, 1.0, RopeScaling::Ntk),
        ),
        (
            "rope dynamic ntk",
            rope(RopeLayout::HalfSplit, 1.0, RopeScaling::DynamicNtk),
        ),
        (
            "rope yarn",
            rope(RopeLayout::HalfSplit, 1.0, RopeScaling::Yarn),
        ),
        (
            "xpos",
            XposConfig::new().with_scale_base(16.0).init(16).unwrap(),
        ),
    ]
}

/// `q` rotated at position `m` dotted with `k` rotated at position `n` (keys span 24 positions).
fn rotated_dot(rotary: &Rotary, q: &Tensor<B, 4>, k: &Tensor<B, 4>, m: usize, n: usize) -> f64 {
    let keys = k.clone().repeat_dim(2, 24);
    let (qr, kr) = rotary.forward(q.clone(), keys, m);
    let kn = kr.narrow(2, n, 1);
    (qr * kn).sum().into_scalar() as f64
}

/// A `[1, 1, 1, n]` vector of uniform values in `[-1, 1)` from its own seeded generator (the
/// backend's random source is shared with the tests running beside this one).
fn seeded_vector(n: usize, seed: u64) -> Tensor<B, 4> {
    let mut rng = dape::util::Rng::new(seed);
    let values: Vec<f32> = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / 8_388_608.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, 1, n]), &dev())
}

#[test]
fn rotary_scores_depend_only_on_relative_position() {
    // Fixed q and k: with random ones, a low-frequency rotary (YaRN) now and then gave a
    // further distance a score within 1e-3 of the first.
    let (q, k) = (seeded_vector(16, 11), seeded_vector(16, 12));
    for (name, rotary) in rotaries() {
        let base = rotated_dot(&rotary, &q, &k, 5, 2);
        for (m, n) in [(9, 6), (3, 0), (20, 17)] {
            let other = rotated_dot(&rotary, &q, &k, m, n);
            assert!(
                close(other, base, 1e-4),
                "{name}: q{m}·k{n} = {other} != q5·k2 = {base}"
            );
        }
        let further = rotated_dot(&rotary, &q, &k, 9, 2);
        assert!(
            !close(further, base, 1e-3),
            "{name}: a different distance gave the same score"
        );
    }
}

#[test]
fn interleaved_rope_matches_burn_nn() {
    let ours = RopeConfig::new()
        .with_layout(RopeLayout::Interleaved)
        .init(16, RopeScaling::None)
        .unwrap();
    let theirs = burn::nn::RotaryEncodingConfig::new(64, 16).init::<B>(&dev());
    let x = Tensor::<B, 4>::random([2, 3, 10, 16], Distribution::Normal(0.0, 1.0), &dev());
    let (q, _) = ours.forward(x.clone(), x.clone(), 7);
    let reference = theirs.apply(x, 7);
    let diff = (q - reference).abs().max().into_scalar();
    assert!(diff < 1e-4, "max difference {diff}");
}

#[test]
fn rope_scaling_rules() {
    let plain = RopeConfig::new().init(16, RopeScaling::None).unwrap();
    let linear = RopeConfig::new()
        .with_scale_factor(2.0)
        .init(16, RopeScaling::Linear)
        .unwrap();
    let q = Tensor::<B, 4>::random([1, 1, 1, 16], Distribution::Normal(0.0, 1.0), &dev());
    // Position interpolation: position 2m under factor 2 is position m without scaling.
    let (a, _) = linear.forward(q.clone(), q.clone(), 10);
    let (b, _) = plain.forward(q.clone(), q.clone(), 5);
    assert!((a - b).abs().max().into_scalar() < 1e-5);

    // NTK: the highest frequency stays 1, the lowest is divided by the factor.
    let ntk = RopeConfig::new()
        .with_scale_factor(4.0)
        .init(16, RopeScaling::Ntk)
        .unwrap();
    let f = ntk.inv_freq(1);
    let p = plain.inv_freq(1);
    assert!(close(f[0], 1.0, 1e-12));
    assert!(close(f[7], p[7] / 4.0, 1e-9), "{} vs {}", f[7], p[7] / 4.0);

    // Dynamic NTK: unscaled up to the training length, scaled past it.
    let dynamic = RopeConfig::new()
        .with_scale_factor(2.0)
        .with_original_max_len(16)
        .init(16, RopeScaling::DynamicNtk)
        .unwrap();
    assert_eq!(dynamic.inv_freq(16), plain.inv_freq(16));
    assert!(dynamic.inv_freq(64)[7] < plain.inv_freq(64)[7]);

    // YaRN: high frequencies kept, low ones interpolated, norms scaled by the attention factor.
    let yarn = RopeConfig::new()
        .with_scale_factor(4.0)
        .with_original_max_len(64)
        .init(16, RopeScaling::Yarn)
        .unwrap();
    let y = yarn.inv_freq(1);
    assert!(close(y[0], p[0], 1e-12), "highest frequency extrapolated");
    assert!(
        close(y[7], p[7] / 4.0, 1e-12),
        "lowest frequency interpolated"
    );
    let (rotated, _) = yarn.forward(q.clone(), q.clone(), 3);
    let ratio = (rotated.powf_scalar(2.0).sum().into_scalar()
        / q.powf_scalar(2.0).sum().into_scalar())
    .sqrt() as f64;
    assert!(
        close(ratio, 0.1 * 4f64.ln() + 1.0, 1e-4),
        "YaRN attention factor {ratio}"
    );
}

#[test]
fn sandwich_bias_matches_the_shifted_sinusoid_inner_product() {
    use dape::encoding::sandwich::sandwich_inner_product;
    use dape::encoding::SandwichConfig;
    let (heads, dim) = (4, 8);
    let sandwich = SandwichConfig::new()
        .with_dim(dim)
        .init::<B>(heads, &dev())
        .unwrap();
    // A bidirectional block of rows 2..5 against keys 0..7: both signs of i - j.
    let span = Span {
        query_start: 2,
        query_len: 3,
        key_len: 7,
        causal: false,
        positions: None,
    };
    let bias = values(sandwich.forward(&span, &dev()));
    for h in 0..heads {
        let ratio = 8.0 * (h + 1) as f64 / heads as f64;
        for r in 0..3 {
            for j in 0..7 {
                let delta = (2 + r) as f64 - j as f64;
                let inner: f64 = (1..=dim / 2)
                    .map(|k| (delta / 10000f64.powf(2.0 * k as f64 / dim as f64)).cos())
                    .sum();
                let want = (inner - (dim / 2) as f64) / ratio;
                let got = bias[(h * 3 + r) * 7 + j] as f64;
                assert!(close(got, want, 1e-5), "h{h} r{r} j{j}: {got} vs {want}");
                if delta == 0.0 {
                    assert!(got.abs() < 1e-6, "distance 0 gives 0");
                } else {
                    assert!(got < 0.0, "other distances are penalised");
                }
            }
        }
    }
    // Small distances by hand: d' = 2 has one frequency, 1/10000.
    assert!(close(
        sandwich_inner_product(3.0, 2, 10000.0),
        (3.0f64 / 10000.0).cos() - 1.0,
        1e-12
    ));
    assert_eq!(sandwich_inner_product(0.0, 128, 10000.0), 0.0);
}

#[test]
fn transformer_xl_logits_match_a_direct_computation() {
    use dape::encoding::TransformerXlConfig;
    let (heads, dh) = (2, 4);
    let d_model = heads * dh;
    let txl = TransformerXlConfig::new()
        .with_init_std(0.5)
        .init::<B>(heads, dh, &dev())
        .unwrap();
    let (lq, lk, start) = (3, 6, 2);
    let q = Tensor::<B, 4>::random([1, heads, lq, dh], Distribution::Normal(0.0, 1.0), &dev());
    let k = Tensor::<B, 4>::random([1, heads, lk, dh], Distribution::Normal(0.0, 1.0), &dev());
    let scale = 1.0 / (dh as f64).sqrt();
    let content = q.clone().matmul(k.clone().transpose()) * scale;
    let span = Span {
        query_start: start,
        query_len: lq,
        key_len: lk,
        causal: false,
        positions: None,
    };
    let got = values(txl.forward(content, q.clone(), k.clone(), &span));
    let (qv, kv) = (values(q), values(k));
    let (u, v) = (values(txl.u.val()), values(txl.v.val()));
    let w = values(txl.w_r.weight.val()); // [d_R, d_model], y = x W
    let half = d_model / 2;
    for h in 0..heads {
        for r in 0..lq {
            for j in 0..lk {
                let delta = (start + r) as f64 - j as f64;
                // R_δ = [sin(δ ω_0..), cos(δ ω_0..)], ω_m = 10000^(-2m/d).
                let rel: Vec<f64> = (0..d_model)
                    .map(|m| {
                        let f = 10000f64.powf(-2.0 * (m % half) as f64 / d_model as f64);
                        if m < half {
                            (delta * f).sin()
                        } else {
                            (delta * f).cos()
                        }
                    })
                    .collect();
                let mut want = 0.0;
                for c in 0..dh {
                    let qc = qv[(h * lq + r) * dh + c] as f64;
                    let kc = kv[(h * lk + j) * dh + c] as f64;
                    let wr: f64 = (0..d_model)
                        .map(|m| rel[m] * w[m * d_model + h * dh + c] as f64)
                        .sum();
                    want += (qc + u[h * dh + c] as f64) * kc + (qc + v[h * dh + c] as f64) * wr;
                }
                want *= scale;
                let got = got[(h * lq + r) * lk + j] as f64;
                assert!(close(got, want, 1e-4), "h{h} r{r} j{j}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn bipe_hooks_match_their_formulas() {
    use dape::encoding::{BipeConfig, SegmentIds};
    use dape::PositionalEncodingConfig;
    let bipe = BipeConfig::new().with_boundary_tokens(vec![7]);
    let ints = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), &dev())
    };
    // Segmentation: a boundary is the last token of its segment.
    let model_side = PositionalEncodingConfig::BipeAlibi {
        segments: bipe.clone(),
        alibi: AlibiConfig::new(),
    }
    .init::<B>(2, 4, &dev())
    .unwrap();
    let ids = ints(vec![1, 7, 2, 3, 7, 7, 4, 5, 6, 1, 1, 7], [2, 6]);
    let (segs, state) = model_side.segments(&ids, None).unwrap().unwrap();
    let index: Vec<i64> = segs.index.clone().into_data().iter::<i64>().collect();
    let position: Vec<i64> = segs.position.clone().into_data().iter::<i64>().collect();
    assert_eq!(index, vec![0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0]);
    assert_eq!(position, vec![0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5]);
    assert_eq!(state.next_index, vec![3, 1]);
    assert_eq!(state.next_position, vec![0, 0]);

    // Embedding: the sinusoid of the in-segment position.
    let x = Tensor::<B, 3>::zeros([2, 6, 8], &dev());
    let embedded = values(model_side.embed(x, 0, None, Some(&segs)).unwrap());
    let sin = SinusoidalConfig::new().init(8).unwrap();
    let table = values(sin.table::<B>(0, 6, &dev()));
    for (t, p) in position.iter().enumerate() {
        let p = *p as usize;
        assert_eq!(
            embedded[t * 8..t * 8 + 8],
            table[p * 8..p * 8 + 8],
            "token {t}"
        );
    }

    // BiPE-ALiBi: -m_h |s_i - s_j| on the logits.
    let logits = Tensor::<B, 4>::zeros([2, 2, 6, 6], &dev());
    let q = Tensor::<B, 4>::zeros([2, 2, 6, 4], &dev());
    let ids = SegmentIds {
        query: segs.index.clone(),
        key: segs.index.clone(),
    };
    let biased =
        values(model_side.adjust_logits(logits, q.clone(), q.clone(), &Span::full(6), Some(&ids)));
    let slopes = alibi_slopes(2);
    for b in 0..2 {
        for h in 0..2 {
            for i in 0..6 {
                for j in 0..6 {
                    let d = (index[b * 6 + i] - index[b * 6 + j]).abs() as f64;
                    let got = biased[((b * 2 + h) * 6 + i) * 6 + j] as f64;
                    assert!(close(got, -slopes[h] * d, 1e-6), "b{b} h{h} ({i},{j})");
                }
            }
        }
    }

    // BiPE-RoPE: rotating by segment indices is RoPE at those positions; with every token its
    // own segment it is plain RoPE.
    let rope_side = PositionalEncodingConfig::BipeRope {
        segments: bipe,
        rope: RopeConfig::new(),
    }
    .init::<B>(2, 16, &dev())
    .unwrap();
    let plain = RopeConfig::new().init(16, RopeScaling::None).unwrap();
    let q = Tensor::<B, 4>::random([1, 2, 5, 16], Distribution::Normal(0.0, 1.0), &dev());
    let k = Tensor::<B, 4>::random([1, 2, 8, 16], Distribution::Normal(0.0, 1.0), &dev());
    let positions = SegmentIds {
        query: ints((3..8).collect(), [1, 5]),
        key: ints((0..8).collect(), [1, 8]),
    };
    let (qa, ka) = rope_side.rotate(q.clone(), k.clone(), 0, None, Some(&positions));
    let (qb, kb) = plain.forward(q.clone(), k.clone(), 3);
    assert!((qa - qb).abs().max().into_scalar() < 1e-5);
    assert!((ka - kb).abs().max().into_scalar() < 1e-5);
    // Keys in the same segment as the query score like keys at distance 0.
    let same = SegmentIds {
        query: ints(vec![2; 5], [1, 5]),
        key: ints(vec![2; 8], [1, 8]),
    };
    let (qs, ks) = rope_side.rotate(q.clone(), k.clone(), 0, None, Some(&same));
    let unrotated = q.matmul(k.transpose());
    let rotated = qs.matmul(ks.transpose());
    assert!((rotated - unrotated).abs().max().into_scalar() < 1e-4);
}

/// Scalable-Softmax through a whole attention layer against a direct computation in f64 on the
/// host: `softmax_j((s_h ln n_i) · (q_i · k_j / √d_head + B_hij))` over the keys row `i` sees,
/// with per-head scales set apart (so a head mix-up shows) and Kerple's bias, causal and
/// bidirectional.
#[test]
fn ssmax_attention_matches_a_direct_computation() {
    use dape::{AttentionConfig, PositionalEncodingConfig, SsmaxConfig};
    let (d_model, heads, len) = (8, 2, 6);
    let dh = d_model / heads;
    for causal in [true, false] {
        let mut layer = AttentionConfig::new(d_model, heads)
            .with_encoding(PositionalEncodingConfig::from_name("kerple_log").unwrap())
            .with_causal(causal)
            .with_ssmax(Some(SsmaxConfig::new()))
            .init::<B>(&dev())
            .unwrap();
        let scales = [0.7f32, 1.9];
        layer.ssmax = Some(Param::from_tensor(Tensor::from_floats(scales, &dev())));
        let x = Tensor::<B, 3>::random([1, len, d_model], Distribution::Normal(0.0, 1.0), &dev());
        let got = values(layer.forward(x.clone()));
        // The projections and the bias, read back from the layer.
        let qkv = values(dape::kernel::linear_layer(&layer.qkv, x));
        let span = Span {
            query_start: 0,
            query_len: len,
            key_len: len,
            causal,
            positions: None,
        };
        let bias = match layer.encoding.additive_logit_bias(&span, &dev()) {
            Some(Some(b)) => values(b),
            _ => panic!("kerple_log is a data-independent bias"),
        };
        let w = values(layer.output.weight.val());
        let b_out = values(layer.output.bias.clone().unwrap().val());
        let at = |t: usize, part: usize, h: usize, c: usize| {
            f64::from(qkv[t * 3 * d_model + part * d_model + h * dh + c])
        };
        let mut heads_out = vec![0.0f64; len * d_model];
        for h in 0..heads {
            for i in 0..len {
                let n = if causal { i + 1 } else { len };
                let factor = f64::from(scales[h]) * (n as f64).ln();
                let z: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..dh).map(|c| at(i, 0, h, c) * at(j, 1, h, c)).sum();
                        let logit =
                            dot / (dh as f64).sqrt() + f64::from(bias[(h * len + i) * len + j]);
                        factor * logit
                    })
                    .collect();
                let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..dh {
                    heads_out[i * d_model + h * dh + c] =
                        (0..n).map(|j| e[j] / sum * at(j, 2, h, c)).sum();
                }
            }
        }
        for i in 0..len {
            for o in 0..d_model {
                let want = f64::from(b_out[o])
                    + (0..d_model)
                        .map(|c| heads_out[i * d_model + c] * f64::from(w[c * d_model + o]))
                        .sum::<f64>();
                let g = f64::from(got[i * d_model + o]);
                assert!(
                    close(g, want, 1e-4),
                    "causal {causal}: out[{i}, {o}] = {g}, formula {want}"
                );
            }
        }
    }
}

/// Forgetting attention's bias against the formula, in f64 on the host: with
/// `f_t = σ(w_h · x_t + b_h)`, `D_ij = Σ_{l=j+1..i} ln f_l` for `j ≤ i` (0 on the diagonal), the
/// mirror image `Σ_{l=i+1..j} ln f_l` after it; and sums continued from a cache's last one equal
/// the sums over the whole sequence.
#[test]
fn forgetting_attention_bias_matches_its_formula() {
    use dape::encoding::{Fox, FoxConfig};
    let (d_model, heads, len) = (6, 3, 7);
    let fox = FoxConfig::new().init::<B>(heads, d_model, &dev()).unwrap();
    let x = Tensor::<B, 3>::random([2, len, d_model], Distribution::Normal(0.0, 1.5), &dev());
    let c = fox.cumulative(x.clone(), None);
    assert_eq!(c.dims(), [2, heads, len]);
    let d = values(Fox::bias(c.clone(), c.clone()));
    let xs = values(x.clone());
    let w = values(fox.gate.weight.val()); // [d_model, heads]
    let b = values(fox.gate.bias.clone().unwrap().val());
    let log_f = |bi: usize, t: usize, h: usize| {
        let z = f64::from(b[h])
            + (0..d_model)
                .map(|k| f64::from(xs[(bi * len + t) * d_model + k]) * f64::from(w[k * heads + h]))
                .sum::<f64>();
        -(1.0 + (-z).exp()).ln()
    };
    for bi in 0..2 {
        for h in 0..heads {
            for i in 0..len {
                for j in 0..len {
                    let (lo, hi) = (i.min(j), i.max(j));
                    let want: f64 = (lo + 1..=hi).map(|l| log_f(bi, l, h)).sum();
                    let got = f64::from(d[((bi * heads + h) * len + i) * len + j]);
                    assert!(
                        close(got, want, 1e-5),
                        "D[{bi}, {h}, {i}, {j}] = {got}, formula {want}"
                    );
                }
            }
        }
    }
    // Continuing from the last sum of a prefix gives the rest of the sequence's sums.
    let prefix = fox.cumulative(x.clone().narrow(1, 0, 4), None);
    let last = prefix.clone().narrow(2, 3, 1);
    let rest = fox.cumulative(x.narrow(1, 4, len - 4), Some(last));
    let whole = values(c.narrow(2, 4, len - 4));
    for (g, w) in values(rest).iter().zip(&whole) {
        assert!(close(f64::from(*g), f64::from(*w), 1e-5), "{g} vs {w}");
    }
}

/// `RopeConfig` against Hugging Face `transformers` (`modeling_rope_utils`, the version named
/// in the fixture): inverse frequencies and attention factors for linear, dynamic NTK and YaRN,
/// with partial rotary, other betas, an explicit attention factor, `mscale` with and without
/// `mscale_all_dim`, no truncation, and a ramp wider than half the rotary width. The fixture
/// comes from `scripts/rope-hf-cases.py`.
#[test]
fn rope_scaling_matches_transformers() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rope_hf.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "fixture has {} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut config = case["config"].clone();
        config["type"] = case["encoding"].clone();
        let encoding = dape::PositionalEncodingConfig::from_value(config).unwrap();
        let head_dim = case["head_dim"].as_u64().unwrap() as usize;
        let rotary = match encoding.init::<B>(2, head_dim, &dev()).unwrap() {
            dape::PositionalEncoding::Rotary(r) => r,
            _ => panic!("{name}: not rotary"),
        };
        let seq_len = case["seq_len"].as_u64().map_or(1, |l| l as usize);
        let got = rotary.inv_freq(seq_len);
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: number of frequencies");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // transformers computes in float32.
            assert!(
                (g - w).abs() <= 2e-6 * w.abs() + 1e-12,
                "{name}: inv_freq[{i}] = {g}, transformers {w}"
            );
        }
        let want = case["attention_factor"].as_f64().unwrap();
        assert!(
            close(rotary.attention_factor, want, 1e-12),
            "{name}: attention factor {} vs transformers {want}",
            rotary.attention_factor
        );
    }
}

/// The learned-bias read-out (`dape bias`) of a static bias is the bias itself: for ALiBi, the
/// first block's `positional_logits` are `-m_h·|i - j|` on a real input, whatever the tokens;
/// an encoding that rotates q and k has no logit bias and says so.
#[test]
fn positional_logits_of_alibi_are_its_formula() {
    use dape::{LanguageModelConfig, PositionalEncodingConfig, TransformerConfig};
    let heads = 4;
    let model = LanguageModelConfig::new(
        11,
        TransformerConfig::new(16, 2, heads)
            .with_encoding(PositionalEncodingConfig::from_name("alibi").unwrap()),
    )
    .init::<B>(&dev())
    .unwrap();
    let len = 9;
    let ids: Vec<i64> = (0..len as i64).map(|i| (i * 5 + 2) % 11).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, len]), &dev());
    let slopes = alibi_slopes(heads);
    for layer in 0..2 {
        let got = values(
            model
                .transformer
                .positional_logits(tokens.clone(), layer)
                .unwrap(),
        );
        for h in 0..heads {
            for i in 0..len {
                for j in 0..len {
                    let want = -slopes[h] * (i as f64 - j as f64).abs();
                    let g = f64::from(got[(h * len + i) * len + j]);
                    assert!(
                        close(g, want, 1e-5),
                        "layer {layer} [{h}, {i}, {j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
    assert!(model
        .transformer
        .positional_logits(tokens.clone(), 2)
        .is_err());
    let rope = LanguageModelConfig::new(
        11,
        TransformerConfig::new(16, 1, heads)
            .with_encoding(PositionalEncodingConfig::from_name("rope").unwrap()),
    )
    .init::<B>(&dev())
    .unwrap();
    let err = rope
        .transformer
        .positional_logits(tokens, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not on the attention logits"), "{err}");
}

/// Kerple's bias on ndarray without autodiff is looked up from one value per distance
/// (`kernel::distance_table_bias`): it equals the formula at every entry, for both kernels, a
/// causal chunk, a non-causal block and randomized positions; under autodiff (a graph node
/// over the same per-distance table) it is the same, and the gradients of `p` and `a` through
/// the table are the formula's derivatives summed over every entry.
#[test]
fn kerple_looked_up_bias_matches_the_formula() {
    use burn::backend::Autodiff;
    use dape::encoding::{AdditiveBias, Positions};
    let spans = [
        Span::full(9),
        Span {
            query_start: 5,
            query_len: 4,
            key_len: 9,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 0,
            query_len: 6,
            key_len: 6,
            causal: false,
            positions: None,
        },
        Span {
            query_start: 2,
            query_len: 3,
            key_len: 6,
            causal: false,
            positions: Some(Positions::new(vec![1, 4, 30, 31, 77, 200]).unwrap()),
        },
    ];
    for kind in [KerpleKind::Log, KerpleKind::Power] {
        let kerple = KerpleConfig::new().init::<B>(3, kind, &dev()).unwrap();
        let (p, a) = (values(kerple.p.val()), values(kerple.a.val()));
        let lift = |t: Tensor<B, 1>| {
            Param::from_tensor(Tensor::<Autodiff<B>, 1>::from_data(t.into_data(), &dev()))
        };
        let tracked = AdditiveBias::Kerple(dape::encoding::Kerple {
            p: lift(kerple.p.val()),
            a: lift(kerple.a.val()),
            kind,
            eps: kerple.eps,
        });
        let kerple = AdditiveBias::Kerple(kerple);
        for span in &spans {
            let got = values(kerple.forward(span, &dev()));
            let other: Vec<f32> = tracked.forward(span, &dev()).into_data().to_vec().unwrap();
            let (lq, lk) = (span.query_len, span.key_len);
            for h in 0..3 {
                let (ph, ah) = (f64::from(p[h].max(1e-2)), f64::from(a[h].max(1e-2)));
                for r in 0..lq {
                    for c in 0..lk {
                        let d =
                            (span.position(span.query_start + r) - span.position(c)).abs() as f64;
                        let want = match kind {
                            KerpleKind::Log => -ph * (1.0 + ah * d).ln(),
                            KerpleKind::Power => {
                                -ph * if d > 0.0 { d.powf(ah.min(2.0)) } else { 0.0 }
                            }
                        };
                        let at = (h * lq + r) * lk + c;
                        let tol = 1e-5 * (1.0 + want.abs());
                        assert!(
                            (f64::from(got[at]) - want).abs() < tol,
                            "{kind:?} {span:?} h{h} r{r} c{c}: {} vs {want}",
                            got[at]
                        );
                        assert!(
                            (f64::from(other[at]) - want).abs() < tol,
                            "autodiff {kind:?}"
                        );
                    }
                }
            }
            // d/dp and d/da of Σ w · bias, with fixed weights w, against the formula's.
            let (lq, lk) = (span.query_len, span.key_len);
            let weight = |at: usize| ((at % 7) as f64 - 3.0) / 3.0;
            let w: Vec<f32> = (0..3 * lq * lk).map(|at| weight(at) as f32).collect();
            let w = Tensor::<Autodiff<B>, 4>::from_data(TensorData::new(w, [1, 3, lq, lk]), &dev());
            let grads = (tracked.forward(span, &dev()) * w).sum().backward();
            let AdditiveBias::Kerple(k) = &tracked else {
                unreachable!()
            };
            let dp: Vec<f32> =
                k.p.val()
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .to_vec()
                    .unwrap();
            let da: Vec<f32> =
                k.a.val()
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .to_vec()
                    .unwrap();
            for h in 0..3 {
                // The parameters are clamped (p, a ≥ eps; the power kernel's a ≤ 2): outside,
                // the gradient is 0.
                let eps = k.eps;
                let a_max = if kind == KerpleKind::Power {
                    2.0
                } else {
                    f64::INFINITY
                };
                let (ph, ah) = (f64::from(p[h]).max(eps), f64::from(a[h]).clamp(eps, a_max));
                let p_live = f64::from(p[h]) >= eps;
                let a_live = f64::from(a[h]) >= eps && f64::from(a[h]) <= a_max;
                let (mut want_p, mut want_a) = (0.0, 0.0);
                // The sums of the terms' sizes: the f32 sums cancel (weights of both signs), so
                // their rounding is relative to these, not to the result.
                let (mut size_p, mut size_a) = (0.0, 0.0);
                for r in 0..lq {
                    for c in 0..lk {
                        let d =
                            (span.position(span.query_start + r) - span.position(c)).abs() as f64;
                        let wt = weight((h * lq + r) * lk + c);
                        let (bp, ba) = match kind {
                            KerpleKind::Log => (-(1.0 + ah * d).ln(), -ph * d / (1.0 + ah * d)),
                            KerpleKind::Power if d > 0.0 => {
                                (-d.powf(ah), -ph * d.powf(ah) * d.ln())
                            }
                            KerpleKind::Power => (0.0, 0.0),
                        };
                        want_p += if p_live { wt * bp } else { 0.0 };
                        want_a += if a_live { wt * ba } else { 0.0 };
                        size_p += (wt * bp).abs();
                        size_a += (wt * ba).abs();
                    }
                }
                for (what, got, want, size) in
                    [("p", dp[h], want_p, size_p), ("a", da[h], want_a, size_a)]
                {
                    // 1e-4 of the terms' size: Burn's ndarray elementwise ops on the table are
                    // good to about 1e-5 relative, not to f32 rounding (over 200 runs with
                    // random p and a, the randomized-positions span's `da` reached 1.3e-5 of
                    // the size); a wrong derivative is off by the size itself.
                    assert!(
                        (f64::from(got) - want).abs() < 1e-4 * (1.0 + size),
                        "{kind:?} {span:?} h{h}: d{what} {got} vs {want} (p {}, a {}, size {size})",
                        p[h],
                        a[h]
                    );
                }
            }
        }
    }
}

/// Stick-breaking attention through a whole causal layer against fla's own
/// `naive_stickbreaking_attn` (fla-core, computed in float64 by
/// `scripts/stick-breaking-cases.py`): the layer's QKV projection set to the fixture's, its
/// output projection to the identity, so its output is fla's `o`. Cases with and without the
/// query's own key on the stick, four heads, and saturated logits (|z| in the tens).
#[test]
fn stick_breaking_matches_fla_reference() {
    use burn::module::Param;
    use dape::{AttentionConfig, StickBreakingConfig};
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/stick_breaking_fla.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4, "fixture has {} cases", cases.len());
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let heads = case["heads"].as_u64().unwrap() as usize;
        let shape = case["shape"].as_array().unwrap();
        let (t, d) = (
            shape[0].as_u64().unwrap() as usize,
            shape[1].as_u64().unwrap() as usize,
        );
        let sb = StickBreakingConfig::new()
            .with_attend_current(case["attend_current"].as_bool().unwrap());
        let mut layer = AttentionConfig::new(d, heads)
            .with_stick_breaking(Some(sb))
            .init::<B>(&dev())
            .unwrap();
        let tensor2 = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(v, shape), &dev())
        };
        layer.qkv.weight = Param::from_tensor(tensor2(floats(&case["qkv_weight"]), [d, 3 * d]));
        layer.qkv.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(floats(&case["qkv_bias"]), [3 * d]),
            &dev(),
        )));
        layer.output.weight = Param::from_tensor(Tensor::eye(d, &dev()));
        layer.output.bias = Some(Param::from_tensor(Tensor::zeros([d], &dev())));
        let x = tensor2(floats(&case["x"]), [t, d]).reshape([1, t, d]);
        let got = values(layer.forward(x));
        let want = floats(&case["o"]);
        assert_eq!(got.len(), want.len(), "{name}: output size");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                close(f64::from(*g), f64::from(*w), 2e-5),
                "{name}: o[{}, {}] = {g}, fla {w}",
                i / d,
                i % d
            );
        }
    }
}

/// Bidirectional stick-breaking (this crate's form: a stick on either side of the query, each
/// broken outward from it and weighted ½) through a whole layer against its formula in f64 on
/// the host, with and without the query's own key on both sticks.
#[test]
fn bidirectional_stick_breaking_matches_its_formula() {
    use burn::module::Param;
    use dape::{AttentionConfig, StickBreakingConfig};
    let (d, heads, len) = (8, 2, 9);
    let dh = d / heads;
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    for current in [false, true] {
        let mut layer = AttentionConfig::new(d, heads)
            .with_causal(false)
            .with_stick_breaking(Some(
                StickBreakingConfig::new().with_attend_current(current),
            ))
            .init::<B>(&dev())
            .unwrap();
        layer.output.weight = Param::from_tensor(Tensor::eye(d, &dev()));
        layer.output.bias = Some(Param::from_tensor(Tensor::zeros([d], &dev())));
        let x = Tensor::<B, 3>::random([1, len, d], Distribution::Normal(0.0, 1.5), &dev());
        let got = values(layer.forward(x.clone()));
        let qkv = values(dape::kernel::linear_layer(&layer.qkv, x));
        let at = |t: usize, part: usize, h: usize, c: usize| {
            f64::from(qkv[t * 3 * d + part * d + h * dh + c])
        };
        for h in 0..heads {
            for i in 0..len {
                let z = |j: usize| {
                    (0..dh)
                        .map(|c| at(i, 0, h, c) * at(j, 1, h, c))
                        .sum::<f64>()
                        / (dh as f64).sqrt()
                };
                let mut weights = vec![0.0f64; len];
                // Each side: keys in order of distance from the query.
                let before: Vec<usize> = (0..=i).rev().filter(|&j| j < i || current).collect();
                let after: Vec<usize> = (i..len).filter(|&j| j > i || current).collect();
                for side in [before, after] {
                    let mut left = 1.0;
                    for j in side {
                        let take = sigmoid(z(j)) * left;
                        weights[j] += 0.5 * take;
                        left -= take;
                    }
                }
                for c in 0..dh {
                    let want: f64 = (0..len).map(|j| weights[j] * at(j, 2, h, c)).sum();
                    let g = f64::from(got[i * d + h * dh + c]);
                    assert!(
                        close(g, want, 1e-4),
                        "attend_current {current}: o[{i}, head {h}, {c}] = {g}, formula {want}"
                    );
                }
            }
        }
    }
}

/// QK-norm makes the logits independent of the lengths of q and k: scaling the query and key
/// projections by 3 leaves a normalised layer's output unchanged (and changes a plain one's).
/// A sliding window of 1 leaves each row its own key alone, so the output is the output
/// projection of the row's own value.
#[test]
fn qk_norm_is_scale_free_and_a_window_of_one_sees_the_row_alone() {
    use burn::module::Param;
    use dape::{AttentionConfig, QkNormConfig};
    let (d, heads, len) = (8, 2, 6);
    let x = Tensor::<B, 3>::random([1, len, d], Distribution::Normal(0.0, 1.0), &dev());
    for normalised in [true, false] {
        let layer = AttentionConfig::new(d, heads)
            .with_encoding(dape::PositionalEncodingConfig::from_name("rope").unwrap())
            .with_qk_norm(normalised.then(QkNormConfig::new))
            .init::<B>(&dev())
            .unwrap();
        let mut scaled = layer.clone();
        // Columns 0..2d of the packed projection are q's and k's.
        let col_scale: Vec<f32> = (0..3 * d)
            .map(|c| if c < 2 * d { 3.0 } else { 1.0 })
            .collect();
        let col_scale = Tensor::<B, 1>::from_floats(col_scale.as_slice(), &dev());
        let w = layer.qkv.weight.val() * col_scale.clone().reshape([1, 3 * d]);
        scaled.qkv.weight = Param::from_tensor(w);
        let b = layer.qkv.bias.as_ref().unwrap().val() * col_scale;
        scaled.qkv.bias = Some(Param::from_tensor(b));
        let diff = (layer.forward(x.clone()) - scaled.forward(x.clone()))
            .abs()
            .max()
            .into_scalar();
        // Normalising a scaled q or k rounds differently in float32: 1.1e-5 seen on one
        // random draw, against the 1e-3 and more that the scale makes without QK-norm.
        if normalised {
            assert!(
                diff < 1e-4,
                "QK-norm: scaling q and k changed the output by {diff}"
            );
        } else {
            assert!(
                diff > 1e-3,
                "without QK-norm the scale should matter ({diff})"
            );
        }
    }
    let layer = AttentionConfig::new(d, heads)
        .with_sliding_window(Some(1))
        .init::<B>(&dev())
        .unwrap();
    let qkv = dape::kernel::linear_layer(&layer.qkv, x.clone());
    let v = qkv.narrow(2, 2 * d, d);
    let want = dape::kernel::linear_layer(&layer.output, v);
    let diff = (layer.forward(x) - want).abs().max().into_scalar();
    assert!(
        diff < 1e-5,
        "window 1: differs from the row's own value by {diff}"
    );
}

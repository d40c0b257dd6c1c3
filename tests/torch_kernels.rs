//! LibTorch's fused kernels (`--features tch`: PyTorch's exact GELU, `native_layer_norm` and CPU
//! flash attention, each one graph node under autodiff) against the tensor path on the same
//! backend, in values and in every gradient: causal and not, with and without a bias, a chunk
//! of rows past position 0, a single decode row, a bias that needs a gradient (which takes the
//! matrix-product node, flash attention giving no gradient for its mask), and the softmax of
//! adjusted logits; attention over a packed projection (q, k and v as views, the gradient
//! written packed); DAPE V1's correction node (over a learned, a fixed and no bias; one block
//! and ragged blocks of rows); and `FusedAdamW`'s in-place step against Burn's `AdamW`. CI runs it with
//! the LibTorch of `scripts/setup-libtorch.sh`: `cargo test --features tch --test torch_kernels`.
#![cfg(feature = "tch")]

mod common;

use burn::backend::libtorch::LibTorchDevice;
use burn::backend::{Autodiff, LibTorch};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use burn::module::{AutodiffModule, Param};
use dape::encoding::{
    AdditiveBias, AlibiConfig, Dape, DapeConfig, DapeV2, DapeV2Config, KerpleConfig, KerpleKind,
    Span,
};
use dape::kernel::{attention, attention_packed, gelu, layer_norm, layer_norm_tensor};
use dape::util::gelu_exact;

type Tb = LibTorch<f32>;
type Ta = Autodiff<Tb>;

const DEVICE: LibTorchDevice = LibTorchDevice::Cpu;
const TOL: f32 = 2e-5;

/// Deterministic values in about [-scale, scale].
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor<B: Backend<Device = LibTorchDevice>, const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed, scale), shape), &DEVICE)
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32")
}

/// Largest |a - b| relative to b's largest magnitude (at least 1).
fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        err <= TOL * scale,
        "{what}: max error {err:e} against scale {scale}"
    );
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite values");
}

/// A leaf with gradient, and an intermediate computed from it (`2 · leaf`): Burn's
/// `is_require_grad` is true for leaves only, and the kernels must work on both.
fn leaf<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Ta, D> {
    tensor::<Ta, D>(shape, seed, 1.0).require_grad()
}

/// `sum(y · w)` for fixed weights `w`, so that every output element gets its own gradient.
fn loss<const D: usize>(y: Tensor<Ta, D>, seed: u64) -> Tensor<Ta, 1> {
    let w = tensor::<Ta, D>(y.dims(), seed, 1.0);
    (y * w).sum()
}

#[test]
fn gelu_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = common::autodiff_lock();
    for intermediate in [false, true] {
        let run = |fused: bool| {
            let x = leaf([6, 40], 1);
            let input = if intermediate {
                x.clone() * 2.0
            } else {
                x.clone()
            };
            let y = if fused {
                gelu(input)
            } else {
                gelu_exact(input)
            };
            let grads = loss(y.clone(), 2).backward();
            (to_vec(y), to_vec(x.grad(&grads).expect("x's gradient")))
        };
        let ((y, gx), (y_ref, gx_ref)) = (run(true), run(false));
        assert_close("gelu values", &y, &y_ref);
        assert_close("gelu dx", &gx, &gx_ref);
    }
    let x = tensor::<Tb, 2>([3, 9], 3, 3.0);
    assert_close(
        "gelu values (no autodiff)",
        &to_vec(gelu(x.clone())),
        &to_vec(gelu_exact(x)),
    );
}

#[test]
fn layer_norm_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    for with_beta in [true, false] {
        let run = |fused: bool| {
            let x = leaf([2, 5, 6], 4);
            let gamma = leaf([6], 5);
            let beta = leaf([6], 6);
            let input = x.clone() * 2.0 + 0.5;
            let b = with_beta.then(|| beta.clone());
            let y = if fused {
                layer_norm(input, gamma.clone(), b, 1e-5)
            } else {
                layer_norm_tensor(input, gamma.clone(), b, 1e-5)
            };
            let grads = loss(y.clone(), 7).backward();
            let mut out = vec![
                to_vec(y),
                to_vec(x.grad(&grads).expect("x's gradient")),
                to_vec(gamma.grad(&grads).expect("gamma's gradient")),
            ];
            if with_beta {
                out.push(to_vec(beta.grad(&grads).expect("beta's gradient")));
            }
            out
        };
        let (fused, reference) = (run(true), run(false));
        for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
            let what = ["values", "dx", "dgamma", "dbeta"][i];
            assert_close(&format!("layer norm {what} (beta: {with_beta})"), a, b);
        }
    }
}

/// `softmax(scale · q kᵀ + bias, causal mask) · v` by tensor ops, `[batch, rows, heads, d]`.
fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Tensor<B, 4> {
    let mut logits = q.matmul(k.transpose()) * scale;
    if let Some(bias) = bias {
        logits = logits + bias;
    }
    softmax_reference(logits, causal_from)
        .matmul(v)
        .swap_dims(1, 2)
}

/// `softmax(mask_fill(x, future, -inf))` over the last dimension by tensor ops, with the causal
/// mask of rows from position `causal_from` (none when `None`).
fn softmax_reference<B: Backend>(x: Tensor<B, 4>, causal_from: Option<usize>) -> Tensor<B, 4> {
    let [b, h, rows, keys] = x.dims();
    let Some(q0) = causal_from else {
        return softmax(x, 3);
    };
    let future: Vec<bool> = (0..rows)
        .flat_map(|r| (0..keys).map(move |c| c > q0 + r))
        .collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(future, [rows, keys]), &x.device())
        .unsqueeze::<4>()
        .expand([b, h, rows, keys]);
    softmax(x.mask_fill(mask, f32::NEG_INFINITY), 3)
}

/// One attention case: `rows` query rows over `keys` keys, the first row at position `q0`
/// when causal, a bias broadcast over the batch or one per batch element.
#[derive(Debug)]
struct Case {
    rows: usize,
    keys: usize,
    causal_from: Option<usize>,
    bias: Option<usize>,
}

const CASES: [Case; 6] = [
    // Whole causal sequence without a bias: PyTorch's own causal flag.
    Case {
        rows: 7,
        keys: 7,
        causal_from: Some(0),
        bias: None,
    },
    // ALiBi-like: a bias shared by the batch, causal.
    Case {
        rows: 7,
        keys: 7,
        causal_from: Some(0),
        bias: Some(1),
    },
    // A chunk of rows past position 0, with a bias.
    Case {
        rows: 3,
        keys: 8,
        causal_from: Some(5),
        bias: Some(1),
    },
    // Not causal, one bias per batch element.
    Case {
        rows: 5,
        keys: 6,
        causal_from: None,
        bias: Some(2),
    },
    // One decode row over a cache.
    Case {
        rows: 1,
        keys: 9,
        causal_from: Some(8),
        bias: None,
    },
    // Not causal, no bias.
    Case {
        rows: 4,
        keys: 4,
        causal_from: None,
        bias: None,
    },
];

/// Attention by the kernel (`fused`) or by [`attention_reference`], under autodiff: the values
/// and the gradients of q, k, v and, for a learned bias (`learned`: an intermediate of a leaf,
/// as Kerple's is), of the bias's leaf.
fn attention_run(case: &Case, fused: bool, learned: bool) -> Vec<Vec<f32>> {
    let (b, h, d) = (2, 3, 8);
    let scale = (d as f32).sqrt().recip();
    let q = leaf([b, h, case.rows, d], 10);
    let k = leaf([b, h, case.keys, d], 11);
    let v = leaf([b, h, case.keys, d], 12);
    // Intermediates, as the attention layer's q, k and v are.
    let (qi, ki, vi) = (q.clone() * 1.5, k.clone() * 1.5, v.clone() - 0.25);
    let table = case.bias.map(|bb| {
        let t = tensor::<Ta, 4>([bb, h, case.rows, case.keys], 13, 1.0);
        if learned {
            t.require_grad()
        } else {
            t
        }
    });
    let bias = table.clone().map(|t| t * 2.0);
    let y = if fused {
        attention(qi, ki, vi, bias, scale, case.causal_from)
            .unwrap_or_else(|| panic!("{case:?}: the kernel must apply"))
    } else {
        attention_reference(qi, ki, vi, bias, scale, case.causal_from)
    };
    let grads = loss(y.clone(), 14).backward();
    let mut out = vec![
        to_vec(y),
        to_vec(q.grad(&grads).expect("dq")),
        to_vec(k.grad(&grads).expect("dk")),
        to_vec(v.grad(&grads).expect("dv")),
    ];
    if learned {
        let table = table.expect("a learned case has a bias");
        out.push(to_vec(table.grad(&grads).expect("dbias")));
    }
    out
}

#[test]
fn flash_attention_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = common::autodiff_lock();
    let (b, h, d) = (2, 3, 8);
    let scale = (d as f32).sqrt().recip();
    for case in &CASES {
        let (fused, reference) = (
            attention_run(case, true, false),
            attention_run(case, false, false),
        );
        for (j, (a, r)) in fused.iter().zip(&reference).enumerate() {
            let what = ["values", "dq", "dk", "dv"][j];
            assert_close(&format!("{case:?} {what}"), a, r);
        }
        // Without autodiff (evaluation), the same values.
        let [q, k, v] = [(case.rows, 10), (case.keys, 11), (case.keys, 12)]
            .map(|(n, seed)| tensor::<Tb, 4>([b, h, n, d], seed, 1.0));
        let bias = case
            .bias
            .map(|bb| tensor::<Tb, 4>([bb, h, case.rows, case.keys], 13, 2.0));
        let y = attention(
            q.clone(),
            k.clone(),
            v.clone(),
            bias.clone(),
            scale,
            case.causal_from,
        )
        .expect("the kernel applies without autodiff");
        let y_ref = attention_reference(q, k, v, bias, scale, case.causal_from);
        assert_close(
            &format!("{case:?} values (no autodiff)"),
            &to_vec(y),
            &to_vec(y_ref),
        );
    }
}

#[test]
fn attention_with_a_learned_bias_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    // PyTorch's flash kernel gives no gradient for its mask: a bias that needs one takes the
    // node of matrix products and softmax kernels, which must give the bias's gradient too
    // (summed over the batch when one bias serves it).
    let mut checked = 0;
    for case in CASES.iter().filter(|c| c.bias.is_some()) {
        let (fused, reference) = (
            attention_run(case, true, true),
            attention_run(case, false, true),
        );
        assert_eq!(fused.len(), 5);
        for (j, (a, r)) in fused.iter().zip(&reference).enumerate() {
            let what = ["values", "dq", "dk", "dv", "dbias"][j];
            assert_close(&format!("learned bias, {case:?} {what}"), a, r);
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "shared, chunked and per-batch biases");
}

/// Attention over a packed projection `[batch, seq, 3 · heads, d]` by the kernel (`fused`:
/// q, k and v read as views, the gradient written packed) or by splitting it and
/// [`attention_reference`]: the values and the gradients of the projection's leaf and, for a
/// learned bias, of the bias's leaf. Every row sees the whole sequence or, causal, the keys up
/// to its own.
fn packed_run(case: &Case, fused: bool, learned: bool) -> Vec<Vec<f32>> {
    let (b, h, d, l) = (2, 3, 8, case.rows);
    let scale = (d as f32).sqrt().recip();
    let leaf_qkv = leaf([b, l, 3 * h, d], 20);
    // An intermediate, as the layer's projection is.
    let qkv = leaf_qkv.clone() * 1.5;
    let table = case.bias.map(|bb| {
        let t = tensor::<Ta, 4>([bb, h, l, l], 21, 1.0);
        if learned {
            t.require_grad()
        } else {
            t
        }
    });
    let bias = table.clone().map(|t| t * 2.0);
    let y = if fused {
        attention_packed(qkv, h, bias, scale, case.causal_from)
            .unwrap_or_else(|| panic!("{case:?}: the packed kernel must apply"))
    } else {
        let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(2, i * h, h).swap_dims(1, 2));
        attention_reference(q, k, v, bias, scale, case.causal_from)
    };
    let grads = loss(y.clone(), 22).backward();
    let mut out = vec![to_vec(y), to_vec(leaf_qkv.grad(&grads).expect("dqkv"))];
    if learned {
        let table = table.expect("a learned case has a bias");
        out.push(to_vec(table.grad(&grads).expect("dbias")));
    }
    out
}

#[test]
fn packed_attention_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    // The packed kernel takes whole sequences: causal from position 0, or not causal.
    let cases = CASES
        .iter()
        .filter(|c| c.rows == c.keys && c.causal_from.is_none_or(|q0| q0 == 0));
    let mut ran = 0;
    for case in cases {
        for learned in [false, true] {
            if learned && case.bias.is_none() {
                continue;
            }
            let want = packed_run(case, false, learned);
            let got = packed_run(case, true, learned);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{case:?}, learned {learned}, output {i}"), g, w);
            }
            ran += 1;
        }
    }
    assert!(ran >= 4, "only {ran} packed cases ran");
    // Without autodiff: the forward pass alone, with a bias.
    let (h, d) = (3, 8);
    let qkv = tensor::<Tb, 4>([2, 6, 3 * h, d], 23, 1.0);
    let bias = tensor::<Tb, 4>([1, h, 6, 6], 24, 1.0);
    let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(2, i * h, h).swap_dims(1, 2));
    assert_close(
        "packed attention without autodiff",
        &to_vec(attention_packed(qkv, h, Some(bias.clone()), 0.3, Some(0)).expect("applies")),
        &to_vec(attention_reference(q, k, v, Some(bias), 0.3, Some(0))),
    );
}

#[test]
fn softmax_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = common::autodiff_lock();
    let (b, h) = (2, 3);
    for case in &CASES {
        let run = |fused: bool| {
            let x = leaf([b, h, case.rows, case.keys], 30);
            // An intermediate, as adjusted logits are; kept to check that it is not masked in
            // place.
            let logits = x.clone() * 3.0;
            let p = if fused {
                dape::kernel::fused_softmax(logits.clone(), case.causal_from)
                    .unwrap_or_else(|_| panic!("{case:?}: the kernel must apply"))
            } else {
                softmax_reference(logits.clone(), case.causal_from)
            };
            let grads = loss(p.clone(), 31).backward();
            [
                to_vec(p),
                to_vec(x.grad(&grads).expect("dx")),
                to_vec(logits),
            ]
        };
        let (fused, reference) = (run(true), run(false));
        for (j, (a, r)) in fused.iter().zip(&reference).enumerate() {
            let what = ["values", "dx", "input after the call"][j];
            assert_close(&format!("softmax {case:?} {what}"), a, r);
        }
        let x = tensor::<Tb, 4>([b, h, case.rows, case.keys], 30, 3.0);
        let p = dape::kernel::fused_softmax(x.clone(), case.causal_from)
            .unwrap_or_else(|_| panic!("{case:?}: the kernel applies without autodiff"));
        let reference = to_vec(softmax_reference(x, case.causal_from));
        assert_close(
            &format!("softmax {case:?} (no autodiff)"),
            &to_vec(p),
            &reference,
        );
    }
}

/// A linear layer with fixed parameters (not the backend's random source).
fn adamw_model() -> burn::nn::Linear<Ta> {
    let mut model = burn::nn::LinearConfig::new(37, 23).init::<Ta>(&DEVICE);
    model.weight = burn::module::Param::from_tensor(tensor([37, 23], 40, 0.3));
    model.bias = Some(burn::module::Param::from_tensor(tensor([23], 41, 0.3)));
    model
}

/// Gradients of a loss whose gradient norm is far above 1 (`scale` 30) or below it (0.01).
fn adamw_grads(
    model: &burn::nn::Linear<Ta>,
    step: u64,
    scale: f32,
) -> burn::optim::GradientsParams {
    let x = tensor::<Ta, 2>([5, 37], 50 + step, 1.0);
    let loss = model.forward(x).powf_scalar(2.0).mean().mul_scalar(scale);
    burn::optim::GradientsParams::from_grads(loss.backward(), model)
}

fn adamw_values(model: &burn::nn::Linear<Ta>) -> Vec<f32> {
    let mut v = to_vec(model.weight.val());
    v.extend(to_vec(model.bias.as_ref().expect("bias").val()));
    v
}

#[test]
fn fused_adamw_is_burns_adamw_and_leaves_held_tensors_alone() {
    let _graphs = common::autodiff_lock();
    use burn::grad_clipping::GradientClippingConfig;
    use burn::optim::{AdamWConfig, Optimizer};
    use dape::optim::FusedAdamWConfig;
    // Several steps, so the moments and their bias corrections count; a step at learning rate
    // 0 (decay and update skipped, the moments still move).
    for (wd, clip, scale) in [
        (0.1, Some(1.0), 30.0),
        (0.1, Some(1.0), 0.01),
        (0.0, None, 30.0),
        (0.3, Some(0.05), 1.0),
    ] {
        let mut reference = adamw_model();
        let mut fused = adamw_model();
        let mut burn_opt = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_weight_decay(wd)
            .with_grad_clipping(clip.map(GradientClippingConfig::Norm))
            .init::<Ta, burn::nn::Linear<Ta>>();
        let mut fused_opt = FusedAdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_weight_decay(wd)
            .with_grad_clip_norm(clip)
            .init::<Ta, burn::nn::Linear<Ta>>()
            .expect("valid settings");
        for step in 0..6u64 {
            let lr = if step == 3 {
                0.0
            } else {
                1e-2 / (1.0 + step as f64)
            };
            let g = adamw_grads(&reference, step, scale);
            reference = burn_opt.step(lr, reference, g);
            let g = adamw_grads(&fused, step, scale);
            fused = fused_opt.step(lr, fused, g);
            let case = format!("AdamW: wd {wd}, clip {clip:?}, scale {scale}, step {step}");
            assert_close(&case, &adamw_values(&fused), &adamw_values(&reference));
        }
    }
    // A module handed in while a clone and a tensor of it are held elsewhere: those keep their
    // values (the step copies what it cannot own), the result moves.
    let model = adamw_model();
    let before = adamw_values(&model);
    let held = model.weight.val();
    let mut opt = FusedAdamWConfig::new()
        .init::<Ta, burn::nn::Linear<Ta>>()
        .expect("valid settings");
    let g = adamw_grads(&model, 0, 30.0);
    let stepped = opt.step(1e-2, model.clone(), g);
    assert_ne!(
        adamw_values(&stepped),
        before,
        "the step moved the parameters"
    );
    assert_eq!(
        adamw_values(&model),
        before,
        "the module handed in is unchanged"
    );
    assert_eq!(
        to_vec(held),
        before[..37 * 23],
        "a tensor held elsewhere is unchanged"
    );
}

/// Hidden biases of ±8 (alternating) plus noise of ±0.1 from `seed`: no pre-activation then lies
/// near LeakyReLU's kink, where the two paths' roundings could take different slopes.
fn kink_free_biases(width: usize, seed: u64) -> Param<Tensor<Ta, 1>> {
    let signs: Vec<f32> = (0..width)
        .map(|i| if i % 2 == 0 { 8.0 } else { -8.0 })
        .collect();
    Param::from_tensor(
        Tensor::<Ta, 1>::from_floats(signs.as_slice(), &DEVICE)
            + tensor::<Ta, 1>([width], seed, 0.1),
    )
}

/// DAPE V1 over Kerple (a bias with learned parameters), over ALiBi (a fixed bias) and over
/// NoPE, with hidden biases of ±8 so that no pre-activation lies near LeakyReLU's kink (where
/// the two paths' roundings could take different slopes).
fn dape_module(base: &str) -> Dape<Ta> {
    let heads = 4;
    let bias = match base {
        "kerple" => {
            let mut k = KerpleConfig::new()
                .init::<Ta>(heads, KerpleKind::Log, &DEVICE)
                .expect("kerple");
            k.p = Param::from_tensor(tensor::<Ta, 1>([heads], 51, 0.5) + 1.0);
            k.a = Param::from_tensor(tensor::<Ta, 1>([heads], 52, 0.5) + 1.0);
            Some(AdditiveBias::Kerple(k))
        }
        "alibi" => Some(AdditiveBias::Alibi(
            AlibiConfig::new()
                .init::<Ta>(heads, &DEVICE)
                .expect("alibi"),
        )),
        _ => None,
    };
    let mut dape = DapeConfig::new()
        .with_negative_slope(0.1)
        .init::<Ta>(heads, bias, &DEVICE)
        .expect("dape");
    let width = dape.mlp_in.weight.dims()[1];
    dape.mlp_in.bias = Some(kink_free_biases(width, 53));
    dape.mlp_out.bias = Some(Param::from_tensor(tensor::<Ta, 1>([heads], 54, 1.0)));
    dape
}

/// The output of DAPE and the gradients of the logits and of every parameter, by the LibTorch
/// node (`fused`, over blocks of hidden tensors of at most `budget` elements) or by the tensor
/// path in one block.
fn dape_run(
    dape: &Dape<Ta>,
    span: &Span,
    batch: usize,
    fused: bool,
    budget: usize,
) -> Vec<(String, Vec<f32>)> {
    let leaf_a = leaf([batch, 4, span.query_len, span.key_len], 55);
    // An intermediate, as the attention layer's logits are.
    let a = leaf_a.clone() * 2.0;
    let out = if fused {
        dape.forward_in_blocks(a, span, budget)
    } else {
        dape.forward_tensor_path(a, span, usize::MAX)
    };
    let grads = loss(out.clone(), 56).backward();
    let mut got = vec![
        ("output".to_string(), to_vec(out)),
        (
            "d logits".to_string(),
            to_vec(leaf_a.grad(&grads).expect("logits' gradient")),
        ),
        (
            "d w1".to_string(),
            to_vec(dape.mlp_in.weight.grad(&grads).expect("w1")),
        ),
        (
            "d w2".to_string(),
            to_vec(dape.mlp_out.weight.grad(&grads).expect("w2")),
        ),
    ];
    for (name, b) in [("d b1", &dape.mlp_in.bias), ("d b2", &dape.mlp_out.bias)] {
        let b = b.as_ref().expect("a bias");
        got.push((name.into(), to_vec(b.grad(&grads).expect("bias gradient"))));
    }
    if let Some(AdditiveBias::Kerple(k)) = &dape.bias {
        got.push(("d kerple p".into(), to_vec(k.p.grad(&grads).expect("p"))));
        got.push(("d kerple a".into(), to_vec(k.a.grad(&grads).expect("a"))));
    }
    got
}

#[test]
fn dape_node_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    let spans = [
        Span::full(13),
        // A chunk of rows past position 0, and a single decode row.
        Span {
            query_start: 6,
            query_len: 5,
            key_len: 11,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 9,
            query_len: 1,
            key_len: 10,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 0,
            query_len: 7,
            key_len: 12,
            causal: false,
            positions: None,
        },
    ];
    for base in ["kerple", "alibi", "nope"] {
        let dape = dape_module(base);
        let width = dape.mlp_in.weight.dims()[1];
        for span in &spans {
            let batch = 3;
            let reference = dape_run(&dape, span, batch, false, usize::MAX);
            // One block, and blocks of 3 rows (ragged: the last one shorter).
            for rows in [span.query_len, 3] {
                let budget = rows * batch * width * span.key_len;
                let fused = dape_run(&dape, span, batch, true, budget);
                for ((name, got), (_, want)) in fused.iter().zip(&reference) {
                    assert_close(
                        &format!("dape over {base}, {span:?}, {rows} rows per block: {name}"),
                        got,
                        want,
                    );
                }
            }
        }
        // Without autodiff (evaluation): the forward pass alone.
        let dape = dape.valid();
        let span = &spans[1];
        let a = tensor::<Tb, 4>([2, 4, span.query_len, span.key_len], 57, 2.0);
        let budget = 2 * 2 * width * span.key_len;
        assert_close(
            &format!("dape over {base} without autodiff"),
            &to_vec(dape.forward_in_blocks(a.clone(), span, budget)),
            &to_vec(dape.forward_tensor_path(a, span, usize::MAX)),
        );
    }
}

/// DAPE over a map computed outside it (`Dape::forward_with_map`): one per sequence
/// (`[batch, H, rows, keys]`, forgetting attention's, as DAPE-FoX passes it) and one shared by
/// the batch (`[1, H, rows, keys]`). The LibTorch node against the tensor path, in the output and
/// the gradients of the logits, the map and both layers.
#[test]
fn dape_node_over_a_map_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    let heads = 4;
    let mut dape = DapeConfig::new()
        .with_negative_slope(0.1)
        .init_over_external::<Ta>(heads, &DEVICE)
        .expect("dape over an external map");
    // Hidden biases of ±8, as in `dape_module`: no pre-activation near LeakyReLU's kink.
    let width = dape.mlp_in.weight.dims()[1];
    dape.mlp_in.bias = Some(kink_free_biases(width, 61));
    dape.mlp_out.bias = Some(Param::from_tensor(tensor::<Ta, 1>([heads], 62, 1.0)));
    let (batch, rows, keys) = (3, 6, 9);
    let run = |maps: usize, fused: bool| -> Vec<(&str, Vec<f32>)> {
        let leaf_a = leaf([batch, heads, rows, keys], 63);
        let leaf_m = leaf([maps, heads, rows, keys], 64);
        let (a, m) = (leaf_a.clone() * 2.0, leaf_m.clone() * 0.5);
        let out = if fused {
            dape.forward_with_map(a, m, &Span::full(rows))
        } else {
            dape.forward_with_map_tensor_path(a, m)
        };
        let grads = loss(out.clone(), 65).backward();
        let grad = |t: &Tensor<Ta, 1>| to_vec(t.grad(&grads).expect("a gradient"));
        let bias = |b: &Option<Param<Tensor<Ta, 1>>>| grad(&b.as_ref().expect("a bias").val());
        vec![
            ("output", to_vec(out)),
            ("d logits", to_vec(leaf_a.grad(&grads).expect("d logits"))),
            ("d map", to_vec(leaf_m.grad(&grads).expect("d map"))),
            ("d w1", to_vec(dape.mlp_in.weight.grad(&grads).expect("w1"))),
            ("d b1", bias(&dape.mlp_in.bias)),
            (
                "d w2",
                to_vec(dape.mlp_out.weight.grad(&grads).expect("w2")),
            ),
            ("d b2", bias(&dape.mlp_out.bias)),
        ]
    };
    for maps in [batch, 1] {
        let (got, want) = (run(maps, true), run(maps, false));
        for ((name, got), (_, want)) in got.iter().zip(&want) {
            assert_close(&format!("{maps} map(s): {name}"), got, want);
        }
    }
}

/// DAPE V2 over Kerple or NoPE (`k = 3`), with hidden biases of ±8 as in `dape_module`.
fn dape_v2_module(base: &str, mask_future_hidden: bool) -> DapeV2<Ta> {
    let heads = 4;
    let bias = (base == "kerple").then(|| {
        let mut k = KerpleConfig::new()
            .init::<Ta>(heads, KerpleKind::Log, &DEVICE)
            .expect("kerple");
        k.p = Param::from_tensor(tensor::<Ta, 1>([heads], 71, 0.5) + 1.0);
        k.a = Param::from_tensor(tensor::<Ta, 1>([heads], 72, 0.5) + 1.0);
        AdditiveBias::Kerple(k)
    });
    let mut v2 = DapeV2Config::new()
        .with_negative_slope(0.1)
        .with_mlp_width(6)
        .with_mask_future_hidden(mask_future_hidden)
        .init::<Ta>(heads, bias, &DEVICE)
        .expect("dape v2");
    let width = v2.conv_in.weight.dims()[0];
    v2.conv_in.bias = Some(kink_free_biases(width, 73));
    v2.conv_out.bias = Some(Param::from_tensor(tensor::<Ta, 1>([heads], 74, 1.0)));
    v2
}

/// DAPE V2's LibTorch node (in one block and in ragged blocks of 3 rows) against the tensor
/// path, in the output and the gradients of the logits, both convolutions' weights and biases
/// and Kerple's parameters: both masking modes, a full causal pass, a chunk, a decode row and
/// a non-causal block.
#[test]
fn dape_v2_node_is_the_tensor_path_in_values_and_every_gradient() {
    let _graphs = common::autodiff_lock();
    let spans = [
        Span::full(13),
        Span {
            query_start: 6,
            query_len: 5,
            key_len: 11,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 9,
            query_len: 1,
            key_len: 10,
            causal: true,
            positions: None,
        },
        Span {
            query_start: 0,
            query_len: 7,
            key_len: 12,
            causal: false,
            positions: None,
        },
    ];
    let batch = 3;
    let run = |v2: &DapeV2<Ta>, span: &Span, budget: Option<usize>| -> Vec<(String, Vec<f32>)> {
        let leaf_a = leaf([batch, 4, span.query_len, span.key_len], 75);
        let a = leaf_a.clone() * 2.0;
        let out = match budget {
            Some(budget) => v2.forward_in_blocks(a, span, budget),
            None => v2.forward_tensor_path(a, span, usize::MAX),
        };
        let grads = loss(out.clone(), 76).backward();
        let grad4 = |t: &Param<Tensor<Ta, 4>>| to_vec(t.val().grad(&grads).expect("a weight"));
        let grad1 = |t: &Option<Param<Tensor<Ta, 1>>>| {
            to_vec(
                t.as_ref()
                    .expect("a bias")
                    .val()
                    .grad(&grads)
                    .expect("a bias's gradient"),
            )
        };
        let mut got = vec![
            ("output".to_string(), to_vec(out)),
            (
                "d logits".into(),
                to_vec(leaf_a.grad(&grads).expect("d logits")),
            ),
            ("d w1".into(), grad4(&v2.conv_in.weight)),
            ("d b1".into(), grad1(&v2.conv_in.bias)),
            ("d w2".into(), grad4(&v2.conv_out.weight)),
            ("d b2".into(), grad1(&v2.conv_out.bias)),
        ];
        if let Some(AdditiveBias::Kerple(k)) = &v2.bias {
            got.push(("d kerple p".into(), to_vec(k.p.grad(&grads).expect("p"))));
            got.push(("d kerple a".into(), to_vec(k.a.grad(&grads).expect("a"))));
        }
        got
    };
    for base in ["kerple", "nope"] {
        for mask in [true, false] {
            let v2 = dape_v2_module(base, mask);
            let width = v2.conv_in.weight.dims()[0];
            for span in &spans {
                let reference = run(&v2, span, None);
                for rows in [span.query_len, 3] {
                    let budget = rows * batch * width * span.key_len;
                    for ((name, got), (_, want)) in
                        run(&v2, span, Some(budget)).iter().zip(&reference)
                    {
                        assert_close(
                            &format!(
                                "dape v2 over {base}, mask {mask}, {span:?}, {rows} rows: {name}"
                            ),
                            got,
                            want,
                        );
                    }
                }
            }
        }
    }
}

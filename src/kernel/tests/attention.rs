//! The attention nodes (separate and packed q, k, v) against the tensor path.

use super::*;

/// `softmax(scale · q kᵀ + bias, mask) · v` by Burn's tensor ops, as
/// `[batch, rows, heads, d_v]`: the reference of the fused attention kernel.
fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f32,
    causal_from: Option<usize>,
) -> Tensor<B, 4> {
    let [b, h, rows, _] = q.dims();
    let keys = k.dims()[2];
    let mut logits = q.matmul(k.transpose()) * scale;
    if let Some(bias) = bias {
        logits = logits + bias;
    }
    if let Some(q0) = causal_from {
        let future: Vec<bool> = (0..rows * keys).map(|i| i % keys > q0 + i / keys).collect();
        let mask = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(future, [rows, keys]),
            &logits.device(),
        )
        .unsqueeze::<4>()
        .expand([b, h, rows, keys]);
        logits = logits.mask_fill(mask, f32::NEG_INFINITY);
    }
    burn::tensor::activation::softmax(logits, 3)
        .matmul(v)
        .swap_dims(1, 2)
}

/// The fused attention node against the tensor path on `Autodiff<NdArray>`, in values and
/// in the gradients of q, k, v and the bias: causal over a full square, a causal chunk of
/// query rows after earlier keys (ragged: rows that see part of the keys), full
/// (non-causal) attention, a bias shared by the batch or one per batch row, no bias, a
/// `d_v` unlike `d_head`, and q, k, v read through strides (views of one projection).
#[test]
fn fused_attention_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let (b, h, dh) = (2, 3, 5);
    for (case, rows, keys, causal_from, bias_batch, dv) in [
        ("causal square", 7, 7, Some(0), Some(1), dh),
        ("causal chunk", 4, 9, Some(3), Some(1), dh),
        ("decode step", 1, 6, Some(5), Some(1), dh),
        ("full", 5, 8, None, Some(1), dh),
        ("bias per batch row", 6, 6, Some(0), Some(b), dh),
        ("no bias, wide v", 6, 6, Some(0), None, 7),
    ] {
        // One projection [b, rows or keys, heads, q | k | v], viewed per part.
        let qp = Tensor::<A, 4>::random([b, rows, h, dh], normal, &device).require_grad();
        let kv = Tensor::<A, 4>::random([b, keys, h, dh + dv], normal, &device).require_grad();
        let bias = bias_batch
            .map(|bb| Tensor::<A, 4>::random([bb, h, rows, keys], normal, &device).require_grad());
        let parts = || {
            (
                qp.clone().swap_dims(1, 2),
                kv.clone().narrow(3, 0, dh).swap_dims(1, 2),
                kv.clone().narrow(3, dh, dv).swap_dims(1, 2),
            )
        };
        let scale = 0.37;
        let (q, k, v) = parts();
        let fused = attention(q, k, v, bias.clone(), scale, causal_from)
            .expect("a kernel on Autodiff<NdArray<f32>>");
        assert_eq!(fused.dims(), [b, rows, h, dv], "{case}");
        let weights = Tensor::<A, 4>::random([b, rows, h, dv], normal, &device);
        // The reference in f64 (two f32 computations in different orders differ by ~5e-5
        // here): the same inputs, the tensor path, on Autodiff<NdArray<f64>>.
        let (qp64, kv64, w64) = (tracked_f64(&qp), tracked_f64(&kv), tracked_f64(&weights));
        let bias64 = bias.as_ref().map(tracked_f64);
        let reference = attention_reference(
            qp64.clone().swap_dims(1, 2),
            kv64.clone().narrow(3, 0, dh).swap_dims(1, 2),
            kv64.clone().narrow(3, dh, dv).swap_dims(1, 2),
            bias64.clone(),
            scale,
            causal_from,
        );
        assert_split_attention_matches(
            case,
            fused,
            reference,
            SplitInputs {
                qp: (&qp, &qp64),
                kv: (&kv, &kv64),
                bias: bias.as_ref().zip(bias64.as_ref()),
                weights: (weights, w64),
                d_head: dh,
            },
        );
    }
}

/// The packed attention node (q, k, v read from one `[batch, seq, 3·heads, d_head]`
/// projection, one gradient for it) against the tensor path in f64 on the split parts:
/// values, and the gradients of the packed tensor (each of its q, k and v parts) and of the
/// bias, causal and non-causal, a bias shared by the batch or one per row, and no bias. The
/// projection comes transposed (a strided view), as a layer's output may.
#[test]
fn packed_attention_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let (b, h, dh, l) = (2, 3, 4, 7);
    for (case, causal_from, bias_batch) in [
        ("causal", Some(0), Some(1)),
        ("full", None, Some(1)),
        ("bias per batch row", Some(0), Some(b)),
        ("no bias", Some(0), None),
    ] {
        let stored = Tensor::<A, 4>::random([b, 3 * h, l, dh], normal, &device).require_grad();
        let qkv = stored.clone().swap_dims(1, 2);
        let bias = bias_batch
            .map(|bb| Tensor::<A, 4>::random([bb, h, l, l], normal, &device).require_grad());
        let scale = 0.41;
        let fused = attention_packed(qkv, h, bias.clone(), scale, causal_from)
            .expect("a kernel on Autodiff<NdArray<f32>>");
        assert_eq!(fused.dims(), [b, l, h, dh], "{case}");
        let weights = Tensor::<A, 4>::random([b, l, h, dh], normal, &device);
        let (stored64, w64) = (tracked_f64(&stored), tracked_f64(&weights));
        let bias64 = bias.as_ref().map(tracked_f64);
        let part = |i: usize| stored64.clone().narrow(1, i * h, h);
        let reference = attention_reference(
            part(0),
            part(1),
            part(2),
            bias64.clone(),
            scale,
            causal_from,
        );
        let close = |ours, want, what: &str| assert_near_f64(ours, want, case, what);
        close(fused.clone().inner(), reference.clone().inner(), "output");
        let g1 = (fused * weights).sum().backward();
        let g2 = (reference * w64).sum().backward();
        let (gs, gs64) = (stored.grad(&g1).unwrap(), stored64.grad(&g2).unwrap());
        for (i, what) in ["dq", "dk", "dv"].into_iter().enumerate() {
            close(
                gs.clone().narrow(1, i * h, h),
                gs64.clone().narrow(1, i * h, h),
                what,
            );
        }
        if let (Some(bias), Some(bias64)) = (&bias, &bias64) {
            close(bias.grad(&g1).unwrap(), bias64.grad(&g2).unwrap(), "dbias");
        }
    }
}

/// Without autodiff the packed kernel is the split one; it hands back a third dimension
/// that is not three times the heads, a bias of another shape, and a causal block that
/// does not start at 0.
#[test]
fn packed_attention_without_autodiff_and_bad_shapes() {
    type N = NdArray<f32>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let (b, h, dh, l) = (2, 2, 4, 6);
    let qkv = Tensor::<N, 4>::random([b, l, 3 * h, dh], normal, &device);
    let bias = Tensor::<N, 4>::random([1, h, l, l], normal, &device);
    let fused = attention_packed(qkv.clone(), h, Some(bias.clone()), 0.5, Some(0))
        .expect("a kernel on NdArray<f32>");
    let part = |i: usize| qkv.clone().narrow(2, i * h, h).swap_dims(1, 2);
    let split = attention(part(0), part(1), part(2), Some(bias.clone()), 0.5, Some(0))
        .expect("a kernel on NdArray<f32>");
    assert_eq!(max_diff(fused, split), 0.0);
    assert!(attention_packed(qkv.clone(), 3, None, 0.5, None).is_none());
    let wrong_bias = Tensor::<N, 4>::zeros([1, h, l, l - 1], &device);
    assert!(attention_packed(qkv.clone(), h, Some(wrong_bias), 0.5, None).is_none());
    assert!(attention_packed(qkv, h, None, 0.5, Some(2)).is_none());
}

/// Without autodiff the kernel gives the same values, and it hands other shapes back.
#[test]
fn fused_attention_without_autodiff_and_bad_shapes() {
    type N = NdArray<f32>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<N, 4>::random([2, 2, 5, 4], normal, &device);
    let k = Tensor::<N, 4>::random([2, 2, 8, 4], normal, &device);
    let v = Tensor::<N, 4>::random([2, 2, 8, 3], normal, &device);
    let bias = Tensor::<N, 4>::random([1, 2, 5, 8], normal, &device);
    let fused = attention(
        q.clone(),
        k.clone(),
        v.clone(),
        Some(bias.clone()),
        0.5,
        Some(3),
    )
    .expect("a kernel on NdArray<f32>");
    let reference = attention_reference(q.clone(), k.clone(), v.clone(), Some(bias), 0.5, Some(3));
    let d = max_diff(fused, reference);
    assert!(d < 1e-5, "values differ by {d}");
    let wrong_bias = Tensor::<N, 4>::zeros([1, 2, 5, 7], &device);
    assert!(attention(q.clone(), k.clone(), v.clone(), Some(wrong_bias), 0.5, None).is_none());
    let wrong_v = Tensor::<N, 4>::zeros([2, 2, 7, 3], &device);
    assert!(attention(q, k, wrong_v, None, 0.5, None).is_none());
}

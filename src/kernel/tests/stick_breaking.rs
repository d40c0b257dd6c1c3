//! Stick-breaking attention's kernel against the tensor path (in f32 and in f64), in values and
//! in the gradient, over causal blocks, chunks, a decode row and bidirectional blocks, with the
//! query's own key on and off the stick.

use super::*;

/// Full causal, a chunk (rows 5.. of 13 keys), a decode step (one row), an extra key past the
/// last row (DAPE V2's lookahead column), bidirectional; each with and without the query's key.
fn cases() -> Vec<([usize; 4], Sticks)> {
    let spans: [([usize; 4], usize, bool); 5] = [
        ([2, 3, 13, 13], 0, true),
        ([2, 3, 4, 9], 5, true),
        ([1, 2, 1, 17], 16, true),
        ([2, 2, 6, 7], 0, true),
        ([2, 3, 5, 11], 3, false),
    ];
    spans
        .into_iter()
        .flat_map(|(dims, query_start, causal)| {
            [false, true].map(|attend_current| {
                (
                    dims,
                    Sticks {
                        query_start,
                        causal,
                        attend_current,
                    },
                )
            })
        })
        .collect()
}

#[test]
fn stick_breaking_kernel_is_the_tensor_path_in_values() {
    let device = Default::default();
    for (dims, sticks) in cases() {
        let x = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
        let kernel = stick_breaking(x.clone(), sticks);
        let want = stick_breaking_tensor(
            Tensor::<NdArray<f64>, 4>::from_data(
                x.clone().into_data().convert::<f64>(),
                (&device, DType::F64),
            ),
            sticks,
        );
        assert_near_f64(
            kernel.clone(),
            want,
            &format!("{dims:?} {sticks:?}"),
            "weights",
        );
        let d = max_diff(kernel, stick_breaking_tensor(x, sticks));
        assert!(
            d <= 2e-6,
            "{dims:?} {sticks:?}: kernel and f32 tensor path differ by {d}"
        );
    }
}

#[test]
fn stick_breaking_kernel_gradient_is_the_tensor_path() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    for (dims, sticks) in cases() {
        let case = format!("{dims:?} {sticks:?}");
        let base = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Normal(0.0, 3.0), &device);
        let w = Tensor::<NdArray<f32>, 4>::random(dims, Distribution::Default, &device);
        let x = Tensor::<A, 4>::from_inner(base.clone()).require_grad();
        let a = stick_breaking(x.clone(), sticks);
        // Two uses of the output, so that the node's incoming gradient is a sum.
        let loss = (a.clone() * Tensor::from_inner(w.clone())).sum() + (a.clone() * a).sum();
        let ours = x.grad(&loss.backward()).unwrap();
        // The tensor path in f64 under autodiff.
        let x64 = tracked_f64(&Tensor::<A, 4>::from_inner(base));
        let w64 = Tensor::<Autodiff<NdArray<f64>>, 4>::from_data(
            w.into_data().convert::<f64>(),
            (&device, DType::F64),
        );
        let a64 = stick_breaking_tensor(x64.clone(), sticks);
        let loss64 = (a64.clone() * w64).sum() + (a64.clone() * a64).sum();
        let want = x64.grad(&loss64.backward()).unwrap();
        assert_near_f64(ours, want, &case, "gradient");
    }
}

/// A row whose stick is empty (the first token, its own key off the stick) gets no weight and
/// passes no gradient; a row of 8192 keys with saturated logits stays finite and equal to the
/// f64 tensor path.
#[test]
fn stick_breaking_kernel_edges() {
    let device = Default::default();
    let first = Sticks {
        query_start: 0,
        causal: true,
        attend_current: false,
    };
    let x = Tensor::<NdArray<f32>, 4>::random([1, 1, 1, 4], Distribution::Default, &device);
    let w: Vec<f32> = stick_breaking(x, first).into_data().to_vec().unwrap();
    assert_eq!(w, vec![0.0; 4]);
    let keys = 8192;
    let last = Sticks {
        query_start: keys - 1,
        causal: true,
        attend_current: true,
    };
    let z = Tensor::<NdArray<f32>, 4>::random(
        [1, 1, 1, keys],
        Distribution::Uniform(-40.0, 10.0),
        &device,
    );
    let ours = stick_breaking(z.clone(), last);
    let want = stick_breaking_tensor(
        Tensor::<NdArray<f64>, 4>::from_data(z.into_data().convert::<f64>(), (&device, DType::F64)),
        last,
    );
    assert_near_f64(ours, want, "8192 keys", "weights");
}

/// The stick-breaking attention node against the tensor path in f64 (`A = stick_breaking(scale
/// · q kᵀ + bias)`, then `A · v`), in values and in the gradients of q, k, v and the bias, over
/// every case of [`cases`] (causal blocks, a chunk, a decode row, a lookahead key,
/// bidirectional; the query's own key on and off) and spans of several row blocks, with a bias
/// shared by the batch, one per batch row, or none, and q, k, v read through strides.
#[test]
fn stick_breaking_attention_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.5);
    // Beyond the small cases, spans of several row blocks (the node takes 64 rows at a time,
    // each block's keys cut where its sticks end): causal squares, a causal chunk whose blocks
    // start after earlier keys, and bidirectional rows.
    let long = [
        ([1, 2, 150, 150], 0, true),
        ([2, 1, 70, 140], 70, true),
        ([1, 2, 100, 100], 0, false),
    ]
    .into_iter()
    .flat_map(|(dims, query_start, causal)| {
        [false, true].map(|attend_current| {
            let sticks = Sticks {
                query_start,
                causal,
                attend_current,
            };
            (dims, sticks)
        })
    });
    for (n, ([b, h, rows, keys], sticks)) in cases().into_iter().chain(long).enumerate() {
        let case = format!("{:?} {sticks:?}", [b, h, rows, keys]);
        let (dh, dv) = (4, 3 + n % 3);
        let qp = Tensor::<A, 4>::random([b, rows, h, dh], normal, &device).require_grad();
        let kv = Tensor::<A, 4>::random([b, keys, h, dh + dv], normal, &device).require_grad();
        let bias = match n % 3 {
            0 => None,
            1 => Some(1),
            _ => Some(b),
        }
        .map(|bb| Tensor::<A, 4>::random([bb, h, rows, keys], normal, &device).require_grad());
        let scale = 0.7;
        let fused = stick_breaking_attention(
            qp.clone().swap_dims(1, 2),
            kv.clone().narrow(3, 0, dh).swap_dims(1, 2),
            kv.clone().narrow(3, dh, dv).swap_dims(1, 2),
            bias.clone(),
            scale,
            sticks,
        )
        .expect("a kernel on Autodiff<NdArray<f32>>");
        assert_eq!(fused.dims(), [b, rows, h, dv], "{case}");
        let weights = Tensor::<A, 4>::random([b, rows, h, dv], normal, &device);
        let (qp64, kv64, w64) = (tracked_f64(&qp), tracked_f64(&kv), tracked_f64(&weights));
        let bias64 = bias.as_ref().map(tracked_f64);
        let q64 = qp64.clone().swap_dims(1, 2);
        let mut logits = q64.matmul(kv64.clone().narrow(3, 0, dh).swap_dims(1, 2).transpose())
            * f64::from(scale);
        if let Some(bias) = &bias64 {
            logits = logits + bias.clone();
        }
        let reference = stick_breaking_tensor(logits, sticks)
            .matmul(kv64.clone().narrow(3, dh, dv).swap_dims(1, 2))
            .swap_dims(1, 2);
        assert_split_attention_matches(
            &case,
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

/// The node without autodiff gives the autodiff node's values, and other backends and
/// mismatched shapes get `None` (the tensor path).
#[test]
fn stick_breaking_attention_without_autodiff_and_bad_shapes() {
    type N = NdArray<f32>;
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let sticks = Sticks {
        query_start: 0,
        causal: true,
        attend_current: false,
    };
    let q = Tensor::<N, 4>::random([1, 2, 5, 4], normal, &device);
    let k = Tensor::<N, 4>::random([1, 2, 5, 4], normal, &device);
    let v = Tensor::<N, 4>::random([1, 2, 5, 3], normal, &device);
    let plain = stick_breaking_attention(q.clone(), k.clone(), v.clone(), None, 0.5, sticks)
        .expect("a kernel on NdArray<f32>");
    let tracked = stick_breaking_attention(
        Tensor::<Autodiff<N>, 4>::from_inner(q.clone()),
        Tensor::<Autodiff<N>, 4>::from_inner(k.clone()),
        Tensor::<Autodiff<N>, 4>::from_inner(v.clone()),
        None,
        0.5,
        sticks,
    )
    .unwrap()
    .inner();
    assert!(max_diff(plain, tracked) < 1e-6);
    let wrong_v = Tensor::<N, 4>::random([1, 2, 6, 3], normal, &device);
    assert!(stick_breaking_attention(q.clone(), k.clone(), wrong_v, None, 0.5, sticks).is_none());
    let q64 = Tensor::<NdArray<f64>, 4>::random([1, 2, 5, 4], normal, &device);
    let k64 = Tensor::<NdArray<f64>, 4>::random([1, 2, 5, 4], normal, &device);
    let v64 = Tensor::<NdArray<f64>, 4>::random([1, 2, 5, 3], normal, &device);
    assert!(stick_breaking_attention(q64, k64, v64, None, 0.5, sticks).is_none());
}

/// No weight and no logit gradient is subnormal: far along a stick the weights fall as
/// `(1 − σ)^d`, and their products with the output's gradient would pass through the subnormal
/// range, where the GEMMs reading them slow down many times over on x86. The node flushes
/// magnitudes under 1e-30 to 0.
#[test]
fn stick_breaking_gradients_are_never_subnormal() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    let device = Default::default();
    let (rows, keys) = (300, 300);
    let sticks = Sticks {
        query_start: 0,
        causal: true,
        attend_current: false,
    };
    // Logits around 0 (σ near ½): the weight d keys away is about 2^-(d+1), so from d ≈ 120
    // the weights times the output's gradient are subnormal.
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<A, 4>::zeros([1, 1, rows, 4], &device).require_grad();
    let k = Tensor::<A, 4>::zeros([1, 1, keys, 4], &device).require_grad();
    let v = Tensor::<A, 4>::random([1, 1, keys, 2], normal, &device).require_grad();
    let bias = Tensor::<A, 4>::random([1, 1, rows, keys], normal, &device).require_grad();
    let out = stick_breaking_attention(q, k, v, Some(bias.clone()), 1.0, sticks).unwrap();
    let subnormal = |t: Tensor<NdArray<f32>, 4>| {
        t.into_data()
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .filter(|x| *x != 0.0 && x.abs() < f32::MIN_POSITIVE)
            .count()
    };
    let g = Tensor::<A, 4>::random([1, rows, 1, 2], normal, &device) * 1e-3;
    let grads = (out.clone() * g).sum().backward();
    assert_eq!(subnormal(out.inner()), 0, "subnormal outputs");
    assert_eq!(
        subnormal(bias.grad(&grads).unwrap()),
        0,
        "subnormal logit gradients"
    );
}

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

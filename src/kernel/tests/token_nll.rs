//! The fused token NLL against the tensor path.

use super::*;

/// The fused token NLL against `log_softmax` + `gather` in f64: values and the logits'
/// gradient under a weighted sum (each token's own weight) and under a mean (a broadcast
/// gradient), for row-major and transposed (strided) logits, with rows of a wide range
/// (a max subtracted or not shows); a target outside the vocabulary takes the tensor path.
#[test]
fn fused_token_nll_is_the_tensor_path_in_values_and_gradients() {
    let _graphs = crate::util::autodiff_test_lock();
    type A = Autodiff<NdArray<f32>>;
    type A64 = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let (b, l, vocab) = (3, 37, 50);
    let mut rng = crate::util::Rng::new(7);
    let targets: Vec<i64> = (0..b * l).map(|_| rng.below(vocab as u64) as i64).collect();
    let mut unit = || (rng.next_u64() >> 40) as f32 / 16_777_216.0;
    let logits: Vec<f32> = (0..b * l * vocab)
        .map(|i| (unit() - 0.5) * 8.0 + (i % 5) as f32 * 20.0)
        .collect();
    let weights: Vec<f32> = (0..b * l).map(|_| unit()).collect();
    for transposed in [false, true] {
        for mean in [false, true] {
            let case = format!("transposed {transposed}, mean {mean}");
            let stored = if transposed {
                // The same logits, stored [b, vocab, l] and viewed back.
                let mut t = vec![0.0f32; logits.len()];
                for bi in 0..b {
                    for r in 0..l {
                        for c in 0..vocab {
                            t[(bi * vocab + c) * l + r] = logits[(bi * l + r) * vocab + c];
                        }
                    }
                }
                Tensor::<A, 3>::from_data(TensorData::new(t, [b, vocab, l]), &device)
            } else {
                Tensor::<A, 3>::from_data(TensorData::new(logits.clone(), [b, l, vocab]), &device)
            }
            .require_grad();
            let x = if transposed {
                stored.clone().swap_dims(1, 2)
            } else {
                stored.clone()
            };
            let t =
                Tensor::<A, 2, Int>::from_data(TensorData::new(targets.clone(), [b, l]), &device);
            let w = Tensor::<A, 2>::from_data(TensorData::new(weights.clone(), [b, l]), &device);
            let x64 = Tensor::<A64, 3>::from_data(
                TensorData::new(logits.clone(), [b, l, vocab]).convert::<f64>(),
                (&device, DType::F64),
            )
            .require_grad();
            let t64 =
                Tensor::<A64, 2, Int>::from_data(TensorData::new(targets.clone(), [b, l]), &device);
            let w64 = Tensor::<A64, 2>::from_data(
                TensorData::new(weights.clone(), [b, l]).convert::<f64>(),
                (&device, DType::F64),
            );
            let ours = token_nll(x, t);
            let want = token_nll_tensor(x64.clone(), t64);
            let ov = ours.to_data().to_vec::<f32>().unwrap();
            let wv = want.to_data().convert::<f32>().to_vec::<f32>().unwrap();
            for (o, w) in ov.iter().zip(&wv) {
                assert!(
                    (o - w).abs() < 2e-5 * w.abs().max(1.0),
                    "{case}: nll {o} vs {w}"
                );
            }
            let (g, g64) = if mean {
                (ours.mean().backward(), want.mean().backward())
            } else {
                ((ours * w).sum().backward(), (want * w64).sum().backward())
            };
            let mut dx = stored.grad(&g).unwrap();
            if transposed {
                dx = dx.swap_dims(1, 2);
            }
            let dx = dx.into_data().to_vec::<f32>().unwrap();
            let dx64 = x64
                .grad(&g64)
                .unwrap()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap();
            for (i, (o, w)) in dx.iter().zip(&dx64).enumerate() {
                assert!((o - w).abs() < 1e-6, "{case}: gradient {i}: {o} vs {w}");
            }
        }
    }
    // A target outside 0..vocab: the tensor path (Burn's gather), not the kernel.
    type N = NdArray<f32>;
    let x = Tensor::<N, 3>::from_data(
        TensorData::new(logits[..vocab].to_vec(), [1, 1, vocab]),
        &device,
    );
    let inside = Tensor::<N, 2, Int>::from_data(TensorData::new(vec![3i64], [1, 1]), &device);
    let a = token_nll(x.clone(), inside.clone()).into_scalar();
    let b_ = token_nll_tensor(x, inside).into_scalar();
    assert!((a - b_).abs() < 1e-5, "{a} vs {b_}");
}

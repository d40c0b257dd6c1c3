//! `FusedAdamW` against Burn's `AdamW` with clipping by norm (the tensor path it replaces), and
//! against the formulas: parameters over several steps (so the moments too), with and without
//! clipping and decay; records that load both ways; tensors held elsewhere left untouched by
//! the in-place update; Burn's own path on a backend the kernel does not serve; bad settings
//! refused by name.

use burn::backend::{Autodiff, NdArray};
use burn::grad_clipping::GradientClippingConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer, SimpleOptimizer};
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;

use dape::optim::{FusedAdamW, FusedAdamWConfig};

type B = Autodiff<NdArray<f32>>;

fn linear<A: Backend>(seed: u64, device: &A::Device) -> Linear<A> {
    A::seed(device, seed);
    let model = LinearConfig::new(37, 23).init(device);
    // Parameters are initialized lazily, on first read: read them now, so that clones share
    // their values.
    let _ = values(&model);
    model
}

/// Gradients of a loss whose gradient norm is far above 1 (`scale` 30) or below it (0.01).
fn grads<A: AutodiffBackend>(model: &Linear<A>, step: u64, scale: f32) -> GradientsParams {
    // Fixed inputs, not the backend's random source (shared with the tests running beside).
    let device = model.weight.device();
    let x: Vec<f32> = (0..5 * 37)
        .map(|i| ((i as f32 + 1.0) * (0.37 + step as f32)).sin())
        .collect();
    let x = Tensor::<A, 2>::from_data(TensorData::new(x, [5, 37]), &device);
    let loss = model.forward(x).powf_scalar(2.0).mean().mul_scalar(scale);
    GradientsParams::from_grads(loss.backward(), model)
}

fn values<A: Backend>(m: &Linear<A>) -> Vec<f32> {
    let mut v = m
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    if let Some(b) = &m.bias {
        v.extend(
            b.val()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap(),
        );
    }
    v
}

fn burn_adamw(wd: f32, clip: Option<f32>) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_weight_decay(wd)
        .with_grad_clipping(clip.map(GradientClippingConfig::Norm))
}

fn fused_adamw(wd: f32, clip: Option<f32>) -> FusedAdamWConfig {
    FusedAdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_weight_decay(wd)
        .with_grad_clip_norm(clip)
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: off by {worst:e} (tolerance {tol:e})");
}

#[test]
fn fused_adamw_follows_burns_adamw_with_clipping() {
    let device = Default::default();
    for (wd, clip, scale) in [
        (0.1, Some(1.0), 30.0),
        (0.1, Some(1.0), 0.01),
        (0.0, None, 30.0),
        (0.3, Some(0.05), 1.0),
    ] {
        let mut reference = linear::<B>(7, &device);
        let mut fused = reference.clone();
        let mut burn_opt = burn_adamw(wd, clip).init::<B, Linear<B>>();
        let mut fused_opt = fused_adamw(wd, clip).init::<B, Linear<B>>().unwrap();
        for step in 0..6 {
            let lr = 1e-2 / (1.0 + step as f64);
            let g = grads(&reference, step, scale);
            reference = burn_opt.step(lr, reference, g);
            let g = grads(&fused, step, scale);
            fused = fused_opt.step(lr, fused, g);
            let case = format!("wd {wd}, clip {clip:?}, scale {scale}, step {step}");
            assert_close(&case, &values(&fused), &values(&reference), 2e-6);
        }
    }
}

#[test]
fn one_step_is_the_formula() {
    // One parameter, by hand: g = 3 (norm 3, clipped to 1 → 1), m = 0.1, v = 0.05 · 1,
    // m̂ = 1, v̂ = 1, p = 2 · (1 − lr · wd) − lr · 1 / (1 + ε).
    let device = Default::default();
    let (lr, wd, eps) = (0.1f64, 0.5f32, 1e-5f32);
    let opt: FusedAdamW = FusedAdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(eps)
        .with_weight_decay(wd)
        .with_grad_clip_norm(Some(1.0))
        .build()
        .unwrap();
    let p = Tensor::<NdArray<f32>, 1>::from_floats([2.0], &device);
    let g = Tensor::<NdArray<f32>, 1>::from_floats([3.0], &device);
    let (p1, state) = SimpleOptimizer::<NdArray<f32>>::step(&opt, lr, p, g, None);
    let want = 2.0 * (1.0 - lr * wd as f64) - lr / (1.0 + eps as f64);
    let got = p1.into_scalar() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let m = state.unwrap().momentum;
    assert_eq!(m.time, 1);
    assert!((m.moment_1.into_scalar() - 0.1).abs() < 1e-7);
    assert!((m.moment_2.into_scalar() - 0.05).abs() < 1e-7);
}

#[test]
fn tensors_held_elsewhere_are_not_updated_in_place() {
    let device = Default::default();
    let model = linear::<B>(3, &device);
    let before = values(&model);
    let held = model.weight.val();
    let mut opt = fused_adamw(0.1, Some(1.0)).init::<B, Linear<B>>().unwrap();
    let g = grads(&model, 0, 30.0);
    let stepped = opt.step(1e-2, model.clone(), g);
    assert_ne!(values(&stepped), before, "the step changed the parameters");
    assert_eq!(values(&model), before, "the module handed in is unchanged");
    let held: Vec<f32> = held.into_data().to_vec().unwrap();
    assert_eq!(
        held,
        before[..held.len()],
        "a tensor held elsewhere is unchanged"
    );
}

#[test]
fn records_load_both_ways() {
    let device = Default::default();
    let model = linear::<B>(5, &device);
    let r = BinBytesRecorder::<FullPrecisionSettings>::default();
    // Burn's record into the fused optimizer: the next steps agree.
    let mut burn_opt = burn_adamw(0.1, Some(1.0)).init::<B, Linear<B>>();
    let m1 = burn_opt.step(1e-2, model.clone(), grads(&model, 0, 30.0));
    let bytes = r.record(burn_opt.to_record(), ()).unwrap();
    let record = Recorder::<B>::load(&r, bytes, &device).unwrap();
    let mut fused_opt: OptimizerAdaptor<FusedAdamW, Linear<B>, B> =
        fused_adamw(0.1, Some(1.0)).init().unwrap();
    fused_opt = fused_opt.load_record(record);
    let a = burn_opt.step(1e-2, m1.clone(), grads(&m1, 1, 30.0));
    let b = fused_opt.step(1e-2, m1.clone(), grads(&m1, 1, 30.0));
    assert_close("burn record, fused step", &values(&b), &values(&a), 2e-6);
    // And the fused record into Burn's optimizer.
    let bytes = r.record(fused_opt.to_record(), ()).unwrap();
    let record = Recorder::<B>::load(&r, bytes, &device).unwrap();
    let mut burn_again: OptimizerAdaptor<AdamW, Linear<B>, B> = burn_adamw(0.1, Some(1.0)).init();
    burn_again = burn_again.load_record(record);
    let c = burn_again.step(1e-2, b.clone(), grads(&b, 2, 30.0));
    let d = fused_opt.step(1e-2, b.clone(), grads(&b, 2, 30.0));
    assert_close("fused record, burn step", &values(&d), &values(&c), 2e-6);
}

#[test]
fn other_backends_run_burns_adamw() {
    // NdArray<f64> is not served by the kernel: the step is Burn's, value for value.
    type F = Autodiff<NdArray<f64>>;
    let device = Default::default();
    let mut reference = linear::<F>(9, &device);
    let mut fused = reference.clone();
    let mut burn_opt = burn_adamw(0.1, Some(1.0)).init::<F, Linear<F>>();
    let mut fused_opt = fused_adamw(0.1, Some(1.0)).init::<F, Linear<F>>().unwrap();
    for step in 0..3 {
        reference = burn_opt.step(1e-2, reference.clone(), grads(&reference, step, 30.0));
        fused = fused_opt.step(1e-2, fused.clone(), grads(&fused, step, 30.0));
        assert_eq!(values(&fused), values(&reference), "step {step}");
    }
}

#[test]
fn bad_settings_are_refused_by_name() {
    for (config, field) in [
        (FusedAdamWConfig::new().with_beta_1(1.0), "beta_1"),
        (FusedAdamWConfig::new().with_beta_2(-0.1), "beta_2"),
        (FusedAdamWConfig::new().with_epsilon(0.0), "epsilon"),
        (
            FusedAdamWConfig::new().with_weight_decay(f32::NAN),
            "weight_decay",
        ),
        (
            FusedAdamWConfig::new().with_grad_clip_norm(Some(0.0)),
            "grad_clip_norm",
        ),
        (
            FusedAdamWConfig::new().with_grad_clip_norm(Some(f32::INFINITY)),
            "grad_clip_norm",
        ),
    ] {
        let err = match config.build() {
            Ok(_) => panic!("{field}: accepted {config:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(field), "{field}: {err}");
    }
}

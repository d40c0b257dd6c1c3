//! Backend agreement: the same weights (saved once on ndarray, loaded on the other backend) and
//! the same tokens give the same logits and the same gradients, for every encoding (and
//! Scalable-Softmax over Kerple and DAPE-Kerple, and randomized positions under RoPE,
//! sinusoids, T5, Kerple and DAPE-Kerple), within 1e-4 relative to each tensor's scale
//! (its largest magnitude, at least 0.01).
//!
//! Runs for each backend compiled in (`--features wgpu`, `--features tch`) whose device is
//! present; otherwise it says why it skipped. CI runs it on WGPU over Mesa's lavapipe:
//! `cargo test --features wgpu --test backends`.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;

use dape::encoding::{Positions, RandomizedConfig};
use dape::{
    LanguageModel, LanguageModelConfig, PositionalEncodingConfig, SsmaxConfig, StickBreakingConfig,
    TransformerConfig, ENCODING_NAMES,
};

type Reference = Autodiff<NdArray<f32>>;
const VOCAB: usize = 17;
const LEN: usize = 12;
/// Logits: float32 forward passes agree to a few 1e-7 relative (largest seen on lavapipe: 3.3e-7).
const TOL: f32 = 1e-4;
/// Gradients: backward passes sum over every position, with cancellation, in a backend-specific
/// order (and with or without FMA contraction), so they agree less closely. The largest seen, on
/// lavapipe on an AVX2 CPU over all 34 encodings, was 2.4e-4 (DAPE-Kerple); a wrong formula or a
/// missing term gives errors of order 1.
const GRAD_TOL: f32 = 1e-3;

fn model<Bk: Backend>(
    encoding: &PositionalEncodingConfig,
    [ssmax, stick_breaking, hybrid]: [bool; 3],
    device: &Bk::Device,
) -> LanguageModel<Bk> {
    let mut stack = TransformerConfig::new(32, 2, 4)
        .with_encoding(encoding.clone())
        .with_ssmax(ssmax.then(|| SsmaxConfig::new().with_init_length(4)))
        .with_stick_breaking(stick_breaking.then(StickBreakingConfig::new));
    if hybrid {
        // iRoPE-style: every second layer NoPE with temperature tuning from position 1, the
        // others with a learned QK-norm and a window of 5.
        stack = stack
            .with_layer_encodings(Some(dape::LayerEncodings::every(
                2,
                PositionalEncodingConfig::Nope,
            )))
            .with_qk_norm(Some(dape::QkNormConfig::new().with_learned(true)))
            .with_temperature(Some(
                dape::TemperatureConfig::new().with_alpha(0.5).with_floor(2),
            ))
            .with_sliding_window(Some(5));
    }
    LanguageModelConfig::new(VOCAB, stack)
        .init::<Bk>(device)
        .expect("valid config")
}

fn tokens<Bk: Backend>(device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let ids: Vec<i64> = (0..2 * LEN as i64)
        .map(|i| (i * 7 + 3) % VOCAB as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [2, LEN]), device)
}

/// Gradients of every float parameter, in visiting order.
struct Grads<'a, Bk: AutodiffBackend> {
    grads: &'a Bk::Gradients,
    out: Vec<Vec<f32>>,
}

impl<Bk: AutodiffBackend> ModuleVisitor<Bk> for Grads<'_, Bk> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        let values = param
            .val()
            .grad(self.grads)
            .map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
            .unwrap_or_default();
        self.out.push(values);
    }
}

/// Logits and parameter gradients of a cross-entropy loss.
fn run<Bk: AutodiffBackend>(
    model: &LanguageModel<Bk>,
    positions: Option<&Positions>,
    device: &Bk::Device,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let ids = tokens::<Bk>(device);
    let logits = model.forward_at(ids.clone(), positions).expect("forward");
    let targets = (ids + 1) % VOCAB as i64;
    let loss = burn::nn::loss::CrossEntropyLossConfig::new()
        .init(device)
        .forward(
            logits.clone().reshape([2 * LEN, VOCAB]),
            targets.reshape([2 * LEN]),
        );
    let grads = loss.backward();
    let mut visitor = Grads::<Bk> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    let logits = logits.into_data().convert::<f32>().to_vec().expect("f32");
    (logits, visitor.out)
}

/// max |a - b| relative to the tensor's scale max |b|, taken as at least 0.03: a gradient whose
/// entries are all about 1e-3 (Kerple's `a`, or a weight gradient summed over every position
/// with cancellation) then passes when it agrees to 3e-6 absolute, which is what float32
/// accumulation order allows (lavapipe on an AVX2 CPU differed by 1.3e-6 on such a tensor).
fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(3e-2f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[allow(dead_code)]
fn check_backend<Bk: AutodiffBackend>(backend: &str, device: Bk::Device) {
    let reference_device = Default::default();
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let only = std::env::var("DAPE_BACKEND_ENCODINGS").ok();
    // Every encoding is checked, and every disagreement reported, before the test fails.
    let mut failures = Vec::new();
    // (encoding, [Scalable-Softmax, stick-breaking, an iRoPE-style stack], randomized positions)
    let cases = ENCODING_NAMES
        .iter()
        .map(|name| (*name, [false, false, false], false))
        .chain([
            ("kerple_log", [true, false, false], false),
            ("dape_kerple_log", [true, false, false], false),
            ("nope", [false, true, false], false),
            ("kerple_log", [false, true, false], false),
            ("alibi", [true, true, false], false),
            ("rope", [false, false, true], false),
        ])
        .chain(
            ["rope", "sinusoidal", "t5", "kerple_log", "dape_kerple_log"]
                .map(|name| (name, [false, false, false], true)),
        );
    for (encoding_name, normaliser, randomized) in cases {
        let [ssmax, stick_breaking, hybrid] = normaliser;
        let name = format!(
            "{encoding_name}{}{}{}{}",
            if ssmax { "+ssmax" } else { "" },
            if stick_breaking { "+sb" } else { "" },
            if hybrid { "+irope" } else { "" },
            if randomized { "+randomized" } else { "" }
        );
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == name))
        {
            continue;
        }
        let randomized = randomized.then(|| RandomizedConfig::new(512));
        let positions = randomized.as_ref().map(|r| r.sample(LEN, 11).unwrap());
        let encoding = PositionalEncodingConfig::from_name(encoding_name)
            .unwrap()
            .with_randomized(randomized)
            .unwrap();
        <Reference as Backend>::seed(&reference_device, 3);
        let reference = model::<Reference>(&encoding, normaliser, &reference_device);
        let bytes =
            Recorder::<Reference>::record(&recorder, reference.clone().into_record(), ()).unwrap();
        let record = Recorder::<Bk>::load(&recorder, bytes, &device).unwrap();
        let other = model::<Bk>(&encoding, normaliser, &device).load_record(record);

        let (logits_ref, grads_ref) = run(&reference, positions.as_ref(), &reference_device);
        let (logits, grads) = run(&other, positions.as_ref(), &device);
        let d = relative_diff(&logits, &logits_ref);
        if d > TOL {
            failures.push(format!(
                "{backend} / {name}: logits differ by {d:e} (relative)"
            ));
        }
        assert_eq!(
            grads.len(),
            grads_ref.len(),
            "{backend} / {name}: parameter count"
        );
        let mut worst = 0.0f32;
        for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
            assert_eq!(
                g.is_empty(),
                r.is_empty(),
                "{backend} / {name}: parameter {i} gradient presence"
            );
            let d = relative_diff(g, r);
            worst = worst.max(d);
            if d > GRAD_TOL {
                failures.push(format!(
                    "{backend} / {name}: gradient of parameter {i} differs by {d:e} (relative): {:?} vs {:?}",
                    &g[..g.len().min(8)],
                    &r[..r.len().min(8)]
                ));
            }
        }
        println!(
            "{backend} / {name}: logits ({d:.1e}) and {} gradients (worst {worst:.1e}) checked against ndarray",
            grads.len()
        );
    }
    assert!(
        failures.is_empty(),
        "{} disagreements with ndarray:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Whether a backend's device can run a kernel (a missing adapter or driver panics inside the
/// runtime).
#[allow(dead_code)]
fn device_works<Bk: Backend>(device: &Bk::Device) -> bool {
    let device = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        Tensor::<Bk, 1>::ones([4], &device).sum().into_data()
    }))
    .is_ok()
}

/// Reports a skipped backend, or fails when `DAPE_REQUIRE_<NAME>=1` asks for it (CI sets it
/// where it installs the backend, so that a broken set-up cannot pass as a skip).
#[allow(dead_code)]
fn skip(require: &str, reason: &str) {
    if std::env::var(require).is_ok_and(|v| v == "1") {
        panic!("{require}=1, but {reason}");
    }
    println!("skipped: {reason}");
}

#[test]
fn wgpu_agrees_with_ndarray() {
    #[cfg(feature = "wgpu")]
    {
        use burn::backend::{wgpu::WgpuDevice, Wgpu};
        let device = WgpuDevice::default();
        if device_works::<Wgpu>(&device) {
            check_backend::<Autodiff<Wgpu>>("wgpu", device);
        } else {
            skip(
                "DAPE_REQUIRE_WGPU",
                "no WGPU adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers)",
            );
        }
    }
    #[cfg(not(feature = "wgpu"))]
    skip(
        "DAPE_REQUIRE_WGPU",
        "built without the `wgpu` feature (cargo test --features wgpu --test backends)",
    );
}

#[test]
fn libtorch_cpu_agrees_with_ndarray() {
    #[cfg(feature = "tch")]
    {
        use burn::backend::{libtorch::LibTorchDevice, LibTorch};
        let device = LibTorchDevice::Cpu;
        if device_works::<LibTorch<f32>>(&device) {
            check_backend::<Autodiff<LibTorch<f32>>>("tch-cpu", device);
        } else {
            skip("DAPE_REQUIRE_TCH", "LibTorch could not run on the CPU");
        }
    }
    #[cfg(not(feature = "tch"))]
    skip(
        "DAPE_REQUIRE_TCH",
        "built without the `tch` feature (see scripts/setup-libtorch.sh)",
    );
}

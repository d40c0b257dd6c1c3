//! Randomized positions (Ruoss et al., 2023) under every encoding that takes them: causality,
//! KV-cache decode == full forward and chunked == unchunked over the same positions, that the
//! positions reach the output (and only their differences, for relative encodings), reference
//! values from the formulas, the configs, and the harness's seeded samples.

use burn::backend::NdArray;
use burn::module::Param;
use burn::prelude::*;

use dape::encoding::{AdditiveBias, Positions, RandomizedConfig, Span};
use dape::{
    LanguageModel, LanguageModelConfig, PositionalEncoding, PositionalEncodingConfig,
    SequenceModelConfig, TransformerConfig, ENCODING_NAMES,
};

type B = NdArray<f32>;
const VOCAB: usize = 13;
const MAX: usize = 400;

/// Every encoding that takes randomized positions, with settings that make its
/// length-dependent parts act at positions up to [`MAX`].
fn cases() -> Vec<(String, PositionalEncodingConfig)> {
    ENCODING_NAMES
        .iter()
        .filter_map(|name| {
            let json = match *name {
                "rope_linear" | "rope_ntk" | "rope_dynamic_ntk" | "rope_yarn" => {
                    format!(r#"{{"type": "{name}", "original_max_len": 64, "scale_factor": 3.0}}"#)
                }
                "xpos" => r#"{"type": "xpos", "scale_base": 512.0}"#.to_string(),
                "t5" => r#"{"type": "t5", "num_buckets": 8, "max_distance": 200}"#.to_string(),
                "shaw" => r#"{"type": "shaw", "max_distance": 100}"#.to_string(),
                "fire" => r#"{"type": "fire", "init_l": 4.0}"#.to_string(),
                "dape_fire" | "dapev2_fire" => {
                    format!(r#"{{"type": "{name}", "bias": {{"init_l": 4.0}}}}"#)
                }
                "learned" => format!(r#"{{"type": "learned", "max_len": {}}}"#, MAX + 64),
                _ => format!(r#"{{"type": "{name}"}}"#),
            };
            let config = PositionalEncodingConfig::from_json(&json).unwrap();
            config.takes_randomized().then(|| {
                let config = config
                    .with_randomized(Some(RandomizedConfig::new(MAX)))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                (name.to_string(), config)
            })
        })
        .collect()
}

/// Encodings whose row `i` depends on the sequence's extent (dynamic NTK): a decode step equals
/// the last row of the full forward over the tokens seen so far.
fn length_dependent(name: &str) -> bool {
    name == "rope_dynamic_ntk"
}

/// Encodings that see only differences of positions: shifting every position by a constant
/// leaves their outputs unchanged (not absolute encodings, not FIRE, whose normaliser reads the
/// query's own position, not dynamic NTK, whose frequencies follow the extent).
fn relative(name: &str) -> bool {
    !matches!(
        name,
        "sinusoidal" | "learned" | "rope_dynamic_ntk" | "fire" | "dape_fire" | "dapev2_fire"
    )
}

fn lm(encoding: &PositionalEncodingConfig) -> LanguageModel<B> {
    lm_layers(encoding, 2)
}

fn lm_layers(encoding: &PositionalEncodingConfig, layers: usize) -> LanguageModel<B> {
    let mut model = LanguageModelConfig::new(
        VOCAB,
        TransformerConfig::new(16, layers, 4).with_encoding(encoding.clone()),
    )
    .init::<B>(&Default::default())
    .expect("valid config");
    // Peaked attention, so that positional differences show in the outputs.
    for block in model.transformer.blocks.iter_mut() {
        let w = block.attention.qkv.weight.val();
        block.attention.qkv.weight = Param::from_tensor((w * 3.0).detach());
    }
    model
}

fn tokens(ids: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

fn ids(n: usize, seed: i64) -> Vec<i64> {
    (0..n as i64)
        .map(|i| (i * 7 + seed * 5 + i * i) % VOCAB as i64)
        .collect()
}

fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

fn positions(len: usize, seed: u64) -> Positions {
    RandomizedConfig::new(MAX).sample(len, seed).unwrap()
}

#[test]
fn the_encodings_that_take_randomized_positions_are_the_position_driven_ones() {
    let takers: Vec<String> = cases().into_iter().map(|(n, _)| n).collect();
    for name in [
        "sinusoidal",
        "learned",
        "rope",
        "rope_yarn",
        "xpos",
        "t5",
        "alibi",
        "kerple_log",
        "fire",
        "sandwich",
        "transformer_xl",
        "dape_kerple_log",
        "dapev2_fire",
    ] {
        assert!(takers.iter().any(|t| t == name), "{name} should take them");
    }
    for name in [
        "nope",
        "cope",
        "bipe_alibi",
        "bipe_rope",
        "fox",
        "dape_fox",
        "dape_nope",
        "dapev2_nope",
    ] {
        let config = PositionalEncodingConfig::from_name(name).unwrap();
        let e = config
            .with_randomized(Some(RandomizedConfig::new(64)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("randomized") && e.contains(name), "{name}: {e}");
        // And from JSON, as the configs give it.
        let json = format!(r#"{{"type": "{name}", "randomized": {{"max_position": 64}}}}"#);
        assert!(
            PositionalEncodingConfig::from_json(&json).is_err(),
            "{name}"
        );
    }
}

#[test]
fn randomized_configs_round_trip_and_bad_ones_name_the_field() {
    let json = r#"{"type": "dape_kerple_log", "randomized": {"max_position": 2048}, "dape": {"mlp_width": 8}}"#;
    let config = PositionalEncodingConfig::from_json(json).unwrap();
    assert_eq!(config.randomized(), Some(&RandomizedConfig::new(2048)));
    assert_eq!(config.name(), "dape_kerple_log");
    assert_eq!(config.label(), "dape_kerple_log+randomized");
    assert!(config.is_dape());
    let text = serde_json::to_string(&config).unwrap();
    let back: PositionalEncodingConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, config);
    assert!(text.contains(r#""max_position":2048"#), "{text}");
    // Switching it off gives the plain encoding back.
    assert_eq!(
        config.with_randomized(None).unwrap(),
        PositionalEncodingConfig::from_json(
            r#"{"type": "dape_kerple_log", "dape": {"mlp_width": 8}}"#
        )
        .unwrap()
    );
    let bad = |json: &str| {
        PositionalEncodingConfig::from_json(json)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(r#"{"type": "rope", "randomized": {"max_positon": 9}}"#).contains("max_positon"));
    assert!(bad(r#"{"type": "rope", "randomized": {"max_position": 0}}"#).contains("max_position"));
    assert!(
        bad(r#"{"type": "learned", "max_len": 100, "randomized": {"max_position": 101}}"#)
            .contains("max_len")
    );
}

#[cfg(feature = "harness")]
#[test]
fn lm_configs_carry_randomized_positions_in_their_encoding() {
    let lm: dape::experiment::lm::LmTrainConfig = serde_json::from_str(
        r#"{"encoding": {"type": "rope", "randomized": {"max_position": 8192}}}"#,
    )
    .unwrap();
    assert_eq!(lm.encoding.label(), "rope+randomized");
    lm.validate().unwrap();
    let short: dape::experiment::lm::LmTrainConfig = serde_json::from_str(
        r#"{"encoding": {"type": "rope", "randomized": {"max_position": 100}}}"#,
    )
    .unwrap();
    assert!(short
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_position"));
}

#[test]
fn positions_reach_the_output_and_relative_encodings_see_only_differences() {
    let len = 10;
    let p = positions(len, 1);
    let shifted = Positions::new(p.as_slice().iter().map(|x| x + 37).collect()).unwrap();
    for (name, config) in cases() {
        let model = lm(&config);
        let x = ids(len, 1);
        let sequential = to_vec(model.forward(tokens(&x)).unwrap());
        let at = to_vec(model.forward_at(tokens(&x), Some(&p)).unwrap());
        assert!(
            max_diff(&at, &sequential) > 1e-4,
            "{name}: randomized positions left the output unchanged"
        );
        // 0..len passed explicitly is the plain forward.
        let explicit = to_vec(
            model
                .forward_at(tokens(&x), Some(&Positions::sequential(len)))
                .unwrap(),
        );
        assert!(max_diff(&explicit, &sequential) < 2e-5, "{name}: 0..len");
        let moved = to_vec(model.forward_at(tokens(&x), Some(&shifted)).unwrap());
        let d = max_diff(&moved, &at);
        if relative(&name) {
            assert!(
                d < 1e-4,
                "{name}: a shift of every position changed the output by {d}"
            );
        } else {
            assert!(d > 1e-4, "{name}: absolute positions ignored a shift");
        }
    }
}

#[test]
fn causality_decode_and_chunks_hold_at_randomized_positions() {
    let len = 11;
    let prompt = 4;
    let p = positions(len, 2);
    for (name, config) in cases() {
        // A length-dependent encoding's cached states of earlier steps differ from a longer
        // forward's, so its decode is checked on one layer.
        let model = lm_layers(&config, if length_dependent(&name) { 1 } else { 2 });
        let x = ids(len, 2);
        let full = model.forward_at(tokens(&x), Some(&p)).unwrap();
        // Causality: later tokens (at the same positions) never change earlier rows.
        let mut y = x.clone();
        for t in y.iter_mut().skip(7) {
            *t = (*t + 5) % VOCAB as i64;
        }
        let other = model.forward_at(tokens(&y), Some(&p)).unwrap();
        let d = max_diff(
            &to_vec(other.narrow(1, 0, 7)),
            &to_vec(full.clone().narrow(1, 0, 7)),
        );
        assert!(d < 2e-5, "{name}: future tokens changed the past by {d}");
        // Chunked == unchunked.
        for chunk in [1, 3, 5] {
            let chunked = model.clone().with_chunk_size(Some(chunk));
            let out = chunked.forward_at(tokens(&x), Some(&p)).unwrap();
            let d = max_diff(&to_vec(out), &to_vec(full.clone()));
            assert!(d < 1e-4, "{name}: chunk {chunk} differs by {d}");
        }
        // KV-cache decode over the same positions == full forward (the whole sequence's
        // positions are passed at every step).
        let mut cache = model.new_cache();
        let mut decoded = vec![model
            .forward_cached_at(tokens(&x[..prompt]), &mut cache, Some(&p))
            .unwrap()];
        for t in prompt..len {
            decoded.push(
                model
                    .forward_cached_at(tokens(&x[t..=t]), &mut cache, Some(&p))
                    .unwrap(),
            );
        }
        let reference = if length_dependent(&name) {
            // The step of token t equals the last row of the forward over tokens 0..=t.
            let mut rows = to_vec(model.forward_at(tokens(&x[..prompt]), Some(&p)).unwrap());
            for t in prompt..len {
                let upto = model.forward_at(tokens(&x[..=t]), Some(&p)).unwrap();
                rows.extend(to_vec(upto.narrow(1, t, 1)));
            }
            rows
        } else {
            to_vec(full.clone())
        };
        let d = max_diff(&to_vec(Tensor::cat(decoded, 1)), &reference);
        assert!(d < 1e-4, "{name}: KV-cache decode differs by {d}");
        // Bidirectional (the CHE model): chunked == unchunked at the same positions.
        let seq = SequenceModelConfig::new(
            5,
            3,
            TransformerConfig::new(16, 2, 4).with_encoding(config.clone()),
        )
        .init::<B>(&Default::default())
        .unwrap();
        let inputs = tokens(&x[..len - 3].iter().map(|t| t % 5).collect::<Vec<_>>());
        let a = to_vec(seq.predict_at(inputs.clone(), 3, Some(&p)).unwrap());
        let mut chunked = seq.clone();
        chunked.transformer = chunked.transformer.with_chunk_size(Some(3));
        let b = to_vec(chunked.predict_at(inputs, 3, Some(&p)).unwrap());
        assert!(max_diff(&b, &a) < 1e-4, "{name}: bidirectional chunks");
    }
}

#[test]
fn bad_positions_are_errors() {
    let (_, rope) = cases().into_iter().find(|(n, _)| n == "rope").unwrap();
    let model = lm(&rope);
    // Too few positions for the tokens.
    let e = model
        .forward_at(tokens(&ids(8, 0)), Some(&positions(7, 0)))
        .unwrap_err()
        .to_string();
    assert!(e.contains('7') && e.contains('8'), "{e}");
    // And for the cached ones too.
    let mut cache = model.new_cache();
    model
        .forward_cached_at(tokens(&ids(4, 0)), &mut cache, Some(&positions(5, 0)))
        .unwrap();
    assert!(model
        .forward_cached_at(tokens(&ids(2, 0)), &mut cache, Some(&positions(5, 0)))
        .is_err());
    // An encoding that reads no positions.
    let nope = lm(&PositionalEncodingConfig::Nope);
    assert!(nope
        .forward_at(tokens(&ids(4, 0)), Some(&positions(4, 0)))
        .is_err());
}

#[test]
fn biases_and_rotations_at_positions_match_their_formulas() {
    let device = Default::default();
    let p = Positions::new(vec![3, 10, 11, 40, 41, 90]).unwrap();
    let span = Span {
        query_start: 2,
        query_len: 3,
        key_len: 5,
        causal: true,
        positions: Some(p.clone()),
    };
    // ALiBi: -m_h |p_i - p_j|.
    let alibi = match PositionalEncodingConfig::from_name("alibi")
        .unwrap()
        .init::<B>(4, 4, &device)
        .unwrap()
    {
        PositionalEncoding::Bias(b @ AdditiveBias::Alibi(_)) => b,
        _ => unreachable!(),
    };
    let bias = to_vec(alibi.forward(&span, &device));
    let slopes = [0.25f32, 0.0625, 0.015625, 0.00390625]; // 2^(-8h/4)
    let pos = p.as_slice();
    for (h, m) in slopes.iter().enumerate() {
        for r in 0..3 {
            for c in 0..5 {
                let want = -m * (pos[2 + r] - pos[c]).abs() as f32;
                let got = bias[(h * 3 + r) * 5 + c];
                assert!(
                    (got - want).abs() < 1e-5,
                    "alibi h{h} r{r} c{c}: {got} vs {want}"
                );
            }
        }
    }
    // RoPE: the rotation of token t is the rotation at position p_t.
    let rope = match PositionalEncodingConfig::from_name("rope")
        .unwrap()
        .init::<B>(1, 8, &device)
        .unwrap()
    {
        PositionalEncoding::Rotary(r) => r,
        _ => unreachable!(),
    };
    let q = Tensor::<B, 4>::random([1, 1, 3, 8], burn::tensor::Distribution::Default, &device);
    let k = Tensor::<B, 4>::random([1, 1, 5, 8], burn::tensor::Distribution::Default, &device);
    let (qa, ka) = rope.rotate_tokens(q.clone(), k.clone(), 2, Some(pos));
    let at = |v: &[i64]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device)
    };
    let (qb, kb) = rope.forward_at(q, k, at(&pos[2..5]), at(&pos[..5]));
    assert!(max_diff(&to_vec(qa), &to_vec(qb)) < 1e-5);
    assert!(max_diff(&to_vec(ka), &to_vec(kb)) < 1e-5);
}

#[cfg(feature = "harness")]
#[test]
fn che_steps_draw_seeded_positions_shared_by_the_step() {
    use burn::data::dataset::Dataset;
    use dape::data::che::Task;
    use dape::experiment::che::CheTrainConfig;
    use dape::train::che::CheStepDataset;

    let task = Task::ReverseString;
    let r = RandomizedConfig::new(2048);
    let data = CheStepDataset::random(task, 1, 40, 6, 4, 9).randomized(Some(r.clone()));
    let again = CheStepDataset::random(task, 1, 40, 6, 4, 9).randomized(Some(r.clone()));
    let sharded = CheStepDataset::random(task, 1, 40, 6, 4, 9)
        .randomized(Some(r.clone()))
        .sharded(2);
    let mut seen = Vec::new();
    for step in 0..6 {
        let item = data.get(step).unwrap();
        let p = item.positions.clone().expect("randomized");
        let tokens = item.length + task.output_len(item.length);
        assert_eq!(p.len(), tokens, "one position per input and output token");
        let v = p.as_slice();
        assert!(v.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert!(v.iter().all(|&x| (0..2048).contains(&x)), "in range");
        assert_eq!(again.get(step).unwrap().positions, item.positions, "seeded");
        // Both shards of a step share its positions.
        assert_eq!(sharded.get(step).unwrap().positions, item.positions);
        assert_eq!(sharded.get(step + 6).unwrap().positions, item.positions);
        seen.push(v.to_vec());
    }
    seen.dedup();
    assert_eq!(seen.len(), 6, "every step draws its own sample");
    // Without the setting, no positions.
    assert!(CheStepDataset::random(task, 1, 40, 6, 4, 9)
        .get(0)
        .unwrap()
        .positions
        .is_none());
    // A range too small for the longest validation input is a config error.
    let rope = PositionalEncodingConfig::from_name("rope")
        .unwrap()
        .with_randomized(Some(RandomizedConfig::new(100)))
        .unwrap();
    let e = CheTrainConfig::new(task, rope)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_position"), "{e}");
}

/// Collects every float parameter whose gradient is missing, non-finite or all zero.
struct GradCheck<'a> {
    grads: &'a <burn::backend::Autodiff<B> as burn::tensor::backend::AutodiffBackend>::Gradients,
    seen: usize,
    bad: Vec<String>,
}

impl burn::module::ModuleVisitor<burn::backend::Autodiff<B>> for GradCheck<'_> {
    fn visit_float<const D: usize>(
        &mut self,
        param: &Param<Tensor<burn::backend::Autodiff<B>, D>>,
    ) {
        self.seen += 1;
        let dims = param.val().dims();
        match param.val().grad(self.grads) {
            None => self.bad.push(format!("{dims:?}: no gradient")),
            Some(g) => {
                let v: Vec<f32> = g.into_data().to_vec().unwrap();
                if v.iter().any(|x| !x.is_finite()) {
                    self.bad.push(format!("{dims:?}: non-finite gradient"));
                } else if v.iter().all(|&x| x == 0.0) {
                    self.bad.push(format!("{dims:?}: zero gradient"));
                }
            }
        }
    }
}

#[test]
fn gradients_reach_every_parameter_at_randomized_positions() {
    use burn::module::Module;
    type AD = burn::backend::Autodiff<B>;
    let len = 9;
    // Some positions below FIRE's threshold L (4 here), so that its L multiplier acts.
    let p = Positions::new(vec![0, 2, 3, 9, 40, 41, 100, 250, 399]).unwrap();
    for (name, config) in cases() {
        let model = LanguageModelConfig::new(
            VOCAB,
            TransformerConfig::new(16, 2, 4).with_encoding(config.clone()),
        )
        .init::<AD>(&Default::default())
        .unwrap();
        let x = Tensor::<AD, 2, Int>::from_data(
            TensorData::new(ids(len, 4), [1, len]),
            &Default::default(),
        );
        let logits = model.forward_at(x, Some(&p)).unwrap();
        let grads = (logits.clone() * logits).sum().backward();
        let mut check = GradCheck {
            grads: &grads,
            seen: 0,
            bad: Vec::new(),
        };
        model.visit(&mut check);
        assert!(check.seen > 0, "{name}");
        assert!(check.bad.is_empty(), "{name}: {:?}", check.bad);
    }
}

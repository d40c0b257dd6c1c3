//! Properties every encoding must have, checked on small models on ndarray:
//! causality, KV-cache decoding == full forward, chunked == unchunked (causal and
//! bidirectional), and gradients reaching every trainable parameter.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use dape::{
    LanguageModel, LanguageModelConfig, PositionalEncodingConfig, SequenceModelConfig, SsmaxConfig,
    StickBreakingConfig, TransformerConfig, ENCODING_NAMES,
};
use dape::{LayerEncodings, QkNormConfig, TemperatureConfig};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

const VOCAB: usize = 13;

/// One model setting under test: an encoding, with or without Scalable-Softmax, with the
/// softmax or stick-breaking attention (with or without the query's own key on the stick), and
/// any other change to the stack (the layer options and hybrid schedules).
#[derive(Clone)]
struct Case {
    encoding: PositionalEncodingConfig,
    ssmax: bool,
    stick_breaking: Option<StickBreakingConfig>,
    stack: Option<Stack>,
}

/// A change to the stack under test.
type Stack = fn(TransformerConfig) -> TransformerConfig;

impl From<PositionalEncodingConfig> for Case {
    fn from(encoding: PositionalEncodingConfig) -> Self {
        Self {
            encoding,
            ssmax: false,
            stick_breaking: None,
            stack: None,
        }
    }
}

/// Every encoding, with settings that make its length-dependent parts act at these tiny lengths
/// (scaling already active, few buckets, small clip distances), and Scalable-Softmax over a
/// few of them (`name+ssmax`; on the tensor path, with and without a bias, and over DAPE).
fn encodings() -> Vec<(String, Case)> {
    ENCODING_NAMES
        .iter()
        .map(|name| {
            let json = match *name {
                "rope_linear" | "rope_ntk" | "rope_dynamic_ntk" | "rope_yarn" => format!(
                    r#"{{"type": "{name}", "original_max_len": 4, "scale_factor": 3.0}}"#
                ),
                "xpos" => r#"{"type": "xpos", "scale_base": 8.0}"#.to_string(),
                "t5" => r#"{"type": "t5", "num_buckets": 8, "max_distance": 10}"#.to_string(),
                "shaw" => r#"{"type": "shaw", "max_distance": 3}"#.to_string(),
                "cope" => r#"{"type": "cope", "npos_max": 5}"#.to_string(),
                "learned" => r#"{"type": "learned", "max_len": 32}"#.to_string(),
                "fire" => r#"{"type": "fire", "init_l": 4.0}"#.to_string(),
                // Token 3 also ends a segment, so that the tests' short random sequences (and
                // the CHE-style inputs below 5) hold several segments.
                "bipe_alibi" | "bipe_rope" => format!(
                    r#"{{"type": "{name}", "segments": {{"boundary_tokens": [3, 10]}}}}"#
                ),
                "sandwich" => r#"{"type": "sandwich", "dim": 16}"#.to_string(),
                // Blocks of 4 tokens, so that the tests' short sequences span several.
                "path" | "path_fox" => format!(r#"{{"type": "{name}", "block": 4}}"#),
                "dape_path" => r#"{"type": "dape_path", "path": {"block": 4}}"#.to_string(),
                "dape_fire" | "dapev2_fire" => {
                    format!(r#"{{"type": "{name}", "bias": {{"init_l": 4.0, "activation": "leaky_relu"}}}}"#)
                }
                _ => format!(r#"{{"type": "{name}"}}"#),
            };
            let config = PositionalEncodingConfig::from_json(&json)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name.to_string(), config)
        })
        .chain(std::iter::once((
            "dapev2_kerple_log/reference".to_string(),
            PositionalEncodingConfig::from_json(
                r#"{"type": "dapev2_kerple_log", "dape": {"mask_future_hidden": false}}"#,
            )
            .unwrap(),
        )))
        .map(|(name, encoding)| (name, Case::from(encoding)))
        .chain(
            ["nope", "rope", "kerple_log", "dape_kerple_log"]
                .into_iter()
                .map(|name| {
                    let case = Case {
                        encoding: PositionalEncodingConfig::from_name(name).unwrap(),
                        ssmax: true,
                        stick_breaking: None,
                        stack: None,
                    };
                    (format!("{name}+ssmax"), case)
                }),
        )
        .chain(
            [
                ("nope", false, false),
                ("nope", false, true),
                ("rope", false, false),
                ("kerple_log", false, false),
                ("dape_kerple_log", false, false),
                ("fox", false, false),
                ("alibi", true, true),
            ]
            .into_iter()
            .map(|(name, ssmax, current)| {
                let case = Case {
                    encoding: PositionalEncodingConfig::from_name(name).unwrap(),
                    ssmax,
                    stick_breaking: Some(StickBreakingConfig::new().with_attend_current(current)),
                    stack: None,
                };
                let extra = if ssmax { "+ssmax" } else { "" };
                let own = if current { "/current" } else { "" };
                (format!("{name}{extra}+sb{own}"), case)
            }),
        )
        .chain(stacks())
        .collect()
}

/// The layer options and hybrid schedules, at settings that act at the tests' lengths: a
/// learned QK-norm, a window of 3 keys, temperature tuning from position 1, an iRoPE-style stack
/// (RoPE with QK-norm and a window, every second layer NoPE with temperature tuning), a
/// per-layer list, and the window under stick-breaking.
fn stacks() -> Vec<(String, Case)> {
    fn temperature() -> Option<TemperatureConfig> {
        Some(TemperatureConfig::new().with_alpha(0.5).with_floor(2))
    }
    let cases: [(&str, &str, Stack); 6] = [
        ("rope+qk_norm", "rope", |t| {
            t.with_qk_norm(Some(QkNormConfig::new().with_learned(true)))
        }),
        ("alibi+window", "alibi", |t| t.with_sliding_window(Some(3))),
        ("nope+temperature", "nope", |t| {
            t.with_temperature(temperature())
        }),
        ("irope", "rope", |t| {
            t.with_layer_encodings(Some(LayerEncodings::every(
                2,
                PositionalEncodingConfig::Nope,
            )))
            .with_qk_norm(Some(QkNormConfig::new()))
            .with_sliding_window(Some(4))
            .with_temperature(temperature())
        }),
        ("kerple_log/fox list", "kerple_log", |t| {
            t.with_layer_encodings(Some(LayerEncodings::List(vec![
                PositionalEncodingConfig::from_name("kerple_log").unwrap(),
                PositionalEncodingConfig::from_name("fox").unwrap(),
            ])))
        }),
        ("nope+sb+window", "nope", |t| {
            t.with_stick_breaking(Some(StickBreakingConfig::new()))
                .with_sliding_window(Some(3))
        }),
    ];
    cases
        .into_iter()
        .map(|(name, encoding, stack)| {
            let case = Case {
                encoding: PositionalEncodingConfig::from_name(encoding).unwrap(),
                ssmax: false,
                stick_breaking: None,
                stack: Some(stack),
            };
            (name.to_string(), case)
        })
        .collect()
}

/// Encodings whose row `i` depends on the sequence length (dynamic NTK's frequencies; DAPE V2 in
/// the reference's form reads key column `i + 1`): a KV-cache step equals the last row of the
/// full forward over the tokens seen so far, not the row of a longer forward. In a multi-layer
/// model the cached states of earlier steps then differ from a fresh forward's, so their decode
/// property is checked on one layer.
fn length_dependent(name: &str) -> bool {
    name == "rope_dynamic_ntk" || name.ends_with("/reference")
}

/// What decoding `ids[prompt..]` one token at a time after `ids[..prompt]` must give.
fn decode_reference(model: &LanguageModel<B>, name: &str, ids: &[i64], prompt: usize) -> Vec<f32> {
    if !length_dependent(name) {
        return to_vec(model.forward(tokens(ids)).unwrap());
    }
    let mut rows = to_vec(model.forward(tokens(&ids[..prompt])).unwrap());
    for t in prompt..ids.len() {
        let full = model.forward(tokens(&ids[..=t])).unwrap();
        rows.extend(to_vec(full.narrow(1, t, 1)));
    }
    rows
}

fn config_of(name: &str) -> Case {
    encodings()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, c)| c)
        .expect("known test encoding")
}

/// The model shape of the tests; Scalable-Softmax starts at `1 / ln 4`, so that it changes the
/// logits clearly at these lengths.
fn transformer(case: impl Into<Case>) -> TransformerConfig {
    let case = case.into();
    let shape = TransformerConfig::new(16, 2, 4)
        .with_encoding(case.encoding)
        .with_ssmax(case.ssmax.then(|| SsmaxConfig::new().with_init_length(4)))
        .with_stick_breaking(case.stick_breaking);
    match case.stack {
        Some(stack) => stack(shape),
        None => shape,
    }
}

fn lm<Bk: Backend>(case: impl Into<Case>) -> LanguageModel<Bk> {
    lm_layers(case, 2)
}

/// A small LM whose attention is peaked (query/key weights scaled up), so that positional
/// differences show in the outputs instead of averaging away in near-uniform attention.
fn lm_layers<Bk: Backend>(case: impl Into<Case>, layers: usize) -> LanguageModel<Bk> {
    let mut shape = transformer(case);
    shape.n_layers = layers;
    let mut model = LanguageModelConfig::new(VOCAB, shape)
        .init::<Bk>(&Default::default())
        .expect("valid config");
    for block in model.transformer.blocks.iter_mut() {
        let w = block.attention.qkv.weight.val();
        block.attention.qkv.weight = Param::from_tensor((w * 3.0).detach());
    }
    model
}

fn tokens<Bk: Backend>(ids: &[i64]) -> Tensor<Bk, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

fn batch_tokens(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    let len = rows[0].len();
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(
        TensorData::new(flat, [rows.len(), len]),
        &Default::default(),
    )
}

fn pseudo_random(n: usize, seed: u64) -> Vec<i64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % VOCAB as u64) as i64
        })
        .collect()
}

fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

/// Largest |a - b| relative to 1 + |b|.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

const TOL: f32 = 2e-5;

#[test]
fn causality_future_tokens_never_change_past_outputs() {
    let len = 12;
    let cut = 7;
    for (name, config) in encodings() {
        let model = lm::<B>(config);
        let a = pseudo_random(len, 1);
        let mut b = a.clone();
        for t in b.iter_mut().skip(cut) {
            *t = (*t + 5) % VOCAB as i64;
        }
        let la = model.forward(tokens(&a)).unwrap();
        let lb = model.forward(tokens(&b)).unwrap();
        let past = |t: Tensor<B, 3>| to_vec(t.narrow(1, 0, cut));
        let d = max_diff(&past(la.clone()), &past(lb.clone()));
        assert!(
            d < TOL,
            "{name}: changing tokens from {cut} on changed earlier outputs by {d}"
        );
        // And the change is visible from the cut on: the test can tell.
        let later = |t: Tensor<B, 3>| to_vec(t.narrow(1, cut, len - cut));
        assert!(
            max_diff(&later(la), &later(lb)) > 1e-4,
            "{name}: the future change left later outputs unchanged"
        );
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let len = 11;
    let prompt = 4;
    for (name, config) in encodings() {
        let layers = if length_dependent(&name) { 1 } else { 2 };
        let model = lm_layers::<B>(config, layers);
        let ids = pseudo_random(len, 2);
        let mut cache = model.new_cache();
        let mut decoded = vec![model
            .forward_cached(tokens(&ids[..prompt]), &mut cache)
            .unwrap()];
        for t in prompt..len {
            decoded.push(
                model
                    .forward_cached(tokens(&ids[t..=t]), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), len, "{name}: cache length");
        let decoded = to_vec(Tensor::cat(decoded, 1));
        let d = max_diff(&decoded, &decode_reference(&model, &name, &ids, prompt));
        assert!(
            d < 1e-4,
            "{name}: KV-cache decode differs from the full forward by {d}"
        );
    }
}

#[test]
fn chunked_equals_unchunked_causal_and_with_cache() {
    let len = 13;
    for (name, config) in encodings() {
        let model = lm::<B>(config);
        let ids = batch_tokens(&[pseudo_random(len, 3), pseudo_random(len, 4)]);
        let full = to_vec(model.forward(ids.clone()).unwrap());
        for chunk in [1, 3, 5] {
            let chunked = model.clone().with_chunk_size(Some(chunk));
            let d = max_diff(&to_vec(chunked.forward(ids.clone()).unwrap()), &full);
            assert!(
                d < 1e-4,
                "{name}: chunk {chunk} differs from unchunked by {d}"
            );
        }
        // A chunked prompt through the cache, then one more token.
        let single = pseudo_random(len, 3);
        let model = lm_layers::<B>(
            config_of(&name),
            if length_dependent(&name) { 1 } else { 2 },
        );
        let chunked = model.clone().with_chunk_size(Some(4));
        let mut cache = chunked.new_cache();
        let mut out = vec![chunked
            .forward_cached(tokens(&single[..len - 1]), &mut cache)
            .unwrap()];
        out.push(
            chunked
                .forward_cached(tokens(&single[len - 1..]), &mut cache)
                .unwrap(),
        );
        let reference = decode_reference(&model, &name, &single, len - 1);
        let d = max_diff(&to_vec(Tensor::cat(out, 1)), &reference);
        assert!(d < 1e-4, "{name}: chunked prompt + decode differs by {d}");
    }
}

#[test]
fn bidirectional_model_chunked_equals_unchunked_and_sees_the_future() {
    let len = 10;
    for (name, config) in encodings() {
        let model = SequenceModelConfig::new(5, 3, transformer(config))
            .init::<B>(&Default::default())
            .unwrap();
        let ids: Vec<Vec<i64>> = [5, 6]
            .iter()
            .map(|&s| pseudo_random(len, s).iter().map(|t| t % 5).collect())
            .collect();
        let ids = batch_tokens(&ids);
        let full = model.predict(ids.clone(), 3).unwrap();
        assert_eq!(full.dims(), [2, 3, 3], "{name}: prediction shape");
        let full = to_vec(full);
        let mut chunked = model.clone();
        chunked.transformer = chunked.transformer.with_chunk_size(Some(4));
        let d = max_diff(&to_vec(chunked.predict(ids.clone(), 3).unwrap()), &full);
        assert!(d < 1e-4, "{name}: bidirectional chunked differs by {d}");
        // Changing the last input token changes the first output position (not causal).
        let mut changed = to_vec(ids.clone().float());
        changed[len - 1] = ((changed[len - 1] as i64 + 1) % 5) as f32;
        let changed: Vec<i64> = changed.iter().map(|&x| x as i64).collect();
        let changed =
            Tensor::<B, 2, Int>::from_data(TensorData::new(changed, [2, len]), &Default::default());
        let other = to_vec(model.predict(changed, 3).unwrap());
        assert!(
            max_diff(&other[..3], &full[..3]) > 1e-6,
            "{name}: encoder ignores later tokens"
        );
    }
}

/// Collects every float parameter of a module whose gradient is missing, non-finite or zero.
struct GradCheck<'a, Bk: AutodiffBackend> {
    grads: &'a Bk::Gradients,
    prefix: &'static str,
    path: Vec<String>,
    seen: usize,
    bad: Vec<String>,
}

impl<'a, Bk: AutodiffBackend> GradCheck<'a, Bk> {
    fn new(grads: &'a Bk::Gradients, prefix: &'static str) -> Self {
        Self {
            grads,
            prefix,
            path: Vec::new(),
            seen: 0,
            bad: Vec::new(),
        }
    }
}

impl<Bk: AutodiffBackend> ModuleVisitor<Bk> for GradCheck<'_, Bk> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        let name = self.path.join(".");
        if !name.starts_with(self.prefix) {
            return;
        }
        self.seen += 1;
        match param.val().grad(self.grads) {
            None => self.bad.push(format!("{name}: no gradient")),
            Some(g) => {
                let v: Vec<f32> = g.into_data().to_vec().expect("f32");
                if v.iter().any(|x| !x.is_finite()) {
                    self.bad.push(format!("{name}: non-finite gradient"));
                } else if v.iter().all(|x| *x == 0.0) {
                    self.bad.push(format!("{name}: zero gradient"));
                }
            }
        }
    }
}

#[test]
fn gradients_reach_every_trainable_parameter() {
    let _graphs = common::autodiff_lock();
    for (name, config) in encodings() {
        let model = lm::<AD>(config.clone());
        let ids = pseudo_random(12, 7);
        let logits = model.forward(tokens(&ids)).unwrap();
        let targets: Vec<i64> = ids.iter().map(|t| (t + 1) % VOCAB as i64).collect();
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(
                logits.reshape([12, VOCAB]),
                tokens::<AD>(&targets).reshape([12]),
            );
        let grads = loss.backward();
        let mut check = GradCheck::<AD>::new(&grads, "");
        model.visit(&mut check);
        assert!(check.bad.is_empty(), "{name}: {:?}", check.bad);
        let mut scales = GradCheck::<AD>::new(&grads, "transformer.blocks.0.attention.ssmax");
        model.visit(&mut scales);
        assert_eq!(
            scales.seen,
            usize::from(config.ssmax),
            "{name}: Scalable-Softmax scales visited"
        );
        assert!(
            check.seen > 10,
            "{name}: only {} parameters visited",
            check.seen
        );
    }
}

#[test]
fn encoding_parameters_are_visited_and_trained() {
    let _graphs = common::autodiff_lock();
    // The encoding's own parameters must be module parameters (saved, loaded, optimised).
    let expected = [
        ("learned", 1),
        ("t5", 1),
        ("kerple_log", 2),
        ("kerple_power", 2),
        ("fire", 6),
        ("shaw", 1),
        ("cope", 1),
        ("dape_nope", 4),
        ("dape_kerple_log", 6),
        ("dapev2_alibi", 4),
        ("dapev2_fire", 10),
        ("transformer_xl", 3),
        ("sandwich", 0),
        ("dape_sandwich", 4),
        ("dapev2_sandwich", 4),
        ("bipe_alibi", 0),
        ("bipe_rope", 0),
        ("fox", 2),
        ("dape_fox", 6),
    ];
    for (name, count) in expected {
        let config = PositionalEncodingConfig::from_name(name).unwrap();
        let model = lm::<AD>(config);
        let ids = pseudo_random(9, 8);
        let loss = model.forward(tokens(&ids)).unwrap().powf_scalar(2.0).mean();
        let grads = loss.backward();
        let prefix = if name == "learned" {
            "transformer.absolute"
        } else {
            "transformer.blocks.0.attention.encoding"
        };
        let mut check = GradCheck::<AD>::new(&grads, prefix);
        model.visit(&mut check);
        assert_eq!(check.seen, count, "{name}: encoding parameter count");
        assert!(check.bad.is_empty(), "{name}: {:?}", check.bad);
    }
}

/// BiPE: a boundary token at position `p` ends a segment there. Sequences that differ only in
/// whether the token at `p` is a boundary have the same segments and in-segment positions up to
/// `p`, and from `p + 1` on the in-segment positions restart at 0 and the segment index is one
/// higher; the model's outputs before `p` are unchanged and those after it change.
#[test]
fn bipe_boundary_resets_positions_only_after_it() {
    use dape::PositionalEncoding;
    let len = 12;
    let p = 5;
    for name in ["bipe_alibi", "bipe_rope"] {
        let config = config_of(name);
        // Tokens without boundaries (3, 10) except where placed.
        let plain: Vec<i64> = pseudo_random(len, 11)
            .into_iter()
            .map(|t| if t == 3 || t == 10 { 4 } else { t })
            .collect();
        let mut with_boundary = plain.clone();
        with_boundary[p] = 3;
        let mut without = plain.clone();
        without[p] = 7;

        let encoding: PositionalEncoding<B> =
            config.encoding.init(4, 4, &Default::default()).unwrap();
        let segs = |ids: &[i64]| {
            let (s, state) = encoding.segments(&tokens(ids), None).unwrap().unwrap();
            let index: Vec<i64> = s.index.into_data().iter::<i64>().collect();
            let position: Vec<i64> = s.position.into_data().iter::<i64>().collect();
            (index, position, state)
        };
        let (ia, pa, sa) = segs(&with_boundary);
        let (ib, pb, sb) = segs(&without);
        assert_eq!(ib, vec![0; len], "{name}: no boundary, one segment");
        assert_eq!(pb, (0..len as i64).collect::<Vec<_>>(), "{name}");
        assert_eq!(ia[..=p], ib[..=p], "{name}: indices up to the boundary");
        assert_eq!(pa[..=p], pb[..=p], "{name}: positions up to the boundary");
        for t in p + 1..len {
            assert_eq!(ia[t], 1, "{name}: segment index after the boundary");
            assert_eq!(
                pa[t],
                (t - p - 1) as i64,
                "{name}: in-segment position at {t}"
            );
        }
        assert_eq!(sa.next_index, vec![1]);
        assert_eq!(sa.next_position, vec![(len - p - 1) as i64]);
        assert_eq!(sb.next_position, vec![len as i64]);

        // The model: outputs before p agree, outputs after p differ.
        let model = lm::<B>(config);
        let a = model.forward(tokens(&with_boundary)).unwrap();
        let b = model.forward(tokens(&without)).unwrap();
        let before = |t: Tensor<B, 3>| to_vec(t.narrow(1, 0, p));
        assert!(
            max_diff(&before(a.clone()), &before(b.clone())) < TOL,
            "{name}"
        );
        let after = |t: Tensor<B, 3>| to_vec(t.narrow(1, p + 1, len - p - 1));
        assert!(
            max_diff(&after(a), &after(b)) > 1e-4,
            "{name}: reset left no trace"
        );
    }
}

/// BiPE: the segment state the KV cache carries after a prompt and single-token steps is that
/// of the whole sequence (boundaries inside the prompt, at a step, and back to back).
#[test]
fn bipe_segments_continue_across_cache_steps() {
    let config = config_of("bipe_alibi");
    let model = lm::<B>(config);
    let ids = vec![1, 2, 3, 4, 5, 10, 6, 3, 3, 7, 8];
    let mut cache = model.new_cache();
    model.forward_cached(tokens(&ids[..4]), &mut cache).unwrap();
    for t in 4..ids.len() {
        model
            .forward_cached(tokens(&ids[t..=t]), &mut cache)
            .unwrap();
    }
    let state = cache.layers[0].segment_state().unwrap();
    // Boundaries at 2, 5, 7, 8: four segments ended; two tokens (9, 10) in the fifth.
    assert_eq!(state.next_index, vec![4]);
    assert_eq!(state.next_position, vec![2]);
}

//! Configs: every encoding survives a JSON round-trip, partial JSON takes defaults, and invalid
//! configs and inputs are rejected with an error that names the offending value.

use burn::backend::NdArray;
use burn::prelude::*;

use dape::{
    AttentionConfig, Error, LanguageModelConfig, PositionalEncodingConfig, SequenceModelConfig,
    TransformerConfig, ENCODING_NAMES,
};

type B = NdArray<f32>;

fn dev() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

#[test]
fn every_encoding_round_trips_through_json() {
    for name in ENCODING_NAMES {
        let config = PositionalEncodingConfig::from_name(name).unwrap();
        assert_eq!(config.name(), *name);
        let json = serde_json::to_string(&config).unwrap();
        let back: PositionalEncodingConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config, "{name}: {json}");
        // Every encoding also builds.
        config
            .init::<B>(4, 8, &dev())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn non_default_values_round_trip_and_partial_json_takes_defaults() {
    let json = r#"{"type": "dapev2_kerple_log", "dape": {"mlp_width": 48, "kernel_size": 5},
                   "bias": {"eps": 0.02}}"#;
    let config = PositionalEncodingConfig::from_json(json).unwrap();
    match &config {
        PositionalEncodingConfig::Dapev2KerpleLog { bias, dape } => {
            assert_eq!(dape.mlp_width, 48);
            assert_eq!(dape.kernel_size, 5);
            assert!(dape.mask_future_hidden, "default kept");
            assert_eq!(bias.eps, 0.02);
            assert_eq!(bias.init_p_max, 2.0, "default kept");
        }
        other => panic!("parsed as {other:?}"),
    }
    let text = serde_json::to_string(&config).unwrap();
    assert_eq!(PositionalEncodingConfig::from_json(&text).unwrap(), config);

    // A bare name is accepted where a config is expected.
    let alibi: PositionalEncodingConfig = serde_json::from_str(r#""alibi""#).unwrap();
    assert_eq!(alibi, PositionalEncodingConfig::from_name("alibi").unwrap());

    // Nested in a model config, saved and loaded with Burn's Config.
    let model = TransformerConfig::new(32, 2, 4)
        .with_encoding(config.clone())
        .with_chunk_size(Some(128));
    let text =
        burn::config::Config::save(&model, std::env::temp_dir().join("dape-config-test.json"));
    assert!(text.is_ok());
    let loaded = <TransformerConfig as burn::config::Config>::load(
        std::env::temp_dir().join("dape-config-test.json"),
    )
    .unwrap();
    assert_eq!(loaded.encoding, config);
    assert_eq!(loaded.chunk_size, Some(128));
}

fn message(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_encoding_names_and_fields_are_rejected() {
    let err = PositionalEncodingConfig::from_name("dape_kerple_lgo").unwrap_err();
    assert!(matches!(err, Error::UnknownEncoding { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("dape_kerple_lgo") && msg.contains("dape_kerple_log"),
        "{msg}"
    );

    let msg = message(PositionalEncodingConfig::from_json(
        r#"{"type": "alibi", "slope": 2}"#,
    ));
    assert!(msg.contains("alibi.slope"), "{msg}");
    let msg = message(PositionalEncodingConfig::from_json(
        r#"{"type": "dape_alibi", "dape": {"mlp_widht": 8}}"#,
    ));
    assert!(
        msg.contains("mlp_widht") && msg.contains("mlp_width"),
        "{msg}"
    );
    let msg = message(PositionalEncodingConfig::from_json(r#"{"mlp_width": 8}"#));
    assert!(msg.contains("type"), "{msg}");
}

#[test]
fn invalid_configs_name_the_offending_value() {
    // Heads not dividing d_model.
    let msg = message(AttentionConfig::new(10, 3).init::<B>(&dev()));
    assert!(
        msg.contains("d_model") && msg.contains("10") && msg.contains('3'),
        "{msg}"
    );
    // An odd rotary dimension: head_dim 6 with half of it rotated gives 3.
    let rope =
        PositionalEncodingConfig::from_json(r#"{"type": "rope", "rotary_fraction": 0.5}"#).unwrap();
    let msg = message(
        AttentionConfig::new(12, 2)
            .with_encoding(rope)
            .init::<B>(&dev()),
    );
    assert!(msg.contains("rotary_dim") && msg.contains('3'), "{msg}");
    // Zero widths.
    for json in [
        r#"{"type": "dape_kerple_log", "dape": {"mlp_width": 0}}"#,
        r#"{"type": "dapev2_alibi", "dape": {"mlp_width": 0}}"#,
        r#"{"type": "fire", "mlp_width": 0}"#,
    ] {
        let config = PositionalEncodingConfig::from_json(json).unwrap();
        let msg = message(config.init::<B>(4, 8, &dev()));
        assert!(
            msg.contains("mlp_width") && msg.contains('0'),
            "{json}: {msg}"
        );
    }
    // An even DAPE V2 kernel, a zero-length learned table, zero heads, zero chunk.
    let even = PositionalEncodingConfig::from_json(
        r#"{"type": "dapev2_nope", "dape": {"kernel_size": 4}}"#,
    )
    .unwrap();
    assert!(message(even.init::<B>(4, 8, &dev())).contains("kernel_size"));
    let learned =
        PositionalEncodingConfig::from_json(r#"{"type": "learned", "max_len": 0}"#).unwrap();
    assert!(message(learned.init::<B>(4, 8, &dev())).contains("max_len"));
    assert!(message(AttentionConfig::new(8, 0).init::<B>(&dev())).contains("n_heads"));
    let chunk = AttentionConfig::new(8, 2).with_chunk_size(Some(0));
    assert!(message(chunk.init::<B>(&dev())).contains("chunk_size"));
    let layers = TransformerConfig::new(8, 0, 2);
    assert!(message(LanguageModelConfig::new(10, layers).init::<B>(&dev())).contains("n_layers"));
}

#[test]
fn invalid_inputs_are_errors_not_panics() {
    let learned =
        PositionalEncodingConfig::from_json(r#"{"type": "learned", "max_len": 8}"#).unwrap();
    let model =
        LanguageModelConfig::new(10, TransformerConfig::new(8, 1, 2).with_encoding(learned))
            .init::<B>(&dev())
            .unwrap();
    let tokens = |n: usize, v: i64| Tensor::<B, 2, Int>::full([1, n], v, &dev());

    // A length of zero.
    let msg = message(model.forward(tokens(0, 1)));
    assert!(msg.contains("[1, 0]"), "{msg}");
    // Past the learned table, also through the cache.
    let err = model.forward(tokens(9, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SequenceTooLong {
                length: 9,
                max: 8,
                ..
            }
        ),
        "{err}"
    );
    let mut cache = model.new_cache();
    model.forward_cached(tokens(8, 1), &mut cache).unwrap();
    let err = model.forward_cached(tokens(1, 1), &mut cache).unwrap_err();
    assert!(
        matches!(err, Error::SequenceTooLong { length: 9, .. }),
        "{err}"
    );
    // Token ids outside the vocabulary.
    assert!(message(model.forward(tokens(3, 10))).contains("10"));
    assert!(message(model.forward(tokens(3, -1))).contains("-1"));
    // A batch that does not match the cache.
    let mut cache = model.new_cache();
    model.forward_cached(tokens(2, 1), &mut cache).unwrap();
    let two = Tensor::<B, 2, Int>::full([2, 1], 1, &dev());
    assert!(message(model.forward_cached(two, &mut cache)).contains("batch"));

    // A KV cache on bidirectional attention is refused.
    let attention = AttentionConfig::new(8, 2)
        .with_causal(false)
        .init::<B>(&dev())
        .unwrap();
    let mut kv = dape::KvCache::new();
    let x = Tensor::<B, 3>::zeros([1, 2, 8], &dev());
    assert!(message(attention.forward_cached(x, &mut kv)).contains("causal"));

    // No output positions for the sequence model.
    let seq = SequenceModelConfig::new(2, 2, TransformerConfig::new(8, 1, 2))
        .init::<B>(&dev())
        .unwrap();
    assert!(message(seq.predict(tokens(3, 1), 0)).contains("output_len"));
}

#[test]
fn shipped_config_files_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/encodings");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let config = PositionalEncodingConfig::from_json(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        config
            .init::<B>(8, 16, &dev())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        count += 1;
    }
    assert!(count >= 3, "expected config files in {}", dir.display());
}

#[cfg(feature = "harness")]
#[test]
fn lm_configs_cover_every_encoding_and_validate() {
    use dape::experiment::lm::LmTrainConfig;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/lm");
    for name in dape::ENCODING_NAMES {
        let config = LmTrainConfig::load(&dir.join(format!("{name}.json")))
            .unwrap_or_else(|e| panic!("configs/lm/{name}.json: {e}"));
        assert_eq!(config.encoding.name(), *name);
        assert_eq!(config.train_length, 128);
    }
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config =
            LmTrainConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if path.to_string_lossy().ends_with("-len64.json") {
            assert_eq!(config.train_length, 64);
        }
        count += 1;
    }
    assert!(count > dape::ENCODING_NAMES.len());
    let paper = LmTrainConfig::load(&dir.join("paper-125m.json")).unwrap();
    assert_eq!(
        (
            paper.n_layers,
            paper.d_model,
            paper.n_heads,
            paper.train_length
        ),
        (12, 768, 12, 512)
    );
    assert_eq!(paper.tokenizer, dape::data::corpus::Tokenizer::Gpt2);
}

#[cfg(feature = "harness")]
#[test]
fn lm_config_errors_name_the_field() {
    use dape::experiment::lm::LmTrainConfig;
    let bad = |json: &str| {
        let c: Result<LmTrainConfig, _> = serde_json::from_str(json);
        match c {
            Err(e) => e.to_string(),
            Ok(c) => c.validate().unwrap_err().to_string(),
        }
    };
    assert!(bad(r#"{"steps": 0}"#).contains("steps"));
    assert!(bad(r#"{"warmup_steps": 5000}"#).contains("warmup_steps"));
    assert!(bad(r#"{"beta_2": 1.5}"#).contains("beta_2"));
    assert!(bad(r#"{"d_model": 100, "n_heads": 8}"#).contains("100"));
    assert!(bad(r#"{"tokenizer": "sentencepiece"}"#).contains("sentencepiece"));
    assert!(bad(r#"{"learning_rat": 0.1}"#).contains("learning_rat"));
    assert!(bad(r#"{"valid_lengths": []}"#).contains("valid_lengths"));
    assert!(bad(r#"{"ssmax": {"init_length": 1}}"#).contains("init_length"));
    assert!(bad(r#"{"ssmax": {"init_lenght": 64}}"#).contains("init_lenght"));
}

/// Scalable-Softmax in an LM config: parsed, written back (and left out when off, so configs
/// without it are unchanged), and the model it builds has one scale per head per layer.
#[cfg(feature = "harness")]
#[test]
fn lm_config_ssmax_round_trips() {
    use dape::experiment::lm::LmTrainConfig;
    let config: LmTrainConfig =
        serde_json::from_str(r#"{"encoding": "kerple_log", "ssmax": {"init_length": 64}}"#)
            .unwrap();
    config.validate().unwrap();
    assert_eq!(config.ssmax.as_ref().map(|s| s.init_length), Some(64));
    let json = serde_json::to_string(&config).unwrap();
    let back: LmTrainConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.ssmax, config.ssmax, "{json}");
    let plain = serde_json::to_string(&LmTrainConfig::default()).unwrap();
    assert!(!plain.contains("ssmax"), "{plain}");
    let model = config.model().init::<B>(&dev()).unwrap();
    for block in &model.transformer.blocks {
        let s = block.attention.ssmax.as_ref().expect("ssmax scales").val();
        let want = 1.0 / 64f32.ln();
        let got: Vec<f32> = s.into_data().to_vec().unwrap();
        assert_eq!(got.len(), config.n_heads);
        assert!(got.iter().all(|v| (v - want).abs() < 1e-6), "{got:?}");
    }
}

/// Stick-breaking attention in an LM config: parsed (with and without fields), written back
/// (and left out when off), an unknown field refused by name, and every layer of the model it
/// builds carries it.
#[cfg(feature = "harness")]
#[test]
fn lm_config_stick_breaking_round_trips() {
    use dape::experiment::lm::LmTrainConfig;
    let config: LmTrainConfig =
        serde_json::from_str(r#"{"encoding": "nope", "stick_breaking": {}}"#).unwrap();
    config.validate().unwrap();
    assert_eq!(
        config.stick_breaking,
        Some(dape::StickBreakingConfig::new()),
        "an empty object is the defaults"
    );
    let current: LmTrainConfig =
        serde_json::from_str(r#"{"stick_breaking": {"attend_current": true}}"#).unwrap();
    assert!(current.stick_breaking.as_ref().unwrap().attend_current);
    let json = serde_json::to_string(&current).unwrap();
    let back: LmTrainConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.stick_breaking, current.stick_breaking, "{json}");
    let plain = serde_json::to_string(&LmTrainConfig::default()).unwrap();
    assert!(!plain.contains("stick_breaking"), "{plain}");
    let err =
        serde_json::from_str::<LmTrainConfig>(r#"{"stick_breaking": {"atend_current": true}}"#)
            .unwrap_err()
            .to_string();
    assert!(err.contains("atend_current"), "{err}");
    let model = current.model().init::<B>(&dev()).unwrap();
    for block in &model.transformer.blocks {
        assert_eq!(
            block.attention.stick_breaking, current.stick_breaking,
            "every layer breaks sticks"
        );
    }
}

/// `configs/lm/irope.json`: RoPE with every fourth layer NoPE; QK-norm on the RoPE layers and
/// temperature tuning (F = the training length) on the NoPE layer, as Llama 4 places them.
#[cfg(feature = "harness")]
#[test]
fn irope_config_builds_the_hybrid_stack() {
    use dape::experiment::lm::LmTrainConfig;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/lm/irope.json");
    let config = LmTrainConfig::load(&path).unwrap();
    let model = config.model().init::<B>(&dev()).unwrap();
    let blocks = &model.transformer.blocks;
    assert_eq!(blocks.len(), 4);
    for (layer, block) in blocks.iter().enumerate() {
        let a = &block.attention;
        let nope = layer == 3;
        let is_nope = matches!(a.encoding, dape::PositionalEncoding::Nope(_));
        assert_eq!(is_nope, nope, "layer {layer}: its encoding");
        assert_eq!(a.qk_norm.is_some(), !nope, "layer {layer}: QK-norm");
        assert_eq!(a.temperature.is_some(), nope, "layer {layer}: temperature");
    }
    assert_eq!(
        blocks[3].attention.temperature.as_ref().unwrap().floor,
        config.train_length
    );
    let bad: Result<LmTrainConfig, _> =
        serde_json::from_str(r#"{"n_layers": 2, "layer_encodings": ["rope"]}"#);
    let err = bad.map_err(|e| e.to_string()).and_then(|c| {
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    });
    assert!(err.unwrap_err().contains("layer_encodings"));
}

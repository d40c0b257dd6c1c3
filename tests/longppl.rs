//! LongPPL: the key tokens are those whose long–short difference and long-context likelihood
//! pass the paper's thresholds, recomputed here by direct forwards; the stored key tokens are
//! reused and refuse other windows; perplexity on every target as key tokens is `ppl(all)`.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::prelude::*;
use dape::eval::lm::{perplexity_with_keys, KeyTokens, LmEvalConfig};
use dape::eval::longppl::{find_key_tokens, KeyTokenStore, LongPplConfig};
use dape::experiment::lm::{token_nll, LmTrainConfig, Window};
use dape::model::LanguageModel;
use dape::PositionalEncodingConfig;

type B = NdArray<f32>;
type Device = burn::backend::ndarray::NdArrayDevice;

fn model(device: &Device) -> (LmTrainConfig, LanguageModel<B>) {
    let config = LmTrainConfig {
        encoding: PositionalEncodingConfig::from_name("alibi").unwrap(),
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        ..LmTrainConfig::default()
    };
    B::seed(device, 7);
    let model = config.model().init::<B>(device).unwrap();
    (config, model)
}

fn windows(count: usize, length: usize) -> Vec<Window> {
    let mut state = 99u64;
    (0..count)
        .map(|_| Window {
            tokens: (0..=length)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (97 + (state >> 60)) as u16
                })
                .collect(),
            positions: None,
            mask: None,
        })
        .collect()
}

/// `ℓ(tokens[n])` after `tokens[..n]`, by one forward of the whole prefix.
fn nll_last(model: &LanguageModel<B>, tokens: &[u16], device: &Device) -> f64 {
    let n = tokens.len() - 1;
    let ids = |s: &[u16]| s.iter().map(|&t| i64::from(t)).collect::<Vec<_>>();
    let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(ids(&tokens[..n]), [1, n]), device);
    let targets =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids(&tokens[1..]), [1, n]), device);
    let nll: Vec<f32> = token_nll(model, inputs, targets, None)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    f64::from(nll[n - 1])
}

#[test]
fn key_tokens_are_the_targets_the_long_context_helps() {
    let device = Default::default();
    let (train, model) = model(&device);
    let (length, short) = (40, 8);
    let ws = windows(2, length);
    // The long–short difference of every target, by hand.
    let mut lsd = Vec::new();
    for (w, window) in ws.iter().enumerate() {
        for t in short..length {
            let full = nll_last(&model, &window.tokens[..=t + 1], &device);
            let part = nll_last(&model, &window.tokens[t + 1 - short..=t + 1], &device);
            lsd.push((w, t, part - full, full));
        }
    }
    let mut sorted: Vec<f64> = lsd.iter().map(|x| x.2).collect();
    sorted.sort_by(f64::total_cmp);
    let alpha = sorted[sorted.len() / 2];
    let beta = -lsd.iter().map(|x| x.3).fold(0.0, f64::max) - 1.0; // every LCL passes
    let config = LongPplConfig { short, alpha, beta };
    let keys = find_key_tokens(&model, &train, &ws, &config, &device).unwrap();
    for (w, found) in keys.iter().enumerate() {
        let expected: Vec<u32> = lsd
            .iter()
            .filter(|x| x.0 == w && x.2 > alpha)
            .map(|x| x.1 as u32)
            .collect();
        assert_eq!(*found, expected, "window {w}");
    }
    // A likelihood threshold above every target's keeps none.
    let none = LongPplConfig {
        beta: 50.0,
        ..config
    };
    let keys = find_key_tokens(&model, &train, &ws, &none, &device).unwrap();
    assert!(keys.iter().all(Vec::is_empty));
}

#[test]
fn stored_key_tokens_are_reused_and_refuse_other_windows() {
    let device = Default::default();
    let (train, model) = model(&device);
    let dir = std::env::temp_dir().join(format!("dape-longppl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = PathBuf::from("evaluator");
    let config = LongPplConfig {
        short: 8,
        alpha: -1e9,
        beta: -1e9,
    };
    let ws = windows(2, 24);
    let mut store = KeyTokenStore {
        dir: dir.clone(),
        evaluator: Some((run.as_path(), &train, &model)),
        config: config.clone(),
        device,
    };
    let keys = store.keys(24, &ws).unwrap();
    // With no threshold every target past the short context is key.
    assert_eq!(keys, vec![(8..24).collect::<Vec<u32>>(); 2]);
    // Read back without an evaluator.
    let mut stored = KeyTokenStore::<B> {
        dir: dir.clone(),
        evaluator: None,
        config: config.clone(),
        device: Default::default(),
    };
    assert_eq!(stored.keys(24, &ws).unwrap(), keys);
    let other = windows(3, 24);
    let err = stored.keys(24, &other).unwrap_err().to_string();
    assert!(err.contains("other windows"), "{err}");
    let err = stored.keys(32, &windows(1, 32)).unwrap_err().to_string();
    assert!(err.contains("--evaluator"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn longppl_over_every_target_is_the_whole_window_perplexity() {
    let device = Default::default();
    let (train, model) = model(&device);
    let doc: Vec<u16> = windows(1, 200)[0].tokens.clone();
    let docs = [doc.as_slice()];
    let config = LmEvalConfig {
        lengths: vec![64],
        max_tokens: 128,
        last: 16,
        ..Default::default()
    };
    let mut every =
        |length: usize, ws: &[Window]| Ok(vec![(0..length as u32).collect::<Vec<_>>(); ws.len()]);
    let keys: &mut KeyTokens<'_> = &mut every;
    let (res, _) =
        perplexity_with_keys(&model, &train, &docs, &config, Some(keys), &device).unwrap();
    let l = &res[0];
    assert_eq!(l.key_tokens, Some(l.tokens));
    let longppl = l.longppl.unwrap();
    assert!(
        (longppl - l.ppl_all).abs() < 1e-4 * l.ppl_all,
        "{longppl} vs {}",
        l.ppl_all
    );
    let mut none = |_: usize, ws: &[Window]| Ok(vec![Vec::new(); ws.len()]);
    let keys: &mut KeyTokens<'_> = &mut none;
    let (res, _) =
        perplexity_with_keys(&model, &train, &docs, &config, Some(keys), &device).unwrap();
    assert_eq!((res[0].longppl, res[0].key_tokens), (None, Some(0)));
}

//! A small language-model run for the tests that train one: a seeded corpus, a tiny config
//! and run options. Included with `#[path]` by the test binaries that need it.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use dape::data::corpus::SplitConfig;
use dape::experiment::lm::LmTrainConfig;
use dape::train::che::Progress;
use dape::train::lm::LmTrainOptions;
use dape::PositionalEncodingConfig;

/// A fresh temporary folder.
pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dape-lm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Twelve documents of seeded pseudo-English, 1–4 kB each.
pub fn write_corpus(dir: &Path) {
    const WORDS: &[&str] = &[
        "the", "whale", "ship", "sea", "captain", "and", "of", "a", "to", "in", "long", "white",
        "sailed", "storm", "night", "said", "he", "was", "upon", "deck",
    ];
    let mut state = 12345u64;
    for d in 0..12 {
        let mut text = String::new();
        let words = 200 + 60 * d;
        for i in 0..words {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
            text.push_str(if i % 11 == 10 { ".\n" } else { " " });
        }
        std::fs::write(dir.join(format!("doc-{d:02}.txt")), text).unwrap();
    }
}

pub fn tiny_config(data: &Path, encoding: &str) -> LmTrainConfig {
    LmTrainConfig {
        encoding: PositionalEncodingConfig::from_name(encoding).unwrap(),
        data: data.to_path_buf(),
        split: SplitConfig {
            seed: 3,
            valid_fraction: 0.1,
            test_fraction: 0.2,
        },
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        train_length: 16,
        batch_size: 2,
        steps: 4,
        warmup_steps: 1,
        checkpoint_every: 2,
        valid_lengths: vec![16, 32],
        valid_tokens: 64,
        ..Default::default()
    }
}

pub fn options(out: &Path, cache: &Path, resume: bool) -> LmTrainOptions {
    LmTrainOptions {
        out: out.to_path_buf(),
        resume,
        cache_dir: cache.to_path_buf(),
        progress: Progress::Lines("  ".into(), 1),
        devices: Default::default(),
    }
}

pub fn params(model: &dape::LanguageModel<NdArray<f32>>) -> Vec<f32> {
    model
        .head
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

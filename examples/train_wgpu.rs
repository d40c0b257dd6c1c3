//! Train a small DAPE-Kerple model on WGPU, then evaluate it by length.
//!
//! `cargo run --release --features wgpu --example train_wgpu [-- STEPS]`
//!
//! With the books corpus in `data/books` (`scripts/fetch-corpus.sh books data/books`) it trains
//! the byte-level language model of `configs/lm/dape_kerple_log.json` and reports perplexity by
//! evaluation length on the test documents (`runs/train_wgpu_lm/eval.{json,csv}`,
//! `ppl_by_length.svg`). Without it, it uses the built-in CHE data (reverse_string, trained on
//! lengths 1..40, tested on 41..120; `runs/train_wgpu/che.{json,csv,svg}`).
//!
//! Without a GPU, WGPU runs on Mesa's software Vulkan (`apt-get install mesa-vulkan-drivers
//! libvulkan1`): slow, but real.

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};
use std::path::Path;

use dape::data::che::Task;
use dape::data::corpus::default_cache_dir;
use dape::eval::che::{evaluate_run, write_report, CheEvalConfig};
use dape::eval::lm::{self, LmEvalConfig};
use dape::experiment::che::CheTrainConfig;
use dape::experiment::lm::LmTrainConfig;
use dape::train::che::{train, Progress};
use dape::train::lm::LmTrainOptions;
use dape::PositionalEncodingConfig;

/// The language model on the books corpus: train, then perplexity by length.
fn books(corpus: &Path, steps: usize, device: &WgpuDevice) -> dape::Result<()> {
    let mut config = LmTrainConfig::load(Path::new("configs/lm/dape_kerple_log.json"))?;
    config.data = corpus.to_path_buf();
    config.steps = steps;
    config.warmup_steps = config.warmup_steps.min(steps / 10);
    config.checkpoint_every = steps.div_ceil(2);
    config.valid_lengths = vec![128, 512];
    let out = Path::new("runs/train_wgpu_lm");
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|source| dape::Error::Io {
            path: out.to_path_buf(),
            source,
        })?;
    }
    println!(
        "Training the DAPE-Kerple byte-level LM on {} with WGPU for {steps} steps into {}",
        corpus.display(),
        out.display()
    );
    let options = LmTrainOptions {
        out: out.to_path_buf(),
        resume: false,
        cache_dir: default_cache_dir(),
        progress: Progress::Lines(String::new(), (steps / 10).max(1)),
        devices: Default::default(),
    };
    let (_, summary) = dape::train::lm::train::<Autodiff<Wgpu>>(&config, &options, device, "wgpu")?;
    println!("trained in {:.1}s", summary.seconds);
    let eval = LmEvalConfig {
        lengths: vec![128, 256, 512, 1024],
        max_tokens: 4096,
        ..Default::default()
    };
    let report = lm::evaluate_run::<Wgpu>(out, None, &eval, &default_cache_dir(), "wgpu", device)?;
    println!(
        "perplexity on the last {} tokens of each window:",
        report.last
    );
    for l in &report.lengths {
        println!("  length {:>5}: {:.2}", l.length, l.ppl_last);
    }
    println!(
        "wrote eval.json, eval.csv and ppl_by_length.svg into {}",
        out.display()
    );
    Ok(())
}

fn main() -> dape::Result<()> {
    let steps = std::env::args()
        .nth(1)
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| dape::Error::invalid("steps", s, "expected a number of steps"))
        })
        .transpose()?;
    let device = WgpuDevice::default();
    let corpus = Path::new("data/books");
    if corpus.is_dir() {
        return books(corpus, steps.unwrap_or(100), &device);
    }
    println!("no books corpus in data/books: training on the built-in CHE data instead");
    let steps = steps.unwrap_or(300);
    let encoding = PositionalEncodingConfig::from_name("dape_kerple_log")?;
    let config = CheTrainConfig::new(Task::ReverseString, encoding)
        .with_steps(steps)
        .with_batch_size(32)
        .with_n_layers(2);
    let out = std::path::Path::new("runs/train_wgpu");
    println!(
        "Training DAPE-Kerple on reverse_string with WGPU for {steps} steps into {}",
        out.display()
    );
    let (model, summary) = train::<Autodiff<Wgpu>>(
        &config,
        out,
        &device,
        Progress::Lines(String::new(), (steps / 10).max(1)),
    )?;
    println!("trained in {:.1}s", summary.seconds);

    let eval = CheEvalConfig {
        lengths: (41..=120).step_by(8).collect(),
        sequences: 32,
        ..Default::default()
    };
    let report = evaluate_run(&model, &config, &eval, out, "wgpu", &device, |l| {
        println!(
            "length {:>4}  accuracy {:>6.2}%",
            l.length,
            100.0 * l.accuracy
        )
    })?;
    write_report(out, &report)?;
    println!(
        "mean accuracy over lengths 41..120: {:.1}%; wrote che.json, che.csv and che.svg into {}",
        100.0 * report.score,
        out.display()
    );
    Ok(())
}

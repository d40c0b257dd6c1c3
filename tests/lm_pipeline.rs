//! The language-modelling pipeline end to end on a small generated corpus: split, token cache,
//! Learner training with per-length validation perplexity, checkpoints and resume, evaluation
//! by length with its reports, and the CLI (a killed run that resumes).

use std::process::Command;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use dape::data::corpus::{Corpus, Manifest, Part, SplitConfig, TokenizedCorpus, Tokenizer};
use dape::eval::lm::{evaluate_run, perplexity_by_length, read_report, LmEvalConfig};
use dape::experiment::lm::{load, token_nll, LmTrainConfig};

use dape::train::lm::train;
use dape::PositionalEncodingConfig;

type B = NdArray<f32>;
type AB = Autodiff<B>;

#[path = "common/lm_run.rs"]
mod lm_run;
use lm_run::{options, params, temp, tiny_config, write_corpus};

#[test]
fn split_is_seeded_disjoint_and_complete() {
    let dir = temp("split");
    write_corpus(&dir);
    let corpus = Corpus::open(&dir).unwrap();
    assert_eq!(corpus.documents.len(), 12);
    let config = SplitConfig {
        seed: 1,
        valid_fraction: 0.1,
        test_fraction: 0.2,
    };
    let a = Manifest::split(&corpus, &config).unwrap();
    assert_eq!((a.test.len(), a.valid.len(), a.train.len()), (2, 1, 9));
    let mut all: Vec<String> = [&a.train, &a.valid, &a.test]
        .iter()
        .flat_map(|p| p.iter().map(|d| d.name.clone()))
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 12, "every document in exactly one part");
    assert_eq!(
        Manifest::split(&corpus, &config).unwrap(),
        a,
        "same seed, same split"
    );
    let others: Vec<_> = (2..8)
        .map(|seed| {
            Manifest::split(
                &corpus,
                &SplitConfig {
                    seed,
                    ..config.clone()
                },
            )
            .unwrap()
        })
        .collect();
    assert!(others.iter().any(|m| m.test != a.test), "the seed matters");

    // A folder with too few documents, and a missing one, are clear errors.
    let small = temp("split-small");
    std::fs::write(small.join("a.txt"), "x").unwrap();
    let err = Corpus::open(&small).unwrap_err().to_string();
    assert!(err.contains("at least 3"), "{err}");
    let err = Corpus::open(&small.join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fetch-corpus.sh"), "{err}");
}

#[test]
fn token_cache_is_written_reused_and_rebuilt_when_damaged() {
    let dir = temp("cache-data");
    write_corpus(&dir);
    let cache = temp("cache");
    let corpus = Corpus::open(&dir).unwrap();
    let first = TokenizedCorpus::load(&corpus, Tokenizer::Bytes, &cache).unwrap();
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 1);
    let path = files[0].as_ref().unwrap().path();
    assert!(path.to_string_lossy().ends_with("-bytes.bin"));
    assert_eq!(
        first.documents[0],
        Tokenizer::Bytes.encode(&corpus.read(0).unwrap())
    );
    // Reused: a cache with altered tokens (same size) is what gets read.
    let mut data = std::fs::read(&path).unwrap();
    let n = data.len();
    data[n - 2] = 7;
    data[n - 1] = 0;
    std::fs::write(&path, &data).unwrap();
    let cached = TokenizedCorpus::load(&corpus, Tokenizer::Bytes, &cache).unwrap();
    assert_eq!(*cached.documents.last().unwrap().last().unwrap(), 7);
    // Damaged (truncated): tokenized again.
    std::fs::write(&path, &data[..n - 3]).unwrap();
    let again = TokenizedCorpus::load(&corpus, Tokenizer::Bytes, &cache).unwrap();
    assert_eq!(again.documents, first.documents);
}

#[test]
fn training_writes_the_run_and_a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let data = temp("train-data");
    write_corpus(&data);
    let cache = temp("train-cache");
    let config = tiny_config(&data, "dape_kerple_log");
    let device = Default::default();

    let full = temp("train-full");
    let (model, summary) = train::<AB>(&config, &options(&full, &cache, false), &device, "ndarray")
        .expect("training runs");
    assert_eq!(summary.started_at_step, 0);
    for file in [
        "config.json",
        "manifest.json",
        "model.mpk",
        "train.json",
        "checkpoint/model-2.mpk",
        "checkpoint/optim-2.mpk",
        "checkpoint/scheduler-2.mpk",
        "train/epoch-1/Loss.log",
        "train/epoch-1/Perplexity.log",
        "train/epoch-1/Learning_Rate.log",
        "valid/epoch-1/ppl@16.log",
        "valid/epoch-2/ppl@32.log",
    ] {
        assert!(full.join(file).is_file(), "{file} is written");
    }
    // The plugin logs one weighted entry per round: the perplexity of that length.
    let log = std::fs::read_to_string(full.join("valid/epoch-2/ppl@32.log")).unwrap();
    let value: f64 = log
        .lines()
        .filter_map(|l| l.split_once(','))
        .find(|(_, w)| *w != "0")
        .map(|(v, _)| v.parse().unwrap())
        .expect("a weighted entry");
    assert!(value.is_finite() && value > 1.0 && value < 300.0, "{value}");

    // A second run into the same folder without --resume is refused.
    let err = train::<AB>(&config, &options(&full, &cache, false), &device, "ndarray")
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");

    // "Kill" a copy of the run after its first checkpoint: drop what came later.
    let resumed = temp("train-resumed");
    for dir in ["", "checkpoint"] {
        std::fs::create_dir_all(resumed.join(dir)).unwrap();
    }
    for file in [
        "config.json",
        "manifest.json",
        "checkpoint/model-1.mpk",
        "checkpoint/optim-1.mpk",
        "checkpoint/scheduler-1.mpk",
    ] {
        std::fs::copy(full.join(file), resumed.join(file)).unwrap();
    }
    let (model2, summary2) = train::<AB>(
        &config,
        &options(&resumed, &cache, true),
        &device,
        "ndarray",
    )
    .expect("resume runs");
    assert_eq!(summary2.started_at_step, 2, "continues after step 2");
    let (a, b) = (params(&model), params(&model2));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-5,
        "resumed run differs from the uninterrupted one by {diff}"
    );

    // A changed config is refused on resume, naming the field.
    let mut other = config.clone();
    other.learning_rate = 5e-4;
    let err = train::<AB>(&other, &options(&resumed, &cache, true), &device, "ndarray")
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning_rate"), "{err}");

    // Damaged checkpoints (every one: a damaged newest alone is passed over, see
    // tests/full_disk.rs) are a clear error, not a panic inside burn-train.
    std::fs::remove_file(resumed.join("model.mpk")).unwrap();
    let newest = dape::train::lm::latest_checkpoint(&resumed).unwrap();
    for epoch in 1..=newest {
        let path = resumed.join(format!("checkpoint/model-{epoch}.mpk"));
        if path.exists() {
            std::fs::write(path, b"not a checkpoint").unwrap();
        }
    }
    let err = train::<AB>(
        &config,
        &options(&resumed, &cache, true),
        &device,
        "ndarray",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("checkpoint") && err.contains("damaged") && err.contains("nor any before"),
        "{err}"
    );
}

#[test]
fn evaluation_reports_perplexity_by_length_and_why_lengths_were_skipped() {
    let data = temp("eval-data");
    write_corpus(&data);
    let cache = temp("eval-cache");
    let config = LmTrainConfig {
        steps: 2,
        ..tiny_config(&data, "alibi")
    };
    let run = temp("eval-run");
    let device = Default::default();
    train::<AB>(&config, &options(&run, &cache, false), &device, "ndarray").unwrap();
    let eval = LmEvalConfig {
        lengths: vec![8, 64, 1_000_000],
        last: 16,
        max_tokens: 256,
        ..Default::default()
    };
    let report = evaluate_run::<B>(&run, None, &eval, &cache, "ndarray", &device).unwrap();
    assert_eq!(report.encoding, "alibi");
    assert_eq!(report.train_length, 16);
    assert_eq!(
        report.lengths.iter().map(|l| l.length).collect::<Vec<_>>(),
        vec![8, 64]
    );
    assert_eq!(report.skipped.len(), 1);
    assert!(report.skipped[0].reason.contains("no test document"));
    for l in &report.lengths {
        assert!(l.ppl_last.is_finite() && l.ppl_all.is_finite());
        assert_eq!(l.tokens, l.windows * l.length);
    }
    for file in ["eval.json", "eval.csv", "ppl_by_length.svg"] {
        assert!(run.join(file).is_file(), "{file}");
    }
    let csv = std::fs::read_to_string(run.join("eval.csv")).unwrap();
    assert!(csv.starts_with("length,ppl_last,ppl_all,windows,tokens,seconds,peak_rss_bytes\n"));
    assert_eq!(read_report(&run).unwrap().lengths.len(), 2);

    // Reference: the reported perplexities equal exp(mean NLL) of a direct forward over the
    // same windows, on the last 16 tokens and on all of them.
    let (train_config, manifest, model) = load::<B>(&run, &device).unwrap();
    let corpus = Corpus::open(&data).unwrap();
    let tokens = TokenizedCorpus::load(&corpus, Tokenizer::Bytes, &cache).unwrap();
    let docs = tokens.part(&manifest, Part::Test).unwrap();
    let one = LmEvalConfig {
        lengths: vec![64],
        last: 16,
        max_tokens: 64,
        ..Default::default()
    };
    let (res, _) = perplexity_by_length(&model, &train_config, &docs, &one, &device).unwrap();
    let window: Vec<i64> = docs[0][..65].iter().map(|&t| i64::from(t)).collect();
    let inputs =
        Tensor::<B, 2, Int>::from_data(TensorData::new(window[..64].to_vec(), [1, 64]), &device);
    let targets =
        Tensor::<B, 2, Int>::from_data(TensorData::new(window[1..].to_vec(), [1, 64]), &device);
    let nll: Vec<f32> = token_nll(&model, inputs, targets, None)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let all = (nll.iter().sum::<f32>() / 64.0).exp() as f64;
    let last = (nll[48..].iter().sum::<f32>() / 16.0).exp() as f64;
    assert!(
        (res[0].ppl_all - all).abs() < 1e-3 * all,
        "{} vs {all}",
        res[0].ppl_all
    );
    assert!(
        (res[0].ppl_last - last).abs() < 1e-3 * last,
        "{} vs {last}",
        res[0].ppl_last
    );
}

#[test]
fn randomized_rope_trains_reproducibly_and_evaluates_within_its_range() {
    let data = temp("rand-data");
    write_corpus(&data);
    let cache = temp("rand-cache");
    let config = LmTrainConfig {
        steps: 2,
        encoding: PositionalEncodingConfig::from_json(
            r#"{"type": "rope", "randomized": {"max_position": 48}}"#,
        )
        .unwrap(),
        ..tiny_config(&data, "rope")
    };
    let device = Default::default();
    let (a, b) = (temp("rand-run-a"), temp("rand-run-b"));
    train::<AB>(&config, &options(&a, &cache, false), &device, "ndarray").unwrap();
    train::<AB>(&config, &options(&b, &cache, false), &device, "ndarray").unwrap();
    let (_, _, model_a) = load::<B>(&a, &device).unwrap();
    let (_, _, model_b) = load::<B>(&b, &device).unwrap();
    let gap = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max)
    };
    let d = gap(&params(&model_a), &params(&model_b));
    assert!(d < 1e-5, "a seeded run reproduces: the two differ by {d}");
    // The same run without randomized positions trains to other weights.
    let plain = temp("rand-run-plain");
    let plain_config = LmTrainConfig {
        encoding: PositionalEncodingConfig::from_name("rope").unwrap(),
        ..config.clone()
    };
    train::<AB>(
        &plain_config,
        &options(&plain, &cache, false),
        &device,
        "ndarray",
    )
    .unwrap();
    let (_, _, model_plain) = load::<B>(&plain, &device).unwrap();
    let d = gap(&params(&model_a), &params(&model_plain));
    assert!(d > 1e-4, "positions reached training: {d}");
    let eval = LmEvalConfig {
        lengths: vec![16, 40, 64],
        last: 8,
        max_tokens: 128,
        ..Default::default()
    };
    let report = evaluate_run::<B>(&a, None, &eval, &cache, "ndarray", &device).unwrap();
    assert_eq!(report.encoding, "rope+randomized");
    assert_eq!(
        report.lengths.iter().map(|l| l.length).collect::<Vec<_>>(),
        vec![16, 40]
    );
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.contains("max_position"),
        "{}",
        report.skipped[0].reason
    );
    // Evaluation positions are seeded: the same report twice.
    let again = evaluate_run::<B>(&a, None, &eval, &cache, "ndarray", &device).unwrap();
    for (x, y) in report.lengths.iter().zip(&again.lengths) {
        assert_eq!(x.ppl_all, y.ppl_all);
    }
}

/// The CLI end to end: `dape train` killed mid-way, then `--resume`, then `dape eval` and
/// `dape plot`.
#[test]
fn cli_run_killed_mid_way_resumes_at_its_checkpoint() {
    let data = temp("cli-data");
    write_corpus(&data);
    let cache = temp("cli-cache");
    let dir = temp("cli");
    let config = dir.join("tiny.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"encoding": {{"type": "kerple_log"}}, "data": "{}", "d_model": 16,
               "n_layers": 1, "n_heads": 2, "train_length": 16, "batch_size": 2,
               "steps": 400, "warmup_steps": 1, "checkpoint_every": 2,
               "valid_lengths": [16], "valid_tokens": 32,
               "split": {{"seed": 3, "valid_fraction": 0.1, "test_fraction": 0.2}}}}"#,
            data.display()
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let args = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dape"));
        cmd.args(["train", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&run)
            .arg("--cache")
            .arg(&cache)
            .args(["--lines", "100"])
            .args(extra);
        cmd
    };
    let mut child = args(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("checkpoint/scheduler-2.mpk").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !run.join("model.mpk").exists(),
        "the run was killed before its end"
    );

    let out = args(&["--resume"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("resuming"))
        .unwrap_or_else(|| panic!("no resume line in {stdout}"));
    let step: usize = line
        .split("from step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((2..400).contains(&step) && step.is_multiple_of(2), "{line}");
    assert!(stdout.contains("step 400/400"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["started_at_step"], step);

    let out = Command::new(env!("CARGO_BIN_EXE_dape"))
        .args(["eval", "--run"])
        .arg(&run)
        .args(["--lengths", "16,32", "--max-tokens", "64", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dape"))
        .args(["plot", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(dir.join("plot"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("plot/ppl_by_length.svg").is_file());
    // Rows are named after the run folders; the cost comes from the run's train.json.
    let md = std::fs::read_to_string(dir.join("plot/results.md")).unwrap();
    assert!(md.contains("| run | "), "{md}");
    assert!(
        md.contains("Training cost per 1,000 training tokens"),
        "{md}"
    );
    assert!(dir.join("plot/train_cost.svg").is_file());
    assert!(
        summary["cpu_seconds"].as_f64().is_some_and(|s| s > 0.0),
        "{summary}"
    );
}

/// burn-train's multi-device strategy with two device handles (on ndarray both are the CPU):
/// the loss falls, and the checkpoint evaluates on one device.
#[test]
fn two_devices_train_to_a_falling_loss_and_evaluate_on_one() {
    let data = temp("multi-data");
    write_corpus(&data);
    let cache = temp("multi-cache");
    let run = temp("multi-run");
    let config = LmTrainConfig {
        steps: 24,
        checkpoint_every: 12,
        learning_rate: 3e-3,
        batch_size: 4,
        ..tiny_config(&data, "alibi")
    };
    let mut opts = options(&run, &cache, false);
    opts.devices = "2".parse().unwrap();
    let device = Default::default();
    train::<AB>(&config, &opts, &device, "ndarray").expect("two-device training runs");
    let losses = |epoch: usize| -> Vec<f64> {
        std::fs::read_to_string(run.join(format!("train/epoch-{epoch}/Loss.log")))
            .unwrap()
            .lines()
            .filter_map(|l| l.split(',').next()?.parse().ok())
            .collect()
    };
    let (first, last) = (losses(1), losses(2));
    // Each optimiser step logs one item per device.
    assert_eq!(first.len(), 2 * 12, "{first:?}");
    let head: f64 = first[..4].iter().sum::<f64>() / 4.0;
    let tail: f64 = last[last.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(tail < head - 0.5, "loss {head} -> {tail}");

    let eval = LmEvalConfig {
        lengths: vec![16],
        max_tokens: 64,
        ..Default::default()
    };
    let report = evaluate_run::<B>(&run, None, &eval, &cache, "ndarray", &device).unwrap();
    assert!(report.lengths[0].ppl_all < 257.0);

    // A batch that does not split evenly is refused, naming it.
    let mut odd = opts.clone();
    odd.out = temp("multi-odd");
    odd.devices = "3".parse().unwrap();
    let err = train::<AB>(&config, &odd, &device, "ndarray")
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch_size") && err.contains('3'), "{err}");
}

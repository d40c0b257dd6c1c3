//! `dape retrieval`: training for MQAR and passkey, evaluation files, the suite's resume, and
//! the masked loss that MQAR trains with.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::NdArray;
use burn::prelude::*;
use dape::data::retrieval::mqar::MqarConfig;
use dape::experiment::lm::{counted_nll_sum, token_nll, LmBatch, LmTrainConfig, Window};
use dape::util::Rng;

fn dape(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dape"))
        .args(args)
        .output()
        .expect("the dape binary runs");
    assert!(
        out.status.success(),
        "dape {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dape-retrieval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A corpus of a few documents of plain prose, long enough for windows of 512.
fn tiny_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom. ";
    for d in 0..20 {
        std::fs::write(dir.join(format!("doc{d:02}.txt")), text.repeat(40 + d)).unwrap();
    }
}

/// `dape retrieval train` for MQAR, with one line of progress and a small validation set.
fn train_mqar(run: &str, encoding: &str, steps: &str) {
    dape(&[
        "retrieval",
        "train",
        "--task",
        "mqar",
        "--encoding",
        encoding,
        "--steps",
        steps,
        "--out",
        run,
        "--lines",
        "1",
        "--valid-tokens",
        "512",
    ]);
}

/// `dape retrieval eval` at lengths 128 and 160 with `trials` items per length.
fn eval_at_128_and_160(run: &str, trials: &str) {
    dape(&[
        "retrieval",
        "eval",
        "--run",
        run,
        "--lengths",
        "128,160",
        "--trials",
        trials,
    ]);
}

#[test]
fn mqar_trains_and_evaluates_into_json_csv_and_a_plot() {
    let run = temp("mqar");
    let run_s = run.to_str().unwrap();
    train_mqar(run_s, "dape_kerple_log", "3");
    assert!(run.join("model.mpk").is_file());
    assert!(!run.join("manifest.json").exists(), "MQAR reads no corpus");
    eval_at_128_and_160(run_s, "3");
    let report = json(&run.join("retrieval.json"));
    assert_eq!(report["task"], "mqar");
    assert_eq!(report["encoding"], "dape_kerple_log");
    assert_eq!(report["pairs"], 16, "twice the training pairs by default");
    let lengths = report["lengths"].as_array().unwrap();
    assert_eq!(lengths.len(), 2);
    // 3 items of 8 queries (the training most) at the training length, of 16 beyond it.
    assert_eq!(lengths[0]["tally"]["total"], 3 * 8);
    assert_eq!(lengths[1]["tally"]["total"], 3 * 16);
    let gap_total: u64 = report["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["tally"]["total"].as_u64().unwrap())
        .sum();
    assert_eq!(
        gap_total,
        3 * 8 + 3 * 16,
        "every query falls in one gap bucket"
    );
    let csv = std::fs::read_to_string(run.join("retrieval.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with(
        "task,length,depth,accuracy,correct,total,answer_accuracy,seconds\nmqar,128,all,"
    ));
    assert!(run.join("retrieval.svg").is_file());
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn passkey_trains_on_a_corpus_and_draws_its_heatmap() {
    let dir = temp("passkey");
    let data = dir.join("data");
    tiny_corpus(&data);
    let run = dir.join("run");
    dape(&[
        "retrieval",
        "train",
        "--task",
        "passkey",
        "--encoding",
        "alibi",
        "--steps",
        "3",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--lines",
        "1",
        "--valid-tokens",
        "512",
    ]);
    let config = json(&run.join("config.json"));
    assert_eq!(config["passkey"]["fraction"], 0.5);
    assert_eq!(config["passkey"]["digits"], 5);
    dape(&[
        "retrieval",
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--lengths",
        "128,256",
        "--depths",
        "0,0.5,1",
        "--trials",
        "2",
    ]);
    let report = json(&run.join("retrieval.json"));
    assert_eq!(report["task"], "passkey");
    for l in report["lengths"].as_array().unwrap() {
        assert_eq!(l["tally"]["total"], 3 * 2, "depths × trials items");
        assert_eq!(l["by_depth"].as_array().unwrap().len(), 3);
    }
    let csv = std::fs::read_to_string(run.join("retrieval.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 4, "{csv}");
    let heatmap = std::fs::read_to_string(run.join("passkey_heatmap.svg")).unwrap();
    assert!(heatmap.contains("needle depth") && heatmap.contains("50%"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_suite_resumes_cell_by_cell() {
    let out = temp("suite");
    let out_s = out.to_str().unwrap();
    let args = [
        "retrieval",
        "suite",
        "--tasks",
        "mqar",
        "--encodings",
        "nope,alibi",
        "--steps",
        "2",
        "--lengths",
        "128,256",
        "--trials",
        "2",
        "--out",
        out_s,
        "--resume",
        "--cells",
        "1",
        "--valid-tokens",
        "512",
    ];
    let first = String::from_utf8(dape(&args).stdout).unwrap();
    assert!(first.contains("suite: 1 of 2 cells finished"), "{first}");
    let table = std::fs::read_to_string(out.join("suite.md")).unwrap();
    assert!(
        table.contains("| nope | 1 |") && table.contains("Pending: alibi."),
        "{table}"
    );
    let second = String::from_utf8(dape(&args).stdout).unwrap();
    assert!(second.contains("reusing") && second.contains("suite: 2 of 2 cells finished"));
    let suite = json(&out.join("suite.json"));
    assert_eq!(suite["cells"].as_array().unwrap().len(), 2);
    assert!(suite["pending"].as_array().unwrap().is_empty());
    assert!(out.join("mqar.svg").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

/// A row given as an LM config takes its encoding and attention settings (stick-breaking, a
/// hybrid stack, QK-norm, temperature tuning) under the file's name; everything else is the
/// task's, and `train --encoding` reads the same file the same way.
#[test]
fn a_row_from_an_lm_config_trains_with_its_attention_settings() {
    let out = temp("lm-config-row");
    std::fs::create_dir_all(&out).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut hybrid = json(&repo.join("configs/lm/irope.json"));
    hybrid["stick_breaking"] = serde_json::json!({});
    hybrid["d_model"] = serde_json::json!(64); // not the task's: must not be taken
    let config = out.join("sb_hybrid.json");
    std::fs::write(&config, serde_json::to_string(&hybrid).unwrap()).unwrap();
    let rows = format!("nope,{}", config.display());
    let suite = out.join("suite");
    dape(&[
        "retrieval",
        "suite",
        "--tasks",
        "mqar",
        "--encodings",
        &rows,
        "--steps",
        "2",
        "--lengths",
        "128",
        "--trials",
        "2",
        "--out",
        suite.to_str().unwrap(),
        "--valid-tokens",
        "512",
    ]);
    let trained = json(&suite.join("mqar/sb_hybrid/config.json"));
    assert_eq!(trained["encoding"]["type"], "rope", "{trained}");
    assert_eq!(trained["layer_encodings"]["every"], 4, "{trained}");
    assert_eq!(trained["layer_encodings"]["encoding"]["type"], "nope");
    assert_eq!(trained["qk_norm"], hybrid["qk_norm"]);
    assert_eq!(trained["temperature"], hybrid["temperature"]);
    assert!(trained["stick_breaking"].is_object(), "{trained}");
    assert_eq!(trained["d_model"], 128, "the task's width, not the file's");
    assert!(trained["mqar"].is_object());
    let plain = json(&suite.join("mqar/nope/config.json"));
    assert!(plain.get("stick_breaking").is_none() && plain.get("layer_encodings").is_none());
    let table = std::fs::read_to_string(suite.join("suite.md")).unwrap();
    assert!(table.contains("| sb_hybrid | 1 |"), "{table}");
    let run = out.join("single");
    train_mqar(run.to_str().unwrap(), config.to_str().unwrap(), "1");
    assert!(json(&run.join("config.json"))["stick_breaking"].is_object());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_settings_exit_with_the_value_named() {
    let broken = temp("broken-config");
    std::fs::create_dir_all(&broken).unwrap();
    let broken = broken.join("broken.json");
    std::fs::write(&broken, "{\"encoding\": ").unwrap();
    let broken = broken.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "retrieval",
                "train",
                "--task",
                "mqar",
                "--encoding",
                broken,
                "--steps",
                "1",
            ],
            "broken.json",
        ),
        (
            vec!["retrieval", "sample", "--task", "passkey", "--depth", "1.5"],
            "1.5",
        ),
        (
            vec!["retrieval", "sample", "--task", "passkey", "--length", "40"],
            "too short",
        ),
        (
            vec!["retrieval", "sample", "--task", "passkey", "--digits", "0"],
            "digits",
        ),
        (
            vec![
                "retrieval",
                "sample",
                "--task",
                "mqar",
                "--length",
                "4096",
                "--pairs",
                "100",
            ],
            "more than",
        ),
        (vec!["retrieval", "sample", "--task", "needle"], "needle"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dape"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(Path::new(broken).parent().unwrap()).unwrap();
}

/// The MQAR loss is the mean negative log-likelihood over the answers alone: the masked sum
/// over the counted targets equals the sum picked out by hand.
#[test]
fn the_masked_loss_counts_the_answers_only() {
    type B = NdArray;
    let device = Default::default();
    let config = LmTrainConfig {
        mqar: Some(MqarConfig::default()),
        n_layers: 1,
        d_model: 32,
        n_heads: 4,
        ..LmTrainConfig::default()
    };
    let model = config.model().init::<B>(&device).unwrap();
    let mqar = MqarConfig::default();
    let items: Vec<_> = (0..3)
        .map(|i| mqar.item(64, 4, &mut Rng::new(i)).unwrap())
        .collect();
    let windows: Vec<Window> = items
        .iter()
        .map(|item| Window {
            tokens: item.tokens.clone(),
            positions: None,
            mask: Some(item.answer_mask()),
        })
        .collect();
    let batch = LmBatch::<B>::from_windows(&windows, 1.0, &device);
    assert_eq!(batch.scored, 3 * 4);
    let nll = token_nll(&model, batch.inputs, batch.targets, None).unwrap();
    let all: Vec<f32> = nll.clone().into_data().to_vec().unwrap();
    let by_hand: f64 = items
        .iter()
        .enumerate()
        .flat_map(|(row, item)| item.answer_targets.iter().map(move |&t| row * 64 + t))
        .map(|i| f64::from(all[i]))
        .sum();
    let masked = counted_nll_sum(nll, batch.weights)
        .into_scalar()
        .elem::<f64>();
    assert!(
        (masked - by_hand).abs() < 1e-4 * by_hand,
        "{masked} vs {by_hand}"
    );
    let whole: f64 = all.iter().map(|&v| f64::from(v)).sum();
    assert!((masked - whole).abs() > 1.0, "the mask changes the sum");
}

/// An evaluation interrupted after some lengths goes on from the first unfinished one: a
/// length recorded in `retrieval.partial.json` for the same run and settings is taken from
/// there (here a recognisable accuracy planted in it), the others are evaluated; an entry for
/// other settings is not reused; a length stopped part-way goes on from its passes done; the
/// file is gone once the report is written.
#[test]
fn an_interrupted_evaluation_resumes_from_its_finished_lengths() {
    let run = temp("resume");
    let run_s = run.to_str().unwrap();
    train_mqar(run_s, "alibi", "2");
    let eval = |trials: &str| {
        eval_at_128_and_160(run_s, trials);
        json(&run.join("retrieval.json"))
    };
    let full = eval("3");
    let partial = run.join("retrieval.partial.json");
    assert!(!partial.exists(), "the partial results outlive the report");
    // What an evaluation stopped after length 128 leaves, with a planted accuracy.
    let train: dape::experiment::lm::LmTrainConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let plant = |settings: &serde_json::Value| {
        let mut settings = settings.clone();
        settings.as_object_mut().unwrap().remove("lengths");
        let mut first = full["lengths"][0].clone();
        first["accuracy"] = serde_json::json!(0.123456);
        let text = serde_json::json!({
            "train": serde_json::to_value(&train).unwrap(),
            "eval": settings,
            "finished": [{"Evaluated": {"accuracy": first, "gaps": []}}],
        });
        std::fs::write(&partial, text.to_string()).unwrap();
    };
    plant(&full["eval"]);
    let resumed = eval("3");
    assert_eq!(
        resumed["lengths"][0]["accuracy"], 0.123456,
        "length 128 not taken"
    );
    assert_eq!(
        resumed["lengths"][1]["tally"], full["lengths"][1]["tally"],
        "length 160 evaluated again gives what it gave"
    );
    assert!(!partial.exists());
    let mut other = full["eval"].clone();
    other["trials"] = serde_json::json!(4);
    plant(&other);
    let fresh = eval("3");
    assert_eq!(
        fresh["lengths"][0]["tally"], full["lengths"][0]["tally"],
        "an entry for other settings was reused"
    );
    assert_ne!(fresh["lengths"][0]["accuracy"], 0.123456);
    // What an evaluation stopped part-way through length 160 leaves: its passes done (here more
    // than there are, with planted tallies) are taken, the length goes on from the next pass.
    let mut settings = full["eval"].clone();
    settings.as_object_mut().unwrap().remove("lengths");
    let text = serde_json::json!({
        "train": serde_json::to_value(&train).unwrap(),
        "eval": settings,
        "finished": [],
        "in_progress": {
            "length": 160, "passes": 1_000_000,
            "tally": {"total": 7, "correct": 3}, "answers": {"total": 9, "correct": 4},
            "depths": [], "gaps": [], "seconds": 1.5,
        },
    });
    std::fs::write(&partial, text.to_string()).unwrap();
    let resumed = eval("3");
    assert_eq!(
        resumed["lengths"][0]["tally"], full["lengths"][0]["tally"],
        "length 128 evaluated in full"
    );
    assert_eq!(
        resumed["lengths"][1]["tally"],
        serde_json::json!({"total": 7, "correct": 3}),
        "length 160's passes done not taken"
    );
    assert!(!partial.exists());
    std::fs::remove_dir_all(&run).unwrap();
}

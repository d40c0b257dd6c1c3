//! The `dape` binary: sample output format, config printing and error exits.

use std::process::Command;

fn dape(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dape"))
        .args(args)
        .output()
        .expect("the dape binary runs")
}

const SAMPLE_ARGS: &[&str] = &[
    "che",
    "sample",
    "--task",
    "reverse_string",
    "--length",
    "7",
    "--count",
    "3",
    "--seed",
    "5",
];

#[test]
fn che_sample_prints_one_json_object_per_sample_in_the_documented_shape() {
    let out = dape(SAMPLE_ARGS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    for line in lines {
        assert!(
            line.starts_with(r#"{"task":"reverse_string","length":7,"input":["#),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let input: Vec<i64> = serde_json::from_value(v["input"].clone()).unwrap();
        let target: Vec<i64> = serde_json::from_value(v["target"].clone()).unwrap();
        let mask: Vec<u8> = serde_json::from_value(v["mask"].clone()).unwrap();
        assert_eq!(input.len(), 7);
        assert_eq!(target, input.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(mask, vec![1; 7]);
    }
    // Deterministic by seed.
    let again = dape(SAMPLE_ARGS);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
}

#[test]
fn bad_arguments_exit_with_a_clear_message() {
    let out = dape(&["che", "sample", "--task", "reverse", "--length", "3"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reverse") && err.contains("reverse_string"),
        "{err}"
    );

    let out = dape(&["che", "sample", "--task", "parity_check", "--length", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("length"));

    let out = dape(&["config", "dape_kerple_lgo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dape_kerple_lgo"));
}

#[test]
fn printed_configs_parse_back() {
    let out = dape(&["config", "dapev2_fire"]);
    assert!(out.status.success());
    let config =
        dape::PositionalEncodingConfig::from_json(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(config.name(), "dapev2_fire");
}

/// Issue 8's check: the new encodings train from the CLI, and `--devices 2` uses two devices;
/// issue 16's: forgetting attention, DAPE over it, and Scalable-Softmax over Kerple from the CLI
/// (SSMax saved in the run's config).
#[test]
fn che_train_runs_for_the_newer_encodings() {
    for (encoding, devices, extra) in [
        ("transformer_xl", "1", None),
        ("sandwich", "1", None),
        ("dape_sandwich", "1", None),
        ("bipe_alibi", "1", None),
        ("bipe_rope", "2", None),
        ("kerple_log", "1", Some("--ssmax")),
        ("nope", "1", Some("--stick-breaking")),
        (
            "rope",
            "1",
            Some(
                r#"--hybrid={"layer_encodings": {"every": 2, "encoding": "nope"}, "qk_norm": {}, "temperature": {"floor": 8}, "sliding_window": 6}"#,
            ),
        ),
        ("rope", "2", Some("--randomized=512")),
        ("fox", "1", None),
        ("dape_fox", "1", None),
    ] {
        let out = std::env::temp_dir().join(format!(
            "dape-cli-che-{encoding}{}-{}",
            extra
                .unwrap_or("")
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&out);
        let mut args = vec![
            "che",
            "train",
            "--task",
            "even_pairs",
            "--encoding",
            encoding,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--layers",
            "1",
            "--lines",
            "1",
            "--devices",
            devices,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let result = dape(&args);
        assert!(
            result.status.success(),
            "{encoding}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(out.join("model.mpk").is_file(), "{encoding}");
        if extra == Some("--ssmax") {
            let config = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert!(config.contains("\"ssmax\""), "{encoding}: {config}");
        }
        if extra.is_some_and(|e| e.starts_with("--hybrid")) {
            let config = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert!(
                config.contains("\"layer_encodings\""),
                "{encoding}: {config}"
            );
        }
        if extra == Some("--stick-breaking") {
            let config = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert!(
                config.contains("\"stick_breaking\""),
                "{encoding}: {config}"
            );
        }
        // Randomized RoPE: recorded in the run's encoding, and its evaluation samples positions
        // too (so a test input longer than the range is an error naming it).
        if extra == Some("--randomized=512") {
            let config = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert!(config.contains("\"max_position\": 512"), "{config}");
            let run = out.to_str().unwrap();
            let eval = dape(&[
                "che",
                "eval",
                "--run",
                run,
                "--lengths",
                "41,60",
                "--sequences",
                "4",
            ]);
            assert!(
                eval.status.success(),
                "eval: {}",
                String::from_utf8_lossy(&eval.stderr)
            );
            let report = std::fs::read_to_string(out.join("che.json")).unwrap();
            assert!(report.contains("rope+randomized"), "{report}");
            let long = dape(&[
                "che",
                "eval",
                "--run",
                run,
                "--lengths",
                "600",
                "--sequences",
                "2",
            ]);
            assert!(!long.status.success());
            let err = String::from_utf8_lossy(&long.stderr);
            assert!(err.contains("max_position"), "{err}");
        }
        // Issue 16's learned-bias picture, on a CHE run of DAPE over forgetting attention.
        if encoding == "dape_fox" {
            let svg = out.join("bias.svg");
            let result = dape(&[
                "bias",
                "--run",
                out.to_str().unwrap(),
                "--position",
                "5",
                "--out",
                svg.to_str().unwrap(),
            ]);
            assert!(
                result.status.success(),
                "bias: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            assert!(svg.is_file(), "no picture");
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(svg.with_extension("json")).unwrap())
                    .unwrap();
            let heads = json["bias"].as_array().unwrap();
            assert_eq!(heads.len(), 8, "one line per head");
            // The CHE encoder is bidirectional: the query sees every position of the sample.
            let keys = heads[0].as_array().unwrap().len();
            assert!(keys > 6, "{keys} keys");
            assert!(heads
                .iter()
                .flat_map(|h| h.as_array().unwrap())
                .all(|v| v.as_f64().unwrap().is_finite()));
            // A block the model does not have is an error naming it, not a panic.
            let args = [
                "bias",
                "--run",
                out.to_str().unwrap(),
                "--position",
                "3",
                "--layer",
                "7",
            ];
            let result = dape(&args);
            assert!(!result.status.success());
            let err = String::from_utf8_lossy(&result.stderr);
            assert!(err.contains("layer") && err.contains('7'), "{err}");
        }
    }
}

#[test]
fn che_plot_redraws_the_committed_suite_and_names_a_missing_one() {
    // Redraw the committed CHE table into a scratch copy (the committed files stay as they are).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/che-cpu");
    let dir = std::env::temp_dir().join(format!("dape-cli-che-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("suite.json"), dir.join("suite.json")).unwrap();
    let out = dape(&["che", "plot", "--suite", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("suite.md")).unwrap(),
        std::fs::read_to_string(src.join("suite.md")).unwrap()
    );
    for task in ["reverse_string", "bucket_sort", "odds_first"] {
        assert!(dir.join(format!("{task}.svg")).is_file(), "{task}.svg");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let missing = dape(&["che", "plot", "--suite", "no/such/suite"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no/such/suite/suite.json"));
}

/// `dape bench`'s JSON line for `encoding` (training, 2 sequences of 16 tokens, 2 steps).
fn bench_line(encoding: &str) -> serde_json::Value {
    bench_line_with(encoding, &[])
}

/// [`bench_line`] with more arguments.
fn bench_line_with(encoding: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--mode",
        "train",
        "--encoding",
        encoding,
        "--length",
        "16",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
    ];
    args.extend(extra);
    let out = dape(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// `dape bench` says what explains its figure: the process's CPU seconds per step beside the
/// wall seconds, the kernels' thread pool and whether the step ran on it, (Linux) the share of the machine's CPU time the
/// hypervisor stole during the timed steps, and whether the attention ran fused or on the
/// tensor path.
#[test]
fn bench_reports_cpu_time_threads_steal_and_the_attention_path() {
    let line = bench_line("alibi");
    assert_eq!(line["attention_path"], "fused", "{line}");
    assert_eq!(line["ssmax"], false, "{line}");
    assert_eq!(bench_line("path")["attention_path"], "tensor");
    // DAPE V2 trains in DAPE's tile.
    assert_eq!(bench_line("dapev2_kerple_log")["attention_path"], "fused");
    // Scalable-Softmax keeps the fused nodes, DAPE's tile included (DAPE V2's too); PaTH
    // trains through blockwise products.
    for (encoding, path) in [
        ("kerple", "fused"),
        ("dape-kerple", "fused"),
        ("dapev2_kerple_log", "fused"),
        ("path", "tensor"),
    ] {
        let line = bench_line_with(encoding, &["--ssmax"]);
        assert_eq!(line["ssmax"], true, "{line}");
        assert_eq!(line["attention_path"], path, "{encoding}: {line}");
    }
    let wall = line["seconds_per_step"].as_f64().unwrap();
    assert!(wall > 0.0, "{line}");
    let threads = line["threads"].as_u64().unwrap();
    let pool = line["pool_threads"].as_u64().unwrap();
    assert!(pool >= 1, "{line}");
    // The binary makes its main thread a worker of the kernels' pool when there is more than
    // one thread to share the work (`dape::kernel::join_compute_pool`).
    assert_eq!(line["step_on_pool"], pool > 1, "{line}");
    if cfg!(target_os = "linux") {
        let cpu = line["cpu_seconds_per_step"].as_f64().unwrap();
        // CPU time is counted in ticks of 10 ms; no more threads than the pool and the main
        // thread can have spent it.
        assert!(
            cpu <= wall * (pool.max(threads) + 1) as f64 + 0.02,
            "{line}"
        );
        let steal = line["steal_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&steal), "{line}");
    }
}

//! The CHE pipeline end to end on a tiny model: Learner training, saving and loading the run,
//! accuracy by length, the report files, the suite table, and clear errors.

use burn::backend::{Autodiff, NdArray};
use burn::data::dataset::Dataset;

use dape::data::che::Task;
use dape::eval::che::{accuracy_by_length, parse_lengths, write_report, CheEvalConfig};
use dape::experiment::che::{load, CheTrainConfig};
use dape::suite::{run_suite, SuiteConfig};
use dape::train::che::{train, CheStepDataset, Progress};
use dape::PositionalEncodingConfig;

type B = NdArray<f32>;
type AD = Autodiff<B>;

fn tiny(task: Task, encoding: &str) -> CheTrainConfig {
    CheTrainConfig::new(task, PositionalEncodingConfig::from_name(encoding).unwrap())
        .with_d_model(16)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_steps(3)
        .with_batch_size(4)
        .with_max_train_length(6)
        .with_valid_lengths(vec![8])
        .with_valid_sequences(4)
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dape-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn step_dataset_is_deterministic_and_one_length_per_step() {
    let a = CheStepDataset::random(Task::BinaryAddition, 1, 40, 20, 8, 7);
    let b = CheStepDataset::random(Task::BinaryAddition, 1, 40, 20, 8, 7);
    assert_eq!(a.len(), 20);
    let mut lengths = std::collections::BTreeSet::new();
    for i in 0..20 {
        let (x, y) = (a.get(i).unwrap(), b.get(i).unwrap());
        assert_eq!(x.length, y.length);
        assert_eq!(x.samples, y.samples);
        assert!(x.samples.iter().all(|s| s.input.len() == x.length));
        lengths.insert(x.length);
    }
    assert!(lengths.len() > 5, "lengths vary between steps: {lengths:?}");
    assert!(a.get(20).is_none());
}

#[test]
fn train_save_load_and_evaluate_a_run() {
    let dir = temp_dir("run");
    let config = tiny(Task::ReverseString, "dape_kerple_log");
    let (model, summary) = train::<AD>(
        &config,
        &dir,
        &Default::default(),
        Progress::Lines(String::new(), 1),
    )
    .unwrap();
    assert_eq!(summary.steps, 3);
    assert!(dir.join("config.json").is_file() && dir.join("model.mpk").is_file());

    // The stored model is the trained one.
    let (loaded_config, loaded) = load::<B>(&dir, &Default::default()).unwrap();
    assert_eq!(loaded_config.task, Task::ReverseString);
    let eval = CheEvalConfig {
        lengths: vec![7, 12],
        sequences: 6,
        batch: 4,
        seed: 1,
    };
    let device = Default::default();
    let a = accuracy_by_length(&model, config.task, &eval, None, &device, |_| {}).unwrap();
    let b = accuracy_by_length(&loaded, config.task, &eval, None, &device, |_| {}).unwrap();
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.length, y.length);
        assert_eq!(x.sequences, 6);
        assert!(
            (x.accuracy - y.accuracy).abs() < 1e-12,
            "loaded model differs"
        );
        assert!((0.0..=1.0).contains(&x.accuracy));
    }

    // Report files.
    let report = dape::eval::che::evaluate_run(
        &loaded,
        &loaded_config,
        &eval,
        &dir,
        "ndarray",
        &device,
        |_| {},
    )
    .unwrap();
    write_report(&dir, &report).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("che.json")).unwrap()).unwrap();
    assert_eq!(json["lengths"].as_array().unwrap().len(), 2);
    assert_eq!(json["encoding"], "dape_kerple_log");
    let csv = std::fs::read_to_string(dir.join("che.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(std::fs::read_to_string(dir.join("che.svg"))
        .unwrap()
        .contains("<svg"));

    // A corrupt model file is a clear error.
    std::fs::write(dir.join("model.mpk"), b"not a model").unwrap();
    let err = load::<B>(&dir, &Default::default()).expect_err("corrupt model must fail");
    assert!(err.to_string().contains("cannot load"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn suite_writes_a_table_and_resumes() {
    let dir = temp_dir("suite");
    let config = SuiteConfig {
        tasks: vec![Task::ParityCheck],
        encodings: vec![
            PositionalEncodingConfig::from_name("nope").unwrap(),
            PositionalEncodingConfig::from_name("alibi").unwrap(),
        ],
        train: tiny(Task::ParityCheck, "nope").with_steps(2),
        eval: CheEvalConfig {
            lengths: vec![9, 10],
            sequences: 4,
            batch: 4,
            seed: 0,
        },
        out: dir.clone(),
        resume: false,
        max_new_cells: Some(1),
    };
    // One new cell a call: the first call leaves the second cell pending, in the table and in
    // suite.json, with no number.
    let first = run_suite::<AD>(&config, "ndarray", &Default::default()).unwrap();
    assert_eq!(first.cells.len(), 1);
    assert_eq!(first.pending.len(), 1);
    assert_eq!(first.pending[0].encoding, "alibi");
    let partial = std::fs::read_to_string(dir.join("suite.md")).unwrap();
    assert!(
        partial.contains("| R | parity_check | 50 | ") && partial.contains("| pending |"),
        "{partial}"
    );
    assert!(partial.contains("1 of 2 cells finished"), "{partial}");
    let config = SuiteConfig {
        resume: true,
        max_new_cells: None,
        ..config
    };
    let report = run_suite::<AD>(&config, "ndarray", &Default::default()).unwrap();
    assert_eq!(report.cells.len(), 2);
    assert!(report.pending.is_empty());
    // Every cell is also scored at its training lengths.
    for c in &report.cells {
        let inside = c.in_distribution.expect("in-distribution accuracy");
        assert!((0.0..=1.0).contains(&inside), "{inside}");
        assert!(dir
            .join("parity_check")
            .join(&c.encoding)
            .join("in_distribution.json")
            .is_file());
    }
    let table = report.markdown();
    assert!(
        table.contains("| level | task | chance | nope | alibi |")
            && table.contains("| R | parity_check | 50 |")
            && table.contains("at the training lengths 1–")
            && !table.contains("pending"),
        "{table}"
    );
    assert!(dir.join("suite.md").is_file() && dir.join("parity_check.svg").is_file());
    // Resuming reuses the finished cells and gives the same table.
    let again = run_suite::<AD>(&config, "ndarray", &Default::default()).unwrap();
    assert_eq!(again.markdown(), table);
    // Cells record where they are relative to the suite folder, never a machine path.
    assert!(again
        .cells
        .iter()
        .all(|c| c.report.run == format!("parity_check/{}", c.encoding)));
    // A finished suite's plots and table can be redrawn from suite.json alone.
    std::fs::remove_file(dir.join("suite.md")).unwrap();
    std::fs::remove_file(dir.join("parity_check.svg")).unwrap();
    std::fs::remove_dir_all(dir.join("parity_check")).unwrap();
    let redrawn = dape::suite::replot(&dir).unwrap();
    assert_eq!(redrawn.markdown(), table);
    assert_eq!(
        std::fs::read_to_string(dir.join("suite.md")).unwrap(),
        table
    );
    let svg = std::fs::read_to_string(dir.join("parity_check.svg")).unwrap();
    assert!(svg.contains("alibi") && svg.contains("longest training length"));
    assert!(dape::suite::replot(&dir.join("missing")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lengths_parse_and_bad_input_is_an_error() {
    assert_eq!(parse_lengths("41..45").unwrap(), vec![41, 42, 43, 44, 45]);
    assert_eq!(parse_lengths("41..60:8").unwrap(), vec![41, 49, 57]);
    assert_eq!(parse_lengths("5,7,100").unwrap(), vec![5, 7, 100]);
    for bad in ["", "a..b", "0..3", "9..3", "1..5:0", "4,x"] {
        let err = parse_lengths(bad).unwrap_err().to_string();
        assert!(err.contains("lengths"), "{bad}: {err}");
    }
    assert!(Task::from_name("reverse").is_err());
    assert!(tiny(Task::ParityCheck, "nope")
        .with_steps(0)
        .validate()
        .is_err());
    let err = tiny(Task::ParityCheck, "nope")
        .with_min_train_length(10)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("min_train_length") && err.contains("10"),
        "{err}"
    );
}

#[test]
fn sharded_steps_share_their_length_and_shard_zero_is_the_one_device_data() {
    let one = CheStepDataset::random(Task::ParityCheck, 1, 40, 10, 8, 5);
    let two = CheStepDataset::random(Task::ParityCheck, 1, 40, 10, 8, 5).sharded(2);
    assert_eq!(two.len(), 20);
    for s in 0..10 {
        let (a, b, reference) = (
            two.get(s).unwrap(),
            two.get(10 + s).unwrap(),
            one.get(s).unwrap(),
        );
        assert_eq!(a.length, reference.length);
        assert_eq!(
            b.length, reference.length,
            "both devices of step {s} see one length"
        );
        assert_eq!((a.samples.len(), b.samples.len()), (4, 4));
        assert_eq!(a.samples[0].input, reference.samples[0].input);
        assert_ne!(
            a.samples
                .iter()
                .map(|x| x.input.clone())
                .collect::<Vec<_>>(),
            b.samples
                .iter()
                .map(|x| x.input.clone())
                .collect::<Vec<_>>(),
            "the devices get different sequences"
        );
    }
    assert!(two.get(20).is_none());
}

/// burn-train's multi-device strategy with two device handles (both the CPU on ndarray): the
/// loss falls and the saved model loads and evaluates on one device.
#[test]
fn two_devices_train_and_the_model_evaluates_on_one() {
    let out = temp_dir("che-two-devices");
    let config = tiny(Task::EvenPairs, "alibi")
        .with_steps(60)
        .with_batch_size(16)
        .with_learning_rate(3e-3);
    let device = Default::default();
    dape::train::che::train_on::<AD>(
        &config,
        &out,
        &[device, device],
        Progress::Lines("  ".into(), 20),
    )
    .expect("two-device training runs");
    let losses: Vec<f64> = std::fs::read_to_string(out.join("train/epoch-1/Loss.log"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(losses.len(), 2 * 60, "one logged item per device and step");
    let head = losses[..10].iter().sum::<f64>() / 10.0;
    let tail = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(tail < head, "loss {head} -> {tail}");
    let (config, model) = load::<B>(&out, &device).unwrap();
    let eval = CheEvalConfig {
        lengths: vec![8],
        sequences: 8,
        ..Default::default()
    };
    let report = accuracy_by_length(&model, config.task, &eval, None, &device, |_| {}).unwrap();
    assert_eq!(report.len(), 1);
}

//! A disk that fills up mid-run, and a checkpoint damaged from outside (issue 38).
//!
//! The disk fills through the crate's write budget ([`dape::disk::set_write_budget`]): after
//! that many bytes every write fails with `StorageFull`, as on a full filesystem, so the tests
//! run anywhere, without root or a small mount. The budget is process-wide, which is why this
//! file is a test binary of its own and its tests take one lock.
//!
//! Checked: the run ends with [`Error::DiskFull`] naming the file, never a panic (in any
//! thread: burn-train's logger and checkpointer write from threads of their own); nothing
//! half-written is left; the newest complete checkpoint loads; once space is back, `--resume`
//! ends with the uninterrupted run's weights and final validation loss. A damaged newest
//! checkpoint is passed over for the one before it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use burn::backend::{Autodiff, NdArray};
use dape::disk::set_write_budget;
use dape::error::Error;
use dape::experiment::lm::LmTrainConfig;
use dape::train::lm::{latest_checkpoint, train};

type AB = Autodiff<NdArray<f32>>;

#[path = "common/lm_run.rs"]
mod lm_run;
use lm_run::{options, params, temp, tiny_config, write_corpus};

/// Panics anywhere in the process since the hook went in.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One test at a time (the write budget is the process's), with panics of every thread counted.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Eight steps, a checkpoint every two: four checkpoints.
fn config(data: &Path) -> LmTrainConfig {
    LmTrainConfig {
        steps: 8,
        ..tiny_config(data, "alibi")
    }
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The run's last validation loss: the weighted mean of the entries of its last round's log
/// (`value,weight` per line).
fn final_valid_loss(run: &Path, epochs: usize) -> f64 {
    let log = std::fs::read_to_string(run.join(format!("valid/epoch-{epochs}/Loss.log")))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    let (sum, weight) = log
        .lines()
        .filter_map(|l| l.split_once(','))
        .map(|(v, w)| (v.parse::<f64>().unwrap(), w.parse::<f64>().unwrap()))
        .fold((0.0, 0.0), |(s, n), (v, w)| (s + v * w, n + w));
    assert!(weight > 0.0, "no weighted entry in {}", run.display());
    sum / weight
}

/// The largest difference between two models' output-head weights.
fn weight_diff(
    a: &dape::LanguageModel<NdArray<f32>>,
    b: &dape::LanguageModel<NdArray<f32>>,
) -> f32 {
    params(a)
        .iter()
        .zip(params(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Bytes of checkpoint `epoch`'s three files.
fn checkpoint_bytes(run: &Path, epoch: usize) -> u64 {
    ["model", "optim", "scheduler"]
        .iter()
        .map(|n| {
            std::fs::metadata(run.join(format!("checkpoint/{n}-{epoch}.mpk")))
                .unwrap()
                .len()
        })
        .sum()
}

#[test]
fn a_disk_that_fills_mid_run_is_a_named_error_and_the_run_resumes_to_the_same_end() {
    let _guard = exclusive();
    let data = temp("disk-data");
    write_corpus(&data);
    let cache = temp("disk-cache");
    let config = config(&data);
    let device = Default::default();

    let full = temp("disk-full-run");
    let (reference, _) = train::<AB>(&config, &options(&full, &cache, false), &device, "ndarray")
        .expect("the uninterrupted run");
    let reference_loss = final_valid_loss(&full, 4);

    // Room for the run's first two checkpoints and its logs, not for the third checkpoint.
    let budget = 2 * checkpoint_bytes(&full, 4) + checkpoint_bytes(&full, 4) / 2;
    let run = temp("disk-filled-run");
    let panics = PANICS.load(Ordering::SeqCst);
    set_write_budget(Some(budget));
    let outcome = train::<AB>(&config, &options(&run, &cache, false), &device, "ndarray");
    set_write_budget(None);
    let err = outcome.expect_err("a run whose disk fills must fail");
    assert_eq!(PANICS.load(Ordering::SeqCst), panics, "a thread panicked");
    let message = err.to_string();
    match &err {
        Error::DiskFull { path, .. } => assert!(path.starts_with(&run), "{message}"),
        other => panic!("expected Error::DiskFull, got {other:?}"),
    }
    assert!(message.contains("the disk is full"), "{message}");

    // Nothing half-written, no result of an unfinished run, and a checkpoint to resume from.
    let partial: Vec<_> = files(&run)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("-partial-"))
        .collect();
    assert!(partial.is_empty(), "left behind: {partial:?}");
    assert!(!run.join("model.mpk").exists() && !run.join("train.json").exists());
    let newest = latest_checkpoint(&run).expect("a complete checkpoint");
    assert!((1..4).contains(&newest), "checkpoint {newest}");

    // Space is back: --resume ends where the uninterrupted run ended.
    let (resumed, summary) =
        train::<AB>(&config, &options(&run, &cache, true), &device, "ndarray").expect("resume");
    assert_eq!(summary.started_at_step, 2 * newest);
    let diff = weight_diff(&reference, &resumed);
    assert!(diff < 1e-5, "the resumed run's weights differ by {diff}");
    let loss = final_valid_loss(&run, 4);
    assert!(
        (loss - reference_loss).abs() <= 0.01 * reference_loss,
        "final validation loss {loss} against {reference_loss} uninterrupted"
    );
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_for_the_one_before_it() {
    let _guard = exclusive();
    let data = temp("damaged-data");
    write_corpus(&data);
    let cache = temp("damaged-cache");
    let config = config(&data);
    let device = Default::default();
    let run = temp("damaged-run");
    let (reference, _) = train::<AB>(&config, &options(&run, &cache, false), &device, "ndarray")
        .expect("the uninterrupted run");

    // The run is cut off after its last checkpoint, which is then truncated from outside.
    std::fs::remove_file(run.join("model.mpk")).unwrap();
    std::fs::remove_file(run.join("train.json")).unwrap();
    let newest = latest_checkpoint(&run).unwrap();
    assert_eq!(newest, 4);
    let damaged = run.join("checkpoint/model-4.mpk");
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();

    let (resumed, summary) = train::<AB>(&config, &options(&run, &cache, true), &device, "ndarray")
        .expect("resume from checkpoint 3");
    assert_eq!(summary.started_at_step, 6, "resumed from checkpoint 3");
    let diff = weight_diff(&reference, &resumed);
    assert!(diff < 1e-5, "the resumed run's weights differ by {diff}");
    // The damaged file was written anew, whole.
    assert_eq!(latest_checkpoint(&run), Some(4));
    assert_eq!(std::fs::read(&damaged).unwrap().len(), bytes.len());
}

/// `dape` with `DAPE_WRITE_BUDGET_BYTES` set: it must fail with the named error, no panic.
fn fails_on_a_full_disk(name: &str, args: &[&OsStr], budget: u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_dape"))
        .args(args)
        .env("DAPE_WRITE_BUDGET_BYTES", budget.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "dape {name} succeeded on a full disk"
    );
    assert!(stderr.contains("the disk is full"), "dape {name}: {stderr}");
    assert!(!stderr.contains("panicked"), "dape {name}: {stderr}");
}

/// `dape` with room to write: it must succeed. Its standard output goes to `/dev/full` where
/// there is one (every write fails with ENOSPC, as when the terminal log is on the full disk):
/// progress lines are lost, not the run.
fn succeeds(name: &str, args: &[&OsStr]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dape"));
    cmd.args(args);
    if let Ok(full) = std::fs::File::options().write(true).open("/dev/full") {
        cmd.stdout(full);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "dape {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CLI on a disk that fills: `dape train` (then `--resume` once there is room), `dape eval`,
/// `dape che train` and `dape che suite` exit non-zero with the named error and no panic.
#[test]
fn the_cli_exits_with_the_named_error_on_a_full_disk_and_resumes() {
    let _guard = exclusive();
    let dir = temp("disk-cli");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_corpus(&data);
    let config = dir.join("lm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"encoding": {{"type": "alibi"}}, "data": "{}", "d_model": 16,
               "n_layers": 1, "n_heads": 2, "train_length": 16, "batch_size": 2,
               "steps": 8, "warmup_steps": 1, "checkpoint_every": 2,
               "valid_lengths": [16], "valid_tokens": 32,
               "split": {{"seed": 3, "valid_fraction": 0.1, "test_fraction": 0.2}}}}"#,
            data.display()
        ),
    )
    .unwrap();
    let (run, cache) = (dir.join("lm-run"), dir.join("cache"));
    let o = |s: &'static str| OsStr::new(s);
    let train: Vec<&OsStr> = vec![
        o("train"),
        o("--config"),
        config.as_os_str(),
        o("--out"),
        run.as_os_str(),
        o("--cache"),
        cache.as_os_str(),
        o("--lines"),
        o("100"),
    ];
    fails_on_a_full_disk("train", &train, 3000);
    let mut resume = train.clone();
    resume.push(o("--resume"));
    succeeds("train --resume", &resume);
    let eval = [
        o("eval"),
        o("--run"),
        run.as_os_str(),
        o("--lengths"),
        o("16"),
        o("--max-tokens"),
        o("32"),
        o("--cache"),
        cache.as_os_str(),
    ];
    fails_on_a_full_disk("eval", &eval, 100);
    assert!(!run.join("eval.json").exists(), "a half-written eval.json");
    let che_run = dir.join("che-run");
    let che_suite = dir.join("che-suite");
    let small = [
        o("--encoding"),
        o("alibi"),
        o("--steps"),
        o("200"),
        o("--batch-size"),
        o("4"),
        o("--d-model"),
        o("16"),
        o("--layers"),
        o("1"),
        o("--heads"),
        o("2"),
    ];
    let mut che_train = vec![o("che"), o("train"), o("--task"), o("parity_check")];
    che_train.extend(small);
    che_train.extend([o("--lines"), o("100"), o("--out"), che_run.as_os_str()]);
    fails_on_a_full_disk("che train", &che_train, 3000);
    let mut suite = vec![o("che"), o("suite"), o("--tasks"), o("parity_check")];
    suite.extend(small);
    suite[4] = o("--encodings");
    suite.extend([o("--lengths"), o("8"), o("--out"), che_suite.as_os_str()]);
    fails_on_a_full_disk("che suite", &suite, 3000);
}

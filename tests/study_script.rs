//! The study driver's failure handling (scripts/test-study.sh, with a stub `dape`): a failed
//! cell stops the grid by name, and a publish that meets a full disk leaves the results folder
//! as it was (issue 38).

#[test]
fn the_study_driver_stops_on_a_failed_cell_and_publishes_whole_or_not_at_all() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-study.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The SDK's quickstart example runs, end to end, against a stack it starts.

#[test]
fn the_quickstart_example_runs() {
    let exe = std::env::current_exe().expect("test binary path");
    let examples = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples/quickstart");
    assert!(
        examples.is_file(),
        "{} missing: build it with `cargo build --workspace --examples` (cargo test does)",
        examples.display()
    );
    let out = std::process::Command::new(&examples)
        .output()
        .expect("run quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "created ",
        "signed via HSM ",
        "signed via an HSM holding the key",
        "signed via any HSM",
        "verifies: true",
        "metrics: ",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

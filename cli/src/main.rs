//! The `keysync` command line: a local stack, the demo, keys, cluster status.
//!
//! `--json` output is one JSON document on stdout; errors go to stderr with
//! a non-zero exit code (2 for bad arguments). A closed stdout (`| head`)
//! ends a command quietly, with exit 0.

mod cmd;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cmd::parse();
    cli.check();
    let telemetry = match keysync_telemetry::init("keysync", &[], "warn", cli.log_format) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Export what was traced before the process ends.
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cmd::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

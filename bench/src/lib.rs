//! warren-bench: the small load tools that `bench/run` and `bench/soak` drive (`bench-connect`,
//! `bench-hold`, `bench-soak`, in `src/bin`; see `bench/README.md`). This library holds only what
//! those tools share. Not a test harness: nothing here is used by warren itself.

use std::process::ExitCode;
use std::time::Duration;

/// A tool's exit status: success, or its error with every cause on stderr, named after the tool.
pub fn finish(tool: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What an accept loop does when `accept` fails (out of descriptors and the like): says so, and
/// pauses a moment before the next accept, so the loop keeps serving without spinning.
pub async fn accept_failed(e: &std::io::Error) {
    eprintln!("accept: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

//! Child processes of the real binaries, with their output captured line by line.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Environment variables of the binaries that a developer's shell might set; they are removed so
/// every test passes its configuration explicitly.
const SCRUBBED_ENV: &[&str] = &[
    "RUST_LOG",
    "WARREN_RELAY",
    "WARREN_TOKEN",
    "WARREN_AGENT_ID",
    "WARREN_CONFIG_DIR",
    "WARREN_API",
    "WARREN_AGENT_API",
];

/// A child's environment without [`SCRUBBED_ENV`], without colours, with the harness's local
/// API token ([`crate::AGENT_API_TOKEN`], for agents to require and CLIs to send), plus `envs`.
pub(crate) fn scrub_env<K, V>(
    cmd: &mut std::process::Command,
    envs: impl IntoIterator<Item = (K, V)>,
) where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("NO_COLOR", "1");
    cmd.env("WARREN_API_TOKEN", crate::AGENT_API_TOKEN);
    cmd.envs(envs);
}

/// [`scrub_env`] for a long-running binary, which also logs at `WARREN_TEST_RUST_LOG` when the
/// test run sets it.
pub(crate) fn daemon_env<K, V>(
    cmd: &mut std::process::Command,
    envs: impl IntoIterator<Item = (K, V)>,
) where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    scrub_env(cmd, std::iter::empty::<(&str, &str)>());
    if let Some(level) = std::env::var_os("WARREN_TEST_RUST_LOG") {
        cmd.env("RUST_LOG", level);
    }
    cmd.envs(envs);
}

/// Finds a binary of the workspace in the cargo target dir.
///
/// Looks beside the test executable (`target/debug/deps/x` → `target/debug/NAME`), then in
/// `$CARGO_TARGET_DIR/debug`, then in `<workspace>/target/debug`.
pub fn binary(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join(name));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join(name));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug").join(name));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "binary `{name}` not found (looked in {candidates:?}): run `cargo build --workspace --bins` first"
    );
}

/// Lines of one output stream of a process, appended by a background reader task.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    /// A copy of the lines so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("lines poisoned").clone()
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.0.lock().expect("lines poisoned").len()
    }

    /// True when nothing was captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any line contains `needle`, ignoring ASCII case.
    pub fn contains(&self, needle: &str) -> bool {
        let needle = needle.to_ascii_lowercase();
        self.0
            .lock()
            .expect("lines poisoned")
            .iter()
            .any(|l| l.to_ascii_lowercase().contains(&needle))
    }

    /// All lines joined with newlines.
    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    pub(crate) fn push(&self, line: String) {
        self.0.lock().expect("lines poisoned").push(line);
    }
}

/// Removes ANSI escape sequences, in case a binary colours its logs anyway.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    label: String,
    stream: R,
    sink: Lines,
) -> JoinHandle<()> {
    let echo = std::env::var_os("WARREN_TEST_VERBOSE").is_some();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = strip_ansi(line.trim_end_matches(['\n', '\r']));
                    if echo {
                        eprintln!("[{label}] {line}");
                    }
                    sink.push(line);
                }
            }
        }
    })
}

/// A running child process whose stdout and stderr go to [`Lines`]. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) label: String,
    child: Child,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(
        label: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        stdout: &Lines,
        stderr: &Lines,
    ) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        daemon_env(cmd.as_std_mut(), envs.iter().map(|(k, v)| (k, v)));
        let mut child =
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![
            spawn_reader(format!("{label} stdout"), out, stdout.clone()),
            spawn_reader(label.to_owned(), err, stderr.clone()),
        ];
        Self { label: label.to_owned(), child, readers, status: None }
    }

    /// The exit status if the process has exited.
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on child");
        }
        self.status
    }

    /// Waits until the process exits or `timeout` passes; on exit, also waits (briefly) until
    /// everything it printed has been captured.
    pub(crate) async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            match tokio::time::timeout(timeout, self.child.wait()).await {
                Ok(status) => self.status = Some(status.expect("wait on child")),
                Err(_) => return None,
            }
        }
        self.drain_output().await;
        self.status
    }

    /// After exit: lets the reader tasks reach end of file so no output is lost.
    pub(crate) async fn drain_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for r in &mut self.readers {
            let _ = tokio::time::timeout_at(deadline, r).await;
        }
        self.readers.clear();
    }

    /// SIGKILL and wait for the exit.
    pub(crate) async fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.start_kill();
            let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{} did not die after SIGKILL", self.label))
                .expect("wait on child");
            self.status = Some(status);
        }
        self.drain_output().await;
    }

    /// The OS process id, if still running.
    pub(crate) fn id(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Prints captured output under a banner; used by owners' `Drop` when a test fails.
pub(crate) fn dump(title: &str, lines: &Lines) {
    let lines = lines.snapshot();
    eprintln!("----- {title} ({} lines) -----", lines.len());
    for l in lines {
        eprintln!("{l}");
    }
    eprintln!("----- end of {title} -----");
}

/// Another program a test needs (an ACME test CA, a DNS server...), found on `PATH`, with its
/// output captured. Killed on drop; its output is printed when the test is failing.
#[derive(Debug)]
pub struct Daemon {
    proc: Proc,
    out: Lines,
}

impl Daemon {
    /// Starts `program` with `args` and `envs`; panics with an install hint when it is missing.
    pub fn spawn(label: &str, program: &str, args: &[String], envs: &[(&str, &str)]) -> Self {
        let path = which(program).unwrap_or_else(|| {
            panic!("`{program}` is not installed (scripts/test-all installs it with apt-get)")
        });
        let out = Lines::default();
        let envs: Vec<(String, String)> =
            envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let proc = Proc::spawn(label, &path, args, &envs, &out, &out);
        Self { proc, out }
    }

    /// Everything it printed so far, stdout and stderr interleaved.
    pub fn output(&self) -> String {
        self.out.text()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.try_status().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump(&format!("{} output", self.proc.label), &self.out);
        }
    }
}

/// The full path of `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

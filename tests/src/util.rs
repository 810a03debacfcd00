//! Small building blocks: deadlines, polling, temp dirs, port ranges, random bytes, hashing.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Deadline for "a process or tunnel becomes ready". Generous: a slow, shared 2-core machine
/// building in debug mode can be very slow, but a passing test never waits this long.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for one bounded exchange (one request, one small echo).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline for bulk transfers (10-100 MB). Only a hang guard, not a speed assertion.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(240);

/// Longest a single attempt inside [`eventually`] may take before it counts as failed.
const ATTEMPT_CAP: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `Ok`, or panics once `timeout` has passed with the last error.
///
/// Attempts are retried quickly at first (20 ms) and then every 500 ms at most, so a condition
/// that becomes true early is noticed early. Each attempt is itself bounded, so one hanging
/// attempt cannot eat the whole deadline.
pub async fn eventually<T, F, Fut>(timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    match try_eventually(timeout, f).await {
        Ok(v) => v,
        Err(e) => panic!("condition not met within {timeout:?}: {e:#}"),
    }
}

/// Like [`eventually`] but returns the last error instead of panicking.
pub async fn try_eventually<T, F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(remaining.min(ATTEMPT_CAP), f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("attempt {attempts} did not finish in time"),
        };
        if Instant::now() + delay >= deadline {
            return Err(err.context(format!("still failing after {attempts} attempts")));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than `timeout` (a hang guard).
pub async fn within<F: Future>(timeout: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {timeout:?}"),
    }
}

/// Resident memory of process `pid` now, in bytes (`VmRSS` of `/proc/PID/status`). Panics when
/// the process is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    kib * 1024
}

/// A directory under the system temp dir with a unique name, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `warren-test-LABEL-PID-N-RANDOM` under [`std::env::temp_dir`].
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let r: u32 = rand::rng().random();
        let path = std::env::temp_dir()
            .join(format!("warren-test-{label}-{}-{n}-{r:08x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, created if missing.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        p
    }

    /// A path inside the directory (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A range of TCP ports on 127.0.0.1 for a relay's public port pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub low: u16,
    /// Highest port (inclusive).
    pub high: u16,
}

/// Ranges already handed out in this process, so parallel tests never share pool ports.
static HANDED_OUT: Mutex<Vec<PortRange>> = Mutex::new(Vec::new());

impl PortRange {
    /// A random range of `len` ports in 30000-59000 whose ports are all free right now and that
    /// overlaps no range handed out earlier in this process.
    ///
    /// Ports outside the kernel's ephemeral range (`ip_local_port_range`) are preferred when
    /// 30000-59000 has enough of them: an ephemeral port can be taken at any moment by an
    /// outgoing connection of another test, which would make the relay's pool flaky.
    pub fn random(len: u16) -> Self {
        assert!(len >= 1);
        let (lo, hi) = (30000u16, 59000u16);
        let windows: Vec<(u16, u16)> = match ephemeral_range() {
            Some((e_lo, e_hi)) => [(lo, e_lo.min(hi)), (e_hi.saturating_add(1).max(lo), hi)]
                .into_iter()
                .filter(|(a, b)| b > a && b - a >= len.saturating_mul(20))
                .collect(),
            None => Vec::new(),
        };
        let windows = if windows.is_empty() { vec![(lo, hi)] } else { windows };
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let (w_lo, w_hi) = windows[rng.random_range(0..windows.len())];
            let low: u16 = rng.random_range(w_lo..w_hi - len);
            let range = Self { low, high: low + len - 1 };
            let mut taken = HANDED_OUT.lock().expect("port registry poisoned");
            if taken.iter().any(|r| r.low <= range.high && range.low <= r.high) {
                continue;
            }
            if (range.low..=range.high).all(port_is_free) {
                taken.push(range);
                return range;
            }
        }
        panic!("could not find {len} free consecutive ports in 30000-59000");
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// The relay's `--ports` argument: `127.0.0.1:LOW-HIGH`.
    pub fn arg(&self) -> String {
        format!("127.0.0.1:{}-{}", self.low, self.high)
    }
}

/// The kernel's ephemeral port range, where outgoing connections get their local ports.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((parts.next()??, parts.next()??))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port on 127.0.0.1 that refuses connections right now (bound by the OS, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    port
}

/// `127.0.0.1:port`.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill(&mut v[..]);
    v
}

/// A random lower-case label for names that must not clash between tests (e.g. subdomains).
pub fn unique(prefix: &str) -> String {
    let r: u32 = rand::rng().random();
    format!("{prefix}-{r:08x}")
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Hex form of a digest, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

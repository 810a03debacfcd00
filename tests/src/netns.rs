//! Network namespaces for the end-to-end tests of warren's local networks (`warren net ...`).
//!
//! Everything happens inside namespaces created here; the root network namespace is never
//! changed (no routes, no nftables there; no links but the host end of an [`Uplink`], removed on
//! drop) and traffic only goes to loopback or to addresses inside those namespaces.
//!
//! - [`Netns`]: `ip netns add wt<pid>-<n><tag>` with `lo` up; deleted on drop.
//! - Code inside a namespace without external tools: [`Netns::run`] runs a closure on a fresh
//!   thread that `setns(CLONE_NEWNET)`s into it first (sockets stay in the namespace they were
//!   created in); [`Netns::exec`] starts a program from such a thread, so the child lives in the
//!   namespace's network stack but in the root *mount* namespace (like a real host process).
//! - Servers inside a namespace, stopped on drop: [`tcp_whoami`], [`udp_whoami`] (each answers
//!   `peer=IP:PORT local=IP:PORT\n`) and [`dns_upstream`], a tiny resolver that answers
//!   `upstream-test.example.` with A [`UPSTREAM_TEST_ADDR`] and NXDOMAIN otherwise.
//! - Clients inside a namespace: [`tcp_ask`], [`udp_ask`].
//! - [`Uplink`]: a namespace wired to the test's own namespace by a veth pair (the one place the
//!   test's namespace gets a link, deleted on drop), whose path can be cut with nftables.
//! - [`HostNs`]: a "host" namespace H running `warren agent --api 127.0.0.1:4040` and an "ext"
//!   namespace E wired to it by a veth pair (H `up0` 198.51.100.1/24, E `eth0` 198.51.100.2/24),
//!   with [`HostNs::net`] (`warren net ARGS` in H), [`HostNs::api`] (curl in H) and
//!   [`HostNs::restart_agent`]. On drop: the agent is stopped (SIGTERM, then SIGKILL), the
//!   sandboxes the agent created (`/run/netns/wr-*`, recorded from its state) are deleted, then
//!   H and E.
//!
//! Why the agent is not started with `ip netns exec`: that puts it in a private mount namespace
//! that is a *slave* of the root one, so the `/run/netns/wr-*` bind mounts it makes for its
//! sandboxes would be invisible to everyone else (the CLI of `warren net run`, the tests).
//! [`Netns::exec`] only switches the network namespace, as `nsenter --net` would.
//!
//! Every test must first call [`require`] (or use [`HostNs::start`], which does): without root or
//! without `ip`/`nft` it prints `skipped: ...` and the test returns. Set
//! `WARREN_TEST_NETNS_REQUIRED=1` to turn that skip into a failure (CI running as root).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead as _, BufReader, ErrorKind, Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::process::{binary, daemon_env, scrub_env, which};
use crate::util::TempDir;

/// The agent's API inside H (the CLI's default, so `warren net` needs no flag).
pub const AGENT_API: &str = "127.0.0.1:4040";

/// H's end of the uplink (`up0`).
pub const UPLINK_H: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// E's end of the uplink (`eth0`).
pub const UPLINK_E: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// What [`dns_upstream`] answers for [`UPSTREAM_TEST_NAME`].
pub const UPSTREAM_TEST_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// The only name [`dns_upstream`] knows (fully qualified, lower case).
pub const UPSTREAM_TEST_NAME: &str = "upstream-test.example.";

/// Longest any external command run by the harness may take (a hang guard).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the agent may take to answer its API after start.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Tools every networks test needs.
const BASE_TOOLS: &[&str] = &["ip", "nft", "curl"];

/// Why the networks tests cannot run here (not root, a tool missing), or `None`.
pub fn skip_reason(extra_tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".to_owned());
    }
    for tool in BASE_TOOLS.iter().chain(extra_tools) {
        if which(tool).is_none() {
            return Some(format!("needs `{tool}` on PATH"));
        }
    }
    None
}

/// True when the test can run; otherwise prints `skipped: WHY` and returns false (or panics
/// when `WARREN_TEST_NETNS_REQUIRED` is set).
pub fn require(extra_tools: &[&str]) -> bool {
    match skip_reason(extra_tools) {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("WARREN_TEST_NETNS_REQUIRED").is_none(),
                "WARREN_TEST_NETNS_REQUIRED is set but the networks tests cannot run: {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Polls `f` until it returns `Ok` or `timeout` passes; returns the last error then.
pub fn try_retry<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + delay >= deadline => {
                return Err(e.context(format!("still failing after {attempts} attempts")));
            }
            Err(_) => {}
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Like [`try_retry`] but panics with `what` and the last error.
pub fn retry<T>(timeout: Duration, what: &str, f: impl FnMut() -> anyhow::Result<T>) -> T {
    try_retry(timeout, f).unwrap_or_else(|e| panic!("{what}: not within {timeout:?}: {e:#}"))
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {}", path.display()))
}

/// Runs `f` on a fresh thread that first enters the network namespace at `path`.
fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread in {} panicked", path.display())))
    })
}

/// Starts `cmd` in the network namespace at `ns` (or here when `None`).
fn spawn_in(ns: Option<&Path>, cmd: &mut Command) -> anyhow::Result<Child> {
    match ns {
        None => cmd.spawn().context("spawn"),
        Some(path) => run_in(path, || cmd.spawn().context("spawn")),
    }
}

/// A reader thread collecting everything from a pipe.
fn collect_pipe<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Runs `cmd` to completion (stdin null, output captured) inside `ns`, killing it (by its PID)
/// after `timeout`.
pub fn output_in(ns: Option<&Path>, mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = spawn_in(ns, &mut cmd).unwrap_or_else(|e| panic!("cannot start {what}: {e:#}"));
    let out = collect_pipe(child.stdout.take());
    let err = collect_pipe(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            _ => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap_or_else(|e| panic!("wait for {what}: {e}"));
            }
        }
    };
    let stdout = out.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let mut stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[harness: killed after {timeout:?}: {what}]\n").as_bytes(),
        );
    }
    Output { status, stdout, stderr }
}

/// `program args...` in the root network namespace (only for commands that do not change it,
/// e.g. `ip -n NS ...`, which switches namespaces itself).
pub fn run_here(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output_in(None, cmd, CMD_TIMEOUT)
}

/// Stdout of a successful command; panics with its stderr otherwise.
pub fn stdout_ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);
/// Serializes `ip netns add`: the first one of a boot turns /run/netns into a shared mount.
static NS_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace `wt<pid>-<n><tag>` with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace. `tag` (at most 4 lower-case letters or digits) only helps
    /// reading logs.
    pub fn new(tag: &str) -> Self {
        assert!(
            tag.len() <= 4 && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "bad namespace tag {tag:?}"
        );
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("wt{}-{n}{tag}", std::process::id());
        {
            let _guard = NS_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            stdout_ok(&format!("ip netns add {name}"), &run_here("ip", &["netns", "add", &name]));
        }
        let ns = Self { name };
        ns.ip_ok(&["link", "set", "lo", "up"]);
        ns
    }

    /// The name (`ip netns` name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `/run/netns/NAME` as a string, for command lines.
    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_here("ip", &all)
    }

    /// `ip -n NAME ARGS`, asserting success; its stdout.
    pub fn ip_ok(&self, args: &[&str]) -> String {
        stdout_ok(&format!("ip -n {} {}", self.name, args.join(" ")), &self.ip(args))
    }

    /// `ip -n NAME -j ARGS` parsed (an empty output is an empty array).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let text = self.ip_ok(&all);
        if text.trim().is_empty() {
            return Value::Array(Vec::new());
        }
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("ip -n {} -j {}: not JSON ({e}): {text}", self.name, args.join(" "))
        })
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> BTreeSet<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// The IPv4 addresses (address, prefix length) of `dev`; empty when `dev` does not exist.
    pub fn ipv4_addrs(&self, dev: &str) -> Vec<(Ipv4Addr, u8)> {
        if !self.links().contains(dev) {
            return Vec::new();
        }
        let v = self.ip_json(&["-4", "addr", "show", "dev", dev]);
        v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| {
                let ip = a["local"].as_str()?.parse().ok()?;
                let len = u8::try_from(a["prefixlen"].as_u64()?).ok()?;
                Some((ip, len))
            })
            .collect()
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        run_in(&self.path(), f)
    }

    /// Runs `program args...` inside the namespace to completion (bounded by [`CMD_TIMEOUT`]).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args);
        output_in(Some(&self.path()), cmd, CMD_TIMEOUT)
    }

    /// Like [`Netns::exec`] but asserts success; its stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        stdout_ok(
            &format!("in {}: {program} {}", self.name, args.join(" ")),
            &self.exec(program, args),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = run_here("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// The nftables table [`Uplink::cut`] adds inside the namespace.
const CUT_TABLE: &str = "wtcut";

/// A namespace wired to the test's own namespace by a veth pair, so a process here (a relay)
/// can listen on [`Uplink::host_ip`] for processes in the namespace (an agent), and the path
/// between them can be cut. Here: `wtv<pid>-<n>` with `10.253.X.1/30`; in the namespace: `eth0`
/// with `10.253.X.2/30` (X from the pid and a counter). The pair is deleted on drop, then the
/// namespace (and the nftables table in it).
#[derive(Debug)]
pub struct Uplink {
    /// This side's address.
    pub host_ip: Ipv4Addr,
    /// The namespace's address.
    pub ns_ip: Ipv4Addr,
    host_dev: String,
    ns: Netns,
}

impl Uplink {
    /// Creates the namespace and the pair, both ends up. Call [`require`] first.
    pub fn new(tag: &str) -> Self {
        let ns = Netns::new(tag);
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let x = ((std::process::id() + n) % 256) as u8;
        let (host_ip, ns_ip) = (Ipv4Addr::new(10, 253, x, 1), Ipv4Addr::new(10, 253, x, 2));
        let host_dev = format!("wtv{}-{n}", std::process::id());
        let up = Self { host_ip, ns_ip, host_dev, ns };
        let here = |args: &[&str]| {
            stdout_ok(&format!("ip {}", args.join(" ")), &run_here("ip", args));
        };
        here(&[
            "link",
            "add",
            &up.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            up.ns.name(),
        ]);
        here(&["addr", "add", &format!("{host_ip}/30"), "dev", &up.host_dev]);
        here(&["link", "set", &up.host_dev, "up"]);
        up.ns.ip_ok(&["addr", "add", &format!("{ns_ip}/30"), "dev", "eth0"]);
        up.ns.ip_ok(&["link", "set", "eth0", "up"]);
        up
    }

    /// The namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Drops every packet between the namespace and this side (an nftables table in the
    /// namespace, dropping in and out on `eth0`) until [`Uplink::restore`].
    pub fn cut(&self) {
        let t = CUT_TABLE;
        let rules = format!(
            "table inet {t} {{\n\
             chain in {{ type filter hook input priority -10; policy accept; iifname \"eth0\" drop; }}\n\
             chain out {{ type filter hook output priority -10; policy accept; oifname \"eth0\" drop; }}\n\
             }}\n"
        );
        let file = TempDir::new("uplink-cut");
        let path = file.write("cut.nft", &rules);
        self.ns.exec_ok("nft", &["-f", &path.display().to_string()]);
    }

    /// Removes what [`Uplink::cut`] added.
    pub fn restore(&self) {
        self.ns.exec_ok("nft", &["delete", "table", "inet", CUT_TABLE]);
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        // Deleting one end deletes both; the namespace goes after, with its nftables table.
        let _ = run_here("ip", &["link", "del", &self.host_dev]);
    }
}

/// A server thread inside a namespace; stopped (and joined) on drop.
#[derive(Debug)]
pub struct NsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    names: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl NsServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// For [`dns_upstream`]: every name asked so far (lower case, fully qualified).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Starts `serve` on a thread inside `ns`: `bind` runs there first and its error is
    /// returned here; then `serve(socket, ctx)` is called until the stop flag is set.
    fn start<S: Send + 'static>(
        ns: &Netns,
        what: &str,
        bind: impl FnOnce() -> anyhow::Result<(S, SocketAddr)> + Send + 'static,
        serve: impl Fn(&S, &ServeCtx) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::new()));
        let ctx = ServeCtx { stop: stop.clone(), hits: hits.clone(), names: names.clone() };
        let (tx, rx) = mpsc::channel();
        let path = ns.path();
        let thread = std::thread::spawn(move || {
            let sock = match enter(&path).and_then(|()| bind()) {
                Ok((sock, addr)) => {
                    let _ = tx.send(Ok(addr));
                    sock
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !ctx.stop.load(Ordering::SeqCst) {
                serve(&sock, &ctx);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("{what} in {}: {e:#}", ns.name()),
            Err(_) => panic!("{what} in {}: did not start", ns.name()),
        };
        Self { addr, stop, hits, names, thread: Some(thread) }
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a server loop sees.
#[derive(Debug)]
struct ServeCtx {
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    names: Arc<Mutex<Vec<String>>>,
}

/// Idle wait of the server loops: how quickly they notice the stop flag.
const POLL: Duration = Duration::from_millis(10);

/// The whoami answer.
fn whoami_text(peer: SocketAddr, local: SocketAddr) -> String {
    format!("peer={peer} local={local}\n")
}

/// A TCP server inside `ns` on `addr` (port 0: any) that answers every connection with
/// `peer=IP:PORT local=IP:PORT\n` and closes it. `local` is the address the connection
/// arrived at (after any DNAT), even when listening on 0.0.0.0.
pub fn tcp_whoami(ns: &Netns, addr: SocketAddr) -> NsServer {
    NsServer::start(
        ns,
        &format!("tcp whoami on {addr}"),
        move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
            l.set_nonblocking(true).context("nonblocking")?;
            let local = l.local_addr().context("local addr")?;
            Ok((l, local))
        },
        |l: &TcpListener, ctx| match l.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                if let Ok(local) = s.local_addr() {
                    let _ = s.write_all(whoami_text(peer, local).as_bytes());
                }
                ctx.hits.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => std::thread::sleep(POLL),
        },
    )
}

/// A UDP server inside `ns` on `addr` that answers every datagram with
/// `peer=IP:PORT local=IP:PORT\n`. Bind a specific address (not 0.0.0.0) for a meaningful
/// `local`.
pub fn udp_whoami(ns: &Netns, addr: SocketAddr) -> NsServer {
    NsServer::start(
        ns,
        &format!("udp whoami on {addr}"),
        move || {
            let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            s.set_read_timeout(Some(POLL)).context("read timeout")?;
            let local = s.local_addr().context("local addr")?;
            Ok((s, local))
        },
        |s: &UdpSocket, ctx| {
            let mut buf = [0u8; 2048];
            if let Ok((_, peer)) = s.recv_from(&mut buf)
                && let Ok(local) = s.local_addr()
            {
                let _ = s.send_to(whoami_text(peer, local).as_bytes(), peer);
                ctx.hits.fetch_add(1, Ordering::SeqCst);
            }
        },
    )
}

/// Connects from inside `ns` to `addr` and reads the answer until the server closes.
pub fn tcp_ask(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("tcp connect {addr}"))?;
        s.set_read_timeout(Some(timeout)).context("read timeout")?;
        let mut text = String::new();
        s.read_to_string(&mut text).with_context(|| format!("tcp read from {addr}"))?;
        ensure!(!text.is_empty(), "tcp {addr}: closed without an answer");
        Ok(text)
    })
    .with_context(|| format!("from {}", ns.name()))
}

/// Sends a datagram from inside `ns` (from a fresh socket, so a fresh conntrack entry) to
/// `addr` and returns the first answer; resends a few times within `timeout`.
pub fn udp_ask(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").context("bind udp client")?;
        s.connect(addr).with_context(|| format!("udp connect {addr}"))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("udp {addr}: no answer within {timeout:?}");
            }
            // A send can fail with ECONNREFUSED after an ICMP port unreachable.
            s.send(b"who?\n").with_context(|| format!("udp send to {addr}"))?;
            s.set_read_timeout(Some(left.min(Duration::from_millis(700)))).context("timeout")?;
            match s.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).with_context(|| format!("udp recv from {addr}")),
            }
        }
    })
    .with_context(|| format!("from {}", ns.name()))
}

/// A parsed whoami answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whoami {
    /// The client as the server saw it.
    pub peer: SocketAddr,
    /// Where the connection or datagram arrived.
    pub local: SocketAddr,
}

impl Whoami {
    /// Parses `peer=IP:PORT local=IP:PORT`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut peer = None;
        let mut local = None;
        for part in text.split_whitespace() {
            if let Some(v) = part.strip_prefix("peer=") {
                peer = Some(v.parse().with_context(|| format!("peer in {text:?}"))?);
            } else if let Some(v) = part.strip_prefix("local=") {
                local = Some(v.parse().with_context(|| format!("local in {text:?}"))?);
            }
        }
        match (peer, local) {
            (Some(peer), Some(local)) => Ok(Self { peer, local }),
            _ => bail!("not a whoami answer: {text:?}"),
        }
    }
}

/// [`tcp_ask`] parsed.
pub fn tcp_whoami_ask(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Whoami> {
    Whoami::parse(&tcp_ask(ns, addr, timeout)?)
}

/// [`udp_ask`] parsed.
pub fn udp_whoami_ask(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Whoami> {
    Whoami::parse(&udp_ask(ns, addr, timeout)?)
}

/// A DNS resolver inside `ns` on `addr`, UDP and TCP: A [`UPSTREAM_TEST_ADDR`] (TTL 60) for
/// [`UPSTREAM_TEST_NAME`], NOERROR without answers for its other types, NXDOMAIN for every
/// other name. [`NsServer::names`] lists the names it was asked.
pub fn dns_upstream(ns: &Netns, addr: SocketAddr) -> NsServer {
    NsServer::start(
        ns,
        &format!("dns upstream on {addr}"),
        move || {
            let udp = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
            udp.set_nonblocking(true).context("nonblocking")?;
            let local = udp.local_addr().context("local addr")?;
            let tcp = TcpListener::bind(local).with_context(|| format!("bind tcp {local}"))?;
            tcp.set_nonblocking(true).context("nonblocking")?;
            Ok(((udp, tcp), local))
        },
        |(udp, tcp): &(UdpSocket, TcpListener), ctx| {
            let mut idle = true;
            let mut buf = [0u8; 4096];
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                idle = false;
                if let Some((name, answer)) = dns_answer(&buf[..n]) {
                    record(ctx, name);
                    let _ = udp.send_to(&answer, peer);
                }
            }
            if let Ok((s, _)) = tcp.accept() {
                idle = false;
                serve_dns_tcp(s, ctx);
            }
            if idle {
                std::thread::sleep(POLL);
            }
        },
    )
}

fn record(ctx: &ServeCtx, name: String) {
    ctx.hits.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut names) = ctx.names.lock() {
        names.push(name);
    }
}

/// Answers length-prefixed queries on one TCP connection until it closes (bounded by timeouts).
fn serve_dns_tcp(mut s: TcpStream, ctx: &ServeCtx) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    for _ in 0..16 {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if s.read_exact(&mut q).is_err() {
            return;
        }
        let Some((name, answer)) = dns_answer(&q) else { return };
        record(ctx, name);
        let Ok(alen) = u16::try_from(answer.len()) else { return };
        let mut framed = alen.to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        if s.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The answer to one DNS query, with the name asked (lower case, trailing dot); `None` for
/// what is not a one-question query.
fn dns_answer(q: &[u8]) -> Option<(String, Vec<u8>)> {
    let (question, question_end) = crate::udp::dns_question(q)?;
    let name = format!("{}.", question.name.to_ascii_lowercase());
    let known = name == UPSTREAM_TEST_NAME;
    let a = (known && question.qtype == 1).then_some(UPSTREAM_TEST_ADDR);
    let reply = crate::udp::dns_reply(q, question_end, true, if known { 0 } else { 3 }, a);
    Some((name, reply))
}

/// Lines printed by a child, shared with its reader threads.
type SharedLines = Arc<Mutex<Vec<String>>>;

/// A long-running child (an agent) started inside a namespace, with its stdout and stderr
/// captured. On drop: SIGTERM, then SIGKILL after a few seconds; its output is printed when the
/// test is failing.
#[derive(Debug)]
pub struct NsDaemon {
    label: String,
    child: Child,
    lines: SharedLines,
    status: Option<ExitStatus>,
}

impl NsDaemon {
    /// Starts `program args...` inside `ns` with a scrubbed environment plus `envs`.
    pub fn spawn(
        ns: &Netns,
        label: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        daemon_env(&mut cmd, envs.iter().copied());
        let mut child = spawn_in(Some(&ns.path()), &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start {label} ({}): {e:#}", program.display()));
        let lines = SharedLines::default();
        let echo = std::env::var_os("WARREN_TEST_VERBOSE").is_some();
        let pipes: [(Option<Box<dyn Read + Send>>, &str); 2] = [
            (child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), "out"),
            (child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), "err"),
        ];
        for (pipe, stream) in pipes {
            let Some(pipe) = pipe else { continue };
            let (sink, tag) = (lines.clone(), format!("{label} {stream}"));
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("[{tag}] {line}");
                    }
                    if let Ok(mut l) = sink.lock() {
                        l.push(format!("[{stream}] {line}"));
                    }
                }
            });
        }
        Self { label: label.to_owned(), child, lines, status: None }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends `sig` (by PID) unless it has exited, waits up to 5 s, then SIGKILLs it and waits.
    pub fn stop(&mut self, sig: Signal) -> ExitStatus {
        if let Some(status) = self.exited() {
            return status;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{}: still running 5 s after {sig}; SIGKILL", self.label);
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| panic!("wait for {}: {e}", self.label));
        self.status = Some(status);
        status
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM);
        if std::thread::panicking() {
            let log = self.log();
            eprintln!(
                "----- {} output -----\n{log}\n----- end of {} -----",
                self.label, self.label
            );
        }
    }
}

/// The result of one `warren net ...` run.
#[derive(Debug, Clone)]
pub struct CliOut {
    /// The command line, for messages.
    pub what: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl CliOut {
    pub(crate) fn from_output(what: String, out: Output) -> Self {
        Self {
            what,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics unless it succeeded; its stdout.
    pub fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Panics unless it failed with a non-zero exit and an `error: ...` line on stderr; returns
    /// stderr.
    pub fn fail(&self) -> &str {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "`{}` should have failed with an exit code but: {}\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.lines().any(|l| l.starts_with("error: ")),
            "`{}`: no `error: ...` line on stderr: {:?}",
            self.what,
            self.stderr
        );
        &self.stderr
    }

    /// Like [`CliOut::fail`], and the message mentions each of `needles` (ASCII case ignored).
    pub fn fail_mentioning(&self, needles: &[&str]) -> &str {
        let err = self.fail();
        let lower = err.to_ascii_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_ascii_lowercase()),
                "`{}`: the error should mention {n:?}: {err:?}",
                self.what
            );
        }
        err
    }
}

/// The message of an API error body: `{"error": "..."}` or `{"error": {"message": "..."}}`.
pub fn api_error_message(v: &Value) -> String {
    match &v["error"] {
        Value::String(s) => s.clone(),
        e => e["message"].as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()),
    }
}

/// Options of the agent in [`HostNs`].
#[derive(Debug, Clone, Default)]
pub struct HostOpts {
    /// `--dns-upstream` values.
    pub dns_upstream: Vec<String>,
    /// More arguments of `warren agent`.
    pub extra_args: Vec<String>,
}

/// A "host" namespace H running `warren agent` and an "ext" namespace E ("the internet") linked
/// to it: H `up0` 198.51.100.1/24 <-> E `eth0` 198.51.100.2/24.
#[derive(Debug)]
pub struct HostNs {
    /// Where the agent runs.
    pub h: Netns,
    /// Outside the host.
    pub e: Netns,
    agent: Option<NsDaemon>,
    opts: HostOpts,
    config: TempDir,
    /// Sandboxes (`/run/netns/wr-*` names) the agent reported as created by it.
    sandboxes: Mutex<BTreeSet<String>>,
    restarts: u32,
    /// Output of the agents stopped by restarts, printed when the test fails.
    past_logs: Vec<(String, String)>,
}

impl HostNs {
    /// H and E without an agent yet, or `None` (after printing why) when the test must skip.
    pub fn prepare(opts: HostOpts) -> Option<Self> {
        if !require(&[]) {
            return None;
        }
        let h = Netns::new("h");
        let e = Netns::new("e");
        h.ip_ok(&["link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", e.name()]);
        h.ip_ok(&["addr", "add", "198.51.100.1/24", "dev", "up0"]);
        h.ip_ok(&["link", "set", "up0", "up"]);
        e.ip_ok(&["addr", "add", "198.51.100.2/24", "dev", "eth0"]);
        e.ip_ok(&["link", "set", "eth0", "up"]);
        Some(Self {
            h,
            e,
            agent: None,
            opts,
            config: TempDir::new("net"),
            sandboxes: Mutex::new(BTreeSet::new()),
            restarts: 0,
            past_logs: Vec::new(),
        })
    }

    /// H, E and a ready agent, or `None` (after printing why) when the test must skip.
    pub fn start(opts: HostOpts) -> Option<Self> {
        let mut host = Self::prepare(opts)?;
        host.start_agent();
        Some(host)
    }

    /// The agent's config dir (its state DB is `networks.db` there).
    pub fn config_dir(&self) -> PathBuf {
        self.config.dir("agent")
    }

    /// Scratch space of the test.
    pub fn tmp(&self) -> &TempDir {
        &self.config
    }

    /// Starts the agent in H and waits until its API answers.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--api".into(),
            AGENT_API.into(),
            "--config-dir".into(),
            self.config_dir().display().to_string(),
        ];
        for u in &self.opts.dns_upstream {
            args.extend(["--dns-upstream".to_owned(), u.clone()]);
        }
        args.extend(self.opts.extra_args.iter().cloned());
        let label = format!("agent#{} in {}", self.restarts, self.h.name());
        self.agent = Some(NsDaemon::spawn(&self.h, &label, &binary("warren"), &args, &[]));
        self.wait_ready();
    }

    /// Waits (bounded) until `GET /api/networks` answers 200; panics with the agent's log if it
    /// exits or does not get there.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.exited()
            {
                panic!("the agent exited ({status}) before its API answered (its output follows)");
            }
            let last = self.api_timeout("GET", "/api/networks", None, Duration::from_secs(3));
            if last.0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent's API did not answer 200 within {AGENT_READY_TIMEOUT:?} (last: {} {})",
                last.0,
                last.1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent with `sig` (SIGKILL after 5 s) and waits for it.
    pub fn stop_agent(&mut self, sig: Signal) {
        self.record_sandboxes();
        if let Some(mut agent) = self.agent.take() {
            let status = agent.stop(sig);
            self.past_logs.push((format!("agent#{} ({status})", self.restarts), agent.log()));
            self.restarts += 1;
        }
    }

    /// Stops the agent (SIGTERM) and starts it again with the same config dir.
    pub fn restart_agent(&mut self) {
        self.stop_agent(Signal::SIGTERM);
        self.start_agent();
    }

    /// Kills the agent (SIGKILL, a crash) and starts it again with the same config dir.
    pub fn crash_and_restart_agent(&mut self) {
        self.stop_agent(Signal::SIGKILL);
        self.start_agent();
    }

    /// The running agent's output so far.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(NsDaemon::log).unwrap_or_default()
    }

    /// `warren ARGS...` in H (no `WARREN_AGENT_API`: the default API address), bounded by
    /// `timeout`.
    pub fn warren_timeout(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
        timeout: Duration,
    ) -> CliOut {
        let mut cmd = Command::new(binary("warren"));
        cmd.args(args);
        // The CLI finds the agent through agent.json in the agent's config dir, as a user's does.
        let dir = self.config_dir().display().to_string();
        let mut all: Vec<(&str, &str)> = vec![("WARREN_CONFIG_DIR", &dir)];
        all.extend_from_slice(envs);
        scrub_env(&mut cmd, all);
        let out = output_in(Some(&self.h.path()), cmd, timeout);
        CliOut::from_output(format!("warren {}", args.join(" ")), out)
    }

    /// `warren net ARGS...` in H.
    pub fn net(&self, args: &[&str]) -> CliOut {
        let mut all = vec!["net"];
        all.extend_from_slice(args);
        self.warren_timeout(&all, &[], CMD_TIMEOUT)
    }

    /// `warren net ARGS...` in H, asserting success; its stdout.
    pub fn net_ok(&self, args: &[&str]) -> String {
        self.net(args).ok().to_owned()
    }

    /// `warren net inspect NAME`, parsed.
    pub fn inspect(&self, net: &str) -> Value {
        let text = self.net_ok(&["inspect", net]);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("`warren net inspect {net}` is not JSON ({e}): {text}"));
        self.note_sandboxes(&v);
        v
    }

    /// The endpoint `name` of `net` from `inspect`; panics if missing.
    pub fn endpoint(&self, net: &str, name: &str) -> Value {
        let v = self.inspect(net);
        v["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {name:?} in network {net}: {v:#}"))
    }

    /// Attaches `ns` to `net` as `name` (`extra`: `--ip`, `--alias`...), checks the CLI's
    /// `attached N to NET: IP/PREFIX (eth0 in PATH)` line and returns the address.
    pub fn attach(&self, net: &str, ns: &Netns, name: &str, extra: &[&str]) -> Ipv4Addr {
        attach_with(|args| self.net(args), net, ns, name, extra)
    }

    /// The API of the agent: `(status, JSON body)` via curl in H. Status 0 when nothing
    /// answered; a body that is not JSON comes back as a JSON string.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.api_timeout(method, path, body, Duration::from_secs(20))
    }

    fn api_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> (u16, Value) {
        api_call(&self.h, AGENT_API, method, path, body, timeout)
    }

    /// `nft ARGS` in H.
    pub fn nft(&self, args: &[&str]) -> Output {
        self.h.exec("nft", args)
    }

    /// Links of H whose name starts with `wr`.
    pub fn wr_links(&self) -> BTreeSet<String> {
        self.h.links().into_iter().filter(|l| l.starts_with("wr")).collect()
    }

    fn note_sandboxes(&self, network: &Value) {
        let Ok(mut set) = self.sandboxes.lock() else { return };
        for ep in network["endpoints"].as_array().into_iter().flatten() {
            if ep["sandbox"] == "created"
                && let Some(name) = ep["netns"].as_str().and_then(|p| p.strip_prefix("/run/netns/"))
                && name.starts_with("wr-")
                && !name.contains('/')
            {
                set.insert(name.to_owned());
            }
        }
    }

    /// Records the sandboxes the running agent created (for cleanup).
    fn record_sandboxes(&mut self) {
        let running = self.agent.as_mut().is_some_and(|a| a.exited().is_none());
        if !running {
            return;
        }
        let (status, v) = self.api_timeout("GET", "/api/networks", None, Duration::from_secs(5));
        if status == 200 {
            for n in v["networks"].as_array().into_iter().flatten() {
                self.note_sandboxes(n);
            }
        }
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        self.record_sandboxes();
        if std::thread::panicking() {
            for (label, log) in &self.past_logs {
                eprintln!("----- {label} output -----\n{log}\n----- end of {label} -----");
            }
        }
        if let Some(agent) = self.agent.take() {
            drop(agent);
        }
        let names = self.sandboxes.lock().map(|s| s.clone()).unwrap_or_default();
        for name in names {
            if Path::new("/run/netns").join(&name).exists() {
                let out = run_here("ip", &["netns", "del", &name]);
                if !out.status.success() {
                    eprintln!(
                        "warning: ip netns del {name}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            let etc = Path::new("/etc/netns").join(&name);
            if etc.is_dir() {
                let _ = std::fs::remove_dir_all(&etc);
            }
        }
        // Then the fields drop: h and e are deleted (which also removes every link in them).
    }
}

/// `curl` in `ns` against `http://API PATH`: `(status, body)`; status 0 when nothing answered.
pub fn api_call(
    ns: &Netns,
    api: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> (u16, Value) {
    let max = timeout.as_secs().max(1).to_string();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", &max, "-X", method, "-w", "\n%{http_code}"]);
    cmd.args(["-H", &format!("Authorization: Bearer {}", crate::AGENT_API_TOKEN)]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data", &b.to_string()]);
    }
    cmd.arg(format!("http://{api}{path}"));
    let out = output_in(Some(&ns.path()), cmd, timeout + Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or(0);
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
    };
    (status, json)
}

/// `warren net attach NET --netns NS --name NAME EXTRA...` through `net_cli` (which runs
/// `warren net ARGS...` against some agent); checks the CLI's
/// `attached N to NET: IP/PREFIX (eth0 in PATH)` line and returns the address.
pub(crate) fn attach_with(
    net_cli: impl Fn(&[&str]) -> CliOut,
    net: &str,
    ns: &Netns,
    name: &str,
    extra: &[&str],
) -> Ipv4Addr {
    let path = ns.path_str();
    let mut args = vec!["attach", net, "--netns", &path, "--name", name];
    args.extend_from_slice(extra);
    let out = net_cli(&args);
    let line = out.ok().trim().to_owned();
    let prefix = format!("attached {name} to {net}: ");
    let rest = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("`{}` printed {line:?}, not {prefix:?}...", out.what));
    let (cidr, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    let ip: Ipv4Addr = cidr
        .split_once('/')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or_else(|| panic!("`{}`: no IP/PREFIX in {line:?}", out.what));
    assert!(
        tail.starts_with("(eth") && tail.ends_with(&format!(" in {path})")),
        "`{}`: expected `(ethN in {path})` in {line:?}",
        out.what
    );
    ip
}

//! `bench-soak`: the load, the backend and the cuttable proxy of `bench/soak`.
//!
//! - `bench-soak serve` is the backend. It prints `http N` and `echo N` (its two ports). The
//!   HTTP port answers every request with `200 ok` and `Connection: close`; the echo port reads
//!   one line, writes it back and closes. The backend closes first on both, so the TIME_WAIT
//!   sockets of a connection every millisecond pile up on listening sockets, not on ephemeral
//!   ports.
//! - `bench-soak load --target NAME=tcp:IP:PORT --target NAME=http:IP:PORT:HOST ...` opens a new
//!   connection every `--interval-us` (1 ms: 1,000 a second), to the targets in turn. A `tcp`
//!   connection sends a line and expects it back, then the close; an `http` one sends
//!   `GET / HTTP/1.1` with that `Host` and `Connection: close` and expects a `200` and the
//!   close. At most `--max-in-flight` connections are open at once; a tick that finds them all
//!   busy opens none and is counted as `skipped`. Every `--report-ms` it prints one JSON line:
//!   `{"t":12.0,"in_flight":3,"skipped":0,"targets":{"NAME":{"ok":250,"err":0,"error":null}}}`
//!   (counts since the last line; `error` is the first error of that interval). It runs until
//!   it is killed.
//! - `bench-soak proxy --upstream IP:PORT` relays TCP connections to the upstream (an agent's
//!   session to the relay's control port). It prints `port N`; each `cut` line on its standard
//!   input closes every connection it carries (the agent sees its session drop and reconnects)
//!   and prints `cut N` with how many it closed. It exits when its standard input ends.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, timeout};

/// The load, backend and proxy of the soak run (`bench/soak`).
#[derive(Debug, Parser)]
enum Command {
    /// The backend: an HTTP port (200, then close) and an echo port (one line, then close).
    Serve {
        /// Address to listen on (both ports are picked by the system).
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
    },
    /// The visitors: a new connection every interval, to the targets in turn.
    Load {
        /// `NAME=tcp:IP:PORT` (echo a line) or `NAME=http:IP:PORT:HOST` (GET / with that
        /// Host); repeatable, used in turn.
        #[arg(long = "target", required = true)]
        targets: Vec<Target>,
        /// Time between two new connections, in microseconds (1000: 1,000 connections a
        /// second, over all targets).
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        /// Most connections open at once; a tick that finds them all busy is skipped.
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
        /// Deadline for a whole connection (connect, request, answer, close), in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// How often to print the counts, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        report_ms: u64,
    },
    /// A TCP proxy whose connections are closed by a `cut` line on standard input.
    Proxy {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where to relay each connection.
        #[arg(long)]
        upstream: SocketAddr,
    },
}

/// One load target.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    /// The `Host` of an HTTP target; `None` for an echo target.
    host: Option<String>,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?}: expected NAME=tcp:IP:PORT or NAME=http:IP:PORT:HOST");
        let (name, rest) = s.split_once('=').ok_or_else(usage)?;
        let (kind, rest) = rest.split_once(':').ok_or_else(usage)?;
        let (addr, host) = match kind {
            "tcp" => (rest, None),
            "http" => {
                let (addr, host) = rest.rsplit_once(':').ok_or_else(usage)?;
                (addr, Some(host.to_owned()))
            }
            _ => return Err(usage()),
        };
        let addr = addr.parse().map_err(|e| format!("{}: {e}", usage()))?;
        if name.is_empty() || name.contains(['"', '\\']) {
            return Err(usage());
        }
        Ok(Self { name: name.to_owned(), addr, host })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    warren_bench::finish("bench-soak", run(Command::parse()).await)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { ip } => serve(ip).await,
        Command::Load { targets, interval_us, max_in_flight, timeout_ms, report_ms } => {
            if interval_us == 0 || report_ms == 0 {
                bail!("--interval-us and --report-ms must be at least 1");
            }
            let pace = Pace {
                interval: Duration::from_micros(interval_us),
                max_in_flight: max_in_flight.max(1),
                timeout: Duration::from_millis(timeout_ms),
                report: Duration::from_millis(report_ms),
            };
            load(targets, pace).await
        }
        Command::Proxy { listen, upstream } => proxy(listen, upstream).await,
    }
}

// ----------------------------------------------------------------------------- serve

/// Largest request head or echo line read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long the backend waits for a request before it closes the connection.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(ip: std::net::IpAddr) -> anyhow::Result<()> {
    let http = TcpListener::bind((ip, 0)).await.with_context(|| format!("bind {ip}:0"))?;
    let echo = TcpListener::bind((ip, 0)).await.with_context(|| format!("bind {ip}:0"))?;
    println!("http {}", http.local_addr()?.port());
    println!("echo {}", echo.local_addr()?.port());
    let mut conns = JoinSet::new();
    loop {
        let (stream, is_http) = tokio::select! {
            r = http.accept() => (r, true),
            r = echo.accept() => (r, false),
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match stream {
            Ok((s, _)) => {
                conns.spawn(async move {
                    let _ = timeout(SERVE_TIMEOUT, answer(s, is_http)).await;
                });
            }
            Err(e) => warren_bench::accept_failed(&e).await,
        }
    }
}

/// Reads a request head (HTTP) or a line (echo), answers, and closes first.
async fn answer(mut s: TcpStream, is_http: bool) -> std::io::Result<()> {
    let end: &[u8] = if is_http { b"\r\n\r\n" } else { b"\n" };
    let got = read_until(&mut s, end).await?;
    if is_http {
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            .await?;
    } else {
        s.write_all(&got).await?;
    }
    s.shutdown().await
}

/// Reads until `end` has arrived (bounded by [`MAX_REQUEST`]); returns what was read.
async fn read_until(s: &mut (impl AsyncRead + Unpin), end: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while !buf.windows(end.len()).any(|w| w == end) {
        if buf.len() > MAX_REQUEST {
            return Err(std::io::Error::other("request too long"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

// ----------------------------------------------------------------------------- load

/// How fast and how much the load opens.
#[derive(Debug, Clone, Copy)]
struct Pace {
    interval: Duration,
    max_in_flight: usize,
    timeout: Duration,
    report: Duration,
}

/// One target's counts since the last report.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    err: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn load(targets: Vec<Target>, pace: Pace) -> anyhow::Result<()> {
    let counts: Arc<Vec<Counts>> = Arc::new(targets.iter().map(|_| Counts::default()).collect());
    let targets = Arc::new(targets);
    let slots = Arc::new(Semaphore::new(pace.max_in_flight));
    let started = Instant::now();
    let mut tick = tokio::time::interval(pace.interval);
    // A late tick is lost, not made up in a burst: the rate printed is the rate achieved.
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut report = tokio::time::interval(pace.report);
    report.tick().await;
    let mut conns = JoinSet::new();
    let mut skipped = 0u64;
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    skipped += 1;
                    continue;
                };
                let i = next;
                next = (next + 1) % targets.len();
                let (targets, counts) = (targets.clone(), counts.clone());
                conns.spawn(async move {
                    let t = &targets[i];
                    let r = match timeout(pace.timeout, visit(t)).await {
                        Ok(r) => r,
                        Err(_) => Err(anyhow::anyhow!("no complete answer within {:?}", pace.timeout)),
                    };
                    let c = &counts[i];
                    match r {
                        Ok(()) => c.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            lock(&c.first_error).get_or_insert_with(|| format!("{e:#}"));
                            c.err.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    drop(slot);
                });
            }
            _ = report.tick() => {
                let in_flight = pace.max_in_flight - slots.available_permits();
                println!("{}", report_line(started.elapsed(), in_flight, skipped, &targets, &counts));
                skipped = 0;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One visitor connection: connect, ask, check the answer, see the close.
async fn visit(t: &Target) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(t.addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let mut answer = Vec::with_capacity(256);
    match &t.host {
        Some(host) => {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.context("write")?;
            (&mut s).take(MAX_REQUEST as u64).read_to_end(&mut answer).await.context("read")?;
            let status = answer.split(|b| *b == b'\n').next().unwrap_or_default();
            let status = String::from_utf8_lossy(status);
            if status.split_whitespace().nth(1) != Some("200") {
                bail!("answered {:?}", status.trim_end());
            }
        }
        None => {
            const LINE: &[u8] = b"warren soak echo\n";
            s.write_all(LINE).await.context("write")?;
            (&mut s).take(MAX_REQUEST as u64).read_to_end(&mut answer).await.context("read")?;
            if answer != LINE {
                bail!("echoed {} bytes instead of the {}-byte line", answer.len(), LINE.len());
            }
        }
    }
    Ok(())
}

/// The JSON report line; the counts are taken (reset to zero).
fn report_line(
    elapsed: Duration,
    in_flight: usize,
    skipped: u64,
    targets: &[Target],
    counts: &[Counts],
) -> String {
    let mut out = format!(
        "{{\"t\":{:.3},\"in_flight\":{in_flight},\"skipped\":{skipped},\"targets\":{{",
        elapsed.as_secs_f64()
    );
    for (i, (t, c)) in targets.iter().zip(counts).enumerate() {
        let error = match lock(&c.first_error).take() {
            Some(e) => format!("\"{}\"", json_escape(&e)),
            None => "null".to_owned(),
        };
        let _ = write!(
            out,
            "{}\"{}\":{{\"ok\":{},\"err\":{},\"error\":{error}}}",
            if i > 0 { "," } else { "" },
            t.name,
            c.ok.swap(0, Ordering::Relaxed),
            c.err.swap(0, Ordering::Relaxed),
        );
    }
    out.push_str("}}");
    out
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

// ----------------------------------------------------------------------------- proxy

async fn proxy(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    println!("port {}", listener.local_addr()?.port());
    let mut lines = stdin_lines();
    let mut pairs = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    pairs.spawn(async move {
                        if let Err(e) = relay_pair(s, upstream).await {
                            eprintln!("proxied connection: {e:#}");
                        }
                    });
                }
                Err(e) => warren_bench::accept_failed(&e).await,
            },
            line = lines.recv() => match line {
                Some(l) if l.trim() == "cut" => {
                    let n = pairs.len();
                    // Aborting drops both sockets: the agent's session ends at once.
                    pairs.shutdown().await;
                    println!("cut {n}");
                }
                Some(l) if l.trim().is_empty() => {}
                Some(l) => eprintln!("unknown command {:?} (only `cut`)", l.trim()),
                None => return Ok(()),
            },
            Some(_) = pairs.join_next(), if !pairs.is_empty() => {}
        }
    }
}

/// The lines of standard input, read on a thread of their own; the channel closes at its end.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Copies both ways between a proxied connection and a new one to the upstream.
async fn relay_pair(mut down: TcpStream, upstream: SocketAddr) -> anyhow::Result<()> {
    let mut up =
        TcpStream::connect(upstream).await.with_context(|| format!("connect {upstream}"))?;
    for s in [&down, &up] {
        s.set_nodelay(true)?;
    }
    tokio::io::copy_bidirectional(&mut down, &mut up).await?;
    Ok(())
}

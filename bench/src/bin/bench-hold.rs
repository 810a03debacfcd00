//! `bench-hold`: many idle connections held open through a tunnel, each proven to reach the
//! backend, so the memory they cost on the relay and the agent can be read.
//!
//! - `bench-hold serve --listen 127.0.0.1:0` is the backend. It prints `port N` once bound,
//!   then echoes every byte it receives on every connection, and prints
//!   `open N accepted M` whenever either count changed (at most every 100 ms).
//! - `bench-hold hold --addr ADDR --count 1000` opens `--count` connections (at most
//!   `--parallel` in flight at once), writes one byte on each and waits for that byte to come
//!   back, so every connection is known to have reached the backend. When all have echoed it
//!   prints `held N` and keeps them open until its standard input closes or it gets SIGTERM or
//!   SIGINT, then closes them and exits 0. If any connection fails, or the whole opening takes
//!   longer than `--deadline-secs`, it says which and why on stderr and exits 1.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Hold many idle, echo-verified connections open through a tunnel.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The backend: counts connections and echoes.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// The visitor: opens COUNT connections, verifies an echo on each, then holds them.
    Hold {
        /// Where to connect (a TCP tunnel's public port, or the backend itself).
        #[arg(long)]
        addr: SocketAddr,
        /// How many connections.
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// How many connections may be opening at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// Deadline for opening and verifying all of them, in seconds.
        #[arg(long, default_value_t = 120)]
        deadline_secs: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    warren_bench::finish("bench-hold", run(Cli::parse().command).await)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { listen } => serve(listen).await,
        Command::Hold { addr, count, parallel, deadline_secs } => {
            let deadline = Duration::from_secs(deadline_secs);
            let conns =
                timeout(deadline, open_all(addr, count, parallel)).await.with_context(|| {
                    format!("not all {count} connections echoed within {deadline:?}")
                })??;
            println!("held {}", conns.len());
            wait_for_release().await?;
            drop(conns);
            Ok(())
        }
    }
}

/// Accepts forever, echoing on each connection and reporting the counts.
async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    println!("port {}", listener.local_addr()?.port());
    let open = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    tokio::spawn(report(open.clone(), accepted.clone()));
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warren_bench::accept_failed(&e).await;
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Prints `open N accepted M` whenever a count changed, at most every 100 ms.
async fn report(open: Arc<AtomicU64>, accepted: Arc<AtomicU64>) {
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = (open.load(Ordering::Relaxed), accepted.load(Ordering::Relaxed));
        if last != Some(now) {
            println!("open {} accepted {}", now.0, now.1);
            last = Some(now);
        }
    }
}

/// Opens `count` connections, `parallel` at a time, each verified by a one-byte echo.
async fn open_all(addr: SocketAddr, count: u32, parallel: usize) -> anyhow::Result<Vec<TcpStream>> {
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let r = open_one(addr, i).await.with_context(|| format!("connection {i} to {addr}"));
            drop(permit);
            r
        });
    }
    let mut conns = Vec::with_capacity(count as usize);
    while let Some(r) = tasks.join_next().await {
        conns.push(r??);
    }
    Ok(conns)
}

/// One connection: connect, write one byte, read it back.
async fn open_one(addr: SocketAddr, i: u32) -> anyhow::Result<TcpStream> {
    const STEP: Duration = Duration::from_secs(10);
    let mut s = timeout(STEP, TcpStream::connect(addr)).await.context("connect timed out")??;
    let byte = i.to_le_bytes()[0];
    s.write_all(&[byte]).await.context("write")?;
    let mut back = [0u8; 1];
    match timeout(STEP, s.read(&mut back)).await.context("no echo within 10 s")? {
        Ok(1) if back[0] == byte => Ok(s),
        Ok(0) => bail!("closed without an echo: it did not reach the backend"),
        Ok(_) => bail!("echoed {:#04x} instead of {byte:#04x}", back[0]),
        Err(e) => Err(e).context("read the echo"),
    }
}

/// Returns when standard input reaches its end (or fails), or on SIGTERM or SIGINT.
async fn wait_for_release() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Blocking stdin on its own thread; the runtime ends without waiting for it.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = tx.send(());
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = rx => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

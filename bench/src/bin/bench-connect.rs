//! `bench-connect`: the connection setup rate of one path.
//!
//! Opens `--count` TCP connections to `--addr`, strictly one after the other. On each it sends
//! `GET PATH HTTP/1.1` with `Host: HOST` and `Connection: close`, reads the whole response (the
//! head, then `Content-Length` bytes of body), checks that the status is 200, and closes. Every
//! step has a deadline (`--timeout-ms`), so a stuck connection counts as an error instead of
//! hanging the run.
//!
//! Prints one JSON line on stdout:
//! `{"count":2000,"ok":2000,"errors":0,"seconds":1.23,"conns_per_sec":1626.0,"first_error":null}`
//! where `conns_per_sec` is `ok / seconds`. Exits 0 even when some connections failed (the
//! caller reads `errors`), and non-zero only on bad arguments.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

/// Sequential connect + GET + read the full response + close, reported as connections/second.
#[derive(Debug, Parser)]
struct Args {
    /// Where to connect: the service itself, a TCP tunnel's public port, or the relay's HTTP
    /// listener.
    #[arg(long)]
    addr: SocketAddr,
    /// The `Host` header (the relay routes HTTP tunnels by it).
    #[arg(long, default_value = "localhost")]
    host: String,
    /// The request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// How many connections, one after the other.
    #[arg(long, default_value_t = 2000)]
    count: u32,
    /// Deadline for each connect, write and read, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

fn main() {
    let args = Args::parse();
    let request =
        format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", args.path, args.host);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut ok = 0u32;
    let mut errors = 0u32;
    let mut first_error: Option<String> = None;
    let start = Instant::now();
    for i in 0..args.count {
        match exchange(args.addr, request.as_bytes(), timeout) {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("connection {i}: {e:#}"));
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 { f64::from(ok) / seconds } else { 0.0 };
    let first_error = match first_error {
        Some(e) => format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\"")),
        None => "null".to_owned(),
    };
    println!(
        "{{\"count\":{},\"ok\":{ok},\"errors\":{errors},\"seconds\":{seconds:.6},\
         \"conns_per_sec\":{rate:.3},\"first_error\":{first_error}}}",
        args.count
    );
}

/// One connection: connect, send the request, read the full response, check it, close.
fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request).context("write")?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        let n = s.read(&mut chunk).context("read head")?;
        if n == 0 {
            bail!("closed after {} bytes, before the end of the response head", buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_len]).context("response head is not UTF-8")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("status line {status:?}");
    }
    let body_len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .context("no Content-Length in the response")?
        .1
        .trim()
        .parse()
        .context("bad Content-Length")?;
    let mut have = buf.len() - head_len;
    while have < body_len {
        let n = s.read(&mut chunk).context("read body")?;
        if n == 0 {
            bail!("closed after {have} of {body_len} body bytes");
        }
        have += n;
    }
    Ok(())
}

//! A TCP backend that expects a PROXY protocol header (v1 text or v2 binary) and reports what
//! it carried, so tests can check what the relay told the backend about the visitor.
//!
//! The parser here is deliberately independent of `warren_proto`: it is written from the
//! HAProxy specification (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>) so a
//! bug shared by warren's encoder and decoder cannot hide. It accepts only what a tunnel
//! should send for a real visitor: `PROXY TCP4`/`TCP6` lines and v2 `PROXY` commands over
//! TCP/IPv4 or TCP/IPv6 (TLVs are skipped). `UNKNOWN`, `LOCAL` and other families carry no
//! visitor address and count as no header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::util::IO_TIMEOUT;

/// What one PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxySeen {
    /// 1 (text) or 2 (binary).
    pub version: u8,
    /// The visitor's address.
    pub source: SocketAddr,
    /// The address the visitor connected to.
    pub destination: SocketAddr,
}

/// What a connection without a valid PROXY header is told before it is closed.
pub const NO_HEADER_ANSWER: &str = "no proxy header\n";

/// A TCP server on 127.0.0.1 that reads a PROXY header from each connection, records it, writes
/// `from SOURCE\n` and then echoes every further byte (including bytes that arrived with the
/// header). A connection whose first bytes are not a valid header (or that does not finish
/// one within [`IO_TIMEOUT`]) gets [`NO_HEADER_ANSWER`] and is closed. Stops on drop.
#[derive(Debug)]
pub struct ProxyBackend {
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<ProxySeen>>>,
    rejected: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl ProxyBackend {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind proxy backend")?;
        let addr = listener.local_addr().context("proxy backend addr")?;
        let headers = Arc::new(Mutex::new(Vec::new()));
        let rejected = Arc::new(AtomicU64::new(0));
        let (log, refused) = (headers.clone(), rejected.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        conns.spawn(serve(stream, log.clone(), refused.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, headers, rejected, _task: AbortOnDropHandle::new(task) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port, as given to the agent.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The headers received so far, in order of arrival.
    pub fn headers(&self) -> Vec<ProxySeen> {
        self.headers.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Connections closed for lack of a valid header so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<ProxySeen>>>, rejected: Arc<AtomicU64>) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(256);
    let header = loop {
        match parse_header(&buf) {
            Parsed::Header(seen, len) => break Some((seen, len)),
            Parsed::Invalid => break None,
            Parsed::Incomplete => {}
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break None,
        }
    };
    let Some((seen, len)) = header else {
        rejected.fetch_add(1, Ordering::Relaxed);
        let _ = stream.write_all(NO_HEADER_ANSWER.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    };
    if let Ok(mut log) = log.lock() {
        log.push(seen);
    }
    let greeting = format!("from {}\n", seen.source);
    if stream.write_all(greeting.as_bytes()).await.is_err()
        || stream.write_all(&buf[len..]).await.is_err()
    {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// The outcome of parsing the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A valid header and its length in bytes.
    Header(ProxySeen, usize),
    /// Could still become a valid header.
    Incomplete,
    /// Not a (supported) header.
    Invalid,
}

const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included.
const V1_MAX: usize = 107;
const V2_SIGNATURE: [u8; 12] =
    [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];

fn parse_header(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'P') => parse_v1(buf),
        Some(0x0d) => parse_v2(buf),
        Some(_) => Parsed::Invalid,
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Parsed::Invalid;
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Parsed::Invalid } else { Parsed::Incomplete };
    };
    let Ok(line) = std::str::from_utf8(&buf[..end]) else { return Parsed::Invalid };
    let parts: Vec<&str> = line.split(' ').collect();
    let [_, proto, src, dst, sport, dport] = parts[..] else { return Parsed::Invalid };
    let (Some(sport), Some(dport)) = (v1_port(sport), v1_port(dport)) else {
        return Parsed::Invalid;
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => match (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) {
            (Ok(s), Ok(d)) => (s.into(), d.into()),
            _ => return Parsed::Invalid,
        },
        "TCP6" => match (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) {
            (Ok(s), Ok(d)) => (s.into(), d.into()),
            _ => return Parsed::Invalid,
        },
        _ => return Parsed::Invalid,
    };
    let seen = ProxySeen {
        version: 1,
        source: SocketAddr::new(src, sport),
        destination: SocketAddr::new(dst, dport),
    };
    Parsed::Header(seen, end + 2)
}

/// A v1 port: 1-5 decimal digits, no leading zero (except `0` itself), at most 65535.
fn v1_port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parsed::Invalid;
    }
    let Some(fixed) = buf.get(12..16) else { return Parsed::Incomplete };
    let (version, command) = (fixed[0] >> 4, fixed[0] & 0x0f);
    if version != 2 || command != 1 {
        return Parsed::Invalid; // LOCAL (0) carries no visitor; others are undefined
    }
    let needed = match fixed[1] {
        0x11 => 12, // TCP over IPv4
        0x21 => 36, // TCP over IPv6
        _ => return Parsed::Invalid,
    };
    let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if len < needed {
        return Parsed::Invalid;
    }
    let Some(block) = buf.get(16..16 + len) else { return Parsed::Incomplete };
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let (src, dst, ports_at): (IpAddr, IpAddr, usize) = if needed == 12 {
        let s: [u8; 4] = [block[0], block[1], block[2], block[3]];
        let d: [u8; 4] = [block[4], block[5], block[6], block[7]];
        (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into(), 8)
    } else {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&block[..16]);
        d.copy_from_slice(&block[16..32]);
        (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), 32)
    };
    let seen = ProxySeen {
        version: 2,
        source: SocketAddr::new(src, port(ports_at)),
        destination: SocketAddr::new(dst, port(ports_at + 2)),
    };
    Parsed::Header(seen, 16 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(tlvs);
        h
    }

    fn v2_tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h
    }

    /// Sends `bytes`, half-closes, and reads everything the backend answers.
    async fn exchange(backend: &ProxyBackend, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(backend.addr()).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn parses_v1() {
        let line = b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 8080\r\nrest";
        let seen = ProxySeen {
            version: 1,
            source: "198.51.100.7:51234".parse().unwrap(),
            destination: "127.0.0.1:8080".parse().unwrap(),
        };
        assert_eq!(parse_header(line), Parsed::Header(seen, line.len() - 4));
        for cut in 0..line.len() - 4 {
            assert_eq!(parse_header(&line[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let v6 = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
        let Parsed::Header(seen, len) = parse_header(v6) else { panic!("v6 refused") };
        assert_eq!(len, v6.len());
        assert_eq!(seen.source, "[2001:db8::1]:65535".parse().unwrap());
        assert_eq!(seen.destination, "[::1]:0".parse().unwrap());

        for bad in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert_eq!(parse_header(bad), Parsed::Invalid, "{:?}", String::from_utf8_lossy(bad));
        }
        // A bare LF does not end the line: more bytes may still bring the CRLF.
        assert_eq!(parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), Parsed::Incomplete);
        assert_eq!(
            parse_header(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat()),
            Parsed::Invalid
        );
    }

    #[test]
    fn parses_v2() {
        let h = v2_tcp4([203, 0, 113, 9], [127, 0, 0, 1], 40000, 443, &[0x04, 0, 1, 0]);
        let Parsed::Header(seen, len) = parse_header(&h) else { panic!("v2 refused") };
        assert_eq!(len, h.len(), "TLVs are part of the header");
        assert_eq!(seen.version, 2);
        assert_eq!(seen.source, "203.0.113.9:40000".parse().unwrap());
        assert_eq!(seen.destination, "127.0.0.1:443".parse().unwrap());
        for cut in 0..h.len() {
            assert_eq!(parse_header(&h[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let h6 = v2_tcp6("2001:db8::5".parse().unwrap(), Ipv6Addr::LOCALHOST, 1, 2);
        let Parsed::Header(seen, _) = parse_header(&h6) else { panic!("v6 refused") };
        assert_eq!(seen.source, "[2001:db8::5]:1".parse().unwrap());

        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(parse_header(&local), Parsed::Invalid);
        let mut v1 = h.clone();
        v1[12] = 0x11;
        assert_eq!(parse_header(&v1), Parsed::Invalid);
        let mut udp = h.clone();
        udp[13] = 0x12;
        assert_eq!(parse_header(&udp), Parsed::Invalid);
        let mut short = h.clone();
        short[15] = 11;
        assert_eq!(parse_header(&short), Parsed::Invalid);
        let mut sig = h;
        sig[11] = 0x0b;
        assert_eq!(parse_header(&sig), Parsed::Invalid);
    }

    #[tokio::test]
    async fn backend_records_and_echoes() {
        let backend = ProxyBackend::start().await.unwrap();
        let out =
            exchange(&backend, b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 8080\r\nhello").await;
        assert_eq!(out, "from 198.51.100.7:51234\nhello");

        let mut v2 = v2_tcp4([203, 0, 113, 9], [127, 0, 0, 1], 40000, 443, &[]);
        v2.extend_from_slice(b"binary");
        let out = exchange(&backend, &v2).await;
        assert_eq!(out, "from 203.0.113.9:40000\nbinary");

        let h6 = v2_tcp6("2001:db8::5".parse().unwrap(), Ipv6Addr::LOCALHOST, 7, 9);
        assert_eq!(exchange(&backend, &h6).await, "from [2001:db8::5]:7\n");

        assert_eq!(exchange(&backend, b"hello\n").await, NO_HEADER_ANSWER);
        assert_eq!(exchange(&backend, b"PROXY TCP4 1.2").await, NO_HEADER_ANSWER, "EOF mid-header");
        assert_eq!(backend.rejected(), 2);

        let seen = backend.headers();
        assert_eq!(seen.len(), 3);
        assert_eq!((seen[0].version, seen[1].version, seen[2].version), (1, 2, 2));
        assert_eq!(seen[0].destination, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(seen[1].destination, "127.0.0.1:443".parse().unwrap());
    }

    #[tokio::test]
    async fn header_split_across_writes_then_ping_pong() {
        let backend = ProxyBackend::start().await.unwrap();
        let mut s = TcpStream::connect(backend.addr()).await.unwrap();
        let line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n";
        s.write_all(&line[..9]).await.unwrap();
        tokio::task::yield_now().await;
        s.write_all(&line[9..]).await.unwrap();
        let mut greeting = [0u8; 19];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"from 10.0.0.1:1000\n");
        for msg in [&b"ping"[..], b"pong"] {
            s.write_all(msg).await.unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, msg);
        }
    }
}

//! Protection of the public listeners, and who a visitor really is.
//!
//! - [`EdgeConfig`]: limits and timeouts every public listener applies.
//! - [`ConnLimiter`]: concurrent connections per visitor address.
//! - [`read_proxy_header`]: the PROXY header a trusted load balancer puts in front of a
//!   connection, giving the visitor's real address.
//! - [`Prefixed`]: a stream with bytes already read put back in front.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use warren_proto::Cidr;
use warren_proto::proxy::{self, Parsed};

/// Limits and timeouts of the public listeners.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Peers whose PROXY headers and `X-Forwarded-For` are believed.
    pub trust_proxy: Vec<Cidr>,
    /// How long a visitor may take to send a request head, a TLS ClientHello or a PROXY header.
    pub header_timeout: Duration,
    /// Largest request head accepted (bytes).
    pub max_header_bytes: usize,
    /// HTTP(S) visitor connections with no traffic for this long are closed.
    pub idle_timeout: Duration,
    /// Concurrent connections from one visitor address, over every listener (0: no limit).
    pub max_conns_per_ip: usize,
    /// Concurrent data streams to one agent session (0: no limit).
    pub max_streams_per_agent: usize,
    /// A UDP flow with no packet either way for this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Log every HTTP request and every TCP or TLS connection, with the visitor's address.
    pub access_log: bool,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            trust_proxy: Vec::new(),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_conns_per_ip: 1024,
            max_streams_per_agent: 8192,
            udp_idle_timeout: Duration::from_secs(60),
            access_log: false,
        }
    }
}

impl EdgeConfig {
    /// Whether `ip` is a trusted proxy.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        self.trust_proxy.iter().any(|c| c.contains(ip))
    }

    /// The visitor behind an `X-Forwarded-For` chain that reached us from `peer`: the rightmost
    /// address not a trusted proxy. Without a trusted peer the chain is not believed.
    pub fn client_ip(&self, peer: IpAddr, xff: Option<&str>) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let Some(xff) = xff else { return peer };
        let mut last = peer;
        for hop in xff.rsplit(',') {
            let Some(ip) = parse_hop(hop) else { return last };
            if !self.trusted(ip) {
                return ip;
            }
            last = ip;
        }
        last
    }
}

fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[').and_then(|s| s.split(']').next()?.parse().ok()))
}

/// What every public listener shares: the limits and the per-address connection counts.
#[derive(Debug)]
pub struct Edge {
    /// Limits and timeouts.
    pub config: EdgeConfig,
    /// Open connections per visitor address.
    pub conns: Arc<ConnLimiter>,
}

impl Edge {
    /// The shared edge state for `config`.
    pub fn new(config: EdgeConfig) -> Arc<Self> {
        let conns = ConnLimiter::new(config.max_conns_per_ip);
        Arc::new(Self { config, conns })
    }
}

/// Counts open connections per visitor address.
#[derive(Debug, Default)]
pub struct ConnLimiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; the count drops with it.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    /// A limiter allowing `max` connections per address (0: no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: Mutex::default() })
    }

    /// Counts a new connection from `ip`, or `None` when that address is at its limit.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnGuard { limiter: self.clone(), ip })
    }

    /// Connections from `ip` counted now.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).copied().unwrap_or(0)
    }

    /// The counts; a panic elsewhere while they were held leaves them usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limiter.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Why a connection's start could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// The peer sent nothing usable in time.
    #[error("timed out")]
    Timeout,
    /// The peer closed or the read failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A malformed PROXY header.
    #[error("bad PROXY header: {0}")]
    Proxy(#[from] proxy::ProxyError),
}

/// Reads a PROXY header (v1 or v2) from the front of a connection from a trusted proxy. Returns
/// the visitor's address (the peer's when the header has none, as with `LOCAL`) and the bytes
/// read past the header, which belong to the visitor's stream. A connection without a PROXY
/// header keeps the peer's address and all its bytes.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, Bytes), SniffError> {
    let mut buf = Vec::with_capacity(256);
    tokio::time::timeout(timeout, async {
        loop {
            match proxy::parse(&buf)? {
                Parsed::Incomplete => {}
                Parsed::Absent => return Ok((peer, Bytes::from(buf))),
                Parsed::Header { source, len, .. } => {
                    let rest = Bytes::from(buf).slice(len..);
                    return Ok((source.unwrap_or(peer), rest));
                }
            }
            if buf.len() >= 16 + proxy::MAX_V2_LEN {
                return Err(io::Error::other("PROXY header too long").into());
            }
            let n = io.read_buf(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    })
    .await
    .map_err(|_| SniffError::Timeout)?
}

pin_project_lite::pin_project! {
    /// A stream whose first bytes were already read: they are returned first.
    #[derive(Debug)]
    pub struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project_lite::pin_project! {
    /// A stream that fails with `TimedOut` once neither direction has moved a byte for the idle
    /// time.
    #[derive(Debug)]
    pub struct IdleTimeout<S> {
        #[pin]
        inner: S,
        sleep: Pin<Box<tokio::time::Sleep>>,
        idle: Duration,
    }
}

impl<S> IdleTimeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, idle: Duration) -> Self {
        Self { inner, sleep: Box::pin(tokio::time::sleep(idle)), idle }
    }
}

impl<S> IdleTimeout<S> {
    fn poll_idle(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Error> {
        let this = self.project();
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
            Poll::Pending => Poll::Pending,
        }
    }

    fn touch(self: Pin<&mut Self>) {
        let this = self.project();
        let deadline = tokio::time::Instant::now() + *this.idle;
        this.sleep.as_mut().reset(deadline);
    }
}

use std::future::Future;

impl<S: AsyncRead> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match self.as_mut().project().inner.poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.as_mut().project().inner.poll_write(cx, b) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.as_mut().project().inner.poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(trusted: &[&str]) -> EdgeConfig {
        EdgeConfig {
            trust_proxy: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            ..EdgeConfig::default()
        }
    }

    #[test]
    fn client_ip_from_forwarded_for() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let e = edge(&["10.0.0.0/8"]);
        // An untrusted peer's header is ignored.
        assert_eq!(e.client_ip(ip("203.0.113.5"), Some("1.2.3.4")), ip("203.0.113.5"));
        // A trusted peer: the rightmost untrusted hop.
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("1.2.3.4, 198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("1.2.3.4, 10.0.0.9")), ip("1.2.3.4"));
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("10.0.0.3")), ip("10.0.0.3"));
        assert_eq!(e.client_ip(ip("10.0.0.1"), None), ip("10.0.0.1"));
        // Garbage stops the walk at the last good hop.
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("1.2.3.4, junk")), ip("10.0.0.1"));
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("[2001:db8::1]:443")), ip("2001:db8::1"));
        assert_eq!(e.client_ip(ip("10.0.0.1"), Some("192.0.2.1:8080")), ip("192.0.2.1"));
    }

    #[test]
    fn conn_limits() {
        let l = ConnLimiter::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = l.enter(ip).unwrap();
        let _b = l.enter(ip).unwrap();
        assert!(l.enter(ip).is_none());
        assert!(l.enter("127.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(l.enter(ip).is_some());
        let unlimited = ConnLimiter::new(0);
        let held: Vec<_> = (0..5000).map(|_| unlimited.enter(ip).unwrap()).collect();
        assert_eq!(held.len(), 5000);
    }

    #[tokio::test]
    async fn proxy_header_is_taken_off_the_stream() {
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let mut input: &[u8] = b"PROXY TCP4 198.51.100.7 10.0.0.2 40000 443\r\nGET / HTTP/1.1\r\n";
        let (who, rest) =
            read_proxy_header(&mut input, peer, Duration::from_secs(1)).await.unwrap();
        assert_eq!(who, "198.51.100.7:40000".parse().unwrap());
        let mut all = rest.to_vec();
        all.extend_from_slice(input);
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
        let mut plain: &[u8] = b"GET / HTTP/1.1\r\n";
        let (who, rest) =
            read_proxy_header(&mut plain, peer, Duration::from_secs(1)).await.unwrap();
        assert_eq!(who, peer);
        assert!(rest.starts_with(b"GET"));
        let mut bad: &[u8] = b"PROXY TCP4 nonsense\r\n";
        assert!(read_proxy_header(&mut bad, peer, Duration::from_secs(1)).await.is_err());
    }
}

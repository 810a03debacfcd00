//! Public listeners: HTTP routed by `Host`, HTTPS routed by SNI (terminated here, or passed
//! through to the agent for TLS tunnels), and one TCP listener per TCP tunnel.
//!
//! Visitors speak HTTP/1.1 or HTTP/2 (over TLS by ALPN, or h2c with prior knowledge on the HTTP
//! listener). Each visitor connection keeps its own upstream connections to the agent: HTTP/1.1
//! over one data stream each, or, for tunnels whose target speaks h2c, one HTTP/2 connection that
//! carries all of that visitor's requests. A tunnel's policy (allow/deny, rate limit, basic auth,
//! header edits, body limit, HTTPS only) is enforced here, before anything crosses the tunnel.
//! A request is routed by the host its target names (see [`crate::hop`]: two `Host` headers, or
//! a `Host` other than the target's, are refused), and its hop-by-hop headers, and the
//! response's, stay on this side.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, info};
use warren_proto::{AcceptReader, Protocol, StreamHeader};
use warren_transport::Stream;

use crate::edge::{ConnGuard, Edge, IdleTimeout, Prefixed, read_proxy_header};
use crate::hop::{self, Keep};
use crate::policy::Admit;
use crate::router::{Live, Route, Router, TunnelStats};

type Body = Either<Incoming, Full<Bytes>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = BoxBody<Bytes, BoxError>;

/// Opens a data stream to the agent for one visitor connection and writes its header. The
/// stream counts against the agent's and the token's stream limits and into the tunnel's
/// traffic counters for as long as it lives.
pub async fn open_data_stream(
    live: &Live,
    visitor: SocketAddr,
    protocol: Protocol,
) -> std::io::Result<DataStream> {
    let permit = live.streams.clone().try_acquire_owned().map_err(|_| {
        std::io::Error::other(
            "the agent has as many open streams as the relay allows (--max-streams-per-agent)",
        )
    })?;
    let token_permit = match &live.token_streams {
        Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
            std::io::Error::other("the tunnel's token has as many open connections as it may")
        })?),
        None => None,
    };
    let mut stream = live.session.open().await?;
    let mut header = Vec::with_capacity(32);
    StreamHeader { tunnel: live.tunnel, visitor, protocol }.encode(&mut header);
    stream.write_all(&header).await?;
    live.stats.open.fetch_add(1, Ordering::Relaxed);
    live.stats.total.fetch_add(1, Ordering::Relaxed);
    Ok(DataStream {
        inner: stream,
        accept: AcceptReader::new(),
        stats: live.stats.clone(),
        _permits: (permit, token_permit),
    })
}

/// A data stream to an agent that counts the bytes it carries into its tunnel's counters and
/// holds the stream-limit permits it was opened with. Reading takes the agent's `StreamAccept`
/// off the front: what the caller reads is the target's bytes only. The relay writes the
/// visitor's bytes without waiting for it.
#[derive(Debug)]
pub struct DataStream {
    inner: Stream,
    accept: AcceptReader,
    stats: Arc<TunnelStats>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Drop for DataStream {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for DataStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        loop {
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            let read = buf.filled().len() - before;
            if read == 0 || self.accept.done() {
                break;
            }
            let used = self.accept.feed(&buf.filled()[before..]).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("agent: {e}"))
            })?;
            let filled = buf.filled_mut();
            filled.copy_within(before + used.., before);
            buf.set_filled(before + read - used);
            if read > used {
                break;
            }
            // Only the answer so far: read again rather than report an end of stream.
        }
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = &r {
            self.stats.bytes_in.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.stats.bytes_in.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts the next visitor, counting it against its address's limit; visitors over the limit
/// are closed at once.
async fn accept(
    listener: &TcpListener,
    edge: &Arc<Edge>,
) -> Option<(TcpStream, SocketAddr, ConnGuard)> {
    let (tcp, peer) = match listener.accept().await {
        Ok(a) => a,
        Err(e) => {
            // Out of descriptors and similar: back off instead of spinning.
            debug!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return None;
        }
    };
    let Some(guard) = edge.conns.enter(peer.ip()) else {
        crate::metrics::global().error("conn_limit_per_ip");
        debug!(%peer, "too many connections from this address; closed");
        return None;
    };
    let _ = tcp.set_nodelay(true);
    Some((tcp, peer, guard))
}

/// The visitor's address and the bytes already read: from a trusted proxy's PROXY header, or
/// the peer itself.
async fn visitor_of(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    edge: &Edge,
) -> Option<(SocketAddr, Bytes)> {
    if !edge.config.trusted(peer.ip()) {
        return Some((peer, Bytes::new()));
    }
    match read_proxy_header(tcp, peer, edge.config.header_timeout).await {
        Ok(v) => Some(v),
        Err(e) => {
            debug!(%peer, error = %e, "no usable start of connection from a trusted proxy");
            None
        }
    }
}

/// Serves one TCP tunnel's public listener: every visitor connection becomes a data stream to
/// whichever session serves the tunnel at that moment; while none does, visitors are closed at
/// once. The returned handle stops the listener and its connections when dropped.
pub fn spawn_tcp_tunnel(
    listener: TcpListener,
    live: watch::Receiver<Option<Live>>,
    edge: Arc<Edge>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Some((tcp, peer, guard)) = accept(&listener, &edge).await else { continue };
            while conns.try_join_next().is_some() {}
            let Some(live) = live.borrow().clone() else {
                drop(tcp);
                continue;
            };
            conns.spawn(forward_tcp(tcp, peer, live, edge.clone(), guard));
        }
    }))
}

async fn forward_tcp(
    mut tcp: TcpStream,
    peer: SocketAddr,
    live: Live,
    edge: Arc<Edge>,
    _guard: ConnGuard,
) {
    let Some((visitor, early)) = visitor_of(&mut tcp, peer, &edge).await else { return };
    match live.policy.admit(visitor.ip()) {
        Admit::Yes => {}
        refused => {
            debug!(tunnel = %live.name, %visitor, outcome = ?refused, "visitor refused");
            return;
        }
    }
    pipe(tcp, early, visitor, &live, Protocol::Tcp, edge.config.access_log).await;
}

/// Splices a visitor connection (after `early`, bytes already read from it) to a new data stream.
async fn pipe(
    mut tcp: TcpStream,
    early: Bytes,
    visitor: SocketAddr,
    live: &Live,
    protocol: Protocol,
    access_log: bool,
) {
    let mut stream = match open_data_stream(live, visitor, protocol).await {
        Ok(s) => s,
        Err(e) => {
            debug!(tunnel = %live.name, error = %e, "cannot open data stream");
            return;
        }
    };
    let early_len = early.len() as u64;
    if !early.is_empty() && stream.write_all(&early).await.is_err() {
        return;
    }
    let started = std::time::Instant::now();
    let result = warren_transport::splice(&mut tcp, &mut stream).await;
    if let Err(e) = &result {
        debug!(tunnel = %live.name, %visitor, error = %e, "connection ended with an error");
    }
    if access_log {
        let (up, down) = result.unwrap_or_default();
        let up = up + early_len;
        info!(
            target: "warren_server::access",
            %visitor,
            proto = %protocol,
            tunnel = %live.name,
            bytes_in = up,
            bytes_out = down,
            ms = started.elapsed().as_millis() as u64,
            "connection"
        );
    }
}

/// The public HTTP and HTTPS listeners.
#[derive(Debug)]
pub struct HttpIngress {
    router: Arc<Router>,
    domain: String,
    edge: Arc<Edge>,
    challenges: crate::acme::Challenges,
}

/// Which session, tunnel and visitor an upstream connection belongs to.
type UpstreamKey = (u64, warren_proto::TunnelId, SocketAddr);

/// A connection to the agent carrying a visitor's requests.
enum Upstream {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

impl Upstream {
    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }
}

/// Idle upstream connections kept per visitor connection.
const UPSTREAM_POOL: usize = 8;

struct ConnState {
    ingress: Arc<HttpIngress>,
    /// The TCP peer.
    peer: SocketAddr,
    /// The visitor as the connection tells it (a trusted proxy's PROXY header, or the peer).
    conn_addr: SocketAddr,
    https: bool,
    tasks: TaskTracker,
    upstreams: Mutex<Vec<(UpstreamKey, Upstream)>>,
}

impl HttpIngress {
    /// Routes `NAME.domain` to the tunnels in `router`.
    pub fn new(
        router: Arc<Router>,
        domain: &str,
        edge: Arc<Edge>,
        challenges: crate::acme::Challenges,
    ) -> Arc<Self> {
        Arc::new(Self {
            router,
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            edge,
            challenges,
        })
    }

    /// Accepts plain-HTTP visitors until `shutdown`; then waits a few seconds for open requests.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        self.serve_with(listener, shutdown, None).await;
    }

    /// Accepts HTTPS visitors until `shutdown`: TLS tunnels' names are passed through by SNI,
    /// everything else is terminated with `tls` and served as HTTP.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) {
        self.serve_with(listener, shutdown, Some(tokio_rustls::TlsAcceptor::from(tls))).await;
    }

    async fn serve_with(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                a = accept(&listener, &self.edge) => a,
                () = shutdown.cancelled() => break,
            };
            let Some((tcp, peer, guard)) = accepted else { continue };
            let this = self.clone();
            let cancel = shutdown.clone();
            let tls = tls.clone();
            let t = tasks.clone();
            tasks.spawn(async move {
                let _guard = guard;
                this.visitor(tcp, peer, tls, t, cancel).await;
            });
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }

    async fn visitor(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) {
        let Some((conn_addr, early)) = visitor_of(&mut tcp, peer, &self.edge).await else { return };
        let state = |https| ConnState {
            ingress: self.clone(),
            peer,
            conn_addr,
            https,
            tasks: tasks.clone(),
            upstreams: Mutex::new(Vec::new()),
        };
        let Some(acceptor) = tls else {
            return state(false).serve(Prefixed::new(early, tcp), cancel).await;
        };
        let timeout = self.edge.config.header_timeout;
        let (hello, sni) =
            match tokio::time::timeout(timeout, read_client_hello(&mut tcp, early)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "not a TLS ClientHello");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "no TLS ClientHello in time");
                    return;
                }
            };
        if let Some(sni) = &sni
            && let Some(label) = self.label(sni)
            && let Some((Protocol::Tls, route)) =
                self.router.named_route(&label.to_ascii_lowercase())
        {
            let Route::Live(live) = route else {
                debug!(%sni, "tls tunnel offline; connection closed");
                return;
            };
            let visitor = conn_addr;
            match live.policy.admit(visitor.ip()) {
                Admit::Yes => {
                    let log = self.edge.config.access_log;
                    pipe(tcp, hello, visitor, &live, Protocol::Tls, log).await
                }
                refused => {
                    debug!(tunnel = %live.name, %visitor, outcome = ?refused, "visitor refused")
                }
            }
            return;
        }
        let handshake =
            tokio::time::timeout(timeout, acceptor.accept(Prefixed::new(hello, tcp))).await;
        match handshake {
            Ok(Ok(stream)) => state(true).serve(stream, cancel).await,
            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => debug!(%peer, "TLS handshake timed out"),
        }
    }

    /// The subdomain label of a `Host` value, if it names a tunnel under our domain.
    fn label<'a>(&self, host: &'a str) -> Option<&'a str> {
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.trim_end_matches('.');
        let cut = host.len().checked_sub(self.domain.len() + 1)?;
        if !host.is_char_boundary(cut) {
            return None;
        }
        let (label, rest) = host.split_at(cut);
        (rest.as_bytes()[0] == b'.'
            && rest[1..].eq_ignore_ascii_case(&self.domain)
            && !label.is_empty()
            && !label.contains('.'))
        .then_some(label)
    }
}

/// Largest TLS ClientHello read before deciding where a connection goes.
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// Reads until a whole ClientHello is in, returning every byte read (to replay) and the SNI.
async fn read_client_hello(
    tcp: &mut TcpStream,
    early: Bytes,
) -> Result<(Bytes, Option<String>), Box<dyn std::error::Error + Send + Sync>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = early.to_vec();
    let mut fed = 0;
    loop {
        while fed < buf.len() {
            fed += acceptor.read_tls(&mut &buf[fed..])?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                return Ok((Bytes::from(buf), sni));
            }
            Ok(None) => {}
            Err((e, _)) => return Err(e.into()),
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Err("ClientHello too large".into());
        }
        if tcp.read_buf(&mut buf).await? == 0 {
            return Err("connection closed before the ClientHello".into());
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes: until they cannot be the HTTP/2 preface, or are all of it.
async fn sniff_protocol<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<Bytes> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    loop {
        if !first.is_empty() && (first.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&first))
        {
            return Ok(Bytes::from(first));
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len().saturating_sub(first.len()).max(1);
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        first.extend_from_slice(&chunk[..n]);
    }
}

fn has_body_limit_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl ConnState {
    async fn serve<I>(self, mut io: I, cancel: CancellationToken)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.ingress.edge.config;
        let peer = self.peer;
        // hyper's header timeout starts once it knows the protocol; the bytes that decide it
        // (up to the HTTP/2 preface) are bounded by the same timeout here.
        let first = match tokio::time::timeout(cfg.header_timeout, sniff_protocol(&mut io)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "visitor connection ended before a request");
                return;
            }
            Err(_) => {
                debug!(%peer, "no request head in time; connection closed");
                return;
            }
        };
        let io = IdleTimeout::new(Prefixed::new(first, io), cfg.idle_timeout);
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_timeout)
            // hyper refuses buffers under 8 KiB; the flag's parser does too.
            .max_buf_size(cfg.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32)
            .max_concurrent_streams(256);
        let state = Arc::new(self);
        let svc = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.handle_logged(req).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "visitor connection error") },
            () = cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    }

    /// The `X-Forwarded-For` to send on (a trusted proxy's chain, then the connection's
    /// visitor) and the real visitor it names.
    fn forwarded_for(&self, headers: &http::HeaderMap) -> (String, std::net::IpAddr) {
        let edge = &self.ingress.edge.config;
        let prior = edge
            .trusted(self.peer.ip())
            .then(|| headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()))
            .flatten();
        let xff = match prior {
            Some(prev) => format!("{prev}, {}", self.conn_addr.ip()),
            None => self.conn_addr.ip().to_string(),
        };
        let real = edge.client_ip(self.peer.ip(), Some(&xff));
        (xff, real)
    }

    /// [`ConnState::handle`], with one access-log line per request when `--access-log` is on.
    async fn handle_logged(&self, req: Request<Incoming>) -> Response<Body> {
        if !self.ingress.edge.config.access_log {
            let started = std::time::Instant::now();
            let resp = self.handle(req).await;
            crate::metrics::global().request.observe(started.elapsed());
            return resp;
        }
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let version = req.version();
        let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
        let host = hop::target_host(&req).unwrap_or_default();
        let (_, visitor) = self.forwarded_for(req.headers());
        let resp = self.handle(req).await;
        crate::metrics::global().request.observe(started.elapsed());
        info!(
            target: "warren_server::access",
            visitor = %visitor,
            scheme = if self.https { "https" } else { "http" },
            version = ?version,
            %host,
            %method,
            %path,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        resp
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let json = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        // Which host the request is for, before anything routes by it.
        let host = match hop::target_host(&req) {
            Ok(host) => host,
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "request refused");
                return error_page(StatusCode::BAD_REQUEST, "Bad request", &e.to_string(), json);
            }
        };
        if let Some(coding) = hop::foreign_coding(req.headers()) {
            return error_page(
                StatusCode::NOT_IMPLEMENTED,
                "Transfer coding not supported",
                &format!(
                    "The relay forwards request bodies sent plain or chunked, not with the \
                     transfer coding {coding:?}; send the body without it."
                ),
                json,
            );
        }
        let ingress = &self.ingress;
        if !self.https
            && let Some(token) = req.uri().path().strip_prefix(crate::acme::CHALLENGE_PREFIX)
            && let Some(answer) = ingress.challenges.get(token)
        {
            // An ACME CA checking that this relay serves the name it asked a certificate for.
            let mut resp = Response::new(Either::Right(Full::new(Bytes::from(answer))));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            return resp;
        }
        let Some(label) = ingress.label(&host) else {
            return error_page(
                StatusCode::NOT_FOUND,
                "No such tunnel",
                &format!("No tunnel is served at host {host:?} on this relay."),
                json,
            );
        };
        let live = match ingress.router.http_route(&label.to_ascii_lowercase()) {
            None => {
                return error_page(
                    StatusCode::NOT_FOUND,
                    "No such tunnel",
                    &format!("No tunnel is served at {host}."),
                    json,
                );
            }
            Some(Route::Offline(name)) => {
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "Tunnel offline",
                    &format!(
                        "The agent serving tunnel {name} is disconnected; it may be reconnecting. Try again shortly."
                    ),
                    json,
                );
            }
            Some(Route::Live(live)) => live,
        };

        // Who the visitor is: a trusted proxy's word is taken, nobody else's.
        let edge = &ingress.edge.config;
        let trusted = edge.trusted(self.peer.ip());
        let (xff, real) = self.forwarded_for(req.headers());
        let visitor =
            if real == self.conn_addr.ip() { self.conn_addr } else { SocketAddr::new(real, 0) };

        let policy = live.policy.clone();
        match policy.admit(real) {
            Admit::Yes => {}
            Admit::Forbidden => {
                debug!(tunnel = %live.name, %visitor, "visitor refused by allow/deny");
                return error_page(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("Visitors from {real} may not use this tunnel."),
                    json,
                );
            }
            Admit::RateLimited(after) => {
                debug!(tunnel = %live.name, %visitor, "visitor rate limited");
                let mut resp = error_page(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many requests",
                    &format!(
                        "This tunnel allows {} requests per second from one address; try again in {after} s.",
                        policy.options.rate_limit.unwrap_or(0)
                    ),
                    json,
                );
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(after));
                return resp;
            }
        }
        if policy.options.https_only
            && !self.https
            && let Some(resp) = self.redirect_to_https(&req, &host)
        {
            return resp;
        }
        if !policy.authorized(req.headers().get(header::AUTHORIZATION)) {
            let mut resp = error_page(
                StatusCode::UNAUTHORIZED,
                "Authentication required",
                "This tunnel needs a user name and password.",
                json,
            );
            let realm = format!("Basic realm=\"{}\", charset=\"UTF-8\"", host.replace('"', ""));
            if let Ok(v) = HeaderValue::from_str(&realm) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return resp;
        }
        let too_large = |max: u64| {
            error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                &format!("This tunnel accepts request bodies of at most {max} bytes."),
                json,
            )
        };
        if let Some(max) = policy.options.max_body {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return too_large(max);
            }
        }

        // What was meant for this hop stays here; only then does the relay add its own headers.
        let h2 = policy.options.upstream_http2;
        let keep = if h2 {
            Keep::TeTrailers
        } else if hop::asks_upgrade(req.headers()) {
            Keep::Upgrade
        } else {
            Keep::Nothing
        };
        let headers = req.headers_mut();
        hop::strip_hop_by_hop(headers, keep);
        if policy.needs_auth() {
            // The credentials are for the relay, not the service.
            headers.remove(header::AUTHORIZATION);
        }
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        if let Ok(v) = HeaderValue::from_str(&real.to_string()) {
            headers.insert("x-real-ip", v);
        }
        if !(trusted && headers.contains_key("x-forwarded-proto")) {
            let proto = if self.https { "https" } else { "http" };
            headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        }
        if !(trusted && headers.contains_key("x-forwarded-host"))
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            headers.insert("x-forwarded-host", v);
        }
        policy.edit_request(headers);

        let upgrade = (keep == Keep::Upgrade).then(|| hyper::upgrade::on(&mut req));
        let req = match prepare_upstream(req, h2, &host, policy.options.max_body) {
            Ok(r) => r,
            Err(e) => {
                return error_page(StatusCode::BAD_REQUEST, "Bad request", &e, json);
            }
        };
        let key = (live.session_id, live.tunnel, visitor);
        let upstream = match self.upstream(&live, key, h2).await {
            Ok(u) => u,
            Err(e) => {
                debug!(tunnel = %live.name, error = %e, "cannot reach agent");
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "Agent unreachable",
                    &format!(
                        "The relay could not open a stream to the agent serving tunnel {}: {e}",
                        live.name
                    ),
                    json,
                );
            }
        };
        let (upstream, sent) = match upstream {
            Upstream::H1(mut s) => {
                let r = s.send_request(req).await;
                (Upstream::H1(s), r)
            }
            Upstream::H2(mut s) => {
                let r = s.send_request(req).await;
                (Upstream::H2(s), r)
            }
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if has_body_limit_error(&e) => {
                return too_large(policy.options.max_body.unwrap_or(0));
            }
            Err(e) => {
                debug!(tunnel = %live.name, error = %e, "upstream request failed");
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    &format!("The request through tunnel {} failed: {e}", live.name),
                    json,
                );
            }
        };
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        hop::strip_hop_by_hop(
            resp.headers_mut(),
            if switched { Keep::Upgrade } else { Keep::Nothing },
        );
        policy.edit_response(resp.headers_mut());
        match upgrade {
            Some(visitor_side) if switched => {
                let agent_side = hyper::upgrade::on(&mut resp);
                let name = live.name.clone();
                self.tasks.spawn(async move {
                    let (Ok(v), Ok(a)) = tokio::join!(visitor_side, agent_side) else {
                        debug!(tunnel = %name, "upgrade failed");
                        return;
                    };
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(v), &mut TokioIo::new(a))
                            .await;
                });
            }
            // An HTTP/2 upstream stays in the pool while in use; an HTTP/1.1 one goes back.
            _ if matches!(upstream, Upstream::H1(_)) => self.put_back(key, upstream),
            _ => {}
        }
        resp.map(Either::Left)
    }

    /// An idle upstream connection to the tunnel's agent, or a new one.
    async fn upstream(
        &self,
        live: &Live,
        key: UpstreamKey,
        h2: bool,
    ) -> Result<Upstream, BoxError> {
        {
            let mut pool = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
            pool.retain(|(_, u)| !u.is_closed());
            let found = pool.iter().position(|(k, u)| {
                *k == key
                    && match u {
                        Upstream::H1(s) => s.is_ready(),
                        Upstream::H2(_) => true,
                    }
            });
            if let Some(i) = found {
                return Ok(match &pool[i].1 {
                    Upstream::H2(s) => Upstream::H2(s.clone()),
                    Upstream::H1(_) => pool.swap_remove(i).1,
                });
            }
        }
        let stream = open_data_stream(live, key.2, Protocol::Http).await?;
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            self.tasks.spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream connection ended");
                }
            });
            self.put_back(key, Upstream::H2(sender.clone()));
            Ok(Upstream::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new().handshake(io).await?;
            self.tasks.spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Upstream::H1(sender))
        }
    }

    fn put_back(&self, key: UpstreamKey, upstream: Upstream) {
        let mut pool = self.upstreams.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < UPSTREAM_POOL {
            pool.push((key, upstream));
        }
    }

    /// A redirect of a plain-HTTP request to the same URL over HTTPS.
    fn redirect_to_https(&self, req: &Request<Incoming>, host: &str) -> Option<Response<Body>> {
        let port = self.ingress.router.https_port()?;
        let name = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = if port == 443 {
            format!("https://{name}{path}")
        } else {
            format!("https://{name}:{port}{path}")
        };
        let location_value = HeaderValue::from_str(&location).ok()?;
        let mut resp = error_page(
            StatusCode::PERMANENT_REDIRECT,
            "Moved to HTTPS",
            &format!("This tunnel is served over HTTPS only: {location}"),
            false,
        );
        resp.headers_mut().insert(header::LOCATION, location_value);
        Some(resp)
    }
}

/// Turns a visitor's request, its hop-by-hop headers already gone, into one for the upstream
/// connection: HTTP/1.1 (origin-form target, a `Host` header, a body of unknown length marked
/// chunked) or HTTP/2 (absolute target, no `Host`), with the body limited.
fn prepare_upstream(
    req: Request<Incoming>,
    h2: bool,
    host: &str,
    max_body: Option<u64>,
) -> Result<Request<UpBody>, String> {
    let (mut parts, body) = req.into_parts();
    // hyper sends a GET's or HEAD's body of unknown length as no body at all unless told.
    let unframed = !body.is_end_stream() && body.size_hint().exact().is_none();
    let body: UpBody = match max_body {
        Some(max) => Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX)).boxed(),
        None => body.map_err(|e| Box::new(e) as BoxError).boxed(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if h2 {
        parts.version = Version::HTTP_2;
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(host)
            .path_and_query(path)
            .build()
            .map_err(|e| format!("the host or path cannot be forwarded: {e}"))?;
        parts.headers.remove(HOST);
    } else {
        if parts.version == Version::HTTP_2 {
            parts.version = Version::HTTP_11;
        }
        // CONNECT's target is an authority; every other target goes in origin form.
        if parts.method != Method::CONNECT {
            parts.uri = path.parse().map_err(|e| format!("the path cannot be forwarded: {e}"))?;
        }
        if !parts.headers.contains_key(HOST) {
            let v = HeaderValue::from_str(host).map_err(|_| "bad host".to_owned())?;
            parts.headers.insert(HOST, v);
        }
        if unframed && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
    }
    Ok(Request::from_parts(parts, body))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An error answer from the relay itself: a small HTML page, or JSON when the visitor asks.
pub fn error_page(status: StatusCode, title: &str, detail: &str, json: bool) -> Response<Body> {
    crate::metrics::global().error(match status.as_u16() {
        400 => "http_400_bad_request",
        401 => "http_401_unauthorized",
        403 => "http_403_forbidden",
        404 => "http_404_unknown_host",
        413 => "http_413_too_large",
        429 => "http_429_rate_limited",
        502 => "http_502_bad_gateway",
        _ => "http_other",
    });
    let (ctype, body) = if json {
        let j = format!(
            "{{\"error\":{{\"status\":{},\"title\":{:?},\"message\":{:?}}}}}\n",
            status.as_u16(),
            title,
            detail
        );
        ("application/json", j)
    } else {
        let page = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {t}</title></head>\
             <body style=\"font-family:system-ui,sans-serif;max-width:40em;margin:4em auto\">\
             <h1>{code} {t}</h1><p>{d}</p><hr><p><small>warren relay</small></p></body></html>\n",
            code = status.as_u16(),
            t = escape(title),
            d = escape(detail)
        );
        ("text/html; charset=utf-8", page)
    };
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// Logs the stable `listening` line for a listener.
pub fn log_listening(name: &str, addr: SocketAddr) {
    info!(name = %name, addr = %addr, "listening");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(domain: &str) -> HttpIngress {
        let pool = crate::pool::PortPool::new("127.0.0.1:1-1".parse().unwrap());
        let router = Router::new(
            domain.into(),
            80,
            pool,
            Duration::from_secs(1),
            Box::new(|_, _| unreachable!()),
        );
        HttpIngress {
            router: Arc::new(router),
            domain: domain.into(),
            edge: Edge::new(crate::edge::EdgeConfig::default()),
            challenges: crate::acme::Challenges::default(),
        }
    }

    #[test]
    fn host_labels() {
        let i = ingress("example.com");
        assert_eq!(i.label("shop.example.com"), Some("shop"));
        assert_eq!(i.label("shop.example.com:8080"), Some("shop"));
        assert_eq!(i.label("Shop.Example.COM."), Some("Shop"));
        assert_eq!(i.label("example.com"), None);
        assert_eq!(i.label("a.b.example.com"), None);
        assert_eq!(i.label("shopexample.com"), None);
        assert_eq!(i.label(".example.com"), None);
        assert_eq!(i.label("x.other.org"), None);
        assert_eq!(i.label(""), None);
        // Not a valid subdomain (the router refuses it), but no panic on non-ASCII bytes either.
        assert_eq!(i.label("é.example.com"), Some("é"));
        assert_eq!(i.label("éééééééx"), None);
    }
}

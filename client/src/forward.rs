//! One data stream from the relay: read its header, connect the tunnel's target, splice.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};
use warren_proto::{Protocol, TunnelId};
use warren_transport::Stream;
use warren_transport::control::read_stream_header;

use crate::tunnel::{Target, TunnelSpec};

/// Deadline for the relay's header and for connecting the target.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long, and how much of a request, the agent reads before answering 502.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// The tunnels of the current session, by the id the relay gave each; forwards created through
/// the relay's API come and go while the session runs.
pub type Tunnels = Arc<std::sync::RwLock<HashMap<TunnelId, Arc<TunnelSpec>>>>;

/// The tunnel with relay id `id`, if this session serves it.
pub fn lookup(tunnels: &Tunnels, id: TunnelId) -> Option<Arc<TunnelSpec>> {
    tunnels.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
}

static NETWORKS: std::sync::OnceLock<Arc<crate::net::NetManager>> = std::sync::OnceLock::new();

/// Lets targets named `NAME.NETWORK` resolve through this process's networks.
pub fn set_name_resolver(m: Arc<crate::net::NetManager>) {
    let _ = NETWORKS.set(m);
}

/// Connects to a target, trying every address a host name resolves to. A name of one of the
/// agent's networks (`api.web`) resolves through the networks (this process's, or those of
/// the agent at `WARREN_AGENT_API` / 127.0.0.1:4040) when the system resolver does not know
/// it.
pub async fn connect_target(target: &Target) -> std::io::Result<TcpStream> {
    let tcp = match target.socket_addr() {
        Some(addr) => TcpStream::connect(addr).await?,
        None => {
            let local = NETWORKS.get().and_then(|m| m.resolve(&target.host));
            match local {
                Some(ips) => connect_any(&ips, target.port).await?,
                None => match TcpStream::connect((target.host.as_str(), target.port)).await {
                    Ok(t) => t,
                    Err(e) if target.host.contains('.') => {
                        let ips = crate::net::api::ask_agent(&target.host).await.ok_or(e)?;
                        connect_any(&ips, target.port).await?
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn connect_any(ips: &[std::net::Ipv4Addr], port: u16) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for ip in ips {
        match TcpStream::connect((*ip, port)).await {
            Ok(t) => return Ok(t),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Serves one data stream until both directions end.
pub async fn handle(stream: Stream, tunnels: Tunnels, state: Arc<crate::agent::AgentState>) {
    let mut stream = stream;
    let header = match tokio::time::timeout(SETUP_TIMEOUT, read_stream_header(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            debug!(error = %e, "bad data stream header");
            return;
        }
        Err(_) => {
            debug!("data stream header timed out");
            return;
        }
    };
    if header.tunnel.0 == 0 {
        // The relay path of the overlay networks (TLS + yamux).
        match state.overlay() {
            Some(h) => h.stream(stream).await,
            None => debug!("overlay stream, but this agent manages no networks"),
        }
        return;
    }
    let Some(tunnel) = lookup(&tunnels, header.tunnel) else {
        debug!(tunnel = %header.tunnel, "data stream for a tunnel this session does not serve");
        return;
    };
    if header.protocol != tunnel.protocol {
        debug!(tunnel = %tunnel.name, "data stream of another protocol than its tunnel's");
        return;
    }
    // Answered before anything else, so the stream is acknowledged even if neither the visitor
    // nor the target ever sends a byte (PROTOCOL.md §7).
    if let Err(e) = stream.write_all(&warren_proto::StreamAccept::BYTES).await {
        debug!(tunnel = %tunnel.name, error = %e, "cannot answer the data stream");
        return;
    }
    let mut stream = Counted::new(stream, state.traffic(&tunnel.name));
    if let (Protocol::Http, true, Some(inspector)) =
        (header.protocol, tunnel.inspect, state.inspector())
    {
        // Boxed, like UDP: the plain splice's future stays small.
        return Box::pin(crate::inspect::serve(stream, tunnel, inspector)).await;
    }
    if header.protocol == Protocol::Udp {
        // Boxed: UDP flows are rare next to TCP streams, whose futures stay small.
        let flow =
            Box::pin(crate::udp::serve_stream(stream, &tunnel.target, crate::udp::FLOW_IDLE));
        if let Err(e) = flow.await {
            debug!(tunnel = %tunnel.name, visitor = %header.visitor, error = %e, "udp flow ended with an error");
        }
        return;
    }
    let target = match tokio::time::timeout(SETUP_TIMEOUT, connect_target(&tunnel.target)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return refuse(stream, &tunnel, &e.to_string(), header.protocol).await,
        Err(_) => return refuse(stream, &tunnel, "connection timed out", header.protocol).await,
    };
    let mut target = target;
    if let Some(version) = tunnel.proxy_protocol {
        // The visitor's address, as the relay saw it, for a target that reads PROXY headers.
        let dst = target.peer_addr().unwrap_or(header.visitor);
        let mut proxy = Vec::with_capacity(64);
        warren_proto::proxy::encode(version, header.visitor, dst, &mut proxy);
        if let Err(e) = target.write_all(&proxy).await {
            debug!(tunnel = %tunnel.name, error = %e, "cannot send the PROXY header");
            return;
        }
    }
    if let Err(e) = warren_transport::splice(&mut stream, &mut target).await {
        debug!(tunnel = %tunnel.name, visitor = %header.visitor, error = %e, "connection ended with an error");
    }
}

async fn refuse<S>(mut stream: S, tunnel: &TunnelSpec, why: &str, protocol: Protocol)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    warn!(tunnel = %tunnel.name, target = %tunnel.target, reason = %why, "cannot reach the target");
    if protocol != Protocol::Http {
        let _ = stream.shutdown().await;
        return;
    }
    let page = bad_gateway_page(tunnel, why);
    // Answer as an HTTP server would: read the whole request (bounded) before the 502, so the
    // relay has finished sending and reads the answer, then close.
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let page = page.clone();
        async move {
            use http_body_util::BodyExt;
            let json = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/json"));
            let _ = http_body_util::Limited::new(req.into_body(), DRAIN_LIMIT).collect().await;
            let (ctype, body) = if json {
                ("application/json", page.1)
            } else {
                ("text/html; charset=utf-8", page.0)
            };
            let mut resp =
                hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
            *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
            let h = resp.headers_mut();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
            h.insert("x-warren-error", http::HeaderValue::from_static("target-unreachable"));
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
}

/// The 502 answer as an HTML page and as JSON.
pub(crate) fn bad_gateway_page(tunnel: &TunnelSpec, why: &str) -> (String, String) {
    let json = format!(
        "{{\"error\":{{\"status\":502,\"title\":\"Target unreachable\",\"message\":{:?}}}}}\n",
        format!(
            "The warren agent serving tunnel {} could not reach its target {}: {why}",
            tunnel.name, tunnel.target
        )
    );
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>502 Bad Gateway</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:40em;margin:4em auto\">\
         <h1>502 Bad Gateway</h1><p>The warren agent serving tunnel <b>{name}</b> could not \
         reach its target <code>{target}</code>: {why}.</p><p>Is the service running?</p>\
         <hr><p><small>warren agent</small></p></body></html>\n",
        name = tunnel.name,
        target = tunnel.target,
        why = why.replace('<', "&lt;"),
    );
    (html, json)
}

pin_project_lite::pin_project! {
    /// A data stream that counts its bytes and its life into a tunnel's [`Traffic`].
    #[derive(Debug)]
    pub struct Counted<S> {
        #[pin]
        inner: S,
        traffic: Arc<crate::agent::Traffic>,
    }

    impl<S> PinnedDrop for Counted<S> {
        fn drop(this: Pin<&mut Self>) {
            this.traffic.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<S> Counted<S> {
    /// Counts `inner` into `traffic` from now on.
    pub fn new(inner: S, traffic: Arc<crate::agent::Traffic>) -> Self {
        traffic.open.fetch_add(1, Ordering::Relaxed);
        traffic.total.fetch_add(1, Ordering::Relaxed);
        Self { inner, traffic }
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.traffic.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic.bytes_out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic.bytes_out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

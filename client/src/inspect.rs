//! The request inspector: HTTP tunnels served through the agent's own HTTP proxy, every
//! exchange kept (heads, timings, bodies up to a bound) in a ring buffer bounded in bytes, for
//! the local API to list, show and replay.
//!
//! An inspected tunnel's data stream is served as HTTP (the relay speaks HTTP/1.1 on it, or
//! HTTP/2 for `upstream_http2` tunnels); each request goes to the target over one upstream
//! connection per stream. Bodies stream through unchanged while their first
//! [`Inspector::body_limit`] bytes are copied aside. Upgrades (WebSocket) pass through and are
//! recorded as their `101` exchange.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use crate::forward::connect_target;
use crate::tunnel::TunnelSpec;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body as captured: its first bytes, and whether more went by.
#[derive(Debug, Default)]
pub struct Captured {
    /// The first bytes, at most the inspector's body limit.
    pub bytes: Vec<u8>,
    /// The whole body's size so far.
    pub size: u64,
    /// True once the body has ended.
    pub complete: bool,
}

/// One request and its response.
#[derive(Debug)]
pub struct Exchange {
    /// `req_` and a number; newer ones sort later.
    pub id: String,
    /// The tunnel it went through.
    pub tunnel: String,
    /// Unix milliseconds at which the request arrived.
    pub started_ms: u64,
    /// The request head.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// HTTP version on the tunnel.
    pub version: Version,
    /// Request headers.
    pub request_headers: HeaderMap,
    /// Request body.
    pub request_body: Arc<Mutex<Captured>>,
    /// The response head, once it came (None: still waiting, or the target failed).
    pub response: Mutex<Option<(StatusCode, HeaderMap, u64)>>,
    /// Response body.
    pub response_body: Arc<Mutex<Captured>>,
    /// Why there is no response, if the target could not be reached.
    pub error: Mutex<Option<String>>,
    /// The exchange this one replays, if any.
    pub replay_of: Option<String>,
}

impl Exchange {
    fn weight(&self) -> usize {
        let heads: usize =
            self.request_headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        let bodies = lock(&self.request_body).bytes.len() + lock(&self.response_body).bytes.len();
        512 + self.uri.len() + heads * 2 + bodies
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ring buffer of exchanges, shared by every inspected tunnel of an agent.
#[derive(Debug)]
pub struct Inspector {
    ring: Mutex<VecDeque<Arc<Exchange>>>,
    next: AtomicU64,
    /// Most bytes of each body kept.
    pub body_limit: usize,
    /// Most bytes the ring holds (oldest exchanges go first).
    pub budget: usize,
    /// Told about every new exchange (the dashboard's live view).
    pub events: tokio::sync::broadcast::Sender<String>,
    /// Bytes the ring holds now, kept up to date as exchanges come and bodies stream in, so
    /// recording one exchange does not walk the whole ring.
    used: Arc<AtomicUsize>,
}

impl Inspector {
    /// A ring of `budget` bytes keeping the first `body_limit` bytes of bodies.
    pub fn new(budget: usize, body_limit: usize) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::default(),
            next: AtomicU64::new(1),
            body_limit,
            budget,
            events: tokio::sync::broadcast::channel(256).0,
            used: Arc::default(),
        })
    }

    fn record(&self, ex: Exchange) -> Arc<Exchange> {
        let ex = Arc::new(ex);
        let mut ring = lock(&self.ring);
        self.used.fetch_add(ex.weight(), Ordering::Relaxed);
        ring.push_back(ex.clone());
        while self.used.load(Ordering::Relaxed) > self.budget && ring.len() > 1 {
            if let Some(old) = ring.pop_front() {
                let w = old.weight();
                let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(w))
                });
            }
        }
        drop(ring);
        let _ = self.events.send(ex.id.clone());
        ex
    }

    /// Every exchange kept, newest first.
    pub fn list(&self) -> Vec<Arc<Exchange>> {
        lock(&self.ring).iter().rev().cloned().collect()
    }

    /// One exchange.
    pub fn get(&self, id: &str) -> Option<Arc<Exchange>> {
        lock(&self.ring).iter().find(|e| e.id == id).cloned()
    }

    /// Forgets every exchange.
    pub fn clear(&self) {
        let mut ring = lock(&self.ring);
        ring.clear();
        self.used.store(0, Ordering::Relaxed);
    }

    fn new_exchange(
        &self,
        tunnel: &str,
        parts: &http::request::Parts,
        replay_of: Option<String>,
    ) -> Exchange {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Exchange {
            id: format!("req_{n:08}"),
            tunnel: tunnel.to_owned(),
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            method: parts.method.clone(),
            uri: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            version: parts.version,
            request_headers: parts.headers.clone(),
            request_body: Arc::default(),
            response: Mutex::new(None),
            response_body: Arc::default(),
            error: Mutex::new(None),
            replay_of,
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that copies its first bytes into a [`Captured`] as they pass.
    struct Tee<B> {
        #[pin]
        inner: B,
        into: Arc<Mutex<Captured>>,
        limit: usize,
        used: Arc<AtomicUsize>,
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut c = lock(this.into);
                if let Some(data) = frame.data_ref() {
                    c.size += data.len() as u64;
                    let kept = this.limit.saturating_sub(c.bytes.len()).min(data.len());
                    c.bytes.extend_from_slice(&data[..kept]);
                    this.used.fetch_add(kept, Ordering::Relaxed);
                }
                // Bodies of known length are not polled past their last frame.
                if this.inner.is_end_stream() {
                    c.complete = true;
                }
            }
            Poll::Ready(None) => lock(this.into).complete = true,
            _ => {}
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn tee<B>(body: B, into: &Arc<Mutex<Captured>>, inspector: &Inspector) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Tee {
        inner: body,
        into: into.clone(),
        limit: inspector.body_limit,
        used: inspector.used.clone(),
    }
    .boxed()
}

/// A connection to the tunnel's target, HTTP/1.1 or h2c.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

async fn connect(spec: &TunnelSpec) -> Result<Upstream, BoxError> {
    let tcp: TcpStream = connect_target(&spec.target).await?;
    let io = TokioIo::new(tcp);
    if spec.options.upstream_http2 {
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Upstream::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(Upstream::H1(send))
    }
}

impl Upstream {
    async fn send(&mut self, req: Request<ProxyBody>) -> Result<Response<Incoming>, BoxError> {
        match self {
            Self::H1(s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            Self::H2(s) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
        }
    }
}

/// Sends one request to the target and records it; used for tunnel traffic and replays.
async fn exchange(
    inspector: &Inspector,
    spec: &TunnelSpec,
    upstream: &mut Option<Upstream>,
    mut req: Request<ProxyBody>,
    ex: Exchange,
) -> (Arc<Exchange>, Response<ProxyBody>) {
    let started = Instant::now();
    let ex = inspector.record(ex);
    let json = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if upstream.is_none() {
        match connect(spec).await {
            Ok(u) => *upstream = Some(u),
            Err(e) => {
                let resp = failed(&ex, spec, &e.to_string(), json);
                return (ex, resp);
            }
        }
    }
    if spec.options.upstream_http2 {
        *req.version_mut() = Version::HTTP_2;
    } else if req.version() == Version::HTTP_2 {
        *req.version_mut() = Version::HTTP_11;
    }
    let Some(up) = upstream.as_mut() else {
        let resp = failed(&ex, spec, "no upstream connection", json);
        return (ex, resp);
    };
    let resp = match up.send(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            *lock(&ex.response) =
                Some((parts.status, parts.headers.clone(), started.elapsed().as_micros() as u64));
            let _ = inspector.events.send(ex.id.clone());
            let body = tee(body, &ex.response_body, inspector);
            Response::from_parts(parts, body)
        }
        Err(e) => {
            *upstream = None;
            failed(&ex, spec, &e.to_string(), json)
        }
    };
    (ex, resp)
}

/// The agent's 502 page (HTML, or JSON when asked) for a target that cannot be reached.
fn failed(ex: &Exchange, spec: &TunnelSpec, why: &str, json: bool) -> Response<ProxyBody> {
    *lock(&ex.error) = Some(format!("cannot reach {}: {why}", spec.target));
    tracing::warn!(tunnel = %spec.name, target = %spec.target, reason = %why, "cannot reach the target");
    let (html, json_body) = crate::forward::bad_gateway_page(spec, why);
    let (ctype, body) =
        if json { ("application/json", json_body) } else { ("text/html; charset=utf-8", html) };
    let mut resp =
        Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    h.insert("x-warren-error", http::HeaderValue::from_static("target-unreachable"));
    resp
}

/// Serves one data stream of an inspected HTTP tunnel until it ends.
pub async fn serve<S>(stream: S, spec: Arc<TunnelSpec>, inspector: Arc<Inspector>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upstream = Arc::new(tokio::sync::Mutex::new(None::<Upstream>));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (spec, inspector, upstream) = (spec.clone(), inspector.clone(), upstream.clone());
        async move {
            let mut req = req;
            let visitor_upgrade = req
                .headers()
                .contains_key(http::header::UPGRADE)
                .then(|| hyper::upgrade::on(&mut req));
            let (parts, body) = req.into_parts();
            let ex = inspector.new_exchange(spec.name.as_str(), &parts, None);
            let req_body = tee(body, &ex.request_body, &inspector);
            let req = Request::from_parts(parts, req_body);
            let mut up = upstream.lock().await;
            let (_, mut resp) = exchange(&inspector, &spec, &mut up, req, ex).await;
            if let Some(visitor) = visitor_upgrade
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                // The upstream connection becomes the upgraded stream; later requests of this
                // stream get a new one.
                let target = hyper::upgrade::on(&mut resp);
                *up = None;
                tokio::spawn(async move {
                    if let (Ok(v), Ok(t)) = tokio::join!(visitor, target) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(v),
                            &mut TokioIo::new(t),
                        )
                        .await;
                    }
                });
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await {
        debug!(error = %e, "inspected stream ended with an error");
    }
}

/// Replays exchange `id` against the target of `spec`, with changes; returns the new exchange.
pub async fn replay(
    inspector: &Arc<Inspector>,
    spec: &TunnelSpec,
    original: &Exchange,
    method: Option<Method>,
    path: Option<String>,
    headers: Vec<(String, Option<String>)>,
    body: Option<Vec<u8>>,
) -> Result<Arc<Exchange>, String> {
    let method = method.unwrap_or_else(|| original.method.clone());
    let path = path.unwrap_or_else(|| original.uri.clone());
    let uri: Uri = path.parse().map_err(|e| format!("path {path:?}: {e}"))?;
    let mut req = Request::builder().method(method).uri(uri);
    let mut hm = original.request_headers.clone();
    for (k, v) in headers {
        let name =
            http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("header {k:?}"))?;
        match v {
            Some(v) => {
                let value = http::HeaderValue::from_str(&v)
                    .map_err(|_| format!("header {k}: bad value"))?;
                hm.insert(name, value);
            }
            None => {
                hm.remove(name);
            }
        }
    }
    let body = body.unwrap_or_else(|| lock(&original.request_body).bytes.clone());
    hm.remove(http::header::TRANSFER_ENCODING);
    hm.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(body.len()));
    if let Some(h) = req.headers_mut() {
        *h = hm;
    }
    let req = req
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .map_err(|e| e.to_string())?;
    let (parts, body) = req.into_parts();
    let ex = inspector.new_exchange(spec.name.as_str(), &parts, Some(original.id.clone()));
    let req = Request::from_parts(parts, tee(body, &ex.request_body, inspector));
    let mut upstream = None;
    let (ex, resp) = exchange(inspector, spec, &mut upstream, req, ex).await;
    // Read the whole response so the record is complete.
    let _ = resp.into_body().collect().await;
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_stays_within_its_budget_and_clear_empties_it() {
        let insp = Inspector::new(4_000, 1024);
        let (parts, ()) = Request::builder().uri("/x").body(()).unwrap().into_parts();
        for _ in 0..50 {
            // As a request's body streams in after its exchange is recorded.
            let ex = insp.record(insp.new_exchange("t", &parts, None));
            lock(&ex.request_body).bytes.extend_from_slice(&[0; 100]);
            insp.used.fetch_add(100, Ordering::Relaxed);
        }
        let kept = insp.list();
        let total: usize = kept.iter().map(|e| e.weight()).sum();
        assert!(kept.len() > 1 && kept.len() < 50, "{} kept", kept.len());
        assert!(total <= 4_000, "{total} bytes kept");
        assert_eq!(insp.used.load(Ordering::Relaxed), total);
        assert_eq!(kept[0].id, "req_00000050", "newest first");
        insp.clear();
        assert!(insp.list().is_empty());
        assert_eq!(insp.used.load(Ordering::Relaxed), 0);
    }
}

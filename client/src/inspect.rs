//! The request inspector: HTTP tunnels served through the agent's own HTTP proxy, every
//! exchange kept (heads, timings, bodies up to a bound) in a ring bounded in count and in the
//! bytes it really holds, for the local API to list, show and replay.
//!
//! An inspected tunnel's data stream is served as HTTP (the relay speaks HTTP/1.1 on it, or
//! HTTP/2 for `upstream_http2` tunnels); each request goes to the target over one upstream
//! connection per stream. Bodies stream through unchanged while their first
//! [`Inspector::body_limit`] bytes are copied aside. Upgrades (WebSocket) pass through and are
//! recorded as their `101` exchange.
//!
//! Memory: what a kept exchange holds is copied out of the buffers it arrived in (hyper hands
//! out header values and bodies as slices of its read buffers, and one slice keeps a whole
//! buffer alive), into allocations of exact size, and everything it holds is counted: heads,
//! bodies, strings and the bookkeeping itself, with each allocation's overhead. The ring forgets
//! its oldest exchanges when either cap ([`Limits`]) would be passed, and an exchange forgotten
//! while its bodies still stream stops copying them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
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

/// The inspector's caps: past either, the oldest exchanges are forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most exchanges kept, all tunnels together.
    pub max_requests: usize,
    /// Most bytes the kept exchanges hold, all counted (see [`Exchange::weight`]).
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_requests: Self::DEFAULT_MAX_REQUESTS, max_bytes: Self::DEFAULT_MAX_BYTES }
    }
}

impl Limits {
    /// `--inspect-max-requests` when not given.
    pub const DEFAULT_MAX_REQUESTS: usize = 1_000;
    /// `--inspect-max-bytes` when not given.
    pub const DEFAULT_MAX_BYTES: usize = 32 << 20;
    /// The least `--inspect-max-bytes` accepted.
    pub const MIN_BYTES: usize = 64 << 10;
    /// Most bytes of each body kept, when the byte cap allows.
    pub const BODY_LIMIT: usize = 64 << 10;

    /// Most bytes of each request and response body kept: [`Self::BODY_LIMIT`], or an eighth
    /// of the byte cap if that is less, so one exchange never fills the ring alone.
    pub fn body_limit(&self) -> usize {
        Self::BODY_LIMIT.min(self.max_bytes / 8)
    }

    /// A count cap from its text (flag or config key): a number, 1 or more.
    pub fn parse_requests(s: &str) -> Result<usize, String> {
        match s.trim().parse::<usize>() {
            Ok(0) => Err("0 would keep nothing: to turn the inspector off, give the tunnel --inspect false (or the agent --no-api)".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{s:?} is not a number of requests, e.g. 1000")),
        }
    }

    /// A byte cap from its text (flag or config key): a size such as `32MiB` or `512KiB`, at
    /// least [`Self::MIN_BYTES`].
    pub fn parse_bytes(s: &str) -> Result<usize, String> {
        let n = crate::tunnel::parse_size(s)?;
        let n = usize::try_from(n).map_err(|_| format!("size {s:?} is too large"))?;
        if n < Self::MIN_BYTES {
            return Err(format!(
                "{s:?} is less than the 64KiB the inspector needs; to keep less, lower the count of requests kept (--inspect-max-requests), or turn the inspector off with --inspect false"
            ));
        }
        Ok(n)
    }
}

/// Locks `m`, also after a panic elsewhere poisoned it (what it guards stays consistent: every
/// change is one assignment or push).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an allocation of `n` bytes costs the heap, conservatively: malloc's header and
/// rounding (glibc: 8 bytes and a multiple of 16, 32 at least) counted as 32 bytes.
fn heap(n: usize) -> usize {
    if n == 0 { 0 } else { n + 32 }
}

/// Header fields, copied out of the buffers they arrived in into one allocation of exact size:
/// for each field, the name's length (2 bytes), the value's length (4 bytes), the name and the
/// value.
#[derive(Debug, Default)]
pub struct Heads(Box<[u8]>);

impl Heads {
    /// A copy of every field of `map`, in order.
    pub fn copy_of(map: &HeaderMap) -> Self {
        let fields = || {
            map.iter().filter_map(|(k, v)| {
                let name = u16::try_from(k.as_str().len()).ok()?;
                let value = u32::try_from(v.len()).ok()?;
                Some((name, value, k.as_str().as_bytes(), v.as_bytes()))
            })
        };
        let len = fields().map(|(_, _, k, v)| 6 + k.len() + v.len()).sum();
        let mut buf = Vec::with_capacity(len);
        for (n, v, name, value) in fields() {
            buf.extend_from_slice(&n.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
            buf.extend_from_slice(name);
            buf.extend_from_slice(value);
        }
        Self(buf.into_boxed_slice())
    }

    /// Every field, in order: (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let (n, tail) = rest.split_first_chunk::<2>()?;
            let (v, tail) = tail.split_first_chunk::<4>()?;
            let n = usize::from(u16::from_le_bytes(*n));
            let v = usize::try_from(u32::from_le_bytes(*v)).ok()?;
            let name = tail.get(..n)?;
            let value = tail.get(n..n.checked_add(v)?)?;
            rest = tail.get(n + v..)?;
            Some((std::str::from_utf8(name).ok()?, value))
        })
    }

    /// The fields as a header map again (for a replay).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.iter() {
            if let (Ok(k), Ok(v)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value))
            {
                map.append(k, v);
            }
        }
        map
    }

    /// Bytes held.
    fn weight(&self) -> usize {
        heap(self.0.len())
    }
}

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

/// A response head as recorded.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: Heads,
    /// Microseconds from the request to the response head.
    pub duration_us: u64,
}

/// Which body of an exchange.
#[derive(Debug, Clone, Copy)]
enum Side {
    Request,
    Response,
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
    pub request_headers: Heads,
    /// Request body.
    pub request_body: Mutex<Captured>,
    /// The response head, once it came (None: still waiting, or the target failed).
    pub response: Mutex<Option<ResponseHead>>,
    /// Response body.
    pub response_body: Mutex<Captured>,
    /// Why there is no response, if the target could not be reached.
    pub error: Mutex<Option<String>>,
    /// The exchange this one replays, if any.
    pub replay_of: Option<String>,
    /// In the ring: what is captured from now on is kept (and counted).
    kept: AtomicBool,
    /// Bytes counted for it in the ring's total while kept; changed under the ring's lock.
    charged: AtomicUsize,
}

impl Exchange {
    /// Bytes it holds now, counted conservatively: the struct in its `Arc` and its slot in the
    /// ring, every string, heads and bodies at their allocated sizes, each allocation with
    /// malloc's overhead.
    pub fn weight(&self) -> usize {
        let strings =
            [&self.id, &self.tunnel, &self.uri].map(|s| heap(s.capacity())).iter().sum::<usize>()
                + self.replay_of.as_ref().map_or(0, |s| heap(s.capacity()))
                + lock(&self.error).as_ref().map_or(0, |s| heap(s.capacity()))
                + heap(self.method.as_str().len());
        let response = lock(&self.response).as_ref().map_or(0, |r| r.headers.weight());
        let bodies = heap(lock(&self.request_body).bytes.capacity())
            + heap(lock(&self.response_body).bytes.capacity());
        heap(std::mem::size_of::<Self>() + 2 * std::mem::size_of::<usize>())
            + std::mem::size_of::<Arc<Self>>()
            + strings
            + self.request_headers.weight()
            + response
            + bodies
    }

    fn body(&self, side: Side) -> &Mutex<Captured> {
        match side {
            Side::Request => &self.request_body,
            Side::Response => &self.response_body,
        }
    }
}

/// How full the ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Exchanges kept.
    pub kept: usize,
    /// Bytes they hold, as [`Exchange::weight`] counts them.
    pub bytes: usize,
}

#[derive(Debug, Default)]
struct Ring {
    exchanges: VecDeque<Arc<Exchange>>,
    bytes: usize,
}

/// The ring of exchanges, shared by every inspected tunnel of an agent.
#[derive(Debug)]
pub struct Inspector {
    ring: Mutex<Ring>,
    next: AtomicU64,
    limits: Limits,
    /// Told about every new exchange and response (the dashboard's live view). Bounded: a
    /// subscriber that falls behind skips ahead.
    pub events: tokio::sync::broadcast::Sender<String>,
}

impl Inspector {
    /// An empty ring with these caps.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::default(),
            next: AtomicU64::new(1),
            limits,
            events: tokio::sync::broadcast::channel(256).0,
        })
    }

    /// The caps.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Most bytes of each body kept.
    pub fn body_limit(&self) -> usize {
        self.limits.body_limit()
    }

    /// Exchanges kept and the bytes they hold.
    pub fn usage(&self) -> Usage {
        let ring = lock(&self.ring);
        Usage { kept: ring.exchanges.len(), bytes: ring.bytes }
    }

    /// Keeps `ex` as the newest exchange, forgetting the oldest past the caps.
    fn record(&self, ex: Exchange) -> Arc<Exchange> {
        let ex = Arc::new(ex);
        let weight = ex.weight();
        let mut ring = lock(&self.ring);
        ex.kept.store(true, Ordering::Relaxed);
        ex.charged.store(weight, Ordering::Relaxed);
        ring.bytes += weight;
        ring.exchanges.push_back(ex.clone());
        self.evict(&mut ring);
        drop(ring);
        let _ = self.events.send(ex.id.clone());
        ex
    }

    /// Counts `ex` again after it changed (a response head, body bytes, an error).
    fn recount(&self, ex: &Exchange) {
        let weight = ex.weight();
        let mut ring = lock(&self.ring);
        if !ex.kept.load(Ordering::Relaxed) {
            return;
        }
        let was = ex.charged.swap(weight, Ordering::Relaxed);
        ring.bytes = ring.bytes.saturating_sub(was) + weight;
        self.evict(&mut ring);
    }

    /// Forgets the oldest exchanges while either cap is passed.
    fn evict(&self, ring: &mut Ring) {
        while ring.exchanges.len() > self.limits.max_requests || ring.bytes > self.limits.max_bytes
        {
            let Some(old) = ring.exchanges.pop_front() else { break };
            Self::forget(ring, &old);
        }
    }

    fn forget(ring: &mut Ring, ex: &Exchange) {
        ex.kept.store(false, Ordering::Relaxed);
        ring.bytes = ring.bytes.saturating_sub(ex.charged.swap(0, Ordering::Relaxed));
    }

    /// Every exchange kept, newest first.
    pub fn list(&self) -> Vec<Arc<Exchange>> {
        lock(&self.ring).exchanges.iter().rev().cloned().collect()
    }

    /// One exchange.
    pub fn get(&self, id: &str) -> Option<Arc<Exchange>> {
        lock(&self.ring).exchanges.iter().find(|e| e.id == id).cloned()
    }

    /// Forgets every exchange.
    pub fn clear(&self) {
        let mut ring = lock(&self.ring);
        for ex in std::mem::take(&mut ring.exchanges) {
            Self::forget(&mut ring, &ex);
        }
        ring.bytes = 0;
    }

    /// Copies the first bytes of a body's `data` into `ex` (while it is kept), and marks the
    /// body complete at its `end`.
    fn capture(&self, ex: &Exchange, side: Side, data: &[u8], end: bool) {
        if !ex.kept.load(Ordering::Relaxed) {
            return;
        }
        let grown = {
            let mut c = lock(ex.body(side));
            c.size += data.len() as u64;
            let before = c.bytes.capacity();
            let kept = self.body_limit().saturating_sub(c.bytes.len()).min(data.len());
            c.bytes.extend_from_slice(&data[..kept]);
            if end {
                c.complete = true;
                c.bytes.shrink_to_fit();
            }
            c.bytes.capacity() != before
        };
        if grown {
            self.recount(ex);
        }
    }

    fn new_exchange(
        &self,
        tunnel: &str,
        parts: &http::request::Parts,
        replay_of: Option<String>,
    ) -> Exchange {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = format!("req_{n:08}");
        id.shrink_to_fit();
        Exchange {
            id,
            tunnel: tunnel.to_owned(),
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            method: parts.method.clone(),
            uri: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            version: parts.version,
            request_headers: Heads::copy_of(&parts.headers),
            request_body: Mutex::default(),
            response: Mutex::new(None),
            response_body: Mutex::default(),
            error: Mutex::new(None),
            replay_of,
            kept: AtomicBool::new(false),
            charged: AtomicUsize::new(0),
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that copies its first bytes into its exchange as they pass.
    struct Tee<B> {
        #[pin]
        inner: B,
        ex: Arc<Exchange>,
        side: Side,
        inspector: Arc<Inspector>,
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
                let data = frame.data_ref().map_or(&[][..], |d| d.as_ref());
                // Bodies of known length are not polled past their last frame.
                let end = this.inner.is_end_stream();
                this.inspector.capture(this.ex, *this.side, data, end);
            }
            Poll::Ready(None) => this.inspector.capture(this.ex, *this.side, &[], true),
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

fn tee<B>(body: B, ex: &Arc<Exchange>, side: Side, inspector: &Arc<Inspector>) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let body = Tee { inner: body, ex: ex.clone(), side, inspector: inspector.clone() };
    // An empty body is complete before it is polled (and may never be).
    if body.inner.is_end_stream() {
        inspector.capture(ex, side, &[], true);
    }
    body.boxed()
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

/// Sends one request of a recorded exchange (its body already teed) to the target, and
/// records the response head; used for tunnel traffic and replays.
async fn exchange(
    inspector: &Arc<Inspector>,
    spec: &TunnelSpec,
    upstream: &mut Option<Upstream>,
    mut req: Request<ProxyBody>,
    ex: &Arc<Exchange>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let json = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if upstream.is_none() {
        match connect(spec).await {
            Ok(u) => *upstream = Some(u),
            Err(e) => return failed(inspector, ex, spec, &e.to_string(), json),
        }
    }
    if spec.options.upstream_http2 {
        *req.version_mut() = Version::HTTP_2;
    } else if req.version() == Version::HTTP_2 {
        *req.version_mut() = Version::HTTP_11;
    }
    let Some(up) = upstream.as_mut() else {
        return failed(inspector, ex, spec, "no upstream connection", json);
    };
    match up.send(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            *lock(&ex.response) = Some(ResponseHead {
                status: parts.status,
                headers: Heads::copy_of(&parts.headers),
                duration_us: started.elapsed().as_micros() as u64,
            });
            inspector.recount(ex);
            let _ = inspector.events.send(ex.id.clone());
            let body = tee(body, ex, Side::Response, inspector);
            Response::from_parts(parts, body)
        }
        Err(e) => {
            *upstream = None;
            failed(inspector, ex, spec, &e.to_string(), json)
        }
    }
}

/// The agent's 502 page (HTML, or JSON when asked) for a target that cannot be reached.
fn failed(
    inspector: &Inspector,
    ex: &Exchange,
    spec: &TunnelSpec,
    why: &str,
    json: bool,
) -> Response<ProxyBody> {
    *lock(&ex.error) = Some(format!("cannot reach {}: {why}", spec.target));
    inspector.recount(ex);
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
            let ex = inspector.record(inspector.new_exchange(spec.name.as_str(), &parts, None));
            let req = Request::from_parts(parts, tee(body, &ex, Side::Request, &inspector));
            let mut up = upstream.lock().await;
            let mut resp = exchange(&inspector, &spec, &mut up, req, &ex).await;
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
    let mut hm = original.request_headers.to_map();
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
    let ex = inspector.record(inspector.new_exchange(
        spec.name.as_str(),
        &parts,
        Some(original.id.clone()),
    ));
    let req = Request::from_parts(parts, tee(body, &ex, Side::Request, inspector));
    let mut upstream = None;
    let mut body = exchange(inspector, spec, &mut upstream, req, &ex).await.into_body();
    // Read the whole response so the record is complete, keeping only what the tee keeps.
    while let Some(Ok(_)) = body.frame().await {}
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> http::request::Parts {
        Request::builder()
            .uri(uri)
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-empty", "")
            .header("x-forwarded-for", "198.51.100.1")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn limits(max_requests: usize, max_bytes: usize) -> Limits {
        Limits { max_requests, max_bytes }
    }

    /// Records an exchange whose request body of `n` bytes then streams in.
    fn request(insp: &Arc<Inspector>, uri: &str, n: usize) -> Arc<Exchange> {
        let ex = insp.record(insp.new_exchange("t", &parts(uri), None));
        insp.capture(&ex, Side::Request, &vec![7; n], true);
        ex
    }

    fn total(insp: &Inspector) -> usize {
        insp.list().iter().map(|e| e.weight()).sum()
    }

    #[test]
    fn the_ring_stays_within_its_byte_cap_and_clear_empties_it() {
        let insp = Inspector::new(limits(1_000, 8_000));
        for i in 0..50 {
            request(&insp, &format!("/x{i}"), 100);
        }
        let kept = insp.list();
        assert!(kept.len() > 1 && kept.len() < 50, "{} kept", kept.len());
        assert!(total(&insp) <= 8_000, "{} bytes kept", total(&insp));
        assert_eq!(insp.usage(), Usage { kept: kept.len(), bytes: total(&insp) });
        assert_eq!(kept[0].id, "req_00000050", "newest first");
        insp.clear();
        assert!(insp.list().is_empty());
        assert_eq!(insp.usage(), Usage { kept: 0, bytes: 0 });
    }

    #[test]
    fn the_count_cap_keeps_the_newest() {
        let insp = Inspector::new(limits(3, 1 << 20));
        for i in 0..10 {
            request(&insp, &format!("/{i}"), 10);
        }
        let uris: Vec<_> = insp.list().iter().map(|e| e.uri.clone()).collect();
        assert_eq!(uris, ["/9", "/8", "/7"]);
        assert_eq!(insp.usage().bytes, total(&insp));
    }

    #[test]
    fn a_forgotten_exchange_stops_capturing_and_is_not_counted() {
        let insp = Inspector::new(limits(1, 1 << 20));
        let old = insp.record(insp.new_exchange("t", &parts("/old"), None));
        request(&insp, "/new", 10);
        // The old request's body still streams after it was forgotten.
        insp.capture(&old, Side::Request, &[1; 5_000], true);
        assert!(lock(&old.request_body).bytes.is_empty());
        assert_eq!(insp.usage(), Usage { kept: 1, bytes: total(&insp) });
    }

    #[test]
    fn weight_counts_heads_bodies_and_bookkeeping() {
        let insp = Inspector::new(Limits::default());
        let small = request(&insp, "/", 0);
        let big = request(&insp, &format!("/{}", "p".repeat(1_000)), 10_000);
        // Bookkeeping alone is counted...
        assert!(small.weight() >= std::mem::size_of::<Exchange>() + 100, "{}", small.weight());
        // ... and every byte of a longer path and a body, with allocation overhead.
        assert!(big.weight() >= small.weight() + 11_000, "{} {}", big.weight(), small.weight());
        assert_eq!(lock(&big.request_body).bytes.capacity(), 10_000, "an exact-size copy");
    }

    #[test]
    fn bodies_past_the_limit_are_cut_and_sized() {
        let insp = Inspector::new(limits(10, Limits::MIN_BYTES));
        assert_eq!(insp.body_limit(), 8 << 10);
        let ex = insp.record(insp.new_exchange("t", &parts("/"), None));
        for _ in 0..10 {
            insp.capture(&ex, Side::Response, &[1; 1_000], false);
        }
        insp.capture(&ex, Side::Response, &[], true);
        let c = lock(&ex.response_body);
        assert_eq!((c.bytes.len(), c.size, c.complete), (8 << 10, 10_000, true));
        assert_eq!(c.bytes.capacity(), 8 << 10, "shrunk once complete");
    }

    #[test]
    fn heads_are_copied_in_order_and_read_back() {
        let p = parts("/");
        let heads = Heads::copy_of(&p.headers);
        let fields: Vec<_> = heads.iter().collect();
        assert_eq!(
            fields,
            [
                ("x-forwarded-for", &b"203.0.113.7"[..]),
                ("x-forwarded-for", &b"198.51.100.1"[..]),
                ("x-empty", &b""[..]),
            ]
        );
        assert_eq!(heads.to_map(), p.headers);
        assert_eq!(heads.0.len(), 3 * 6 + 15 * 2 + 11 + 12 + 7);
    }

    #[test]
    fn caps_parse_and_refuse_what_would_keep_nothing() {
        assert_eq!(Limits::parse_requests("10"), Ok(10));
        assert!(Limits::parse_requests("0").unwrap_err().contains("--inspect false"));
        assert!(Limits::parse_requests("many").is_err());
        assert_eq!(Limits::parse_bytes("32MiB"), Ok(32 << 20));
        assert_eq!(Limits::parse_bytes("512KiB"), Ok(512 << 10));
        assert!(Limits::parse_bytes("1KiB").unwrap_err().contains("64KiB"));
        assert!(Limits::parse_bytes("lots").is_err());
        assert_eq!(Limits::default().body_limit(), 64 << 10);
    }
}

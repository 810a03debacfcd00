//! gRPC and HTTP/2 without tonic: a bidirectional-streaming echo backend speaking h2c, a
//! visitor that plays ping-pong with it over any already-connected stream (plain TCP for h2c,
//! TLS for h2), a plain HTTP/2 GET, and TLS connectors (one verifying against a CA file, one
//! accepting any certificate and reporting which one it saw).
//!
//! The wire format is gRPC's: each message is a 1-byte compressed flag (always 0 here), a u32
//! big-endian length and the bytes; `content-type: application/grpc`; the status travels in the
//! `grpc-status` trailer. Not a gRPC implementation: no compression, deadlines or metadata
//! beyond what the tests check.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail, ensure};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures::SinkExt as _;
use futures::channel::mpsc;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::task::AbortOnDropHandle;

use crate::util::IO_TIMEOUT;

/// The one method the echo backend implements (bidirectional streaming).
pub const CHAT_PATH: &str = "/warren.test.Echo/Chat";

/// What the backend prefixes to every message it echoes.
pub const ECHO_PREFIX: &[u8] = b"echo:";

/// Largest message either side accepts (gRPC's default receive limit).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// `content-type` of gRPC requests and responses.
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// gRPC status codes used here.
const GRPC_OK: &str = "0";
const GRPC_RESOURCE_EXHAUSTED: &str = "8";
const GRPC_UNIMPLEMENTED: &str = "12";
const GRPC_INTERNAL: &str = "13";

/// Encodes one gRPC message: flag 0, u32 big-endian length, the bytes.
pub fn encode_message(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(0);
    // Payloads over 4 GiB cannot occur in tests; saturate rather than wrap.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Takes one complete gRPC message off the front of `buf`: `Ok(None)` if more bytes are
/// needed, `Err` if the message is compressed or longer than [`MAX_MESSAGE`].
pub fn decode_message(buf: &mut BytesMut) -> Result<Option<Bytes>, MessageError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(MessageError::Compressed(buf[0]));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(MessageError::TooLong(len));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Why [`decode_message`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageError {
    /// The compressed flag was set (its value); no compression is negotiated here.
    Compressed(u8),
    /// The declared length exceeds [`MAX_MESSAGE`].
    TooLong(usize),
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Compressed(flag) => write!(f, "compressed flag {flag} without negotiation"),
            Self::TooLong(len) => write!(f, "message of {len} bytes exceeds {MAX_MESSAGE}"),
        }
    }
}

impl std::error::Error for MessageError {}

/// A gRPC echo server speaking h2c (HTTP/2 with prior knowledge) on 127.0.0.1:
/// - `POST /warren.test.Echo/Chat` with `content-type: application/grpc`: answers every
///   message as soon as it is complete with `echo:` + the payload (so ping-pong works, proving
///   the stream is not buffered); when the request ends, trailers `grpc-status: 0`. The
///   response headers carry `x-seen-forwarded-for` (the request's `X-Forwarded-For`, values
///   joined by `, `) and `x-seen-te` when the request had them;
/// - the same path with another content type: HTTP 415;
/// - anything else: HTTP 200 with trailers `grpc-status: 12` (UNIMPLEMENTED).
///
/// Stops on drop.
#[derive(Debug)]
pub struct GrpcEchoBackend {
    addr: SocketAddr,
    _task: AbortOnDropHandle<()>,
}

impl GrpcEchoBackend {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind grpc backend")?;
        let addr = listener.local_addr().context("grpc backend addr")?;
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        conns.spawn(serve_h2(stream));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, _task: AbortOnDropHandle::new(task) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port, as given to `warren http`.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Serves one HTTP/2 connection (prior knowledge) with the echo service.
async fn serve_h2<I>(io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service_fn(handle))
        .await;
}

async fn handle(req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    if req.method() != Method::POST || req.uri().path() != CHAT_PATH {
        return Ok(trailers_only_response(GRPC_UNIMPLEMENTED, Some("unknown method")));
    }
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(GRPC_CONTENT_TYPE));
    if !is_grpc {
        let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Ok(resp);
    }
    let (parts, body) = req.into_parts();
    let mut builder =
        Response::builder().status(StatusCode::OK).header(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    let forwarded: Vec<&str> =
        parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    if !forwarded.is_empty() {
        builder = builder.header("x-seen-forwarded-for", forwarded.join(", "));
    }
    if let Some(te) = parts.headers.get(TE) {
        builder = builder.header("x-seen-te", te.clone());
    }
    let state = EchoState { body, buf: BytesMut::new(), done: false };
    let stream = futures::stream::unfold(state, echo_step);
    let body = StreamBody::new(stream).boxed_unsync();
    Ok(builder.body(body).unwrap_or_else(|_| Response::new(empty_body())))
}

fn empty_body() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// HTTP 200 with no messages and the status in the trailers.
fn trailers_only_response(
    status: &'static str,
    message: Option<&'static str>,
) -> Response<ResponseBody> {
    let frame = Frame::trailers(grpc_trailers(status, message));
    let body = StreamBody::new(futures::stream::iter([Ok(frame)])).boxed_unsync();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
    resp
}

fn grpc_trailers(status: &'static str, message: Option<&'static str>) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(message) = message {
        trailers.insert("grpc-message", HeaderValue::from_static(message));
    }
    trailers
}

/// The echo response body, pulled by hyper: it reads the request body only as fast as the
/// visitor consumes answers, and answers each message as soon as it is complete.
struct EchoState {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

async fn echo_step(mut st: EchoState) -> Option<(Result<Frame<Bytes>, hyper::Error>, EchoState)> {
    if st.done {
        return None;
    }
    loop {
        match decode_message(&mut st.buf) {
            Ok(Some(msg)) => {
                let reply = encode_message(&[ECHO_PREFIX, &msg[..]].concat());
                return Some((Ok(Frame::data(reply)), st));
            }
            Ok(None) => {}
            Err(MessageError::Compressed(_)) => {
                st.done = true;
                let t = grpc_trailers(GRPC_INTERNAL, Some("compressed message"));
                return Some((Ok(Frame::trailers(t)), st));
            }
            Err(MessageError::TooLong(_)) => {
                st.done = true;
                let t = grpc_trailers(GRPC_RESOURCE_EXHAUSTED, Some("message too long"));
                return Some((Ok(Frame::trailers(t)), st));
            }
        }
        match st.body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    st.buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                st.done = true;
                return Some((Err(e), st));
            }
            None => {
                st.done = true;
                let t = if st.buf.is_empty() {
                    grpc_trailers(GRPC_OK, None)
                } else {
                    grpc_trailers(GRPC_INTERNAL, Some("request ended inside a message"))
                };
                return Some((Ok(Frame::trailers(t)), st));
            }
        }
    }
}

/// What a [`grpc_ping_pong`] call saw.
#[derive(Debug, Clone)]
pub struct GrpcOutcome {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// The messages received, in order, without framing.
    pub replies: Vec<Vec<u8>>,
    /// `grpc-status` from the trailers (or from the headers for a trailers-only response).
    pub grpc_status: Option<String>,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response trailers (empty if none came).
    pub trailers: HeaderMap,
    /// The raw body when the response was not gRPC (status not 200 or another content type),
    /// e.g. a proxy's error page; empty otherwise.
    pub body: Vec<u8>,
}

type RequestBody = StreamBody<mpsc::Receiver<Result<Frame<Bytes>, Infallible>>>;

/// Calls `/warren.test.Echo/Chat` over `conn` (already connected: a `TcpStream` for h2c, a
/// TLS stream that negotiated `h2` for HTTP/2 over TLS) with `:scheme` `scheme` and
/// `:authority` `authority`, playing ping-pong: message 1 is sent, reply 1 awaited, then
/// message 2, and so on; then the request body ends and the remaining replies and trailers are
/// collected.
///
/// A response that ends early, or is not gRPC at all (an error page), is not an error: the
/// outcome shows what came. Every wait is bounded by [`IO_TIMEOUT`].
pub async fn grpc_ping_pong<S>(
    conn: S,
    scheme: &str,
    authority: &str,
    messages: &[&[u8]],
) -> anyhow::Result<GrpcOutcome>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, _conn) = h2_handshake::<S, RequestBody>(conn).await?;
    let (mut tx, rx) = mpsc::channel(4);
    let req = Request::post(format!("{scheme}://{authority}{CHAT_PATH}"))
        .header(CONTENT_TYPE, GRPC_CONTENT_TYPE)
        .header(TE, "trailers")
        .body(StreamBody::new(rx))
        .context("build grpc request")?;
    // The request goes out when send_request is called; the first message is sent before the
    // response headers are awaited, so a proxy that holds headers until data flows still works.
    let response = sender.send_request(req);
    let mut pending = messages.iter();
    match pending.next() {
        Some(first) => send_message(&mut tx, first).await?,
        None => tx.close_channel(),
    }
    let resp = tokio::time::timeout(IO_TIMEOUT, response)
        .await
        .context("no grpc response headers in time")?
        .context("grpc request failed")?;
    let (parts, body) = resp.into_parts();
    let is_grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(GRPC_CONTENT_TYPE));
    if parts.status != StatusCode::OK || !is_grpc {
        // An error page from a proxy, say: keep it for the test's message.
        drop(tx);
        let body = tokio::time::timeout(IO_TIMEOUT, body.collect())
            .await
            .context("error body not read in time")?
            .context("read error body")?
            .to_bytes();
        let grpc_status = header_text(&parts.headers, "grpc-status");
        return Ok(GrpcOutcome {
            status: parts.status,
            replies: Vec::new(),
            grpc_status,
            headers: parts.headers,
            trailers: HeaderMap::new(),
            body: body.to_vec(),
        });
    }
    let mut reader = MessageReader { body, buf: BytesMut::new(), trailers: None };
    let mut replies = Vec::new();
    if !messages.is_empty() {
        let mut ended = false;
        match reader.next().await? {
            Some(reply) => replies.push(reply),
            None => ended = true,
        }
        if !ended {
            for msg in pending {
                send_message(&mut tx, msg).await?;
                match reader.next().await? {
                    Some(reply) => replies.push(reply),
                    None => break,
                }
            }
        }
    }
    drop(tx);
    while let Some(reply) = reader.next().await? {
        replies.push(reply);
    }
    let trailers = reader.trailers.unwrap_or_default();
    let grpc_status = header_text(&trailers, "grpc-status")
        .or_else(|| header_text(&parts.headers, "grpc-status"));
    Ok(GrpcOutcome {
        status: parts.status,
        replies,
        grpc_status,
        headers: parts.headers,
        trailers,
        body: Vec::new(),
    })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn send_message(
    tx: &mut mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    msg: &[u8],
) -> anyhow::Result<()> {
    tokio::time::timeout(IO_TIMEOUT, tx.send(Ok(Frame::data(encode_message(msg)))))
        .await
        .context("request body stalled")?
        .context("request body closed by the connection")
}

/// Reads gRPC messages off a response body, keeping the trailers.
struct MessageReader {
    body: Incoming,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
}

impl MessageReader {
    /// The next message, or `None` at the end of the body.
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            if let Some(msg) = decode_message(&mut self.buf).context("bad grpc message")? {
                return Ok(Some(msg.to_vec()));
            }
            let frame = tokio::time::timeout(IO_TIMEOUT, self.body.frame())
                .await
                .context("no grpc reply in time")?;
            let Some(frame) = frame else {
                ensure!(self.buf.is_empty(), "response ended inside a message");
                return Ok(None);
            };
            match frame.context("read grpc response")?.into_data() {
                Ok(data) => self.buf.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        self.trailers.get_or_insert_with(HeaderMap::new).extend(t);
                    }
                }
            }
        }
    }
}

/// `GET scheme://authority/path` over HTTP/2 on `conn` (h2c on a `TcpStream`, h2 on a TLS
/// stream), returning the status, version, headers and whole body.
pub async fn h2_get<S>(
    conn: S,
    scheme: &str,
    authority: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, Version, HeaderMap, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    h2_get_with(conn, scheme, authority, path, &[]).await
}

/// [`h2_get`] with extra request headers (`host` among them if wanted: it travels beside
/// `:authority`).
pub async fn h2_get_with<S>(
    conn: S,
    scheme: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, Version, HeaderMap, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, _conn) = h2_handshake::<S, Empty<Bytes>>(conn).await?;
    let mut req = Request::get(format!("{scheme}://{authority}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::new()).context("build GET request")?;
    let resp = tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .context("no response in time")?
        .context("GET failed")?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(IO_TIMEOUT, body.collect())
        .await
        .context("body not read in time")?
        .context("read body")?
        .to_bytes();
    Ok((parts.status, parts.version, parts.headers, body.to_vec()))
}

/// HTTP/2 client handshake on `conn`; the connection runs until the returned handle drops.
async fn h2_handshake<S, B>(
    conn: S,
) -> anyhow::Result<(hyper::client::conn::http2::SendRequest<B>, AbortOnDropHandle<()>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = tokio::time::timeout(
        IO_TIMEOUT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn)),
    )
    .await
    .context("HTTP/2 handshake timed out")?
    .context("HTTP/2 handshake")?;
    let task = AbortOnDropHandle::new(tokio::spawn(async move {
        let _ = connection.await;
    }));
    tokio::time::timeout(IO_TIMEOUT, sender.ready())
        .await
        .context("HTTP/2 connection not ready in time")?
        .context("HTTP/2 connection not ready")?;
    Ok((sender, task))
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connects to `addr` and does a TLS handshake for `server_name` (a DNS name or an IP address),
/// trusting only the certificates in the PEM file `ca_pem` and offering the ALPN protocols
/// `alpn` (e.g. `[b"h2"]`). Bounded by [`IO_TIMEOUT`].
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
    alpn: &[&[u8]],
) -> anyhow::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("read CA file {}", ca_pem.display()))?
    {
        let cert = cert.with_context(|| format!("parse CA file {}", ca_pem.display()))?;
        roots.add(cert).context("add CA certificate")?;
    }
    ensure!(!roots.is_empty(), "no certificate in {}", ca_pem.display());
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    handshake(config, addr, server_name).await
}

/// Like [`tls_connect`] but accepts any certificate (signatures are still checked), and returns
/// the DER of the leaf certificate the server presented, for tests that check which
/// certificate a visitor is shown.
pub async fn tls_connect_any_cert(
    addr: SocketAddr,
    server_name: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    let provider = ring_provider();
    let verifier = AcceptAnyCert { algorithms: provider.signature_verification_algorithms };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let stream = handshake(config, addr, server_name).await?;
    let leaf = peer_leaf(&stream).context("server presented no certificate")?;
    Ok((stream, leaf))
}

/// The DER of the leaf certificate the server presented on `stream`.
pub fn peer_leaf<IO>(stream: &TlsStream<IO>) -> Option<Vec<u8>> {
    stream.get_ref().1.peer_certificates()?.first().map(|c| c.to_vec())
}

/// The ALPN protocol the server chose on `stream`, if any.
pub fn alpn_protocol<IO>(stream: &TlsStream<IO>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

async fn handshake(
    config: ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("invalid TLS server name {server_name:?}"))?;
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect {addr}: timed out"))?
        .with_context(|| format!("connect {addr}"))?;
    let connector = TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(e).with_context(|| format!("TLS handshake with {addr} as {server_name}")),
        Err(_) => bail!("TLS handshake with {addr} as {server_name}: timed out"),
    }
}

/// Accepts every certificate chain; handshake signatures are still verified so the server
/// must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::PrivateKeyDer;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::util::TempDir;

    #[test]
    fn codec_round_trip_and_limits() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode_message(b"one"));
        buf.extend_from_slice(&encode_message(b""));
        let half = encode_message(b"three");
        buf.extend_from_slice(&half[..4]);
        assert_eq!(decode_message(&mut buf).unwrap().unwrap(), &b"one"[..]);
        assert_eq!(decode_message(&mut buf).unwrap().unwrap(), &b""[..]);
        assert_eq!(decode_message(&mut buf).unwrap(), None);
        buf.extend_from_slice(&half[4..]);
        assert_eq!(decode_message(&mut buf).unwrap().unwrap(), &b"three"[..]);
        assert!(buf.is_empty());

        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 1, b'x'][..]);
        assert_eq!(decode_message(&mut compressed), Err(MessageError::Compressed(1)));
        let mut huge = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode_message(&mut huge), Err(MessageError::TooLong(_))));
    }

    #[tokio::test]
    async fn ping_pong_over_h2c() {
        let backend = GrpcEchoBackend::start().await.unwrap();
        let conn = TcpStream::connect(backend.addr()).await.unwrap();
        let authority = format!("127.0.0.1:{}", backend.port());
        let out =
            grpc_ping_pong(conn, "http", &authority, &[b"one", b"two", b"three"]).await.unwrap();
        assert_eq!(out.status, StatusCode::OK);
        assert_eq!(
            out.replies,
            vec![b"echo:one".to_vec(), b"echo:two".to_vec(), b"echo:three".to_vec()]
        );
        assert_eq!(out.grpc_status.as_deref(), Some("0"));
        assert!(out.trailers.get("grpc-message").is_none());
        assert_eq!(out.headers.get(CONTENT_TYPE).unwrap(), GRPC_CONTENT_TYPE);
        assert_eq!(out.headers.get("x-seen-te").unwrap(), "trailers");
        assert!(out.headers.get("x-seen-forwarded-for").is_none());
    }

    #[tokio::test]
    async fn reports_forwarded_for() {
        let backend = GrpcEchoBackend::start().await.unwrap();
        let conn = TcpStream::connect(backend.addr()).await.unwrap();
        let (mut sender, _conn) = h2_handshake::<_, RequestBody>(conn).await.unwrap();
        let (mut tx, rx) = mpsc::channel(1);
        let req = Request::post(format!("http://x{CHAT_PATH}"))
            .header(CONTENT_TYPE, "application/grpc+proto")
            .header("x-forwarded-for", "203.0.113.7")
            .body(StreamBody::new(rx))
            .unwrap();
        let response = sender.send_request(req);
        send_message(&mut tx, b"hi").await.unwrap();
        drop(tx);
        let resp = response.await.unwrap();
        assert_eq!(resp.headers().get("x-seen-forwarded-for").unwrap(), "203.0.113.7");
        let mut reader =
            MessageReader { body: resp.into_body(), buf: BytesMut::new(), trailers: None };
        assert_eq!(reader.next().await.unwrap().unwrap(), b"echo:hi");
        assert_eq!(reader.next().await.unwrap(), None);
        assert_eq!(reader.trailers.unwrap().get("grpc-status").unwrap(), "0");
    }

    #[tokio::test]
    async fn other_paths_are_unimplemented() {
        let backend = GrpcEchoBackend::start().await.unwrap();
        let conn = TcpStream::connect(backend.addr()).await.unwrap();
        let (status, version, headers, body) = h2_get(conn, "http", "x", "/nope").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(headers.get(CONTENT_TYPE).unwrap(), GRPC_CONTENT_TYPE);
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn empty_chat_gets_ok_trailers() {
        let backend = GrpcEchoBackend::start().await.unwrap();
        let conn = TcpStream::connect(backend.addr()).await.unwrap();
        let out = grpc_ping_pong(conn, "http", "x", &[]).await.unwrap();
        assert!(out.replies.is_empty());
        assert_eq!(out.grpc_status.as_deref(), Some("0"));
    }

    #[tokio::test]
    async fn non_grpc_answer_is_an_outcome() {
        let http = crate::HttpBackend::start().await;
        let conn = TcpStream::connect(http.addr).await.unwrap();
        let out = grpc_ping_pong(conn, "http", "x", &[b"one", b"two"]).await.unwrap();
        assert_eq!(out.status, StatusCode::NOT_FOUND);
        assert!(out.replies.is_empty());
        assert_eq!(out.grpc_status, None);
    }

    /// A CA and a leaf for `echo.test` made with the `openssl` CLI, or `None` if it is missing.
    fn openssl_certs(tmp: &TempDir) -> Option<()> {
        let run = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(tmp.path())
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        tmp.write("ext", "subjectAltName=DNS:echo.test\nbasicConstraints=critical,CA:FALSE\n");
        let ok = run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-days", "2", "-subj", "/CN=warren-test-ca"],
        ]
        .concat())
            && run(&[
                &["req"][..],
                &ec,
                &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=echo.test"],
            ]
            .concat())
            && run(&[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "leaf.pem",
                "-days",
                "2",
                "-extfile",
                "ext",
            ]);
        ok.then_some(())
    }

    #[tokio::test]
    async fn ping_pong_over_tls_and_leaf_seen() {
        let tmp = TempDir::new("grpc-tls");
        if openssl_certs(&tmp).is_none() {
            eprintln!("note: openssl CLI unavailable, skipping the TLS test");
            return;
        }
        let certs: Vec<_> = CertificateDer::pem_file_iter(tmp.join("leaf.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let leaf_der = certs[0].to_vec();
        let key = PrivateKeyDer::from_pem_file(tmp.join("leaf.key")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_h2(tls).await;
                    }
                });
            }
        }));

        let tls = tls_connect(addr, "echo.test", &tmp.join("ca.pem"), &[b"h2"]).await.unwrap();
        assert_eq!(alpn_protocol(&tls).as_deref(), Some(&b"h2"[..]));
        assert_eq!(peer_leaf(&tls).unwrap(), leaf_der);
        let out = grpc_ping_pong(tls, "https", "echo.test", &[b"a", b"b"]).await.unwrap();
        assert_eq!(out.replies, vec![b"echo:a".to_vec(), b"echo:b".to_vec()]);
        assert_eq!(out.grpc_status.as_deref(), Some("0"));

        let err = tls_connect(addr, "other.test", &tmp.join("ca.pem"), &[b"h2"]).await;
        assert!(err.is_err(), "a wrong name must fail verification");

        let (tls, leaf) = tls_connect_any_cert(addr, "whatever.test", &[b"h2"]).await.unwrap();
        assert_eq!(leaf, leaf_der);
        let (status, version, _, _) = h2_get(tls, "https", "whatever.test", "/").await.unwrap();
        assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    }
}

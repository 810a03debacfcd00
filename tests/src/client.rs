//! Visitors: HTTP/1.1 over a plain TcpStream with an explicit `Host`, TCP echo exchanges,
//! WebSocket.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;

use crate::util::{IO_TIMEOUT, hex, random_bytes, sha256};

/// A response with its whole body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 client connection to `addr`; requests are sent one after another on it
/// (keep-alive).
#[derive(Debug)]
pub struct HttpConn {
    sender: SendRequest<BoxBody<Bytes, Infallible>>,
    task: JoinHandle<()>,
}

impl HttpConn {
    /// Connects and does the (trivial) HTTP/1.1 handshake.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("http handshake")?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, task })
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<HttpResponse> {
        self.send_body(req.map(BodyExt::boxed)).await
    }

    /// Sends a request with any body (e.g. [`chunked_body`]) and reads the whole response.
    pub async fn send_body(
        &mut self,
        req: Request<BoxBody<Bytes, Infallible>>,
    ) -> anyhow::Result<HttpResponse> {
        self.sender.ready().await.context("connection not ready for another request")?;
        let resp = self.sender.send_request(req).await.context("send request")?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.context("read response body")?.to_bytes();
        Ok(HttpResponse { status: parts.status, headers: parts.headers, body })
    }

    /// `GET path` with `Host: host`.
    pub async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<HttpResponse> {
        self.send(request(Method::GET, host, path, Bytes::new())).await
    }

    /// `POST path` with `Host: host` and `body`.
    pub async fn post(
        &mut self,
        host: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<HttpResponse> {
        self.send(request(Method::POST, host, path, body.into())).await
    }
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request body of unknown length, so hyper sends it with `Transfer-Encoding: chunked`.
pub fn chunked_body(chunks: Vec<Bytes>) -> BoxBody<Bytes, Infallible> {
    let frames = futures::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))));
    BodyExt::boxed(StreamBody::new(frames))
}

/// Builds a request with a `Host` header.
pub fn request(method: Method, host: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .body(Full::new(body))
        .expect("valid request")
}

/// `GET path` with `Host: host` on a fresh connection to `addr`.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<HttpResponse> {
    let mut conn = HttpConn::connect(addr).await?;
    conn.get(host, path).await
}

/// `POST path` with `Host: host` on a fresh connection to `addr`.
pub async fn http_post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<HttpResponse> {
    let mut conn = HttpConn::connect(addr).await?;
    conn.post(host, path, body).await
}

/// `GET /` must answer 200 with exactly `expected` as body.
pub async fn expect_get(addr: SocketAddr, host: &str, expected: &str) -> anyhow::Result<()> {
    let resp = tokio::time::timeout(IO_TIMEOUT, http_get(addr, host, "/"))
        .await
        .context("GET / timed out")??;
    ensure!(
        resp.status == StatusCode::OK && resp.text() == expected,
        "GET / with Host {host}: got {} {:?}, want 200 {expected:?}",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// A response read off a raw connection (see [`raw_exchange`]).
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    /// The body, de-chunked when it came chunked.
    pub body: String,
}

impl RawResponse {
    /// The values of response header `name` (any case), as sent.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// The values a [`crate::HttpBackend`]'s `/headers` answer gives for `name` (lower case).
    pub fn seen(&self, name: &str) -> Vec<String> {
        crate::parse_headers(&self.body)
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// The single value the backend saw for `name`.
    pub fn seen_one(&self, name: &str) -> String {
        let values = self.seen(name);
        assert_eq!(
            values.len(),
            1,
            "backend saw {name} {values:?}; response:\n{}\n\n{}",
            self.head,
            self.body
        );
        values[0].clone()
    }
}

/// Connects to `addr`, writes `request` exactly as given (a PROXY header, odd request lines,
/// repeated headers: whatever a client library would not send) and reads until the peer closes,
/// so the request should end its head with `Connection: close`. Bounded by [`IO_TIMEOUT`].
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> anyhow::Result<RawResponse> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        s.write_all(request).await.context("write request")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.context("read response")?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(IO_TIMEOUT, fut).await.context("no response in time")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no complete response head in {text:?}");
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok(RawResponse { status, head: head.to_owned(), body })
}

/// The data of a chunked body (extensions and trailers dropped).
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Connects to `addr`, sends `len` random bytes, reads `len` bytes back and checks they match.
pub async fn tcp_echo(addr: SocketAddr, len: usize) -> anyhow::Result<()> {
    let payload = random_bytes(len);
    let fut = async {
        let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&payload).await.context("write")?;
            w.flush().await.context("flush")?;
            anyhow::Ok(())
        };
        let read = async {
            let mut back = vec![0u8; len];
            r.read_exact(&mut back).await.with_context(|| format!("read {len} echoed bytes"))?;
            anyhow::Ok(back)
        };
        let ((), back) = tokio::try_join!(write, read)?;
        ensure!(back == payload, "echoed {len} bytes differ from what was sent");
        anyhow::Ok(())
    };
    tokio::time::timeout(IO_TIMEOUT, fut).await.context("tcp echo timed out")?
}

/// Sends `total` bytes to an echo service at `addr` while reading them back concurrently, and
/// checks that the SHA-256 of what came back equals that of what was sent.
pub async fn tcp_bulk_echo(addr: SocketAddr, total: usize) -> anyhow::Result<()> {
    const CHUNK: usize = 64 * 1024;
    // A pool of random bytes; chunks start at varying offsets so no two chunks are alike.
    let pool = random_bytes(4 * 1024 * 1024);
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let (mut r, mut w) = stream.split();
    let write = async {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut sent = 0usize;
        let mut i = 0usize;
        while sent < total {
            let n = CHUNK.min(total - sent);
            let off = (i * 4099) % (pool.len() - CHUNK);
            let chunk = &pool[off..off + n];
            w.write_all(chunk).await.with_context(|| format!("write after {sent} bytes"))?;
            ctx.update(chunk);
            sent += n;
            i += 1;
        }
        w.flush().await.context("flush")?;
        anyhow::Ok(ctx.finish())
    };
    let read = async {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0usize;
        while got < total {
            let want = CHUNK.min(total - got);
            let n = r
                .read(&mut buf[..want])
                .await
                .with_context(|| format!("read after {got} bytes"))?;
            if n == 0 {
                bail!("connection closed after {got} of {total} echoed bytes");
            }
            ctx.update(&buf[..n]);
            got += n;
        }
        anyhow::Ok(ctx.finish())
    };
    let (sent, got) = tokio::try_join!(write, read)?;
    ensure!(
        sent.as_ref() == got.as_ref(),
        "SHA-256 of echoed data {} differs from sent {}",
        hex(got.as_ref()),
        hex(sent.as_ref())
    );
    Ok(())
}

/// Connects to `addr` and expects the peer to close without sending anything.
pub async fn expect_eof(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
        .await
        .context("no EOF: connection stayed open")?
        .context("read failed instead of a clean close")?;
    ensure!(n == 0, "expected EOF, got {n} bytes: {:?}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

/// Opens a WebSocket to `ws://HOST/path` over a TCP connection to `addr` and checks that a text
/// and a binary message come back unchanged.
pub async fn websocket_echo(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<()> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    websocket_echo_on(stream, &format!("ws://{host}{path}")).await
}

/// Like [`websocket_echo`] over an already-connected stream (e.g. TLS that negotiated
/// `http/1.1`); `uri` (`ws://HOST/path` or `wss://HOST/path`) gives the `Host` and the path.
pub async fn websocket_echo_on<S>(stream: S, uri: &str) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tungstenite::Message;
    let (mut ws, resp) =
        tokio_tungstenite::client_async(uri, stream).await.context("websocket handshake")?;
    ensure!(resp.status() == StatusCode::SWITCHING_PROTOCOLS, "upgrade answered {}", resp.status());
    let text = "hello through the warren";
    ws.send(Message::text(text)).await.context("send text")?;
    let binary = random_bytes(200 * 1024);
    ws.send(Message::binary(binary.clone())).await.context("send binary")?;
    let mut got_text = None;
    let mut got_binary = None;
    while got_text.is_none() || got_binary.is_none() {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => got_text = Some(t.to_string()),
            Some(Ok(Message::Binary(b))) => got_binary = Some(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => bail!("unexpected websocket message {other:?}"),
            Some(Err(e)) => return Err(e).context("websocket read"),
            None => bail!("websocket closed before both echoes arrived"),
        }
    }
    ensure!(got_text.as_deref() == Some(text), "text echo differs: {got_text:?}");
    let got_binary = got_binary.unwrap_or_default();
    ensure!(
        sha256(&got_binary) == sha256(&binary),
        "binary echo differs ({} bytes back, {} sent)",
        got_binary.len(),
        binary.len()
    );
    ws.close(None).await.context("close")?;
    Ok(())
}

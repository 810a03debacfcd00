//! Hand-made peers for the control port: TLS and QUIC clients that trust anything, a minimal
//! yamux client, and the bytes of warren's preface and frames.
//!
//! These speak to the relay the way a hostile or broken agent would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};
use warren_proto::message::Token;
use warren_proto::{AgentId, Hello, Message, Preface};

/// A rustls client config with ALPN `warren/1` that trusts any server certificate: these
/// clients test the relay's robustness, not its identity.
pub fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    warren_transport::Trust::Insecure.client_config().expect("insecure client config")
}

/// TCP connect plus TLS handshake to the relay's control port.
pub async fn tls_connect(addr: SocketAddr) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let connector = tokio_rustls::TlsConnector::from(insecure_client_config());
    let name = ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await.context("TLS handshake with the relay")
}

/// The bytes of a TLS ClientHello as an agent would send it (for half-finished handshakes).
pub fn client_hello() -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn =
        rustls::ClientConnection::new(insecure_client_config(), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

/// A QUIC client endpoint on 127.0.0.1 that trusts any certificate and offers ALPN `warren/1`.
pub fn quic_endpoint() -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(insecure_client_config())
        .context("QUIC client config")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle timeout")));
    cfg.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).context("QUIC endpoint")?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// A QUIC connection to the relay's control port (keep the endpoint alive as long as it).
pub async fn quic_connect(
    addr: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = quic_endpoint()?;
    let conn = endpoint
        .connect(addr, "localhost")
        .context("QUIC connect")?
        .await
        .context("QUIC handshake with the relay")?;
    Ok((endpoint, conn))
}

/// A yamux client session over a TLS stream: one outbound stream (stream 1, where an agent
/// speaks its control protocol) and a task that drives the session.
#[derive(Debug)]
pub struct YamuxStream {
    /// Stream 1, with tokio's I/O traits.
    pub stream: Compat<yamux::Stream>,
    driver: JoinHandle<()>,
}

impl YamuxStream {
    /// Starts yamux (client side) on `tls` and opens the first stream.
    pub async fn open(tls: TlsStream<TcpStream>) -> anyhow::Result<Self> {
        let mut conn =
            yamux::Connection::new(tls.compat(), yamux::Config::default(), yamux::Mode::Client);
        let stream = futures::future::poll_fn(|cx| conn.poll_new_outbound(cx))
            .await
            .context("open yamux stream")?;
        let driver = tokio::spawn(async move {
            while let Some(Ok(_inbound)) =
                futures::future::poll_fn(|cx| conn.poll_next_inbound(cx)).await
            {}
        });
        Ok(Self { stream: stream.compat(), driver })
    }
}

impl Drop for YamuxStream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The 10-byte session preface announcing versions `min..=max`.
pub fn preface(min: u16, max: u16) -> Vec<u8> {
    let mut v = Vec::new();
    Preface { min, max }.encode(&mut v);
    v
}

/// A `Hello` frame.
pub fn hello_frame(token: &str, agent_id: &str) -> Vec<u8> {
    let mut v = Vec::new();
    Message::Hello(Hello {
        token: Token::new(token),
        agent_id: AgentId::parse(agent_id).expect("valid agent id"),
        agent_version: "99.0.0-test".into(),
    })
    .encode(&mut v);
    v
}

/// A frame header of type `kind` announcing `len` payload bytes (no payload).
pub fn frame_header(kind: u16, len: u32) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A yamux v0 header: version, type, flags, stream id, length.
pub fn yamux_header(kind: u8, flags: u16, stream: u32, len: u32) -> Vec<u8> {
    let mut v = vec![0u8, kind];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Reads until one whole control frame decodes, or fails at end of stream or after `timeout`.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> anyhow::Result<Message> {
    let fut = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            match Message::decode(&buf) {
                Ok((msg, _)) => return Ok(msg),
                Err(e) if e.is_incomplete() => {}
                Err(e) => bail!("relay sent an undecodable frame ({e}): {buf:?}"),
            }
            let n = r.read(&mut chunk).await.context("read from relay")?;
            if n == 0 {
                bail!("stream ended after {} bytes without a whole frame: {buf:?}", buf.len());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, fut).await.context("no frame from the relay in time")?
}

/// Reads and discards until end of stream or an error (`Some(bytes read)`), or `None` if the
/// peer neither sent an end nor failed the stream within `timeout`.
pub async fn drain<R: AsyncRead + Unpin>(r: &mut R, timeout: Duration) -> Option<usize> {
    let mut total = 0;
    let mut chunk = vec![0u8; 4096];
    tokio::time::timeout(timeout, async {
        while let Ok(n) = r.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            total += n;
        }
    })
    .await
    .ok()
    .map(|()| total)
}

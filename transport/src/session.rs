//! The session handle and its streams.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::mux::{MuxHandle, MuxStream};
use crate::tuning;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which transport a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP, multiplexed with yamux.
    Tcp,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// One encrypted connection carrying many streams. Cheap to clone; the connection closes when
/// [`Session::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Inner,
    remote: SocketAddr,
}

#[derive(Clone)]
enum Inner {
    Quic { conn: quinn::Connection, _endpoint: Option<quinn::Endpoint> },
    Mux(Arc<MuxHandle>),
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("kind", &self.kind()).field("remote", &self.remote).finish()
    }
}

impl Session {
    pub(crate) fn quic(conn: quinn::Connection, endpoint: Option<quinn::Endpoint>) -> Self {
        let remote = conn.remote_address();
        Self { inner: Inner::Quic { conn, _endpoint: endpoint }, remote }
    }

    pub(crate) fn mux(handle: MuxHandle, remote: SocketAddr) -> Self {
        Self { inner: Inner::Mux(Arc::new(handle)), remote }
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        match self.inner {
            Inner::Quic { .. } => TransportKind::Quic,
            Inner::Mux(_) => TransportKind::Tcp,
        }
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// Opens a new bidirectional stream. No round trip is needed before writing to it.
    pub async fn open(&self) -> io::Result<Stream> {
        match &self.inner {
            Inner::Quic { conn, .. } => {
                let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
                Ok(Stream::Quic { send, recv })
            }
            Inner::Mux(m) => m.open().await.map(Stream::Mux),
        }
    }

    /// Waits for the peer to open a stream. `Err` once the session is closed.
    pub async fn accept(&self) -> io::Result<Stream> {
        match &self.inner {
            Inner::Quic { conn, .. } => {
                let (send, recv) = conn.accept_bi().await.map_err(io::Error::other)?;
                Ok(Stream::Quic { send, recv })
            }
            Inner::Mux(m) => m.accept().await.map(Stream::Mux),
        }
    }

    /// The relay calls this once the agent is authenticated: a QUIC session's receive window
    /// grows from [`tuning::PRE_AUTH_WINDOW`] to [`tuning::QUIC_CONN_WINDOW`]. Over TLS + yamux
    /// nothing changes: the one stream the relay accepts from an agent is bounded by its own
    /// window either way (see [`crate::mux`]).
    pub fn lift_pre_auth_limits(&self) {
        if let Inner::Quic { conn, .. } = &self.inner {
            conn.set_receive_window(tuning::QUIC_CONN_WINDOW.into());
        }
    }

    /// The largest datagram the session can send now, or `None` when the transport has no
    /// datagrams (TLS + yamux) or the peer does not accept them.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match &self.inner {
            Inner::Quic { conn, .. } => conn.max_datagram_size(),
            Inner::Mux(_) => None,
        }
    }

    /// Sends an unreliable datagram (QUIC only). Fails when it is larger than
    /// [`Session::max_datagram_size`] or the transport has none.
    pub fn send_datagram(&self, data: bytes::Bytes) -> io::Result<()> {
        match &self.inner {
            Inner::Quic { conn, .. } => conn.send_datagram(data).map_err(io::Error::other),
            Inner::Mux(_) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "no datagrams over TLS + yamux"))
            }
        }
    }

    /// Waits for the peer's next datagram. Over TLS + yamux this never resolves until the
    /// session ends, then fails.
    pub async fn read_datagram(&self) -> io::Result<bytes::Bytes> {
        match &self.inner {
            Inner::Quic { conn, .. } => conn.read_datagram().await.map_err(io::Error::other),
            Inner::Mux(m) => {
                m.closed().await;
                Err(io::Error::new(io::ErrorKind::NotConnected, "session closed"))
            }
        }
    }

    /// Closes the session at once; open streams fail.
    pub fn close(&self, reason: &str) {
        match &self.inner {
            Inner::Quic { conn, .. } => conn.close(0u32.into(), reason.as_bytes()),
            Inner::Mux(m) => m.close(),
        }
    }

    /// Resolves when the session has closed, for whatever reason.
    pub async fn closed(&self) {
        match &self.inner {
            Inner::Quic { conn, .. } => {
                conn.closed().await;
            }
            Inner::Mux(m) => m.closed().await,
        }
    }
}

/// One bidirectional stream of a session: bytes in order, each direction closed on its own.
#[derive(Debug)]
pub enum Stream {
    /// A QUIC stream.
    Quic {
        /// Sending half.
        send: quinn::SendStream,
        /// Receiving half.
        recv: quinn::RecvStream,
    },
    /// A yamux stream.
    Mux(MuxStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            Self::Mux(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_write(cx, buf).map_err(Into::into),
            Self::Mux(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_flush(cx),
            Self::Mux(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_shutdown(cx),
            Self::Mux(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic { send, .. } => Pin::new(send).poll_write_vectored(cx, bufs),
            Self::Mux(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Quic { send, .. } => send.is_write_vectored(),
            Self::Mux(s) => s.is_write_vectored(),
        }
    }
}

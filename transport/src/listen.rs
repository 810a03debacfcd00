//! The relay's control listener: QUIC on UDP and TLS on TCP, on one port number.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::mux::{MuxHandle, Side};
use crate::session::{Session, TransportKind};
use crate::tls::{ServerIdentity, TlsError};
use crate::tuning;

/// Listens for agent sessions on TCP and (unless disabled) UDP of one port.
pub struct ControlListener {
    tcp: TcpListener,
    quic: Option<quinn::Endpoint>,
    tls: TlsAcceptor,
    addr: SocketAddr,
    quic_done: std::sync::atomic::AtomicBool,
}

/// A connection accepted but not yet through its transport handshake.
pub enum Accepted {
    /// A TCP connection that must still do TLS.
    Tcp(TcpStream, SocketAddr, TlsAcceptor),
    /// A QUIC connection attempt.
    Quic(Box<quinn::Incoming>),
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// A socket could not be bound.
    #[error("cannot listen on {proto} {addr}: {source}")]
    Bind {
        /// "TCP" or "UDP".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The system error.
        source: io::Error,
    },
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl std::fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlListener").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Accepted({})", self.remote_addr())
    }
}

/// QUIC transport settings; `peer_streams` bounds how many streams the peer may open at once
/// (the relay opens one per visitor connection; an agent opens only its control stream),
/// `receive_window` how many bytes the peer may have in flight on all of them (the relay starts
/// agents small, see [`Session::lift_pre_auth_limits`]), and `keep_alive` how often this side
/// sends a packet when it has nothing else to send.
pub(crate) fn transport_config(
    peer_streams: u32,
    receive_window: u32,
    keep_alive: std::time::Duration,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(tuning::QUIC_STREAM_WINDOW.into())
        .receive_window(receive_window.into())
        .send_window(tuning::QUIC_CONN_WINDOW.into())
        .keep_alive_interval(Some(keep_alive))
        // UDP tunnels ride datagrams: room for bursts, after which the oldest are dropped.
        .datagram_receive_buffer_size(Some(4 << 20))
        .datagram_send_buffer_size(4 << 20);
    // Let path MTU discovery go past Ethernet sizes: on loopback and jumbo-frame links fewer,
    // larger packets mean less per-packet crypto and fewer syscalls; elsewhere discovery stops at
    // what the path carries.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(tuning::QUIC_MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    // IDLE_TIMEOUT is far below quinn's VarInt limit.
    if let Ok(idle) = tuning::IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The listen backlog used when `net.core.somaxconn` cannot be read.
const FALLBACK_BACKLOG: i32 = 4096;

/// The longest accept queue the system allows (`net.core.somaxconn`), or 4096 where that cannot
/// be read; the kernel caps what is asked at somaxconn anyway.
pub fn max_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(FALLBACK_BACKLOG)
}

/// A public TCP listener on `addr` with the longest accept queue the system allows
/// ([`max_backlog`]). With the usual 128, a burst of visitors overflows the queue, the kernel
/// drops their SYNs and they retry a second or more later; with the maximum the kernel queues the
/// burst and the accept loop drains it. SO_REUSEADDR is set as `TcpListener::bind` does, so a
/// restarted relay can bind while old connections linger in TIME_WAIT. Must be called within a
/// tokio runtime.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(max_backlog())?;
    TcpListener::from_std(socket.into())
}

/// A UDP socket with room for bursts: the default buffers (about 200 KiB) overflow at a few
/// Gbit/s and every dropped datagram makes QUIC slow down. The kernel caps the size at
/// `net.core.rmem_max`/`wmem_max`; failing to enlarge is not an error.
pub(crate) fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(tuning::UDP_BUFFER);
    let _ = socket.set_send_buffer_size(tuning::UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl ControlListener {
    /// Binds TCP on `addr`, then UDP on the same port number (when `quic` is set). With port 0,
    /// a port free on both is searched for.
    ///
    /// `reset_key` is the secret QUIC stateless resets are derived from. A relay that keeps it
    /// across restarts can end the QUIC connections of its previous run at once, so agents
    /// reconnect in about a keep-alive interval instead of waiting for their idle timeout.
    pub async fn bind(
        addr: SocketAddr,
        identity: &ServerIdentity,
        quic: bool,
        reset_key: Option<&[u8; 32]>,
    ) -> Result<Self, ListenError> {
        let endpoint_cfg = match reset_key {
            Some(k) => {
                let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    k,
                )));
                // Connection ids are checked against a keyed hash; with the key derived from the
                // same secret, a restarted relay recognises its previous run's ids and answers
                // them with stateless resets instead of dropping them.
                let cid_key = u64::from_be_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
                cfg.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                cfg
            }
            None => quinn::EndpointConfig::default(),
        };
        let tls = TlsAcceptor::from(identity.server_config()?);
        let quic_cfg = if quic {
            let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
                (*identity.server_config()?).clone(),
            )
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            cfg.transport_config(Arc::new(transport_config(
                tuning::AGENT_STREAMS,
                tuning::PRE_AUTH_WINDOW,
                tuning::KEEP_ALIVE,
            )));
            Some(cfg)
        } else {
            None
        };
        let attempts = if addr.port() == 0 { 20 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let tcp = tcp_listener(addr).map_err(|source| ListenError::Bind {
                proto: "TCP",
                addr,
                source,
            })?;
            let bound = tcp.local_addr().map_err(|source| ListenError::Bind {
                proto: "TCP",
                addr,
                source,
            })?;
            let Some(cfg) = quic_cfg.clone() else {
                return Ok(Self { tcp, quic: None, tls, addr: bound, quic_done: false.into() });
            };
            let endpoint = udp_socket(bound).and_then(|socket| {
                let runtime = quinn::default_runtime()
                    .ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
                quinn::Endpoint::new(endpoint_cfg.clone(), Some(cfg), socket, runtime)
            });
            match endpoint {
                Ok(ep) => {
                    return Ok(Self {
                        tcp,
                        quic: Some(ep),
                        tls,
                        addr: bound,
                        quic_done: false.into(),
                    });
                }
                Err(source) => {
                    last_err = Some(ListenError::Bind { proto: "UDP", addr: bound, source })
                }
            }
        }
        Err(last_err.unwrap_or(ListenError::Bind {
            proto: "UDP",
            addr,
            source: io::Error::other("no port free on both TCP and UDP"),
        }))
    }

    /// The bound address (same port for TCP and UDP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Which transports are served.
    pub fn transports(&self) -> Vec<TransportKind> {
        let mut v = Vec::new();
        if self.quic.is_some() {
            v.push(TransportKind::Quic);
        }
        v.push(TransportKind::Tcp);
        v
    }

    /// Waits for the next connection on either transport.
    pub async fn accept(&self) -> io::Result<Accepted> {
        use std::sync::atomic::Ordering;
        loop {
            let quic = async {
                match &self.quic {
                    Some(ep) if !self.quic_done.load(Ordering::Relaxed) => ep.accept().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                res = self.tcp.accept() => {
                    let (stream, peer) = res?;
                    return Ok(Accepted::Tcp(stream, peer, self.tls.clone()));
                }
                incoming = quic => match incoming {
                    Some(i) => return Ok(Accepted::Quic(Box::new(i))),
                    // The endpoint was closed; keep serving TCP.
                    None => self.quic_done.store(true, Ordering::Relaxed),
                },
            }
        }
    }

    /// Closes the QUIC endpoint, telling every QUIC peer at once.
    pub fn close(&self) {
        if let Some(ep) = &self.quic {
            ep.close(0u32.into(), b"relay shutting down");
        }
    }
}

impl Accepted {
    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        match self {
            Self::Tcp(_, peer, _) => *peer,
            Self::Quic(i) => i.remote_address(),
        }
    }

    /// Whether the peer has shown it receives what is sent to [`Accepted::remote_addr`]. Always
    /// true over TCP (its handshake does that); over QUIC only after a Retry, so a QUIC source
    /// address may be forged until then.
    pub fn address_validated(&self) -> bool {
        match self {
            Self::Tcp(..) => true,
            Self::Quic(i) => i.remote_address_validated(),
        }
    }

    /// Turns the connection away at once: TCP is closed, QUIC is refused (the peer learns it
    /// at once instead of waiting for its timeout).
    pub fn refuse(self) {
        match self {
            Self::Tcp(..) => {}
            Self::Quic(i) => i.refuse(),
        }
    }

    /// Asks a QUIC peer to prove its address first (a stateless Retry: nothing is kept for
    /// it); its next attempt comes back with [`Accepted::address_validated`] true. A TCP peer,
    /// or a QUIC one that was already asked, is refused instead.
    pub fn validate(self) {
        match self {
            Self::Quic(i) if i.may_retry() => {
                if let Err(e) = i.retry() {
                    e.into_incoming().refuse();
                }
            }
            other => other.refuse(),
        }
    }

    /// Completes the transport handshake. The caller bounds it with a timeout.
    pub async fn establish(self) -> io::Result<Session> {
        match self {
            Self::Tcp(stream, peer, tls) => {
                let _ = stream.set_nodelay(true);
                let tls = tls.accept(stream).await?;
                Ok(Session::mux(MuxHandle::start(tls, Side::Server), peer))
            }
            Self::Quic(incoming) => {
                let conn = (*incoming).await.map_err(io::Error::other)?;
                Ok(Session::quic(conn, None))
            }
        }
    }
}

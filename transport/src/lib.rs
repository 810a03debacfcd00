//! warren's session transports: QUIC, and TLS over TCP with yamux on top, behind one interface.
//!
//! A [`Session`] is one authenticated, encrypted connection between an agent and a relay that
//! carries many bidirectional [`Stream`]s. Both transports listen on the same port number of the
//! relay (UDP for QUIC, TCP for TLS). The agent picks one with [`Mode`]; `auto` tries QUIC first
//! and falls back to TCP when UDP does not answer.
//!
//! Not here: what the streams carry (see `warren-proto`) and who may connect (the relay checks
//! tokens after the transport is up).
//!
//! # Layout
//! - [`tls`]: certificates, trust (CA file, fingerprint pin, system roots, insecure) and rustls
//!   configurations for both sides.
//! - [`session`]: the [`Session`] handle and its [`Stream`]s.
//! - [`mux`]: the yamux driver that turns one TLS stream into many.
//! - [`listen`]: the relay's control listener (QUIC and TCP on one port).
//! - [`connect`]: the agent's side, with the automatic fallback.
//! - [`control`]: reading and writing framed control messages on a stream.
//! - [`splice`]: copying both ways between a visitor's connection and its stream.

pub mod connect;
pub mod control;
pub mod listen;
pub mod mux;
pub mod session;
pub mod splice;
pub mod tls;

pub use connect::{ConnectError, Mode, RelayAddr, TrustProblem, connect};
pub use control::{ControlError, ControlReader, ControlWriter};
pub use listen::{Accepted, ControlListener};
pub use session::{Session, Stream, TransportKind};
pub use splice::splice;
pub use tls::{ServerIdentity, Trust};

/// Tuning shared by both transports, sized so one stream can fill a fast link.
pub mod tuning {
    use std::time::Duration;

    /// Most concurrent streams per session (visitor connections in flight on one agent).
    pub const MAX_STREAMS: u32 = 16_384;
    /// Streams an agent may open to the relay: its control stream, nothing else. Every other
    /// stream is opened by the relay (data streams, UDP flows and the overlay relay path over
    /// TLS + yamux), so a peer has no use for more, and each one would hold a receive window.
    pub const AGENT_STREAMS: u32 = 1;
    /// Streams beyond [`AGENT_STREAMS`] the relay resets over TLS + yamux before it closes the
    /// connection: a stream reset while the peer does not read keeps its buffered bytes until
    /// the reset can be written, so a peer that keeps opening them is cut off.
    pub const MAX_REFUSED_STREAMS: usize = 4;
    /// QUIC per-connection receive window the relay grants before the agent is authenticated
    /// (raised to [`QUIC_CONN_WINDOW`] once it is): bytes a peer without a token can make the
    /// relay hold per connection. The preface and `Hello` take well under 1 KiB.
    pub const PRE_AUTH_WINDOW: u32 = 64 * 1024;
    /// QUIC per-stream receive window.
    pub const QUIC_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
    /// QUIC per-connection receive window and send window.
    pub const QUIC_CONN_WINDOW: u32 = 64 * 1024 * 1024;
    /// Largest UDP payload QUIC's path MTU discovery may try.
    pub const QUIC_MTU_UPPER_BOUND: u16 = 16_384;
    /// Requested UDP socket buffer size, each direction (capped by the kernel's limits).
    pub const UDP_BUFFER: usize = 4 * 1024 * 1024;
    /// QUIC keep-alive interval of the relay (also keeps NAT bindings open).
    pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
    /// QUIC keep-alive interval of the agent: shorter, because a relay restarted on the same
    /// address answers an agent's next packet with a stateless reset, and that packet is how
    /// soon the agent learns to reconnect (over TCP the kernel's reset tells it at once). One
    /// small packet every 2 s per agent.
    pub const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(2);
    /// A session with no packets from the peer for this long is dead.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
    /// How long `auto` waits for a QUIC handshake before trying TCP.
    pub const QUIC_FALLBACK_AFTER: Duration = Duration::from_millis(2000);
    /// Bytes of copy buffer per direction of a forwarded connection, held only while bytes are
    /// in flight (see [`crate::splice`]).
    pub const SPLICE_BUF: usize = 64 * 1024;
    /// The agent's deadline for a transport handshake (TCP connect plus TLS, or QUIC), and for
    /// the relay's `Welcome` after `Hello`. (The relay gives a whole handshake less: see
    /// `warren_server::session::HANDSHAKE_TIMEOUT`.)
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

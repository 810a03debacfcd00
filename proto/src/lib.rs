//! warren's wire protocol, sans-IO.
//!
//! What lives here: the session preface and version negotiation, the bounded frame format, the
//! control messages exchanged on a session's first stream, and the header that starts every data
//! stream. Everything is plain `encode`/`decode` over byte buffers; nothing here does I/O, owns a
//! socket or knows about tokio, QUIC or TLS. `PROTOCOL.md` beside this crate is the normative
//! specification; this crate is its reference implementation.
//!
//! Not here: transports (see `warren-transport`), routing, leases, configuration.
//!
//! # Layout
//! - [`names`]: validated newtypes for what crosses the wire (tunnel names, subdomains, ids).
//! - [`frame`]: the frame header, length bounds and the primitive field codecs.
//! - [`message`]: control messages and error codes.
//! - [`stream`]: the data-stream header and the agent's answer to it.
//! - [`options`]: per-tunnel access control and HTTP options carried in a bind.
//! - [`overlay`]: overlay networks: their control messages and the relay path of their frames.
//! - [`datagram`]: how UDP tunnels carry packets (QUIC datagrams or stream records).
//! - [`proxy`]: the PROXY protocol (v1, v2) that carries a visitor's address to a target.
//! - [`preface`]: the session preface that carries the protocol version.

pub mod datagram;
pub mod frame;
pub mod message;
pub mod names;
pub mod options;
pub mod overlay;
pub mod preface;
pub mod proxy;
pub mod stream;

pub use frame::{DecodeError, MAX_FRAME_LEN};
pub use message::{Bind, Bound, ErrorCode, Forward, Hello, Message, Protocol, Welcome};
pub use names::{AgentId, Label, Subdomain, TunnelId, TunnelName};
pub use options::{BasicAuth, Cidr, TunnelOptions};
pub use preface::{PROTOCOL_VERSION, Preface, SUPPORTED_VERSIONS};
pub use stream::{AcceptReader, StreamAccept, StreamHeader};

/// The ALPN protocol identifier both transports negotiate.
pub const ALPN: &[u8] = b"warren/1";

#[cfg(test)]
mod proptests;

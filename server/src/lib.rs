//! warren's relay: the public side of the tunnels.
//!
//! The relay accepts agent sessions on its control port (QUIC and TLS+yamux), checks their
//! tokens, leases them subdomains and ports, and forwards visitors: HTTP by `Host` on its HTTP
//! listener, raw TCP on ports of its pool (one address, many ports). Each visitor connection
//! becomes one stream to the agent that holds the tunnel.
//!
//! Not here yet: HTTPS, UDP, the REST API and persistence (each has its own issue).
//!
//! # Layout
//! - [`config`]: the validated runtime configuration and its small parsers.
//! - [`certs`]: the development CA and the relay's certificate.
//! - [`auth`]: token checks.
//! - [`router`]: tunnels, leases and routes — who serves which subdomain and port.
//! - [`pool`]: the TCP port pool.
//! - [`session`]: one agent session: handshake, control loop, heartbeats.
//! - [`ingress`]: the public HTTP listener and the TCP tunnel listeners.
//! - [`relay`]: wiring it all together: bind, run, shut down.
//! - [`util`]: small helpers the relay and the agent binary share (random names, private files,
//!   logging).

pub mod auth;
pub mod certs;
pub mod certstore;
pub mod config;
pub mod edge;
pub mod ingress;
pub mod policy;
pub mod pool;
pub mod relay;
pub mod router;
pub mod session;
pub mod udp;
pub mod util;

pub use config::RelayConfig;
pub use relay::{BoundRelay, Relay};

/// The relay's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

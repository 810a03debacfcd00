//! warren's relay: the public side of the tunnels.
//!
//! The relay accepts agent sessions on its control port (QUIC and TLS+yamux), checks their
//! tokens, leases them subdomains and ports, and forwards visitors: HTTP by `Host` on its HTTP
//! and HTTPS listeners, TLS by SNI (passed through), raw TCP and UDP on ports of its pool (one
//! address, many ports). Each visitor connection (or UDP flow) becomes one stream, or datagrams,
//! to the agent that holds the tunnel, after the tunnel's access rules have let it in.
//!
//! It also serves a REST API and dashboard, keeps tokens, reservations, forwards and traffic
//! history in SQLite, and exposes Prometheus metrics.
//!
//! # Layout
//! - [`config`]: the validated runtime configuration and its small parsers.
//! - [`certs`]: the development CA and the relay's certificate.
//! - [`certstore`]: certificates for the HTTPS listener, by SNI.
//! - [`acme`]: certificates from an ACME CA, with HTTP-01 challenges.
//! - [`edge`]: limits, timeouts and real client addresses on the public listeners.
//! - [`hop`]: hop-by-hop headers, and the one host a request is for.
//! - [`policy`]: a tunnel's access rules and HTTP options.
//! - [`auth`]: token checks.
//! - [`router`]: tunnels, leases and routes — who serves which subdomain and port — and the caps
//!   on what a token or session may hold.
//! - [`leases`]: leases as stored, so a relay restart gives names and ports back to their
//!   owners; the `LeaseStore` a shared store implements.
//! - [`pool`]: the TCP and UDP port pool.
//! - [`session`]: one agent session: handshake, control loop, heartbeats.
//! - [`ingress`]: the public HTTP and HTTPS listeners and the TCP tunnel listeners.
//! - [`udp`]: UDP tunnels.
//! - [`overlay`]: overlay networks: their definitions, global IPAM, members, the state pushed
//!   to agents, and the relay path of their frames.
//! - [`relay`]: wiring it all together: bind, run, shut down.
//! - [`store`]: the SQLite database.
//! - [`api`]: the REST API, dashboard and metrics; [`registry`]: live sessions;
//!   [`forwards`]: tunnels opened on an agent's behalf; [`metrics`]: counters and histograms.
//! - [`util`]: small helpers the relay and the agent binary share (random names, private files,
//!   logging).

pub mod acme;
pub mod api;
pub mod auth;
pub mod certs;
pub mod certstore;
pub mod config;
pub mod edge;
pub mod forwards;
pub mod hop;
pub mod ingress;
pub mod leases;
pub mod metrics;
pub mod overlay;
pub mod policy;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod router;
pub mod session;
pub mod store;
pub mod udp;
pub mod util;

pub use config::RelayConfig;
pub use relay::{BoundRelay, Relay};

/// The relay's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

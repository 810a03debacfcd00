//! warren's agent and CLI: exposes local services through a relay.
//!
//! The agent holds one session to a relay (QUIC, or TLS+yamux over TCP), binds its tunnels, and
//! splices every data stream the relay opens to the tunnel's local target. It reconnects forever
//! with backoff and gets the same subdomains and ports back (leases).
//!
//! It also serves a local API and dashboard with a request inspector, manages container
//! networks ([`net`]) and works with Docker ([`docker`]): tunnels for labelled containers, and
//! Docker's network and IPAM plugin protocols.
//!
//! # Layout
//! - [`tunnel`]: what a tunnel is on the agent side: name, protocol, target, wishes, and the
//!   visitor options the relay enforces.
//! - [`identity`]: the agent's stable identity, kept in its config directory.
//! - [`config`]: the TOML config file for `warren start`, with every problem reported by line.
//! - [`agent`]: the session loop: connect, bind, serve, heartbeat, reconnect.
//! - [`forward`]: one data stream: connect the target, splice, or answer 502.
//! - [`udp`]: UDP tunnels: flows over QUIC datagrams or length-prefixed streams.
//! - [`local_api`]: the agent's local API: its tunnels, listed, opened and closed.
//! - [`api_access`]: the local API's token and `agent.json`, how the CLI finds a running agent.
//! - [`demo`]: relay, agent and a sample service in one process.
//! - [`net`]: networks: bridges and overlays, IPAM, NAT, DNS.
//! - [`docker`]: the Docker API client, label-driven auto-expose and the network plugin.

pub mod agent;
pub mod api_access;
pub mod config;
pub mod demo;
pub mod docker;
pub mod forward;
pub mod identity;
pub mod inspect;
pub mod local_api;
pub mod net;
pub mod tunnel;
pub mod udp;

pub use agent::{AgentConfig, AgentError, AgentEvent};
pub use tunnel::{Target, TunnelSpec};

/// The agent's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

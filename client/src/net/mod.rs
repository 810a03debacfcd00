//! Local container networks, after Docker's Container Network Model.
//!
//! A **network** is a Linux bridge with a subnet (driver `bridge`), or such a bridge on every
//! host that uses it joined by VXLAN, with the relay as its control plane (driver `overlay`); an **endpoint** is a veth pair whose far end
//! lives in a **sandbox** (a network namespace given by path or by a process id) with an address
//! from the network's subnet; **ports** publish endpoint ports on host ports through nftables
//! DNAT; **services** give several endpoints one name, as one virtual address (`vip`) or as all
//! their addresses (`dnsrr`). A DNS server on each network's gateway answers for all of it.
//!
//! # Layout
//! - [`model`]: the desired state: networks, endpoints, ports, services, and their JSON.
//! - [`store`]: that state in SQLite (`CONFIG_DIR/networks.db`), addresses unique per network.
//! - [`ipam`]: choosing subnets from the pool and addresses from a subnet.
//! - [`kernel`]: bridges, veths, addresses and routes through rtnetlink; namespaces.
//! - [`nft`]: the `ip warren` nftables table, rendered whole from the desired state.
//! - [`dns`]: the service-discovery DNS server (hickory-server) and upstream forwarding.
//! - [`manager`]: every operation, with rollback, and the reconcile loop.
//! - [`api`]: the `/api/networks` routes of the agent's local API.
//! - [`sandbox`]: `warren net run`: a command in a fresh namespace attached to a network.
//! - [`overlay`]: overlay networks (driver `overlay`): requests to the relay, its pushed
//!   state, the session hooks; [`datapath`]: their taps, direct-path probes and relay path.

pub mod api;
pub mod datapath;
pub mod dns;
pub mod ipam;
pub mod kernel;
pub mod manager;
pub mod model;
pub mod nft;
pub mod overlay;
pub mod sandbox;
pub mod store;

pub use manager::{NetConfig, NetManager};
pub use model::NetError;

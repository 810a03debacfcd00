//! Local container networks, after Docker's Container Network Model.
//!
//! A **network** is a Linux bridge with a subnet; an **endpoint** is a veth pair whose far end
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

pub mod api;
pub mod dns;
pub mod ipam;
pub mod kernel;
pub mod manager;
pub mod model;
pub mod nft;
pub mod sandbox;
pub mod store;

pub use manager::{NetConfig, NetManager};
pub use model::NetError;

//! The desired state of the agent's networks, as stored and as shown by the API.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// What went wrong, with the HTTP status the API answers it with.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadInput(String),
    /// An unknown network, endpoint, port or service (404).
    #[error("{0}")]
    NotFound(String),
    /// Taken, overlapping, in use or exhausted (409).
    #[error("{0}")]
    Conflict(String),
    /// Networks cannot work here at all, e.g. without CAP_NET_ADMIN (503).
    #[error("{0}")]
    Unavailable(String),
    /// The kernel or nft refused something (500).
    #[error("{0}")]
    System(String),
}

impl NetError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadInput(_) => 400,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            Self::Unavailable(_) => 503,
            Self::System(_) => 500,
        }
    }
}

impl From<rusqlite::Error> for NetError {
    fn from(e: rusqlite::Error) -> Self {
        Self::System(format!("state database: {e}"))
    }
}

/// Checks a network, endpoint, alias or service name: one DNS label, lower case.
pub fn check_name(what: &str, name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NetError::BadInput(format!(
            "{what} name {name:?} is not a valid DNS label: use 1-63 characters a-z, 0-9 and '-', \
             not starting or ending with '-'"
        )))
    }
}

/// A network as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Network {
    /// Its name, a DNS label; also its DNS domain.
    pub name: String,
    /// Eight hex digits (`v` and the VNI in six hex digits for an overlay); names its bridge
    /// `wrb-ID` (and an overlay's VXLAN device `wrx-ID` and tap `wrt-ID`).
    pub id: String,
    /// `bridge` (this host only) or `overlay` (across agents, defined at the relay).
    pub driver: String,
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The gateway, on the bridge; also the DNS server.
    pub gateway: Ipv4Addr,
    /// Addresses are handed out from this range only (default: the whole subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Ipv4Net>,
    /// The MTU of the bridge and every endpoint.
    pub mtu: u32,
    /// An overlay's VXLAN network identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// An overlay: this host's own address in it (on the bridge, primary; the gateway is a
    /// /32 beside it, the same on every host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_addr: Option<Ipv4Addr>,
    /// An overlay: the VXLAN endpoint (underlay address) this host last joined with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<Ipv4Addr>,
}

/// The driver name of networks across agents.
pub const OVERLAY: &str = "overlay";

impl Network {
    /// The bridge's interface name.
    pub fn bridge(&self) -> String {
        format!("wrb-{}", self.id)
    }

    /// Whether it spans agents.
    pub fn is_overlay(&self) -> bool {
        self.driver == OVERLAY
    }

    /// An overlay's VXLAN device.
    pub fn vxlan(&self) -> String {
        format!("wrx-{}", self.id)
    }

    /// An overlay's tap, the relay path's port of the bridge.
    pub fn tap(&self) -> String {
        format!("wrt-{}", self.id)
    }

    /// The address the bridge's MAC is derived from: an overlay's host address (unique per
    /// host), else the gateway.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        self.host_addr.unwrap_or(self.gateway)
    }
}

/// The id of the overlay network with VNI `vni`, the same on every host.
pub fn overlay_id(vni: u32) -> String {
    format!("v{vni:06x}")
}

/// How an endpoint's sandbox is found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum Sandbox {
    /// A network namespace file, e.g. `/run/netns/db`.
    Netns(String),
    /// The network namespace of a process.
    Pid(u32),
    /// A Docker container's sandbox (its key, the namespace file Docker makes when the
    /// container starts): Docker moves the veth in and configures it, and says when it leaves.
    Docker(String),
}

impl Sandbox {
    /// The path to open.
    pub fn path(&self) -> String {
        match self {
            Self::Netns(p) | Self::Docker(p) => p.clone(),
            Self::Pid(pid) => format!("/proc/{pid}/ns/net"),
        }
    }
}

impl fmt::Display for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Netns(p) => write!(f, "{p}"),
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::Docker(p) => write!(f, "docker sandbox {p}"),
        }
    }
}

/// An endpoint as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    /// Its network.
    pub network: String,
    /// Its name, a DNS label.
    pub name: String,
    /// Eight hex digits; names its host veth `wrv-ID`.
    pub id: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC address, `02:...`, derived from the address.
    pub mac: String,
    /// More names for it.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Where its far end lives.
    pub sandbox: Sandbox,
    /// The sandbox's namespace identity (inode), so a reused pid or path is not mistaken for it.
    pub netns_ino: u64,
    /// The interface's name inside the sandbox.
    pub ifname: String,
}

impl Endpoint {
    /// The host end's interface name.
    pub fn host_veth(&self) -> String {
        format!("wrv-{}", self.id)
    }
}

/// A transport protocol of a published port.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// Parses `tcp` or `udp`.
    pub fn parse(s: &str) -> Result<Self, NetError> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(NetError::BadInput(format!("protocol {s:?}: use tcp or udp"))),
        }
    }
}

/// A published port as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Port {
    /// Its network.
    pub network: String,
    /// The endpoint it leads to.
    pub endpoint: String,
    /// TCP or UDP.
    pub proto: Proto,
    /// Only this host address (default: every address of the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    /// The host port.
    pub host_port: u16,
    /// The endpoint's port.
    pub port: u16,
}

/// How a service answers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// One virtual address; nftables spreads connections over the healthy endpoints.
    Vip,
    /// Every endpoint's address, in a new order for each answer.
    Dnsrr,
}

/// A service as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Service {
    /// Its network.
    pub network: String,
    /// Its name, a DNS label.
    pub name: String,
    /// vip or dnsrr.
    pub mode: ServiceMode,
    /// The virtual address (mode vip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    /// The endpoints behind it.
    pub endpoints: Vec<String>,
}

/// A MAC address for an endpoint: locally administered, with the IPv4 address in it (as
/// Docker does), so it is stable across restarts and unique within a network.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// The MAC of an overlay member's probe port (its tap): `06:42` and its host address.
pub fn probe_mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x06, 0x42, o[0], o[1], o[2], o[3]]
}

/// `aa:bb:..` text of a MAC.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Eight random hex digits.
pub fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["web", "a", "db-1", "x".repeat(63).as_str()] {
            assert!(check_name("network", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Web", "a_b", "-a", "a-", "a.b", &"x".repeat(64), "é"] {
            let e = check_name("network", bad).expect_err(bad).to_string();
            assert!(e.contains("not a valid DNS label"), "{e}");
        }
    }

    #[test]
    fn mac_holds_the_address() {
        assert_eq!(mac_text(mac_for(Ipv4Addr::new(10, 213, 5, 20))), "02:42:0a:d5:05:14");
    }
}

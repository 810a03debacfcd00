//! Overlay networks: the control messages that make the relay the control plane of networks
//! spanning several agents, and the framing of Ethernet frames that ride the relay when two
//! agents cannot reach each other's VXLAN endpoint.
//!
//! Requests go agent → relay and carry a `req` the answer echoes ([`NetMessage::Ok`],
//! [`NetMessage::Address`], [`NetMessage::Info`] or the generic `Error` frame). The relay pushes
//! the state of the networks an agent uses without being asked: definitions, members (peers),
//! endpoints and services, each as a "put" or a "gone" message, so an agent's copy is always
//! the relay's state as of the last message.
//!
//! Frames on the relay path are carried as overlay datagrams ([`FrameHeader`], whose first
//! field, the tunnel id of UDP tunnels' datagrams, is 0): QUIC datagrams, or over TLS + yamux
//! the same bytes as length-prefixed records ([`crate::datagram::encode_record`]) on one data
//! stream whose header names tunnel 0. Frames are cut into pieces of at most [`MAX_PIECE`]
//! bytes, so a piece fits in a datagram on any QUIC path. `PROTOCOL.md` §9 is the normative
//! text.

use std::fmt;
use std::net::Ipv4Addr;

use bytes::{Buf, BufMut};

use crate::frame::{DecodeError, Reader, Writer, write_frame};
use crate::names::{AgentId, Label};

/// Most items in one list field (endpoint names, aliases, paths). Keeps every frame under the
/// frame limit: 512 labels of at most 65 bytes each is 33 KiB.
pub const MAX_LIST: usize = 512;

/// Most aliases of one endpoint.
pub const MAX_ALIASES: usize = 32;

/// Frame type numbers of the overlay messages.
pub mod kind {
    /// [`super::NetMessage::Create`]
    pub const CREATE: u16 = 0x10;
    /// [`super::NetMessage::Delete`]
    pub const DELETE: u16 = 0x11;
    /// [`super::NetMessage::Join`]
    pub const JOIN: u16 = 0x12;
    /// [`super::NetMessage::Attach`]
    pub const ATTACH: u16 = 0x13;
    /// [`super::NetMessage::Detach`]
    pub const DETACH: u16 = 0x14;
    /// [`super::NetMessage::ServiceCreate`]
    pub const SERVICE_CREATE: u16 = 0x15;
    /// [`super::NetMessage::ServiceDelete`]
    pub const SERVICE_DELETE: u16 = 0x16;
    /// [`super::NetMessage::Paths`]
    pub const PATHS: u16 = 0x17;
    /// [`super::NetMessage::Ok`]
    pub const OK: u16 = 0x18;
    /// [`super::NetMessage::Address`]
    pub const ADDRESS: u16 = 0x19;
    /// [`super::NetMessage::Info`]
    pub const INFO: u16 = 0x1a;
    /// [`super::NetMessage::Defined`]
    pub const DEFINED: u16 = 0x1b;
    /// [`super::NetMessage::Removed`]
    pub const REMOVED: u16 = 0x1c;
    /// [`super::NetMessage::Peer`]
    pub const PEER: u16 = 0x1d;
    /// [`super::NetMessage::PeerGone`]
    pub const PEER_GONE: u16 = 0x1e;
    /// [`super::NetMessage::Endpoint`]
    pub const ENDPOINT: u16 = 0x1f;
    /// [`super::NetMessage::EndpointGone`]
    pub const ENDPOINT_GONE: u16 = 0x20;
    /// [`super::NetMessage::Service`]
    pub const SERVICE: u16 = 0x21;
    /// [`super::NetMessage::ServiceGone`]
    pub const SERVICE_GONE: u16 = 0x22;
    /// [`super::NetMessage::Watch`]
    pub const WATCH: u16 = 0x23;
    /// The first overlay type.
    pub const FIRST: u16 = CREATE;
    /// The last overlay type.
    pub const LAST: u16 = WATCH;
}

/// A VXLAN network identifier: 24 bits, chosen by the relay, unique on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Vni(u32);

impl Vni {
    /// Largest VNI.
    pub const MAX: u32 = (1 << 24) - 1;

    /// A VNI, if `v` fits in 24 bits.
    pub fn new(v: u32) -> Option<Self> {
        (v <= Self::MAX).then_some(Self(v))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An IPv4 subnet: an address with no host bits set and a prefix length of at most 32.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// The subnet `addr/prefix`, if the prefix fits and no host bit is set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        (u32::from(addr) & !mask == 0).then_some(Self { addr, prefix })
    }

    /// Its first address.
    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }

    /// Its prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What an overlay network is, the same on every agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDef {
    /// Its name, unique in its account; also its DNS domain.
    pub name: Label,
    /// Its VXLAN network identifier.
    pub vni: Vni,
    /// Its subnet.
    pub subnet: Subnet,
    /// The gateway address every member puts on its bridge.
    pub gateway: Ipv4Addr,
    /// The MTU of its bridges, VXLAN devices and endpoints.
    pub mtu: u16,
}

/// How a service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceMode {
    /// One virtual address, spread over the endpoints by each member.
    Vip,
    /// Every endpoint's address.
    Dnsrr,
}

impl ServiceMode {
    fn code(self) -> u8 {
        match self {
            Self::Vip => 1,
            Self::Dnsrr => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        match c {
            1 => Ok(Self::Vip),
            2 => Ok(Self::Dnsrr),
            _ => Err(DecodeError::Malformed("service mode")),
        }
    }
}

/// Which way frames to a peer go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// VXLAN between the two agents' VTEPs.
    Direct,
    /// Over both agents' relay sessions.
    Relay,
}

impl PathKind {
    fn code(self) -> u8 {
        match self {
            Self::Direct => 1,
            Self::Relay => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        match c {
            1 => Ok(Self::Direct),
            2 => Ok(Self::Relay),
            _ => Err(DecodeError::Malformed("path")),
        }
    }

    /// `direct` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
        }
    }
}

/// One member of a network (an agent that joined it), as pushed by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The network.
    pub network: Label,
    /// The member's own address in the network; it also identifies the member on the relay
    /// path.
    pub addr: Ipv4Addr,
    /// The member's agent identity.
    pub agent: AgentId,
    /// Its VXLAN tunnel endpoint (underlay address).
    pub vtep: Ipv4Addr,
    /// Whether its session to the relay is up now.
    pub online: bool,
}

/// One endpoint of a network, as pushed by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The network.
    pub network: Label,
    /// Its name, unique in the network.
    pub name: Label,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The member it lives on (its [`Peer::addr`]).
    pub peer: Ipv4Addr,
    /// More names for it.
    pub aliases: Vec<Label>,
}

/// One service of a network, as pushed by the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The network.
    pub network: Label,
    /// Its name.
    pub name: Label,
    /// vip or dnsrr.
    pub mode: ServiceMode,
    /// The virtual address (mode vip).
    pub vip: Option<Ipv4Addr>,
    /// The endpoints behind it, by name.
    pub endpoints: Vec<Label>,
}

/// What an agent measured about its path to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathReport {
    /// The peer ([`Peer::addr`]).
    pub peer: Ipv4Addr,
    /// The path frames to it take now.
    pub path: PathKind,
    /// The last round trip of a direct-path probe, in microseconds (0: none answered).
    pub rtt_us: u32,
}

/// Every overlay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMessage {
    /// A→R: start pushing this account's overlay state to this session (answered with
    /// [`NetMessage::Ok`]). Before it the relay pushes nothing, so agents that do not manage
    /// networks never see overlay messages.
    Watch {
        /// Request number.
        req: u32,
    },
    /// A→R: define a network in the agent's account.
    Create {
        /// Request number.
        req: u32,
        /// Its name.
        name: Label,
        /// Its subnet; absent: the relay picks one.
        subnet: Option<Subnet>,
        /// Its MTU; absent: 1450.
        mtu: Option<u16>,
    },
    /// A→R: delete a network that has no endpoints left.
    Delete {
        /// Request number.
        req: u32,
        /// The network.
        name: Label,
    },
    /// A→R: this agent uses the network; the relay answers [`NetMessage::Info`] and from then
    /// on pushes the network's members, endpoints and services.
    Join {
        /// Request number.
        req: u32,
        /// The network.
        name: Label,
        /// This agent's VXLAN tunnel endpoint.
        vtep: Ipv4Addr,
        /// The endpoints this agent has in the network; the relay releases the addresses of
        /// any other endpoint it recorded for this agent there.
        endpoints: Vec<Label>,
    },
    /// A→R: an endpoint on this agent: claim its address (the given one, or any free one) and
    /// announce it to the other members. Answered with [`NetMessage::Address`].
    Attach {
        /// Request number.
        req: u32,
        /// The network.
        network: Label,
        /// The endpoint's name.
        name: Label,
        /// The address it must have.
        ip: Option<Ipv4Addr>,
        /// More names.
        aliases: Vec<Label>,
    },
    /// A→R: the endpoint is gone; its address is released.
    Detach {
        /// Request number.
        req: u32,
        /// The network.
        network: Label,
        /// The endpoint.
        name: Label,
    },
    /// A→R: a service of the network. Answered with [`NetMessage::Address`] (the virtual
    /// address, `0.0.0.0` for dnsrr).
    ServiceCreate {
        /// Request number.
        req: u32,
        /// The network.
        network: Label,
        /// Its name.
        name: Label,
        /// vip or dnsrr.
        mode: ServiceMode,
        /// Its endpoints.
        endpoints: Vec<Label>,
    },
    /// A→R: remove a service.
    ServiceDelete {
        /// Request number.
        req: u32,
        /// The network.
        network: Label,
        /// The service.
        name: Label,
    },
    /// A→R: the paths this agent uses to the other members (no answer).
    Paths {
        /// The network.
        network: Label,
        /// One entry per peer.
        paths: Vec<PathReport>,
    },
    /// R→A: the request succeeded.
    Ok {
        /// The request.
        req: u32,
    },
    /// R→A: the request succeeded with this address.
    Address {
        /// The request.
        req: u32,
        /// The address.
        ip: Ipv4Addr,
    },
    /// R→A: a network's definition, answering `Create` or `Join`.
    Info {
        /// The request.
        req: u32,
        /// The network.
        def: NetDef,
        /// This agent's own address in it (after `Join`).
        host_addr: Option<Ipv4Addr>,
    },
    /// R→A push: a network of the agent's account exists.
    Defined(NetDef),
    /// R→A push: a network was deleted.
    Removed {
        /// The network.
        name: Label,
    },
    /// R→A push: a member of a joined network (new or changed).
    Peer(Peer),
    /// R→A push: a member left or its grace period ended.
    PeerGone {
        /// The network.
        network: Label,
        /// The member's address.
        peer: Ipv4Addr,
    },
    /// R→A push: an endpoint (new or changed).
    Endpoint(Endpoint),
    /// R→A push: an endpoint is gone.
    EndpointGone {
        /// The network.
        network: Label,
        /// The endpoint.
        name: Label,
    },
    /// R→A push: a service (new or changed).
    Service(Service),
    /// R→A push: a service is gone.
    ServiceGone {
        /// The network.
        network: Label,
        /// The service.
        name: Label,
    },
}

impl NetMessage {
    /// The request number of an agent's request (`None` for answers, pushes and reports).
    pub fn request(&self) -> Option<u32> {
        match self {
            Self::Watch { req }
            | Self::Create { req, .. }
            | Self::Delete { req, .. }
            | Self::Join { req, .. }
            | Self::Attach { req, .. }
            | Self::Detach { req, .. }
            | Self::ServiceCreate { req, .. }
            | Self::ServiceDelete { req, .. } => Some(*req),
            _ => None,
        }
    }

    /// The request a relay's answer belongs to.
    pub fn answers(&self) -> Option<u32> {
        match self {
            Self::Ok { req } | Self::Address { req, .. } | Self::Info { req, .. } => Some(*req),
            _ => None,
        }
    }

    /// Appends this message as one frame.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        match self {
            Self::Watch { req } => write_frame(dst, kind::WATCH, |b| b.put_u32(*req)),
            Self::Create { req, name, subnet, mtu } => write_frame(dst, kind::CREATE, |b| {
                b.put_u32(*req);
                b.string(name.as_str());
                b.opt(*subnet, put_subnet);
                b.opt(*mtu, |b, m| b.put_u16(m));
            }),
            Self::Delete { req, name } => write_frame(dst, kind::DELETE, |b| {
                b.put_u32(*req);
                b.string(name.as_str());
            }),
            Self::Join { req, name, vtep, endpoints } => write_frame(dst, kind::JOIN, |b| {
                b.put_u32(*req);
                b.string(name.as_str());
                b.put_u32((*vtep).into());
                put_labels(b, endpoints, MAX_LIST);
            }),
            Self::Attach { req, network, name, ip, aliases } => {
                write_frame(dst, kind::ATTACH, |b| {
                    b.put_u32(*req);
                    b.string(network.as_str());
                    b.string(name.as_str());
                    b.opt(*ip, |b, ip| b.put_u32(ip.into()));
                    put_labels(b, aliases, MAX_ALIASES);
                })
            }
            Self::Detach { req, network, name } => write_frame(dst, kind::DETACH, |b| {
                b.put_u32(*req);
                b.string(network.as_str());
                b.string(name.as_str());
            }),
            Self::ServiceCreate { req, network, name, mode, endpoints } => {
                write_frame(dst, kind::SERVICE_CREATE, |b| {
                    b.put_u32(*req);
                    b.string(network.as_str());
                    b.string(name.as_str());
                    b.put_u8(mode.code());
                    put_labels(b, endpoints, MAX_LIST);
                })
            }
            Self::ServiceDelete { req, network, name } => {
                write_frame(dst, kind::SERVICE_DELETE, |b| {
                    b.put_u32(*req);
                    b.string(network.as_str());
                    b.string(name.as_str());
                })
            }
            Self::Paths { network, paths } => write_frame(dst, kind::PATHS, |b| {
                b.string(network.as_str());
                let n = paths.len().min(MAX_LIST);
                b.put_u16(n as u16);
                for p in &paths[..n] {
                    b.put_u32(p.peer.into());
                    b.put_u8(p.path.code());
                    b.put_u32(p.rtt_us);
                }
            }),
            Self::Ok { req } => write_frame(dst, kind::OK, |b| b.put_u32(*req)),
            Self::Address { req, ip } => write_frame(dst, kind::ADDRESS, |b| {
                b.put_u32(*req);
                b.put_u32((*ip).into());
            }),
            Self::Info { req, def, host_addr } => write_frame(dst, kind::INFO, |b| {
                b.put_u32(*req);
                put_def(b, def);
                b.opt(*host_addr, |b, ip| b.put_u32(ip.into()));
            }),
            Self::Defined(def) => write_frame(dst, kind::DEFINED, |b| put_def(b, def)),
            Self::Removed { name } => {
                write_frame(dst, kind::REMOVED, |b| b.string(name.as_str()));
            }
            Self::Peer(p) => write_frame(dst, kind::PEER, |b| {
                b.string(p.network.as_str());
                b.put_u32(p.addr.into());
                b.string(p.agent.as_str());
                b.put_u32(p.vtep.into());
                b.bool_(p.online);
            }),
            Self::PeerGone { network, peer } => write_frame(dst, kind::PEER_GONE, |b| {
                b.string(network.as_str());
                b.put_u32((*peer).into());
            }),
            Self::Endpoint(e) => write_frame(dst, kind::ENDPOINT, |b| {
                b.string(e.network.as_str());
                b.string(e.name.as_str());
                b.put_u32(e.ip.into());
                b.put_u32(e.peer.into());
                put_labels(b, &e.aliases, MAX_ALIASES);
            }),
            Self::EndpointGone { network, name } => write_frame(dst, kind::ENDPOINT_GONE, |b| {
                b.string(network.as_str());
                b.string(name.as_str());
            }),
            Self::Service(s) => write_frame(dst, kind::SERVICE, |b| {
                b.string(s.network.as_str());
                b.string(s.name.as_str());
                b.put_u8(s.mode.code());
                b.opt(s.vip, |b, ip| b.put_u32(ip.into()));
                put_labels(b, &s.endpoints, MAX_LIST);
            }),
            Self::ServiceGone { network, name } => write_frame(dst, kind::SERVICE_GONE, |b| {
                b.string(network.as_str());
                b.string(name.as_str());
            }),
        }
    }

    /// Decodes the payload `p` of a frame of type `k` (one of [`kind`]).
    pub(crate) fn decode(k: u16, p: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(match k {
            kind::WATCH => Self::Watch { req: p.u32_("request id")? },
            kind::CREATE => Self::Create {
                req: p.u32_("request id")?,
                name: label(p, "network name")?,
                subnet: p.opt("subnet", get_subnet)?,
                mtu: p.opt("mtu", |p| p.u16_("mtu"))?,
            },
            kind::DELETE => {
                Self::Delete { req: p.u32_("request id")?, name: label(p, "network name")? }
            }
            kind::JOIN => Self::Join {
                req: p.u32_("request id")?,
                name: label(p, "network name")?,
                vtep: ipv4(p, "vtep")?,
                endpoints: labels(p, MAX_LIST, "endpoint names")?,
            },
            kind::ATTACH => Self::Attach {
                req: p.u32_("request id")?,
                network: label(p, "network name")?,
                name: label(p, "endpoint name")?,
                ip: p.opt("address", |p| ipv4(p, "address"))?,
                aliases: labels(p, MAX_ALIASES, "aliases")?,
            },
            kind::DETACH => Self::Detach {
                req: p.u32_("request id")?,
                network: label(p, "network name")?,
                name: label(p, "endpoint name")?,
            },
            kind::SERVICE_CREATE => Self::ServiceCreate {
                req: p.u32_("request id")?,
                network: label(p, "network name")?,
                name: label(p, "service name")?,
                mode: ServiceMode::from_code(p.u8_("service mode")?)?,
                endpoints: labels(p, MAX_LIST, "service endpoints")?,
            },
            kind::SERVICE_DELETE => Self::ServiceDelete {
                req: p.u32_("request id")?,
                network: label(p, "network name")?,
                name: label(p, "service name")?,
            },
            kind::PATHS => {
                let network = label(p, "network name")?;
                let n = count(p, MAX_LIST, "paths")?;
                let mut paths = Vec::with_capacity(n);
                for _ in 0..n {
                    paths.push(PathReport {
                        peer: ipv4(p, "peer")?,
                        path: PathKind::from_code(p.u8_("path")?)?,
                        rtt_us: p.u32_("rtt")?,
                    });
                }
                Self::Paths { network, paths }
            }
            kind::OK => Self::Ok { req: p.u32_("request id")? },
            kind::ADDRESS => Self::Address { req: p.u32_("request id")?, ip: ipv4(p, "address")? },
            kind::INFO => Self::Info {
                req: p.u32_("request id")?,
                def: get_def(p)?,
                host_addr: p.opt("host address", |p| ipv4(p, "host address"))?,
            },
            kind::DEFINED => Self::Defined(get_def(p)?),
            kind::REMOVED => Self::Removed { name: label(p, "network name")? },
            kind::PEER => Self::Peer(Peer {
                network: label(p, "network name")?,
                addr: ipv4(p, "peer address")?,
                agent: AgentId::parse(&p.string("agent id")?)?,
                vtep: ipv4(p, "vtep")?,
                online: p.bool_("online")?,
            }),
            kind::PEER_GONE => Self::PeerGone {
                network: label(p, "network name")?,
                peer: ipv4(p, "peer address")?,
            },
            kind::ENDPOINT => Self::Endpoint(Endpoint {
                network: label(p, "network name")?,
                name: label(p, "endpoint name")?,
                ip: ipv4(p, "address")?,
                peer: ipv4(p, "peer address")?,
                aliases: labels(p, MAX_ALIASES, "aliases")?,
            }),
            kind::ENDPOINT_GONE => Self::EndpointGone {
                network: label(p, "network name")?,
                name: label(p, "endpoint name")?,
            },
            kind::SERVICE => Self::Service(Service {
                network: label(p, "network name")?,
                name: label(p, "service name")?,
                mode: ServiceMode::from_code(p.u8_("service mode")?)?,
                vip: p.opt("virtual address", |p| ipv4(p, "virtual address"))?,
                endpoints: labels(p, MAX_LIST, "service endpoints")?,
            }),
            kind::SERVICE_GONE => Self::ServiceGone {
                network: label(p, "network name")?,
                name: label(p, "service name")?,
            },
            _ => return Err(DecodeError::Malformed("overlay message type")),
        })
    }
}

fn put_subnet(b: &mut Vec<u8>, s: Subnet) {
    b.put_u32(s.addr.into());
    b.put_u8(s.prefix);
}

fn get_subnet(p: &mut &[u8]) -> Result<Subnet, DecodeError> {
    let addr = ipv4(p, "subnet")?;
    Subnet::new(addr, p.u8_("subnet")?).ok_or(DecodeError::Malformed("subnet"))
}

fn put_def(b: &mut Vec<u8>, d: &NetDef) {
    b.string(d.name.as_str());
    b.put_u32(d.vni.0);
    put_subnet(b, d.subnet);
    b.put_u32(d.gateway.into());
    b.put_u16(d.mtu);
}

fn get_def(p: &mut &[u8]) -> Result<NetDef, DecodeError> {
    Ok(NetDef {
        name: label(p, "network name")?,
        vni: Vni::new(p.u32_("vni")?).ok_or(DecodeError::Malformed("vni"))?,
        subnet: get_subnet(p)?,
        gateway: ipv4(p, "gateway")?,
        mtu: p.u16_("mtu")?,
    })
}

fn ipv4(p: &mut &[u8], what: &'static str) -> Result<Ipv4Addr, DecodeError> {
    Ok(Ipv4Addr::from(p.u32_(what)?))
}

fn label(p: &mut &[u8], what: &'static str) -> Result<Label, DecodeError> {
    Ok(Label::parse(&p.string(what)?)?)
}

fn count(p: &mut &[u8], max: usize, what: &'static str) -> Result<usize, DecodeError> {
    let n = usize::from(p.u16_(what)?);
    if n > max { Err(DecodeError::Malformed(what)) } else { Ok(n) }
}

fn labels(p: &mut &[u8], max: usize, what: &'static str) -> Result<Vec<Label>, DecodeError> {
    let n = count(p, max, what)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(label(p, what)?);
    }
    Ok(out)
}

/// Writes at most `max` labels (a sender never has more: its own checks refuse them).
fn put_labels(b: &mut Vec<u8>, v: &[Label], max: usize) {
    let n = v.len().min(max);
    b.put_u16(n as u16);
    for l in &v[..n] {
        b.string(l.as_str());
    }
}

/// Bytes in front of a frame (or a piece of one) in a QUIC datagram on the relay path.
pub const FRAME_HEADER_LEN: usize = 16;

/// Most bytes of a frame in one overlay datagram: with its header that is at most 1116 bytes,
/// below what a QUIC datagram holds on the smallest path QUIC allows (1200-byte packets).
pub const MAX_PIECE: usize = 1100;

/// Most pieces one Ethernet frame is cut into on the relay path.
pub const MAX_PARTS: u8 = 16;

/// The header of an Ethernet frame (or a piece of one) in a QUIC datagram on the relay path:
/// `u32 0 | u32 vni | u32 peer | u16 frame id | u8 part | u8 parts`, then the bytes.
///
/// From agent to relay `peer` names the member the frame is for; from relay to agent, the
/// member it came from. Frames too large for one datagram are cut into `parts` pieces that
/// share a `frame id`; the receiver puts them together, and forgets pieces that do not
/// complete quickly (like IP fragments, a lost piece loses the frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The network.
    pub vni: Vni,
    /// The member the frame goes to (agent → relay) or comes from (relay → agent).
    pub peer: Ipv4Addr,
    /// Shared by the pieces of one frame; chosen by the sending agent.
    pub frame: u16,
    /// This piece's number, from 0.
    pub part: u8,
    /// How many pieces the frame has (1: not cut).
    pub parts: u8,
}

impl FrameHeader {
    /// Appends the header; the bytes follow it.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u32(0);
        dst.put_u32(self.vni.0);
        dst.put_u32(self.peer.into());
        dst.put_u16(self.frame);
        dst.put_u8(self.part);
        dst.put_u8(self.parts);
    }

    /// Splits a datagram into header and bytes; `None` when it is not a valid overlay datagram
    /// (too short, not tunnel 0, a bad VNI or piece numbering).
    pub fn decode(src: &[u8]) -> Option<(Self, &[u8])> {
        if src.len() < FRAME_HEADER_LEN {
            return None;
        }
        let mut b = &src[..FRAME_HEADER_LEN];
        if b.get_u32() != 0 {
            return None;
        }
        let vni = Vni::new(b.get_u32())?;
        let peer = Ipv4Addr::from(b.get_u32());
        let frame = b.get_u16();
        let part = b.get_u8();
        let parts = b.get_u8();
        if parts == 0 || parts > MAX_PARTS || part >= parts {
            return None;
        }
        Some((Self { vni, peer, frame, part, parts }, &src[FRAME_HEADER_LEN..]))
    }

    /// Whether a datagram is an overlay datagram (its first four bytes are zero) rather than
    /// a UDP tunnel's.
    pub fn is_overlay(src: &[u8]) -> bool {
        src.len() >= 4 && src[..4] == [0, 0, 0, 0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_refuse_host_bits_and_long_prefixes() {
        assert!(Subnet::new(Ipv4Addr::new(10, 214, 0, 0), 24).is_some());
        assert!(Subnet::new(Ipv4Addr::new(10, 214, 0, 1), 24).is_none());
        assert!(Subnet::new(Ipv4Addr::new(10, 214, 0, 1), 32).is_some());
        assert!(Subnet::new(Ipv4Addr::UNSPECIFIED, 0).is_some());
        assert!(Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 33).is_none());
    }

    #[test]
    fn vni_is_24_bits() {
        assert_eq!(Vni::new(Vni::MAX).map(Vni::get), Some(0x00ff_ffff));
        assert!(Vni::new(1 << 24).is_none());
    }

    #[test]
    fn frame_header_round_trip_and_refusals() {
        let h = FrameHeader {
            vni: Vni::new(4096).expect("vni"),
            peer: Ipv4Addr::new(10, 214, 0, 254),
            frame: 7,
            part: 1,
            parts: 2,
        };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        buf.extend_from_slice(b"frame");
        assert!(FrameHeader::is_overlay(&buf));
        assert_eq!(FrameHeader::decode(&buf), Some((h, &b"frame"[..])));
        assert_eq!(FrameHeader::decode(&buf[..FRAME_HEADER_LEN - 1]), None);
        let mut bad = buf.clone();
        bad[15] = 0; // zero parts
        assert_eq!(FrameHeader::decode(&bad), None);
        let mut bad = buf.clone();
        bad[14] = 2; // part 2 of 2
        assert_eq!(FrameHeader::decode(&bad), None);
        let mut bad = buf.clone();
        bad[3] = 1; // tunnel 1: a UDP tunnel's datagram
        assert!(!FrameHeader::is_overlay(&bad));
        assert_eq!(FrameHeader::decode(&bad), None);
        let mut bad = buf;
        bad[4] = 1; // VNI beyond 24 bits
        assert_eq!(FrameHeader::decode(&bad), None);
    }
}

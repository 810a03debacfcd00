//! Overlay networks at the relay: the control plane of networks that span several agents, and
//! the relay path of their frames.
//!
//! An overlay network belongs to an account (today: the token its agents present) and is
//! stored in SQLite with its address claims and services; IPAM is global, done here, so no two
//! agents ever hold the same address. Members (agents that joined a network) and their live
//! endpoints are kept in memory: a member whose session ends stays, marked offline, for the
//! lease grace period, then it and its endpoints are withdrawn (their claims stay until the
//! agent releases them). Agents learn the state by diff: each session keeps what it last sent
//! and, whenever anything changed, sends "put" and "gone" messages for the difference
//! ([`Overlays::view`], [`diff`]), so nothing is lost when a session is slow and bursts
//! coalesce.
//!
//! The relay path: overlay datagrams from a member's session are forwarded, with their peer
//! field rewritten to the sender's address, to the member they name, in the same network only.
//!
//! Everything that changes lives behind [`Overlays`], so the state can move to a shared store
//! (several relays) without changing the session code.

pub mod relay_path;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use warren_proto::overlay::{
    self, FrameHeader, NetDef, NetMessage, PathReport, ServiceMode, Subnet, Vni,
};
use warren_proto::{AgentId, ErrorCode, Label};
use warren_transport::Session;

use self::store::{Claim, NetRow, Owner, ServiceRow};
use crate::auth::TokenId;
use crate::store::{Store, StoreError};

/// The MTU of a new network unless asked otherwise: 1500 minus VXLAN's 50 bytes.
pub const DEFAULT_MTU: u16 = 1450;

/// VNIs below this are left to other VXLAN users (Docker's overlay starts at 4096 too).
const FIRST_VNI: u32 = 4096;

/// Whose networks these are. Today an account is a token: agents presenting the same token
/// share their overlay networks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account(String);

impl Account {
    /// The account of the agents presenting `token`.
    pub fn of(token: TokenId) -> Self {
        Self(token.to_string())
    }

    /// Its stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// From its stored form (a token id: 16 hex digits).
    pub fn parse(s: &str) -> Option<Self> {
        TokenId::parse_hex(s).map(Self::of)
    }
}

/// Why an overlay request was refused.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Unknown network, endpoint or service.
    #[error("{0}")]
    NotFound(String),
    /// Taken, overlapping, in use or exhausted.
    #[error("{0}")]
    Conflict(String),
    /// A bad field.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("the relay's store failed: {0}")]
    Store(#[from] StoreError),
}

impl OverlayError {
    /// The code for the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::Store(_) => ErrorCode::Internal,
        }
    }
}

/// Who makes a request: an agent of an account, on one session.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its account.
    pub account: Account,
    /// Its identity.
    pub agent: AgentId,
    /// The relay's number of its session.
    pub session: u64,
}

/// Where frames for one session go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// As QUIC datagrams.
    Quic(Session),
    /// As records on the session's overlay stream (TLS + yamux).
    Stream(mpsc::Sender<Bytes>),
}

impl Sink {
    fn send(&self, d: Bytes) -> bool {
        match self {
            Self::Quic(s) => s.send_datagram(d).is_ok(),
            Self::Stream(tx) => tx.try_send(d).is_ok(),
        }
    }
}

#[derive(Debug)]
struct Member {
    addr: Ipv4Addr,
    vtep: Ipv4Addr,
    /// The live session, or `None` while offline.
    session: Option<u64>,
    /// When it went offline.
    gone_at: Option<Instant>,
    paths: Vec<PathReport>,
}

#[derive(Debug, Clone)]
struct LiveEndpoint {
    ip: Ipv4Addr,
    agent: String,
    aliases: Vec<Label>,
}

#[derive(Debug)]
struct Net {
    account: Account,
    def: NetDef,
    created_at: i64,
    claims: BTreeMap<Ipv4Addr, Claim>,
    members: BTreeMap<String, Member>,
    live: BTreeMap<Label, LiveEndpoint>,
    services: BTreeMap<Label, ServiceRow>,
    cursor: Option<Ipv4Addr>,
}

impl Net {
    fn net(&self) -> Ipv4Net {
        Ipv4Net::new(self.def.subnet.addr(), self.def.subnet.prefix()).unwrap_or_default()
    }

    fn claim_of(&self, owner: &Owner, agent: Option<&str>) -> Option<&Claim> {
        self.claims.values().find(|c| c.owner == *owner && agent.is_none_or(|a| a == c.agent))
    }

    /// Whether `ip` may be handed out at all.
    fn usable(&self, ip: Ipv4Addr) -> Result<(), OverlayError> {
        let net = self.net();
        if !net.contains(&ip) {
            return Err(OverlayError::Invalid(format!(
                "address {ip} is outside the subnet {}",
                self.def.subnet
            )));
        }
        if ip == net.network() || ip == net.broadcast() || ip == self.def.gateway {
            return Err(OverlayError::Invalid(format!(
                "address {ip} is the network's {} address",
                if ip == self.def.gateway { "gateway" } else { "network or broadcast" }
            )));
        }
        Ok(())
    }

    /// A free address: after the cursor (endpoints, services) or from the top (hosts).
    fn free(&self, from_top: bool) -> Result<Ipv4Addr, OverlayError> {
        let net = self.net();
        let lo = u32::from(net.network()) + 1;
        let hi = u32::from(net.broadcast()).saturating_sub(1);
        let span = hi.saturating_sub(lo) + 1;
        let start = match (from_top, self.cursor) {
            (true, _) => hi,
            (false, Some(c)) if (lo..=hi).contains(&u32::from(c)) => {
                if u32::from(c) == hi {
                    lo
                } else {
                    u32::from(c) + 1
                }
            }
            (false, _) => lo,
        };
        for i in 0..span {
            let v = if from_top {
                hi - ((hi - start + i) % span)
            } else {
                lo + ((start - lo + i) % span)
            };
            let ip = Ipv4Addr::from(v);
            if ip != self.def.gateway && !self.claims.contains_key(&ip) {
                return Ok(ip);
            }
        }
        Err(OverlayError::Conflict(format!(
            "network {} has no free address left in {}; remove endpoints or use another network",
            self.def.name, self.def.subnet
        )))
    }

    fn names_taken(&self) -> (HashSet<Label>, HashSet<Label>) {
        let mut names = HashSet::new();
        for c in self.claims.values() {
            match &c.owner {
                Owner::Endpoint(n) | Owner::Service(n) => {
                    names.insert(n.clone());
                }
                Owner::Host => {}
            }
        }
        let aliases = self.live.values().flat_map(|e| e.aliases.iter().cloned()).collect();
        (names, aliases)
    }

    fn owner_text(&self, c: &Claim) -> String {
        match &c.owner {
            Owner::Host => format!("agent {}", c.agent),
            Owner::Endpoint(n) => format!("endpoint {n} (agent {})", c.agent),
            Owner::Service(n) => format!("service {n}"),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    nets: BTreeMap<Vni, Net>,
}

impl State {
    fn find(&self, account: &Account, name: &Label) -> Option<Vni> {
        self.nets
            .iter()
            .find(|(_, n)| n.account == *account && n.def.name == *name)
            .map(|(v, _)| *v)
    }

    fn net_mut(&mut self, account: &Account, name: &Label) -> Result<&mut Net, OverlayError> {
        let vni = self.find(account, name).ok_or_else(|| not_found(name))?;
        self.nets.get_mut(&vni).ok_or_else(|| not_found(name))
    }
}

fn not_found(name: &Label) -> OverlayError {
    OverlayError::NotFound(format!(
        "no overlay network named {name} in this account; create it with `warren net create \
         {name} --driver overlay`"
    ))
}

#[derive(Debug, Default)]
struct DataPlane {
    /// Per network: member address → its session.
    routes: HashMap<Vni, HashMap<Ipv4Addr, u64>>,
    /// (network, session) → the member address of that session.
    senders: HashMap<(Vni, u64), Ipv4Addr>,
    /// Where each session's frames go.
    sinks: HashMap<u64, Sink>,
}

/// Frames the relay path carried and dropped.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Overlay datagrams forwarded.
    pub frames: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Datagrams dropped: malformed, from a non-member, for an unknown member, or a full sink.
    pub dropped: AtomicU64,
}

/// A network as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct NetworkView {
    /// Its name.
    pub name: String,
    /// Its account.
    pub account: String,
    /// Its VNI.
    pub vni: u32,
    /// Its subnet.
    pub subnet: String,
    /// Its gateway.
    pub gateway: Ipv4Addr,
    /// Its MTU.
    pub mtu: u16,
    /// Unix seconds.
    pub created_at: i64,
    /// Its members.
    pub members: Vec<MemberView>,
    /// Its endpoints (live or only claimed).
    pub endpoints: Vec<EndpointView>,
    /// Its services.
    pub services: Vec<ServiceView>,
}

/// A member as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct MemberView {
    /// Its agent.
    pub agent: String,
    /// Its own address in the network.
    pub addr: Ipv4Addr,
    /// Its VXLAN endpoint.
    pub vtep: Ipv4Addr,
    /// Whether its session is up.
    pub online: bool,
    /// Seconds until it is withdrawn, while offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withdrawn_in_secs: Option<u64>,
    /// The paths it reported to each peer.
    pub paths: Vec<PathView>,
}

/// A path as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct PathView {
    /// The peer's address.
    pub peer: Ipv4Addr,
    /// `direct` or `relay`.
    pub path: &'static str,
    /// Last direct-path round trip, microseconds (0: none).
    pub rtt_us: u32,
}

/// An endpoint as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct EndpointView {
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The agent it lives on.
    pub agent: String,
    /// Announced by a member now (false: only its address is held, its agent is away).
    pub live: bool,
    /// Its aliases.
    pub aliases: Vec<String>,
}

/// A service as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct ServiceView {
    /// Its name.
    pub name: String,
    /// `vip` or `dnsrr`.
    pub mode: &'static str,
    /// Its virtual address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    /// Its endpoints.
    pub endpoints: Vec<String>,
}

/// What one agent is told: every item, keyed so that two views can be compared.
pub type View = BTreeMap<Key, NetMessage>;

/// The key of one pushed item. The order (definitions, peers, endpoints, services) is the order
/// puts are sent in; gones go in reverse.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A network's definition.
    Def(Label),
    /// A member of a joined network.
    Peer(Label, Ipv4Addr),
    /// An endpoint of a joined network.
    Endpoint(Label, Label),
    /// A service of a joined network.
    Service(Label, Label),
}

impl Key {
    fn gone(&self) -> NetMessage {
        match self.clone() {
            Self::Def(name) => NetMessage::Removed { name },
            Self::Peer(network, peer) => NetMessage::PeerGone { network, peer },
            Self::Endpoint(network, name) => NetMessage::EndpointGone { network, name },
            Self::Service(network, name) => NetMessage::ServiceGone { network, name },
        }
    }
}

/// The messages that turn `old` into `new`: gones first (services before endpoints before
/// peers before networks), then puts of what is new or changed.
pub fn diff(old: &View, new: &View) -> Vec<NetMessage> {
    let mut out: Vec<NetMessage> =
        old.keys().rev().filter(|k| !new.contains_key(*k)).map(Key::gone).collect();
    out.extend(new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(_, v)| v.clone()));
    out
}

/// The overlay networks of a relay.
#[derive(Debug)]
pub struct Overlays {
    store: Arc<Store>,
    pool: Ipv4Net,
    grace: Duration,
    state: Mutex<State>,
    data: RwLock<DataPlane>,
    changes: watch::Sender<u64>,
    /// What the relay path carried.
    pub counters: RelayCounters,
}

fn now_secs() -> i64 {
    crate::util::unix_now()
}

impl Overlays {
    /// Loads the stored networks. New networks without a subnet get a /24 of `pool`; members
    /// that went away are withdrawn after `grace`.
    pub fn load(store: Arc<Store>, pool: Ipv4Net, grace: Duration) -> Result<Self, StoreError> {
        let mut state = State::default();
        for NetRow { account, def, created_at } in store.overlay_networks()? {
            let Some(account) = Account::parse(&account) else {
                tracing::warn!(account = %account, network = %def.name, "overlay network of an unreadable account; skipped");
                continue;
            };
            let claims = store.overlay_claims(def.vni)?.into_iter().map(|c| (c.ip, c)).collect();
            let services =
                store.overlay_services(def.vni)?.into_iter().map(|s| (s.name.clone(), s)).collect();
            state.nets.insert(
                def.vni,
                Net {
                    account,
                    def,
                    created_at,
                    claims,
                    members: BTreeMap::new(),
                    live: BTreeMap::new(),
                    services,
                    cursor: None,
                },
            );
        }
        Ok(Self {
            store,
            pool,
            grace,
            state: Mutex::new(state),
            data: RwLock::default(),
            changes: watch::channel(0).0,
            counters: RelayCounters::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes every session (it recomputes its view) and rebuilds the data plane's routes.
    fn changed(&self, state: &State) {
        let mut data = self.data.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        data.routes.clear();
        data.senders.clear();
        for (vni, n) in &state.nets {
            let routes = data.routes.entry(*vni).or_default();
            let mut senders = Vec::new();
            for m in n.members.values() {
                if let Some(s) = m.session {
                    routes.insert(m.addr, s);
                    senders.push(((*vni, s), m.addr));
                }
            }
            data.senders.extend(senders);
        }
        drop(data);
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Resolves when anything changed; then call [`Overlays::view`] again.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Everything agent `agent` of `account` should know now.
    pub fn view(&self, account: &Account, agent: &AgentId) -> View {
        let state = self.lock();
        let mut v = View::new();
        for n in state.nets.values().filter(|n| n.account == *account) {
            let name = n.def.name.clone();
            v.insert(Key::Def(name.clone()), NetMessage::Defined(n.def.clone()));
            let Some(me) = n.members.get(agent.as_str()) else { continue };
            for (id, m) in &n.members {
                if id == agent.as_str() {
                    continue;
                }
                let Ok(agent) = AgentId::parse(id) else { continue };
                v.insert(
                    Key::Peer(name.clone(), m.addr),
                    NetMessage::Peer(overlay::Peer {
                        network: name.clone(),
                        addr: m.addr,
                        agent,
                        vtep: m.vtep,
                        online: m.session.is_some(),
                    }),
                );
            }
            for (ep, e) in &n.live {
                let Some(owner) = n.members.get(&e.agent) else { continue };
                if owner.addr == me.addr {
                    continue;
                }
                v.insert(
                    Key::Endpoint(name.clone(), ep.clone()),
                    NetMessage::Endpoint(overlay::Endpoint {
                        network: name.clone(),
                        name: ep.clone(),
                        ip: e.ip,
                        peer: owner.addr,
                        aliases: e.aliases.clone(),
                    }),
                );
            }
            for (s, svc) in &n.services {
                v.insert(
                    Key::Service(name.clone(), s.clone()),
                    NetMessage::Service(overlay::Service {
                        network: name.clone(),
                        name: s.clone(),
                        mode: svc.mode,
                        vip: svc.vip,
                        endpoints: svc.endpoints.clone(),
                    }),
                );
            }
        }
        v
    }

    /// Serves one overlay request; `None` for messages that get no answer (path reports,
    /// and pushes an agent should not send).
    pub fn handle(
        &self,
        who: &Caller,
        msg: NetMessage,
    ) -> Option<Result<NetMessage, OverlayError>> {
        if let NetMessage::Paths { network, paths } = &msg {
            self.paths(who, network, paths.clone());
            return None;
        }
        let req = msg.request()?;
        let answer = match msg {
            NetMessage::Watch { .. } => Ok(NetMessage::Ok { req }),
            NetMessage::Create { name, subnet, mtu, .. } => self
                .create(&who.account, name, subnet, mtu)
                .map(|def| NetMessage::Info { req, def, host_addr: None }),
            NetMessage::Delete { name, .. } => {
                self.delete(&who.account, &name).map(|()| NetMessage::Ok { req })
            }
            NetMessage::Join { name, vtep, endpoints, .. } => self
                .join(who, &name, vtep, &endpoints)
                .map(|(def, host)| NetMessage::Info { req, def, host_addr: Some(host) }),
            NetMessage::Attach { network, name, ip, aliases, .. } => self
                .attach(who, &network, name, ip, aliases)
                .map(|ip| NetMessage::Address { req, ip }),
            NetMessage::Detach { network, name, .. } => {
                self.detach(who, &network, &name).map(|()| NetMessage::Ok { req })
            }
            NetMessage::ServiceCreate { network, name, mode, endpoints, .. } => self
                .create_service(&who.account, &network, name, mode, endpoints)
                .map(|ip| NetMessage::Address { req, ip: ip.unwrap_or(Ipv4Addr::UNSPECIFIED) }),
            NetMessage::ServiceDelete { network, name, .. } => {
                self.delete_service(&who.account, &network, &name).map(|()| NetMessage::Ok { req })
            }
            _ => return None,
        };
        Some(answer)
    }

    /// Defines a network.
    pub fn create(
        &self,
        account: &Account,
        name: Label,
        subnet: Option<Subnet>,
        mtu: Option<u16>,
    ) -> Result<NetDef, OverlayError> {
        let mtu = mtu.unwrap_or(DEFAULT_MTU);
        if !(576..=9000).contains(&mtu) {
            return Err(OverlayError::Invalid(format!(
                "MTU {mtu} is out of range: use 576 to 9000"
            )));
        }
        let mut state = self.lock();
        if state.find(account, &name).is_some() {
            return Err(OverlayError::Conflict(format!(
                "an overlay network named {name} exists already"
            )));
        }
        let ours: Vec<(Label, Ipv4Net)> = state
            .nets
            .values()
            .filter(|n| n.account == *account)
            .map(|n| (n.def.name.clone(), n.net()))
            .collect();
        let clash = |s: &Ipv4Net| {
            ours.iter().find(|(_, n)| n.contains(&s.network()) || s.contains(&n.network()))
        };
        let net = match subnet {
            Some(s) => {
                let s = Ipv4Net::new(s.addr(), s.prefix()).unwrap_or_default();
                if s.prefix_len() > 30 {
                    return Err(OverlayError::Invalid(format!(
                        "subnet {s} is too small: a network needs at least a /30"
                    )));
                }
                if let Some((other, n)) = clash(&s) {
                    return Err(OverlayError::Conflict(format!(
                        "subnet {s} overlaps overlay network {other} ({n})"
                    )));
                }
                s
            }
            None => {
                let size = self.pool.prefix_len().max(24);
                let mut subnets = self.pool.subnets(size).map_err(|e| {
                    OverlayError::Invalid(format!("overlay pool {}: {e}", self.pool))
                })?;
                subnets.find(|s| clash(s).is_none()).ok_or_else(|| {
                    OverlayError::Conflict(format!(
                        "the relay's overlay pool {} is exhausted for this account; give \
                         --subnet",
                        self.pool
                    ))
                })?
            }
        };
        if net.hosts().count() > 254 {
            tracing::info!(network = %name, subnet = %net, "large overlay network");
        }
        let gateway = net
            .hosts()
            .next()
            .ok_or_else(|| OverlayError::Invalid(format!("subnet {net} has no host address")))?;
        let subnet = Subnet::new(net.network(), net.prefix_len())
            .ok_or_else(|| OverlayError::Invalid(format!("subnet {net}")))?;
        let mut vni = None;
        for _ in 0..64 {
            let v = rand::random_range(FIRST_VNI..=Vni::MAX);
            if let Some(v) = Vni::new(v).filter(|v| !state.nets.contains_key(v)) {
                vni = Some(v);
                break;
            }
        }
        let vni = vni.ok_or_else(|| OverlayError::Conflict("no free VNI left".into()))?;
        let def = NetDef { name: name.clone(), vni, subnet, gateway, mtu };
        let now = now_secs();
        match self.store.insert_overlay(account.as_str(), &def, now) {
            Ok(()) => {}
            Err(StoreError::Taken(what)) => {
                return Err(OverlayError::Conflict(format!("{what} is taken; try again")));
            }
            Err(e) => return Err(e.into()),
        }
        state.nets.insert(
            vni,
            Net {
                account: account.clone(),
                def: def.clone(),
                created_at: now,
                claims: BTreeMap::new(),
                members: BTreeMap::new(),
                live: BTreeMap::new(),
                services: BTreeMap::new(),
                cursor: None,
            },
        );
        tracing::info!(network = %name, vni = %vni, subnet = %subnet, account = %account.as_str(), "overlay network created");
        self.changed(&state);
        Ok(def)
    }

    /// Deletes a network that no endpoint uses any more (its services go with it).
    pub fn delete(&self, account: &Account, name: &Label) -> Result<(), OverlayError> {
        let mut state = self.lock();
        let net = state.net_mut(account, name)?;
        let used: Vec<String> = net
            .claims
            .values()
            .filter(|c| matches!(c.owner, Owner::Endpoint(_)))
            .map(|c| net.owner_text(c))
            .collect();
        if !used.is_empty() {
            return Err(OverlayError::Conflict(format!(
                "overlay network {name} still has endpoints: {}; detach them first",
                used.join(", ")
            )));
        }
        let vni = net.def.vni;
        self.store.delete_overlay(vni)?;
        state.nets.remove(&vni);
        tracing::info!(network = %name, vni = %vni, "overlay network deleted");
        self.changed(&state);
        Ok(())
    }

    /// Makes the caller a member: its own address (kept across joins), its VTEP; forgets the
    /// endpoints it no longer has.
    pub fn join(
        &self,
        who: &Caller,
        name: &Label,
        vtep: Ipv4Addr,
        has: &[Label],
    ) -> Result<(NetDef, Ipv4Addr), OverlayError> {
        let mut state = self.lock();
        let net = state.net_mut(&who.account, name)?;
        let agent = who.agent.as_str();
        let addr = match net.claim_of(&Owner::Host, Some(agent)) {
            Some(c) => c.ip,
            None => {
                let ip = net.free(true)?;
                if !self.store.claim_overlay(net.def.vni, ip, &Owner::Host, agent)? {
                    return Err(OverlayError::Conflict("address claim raced; try again".into()));
                }
                net.claims.insert(ip, Claim { ip, owner: Owner::Host, agent: agent.to_owned() });
                ip
            }
        };
        let keep: HashSet<&Label> = has.iter().collect();
        let stale: Vec<Claim> = net
            .claims
            .values()
            .filter(|c| c.agent == agent)
            .filter(|c| matches!(&c.owner, Owner::Endpoint(n) if !keep.contains(n)))
            .cloned()
            .collect();
        for c in stale {
            self.store.release_overlay(net.def.vni, c.ip)?;
            net.claims.remove(&c.ip);
            if let Owner::Endpoint(n) = &c.owner {
                net.live.remove(n);
                Self::drop_from_services(&self.store, net, n)?;
            }
        }
        if let Some(old) = net.members.get(agent).and_then(|m| m.session)
            && old != who.session
        {
            tracing::info!(network = %name, agent, "member rejoined from a new session");
        }
        net.members.insert(
            agent.to_owned(),
            Member { addr, vtep, session: Some(who.session), gone_at: None, paths: Vec::new() },
        );
        let def = net.def.clone();
        tracing::info!(network = %name, agent, addr = %addr, vtep = %vtep, "member joined");
        self.changed(&state);
        Ok((def, addr))
    }

    fn member<'a>(net: &'a Net, who: &Caller) -> Result<&'a Member, OverlayError> {
        net.members.get(who.agent.as_str()).filter(|m| m.session == Some(who.session)).ok_or_else(
            || {
                OverlayError::NotFound(format!(
                    "this agent has not joined overlay network {} on this session",
                    net.def.name
                ))
            },
        )
    }

    /// Claims an endpoint's address (or confirms the one it has) and announces it.
    pub fn attach(
        &self,
        who: &Caller,
        network: &Label,
        name: Label,
        ip: Option<Ipv4Addr>,
        aliases: Vec<Label>,
    ) -> Result<Ipv4Addr, OverlayError> {
        let mut state = self.lock();
        let net = state.net_mut(&who.account, network)?;
        Self::member(net, who)?;
        let agent = who.agent.as_str();
        let owner = Owner::Endpoint(name.clone());
        let (names, taken_aliases) = net.names_taken();
        if taken_aliases.contains(&name) && net.claim_of(&owner, Some(agent)).is_none() {
            return Err(OverlayError::Conflict(format!(
                "the name {name} is an alias of another endpoint in network {network}"
            )));
        }
        if let Some(a) = aliases.iter().find(|a| names.contains(*a) || **a == name) {
            return Err(OverlayError::Conflict(format!(
                "alias {a} is the name of an endpoint or service in network {network}"
            )));
        }
        let ip = match net.claim_of(&owner, None).cloned() {
            Some(c) if c.agent != agent => {
                return Err(OverlayError::Conflict(format!(
                    "the name {name} is taken in network {network} (by an endpoint of agent {})",
                    c.agent
                )));
            }
            Some(c) => {
                if let Some(want) = ip.filter(|w| *w != c.ip) {
                    return Err(OverlayError::Conflict(format!(
                        "endpoint {name} holds {} in network {network}, not {want}; detach it first",
                        c.ip
                    )));
                }
                c.ip
            }
            None if names.contains(&name) => {
                return Err(OverlayError::Conflict(format!(
                    "the name {name} is taken in network {network} (by a service)"
                )));
            }
            None => {
                let ip = match ip {
                    Some(want) => {
                        net.usable(want)?;
                        if let Some(c) = net.claims.get(&want) {
                            return Err(OverlayError::Conflict(format!(
                                "address {want} is taken by {}",
                                net.owner_text(c)
                            )));
                        }
                        want
                    }
                    None => net.free(false)?,
                };
                if !self.store.claim_overlay(net.def.vni, ip, &owner, agent)? {
                    return Err(OverlayError::Conflict(format!(
                        "address {ip} or name {name} was taken at the same moment; try again"
                    )));
                }
                net.claims.insert(ip, Claim { ip, owner, agent: agent.to_owned() });
                net.cursor = Some(ip);
                ip
            }
        };
        net.live.insert(name.clone(), LiveEndpoint { ip, agent: agent.to_owned(), aliases });
        tracing::info!(network = %network, endpoint = %name, ip = %ip, agent, "endpoint attached");
        self.changed(&state);
        Ok(ip)
    }

    fn drop_from_services(store: &Store, net: &mut Net, ep: &Label) -> Result<(), OverlayError> {
        for s in net.services.values_mut() {
            if s.endpoints.contains(ep) {
                s.endpoints.retain(|e| e != ep);
                store.put_overlay_service(net.def.vni, s)?;
            }
        }
        Ok(())
    }

    /// Releases an endpoint of the caller's.
    pub fn detach(&self, who: &Caller, network: &Label, name: &Label) -> Result<(), OverlayError> {
        let mut state = self.lock();
        let net = state.net_mut(&who.account, network)?;
        let owner = Owner::Endpoint(name.clone());
        let claim = net.claim_of(&owner, Some(who.agent.as_str())).cloned().ok_or_else(|| {
            OverlayError::NotFound(format!(
                "network {network} has no endpoint {name} of this agent"
            ))
        })?;
        self.store.release_overlay(net.def.vni, claim.ip)?;
        net.claims.remove(&claim.ip);
        net.live.remove(name);
        Self::drop_from_services(&self.store, net, name)?;
        tracing::info!(network = %network, endpoint = %name, "endpoint detached");
        self.changed(&state);
        Ok(())
    }

    /// Defines a service; its virtual address (vip).
    pub fn create_service(
        &self,
        account: &Account,
        network: &Label,
        name: Label,
        mode: ServiceMode,
        endpoints: Vec<Label>,
    ) -> Result<Option<Ipv4Addr>, OverlayError> {
        if endpoints.is_empty() {
            return Err(OverlayError::Invalid("a service needs at least one endpoint".into()));
        }
        let mut state = self.lock();
        let net = state.net_mut(account, network)?;
        let (names, aliases) = net.names_taken();
        if names.contains(&name) || aliases.contains(&name) {
            return Err(OverlayError::Conflict(format!(
                "the name {name} is taken in network {network}"
            )));
        }
        let known: HashSet<Label> = net
            .claims
            .values()
            .filter_map(|c| match &c.owner {
                Owner::Endpoint(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        if let Some(x) = endpoints.iter().find(|e| !known.contains(*e)) {
            return Err(OverlayError::NotFound(format!(
                "network {network} has no endpoint named {x}"
            )));
        }
        let vip = match mode {
            ServiceMode::Vip => {
                let ip = net.free(false)?;
                let owner = Owner::Service(name.clone());
                if !self.store.claim_overlay(net.def.vni, ip, &owner, "")? {
                    return Err(OverlayError::Conflict("address claim raced; try again".into()));
                }
                net.claims.insert(ip, Claim { ip, owner, agent: String::new() });
                net.cursor = Some(ip);
                Some(ip)
            }
            ServiceMode::Dnsrr => None,
        };
        let row = ServiceRow { name: name.clone(), mode, vip, endpoints };
        if let Err(e) = self.store.put_overlay_service(net.def.vni, &row) {
            if let Some(v) = vip {
                net.claims.remove(&v);
                let _ = self.store.release_overlay(net.def.vni, v);
            }
            return Err(e.into());
        }
        net.services.insert(name, row);
        self.changed(&state);
        Ok(vip)
    }

    /// Removes a service.
    pub fn delete_service(
        &self,
        account: &Account,
        network: &Label,
        name: &Label,
    ) -> Result<(), OverlayError> {
        let mut state = self.lock();
        let net = state.net_mut(account, network)?;
        let s = net.services.remove(name).ok_or_else(|| {
            OverlayError::NotFound(format!("network {network} has no service {name}"))
        })?;
        self.store.delete_overlay_service(net.def.vni, name)?;
        if let Some(v) = s.vip {
            net.claims.remove(&v);
        }
        self.changed(&state);
        Ok(())
    }

    fn paths(&self, who: &Caller, network: &Label, paths: Vec<PathReport>) {
        let mut state = self.lock();
        if let Ok(net) = state.net_mut(&who.account, network)
            && let Some(m) = net.members.get_mut(who.agent.as_str())
            && m.session == Some(who.session)
        {
            m.paths = paths;
        }
    }

    /// A session ended: its memberships go offline (withdrawn after the grace period) and its
    /// frames stop.
    pub fn session_ended(&self, session: u64) {
        self.data.write().unwrap_or_else(std::sync::PoisonError::into_inner).sinks.remove(&session);
        let mut state = self.lock();
        let mut any = false;
        for n in state.nets.values_mut() {
            for (agent, m) in &mut n.members {
                if m.session == Some(session) {
                    m.session = None;
                    m.gone_at = Some(Instant::now());
                    any = true;
                    tracing::info!(network = %n.def.name, agent = %agent, "member offline");
                }
            }
        }
        if any {
            self.changed(&state);
        }
    }

    /// Withdraws members offline for longer than the grace period, with their endpoints.
    /// Returns how many were withdrawn.
    pub fn expire(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let mut count = 0;
        for n in state.nets.values_mut() {
            let gone: Vec<String> = n
                .members
                .iter()
                .filter(|(_, m)| m.gone_at.is_some_and(|t| now.duration_since(t) >= self.grace))
                .map(|(a, _)| a.clone())
                .collect();
            for agent in gone {
                n.members.remove(&agent);
                n.live.retain(|_, e| e.agent != agent);
                tracing::info!(network = %n.def.name, agent = %agent, "member withdrawn after the grace period");
                count += 1;
            }
        }
        if count > 0 {
            self.changed(&state);
        }
        count
    }

    /// Where frames for `session` go (set when it joins its first network).
    pub fn set_sink(&self, session: u64, sink: Sink) {
        self.data
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sinks
            .insert(session, sink);
    }

    /// Whether `session` has a sink already.
    pub fn has_sink(&self, session: u64) -> bool {
        self.data
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sinks
            .contains_key(&session)
    }

    /// Forwards one overlay datagram that arrived on `session` to the member it names, in the
    /// same network only, with its peer field set to the sender's address.
    pub fn forward(&self, session: u64, d: Bytes) {
        let dropped = || {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        };
        let Some((h, _)) = FrameHeader::decode(&d) else { return dropped() };
        let sink = {
            let data = self.data.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(src) = data.senders.get(&(h.vni, session)).copied() else {
                return dropped();
            };
            let Some(dst) = data.routes.get(&h.vni).and_then(|r| r.get(&h.peer)).copied() else {
                return dropped();
            };
            if dst == session {
                return dropped();
            }
            let Some(sink) = data.sinks.get(&dst).cloned() else { return dropped() };
            (sink, src)
        };
        let (sink, src) = sink;
        let mut out = BytesMut::from(&d[..]);
        out[8..12].copy_from_slice(&src.octets());
        let len = out.len() as u64;
        if sink.send(out.freeze()) {
            self.counters.frames.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            dropped();
        }
    }

    /// Every network of `account` (of every account: `None`), as the API shows them.
    pub fn list(&self, account: Option<&Account>) -> Vec<NetworkView> {
        let state = self.lock();
        let now = Instant::now();
        state
            .nets
            .values()
            .filter(|n| account.is_none_or(|a| *a == n.account))
            .map(|n| NetworkView {
                name: n.def.name.to_string(),
                account: n.account.as_str().to_owned(),
                vni: n.def.vni.get(),
                subnet: n.def.subnet.to_string(),
                gateway: n.def.gateway,
                mtu: n.def.mtu,
                created_at: n.created_at,
                members: n
                    .members
                    .iter()
                    .map(|(agent, m)| MemberView {
                        agent: agent.clone(),
                        addr: m.addr,
                        vtep: m.vtep,
                        online: m.session.is_some(),
                        withdrawn_in_secs: m
                            .gone_at
                            .map(|t| self.grace.saturating_sub(now.duration_since(t)).as_secs()),
                        paths: m
                            .paths
                            .iter()
                            .map(|p| PathView {
                                peer: p.peer,
                                path: p.path.as_str(),
                                rtt_us: p.rtt_us,
                            })
                            .collect(),
                    })
                    .collect(),
                endpoints: n
                    .claims
                    .values()
                    .filter_map(|c| match &c.owner {
                        Owner::Endpoint(name) => {
                            let live = n.live.get(name);
                            Some(EndpointView {
                                name: name.to_string(),
                                ip: c.ip,
                                agent: c.agent.clone(),
                                live: live.is_some(),
                                aliases: live
                                    .map(|l| l.aliases.iter().map(ToString::to_string).collect())
                                    .unwrap_or_default(),
                            })
                        }
                        _ => None,
                    })
                    .collect(),
                services: n
                    .services
                    .values()
                    .map(|s| ServiceView {
                        name: s.name.to_string(),
                        mode: match s.mode {
                            ServiceMode::Vip => "vip",
                            ServiceMode::Dnsrr => "dnsrr",
                        },
                        vip: s.vip,
                        endpoints: s.endpoints.iter().map(ToString::to_string).collect(),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;

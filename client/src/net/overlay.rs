//! Overlay networks at the agent: requests to the relay (their control plane), the state the
//! relay pushes (members, endpoints and services of the networks this host uses), and the
//! hooks the session loop calls.
//!
//! The pushed state survives a lost session, so the kernel's entries, and traffic on the
//! direct path, stay as they were while the relay is away. When a session comes back the agent
//! asks for the state again (`Watch`): the relay sends all of it, then answers. The agent also
//! joins its networks again and announces its endpoints with the addresses they have, so the
//! relay's view is rebuilt from the agents' after a restart of either side. A relay that
//! restarted knows the other hosts only once they rejoined, so whatever was not sent again is
//! dropped only [`STALE_AFTER`] later: the other hosts' entries, and the direct path to them,
//! stay meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use warren_proto::overlay::{Endpoint, NetDef, NetMessage, Peer, Service, ServiceMode, Subnet};
use warren_proto::{ErrorCode, Label};
use warren_transport::{Session, Stream, TransportKind};

use super::datapath::{Datapath, RelaySender};
use super::model::NetError;
use crate::agent::{Control, NetCall, NetCallError, OverlayHooks};

/// How long a request to the relay may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long after a new session's state arrived what the relay did not send again is kept:
/// time for the other hosts to rejoin a relay that restarted (and forgot them) before their
/// entries go.
const STALE_AFTER: Duration = Duration::from_secs(30);

/// What the relay told this agent about one network.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The definition.
    pub def: NetDef,
    /// The other members, by address.
    pub peers: BTreeMap<Ipv4Addr, Peer>,
    /// The endpoints on other members, by name.
    pub endpoints: BTreeMap<Label, Endpoint>,
    /// The services.
    pub services: BTreeMap<Label, Service>,
}

#[derive(Debug, Default)]
struct Pushed {
    nets: BTreeMap<Label, Remote>,
    /// The session epoch each item was last pushed in.
    seen: BTreeMap<(Label, u8, String), u64>,
    /// Networks the relay deleted, for the manager to take down.
    removed: Vec<Label>,
}

/// What the manager does when the relay's view changes.
pub trait OverlayOwner: Send + Sync + std::fmt::Debug {
    /// A session is up: join every local overlay network again and announce its endpoints.
    fn rejoin(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()>;
}

/// The overlay side of an agent.
#[derive(Debug)]
pub struct Overlay {
    control: mpsc::Sender<Control>,
    pushed: Mutex<Pushed>,
    epoch: AtomicU64,
    session: Mutex<Option<Session>>,
    resync: Mutex<Option<AbortOnDropHandle<()>>>,
    owner: OnceLock<Weak<dyn OverlayOwner>>,
    /// The data plane.
    pub datapath: Arc<Datapath>,
    /// Woken when the pushed state or a path changed; the manager reprograms then.
    pub changed: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn refused(e: NetCallError) -> NetError {
    match e {
        NetCallError::Disconnected => NetError::Unavailable(
            "overlay networks are run by the relay, and this agent has no session to it now (it \
             keeps retrying; see its log). Bridge networks work without the relay."
                .into(),
        ),
        NetCallError::Refused { code, message } => match code {
            ErrorCode::NotFound => NetError::NotFound(message),
            ErrorCode::Conflict => NetError::Conflict(message),
            ErrorCode::InvalidRequest => NetError::BadInput(message),
            _ => NetError::System(format!("the relay: {code}: {message}")),
        },
    }
}

/// Parses a name for the wire.
pub fn label(what: &str, s: &str) -> Result<Label, NetError> {
    Label::parse(s).map_err(|_| {
        NetError::BadInput(format!(
            "{what} name {s:?} is not a valid DNS label: use 1-63 characters a-z, 0-9 and '-', \
             not starting or ending with '-'"
        ))
    })
}

impl Overlay {
    /// The overlay side of the agent whose session loop reads `control`.
    pub fn new(control: mpsc::Sender<Control>) -> Arc<Self> {
        let changed = Arc::new(Notify::new());
        Arc::new(Self {
            control,
            pushed: Mutex::default(),
            epoch: AtomicU64::new(0),
            session: Mutex::default(),
            resync: Mutex::default(),
            owner: OnceLock::new(),
            datapath: Datapath::new(changed.clone()),
            changed,
        })
    }

    /// Who rejoins on each new session.
    pub fn set_owner(&self, owner: Weak<dyn OverlayOwner>) {
        let _ = self.owner.set(owner);
    }

    /// Whether a session to the relay is up.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// The address this host reaches the relay from: the default VTEP.
    pub fn default_vtep(&self) -> Option<Ipv4Addr> {
        let remote = lock(&self.session).as_ref()?.remote_addr();
        let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
        sock.connect(remote).ok()?;
        match sock.local_addr().ok()?.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        }
    }

    async fn call(
        &self,
        make: impl FnOnce(u32) -> NetMessage + Send + 'static,
    ) -> Result<NetMessage, NetError> {
        let (tx, rx) = oneshot::channel();
        let call = NetCall { make: Box::new(make), reply: tx };
        self.control
            .send(Control::Net(call))
            .await
            .map_err(|_| refused(NetCallError::Disconnected))?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Err(_) => Err(NetError::Unavailable(format!(
                "the relay did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            ))),
            Ok(Err(_)) => Err(refused(NetCallError::Disconnected)),
            Ok(Ok(r)) => r.map_err(refused),
        }
    }

    fn unexpected(m: &NetMessage) -> NetError {
        NetError::System(format!("unexpected answer from the relay: {m:?}"))
    }

    /// Defines a network at the relay.
    pub async fn create(
        &self,
        name: Label,
        subnet: Option<Subnet>,
        mtu: Option<u16>,
    ) -> Result<NetDef, NetError> {
        match self.call(move |req| NetMessage::Create { req, name, subnet, mtu }).await? {
            NetMessage::Info { def, .. } => Ok(def),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Deletes a network at the relay.
    pub async fn delete(&self, name: Label) -> Result<(), NetError> {
        match self.call(move |req| NetMessage::Delete { req, name }).await? {
            NetMessage::Ok { .. } => Ok(()),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Joins a network: its definition and this host's address in it.
    pub async fn join(
        &self,
        name: Label,
        vtep: Ipv4Addr,
        endpoints: Vec<Label>,
    ) -> Result<(NetDef, Ipv4Addr), NetError> {
        match self.call(move |req| NetMessage::Join { req, name, vtep, endpoints }).await? {
            NetMessage::Info { def, host_addr: Some(h), .. } => Ok((def, h)),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Claims an endpoint's address (or confirms it) and announces the endpoint.
    pub async fn attach(
        &self,
        network: Label,
        name: Label,
        ip: Option<Ipv4Addr>,
        aliases: Vec<Label>,
    ) -> Result<Ipv4Addr, NetError> {
        match self.call(move |req| NetMessage::Attach { req, network, name, ip, aliases }).await? {
            NetMessage::Address { ip, .. } => Ok(ip),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Releases an endpoint.
    pub async fn detach(&self, network: Label, name: Label) -> Result<(), NetError> {
        match self.call(move |req| NetMessage::Detach { req, network, name }).await? {
            NetMessage::Ok { .. } => Ok(()),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Defines a service; its virtual address (vip).
    pub async fn create_service(
        &self,
        network: Label,
        name: Label,
        mode: ServiceMode,
        endpoints: Vec<Label>,
    ) -> Result<Option<Ipv4Addr>, NetError> {
        let ask = move |req| NetMessage::ServiceCreate { req, network, name, mode, endpoints };
        match self.call(ask).await? {
            NetMessage::Address { ip, .. } => Ok((!ip.is_unspecified()).then_some(ip)),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Removes a service.
    pub async fn delete_service(&self, network: Label, name: Label) -> Result<(), NetError> {
        match self.call(move |req| NetMessage::ServiceDelete { req, network, name }).await? {
            NetMessage::Ok { .. } => Ok(()),
            m => Err(Self::unexpected(&m)),
        }
    }

    /// Tells the relay the paths to the peers (no answer).
    pub fn report_paths(&self, network: Label, paths: Vec<warren_proto::overlay::PathReport>) {
        let _ = self.control.try_send(Control::NetSend(NetMessage::Paths { network, paths }));
    }

    /// What the relay said about network `name`.
    pub fn remote(&self, name: &str) -> Option<Remote> {
        let name = Label::parse(name).ok()?;
        lock(&self.pushed).nets.get(&name).cloned()
    }

    /// Every network the relay told about.
    pub fn remotes(&self) -> Vec<Remote> {
        lock(&self.pushed).nets.values().cloned().collect()
    }

    /// Networks the relay deleted since the last call.
    pub fn take_removed(&self) -> Vec<Label> {
        std::mem::take(&mut lock(&self.pushed).removed)
    }

    fn apply(&self, m: NetMessage) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut p = lock(&self.pushed);
        let p = &mut *p;
        match m {
            NetMessage::Defined(def) => {
                let name = def.name.clone();
                p.seen.insert((name.clone(), 0, String::new()), epoch);
                match p.nets.get_mut(&name) {
                    Some(r) => r.def = def,
                    None => {
                        p.nets.insert(
                            name,
                            Remote {
                                def,
                                peers: BTreeMap::new(),
                                endpoints: BTreeMap::new(),
                                services: BTreeMap::new(),
                            },
                        );
                    }
                }
            }
            NetMessage::Removed { name } => {
                p.nets.remove(&name);
                p.seen.retain(|(n, _, _), _| *n != name);
                p.removed.push(name);
            }
            NetMessage::Peer(peer) => {
                if let Some(r) = p.nets.get_mut(&peer.network) {
                    p.seen.insert((peer.network.clone(), 1, peer.addr.to_string()), epoch);
                    r.peers.insert(peer.addr, peer);
                }
            }
            NetMessage::PeerGone { network, peer } => {
                if let Some(r) = p.nets.get_mut(&network) {
                    r.peers.remove(&peer);
                }
            }
            NetMessage::Endpoint(e) => {
                if let Some(r) = p.nets.get_mut(&e.network) {
                    p.seen.insert((e.network.clone(), 2, e.name.to_string()), epoch);
                    r.endpoints.insert(e.name.clone(), e);
                }
            }
            NetMessage::EndpointGone { network, name } => {
                if let Some(r) = p.nets.get_mut(&network) {
                    r.endpoints.remove(&name);
                }
            }
            NetMessage::Service(s) => {
                if let Some(r) = p.nets.get_mut(&s.network) {
                    p.seen.insert((s.network.clone(), 3, s.name.to_string()), epoch);
                    r.services.insert(s.name.clone(), s);
                }
            }
            NetMessage::ServiceGone { network, name } => {
                if let Some(r) = p.nets.get_mut(&network) {
                    r.services.remove(&name);
                }
            }
            other => tracing::debug!(message = ?other, "overlay message ignored"),
        }
    }

    /// Drops what was not pushed again in the current epoch (after the relay sent its whole
    /// state).
    fn drop_stale(&self) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut p = lock(&self.pushed);
        let p = &mut *p;
        let fresh = |key: (Label, u8, String), seen: &BTreeMap<(Label, u8, String), u64>| {
            seen.get(&key).is_some_and(|e| *e >= epoch)
        };
        let seen = p.seen.clone();
        p.nets.retain(|name, r| {
            r.peers.retain(|a, _| fresh((name.clone(), 1, a.to_string()), &seen));
            r.endpoints.retain(|e, _| fresh((name.clone(), 2, e.to_string()), &seen));
            r.services.retain(|s, _| fresh((name.clone(), 3, s.to_string()), &seen));
            fresh((name.clone(), 0, String::new()), &seen)
        });
        p.seen.retain(|_, e| *e >= epoch);
    }

    /// Asks for the whole state and rejoins; drops what was not pushed again `stale_after`
    /// later.
    async fn resync(self: Arc<Self>, stale_after: Duration) {
        if let Err(e) = self.call(|req| NetMessage::Watch { req }).await {
            tracing::warn!(error = %e, "cannot get the overlay networks from the relay");
            return;
        }
        self.changed.notify_one();
        let owner = self.owner.get().and_then(Weak::upgrade);
        if let Some(owner) = owner {
            owner.rejoin().await;
        }
        self.changed.notify_one();
        // Hosts that rejoin meanwhile are pushed again; what is left went away.
        tokio::time::sleep(stale_after).await;
        self.drop_stale();
        self.changed.notify_one();
    }

    /// Names known locally or at the relay, for a network that is not materialized here.
    pub fn known_names(&self) -> HashSet<String> {
        lock(&self.pushed).nets.keys().map(ToString::to_string).collect()
    }
}

/// The hooks of the session loop.
#[derive(Debug)]
pub struct Hooks(pub Arc<Overlay>);

impl OverlayHooks for Hooks {
    fn session_up(&self, session: &Session) {
        let ov = &self.0;
        *lock(&ov.session) = Some(session.clone());
        ov.epoch.fetch_add(1, Ordering::Relaxed);
        if session.kind() == TransportKind::Quic {
            ov.datapath.set_link(Some(RelaySender::Quic(session.clone())));
        }
        *lock(&ov.resync) =
            Some(AbortOnDropHandle::new(tokio::spawn(ov.clone().resync(STALE_AFTER))));
    }

    fn session_down(&self) {
        let ov = &self.0;
        *lock(&ov.session) = None;
        lock(&ov.resync).take();
        ov.datapath.set_link(None);
        ov.changed.notify_one();
    }

    fn push(&self, msg: NetMessage) {
        self.0.apply(msg);
        self.0.changed.notify_one();
    }

    fn datagram(&self, d: bytes::Bytes) {
        self.0.datapath.inbound(&d);
    }

    fn stream(&self, s: Stream) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(self.0.datapath.clone().serve_stream(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::AgentId;
    use warren_proto::overlay::Vni;

    fn l(s: &str) -> Label {
        Label::parse(s).expect("label")
    }

    fn def(name: &str) -> NetDef {
        NetDef {
            name: l(name),
            vni: Vni::new(4096).expect("vni"),
            subnet: Subnet::new(Ipv4Addr::new(10, 214, 0, 0), 24).expect("subnet"),
            gateway: Ipv4Addr::new(10, 214, 0, 1),
            mtu: 1450,
        }
    }

    #[test]
    fn pushes_build_the_state_and_a_new_epoch_drops_what_was_not_sent_again() {
        let (tx, _rx) = mpsc::channel(1);
        let ov = Overlay::new(tx);
        let peer = |a: u8| Peer {
            network: l("net"),
            addr: Ipv4Addr::new(10, 214, 0, a),
            agent: AgentId::parse("b").expect("agent"),
            vtep: Ipv4Addr::new(192, 168, 99, 2),
            online: true,
        };
        let ep = |n: &str, a: u8| Endpoint {
            network: l("net"),
            name: l(n),
            ip: Ipv4Addr::new(10, 214, 0, a),
            peer: Ipv4Addr::new(10, 214, 0, 253),
            aliases: vec![],
        };
        ov.apply(NetMessage::Defined(def("net")));
        ov.apply(NetMessage::Peer(peer(253)));
        ov.apply(NetMessage::Endpoint(ep("api", 2)));
        ov.apply(NetMessage::Endpoint(ep("old", 3)));
        let r = ov.remote("net").expect("net");
        assert_eq!((r.peers.len(), r.endpoints.len()), (1, 2));
        ov.apply(NetMessage::EndpointGone { network: l("net"), name: l("old") });
        assert_eq!(ov.remote("net").expect("net").endpoints.len(), 1);
        // A new session: the relay sends everything again but the peer.
        ov.epoch.fetch_add(1, Ordering::Relaxed);
        ov.apply(NetMessage::Defined(def("net")));
        ov.apply(NetMessage::Endpoint(ep("api", 2)));
        assert_eq!(ov.remote("net").expect("net").peers.len(), 1, "kept until the state is whole");
        ov.drop_stale();
        let r = ov.remote("net").expect("net");
        assert!(r.peers.is_empty());
        assert_eq!(r.endpoints.keys().collect::<Vec<_>>(), vec![&l("api")]);
        ov.apply(NetMessage::Removed { name: l("net") });
        assert!(ov.remote("net").is_none());
        assert_eq!(ov.take_removed(), vec![l("net")]);
        assert!(ov.take_removed().is_empty());
    }

    /// A relay that restarted answers `Watch` before the other hosts rejoined it: their
    /// entries stay (the manager reprograms without dropping them), and go only once the
    /// grace has passed without them pushed again.
    #[tokio::test]
    async fn a_new_session_keeps_what_it_did_not_send_again_for_a_while() {
        for grace in [Duration::from_secs(3600), Duration::ZERO] {
            let (tx, mut rx) = mpsc::channel(1);
            let ov = Overlay::new(tx);
            ov.apply(NetMessage::Defined(def("net")));
            ov.apply(NetMessage::Peer(Peer {
                network: l("net"),
                addr: Ipv4Addr::new(10, 214, 0, 253),
                agent: AgentId::parse("b").expect("agent"),
                vtep: Ipv4Addr::new(192, 168, 99, 2),
                online: true,
            }));
            ov.epoch.fetch_add(1, Ordering::Relaxed);
            let resync = tokio::spawn(ov.clone().resync(grace));
            let call = match rx.recv().await {
                Some(Control::Net(call)) => call,
                other => panic!("expected the Watch call, got {other:?}"),
            };
            // The restarted relay knows the network (stored) but not the other host yet.
            ov.apply(NetMessage::Defined(def("net")));
            call.reply.send(Ok(NetMessage::Ok { req: 1 })).expect("resync waits for the answer");
            if grace.is_zero() {
                resync.await.expect("resync");
                let r = ov.remote("net").expect("net");
                assert!(r.peers.is_empty(), "gone once the grace passed without it");
            } else {
                // The manager is told to reprogram: the other host is still there for it.
                ov.changed.notified().await;
                let r = ov.remote("net").expect("net");
                assert_eq!(r.peers.len(), 1, "the other host stays while it may still rejoin");
                resync.abort();
            }
        }
    }
}

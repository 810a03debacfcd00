//! Overlay networks in the manager: defining and joining them through the relay, their
//! kernel objects (a bridge with this host's address and the shared gateway, a VXLAN device,
//! the tap of the relay path), and the forwarding and neighbour entries programmed from what
//! the relay pushes.
//!
//! Per overlay network on this host, with bridge B, VXLAN device X and tap T:
//! - B has this host's own address in the network (primary, so traffic the host originates
//!   and hairpin masquerade use it, and answers find their way back across hosts) and the
//!   gateway as a /32 (the same on every host; endpoints' default route and DNS). B's MAC is
//!   derived from the host address, so it is unique in the network.
//! - For every remote endpoint and every peer's bridge: a neighbour entry IP → MAC on X (X
//!   answers ARP for them itself: `proxy`), X's own entry MAC → the peer's VTEP, and a static
//!   bridge entry MAC → X (direct path) or → T (relay path). Nothing is flooded or learned.
//! - For every peer's probe MAC: X's entry → the peer's VTEP and B's entry → X (probes always
//!   take the direct path); this host's probe MAC → T.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use warren_proto::overlay::{PathKind, PathReport, Subnet, Vni};

use super::super::datapath::PeerSpec;
use super::super::model::{OVERLAY, overlay_id, probe_mac_for};
use super::super::overlay::{Overlay, OverlayOwner, Remote, label};
use super::*;
use crate::agent::Control;

/// An overlay network as the API shows it, beside its local parts.
#[derive(Debug, Serialize)]
pub struct OverlayView {
    /// Its VNI.
    pub vni: u32,
    /// Used on this host (bridge, VXLAN device, tap).
    pub joined: bool,
    /// This host's address in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_addr: Option<Ipv4Addr>,
    /// This host's VXLAN endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep: Option<Ipv4Addr>,
    /// Its VXLAN device.
    pub vxlan: String,
    /// The other members.
    pub peers: Vec<PeerView>,
    /// Endpoints on other members.
    pub remote_endpoints: Vec<RemoteEndpointView>,
    /// Frames over the relay path: out, in, dropped.
    pub relay_frames: [u64; 3],
    /// Whether the agent has a session to the relay now.
    pub relay_connected: bool,
}

/// A peer as the API shows it.
#[derive(Debug, Serialize)]
pub struct PeerView {
    /// Its agent.
    pub agent: String,
    /// Its address in the network.
    pub addr: Ipv4Addr,
    /// Its VXLAN endpoint.
    pub vtep: Ipv4Addr,
    /// Its relay session is up.
    pub online: bool,
    /// `direct` or `relay`.
    pub path: &'static str,
    /// The last direct-path probe's round trip, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// An endpoint on another member.
#[derive(Debug, Serialize)]
pub struct RemoteEndpointView {
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: String,
    /// Its aliases.
    pub aliases: Vec<String>,
    /// The member it lives on.
    pub peer: Ipv4Addr,
}

pub(super) fn subnet_of(s: Subnet) -> Ipv4Net {
    Ipv4Net::new(s.addr(), s.prefix()).unwrap_or_default()
}

fn no_overlays() -> NetError {
    NetError::Unavailable(
        "overlay networks need a relay: start `warren agent` with --relay and --token (bridge \
         networks need none)"
            .into(),
    )
}

impl NetManager {
    /// Lets overlay networks use the relay sessions of the agent loop that reads `control`;
    /// returns the overlay side, whose hooks the loop calls.
    pub fn enable_overlays(self: &Arc<Self>, control: mpsc::Sender<Control>) -> Arc<Overlay> {
        let ov = Overlay::new(control);
        let _ = self.overlay.set(ov.clone());
        let me: Arc<dyn OverlayOwner> = self.clone();
        ov.set_owner(Arc::downgrade(&me));
        let (weak, stop, changed) = (Arc::downgrade(self), self.stop.clone(), ov.changed.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = changed.notified() => {}
                }
                // Coalesce a burst of pushes into one reprogramming.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let Some(m) = weak.upgrade() else { break };
                m.overlay_changed().await;
            }
        });
        ov
    }

    pub(super) fn overlay(&self) -> Result<Arc<Overlay>, NetError> {
        self.overlay.get().cloned().ok_or_else(no_overlays)
    }

    async fn overlay_changed(&self) {
        if self.usable().is_err() {
            return;
        }
        let Ok(ov) = self.overlay() else { return };
        let mut live = self.live.lock().await;
        for name in ov.take_removed() {
            if let Ok(Some(n)) = self.store.network(name.as_str())
                && n.is_overlay()
            {
                tracing::warn!(
                    "overlay network {name} was deleted at the relay; removing it from this host"
                );
                if let Err(e) = self.teardown_overlay(&mut live, &n).await {
                    tracing::warn!("removing overlay network {name}: {e}");
                }
            }
        }
        if let Err(e) = self.refresh(&mut live).await {
            tracing::warn!("networks: {e}");
        }
    }

    /// This host's VXLAN endpoint: `--vtep`, else the address it reaches the relay from.
    fn vtep(&self, ov: &Overlay) -> Result<Ipv4Addr, NetError> {
        self.cfg.vtep.or_else(|| ov.default_vtep()).ok_or_else(|| {
            NetError::Unavailable(
                "cannot tell this host's VXLAN address (the relay is not reachable over IPv4); \
                 start the agent with --vtep IP"
                    .into(),
            )
        })
    }

    /// Checks that `subnet` clashes with no other network and no route of this host.
    async fn check_local_subnet(
        &self,
        live: &Live,
        subnet: Ipv4Net,
        except: Option<&str>,
    ) -> Result<(), NetError> {
        let kernel = Self::kernel(live)?;
        let ours: Vec<(String, Ipv4Net)> = self
            .store
            .networks()?
            .into_iter()
            .filter(|n| Some(n.name.as_str()) != except)
            .map(|n| (n.name, n.subnet))
            .collect();
        let routes = super::host_routes(kernel).await?;
        let taken = ipam::Taken { networks: &ours, routes: &routes };
        ipam::check_subnet(subnet, &taken)
    }

    /// `warren net create --driver overlay`: defined at the relay, then joined here.
    pub(super) async fn create_overlay(&self, req: CreateNetwork) -> Result<NetworkView, NetError> {
        let ov = self.overlay()?;
        if req.gateway.is_some() || req.ip_range.is_some() {
            return Err(bad(
                "--gateway and --ip-range are for bridge networks; an overlay's gateway is its \
                 subnet's first address and the relay hands out its addresses",
            ));
        }
        let name = label("network", &req.name)?;
        let subnet = req.subnet.as_deref().map(|s| parse_net("subnet", s)).transpose()?;
        let mtu = req
            .mtu
            .map(|m| u16::try_from(m).map_err(|_| bad(format!("MTU {m} is out of range"))))
            .transpose()?;
        let mut live = self.live.lock().await;
        if self.store.network(&req.name)?.is_some() {
            return Err(NetError::Conflict(format!("a network named {} exists already", req.name)));
        }
        if let Some(s) = subnet {
            self.check_local_subnet(&live, s, None).await?;
        }
        let wire = match subnet {
            Some(s) => Some(Subnet::new(s.network(), s.prefix_len()).ok_or_else(|| {
                bad(format!("subnet {s} has host bits set; did you mean {}?", s.trunc()))
            })?),
            None => None,
        };
        let def = ov.create(name, wire, mtu).await?;
        let n = self.join_overlay(&mut live, &ov, &def).await.map_err(|e| {
            NetError::Conflict(format!(
                "overlay network {} was created at the relay, but this host cannot use it: {e}",
                def.name
            ))
        })?;
        let mut warnings = Vec::new();
        let cap = ipam::capacity(n.subnet, None, n.gateway);
        if cap > 256 {
            warnings.push(format!(
                "overlay network {} can hold {cap} addresses; past 256 every member programs an \
                 entry per endpoint and each vip service's rules grow with every endpoint — \
                 prefer several overlays of a /24, or services in dnsrr mode",
                n.name
            ));
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        self.view(&live, n, warnings)
    }

    /// Joins a network the relay defined: its kernel objects on this host.
    async fn join_overlay(
        &self,
        live: &mut Live,
        ov: &Overlay,
        def: &warren_proto::overlay::NetDef,
    ) -> Result<Network, NetError> {
        if let Some(n) = self.store.network(def.name.as_str())? {
            if n.vni == Some(def.vni.get()) {
                return Ok(n);
            }
            return Err(NetError::Conflict(format!(
                "a bridge network named {} exists on this host",
                def.name
            )));
        }
        let subnet = subnet_of(def.subnet);
        self.check_local_subnet(live, subnet, None).await?;
        let vtep = self.vtep(ov)?;
        let (def, host) = ov.join(def.name.clone(), vtep, Vec::new()).await?;
        let n = Network {
            name: def.name.to_string(),
            id: overlay_id(def.vni.get()),
            driver: OVERLAY.into(),
            subnet,
            gateway: def.gateway,
            ip_range: None,
            mtu: u32::from(def.mtu),
            vni: Some(def.vni.get()),
            host_addr: Some(host),
            vtep: Some(vtep),
        };
        if !self.store.insert_network(&n)? {
            return Err(NetError::Conflict(format!("a network named {} exists already", n.name)));
        }
        if let Err(e) = self.materialize(live, &n).await {
            let _ = self.unmaterialize(live, &n).await;
            self.store.delete_network(&n.name)?;
            return Err(e);
        }
        self.refresh(live).await?;
        tracing::info!(
            "overlay network {} joined: {} via {}, this host {} (VNI {}, VTEP {vtep})",
            n.name,
            n.subnet,
            n.gateway,
            host,
            def.vni
        );
        Ok(n)
    }

    /// The network `name`, joining it first when it is an overlay known only at the relay.
    pub(super) async fn network_or_join(
        &self,
        live: &mut Live,
        name: &str,
    ) -> Result<Network, NetError> {
        if let Some(n) = self.store.network(name)? {
            return Ok(n);
        }
        if let Some(ov) = self.overlay.get().cloned()
            && let Some(r) = ov.remote(name)
        {
            return self.join_overlay(live, &ov, &r.def).await;
        }
        self.network(name)
    }

    /// The bridge of `n` (with an overlay's two addresses); its index.
    pub(super) async fn ensure_net_bridge(
        &self,
        kernel: &Kernel,
        n: &Network,
    ) -> Result<u32, NetError> {
        let index = kernel
            .ensure_bridge(&n.bridge(), n.bridge_addr(), n.subnet.prefix_len(), n.mtu)
            .await?;
        if n.is_overlay() {
            kernel.ensure_address(&n.bridge(), n.gateway, 32).await?;
        }
        Ok(index)
    }

    /// An overlay's kernel objects and DNS server.
    pub(super) async fn materialize(&self, live: &mut Live, n: &Network) -> Result<(), NetError> {
        let kernel = Self::kernel(live)?.clone();
        kernel::enable_forwarding()?;
        let bridge = self.ensure_net_bridge(&kernel, n).await?;
        let (Some(vni), Some(host)) = (n.vni.and_then(Vni::new), n.host_addr) else {
            return Err(NetError::System(format!("overlay network {} has no VNI", n.name)));
        };
        match (n.vtep, kernel.link(&n.vxlan()).await?) {
            (Some(vtep), _) => {
                kernel
                    .ensure_vxlan(&n.vxlan(), vni.get(), vtep, self.cfg.vxlan_port, n.mtu, bridge)
                    .await?;
            }
            (None, Some(_)) => {}
            (None, None) => {
                return Err(NetError::Unavailable(format!(
                    "overlay network {}: this host's VXLAN address is unknown; give --vtep",
                    n.name
                )));
            }
        }
        // The tap lives as long as this process; without a relay there is no relay path.
        if let Some(ov) = self.overlay.get() {
            ov.datapath.ensure(vni, host, &n.tap(), n.mtu)?;
            let tap = kernel
                .link(&n.tap())
                .await?
                .ok_or_else(|| NetError::System(format!("the tap {} is missing", n.tap())))?;
            kernel.port_of(&tap, bridge, n.mtu, false).await?;
        }
        self.start_dns(live, n).await
    }

    async fn unmaterialize(&self, live: &mut Live, n: &Network) -> Result<(), NetError> {
        live.dns.remove(&n.name);
        if let (Some(ov), Some(vni)) = (self.overlay.get(), n.vni.and_then(Vni::new)) {
            ov.datapath.remove(vni);
        }
        let kernel = Self::kernel(live)?.clone();
        for l in [n.tap(), n.vxlan(), n.bridge()] {
            kernel.delete_link(&l).await?;
        }
        Ok(())
    }

    /// Takes an overlay network off this host: its endpoints, kernel objects and state.
    pub(super) async fn teardown_overlay(
        &self,
        live: &mut Live,
        n: &Network,
    ) -> Result<(), NetError> {
        let kernel = Self::kernel(live)?.clone();
        for e in self.store.endpoints(Some(&n.name))? {
            kernel.delete_link(&e.host_veth()).await?;
            live.healthy.remove(&(e.network.clone(), e.name.clone()));
        }
        self.unmaterialize(live, n).await?;
        self.store.delete_network(&n.name)?;
        live.reported.remove(&n.name);
        tracing::info!("overlay network {} removed from this host", n.name);
        Ok(())
    }

    /// `warren net rm` of an overlay: deleted at the relay (refused while any host has
    /// endpoints in it), then here.
    pub(super) async fn remove_overlay(
        &self,
        n: &Network,
        eps: &[Endpoint],
        force: bool,
    ) -> Result<(), NetError> {
        let ov = self.overlay()?;
        let name = label("network", &n.name)?;
        if force {
            for e in eps {
                self.detach(&n.name, &e.name).await?;
            }
        }
        ov.delete(name).await?;
        let mut live = self.live.lock().await;
        if let Some(n) = self.store.network(&n.name)? {
            self.teardown_overlay(&mut live, &n).await?;
        }
        self.refresh(&mut live).await
    }

    /// Claims endpoint `name`'s address at the relay (`fixed`, or any free one), and in the
    /// local table for `owner`.
    pub(super) async fn claim_overlay(
        &self,
        n: &Network,
        name: &str,
        fixed: Option<Ipv4Addr>,
        aliases: &[String],
        owner: &str,
    ) -> Result<Ipv4Addr, NetError> {
        let ov = self.overlay()?;
        if let Some(ip) = fixed {
            ipam::check_usable(n.subnet, None, n.gateway, ip)?;
        }
        let aliases = aliases.iter().map(|a| label("alias", a)).collect::<Result<Vec<_>, _>>()?;
        let ip =
            ov.attach(label("network", &n.name)?, label("endpoint", name)?, fixed, aliases).await?;
        // The local table mirrors the relay's claim.
        if !self.store.claim_address(&n.name, ip, owner)? {
            let _ = ov.detach(label("network", &n.name)?, label("endpoint", name)?).await;
            return Err(NetError::Conflict(format!("address {ip} is taken on this host")));
        }
        Ok(ip)
    }

    /// Releases an endpoint at the relay; a relay that cannot be reached learns it at the next
    /// join.
    pub(super) async fn release_overlay(&self, n: &Network, name: &str) {
        let Ok(ov) = self.overlay() else { return };
        let (Ok(net), Ok(ep)) = (label("network", &n.name), label("endpoint", name)) else {
            return;
        };
        if let Err(e) = ov.detach(net, ep).await {
            tracing::info!(
                "endpoint {name} of {}: the relay is told at the next connection ({e})",
                n.name
            );
        }
    }

    /// `warren net service create` on an overlay: defined at the relay.
    pub(super) async fn create_overlay_service(
        &self,
        n: &Network,
        req: CreateService,
        mode: ServiceMode,
    ) -> Result<Service, NetError> {
        let ov = self.overlay()?;
        let wire_mode = match mode {
            ServiceMode::Vip => warren_proto::overlay::ServiceMode::Vip,
            ServiceMode::Dnsrr => warren_proto::overlay::ServiceMode::Dnsrr,
        };
        let eps =
            req.endpoints.iter().map(|e| label("endpoint", e)).collect::<Result<Vec<_>, _>>()?;
        let vip = ov
            .create_service(
                label("network", &n.name)?,
                label("service", &req.name)?,
                wire_mode,
                eps,
            )
            .await?;
        let mut live = self.live.lock().await;
        self.refresh(&mut live).await?;
        Ok(Service { network: n.name.clone(), name: req.name, mode, vip, endpoints: req.endpoints })
    }

    /// `warren net service rm` on an overlay.
    pub(super) async fn remove_overlay_service(
        &self,
        n: &Network,
        name: &str,
    ) -> Result<(), NetError> {
        let ov = self.overlay()?;
        ov.delete_service(label("network", &n.name)?, label("service", name)?).await
    }

    /// What the relay said about overlay `n`, once it said anything.
    pub(super) fn remote_of(&self, n: &Network) -> Option<Remote> {
        if !n.is_overlay() {
            return None;
        }
        self.overlay.get()?.remote(&n.name)
    }

    /// Overlay services as the model shows them.
    pub(super) fn remote_services(r: &Remote) -> Vec<Service> {
        r.services
            .values()
            .map(|s| Service {
                network: s.network.to_string(),
                name: s.name.to_string(),
                mode: match s.mode {
                    warren_proto::overlay::ServiceMode::Vip => ServiceMode::Vip,
                    warren_proto::overlay::ServiceMode::Dnsrr => ServiceMode::Dnsrr,
                },
                vip: s.vip,
                endpoints: s.endpoints.iter().map(ToString::to_string).collect(),
            })
            .collect()
    }

    /// The overlay part of a network's view.
    pub(super) fn overlay_view(&self, n: &Network, joined: bool) -> Option<OverlayView> {
        if !n.is_overlay() {
            return None;
        }
        let ov = self.overlay.get();
        let remote = ov.and_then(|o| o.remote(&n.name));
        let vni = n.vni.and_then(Vni::new);
        let paths = match (ov, vni) {
            (Some(o), Some(v)) => o.datapath.paths(v),
            _ => HashMap::new(),
        };
        let counters = match (ov, vni) {
            (Some(o), Some(v)) => o.datapath.counters(v),
            _ => (0, 0, 0),
        };
        let peers = remote
            .iter()
            .flat_map(|r| r.peers.values())
            .filter(|p| Some(p.addr) != n.host_addr)
            .map(|p| {
                let st = paths.get(&p.addr);
                PeerView {
                    agent: p.agent.to_string(),
                    addr: p.addr,
                    vtep: p.vtep,
                    online: p.online,
                    path: st.map_or("direct", |s| s.path.as_str()),
                    rtt_ms: st.and_then(|s| s.rtt).map(|d| d.as_secs_f64() * 1000.0),
                }
            })
            .collect();
        let remote_endpoints = remote
            .iter()
            .flat_map(|r| r.endpoints.values())
            .map(|e| RemoteEndpointView {
                name: e.name.to_string(),
                ip: e.ip,
                mac: mac_text(mac_for(e.ip)),
                aliases: e.aliases.iter().map(ToString::to_string).collect(),
                peer: e.peer,
            })
            .collect();
        Some(OverlayView {
            vni: n.vni.unwrap_or_default(),
            joined,
            host_addr: n.host_addr,
            vtep: n.vtep,
            vxlan: n.vxlan(),
            peers,
            remote_endpoints,
            relay_frames: [counters.0, counters.1, counters.2],
            relay_connected: ov.is_some_and(|o| o.connected()),
        })
    }

    /// Overlays the relay told about that this host has not joined.
    pub(super) fn unjoined(&self) -> Vec<Network> {
        let Some(ov) = self.overlay.get() else { return Vec::new() };
        let local: HashSet<String> = self
            .store
            .networks()
            .map(|v| v.into_iter().map(|n| n.name).collect())
            .unwrap_or_default();
        ov.remotes()
            .into_iter()
            .filter(|r| !local.contains(r.def.name.as_str()))
            .map(|r| Network {
                name: r.def.name.to_string(),
                id: overlay_id(r.def.vni.get()),
                driver: OVERLAY.into(),
                subnet: subnet_of(r.def.subnet),
                gateway: r.def.gateway,
                ip_range: None,
                mtu: u32::from(r.def.mtu),
                vni: Some(r.def.vni.get()),
                host_addr: None,
                vtep: None,
            })
            .collect()
    }

    /// Programs an overlay's forwarding and neighbour entries from the relay's state and the
    /// paths the data plane chose, and tells the data plane which MACs live where.
    pub(super) async fn program_overlay(
        &self,
        live: &mut Live,
        kernel: &Kernel,
        n: &Network,
    ) -> Result<(), NetError> {
        let (Some(ov), Some(vni), Some(me)) =
            (self.overlay.get(), n.vni.and_then(Vni::new), n.host_addr)
        else {
            return Ok(());
        };
        // Until the relay spoke (after a restart), the kernel keeps what it had.
        let Some(remote) = ov.remote(&n.name) else { return Ok(()) };
        let Some(vx) = kernel.link(&n.vxlan()).await? else { return Ok(()) };
        let tap = kernel.link(&n.tap()).await?;
        let paths = ov.datapath.paths(vni);
        let port_for = |peer: Ipv4Addr| match (&tap, paths.get(&peer).map(|p| p.path)) {
            (Some(t), Some(PathKind::Relay)) => t.index,
            _ => vx.index,
        };
        let mut own: HashMap<[u8; 6], Ipv4Addr> = HashMap::new();
        let mut master: HashMap<[u8; 6], u32> = HashMap::new();
        let mut neigh: HashMap<Ipv4Addr, [u8; 6]> = HashMap::new();
        let mut remote_macs: HashMap<[u8; 6], Ipv4Addr> = HashMap::new();
        let mut specs = Vec::new();
        for p in remote.peers.values().filter(|p| p.addr != me) {
            specs.push(PeerSpec { addr: p.addr, vtep: p.vtep, online: p.online });
            if p.vtep.is_unspecified() {
                continue;
            }
            let probe = probe_mac_for(p.addr);
            own.insert(probe, p.vtep);
            master.insert(probe, vx.index);
            let host = mac_for(p.addr);
            own.insert(host, p.vtep);
            master.insert(host, port_for(p.addr));
            neigh.insert(p.addr, host);
            remote_macs.insert(host, p.addr);
        }
        for e in remote.endpoints.values() {
            let Some(p) = remote.peers.get(&e.peer).filter(|p| !p.vtep.is_unspecified()) else {
                continue;
            };
            let mac = mac_for(e.ip);
            own.insert(mac, p.vtep);
            master.insert(mac, port_for(p.addr));
            neigh.insert(e.ip, mac);
            remote_macs.insert(mac, p.addr);
        }
        if let Some(t) = &tap {
            master.insert(probe_mac_for(me), t.index);
        }
        let ports: Vec<u32> =
            std::iter::once(vx.index).chain(tap.iter().map(|t| t.index)).collect();
        let mut have_own: HashMap<[u8; 6], Ipv4Addr> = HashMap::new();
        let mut have_master: HashMap<[u8; 6], u32> = HashMap::new();
        let entries = kernel.fdb(&ports).await?;
        tracing::debug!(network = %n.name, entries = entries.len(), wanted = own.len() + master.len(), "forwarding entries");
        for e in entries {
            if e.master {
                // The ports' own addresses are the kernel's (permanent, not static).
                if e.fixed && e.mac != vx.mac && tap.as_ref().is_none_or(|t| t.mac != e.mac) {
                    let wanted = master.get(&e.mac) == Some(&e.ifindex);
                    if wanted {
                        have_master.insert(e.mac, e.ifindex);
                    } else {
                        kernel.fdb_delete(&e).await?;
                    }
                }
            } else if e.ifindex == vx.index
                && let Some(dst) = e.dst
            {
                if own.get(&e.mac) == Some(&dst) && !have_own.contains_key(&e.mac) {
                    have_own.insert(e.mac, dst);
                } else {
                    kernel.fdb_delete(&e).await?;
                }
            }
        }
        for (mac, dst) in &own {
            if have_own.get(mac) != Some(dst) {
                kernel.fdb_set(vx.index, *mac, Some(*dst), false).await?;
            }
        }
        for (mac, port) in &master {
            if have_master.get(mac) != Some(port) {
                kernel.fdb_set(*port, *mac, None, true).await?;
            }
        }
        for e in kernel.neighbours(vx.index).await? {
            if neigh.get(&e.ip) == Some(&e.mac) && e.permanent {
                neigh.remove(&e.ip);
            } else {
                kernel.neighbour_delete(&e).await?;
            }
        }
        for (ip, mac) in neigh {
            kernel.neighbour_set(vx.index, ip, mac).await?;
        }
        let local: HashSet<[u8; 6]> =
            self.store.endpoints(Some(&n.name))?.iter().map(|e| mac_for(e.ip)).collect();
        ov.datapath.set_peers(vni, &specs, remote_macs, local);
        // Tell the relay the paths when they changed.
        let mut report: Vec<PathReport> = ov
            .datapath
            .paths(vni)
            .into_iter()
            .map(|(peer, s)| PathReport {
                peer,
                path: s.path,
                rtt_us: s.rtt.map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
            })
            .collect();
        report.sort_by_key(|p| p.peer);
        let shape: Vec<(Ipv4Addr, PathKind)> = report.iter().map(|p| (p.peer, p.path)).collect();
        if live.reported.get(&n.name) != Some(&shape) && ov.connected() {
            ov.report_paths(label("network", &n.name)?, report);
            live.reported.insert(n.name.clone(), shape);
        }
        Ok(())
    }

    async fn rejoin_all(&self) {
        let Ok(ov) = self.overlay() else { return };
        let Ok(nets) = self.store.networks() else { return };
        for n in nets.into_iter().filter(Network::is_overlay) {
            let Ok(name) = label("network", &n.name) else { continue };
            let eps = self.store.endpoints(Some(&n.name)).unwrap_or_default();
            // Addresses Docker's IPAM holds for endpoints not made yet (or gone already) are
            // this agent's too: the relay must keep them.
            let held: Vec<(String, Ipv4Addr)> = self
                .docker_held(&n.name)
                .into_iter()
                .filter(|(h, _)| !eps.iter().any(|e| e.name == *h))
                .collect();
            let names: Vec<_> = eps
                .iter()
                .map(|e| e.name.as_str())
                .chain(held.iter().map(|(h, _)| h.as_str()))
                .filter_map(|e| label("endpoint", e).ok())
                .collect();
            let vtep = match self.vtep(&ov) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("overlay network {}: {e}", n.name);
                    continue;
                }
            };
            match ov.join(name.clone(), vtep, names).await {
                Ok((def, host)) => {
                    let mut m = n.clone();
                    m.host_addr = Some(host);
                    m.vtep = Some(vtep);
                    m.gateway = def.gateway;
                    m.subnet = subnet_of(def.subnet);
                    m.mtu = u32::from(def.mtu);
                    if m != n {
                        tracing::info!(
                            "overlay network {}: the relay's view changed (this host {host}, \
                             VTEP {vtep}); updating",
                            n.name
                        );
                        // The bridge takes the new addresses and MAC; the old addresses are
                        // pruned by the refresh that follows.
                        if let Err(e) = self.store.put_network(&m) {
                            tracing::warn!("overlay network {}: {e}", n.name);
                        }
                    }
                    // The tap exists only while the relay path can exist: made here.
                    let mut live = self.live.lock().await;
                    if let Err(e) = self.materialize(&mut live, &m).await {
                        tracing::warn!("overlay network {}: {e}", n.name);
                    }
                }
                Err(NetError::NotFound(_)) => {
                    tracing::warn!(
                        "overlay network {} no longer exists at the relay; removing it from this \
                         host",
                        n.name
                    );
                    let mut live = self.live.lock().await;
                    if let Err(e) = self.teardown_overlay(&mut live, &n).await {
                        tracing::warn!("overlay network {}: {e}", n.name);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!("overlay network {}: joining again failed: {e}", n.name);
                    continue;
                }
            }
            let claims = eps
                .into_iter()
                .map(|e| (e.name, e.ip, e.aliases))
                .chain(held.into_iter().map(|(h, ip)| (h, ip, Vec::new())));
            for (ep_name, ip, aliases) in claims {
                let (Ok(ep), aliases) = (
                    label("endpoint", &ep_name),
                    aliases.iter().filter_map(|a| label("alias", a).ok()).collect(),
                ) else {
                    continue;
                };
                if let Err(err) = ov.attach(name.clone(), ep, Some(ip), aliases).await {
                    tracing::error!(
                        "endpoint {ep_name} ({ip}) of overlay {}: the relay refused it: {err}",
                        n.name
                    );
                }
            }
        }
        let mut live = self.live.lock().await;
        if let Err(e) = self.refresh(&mut live).await {
            tracing::warn!("networks: {e}");
        }
    }
}

impl OverlayOwner for NetManager {
    fn rejoin(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move { self.rejoin_all().await })
    }
}

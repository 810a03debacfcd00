//! Every network operation, and the reconcile loop that keeps the kernel equal to the store.
//!
//! An operation checks its input, claims what it needs in the store (names, addresses, ports),
//! makes the kernel objects, and undoes all of it if a step fails, so a failure leaves nothing
//! half-made. Afterwards the nftables table and the DNS zones are re-rendered from the store.
//! On start and every few seconds [`NetManager::reconcile`] repairs what is missing (a bridge,
//! a deleted veth, a DNS server), removes `wr*` links nobody wants, and forgets endpoints whose
//! sandbox is gone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::dns::{self, Answer, DnsServer, Zone, Zones};
use super::ipam::{self, Taken};
use super::kernel::{self, Kernel};
use super::model::{
    Endpoint, NetError, Network, Port, Proto, Sandbox, Service, ServiceMode, check_name, mac_for,
    mac_text, new_id,
};
use super::nft::{self, Rules};
use super::overlay::Overlay;
use super::store::{Store, owner_endpoint, owner_service};

mod docker_net;
mod overlay_net;
pub use docker_net::{DOCKER_OWNER, DOCKER_PEER_PREFIX, parse_addr};
pub use overlay_net::{OverlayView, PeerView, RemoteEndpointView};

/// How the agent runs its networks.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The state database.
    pub db_path: PathBuf,
    /// Where subnets come from when none is given.
    pub pool: Ipv4Net,
    /// Where other names are resolved.
    pub upstreams: Vec<SocketAddr>,
    /// TTL of the DNS answers.
    pub ttl: u32,
    /// MTU of new networks.
    pub mtu: u32,
    /// This host's VXLAN endpoint for overlay networks (default: the address it reaches the
    /// relay from).
    pub vtep: Option<Ipv4Addr>,
    /// The UDP port of VXLAN.
    pub vxlan_port: u16,
}

impl NetConfig {
    /// Defaults, with the database in `dir`.
    pub fn new(dir: &std::path::Path) -> Self {
        Self {
            db_path: dir.join("networks.db"),
            pool: Ipv4Net::new(Ipv4Addr::new(10, 213, 0, 0), 16).unwrap_or_default(),
            upstreams: dns::system_upstreams(),
            ttl: 10,
            mtu: 1500,
            vtep: None,
            vxlan_port: 4789,
        }
    }
}

/// `POST /api/networks`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// The name.
    pub name: String,
    /// `bridge` (default) or `overlay`.
    pub driver: Option<String>,
    /// CIDR; default: a free /24 of the pool.
    pub subnet: Option<String>,
    /// Default: the subnet's first address.
    pub gateway: Option<String>,
    /// CIDR inside the subnet to hand addresses out from.
    pub ip_range: Option<String>,
    /// Default 1500.
    pub mtu: Option<u32>,
}

/// `POST /api/networks/{net}/endpoints`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    /// The endpoint's name.
    pub name: String,
    /// A network namespace file.
    pub netns: Option<String>,
    /// A process whose namespace to use.
    pub pid: Option<u32>,
    /// A fixed address.
    pub ip: Option<String>,
    /// More names.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `POST /api/networks/{net}/ports`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The endpoint.
    pub endpoint: String,
    /// The host port.
    pub host_port: u16,
    /// The endpoint's port.
    pub port: u16,
    /// tcp (default) or udp.
    pub proto: Option<String>,
    /// Only this host address.
    pub host_ip: Option<String>,
}

/// `POST /api/networks/{net}/services`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    /// The name.
    pub name: String,
    /// vip or dnsrr.
    pub mode: String,
    /// The endpoints behind it.
    pub endpoints: Vec<String>,
}

/// An endpoint as the API shows it.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// Its MAC.
    pub mac: String,
    /// Its other names.
    pub aliases: Vec<String>,
    /// The sandbox's namespace file.
    pub netns: String,
    /// `netns` or `pid`.
    pub sandbox: &'static str,
    /// The host end.
    pub host_veth: String,
    /// The interface inside the sandbox.
    pub ifname: String,
    /// Its host end exists and is up.
    pub healthy: bool,
}

/// A network as the API shows it.
#[derive(Debug, Serialize)]
pub struct NetworkView {
    /// The stored network.
    #[serde(flatten)]
    pub network: Network,
    /// Its bridge.
    pub bridge: String,
    /// Its DNS server.
    pub dns: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointView>,
    /// Its published ports.
    pub ports: Vec<Port>,
    /// Its services.
    pub services: Vec<Service>,
    /// Things the user should know (e.g. a big subnet).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// An overlay's members, paths and remote endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayView>,
}

/// A host port held by the agent: it keeps other programs off the port and carries
/// connections to 127.0.0.1, which nftables cannot DNAT, to the endpoint.
#[derive(Debug)]
struct PortHold {
    stop: CancellationToken,
}

impl Drop for PortHold {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type PortKey = (Proto, Option<Ipv4Addr>, u16);

#[derive(Debug, Default)]
struct Live {
    kernel: Option<Kernel>,
    dns: HashMap<String, DnsServer>,
    holds: HashMap<PortKey, PortHold>,
    healthy: HashSet<(String, String)>,
    nft: Option<serde_json::Value>,
    /// The paths last reported to the relay, per overlay network.
    reported: HashMap<String, Vec<(Ipv4Addr, warren_proto::overlay::PathKind)>>,
}

/// The agent's networks.
#[derive(Debug)]
pub struct NetManager {
    cfg: NetConfig,
    store: Store,
    zones: Zones,
    live: Mutex<Live>,
    unavailable: Option<String>,
    overlay: OnceLock<Arc<Overlay>>,
    stop: CancellationToken,
}

fn bad(s: impl Into<String>) -> NetError {
    NetError::BadInput(s.into())
}

fn missing_capability() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_owned();
    let caps = u64::from_str_radix(&hex, 16).ok()?;
    let need = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")];
    let lacking: Vec<&str> =
        need.iter().filter(|(bit, _)| caps & (1u64 << bit) == 0).map(|(_, n)| *n).collect();
    (!lacking.is_empty()).then(|| {
        format!(
            "networks are disabled: the agent lacks {} (needed for bridges, veths and nftables, \
             and to enter sandboxes); run it as root",
            lacking.join(" and ")
        )
    })
}

/// The host's routes (default routes excluded), but for those of warren's own bridges.
async fn host_routes(kernel: &Kernel) -> Result<Vec<(Ipv4Net, String)>, NetError> {
    Ok(kernel.routes().await?.into_iter().filter(|(_, dev)| !dev.starts_with("wrb-")).collect())
}

fn parse_v4(what: &str, s: &str) -> Result<Ipv4Addr, NetError> {
    s.parse().map_err(|_| bad(format!("{what} {s:?} is not an IPv4 address")))
}

fn parse_net(what: &str, s: &str) -> Result<Ipv4Net, NetError> {
    s.parse().map_err(|_| bad(format!("{what} {s:?} is not an IPv4 CIDR such as 10.213.5.0/24")))
}

impl NetManager {
    /// Opens the store and, when the agent may manage networks, reconciles at once and every
    /// 5 s until `stop`.
    pub async fn start(cfg: NetConfig, stop: CancellationToken) -> Result<Arc<Self>, NetError> {
        let store = Store::open(&cfg.db_path)?;
        let unavailable = missing_capability();
        let kernel = if unavailable.is_none() { Some(Kernel::connect()?) } else { None };
        let me = Arc::new(Self {
            cfg,
            store,
            zones: Arc::new(RwLock::new(HashMap::new())),
            live: Mutex::new(Live { kernel, ..Live::default() }),
            unavailable,
            overlay: OnceLock::new(),
            stop: stop.clone(),
        });
        if let Some(why) = &me.unavailable {
            tracing::warn!("{why}");
            return Ok(me);
        }
        if let Err(e) = me.reconcile().await {
            tracing::warn!("networks: first reconcile: {e}");
        }
        let m = me.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                if let Err(e) = m.reconcile().await {
                    tracing::warn!("networks: reconcile: {e}");
                }
            }
        });
        Ok(me)
    }

    fn usable(&self) -> Result<(), NetError> {
        match &self.unavailable {
            Some(why) => Err(NetError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    fn kernel(live: &Live) -> Result<&Kernel, NetError> {
        live.kernel.as_ref().ok_or_else(|| NetError::Unavailable("no netlink connection".into()))
    }

    fn network(&self, name: &str) -> Result<Network, NetError> {
        self.store.network(name)?.ok_or_else(|| {
            NetError::NotFound(format!("no network named {name:?} (see `warren net ls`)"))
        })
    }

    fn endpoint(&self, net: &str, name: &str) -> Result<Endpoint, NetError> {
        self.store.endpoints(Some(net))?.into_iter().find(|e| e.name == name).ok_or_else(|| {
            NetError::NotFound(format!("network {net} has no endpoint named {name:?}"))
        })
    }

    /// Every network, as shown.
    pub async fn list(&self) -> Result<Vec<NetworkView>, NetError> {
        self.usable()?;
        let live = self.live.lock().await;
        let mut out: Vec<NetworkView> = self
            .store
            .networks()?
            .into_iter()
            .map(|n| self.view(&live, n, Vec::new()))
            .collect::<Result<_, _>>()?;
        out.extend(self.unjoined().into_iter().map(|n| self.unjoined_view(n)));
        out.sort_by(|a, b| a.network.name.cmp(&b.network.name));
        Ok(out)
    }

    /// One network, as shown.
    pub async fn inspect(&self, name: &str) -> Result<NetworkView, NetError> {
        self.usable()?;
        if self.store.network(name)?.is_none()
            && let Some(n) = self.unjoined().into_iter().find(|n| n.name == name)
        {
            return Ok(self.unjoined_view(n));
        }
        let n = self.network(name)?;
        let live = self.live.lock().await;
        self.view(&live, n, Vec::new())
    }

    /// An overlay this host has not joined: what the relay said of it.
    fn unjoined_view(&self, n: Network) -> NetworkView {
        let services = self.remote_of(&n).map(|r| Self::remote_services(&r)).unwrap_or_default();
        NetworkView {
            bridge: n.bridge(),
            dns: format!("{}:53", n.gateway),
            endpoints: Vec::new(),
            ports: Vec::new(),
            services,
            warnings: Vec::new(),
            overlay: self.overlay_view(&n, false),
            network: n,
        }
    }

    fn view(
        &self,
        live: &Live,
        n: Network,
        warnings: Vec<String>,
    ) -> Result<NetworkView, NetError> {
        let endpoints = self
            .store
            .endpoints(Some(&n.name))?
            .into_iter()
            .map(|e| EndpointView {
                healthy: live.healthy.contains(&(e.network.clone(), e.name.clone())),
                host_veth: e.host_veth(),
                netns: e.sandbox.path(),
                sandbox: match e.sandbox {
                    Sandbox::Netns(_) => "netns",
                    Sandbox::Pid(_) => "pid",
                    Sandbox::Docker(_) => "docker",
                },
                prefix: n.subnet.prefix_len(),
                name: e.name,
                ip: e.ip,
                mac: e.mac,
                aliases: e.aliases,
                ifname: e.ifname,
            })
            .collect();
        let services = match self.remote_of(&n) {
            Some(r) => Self::remote_services(&r),
            None if n.is_overlay() => Vec::new(),
            None => self.store.services(Some(&n.name))?,
        };
        Ok(NetworkView {
            bridge: n.bridge(),
            dns: format!("{}:53", n.gateway),
            endpoints,
            ports: self.store.ports(Some(&n.name))?,
            services,
            warnings,
            overlay: self.overlay_view(&n, true),
            network: n,
        })
    }

    /// `warren net create`.
    pub async fn create_network(&self, req: CreateNetwork) -> Result<NetworkView, NetError> {
        self.usable()?;
        check_name("network", &req.name)?;
        match req.driver.as_deref() {
            None | Some("bridge") => {}
            Some(super::model::OVERLAY) => return self.create_overlay(req).await,
            Some(d) => return Err(bad(format!("driver {d:?}: use bridge or overlay"))),
        }
        let mut live = self.live.lock().await;
        if self.store.network(&req.name)?.is_some() {
            return Err(NetError::Conflict(format!("a network named {} exists already", req.name)));
        }
        let kernel = Self::kernel(&live)?.clone();
        let subnet = self.pick_subnet(&kernel, req.subnet.as_deref(), &[]).await?;
        let ip_range = req.ip_range.as_deref().map(|r| parse_net("ip range", r)).transpose()?;
        if let Some(r) = ip_range
            && (!subnet.contains(&r.network()) || !subnet.contains(&r.broadcast()))
        {
            return Err(bad(format!("ip range {r} is not inside the subnet {subnet}")));
        }
        let gateway = match &req.gateway {
            Some(g) => {
                let g = parse_v4("gateway", g)?;
                ipam::check_usable(subnet, None, Ipv4Addr::UNSPECIFIED, g)?;
                g
            }
            None => subnet.hosts().next().ok_or_else(|| bad("subnet has no host address"))?,
        };
        let mtu = req.mtu.unwrap_or(self.cfg.mtu);
        if !(576..=9000).contains(&mtu) {
            return Err(bad(format!("MTU {mtu} is out of range: use 576 to 9000")));
        }
        let mut warnings = Vec::new();
        let cap = ipam::capacity(subnet, ip_range, gateway);
        if cap > 256 {
            warnings.push(format!(
                "network {} can hold {cap} addresses; past 256 per network each vip service's \
                 load-balancing rules and the DNS answers grow with every endpoint — prefer \
                 several networks of a /24, or services in dnsrr mode",
                req.name
            ));
        }
        let n = Network {
            name: req.name,
            id: new_id(),
            driver: "bridge".into(),
            subnet,
            gateway,
            ip_range,
            mtu,
            vni: None,
            host_addr: None,
            vtep: None,
        };
        if !self.store.insert_network(&n)? {
            return Err(NetError::Conflict(format!("a network named {} exists already", n.name)));
        }
        let made = async {
            kernel::enable_forwarding()?;
            kernel.ensure_bridge(&n.bridge(), gateway, subnet.prefix_len(), mtu).await?;
            self.start_dns(&mut live, &n).await?;
            self.refresh(&mut live).await
        }
        .await;
        if let Err(e) = made {
            live.dns.remove(&n.name);
            let _ = kernel.delete_link(&n.bridge()).await;
            self.store.delete_network(&n.name)?;
            let _ = self.refresh(&mut live).await;
            return Err(e);
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            "network {} created: {} via {} on {}",
            n.name,
            n.subnet,
            n.gateway,
            n.bridge()
        );
        self.view(&live, n, warnings)
    }

    /// `wanted` when it is free, else a free `/24` of the pool: free of other networks, of
    /// `reserved` (subnets promised but not made yet) and of the host's routes.
    async fn pick_subnet(
        &self,
        kernel: &Kernel,
        wanted: Option<&str>,
        reserved: &[(String, Ipv4Net)],
    ) -> Result<Ipv4Net, NetError> {
        let mut ours: Vec<(String, Ipv4Net)> =
            self.store.networks()?.into_iter().map(|n| (n.name, n.subnet)).collect();
        ours.extend_from_slice(reserved);
        let routes = host_routes(kernel).await?;
        let taken = Taken { networks: &ours, routes: &routes };
        match wanted {
            Some(s) => {
                let s = parse_net("subnet", s)?;
                ipam::check_subnet(s, &taken)?;
                Ok(s)
            }
            None => ipam::choose_subnet(self.cfg.pool, &taken),
        }
    }

    async fn start_dns(&self, live: &mut Live, n: &Network) -> Result<(), NetError> {
        if live.dns.get(&n.name).is_some_and(|d| !d.finished()) {
            return Ok(());
        }
        let server = dns::serve(
            &n.name,
            n.gateway,
            n.subnet,
            self.zones.clone(),
            Arc::new(self.cfg.upstreams.clone()),
            self.cfg.ttl,
        )
        .await
        .map_err(|e| {
            NetError::System(format!(
                "cannot serve DNS on {}:53 for network {}: {e}",
                n.gateway, n.name
            ))
        })?;
        live.dns.insert(n.name.clone(), server);
        Ok(())
    }

    /// `warren net rm`.
    pub async fn remove_network(&self, name: &str, force: bool) -> Result<(), NetError> {
        self.usable()?;
        let n = self.network(name)?;
        let eps = self.store.endpoints(Some(name))?;
        if !eps.is_empty() && !force {
            let names: Vec<&str> = eps.iter().map(|e| e.name.as_str()).collect();
            return Err(NetError::Conflict(format!(
                "network {name} still has endpoints ({}); detach them or use --force",
                names.join(", ")
            )));
        }
        if n.is_overlay() {
            return self.remove_overlay(&n, &eps, force).await;
        }
        let mut live = self.live.lock().await;
        let kernel = Self::kernel(&live)?.clone();
        for e in &eps {
            kernel.delete_link(&e.host_veth()).await?;
        }
        live.dns.remove(name);
        self.store.delete_network(name)?;
        kernel.delete_link(&n.bridge()).await?;
        self.refresh(&mut live).await?;
        tracing::info!("network {name} removed");
        Ok(())
    }

    fn names_in_use(&self, net: &str) -> Result<(HashSet<String>, HashSet<String>), NetError> {
        let mut names = HashSet::new();
        let mut aliases = HashSet::new();
        for e in self.store.endpoints(Some(net))? {
            names.insert(e.name);
            aliases.extend(e.aliases);
        }
        for s in self.store.services(Some(net))? {
            names.insert(s.name);
        }
        Ok((names, aliases))
    }

    /// `warren net attach` (and `warren net run`).
    pub async fn attach(&self, net: &str, req: Attach) -> Result<EndpointView, NetError> {
        self.usable()?;
        check_name("endpoint", &req.name)?;
        for a in &req.aliases {
            check_name("alias", a)?;
        }
        let sandbox = match (&req.netns, req.pid) {
            (Some(p), None) => Sandbox::Netns(p.clone()),
            (None, Some(pid)) => Sandbox::Pid(pid),
            _ => return Err(bad("give the sandbox as exactly one of netns (a path) or pid")),
        };
        let mut live = self.live.lock().await;
        let n = self.network_or_join(&mut live, net).await?;
        let (names, aliases) = self.names_in_use(net)?;
        if names.contains(&req.name) || aliases.contains(&req.name) {
            return Err(NetError::Conflict(format!(
                "the name {} is taken in network {net}",
                req.name
            )));
        }
        if let Some(a) = req.aliases.iter().find(|a| names.contains(*a) || **a == req.name) {
            return Err(NetError::Conflict(format!(
                "alias {a} is the name of an endpoint or service in network {net}"
            )));
        }
        let (ns, ino) = kernel::open_netns(&sandbox.path(), 0)?;
        if self.store.endpoints(Some(net))?.iter().any(|e| e.netns_ino == ino) {
            return Err(NetError::Conflict(format!(
                "{sandbox} is already attached to network {net}"
            )));
        }
        let ip = if n.is_overlay() {
            let fixed = req.ip.as_deref().map(|s| parse_v4("address", s)).transpose()?;
            self.claim_overlay(&n, &req.name, fixed, &req.aliases, &owner_endpoint(&req.name))
                .await?
        } else {
            self.claim(&n, req.ip.as_deref(), &owner_endpoint(&req.name))?
        };
        let mut e = Endpoint {
            network: net.to_owned(),
            name: req.name,
            id: new_id(),
            ip,
            mac: mac_text(mac_for(ip)),
            aliases: req.aliases,
            sandbox,
            netns_ino: ino,
            ifname: String::new(),
        };
        let kernel = Self::kernel(&live)?.clone();
        match self.plumb(&kernel, &n, &mut e, &ns).await {
            Ok(()) => {}
            Err(err) => {
                self.store.release_address(net, ip)?;
                if n.is_overlay() {
                    self.release_overlay(&n, &e.name).await;
                }
                return Err(err);
            }
        }
        self.store.put_endpoint(&e)?;
        live.healthy.insert((e.network.clone(), e.name.clone()));
        self.refresh(&mut live).await?;
        tracing::info!("endpoint {} attached to {net}: {} ({})", e.name, e.ip, e.sandbox);
        let view = self.view(&live, n, Vec::new())?;
        view.endpoints
            .into_iter()
            .find(|v| v.name == e.name)
            .ok_or_else(|| NetError::System("the endpoint vanished".into()))
    }

    fn claim(&self, n: &Network, fixed: Option<&str>, owner: &str) -> Result<Ipv4Addr, NetError> {
        if let Some(s) = fixed {
            let ip = parse_v4("address", s)?;
            ipam::check_usable(n.subnet, None, n.gateway, ip)?;
            if !self.store.claim_address(&n.name, ip, owner)? {
                let who = self
                    .store
                    .addresses(&n.name)?
                    .into_iter()
                    .find(|(a, _)| *a == ip)
                    .map_or_else(|| "someone".to_owned(), |(_, o)| o.replace(':', " "));
                return Err(NetError::Conflict(format!("address {ip} is taken by {who}")));
            }
            return Ok(ip);
        }
        for _ in 0..8 {
            let held: HashSet<Ipv4Addr> =
                self.store.addresses(&n.name)?.into_iter().map(|(a, _)| a).collect();
            let ip = ipam::next_address(
                n.subnet,
                n.ip_range,
                n.gateway,
                &held,
                self.store.cursor(&n.name)?,
            )
            .map_err(|e| NetError::Conflict(format!("network {}: {e}", n.name)))?;
            if self.store.claim_address(&n.name, ip, owner)? {
                return Ok(ip);
            }
        }
        Err(NetError::Conflict(format!("network {}: could not claim an address", n.name)))
    }

    /// Makes the veth pair of `e` and configures its sandbox end.
    async fn plumb(
        &self,
        kernel: &Kernel,
        n: &Network,
        e: &mut Endpoint,
        ns: &std::fs::File,
    ) -> Result<(), NetError> {
        let bridge = self.ensure_net_bridge(kernel, n).await?;
        let peer = format!("wrp-{}", e.id);
        kernel.add_veth(&e.host_veth(), &peer, bridge, n.mtu, ns).await?;
        let inside = async {
            let k = Kernel::connect_in(ns)?;
            k.setup_sandbox_end(&peer, mac_for(e.ip), e.ip, n.subnet.prefix_len(), n.gateway, n.mtu)
                .await
        }
        .await;
        match inside {
            Ok(ifname) => {
                e.ifname = ifname;
                Ok(())
            }
            Err(err) => {
                let _ = kernel.delete_link(&e.host_veth()).await;
                Err(err)
            }
        }
    }

    /// `warren net detach`.
    pub async fn detach(&self, net: &str, name: &str) -> Result<(), NetError> {
        self.usable()?;
        let n = self.network(net)?;
        let e = self.endpoint(net, name)?;
        let mut live = self.live.lock().await;
        let in_services: Vec<Service> = self
            .store
            .services(Some(net))?
            .into_iter()
            .filter(|s| s.endpoints.contains(&e.name))
            .collect();
        for mut s in in_services {
            s.endpoints.retain(|x| *x != e.name);
            self.store.update_service(&s)?;
        }
        Self::kernel(&live)?.delete_link(&e.host_veth()).await?;
        self.store.delete_endpoint(&e)?;
        live.healthy.remove(&(e.network.clone(), e.name.clone()));
        if n.is_overlay() {
            self.release_overlay(&n, &e.name).await;
        }
        self.refresh(&mut live).await?;
        tracing::info!("endpoint {name} detached from {net}");
        Ok(())
    }

    /// `warren net publish`.
    pub async fn publish(&self, net: &str, req: Publish) -> Result<Port, NetError> {
        self.usable()?;
        self.network(net)?;
        self.endpoint(net, &req.endpoint)?;
        let proto = Proto::parse(req.proto.as_deref().unwrap_or("tcp"))?;
        if req.host_port == 0 || req.port == 0 {
            return Err(bad("ports must be 1 to 65535"));
        }
        let host_ip = req.host_ip.as_deref().map(|s| parse_v4("host address", s)).transpose()?;
        let p = Port {
            network: net.to_owned(),
            endpoint: req.endpoint,
            proto,
            host_ip,
            host_port: req.host_port,
            port: req.port,
        };
        let mut live = self.live.lock().await;
        let clash = self.store.ports(None)?.into_iter().find(|q| {
            q.proto == p.proto
                && q.host_port == p.host_port
                && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
        });
        if let Some(q) = clash {
            return Err(NetError::Conflict(format!(
                "host port {}/{} is already published (network {}, endpoint {})",
                p.host_port,
                p.proto.as_str(),
                q.network,
                q.endpoint
            )));
        }
        let hold = self.hold_port(&p).await?;
        if !self.store.insert_port(&p)? {
            return Err(NetError::Conflict(format!(
                "host port {}/{} is already published",
                p.host_port,
                p.proto.as_str()
            )));
        }
        live.holds.insert((p.proto, p.host_ip, p.host_port), hold);
        if let Err(e) = self.refresh(&mut live).await {
            live.holds.remove(&(p.proto, p.host_ip, p.host_port));
            self.store.delete_port(&p)?;
            return Err(e);
        }
        tracing::info!(
            "published {}:{}/{} -> {}:{} ({net})",
            p.host_ip.map_or_else(|| "*".to_owned(), |i| i.to_string()),
            p.host_port,
            p.proto.as_str(),
            p.endpoint,
            p.port
        );
        Ok(p)
    }

    /// Binds the host port: it must be free, and loopback visitors are carried by the agent.
    async fn hold_port(&self, p: &Port) -> Result<PortHold, NetError> {
        let bind =
            SocketAddr::new(IpAddr::V4(p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)), p.host_port);
        let in_use = |e: std::io::Error| {
            NetError::Conflict(format!(
                "host port {}/{} cannot be published: {e} (another program uses it?)",
                p.host_port,
                p.proto.as_str()
            ))
        };
        let stop = CancellationToken::new();
        let target = self.endpoint(&p.network, &p.endpoint)?.ip;
        let to = SocketAddr::new(IpAddr::V4(target), p.port);
        match p.proto {
            Proto::Tcp => {
                let l = tokio::net::TcpListener::bind(bind).await.map_err(in_use)?;
                let s = stop.clone();
                tokio::spawn(async move {
                    loop {
                        let conn = tokio::select! {
                            () = s.cancelled() => break,
                            c = l.accept() => c,
                        };
                        let Ok((mut c, _)) = conn else { continue };
                        tokio::spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                            }
                        });
                    }
                });
            }
            Proto::Udp => {
                let sock = tokio::net::UdpSocket::bind(bind).await.map_err(in_use)?;
                let s = stop.clone();
                tokio::spawn(async move {
                    s.cancelled().await;
                    drop(sock);
                });
            }
        }
        Ok(PortHold { stop })
    }

    /// `warren net unpublish`.
    pub async fn unpublish(
        &self,
        net: &str,
        proto: &str,
        host_port: u16,
        host_ip: Option<&str>,
    ) -> Result<(), NetError> {
        self.usable()?;
        self.network(net)?;
        let proto = Proto::parse(proto)?;
        let host_ip = host_ip.map(|s| parse_v4("host address", s)).transpose()?;
        let p = self
            .store
            .ports(Some(net))?
            .into_iter()
            .find(|p| p.proto == proto && p.host_port == host_port && p.host_ip == host_ip)
            .ok_or_else(|| {
                NetError::NotFound(format!(
                    "network {net} publishes no host port {host_port}/{}",
                    proto.as_str()
                ))
            })?;
        let mut live = self.live.lock().await;
        self.store.delete_port(&p)?;
        live.holds.remove(&(p.proto, p.host_ip, p.host_port));
        self.refresh(&mut live).await
    }

    /// `warren net service create`.
    pub async fn create_service(&self, net: &str, req: CreateService) -> Result<Service, NetError> {
        self.usable()?;
        check_name("service", &req.name)?;
        let n = self.network(net)?;
        let mode = match req.mode.as_str() {
            "vip" => ServiceMode::Vip,
            "dnsrr" => ServiceMode::Dnsrr,
            m => return Err(bad(format!("service mode {m:?}: use vip or dnsrr"))),
        };
        if req.endpoints.is_empty() {
            return Err(bad("a service needs at least one endpoint"));
        }
        if n.is_overlay() {
            return self.create_overlay_service(&n, req, mode).await;
        }
        let mut live = self.live.lock().await;
        let (names, aliases) = self.names_in_use(net)?;
        if names.contains(&req.name) || aliases.contains(&req.name) {
            return Err(NetError::Conflict(format!(
                "the name {} is taken in network {net}",
                req.name
            )));
        }
        let eps: HashSet<String> =
            self.store.endpoints(Some(net))?.into_iter().map(|e| e.name).collect();
        if let Some(x) = req.endpoints.iter().find(|x| !eps.contains(*x)) {
            return Err(NetError::NotFound(format!("network {net} has no endpoint named {x:?}")));
        }
        let mut s = Service {
            network: net.to_owned(),
            name: req.name,
            mode,
            vip: None,
            endpoints: req.endpoints,
        };
        if mode == ServiceMode::Vip {
            s.vip = Some(self.claim(&n, None, &owner_service(&s.name))?);
        }
        if !self.store.insert_service(&s)? {
            if let Some(v) = s.vip {
                self.store.release_address(net, v)?;
            }
            return Err(NetError::Conflict(format!("service {} exists already", s.name)));
        }
        if let Err(e) = self.refresh(&mut live).await {
            self.store.delete_service(&s)?;
            let _ = self.refresh(&mut live).await;
            return Err(e);
        }
        Ok(s)
    }

    /// `warren net service rm`.
    pub async fn remove_service(&self, net: &str, name: &str) -> Result<(), NetError> {
        self.usable()?;
        let n = self.network(net)?;
        if n.is_overlay() {
            self.remove_overlay_service(&n, name).await?;
            let mut live = self.live.lock().await;
            return self.refresh(&mut live).await;
        }
        let s =
            self.store.services(Some(net))?.into_iter().find(|s| s.name == name).ok_or_else(
                || NetError::NotFound(format!("network {net} has no service {name:?}")),
            )?;
        let mut live = self.live.lock().await;
        self.store.delete_service(&s)?;
        self.refresh(&mut live).await
    }

    /// The addresses of `NAME.NETWORK` (an endpoint, alias or service), for tunnels whose
    /// target is given by its network name.
    pub fn resolve(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let (label, net) = name.split_once('.')?;
        let zones = self.zones.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match zones.get(net)?.names.get(label)? {
            Answer::Fixed(v) | Answer::Shuffled(v) => Some(v.clone()),
        }
    }

    /// Re-renders the nftables table, the bridges' virtual addresses and the DNS zones.
    async fn refresh(&self, live: &mut Live) -> Result<(), NetError> {
        self.refresh_with(live, false).await
    }

    async fn refresh_with(&self, live: &mut Live, force: bool) -> Result<(), NetError> {
        let networks = self.store.networks()?;
        let endpoints = self.store.endpoints(None)?;
        let ports = self.store.ports(None)?;
        // Bridge networks' services are local; overlays' come from the relay.
        let remotes: HashMap<String, super::overlay::Remote> = networks
            .iter()
            .filter_map(|n| self.remote_of(n).map(|r| (n.name.clone(), r)))
            .collect();
        let mut services: Vec<Service> = self
            .store
            .services(None)?
            .into_iter()
            .filter(|s| networks.iter().any(|n| n.name == s.network && !n.is_overlay()))
            .collect();
        for r in remotes.values() {
            services.extend(Self::remote_services(r));
        }
        let mut ip_of: HashMap<(String, String), Ipv4Addr> =
            endpoints.iter().map(|e| ((e.network.clone(), e.name.clone()), e.ip)).collect();
        // Remote endpoints count as healthy while their member's session is up.
        let mut healthy = live.healthy.clone();
        for (net, r) in &remotes {
            for e in r.endpoints.values() {
                ip_of.insert((net.clone(), e.name.to_string()), e.ip);
                if r.peers.get(&e.peer).is_some_and(|p| p.online) {
                    healthy.insert((net.clone(), e.name.to_string()));
                }
            }
        }
        let mut rules = Rules {
            networks: networks.iter().map(|n| (n.bridge(), n.subnet)).collect(),
            ..Rules::default()
        };
        for p in &ports {
            if let Some(ip) = ip_of.get(&(p.network.clone(), p.endpoint.clone())) {
                rules.ports.push((p.proto, p.host_ip, p.host_port, *ip, p.port));
            }
        }
        let kernel = Self::kernel(live)?.clone();
        for n in &networks {
            let mut keep = vec![n.gateway];
            keep.extend(n.host_addr);
            for s in services.iter().filter(|s| s.network == n.name) {
                let Some(vip) = s.vip else { continue };
                keep.push(vip);
                kernel.ensure_address(&n.bridge(), vip, 32).await?;
                let up: Vec<Ipv4Addr> = s
                    .endpoints
                    .iter()
                    .filter(|e| healthy.contains(&(n.name.clone(), (*e).clone())))
                    .filter_map(|e| ip_of.get(&(n.name.clone(), e.clone())).copied())
                    .collect();
                rules.vips.push((n.bridge(), vip, up));
            }
            kernel.prune_addresses(&n.bridge(), &keep).await?;
            if n.is_overlay()
                && let Err(e) = self.program_overlay(live, &kernel, n).await
            {
                tracing::warn!("overlay network {}: {e}", n.name);
            }
        }
        let (listing, changed) = nft::apply(&rules, force).await?;
        if changed {
            tracing::debug!("nftables table {} rewritten", nft::TABLE);
        }
        live.nft = listing;
        let mut zones = HashMap::new();
        for n in &networks {
            let mut z = Zone::default();
            let mut alias_ips: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
            let mut named: Vec<(String, Ipv4Addr, Vec<String>)> = endpoints
                .iter()
                .filter(|e| e.network == n.name)
                .map(|e| (e.name.clone(), e.ip, e.aliases.clone()))
                .collect();
            if let Some(r) = remotes.get(&n.name) {
                named.extend(r.endpoints.values().map(|e| {
                    (e.name.to_string(), e.ip, e.aliases.iter().map(ToString::to_string).collect())
                }));
            }
            for (name, ip, aliases) in named {
                z.names.insert(name.clone(), Answer::Fixed(vec![ip]));
                z.ptr.insert(ip, format!("{name}.{}", n.name));
                for a in aliases {
                    alias_ips.entry(a).or_default().push(ip);
                }
            }
            for (a, ips) in alias_ips {
                z.names.entry(a).or_insert(Answer::Shuffled(ips));
            }
            for s in services.iter().filter(|s| s.network == n.name) {
                let answer = match (s.mode, s.vip) {
                    (ServiceMode::Vip, Some(v)) => Answer::Fixed(vec![v]),
                    _ => Answer::Shuffled(
                        s.endpoints
                            .iter()
                            .filter_map(|e| ip_of.get(&(n.name.clone(), e.clone())).copied())
                            .collect(),
                    ),
                };
                z.names.insert(s.name.clone(), answer);
            }
            zones.insert(n.name.clone(), z);
        }
        *self.zones.write().unwrap_or_else(std::sync::PoisonError::into_inner) = zones;
        Ok(())
    }

    /// Makes the kernel match the store: bridges, endpoints, DNS servers, port holds, the
    /// nftables table; removes `wr*` links nobody wants and endpoints whose sandbox is gone.
    pub async fn reconcile(&self) -> Result<(), NetError> {
        self.usable()?;
        let mut live = self.live.lock().await;
        let kernel = Self::kernel(&live)?.clone();
        let networks = self.store.networks()?;
        if !networks.is_empty() {
            kernel::enable_forwarding()?;
        }
        for n in &networks {
            if n.is_overlay() {
                if let Err(e) = self.materialize(&mut live, n).await {
                    tracing::warn!("overlay network {}: {e}", n.name);
                }
                continue;
            }
            self.ensure_net_bridge(&kernel, n).await?;
            if let Err(e) = self.start_dns(&mut live, n).await {
                tracing::warn!("{e}");
            }
        }
        let wanted_nets: HashSet<&str> = networks.iter().map(|n| n.name.as_str()).collect();
        live.dns.retain(|k, _| wanted_nets.contains(k.as_str()));
        let mut healthy = HashSet::new();
        for mut e in self.store.endpoints(None)? {
            let Some(n) = networks.iter().find(|n| n.name == e.network) else { continue };
            if let Sandbox::Docker(_) = e.sandbox {
                // Docker owns the far end and tells the plugin when the endpoint goes.
                if kernel.link(&e.host_veth()).await?.is_some_and(|l| l.up) {
                    healthy.insert((e.network.clone(), e.name.clone()));
                }
                continue;
            }
            let ns = match kernel::open_netns(&e.sandbox.path(), e.netns_ino) {
                Ok((f, _)) => f,
                Err(why) => {
                    tracing::info!(
                        "endpoint {} of {}: its sandbox is gone ({why}); removing it",
                        e.name,
                        e.network
                    );
                    kernel.delete_link(&e.host_veth()).await?;
                    self.store.delete_endpoint(&e)?;
                    if n.is_overlay() {
                        self.release_overlay(n, &e.name).await;
                    }
                    continue;
                }
            };
            match kernel.link(&e.host_veth()).await? {
                Some(l) if l.up => {
                    healthy.insert((e.network.clone(), e.name.clone()));
                }
                Some(_) => {}
                None => {
                    tracing::info!(
                        "endpoint {} of {}: veth missing, re-creating it",
                        e.name,
                        e.network
                    );
                    match self.plumb(&kernel, n, &mut e, &ns).await {
                        Ok(()) => {
                            self.store.put_endpoint(&e)?;
                            healthy.insert((e.network.clone(), e.name.clone()));
                        }
                        Err(err) => tracing::warn!("endpoint {} of {}: {err}", e.name, e.network),
                    }
                }
            }
        }
        live.healthy = healthy;
        let endpoints = self.store.endpoints(None)?;
        let want: HashSet<String> = networks
            .iter()
            .map(Network::bridge)
            .chain(networks.iter().filter(|n| n.is_overlay()).flat_map(|n| [n.vxlan(), n.tap()]))
            .chain(endpoints.iter().map(Endpoint::host_veth))
            .collect();
        for l in kernel.links().await? {
            let ours =
                ["wrb-", "wrv-", "wrp-", "wrx-", "wrt-"].iter().any(|p| l.name.starts_with(p));
            if ours && !want.contains(&l.name) {
                tracing::info!("removing stale {}", l.name);
                kernel.delete_link(&l.name).await?;
            }
        }
        let ports = self.store.ports(None)?;
        let keys: HashSet<PortKey> =
            ports.iter().map(|p| (p.proto, p.host_ip, p.host_port)).collect();
        live.holds.retain(|k, _| keys.contains(k));
        for p in &ports {
            let key = (p.proto, p.host_ip, p.host_port);
            if let std::collections::hash_map::Entry::Vacant(slot) = live.holds.entry(key) {
                match self.hold_port(p).await {
                    Ok(h) => {
                        slot.insert(h);
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        // Someone changed our table behind our back: write it again.
        let now = nft::list().await?.as_ref().map(nft::normalize);
        let tampered = live.nft.is_some() && now != live.nft;
        if tampered {
            tracing::warn!(
                "the nftables table {} was changed outside warren; restoring it",
                nft::TABLE
            );
        }
        self.refresh_with(&mut live, tampered).await
    }
}

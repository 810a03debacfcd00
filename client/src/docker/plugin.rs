//! Docker's remote network driver and IPAM driver, on `/run/docker/plugins/warren.sock`,
//! backed by warren's networks: `docker network create -d warren --ipam-driver warren NAME`.
//! The socket is 0660 with group `docker` (root's without one): whoever can reach it can make
//! networks and publish host ports, as whoever can reach Docker's own socket can.
//!
//! How Docker 20.10 speaks the protocol, and what breaks naive plugins, is in the project's
//! reference notes; the rules followed here:
//! - every call is an HTTP/1.1 POST with a JSON body or none, and no Content-Type; unknown
//!   paths get 404;
//! - IPAM errors are `{"Error": ...}`, network driver errors `{"Err": ...}`;
//! - a pool chosen by the IPAM (`"Pool": ""`) is a free `/24` of the agent's pool, never one
//!   already promised, so Docker's retry loop ends; identical explicit requests share a pool;
//! - every allocation is in SQLite (the agent's `networks.db`), since Docker replays nothing to
//!   a restarted plugin;
//! - Docker supplies the addresses (and MACs when asked): the driver never echoes them, and
//!   gives a MAC derived from the address when Docker has none;
//! - the Join reply carries the gateway (no `docker_gwbridge`) and no static routes;
//! - published ports arrive only as `com.docker.network.portmap`: the driver publishes them
//!   through warren's own NAT; revoking and every teardown call are idempotent.
//!
//! The warren network behind a Docker network is named after it (lower case, `_` and `.` as
//! `-`); Docker does not send the name, so the plugin asks Docker's API for it as soon as the
//! network exists. Endpoints are named `ep-` and the endpoint id's first ten digits; the
//! container's name, short id, host name and `--network-alias` names become its DNS aliases.
//!
//! With `-o warren.driver=overlay` the warren network is an overlay across hosts: defined at
//! the relay (or joined, when another host defined it with the same subnet), its addresses
//! handed out by the relay as Docker asks for them, under endpoint names `ep-` and eight hex
//! digits that the endpoint Docker then creates takes over.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Docker;
use crate::net::NetError;
use crate::net::NetManager;
use crate::net::manager::{CreateNetwork, Publish, parse_addr};

/// Where Docker looks for a plugin named `warren`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/warren.sock";

/// How often the firewall rules are checked; every third time, forgotten endpoints are swept.
const MAINTAIN: Duration = Duration::from_secs(10);

/// How old a network or endpoint Docker does not list must be before it is swept: Docker
/// lists them only once their creation is complete.
const SWEEP_AGE: u64 = 60;

/// The address space this IPAM answers for.
const ADDRESS_SPACE: &str = "warren";

const POOL: &str = "docker-pool";
const NETWORK: &str = "docker-network";
const ENDPOINT: &str = "docker-endpoint";

/// A pool handed to Docker, and what it reserved in it before the network existed.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PoolDoc {
    id: String,
    subnet: Ipv4Net,
    sub_pool: Option<Ipv4Net>,
    /// How many identical `RequestPool`s hold it.
    refs: u32,
    gateway: Option<Ipv4Addr>,
    aux: Vec<Ipv4Addr>,
    /// The warren network made for it.
    network: Option<String>,
}

/// A Docker network and the warren network behind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NetDoc {
    id: String,
    pool: String,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
    /// The warren network, once made.
    name: Option<String>,
    /// When Docker created it (Unix seconds).
    #[serde(default)]
    created: u64,
    /// An overlay across hosts (`-o warren.driver=overlay`), not a bridge.
    #[serde(default)]
    overlay: bool,
}

/// A Docker endpoint and the warren endpoint behind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EpDoc {
    id: String,
    network: String,
    name: String,
    ip: Ipv4Addr,
    /// When Docker created it (Unix seconds).
    #[serde(default)]
    created: u64,
}

/// The plugin: warren's networks, and Docker's API to learn names.
#[derive(Debug)]
pub struct Plugin {
    net: Arc<NetManager>,
    docker_socket: Option<PathBuf>,
    docker: tokio::sync::OnceCell<Docker>,
    /// Docker's calls change state one at a time.
    lock: tokio::sync::Mutex<()>,
}

/// A refusal, as the driver (`Err`) or the IPAM (`Error`) spells it.
struct Refusal(&'static str, String);

impl From<NetError> for Refusal {
    fn from(e: NetError) -> Self {
        Self("Err", e.to_string())
    }
}

type Reply = Result<Value, Refusal>;

fn ipam(e: impl std::fmt::Display) -> Refusal {
    Refusal("Error", e.to_string())
}

fn driver(e: impl std::fmt::Display) -> Refusal {
    Refusal("Err", e.to_string())
}

fn body<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("unreadable request: {e}"))
}

/// The warren network name for Docker network `docker_name`, when it makes a valid one.
fn warren_name(docker_name: &str) -> Option<String> {
    let n: String = docker_name
        .chars()
        .map(|c| if c == '_' || c == '.' { '-' } else { c.to_ascii_lowercase() })
        .collect();
    crate::net::model::check_name("network", &n).is_ok().then_some(n)
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct PoolReq {
    address_space: String,
    pool: String,
    sub_pool: String,
    #[serde(rename = "V6")]
    v6: bool,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct AddressReq {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Options")]
    options: Option<HashMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct PoolIdReq {
    #[serde(rename = "PoolID")]
    pool_id: String,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct IpamData {
    #[serde(rename = "Pool")]
    pool: String,
    #[serde(rename = "Gateway")]
    gateway: String,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct NetworkReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "Options")]
    options: Value,
    #[serde(rename = "IPv4Data")]
    ipv4: Option<Vec<IpamData>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Iface {
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "MacAddress")]
    mac: String,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct EndpointReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "Interface")]
    interface: Option<Iface>,
    #[serde(rename = "SandboxKey")]
    sandbox_key: String,
    #[serde(rename = "Options")]
    options: Value,
}

impl Plugin {
    /// A plugin over `net`; the Docker API at `docker_socket` (once reachable: plugins start
    /// before dockerd) tells network and container names.
    pub fn new(net: Arc<NetManager>, docker_socket: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            net,
            docker_socket,
            docker: tokio::sync::OnceCell::new(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    async fn docker(&self) -> Option<&Docker> {
        let socket = self.docker_socket.as_ref()?;
        match self.docker.get_or_try_init(|| Docker::connect(socket)).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!("docker plugin: {e}");
                None
            }
        }
    }

    /// Serves the plugin socket at `path` until `shutdown`, then removes it.
    pub async fn serve(
        self: Arc<Self>,
        path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        self.net.available().map_err(|e| format!("the Docker plugin needs networks: {e}"))?;
        let listener = bind(path).await?;
        let name = path.file_stem().map_or_else(|| "warren".into(), |n| n.to_string_lossy());
        tracing::info!(
            "docker: network and IPAM plugin {name:?} on {} (docker network create -d {name} --ipam-driver {name} NAME)",
            path.display()
        );
        allow_forwarding_through_docker().await;
        let app = Router::new().fallback(dispatch).with_state(self.clone());
        let path = path.to_owned();
        let me = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAINTAIN);
            let mut round = 0u32;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Docker (re)started after the agent: its FORWARD chain is new.
                allow_forwarding_through_docker().await;
                if round.is_multiple_of(3) {
                    me.sweep().await;
                }
                round = round.wrapping_add(1);
            }
        });
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app.into_make_service())
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
            {
                tracing::warn!("docker plugin ended: {e}");
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(())
    }

    async fn call(self: &Arc<Self>, path: &str, bytes: &[u8]) -> Option<Reply> {
        // Decodes the body for `$method`; an unreadable one is refused as `$refuse` spells it.
        macro_rules! call {
            ($refuse:ident, $method:ident $(, $arg:expr)?) => {
                match body(bytes) {
                    Ok(r) => self.$method(r $(, $arg)?).await,
                    Err(e) => Err($refuse(e)),
                }
            };
        }
        Some(match path {
            "/Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            "/NetworkDriver.GetCapabilities" => {
                Ok(json!({ "Scope": "local", "ConnectivityScope": "local" }))
            }
            "/IpamDriver.GetCapabilities" => {
                Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }))
            }
            "/IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": ADDRESS_SPACE,
            })),
            "/IpamDriver.RequestPool" => call!(ipam, request_pool),
            "/IpamDriver.ReleasePool" => call!(ipam, release_pool),
            "/IpamDriver.RequestAddress" => call!(ipam, request_address),
            "/IpamDriver.ReleaseAddress" => call!(ipam, release_address),
            "/NetworkDriver.CreateNetwork" => call!(driver, create_network),
            "/NetworkDriver.DeleteNetwork" => call!(driver, delete_network),
            "/NetworkDriver.CreateEndpoint" => call!(driver, create_endpoint),
            "/NetworkDriver.Join" => call!(driver, join),
            "/NetworkDriver.ProgramExternalConnectivity" => call!(driver, program),
            "/NetworkDriver.RevokeExternalConnectivity" => call!(driver, revoke),
            "/NetworkDriver.Leave" => call!(driver, leave, false),
            "/NetworkDriver.DeleteEndpoint" => call!(driver, leave, true),
            "/NetworkDriver.EndpointOperInfo" => call!(driver, oper_info),
            "/NetworkDriver.DiscoverNew" | "/NetworkDriver.DiscoverDelete" => Ok(json!({})),
            _ => return None,
        })
    }

    async fn request_pool(&self, r: PoolReq) -> Reply {
        if r.v6 {
            return Err(ipam("warren networks are IPv4 only: create the network without --ipv6"));
        }
        if !r.address_space.is_empty() && r.address_space != ADDRESS_SPACE {
            return Err(ipam(format!(
                "unknown address space {:?}: warren's is {ADDRESS_SPACE:?}",
                r.address_space
            )));
        }
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let pools: Vec<PoolDoc> = store.docs(POOL).map_err(ipam)?;
        let sub_pool = match r.sub_pool.as_str() {
            "" => None,
            s => Some(s.parse::<Ipv4Net>().map_err(|_| {
                ipam(format!("--ip-range {s:?} is not an IPv4 CIDR such as 10.213.5.128/25"))
            })?),
        };
        if !r.pool.is_empty() {
            let subnet: Ipv4Net = r
                .pool
                .parse()
                .map_err(|_| ipam(format!("--subnet {:?} is not an IPv4 CIDR", r.pool)))?;
            if let Some(mut p) = pools.iter().find(|p| p.subnet == subnet).cloned() {
                if p.sub_pool != sub_pool || p.network.is_some() {
                    return Err(ipam(format!(
                        "subnet {subnet} is in use by another Docker network of warren's"
                    )));
                }
                p.refs += 1;
                store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
                return Ok(json!({ "PoolID": p.id, "Pool": p.subnet.to_string(), "Data": {} }));
            }
        }
        let reserved: Vec<Ipv4Net> = pools.iter().map(|p| p.subnet).collect();
        let wanted = (!r.pool.is_empty()).then_some(r.pool.as_str());
        let subnet = self.net.free_subnet(wanted, &reserved).await.map_err(ipam)?;
        if let Some(s) = sub_pool
            && (!subnet.contains(&s.network()) || !subnet.contains(&s.broadcast()))
        {
            return Err(ipam(format!("--ip-range {s} is not inside the subnet {subnet}")));
        }
        let p = PoolDoc {
            id: format!("{ADDRESS_SPACE}/{subnet}"),
            subnet,
            sub_pool,
            refs: 1,
            gateway: None,
            aux: Vec::new(),
            network: None,
        };
        store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
        tracing::info!("docker: pool {subnet} handed out");
        Ok(json!({ "PoolID": p.id, "Pool": subnet.to_string(), "Data": {} }))
    }

    async fn release_pool(&self, r: PoolIdReq) -> Reply {
        let _g = self.lock.lock().await;
        let store = self.net.store();
        if let Some(mut p) = store.doc::<PoolDoc>(POOL, &r.pool_id).map_err(ipam)? {
            p.refs = p.refs.saturating_sub(1);
            if p.refs == 0 {
                store.delete_doc(POOL, &p.id).map_err(ipam)?;
            } else {
                store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
            }
        }
        Ok(json!({}))
    }

    async fn request_address(self: &Arc<Self>, r: AddressReq) -> Reply {
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let Some(mut p) = store.doc::<PoolDoc>(POOL, &r.pool_id).map_err(ipam)? else {
            return Err(ipam(format!("unknown pool {:?}", r.pool_id)));
        };
        let len = p.subnet.prefix_len();
        let fixed = match r.address.as_str() {
            "" => None,
            a => Some(parse_addr("address", a).map_err(ipam)?),
        };
        if let Some(ip) = fixed
            && (!p.subnet.contains(&ip) || ip == p.subnet.network() || ip == p.subnet.broadcast())
        {
            return Err(ipam(format!("address {ip} is not a host address of {}", p.subnet)));
        }
        let gateway = r
            .options
            .as_ref()
            .and_then(|o| o.get("RequestAddressType"))
            .is_some_and(|t| t == "com.docker.network.gateway");
        if gateway {
            let g = match (fixed, p.gateway) {
                (Some(g), _) => g,
                (None, Some(g)) => g,
                (None, None) => p.subnet.hosts().next().ok_or_else(|| ipam("subnet too small"))?,
            };
            p.gateway = Some(g);
            store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
            return Ok(json!({ "Address": format!("{g}/{len}"), "Data": {} }));
        }
        let network = match &p.network {
            Some(n) => n.clone(),
            None => {
                let nid = store
                    .docs::<NetDoc>(NETWORK)
                    .map_err(ipam)?
                    .into_iter()
                    .find(|n| n.pool == p.id)
                    .map(|n| n.id);
                match (nid, fixed) {
                    (Some(nid), _) => self.ensure_network(&nid).await.map_err(ipam)?,
                    // Before the network exists: an --aux-address.
                    (None, Some(ip)) => {
                        if Some(ip) == p.gateway || p.aux.contains(&ip) {
                            return Err(ipam(format!("address {ip} is reserved already")));
                        }
                        p.aux.push(ip);
                        store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
                        return Ok(json!({ "Address": format!("{ip}/{len}"), "Data": {} }));
                    }
                    (None, None) => return Err(ipam(format!("pool {} has no network yet", p.id))),
                }
            }
        };
        let ip = self.net.docker_claim(&network, fixed).await.map_err(ipam)?;
        Ok(json!({ "Address": format!("{ip}/{len}"), "Data": {} }))
    }

    async fn release_address(&self, r: AddressReq) -> Reply {
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let Some(mut p) = store.doc::<PoolDoc>(POOL, &r.pool_id).map_err(ipam)? else {
            return Ok(json!({}));
        };
        let Ok(ip) = parse_addr("address", &r.address) else { return Ok(json!({})) };
        if let Some(n) = &p.network {
            // A late or replayed release must not free the address of an endpoint that holds
            // it now (a container started again with the same --ip).
            let held = store
                .docs::<EpDoc>(ENDPOINT)
                .map_err(ipam)?
                .iter()
                .any(|e| e.ip == ip && self.network_name(&e.network).as_deref() == Some(n));
            if Some(ip) != p.gateway && !held {
                self.net.docker_release(n, ip).await.map_err(ipam)?;
            }
        } else {
            p.aux.retain(|a| *a != ip);
            store.put_doc(POOL, &p.id, &p).map_err(ipam)?;
        }
        Ok(json!({}))
    }

    async fn create_network(self: &Arc<Self>, r: NetworkReq) -> Reply {
        let generic = &r.options["com.docker.network.generic"];
        let overlay = match generic["warren.driver"].as_str() {
            None | Some("bridge") => false,
            Some("overlay") => true,
            Some(d) => {
                return Err(driver(format!(
                    "-o warren.driver={d}: warren's drivers are bridge (one host, the default) \
                     and overlay (across hosts, through the relay)"
                )));
            }
        };
        if overlay && let Err(e) = self.net.overlays_available() {
            return Err(driver(format!("-o warren.driver=overlay: {e}")));
        }
        let mtu = match generic["com.docker.network.driver.mtu"].as_str() {
            Some(m) => {
                Some(m.parse::<u32>().map_err(|_| driver(format!("MTU {m:?} is not a number")))?)
            }
            None => None,
        };
        if r.options["com.docker.network.internal"].as_bool() == Some(true) {
            return Err(driver(
                "--internal: warren's networks always have NAT to the outside; leave it out",
            ));
        }
        if let Some(m) = mtu
            && !(576..=9000).contains(&m)
        {
            return Err(driver(format!("MTU {m} is out of range: use 576 to 9000")));
        }
        let data = r.ipv4.unwrap_or_default();
        let Some(d) = data.first() else {
            return Err(driver("no IPv4 pool: create the network with --ipam-driver warren"));
        };
        if data.len() > 1 {
            return Err(driver("one --subnet per network: warren's networks have one subnet"));
        }
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let pool_id = format!("{ADDRESS_SPACE}/{}", d.pool);
        let Some(pool) = store.doc::<PoolDoc>(POOL, &pool_id)? else {
            return Err(driver(format!(
                "pool {} is not warren's: create the network with --ipam-driver warren too \
                 (warren keeps the addresses of its networks)",
                d.pool
            )));
        };
        let gateway = match d.gateway.as_str() {
            "" => pool.gateway.ok_or_else(|| driver("the network has no gateway"))?,
            g => parse_addr("gateway", g)?,
        };
        if overlay {
            let first = pool.subnet.hosts().next();
            if Some(gateway) != first {
                return Err(driver(format!(
                    "--gateway {gateway}: an overlay's gateway is its subnet's first address{}",
                    first.map(|f| format!(" ({f})")).unwrap_or_default()
                )));
            }
            if pool.sub_pool.is_some() || !pool.aux.is_empty() {
                return Err(driver(
                    "--ip-range and --aux-address are for bridge networks: the relay hands out \
                     an overlay's addresses",
                ));
            }
        }
        let doc = NetDoc {
            id: r.network_id.clone(),
            pool: pool.id,
            gateway,
            mtu,
            name: None,
            created: now(),
            overlay,
        };
        store.put_doc(NETWORK, &doc.id, &doc)?;
        // Docker stores the network (and its name) once this call returns.
        let me = Arc::clone(self);
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let known = match me.docker().await {
                    Some(d) => d.get::<Value>(&format!("/networks/{}", doc.id)).await.is_ok(),
                    None => true,
                };
                if !known {
                    continue;
                }
                let _g = me.lock.lock().await;
                if me.net.store().doc::<NetDoc>(NETWORK, &doc.id).ok().flatten().is_some()
                    && let Err(e) = me.ensure_network(&doc.id).await
                {
                    tracing::warn!("docker network {:.12}: {e}", doc.id);
                }
                return;
            }
        });
        Ok(json!({}))
    }

    /// The warren network behind Docker network `nid`, made now if it is not yet. Called with
    /// the lock held.
    async fn ensure_network(&self, nid: &str) -> Result<String, NetError> {
        let store = self.net.store();
        let Some(mut doc) = store.doc::<NetDoc>(NETWORK, nid)? else {
            return Err(NetError::NotFound(format!("unknown network {nid:.12}")));
        };
        if let Some(name) = &doc.name
            && self.net.find_network(name)?.is_some()
        {
            return Ok(name.clone());
        }
        let Some(mut pool) = store.doc::<PoolDoc>(POOL, &doc.pool)? else {
            return Err(NetError::NotFound(format!("network {nid:.12} lost its pool")));
        };
        let docker_name = match self.docker().await {
            Some(d) => d
                .get::<Value>(&format!("/networks/{nid}"))
                .await
                .ok()
                .and_then(|v| v["Name"].as_str().map(str::to_owned)),
            None => None,
        };
        let name = if doc.overlay {
            // Hosts share an overlay by its name: no other name will do.
            let Some(docker_name) = docker_name else {
                return Err(NetError::Unavailable(format!(
                    "docker network {nid:.12}: an overlay is named after the Docker network, and \
                     the Docker API ({}) does not tell its name",
                    self.docker_socket
                        .as_deref()
                        .map_or("none".into(), |p| p.display().to_string())
                )));
            };
            let name = warren_name(&docker_name).ok_or_else(|| {
                NetError::BadInput(format!(
                    "docker network {docker_name:?} cannot name an overlay: use 1-63 characters \
                     a-z, 0-9, '-', '_' and '.', not starting or ending with one of the last three"
                ))
            })?;
            self.net.docker_overlay(&name, pool.subnet, doc.mtu).await?;
            name
        } else {
            let fallback = format!("docker-{}", nid.chars().take(12).collect::<String>());
            let mut name = docker_name.as_deref().and_then(warren_name).unwrap_or(fallback.clone());
            if self.net.find_network(&name)?.is_some() {
                tracing::warn!(
                    "a warren network named {name} exists already; Docker's network {} is {fallback} in warren",
                    docker_name.as_deref().unwrap_or("?")
                );
                name = fallback;
            }
            self.net
                .create_network(CreateNetwork {
                    name: name.clone(),
                    driver: None,
                    subnet: Some(pool.subnet.to_string()),
                    gateway: Some(doc.gateway.to_string()),
                    ip_range: pool.sub_pool.map(|s| s.to_string()),
                    mtu: doc.mtu,
                })
                .await?;
            for aux in std::mem::take(&mut pool.aux) {
                if let Err(e) = self.net.docker_claim(&name, Some(aux)).await {
                    tracing::warn!("docker network {name}: aux address {aux}: {e}");
                }
            }
            name
        };
        pool.network = Some(name.clone());
        store.put_doc(POOL, &pool.id, &pool)?;
        doc.name = Some(name.clone());
        store.put_doc(NETWORK, &doc.id, &doc)?;
        allow_forwarding_through_docker().await;
        Ok(name)
    }

    async fn delete_network(&self, r: NetworkReq) -> Reply {
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let Some(doc) = store.doc::<NetDoc>(NETWORK, &r.network_id)? else {
            return Ok(json!({}));
        };
        if let Some(name) = &doc.name {
            match self.net.docker_remove_network(name).await {
                Ok(()) | Err(NetError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(mut p) = store.doc::<PoolDoc>(POOL, &doc.pool)?
            && p.network == doc.name
        {
            p.network = None;
            p.aux.clear();
            store.put_doc(POOL, &p.id, &p)?;
        }
        for e in store.docs::<EpDoc>(ENDPOINT)?.into_iter().filter(|e| e.network == doc.id) {
            store.delete_doc(ENDPOINT, &e.id)?;
        }
        store.delete_doc(NETWORK, &doc.id)?;
        Ok(json!({}))
    }

    async fn create_endpoint(self: &Arc<Self>, r: EndpointReq) -> Reply {
        let _g = self.lock.lock().await;
        let network = self.ensure_network(&r.network_id).await?;
        let iface = r.interface.unwrap_or_default();
        if iface.address.is_empty() {
            return Err(driver("the endpoint has no IPv4 address from warren's IPAM"));
        }
        let ip = parse_addr("address", &iface.address)?;
        let short: String = r.endpoint_id.chars().take(10).collect();
        if short.is_empty() || !short.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(driver(format!("endpoint id {:?} is not Docker's hex", r.endpoint_id)));
        }
        let mac = crate::net::model::mac_text(crate::net::model::mac_for(ip));
        if !iface.mac.is_empty()
            && !iface.mac.eq_ignore_ascii_case(&mac)
            && self.net.find_network(&network)?.is_some_and(|n| n.is_overlay())
        {
            // Other hosts send this address's frames to the MAC derived from it.
            return Err(driver(format!(
                "--mac-address {}: on an overlay a container's MAC follows its address ({mac}); \
                 leave --mac-address out",
                iface.mac
            )));
        }
        // On an overlay the relay knows the endpoint by the name its address was claimed for.
        let name = match self.net.docker_held_name(&network, ip)? {
            Some(held) => held,
            None => format!("ep-{}", short.to_ascii_lowercase()),
        };
        let doc =
            EpDoc { id: r.endpoint_id.clone(), network: r.network_id, name, ip, created: now() };
        self.net.store().put_doc(ENDPOINT, &doc.id, &doc)?;
        tracing::debug!("docker endpoint {} in {network}: {ip}", doc.name);
        if iface.mac.is_empty() {
            return Ok(json!({ "Interface": { "MacAddress": mac } }));
        }
        Ok(json!({ "Interface": {} }))
    }

    /// The warren network behind Docker network `nid`, if made.
    fn network_name(&self, nid: &str) -> Option<String> {
        self.net.store().doc::<NetDoc>(NETWORK, nid).ok().flatten().and_then(|n| n.name)
    }

    /// The endpoint and its warren network.
    async fn endpoint(&self, nid: &str, eid: &str) -> Result<(EpDoc, String), Refusal> {
        let store = self.net.store();
        let doc = store
            .doc::<EpDoc>(ENDPOINT, eid)?
            .ok_or_else(|| driver(format!("unknown endpoint {eid:.12}")))?;
        let net = store
            .doc::<NetDoc>(NETWORK, nid)?
            .and_then(|n| n.name)
            .ok_or_else(|| driver(format!("unknown network {nid:.12}")))?;
        Ok((doc, net))
    }

    async fn join(self: &Arc<Self>, r: EndpointReq) -> Reply {
        let _g = self.lock.lock().await;
        let (doc, net) = self.endpoint(&r.network_id, &r.endpoint_id).await?;
        if r.sandbox_key.is_empty() {
            return Err(driver("Join without a SandboxKey"));
        }
        let peer = self.net.docker_join(&net, &doc.name, doc.ip, &r.sandbox_key).await?;
        let gateway =
            self.net.find_network(&net)?.map(|n| n.gateway.to_string()).unwrap_or_default();
        let me = Arc::clone(self);
        tokio::spawn(async move { me.learn_names(doc, net).await });
        Ok(json!({
            "InterfaceName": { "SrcName": peer, "DstPrefix": "eth" },
            "Gateway": gateway,
            "DisableGatewayService": false,
        }))
    }

    /// Finds the container behind endpoint `doc` (Docker lists it once the join is done) and
    /// gives the endpoint its names.
    async fn learn_names(&self, doc: EpDoc, net: String) {
        let Some(docker) = self.docker().await else { return };
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(n) = docker.get::<Value>(&format!("/networks/{}", doc.network)).await else {
                continue;
            };
            let found = n["Containers"].as_object().and_then(|m| {
                m.iter()
                    .find(|(_, c)| c["EndpointID"] == doc.id.as_str())
                    .map(|(id, c)| (id.clone(), c["Name"].as_str().unwrap_or_default().to_owned()))
            });
            let Some((cid, cname)) = found else { continue };
            let docker_net = n["Name"].as_str().unwrap_or_default().to_owned();
            let mut names = vec![cname.clone(), cid.chars().take(12).collect()];
            if let Ok(c) = docker.get::<super::Container>(&format!("/containers/{cid}/json")).await
            {
                if let Some(cn) = c.networks().get(&docker_net) {
                    names.extend(cn.aliases.clone().unwrap_or_default());
                }
                names.push(c.config.hostname.clone());
            }
            names.retain(|n| !n.is_empty());
            match self.net.set_aliases(&net, &doc.name, names).await {
                Ok(kept) => tracing::info!(
                    "docker endpoint {} of {net} is container {cname}: names {}",
                    doc.name,
                    kept.join(", ")
                ),
                Err(e) => tracing::debug!("docker endpoint {}: {e}", doc.name),
            }
            return;
        }
        tracing::warn!("docker endpoint {} of {net}: its container never showed up", doc.name);
    }

    async fn program(&self, r: EndpointReq) -> Reply {
        let _g = self.lock.lock().await;
        let (doc, net) = self.endpoint(&r.network_id, &r.endpoint_id).await?;
        let Some(maps) = r.options["com.docker.network.portmap"].as_array() else {
            return Ok(json!({}));
        };
        let have = self.net.ports_of(&net, &doc.name)?;
        let mut done: Vec<(String, u16, Option<String>)> = Vec::new();
        for m in maps {
            let proto = match m["Proto"].as_u64() {
                Some(6) => "tcp",
                Some(17) => "udp",
                p => {
                    return self
                        .undo(&net, done, format!("protocol {p:?}: warren publishes TCP and UDP"))
                        .await;
                }
            };
            let port = m["Port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            let host_port = m["HostPort"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            if host_port == 0 {
                return self
                    .undo(
                        &net,
                        done,
                        format!(
                            "-p {port}/{proto}: give the host port (-p HOST_PORT:{port}); warren \
                             publishes the ports of its networks itself and picks none"
                        ),
                    )
                    .await;
            }
            let host_ip = match m["HostIP"].as_str().unwrap_or_default() {
                "" | "0.0.0.0" => None,
                "::" => continue,
                ip => Some(ip.to_owned()),
            };
            let parsed: Option<Ipv4Addr> = host_ip.as_deref().and_then(|s| s.parse().ok());
            if have.iter().any(|p| {
                p.proto.as_str() == proto
                    && p.host_port == host_port
                    && p.host_ip == parsed
                    && p.port == port
            }) {
                continue;
            }
            let req = Publish {
                endpoint: doc.name.clone(),
                host_port,
                port,
                proto: Some(proto.to_owned()),
                host_ip: host_ip.clone(),
            };
            if let Err(e) = self.net.publish(&net, req).await {
                return self.undo(&net, done, e.to_string()).await;
            }
            done.push((proto.to_owned(), host_port, host_ip));
        }
        Ok(json!({}))
    }

    /// Unpublishes what one call published, and refuses with `why`.
    async fn undo(
        &self,
        net: &str,
        done: Vec<(String, u16, Option<String>)>,
        why: String,
    ) -> Reply {
        for (proto, port, ip) in done {
            let _ = self.net.unpublish(net, &proto, port, ip.as_deref()).await;
        }
        Err(driver(why))
    }

    async fn revoke(&self, r: EndpointReq) -> Reply {
        let _g = self.lock.lock().await;
        if let Ok((doc, net)) = self.endpoint(&r.network_id, &r.endpoint_id).await {
            self.net.unpublish_endpoint(&net, &doc.name).await?;
        }
        Ok(json!({}))
    }

    async fn leave(&self, r: EndpointReq, delete: bool) -> Reply {
        let _g = self.lock.lock().await;
        if let Ok((doc, net)) = self.endpoint(&r.network_id, &r.endpoint_id).await {
            self.net.docker_leave(&net, &doc.name).await?;
        }
        if delete {
            self.net.store().delete_doc(ENDPOINT, &r.endpoint_id)?;
        }
        Ok(json!({}))
    }

    /// Forgets networks and endpoints Docker no longer knows: their teardown calls came while
    /// the plugin was away, and Docker does not send them again.
    async fn sweep(&self) {
        let Some(docker) = self.docker().await else { return };
        let _g = self.lock.lock().await;
        let store = self.net.store();
        let Ok(nets) = store.docs::<NetDoc>(NETWORK) else { return };
        let old = |created: u64| now().saturating_sub(created) > SWEEP_AGE;
        for nd in nets.into_iter().filter(|n| old(n.created)) {
            let listed = match docker.get::<Value>(&format!("/networks/{}", nd.id)).await {
                Ok(v) => v,
                Err(e) if e.is_not_found() => {
                    tracing::info!(
                        "docker network {:.12} is gone from Docker; removing {}",
                        nd.id,
                        nd.name.as_deref().unwrap_or("its state")
                    );
                    if let Err(e) = self.forget_network(&nd).await {
                        tracing::warn!("docker network {:.12}: {e}", nd.id);
                    }
                    continue;
                }
                Err(_) => return,
            };
            let Some(net) = &nd.name else { continue };
            let live: Vec<&str> = listed["Containers"]
                .as_object()
                .map(|m| m.values().filter_map(|c| c["EndpointID"].as_str()).collect())
                .unwrap_or_default();
            let eps = store.docs::<EpDoc>(ENDPOINT).unwrap_or_default();
            for ep in eps.into_iter().filter(|e| e.network == nd.id && old(e.created)) {
                if live.contains(&ep.id.as_str()) {
                    continue;
                }
                tracing::info!(
                    "docker endpoint {} of {net} is gone from Docker; removing it",
                    ep.name
                );
                let gone = async {
                    self.net.docker_leave(net, &ep.name).await?;
                    self.net.docker_release(net, ep.ip).await?;
                    store.delete_doc(ENDPOINT, &ep.id).map(|_| ())
                };
                if let Err(e) = gone.await {
                    tracing::warn!("docker endpoint {}: {e}", ep.name);
                }
            }
        }
    }

    /// Removes the warren network of `nd` and every record of it and its pool.
    async fn forget_network(&self, nd: &NetDoc) -> Result<(), NetError> {
        let store = self.net.store();
        if let Some(name) = &nd.name {
            match self.net.docker_remove_network(name).await {
                Ok(()) | Err(NetError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for e in store.docs::<EpDoc>(ENDPOINT)?.into_iter().filter(|e| e.network == nd.id) {
            store.delete_doc(ENDPOINT, &e.id)?;
        }
        store.delete_doc(POOL, &nd.pool)?;
        store.delete_doc(NETWORK, &nd.id)?;
        Ok(())
    }

    async fn oper_info(&self, r: EndpointReq) -> Reply {
        let (doc, net) = self.endpoint(&r.network_id, &r.endpoint_id).await?;
        Ok(json!({ "Value": { "warren.network": net, "warren.endpoint": doc.name } }))
    }
}

async fn dispatch(State(p): State<Arc<Plugin>>, uri: Uri, bytes: Bytes) -> Response {
    let path = uri.path().to_owned();
    let reply = p.call(&path, &bytes).await;
    let mut resp = match reply {
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "Err": format!("{path} is not implemented") })),
        )
            .into_response(),
        Some(Ok(v)) => axum::Json(v).into_response(),
        Some(Err(Refusal(key, message))) => {
            tracing::warn!("docker plugin: {path}: {message}");
            axum::Json(json!({ key: message })).into_response()
        }
    };
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/vnd.docker.plugins.v1+json"),
    );
    resp
}

/// Listens at `path`: a socket left by an agent that is gone is replaced; one that answers is
/// another plugin's, and refused. The socket is root's and [`socket_group`]'s only (0660,
/// whatever the umask): it is bound under a temporary name, given its mode and group, and only
/// then renamed into place, so no one else can connect in between.
async fn bind(path: &Path) -> Result<tokio::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "{} is served by another process already (another warren agent?)",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let name = path.file_name().map_or_else(|| "warren".into(), |n| n.to_string_lossy());
    // Not `*.sock`: Docker does not take it for a plugin while it is there.
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(|e| {
        format!("cannot listen on {}: {e} (--docker-plugin-socket PATH)", tmp.display())
    })?;
    let gid = socket_group();
    let placed = std::os::unix::fs::chown(&tmp, None, Some(gid))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "cannot give {} mode 0660 and group {gid}: {e} (the Docker plugin needs root)",
            path.display()
        ));
    }
    Ok(listener)
}

/// The group of the plugin's socket: `docker`, whose members may use Docker anyway, when it
/// exists, else root's.
fn socket_group() -> u32 {
    match nix::unistd::Group::from_name("docker") {
        Ok(Some(g)) => g.gid.as_raw(),
        _ => 0,
    }
}

/// The chain of warren's rules in Docker's firewall, jumped to from `DOCKER-USER`.
pub const DOCKER_CHAIN: &str = "WARREN-DOCKER";

/// What [`DOCKER_CHAIN`] holds, as `iptables -S` prints it: traffic within and between warren's
/// bridges, replies and published ports into them, and traffic out of them except into
/// Docker's own bridges (whose isolation Docker's chains keep).
const DOCKER_RULES: &[&str] = &[
    "-A WARREN-DOCKER -i wrb+ -o wrb+ -j ACCEPT",
    "-A WARREN-DOCKER -o wrb+ -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT",
    "-A WARREN-DOCKER -i wrb+ -o docker0 -j RETURN",
    "-A WARREN-DOCKER -i wrb+ -o br-+ -j RETURN",
    "-A WARREN-DOCKER -i wrb+ -j ACCEPT",
];

/// Docker's `FORWARD` chain drops what it does not know, bridged traffic too once it loaded
/// `br_netfilter`. Its `DOCKER-USER` chain exists for rules like these: it jumps to
/// [`DOCKER_CHAIN`], whose rules are rewritten when they differ. Nothing happens where Docker
/// has no such chain.
pub async fn allow_forwarding_through_docker() {
    async fn iptables(args: &[&str]) -> Option<String> {
        let out = tokio::process::Command::new("iptables")
            .arg("-w")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .await
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
    if iptables(&["-S", "DOCKER-USER"]).await.is_none() {
        return;
    }
    let have = match iptables(&["-S", DOCKER_CHAIN]).await {
        Some(s) => s,
        None => {
            let _ = iptables(&["-N", DOCKER_CHAIN]).await;
            String::new()
        }
    };
    let rules: Vec<&str> = have.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut ok = true;
    if rules != DOCKER_RULES {
        ok &= iptables(&["-F", DOCKER_CHAIN]).await.is_some();
        for r in DOCKER_RULES {
            let args: Vec<&str> = r.split(' ').collect();
            ok &= iptables(&args).await.is_some();
        }
    }
    if iptables(&["-C", "DOCKER-USER", "-j", DOCKER_CHAIN]).await.is_none() {
        ok &= iptables(&["-I", "DOCKER-USER", "-j", DOCKER_CHAIN]).await.is_some();
    }
    if !ok {
        tracing::warn!(
            "cannot let warren's bridges through Docker's FORWARD chain (iptables failed): add \
             `iptables -I DOCKER-USER -i wrb+ -j ACCEPT` and `-o wrb+` by hand"
        );
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The default socket path.
pub fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_become_warren_names() {
        assert_eq!(warren_name("My_App.net").as_deref(), Some("my-app-net"));
        assert_eq!(warren_name("backend").as_deref(), Some("backend"));
        assert_eq!(warren_name("-x"), None);
    }

    #[test]
    fn empty_and_bad_bodies() {
        let r: PoolReq = body(b"").expect("empty body is the default");
        assert!(r.pool.is_empty() && !r.v6);
        let r: AddressReq = body(br#"{"PoolID":"warren/10.0.0.0/24","Address":"","Options":null}"#)
            .expect("decodes");
        assert!(r.options.is_none());
        assert!(body::<PoolReq>(b"{nope").is_err());
    }
}

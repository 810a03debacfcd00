//! What the Docker network plugin needs of the networks: subnets promised before a network is
//! made, addresses held for Docker's IPAM, and endpoints whose sandbox Docker configures.
//!
//! A Docker endpoint is an ordinary endpoint (DNS names, published ports, reconcile), except
//! that its veth's far end is left in the host's namespace under the name the plugin hands to
//! Docker; Docker moves it into the container, names it `ethN` and gives it its address. Its
//! address belongs to Docker's IPAM (owner [`DOCKER_OWNER`]): removing the endpoint keeps it
//! held until Docker releases it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{NetManager, bad, parse_v4};
use crate::net::model::{
    Endpoint, NetError, Network, Sandbox, check_name, mac_for, mac_text, new_id,
};
use crate::net::store::Store;

/// The owner of addresses handed out through Docker's IPAM.
pub const DOCKER_OWNER: &str = "docker:ipam";

/// The prefix of the veth end handed to Docker.
pub const DOCKER_PEER_PREFIX: &str = "wrd-";

impl NetManager {
    /// The state database, for the Docker plugin's own records.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether networks can be managed here; why not otherwise.
    pub fn available(&self) -> Result<(), NetError> {
        self.usable()
    }

    /// A stored network.
    pub fn find_network(&self, name: &str) -> Result<Option<Network>, NetError> {
        self.store.network(name)
    }

    /// `wanted` (CIDR) if it is free, else a free `/24` of the pool; `reserved` are subnets
    /// promised to Docker that are no networks yet.
    pub async fn free_subnet(
        &self,
        wanted: Option<&str>,
        reserved: &[Ipv4Net],
    ) -> Result<Ipv4Net, NetError> {
        self.usable()?;
        let live = self.live.lock().await;
        let kernel = Self::kernel(&live)?.clone();
        drop(live);
        let reserved: Vec<(String, Ipv4Net)> =
            reserved.iter().map(|s| ("a Docker network being created".to_owned(), *s)).collect();
        self.pick_subnet(&kernel, wanted, &reserved).await
    }

    /// Holds an address of network `net` for Docker: `fixed`, or the next free one.
    pub fn docker_claim(&self, net: &str, fixed: Option<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
        let n = self.network(net)?;
        let fixed = fixed.map(|ip| ip.to_string());
        self.claim(&n, fixed.as_deref(), DOCKER_OWNER)
    }

    /// Lets an address Docker held go; addresses of others are left alone.
    pub fn docker_release(&self, net: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        let mine = self.store.addresses(net)?.iter().any(|(a, o)| *a == ip && o == DOCKER_OWNER);
        if mine {
            self.store.release_address(net, ip)?;
        }
        Ok(())
    }

    /// Makes endpoint `name` of `net` at `ip` for the Docker sandbox `sandbox_key`: the host end
    /// on the bridge, up; the far end left here for Docker to move. Returns the far end's name.
    pub async fn docker_join(
        &self,
        net: &str,
        name: &str,
        ip: Ipv4Addr,
        sandbox_key: &str,
    ) -> Result<String, NetError> {
        self.usable()?;
        check_name("endpoint", name)?;
        let mut live = self.live.lock().await;
        let n = self.network(net)?;
        if n.is_overlay() {
            return Err(bad("Docker containers can join bridge networks only"));
        }
        if let Some(e) = self.store.endpoints(Some(net))?.into_iter().find(|e| e.name == name) {
            // Docker asked again (a retried Join): the same endpoint, if its far end is still
            // here to be taken.
            let peer = format!("{DOCKER_PEER_PREFIX}{}", e.id);
            if Self::kernel(&live)?.link(&peer).await?.is_some() {
                return Ok(peer);
            }
            return Err(NetError::Conflict(format!("endpoint {name} of {net} is joined already")));
        }
        let kernel = Self::kernel(&live)?.clone();
        let bridge = self.ensure_net_bridge(&kernel, &n).await?;
        let e = Endpoint {
            network: net.to_owned(),
            name: name.to_owned(),
            id: new_id(),
            ip,
            mac: mac_text(mac_for(ip)),
            aliases: Vec::new(),
            sandbox: Sandbox::Docker(sandbox_key.to_owned()),
            netns_ino: 0,
            ifname: String::new(),
        };
        let here = std::fs::File::open("/proc/self/ns/net")
            .map_err(|e| NetError::System(format!("cannot open this namespace: {e}")))?;
        let peer = format!("{DOCKER_PEER_PREFIX}{}", e.id);
        kernel.add_veth(&e.host_veth(), &peer, bridge, n.mtu, &here).await?;
        if let Err(err) = self.store.put_endpoint(&e) {
            let _ = kernel.delete_link(&e.host_veth()).await;
            return Err(err);
        }
        live.healthy.insert((e.network.clone(), e.name.clone()));
        self.refresh(&mut live).await?;
        tracing::info!("docker endpoint {name} joined {net}: {ip} ({sandbox_key})");
        Ok(peer)
    }

    /// Removes endpoint `name` of `net` (its veth, its ports, its DNS names), keeping its
    /// address for Docker to release. Nothing to remove is no error.
    pub async fn docker_leave(&self, net: &str, name: &str) -> Result<(), NetError> {
        self.usable()?;
        let mut live = self.live.lock().await;
        let Some(e) = self.store.endpoints(Some(net))?.into_iter().find(|e| e.name == name) else {
            return Ok(());
        };
        Self::kernel(&live)?.delete_link(&e.host_veth()).await?;
        self.store.delete_endpoint(&e)?;
        live.healthy.remove(&(e.network.clone(), e.name.clone()));
        self.refresh(&mut live).await?;
        tracing::info!("docker endpoint {name} left {net}");
        Ok(())
    }

    /// Gives endpoint `name` of `net` these extra DNS names (those taken by another endpoint
    /// or service of the network are skipped).
    pub async fn set_aliases(
        &self,
        net: &str,
        name: &str,
        aliases: Vec<String>,
    ) -> Result<Vec<String>, NetError> {
        let mut live = self.live.lock().await;
        let Some(mut e) = self.store.endpoints(Some(net))?.into_iter().find(|e| e.name == name)
        else {
            return Err(NetError::NotFound(format!("network {net} has no endpoint {name}")));
        };
        let (names, _) = self.names_in_use(net)?;
        let mut keep: Vec<String> = Vec::new();
        for a in aliases {
            let a = a.to_ascii_lowercase();
            if check_name("alias", &a).is_ok()
                && a != e.name
                && !names.contains(&a)
                && !keep.contains(&a)
            {
                keep.push(a);
            }
        }
        e.aliases = keep.clone();
        self.store.put_endpoint(&e)?;
        self.refresh(&mut live).await?;
        Ok(keep)
    }

    /// Unpublishes every port of endpoint `name` of `net`.
    pub async fn unpublish_endpoint(&self, net: &str, name: &str) -> Result<(), NetError> {
        let mut live = self.live.lock().await;
        let ports: Vec<_> =
            self.store.ports(Some(net))?.into_iter().filter(|p| p.endpoint == name).collect();
        if ports.is_empty() {
            return Ok(());
        }
        for p in &ports {
            self.store.delete_port(p)?;
            live.holds.remove(&(p.proto, p.host_ip, p.host_port));
        }
        self.refresh(&mut live).await
    }

    /// The ports published for endpoint `name` of `net`.
    pub fn ports_of(
        &self,
        net: &str,
        name: &str,
    ) -> Result<Vec<crate::net::model::Port>, NetError> {
        Ok(self.store.ports(Some(net))?.into_iter().filter(|p| p.endpoint == name).collect())
    }
}

/// Parses `10.0.0.5/24` or `10.0.0.5` (Docker sends both forms).
pub fn parse_addr(what: &str, s: &str) -> Result<Ipv4Addr, NetError> {
    parse_v4(what, s.split_once('/').map_or(s, |(a, _)| a))
}

//! What the Docker network plugin needs of the networks: subnets promised before a network is
//! made, addresses held for Docker's IPAM, and endpoints whose sandbox Docker configures.
//!
//! A Docker endpoint is an ordinary endpoint (DNS names, published ports, reconcile), except
//! that its veth's far end is left in the host's namespace under the name the plugin hands to
//! Docker; Docker moves it into the container, names it `ethN` and gives it its address. Its
//! address belongs to Docker's IPAM (owner [`DOCKER_OWNER`]): removing the endpoint keeps it
//! held until Docker releases it.
//!
//! On an overlay the relay hands out the addresses: Docker's request claims one at the relay
//! under a new endpoint name (owner `docker:ipam:NAME` here), and the endpoint Docker creates
//! later takes that name, so the relay, the other hosts and a restarted agent all know it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{NetManager, parse_v4};
use crate::net::model::{
    Endpoint, NetError, Network, Sandbox, check_name, mac_for, mac_text, new_id,
};
use crate::net::overlay::label;
use crate::net::store::Store;

/// The owner of addresses handed out through Docker's IPAM.
pub const DOCKER_OWNER: &str = "docker:ipam";

/// The owner of an overlay address Docker's IPAM holds for endpoint `name`.
fn docker_owner_of(name: &str) -> String {
    format!("{DOCKER_OWNER}:{name}")
}

/// The endpoint name in an owner from [`docker_owner_of`].
fn held_name(owner: &str) -> Option<&str> {
    owner.strip_prefix(DOCKER_OWNER)?.strip_prefix(':')
}

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

    /// Whether overlay networks can be made here (the agent has a relay); why not otherwise.
    pub fn overlays_available(&self) -> Result<(), NetError> {
        self.overlay().map(|_| ())
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
        let mut reserved: Vec<(String, Ipv4Net)> =
            reserved.iter().map(|s| ("a Docker network being created".to_owned(), *s)).collect();
        // A subnet chosen here avoids the overlays other hosts made; one asked for may be
        // such an overlay's, to join it.
        if let Some(ov) = self.overlay.get().filter(|_| wanted.is_none()) {
            reserved.extend(ov.remotes().into_iter().map(|r| {
                (
                    format!("overlay network {}", r.def.name),
                    super::overlay_net::subnet_of(r.def.subnet),
                )
            }));
        }
        self.pick_subnet(&kernel, wanted, &reserved).await
    }

    /// Holds an address of network `net` for Docker: `fixed`, or the next free one. On an
    /// overlay the relay hands it out, to a new endpoint name that [`Self::docker_held_name`]
    /// tells later.
    pub async fn docker_claim(
        &self,
        net: &str,
        fixed: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, NetError> {
        let n = self.network(net)?;
        if !n.is_overlay() {
            let fixed = fixed.map(|ip| ip.to_string());
            return self.claim(&n, fixed.as_deref(), DOCKER_OWNER);
        }
        let name = format!("ep-{}", new_id());
        self.claim_overlay(&n, &name, fixed, &[], &docker_owner_of(&name)).await
    }

    /// The endpoint name an overlay address was handed out to for Docker.
    pub fn docker_held_name(&self, net: &str, ip: Ipv4Addr) -> Result<Option<String>, NetError> {
        Ok(self
            .store
            .addresses(net)?
            .into_iter()
            .find(|(a, _)| *a == ip)
            .and_then(|(_, o)| held_name(&o).map(str::to_owned)))
    }

    /// The names of overlay addresses Docker holds in `net`, with the addresses.
    pub(super) fn docker_held(&self, net: &str) -> Vec<(String, Ipv4Addr)> {
        self.store
            .addresses(net)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(a, o)| held_name(&o).map(|n| (n.to_owned(), a)))
            .collect()
    }

    /// Lets an address Docker held go (on an overlay, at the relay too); addresses of others
    /// are left alone.
    pub async fn docker_release(&self, net: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        let Some((_, owner)) = self.store.addresses(net)?.into_iter().find(|(a, _)| *a == ip)
        else {
            return Ok(());
        };
        if owner == DOCKER_OWNER {
            self.store.release_address(net, ip)?;
        } else if let Some(name) = held_name(&owner) {
            self.store.release_address(net, ip)?;
            if let Some(n) = self.store.network(net)? {
                self.release_overlay(&n, name).await;
            }
        }
        Ok(())
    }

    /// Makes overlay `name` with `subnet` for a Docker network: joined when the relay knows
    /// it (with that subnet), defined at the relay otherwise.
    pub async fn docker_overlay(
        &self,
        name: &str,
        subnet: Ipv4Net,
        mtu: Option<u32>,
    ) -> Result<(), NetError> {
        self.usable()?;
        let ov = self.overlay()?;
        let differs = |have: Ipv4Net| {
            NetError::Conflict(format!(
                "overlay network {name} has the subnet {have}: create the Docker network with \
                 --subnet {have}"
            ))
        };
        let mut live = self.live.lock().await;
        if let Some(n) = self.store.network(name)? {
            if !n.is_overlay() {
                return Err(NetError::Conflict(format!(
                    "a bridge network named {name} exists on this host; give the Docker network \
                     another name"
                )));
            }
            return if n.subnet == subnet { Ok(()) } else { Err(differs(n.subnet)) };
        }
        if let Some(r) = ov.remote(name) {
            let have = super::overlay_net::subnet_of(r.def.subnet);
            if have != subnet {
                return Err(differs(have));
            }
            self.network_or_join(&mut live, name).await?;
            return Ok(());
        }
        drop(live);
        self.create_overlay(super::CreateNetwork {
            name: name.to_owned(),
            driver: Some(crate::net::model::OVERLAY.into()),
            subnet: Some(subnet.to_string()),
            gateway: None,
            ip_range: None,
            mtu,
        })
        .await?;
        Ok(())
    }

    /// Removes what a Docker network made here: a bridge network goes; an overlay leaves this
    /// host, and goes at the relay too unless another host still has endpoints in it.
    pub async fn docker_remove_network(&self, name: &str) -> Result<(), NetError> {
        self.usable()?;
        let Some(n) = self.store.network(name)? else { return Ok(()) };
        if !n.is_overlay() {
            return self.remove_network(name, true).await;
        }
        for e in self.store.endpoints(Some(name))? {
            self.detach(name, &e.name).await?;
        }
        for (_, ip) in self.docker_held(name) {
            self.docker_release(name, ip).await?;
        }
        match self.overlay()?.delete(label("network", name)?).await {
            Ok(()) | Err(NetError::NotFound(_)) => {}
            Err(NetError::Conflict(e)) => {
                tracing::info!("overlay network {name} stays at the relay for other hosts: {e}");
            }
            Err(e) => {
                tracing::warn!("overlay network {name} left this host; the relay kept it: {e}");
            }
        }
        let mut live = self.live.lock().await;
        if let Some(n) = self.store.network(name)? {
            self.teardown_overlay(&mut live, &n).await?;
        }
        self.refresh(&mut live).await
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
        drop(live);
        if self.network(net)?.is_overlay() {
            // Attaching again with the same name and address tells the relay the new names.
            let aliases = keep.iter().map(|a| label("alias", a)).collect::<Result<Vec<_>, _>>()?;
            self.overlay()?
                .attach(label("network", net)?, label("endpoint", name)?, Some(e.ip), aliases)
                .await?;
        }
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

//! Bridges, veth pairs, addresses and routes through rtnetlink, and network namespaces.
//!
//! A netlink socket talks to the namespace it was created in, so work inside a sandbox opens
//! a new socket from a short-lived thread that first enters the sandbox's namespace; tokio's
//! own threads never change namespace.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use super::model::{NetError, mac_for};

/// A link as the kernel lists it.
#[derive(Clone, Debug)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Administratively up.
    pub up: bool,
    /// Its bridge, if it is a bridge port.
    pub master: Option<u32>,
    /// Its MTU.
    pub mtu: u32,
    /// Its MAC address (zeros when it has none).
    pub mac: [u8; 6],
    /// For a VXLAN device: its VNI, local address and UDP port.
    pub vxlan: Option<(u32, Option<Ipv4Addr>, u16)>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
        mtu: 0,
        mac: [0; 6],
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name.clone_from(n),
            LinkAttribute::Controller(c) => l.master = Some(*c),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(a) if a.len() == 6 => l.mac.copy_from_slice(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
                        let (mut id, mut local, mut port) = (0, None, 0);
                        for x in v {
                            match x {
                                InfoVxlan::Id(i) => id = *i,
                                InfoVxlan::Local(a) => local = Some(*a),
                                InfoVxlan::Port(p) => port = *p,
                                _ => {}
                            }
                        }
                        l.vxlan = Some((id, local, port));
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// One forwarding-database entry of a bridge or a VXLAN device.
#[derive(Clone, Debug)]
pub struct FdbEntry {
    /// The device (a bridge port, or the VXLAN device itself).
    pub ifindex: u32,
    /// The MAC address.
    pub mac: [u8; 6],
    /// A VXLAN entry's remote endpoint.
    pub dst: Option<Ipv4Addr>,
    /// An entry of the bridge (`master`) rather than of the device itself (`self`).
    pub master: bool,
    /// A static entry (ours are all static or permanent).
    pub fixed: bool,
    msg: NeighbourMessage,
}

/// One IPv4 neighbour entry.
#[derive(Clone, Debug)]
pub struct NeighEntry {
    /// The device.
    pub ifindex: u32,
    /// The address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Permanent (set by us) rather than learned.
    pub permanent: bool,
    msg: NeighbourMessage,
}

fn mac_of(v: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(v).ok()
}

/// The errno the kernel answered a netlink request with, if it refused it.
fn errno(e: &rtnetlink::Error) -> Option<nix::errno::Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| nix::errno::Errno::from_raw(-c.get())),
        _ => None,
    }
}

fn sys(what: &str, e: rtnetlink::Error) -> NetError {
    if errno(&e) == Some(nix::errno::Errno::EPERM) {
        return NetError::Unavailable(format!(
            "{what}: operation not permitted; the agent needs CAP_NET_ADMIN (run it as root)"
        ));
    }
    NetError::System(format!("{what}: {e}"))
}

/// A netlink connection to one network namespace.
#[derive(Clone, Debug)]
pub struct Kernel {
    handle: Handle,
}

impl Kernel {
    /// Connects to the agent's own namespace.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetError::Unavailable(format!("cannot open a netlink socket: {e}")))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Connects to the namespace `ns` (an open namespace file).
    pub fn connect_in(ns: &File) -> Result<Self, NetError> {
        let fd = ns.try_clone().map_err(|e| NetError::System(format!("namespace file: {e}")))?;
        let rt = tokio::runtime::Handle::current();
        let made = std::thread::spawn(move || {
            let _in_runtime = rt.enter();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::Unavailable(format!(
                    "cannot enter the sandbox's network namespace: {e} (the agent needs \
                     CAP_SYS_ADMIN for that)"
                ))
            })?;
            rtnetlink::new_connection()
                .map(|(c, h, _)| (c, h))
                .map_err(|e| NetError::System(format!("netlink socket in the sandbox: {e}")))
        })
        .join()
        .map_err(|_| NetError::System("the namespace thread failed".into()))?;
        let (conn, handle) = made?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every link.
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing links", e))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// The link called `name`.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// Deletes the link called `name`, if it exists.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        if let Some(l) = self.link(name).await? {
            match self.handle.link().del(l.index).execute().await {
                Ok(()) => {}
                // Gone in the meantime (its namespace ended, taking the pair with it).
                Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV) => {}
                Err(e) => return Err(sys(&format!("deleting {name}"), e)),
            }
        }
        Ok(())
    }

    /// The IPv4 addresses on link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing addresses", e))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Makes sure bridge `name` exists, is up, has `addr/prefix`, MTU `mtu` and a fixed MAC
    /// derived from `addr`; returns its index. (A bridge without a MAC of its own takes its
    /// lowest port's, and changes it when ports come and go: endpoints would keep a stale
    /// gateway MAC and lose the gateway.)
    pub async fn ensure_bridge(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u32,
    ) -> Result<u32, NetError> {
        let mac = mac_for(addr);
        let link = match self.link(name).await? {
            Some(l) => l,
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).address(mac.to_vec()).build())
                    .execute()
                    .await
                    .map_err(|e| sys(&format!("creating bridge {name}"), e))?;
                self.link(name).await?.ok_or_else(|| {
                    NetError::System(format!("bridge {name} vanished right after creation"))
                })?
            }
        };
        if !self.addresses(link.index).await?.contains(&(addr, prefix)) {
            self.handle
                .address()
                .add(link.index, IpAddr::V4(addr), prefix)
                .execute()
                .await
                .map_err(|e| sys(&format!("adding {addr}/{prefix} to {name}"), e))?;
        }
        if !link.up || link.mtu != mtu || link.mac != mac {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.index)
                        .mtu(mtu)
                        .address(mac.to_vec())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| sys(&format!("bringing {name} up"), e))?;
        }
        Ok(link.index)
    }

    /// Adds `ip/prefix` to link `name` (a service's virtual address on its bridge).
    pub async fn ensure_address(
        &self,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let Some(l) = self.link(name).await? else {
            return Err(NetError::System(format!("link {name} is missing")));
        };
        if !self.addresses(l.index).await?.iter().any(|(a, _)| *a == ip) {
            self.handle
                .address()
                .add(l.index, IpAddr::V4(ip), prefix)
                .execute()
                .await
                .map_err(|e| sys(&format!("adding {ip}/{prefix} to {name}"), e))?;
        }
        Ok(())
    }

    /// Removes every address of link `name` that is not in `keep`.
    pub async fn prune_addresses(&self, name: &str, keep: &[Ipv4Addr]) -> Result<(), NetError> {
        let Some(l) = self.link(name).await? else { return Ok(()) };
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(l.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing addresses", e))?;
        for m in msgs {
            let stale = m.attributes.iter().any(
                |a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if !keep.contains(ip)),
            );
            if stale {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| sys(&format!("removing an address from {name}"), e))?;
            }
        }
        Ok(())
    }

    /// The host's IPv4 routes in the main table with a destination (not default routes), and
    /// the device each goes through.
    pub async fn routes(&self) -> Result<Vec<(Ipv4Net, String)>, NetError> {
        let links = self.links().await?;
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing routes", e))?;
        let mut out = Vec::new();
        for m in msgs {
            let len = m.header.destination_prefix_length;
            if len == 0 || m.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dst = None;
            let mut dev = String::new();
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Oif(i) => {
                        dev = links
                            .iter()
                            .find(|l| l.index == *i)
                            .map_or_else(|| format!("#{i}"), |l| l.name.clone());
                    }
                    _ => {}
                }
            }
            if let Some(net) = dst.and_then(|d| Ipv4Net::new(d, len).ok()) {
                out.push((net.trunc(), dev));
            }
        }
        Ok(out)
    }

    /// Creates veth `host` (a port of bridge `bridge`, up) with its peer `peer` moved into the
    /// namespace `ns`. On failure nothing is left behind.
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        bridge: u32,
        mtu: u32,
        ns: &File,
    ) -> Result<(), NetError> {
        use std::os::fd::AsRawFd;
        self.handle
            .link()
            .add(LinkVeth::new(host, peer).mtu(mtu).build())
            .execute()
            .await
            .map_err(|e| sys(&format!("creating veth {host}"), e))?;
        let done = async {
            let p = self
                .link(peer)
                .await?
                .ok_or_else(|| NetError::System(format!("veth peer {peer} is missing")))?;
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(p.index)
                        .mtu(mtu)
                        .setns_by_fd(ns.as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| sys(&format!("moving {peer} into the sandbox"), e))?;
            let h = self
                .link(host)
                .await?
                .ok_or_else(|| NetError::System(format!("veth {host} is missing")))?;
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(h.index).controller(bridge).up().build())
                .execute()
                .await
                .map_err(|e| sys(&format!("attaching {host} to its bridge"), e))
        }
        .await;
        if done.is_err() {
            let _ = self.delete_link(host).await;
        }
        done
    }

    /// Inside a sandbox: renames `peer` to a free `ethN`, gives it `mac`, `ip/prefix` and MTU,
    /// brings it and `lo` up, and adds a default route via `gateway` unless one exists.
    /// Returns the interface's name.
    pub async fn setup_sandbox_end(
        &self,
        peer: &str,
        mac: [u8; 6],
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        mtu: u32,
    ) -> Result<String, NetError> {
        let links = self.links().await?;
        let p = links
            .iter()
            .find(|l| l.name == peer)
            .ok_or_else(|| NetError::System(format!("{peer} did not arrive in the sandbox")))?;
        let ifname = (0..100)
            .map(|i| format!("eth{i}"))
            .find(|n| !links.iter().any(|l| &l.name == n))
            .unwrap_or_else(|| peer.to_owned());
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(p.index)
                    .name(ifname.clone())
                    .address(mac.to_vec())
                    .mtu(mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| sys("configuring the sandbox interface", e))?;
        self.handle
            .address()
            .add(p.index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| sys(&format!("adding {ip}/{prefix} in the sandbox"), e))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(p.index).up().build())
            .execute()
            .await
            .map_err(|e| sys("bringing the sandbox interface up", e))?;
        if let Some(lo) = links.iter().find(|l| l.name == "lo" && !l.up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(lo.index).up().build())
                .execute()
                .await
                .map_err(|e| sys("bringing lo up in the sandbox", e))?;
        }
        if !self.has_default_route().await? {
            self.handle
                .route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(gateway)
                        .output_interface(p.index)
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| sys("adding the sandbox's default route", e))?;
        }
        Ok(ifname)
    }

    async fn has_default_route(&self) -> Result<bool, NetError> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing routes", e))?;
        Ok(msgs.iter().any(|m| {
            m.header.destination_prefix_length == 0 && m.header.kind == RouteType::Unicast
        }))
    }
}

impl Kernel {
    /// Makes sure VXLAN device `name` exists with VNI `vni` from `local` on UDP `port`, without
    /// learning and answering ARP from its neighbour table (`proxy`), as a port of `bridge`
    /// that learns nothing, with MTU `mtu` and up. A device of that name with other settings is
    /// made again.
    #[allow(clippy::too_many_arguments)]
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        port: u16,
        mtu: u32,
        bridge: u32,
    ) -> Result<u32, NetError> {
        let link = match self.link(name).await? {
            Some(l) if l.vxlan == Some((vni, Some(local), port)) => l,
            stale => {
                if stale.is_some() {
                    tracing::info!("VXLAN device {name} has other settings; making it again");
                    self.delete_link(name).await?;
                }
                self.handle
                    .link()
                    .add(
                        LinkVxlan::new(name, vni)
                            .local(local)
                            .port(port)
                            .learning(false)
                            .proxy(true)
                            .mtu(mtu)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| sys(&format!("creating VXLAN device {name}"), e))?;
                self.link(name).await?.ok_or_else(|| {
                    NetError::System(format!("VXLAN device {name} vanished right after creation"))
                })?
            }
        };
        self.port_of(&link, bridge, mtu, true).await?;
        Ok(link.index)
    }

    /// Makes `link` a port of `bridge` that learns no addresses (and, unless `flood`, gets no
    /// flooded frames), with MTU `mtu`, up.
    pub async fn port_of(
        &self,
        link: &Link,
        bridge: u32,
        mtu: u32,
        flood: bool,
    ) -> Result<(), NetError> {
        let name = &link.name;
        if link.master != Some(bridge) || link.mtu != mtu || !link.up {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.index).controller(bridge).mtu(mtu).up().build(),
                )
                .execute()
                .await
                .map_err(|e| sys(&format!("attaching {name} to its bridge"), e))?;
        }
        let mut port = LinkBridgePort::new(link.index).learning(false);
        if !flood {
            port = port.flood(false).mcast_flood(false).bcast_flood(false);
        }
        self.handle
            .link()
            .set_port(port.build())
            .execute()
            .await
            .map_err(|e| sys(&format!("setting the bridge port flags of {name}"), e))
    }

    /// Every forwarding-database entry of the devices in `ifindexes`.
    pub async fn fdb(&self, ifindexes: &[u32]) -> Result<Vec<FdbEntry>, NetError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing forwarding entries", e))?;
        let mut out = Vec::new();
        for m in msgs {
            if !ifindexes.contains(&m.header.ifindex) {
                continue;
            }
            let mut mac = None;
            let mut dst = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(v) => mac = mac_of(v),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                    // In bridge-family messages the crate cannot tell the address's family.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(v)) => {
                        dst = <[u8; 4]>::try_from(v.as_slice()).ok().map(Ipv4Addr::from);
                    }
                    _ => {}
                }
            }
            let Some(mac) = mac else { continue };
            // Bridge entries carry the bridge (NDA_MASTER); the device's own carry NTF_SELF.
            let master =
                m.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Controller(_)))
                    && !m.header.flags.contains(NeighbourFlags::Own);
            out.push(FdbEntry {
                ifindex: m.header.ifindex,
                mac,
                dst,
                master,
                fixed: matches!(m.header.state, NeighbourState::Noarp | NeighbourState::Permanent),
                msg: m,
            });
        }
        Ok(out)
    }

    /// Sets the forwarding entry for `mac` on device `ifindex`: a bridge entry (`master`,
    /// static) sending frames for `mac` to that port, or the device's own entry (`self`,
    /// permanent) with the VXLAN remote `dst`.
    pub async fn fdb_set(
        &self,
        ifindex: u32,
        mac: [u8; 6],
        dst: Option<Ipv4Addr>,
        master: bool,
    ) -> Result<(), NetError> {
        let mut req = self
            .handle
            .neighbours()
            .add_bridge(ifindex, &mac)
            .flags(if master { NeighbourFlags::Controller } else { NeighbourFlags::Own })
            .state(if master { NeighbourState::Noarp } else { NeighbourState::Permanent })
            .replace();
        if let Some(d) = dst {
            req = req.destination(IpAddr::V4(d));
        }
        req.execute().await.map_err(|e| sys("setting a forwarding entry", e))
    }

    /// Removes a forwarding entry.
    pub async fn fdb_delete(&self, e: &FdbEntry) -> Result<(), NetError> {
        // A request of our own, not the dumped message: the kernel matches what it is given.
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = e.ifindex;
        m.header.state = e.msg.header.state;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
        if let Some(d) = e.dst {
            m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(d)));
        }
        let flags = if e.master { NeighbourFlags::Controller } else { NeighbourFlags::Own };
        m.header.flags = flags;
        match self.handle.neighbours().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(nix::errno::Errno::ENOENT) => {
                tracing::debug!(mac = %super::model::mac_text(e.mac), "forwarding entry already gone");
                Ok(())
            }
            Err(err) => Err(sys("removing a forwarding entry", err)),
        }
    }

    /// The IPv4 neighbour entries of device `ifindex`.
    pub async fn neighbours(&self, ifindex: u32) -> Result<Vec<NeighEntry>, NetError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| sys("listing neighbours", e))?;
        let mut out = Vec::new();
        for m in msgs.into_iter().filter(|m| m.header.ifindex == ifindex) {
            let mut mac = None;
            let mut ip = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(v) => mac = mac_of(v),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                    _ => {}
                }
            }
            if let (Some(mac), Some(ip)) = (mac, ip) {
                out.push(NeighEntry {
                    ifindex,
                    ip,
                    mac,
                    permanent: m.header.state == NeighbourState::Permanent,
                    msg: m,
                });
            }
        }
        Ok(out)
    }

    /// Sets a permanent neighbour entry `ip` → `mac` on device `ifindex`.
    pub async fn neighbour_set(
        &self,
        ifindex: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| sys(&format!("setting the neighbour entry of {ip}"), e))
    }

    /// Removes a neighbour entry.
    pub async fn neighbour_delete(&self, e: &NeighEntry) -> Result<(), NetError> {
        match self.handle.neighbours().del(e.msg.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(err) if errno(&err) == Some(nix::errno::Errno::ENOENT) => Ok(()),
            Err(err) => Err(sys("removing a neighbour entry", err)),
        }
    }
}

/// Turns IPv6 off on link `name` (the overlay's tap, which should send nothing of its own).
pub fn disable_ipv6(name: &str) {
    let p = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if std::path::Path::new(&p).exists() {
        let _ = std::fs::write(p, "1");
    }
}

/// The identity (inode) of a network namespace file.
pub fn netns_ino(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Opens a sandbox's namespace file, checking it is the namespace it was (`ino`, 0 = any).
pub fn open_netns(path: &str, ino: u64) -> Result<(File, u64), NetError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let cannot = |e: std::io::Error| {
        NetError::NotFound(format!("the sandbox's network namespace {path} cannot be opened: {e}"))
    };
    // Never open devices, FIFOs or sockets (opening one may block or have effects), and never
    // block on open.
    let kind = std::fs::metadata(path).map_err(cannot)?.file_type();
    if kind.is_fifo() || kind.is_char_device() || kind.is_block_device() || kind.is_socket() {
        return Err(NetError::BadInput(format!("{path} is not a network namespace file")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(cannot)?;
    let got = f.metadata().map_err(|e| NetError::System(format!("{path}: {e}")))?.ino();
    // A network namespace file lives on nsfs; anything else (a plain file) is refused.
    let own = netns_ino("/proc/self/ns/net").unwrap_or(0);
    if ino != 0 && got != ino {
        return Err(NetError::NotFound(format!("{path} is no longer the sandbox's namespace")));
    }
    if got == own {
        return Err(NetError::BadInput(format!(
            "{path} is the agent's own network namespace; give a sandbox's"
        )));
    }
    let fs = nix::sys::statfs::fstatfs(&f).map_err(|e| NetError::System(format!("{path}: {e}")))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(NetError::BadInput(format!("{path} is not a network namespace file")));
    }
    Ok((f, got))
}

/// Turns on IPv4 forwarding in the agent's namespace (routing for its bridges).
pub fn enable_forwarding() -> Result<(), NetError> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p).map(|s| s.trim() == "1").unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(p, "1")
        .map_err(|e| NetError::Unavailable(format!("cannot turn on IPv4 forwarding ({p}): {e}")))
}

//! Address management: subnets from the pool, addresses from a subnet.
//!
//! Pure functions over what the store holds and what the host routes; the manager claims the
//! result in the store (a primary key per address), so a race or a restart can never hand an
//! address out twice. Addresses go round-robin after the last one handed out, as CNI's
//! host-local does, so a freed address is not reused at once (stale DNS caches, old
//! connections).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::model::NetError;

/// Whether two subnets share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where a candidate subnet clashes: a network of ours or a route of the host's.
#[derive(Debug)]
pub struct Taken<'a> {
    /// Subnets of existing networks, with their names.
    pub networks: &'a [(String, Ipv4Net)],
    /// Destinations routed on the host (default routes excluded), with their device.
    pub routes: &'a [(Ipv4Net, String)],
}

impl Taken<'_> {
    fn clash(&self, s: &Ipv4Net) -> Option<String> {
        if let Some((name, n)) = self.networks.iter().find(|(_, n)| overlaps(n, s)) {
            return Some(format!("it overlaps network {name} ({n})"));
        }
        if let Some((r, dev)) = self.routes.iter().find(|(r, _)| overlaps(r, s)) {
            return Some(format!("it overlaps the host's route to {r} on {dev}"));
        }
        None
    }
}

/// The first `/24` of `pool` that clashes with nothing.
pub fn choose_subnet(pool: Ipv4Net, taken: &Taken<'_>) -> Result<Ipv4Net, NetError> {
    let size = pool.prefix_len().max(24);
    let subnets =
        pool.subnets(size).map_err(|e| NetError::BadInput(format!("address pool {pool}: {e}")))?;
    for s in subnets {
        if taken.clash(&s).is_none() {
            return Ok(s);
        }
    }
    Err(NetError::Conflict(format!(
        "the address pool {pool} is exhausted: every /{size} in it is used by a network or a \
         route of the host; remove a network, give --subnet, or start the agent with a bigger \
         --net-pool"
    )))
}

/// Checks an explicit subnet: big enough and clashing with nothing.
pub fn check_subnet(subnet: Ipv4Net, taken: &Taken<'_>) -> Result<(), NetError> {
    if subnet != subnet.trunc() {
        return Err(NetError::BadInput(format!(
            "subnet {subnet} has host bits set; did you mean {}?",
            subnet.trunc()
        )));
    }
    if subnet.prefix_len() > 30 {
        return Err(NetError::BadInput(format!(
            "subnet {subnet} is too small: a network needs at least a /30 (a gateway and one \
             endpoint)"
        )));
    }
    if let Some(why) = taken.clash(&subnet) {
        return Err(NetError::Conflict(format!("subnet {subnet} cannot be used: {why}")));
    }
    Ok(())
}

/// Whether `ip` may be given to an endpoint at all: inside the subnet (and range), neither
/// the network nor the broadcast address, not the gateway.
pub fn check_usable(
    subnet: Ipv4Net,
    range: Option<Ipv4Net>,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
) -> Result<(), NetError> {
    if !subnet.contains(&ip) {
        return Err(NetError::BadInput(format!("address {ip} is outside the subnet {subnet}")));
    }
    if let Some(r) = range.filter(|r| !r.contains(&ip)) {
        return Err(NetError::BadInput(format!("address {ip} is outside the address range {r}")));
    }
    if ip == subnet.network() || ip == subnet.broadcast() {
        return Err(NetError::BadInput(format!(
            "address {ip} is the network's {} address",
            if ip == subnet.network() { "network" } else { "broadcast" }
        )));
    }
    if ip == gateway {
        return Err(NetError::Conflict(format!("address {ip} is the gateway's")));
    }
    Ok(())
}

/// The next free address after `cursor`, wrapping around once.
pub fn next_address(
    subnet: Ipv4Net,
    range: Option<Ipv4Net>,
    gateway: Ipv4Addr,
    held: &HashSet<Ipv4Addr>,
    cursor: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, NetError> {
    let area = range.unwrap_or(subnet);
    let lo = u32::from(area.network()).max(u32::from(subnet.network()) + 1);
    let hi = u32::from(area.broadcast()).min(u32::from(subnet.broadcast()) - 1);
    if lo > hi {
        return Err(NetError::Conflict(format!("subnet {subnet} has no address to hand out")));
    }
    let span = u64::from(hi - lo) + 1;
    let start = cursor
        .map(u32::from)
        .filter(|c| (lo..=hi).contains(c))
        .map_or(0, |c| u64::from(c - lo) + 1);
    for i in 0..span {
        let ip = Ipv4Addr::from(lo + ((start + i) % span) as u32);
        if ip != gateway && !held.contains(&ip) {
            return Ok(ip);
        }
    }
    Err(NetError::Conflict(format!(
        "no free address left in {area}: all {} are taken; detach an endpoint or use another \
         network",
        span.saturating_sub(u64::from(area.contains(&gateway)))
    )))
}

/// How many addresses endpoints and services can get in a subnet (range).
pub fn capacity(subnet: Ipv4Net, range: Option<Ipv4Net>, gateway: Ipv4Addr) -> u64 {
    let area = range.unwrap_or(subnet);
    let lo = u32::from(area.network()).max(u32::from(subnet.network()) + 1);
    let hi = u32::from(area.broadcast()).min(u32::from(subnet.broadcast()) - 1);
    if lo > hi {
        return 0;
    }
    u64::from(hi - lo) + 1 - u64::from((lo..=hi).contains(&u32::from(gateway)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    #[test]
    fn chooses_a_free_24_avoiding_networks_and_routes() {
        let nets = vec![("a".to_owned(), net("10.213.0.0/24"))];
        let routes = vec![(net("10.213.1.0/25"), "eth9".to_owned())];
        let taken = Taken { networks: &nets, routes: &routes };
        assert_eq!(
            choose_subnet(net("10.213.0.0/16"), &taken).expect("free"),
            net("10.213.2.0/24")
        );
        let full = Taken { networks: &[], routes: &[(net("10.0.0.0/8"), "x".into())] };
        let e = choose_subnet(net("10.213.0.0/16"), &full).expect_err("exhausted").to_string();
        assert!(e.contains("exhausted"), "{e}");
    }

    #[test]
    fn explicit_subnets_are_checked() {
        let nets = vec![("web".to_owned(), net("10.213.5.0/24"))];
        let taken = Taken { networks: &nets, routes: &[] };
        let e = check_subnet(net("10.213.5.128/25"), &taken).expect_err("overlap").to_string();
        assert!(e.contains("overlaps network web"), "{e}");
        assert!(check_subnet(net("10.213.6.0/24"), &taken).is_ok());
        assert!(check_subnet(net("10.213.6.1/24"), &taken).is_err());
        assert!(check_subnet(net("10.213.6.0/31"), &taken).is_err());
    }

    #[test]
    fn never_hands_out_network_broadcast_or_gateway() {
        let s = net("10.1.2.0/29");
        let gw = Ipv4Addr::new(10, 1, 2, 1);
        let mut held = HashSet::new();
        let mut cursor = None;
        for _ in 0..5 {
            let ip = next_address(s, None, gw, &held, cursor).expect("free");
            assert!(ip != s.network() && ip != s.broadcast() && ip != gw, "{ip}");
            assert!(held.insert(ip), "twice: {ip}");
            cursor = Some(ip);
        }
        let e = next_address(s, None, gw, &held, cursor).expect_err("full").to_string();
        assert!(e.contains("no free address"), "{e}");
        assert_eq!(capacity(s, None, gw), 5);
    }

    #[test]
    fn round_robin_does_not_reuse_at_once_and_honours_the_range() {
        let s = net("10.1.2.0/24");
        let gw = Ipv4Addr::new(10, 1, 2, 1);
        let held = HashSet::new();
        let a = next_address(s, None, gw, &held, Some(Ipv4Addr::new(10, 1, 2, 7))).expect("a");
        assert_eq!(a, Ipv4Addr::new(10, 1, 2, 8));
        let r = Some(net("10.1.2.128/30"));
        let b = next_address(s, r, gw, &held, Some(Ipv4Addr::new(10, 1, 2, 131))).expect("b");
        assert_eq!(b, Ipv4Addr::new(10, 1, 2, 128));
        assert!(check_usable(s, r, gw, Ipv4Addr::new(10, 1, 2, 5)).is_err());
        assert!(check_usable(s, None, gw, Ipv4Addr::new(10, 1, 3, 5)).is_err());
        assert!(check_usable(s, None, gw, gw).is_err());
    }

    #[test]
    fn many_allocations_never_duplicate() {
        let s = net("10.9.0.0/22");
        let gw = Ipv4Addr::new(10, 9, 0, 1);
        let mut held = HashSet::new();
        let mut cursor = None;
        let mut order = Vec::new();
        // Allocate and free in a pattern for 10k rounds; the held set must stay duplicate-free.
        for round in 0..10_000u32 {
            if round % 3 == 2 && !order.is_empty() {
                let ip = order.remove((round as usize * 7) % order.len());
                held.remove(&ip);
                continue;
            }
            match next_address(s, None, gw, &held, cursor) {
                Ok(ip) => {
                    assert!(held.insert(ip), "duplicate {ip}");
                    order.push(ip);
                    cursor = Some(ip);
                }
                Err(_) => assert_eq!(held.len() as u64, capacity(s, None, gw)),
            }
        }
    }
}

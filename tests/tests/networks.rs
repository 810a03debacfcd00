//! Local container networks managed by the agent (`warren net ...`, `/api/networks`): bridge
//! networks, IPAM, nftables NAT (masquerade, DNAT/PAT, hairpin), service-discovery DNS, the
//! reconcile on restart and the cleanup.
//!
//! Every test runs as root inside namespaces it creates (see `warren_tests::netns`): a "host"
//! namespace H where `warren agent --api 127.0.0.1:4040` runs, an "ext" namespace E behind H's
//! uplink (`up0` 198.51.100.1 <-> E 198.51.100.2), and one namespace per endpoint. Without root
//! or without `ip`/`nft` each test prints `skipped: ...` and passes (set
//! `WARREN_TEST_NETNS_REQUIRED=1` to make that a failure).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use warren_tests::netns::{
    CliOut, HostNs, HostOpts, Netns, NsDaemon, UPLINK_E, UPLINK_H, UPSTREAM_TEST_ADDR, Whoami,
    api_call, api_error_message, dns_upstream, require, retry, tcp_ask, tcp_whoami, tcp_whoami_ask,
    udp_whoami, udp_whoami_ask,
};
use warren_tests::process::binary;
use warren_tests::which;

/// How long a path that should work may take to start working (a new veth, new rules).
const REACH: Duration = Duration::from_secs(10);

/// One attempt's timeout; also how long a blocked path is given before it counts as blocked.
const ATTEMPT: Duration = Duration::from_secs(2);

fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn any(port: u16) -> SocketAddr {
    sa(Ipv4Addr::UNSPECIFIED, port)
}

/// A JSON string field parsed as an IPv4 address.
fn ip_of(v: &Value, what: &str) -> Ipv4Addr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: not an IPv4 address: {v}"))
}

fn net_of(v: &Value, what: &str) -> Ipv4Net {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: not an IPv4 CIDR: {v}"))
}

/// A TCP exchange from `from` to `to` that must work (retried for [`REACH`]).
fn reach(from: &Netns, to: SocketAddr) -> Whoami {
    retry(REACH, &format!("tcp {} -> {to}", from.name()), || tcp_whoami_ask(from, to, ATTEMPT))
}

/// A UDP exchange that must work (each attempt from a fresh socket).
fn reach_udp(from: &Netns, to: SocketAddr) -> Whoami {
    retry(REACH, &format!("udp {} -> {to}", from.name()), || udp_whoami_ask(from, to, ATTEMPT))
}

/// A TCP exchange that must fail (refused or timed out).
fn blocked(from: &Netns, to: SocketAddr, why: &str) {
    let r = tcp_ask(from, to, ATTEMPT);
    assert!(r.is_err(), "{why}: tcp {} -> {to} should fail but answered {r:?}", from.name());
}

/// The endpoint objects of a network, by name.
fn endpoints(net: &Value) -> Vec<Value> {
    net["endpoints"].as_array().cloned().unwrap_or_default()
}

fn endpoint_names(net: &Value) -> BTreeSet<String> {
    endpoints(net).iter().filter_map(|e| e["name"].as_str().map(str::to_owned)).collect()
}

fn is_hex8(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn assert_mac(mac: &Value) {
    let s = mac.as_str().unwrap_or_else(|| panic!("mac is not a string: {mac}"));
    let parts: Vec<&str> = s.split(':').collect();
    assert!(
        parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()),
        "not a MAC address: {s:?}"
    );
}

/// The one link of `ip -j link/addr show dev DEV` in `ns`.
fn link_json(ns: &Netns, args: &[&str]) -> Value {
    let v = ns.ip_json(args);
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_else(|| panic!("ip -n {} -j {}: nothing: {v}", ns.name(), args.join(" ")))
}

// ---------- DNS helpers (dig inside a namespace) ----------

/// `dig +time=2 +tries=2 @server ARGS` inside `ns`; Err when dig gets no answer. Give names
/// as `-q NAME`: a bare `a` or `ns` would be taken for a record type.
fn try_dig(ns: &Netns, server: Ipv4Addr, args: &[&str]) -> anyhow::Result<String> {
    let at = format!("@{server}");
    let mut all = vec!["+time=2", "+tries=2", at.as_str()];
    all.extend_from_slice(args);
    let out = ns.exec("dig", &all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "dig {} in {}: {} {text}{}",
        all.join(" "),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// A one-line `+short` answer.
fn one(line: &str) -> Vec<String> {
    vec![line.to_owned()]
}

/// The `+short` answer lines.
fn dig_short(ns: &Netns, server: Ipv4Addr, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    let text = try_dig(ns, server, &all).unwrap_or_else(|e| panic!("{e:#}"));
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// The `status:` of the full answer (NOERROR, NXDOMAIN...).
fn dig_status(ns: &Netns, server: Ipv4Addr, args: &[&str]) -> String {
    let text = try_dig(ns, server, args).unwrap_or_else(|e| panic!("{e:#}"));
    text.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no status in dig output:\n{text}"))
}

/// Waits until the DNS of a network answers `name` with `want` (its listener may need a moment
/// after the network is created).
fn dns_ready(ns: &Netns, server: Ipv4Addr, name: &str, want: &[String]) {
    retry(REACH, &format!("DNS {server} answering {name}"), || {
        let text = try_dig(ns, server, &["+short", "-q", name])?;
        let got: Vec<String> = text.lines().map(|l| l.trim().to_owned()).collect();
        anyhow::ensure!(got == want, "got {got:?}, want {want:?}");
        Ok(())
    });
}

/// `net.bridge.bridge-nf-call-iptables` (per namespace, present when br_netfilter is loaded).
const BR_NF_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Sets `bridge-nf-call-iptables` in `ns` (written from a thread inside it); false when the
/// kernel has no br_netfilter. With 1, a hairpin reply bridged between two ports is un-DNATed by
/// conntrack on the bridge; with 0 only a hairpin masquerade makes such a connection work.
fn set_bridge_nf(ns: &Netns, on: bool) -> bool {
    ns.run(|| {
        if !Path::new(BR_NF_IPTABLES).exists() {
            return Ok(false);
        }
        std::fs::write(BR_NF_IPTABLES, if on { "1" } else { "0" })?;
        Ok(true)
    })
    .unwrap_or_else(|e| panic!("set {BR_NF_IPTABLES} in {}: {e:#}", ns.name()))
}

// ---------- nftables helpers ----------

/// `nft -j list table ip NAME` parsed; `None` when there is no such table.
fn nft_table(host: &HostNs, name: &str) -> Option<Value> {
    let out = host.nft(&["-j", "list", "table", "ip", name]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No such file") || err.contains("does not exist"),
            "nft list table ip {name} failed for another reason: {err}"
        );
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("nft -j prints JSON"))
}

/// The ruleset without what legitimately changes when the same rules are applied again:
/// handles, counter values and the metainfo object.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            if m.contains_key("packets") && m.contains_key("bytes") {
                return json!({"packets": 0, "bytes": 0});
            }
            Value::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "handle")
                    .map(|(k, v)| (k.clone(), normalized(v)))
                    .collect(),
            )
        }
        Value::Array(a) => {
            Value::Array(a.iter().filter(|x| x.get("metainfo").is_none()).map(normalized).collect())
        }
        other => other.clone(),
    }
}

/// Number of rule objects in an `nft -j` listing.
fn rule_count(v: &Value) -> usize {
    v["nftables"].as_array().into_iter().flatten().filter(|o| o.get("rule").is_some()).count()
}

// =====================================================================================
// 0. the harness itself
// =====================================================================================

/// The harness works without the agent: H and E are wired, the whoami servers and the test
/// upstream resolver answer from inside their namespaces, and everything is deleted on drop.
#[test]
fn harness_self_check() {
    let Some(host) = HostNs::prepare(HostOpts::default()) else { return };
    let names = [host.h.name().to_owned(), host.e.name().to_owned()];
    let tcp = tcp_whoami(&host.e, sa(UPLINK_E, 9000));
    let udp = udp_whoami(&host.e, sa(UPLINK_E, 9001));
    let w = reach(&host.h, tcp.addr());
    assert_eq!((w.peer.ip(), w.local), (UPLINK_H.into(), tcp.addr()));
    let w = reach_udp(&host.h, udp.addr());
    assert_eq!((w.peer.ip(), w.local), (UPLINK_H.into(), udp.addr()));
    assert_eq!((tcp.hits(), udp.hits()), (1, 1));
    // Nothing listens in H: refused at once.
    blocked(&host.e, sa(UPLINK_H, 9000), "nothing listens there");
    if which("dig").is_some() {
        let upstream = dns_upstream(&host.e, sa(UPLINK_E, 53));
        let up = UPSTREAM_TEST_ADDR.to_string();
        assert_eq!(dig_short(&host.h, UPLINK_E, &["-q", "upstream-test.example"]), one(&up));
        assert_eq!(dig_short(&host.h, UPLINK_E, &["+tcp", "-q", "UPSTREAM-test.example."]), [up]);
        assert_eq!(dig_status(&host.h, UPLINK_E, &["-q", "other.example"]), "NXDOMAIN");
        assert_eq!(
            upstream.names(),
            ["upstream-test.example.", "upstream-test.example.", "other.example."]
        );
    }
    drop((tcp, udp));
    drop(host);
    for n in names {
        assert!(!Path::new("/run/netns").join(&n).exists(), "{n} left behind");
    }
}

// =====================================================================================
// 1. create + attach + reach
// =====================================================================================

/// A network with two attached namespaces: the CLI's lines, `inspect`, the kernel objects
/// (bridge with the gateway, veth with address/MAC/MTU/default route) and TCP to the gateway
/// and between endpoints; detach removes the endpoint.
#[test]
fn create_attach_and_reach() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    let out = host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24", "--mtu", "1400"]);
    let net = host.inspect("web");
    let bridge = net["bridge"].as_str().expect("bridge").to_owned();
    assert!(
        bridge.strip_prefix("wrb-").is_some_and(is_hex8),
        "bridge name {bridge:?} is not wrb-<8 hex>"
    );
    assert_eq!(
        out.trim(),
        format!("created network web: subnet 10.213.5.0/24, gateway 10.213.5.1, bridge {bridge}")
    );
    assert_eq!(net["name"], "web", "{net:#}");
    assert_eq!(net["driver"], "bridge", "{net:#}");
    assert_eq!(net["subnet"], "10.213.5.0/24", "{net:#}");
    assert_eq!(net["gateway"], "10.213.5.1", "{net:#}");
    assert_eq!(net["mtu"], 1400, "{net:#}");
    assert_eq!(net["dns"], "10.213.5.1:53", "{net:#}");
    assert_eq!(endpoints(&net).len(), 0, "{net:#}");
    assert!(
        host.h.ipv4_addrs(&bridge).contains(&(v4(10, 213, 5, 1), 24)),
        "the bridge {bridge} in H should carry 10.213.5.1/24: {:?}",
        host.h.ipv4_addrs(&bridge)
    );

    let a_ns = Netns::new("a");
    let b_ns = Netns::new("b");
    let a = host.attach("web", &a_ns, "a", &["--alias", "alpha"]);
    let b = host.attach("web", &b_ns, "b", &["--ip", "10.213.5.20"]);
    let subnet: Ipv4Net = "10.213.5.0/24".parse().expect("cidr");
    assert_eq!(b, v4(10, 213, 5, 20), "--ip must be honoured");
    assert!(subnet.contains(&a), "{a} is outside {subnet}");
    for reserved in [v4(10, 213, 5, 0), v4(10, 213, 5, 1), v4(10, 213, 5, 255), b] {
        assert_ne!(a, reserved, "a got a reserved or taken address");
    }

    let net = host.inspect("web");
    assert_eq!(endpoint_names(&net), BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    // The bridge has a MAC of its own (from the gateway address): a bridge that borrows its
    // lowest port's would change it as endpoints come and go, and stale gateway entries in
    // the endpoints' neighbour tables would cut them off.
    let bridge = net["bridge"].as_str().expect("bridge").to_owned();
    let link = host.h.ip_ok(&["-j", "link", "show", &bridge]);
    assert!(link.contains("\"address\":\"02:42:0a:d5:05:01\""), "bridge MAC: {link}");
    for (name, ns, ip) in [("a", &a_ns, a), ("b", &b_ns, b)] {
        let ep = host.endpoint("web", name);
        assert_eq!(ip_of(&ep["ip"], "ip"), ip, "{ep:#}");
        assert_eq!(ep["prefix"], 24, "{ep:#}");
        assert_eq!(ep["netns"], ns.path_str(), "{ep:#}");
        assert_eq!(ep["sandbox"], "netns", "{ep:#}");
        assert_eq!(ep["ifname"], "eth0", "{ep:#}");
        assert_eq!(ep["healthy"], true, "{ep:#}");
        assert_mac(&ep["mac"]);
        let hv = ep["host_veth"].as_str().expect("host_veth").to_owned();
        assert!(hv.strip_prefix("wrv-").is_some_and(is_hex8), "host veth {hv:?} not wrv-<8 hex>");
        let hl = link_json(&host.h, &["link", "show", "dev", &hv]);
        assert_eq!(hl["master"], bridge.as_str(), "{hv} must be a port of {bridge}: {hl}");
        assert_eq!(hl["mtu"], 1400, "host veth MTU: {hl}");
        // Inside the sandbox: address, MAC, MTU, default route via the gateway.
        let l = link_json(ns, &["addr", "show", "dev", "eth0"]);
        assert_eq!(l["mtu"], 1400, "MTU of eth0 in {}: {l}", ns.name());
        assert_eq!(l["address"], ep["mac"], "MAC of eth0 in {}: {l}", ns.name());
        assert!(
            ns.ipv4_addrs("eth0").contains(&(ip, 24)),
            "eth0 in {} should carry {ip}/24: {l}",
            ns.name()
        );
        let route = link_json(ns, &["route", "show", "default"]);
        assert_eq!(route["gateway"], "10.213.5.1", "default route in {}: {route}", ns.name());
    }
    assert_eq!(host.endpoint("web", "a")["aliases"], json!(["alpha"]));
    assert_eq!(host.endpoint("web", "b")["aliases"], json!([]));

    // `ls`: NAME SUBNET GATEWAY BRIDGE ENDPOINTS DRIVER.
    let ls = host.net_ok(&["ls"]);
    let row: Vec<&str> = ls
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"web"))
        .unwrap_or_else(|| panic!("no row for web in `net ls`:\n{ls}"));
    // ENDPOINTS: the contract does not say whether a count or the names; accept either.
    assert_eq!(row[..4], ["web", "10.213.5.0/24", "10.213.5.1", bridge.as_str()], "{ls}");
    let listed: BTreeSet<&str> = row.get(4).map(|c| c.split(',').collect()).unwrap_or_default();
    assert!(
        row.len() == 6 && (row[4] == "2" || listed == BTreeSet::from(["a", "b"])),
        "ENDPOINTS of web in `net ls` should be 2 (or a,b):\n{ls}"
    );
    assert_eq!(row[5], "bridge", "DRIVER of web in `net ls`:\n{ls}");
    let (status, api) = host.api("GET", "/api/networks/web", None);
    assert_eq!(status, 200, "{api}");
    assert_eq!(api["subnet"], "10.213.5.0/24");
    assert_eq!(endpoint_names(&api), endpoint_names(&net));

    // Traffic: to the gateway (a server in H), A <-> B.
    let gw = tcp_whoami(&host.h, sa(v4(10, 213, 5, 1), 7000));
    let w = reach(&a_ns, gw.addr());
    assert_eq!((w.peer.ip(), w.local), (a.into(), gw.addr()), "A -> gateway");
    let in_b = tcp_whoami(&b_ns, any(7001));
    let w = reach(&a_ns, sa(b, 7001));
    assert_eq!((w.peer.ip(), w.local), (a.into(), sa(b, 7001)), "A -> B");
    let in_a = tcp_whoami(&a_ns, any(7001));
    let w = reach(&b_ns, sa(a, 7001));
    assert_eq!((w.peer.ip(), w.local), (b.into(), sa(a, 7001)), "B -> A");

    // Detach: the endpoint, its veth and B's eth0 are gone; B is unreachable.
    let hv_b = host.endpoint("web", "b")["host_veth"].as_str().expect("host_veth").to_owned();
    host.net_ok(&["detach", "web", "b"]);
    assert_eq!(endpoint_names(&host.inspect("web")), BTreeSet::from(["a".to_owned()]));
    assert_eq!(b_ns.links(), BTreeSet::from(["lo".to_owned()]), "B after detach");
    assert!(!host.h.links().contains(&hv_b), "{hv_b} still in H after detach");
    blocked(&a_ns, sa(b, 7001), "b was detached");
    drop((gw, in_a, in_b));
}

// =====================================================================================
// 2. isolation
// =====================================================================================

/// Endpoints of one network reach each other; they cannot reach endpoints of another network
/// (in either direction). Also: a network without --subnet gets a free /24 from the pool.
#[test]
fn networks_are_isolated() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "n2", "--subnet", "10.213.6.0/24"]);
    host.net_ok(&["create", "n1"]);
    let n1 = host.inspect("n1");
    let s1 = net_of(&n1["subnet"], "n1 subnet");
    let pool: Ipv4Net = "10.213.0.0/16".parse().expect("cidr");
    let s2: Ipv4Net = "10.213.6.0/24".parse().expect("cidr");
    assert_eq!(s1.prefix_len(), 24, "default IPAM hands out /24s: {n1:#}");
    assert!(pool.contains(&s1), "{s1} is outside the default pool {pool}");
    assert!(!s1.contains(&s2.network()) && !s2.contains(&s1.network()), "{s1} overlaps {s2}");
    let gw1 = ip_of(&n1["gateway"], "n1 gateway");
    assert_eq!(gw1, s1.hosts().next().expect("host"), "the gateway is the first usable address");

    let (a_ns, b_ns, c_ns, d_ns) =
        (Netns::new("a"), Netns::new("b"), Netns::new("c"), Netns::new("d"));
    let a = host.attach("n1", &a_ns, "a", &[]);
    let b = host.attach("n1", &b_ns, "b", &[]);
    let c = host.attach("n2", &c_ns, "c", &[]);
    let d = host.attach("n2", &d_ns, "d", &[]);
    assert!(s1.contains(&a) && s1.contains(&b), "{a} {b} not in {s1}");
    assert!(s2.contains(&c) && s2.contains(&d), "{c} {d} not in {s2}");
    let servers: Vec<_> =
        [&a_ns, &b_ns, &c_ns, &d_ns].iter().map(|ns| tcp_whoami(ns, any(7000))).collect();

    // Same network: works (this also proves every namespace is wired).
    assert_eq!(reach(&a_ns, sa(b, 7000)).peer.ip(), a);
    assert_eq!(reach(&b_ns, sa(a, 7000)).peer.ip(), b);
    assert_eq!(reach(&c_ns, sa(d, 7000)).peer.ip(), c);
    assert_eq!(reach(&d_ns, sa(c, 7000)).peer.ip(), d);
    // Across networks: blocked both ways.
    blocked(&a_ns, sa(c, 7000), "n1 -> n2");
    blocked(&b_ns, sa(d, 7000), "n1 -> n2");
    blocked(&c_ns, sa(a, 7000), "n2 -> n1");
    blocked(&d_ns, sa(b, 7000), "n2 -> n1");
    drop(servers);
}

// =====================================================================================
// 3. masquerade
// =====================================================================================

/// An endpoint reaching "the internet" (E) is seen with the uplink's address, TCP and UDP.
#[test]
fn egress_is_masqueraded() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let a_ns = Netns::new("a");
    let a = host.attach("web", &a_ns, "a", &[]);
    let tcp = tcp_whoami(&host.e, sa(UPLINK_E, 9000));
    let udp = udp_whoami(&host.e, sa(UPLINK_E, 9001));

    let w = reach(&a_ns, tcp.addr());
    assert_eq!(w.peer.ip(), UPLINK_H, "TCP from {a} should leave as {UPLINK_H}: {w:?}");
    assert_eq!(w.local, tcp.addr());
    let w = reach_udp(&a_ns, udp.addr());
    assert_eq!(w.peer.ip(), UPLINK_H, "UDP from {a} should leave as {UPLINK_H}: {w:?}");
    assert_eq!(w.local, udp.addr());
}

// =====================================================================================
// 4. DNAT / PAT / hairpin
// =====================================================================================

/// Published ports: TCP and UDP DNAT from outside with the client's address kept, PAT (one host
/// address, several ports, different endpoints), the same number for TCP and UDP, a conflict
/// refused, hairpin and host-local access, unpublish.
#[test]
fn published_ports_dnat_and_pat() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let (a_ns, b_ns) = (Netns::new("a"), Netns::new("b"));
    let a = host.attach("web", &a_ns, "a", &[]);
    let b = host.attach("web", &b_ns, "b", &[]);
    let _tcp_a = tcp_whoami(&a_ns, any(80));
    let _tcp_b = tcp_whoami(&b_ns, any(80));
    let _udp_a = udp_whoami(&a_ns, sa(a, 53));
    let _udp_b = udp_whoami(&b_ns, sa(b, 53));

    host.net_ok(&["publish", "web", "a", "8080:80"]);
    host.net_ok(&["publish", "web", "b", "8081:80"]);
    host.net_ok(&["publish", "web", "a", "5353:53", "--proto", "udp"]);
    // The same number for another protocol is another port.
    host.net_ok(&["publish", "web", "b", "8080:53", "--proto", "udp"]);

    let ports = host.inspect("web")["ports"].as_array().cloned().unwrap_or_default();
    let mut seen: Vec<(String, String, u64, u64)> = ports
        .iter()
        .map(|p| {
            (
                p["endpoint"].as_str().unwrap_or("?").to_owned(),
                p["proto"].as_str().unwrap_or("?").to_owned(),
                p["host_port"].as_u64().unwrap_or(0),
                p["port"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a".into(), "tcp".into(), 8080, 80),
            ("a".into(), "udp".into(), 5353, 53),
            ("b".into(), "tcp".into(), 8081, 80),
            ("b".into(), "udp".into(), 8080, 53),
        ],
        "ports in inspect: {ports:#?}"
    );

    // From outside: each port lands at its endpoint, the client's address is kept.
    let w = reach(&host.e, sa(UPLINK_H, 8080));
    assert_eq!((w.local, w.peer.ip()), (sa(a, 80), UPLINK_E.into()), "tcp 8080");
    let w = reach(&host.e, sa(UPLINK_H, 8081));
    assert_eq!((w.local, w.peer.ip()), (sa(b, 80), UPLINK_E.into()), "tcp 8081");
    let w = reach_udp(&host.e, sa(UPLINK_H, 5353));
    assert_eq!((w.local, w.peer.ip()), (sa(a, 53), UPLINK_E.into()), "udp 5353");
    let w = reach_udp(&host.e, sa(UPLINK_H, 8080));
    assert_eq!((w.local, w.peer.ip()), (sa(b, 53), UPLINK_E.into()), "udp 8080");

    // A second publish of a taken port is refused and changes nothing.
    host.net(&["publish", "web", "b", "8080:80"]).fail_mentioning(&["8080"]);
    let (status, body) = host.api(
        "POST",
        "/api/networks/web/ports",
        Some(&json!({"endpoint": "b", "host_port": 8080, "port": 80, "proto": "tcp"})),
    );
    assert_eq!(status, 409, "duplicate port: {body}");
    assert!(api_error_message(&body).contains("8080"), "{body}");
    assert_eq!(reach(&host.e, sa(UPLINK_H, 8080)).local, sa(a, 80), "8080 must still go to a");

    // Hairpin: an endpoint reaches a published port of its own network, whether or not
    // br_netfilter sees bridged traffic.
    let w = reach(&b_ns, sa(UPLINK_H, 8080));
    assert_eq!(w.local, sa(a, 80), "hairpin B -> 198.51.100.1:8080");
    if set_bridge_nf(&host.h, false) {
        let w = reach(&b_ns, sa(UPLINK_H, 8080));
        assert_eq!(w.local, sa(a, 80), "hairpin B -> 198.51.100.1:8080, bridge-nf-call-iptables=0");
        set_bridge_nf(&host.h, true);
    }
    // The host itself (output hook).
    let w = reach(&host.h, sa(UPLINK_H, 8080));
    assert_eq!(w.local, sa(a, 80), "H -> 198.51.100.1:8080");

    // Unpublish: tcp 8080 is gone, udp 8080 and tcp 8081 stay.
    host.net_ok(&["unpublish", "web", "8080"]);
    blocked(&host.e, sa(UPLINK_H, 8080), "tcp 8080 was unpublished");
    assert_eq!(reach(&host.e, sa(UPLINK_H, 8081)).local, sa(b, 80));
    assert_eq!(reach_udp(&host.e, sa(UPLINK_H, 8080)).local, sa(b, 53));
    host.net_ok(&["unpublish", "web", "8080", "--proto", "udp"]);
    let r = udp_whoami_ask(&host.e, sa(UPLINK_H, 8080), ATTEMPT);
    assert!(r.is_err(), "udp 8080 was unpublished but answered {r:?}");
    host.net(&["unpublish", "web", "8080"]).fail_mentioning(&["8080"]);
    assert_eq!(host.inspect("web")["ports"].as_array().map(Vec::len), Some(2));
}

// =====================================================================================
// 5. DNS
// =====================================================================================

/// Names, aliases, NAME.NETWORK, case, TCP, PTR, TTL, scoping per network (no leakage to the
/// upstream either) and forwarding of other names to the upstream resolver.
#[test]
fn dns_names_scoping_and_upstream() {
    let opts = HostOpts {
        dns_upstream: vec![format!("{UPLINK_E}:53")],
        extra_args: vec!["--dns-ttl".into(), "7".into()],
    };
    let Some(mut host) = HostNs::prepare(opts) else { return };
    if !require(&["dig"]) {
        return;
    }
    let upstream = dns_upstream(&host.e, sa(UPLINK_E, 53));
    host.start_agent();
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    host.net_ok(&["create", "db", "--subnet", "10.213.6.0/24"]);
    let (a_ns, b_ns, d_ns) = (Netns::new("a"), Netns::new("b"), Netns::new("d"));
    let a = host.attach("web", &a_ns, "a", &["--alias", "alpha"]);
    let b = host.attach("web", &b_ns, "b", &["--alias", "beta", "--alias", "bravo"]);
    let d = host.attach("db", &d_ns, "d", &[]);
    let (gw, gw_db) = (v4(10, 213, 5, 1), v4(10, 213, 6, 1));
    let (a_s, b_s, d_s) = (a.to_string(), b.to_string(), d.to_string());

    dns_ready(&a_ns, gw, "b", std::slice::from_ref(&b_s));
    for name in ["b", "b.web", "B.WEB.", "beta", "bravo.web", "Beta.Web."] {
        assert_eq!(dig_short(&a_ns, gw, &["-q", name]), one(&b_s), "{name} from A");
    }
    for name in ["a", "alpha", "alpha.web", "a.web."] {
        assert_eq!(dig_short(&b_ns, gw, &["-q", name]), one(&a_s), "{name} from B");
    }
    assert_eq!(dig_short(&a_ns, gw, &["+tcp", "-q", "b"]), one(&b_s), "over TCP");
    assert_eq!(dig_short(&a_ns, gw, &["+tcp", "-q", "alpha.web"]), one(&a_s), "over TCP");
    assert_eq!(dig_short(&a_ns, gw, &["-x", &b_s]), ["b.web."], "PTR of b");
    assert_eq!(dig_short(&b_ns, gw, &["+tcp", "-x", &a_s]), ["a.web."], "PTR of a over TCP");
    // TTL as configured.
    let answer = try_dig(&a_ns, gw, &["+noall", "+answer", "-q", "b.web"]).expect("dig");
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields.get(1..5), Some(&["7", "IN", "A", b_s.as_str()][..]), "answer: {answer}");

    // Scoping: names of another network are NXDOMAIN, both ways; unknown local names too.
    dns_ready(&d_ns, gw_db, "d", std::slice::from_ref(&d_s));
    assert_eq!(dig_short(&d_ns, gw_db, &["-q", "d.db"]), one(&d_s));
    for name in ["d.db", "d", "nosuch", "nosuch.web"] {
        assert_eq!(dig_status(&a_ns, gw, &["-q", name]), "NXDOMAIN", "{name} from A (network web)");
    }
    for name in ["b.web", "a.web", "alpha", "b", "alpha.web"] {
        assert_eq!(
            dig_status(&d_ns, gw_db, &["-q", name]),
            "NXDOMAIN",
            "{name} from D (network db)"
        );
    }

    // Everything else goes to the upstream.
    assert_eq!(
        dig_short(&a_ns, gw, &["-q", "upstream-test.example"]),
        [UPSTREAM_TEST_ADDR.to_string()],
        "forwarded to the upstream in E"
    );
    assert_eq!(
        dig_short(&d_ns, gw_db, &["+tcp", "-q", "upstream-test.example"]),
        [UPSTREAM_TEST_ADDR.to_string()],
        "forwarded (query over TCP)"
    );
    assert_eq!(dig_status(&a_ns, gw, &["-q", "nosuch.example"]), "NXDOMAIN", "upstream's NXDOMAIN");
    let asked = upstream.names();
    assert!(asked.iter().any(|n| n == "upstream-test.example."), "upstream saw {asked:?}");
    assert!(asked.iter().any(|n| n == "nosuch.example."), "upstream saw {asked:?}");
    let leaked: Vec<&String> = asked
        .iter()
        .filter(|n| *n != "upstream-test.example." && *n != "nosuch.example.")
        .collect();
    assert!(
        leaked.is_empty(),
        "names that must be answered locally reached the upstream: {leaked:?}"
    );
}

/// Services: dnsrr answers every endpoint in a varying order; vip answers one address of the
/// subnet (reserved from IPAM) and spreads connections to it over the endpoints, on any port;
/// `service rm` removes the name and the VIP's rules.
#[test]
fn dns_services_dnsrr_and_vip() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    if !require(&["dig"]) {
        return;
    }
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let (a_ns, b_ns, c_ns) = (Netns::new("a"), Netns::new("b"), Netns::new("c"));
    let a = host.attach("web", &a_ns, "a", &[]);
    let b = host.attach("web", &b_ns, "b", &[]);
    let c = host.attach("web", &c_ns, "c", &[]);
    let gw = v4(10, 213, 5, 1);

    host.net_ok(&["service", "create", "web", "rr", "--mode", "dnsrr", "--endpoints", "a,b"]);
    let mut both = vec![a.to_string(), b.to_string()];
    both.sort();
    retry(REACH, "dnsrr name answering", || {
        let mut got = dig_short(&c_ns, gw, &["-q", "rr"]);
        got.sort();
        anyhow::ensure!(got == both, "got {got:?}");
        Ok(())
    });
    let mut orders = BTreeSet::new();
    for i in 0..20 {
        let args: &[&str] = if i % 2 == 0 { &["-q", "rr"] } else { &["-q", "rr.web"] };
        let got = dig_short(&c_ns, gw, args);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, both, "dnsrr answer {i}: {got:?}");
        orders.insert(got);
    }
    assert!(orders.len() >= 2, "dnsrr order never varied over 20 answers: {orders:?}");

    host.net_ok(&["service", "create", "web", "lb", "--mode", "vip", "--endpoints", "a,b"]);
    let svc = host.inspect("web")["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "lb")
        .cloned()
        .expect("service lb in inspect");
    assert_eq!(svc["mode"], "vip", "{svc}");
    let vip = ip_of(&svc["vip"], "vip");
    let subnet: Ipv4Net = "10.213.5.0/24".parse().expect("cidr");
    assert!(subnet.contains(&vip), "VIP {vip} outside {subnet}");
    for taken in [subnet.network(), subnet.broadcast(), gw, a, b, c] {
        assert_ne!(vip, taken, "the VIP collides with a reserved or endpoint address");
    }
    retry(REACH, "vip name answering", || {
        let got = dig_short(&c_ns, gw, &["-q", "lb"]);
        anyhow::ensure!(got == [vip.to_string()], "got {got:?}");
        Ok(())
    });
    assert_eq!(dig_short(&a_ns, gw, &["-q", "lb.web"]), [vip.to_string()]);
    // IPAM never hands the VIP out.
    let d_ns = Netns::new("d");
    let d = host.attach("web", &d_ns, "d", &[]);
    assert_ne!(d, vip, "a new endpoint got the VIP");

    let _a80 = tcp_whoami(&a_ns, any(80));
    let _b80 = tcp_whoami(&b_ns, any(80));
    let _a81 = tcp_whoami(&a_ns, any(8181));
    let _b81 = tcp_whoami(&b_ns, any(8181));
    let mut locals = BTreeSet::new();
    for _ in 0..20 {
        locals.insert(reach(&c_ns, sa(vip, 80)).local);
    }
    assert_eq!(locals, BTreeSet::from([sa(a, 80), sa(b, 80)]), "20 connections to {vip}:80");
    // The VIP is a hairpin too (C, a and b share the bridge): also without br_netfilter.
    if set_bridge_nf(&host.h, false) {
        let mut locals = BTreeSet::new();
        for _ in 0..10 {
            locals.insert(reach(&c_ns, sa(vip, 80)).local);
        }
        assert_eq!(
            locals,
            BTreeSet::from([sa(a, 80), sa(b, 80)]),
            "10 connections to {vip}:80 with bridge-nf-call-iptables=0"
        );
        set_bridge_nf(&host.h, true);
    }
    let w = reach(&c_ns, sa(vip, 8181));
    assert!(w.local == sa(a, 8181) || w.local == sa(b, 8181), "VIP on another port: {w:?}");

    host.net_ok(&["service", "rm", "web", "lb"]);
    assert_eq!(dig_status(&c_ns, gw, &["-q", "lb"]), "NXDOMAIN", "after service rm");
    blocked(&c_ns, sa(vip, 80), "the vip service was removed");
    host.net_ok(&["service", "rm", "web", "rr"]);
    assert_eq!(dig_status(&c_ns, gw, &["-q", "rr"]), "NXDOMAIN", "after service rm");
    let services = host.inspect("web")["services"].clone();
    assert_eq!(services.as_array().map(Vec::len), Some(0), "{services}");
}

// =====================================================================================
// 6. net run
// =====================================================================================

/// `net run`: the command runs in a new sandbox on the network with its resolv.conf and its
/// address, DNS works from there, the exit status is the command's, and the sandbox and the
/// endpoint are gone afterwards.
#[test]
fn net_run_sandbox() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    if !require(&["dig"]) {
        return;
    }
    // A name of its own: sandboxes live in the host's /run/netns, shared by all tests.
    let net = format!("r{}", std::process::id());
    host.net_ok(&["create", &net, "--subnet", "10.213.7.0/24"]);
    let bridge = host.inspect(&net)["bridge"].as_str().expect("bridge").to_owned();
    let subnet: Ipv4Net = "10.213.7.0/24".parse().expect("cidr");
    let run = |name: &str, cmd: &[&str]| {
        let mut args = vec!["net", "run", net.as_str(), "--name", name];
        args.extend_from_slice(cmd);
        host.warren_timeout(&args, &[], Duration::from_secs(60))
    };
    // After `net run` returned: no endpoint, no veth (the namespace was the command's own).
    let finished = |name: &str, out: &CliOut| {
        let left = endpoint_names(&host.inspect(&net));
        assert!(
            left.is_empty(),
            "endpoints {left:?} remain after `net run --name {name}` returned; its stderr: {}",
            out.stderr
        );
        assert_eq!(host.wr_links(), BTreeSet::from([bridge.clone()]), "links after {name}");
    };

    let out = run("job", &["--", "sh", "-c", "cat /etc/resolv.conf; ip -4 -o addr show eth0"]);
    let text = out.ok();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(lines.contains(&"nameserver 10.213.7.1"), "resolv.conf in the sandbox:\n{text}");
    assert!(
        lines.contains(&format!("search {net}").as_str()),
        "resolv.conf in the sandbox:\n{text}"
    );
    let ip: Ipv4Addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `inet A.B.C.D/N` on eth0 in:\n{text}"));
    assert!(subnet.contains(&ip) && ip != v4(10, 213, 7, 1), "sandbox address {ip}");
    finished("job", &out);

    // While the command runs, its endpoint is in `inspect`, in an agent-made sandbox.
    std::thread::scope(|scope| {
        let job = scope.spawn(|| run("job4", &["--", "sleep", "4"]));
        let ep = retry(REACH, "the endpoint of a running `net run`", || {
            endpoints(&host.inspect(&net))
                .into_iter()
                .find(|e| e["name"] == "job4")
                .ok_or_else(|| anyhow::anyhow!("no endpoint job4 yet"))
        });
        assert!(subnet.contains(&ip_of(&ep["ip"], "ip")), "{ep}");
        assert_eq!(ep["ifname"], "eth0", "{ep}");
        // The sandbox is the command's own namespace, found by its process.
        let ns = ep["netns"].as_str().expect("netns");
        assert!(ns.starts_with("/proc/") && ns.ends_with("/ns/net"), "{ep}");
        assert_eq!(ep["sandbox"], "pid", "{ep}");
        let out = job.join().expect("net run thread");
        out.ok();
        finished("job4", &out);
    });

    // The command keeps the open-files limit it was given, not the one warren raises itself
    // to (programs that use select() break above 1024). This binary's other tests do not mind
    // a soft limit of 4096.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let soft = hard.min(4096);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    if soft < hard {
        let out = run("job5", &["--", "sh", "-c", "ulimit -Sn"]);
        assert_eq!(out.ok().trim(), soft.to_string(), "the command's soft open-files limit");
        finished("job5", &out);
    } else {
        eprintln!("skipping the open-files check: the hard limit {hard} is not above {soft}");
    }

    // Its exit status.
    let out = run("job2", &["--", "sh", "-c", "exit 3"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    finished("job2", &out);

    // DNS from inside, through its resolv.conf; --ip honoured.
    let out = run(
        "job3",
        &["--ip", "10.213.7.50", "--", "dig", "+short", "+time=2", "+tries=2", "-q", "job3"],
    );
    assert_eq!(out.ok().trim(), "10.213.7.50", "dig job3 inside the sandbox");
    finished("job3", &out);
}

// =====================================================================================
// 7. idempotent ruleset, ownership
// =====================================================================================

/// Restarting the agent (gracefully, then a crash) leaves its `ip warren` table identical (up to
/// handles and counter values); someone else's table is byte-identical; no other table appears.
#[test]
fn ruleset_is_idempotent_and_owned() {
    let Some(mut host) = HostNs::prepare(HostOpts::default()) else { return };
    let other = host.tmp().write(
        "other.nft",
        "table ip other {\n\
         \tset allowlist { type ipv4_addr; elements = { 192.0.2.7, 192.0.2.8 } }\n\
         \tchain filterfwd { type filter hook forward priority 10; policy accept; ip saddr @allowlist accept; }\n\
         \tchain natpre { type nat hook prerouting priority -110; policy accept; tcp dport 65000 accept; }\n\
         }\n",
    );
    host.h.exec_ok("nft", &["-f", &other.display().to_string()]);
    let other_before = host.h.exec_ok("nft", &["-j", "list", "table", "ip", "other"]);
    host.start_agent();

    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    host.net_ok(&["create", "db", "--subnet", "10.213.6.0/24"]);
    let (a_ns, b_ns) = (Netns::new("a"), Netns::new("b"));
    let a = host.attach("web", &a_ns, "a", &[]);
    host.attach("web", &b_ns, "b", &[]);
    host.net_ok(&["publish", "web", "a", "8080:80"]);
    host.net_ok(&["publish", "web", "b", "5353:53", "--proto", "udp"]);
    host.net_ok(&["service", "create", "web", "lb", "--mode", "vip", "--endpoints", "a,b"]);
    let _srv = tcp_whoami(&a_ns, any(80));
    assert_eq!(reach(&host.e, sa(UPLINK_H, 8080)).local, sa(a, 80));

    let before = nft_table(&host, "warren").expect("the agent's table ip warren");
    let text = before.to_string();
    for needle in ["dnat", "masquerade", &a.to_string(), "8080"] {
        assert!(text.contains(needle), "table ip warren lacks {needle:?}: {before:#}");
    }
    let before = normalized(&before);
    let tables = |host: &HostNs| -> BTreeSet<String> {
        let v: Value = serde_json::from_str(&host.h.exec_ok("nft", &["-j", "list", "tables"]))
            .expect("nft -j list tables");
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| {
                let t = o.get("table")?;
                Some(format!("{} {}", t["family"].as_str()?, t["name"].as_str()?))
            })
            .collect()
    };
    let expected_tables = BTreeSet::from(["ip other".to_owned(), "ip warren".to_owned()]);
    assert_eq!(tables(&host), expected_tables, "the agent may only add `table ip warren`");

    for (i, crash) in [false, true].into_iter().enumerate() {
        if crash {
            host.crash_and_restart_agent();
        } else {
            host.restart_agent();
        }
        for when in ["right after the restart", "2 s later"] {
            if when != "right after the restart" {
                std::thread::sleep(Duration::from_secs(2));
            }
            let after = normalized(&nft_table(&host, "warren").expect("table ip warren"));
            assert_eq!(
                after, before,
                "restart {i} (crash: {crash}), {when}: table ip warren changed\nbefore: {before:#}\nafter: {after:#}"
            );
            assert_eq!(
                host.h.exec_ok("nft", &["-j", "list", "table", "ip", "other"]),
                other_before,
                "restart {i}, {when}: table ip other was touched"
            );
            assert_eq!(tables(&host), expected_tables);
        }
        assert_eq!(reach(&host.e, sa(UPLINK_H, 8080)).local, sa(a, 80), "after restart {i}");
    }
}

// =====================================================================================
// 8. restart keeps addresses, repairs
// =====================================================================================

/// A crash and restart keeps every address and leaves healthy endpoints alone; a deleted host
/// veth is repaired by the next start (same address, reachable again); a new endpoint never
/// gets an address already handed out.
#[test]
fn restart_keeps_addresses_and_repairs() {
    let Some(mut host) = HostNs::start(HostOpts::default()) else { return };
    // A /29: .1 is the gateway, .2-.6 go to endpoints, so new attaches must wrap around.
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/29"]);
    let (a_ns, b_ns, c_ns) = (Netns::new("a"), Netns::new("b"), Netns::new("c"));
    let a = host.attach("web", &a_ns, "a", &[]);
    let b = host.attach("web", &b_ns, "b", &[]);
    let _in_a = tcp_whoami(&a_ns, any(7000));
    let _in_b = tcp_whoami(&b_ns, any(7000));
    let b_index = link_json(&b_ns, &["link", "show", "dev", "eth0"])["ifindex"].clone();
    let hv_b = host.endpoint("web", "b")["host_veth"].clone();

    host.crash_and_restart_agent();
    assert_eq!(ip_of(&host.endpoint("web", "a")["ip"], "a"), a, "a's address after a crash");
    assert_eq!(ip_of(&host.endpoint("web", "b")["ip"], "b"), b, "b's address after a crash");
    assert_eq!(reach(&b_ns, sa(a, 7000)).peer.ip(), b, "B -> A after the restart");

    // Break a: delete its host veth (its peer, A's eth0, goes with it).
    let ea = host.endpoint("web", "a");
    let hv_a = ea["host_veth"].as_str().expect("host_veth").to_owned();
    let ifname = ea["ifname"].as_str().expect("ifname").to_owned();
    host.h.ip_ok(&["link", "del", &hv_a]);
    assert!(a_ns.ipv4_addrs(&ifname).is_empty(), "A still has {ifname} after deleting {hv_a}");
    blocked(&b_ns, sa(a, 7000), "a's veth was deleted");

    host.restart_agent();
    retry(Duration::from_secs(15), "a repaired", || {
        let ep = host.endpoint("web", "a");
        let ifname = ep["ifname"].as_str().unwrap_or("eth0").to_owned();
        anyhow::ensure!(
            a_ns.ipv4_addrs(&ifname).contains(&(a, 29)),
            "A has no {a}/29 on {ifname} yet"
        );
        anyhow::ensure!(ep["healthy"] == true, "not healthy yet: {ep}");
        Ok(())
    });
    assert_eq!(ip_of(&host.endpoint("web", "a")["ip"], "a"), a, "a's address after the repair");
    assert_eq!(reach(&b_ns, sa(a, 7000)).peer.ip(), b, "B -> A after the repair");
    assert_eq!(reach(&a_ns, sa(b, 7000)).peer.ip(), a, "A -> B after the repair");
    // b was healthy all along: left as it was.
    assert_eq!(host.endpoint("web", "b")["host_veth"], hv_b, "b's veth was recreated");
    assert_eq!(
        link_json(&b_ns, &["link", "show", "dev", "eth0"])["ifindex"],
        b_index,
        "b's eth0 was recreated by a restart although it was healthy"
    );

    // IPAM after restarts: a's address is taken; the three free addresses go to three new
    // endpoints (never a's or b's), then the subnet is exhausted.
    let a_s = a.to_string();
    host.net(&["attach", "web", "--netns", &c_ns.path_str(), "--name", "c", "--ip", &a_s])
        .fail_mentioning(&[&a_s]);
    let more: Vec<Netns> = ["c2", "c3", "c4", "c5"].iter().map(|t| Netns::new(t)).collect();
    let mut given = BTreeSet::from([a, b]);
    for (i, ns) in more.iter().take(3).enumerate() {
        let ip = host.attach("web", ns, &format!("n{i}"), &[]);
        assert!(given.insert(ip), "{ip} handed out twice ({given:?})");
        assert_ne!(ip, v4(10, 213, 5, 1), "the gateway's address was handed out");
    }
    let subnet: Ipv4Net = "10.213.5.0/29".parse().expect("cidr");
    assert_eq!(given, subnet.hosts().skip(1).collect(), "every usable address once");
    host.net(&["attach", "web", "--netns", &more[3].path_str(), "--name", "n3"]).fail();
}

// =====================================================================================
// 9. bad input
// =====================================================================================

/// Every bad request is a clear error with the right status and leaves no half-made links.
#[test]
fn bad_input_is_refused_cleanly() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let (a_ns, b_ns) = (Netns::new("a"), Netns::new("b"));
    let b_path = b_ns.path_str();
    host.attach("web", &a_ns, "a", &["--ip", "10.213.5.20"]);
    let links = host.wr_links();
    assert_eq!(links.len(), 2, "bridge + a's veth: {links:?}");
    let unchanged = |what: &str| {
        assert_eq!(host.wr_links(), links, "{what}: links in H changed");
        assert_eq!(b_ns.links(), BTreeSet::from(["lo".to_owned()]), "{what}: B got a link");
    };
    let api_status = |method: &str, path: &str, body: Value| -> (u16, String) {
        let body = (!body.is_null()).then_some(body);
        let (status, v) = host.api(method, path, body.as_ref());
        (status, api_error_message(&v))
    };

    // Overlapping subnets: with a network, with a route of the host.
    host.net(&["create", "web2", "--subnet", "10.213.5.128/25"]).fail_mentioning(&["overlap"]);
    unchanged("overlapping subnet");
    let (s, m) =
        api_status("POST", "/api/networks", json!({"name": "web3", "subnet": "10.213.5.0/24"}));
    assert_eq!(s, 409, "overlapping subnet: {m}");
    host.net(&["create", "up", "--subnet", "198.51.100.0/24"]).fail_mentioning(&["overlap"]);
    let (s, m) =
        api_status("POST", "/api/networks", json!({"name": "up", "subnet": "198.51.100.0/25"}));
    assert_eq!(s, 409, "subnet overlapping a host route: {m}");
    unchanged("subnet overlapping a host route");
    let (s, m) =
        api_status("POST", "/api/networks", json!({"name": "web", "subnet": "10.213.8.0/24"}));
    assert_eq!(s, 409, "a network name taken: {m}");
    let (s, m) =
        api_status("POST", "/api/networks", json!({"name": "n", "subnet": "10.213.300.0/24"}));
    assert_eq!(s, 400, "not a CIDR: {m}");
    unchanged("bad networks");

    // Addresses: outside the subnet, the gateway, taken.
    host.net(&["attach", "web", "--netns", &b_path, "--name", "b", "--ip", "10.213.6.5"])
        .fail_mentioning(&["10.213.6.5"]);
    let (s, m) = api_status(
        "POST",
        "/api/networks/web/endpoints",
        json!({"name": "b", "netns": b_path, "ip": "10.213.6.5"}),
    );
    assert_eq!(s, 400, "address outside the subnet: {m}");
    unchanged("address outside the subnet");
    host.net(&["attach", "web", "--netns", &b_path, "--name", "b", "--ip", "10.213.5.1"])
        .fail_mentioning(&["10.213.5.1"]);
    unchanged("the gateway's address");
    host.net(&["attach", "web", "--netns", &b_path, "--name", "b", "--ip", "10.213.5.20"])
        .fail_mentioning(&["10.213.5.20"]);
    let (s, m) = api_status(
        "POST",
        "/api/networks/web/endpoints",
        json!({"name": "b", "netns": b_path, "ip": "10.213.5.20"}),
    );
    assert_eq!(s, 409, "address taken: {m}");
    unchanged("address taken");
    let (s, m) =
        api_status("POST", "/api/networks/web/endpoints", json!({"name": "a", "netns": b_path}));
    assert_eq!(s, 409, "endpoint name taken: {m}");
    unchanged("endpoint name taken");

    // Unknown network, unknown endpoint.
    host.net(&["attach", "nope", "--netns", &b_path, "--name", "b"]).fail_mentioning(&["nope"]);
    host.net(&["inspect", "nope"]).fail_mentioning(&["nope"]);
    host.net(&["rm", "nope"]).fail_mentioning(&["nope"]);
    let (s, m) =
        api_status("POST", "/api/networks/nope/endpoints", json!({"name": "b", "netns": b_path}));
    assert_eq!(s, 404, "unknown network: {m}");
    assert_eq!(api_status("GET", "/api/networks/nope", Value::Null).0, 404);
    unchanged("unknown network");
    host.net(&["detach", "web", "ghost"]).fail_mentioning(&["ghost"]);
    host.net(&["publish", "web", "ghost", "8080:80"]).fail_mentioning(&["ghost"]);
    host.net(&["service", "create", "web", "s", "--mode", "vip", "--endpoints", "a,ghost"])
        .fail_mentioning(&["ghost"]);
    assert_eq!(api_status("DELETE", "/api/networks/web/endpoints/ghost", Value::Null).0, 404);
    let (s, m) = api_status(
        "POST",
        "/api/networks/web/ports",
        json!({"endpoint": "ghost", "host_port": 8080, "port": 80}),
    );
    assert_eq!(s, 404, "port to an unknown endpoint: {m}");
    unchanged("unknown endpoint");
    assert_eq!(host.inspect("web")["ports"].as_array().map(Vec::len), Some(0));
    assert_eq!(host.inspect("web")["services"].as_array().map(Vec::len), Some(0));

    // Names that are not DNS labels.
    host.net(&["create", "Bad_Name", "--subnet", "10.213.8.0/24"]).fail_mentioning(&["Bad_Name"]);
    let (s, m) = api_status("POST", "/api/networks", json!({"name": "Bad_Name"}));
    assert_eq!(s, 400, "invalid network name: {m}");
    host.net(&["attach", "web", "--netns", &b_path, "--name", "Bad_Name"])
        .fail_mentioning(&["Bad_Name"]);
    let (s, m) = api_status(
        "POST",
        "/api/networks/web/endpoints",
        json!({"name": "Bad_Name", "netns": b_path}),
    );
    assert_eq!(s, 400, "invalid endpoint name: {m}");
    let long = "x".repeat(64);
    let (s, m) =
        api_status("POST", "/api/networks/web/endpoints", json!({"name": long, "netns": b_path}));
    assert_eq!(s, 400, "a 64-character label: {m}");
    host.net(&["attach", "web", "--netns", &b_path, "--name", "b", "--alias", "no_way"])
        .fail_mentioning(&["no_way"]);
    unchanged("invalid names");

    // A network with endpoints is not removed without --force.
    host.net(&["rm", "web"]).fail();
    assert_eq!(api_status("DELETE", "/api/networks/web", Value::Null).0, 409);
    unchanged("rm of a network in use");
    assert_eq!(endpoint_names(&host.inspect("web")), BTreeSet::from(["a".to_owned()]));

    // Exhaustion: a /30 has exactly one address besides network, gateway and broadcast.
    host.net_ok(&["create", "tiny", "--subnet", "10.213.9.0/30"]);
    let mut attached = Vec::new();
    let mut refused = None;
    let mut spaces = Vec::new();
    for i in 0..3 {
        let ns = Netns::new(&format!("t{i}"));
        let out =
            host.net(&["attach", "tiny", "--netns", &ns.path_str(), "--name", &format!("t{i}")]);
        spaces.push(ns);
        if out.status.success() {
            attached.push(out.stdout.clone());
        } else {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("a /30 gave 3 addresses: {attached:?}"));
    assert_eq!(attached.len(), 1, "a /30 has one usable address: {attached:?}");
    assert!(attached[0].contains("10.213.9.2/30"), "{attached:?}");
    let msg = refused.fail().to_ascii_lowercase();
    assert!(
        msg.contains("10.213.9.0/30")
            && (msg.contains("exhaust") || msg.contains("no free address")),
        "the error should say that 10.213.9.0/30 is exhausted: {msg:?}"
    );
    assert_eq!(spaces.last().map(Netns::links), Some(BTreeSet::from(["lo".to_owned()])));
    let (s, m) = api_status(
        "POST",
        "/api/networks/tiny/endpoints",
        json!({"name": "t9", "netns": spaces.last().map(Netns::path_str)}),
    );
    assert_eq!(s, 409, "exhausted subnet: {m}");
    assert_eq!(host.wr_links().len(), links.len() + 2, "tiny's bridge + t0's veth only");
}

/// The default pool is carved into /24s, skips subnets that overlap a route of the host, and is
/// a clear 409 when exhausted.
#[test]
fn default_pool_skips_host_routes_and_exhausts() {
    let opts = HostOpts {
        extra_args: vec!["--net-pool".into(), "10.213.100.0/22".into()],
        ..HostOpts::default()
    };
    let Some(mut host) = HostNs::prepare(opts) else { return };
    host.h.ip_ok(&["route", "add", "10.213.100.0/24", "dev", "up0"]);
    host.start_agent();
    let mut subnets = BTreeSet::new();
    for name in ["p1", "p2", "p3"] {
        let out = host.net_ok(&["create", name]);
        let net = host.inspect(name);
        let subnet = net["subnet"].as_str().expect("subnet").to_owned();
        assert!(out.contains(&format!("subnet {subnet}")), "{out}");
        subnets.insert(subnet);
    }
    assert_eq!(
        subnets,
        BTreeSet::from(["10.213.101.0/24", "10.213.102.0/24", "10.213.103.0/24"].map(String::from)),
        "the /24s of 10.213.100.0/22 except the one routed on the host"
    );
    host.net(&["create", "p4"]).fail_mentioning(&["exhaust"]);
    let (s, v) = host.api("POST", "/api/networks", Some(&json!({"name": "p5"})));
    assert_eq!(s, 409, "pool exhausted: {v}");
    assert_eq!(host.wr_links().len(), 3, "three bridges: {:?}", host.wr_links());
}

// =====================================================================================
// 10. cleanup
// =====================================================================================

/// `rm --force` and `rm` remove every link, rule, address and sandbox warren made for the
/// network, and a restart does not bring anything back.
#[test]
fn rm_leaves_nothing_behind() {
    let Some(mut host) = HostNs::start(HostOpts::default()) else { return };
    // A name of its own: the agent-made sandbox lives in the host's /run/netns.
    let web = format!("c{}", std::process::id());
    host.net_ok(&["create", &web, "--subnet", "10.213.5.0/24"]);
    host.net_ok(&["create", "db", "--subnet", "10.213.6.0/24"]);
    let (a_ns, d_ns, sb_ns) = (Netns::new("a"), Netns::new("d"), Netns::new("s"));
    host.attach(&web, &a_ns, "a", &["--alias", "alpha"]);
    let (status, sb) = host.api(
        "POST",
        &format!("/api/networks/{web}/endpoints"),
        Some(&json!({"name": "sb", "netns": sb_ns.path_str()})),
    );
    assert_eq!(status, 201, "endpoint attached through the API: {sb}");
    assert_eq!(sb["sandbox"], "netns", "{sb}");
    // Neither a sandbox nor both ways of naming one: refused.
    let (status, e) =
        host.api("POST", &format!("/api/networks/{web}/endpoints"), Some(&json!({"name": "x"})));
    assert_eq!(status, 400, "{e}");
    host.net_ok(&["publish", &web, "a", "8080:80"]);
    host.net_ok(&["publish", &web, "sb", "8082:80", "--proto", "udp"]);
    host.net_ok(&["service", "create", &web, "lb", "--mode", "vip", "--endpoints", "a,sb"]);
    host.net_ok(&["service", "create", &web, "rr", "--mode", "dnsrr", "--endpoints", "a,sb"]);
    host.attach("db", &d_ns, "d", &[]);
    host.net_ok(&["publish", "db", "d", "8081:80"]);
    let db_links: BTreeSet<String> = {
        let db = host.inspect("db");
        let mut s = BTreeSet::from([db["bridge"].as_str().expect("bridge").to_owned()]);
        s.extend(endpoints(&db).iter().filter_map(|e| e["host_veth"].as_str().map(str::to_owned)));
        s
    };
    assert_eq!(host.wr_links().len(), 5, "2 bridges + 3 veths: {:?}", host.wr_links());
    let table = nft_table(&host, "warren").expect("table ip warren").to_string();
    assert!(table.contains("10.213.5.") && table.contains("10.213.6."), "{table}");

    host.net(&["rm", &web]).fail();
    host.net_ok(&["rm", &web, "--force"]);
    assert_eq!(host.wr_links(), db_links, "only db's links may remain");
    assert_eq!(a_ns.links(), BTreeSet::from(["lo".to_owned()]), "A still has a link");
    assert_eq!(
        sb_ns.links(),
        BTreeSet::from(["lo".to_owned()]),
        "the API-attached sandbox keeps a link"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let prefix = format!("wr-{web}-");
    assert!(!leftovers.iter().any(|n| n.starts_with(&prefix)), "sandboxes left: {leftovers:?}");
    let table = nft_table(&host, "warren").map(|t| t.to_string()).unwrap_or_default();
    assert!(!table.contains("10.213.5."), "rules of the removed network remain: {table}");
    assert!(table.contains("10.213.6."), "db's rules are gone too: {table}");
    let h_addrs = host.h.ip_ok(&["-4", "-o", "addr"]);
    assert!(!h_addrs.contains("10.213.5."), "the gateway address remains in H: {h_addrs}");
    let h_routes = host.h.ip_ok(&["-4", "route"]);
    assert!(!h_routes.contains("10.213.5."), "a route remains in H: {h_routes}");

    host.net_ok(&["detach", "db", "d"]);
    host.net_ok(&["rm", "db"]);
    let check_empty = |host: &HostNs, when: &str| {
        assert_eq!(host.wr_links(), BTreeSet::new(), "{when}: wr links in H");
        if let Some(t) = nft_table(host, "warren") {
            assert_eq!(rule_count(&t), 0, "{when}: rules left in table ip warren: {t:#}");
            assert!(!t.to_string().contains("10.213."), "{when}: {t:#}");
        }
        let (status, v) = host.api("GET", "/api/networks", None);
        assert_eq!((status, v["networks"].clone()), (200, json!([])), "{when}");
        let ls = host.net_ok(&["ls"]);
        assert!(
            !ls.lines().any(|l| l.starts_with(web.as_str()) || l.starts_with("db")),
            "{when}: `net ls`:\n{ls}"
        );
        let h_addrs = host.h.ip_ok(&["-4", "-o", "addr"]);
        assert!(!h_addrs.contains("10.213."), "{when}: addresses remain in H: {h_addrs}");
    };
    check_empty(&host, "after rm");
    assert_eq!(d_ns.links(), BTreeSet::from(["lo".to_owned()]), "D still has a link");
    host.restart_agent();
    check_empty(&host, "after rm and a restart");
}

// =====================================================================================
// 11. not root
// =====================================================================================

/// An agent without CAP_NET_ADMIN keeps running, but its networks API answers 503 naming the
/// capability, the CLI prints that, and nothing is created.
#[test]
fn without_cap_net_admin_networks_are_refused() {
    let Some(host) = HostNs::prepare(HostOpts::default()) else { return };
    if !require(&["setpriv"]) {
        return;
    }
    let dir = host.tmp().dir("nobody");
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown the config dir");
    let dir_s = dir.display().to_string();
    let warren = warren_tests::process::binary("warren").display().to_string();
    let args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        &warren,
        "agent",
        "--api",
        "127.0.0.1:4041",
        "--config-dir",
        &dir_s,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let setpriv = warren_tests::which("setpriv").expect("setpriv");
    let mut agent =
        NsDaemon::spawn(&host.h, "unprivileged agent", &setpriv, &args, &[("HOME", &dir_s)]);
    let (status, body) = retry(Duration::from_secs(20), "the unprivileged agent's API", || {
        if let Some(st) = agent.exited() {
            panic!("the unprivileged agent exited ({st}):\n{}", agent.log());
        }
        let r = api_call(&host.h, "127.0.0.1:4041", "GET", "/api/networks", None, ATTEMPT);
        anyhow::ensure!(r.0 != 0, "no answer yet");
        Ok(r)
    });
    assert_eq!(status, 503, "{body}");
    assert!(api_error_message(&body).contains("CAP_NET_ADMIN"), "{body}");

    let out = host.warren_timeout(
        &["net", "create", "x", "--subnet", "10.213.5.0/24", "--agent-api", "127.0.0.1:4041"],
        &[],
        Duration::from_secs(30),
    );
    out.fail_mentioning(&["CAP_NET_ADMIN"]);
    let out = host.warren_timeout(
        &["net", "create", "x"],
        &[("WARREN_AGENT_API", "127.0.0.1:4041")],
        Duration::from_secs(30),
    );
    out.fail_mentioning(&["CAP_NET_ADMIN"]);
    assert_eq!(host.wr_links(), BTreeSet::new(), "an unprivileged agent created links");
    assert!(agent.exited().is_none(), "the agent should keep running:\n{}", agent.log());
}

// =====================================================================================
// 14. a tunnel whose target is an endpoint's name

/// `warren tcp api.web:80`: a tunnel process resolves `NAME.NETWORK` through the agent's API
/// and reaches the endpoint; a relay and the tunnel run inside the host namespace.
#[test]
fn tunnel_to_an_endpoint_by_name() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let a_ns = Netns::new("a");
    let a = host.attach("web", &a_ns, "api", &[]);
    let _srv = tcp_whoami(&a_ns, any(80));
    let data = host.tmp().dir("relay");
    let relay_args: Vec<String> = [
        "--domain",
        "localhost",
        "--control",
        "127.0.0.1:7443",
        "--http",
        "127.0.0.1:8000",
        "--no-https",
        "--no-api",
        "--ports",
        "127.0.0.1:21000-21010",
        "--token",
        "t0ken",
        "--data",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([data.display().to_string()])
    .collect();
    let _relay = NsDaemon::spawn(&host.h, "relay", &binary("warren-server"), &relay_args, &[]);
    let tunnel_args: Vec<String> = [
        "tcp",
        "api.web:80",
        "--remote-port",
        "21005",
        "--relay",
        "127.0.0.1:7443",
        "--token",
        "t0ken",
        "--insecure",
        "--no-api",
        "--config-dir",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([host.tmp().dir("tunnel").display().to_string()])
    .collect();
    // The networks agent is found through agent.json in its config dir, as a user's would be.
    let agent_dir = host.config_dir().display().to_string();
    let _tunnel = NsDaemon::spawn(
        &host.h,
        "tunnel",
        &binary("warren"),
        &tunnel_args,
        &[("WARREN_CONFIG_DIR", &agent_dir)],
    );
    let w = retry(REACH, "the tunnel to api.web:80", || {
        tcp_whoami_ask(&host.h, "127.0.0.1:21005".parse().expect("addr"), Duration::from_secs(3))
    });
    assert_eq!(w.local, sa(a, 80), "the tunnel reached {w:?}");
    // The agent's API answers the name, and only names of its networks.
    let (status, v) = host.api("GET", "/api/networks/resolve/api.web", None);
    assert_eq!((status, v["addresses"].clone()), (200, json!([a.to_string()])));
    let (status, _) = host.api("GET", "/api/networks/resolve/api.nowhere", None);
    assert_eq!(status, 404);
}

/// A network of more than 256 addresses is created, with a warning that says why it is a bad
/// idea and what to do instead; a /24 gets none.
#[test]
fn big_networks_warn() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    let out = host.net(&["create", "big", "--subnet", "10.220.0.0/22"]);
    out.ok();
    assert!(out.stderr.contains("warning:"), "no warning for a /22: {out:?}");
    for needle in ["1021 addresses", "256", "dnsrr", "several networks"] {
        assert!(out.stderr.contains(needle), "the warning lacks {needle:?}: {}", out.stderr);
    }
    let (status, v) = host.api(
        "POST",
        "/api/networks",
        Some(&json!({"name": "big2", "subnet": "10.221.0.0/23"})),
    );
    assert_eq!(status, 201, "{v}");
    assert!(v["warnings"][0].as_str().is_some_and(|w| w.contains("509 addresses")), "{v}");
    let out = host.net(&["create", "small", "--subnet", "10.222.0.0/24"]);
    out.ok();
    assert!(!out.stderr.contains("warning"), "a /24 warned: {}", out.stderr);
}

/// Another network's endpoints can use neither a network's virtual addresses nor its DNS
/// server.
#[test]
fn vips_and_dns_stay_inside_their_network() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    if !require(&["dig"]) {
        return;
    }
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    host.net_ok(&["create", "other", "--subnet", "10.213.6.0/24"]);
    let (a_ns, c_ns, x_ns) = (Netns::new("a"), Netns::new("c"), Netns::new("x"));
    let a = host.attach("web", &a_ns, "a", &[]);
    host.attach("web", &c_ns, "c", &[]);
    host.attach("other", &x_ns, "x", &[]);
    let _srv = tcp_whoami(&a_ns, any(80));
    let out = host.net_ok(&["service", "create", "web", "lb", "--mode", "vip", "--endpoints", "a"]);
    let vip: Ipv4Addr =
        out.trim().rsplit(' ').next().and_then(|s| s.parse().ok()).expect("vip in the output");
    // From its own network the VIP works ...
    assert_eq!(reach(&c_ns, sa(vip, 80)).local, sa(a, 80));
    // ... from another network it does not, and neither does that network's DNS.
    blocked(&x_ns, sa(vip, 80), "a VIP of another network");
    let gw = v4(10, 213, 5, 1);
    assert_eq!(dig_status(&x_ns, gw, &["-q", "a"]), "REFUSED", "DNS of another network");
    assert_eq!(dig_status(&c_ns, gw, &["-q", "a"]), "NOERROR");
}

//! Overlay networks across hosts: hosts are network namespaces on one underlay, each with its
//! own `warren agent`, and the relay runs in another (see `warren_tests::overlay`). Needs root
//! and iproute2, nftables, ping and dig; skipped otherwise (a failure under
//! `WARREN_TEST_NETNS_REQUIRED=1`).

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::ensure;
use nix::sys::signal::Signal;
use serde_json::Value;
use warren_tests::netns::{Netns, retry, tcp_whoami, tcp_whoami_ask};
use warren_tests::overlay::{LabOpts, OverlayLab, dig, dig_status, ping, transfer};

const NET: &str = "backend";
const SUBNET: &str = "10.214.0.0/24";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
const MB10: usize = 10 * 1024 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn lab(opts: LabOpts) -> Option<OverlayLab> {
    OverlayLab::start(opts)
}

/// Host 1 creates the network; each of `names` is attached from the host given.
fn setup(lab: &OverlayLab, eps: &[(u8, &str)]) -> Vec<(Netns, Ipv4Addr)> {
    let out = lab.host(1).net_ok(&["create", NET, "--driver", "overlay", "--subnet", SUBNET]);
    assert!(out.contains("overlay VNI"), "create printed {out:?}");
    eps.iter()
        .map(|(h, name)| {
            let ns = Netns::new(&format!("e{h}"));
            let ip = lab.host(*h).attach(NET, &ns, name, &[]);
            (ns, ip)
        })
        .collect()
}

fn wait_path(lab: &OverlayLab, from: u8, to: u8, want: &str) {
    let peer = lab.host(to).host_addr(NET);
    retry(WAIT, &format!("host {from} uses the {want} path to host {to}"), || {
        let got = lab.host(from).path_to(NET, peer);
        ensure!(got.as_deref() == Some(want), "path {got:?}");
        Ok(())
    });
}

fn mac_of(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

fn vxlan_dev(v: &Value) -> String {
    v["overlay"]["vxlan"].as_str().expect("vxlan device").to_owned()
}

#[test]
fn endpoints_on_two_hosts_talk_over_vxlan() {
    let Some(lab) = lab(LabOpts::default()) else { return };
    let eps = setup(&lab, &[(1, "api"), (2, "worker")]);
    let ((api_ns, api), (worker_ns, worker)) = (&eps[0], &eps[1]);
    assert_ne!(api, worker);
    wait_path(&lab, 1, 2, "direct");
    wait_path(&lab, 2, 1, "direct");

    // The data path is the kernel's: host 1 sends worker's MAC to host 2's VTEP.
    let v = lab.host(1).inspect(NET);
    let dev = vxlan_dev(&v);
    let fdb = lab.host(1).vxlan_fdb(&dev);
    assert!(
        fdb.contains(&(mac_of(*worker), "192.168.99.2".to_owned())),
        "host 1's VXLAN entries should send {} to 192.168.99.2: {fdb:?}",
        mac_of(*worker)
    );
    let neigh = lab.host(1).neighbours(&dev);
    assert!(neigh.contains(&(worker.to_string(), mac_of(*worker))), "{neigh:?}");
    // Endpoints and the overlay's devices have MTU 1450.
    let eth0 = api_ns.ip_json(&["link", "show", "dev", "eth0"]);
    assert_eq!(eth0[0]["mtu"], 1450, "{eth0}");
    let vx = lab.host(1).ns.ip_json(&["-d", "link", "show", "dev", &dev]);
    assert_eq!(vx[0]["mtu"], 1450, "{vx}");
    assert_eq!(vx[0]["linkinfo"]["info_data"]["port"], 4789, "{vx}");
    assert_eq!(vx[0]["linkinfo"]["info_data"]["local"], "192.168.99.1", "{vx}");
    assert_eq!(vx[0]["linkinfo"]["info_data"]["learning"], false, "{vx}");

    let (ok, out) = ping(worker_ns, &["-c", "3", "-i", "0.2", "-W", "2", &api.to_string()]);
    assert!(ok, "ping api from host 2: {out}");
    // 1450 bytes with don't-fragment pass; one more is refused at once, not lost.
    let (ok, out) =
        ping(worker_ns, &["-c", "1", "-M", "do", "-s", "1422", "-W", "2", &api.to_string()]);
    assert!(ok, "a 1450-byte DF ping should pass: {out}");
    let (ok, out) =
        ping(worker_ns, &["-c", "1", "-M", "do", "-s", "1423", "-W", "2", &api.to_string()]);
    assert!(!ok && out.contains("message too long"), "a 1451-byte DF ping should fail: {out}");

    let relayed = lab.relayed_frames();
    let (sent, got) =
        transfer(worker_ns, api_ns, SocketAddr::from((*api, 7000)), MB10, WAIT).expect("transfer");
    assert_eq!(sent, got);
    // None of it went over the relay.
    let after = lab.relayed_frames();
    assert!(after < relayed + 50, "10 MB should not ride the relay: {relayed} -> {after} frames");

    // Names across hosts, both ways, and reverse lookups.
    assert_eq!(dig(worker_ns, GATEWAY, "api.backend", "A"), vec![api.to_string()]);
    assert_eq!(dig(worker_ns, GATEWAY, "api", "A"), vec![api.to_string()]);
    assert_eq!(dig(api_ns, GATEWAY, "worker.backend", "A"), vec![worker.to_string()]);
    assert_eq!(dig(api_ns, GATEWAY, "-x", &worker.to_string()).concat(), "worker.backend.");
    assert_eq!(dig_status(api_ns, GATEWAY, "nobody.backend"), "NXDOMAIN");

    // The relay shows both members on the direct path, and both endpoints.
    let r = lab.relay_network(NET);
    let names: BTreeSet<&str> = r["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["api", "worker"]), "{r}");
    retry(WAIT, "the relay hears that both members use the direct path", || {
        let r = lab.relay_network(NET);
        let members = r["members"].as_array().cloned().unwrap_or_default();
        ensure!(members.len() == 2, "{r}");
        for m in &members {
            ensure!(m["paths"].as_array().is_some_and(|p| p.len() == 1), "{m}");
            ensure!(m["paths"][0]["path"] == "direct", "{m}");
        }
        Ok(())
    });
}

#[test]
fn traffic_moves_to_the_relay_when_vxlan_is_blocked_and_back() {
    // Host 3 reaches the relay over TLS + yamux, so both relay-path transports are used.
    let opts = LabOpts {
        hosts: 3,
        agent_args: vec![vec![], vec![], vec!["--transport".into(), "tcp".into()]],
        ..LabOpts::default()
    };
    let Some(lab) = lab(opts) else { return };
    let eps = setup(&lab, &[(1, "api"), (2, "worker"), (3, "job")]);
    let ((api_ns, api), (worker_ns, _), (job_ns, _)) = (&eps[0], &eps[1], &eps[2]);
    for to in [2, 3] {
        wait_path(&lab, 1, to, "direct");
    }

    lab.host(1).block_vxlan();
    for to in [2, 3] {
        wait_path(&lab, 1, to, "relay");
        wait_path(&lab, to, 1, "relay");
    }
    // Hosts 2 and 3 still talk directly.
    wait_path(&lab, 2, 3, "direct");
    let dev = vxlan_dev(&lab.host(1).inspect(NET));
    let tap = dev.replace("wrx-", "wrt-");
    let bridge_fdb = lab.host(1).ns.exec_ok("bridge", &["fdb", "show", "dev", &tap]);
    assert!(
        bridge_fdb.contains(&mac_of(eps[1].1)),
        "worker's MAC should point at the tap: {bridge_fdb}"
    );

    let (ok, out) = ping(worker_ns, &["-c", "3", "-i", "0.2", "-W", "2", &api.to_string()]);
    assert!(ok, "ping over the relay path: {out}");
    let (ok, out) =
        ping(job_ns, &["-c", "1", "-M", "do", "-s", "1422", "-W", "2", &api.to_string()]);
    assert!(ok, "a full-size frame over the relay path (TLS + yamux): {out}");
    let before = lab.relayed_frames();
    let (sent, got) =
        transfer(worker_ns, api_ns, SocketAddr::from((*api, 7001)), MB10, WAIT).expect("over QUIC");
    assert_eq!(sent, got);
    let (sent, got) =
        transfer(job_ns, api_ns, SocketAddr::from((*api, 7002)), MB10, WAIT).expect("over yamux");
    assert_eq!(sent, got);
    let after = lab.relayed_frames();
    // 20 MB in pieces of at most 1100 bytes: well over 19000 datagrams.
    assert!(after > before + 19_000, "the transfers should ride the relay: {before} -> {after}");

    lab.host(1).unblock_vxlan();
    for to in [2, 3] {
        wait_path(&lab, 1, to, "direct");
        wait_path(&lab, to, 1, "direct");
    }
    let (ok, out) = ping(worker_ns, &["-c", "2", "-i", "0.2", "-W", "2", &api.to_string()]);
    assert!(ok, "ping after the direct path came back: {out}");
    let relayed = lab.relayed_frames();
    let (sent, got) =
        transfer(worker_ns, api_ns, SocketAddr::from((*api, 7003)), MB10, WAIT).expect("direct");
    assert_eq!(sent, got);
    assert!(lab.relayed_frames() < relayed + 50, "back on the direct path");
}

#[test]
fn gone_endpoints_and_hosts_are_withdrawn_everywhere() {
    // Host 3 uses TLS + yamux: killed, its session ends at once (QUIC would wait for its idle
    // timeout first).
    let opts = LabOpts {
        hosts: 3,
        grace: "2s".into(),
        agent_args: vec![vec![], vec![], vec!["--transport".into(), "tcp".into()]],
    };
    let Some(mut lab) = lab(opts) else { return };
    let eps = setup(&lab, &[(1, "api"), (2, "worker"), (3, "job")]);
    let (worker, job) = (eps[1].1, eps[2].1);
    let dev = vxlan_dev(&lab.host(1).inspect(NET));
    retry(WAIT, "hosts 1 and 2 know job", || {
        for h in [1, 2] {
            ensure!(lab.host(h).neighbours(&dev).iter().any(|(ip, _)| *ip == job.to_string()));
        }
        Ok(())
    });

    // An endpoint detached on host 2 leaves every other host's tables and DNS.
    lab.host(2).net_ok(&["detach", NET, "worker"]);
    retry(WAIT, "worker is gone from hosts 1 and 3", || {
        for h in [1, 3] {
            let host = lab.host(h);
            ensure!(
                !host.neighbours(&dev).iter().any(|(ip, _)| *ip == worker.to_string()),
                "neigh on {h}"
            );
            ensure!(
                !host.vxlan_fdb(&dev).iter().any(|(mac, _)| *mac == mac_of(worker)),
                "fdb on {h}"
            );
        }
        ensure!(dig_status(&eps[0].0, GATEWAY, "worker") == "NXDOMAIN", "DNS still answers worker");
        Ok(())
    });

    // Host 3's agent dies: after the grace period its entries are withdrawn on hosts 1 and 2.
    let host3 = lab.host(3).host_addr(NET);
    lab.host_mut(3).stop_agent(Signal::SIGKILL);
    retry(WAIT, "host 3's entries are withdrawn", || {
        for h in [1, 2] {
            let host = lab.host(h);
            ensure!(
                !host.neighbours(&dev).iter().any(|(ip, _)| *ip == job.to_string()),
                "job's neigh on {h}"
            );
            let fdb = host.vxlan_fdb(&dev);
            ensure!(!fdb.iter().any(|(_, dst)| dst == "192.168.99.3"), "fdb on {h}: {fdb:?}");
            ensure!(host.path_to(NET, host3).is_none(), "host 3 is still a peer of {h}");
        }
        ensure!(dig_status(&eps[0].0, GATEWAY, "job") == "NXDOMAIN");
        Ok(())
    });
    // Its address stays claimed for it: it comes back with the same one.
    let r = lab.relay_network(NET);
    let ep = r["endpoints"].as_array().into_iter().flatten().find(|e| e["name"] == "job").cloned();
    assert_eq!(ep.as_ref().map(|e| e["live"].clone()), Some(Value::Bool(false)), "{r}");
    lab.host_mut(3).start_agent();
    retry(WAIT, "job is back on host 1", || {
        ensure!(lab.host(1).neighbours(&dev).iter().any(|(ip, _)| *ip == job.to_string()));
        Ok(())
    });
    let (ok, out) = ping(&eps[0].0, &["-c", "2", "-i", "0.2", "-W", "2", &job.to_string()]);
    assert!(ok, "job answers again: {out}");
}

#[test]
fn global_ipam_never_hands_out_an_address_twice() {
    let Some(lab) = lab(LabOpts::default()) else { return };
    lab.host(1).net_ok(&["create", NET, "--driver", "overlay", "--subnet", "10.214.9.0/27"]);
    const PER_HOST: usize = 12;
    let sandboxes: Vec<(u8, Netns)> = (0..PER_HOST * 2)
        .map(|i| {
            let h = if i % 2 == 0 { 1 } else { 2 };
            (h, Netns::new(&format!("c{h}")))
        })
        .collect();
    // Every attach at once, half on each host.
    let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
        let handles: Vec<_> = sandboxes
            .iter()
            .enumerate()
            .map(|(i, (h, ns))| {
                let lab = &lab;
                s.spawn(move || lab.host(*h).attach(NET, ns, &format!("ep{i}"), &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("attach thread")).collect()
    });
    let unique: HashSet<&Ipv4Addr> = ips.iter().collect();
    assert_eq!(unique.len(), ips.len(), "an address was handed out twice: {ips:?}");
    let r = lab.relay_network(NET);
    let claimed: HashSet<&str> =
        r["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["ip"].as_str()).collect();
    assert_eq!(claimed.len(), ips.len(), "{r}");
    // A fixed address taken on the other host is refused, naming its holder.
    let ns = Netns::new("fix");
    let taken = ips[0].to_string();
    let out = lab.host(2).net(&[
        "attach",
        NET,
        "--netns",
        &ns.path_str(),
        "--name",
        "dup",
        "--ip",
        &taken,
    ]);
    out.fail_mentioning(&["taken", "host-1"]);
    // So is a name taken on the other host.
    let out = lab.host(2).net(&["attach", NET, "--netns", &ns.path_str(), "--name", "ep0"]);
    out.fail_mentioning(&["ep0", "taken"]);
    // And the subnet runs out cleanly: a /27 has 30 addresses; the gateway and the two hosts
    // take 3.
    let more: Vec<Netns> = (0..(30 - 3 - ips.len())).map(|_| Netns::new("x")).collect();
    for (i, ns) in more.iter().enumerate() {
        lab.host(1).attach(NET, ns, &format!("fill{i}"), &[]);
    }
    let links_before = lab.host(2).wr_links();
    let out = lab.host(2).net(&["attach", NET, "--netns", &ns.path_str(), "--name", "last"]);
    out.fail_mentioning(&["no free address"]);
    assert_eq!(ns.links(), BTreeSet::from(["lo".to_owned()]), "a refused attach leaves no eth0");
    assert_eq!(lab.host(2).wr_links(), links_before, "a refused attach leaves no veth");
}

#[test]
fn services_span_hosts() {
    let Some(lab) = lab(LabOpts { hosts: 3, ..LabOpts::default() }) else { return };
    let eps = setup(&lab, &[(1, "api"), (2, "api2"), (3, "client")]);
    let servers: Vec<_> =
        eps[..2].iter().map(|(ns, ip)| tcp_whoami(ns, SocketAddr::from((*ip, 9000)))).collect();
    let out = lab.host(3).net_ok(&[
        "service",
        "create",
        NET,
        "shop",
        "--mode",
        "vip",
        "--endpoints",
        "api,api2",
    ]);
    let vip: Ipv4Addr = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no vip in {out:?}"));
    lab.host(3).net_ok(&[
        "service",
        "create",
        NET,
        "search",
        "--mode",
        "dnsrr",
        "--endpoints",
        "api,api2",
    ]);
    let client = &eps[2].0;
    retry(WAIT, "shop resolves to its vip on every host", || {
        for (ns, _) in &eps {
            ensure!(dig(ns, GATEWAY, "shop", "A") == vec![vip.to_string()]);
        }
        Ok(())
    });
    let mut both: BTreeSet<String> = dig(client, GATEWAY, "search", "A").into_iter().collect();
    both.extend(dig(client, GATEWAY, "search", "A"));
    assert_eq!(both, BTreeSet::from([eps[0].1.to_string(), eps[1].1.to_string()]));
    let mut reached = BTreeSet::new();
    for _ in 0..20 {
        let w = tcp_whoami_ask(client, SocketAddr::from((vip, 9000)), Duration::from_secs(5))
            .expect("connect to the vip");
        reached.insert(w.local.ip().to_string());
        // Connections from host 3 reach the other hosts from host 3's own address.
        assert_eq!(w.peer.ip().to_string(), lab.host(3).host_addr(NET).to_string());
    }
    assert_eq!(
        reached,
        BTreeSet::from([eps[0].1.to_string(), eps[1].1.to_string()]),
        "20 connections to the vip should reach both hosts' endpoints"
    );
    drop(servers);
}

#[test]
fn lifecycle_and_bad_input() {
    let Some(lab) = lab(LabOpts::default()) else { return };
    let h1 = lab.host(1);
    let h2 = lab.host(2);
    h1.net(&["create", NET, "--driver", "vxlan"]).fail_mentioning(&["vxlan"]);
    h1.net(&["create", NET, "--driver", "overlay", "--gateway", "10.214.0.9"])
        .fail_mentioning(&["gateway"]);
    h1.net(&["create", NET, "--driver", "overlay", "--subnet", "10.214.0.1/24"])
        .fail_mentioning(&["host bits"]);
    h1.net_ok(&["create", NET, "--driver", "overlay"]);
    // Host 2 sees it without joining it, and cannot create it again.
    let ls = h2.net_ok(&["ls"]);
    let row = ls.lines().find(|l| l.starts_with(NET)).unwrap_or_else(|| panic!("{ls}"));
    assert!(row.ends_with("overlay") && row.contains(" - "), "not joined on host 2: {row}");
    assert!(h2.wr_links().is_empty(), "nothing is made on a host before it uses the network");
    h2.net(&["create", NET, "--driver", "overlay"]).fail_mentioning(&["exists"]);
    // The subnet default is a /24 of the relay's pool.
    let v = h1.inspect(NET);
    assert_eq!(v["subnet"], "10.214.0.0/24", "{v}");
    assert_eq!(v["mtu"], 1450, "{v}");
    let a = Netns::new("a");
    let b = Netns::new("b");
    h1.attach(NET, &a, "a", &[]);
    h2.attach(NET, &b, "b", &["--alias", "bee"]);
    // Removing needs every host's endpoints gone.
    h1.net(&["rm", NET, "--force"]).fail_mentioning(&["still has endpoints", "host-2"]);
    assert!(h1.wr_links().iter().any(|l| l.starts_with("wrb-")), "refused: host 1 keeps it");
    h2.net_ok(&["detach", NET, "b"]);
    h1.net_ok(&["rm", NET, "--force"]);
    retry(WAIT, "the network leaves both hosts", || {
        for h in [h1, h2] {
            ensure!(h.wr_links().is_empty(), "host {} keeps {:?}", h.index, h.wr_links());
            ensure!(!h.net_ok(&["ls"]).contains(NET), "host {} still lists it", h.index);
        }
        Ok(())
    });
    let (status, _) = lab.relay_api("GET", &format!("/api/v1/networks/{NET}"));
    assert_eq!(status, 404);
}

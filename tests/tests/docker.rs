//! Docker, against a real dockerd: the offline image, the sidecar, label-driven auto-expose and
//! the network and IPAM plugin.
//!
//! Every test runs as root with `docker` answering (`scripts/test-all` installs docker.io and
//! starts dockerd); containers sit on networks the test creates (`10.219.0.0/16`), and every
//! container and network is removed at the end, failed or not. The plugin's agent runs in the
//! host's namespace, where Docker expects the veths it moves into containers: do not run these
//! tests on a host whose own warren agent manages networks.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::Value;
use warren_tests::agent::Agent;
use warren_tests::client::http_get;
use warren_tests::docker::{
    BUSYBOX, Cleanup, IMAGE, PAGE, bridge_network, container_ip, docker, docker_fails, docker_ok,
    images, nc_get, plugin_socket_gid, require,
};
use warren_tests::netns::{Netns, retry};
use warren_tests::overlay::{LabOpts, OverlayLab, dig};
use warren_tests::relay::{Relay, RelayOpts};
use warren_tests::util::{TempDir, closed_port, unique};

const WAIT: Duration = Duration::from_secs(30);

/// Plugin agents run in this machine's namespace, where each renders warren's nftables table
/// from its own state: one at a time.
static HOST_AGENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs container `name` on `net` (with `extra` flags of `docker run`) serving the busybox page
/// on port 80.
fn httpd(name: &str, net: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--name", name, "--network", net];
    args.extend_from_slice(extra);
    args.extend([BUSYBOX, "busybox", "httpd", "-f", "-p", "80", "-h", "/www"]);
    docker_ok(&args);
}

/// Polls the relay until `host` answers the busybox page (or `absent`: 404).
async fn wait_page(relay: &Relay, host: &str, present: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http_get(relay.http_addr, host, "/").await {
            Ok(r) if present && r.status == 200 && r.text().contains(PAGE) => return,
            Ok(r) if !present && r.status == 404 => return,
            Ok(r) => last = format!("{} {:?}", r.status, r.text()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{host}: wanted {}, last answer {last}", if present { "the page" } else { "404" });
}

fn fingerprint(relay: &Relay) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&relay.ca_path)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.trim().rsplit('=').next().expect("fingerprint").to_owned()
}

#[test]
fn offline_image_builds_and_runs_both_binaries_as_non_root() {
    if !require() {
        return;
    }
    images();
    let v = docker_ok(&["run", "--rm", IMAGE, "--version"]);
    assert!(v.starts_with("warren "), "{v}");
    let v = docker_ok(&["run", "--rm", "--entrypoint", "warren-server", IMAGE, "--version"]);
    assert!(v.starts_with("warren-server "), "{v}");
    let help = docker_ok(&["run", "--rm", IMAGE, "agent", "--help"]);
    assert!(help.contains("--docker-plugin"), "{help}");
    let user = docker_ok(&["image", "inspect", "-f", "{{.Config.User}}", IMAGE]);
    assert_eq!(user, "10001:10001");
    // A wrong flag is an error with the usage, not a crash.
    let err = docker_fails(&["run", "--rm", IMAGE, "http", "80", "--bogus"]);
    assert!(err.contains("--bogus"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_in_the_apps_namespace_exposes_its_port() {
    if !require() {
        return;
    }
    images();
    let mut clean = Cleanup::default();
    let (net, gateway) = bridge_network(&mut clean, &unique("wt-side"), 11);
    let relay = Relay::start(RelayOpts::default().control(&format!("{gateway}:0"))).await;
    let app = clean.container(&unique("wt-app"));
    httpd(&app, &net, &[]);
    let side = clean.container(&unique("wt-sidecar"));
    let sub = unique("side");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &side,
        "--network",
        &format!("container:{app}"),
        IMAGE,
        "http",
        "80",
        "--subdomain",
        &sub,
        "--relay",
        &relay.control_addr.to_string(),
        "--token",
        relay.token(),
        "--relay-fingerprint",
        &fingerprint(&relay),
    ]);
    wait_page(&relay, &format!("{sub}.localhost"), true).await;
    // The sidecar printed the URL alone on stdout.
    let logs = docker(&["logs", &side]);
    let out = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(out.trim().starts_with(&format!("http://{sub}.localhost")), "{out}");
    // The app stops: the visitor gets the relay's error page, not a hang.
    docker_ok(&["stop", "-t", "1", &app]);
    let r = http_get(relay.http_addr, &format!("{sub}.localhost"), "/").await;
    assert!(r.map(|r| r.status != 200).unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_containers_get_tunnels_while_they_run() {
    if !require() {
        return;
    }
    images();
    let mut clean = Cleanup::default();
    let (net, _) = bridge_network(&mut clean, &unique("wt-expose"), 12);
    let relay = Relay::start_default().await;
    let run = |name: &str, labels: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name, "--network", &net];
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.extend([BUSYBOX, "busybox", "httpd", "-f", "-p", "80", "-h", "/www"]);
        docker_ok(&args);
    };
    // Running before the agent starts.
    let (early, sub_early) = (clean.container(&unique("wt-early")), unique("early"));
    run(&early, &["warren.http=80", &format!("warren.subdomain={sub_early}")]);
    // A misspelt option: no tunnel at all, rather than one without the wanted password.
    let typo = clean.container(&unique("wt-typo"));
    run(&typo, &["warren.http=80", "warren.basicauth=ann:pw", "warren.subdomain=typo"]);
    // No label: ignored.
    let plain = clean.container(&unique("wt-plain"));
    run(&plain, &[]);

    let tmp = TempDir::new("expose");
    let mut agent = relay.spawn_agent(
        "expose",
        [
            "agent",
            "--docker",
            "--no-networks",
            "--config-dir",
            tmp.dir("agent").to_str().expect("utf-8"),
        ],
    );
    wait_page(&relay, &format!("{sub_early}.localhost"), true).await;

    // Started later, with basic auth and a TCP tunnel beside the HTTP one.
    let (late, sub_late) = (clean.container(&unique("wt-late")), unique("late"));
    run(
        &late,
        &[
            "warren.http=80",
            "warren.tcp=80",
            &format!("warren.subdomain={sub_late}"),
            "warren.basic-auth=ann:s3cret",
        ],
    );
    let host = format!("{sub_late}.localhost");
    retry(WAIT, "the late container's tunnel", || {
        let r = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("Host: {host}")])
            .arg(format!("http://{}/", relay.http_addr))
            .output()?;
        anyhow::ensure!(String::from_utf8_lossy(&r.stdout) == "401", "{:?}", r.stdout);
        Ok(())
    });
    let page = std::process::Command::new("curl")
        .args(["-s", "-u", "ann:s3cret", "-H", &format!("Host: {host}")])
        .arg(format!("http://{}/", relay.http_addr))
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&page.stdout).contains(PAGE));

    // The agent's API says which container each tunnel serves.
    let api = agent.api().await;
    let tunnels = api.get("/api/tunnels").await.json();
    let by_name = |n: &str| -> Value {
        tunnels["tunnels"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == n).cloned())
            .unwrap_or(Value::Null)
    };
    let late_ip = container_ip(&late, &net);
    assert_eq!(by_name(&format!("{late}-http"))["container"], late.as_str(), "{tunnels:#}");
    assert_eq!(by_name(&format!("{late}-http"))["config"]["addr"], format!("{late_ip}:80"));
    assert_eq!(by_name(&format!("{late}-tcp"))["proto"], "tcp");
    assert_eq!(by_name(&format!("{early}-http"))["container"], early.as_str());
    assert!(by_name(&format!("{typo}-http")).is_null(), "{tunnels:#}");
    assert!(by_name(&format!("{plain}-http")).is_null());
    let tcp_url =
        by_name(&format!("{late}-tcp"))["public_url"].as_str().unwrap_or_default().to_owned();
    let tcp_port: u16 = tcp_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("tcp url");
    let raw = std::process::Command::new("curl")
        .args(["-s", "-u", "ann:s3cret"])
        .arg(format!("http://127.0.0.1:{tcp_port}/"))
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&raw.stdout).contains(PAGE), "TCP tunnel {tcp_url}");
    assert!(
        agent.stderr_text().contains("unknown label warren.basicauth"),
        "{}",
        agent.stderr_text()
    );

    // Stopped: the tunnel closes. Started again: it opens again.
    docker_ok(&["stop", "-t", "1", &early]);
    wait_page(&relay, &format!("{sub_early}.localhost"), false).await;
    docker_ok(&["start", &early]);
    wait_page(&relay, &format!("{sub_early}.localhost"), true).await;

    // Re-created with other labels: the new labels are followed.
    docker_ok(&["rm", "-f", &late]);
    let sub_new = unique("renamed");
    run(&late, &["warren.http=80", &format!("warren.subdomain={sub_new}")]);
    wait_page(&relay, &format!("{sub_new}.localhost"), true).await;
    wait_page(&relay, &format!("{sub_late}.localhost"), false).await;
    agent.assert_running();
}

/// The plugin's agent, on the host, with its plugin socket named `driver`, and `extra`
/// arguments.
fn plugin_agent(driver: &str, dir: &TempDir, extra: &[&str]) -> Agent {
    let socket = format!("/run/docker/plugins/{driver}.sock");
    let config = dir.dir("agent");
    let mut args = vec![
        "agent",
        "--docker-plugin",
        "--docker-plugin-socket",
        &socket,
        "--config-dir",
        config.to_str().expect("utf-8"),
        "--net-pool",
        warren_tests::docker::TEST_SUBNETS,
    ];
    args.extend_from_slice(extra);
    Agent::spawn(&format!("plugin-{driver}"), args)
}

/// On drop (after the plugin's agent, so declared before it), clears what a killed plugin
/// agent leaves on purpose (warren's nftables table and its chain in Docker's firewall, kept
/// across restarts) or cannot remove (its socket), failed or not.
struct PluginLeftovers(String);

impl Drop for PluginLeftovers {
    fn drop(&mut self) {
        clear_plugin_leftovers(&self.0);
    }
}

fn clear_plugin_leftovers(driver: &str) {
    let _ = std::fs::remove_file(format!("/run/docker/plugins/{driver}.sock"));
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", "warren"])
        .stderr(std::process::Stdio::null())
        .status();
    for args in [
        &["-w", "-D", "DOCKER-USER", "-j", "WARREN-DOCKER"][..],
        &["-w", "-F", "WARREN-DOCKER"],
        &["-w", "-X", "WARREN-DOCKER"],
    ] {
        let _ = std::process::Command::new("iptables").args(args).status();
    }
}

async fn networks(agent: &mut Agent) -> Value {
    agent.api().await.get("/api/networks").await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_networks_give_addresses_names_and_ports_and_leave_nothing() {
    if !require() {
        return;
    }
    images();
    let _one = HOST_AGENT.lock().await;
    let driver = unique("wt").replace('-', "");
    let tmp = TempDir::new("plugin");
    let _leftovers = PluginLeftovers(driver.clone());
    let mut agent = plugin_agent(&driver, &tmp, &[]);
    // Dropped before the agent: Docker's teardown calls need the plugin to answer.
    let mut clean = Cleanup::default();
    let _ = agent.api_addr().await;

    // Only root and the docker group may drive the plugin.
    let socket = std::fs::metadata(format!("/run/docker/plugins/{driver}.sock")).expect("socket");
    assert_eq!(socket.mode() & 0o777, 0o660, "the plugin socket's mode");
    assert_eq!(socket.gid(), plugin_socket_gid(), "the plugin socket's group");

    // Refusals Docker shows to the user as they are.
    let err = docker_fails(&["network", "create", "-d", &driver, &unique("wt-noipam")]);
    assert!(err.contains("--ipam-driver"), "{err}");
    for (flag, want) in [("--ipv6", "IPv4 only"), ("--internal", "--internal")] {
        let name = unique("wt-refused");
        let err = docker_fails(&[
            "network",
            "create",
            "-d",
            &driver,
            "--ipam-driver",
            &driver,
            flag,
            &name,
        ]);
        assert!(err.contains(want), "{flag}: {err}");
    }

    // A network with a subnet chosen by warren's IPAM, from the agent's pool.
    let net = clean.network(&unique("wt-net"));
    docker_ok(&["network", "create", "-d", &driver, "--ipam-driver", &driver, &net]);
    let subnet =
        docker_ok(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", &net]);
    assert!(subnet.starts_with("10.219.") && subnet.ends_with("/24"), "{subnet}");
    let gateway: Ipv4Addr =
        docker_ok(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", &net])
            .parse()
            .expect("gateway");
    let deadline = tokio::time::Instant::now() + WAIT;
    let ours = loop {
        let v = networks(&mut agent).await;
        let found = v["networks"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == net.as_str()).cloned());
        if let Some(n) = found {
            break n;
        }
        assert!(tokio::time::Instant::now() < deadline, "no warren network {net}: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ours["subnet"], subnet.as_str());
    let bridge = ours["bridge"].as_str().expect("bridge").to_owned();
    // Another network without a subnet gets another /24 (Docker asks again and again until a
    // pool overlaps nothing: each answer must differ).
    let other = clean.network(&unique("wt-other"));
    docker_ok(&["network", "create", "-d", &driver, "--ipam-driver", &driver, &other]);
    let other_subnet =
        docker_ok(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", &other]);
    assert_ne!(other_subnet, subnet);
    assert!(other_subnet.starts_with("10.219."), "{other_subnet}");

    let host_port = closed_port();
    let web = clean.container(&unique("wt-web"));
    httpd(&web, &net, &["--network-alias", "www", "-p", &format!("{host_port}:80")]);
    let cli = clean.container(&unique("wt-cli"));
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &cli,
        "--network",
        &net,
        "--dns",
        &gateway.to_string(),
        BUSYBOX,
        "sleep",
        "600",
    ]);
    let web_ip = container_ip(&web, &net);
    let cli_ip = container_ip(&cli, &net);
    assert_ne!(web_ip, cli_ip);
    // The Join's gateway is the default route, and Docker made no docker_gwbridge.
    let route = docker_ok(&["exec", &cli, "ip", "route"]);
    assert!(route.contains(&format!("default via {gateway}")), "{route}");
    let nets = docker_ok(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(!nets.lines().any(|n| n == "docker_gwbridge"), "{nets}");
    // The address and MAC Docker configured are warren's.
    let mac = docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").MacAddress}}}}"),
        &web,
    ]);
    let octets: Vec<u8> = web_ip.split('.').map(|o| o.parse().expect("octet")).collect();
    assert_eq!(
        mac,
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", octets[0], octets[1], octets[2], octets[3])
    );

    // Warren's DNS, on the gateway, knows the containers by name and alias.
    let web_name = format!("{web}.{net}");
    let looked = retry(WAIT, "warren DNS answers the container's name", || {
        let out = docker(&["exec", &cli, "nslookup", &web_name, &gateway.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(text.contains(&web_ip), "{text}");
        Ok(text)
    });
    assert!(looked.contains(&gateway.to_string()), "{looked}");
    let alias = docker(&["exec", &cli, "nslookup", &format!("www.{net}"), &gateway.to_string()]);
    assert!(String::from_utf8_lossy(&alias.stdout).contains(&web_ip));
    // ... and the container reaches the other by that name (Docker's resolver forwards it).
    let got = nc_get(&cli, &web_name, 80);
    assert!(String::from_utf8_lossy(&got.stdout).contains(PAGE), "{got:?}");

    // Docker's FORWARD chain lets warren's bridges through, by warren's own chain.
    let chain = std::process::Command::new("iptables")
        .args(["-w", "-S", "WARREN-DOCKER"])
        .output()
        .expect("iptables");
    let chain = String::from_utf8_lossy(&chain.stdout).into_owned();
    assert!(chain.contains("-A WARREN-DOCKER -i wrb+ -o wrb+ -j ACCEPT"), "{chain}");
    let user = docker_ok_cmd("iptables", &["-w", "-S", "DOCKER-USER"]);
    assert!(user.contains("-j WARREN-DOCKER"), "{user}");

    // -p is published by warren: reachable from the host.
    let page = curl_get(SocketAddr::from(([127, 0, 0, 1], host_port))).await;
    assert!(page.contains(PAGE), "{page}");

    // Published without a host port: refused with the way out.
    let nohost = clean.container(&unique("wt-nohost"));
    let err = docker_fails(&[
        "run",
        "-d",
        "--name",
        &nohost,
        "--network",
        &net,
        "-p",
        "80",
        BUSYBOX,
        "sleep",
        "60",
    ]);
    assert!(err.contains("give the host port"), "{err}");

    // The agent restarts in the middle: nothing handed out twice, and what ran goes on.
    agent.kill().await;
    agent = plugin_agent(&driver, &tmp, &[]);
    let _ = agent.api_addr().await;
    let third = clean.container(&unique("wt-third"));
    docker_ok(&["run", "-d", "--name", &third, "--network", &net, BUSYBOX, "sleep", "600"]);
    let third_ip = container_ip(&third, &net);
    for taken in [&web_ip, &cli_ip, &gateway.to_string()] {
        assert_ne!(&third_ip, taken, "address handed out twice after a restart");
    }
    // A network with its subnet and range given: --ip anywhere in the subnet is honoured
    // (and refused when taken), other addresses come from the range.
    let net2 = clean.network(&unique("wt-net2"));
    docker_ok(&[
        "network",
        "create",
        "-d",
        &driver,
        "--ipam-driver",
        &driver,
        "--subnet",
        "10.219.250.0/24",
        "--ip-range",
        "10.219.250.128/25",
        &net2,
    ]);
    let pinned = clean.container(&unique("wt-pinned"));
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &pinned,
        "--network",
        &net2,
        "--ip",
        "10.219.250.20",
        BUSYBOX,
        "sleep",
        "600",
    ]);
    assert_eq!(container_ip(&pinned, &net2), "10.219.250.20");
    let ranged = clean.container(&unique("wt-ranged"));
    docker_ok(&["run", "-d", "--name", &ranged, "--network", &net2, BUSYBOX, "sleep", "600"]);
    let last: u8 =
        container_ip(&ranged, &net2).rsplit('.').next().and_then(|o| o.parse().ok()).expect("ip");
    assert!(last >= 128, "outside --ip-range: .{last}");
    let clash = clean.container(&unique("wt-clash"));
    let err = docker_fails(&[
        "run",
        "-d",
        "--name",
        &clash,
        "--network",
        &net2,
        "--ip",
        "10.219.250.20",
        BUSYBOX,
        "sleep",
        "60",
    ]);
    assert!(err.contains("taken"), "{err}");
    let page = curl_get(SocketAddr::from(([127, 0, 0, 1], host_port))).await;
    assert!(page.contains(PAGE), "after the restart: {page}");
    let got = nc_get(&third, &web_ip, 80);
    assert!(String::from_utf8_lossy(&got.stdout).contains(PAGE), "{got:?}");

    // Removing containers and the network leaves no warren object behind.
    clean.run();
    let v = networks(&mut agent).await;
    assert!(
        v["networks"].as_array().is_some_and(|a| a.iter().all(|n| n["name"] != net.as_str())),
        "{v:#}"
    );
    let links = docker_free_links();
    assert!(!links.iter().any(|l| l.starts_with(&bridge)), "bridge left: {links:?}");
    let table = std::process::Command::new("nft")
        .args(["list", "table", "ip", "warren"])
        .output()
        .expect("nft");
    let rules = String::from_utf8_lossy(&table.stdout).into_owned();
    let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or(&subnet).to_owned();
    assert!(!rules.contains(&prefix) && !rules.contains(&bridge), "{rules}");
    assert!(!rules.contains(&host_port.to_string()), "{rules}");
    agent.assert_running();
    agent.kill().await;
}

/// An overlay network's addresses and names are the relay's: this machine's agent, connected to
/// the overlay lab's relay, and host 1 of the lab.
const OVERLAY_SUBNET: &str = "10.214.7.0/24";
const OVERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 214, 7, 1);

/// `docker network create` of a warren overlay `name` with `subnet`, by plugin `driver`.
fn overlay_network(driver: &str, subnet: &str, name: &str) {
    docker_ok(&plugin_create(driver, &["-o", "warren.driver=overlay", "--subnet", subnet, name]));
}

/// `network create -d DRIVER --ipam-driver DRIVER EXTRA...`, for `docker`.
fn plugin_create<'a>(driver: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["network", "create", "-d", driver, "--ipam-driver", driver];
    args.extend_from_slice(extra);
    args
}

async fn agent_connected(agent: &mut Agent) {
    let api = agent.api().await;
    for _ in 0..300 {
        let v: Value = api.get("/api/status").await.json();
        if v["connected"] == true {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the plugin's agent did not connect to the relay: {}", agent.stderr_text());
}

/// The relay's endpoints of `net`: name, address, aliases.
fn relay_endpoints(lab: &OverlayLab, net: &str) -> Vec<(String, String, Vec<String>)> {
    let (status, v) = lab.relay_api("GET", &format!("/api/v1/networks/{net}"));
    if status != 200 {
        return Vec::new();
    }
    v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let aliases = e["aliases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["ip"].as_str().unwrap_or_default().to_owned(),
                aliases,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_overlays_span_hosts_through_the_relay() {
    if !require() {
        return;
    }
    let Some(lab) = OverlayLab::start(LabOpts { hosts: 1, ..LabOpts::default() }) else {
        return;
    };
    if lab.wire_host_namespace(Ipv4Addr::new(192, 168, 99, 50)).is_none() {
        return;
    }
    images();
    let _one = HOST_AGENT.lock().await;
    let driver = unique("wt").replace('-', "");
    let tmp = TempDir::new("plugin-overlay");
    let relay =
        format!("{}:{}", warren_tests::overlay::RELAY_IP, warren_tests::overlay::CONTROL_PORT);
    let extra = [
        "--relay",
        relay.as_str(),
        "--token",
        warren_tests::overlay::TOKEN,
        "--insecure",
        "--agent-id",
        "docker-host",
    ];
    let _leftovers = PluginLeftovers(driver.clone());
    let mut agent = plugin_agent(&driver, &tmp, &extra);
    let mut clean = Cleanup::default();
    agent_connected(&mut agent).await;

    // Refusals, with the way out.
    let bad = unique("wt-bad");
    let err = docker_fails(&plugin_create(&driver, &["-o", "warren.driver=vxlan", &bad]));
    assert!(err.contains("bridge") && err.contains("overlay"), "{err}");
    let err = docker_fails(&plugin_create(
        &driver,
        &[
            "-o",
            "warren.driver=overlay",
            "--subnet",
            "10.214.8.0/24",
            "--gateway",
            "10.214.8.9",
            &bad,
        ],
    ));
    assert!(err.contains("first address (10.214.8.1)"), "{err}");

    let net = clean.network(&unique("wt-ov"));
    overlay_network(&driver, OVERLAY_SUBNET, &net);
    let web = clean.container(&unique("wt-ovweb"));
    httpd(&web, &net, &[]);
    let web_ip = container_ip(&web, &net);
    assert!(web_ip.starts_with("10.214.7."), "{web_ip}");
    // The relay handed the address out and knows the container by name.
    retry(WAIT, "the relay lists the container's endpoint with its name", || {
        let eps = relay_endpoints(&lab, &net);
        anyhow::ensure!(
            eps.iter().any(|(_, ip, aliases)| *ip == web_ip && aliases.contains(&web)),
            "{eps:?}"
        );
        Ok(())
    });
    let mtu = docker_ok(&["exec", &web, "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu, "1450");
    let route = docker_ok(&["exec", &web, "ip", "route"]);
    assert!(route.contains(&format!("default via {OVERLAY_GATEWAY}")), "{route}");
    // A MAC of the user's own would not be the one other hosts send to: refused, and the
    // address Docker asked for goes back to the relay.
    let own_mac = clean.container(&unique("wt-ownmac"));
    // (Docker's newer clients refuse --mac-address against API 1.41: created by the API.)
    let body = serde_json::json!({
        "Image": BUSYBOX, "Cmd": ["sleep", "60"], "MacAddress": "02:42:aa:bb:cc:dd",
        "HostConfig": { "NetworkMode": net },
    });
    let created = docker_ok_cmd(
        "curl",
        &[
            "-sS",
            "--fail-with-body",
            "--unix-socket",
            "/var/run/docker.sock",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &format!("http://localhost/v1.41/containers/create?name={own_mac}"),
        ],
    );
    assert!(created.contains("\"Id\""), "{created}");
    let err = docker_fails(&["start", &own_mac]);
    assert!(err.contains("--mac-address"), "{err}");
    retry(WAIT, "the refused container's address is released at the relay", || {
        let eps = relay_endpoints(&lab, &net);
        anyhow::ensure!(eps.len() == 1, "{eps:?}");
        Ok(())
    });

    // Host 1 joins the network and reaches the container by its name; the container reaches
    // host 1's endpoint back.
    let worker_ns = Netns::new("wk");
    let worker = lab.host(1).attach(&net, &worker_ns, "worker", &[]);
    let looked = dig(&worker_ns, OVERLAY_GATEWAY, &format!("{web}.{net}"), "A");
    assert_eq!(looked, vec![web_ip.clone()], "host 1 resolves the container");
    let url = format!("http://{web_ip}/");
    let page = retry(WAIT, "host 1 fetches the container's page over the overlay", || {
        let out = worker_ns.exec("curl", &["-sS", "--max-time", "3", &url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(text.contains(PAGE), "{text} {}", String::from_utf8_lossy(&out.stderr));
        Ok(text)
    });
    assert!(page.contains(PAGE));
    let out = docker(&["exec", &web, "nslookup", "worker", &OVERLAY_GATEWAY.to_string()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&worker.to_string()), "{out:?}");
    let out = docker(&["exec", &web, "ping", "-c", "1", "-W", "3", &worker.to_string()]);
    assert!(out.status.success(), "the container pings host 1's endpoint: {out:?}");

    // The agent restarts: the relay keeps the container's address for it, and hands a new
    // container another one.
    agent.kill().await;
    agent = plugin_agent(&driver, &tmp, &extra);
    agent_connected(&mut agent).await;
    let web2 = clean.container(&unique("wt-ovweb2"));
    docker_ok(&["run", "-d", "--name", &web2, "--network", &net, BUSYBOX, "sleep", "600"]);
    let web2_ip = container_ip(&web2, &net);
    for taken in [&web_ip, &worker.to_string(), &OVERLAY_GATEWAY.to_string()] {
        assert_ne!(&web2_ip, taken, "address handed out twice after a restart");
    }
    retry(WAIT, "after the restart host 1 still reaches the container", || {
        let out = worker_ns.exec("curl", &["-sS", "--max-time", "3", &url]);
        anyhow::ensure!(String::from_utf8_lossy(&out.stdout).contains(PAGE), "{out:?}");
        Ok(())
    });
    let eps = relay_endpoints(&lab, &net);
    assert_eq!(eps.iter().filter(|(_, ip, _)| *ip == web_ip).count(), 1, "{eps:?}");

    // An overlay another host made: joined with its subnet, refused with another (at the first
    // container, since Docker names the network only after creating it).
    let theirs = unique("wt-theirs");
    let out = lab.host(1).net_ok(&[
        "create",
        &theirs,
        "--driver",
        "overlay",
        "--subnet",
        "10.214.10.0/24",
    ]);
    assert!(out.contains("overlay VNI"), "{out}");
    let mine = clean.network(&theirs);
    overlay_network(&driver, "10.214.11.0/24", &mine);
    let wrong = clean.container(&unique("wt-wrong"));
    let err =
        docker_fails(&["run", "-d", "--name", &wrong, "--network", &mine, BUSYBOX, "sleep", "60"]);
    assert!(err.contains("--subnet 10.214.10.0/24"), "{err}");
    docker_ok(&["rm", "-f", &wrong]);
    docker_ok(&["network", "rm", &mine]);
    overlay_network(&driver, "10.214.10.0/24", &mine);
    let right = clean.container(&unique("wt-right"));
    docker_ok(&["run", "-d", "--name", &right, "--network", &mine, BUSYBOX, "sleep", "600"]);
    let right_ip = container_ip(&right, &mine);
    assert!(right_ip.starts_with("10.214.10."), "{right_ip}");
    docker_ok(&["rm", "-f", &right]);
    docker_ok(&["network", "rm", &mine]);
    // The overlay had no endpoints left anywhere: it is gone at the relay too.
    let (status, _) = lab.relay_api("GET", &format!("/api/v1/networks/{theirs}"));
    assert_eq!(status, 404);

    // Removing the containers releases their addresses at the relay; removing the Docker
    // network (once host 1 has left it) deletes the overlay and leaves no device here.
    let links_before: Vec<String> =
        docker_free_links().into_iter().filter(|l| l.starts_with("wr")).collect();
    assert!(links_before.iter().any(|l| l.starts_with("wrx-")), "{links_before:?}");
    docker_ok(&["rm", "-f", &web, &web2]);
    retry(WAIT, "the relay forgets the containers' endpoints", || {
        let eps = relay_endpoints(&lab, &net);
        anyhow::ensure!(eps.iter().all(|(n, _, _)| n == "worker"), "{eps:?}");
        Ok(())
    });
    lab.host(1).net_ok(&["detach", &net, "worker"]);
    docker_ok(&["network", "rm", &net]);
    let (status, v) = lab.relay_api("GET", &format!("/api/v1/networks/{net}"));
    assert_eq!(status, 404, "the overlay should be gone at the relay: {v}");
    let left: Vec<String> = docker_free_links()
        .into_iter()
        .filter(|l| l.starts_with("wrb-v") || l.starts_with("wrx-") || l.starts_with("wrt-"))
        .collect();
    assert!(left.is_empty(), "overlay devices left: {left:?}");
    clean.run();
    agent.assert_running();
    agent.kill().await;
}

/// `PROGRAM ARGS...`: its stdout.
fn docker_ok_cmd(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program).args(args).output().expect(program);
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host's interface names.
fn docker_free_links() -> Vec<String> {
    let out = std::process::Command::new("ip").args(["-o", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_owned()))
        .collect()
}

/// `GET /` with curl; the body, or the error.
async fn curl_get(addr: SocketAddr) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

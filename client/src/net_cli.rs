//! `warren net ...`: the networks of a running agent, through its local API.

use std::io::Write;
use std::net::SocketAddr;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use warren_client::api_access::LocalApi;

use crate::{agent_api, is_not_found};

/// Options of the agent's networks (`warren agent`).
#[derive(Debug, Args)]
pub(crate) struct NetOpts {
    /// Subnets of new networks are /24s of this pool unless --subnet is given.
    #[arg(long, value_name = "CIDR", default_value = "10.213.0.0/16")]
    pub(crate) net_pool: ipnet::Ipv4Net,
    /// Where the networks' DNS sends names it does not know (repeatable; default: the
    /// nameservers of /etc/resolv.conf).
    #[arg(long, value_name = "IP[:PORT]", value_parser = warren_client::net::dns::parse_upstream)]
    pub(crate) dns_upstream: Vec<SocketAddr>,
    /// TTL of the networks' DNS answers, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub(crate) dns_ttl: u32,
    /// Do not manage networks.
    #[arg(long)]
    pub(crate) no_networks: bool,
    /// This host's VXLAN endpoint for overlay networks: the underlay address other hosts
    /// reach it at (default: the address this host reaches the relay from).
    #[arg(long, value_name = "IP")]
    pub(crate) vtep: Option<std::net::Ipv4Addr>,
    /// The UDP port of VXLAN between hosts (4789, IANA's; Linux's own default is 8472).
    #[arg(long, value_name = "PORT", default_value_t = 4789)]
    pub(crate) vxlan_port: u16,
}

#[derive(Debug, Subcommand)]
pub(crate) enum NetCmd {
    /// Create a network: a subnet, a gateway on a new bridge, NAT to the outside and a DNS
    /// server on the gateway; with --driver overlay, one subnet across every agent of the
    /// relay account, carried by VXLAN between hosts (or by the relay where hosts cannot reach
    /// each other).
    #[command(
        after_help = "Examples:\n  warren net create web                           a free /24 of the pool (10.213.0.0/16)\n  warren net create web --subnet 10.213.5.0/24\n  warren net create big --subnet 10.220.0.0/22 --ip-range 10.220.1.0/24\n  warren net create backend --driver overlay      a free /24 of the relay's pool (10.214.0.0/16)\n  warren net create backend --driver overlay --subnet 10.214.7.0/24\n\nOverlay networks need `warren agent` connected to a relay; every agent of the same\naccount (token) sees them: `warren net run backend ...` on another host joins it."
    )]
    Create {
        /// The name: a DNS label (a-z, 0-9, '-'); also the network's DNS domain.
        name: String,
        /// bridge (this host) or overlay (across hosts, through the relay).
        #[arg(long, short, default_value = "bridge", value_parser = ["bridge", "overlay"])]
        driver: String,
        /// The subnet (default: the first free /24 of the agent's --net-pool that no network
        /// or host route uses).
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// The gateway address, on the bridge (default: the subnet's first address).
        #[arg(long, value_name = "IP")]
        gateway: Option<String>,
        /// Hand endpoint addresses out from this part of the subnet only.
        #[arg(long, value_name = "CIDR")]
        ip_range: Option<String>,
        /// MTU of the bridge and its endpoints (default: 1500; overlays 1450, the VXLAN
        /// header's 50 bytes below a 1500-byte underlay).
        #[arg(long, value_name = "BYTES")]
        mtu: Option<u32>,
    },
    /// List the networks.
    Ls,
    /// Show a network with its endpoints, published ports and services, as JSON.
    Inspect {
        /// The network.
        name: String,
    },
    /// Remove a network: its bridge, rules, DNS server and state.
    Rm {
        /// The network.
        name: String,
        /// Detach its endpoints first instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Attach an existing network namespace (by path, or a process's) as an endpoint.
    #[command(
        after_help = "Examples:\n  ip netns add db\n  warren net attach web --netns /run/netns/db --name db --alias postgres\n  warren net attach web --pid 4242 --name worker --ip 10.213.5.20"
    )]
    Attach {
        /// The network.
        network: String,
        /// The namespace file, e.g. /run/netns/db.
        #[arg(long, value_name = "PATH", required_unless_present = "pid", conflicts_with = "pid")]
        netns: Option<String>,
        /// Use this process's network namespace.
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        #[command(flatten)]
        ep: EndpointArgs,
    },
    /// Detach an endpoint: its veth and address go, its published ports too.
    Detach {
        /// The network.
        network: String,
        /// The endpoint.
        name: String,
    },
    /// Run a command in a new network namespace attached to a network; the endpoint goes when
    /// the command ends. Exits with the command's status.
    #[command(
        after_help = "Examples:\n  warren net run web --name api -- python3 -m http.server 8000\n  warren net run web --name job -- sh -c 'curl http://api:8000/'"
    )]
    Run {
        /// The network.
        network: String,
        #[command(flatten)]
        ep: EndpointArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        cmd: Vec<String>,
    },
    /// Publish an endpoint's port on a host port (DNAT), TCP or UDP.
    #[command(
        after_help = "Examples:\n  warren net publish web api 8080:8000\n  warren net publish web dns 5353:53 --proto udp\n  warren net publish web api 8443:443 --host-ip 192.0.2.10\n\nThe port answers on the host's addresses from outside and from the host itself\n(127.0.0.1 for TCP too, through the agent)."
    )]
    Publish {
        /// The network.
        network: String,
        /// The endpoint.
        endpoint: String,
        /// HOST_PORT:PORT (or just PORT for both).
        mapping: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Only on this host address.
        #[arg(long, value_name = "IP")]
        host_ip: Option<String>,
    },
    /// Stop publishing a host port.
    Unpublish {
        /// The network.
        network: String,
        /// The host port.
        host_port: u16,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// The host address it was published on.
        #[arg(long, value_name = "IP")]
        host_ip: Option<String>,
    },
    /// Services: one name for several endpoints.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
}

#[derive(Debug, Args)]
pub(crate) struct EndpointArgs {
    /// The endpoint's name (a DNS label): NAME and NAME.NETWORK resolve to it.
    #[arg(long)]
    name: String,
    /// Another name for it (repeatable); several endpoints may share an alias.
    #[arg(long, value_name = "NAME")]
    alias: Vec<String>,
    /// A fixed address (default: the next free one).
    #[arg(long, value_name = "IP")]
    ip: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCmd {
    /// Create a service over some endpoints.
    #[command(
        after_help = "Examples:\n  warren net service create web shop --mode vip --endpoints api,api2\n  warren net service create web search --mode dnsrr --endpoints s1,s2,s3\n\nvip: SHOP resolves to one virtual address; each connection to it goes to one of the\n     healthy endpoints in turn (nftables).\ndnsrr: SHOP resolves to every endpoint's address, in a new order for each answer."
    )]
    Create {
        /// The network.
        network: String,
        /// The service's name.
        name: String,
        /// vip or dnsrr.
        #[arg(long, default_value = "vip")]
        mode: String,
        /// Its endpoints, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
    },
    /// Remove a service.
    Rm {
        /// The network.
        network: String,
        /// The service.
        name: String,
    },
}

fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn out(line: impl std::fmt::Display) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
}

fn warn_all(v: &Value) {
    for w in v["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
}

/// Runs one `warren net` command; returns the exit code.
pub(crate) async fn run(api: &LocalApi, cmd: NetCmd) -> anyhow::Result<u8> {
    match cmd {
        NetCmd::Create { name, driver, subnet, gateway, ip_range, mtu } => {
            let body = json!({"name": name, "driver": driver, "subnet": subnet,
                "gateway": gateway, "ip_range": ip_range, "mtu": mtu});
            let v = agent_api(api, "POST", "/api/networks", Some(body.to_string())).await?;
            warn_all(&v);
            let overlay = match v["overlay"]["vni"].as_u64() {
                Some(vni) => format!(
                    ", overlay VNI {vni}, this host {}, VTEP {}",
                    v["overlay"]["host_addr"].as_str().unwrap_or("?"),
                    v["overlay"]["vtep"].as_str().unwrap_or("?")
                ),
                None => String::new(),
            };
            out(format_args!(
                "created network {}: subnet {}, gateway {}, bridge {}{overlay}",
                v["name"].as_str().unwrap_or("?"),
                v["subnet"].as_str().unwrap_or("?"),
                v["gateway"].as_str().unwrap_or("?"),
                v["bridge"].as_str().unwrap_or("?")
            ));
        }
        NetCmd::Ls => {
            let v = agent_api(api, "GET", "/api/networks", None).await?;
            let nets = v["networks"].as_array().cloned().unwrap_or_default();
            // The columns of bridge networks come first, in their order; DRIVER last.
            out(format_args!(
                "{:<20} {:<18} {:<15} {:<13} {:<40} DRIVER",
                "NAME", "SUBNET", "GATEWAY", "BRIDGE", "ENDPOINTS"
            ));
            for n in nets {
                let mut eps: Vec<String> = n["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["name"].as_str().map(str::to_owned))
                    .collect();
                // Endpoints on other hosts, with the path to them.
                let peers = n["overlay"]["peers"].as_array().cloned().unwrap_or_default();
                for e in n["overlay"]["remote_endpoints"].as_array().into_iter().flatten() {
                    let path = peers
                        .iter()
                        .find(|p| p["addr"] == e["peer"])
                        .and_then(|p| p["path"].as_str())
                        .unwrap_or("?");
                    eps.push(format!(
                        "{}@{}({path})",
                        e["name"].as_str().unwrap_or("?"),
                        e["peer"].as_str().unwrap_or("?")
                    ));
                }
                // An overlay this host has not joined has no bridge here yet.
                let bridge = match n["overlay"]["joined"].as_bool() {
                    Some(false) => "-",
                    _ => n["bridge"].as_str().unwrap_or("?"),
                };
                out(format_args!(
                    "{:<20} {:<18} {:<15} {:<13} {:<40} {}",
                    n["name"].as_str().unwrap_or("?"),
                    n["subnet"].as_str().unwrap_or("?"),
                    n["gateway"].as_str().unwrap_or("?"),
                    bridge,
                    if eps.is_empty() { "-".to_owned() } else { eps.join(",") },
                    n["driver"].as_str().unwrap_or("?"),
                ));
            }
        }
        NetCmd::Inspect { name } => {
            let v = agent_api(api, "GET", &format!("/api/networks/{}", seg(&name)), None).await?;
            out(serde_json::to_string_pretty(&v)?);
        }
        NetCmd::Rm { name, force } => {
            let q = if force { "?force=true" } else { "" };
            agent_api(api, "DELETE", &format!("/api/networks/{}{q}", seg(&name)), None).await?;
            out(format_args!("removed network {name}"));
        }
        NetCmd::Attach { network, netns, pid, ep } => {
            let body = json!({"name": ep.name, "netns": netns, "pid": pid, "ip": ep.ip,
                "aliases": ep.alias});
            let v = agent_api(
                api,
                "POST",
                &format!("/api/networks/{}/endpoints", seg(&network)),
                Some(body.to_string()),
            )
            .await?;
            out(format_args!(
                "attached {} to {network}: {}/{} ({} in {})",
                v["name"].as_str().unwrap_or("?"),
                v["ip"].as_str().unwrap_or("?"),
                v["prefix"],
                v["ifname"].as_str().unwrap_or("?"),
                v["netns"].as_str().unwrap_or("?")
            ));
        }
        NetCmd::Detach { network, name } => {
            agent_api(
                api,
                "DELETE",
                &format!("/api/networks/{}/endpoints/{}", seg(&network), seg(&name)),
                None,
            )
            .await?;
            out(format_args!("detached {name} from {network}"));
        }
        NetCmd::Run { network, ep, cmd } => return run_sandboxed(api, network, ep, cmd).await,
        NetCmd::Publish { network, endpoint, mapping, proto, host_ip } => {
            let (host, port) = match mapping.split_once(':') {
                Some((h, p)) => (h.to_owned(), p.to_owned()),
                None => (mapping.clone(), mapping.clone()),
            };
            let parse = |s: &str| {
                s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    anyhow::anyhow!("{mapping:?}: give HOST_PORT:PORT, ports 1 to 65535")
                })
            };
            let body = json!({"endpoint": endpoint, "host_port": parse(&host)?,
                "port": parse(&port)?, "proto": proto, "host_ip": host_ip});
            let v = agent_api(
                api,
                "POST",
                &format!("/api/networks/{}/ports", seg(&network)),
                Some(body.to_string()),
            )
            .await?;
            out(format_args!(
                "published {}:{}/{} -> {endpoint}:{}",
                v["host_ip"].as_str().unwrap_or("*"),
                v["host_port"],
                v["proto"].as_str().unwrap_or("?"),
                v["port"]
            ));
        }
        NetCmd::Unpublish { network, host_port, proto, host_ip } => {
            let q = host_ip.map(|h| format!("?host_ip={}", seg(&h))).unwrap_or_default();
            agent_api(
                api,
                "DELETE",
                &format!("/api/networks/{}/ports/{}/{host_port}{q}", seg(&network), seg(&proto)),
                None,
            )
            .await?;
            out(format_args!("unpublished {host_port}/{proto}"));
        }
        NetCmd::Service { cmd: ServiceCmd::Create { network, name, mode, endpoints } } => {
            let body = json!({"name": name, "mode": mode, "endpoints": endpoints});
            let v = agent_api(
                api,
                "POST",
                &format!("/api/networks/{}/services", seg(&network)),
                Some(body.to_string()),
            )
            .await?;
            match v["vip"].as_str() {
                Some(vip) => out(format_args!("service {name} on {network}: vip {vip}")),
                None => out(format_args!("service {name} on {network}: dnsrr")),
            }
        }
        NetCmd::Service { cmd: ServiceCmd::Rm { network, name } } => {
            agent_api(
                api,
                "DELETE",
                &format!("/api/networks/{}/services/{}", seg(&network), seg(&name)),
                None,
            )
            .await?;
            out(format_args!("removed service {name}"));
        }
    }
    Ok(0)
}

/// `warren net run`: the parent side (see `warren_client::net::sandbox`).
async fn run_sandboxed(
    api: &LocalApi,
    network: String,
    ep: EndpointArgs,
    cmd: Vec<String>,
) -> anyhow::Result<u8> {
    use warren_client::net::sandbox;
    // Fail early, before anything is started, when the network does not exist.
    agent_api(api, "GET", &format!("/api/networks/{}", seg(&network)), None).await?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg(sandbox::CHILD_COMMAND)
        .arg(&network)
        .arg("--")
        .args(&cmd)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("the sandbox process ended at once"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sandbox::has_own_netns(pid) {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("the sandbox process ended before it was attached ({status})");
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the sandbox process did not create its namespace");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let body = json!({"name": ep.name, "pid": pid, "ip": ep.ip, "aliases": ep.alias});
    let attached = agent_api(
        api,
        "POST",
        &format!("/api/networks/{}/endpoints", seg(&network)),
        Some(body.to_string()),
    )
    .await;
    let v = match attached {
        Ok(v) => v,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e);
        }
    };
    eprintln!(
        "{} on {network}: {}/{} (pid {pid})",
        ep.name,
        v["ip"].as_str().unwrap_or("?"),
        v["prefix"]
    );
    let status = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                s = child.wait() => break s?,
                _ = term.recv() => { let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM); }
                // Ctrl-C reaches the command itself (same process group); wait for it.
                _ = int.recv() => {}
            }
        }
    };
    let gone = agent_api(
        api,
        "DELETE",
        &format!("/api/networks/{}/endpoints/{}", seg(&network), seg(&ep.name)),
        None,
    )
    .await;
    if let Err(e) = gone
        && !is_not_found(&e)
    {
        eprintln!("warning: endpoint {} not removed: {e:#}", ep.name);
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    })
}

//! Several "hosts" on one underlay, each running `warren agent`, and the relay on another:
//! the topology of the overlay network tests.
//!
//! - Namespace S holds bridge `br0`, the underlay switch. Host `i` (a namespace) has `u0`
//!   192.168.99.`i`/24 on it; the relay's namespace R has `u0` 192.168.99.100/24.
//! - The relay (`warren-server`) runs in R with its control port on 192.168.99.100:7443 and its
//!   API on 127.0.0.1:7400 (its own namespace: fixed ports collide with nothing).
//! - Each host runs `warren agent --relay 192.168.99.100:7443` with its API on 127.0.0.1:4040
//!   (the CLI's default there), its agent id `host-i` and its own config dir.
//! - [`OverlayHost::block_vxlan`] adds an nftables table of the test's own to a host that drops
//!   VXLAN both ways, until [`OverlayHost::unblock_vxlan`].
//! - [`transfer`]: bytes from one sandbox to a server in another, SHA-256 checked at both ends.
//!
//! Everything lives in namespaces made here and goes with them on drop (agents are stopped
//! first, by PID). Traffic only flows inside them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::netns::{
    AGENT_API, AGENT_READY_TIMEOUT, CMD_TIMEOUT, CliOut, Netns, NsDaemon, api_call, attach_with,
    output_in, require, retry,
};
use crate::process::{binary, scrub_env};
use crate::util::TempDir;

/// The relay's underlay address.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 100);

/// The relay's control port (inside its namespace).
pub const CONTROL_PORT: u16 = 7443;

/// The relay's API (inside its namespace).
pub const RELAY_API: &str = "127.0.0.1:7400";

/// The relay's admin token.
pub const ADMIN: &str = "overlay-admin";

/// The token every agent presents (one account).
pub const TOKEN: &str = "overlay-token";

/// How the lab is built.
#[derive(Debug, Clone)]
pub struct LabOpts {
    /// Hosts, numbered from 1.
    pub hosts: u8,
    /// `--lease-grace` of the relay: how long a vanished host's entries stay.
    pub grace: String,
    /// Extra agent arguments per host (index 0 = host 1).
    pub agent_args: Vec<Vec<String>>,
}

impl Default for LabOpts {
    fn default() -> Self {
        Self { hosts: 2, grace: "3s".into(), agent_args: Vec::new() }
    }
}

/// One host: a namespace on the underlay running an agent.
#[derive(Debug)]
pub struct OverlayHost {
    /// Its namespace.
    pub ns: Netns,
    /// Its number (its underlay address's last byte).
    pub index: u8,
    agent: Option<NsDaemon>,
    config: TempDir,
    args: Vec<String>,
    restarts: u32,
    past_logs: Vec<(String, String)>,
}

/// The underlay, the relay and the hosts.
#[derive(Debug)]
pub struct OverlayLab {
    /// The hosts, host 1 first.
    pub hosts: Vec<OverlayHost>,
    relay: Option<NsDaemon>,
    /// The relay's namespace.
    pub r: Netns,
    /// The underlay switch.
    pub s: Netns,
    _data: TempDir,
}

/// A switch namespace for an underlay: bridge `br0`, up.
pub fn underlay_switch() -> Netns {
    let s = Netns::new("sw");
    s.ip_ok(&["link", "add", "br0", "type", "bridge"]);
    s.ip_ok(&["link", "set", "br0", "up"]);
    s
}

/// Plugs `ns` into switch `s` (see [`underlay_switch`]): `u0` in `ns` with `ip`/24, its peer
/// `port` on `br0` (both go with either namespace).
pub fn wire(s: &Netns, ns: &Netns, port: &str, ip: Ipv4Addr) {
    ns.ip_ok(&["link", "add", "u0", "type", "veth", "peer", "name", port, "netns", s.name()]);
    s.ip_ok(&["link", "set", port, "master", "br0", "up"]);
    ns.ip_ok(&["addr", "add", &format!("{ip}/24"), "dev", "u0"]);
    ns.ip_ok(&["link", "set", "u0", "up"]);
}

impl OverlayLab {
    /// Builds the lab and starts the relay and every agent (each connected), or `None` (after
    /// printing why) when the test must skip.
    pub fn start(opts: LabOpts) -> Option<Self> {
        if !require(&["ping", "dig", "bridge"]) {
            return None;
        }
        let s = underlay_switch();
        let r = Netns::new("rel");
        wire(&s, &r, "pr", RELAY_IP);
        let data = TempDir::new("overlay-relay");
        let args: Vec<String> = [
            "--control",
            &format!("{RELAY_IP}:{CONTROL_PORT}"),
            "--http",
            "127.0.0.1:0",
            "--no-https",
            "--api",
            RELAY_API,
            "--admin-token",
            ADMIN,
            "--token",
            TOKEN,
            "--lease-grace",
            &opts.grace,
            "--data",
            &data.dir("data").display().to_string(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let relay = NsDaemon::spawn(&r, "relay", &binary("warren-server"), &args, &[]);
        let mut lab = Self { hosts: Vec::new(), relay: Some(relay), r, s, _data: data };
        retry(AGENT_READY_TIMEOUT, "the relay's API answers", || {
            let (status, _) = lab.relay_api("GET", "/api/v1/networks");
            ensure!(status == 200, "status {status}");
            Ok(())
        });
        for i in 1..=opts.hosts {
            let ns = Netns::new(&format!("h{i}"));
            wire(&lab.s, &ns, &format!("p{i}"), Ipv4Addr::new(192, 168, 99, i));
            let args = opts.agent_args.get(usize::from(i) - 1).cloned().unwrap_or_default();
            let mut host = OverlayHost {
                ns,
                index: i,
                agent: None,
                config: TempDir::new(&format!("overlay-host{i}")),
                args,
                restarts: 0,
                past_logs: Vec::new(),
            };
            host.start_agent();
            lab.hosts.push(host);
        }
        Some(lab)
    }

    /// Puts this machine's own namespace on the underlay as `ip`/24 (a veth `wtlab0` into the
    /// switch, gone with the lab's namespaces), for an agent that must run here (next to
    /// dockerd). `None`, after printing why, when the underlay's subnet is routed here already.
    pub fn wire_host_namespace(&self, ip: Ipv4Addr) -> Option<()> {
        let routes =
            crate::netns::run_here("ip", &["-4", "route", "show", "to", "match", "192.168.99.0"]);
        let text = String::from_utf8_lossy(&routes.stdout).into_owned();
        if text.lines().any(|l| !l.starts_with("default")) {
            eprintln!("skipped: 192.168.99.0/24 is routed on this machine already ({text})");
            return None;
        }
        let here = |args: &[&str]| {
            crate::netns::stdout_ok(
                &format!("ip {}", args.join(" ")),
                &crate::netns::run_here("ip", args),
            )
        };
        here(&[
            "link",
            "add",
            "wtlab0",
            "type",
            "veth",
            "peer",
            "name",
            "ph",
            "netns",
            self.s.name(),
        ]);
        self.s.ip_ok(&["link", "set", "ph", "master", "br0", "up"]);
        here(&["addr", "add", &format!("{ip}/24"), "dev", "wtlab0"]);
        here(&["link", "set", "wtlab0", "up"]);
        Some(())
    }

    /// Host `i` (from 1).
    pub fn host(&self, i: u8) -> &OverlayHost {
        &self.hosts[usize::from(i) - 1]
    }

    /// Host `i` (from 1), to restart or stop its agent.
    pub fn host_mut(&mut self, i: u8) -> &mut OverlayHost {
        &mut self.hosts[usize::from(i) - 1]
    }

    /// The relay's API with the admin token: `(status, body)`.
    pub fn relay_api(&self, method: &str, path: &str) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
            .arg(format!("http://{RELAY_API}{path}"));
        let out = output_in(Some(&self.r.path()), cmd, Duration::from_secs(15));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let json = serde_json::from_str(body).unwrap_or(Value::Null);
        (code.trim().parse().unwrap_or(0), json)
    }

    /// The relay's view of network `name`.
    pub fn relay_network(&self, name: &str) -> Value {
        let (status, v) = self.relay_api("GET", &format!("/api/v1/networks/{name}"));
        assert_eq!(status, 200, "GET /api/v1/networks/{name}: {v}");
        v
    }

    /// Frames the relay path carried so far.
    pub fn relayed_frames(&self) -> u64 {
        let (_, v) = self.relay_api("GET", "/api/v1/networks");
        v["relay_path"]["frames"].as_u64().unwrap_or(0)
    }
}

impl Drop for OverlayLab {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        for h in &mut self.hosts {
            if let Some(a) = h.agent.take() {
                drop(a);
            }
            if failing {
                for (label, log) in &h.past_logs {
                    eprintln!("----- {label} output -----\n{log}\n----- end of {label} -----");
                }
            }
        }
        if let Some(r) = self.relay.take() {
            drop(r);
        }
        // Then the namespaces go, with every link and table in them.
    }
}

impl OverlayHost {
    /// Its underlay address (its VTEP).
    pub fn underlay(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 99, self.index)
    }

    /// Its agent id.
    pub fn agent_id(&self) -> String {
        format!("host-{}", self.index)
    }

    /// Starts the agent and waits until it is connected to the relay.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent of host {} runs already", self.index);
        let mut args: Vec<String> = [
            "agent",
            "--relay",
            &format!("{RELAY_IP}:{CONTROL_PORT}"),
            "--token",
            TOKEN,
            "--insecure",
            "--agent-id",
            &self.agent_id(),
            "--api",
            AGENT_API,
            "--config-dir",
            &self.config.dir("agent").display().to_string(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(self.args.iter().cloned());
        let label = format!("agent#{} of host {}", self.restarts, self.index);
        self.agent = Some(NsDaemon::spawn(&self.ns, &label, &binary("warren"), &args, &[]));
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Some(status) = self.agent.as_mut().and_then(NsDaemon::exited) {
                panic!("the agent of host {} exited ({status}) before it connected", self.index);
            }
            let (status, v) = self.api("GET", "/api/status", None);
            if status == 200 && v["connected"] == true {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent of host {} did not connect within {AGENT_READY_TIMEOUT:?}: {status} {v}",
                self.index
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the agent with `sig` and waits for it.
    pub fn stop_agent(&mut self, sig: Signal) {
        if let Some(mut a) = self.agent.take() {
            let status = a.stop(sig);
            self.past_logs.push((
                format!("agent#{} of host {} ({status})", self.restarts, self.index),
                a.log(),
            ));
            self.restarts += 1;
        }
    }

    /// The running agent's output so far.
    pub fn log(&self) -> String {
        self.agent.as_ref().map(NsDaemon::log).unwrap_or_default()
    }

    /// The agent's local API: `(status, body)`.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        api_call(&self.ns, AGENT_API, method, path, body, Duration::from_secs(20))
    }

    /// The `warren net` CLI of this host's agent.
    pub fn cli(&self) -> NetCli<'_> {
        NetCli {
            ns: &self.ns,
            config_dir: self.config.dir("agent"),
            label: format!("host {}", self.index),
        }
    }

    /// `warren net ARGS...` on this host.
    pub fn net(&self, args: &[&str]) -> CliOut {
        self.cli().net(args)
    }

    /// `warren net ARGS...`, asserting success; its stdout.
    pub fn net_ok(&self, args: &[&str]) -> String {
        self.cli().net_ok(args)
    }

    /// `warren net inspect NET`, parsed.
    pub fn inspect(&self, net: &str) -> Value {
        self.cli().inspect(net)
    }

    /// Attaches sandbox `ns` to `net` as `name`; its address.
    pub fn attach(&self, net: &str, ns: &Netns, name: &str, extra: &[&str]) -> Ipv4Addr {
        self.cli().attach(net, ns, name, extra)
    }

    /// The path (`direct` or `relay`) this host uses to the member with address `peer`.
    pub fn path_to(&self, net: &str, peer: Ipv4Addr) -> Option<String> {
        self.cli().path_to(net, peer)
    }

    /// Its own address in overlay `net`.
    pub fn host_addr(&self, net: &str) -> Ipv4Addr {
        self.cli().host_addr(net)
    }

    /// The VXLAN device's own forwarding entries: (MAC, remote VTEP).
    pub fn vxlan_fdb(&self, dev: &str) -> Vec<(String, String)> {
        let out = self.ns.exec_ok("bridge", &["-j", "fdb", "show", "dev", dev]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Array(Vec::new()));
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["mac"].as_str()?.to_owned(), e["dst"].as_str()?.to_owned())))
            .collect()
    }

    /// The neighbour entries on `dev`: (IP, MAC).
    pub fn neighbours(&self, dev: &str) -> Vec<(String, String)> {
        self.ns
            .ip_json(&["neigh", "show", "dev", dev])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["dst"].as_str()?.to_owned(), e["lladdr"].as_str()?.to_owned())))
            .collect()
    }

    /// Drops VXLAN (UDP 4789) in and out of this host with a table of the test's own.
    pub fn block_vxlan(&self) {
        let rules = "table inet wtblock {\n chain in { type filter hook input priority -10; udp dport 4789 drop; }\n chain out { type filter hook output priority -10; udp dport 4789 drop; }\n}\n";
        let file = self.config.write("block.nft", rules);
        let out = self.ns.exec("nft", &["-f", &file.display().to_string()]);
        assert!(out.status.success(), "nft -f block: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Removes [`OverlayHost::block_vxlan`]'s table.
    pub fn unblock_vxlan(&self) {
        self.ns.exec_ok("nft", &["delete", "table", "inet", "wtblock"]);
    }

    /// Links whose name starts with `wr`.
    pub fn wr_links(&self) -> Vec<String> {
        self.ns.links().into_iter().filter(|l| l.starts_with("wr")).collect()
    }

    /// Its config dir.
    pub fn config_dir(&self) -> PathBuf {
        self.config.dir("agent")
    }
}

/// The `warren net` CLI of an agent that runs in namespace `ns` with config dir `config_dir`
/// (the CLI finds the agent through its `agent.json` there).
#[derive(Debug)]
pub struct NetCli<'a> {
    /// Where the CLI runs.
    pub ns: &'a Netns,
    /// The agent's config dir.
    pub config_dir: PathBuf,
    /// Who it is, for messages.
    pub label: String,
}

impl NetCli<'_> {
    /// `warren net ARGS...` against this agent.
    pub fn net(&self, args: &[&str]) -> CliOut {
        let mut cmd = Command::new(binary("warren"));
        cmd.arg("net").args(args);
        // The CLI finds the agent through agent.json in the agent's config dir.
        scrub_env(&mut cmd, [("WARREN_CONFIG_DIR", &self.config_dir)]);
        let out = output_in(Some(&self.ns.path()), cmd, CMD_TIMEOUT);
        CliOut::from_output(format!("warren net {} ({})", args.join(" "), self.label), out)
    }

    /// `warren net ARGS...`, asserting success; its stdout.
    pub fn net_ok(&self, args: &[&str]) -> String {
        self.net(args).ok().to_owned()
    }

    /// `warren net inspect NET`, parsed.
    pub fn inspect(&self, net: &str) -> Value {
        let text = self.net_ok(&["inspect", net]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("inspect {net}: not JSON ({e}): {text}"))
    }

    /// Attaches sandbox `ns` to `net` as `name` (`extra`: `--ip`, `--alias`...); its address.
    pub fn attach(&self, net: &str, ns: &Netns, name: &str, extra: &[&str]) -> Ipv4Addr {
        attach_with(|args| self.net(args), net, ns, name, extra)
    }

    /// The path (`direct` or `relay`) this host uses to the member with address `peer`.
    pub fn path_to(&self, net: &str, peer: Ipv4Addr) -> Option<String> {
        let v = self.inspect(net);
        v["overlay"]["peers"]
            .as_array()?
            .iter()
            .find(|p| p["addr"] == peer.to_string())
            .and_then(|p| p["path"].as_str().map(str::to_owned))
    }

    /// Its own address in overlay `net`.
    pub fn host_addr(&self, net: &str) -> Ipv4Addr {
        let v = self.inspect(net);
        v["overlay"]["host_addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{} has no address in {net}: {v}", self.label))
    }
}

fn enter(ns: &Netns) -> anyhow::Result<()> {
    let f = std::fs::File::open(ns.path()).context("open netns")?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")
}

fn sha256_hex(d: ring::digest::Digest) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `bytes` pseudo-random bytes from sandbox `from` to a server this function starts in
/// sandbox `to` on `addr`; both ends hash what passes. Returns (sent digest, received digest).
pub fn transfer(
    from: &Netns,
    to: &Netns,
    addr: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> anyhow::Result<(String, String)> {
    let server = {
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TcpListener> {
                enter(to)?;
                TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("bind thread panicked")))
        })?;
        std::thread::spawn(move || -> anyhow::Result<String> {
            listener.set_nonblocking(true)?;
            let deadline = Instant::now() + timeout;
            let (mut s, _) = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).context("no connection"),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(timeout))?;
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).context("read")?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
            let hex = sha256_hex(ctx.finish());
            s.write_all(hex.as_bytes()).context("write digest")?;
            Ok(hex)
        })
    };
    let sent = from.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(timeout))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut left = bytes;
        let mut chunk = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(chunk.len());
            for b in chunk[..n].chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = x.to_le_bytes();
                b.copy_from_slice(&v[..b.len()]);
            }
            s.write_all(&chunk[..n]).context("write")?;
            ctx.update(&chunk[..n]);
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = String::new();
        s.read_to_string(&mut echoed).context("read digest")?;
        let hex = sha256_hex(ctx.finish());
        ensure!(echoed == hex, "the server hashed {echoed:?}, the client sent {hex}");
        Ok(hex)
    })?;
    let received = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok((sent, received))
}

/// `ping` from `ns` with `args` (e.g. `-c 3 IP`); whether it succeeded and its output.
pub fn ping(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = ns.exec("ping", args);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `dig +short @SERVER NAME [TYPE]` from `ns`: the answer lines.
pub fn dig(ns: &Netns, server: Ipv4Addr, name: &str, qtype: &str) -> Vec<String> {
    let at = format!("@{server}");
    let out = ns.exec("dig", &["+short", "+time=2", "+tries=2", &at, name, qtype]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `dig @SERVER NAME` from `ns`: the status (`NOERROR`, `NXDOMAIN`, ...).
pub fn dig_status(ns: &Netns, server: Ipv4Addr, name: &str) -> String {
    let at = format!("@{server}");
    let out = ns.exec("dig", &["+time=2", "+tries=2", &at, name]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("?").to_owned()
}

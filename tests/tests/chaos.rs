//! The chaos suite: one relay with a data dir, and agent A serving an HTTP tunnel with a fixed
//! subdomain, a TCP tunnel with a fixed remote port and a forward opened through the relay's API.
//! While a load generator keeps requests flowing through every URL, faults hit the relay and
//! the agent one after another: SIGKILL and restart (once in the middle of the agents'
//! handshakes), SIGSTOP for longer than the heartbeat timeout, an agent SIGKILL, a restart with
//! another `--lease-grace`, a second relay and a locked database that must both be refused, and
//! 200 agents reconnecting at once. After each, every URL answers again with the same name and
//! port within 10 s, no tunnel exists twice at the relay, and the relay's and the agent's file
//! descriptors come back to within 10 of their count before.
//!
//! As root, agent A (a `warren agent` managing networks) and agent B (another `warren agent`,
//! same relay and account) live in namespaces of their own, each linked to the relay's by a
//! veth pair and to each other by an underlay switch; they share an overlay network with an
//! endpoint on each side, and after every fault a TCP whoami from B's endpoint to A's must
//! answer again within 10 s too. The overlay's path (direct VXLAN over the switch, or the
//! relay) is reported with it: the cut of A's link to the relay does not cut the direct path.
//!
//! Each fault's figures (time until every URL answered, failed requests, fds and RSS before and
//! after) are printed and appended as Markdown table rows to `target/chaos/TRANSPORT.md`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::ensure;
use futures::future::OptionFuture;
use http::StatusCode;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::time::Instant;
use warren_tests::netns::{self, Netns, NsServer, Uplink, tcp_whoami, tcp_whoami_ask};
use warren_tests::overlay::{NetCli, underlay_switch, wire};
use warren_tests::procfs::{TICKS_PER_SEC, cpu_ticks, tcp_sockets};
use warren_tests::{
    ADMIN_TOKEN, Agent, ApiClient, EchoBackend, HttpBackend, READY_TIMEOUT, Relay, RelayOpts,
    TempDir, Transport, eventually, expect_get, localhost, tcp_echo, try_eventually, unique,
};

/// How soon after a fault ends every URL must answer again.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// How far a process's fd count may end from its count before a fault.
const FD_SLACK: usize = 10;

/// How long the relay stays frozen: longer than the agents' 20 s heartbeat timeout.
const FROZEN_FOR: Duration = Duration::from_secs(25);

/// How long the path between agent A and the relay stays cut.
const PATH_DOWN_FOR: Duration = Duration::from_secs(30);

/// Agents in the thundering herd.
const HERD: usize = 200;

/// How soon after the relay's restart the whole herd must be bound again.
const HERD_BOUND_WITHIN: Duration = Duration::from_secs(30);

/// Longest run of seconds the relay may spend at >= 95 % of a core while the herd reconnects.
const MAX_PEGGED_RUN: usize = 10;

/// How long a refused relay start may take to exit (its SQLite busy timeout is 5 s).
const REFUSED_WITHIN: Duration = Duration::from_secs(15);

/// The overlay network A and B share, its subnet (in the relay's pool) and the port of the
/// whoami server on A's endpoint.
const NET: &str = "chaosnet";
const SUBNET: &str = "10.214.77.0/24";
const WHOAMI_PORT: u16 = 9000;

/// Agent A's and agent B's addresses on the underlay switch (their VXLAN endpoints).
const VTEP_A: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const VTEP_B: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 2);

/// How long one request of a URL may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between two requests of one load thread.
const LOAD_PACE: Duration = Duration::from_millis(50);

/// Longest a load thread runs, a bound in case the test forgets to stop it.
const LOAD_MAX: Duration = Duration::from_secs(900);

warren_tests::each_transport!(chaos);

/// One run at a time in this process: the two transports' runs would otherwise overlap (cargo
/// runs tests in parallel), doubling the herd and blurring each run's CPU and fd figures.
static ONE_RUN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(t: Transport) {
    let _alone = ONE_RUN.lock().await;
    let mut c = Chaos::start(t).await;

    for round in 1..=2 {
        c.fault(&format!("relay SIGKILL + restart #{round}"), async |c| c.relay.restart().await)
            .await;
    }
    c.fault("relay SIGKILL + restart #3, killed again mid-handshake", async |c| {
        c.restart_killing_mid_handshake().await;
    })
    .await;
    c.fault("relay SIGSTOP 25 s + SIGCONT", async |c| {
        c.relay.signal(Signal::SIGSTOP);
        tokio::time::sleep(FROZEN_FOR).await;
        c.relay.signal(Signal::SIGCONT);
    })
    .await;
    c.no_takeover_logged("after the relay was frozen");
    c.fault("agent SIGKILL + restart", async |c| {
        c.agent.kill().await;
        c.agent = spawn_agent_a(&c.relay, c.uplink.as_ref(), &c.agent_args);
    })
    .await;
    c.agent_has_its_urls().await;
    if c.uplink.is_some() {
        c.fault("path agent-relay dropped 30 s", async |c| c.cut_path().await).await;
        c.no_takeover_logged("after the path came back");
    }
    c.fault("relay restart with --lease-grace 2m", async |c| {
        c.relay.set_lease_grace("2m");
        c.relay.restart().await;
    })
    .await;
    c.fault("second relay on the same data dir (refused)", async |c| {
        c.second_relay_is_refused().await;
    })
    .await;
    c.fault("relay restart with its database locked (refused)", async |c| {
        c.locked_database_is_refused().await;
    })
    .await;
    c.fault("200 agents reconnecting at once", async |c| {
        let bound_after = c.herd().await;
        c.report.note(&format!(
            "the {HERD} agents were all bound again {bound_after:.1?} after the restart"
        ));
    })
    .await;

    c.no_takeover_logged("at the end");
    c.agent.assert_running();
    if let Some(o) = &mut c.overlay {
        o.agent_b.assert_running();
    }
    c.relay.assert_running();
    c.report.finish();
}

/// Everything of one run: the relay, agent A and what its tunnels point at, the load, the
/// report.
struct Chaos {
    t: Transport,
    tmp: TempDir,
    relay: Relay,
    web: HttpBackend,
    _echo: EchoBackend,
    agent: Agent,
    agent_args: Vec<String>,
    agent_id: String,
    /// What agent A's tunnels and forward were given: HTTP, TCP, forward.
    urls: Vec<String>,
    targets: Vec<Target>,
    load: Load,
    report: Report,
    /// As root: agent B and the overlay it shares with A (dropped before A's namespace).
    overlay: Option<Overlay>,
    /// As root: agent A's namespace and its link to the relay's (dropped last).
    uplink: Option<Uplink>,
}

impl Chaos {
    /// Starts the relay, the backends and agent A, opens the forward and starts the load.
    ///
    /// As root, agent A and its backends live in a namespace of their own, reaching the relay
    /// over a veth pair (so the path can be cut); otherwise everything is on loopback and the
    /// path-drop fault is skipped.
    async fn start(t: Transport) -> Self {
        let tmp = TempDir::new("chaos");
        let uplink = if netns::require(&["nsenter"]) {
            Some(Uplink::new("chaa"))
        } else {
            eprintln!("chaos {t}: agent A runs on loopback; the path-drop fault is skipped");
            None
        };
        let mut opts = RelayOpts::default().lease_grace("5m");
        if let Some(up) = &uplink {
            opts = opts.control(&format!("{}:0", up.host_ip));
        }
        let relay = Relay::start(opts).await;
        let (web, echo) = match &uplink {
            None => (HttpBackend::start_named("chaos-web").await, EchoBackend::start().await),
            Some(up) => {
                let bind = || up.ns().run(|| Ok(std::net::TcpListener::bind("127.0.0.1:0")?));
                let (web, echo) = (bind(), bind());
                (
                    HttpBackend::start_on(web.expect("bind in A's namespace"), "chaos-web"),
                    EchoBackend::start_on(echo.expect("bind in A's namespace")),
                )
            }
        };
        let agent_id = unique("chaos-a");
        let subdomain = unique("chaos");
        let tcp_port = relay.ports().low;
        let config = tmp.write(
            "agent-a.toml",
            &format!(
                "allow_forward = [\"127.0.0.0/8\"]\n\n\
                 [tunnels.web]\nproto = \"http\"\ntarget = \"{}\"\nsubdomain = \"{subdomain}\"\n\n\
                 [tunnels.db]\nproto = \"tcp\"\ntarget = \"{}\"\nremote_port = {tcp_port}\n",
                web.port(),
                echo.port()
            ),
        );
        let switch = uplink.as_ref().map(|up| {
            let switch = underlay_switch();
            wire(&switch, up.ns(), "pa", VTEP_A);
            switch
        });
        let mut agent_args = vec![
            "agent".to_owned(),
            "--config".into(),
            config.display().to_string(),
            "--config-dir".into(),
            tmp.dir("agent-a").display().to_string(),
            "--agent-id".into(),
            agent_id.clone(),
            "--transport".into(),
            t.as_str().into(),
        ];
        // A manages networks where it can (as root, in its namespace).
        match &uplink {
            Some(_) => agent_args.extend(["--vtep".to_owned(), VTEP_A.to_string()]),
            None => agent_args.push("--no-networks".to_owned()),
        }
        let mut agent = spawn_agent_a(&relay, uplink.as_ref(), &agent_args);
        let mut urls = agent.urls(2).await;
        urls.sort();
        let http_url = format!("http://{subdomain}.localhost:{}", relay.http_addr.port());
        let tcp_url = format!("tcp://localhost:{tcp_port}");
        assert_eq!(urls, [http_url.clone(), tcp_url.clone()], "agent A's URLs");

        let fwd = ApiClient::new(relay.api_addr, ADMIN_TOKEN)
            .post_json(
                "/api/v1/forwards",
                &json!({"agent": agent_id, "proto": "tcp", "target": echo.port().to_string()}),
            )
            .await
            .expect(StatusCode::CREATED);
        let fwd_url = fwd["url"].as_str().unwrap_or_else(|| panic!("no url in {fwd}")).to_owned();
        let fwd_port: u16 = fwd_url
            .strip_prefix("tcp://localhost:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the forward's URL {fwd_url} is not tcp://localhost:PORT"));

        let targets = vec![
            Target::Http {
                addr: relay.http_addr,
                host: format!("{subdomain}.localhost:{}", relay.http_addr.port()),
                greeting: web.greeting(),
            },
            Target::Echo { what: "tcp tunnel", addr: localhost(tcp_port) },
            Target::Echo { what: "forward", addr: localhost(fwd_port) },
        ];
        for target in &targets {
            eventually(READY_TIMEOUT, || target.probe()).await;
        }
        let overlay = match (&uplink, switch) {
            (Some(up), Some(switch)) => {
                Some(Overlay::start(t, &tmp, &relay, up, switch, tmp.dir("agent-a")).await)
            }
            _ => None,
        };
        let load = Load::start(&targets);
        let report = Report::new(t, uplink.is_some());
        Self {
            t,
            tmp,
            relay,
            web,
            _echo: echo,
            agent,
            agent_args,
            agent_id,
            urls: vec![http_url, tcp_url, fwd_url],
            targets,
            load,
            report,
            overlay,
            uplink,
        }
    }

    /// Runs one fault and the checks after it, and reports its figures.
    async fn fault(&mut self, name: &str, apply: impl AsyncFnOnce(&mut Self)) {
        eprintln!("chaos {}: {name}", self.t);
        let before = self.snapshot();
        let started = Instant::now();
        apply(self).await;
        let ended = Instant::now();
        // The URLs and the overlay are polled at the same time, each timed on its own.
        let overlay: OptionFuture<_> =
            self.overlay.as_ref().map(|o| o.wait_back(name, ended, BACK_WITHIN)).into();
        let (back, overlay) = futures::join!(self.wait_back(name, ended), overlay);
        self.check_tunnels(name).await;
        self.wait_fds(name, &before).await;
        let after = self.snapshot();
        let failed = self.load.failures_between(started, Instant::now());
        self.load.flows_again(name, ended).await;
        self.report.row(name, back, overlay, failed, &before, &after);
    }

    /// Restarts the relay, and kills it again as soon as the first agent has said hello to it,
    /// while the others are still reconnecting; then starts it for good.
    async fn restart_killing_mid_handshake(&mut self) {
        let seen = self.relay.stderr().len();
        self.relay.restart().await;
        let relay = &self.relay;
        eventually(READY_TIMEOUT, || async move {
            let lines = relay.stderr();
            ensure!(
                lines[seen..].iter().any(|l| l.contains("agent connected")),
                "no agent has reconnected to the restarted relay yet"
            );
            Ok(())
        })
        .await;
        self.relay.restart().await;
    }

    /// Cuts A's link to the relay for [`PATH_DOWN_FOR`], probing the overlay every few seconds
    /// meanwhile: on the direct path (over the switch, not the cut link) it must keep answering,
    /// also once the relay has given A's session up.
    async fn cut_path(&mut self) {
        const EVERY: Duration = Duration::from_secs(5);
        let end = Instant::now() + PATH_DOWN_FOR;
        let (mut direct, mut relayed) = (0, 0);
        self.uplink.as_ref().expect("an uplink").cut();
        // Bounded: PATH_DOWN_FOR / EVERY rounds.
        while Instant::now() + EVERY <= end {
            tokio::time::sleep(EVERY).await;
            let Some(o) = &self.overlay else { continue };
            let path = o.path_to_a();
            if path != "direct" {
                relayed += 1;
                continue;
            }
            if let Err(e) = o.probe().await {
                panic!(
                    "the overlay's direct path failed while A's link to the relay was cut: {e:#}"
                );
            }
            direct += 1;
        }
        tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
        self.uplink.as_ref().expect("an uplink").restore();
        if self.overlay.is_some() {
            self.report.note(&format!(
                "while A's link to the relay was cut, B's endpoint reached A's over the direct \
                 path in all {direct} probes made on it; {relayed} times B was on the relay path \
                 (not probed then: the cut breaks that path)"
            ));
        }
    }

    /// Agent A (restarted with the same config dir and identity) printed the URLs it had.
    async fn agent_has_its_urls(&mut self) {
        // Its two tunnels and the forward the relay opens again, in any order.
        let mut urls = self.agent.urls(self.urls.len()).await;
        urls.sort();
        let mut want = self.urls.clone();
        want.sort();
        assert_eq!(urls, want, "the restarted agent got other URLs");
    }

    /// A relay started on the data dir of the running one must exit at once, saying who holds
    /// it; the running relay goes on serving.
    async fn second_relay_is_refused(&mut self) {
        let pid = self.relay.pid().expect("the relay runs");
        let started = Instant::now();
        let err = match self.relay.try_second_on_data_dir(REFUSED_WITHIN).await {
            Ok(()) => panic!("a second relay served on the data dir of a running one"),
            Err(e) => e,
        };
        assert!(
            err.contains(&format!("is in use by another warren-server (pid {pid})"))
                && err.contains("use another --data dir"),
            "the second relay should say the data dir is in use, and by whom:\n{err}"
        );
        eprintln!("second relay refused after {:?}", started.elapsed());
        self.relay.assert_running();
    }

    /// The relay restarted while another process holds SQLite's lock on its database must
    /// refuse to start, clearly; once the lock is gone it starts and everything comes back.
    async fn locked_database_is_refused(&mut self) {
        self.relay.kill().await;
        let db = self.relay.data_dir.join("warren.db");
        let holder = rusqlite::Connection::open(&db)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", db.display()));
        holder.execute_batch("BEGIN EXCLUSIVE").expect("lock the relay's database");
        let err = match self.relay.try_restart(REFUSED_WITHIN).await {
            Ok(()) => panic!("the relay served with its database locked by another process"),
            Err(e) => e,
        };
        assert!(
            err.contains("is locked by another process") && err.contains("warren.db"),
            "the relay should say its database is locked by another process:\n{err}"
        );
        holder.execute_batch("COMMIT").expect("unlock the relay's database");
        drop(holder);
        self.relay.restart().await;
    }

    /// 200 small agents bound through the relay; the relay is restarted (and killed again while
    /// the first of them rebind) and all must be bound again within 30 s without the relay pegging a core for more than 10 s in a row. The fd
    /// check after runs once they are gone again.
    async fn herd(&mut self) -> Duration {
        raise_nofile_limit(8 * HERD as u64 + 1024);
        let mut herd: Vec<Agent> = (0..HERD)
            .map(|i| {
                let dir = self.tmp.dir(&format!("herd/{i}")).display().to_string();
                let args = [
                    "http".to_owned(),
                    self.web.port().to_string(),
                    "--no-api".into(),
                    "--transport".into(),
                    self.t.as_str().into(),
                    "--config-dir".into(),
                    dir,
                ];
                self.relay.spawn_agent(&format!("herd-{i}"), args)
            })
            .collect();
        for a in &mut herd {
            a.url().await;
        }
        let want = HERD + self.urls.len();
        self.online_tunnels(want, READY_TIMEOUT).await;

        self.restart_killing_mid_handshake().await;
        let restarted = Instant::now();
        let sampler = CpuSampler::start(self.relay.pid().expect("the relay runs"));
        self.online_tunnels(want, HERD_BOUND_WITHIN).await;
        let bound_after = restarted.elapsed();
        let busy = sampler.stop();
        let pegged = longest_pegged_run(&busy);
        eprintln!(
            "herd of {HERD} bound again after {bound_after:.1?}; relay CPU per second (ticks of \
             {TICKS_PER_SEC}): {busy:?}; longest pegged run {pegged} s"
        );
        assert!(
            pegged <= MAX_PEGGED_RUN,
            "the relay pegged a core for {pegged} s in a row while {HERD} agents reconnected \
             (at most {MAX_PEGGED_RUN}): {busy:?}"
        );
        for a in &mut herd {
            a.assert_running();
            a.kill().await;
        }
        bound_after
    }

    /// Waits until the relay lists `want` tunnels, all online, within `timeout`.
    async fn online_tunnels(&self, want: usize, timeout: Duration) {
        let api = self.relay.api_addr;
        eventually(timeout, || async move {
            let tunnels = relay_tunnels(api).await?;
            let online = tunnels.iter().filter(|t| t["status"] == "online").count();
            ensure!(online == want, "{online} of {want} tunnels online ({} listed)", tunnels.len());
            Ok(())
        })
        .await;
    }

    /// Polls every target until it answers, and returns how long after `since` the last one
    /// did; panics when one does not within [`BACK_WITHIN`].
    async fn wait_back(&self, fault: &str, since: Instant) -> Duration {
        let deadline = since + BACK_WITHIN;
        let probes = self.targets.iter().map(|target| async move {
            let left = deadline.saturating_duration_since(Instant::now());
            match try_eventually(left, || target.probe()).await {
                Ok(()) => Instant::now(),
                Err(e) => panic!(
                    "{fault}: {target} did not answer within {BACK_WITHIN:?} of the fault's end: \
                     {e:#}"
                ),
            }
        });
        let answered = futures::future::join_all(probes).await;
        answered.into_iter().max().unwrap_or(since).saturating_duration_since(since)
    }

    /// Every URL of agent A is listed once at the relay, online, and no URL twice.
    async fn check_tunnels(&self, fault: &str) {
        let tunnels = relay_tunnels(self.relay.api_addr)
            .await
            .unwrap_or_else(|e| panic!("{fault}: tunnel list: {e:#}"));
        let mut by_url: HashMap<&str, usize> = HashMap::new();
        for t in &tunnels {
            *by_url.entry(t["url"].as_str().unwrap_or("")).or_default() += 1;
        }
        let twice: Vec<_> = by_url.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{fault}: tunnels listed twice {twice:?}: {tunnels:#?}");
        for url in &self.urls {
            let t = tunnels.iter().find(|t| t["url"] == url.as_str());
            assert!(
                t.is_some_and(|t| t["status"] == "online" && t["agent_id"] == self.agent_id),
                "{fault}: {url} is not listed online for agent A: {tunnels:#?}"
            );
        }
    }

    /// Waits until the relay's and agent A's fd counts are within [`FD_SLACK`] of `before`.
    async fn wait_fds(&self, fault: &str, before: &Snapshot) {
        let result = try_eventually(BACK_WITHIN, || async {
            let now = self.snapshot();
            ensure!(
                now.relay_fds.abs_diff(before.relay_fds) <= FD_SLACK
                    && now.agent_fds.abs_diff(before.agent_fds) <= FD_SLACK,
                "fds relay {} -> {}, agent {} -> {}",
                before.relay_fds,
                now.relay_fds,
                before.agent_fds,
                now.agent_fds
            );
            Ok(())
        })
        .await;
        if let Err(e) = result {
            let relay = self.relay.pid().map(tcp_sockets).unwrap_or_default();
            let agent = self.agent.pid().map(tcp_sockets).unwrap_or_default();
            panic!(
                "{fault}: fd counts did not come back to within {FD_SLACK}: {e:#}\nrelay's TCP \
                 sockets:\n{relay}\nagent's TCP sockets:\n{agent}"
            );
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            relay_fds: self.relay.fd_count(),
            relay_rss: self.relay.rss_bytes(),
            agent_fds: self.agent.fd_count(),
            agent_rss: self.agent.rss_bytes(),
        }
    }

    /// Panics if agent A exited or ever said it lost a tunnel to another session.
    fn no_takeover_logged(&mut self, when: &str) {
        self.agent.assert_running();
        let said = self.agent.stderr().into_iter().find(|l| l.contains("taken over"));
        assert!(said.is_none(), "{when}: agent A was told a tunnel was taken over: {said:?}");
    }
}

/// As root: agent B, a `warren agent` in a namespace of its own linked to the relay's, and the
/// overlay network it shares with agent A: an endpoint on each side, a whoami server on A's.
/// Fields drop in order: agent B first, the namespaces last.
struct Overlay {
    agent_b: Agent,
    _whoami: NsServer,
    /// A's endpoint's overlay address.
    a_ep: Ipv4Addr,
    /// A's own address in the network (to ask B which path it uses to A).
    a_host: Ipv4Addr,
    /// B's endpoint: its sandbox and overlay address; A's endpoint's sandbox.
    b_ns: Arc<Netns>,
    b_ep: Ipv4Addr,
    _a_ns: Netns,
    b_config: PathBuf,
    b_uplink: Uplink,
    _switch: Netns,
}

impl Overlay {
    /// Agent A (in `a_up`'s namespace, on `switch` already, config dir `a_config`) creates the
    /// network and attaches an endpoint; agent B starts, joins the switch, attaches one; then
    /// waits until B's endpoint reaches A's.
    async fn start(
        t: Transport,
        tmp: &TempDir,
        relay: &Relay,
        a_up: &Uplink,
        switch: Netns,
        a_config: PathBuf,
    ) -> Self {
        let b_uplink = Uplink::new("chab");
        wire(&switch, b_uplink.ns(), "pb", VTEP_B);
        // B reaches the relay's address on A's link through its own link.
        b_uplink.ns().ip_ok(&[
            "route",
            "add",
            &format!("{}/32", a_up.host_ip),
            "via",
            &b_uplink.host_ip.to_string(),
        ]);
        let a = NetCli { ns: a_up.ns(), config_dir: a_config, label: "agent A".into() };
        let out = a.net_ok(&["create", NET, "--driver", "overlay", "--subnet", SUBNET]);
        assert!(out.contains("overlay VNI"), "create printed {out:?}");
        let a_ns = Netns::new("cea");
        let a_ep = a.attach(NET, &a_ns, "a-ep", &[]);
        let whoami = tcp_whoami(&a_ns, SocketAddr::from((a_ep, WHOAMI_PORT)));
        let a_host = a.host_addr(NET);

        let b_config = tmp.dir("agent-b");
        let mut args = vec![
            "agent".to_owned(),
            "--config-dir".into(),
            b_config.display().to_string(),
            "--agent-id".into(),
            unique("chaos-b"),
            "--transport".into(),
            t.as_str().into(),
            "--vtep".into(),
            VTEP_B.to_string(),
        ];
        args.extend(relay.agent_args());
        let agent_b = Agent::spawn_in_netns("agent-b", &b_uplink.ns().path(), args);
        let b_ns = Arc::new(Netns::new("ceb"));
        let b = NetCli { ns: b_uplink.ns(), config_dir: b_config.clone(), label: "agent B".into() };
        netns::retry(READY_TIMEOUT, "agent B sees the overlay network", || {
            let ls = b.net(&["ls"]);
            ensure!(ls.status.success() && ls.stdout.contains(NET), "{ls:?}");
            Ok(())
        });
        let b_ep = b.attach(NET, &b_ns, "b-ep", &[]);
        let o = Self {
            agent_b,
            _whoami: whoami,
            a_ep,
            a_host,
            b_ns,
            b_ep,
            _a_ns: a_ns,
            b_config,
            b_uplink,
            _switch: switch,
        };
        o.wait_back("the overlay's setup", Instant::now(), READY_TIMEOUT).await;
        // The faults start from the steady state: B's probes of the direct path answered.
        let direct = try_eventually(READY_TIMEOUT, || async {
            let path = o.path_to_a();
            ensure!(path == "direct", "B uses the {path} path to A");
            Ok(())
        })
        .await;
        if let Err(e) = direct {
            panic!("the overlay's direct path over the switch did not come up: {e:#}");
        }
        eprintln!("chaos {t}: B's endpoint reaches A's over the overlay (direct path)");
        o
    }

    /// One whoami from B's endpoint to A's, which must see B's endpoint's address.
    async fn probe(&self) -> anyhow::Result<()> {
        let (ns, to) = (self.b_ns.clone(), SocketAddr::from((self.a_ep, WHOAMI_PORT)));
        // A blocking call on a thread of its own (it enters B's endpoint's namespace).
        let w =
            tokio::task::spawn_blocking(move || tcp_whoami_ask(&ns, to, PROBE_TIMEOUT)).await??;
        ensure!(w.peer.ip() == self.b_ep, "{to} saw the client as {}, not {}", w.peer, self.b_ep);
        Ok(())
    }

    /// Polls [`Overlay::probe`] until it answers, and returns how long after `since` it did and
    /// the path B uses to A then; panics when it does not within `within` of `since`.
    async fn wait_back(&self, fault: &str, since: Instant, within: Duration) -> (Duration, String) {
        let left = (since + within).saturating_duration_since(Instant::now());
        if let Err(e) = try_eventually(left, || self.probe()).await {
            panic!(
                "{fault}: B's endpoint did not reach A's over the overlay within {within:?} of \
                 the fault's end: {e:#}"
            );
        }
        let back = Instant::now().saturating_duration_since(since);
        (back, self.path_to_a())
    }

    /// The path (`direct` or `relay`) B uses to A, as B's agent tells.
    fn path_to_a(&self) -> String {
        let b = NetCli {
            ns: self.b_uplink.ns(),
            config_dir: self.b_config.clone(),
            label: "agent B".into(),
        };
        // The CLI is a blocking child process.
        tokio::task::block_in_place(|| b.path_to(NET, self.a_host))
            .unwrap_or_else(|| "unknown".into())
    }
}

/// Starts agent A with `args` (and the relay's), in the uplink's namespace when there is one.
fn spawn_agent_a(relay: &Relay, uplink: Option<&Uplink>, args: &[String]) -> Agent {
    match uplink {
        None => relay.spawn_agent("agent-a", args),
        Some(up) => {
            let mut all = args.to_vec();
            all.extend(relay.agent_args());
            Agent::spawn_in_netns("agent-a", &up.ns().path(), all)
        }
    }
}

/// The relay's tunnel list (admin API).
async fn relay_tunnels(api: SocketAddr) -> anyhow::Result<Vec<Value>> {
    let resp = ApiClient::new(api, ADMIN_TOKEN)
        .try_send(http::Method::GET, "/api/v1/tunnels", &[], None)
        .await?;
    ensure!(resp.status == StatusCode::OK, "GET /api/v1/tunnels: {} {}", resp.status, resp.text());
    let v = resp.json();
    Ok(v["tunnels"].as_array().cloned().unwrap_or_default())
}

/// Raises this process's soft fd limit to at least `want` (children inherit it), within the
/// hard limit.
fn raise_nofile_limit(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        assert!(hard >= want, "RLIMIT_NOFILE hard limit {hard} is below the {want} the herd needs");
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("raise RLIMIT_NOFILE");
    }
}

/// One URL of agent A, and how to check it answers.
#[derive(Debug, Clone)]
enum Target {
    Http { addr: SocketAddr, host: String, greeting: String },
    Echo { what: &'static str, addr: SocketAddr },
}

impl Target {
    /// One request, given up after [`PROBE_TIMEOUT`] as a visitor would: a request that reached
    /// the relay just before a fault may hang on a half-dead session until the heartbeat notices,
    /// which says nothing about whether the URL answers again.
    async fn probe(&self) -> anyhow::Result<()> {
        let request = async {
            match self {
                Self::Http { addr, host, greeting } => expect_get(*addr, host, greeting).await,
                Self::Echo { addr, .. } => tcp_echo(*addr, 64).await,
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, request)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}"))?
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { host, .. } => write!(f, "http tunnel {host}"),
            Self::Echo { what, addr } => write!(f, "{what} {addr}"),
        }
    }
}

/// What a fault is measured by, before and after.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    relay_fds: usize,
    relay_rss: u64,
    agent_fds: usize,
    agent_rss: u64,
}

/// One request of the load generator.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    target: usize,
    ok: bool,
}

/// One thread per target sending requests one after another, each recorded with its time.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(targets: &[Target]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = targets
            .iter()
            .enumerate()
            .map(|(i, target)| {
                let (target, stop, samples) = (target.clone(), stop.clone(), samples.clone());
                std::thread::spawn(move || load_thread(i, &target, &stop, &samples))
            })
            .collect();
        Self { stop, samples, threads }
    }

    fn samples(&self) -> MutexGuard<'_, Vec<Sample>> {
        lock(&self.samples)
    }

    fn failures_between(&self, from: Instant, to: Instant) -> usize {
        self.samples().iter().filter(|s| !s.ok && s.at >= from && s.at <= to).count()
    }

    /// Waits until every load thread has had a success after `since`.
    async fn flows_again(&self, fault: &str, since: Instant) {
        let targets = self.threads.len();
        let result = try_eventually(BACK_WITHIN, || async {
            let samples = self.samples();
            let stuck: Vec<usize> = (0..targets)
                .filter(|i| !samples.iter().any(|s| s.target == *i && s.ok && s.at >= since))
                .collect();
            ensure!(stuck.is_empty(), "no successful request since the fault to targets {stuck:?}");
            Ok(())
        })
        .await;
        if let Err(e) = result {
            panic!("{fault}: the load does not flow again: {e:#}");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("a load thread panicked")
}

fn load_thread(i: usize, target: &Target, stop: &AtomicBool, samples: &Mutex<Vec<Sample>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load thread runtime");
    let end = std::time::Instant::now() + LOAD_MAX;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
        let ok = rt.block_on(async { target.probe().await.is_ok() });
        lock(samples).push(Sample { at: Instant::now(), target: i, ok });
        std::thread::sleep(LOAD_PACE);
    }
}

/// Samples a process's CPU time once a second on a thread of its own.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u64>>,
}

impl CpuSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut busy = Vec::new();
            let Some(mut last) = cpu_ticks(pid) else { return busy };
            // Bounded: the herd has 30 s to bind; a minute of samples is plenty.
            for _ in 0..60 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                let Some(now) = cpu_ticks(pid) else { break };
                busy.push(now.saturating_sub(last));
                last = now;
            }
            busy
        });
        Self { stop, thread }
    }

    /// Stops sampling; the CPU ticks used in each second sampled.
    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the CPU sampler panicked")
    }
}

/// The longest run of seconds in which the process used at least 95 % of a core.
fn longest_pegged_run(busy: &[u64]) -> usize {
    let pegged = |ticks: u64| ticks * 100 >= TICKS_PER_SEC * 95;
    let (mut longest, mut run) = (0, 0);
    for &ticks in busy {
        run = if pegged(ticks) { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

/// The per-run report: Markdown rows printed and appended to `target/chaos/TRANSPORT.md` as
/// each fault ends (so a failing run still leaves the rows it got to).
struct Report {
    path: std::path::PathBuf,
    text: String,
    notes: String,
}

impl Report {
    fn new(t: Transport, in_netns: bool) -> Self {
        let target = warren_tests::process::binary("warren-server")
            .parent()
            .and_then(std::path::Path::parent)
            .map(|p| p.join("chaos"))
            .expect("the target dir");
        std::fs::create_dir_all(&target)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", target.display()));
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let where_a = if in_netns { "in a namespace" } else { "on loopback" };
        let text = format!(
            "\n### chaos run over {t} (unix time {stamp}, agent A {where_a})\n\n\
             | fault | every URL back after | overlay B→A back after (path) | failed requests | relay fds | relay RSS MiB | agent fds | agent RSS MiB |\n\
             |---|---|---|---|---|---|---|---|\n"
        );
        let report = Self { path: target.join(format!("{t}.md")), text, notes: String::new() };
        report.append(&report.text);
        report
    }

    fn append(&self, text: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path.display()));
        file.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.path.display()));
    }

    fn row(
        &mut self,
        fault: &str,
        back: Duration,
        overlay: Option<(Duration, String)>,
        failed: usize,
        b: &Snapshot,
        a: &Snapshot,
    ) {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let overlay = overlay.map_or_else(
            || "–".to_owned(),
            |(back, path)| format!("{:.2} s ({path})", back.as_secs_f64()),
        );
        let row = format!(
            "| {fault} | {:.2} s | {overlay} | {failed} | {} → {} | {:.1} → {:.1} | {} → {} | {:.1} → {:.1} |\n",
            back.as_secs_f64(),
            b.relay_fds,
            a.relay_fds,
            mib(b.relay_rss),
            mib(a.relay_rss),
            b.agent_fds,
            a.agent_fds,
            mib(b.agent_rss),
            mib(a.agent_rss),
        );
        eprint!("{row}");
        self.append(&row);
        self.text.push_str(&row);
    }

    /// A line for under the table, written by [`Report::finish`].
    fn note(&mut self, line: &str) {
        self.notes.push_str(&format!("\n{line}\n"));
    }

    /// Appends the notes and prints the whole table.
    fn finish(&self) {
        self.append(&self.notes);
        eprintln!("{}{}\nchaos report appended to {}", self.text, self.notes, self.path.display());
    }
}

//! The relay, `warren-server`, as a child process.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::agent::Agent;
use crate::process::{Lines, Proc, binary, dump};
use crate::util::{PortRange, READY_TIMEOUT, TempDir};

/// The admin token every test relay is started with (`--admin-token`).
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// How to start a relay.
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// Tokens agents may present (`--token`, repeated). The first is the one [`Relay::token`]
    /// returns.
    pub tokens: Vec<String>,
    /// The public TCP port pool.
    pub ports: PortRange,
    /// `--lease-grace`, verbatim (e.g. `30s`, `5m`, `300`).
    pub lease_grace: Option<String>,
    /// `--no-quic`: serve only TLS over TCP on the control port.
    pub no_quic: bool,
    /// Extra arguments appended as they are.
    pub extra_args: Vec<String>,
    /// Where the control port listens (default `127.0.0.1:0`), e.g. on a bridge that
    /// containers reach.
    pub control: Option<String>,
}

impl Default for RelayOpts {
    fn default() -> Self {
        Self {
            tokens: vec!["test-token-1".into()],
            ports: PortRange::random(20),
            lease_grace: None,
            no_quic: false,
            extra_args: Vec::new(),
            control: None,
        }
    }
}

impl RelayOpts {
    /// Sets `--lease-grace`.
    pub fn lease_grace(mut self, grace: &str) -> Self {
        self.lease_grace = Some(grace.into());
        self
    }

    /// Sets `--no-quic`.
    pub fn no_quic(mut self) -> Self {
        self.no_quic = true;
        self
    }

    /// Uses this port pool.
    pub fn ports(mut self, ports: PortRange) -> Self {
        self.ports = ports;
        self
    }

    /// Appends extra relay arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Listens for agents on `addr` (`IP:0` for a free port) instead of loopback.
    pub fn control(mut self, addr: &str) -> Self {
        self.control = Some(addr.to_owned());
        self
    }

    /// Uses these tokens.
    pub fn tokens(mut self, tokens: &[&str]) -> Self {
        self.tokens = tokens.iter().map(|t| (*t).to_owned()).collect();
        self
    }
}

/// A running `warren-server` on 127.0.0.1 with its own data dir. Killed on drop; its stderr is
/// printed if the test is failing.
#[derive(Debug)]
pub struct Relay {
    opts: RelayOpts,
    /// Control port: QUIC (UDP) and TLS (TCP) on the same port number.
    pub control_addr: SocketAddr,
    /// Public HTTP listener.
    pub http_addr: SocketAddr,
    /// Public HTTPS listener.
    pub https_addr: SocketAddr,
    /// REST API and metrics.
    pub api_addr: SocketAddr,
    /// `--data` directory.
    pub data_dir: PathBuf,
    /// The development CA the relay writes into its data dir.
    pub ca_path: PathBuf,
    stderr: Lines,
    stdout: Lines,
    proc: Option<Proc>,
    _dir: TempDir,
}

impl Relay {
    /// Starts a relay with OS-chosen control and HTTP ports and waits until both listen.
    pub async fn start(opts: RelayOpts) -> Self {
        let dir = TempDir::new("relay");
        let data_dir = dir.dir("data");
        let ca_path = data_dir.join("ca.pem");
        let stderr = Lines::default();
        let stdout = Lines::default();
        let any = "127.0.0.1:0";
        let control = opts.control.clone().unwrap_or_else(|| any.to_owned());
        let args = relay_args(&opts, &data_dir, [&control, any, any, any]);
        let (proc, [control_addr, http_addr, https_addr, api_addr]) =
            match launch(&args, &stdout, &stderr, Instant::now() + READY_TIMEOUT).await {
                Ok(v) => v,
                Err(e) => {
                    dump("relay stderr", &stderr);
                    panic!("relay did not start: {e}");
                }
            };
        let relay = Self {
            opts,
            control_addr,
            http_addr,
            https_addr,
            api_addr,
            data_dir,
            ca_path,
            stderr,
            stdout,
            proc: Some(proc),
            _dir: dir,
        };
        assert!(
            relay.ca_path.is_file(),
            "relay listens but wrote no CA at {}",
            relay.ca_path.display()
        );
        relay
    }

    /// Starts a relay with default options.
    pub async fn start_default() -> Self {
        Self::start(RelayOpts::default()).await
    }

    /// Replaces the extra arguments used from the next [`Relay::restart`] on.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.opts.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// The first token the relay accepts.
    pub fn token(&self) -> &str {
        &self.opts.tokens[0]
    }

    /// The relay's public port pool.
    pub fn ports(&self) -> PortRange {
        self.opts.ports
    }

    /// `127.0.0.1:CONTROLPORT`, as agents are given it.
    pub fn relay_arg(&self) -> String {
        self.control_addr.to_string()
    }

    /// All stderr lines of every run of this relay so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// Whether the relay process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_status().is_none())
    }

    /// Panics (showing the relay's stderr) if the relay has exited.
    pub fn assert_running(&mut self) {
        if let Some(p) = self.proc.as_mut()
            && let Some(status) = p.try_status()
        {
            panic!("relay exited with {status}; stderr:\n{}", self.stderr.text());
        }
        assert!(self.proc.is_some(), "relay is not running (killed by the test)");
    }

    /// The relay's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.id())
    }

    /// The relay's resident memory now, in bytes (`VmRSS` of `/proc/PID/status`). Panics when
    /// the relay is not running.
    pub fn rss_bytes(&self) -> u64 {
        crate::util::rss_bytes(self.pid().expect("the relay is not running"))
    }

    /// How many file descriptors the relay has open. Panics when it is not running.
    pub fn fd_count(&self) -> usize {
        crate::procfs::fd_count(self.pid().expect("the relay is not running"))
    }

    /// Sends `sig` to the relay (SIGSTOP and SIGCONT to freeze and thaw it). Panics when it is
    /// not running.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        crate::procfs::signal(self.pid().expect("the relay is not running"), sig);
    }

    /// Replaces `--lease-grace` from the next [`Relay::restart`] on.
    pub fn set_lease_grace(&mut self, grace: &str) {
        self.opts.lease_grace = Some(grace.to_owned());
    }

    /// SIGKILLs the relay and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill().await;
        }
    }

    /// Kills the relay if running and starts it again with the same data dir, control port and
    /// HTTP port. Retries for a while if the ports are not free yet.
    pub async fn restart(&mut self) {
        self.kill().await;
        let args = self.same_ports_args();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut tries = 0;
        loop {
            tries += 1;
            self.stderr.push(format!("----- test harness: relay (re)start, try {tries} -----"));
            match launch(&args, &self.stdout, &self.stderr, deadline).await {
                Ok((proc, [c, h, s, a])) => {
                    assert_eq!(
                        [c.port(), h.port(), s.port(), a.port()],
                        [
                            self.control_addr.port(),
                            self.http_addr.port(),
                            self.https_addr.port(),
                            self.api_addr.port()
                        ],
                        "restarted relay listens on other ports"
                    );
                    self.proc = Some(proc);
                    return;
                }
                Err(e) if Instant::now() + Duration::from_millis(500) < deadline => {
                    eprintln!("relay restart try {tries} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    dump("relay stderr", &self.stderr);
                    panic!("relay did not restart on the same ports: {e}");
                }
            }
        }
    }

    /// Kills the relay if running and starts it again once, on the same ports and data dir,
    /// for a start that may be refused: `Err` carries the exit status and what the new process
    /// printed when it exits (or does not listen) within `timeout`.
    pub async fn try_restart(&mut self, timeout: Duration) -> Result<(), String> {
        self.kill().await;
        let args = self.same_ports_args();
        self.stderr.push("----- test harness: relay start that may be refused -----".into());
        let (proc, _) = launch(&args, &self.stdout, &self.stderr, Instant::now() + timeout).await?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Starts a second relay on this relay's data dir (on free ports and a pool of its own), as
    /// an operator starting a relay twice would. `Err` carries its exit status and output when
    /// it exits within `timeout` without listening; `Ok` (after killing it) when it listens.
    pub async fn try_second_on_data_dir(&self, timeout: Duration) -> Result<(), String> {
        let opts = RelayOpts { ports: PortRange::random(4), ..self.opts.clone() };
        let any = "127.0.0.1:0";
        let args = relay_args(&opts, &self.data_dir, [any, any, any, any]);
        let (out, err) = (Lines::default(), Lines::default());
        let (mut proc, _) = launch(&args, &out, &err, Instant::now() + timeout).await?;
        proc.kill().await;
        Ok(())
    }

    fn same_ports_args(&self) -> Vec<String> {
        let control = self.control_addr.to_string();
        let http = self.http_addr.to_string();
        let https = self.https_addr.to_string();
        let api = self.api_addr.to_string();
        relay_args(&self.opts, &self.data_dir, [&control, &http, &https, &api])
    }

    /// The arguments every agent needs to reach this relay: `--relay`, `--token`, `--relay-ca`.
    pub fn agent_args(&self) -> Vec<String> {
        self.agent_args_with(self.token())
    }

    /// [`Relay::agent_args`] with another token the relay accepts.
    fn agent_args_with(&self, token: &str) -> Vec<String> {
        vec![
            "--relay".into(),
            self.relay_arg(),
            "--token".into(),
            token.to_owned(),
            "--relay-ca".into(),
            self.ca_path.display().to_string(),
        ]
    }

    /// Spawns `warren ARGS... --relay ... --token TOKEN --relay-ca ... --config-dir TMP/LABEL`:
    /// an agent presenting `token` (any the relay accepts) with an identity of its own.
    pub fn spawn_with_token(
        &self,
        tmp: &TempDir,
        label: &str,
        token: &str,
        args: &[&str],
    ) -> Agent {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(self.agent_args_with(token));
        all.extend(["--config-dir".into(), tmp.dir(label).display().to_string()]);
        Agent::spawn(label, all)
    }

    /// Spawns `warren PROTO TARGET --name NAME --config-dir TMP/NAME EXTRA...` against this
    /// relay.
    pub fn spawn_tunnel(
        &self,
        tmp: &TempDir,
        proto: &str,
        name: &str,
        target: u16,
        extra: &[&str],
    ) -> Agent {
        let mut args = vec![
            proto.to_owned(),
            target.to_string(),
            "--name".into(),
            name.to_owned(),
            "--config-dir".into(),
            tmp.dir(name).display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        self.spawn_agent(name, args)
    }

    /// Spawns `warren ARGS... --relay ... --token ... --relay-ca ...`.
    ///
    /// `args` starts with the subcommand (`http`, `tcp`, `start`). The caller passes
    /// `--config-dir` or `--agent-id` itself.
    pub fn spawn_agent<I, S>(&self, label: &str, args: I) -> Agent
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<String> =
            args.into_iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        all.extend(self.agent_args());
        Agent::spawn(label, all)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump("relay stderr", &self.stderr);
            if !self.stdout.is_empty() {
                dump("relay stdout", &self.stdout);
            }
        }
    }
}

fn relay_args(
    opts: &RelayOpts,
    data_dir: &std::path::Path,
    [control, http, https, api]: [&str; 4],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--domain".into(),
        "localhost".into(),
        "--control".into(),
        control.into(),
        "--http".into(),
        http.into(),
        "--https".into(),
        https.into(),
        "--api".into(),
        api.into(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
        "--ports".into(),
        opts.ports.arg(),
        "--data".into(),
        data_dir.display().to_string(),
    ];
    for t in &opts.tokens {
        args.push("--token".into());
        args.push(t.clone());
    }
    if let Some(g) = &opts.lease_grace {
        args.push("--lease-grace".into());
        args.push(g.clone());
    }
    if opts.no_quic {
        args.push("--no-quic".into());
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

/// Parses `listening name=NAME addr=IP:PORT` out of a log line.
pub fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening")?..];
    let field = |key: &str| -> Option<String> {
        let start = rest.find(key)? + key.len();
        let v: String = rest[start..].chars().take_while(|c| !c.is_whitespace()).collect();
        Some(v.trim_matches(|c| c == '"' || c == ',').to_owned())
    };
    let name = field("name=")?;
    let addr = field("addr=")?.parse().ok()?;
    Some((name, addr))
}

/// Starts one relay process and waits for its `control`, `http` and `https` listening lines.
async fn launch(
    args: &[String],
    stdout: &Lines,
    stderr: &Lines,
    deadline: Instant,
) -> Result<(Proc, [SocketAddr; 4]), String> {
    let first_line = stderr.len();
    let mut proc = Proc::spawn("relay", &binary("warren-server"), args, &[], stdout, stderr);
    loop {
        let lines = stderr.snapshot();
        let mut control = None;
        let mut http = None;
        let mut https = None;
        let mut api = None;
        for l in &lines[first_line.min(lines.len())..] {
            if let Some((name, addr)) = parse_listening(l) {
                match name.as_str() {
                    "control" => control = Some(addr),
                    "http" => http = Some(addr),
                    "https" => https = Some(addr),
                    "api" => api = Some(addr),
                    _ => {}
                }
            }
        }
        if let (Some(c), Some(h), Some(s), Some(a)) = (control, http, https, api) {
            return Ok((proc, [c, h, s, a]));
        }
        if let Some(status) = proc.try_status() {
            proc.drain_output().await;
            let tail = stderr.snapshot()[first_line..].join("\n");
            return Err(format!("relay exited with {status} before listening; stderr:\n{tail}"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no `listening name=control`, `name=http` and `name=https` lines within the \
                 deadline (got control={control:?} http={http:?} https={https:?} api={api:?}); \
                 args: {args:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let l = "2025-01-01T00:00:00Z  INFO warren_server::relay: listening name=control addr=127.0.0.1:4433";
        assert_eq!(parse_listening(l), Some(("control".into(), "127.0.0.1:4433".parse().unwrap())));
        let l = "INFO listening name=\"http\" addr=\"127.0.0.1:80\" extra=1";
        assert_eq!(parse_listening(l), Some(("http".into(), "127.0.0.1:80".parse().unwrap())));
        assert_eq!(parse_listening("INFO started"), None);
    }
}

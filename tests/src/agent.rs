//! The agent, `warren`, as a child process, and the URLs it prints.

use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::time::Instant;

use crate::process::{Lines, Proc, binary, dump};
use crate::util::{READY_TIMEOUT, localhost};

/// The local API token every agent the harness starts requires (`WARREN_API_TOKEN`), unless the
/// test gives its own; CLI runs in tests send it the same way.
pub const AGENT_API_TOKEN: &str = "warren-test-agent-api-token";

/// A running `warren` process. Killed on drop; its output is printed if the test is failing.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    stdout: Lines,
    stderr: Lines,
}

/// What became of an agent that was expected to bind or fail.
#[derive(Debug)]
pub enum Outcome {
    /// It printed a URL (and is still running or not).
    Url(String),
    /// It exited before printing a URL.
    Exited(ExitStatus, String),
}

impl Agent {
    /// Spawns `warren ARGS...` with a scrubbed environment.
    pub fn spawn<I, S>(label: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(label, args, &[])
    }

    /// Spawns `warren ARGS...` with extra environment variables.
    pub fn spawn_with_env<I, S>(label: &str, args: I, envs: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<String> =
            args.into_iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        Self::launch(label, &binary("warren"), args, envs)
    }

    /// Spawns `warren ARGS...` inside the network namespace at `netns` (`/run/netns/NAME`),
    /// through `nsenter --net`, which execs the agent in place: [`Agent::pid`] is the agent's.
    pub fn spawn_in_netns<I, S>(label: &str, netns: &std::path::Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let nsenter = crate::which("nsenter").expect("`nsenter` (util-linux) is not installed");
        let mut all = vec![
            format!("--net={}", netns.display()),
            "--".to_owned(),
            binary("warren").display().to_string(),
        ];
        all.extend(args.into_iter().map(|a| a.as_ref().to_string_lossy().into_owned()));
        Self::launch(label, &nsenter, all, &[])
    }

    fn launch(
        label: &str,
        program: &std::path::Path,
        args: Vec<String>,
        envs: &[(&str, &str)],
    ) -> Self {
        // Every agent's local API on a port of its own unless the test says otherwise, with the
        // harness's token.
        let mut all: Vec<(String, String)> = vec![
            ("WARREN_API".into(), "127.0.0.1:0".into()),
            ("WARREN_API_TOKEN".into(), AGENT_API_TOKEN.into()),
        ];
        all.extend(envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let stdout = Lines::default();
        let stderr = Lines::default();
        let proc = Proc::spawn(label, program, &args, &all, &stdout, &stderr);
        Self { proc, stdout, stderr }
    }

    /// The address of the agent's local API, from its `listening name=api` line.
    pub async fn api_addr(&mut self) -> std::net::SocketAddr {
        let deadline = tokio::time::Instant::now() + crate::util::READY_TIMEOUT;
        loop {
            let found = self.stderr().iter().find_map(|l| crate::relay::parse_listening(l));
            if let Some((name, addr)) = found.filter(|(n, _)| n == "api") {
                let _ = name;
                return addr;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {}: no `listening name=api` line; stderr:\n{}",
                self.proc.label,
                self.stderr_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// A client of the agent's local API sending [`AGENT_API_TOKEN`].
    pub async fn api(&mut self) -> crate::api_client::ApiClient {
        crate::api_client::ApiClient::new(self.api_addr().await, AGENT_API_TOKEN)
    }

    /// The first URL the agent prints on stdout; panics (with its stderr) if it exits first or
    /// prints nothing within [`READY_TIMEOUT`].
    pub async fn url(&mut self) -> String {
        self.urls(1).await.remove(0)
    }

    /// The first `n` URLs the agent prints (one per tunnel, `warren start`).
    pub async fn urls(&mut self, n: usize) -> Vec<String> {
        match self.wait_urls(n, READY_TIMEOUT).await {
            Ok(urls) => urls,
            Err(why) => panic!("agent {}: {why}", self.proc.label),
        }
    }

    /// The first URL as an HTTP tunnel URL.
    pub async fn http_url(&mut self) -> HttpUrl {
        let url = self.url().await;
        HttpUrl::parse(&url).unwrap_or_else(|e| panic!("agent {}: {e}", self.proc.label))
    }

    /// The first URL as a TLS tunnel URL.
    pub async fn tls_url(&mut self) -> TlsUrl {
        let url = self.url().await;
        TlsUrl::parse(&url).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Awaits the first URL and parses it as a UDP tunnel URL.
    pub async fn udp_url(&mut self) -> UdpUrl {
        let url = self.url().await;
        UdpUrl::parse(&url).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Awaits the first URL and parses it as a TCP tunnel URL.
    pub async fn tcp_url(&mut self) -> TcpUrl {
        let url = self.url().await;
        TcpUrl::parse(&url).unwrap_or_else(|e| panic!("agent {}: {e}", self.proc.label))
    }

    /// Waits until the agent either prints a URL or exits, for at most `timeout`.
    pub async fn outcome(&mut self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(url) = self.url_lines().into_iter().next() {
                return Some(Outcome::Url(url));
            }
            if let Some(status) = self.proc.try_status() {
                self.proc.drain_output().await;
                if let Some(url) = self.url_lines().into_iter().next() {
                    return Some(Outcome::Url(url));
                }
                return Some(Outcome::Exited(status, self.stderr.text()));
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn url_lines(&self) -> Vec<String> {
        self.stdout
            .snapshot()
            .into_iter()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    async fn wait_urls(&mut self, n: usize, timeout: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.url_lines();
            if lines.len() >= n {
                let urls: Vec<String> = lines.into_iter().take(n).collect();
                for u in &urls {
                    let schemes = ["http://", "https://", "tcp://", "tls://", "udp://"];
                    if !schemes.iter().any(|s| u.starts_with(s)) {
                        return Err(format!(
                            "stdout line {u:?} is not a tunnel URL (stdout must carry only URLs); \
                             stderr:\n{}",
                            self.stderr.text()
                        ));
                    }
                }
                return Ok(urls);
            }
            if let Some(status) = self.proc.try_status() {
                self.proc.drain_output().await;
                if self.url_lines().len() >= n {
                    continue;
                }
                return Err(format!(
                    "exited with {status} before printing {n} URL(s); stdout: {:?}; stderr:\n{}",
                    self.stdout.snapshot(),
                    self.stderr.text()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "printed no {n} URL(s) within {timeout:?}; stdout: {:?}; stderr:\n{}",
                    self.stdout.snapshot(),
                    self.stderr.text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the agent to exit; panics if it is still running after `timeout`. Returns the
    /// exit status and the whole captured stderr.
    pub async fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        match self.proc.wait_timeout(timeout).await {
            Some(status) => (status, self.stderr.text()),
            None => panic!(
                "agent {} still running after {timeout:?}; stderr:\n{}",
                self.proc.label,
                self.stderr.text()
            ),
        }
    }

    /// Waits for a failing exit and returns stderr; panics on success or if it keeps running.
    pub async fn expect_failure(&mut self, timeout: Duration) -> String {
        let (status, stderr) = self.wait_exit(timeout).await;
        assert!(
            !status.success(),
            "agent {} should have failed but exited with {status}; stderr:\n{stderr}",
            self.proc.label
        );
        stderr
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.try_status().is_none()
    }

    /// Panics (showing stderr) if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.try_status() {
            panic!(
                "agent {} exited with {status}; stderr:\n{}",
                self.proc.label,
                self.stderr.text()
            );
        }
    }

    /// Stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// Stderr so far as one string.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// The OS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.id()
    }

    /// How many file descriptors the agent has open. Panics when it is not running.
    pub fn fd_count(&self) -> usize {
        crate::procfs::fd_count(self.pid().expect("the agent is not running"))
    }

    /// The agent's resident memory now, in bytes (`VmRSS` of `/proc/PID/status`). Panics when
    /// the agent is not running.
    pub fn rss_bytes(&self) -> u64 {
        crate::util::rss_bytes(self.pid().expect("the agent is not running"))
    }

    /// SIGKILL and wait until the process is gone.
    pub async fn kill(&mut self) {
        self.proc.kill().await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump(&format!("agent {} stdout", self.proc.label), &self.stdout);
            dump(&format!("agent {} stderr", self.proc.label), &self.stderr);
        }
    }
}

/// A parsed `http://SUBDOMAIN.localhost[:PORT]` tunnel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// The URL as printed.
    pub url: String,
    /// The subdomain label.
    pub subdomain: String,
    /// The port (80 when the URL has none).
    pub port: u16,
}

impl HttpUrl {
    /// Parses a URL printed by the agent.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{url:?} is not an http tunnel URL: {why}");
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("no http:// scheme"))?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (rest, 80),
        };
        let subdomain =
            host.strip_suffix(".localhost").ok_or_else(|| bad("host not under localhost"))?;
        if subdomain.is_empty() || subdomain.contains(['.', '/']) {
            return Err(bad("subdomain is not one label"));
        }
        Ok(Self { url: url.to_owned(), subdomain: subdomain.to_owned(), port })
    }

    /// `SUBDOMAIN.localhost:PORT`, for the `Host` header.
    pub fn host(&self) -> String {
        format!("{}.localhost:{}", self.subdomain, self.port)
    }

    /// Where a visitor connects: 127.0.0.1:PORT.
    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// A parsed `tls://NAME.localhost:PORT` tunnel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsUrl {
    /// The URL as printed.
    pub url: String,
    /// The host name visitors put in their SNI.
    pub hostname: String,
    /// The HTTPS port.
    pub port: u16,
}

impl TlsUrl {
    /// Parses a URL printed by the agent.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{url:?} is not a tls tunnel URL: {why}");
        let rest = url.strip_prefix("tls://").ok_or_else(|| bad("no tls:// scheme"))?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (rest, 443),
        };
        if !host.ends_with(".localhost") {
            return Err(bad("host not under localhost"));
        }
        Ok(Self { url: url.to_owned(), hostname: host.to_owned(), port })
    }

    /// Where a visitor connects: 127.0.0.1:PORT.
    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }
}

/// A parsed `udp://localhost:PORT` tunnel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpUrl {
    /// The URL as printed.
    pub url: String,
    /// The public port.
    pub port: u16,
}

impl UdpUrl {
    /// Parses a URL printed by the agent.
    pub fn parse(url: &str) -> Result<Self, String> {
        let port = url
            .strip_prefix("udp://localhost:")
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| format!("{url:?} is not a udp tunnel URL (udp://localhost:PORT)"))?;
        Ok(Self { url: url.to_owned(), port })
    }

    /// Where a visitor sends: 127.0.0.1:PORT.
    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }
}

/// A parsed `tcp://localhost:PORT` tunnel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpUrl {
    /// The URL as printed.
    pub url: String,
    /// The public port.
    pub port: u16,
}

impl TcpUrl {
    /// Parses a URL printed by the agent.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{url:?} is not a tcp tunnel URL: {why}");
        let rest = url
            .strip_prefix("tcp://localhost:")
            .ok_or_else(|| bad("expected tcp://localhost:PORT"))?;
        let port = rest.parse::<u16>().map_err(|_| bad("bad port"))?;
        Ok(Self { url: url.to_owned(), port })
    }

    /// Where a visitor connects: 127.0.0.1:PORT.
    pub fn addr(&self) -> SocketAddr {
        localhost(self.port)
    }
}

impl fmt::Display for TcpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = HttpUrl::parse("http://shop.localhost:8080").unwrap();
        assert_eq!((u.subdomain.as_str(), u.port), ("shop", 8080));
        assert_eq!(u.host(), "shop.localhost:8080");
        assert_eq!(HttpUrl::parse("http://a.localhost").unwrap().port, 80);
        assert!(HttpUrl::parse("http://localhost:1").is_err());
        assert!(HttpUrl::parse("tcp://localhost:1").is_err());
        assert_eq!(TcpUrl::parse("tcp://localhost:20001").unwrap().port, 20001);
        assert!(TcpUrl::parse("tcp://example.com:1").is_err());
    }
}

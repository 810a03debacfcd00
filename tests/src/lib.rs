//! Harness for warren's end-to-end tests: the real `warren-server` and `warren` binaries run as
//! child processes on 127.0.0.1, with local backends behind them and visitors in front.
//!
//! - [`Relay`]: `warren-server` with its own data dir; ports chosen by the OS (control, HTTP) or
//!   a random free range (the TCP pool). Can be killed and restarted on the same ports.
//! - [`Agent`]: `warren`; [`Agent::url`] awaits the URL it prints, [`Agent::wait_exit`] its exit.
//! - [`HttpBackend`], [`EchoBackend`]: what tunnels point at.
//! - [`grpc`]: a gRPC bidirectional-streaming echo over h2c, HTTP/2 visitors, TLS connectors.
//! - [`udp`]: a UDP echo and a minimal DNS responder, and UDP visitors.
//! - [`ProxyBackend`]: a TCP backend that checks the PROXY protocol header it is sent.
//! - [`client`]: visitors (HTTP with an explicit `Host`, TCP echo, WebSocket).
//! - [`raw`]: hostile or broken peers for the control port (TLS, yamux, QUIC).
//! - [`eventually`]: poll a condition until a deadline instead of sleeping.
//! - [`procfs`]: a child's fds, CPU time and TCP sockets from `/proc`, and signals to it.
//! - [`netns`], [`overlay`]: network namespaces: one host with an agent, or several hosts on
//!   an underlay with a relay, for the networks tests.
//!
//! Every child is SIGKILLed when its handle drops; captured stderr of relays and agents is
//! printed when a test fails. The binaries are found in the cargo target dir: run
//! `cargo build --workspace --bins` before `cargo test`.
//!
//! Environment knobs: `WARREN_TEST_VERBOSE=1` echoes child output live;
//! `WARREN_TEST_RUST_LOG=...` is passed to the children as `RUST_LOG`.

pub mod agent;
pub mod api_client;
pub mod backend;
pub mod client;
pub mod docker;
pub mod grpc;
pub mod netns;
pub mod overlay;
pub mod pki;
pub mod process;
pub mod procfs;
pub mod proxy_backend;
pub mod raw;
pub mod relay;
pub mod udp;
pub mod util;

pub use agent::{AGENT_API_TOKEN, Agent, HttpUrl, Outcome, TcpUrl, TlsUrl, UdpUrl};
pub use api_client::{ApiClient, ApiResponse, curl_json};
pub use backend::{EchoBackend, HttpBackend, parse_headers};
pub use client::{HttpConn, HttpResponse, expect_get, http_get, http_post, tcp_echo};
pub use grpc::{
    GrpcEchoBackend, GrpcOutcome, grpc_ping_pong, h2_get, h2_get_with, peer_leaf, tls_connect,
    tls_connect_any_cert,
};
pub use pki::Pki;
pub use process::{Daemon, which};
pub use proxy_backend::{ProxyBackend, ProxySeen};
pub use relay::{ADMIN_TOKEN, Relay, RelayOpts};
pub use udp::{DnsBackend, UdpEchoBackend, udp_flood, udp_roundtrip};
pub use util::{
    BULK_TIMEOUT, IO_TIMEOUT, PortRange, READY_TIMEOUT, TempDir, closed_port, eventually,
    localhost, random_bytes, sha256, try_eventually, unique, within,
};

/// How an agent reaches the relay (`--transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP with yamux.
    Tcp,
    /// QUIC, falling back to TCP.
    Auto,
}

impl Transport {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
            Self::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defines, for each `async fn NAME(t: Transport)` given, a module `NAME` with two tests,
/// `quic` and `tcp`, so a suite runs over both transports with distinct test names
/// (`NAME::quic`, `NAME::tcp`).
#[macro_export]
macro_rules! each_transport {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name($crate::Transport::Quic).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$name($crate::Transport::Tcp).await
            }
        }
    )*};
}

/// A relay, an HTTP backend and one `warren http` agent tunnelling to it.
#[derive(Debug)]
pub struct HttpSetup {
    /// The agent (dropped first).
    pub agent: Agent,
    /// Its URL.
    pub url: HttpUrl,
    /// The relay.
    pub relay: Relay,
    /// The backend behind the tunnel.
    pub backend: HttpBackend,
    /// Per-test scratch space (the agent's config dir lives here).
    pub tmp: TempDir,
}

impl HttpSetup {
    /// Starts everything with `--transport t` and waits for the URL.
    pub async fn start(t: Transport) -> Self {
        Self::start_with(RelayOpts::default(), t).await
    }

    /// Same with relay options.
    pub async fn start_with(opts: RelayOpts, t: Transport) -> Self {
        let tmp = TempDir::new("http");
        let relay = Relay::start(opts).await;
        let backend = HttpBackend::start().await;
        let mut agent = relay.spawn_agent(
            "http-agent",
            [
                "http".to_owned(),
                backend.port().to_string(),
                "--transport".into(),
                t.as_str().into(),
                "--config-dir".into(),
                tmp.dir("agent").display().to_string(),
            ],
        );
        let url = agent.http_url().await;
        assert_eq!(
            url.port,
            relay.http_addr.port(),
            "the URL must carry the relay's HTTP port: {url}"
        );
        Self { agent, url, relay, backend, tmp }
    }

    /// Where visitors connect: the relay's HTTP listener.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.http_addr
    }

    /// `Host` header value for the tunnel.
    pub fn host(&self) -> String {
        self.url.host()
    }
}

/// A relay, a TCP echo backend and one `warren tcp` agent tunnelling to it.
#[derive(Debug)]
pub struct TcpSetup {
    /// The agent (dropped first).
    pub agent: Agent,
    /// Its URL.
    pub url: TcpUrl,
    /// The relay.
    pub relay: Relay,
    /// The echo backend behind the tunnel.
    pub backend: EchoBackend,
    /// Per-test scratch space.
    pub tmp: TempDir,
}

impl TcpSetup {
    /// Starts everything with `--transport t` and waits for the URL.
    pub async fn start(t: Transport) -> Self {
        Self::start_with(RelayOpts::default(), t).await
    }

    /// Same with relay options.
    pub async fn start_with(opts: RelayOpts, t: Transport) -> Self {
        let tmp = TempDir::new("tcp");
        let relay = Relay::start(opts).await;
        let backend = EchoBackend::start().await;
        let mut agent = relay.spawn_agent(
            "tcp-agent",
            [
                "tcp".to_owned(),
                backend.port().to_string(),
                "--transport".into(),
                t.as_str().into(),
                "--config-dir".into(),
                tmp.dir("agent").display().to_string(),
            ],
        );
        let url = agent.tcp_url().await;
        assert!(relay.ports().contains(url.port), "{url} is outside the pool {:?}", relay.ports());
        Self { agent, url, relay, backend, tmp }
    }
}

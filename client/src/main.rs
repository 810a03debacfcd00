//! `warren`: the agent and CLI.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren_client::agent::{self, AgentConfig, AgentEvent};
use warren_client::api_access::{self, LocalApi, Want};
use warren_client::config::{self, FileConfig};
use warren_client::demo::{self, DemoOptions};
use warren_client::identity;
use warren_client::inspect::Limits;
use warren_client::tunnel::{ForwardRule, Target, TunnelSpec};
use warren_proto::message::Token;
use warren_proto::{AgentId, Protocol, Subdomain, TunnelName};
use warren_server::config::PortRange;
use warren_transport::{Mode, RelayAddr, Trust};

mod net_cli;

/// warren: put a local service on a public address, through a relay you run yourself.
///
/// Start a relay on a public host (`warren-server --domain example.com --token s3cret`), then
/// expose services from anywhere behind NAT. Sessions are encrypted (QUIC or TLS), and each
/// tunnel keeps its URL across reconnects and restarts.
#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    after_help = "Examples:\n  warren demo                                   everything on loopback, to try it out\n  warren http 8080 --relay example.com:7443 --token s3cret --subdomain shop\n  warren tcp 5432 --relay example.com:7443 --token s3cret\n  warren tls 8443 --hostname secure --relay example.com:7443 --token s3cret\n  warren udp 53 --relay example.com:7443 --token s3cret\n  warren http 3000 --basic-auth ann:s3cret --allow 203.0.113.0/24 ...\n  warren start --config warren.toml\n\nThe public URL is printed alone on stdout; logs go to stderr (WARREN_LOG=debug for more)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: 1 for an agent, which splices several Gbit/s on one core and
    /// leaves the others to the services it exposes; half the CPUs for the demo).
    #[arg(long, global = true, value_name = "N", env = "WARREN_THREADS")]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Expose a local HTTP service under NAME.DOMAIN on the relay.
    #[command(
        after_help = "Examples:\n  warren http 8080 --relay example.com:7443 --token s3cret\n  warren http 127.0.0.1:3000 --subdomain shop --relay example.com:7443 --token s3cret\n  warren http 3000 --basic-auth ann:s3cret --allow 203.0.113.0/24 --rate-limit 20/s ...\n  warren http 50051 --upstream-http2 ...        a gRPC or other h2c server\n\nThe tunnel answers on the relay's HTTP and HTTPS listeners, HTTP/1.1 and HTTP/2."
    )]
    Http {
        /// The local service: PORT (on 127.0.0.1) or HOST:PORT.
        target: Target,
        /// The subdomain to serve under (default: a stable name derived from this agent and
        /// the tunnel name).
        #[arg(long, value_name = "NAME", conflicts_with = "hostname")]
        subdomain: Option<Subdomain>,
        /// The full host name to serve under, NAME.RELAY_DOMAIN (same as --subdomain NAME).
        #[arg(long, value_name = "HOST")]
        hostname: Option<String>,
        #[command(flatten)]
        http: HttpOpts,
        #[command(flatten)]
        rate: RateOpts,
        #[command(flatten)]
        access: AccessOpts,
        #[command(flatten)]
        tunnel: TunnelOpts,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Expose a local TCP service on a port of the relay's pool.
    #[command(
        after_help = "Examples:\n  warren tcp 5432 --relay example.com:7443 --token s3cret\n  warren tcp 22 --remote-port 20022 --relay example.com:7443 --token s3cret"
    )]
    Tcp {
        /// The local service: PORT (on 127.0.0.1) or HOST:PORT.
        target: Target,
        /// The public port wanted, from the relay's pool (default: one is chosen and kept).
        #[arg(long, value_name = "PORT")]
        remote_port: Option<u16>,
        #[command(flatten)]
        proxy: ProxyOpts,
        #[command(flatten)]
        rate: RateOpts,
        #[command(flatten)]
        access: AccessOpts,
        #[command(flatten)]
        tunnel: TunnelOpts,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Expose a local TLS service by SNI on the relay's HTTPS port, without the relay
    /// decrypting it: the TLS session ends at your service, with your certificate.
    #[command(
        after_help = "Examples:\n  warren tls 8443 --hostname secure --relay example.com:7443 --token s3cret\n  warren tls 127.0.0.1:8443 --hostname secure.example.com --proxy-protocol v2 --relay example.com:7443 --token s3cret"
    )]
    Tls {
        /// The local TLS service: PORT (on 127.0.0.1) or HOST:PORT.
        target: Target,
        /// The name visitors connect to (their SNI): NAME.RELAY_DOMAIN, or just NAME (default:
        /// a stable name derived from this agent and the tunnel name).
        #[arg(long, value_name = "HOST")]
        hostname: Option<String>,
        #[command(flatten)]
        proxy: ProxyOpts,
        #[command(flatten)]
        rate: RateOpts,
        #[command(flatten)]
        access: AccessOpts,
        #[command(flatten)]
        tunnel: TunnelOpts,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Expose a local UDP service on a port of the relay's pool (packets ride QUIC datagrams;
    /// over --transport tcp, a stream per visitor).
    #[command(
        after_help = "Examples:\n  warren udp 53 --relay example.com:7443 --token s3cret\n  warren udp 127.0.0.1:27015 --remote-port 20015 --relay example.com:7443 --token s3cret"
    )]
    Udp {
        /// The local UDP service: PORT (on 127.0.0.1) or HOST:PORT.
        target: Target,
        /// The public UDP port wanted, from the relay's pool (default: one is chosen and kept).
        #[arg(long, value_name = "PORT")]
        remote_port: Option<u16>,
        #[command(flatten)]
        access: AccessOpts,
        #[command(flatten)]
        tunnel: TunnelOpts,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Connect to the relay and serve what it asks: forwards created through the relay's API
    /// (POST /api/v1/forwards), plus the tunnels of a config file if one is given. Prints each
    /// forward's URL as it arrives.
    #[command(
        after_help = "Examples:\n  warren agent --relay example.com:7443 --token s3cret --allow-forward 8080\n  warren agent --config warren.toml\n  warren agent --docker --relay example.com:7443 --token s3cret     tunnels for labelled containers\n  sudo warren agent --docker-plugin                                   docker network create -d warren ...\n\nThen, on the relay's host:\n  curl -H \"Authorization: Bearer $(cat warren-data/admin-token)\" \\\n       --json '{\"agent\": \"AGENT_ID\", \"proto\": \"http\", \"target\": \"8080\"}' http://127.0.0.1:7400/api/v1/forwards\n\nForwards are served only when an --allow-forward rule covers their target."
    )]
    Agent {
        /// A config file whose tunnels are served too.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnOpts,
        #[command(flatten)]
        net: net_cli::NetOpts,
        #[command(flatten)]
        docker: DockerOpts,
    },
    /// Networks of a running agent: bridges with IPAM, NAT, published ports and DNS, for the
    /// services you expose (needs `warren agent` running as root).
    #[command(
        after_help = "Examples:\n  sudo warren agent &                          manages networks; no relay needed for them\n  warren net create web --subnet 10.213.5.0/24\n  warren net run web --name api -- python3 -m http.server 8000\n  warren net publish web api 8080:8000\n  warren net run web --name job -- curl -s http://api:8000/\n  warren net ls"
    )]
    Net {
        #[command(flatten)]
        api: AgentApiOpts,
        #[command(subcommand)]
        cmd: net_cli::NetCmd,
    },
    /// (internal) The process `warren net run` starts in a new namespace.
    #[command(name = "net-sandbox-child", hide = true)]
    NetSandboxChild {
        network: String,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List the tunnels of a running agent (through its local API).
    #[command(after_help = "Examples:\n  warren ls\n  warren ls --agent-api 127.0.0.1:4041")]
    Ls {
        #[command(flatten)]
        api: AgentApiOpts,
    },
    /// List the HTTP requests a running agent's inspector kept, newest first.
    #[command(after_help = "Examples:\n  warren requests\n  warren requests --limit 5")]
    Requests {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        api: AgentApiOpts,
    },
    /// Send a kept request to its tunnel's target again, and show the response.
    #[command(after_help = "Examples:\n  warren replay req_00000012")]
    Replay {
        /// The request's id (see `warren requests`).
        id: String,
        #[command(flatten)]
        api: AgentApiOpts,
    },
    /// Close a tunnel of a running agent (through its local API).
    #[command(after_help = "Examples:\n  warren stop http-8080")]
    Stop {
        /// The tunnel's name (see `warren ls`).
        name: String,
        #[command(flatten)]
        api: AgentApiOpts,
    },
    /// Run every tunnel of a TOML config file (see client/examples/warren.toml).
    Start {
        /// The config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        conn: ConnOpts,
    },
    /// Run a relay, an agent and a sample web page in this process, on loopback, with an HTTP
    /// and a TCP tunnel to the page. Ctrl-C ends it.
    Demo {
        /// The demo relay's public HTTP listener.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        http: SocketAddr,
        /// The demo relay's TCP port pool.
        #[arg(long, value_name = "[IP:]LOW-HIGH", default_value = "127.0.0.1:20000-29999")]
        ports: PortRange,
    },
}

/// Who may use the tunnel; enforced at the relay.
#[derive(Debug, Args)]
struct AccessOpts {
    /// Let in only visitors from this network (repeatable), e.g. 203.0.113.0/24 or 2001:db8::/32.
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Refuse visitors from this network (repeatable); checked before --allow.
    #[arg(long, value_name = "CIDR")]
    deny: Vec<String>,
}

#[derive(Debug, Args)]
struct RateOpts {
    /// Most requests (http) or connections (tcp, tls) per second from one visitor address;
    /// HTTP visitors over it get 429 with Retry-After. E.g. 20/s.
    #[arg(long, value_name = "N/s")]
    rate_limit: Option<String>,
}

#[derive(Debug, Args)]
struct ProxyOpts {
    /// Send a PROXY protocol header (v1 text or v2 binary) to the target first, carrying the
    /// visitor's address (for HAProxy, nginx `proxy_protocol`, Traefik...).
    #[arg(long, value_name = "v1|v2")]
    proxy_protocol: Option<String>,
}

/// HTTP behaviour; enforced at the relay.
#[derive(Debug, Args)]
struct HttpOpts {
    /// Require HTTP basic authentication as USER:PASS (repeatable). The relay gets only a
    /// digest; passwords are never logged.
    #[arg(long, value_name = "USER:PASS")]
    basic_auth: Vec<String>,
    /// Add (or replace) a request header, "NAME: VALUE" (repeatable).
    #[arg(long, value_name = "NAME:VALUE")]
    request_header_add: Vec<String>,
    /// Remove a request header (repeatable).
    #[arg(long, value_name = "NAME")]
    request_header_remove: Vec<String>,
    /// Add (or replace) a response header, "NAME: VALUE" (repeatable).
    #[arg(long, value_name = "NAME:VALUE")]
    response_header_add: Vec<String>,
    /// Remove a response header (repeatable).
    #[arg(long, value_name = "NAME")]
    response_header_remove: Vec<String>,
    /// Largest request body let through (413 beyond), e.g. 10MiB.
    #[arg(long, value_name = "SIZE")]
    max_body: Option<String>,
    /// Redirect plain-HTTP visitors to HTTPS (308).
    #[arg(long)]
    https_only: bool,
    /// The target speaks HTTP/2 without TLS (h2c, e.g. a gRPC server): the relay forwards
    /// requests as HTTP/2, trailers and streaming included.
    #[arg(long)]
    upstream_http2: bool,
    /// Keep this tunnel's requests for the inspector (`warren requests`, the local API); false
    /// splices bytes straight through, which is faster.
    #[arg(long, value_name = "true|false", default_value_t = true, action = clap::ArgAction::Set)]
    inspect: bool,
}

impl AccessOpts {
    fn pairs(self) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = Vec::new();
        v.extend(self.allow.into_iter().map(|x| ("allow", x)));
        v.extend(self.deny.into_iter().map(|x| ("deny", x)));
        v
    }
}

impl HttpOpts {
    fn pairs(self) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = Vec::new();
        v.extend(self.basic_auth.into_iter().map(|x| ("basic_auth", x)));
        v.extend(self.request_header_add.into_iter().map(|x| ("request_header_add", x)));
        v.extend(self.request_header_remove.into_iter().map(|x| ("request_header_remove", x)));
        v.extend(self.response_header_add.into_iter().map(|x| ("response_header_add", x)));
        v.extend(self.response_header_remove.into_iter().map(|x| ("response_header_remove", x)));
        v.extend(self.max_body.map(|x| ("max_body", x)));
        if self.https_only {
            v.push(("https_only", "true".into()));
        }
        if self.upstream_http2 {
            v.push(("upstream_http2", "true".into()));
        }
        if !self.inspect {
            v.push(("inspect", "false".into()));
        }
        v
    }
}

/// A tunnel from the command line: options applied and checked, errors naming the flag.
fn cli_spec(
    protocol: Protocol,
    target: Target,
    name: Option<TunnelName>,
    pairs: Vec<(&'static str, String)>,
    shape: impl FnOnce(&mut TunnelSpec),
) -> anyhow::Result<TunnelSpec> {
    let mut spec = TunnelSpec::unnamed(protocol, target);
    shape(&mut spec);
    for (key, value) in pairs {
        spec.apply(key, &value).map_err(|e| anyhow::anyhow!("--{}: {e}", key.replace('_', "-")))?;
    }
    spec.name_or_default(name);
    spec.check().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

/// Docker: tunnels for labelled containers, and the network plugin.
#[derive(Debug, Args)]
struct DockerOpts {
    /// Open a tunnel for every running container labelled warren.http=PORT (or warren.tcp,
    /// warren.tls, warren.udp), to the container's address; close it when the container stops.
    /// More labels: warren.subdomain, warren.hostname, warren.remote-port, warren.network and
    /// every tunnel option (warren.basic-auth=USER:PASS, warren.allow=CIDR,...).
    #[arg(long)]
    docker: bool,
    /// Serve Docker's network and IPAM plugin "warren", backed by this agent's networks:
    /// `docker network create -d warren --ipam-driver warren NAME` (needs root); add
    /// `-o warren.driver=overlay --subnet CIDR` for an overlay across hosts (needs --relay).
    #[arg(long)]
    docker_plugin: bool,
    /// The Docker daemon's API socket.
    #[arg(long, value_name = "PATH", env = "WARREN_DOCKER_SOCKET", default_value = warren_client::docker::DEFAULT_SOCKET)]
    docker_socket: PathBuf,
    /// Where the plugin listens; Docker finds plugin NAME at /run/docker/plugins/NAME.sock.
    #[arg(long, value_name = "PATH", default_value = warren_client::docker::plugin::DEFAULT_SOCKET)]
    docker_plugin_socket: PathBuf,
}

/// Which running agent a command talks to, and how it proves it may.
#[derive(Debug, Args)]
struct AgentApiOpts {
    /// The running agent's local API (default: the newest agent listed in
    /// CONFIG_DIR/agent.json, which every agent writes at start).
    #[arg(long, value_name = "ADDR", env = "WARREN_AGENT_API", global = true)]
    agent_api: Option<SocketAddr>,
    /// The agent's API token (default: the token file that agent uses, CONFIG_DIR/api-token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "WARREN_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    api_token: Option<String>,
    /// The config directory the agent runs with.
    #[arg(long, value_name = "DIR", env = "WARREN_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
}

impl AgentApiOpts {
    /// The local API to call: flags and environment first, else the newest running agent.
    fn resolve(self, want: Want) -> anyhow::Result<LocalApi> {
        let dir = self.config_dir.unwrap_or_else(identity::default_config_dir);
        api_access::resolve(self.agent_api, self.api_token, &dir, want).map_err(anyhow::Error::msg)
    }
}

#[derive(Debug, Args)]
struct TunnelOpts {
    /// The tunnel's name; its lease is keyed by it. Default: protocol, target and the URL asked
    /// for, e.g. http-8080, http-8080-app (--subdomain app), tcp-22-2222 (--remote-port 2222),
    /// so commands asking for different URLs get separate tunnels and the same command run
    /// again gets its URL back. Two running commands with one name take the tunnel from each
    /// other: the older one stops with an error.
    #[arg(long, value_name = "NAME")]
    name: Option<TunnelName>,
}

#[derive(Debug, Args)]
struct ConnOpts {
    /// The relay's control address.
    #[arg(long, value_name = "HOST:PORT", env = "WARREN_RELAY")]
    relay: Option<RelayAddr>,
    /// The token the relay accepts.
    #[arg(long, env = "WARREN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Transport to the relay: auto (QUIC, falling back to TLS over TCP), quic or tcp.
    #[arg(long, value_name = "auto|quic|tcp")]
    transport: Option<Mode>,
    /// Trust the relay's certificate if it is signed by this CA (the relay's DATA/ca.pem).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["relay_fingerprint", "insecure"])]
    relay_ca: Option<PathBuf>,
    /// Trust the relay's certificate if its chain holds a certificate with this SHA-256
    /// fingerprint (the relay prints it at start).
    #[arg(long, value_name = "HEX", conflicts_with = "insecure")]
    relay_fingerprint: Option<String>,
    /// Do not authenticate the relay at all. Traffic stays encrypted, but anyone on the path
    /// can pretend to be the relay: only for experiments.
    #[arg(long)]
    insecure: bool,
    /// This agent's identity (default: generated once into the config directory).
    #[arg(long, value_name = "ID", env = "WARREN_AGENT_ID")]
    agent_id: Option<AgentId>,
    /// Where the agent keeps its identity.
    #[arg(long, value_name = "DIR", env = "WARREN_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// This agent's local API and dashboard (`warren ls`, `warren stop`, scripts); when the
    /// port is taken the next free one is used and logged. Only loopback unless --api-token
    /// is given.
    #[arg(long = "api", value_name = "ADDR", env = "WARREN_API", default_value = warren_client::local_api::DEFAULT_ADDR)]
    api: SocketAddr,
    /// The bearer token the local API requires (default: generated once into
    /// CONFIG_DIR/api-token, 0600). The dashboard's login URL is logged at start.
    #[arg(long, value_name = "TOKEN", env = "WARREN_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Another host name the local API answers to (repeatable); it always answers localhost and
    /// loopback addresses, and refuses other names (DNS rebinding).
    #[arg(long, value_name = "NAME")]
    api_host: Vec<String>,
    /// Serve no local API (and so keep no requests for the inspector).
    #[arg(long)]
    no_api: bool,
    #[command(flatten)]
    inspect: InspectOpts,
    /// Let the relay's API open a forward into this agent to TARGET (repeatable): HOST:PORT,
    /// PORT (on loopback), CIDR (any port) or CIDR:LOW-HIGH. Without it every forward is
    /// refused.
    #[arg(long, value_name = "TARGET")]
    allow_forward: Vec<ForwardRule>,
}

/// What the request inspector keeps: the HTTP exchanges of tunnels with `--inspect true` (the
/// default), while the local API runs.
#[derive(Debug, Args)]
struct InspectOpts {
    /// Most HTTP requests the inspector keeps, with their responses, for the local API, the
    /// dashboard and `warren requests` (all tunnels together; default 1000). Past it, or past
    /// --inspect-max-bytes, the oldest are forgotten; traffic never waits on the inspector. To
    /// keep none, give the tunnel --inspect false (or the agent --no-api).
    #[arg(long, value_name = "N", value_parser = Limits::parse_requests)]
    inspect_max_requests: Option<usize>,
    /// Most memory the kept requests may hold, e.g. 512KiB or 64MiB (default 32MiB; at least
    /// 64KiB). Everything is counted: heads, the first bytes of each body (64KiB, or an eighth
    /// of this cap if less) and the bookkeeping.
    #[arg(long, value_name = "SIZE", value_parser = Limits::parse_bytes)]
    inspect_max_bytes: Option<usize>,
}

impl InspectOpts {
    /// The caps: flags, else the config file's keys, else the defaults.
    fn limits(&self, file: &FileConfig) -> Limits {
        let default = Limits::default();
        Limits {
            max_requests: self
                .inspect_max_requests
                .or(file.inspect_max_requests)
                .unwrap_or(default.max_requests),
            max_bytes: self
                .inspect_max_bytes
                .or(file.inspect_max_bytes)
                .unwrap_or(default.max_bytes),
        }
    }
}

impl ConnOpts {
    /// `--config-dir`, else the default config directory.
    fn config_dir(&self) -> PathBuf {
        self.config_dir.clone().unwrap_or_else(identity::default_config_dir)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::NetSandboxChild { network, cmd } = &cli.command {
        // Before any thread exists: unshare() of the mount namespace needs that.
        return warren_client::net::sandbox::child_main(network, cmd);
    }
    let demo = matches!(cli.command, Command::Demo { .. });
    // hickory-server logs every DNS query at info; its warnings are enough.
    warren_server::util::init_logging(if demo { "warn" } else { "info,hickory_server=warn" });
    warren_server::util::raise_fd_limit();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = cli.threads.unwrap_or(if demo { cpus / 2 } else { 1 }).max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Net { api, cmd } => rt.block_on(async move {
            let api = api.resolve(Want::Networks)?;
            net_cli::run(&api, cmd).await
        }),
        other => rt.block_on(run(other)).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        t.cancel();
    });
    token
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Http { target, subdomain, hostname, http, rate, access, tunnel, conn } => {
            let mut pairs = http.pairs();
            pairs.extend(rate.rate_limit.map(|r| ("rate_limit", r)));
            pairs.extend(access.pairs());
            let spec = cli_spec(Protocol::Http, target, tunnel.name, pairs, |s| {
                s.subdomain = subdomain;
                s.hostname = hostname;
            })?;
            run_agent(conn, FileConfig { tunnels: vec![spec], ..FileConfig::default() }).await
        }
        Command::Tcp { target, remote_port, proxy, rate, access, tunnel, conn } => {
            let mut pairs = access.pairs();
            pairs.extend(rate.rate_limit.map(|r| ("rate_limit", r)));
            pairs.extend(proxy.proxy_protocol.map(|p| ("proxy_protocol", p)));
            let spec = cli_spec(Protocol::Tcp, target, tunnel.name, pairs, |s| {
                s.remote_port = remote_port;
            })?;
            run_agent(conn, FileConfig { tunnels: vec![spec], ..FileConfig::default() }).await
        }
        Command::Tls { target, hostname, proxy, rate, access, tunnel, conn } => {
            let mut pairs = access.pairs();
            pairs.extend(rate.rate_limit.map(|r| ("rate_limit", r)));
            pairs.extend(proxy.proxy_protocol.map(|p| ("proxy_protocol", p)));
            let spec = cli_spec(Protocol::Tls, target, tunnel.name, pairs, |s| {
                s.hostname = hostname;
            })?;
            run_agent(conn, FileConfig { tunnels: vec![spec], ..FileConfig::default() }).await
        }
        Command::Udp { target, remote_port, access, tunnel, conn } => {
            let spec = cli_spec(Protocol::Udp, target, tunnel.name, access.pairs(), |s| {
                s.remote_port = remote_port;
            })?;
            run_agent(conn, FileConfig { tunnels: vec![spec], ..FileConfig::default() }).await
        }
        Command::Start { config, conn } => {
            let file = config::load(&config)?;
            if file.tunnels.is_empty() {
                anyhow::bail!(
                    "config file {} defines no tunnels: add a [tunnels.NAME] table",
                    config.display()
                );
            }
            run_agent(conn, file).await
        }
        Command::Agent { config, conn, net, docker } => {
            let file = match config {
                Some(path) => config::load(&path)?,
                None => FileConfig::default(),
            };
            run_daemon(conn, file, net, docker).await
        }
        Command::Net { .. } | Command::NetSandboxChild { .. } => {
            unreachable!("handled in main")
        }
        Command::Demo { http, ports } => run_demo(DemoOptions { http, ports }).await,
        Command::Ls { api } => {
            let v = agent_api(&api.resolve(Want::Any)?, "GET", "/api/tunnels", None).await?;
            let tunnels = v["tunnels"].as_array().cloned().unwrap_or_default();
            let mut out = std::io::stdout().lock();
            if tunnels.is_empty() {
                let _ = writeln!(out, "no tunnels");
            }
            for t in tunnels {
                let _ = writeln!(
                    out,
                    "{:<24} {:<5} {:<44} -> {}{}",
                    t["name"].as_str().unwrap_or("?"),
                    t["proto"].as_str().unwrap_or("?"),
                    t["public_url"].as_str().unwrap_or("(connecting)"),
                    t["config"]["addr"].as_str().unwrap_or("?"),
                    if t["forwarded"].as_bool() == Some(true) { "  (forward)" } else { "" }
                );
            }
            Ok(())
        }
        Command::Requests { limit, api } => {
            let path = format!("/api/requests/http?limit={limit}");
            let v = agent_api(&api.resolve(Want::Any)?, "GET", &path, None).await?;
            let mut out = std::io::stdout().lock();
            let reqs = v["requests"].as_array().cloned().unwrap_or_default();
            if reqs.is_empty() {
                let _ = writeln!(out, "no requests");
            }
            for r in reqs {
                let status = r["response"]["status_code"]
                    .as_u64()
                    .map_or_else(|| "---".to_owned(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "{}  {}  {:<16} {:<7} {:<40} {}{}",
                    r["id"].as_str().unwrap_or("?"),
                    r["start"].as_str().unwrap_or("?"),
                    r["tunnel_name"].as_str().unwrap_or("?"),
                    r["request"]["method"].as_str().unwrap_or("?"),
                    r["request"]["uri"].as_str().unwrap_or("?"),
                    status,
                    if r["replay_of"].is_string() { "  (replay)" } else { "" },
                );
            }
            Ok(())
        }
        Command::Replay { id, api } => {
            let body = serde_json::json!({ "id": id }).to_string();
            let v = agent_api(&api.resolve(Want::Any)?, "POST", "/api/requests/http", Some(body))
                .await?;
            let status = v["response"]["status"].as_str().unwrap_or("no response");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "{} {} -> {status}",
                v["request"]["method"].as_str().unwrap_or("?"),
                v["request"]["uri"].as_str().unwrap_or("?")
            );
            if let Some(text) = v["response"]["body"]["text"].as_str() {
                let _ = writeln!(out, "{text}");
            }
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(out, "error: {e}");
            }
            Ok(())
        }
        Command::Stop { name, api } => {
            let path = format!("/api/tunnels/{name}");
            agent_api(&api.resolve(Want::Any)?, "DELETE", &path, None).await?;
            println!("stopped {name}");
            Ok(())
        }
    }
}

/// Merges flags and environment over the file (file < env < flags) into the agent's config.
fn agent_config(conn: ConnOpts, file: FileConfig) -> anyhow::Result<AgentConfig> {
    let relay = match (conn.relay, file.relay) {
        (Some(r), _) => r,
        (None, Some(r)) => r.parse::<RelayAddr>().map_err(anyhow::Error::msg)?,
        (None, None) => anyhow::bail!(
            "no relay given: pass --relay HOST:PORT or set WARREN_RELAY (the relay's control port, 7443 by default)"
        ),
    };
    let Some(token) = conn.token.or(file.token).filter(|t| !t.is_empty()) else {
        anyhow::bail!(
            "no token given: pass --token TOKEN or set WARREN_TOKEN (the relay's --token)"
        );
    };
    let trust = if conn.insecure
        || (file.insecure && conn.relay_ca.is_none() && conn.relay_fingerprint.is_none())
    {
        tracing::warn!(
            "--insecure: the relay's certificate is NOT checked; anyone on the path can impersonate the relay and read your traffic"
        );
        Trust::Insecure
    } else if let Some(fp) = conn.relay_fingerprint.or(if conn.relay_ca.is_none() {
        file.relay_fingerprint
    } else {
        None
    }) {
        Trust::Fingerprint(warren_transport::tls::parse_fingerprint(&fp)?)
    } else if let Some(ca) = conn.relay_ca.or(file.relay_ca) {
        Trust::ca_file(&ca)?
    } else {
        Trust::System
    };
    let agent_id = match conn.agent_id {
        Some(id) => id,
        None => match file.agent_id {
            Some(id) => AgentId::parse(&id)?,
            None => {
                let dir = conn.config_dir.unwrap_or_else(identity::default_config_dir);
                identity::load_or_create(&dir).map_err(anyhow::Error::msg)?
            }
        },
    };
    Ok(AgentConfig {
        relay,
        token: Token::new(token),
        trust,
        mode: conn.transport.or(file.transport).unwrap_or_default(),
        agent_id,
        tunnels: file.tunnels,
        // Flags add to the file's rules: both are the user's consent.
        allow_forward: conn.allow_forward.into_iter().chain(file.allow_forward).collect(),
    })
}

/// One request to a running agent's local API; its JSON answer, or its error message.
async fn agent_api(
    api: &LocalApi,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    Ok(api.call(method, path, body, std::time::Duration::from_secs(20)).await?)
}

/// Whether `e` is the agent answering 404 (the thing asked for does not exist).
fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<api_access::CallError>(),
        Some(api_access::CallError::Refused(r)) if r.status == http::StatusCode::NOT_FOUND
    )
}

async fn run_agent(conn: ConnOpts, file: FileConfig) -> anyhow::Result<()> {
    let networks = warren_client::net::api::absent_router();
    run_agent_with(conn, file, networks, None, None, shutdown_on_signal()).await
}

/// `warren agent`: networks (when root), the local API, and a relay session when a relay is
/// given.
async fn run_daemon(
    conn: ConnOpts,
    file: FileConfig,
    net: net_cli::NetOpts,
    docker: DockerOpts,
) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    if docker.docker_plugin && net.no_networks {
        anyhow::bail!("--docker-plugin serves warren's networks to Docker: drop --no-networks");
    }
    let no_relay = conn.relay.is_none()
        && file.relay.is_none()
        && conn.token.is_none()
        && file.token.is_none();
    anyhow::ensure!(
        !(docker.docker && no_relay),
        "--docker opens tunnels for labelled containers: give --relay and --token too"
    );
    let mut manager = None;
    let networks = if net.no_networks {
        warren_client::net::api::absent_router()
    } else {
        let dir = conn.config_dir();
        let mut cfg = warren_client::net::NetConfig::new(&dir);
        cfg.pool = net.net_pool;
        cfg.ttl = net.dns_ttl;
        if !net.dns_upstream.is_empty() {
            cfg.upstreams = net.dns_upstream;
        }
        cfg.vtep = net.vtep;
        cfg.vxlan_port = net.vxlan_port;
        let m = warren_client::net::NetManager::start(cfg, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("networks: {e}"))?;
        warren_client::forward::set_name_resolver(m.clone());
        manager = Some(m.clone());
        warren_client::net::api::router(m)
    };
    if docker.docker_plugin
        && let Some(m) = manager.clone()
    {
        let plugin =
            warren_client::docker::plugin::Plugin::new(m, Some(docker.docker_socket.clone()));
        plugin
            .serve(&docker.docker_plugin_socket, shutdown.clone())
            .await
            .map_err(anyhow::Error::msg)?;
    }
    if no_relay {
        return run_local(conn, &file, networks, manager.is_some(), shutdown).await;
    }
    let expose = docker.docker.then_some(docker.docker_socket);
    run_agent_with(conn, file, networks, manager, expose, shutdown).await
}

/// An agent without a relay: the local API and networks only.
async fn run_local(
    conn: ConnOpts,
    file: &FileConfig,
    networks: axum::Router,
    manages_networks: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !conn.no_api,
        "with neither a relay nor a local API this agent would do nothing"
    );
    tracing::info!(
        "no relay given: serving networks and the local API only (add --relay and --token for tunnels)"
    );
    let (handle, mut inbox) = agent::channel(Vec::new());
    handle.state.set_no_relay();
    let settings = ApiSettings::from(&conn, file)?;
    let api = settings.serve(handle, networks, manages_networks, shutdown.clone()).await?;
    let refuse = tokio::spawn(async move {
        while let Some(c) = inbox.next_control().await {
            match c {
                agent::Control::Add(_, reply) => {
                    let _ = reply.send(Err(
                        "this agent has no relay: start it with --relay and --token to open tunnels"
                            .into(),
                    ));
                }
                agent::Control::Remove(_, reply) => {
                    let _ = reply.send(false);
                }
                agent::Control::Net(call) => {
                    let _ = call.reply.send(Err(agent::NetCallError::Disconnected));
                }
                agent::Control::NetSend(_) => {}
            }
        }
    });
    shutdown.cancelled().await;
    refuse.abort();
    api.finish().await;
    Ok(())
}

/// The local API's settings, checked before anything starts.
struct ApiSettings {
    addr: SocketAddr,
    token: String,
    /// The token's file when it was generated there (not given with --api-token).
    token_file: Option<PathBuf>,
    hosts: Vec<String>,
    config_dir: PathBuf,
    /// The request inspector's caps.
    inspect: Limits,
}

/// The local API being served, and this agent's entry in `agent.json`.
struct ServedApi {
    task: tokio::task::JoinHandle<()>,
    _registration: Option<api_access::Registration>,
}

impl ServedApi {
    async fn finish(self) {
        let _ = self.task.await;
    }
}

impl ApiSettings {
    /// The token (given, or generated into the config directory) and the hosts; an address
    /// others can reach needs a token given on purpose.
    fn from(conn: &ConnOpts, file: &FileConfig) -> anyhow::Result<Self> {
        let config_dir = conn.config_dir();
        let given = conn.api_token.clone().filter(|t| !t.trim().is_empty());
        if !conn.api.ip().is_loopback() && given.is_none() {
            anyhow::bail!(
                "--api {}: not a loopback address, so others could reach this agent's API; give --api-token TOKEN too (and --api-host NAME for each name it is reached by)",
                conn.api
            );
        }
        let (token, token_file) = match given {
            Some(t) if t.trim().len() < 16 => {
                anyhow::bail!("--api-token: use 16 characters at least")
            }
            Some(t) => (t.trim().to_owned(), None),
            None => {
                let (t, path) = api_access::load_or_create_token(&config_dir)
                    .map_err(|e| anyhow::anyhow!("the local API's token: {e}"))?;
                (t, Some(path))
            }
        };
        Ok(Self {
            addr: conn.api,
            token,
            token_file,
            hosts: conn.api_host.clone(),
            config_dir,
            inspect: conn.inspect.limits(file),
        })
    }

    /// Binds the API (or the next free port), serves it, logs the dashboard's login URL on
    /// stderr and lists this agent in `agent.json`.
    async fn serve(
        self,
        handle: agent::AgentHandle,
        networks: axum::Router,
        manages_networks: bool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ServedApi> {
        let listener = warren_client::local_api::bind(self.addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot serve the local API on {}: {e} (use --api ADDR, or --no-api)",
                self.addr
            )
        })?;
        let addr = listener.local_addr()?;
        if addr != self.addr && self.addr.port() != 0 {
            tracing::info!(wanted = %self.addr, "local API port taken; using the next free one");
        }
        tracing::info!(name = %"api", addr = %addr, "listening");
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        tracing::info!(
            "dashboard: http://{shown}/#token={} (the local API's token; `warren ls` and the other commands find it themselves)",
            self.token
        );
        let registration = match api_access::register(
            &self.config_dir,
            addr,
            self.token_file.clone(),
            manages_networks,
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this agent in agent.json: `warren ls` and the other commands need --agent-api and --api-token");
                None
            }
        };
        handle.state.set_inspector(warren_client::inspect::Inspector::new(self.inspect));
        let access = warren_client::local_api::Access::new(self.token, addr, self.hosts);
        let task = tokio::spawn(warren_client::local_api::serve(
            listener, handle, networks, access, shutdown,
        ));
        Ok(ServedApi { task, _registration: registration })
    }
}

async fn run_agent_with(
    conn: ConnOpts,
    file: FileConfig,
    networks: axum::Router,
    manager: Option<Arc<warren_client::net::NetManager>>,
    docker_socket: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let api = if conn.no_api { None } else { Some(ApiSettings::from(&conn, &file)?) };
    let cfg = agent_config(conn, file)?;
    tracing::info!(agent = %cfg.agent_id, relay = %cfg.relay, tunnels = cfg.tunnels.len(), "starting agent");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let AgentEvent::Bound { url, changed, .. } = event else { continue };
            if changed {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{url}");
                let _ = out.flush();
            }
        }
    });
    let (handle, mut inbox) = agent::channel(cfg.tunnels.clone());
    let manages_networks = manager.is_some();
    if let Some(m) = manager {
        // Overlay networks run through the relay sessions of this agent.
        let overlay = m.enable_overlays(handle.control.clone());
        handle.state.set_overlay(Arc::new(warren_client::net::overlay::Hooks(overlay)));
    }
    if let Some(socket) = docker_socket {
        tokio::spawn(warren_client::docker::expose::run(
            socket,
            handle.control.clone(),
            shutdown.clone(),
        ));
    }
    let served = match api {
        Some(settings) => {
            match settings.serve(handle, networks, manages_networks, shutdown.clone()).await {
                Ok(served) => Some(served),
                Err(e) => {
                    tracing::warn!("no local API: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let result = agent::run_with(cfg, &mut inbox, tx, shutdown).await;
    let _ = printer.await;
    drop(served);
    result.map_err(anyhow::Error::from)
}

async fn run_demo(opts: DemoOptions) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let demo = tokio::spawn(demo::run(opts, tx, shutdown.clone()));
    if let Ok(urls) = rx.await {
        let tcp_port = urls.tcp.rsplit(':').next().unwrap_or_default().to_owned();
        let https = match &urls.https {
            Some(u) => format!(
                "  HTTPS        {u}\n               try: curl --cacert {ca} {u}/   (HTTP/2; the demo's own CA)\n",
                ca = urls.ca_path.display()
            ),
            None => String::new(),
        };
        let dashboard = match &urls.dashboard {
            Some(d) => format!(
                "  Dashboard    {d}   (relay API and dashboard; admin token {})\n",
                urls.admin_token
            ),
            None => String::new(),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "warren demo: a relay, an agent and a sample web page, all in this process.\n\n  \
             HTTP tunnel  {http}\n               try: curl {http}/   (or open it in a browser)\n\
             {https}  \
             TCP tunnel   {tcp}\n               try: curl http://127.0.0.1:{tcp_port}/\n  \
             Sample page  http://{sample}  (the service behind both tunnels)\n\
             {dashboard}\n\
             Press Ctrl-C to stop.",
            http = urls.http,
            tcp = urls.tcp,
            sample = urls.sample,
        );
        let _ = out.flush();
    }
    demo.await??;
    Ok(())
}

//! `warren`: the agent and CLI.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren_client::agent::{self, AgentConfig, AgentEvent};
use warren_client::config::{self, FileConfig};
use warren_client::demo::{self, DemoOptions};
use warren_client::identity;
use warren_client::tunnel::{Target, TunnelSpec};
use warren_proto::message::Token;
use warren_proto::{AgentId, Protocol, Subdomain, TunnelName};
use warren_server::config::PortRange;
use warren_transport::{Mode, RelayAddr, Trust};

/// warren: put a local service on a public address, through a relay you run yourself.
///
/// Start a relay on a public host (`warren-server --domain example.com --token s3cret`), then
/// expose services from anywhere behind NAT. Sessions are encrypted (QUIC or TLS), and each
/// tunnel keeps its URL across reconnects and restarts.
#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    after_help = "Examples:\n  warren demo                                   everything on loopback, to try it out\n  warren http 8080 --relay example.com:7443 --token s3cret --subdomain shop\n  warren tcp 5432 --relay example.com:7443 --token s3cret\n  warren start --config warren.toml\n\nThe public URL is printed alone on stdout; logs go to stderr (WARREN_LOG=debug for more)."
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
        after_help = "Examples:\n  warren http 8080 --relay example.com:7443 --token s3cret\n  warren http 127.0.0.1:3000 --subdomain shop --relay example.com:7443 --token s3cret"
    )]
    Http {
        /// The local service: PORT (on 127.0.0.1) or HOST:PORT.
        target: Target,
        /// The subdomain to serve under (default: a stable name derived from this agent and
        /// the tunnel name).
        #[arg(long, value_name = "NAME")]
        subdomain: Option<Subdomain>,
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
        tunnel: TunnelOpts,
        #[command(flatten)]
        conn: ConnOpts,
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

#[derive(Debug, Args)]
struct TunnelOpts {
    /// The tunnel's name; its lease is keyed by it (default: PROTO-PORT, e.g. http-8080).
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let demo = matches!(cli.command, Command::Demo { .. });
    warren_server::util::init_logging(if demo { "warn" } else { "info" });
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
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
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
        Command::Http { target, subdomain, tunnel, conn } => {
            let name =
                tunnel.name.unwrap_or_else(|| TunnelSpec::default_name(Protocol::Http, &target));
            let spec =
                TunnelSpec { name, protocol: Protocol::Http, target, subdomain, remote_port: None };
            run_agent(conn, FileConfig { tunnels: vec![spec], ..FileConfig::default() }).await
        }
        Command::Tcp { target, remote_port, tunnel, conn } => {
            let name =
                tunnel.name.unwrap_or_else(|| TunnelSpec::default_name(Protocol::Tcp, &target));
            let spec =
                TunnelSpec { name, protocol: Protocol::Tcp, target, subdomain: None, remote_port };
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
        Command::Demo { http, ports } => run_demo(DemoOptions { http, ports }).await,
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
    })
}

async fn run_agent(conn: ConnOpts, file: FileConfig) -> anyhow::Result<()> {
    let cfg = agent_config(conn, file)?;
    tracing::info!(agent = %cfg.agent_id, relay = %cfg.relay, tunnels = cfg.tunnels.len(), "starting agent");
    let shutdown = shutdown_on_signal();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some(AgentEvent::Bound { url, changed, .. }) = rx.recv().await {
            if changed {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{url}");
                let _ = out.flush();
            }
        }
    });
    let result = agent::run(cfg, tx, shutdown).await;
    let _ = printer.await;
    result.map_err(anyhow::Error::from)
}

async fn run_demo(opts: DemoOptions) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let demo = tokio::spawn(demo::run(opts, tx, shutdown.clone()));
    if let Ok(urls) = rx.await {
        let tcp_port = urls.tcp.rsplit(':').next().unwrap_or_default().to_owned();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "warren demo: a relay, an agent and a sample web page, all in this process.\n\n  \
             HTTP tunnel  {http}\n               try: curl {http}/   (or open it in a browser)\n  \
             TCP tunnel   {tcp}\n               try: curl http://127.0.0.1:{tcp_port}/\n  \
             Sample page  http://{sample}  (the service behind both tunnels)\n\n\
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

//! `warren-server`: the relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_proto::message::Token;
use warren_server::config::{PortRange, RelayConfig, parse_duration};
use warren_server::{Relay, util};

/// warren relay: puts services that sit behind NAT on this host's public address.
///
/// Agents (`warren http 8080 --relay THIS_HOST:7443 --token TOKEN`) connect to the control port
/// over QUIC (UDP) or TLS (TCP), both on the same port number. HTTP tunnels are served as
/// NAME.DOMAIN on the HTTP listener; TCP tunnels get a port from the pool.
///
/// On first start the relay creates a development CA in the data directory and prints its path
/// and fingerprint: give agents `--relay-ca DATA/ca.pem` or `--relay-fingerprint HEX`.
#[derive(Debug, Parser)]
#[command(
    name = "warren-server",
    version,
    after_help = "Examples:\n  warren-server --domain example.com --token s3cret\n  warren-server --domain localhost --control 127.0.0.1:7443 --http 127.0.0.1:8080 --ports 127.0.0.1:20000-20099"
)]
struct Args {
    /// Domain under which HTTP tunnels are named (NAME.DOMAIN); point a wildcard DNS record at
    /// this host.
    #[arg(long, default_value = "localhost", env = "WARREN_DOMAIN")]
    domain: String,
    /// Control port for agents: QUIC on UDP and TLS on TCP, same number.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    control: SocketAddr,
    /// Serve only TLS over TCP on the control port (no QUIC).
    #[arg(long)]
    no_quic: bool,
    /// Public HTTP listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:80")]
    http: SocketAddr,
    /// Public TCP port pool: one address, a range of ports, each leased to one tunnel.
    #[arg(long, value_name = "[IP:]LOW-HIGH", default_value = "0.0.0.0:20000-29999")]
    ports: PortRange,
    /// Data directory: development CA, generated token.
    #[arg(long, value_name = "DIR", default_value = "./warren-data", env = "WARREN_DATA")]
    data: PathBuf,
    /// Token agents must present (repeatable). Without any, one is generated into DATA/agent-token.
    #[arg(
        long = "token",
        value_name = "TOKEN",
        env = "WARREN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    tokens: Vec<String>,
    /// How long a disconnected agent's subdomains and ports stay reserved for it (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    lease_grace: std::time::Duration,
    /// Worker threads for the relay's runtime (default: half the CPUs, at least 1: most of a
    /// relay's work is the kernel's network stack, which needs the other cores).
    #[arg(long, value_name = "N", env = "WARREN_THREADS")]
    threads: Option<usize>,
    /// Extra host name or IP address for the relay's certificate (repeatable).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    util::init_logging("info");
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = args.threads.unwrap_or(cpus / 2).max(1);
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
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_or_generate_token(data: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let path = data.join("agent-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            tracing::info!(path = %path.display(), "no --token given; using the token stored in the data directory");
            return Ok(t);
        }
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let token = util::random_alnum(32);
    // An empty token file is replaced; any other existing file was returned above.
    let _ = std::fs::remove_file(&path);
    util::write_private(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::warn!(
        path = %path.display(),
        token = %token,
        "no --token given; generated an agent token, kept in the data directory (agents: --token TOKEN)"
    );
    Ok(token)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut tokens: Vec<Token> =
        args.tokens.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).map(Token::new).collect();
    if tokens.is_empty() {
        tokens.push(Token::new(load_or_generate_token(&args.data)?));
    }
    let config = RelayConfig {
        domain: args.domain.trim_end_matches('.').to_ascii_lowercase(),
        control: args.control,
        quic: !args.no_quic,
        http: args.http,
        ports: args.ports,
        data_dir: args.data,
        tokens,
        lease_grace: args.lease_grace,
        tls_names: args.tls_names,
    };
    let ports = config.ports;
    let relay = Relay::bind(config).await?;
    tracing::info!(
        path = %relay.ca_path.display(),
        fingerprint = %relay.ca_fingerprint,
        created = relay.ca_created,
        "development CA (agents: --relay-ca PATH or --relay-fingerprint FINGERPRINT)"
    );
    tracing::info!(range = %ports, "tcp port pool");
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    relay.run(shutdown).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

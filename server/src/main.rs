//! `warren-server`: the relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_proto::Cidr;
use warren_proto::message::Token;
use warren_server::config::{HandshakeLimits, PortRange, RelayConfig, parse_duration};
use warren_server::edge::EdgeConfig;
use warren_server::router::Caps;
use warren_server::{Relay, util};

/// warren relay: puts services that sit behind NAT on this host's public address.
///
/// Agents (`warren http 8080 --relay THIS_HOST:7443 --token TOKEN`) connect to the control port
/// over QUIC (UDP) or TLS (TCP), both on the same port number. HTTP tunnels are served as
/// NAME.DOMAIN on the HTTP and HTTPS listeners; TLS tunnels by SNI on the HTTPS listener,
/// passed through undecrypted; TCP and UDP tunnels get a port from the pool.
///
/// On first start the relay creates a development CA in the data directory and prints its path
/// and fingerprint: give agents `--relay-ca DATA/ca.pem` or `--relay-fingerprint HEX`.
#[derive(Debug, Parser)]
#[command(
    name = "warren-server",
    version,
    after_help = "Examples:\n  warren-server --domain example.com --token s3cret\n  warren-server --domain example.com --token s3cret --cert-dir /etc/warren/certs\n  warren-server --domain example.com --token s3cret --acme-email ops@example.com\n  warren-server --domain example.com --token s3cret --trust-proxy 10.0.0.0/8 --access-log\n  warren-server --domain localhost --control 127.0.0.1:7443 --http 127.0.0.1:8080 --https 127.0.0.1:8443 --ports 127.0.0.1:20000-20099"
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
    /// Public port pool for TCP and UDP tunnels: one address, a range of ports, each leased to
    /// one tunnel per protocol.
    #[arg(long, value_name = "[IP:]LOW-HIGH", default_value = "0.0.0.0:20000-29999")]
    ports: PortRange,
    /// Data directory: development CA, generated tokens, database, ACME account. Kept 0700 with
    /// its secrets 0600: wider modes found at start are tightened, with a warning naming each.
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
    /// Leases are kept in DATA/warren.db: after a restart of the relay every one is held for its
    /// owner for this long from the start (whoever reconnects first), so another token cannot
    /// take a name while its owner's agent is still reconnecting. Overlay networks: a member
    /// agent that disconnected keeps its place for this long too; then its endpoints are
    /// withdrawn from the other members.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    lease_grace: std::time::Duration,
    /// Most tunnels one token may hold over all its agents and sessions, leases of disconnected
    /// agents within their grace included (0: no cap). Binds past it are refused. A token created
    /// through the API with a smaller `max_tunnels` gets that.
    #[arg(long, value_name = "N", default_value_t = Caps::default().tunnels_per_token)]
    max_tunnels_per_token: u32,
    /// Most tunnels one agent session may hold (0: no cap). Binds past it are refused.
    #[arg(long, value_name = "N", default_value_t = Caps::default().tunnels_per_session)]
    max_tunnels_per_session: u32,
    /// Most reservations (POST /api/v1/reservations) an agent token may hold for itself; past it
    /// the API answers 409. 0: agent tokens may not reserve. The admin token is not capped and
    /// may reserve for any token.
    #[arg(long, value_name = "N", default_value_t = Caps::default().reservations_per_token)]
    max_reservations: u32,
    /// Overlay networks created without --subnet get a free /24 of this pool (per account).
    #[arg(long, value_name = "CIDR", default_value = "10.214.0.0/16")]
    overlay_pool: ipnet::Ipv4Net,
    /// Worker threads for the relay's runtime (default: half the CPUs, at least 1: most of a
    /// relay's work is the kernel's network stack, which needs the other cores).
    #[arg(long, value_name = "N", env = "WARREN_THREADS")]
    threads: Option<usize>,
    /// Extra host name or IP address for the relay's certificate (repeatable). The certificate
    /// already names the domain, `*.domain`, localhost, 127.0.0.1, ::1 and every specific IP
    /// address given to --control, --http, --https and --api; add the names agents dial
    /// otherwise (a public DNS name, or the address of a relay listening on 0.0.0.0), e.g.
    /// `--tls-name relay.example.com --tls-name 203.0.113.7`.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// Public HTTPS listener: HTTP tunnels over TLS (HTTP/1.1 and HTTP/2) and TLS tunnels
    /// passed through by SNI.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:443", conflicts_with = "no_https")]
    https: SocketAddr,
    /// Serve no HTTPS listener (and so no TLS tunnels).
    #[arg(long)]
    no_https: bool,
    /// Certificates for the HTTPS listener: HOST.pem + HOST-key.pem (or HOST.crt + HOST.key) per
    /// host, _wildcard.DOMAIN.pem for a wildcard; re-read when files change. Names no file
    /// covers get a certificate from the development CA.
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// Announce HTTP tunnels with their https:// URL (they answer on both listeners).
    #[arg(long)]
    prefer_https: bool,
    /// Believe PROXY headers and X-Forwarded-For from load balancers in this network
    /// (repeatable, e.g. 10.0.0.0/8): visitors are then known by their real address.
    #[arg(long = "trust-proxy", value_name = "CIDR")]
    trust_proxy: Vec<Cidr>,
    /// Longest a visitor may take to send a request head, TLS hello or PROXY header.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    header_timeout: std::time::Duration,
    /// Largest request head accepted from a visitor, in bytes (at least 8192).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = parse_header_size)]
    max_header_size: usize,
    /// Close HTTP(S) visitor connections (and WebSockets) after this long without traffic.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// Most concurrent connections from one visitor address, over all listeners (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_conns_per_ip: usize,
    /// Most agent handshakes in progress at once from one address, on the control port (0: no
    /// limit). A handshake counts from the connection's accept until the relay's Welcome or
    /// refusal (5 s at most); past the limit, TCP connections are closed at once and QUIC ones
    /// refused. Raise it when many agents share one public address (a NAT) and all reconnect
    /// at once after a relay restart; they retry with backoff either way.
    #[arg(long, value_name = "N", default_value_t = HandshakeLimits::default().per_ip)]
    max_handshakes_per_ip: usize,
    /// Most agent handshakes in progress at once on the control port, from all addresses (0: no
    /// limit). Bounds the memory peers without a token can make the relay hold (at most a
    /// 256 KiB window each); agents turned away retry with backoff.
    #[arg(long, value_name = "N", default_value_t = HandshakeLimits::default().total)]
    max_handshakes: usize,
    /// Most concurrent visitor streams to one agent session (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 8192)]
    max_streams_per_agent: usize,
    /// Obtain certificates for HTTP tunnels' names from an ACME CA (Let's Encrypt by default),
    /// registering with this contact address. Challenges are HTTP-01: the CA must reach this
    /// relay's HTTP listener on port 80 under each name.
    #[arg(long, value_name = "EMAIL")]
    acme_email: Option<String>,
    /// The ACME CA's directory URL.
    #[arg(long, value_name = "URL", default_value = warren_server::acme::LETS_ENCRYPT, requires = "acme_email")]
    acme_directory: String,
    /// Trust this root certificate (PEM) for the ACME directory's HTTPS instead of the system's
    /// roots: for private CAs (step-ca) and test CAs (pebble).
    #[arg(long, value_name = "FILE", requires = "acme_email")]
    acme_ca: Option<PathBuf>,
    /// Most ACME orders started in any hour (at most 4 run at once). Names past it are served
    /// with the fallback certificate and ordered later, from a bounded queue; keep it under your
    /// CA's rate limits (Let's Encrypt: 300 new orders per account per 3 hours).
    #[arg(
        long,
        value_name = "N",
        default_value_t = warren_server::acme::DEFAULT_ORDERS_PER_HOUR,
        value_parser = clap::value_parser!(u32).range(1..),
        requires = "acme_email"
    )]
    acme_orders_per_hour: u32,
    /// REST API (/api/v1, see /api/v1/openapi.json) and Prometheus metrics (/metrics).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7400", conflicts_with = "no_api")]
    api: SocketAddr,
    /// Serve no API and no metrics.
    #[arg(long)]
    no_api: bool,
    /// The API's admin token (default: generated once into DATA/admin-token).
    #[arg(long, value_name = "TOKEN", env = "WARREN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Another host name the API answers to (repeatable), e.g. the name a reverse proxy or
    /// your browser reaches it by. It always answers loopback names and addresses and the
    /// address it is bound to; other names get 421 (DNS rebinding).
    #[arg(long, value_name = "NAME")]
    api_host: Vec<String>,
    /// A token that may read /metrics and nothing else, for Prometheus (the admin token works
    /// too).
    #[arg(long, value_name = "TOKEN", env = "WARREN_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Failed authentications one address may have in a minute, on the API and the control
    /// port, before it is locked out (0.25 s, doubling up to 30 s) and even right tokens get
    /// 429 until the lockout ends.
    #[arg(long, value_name = "N", default_value_t = warren_web::throttle::FREE_FAILURES)]
    auth_failures_per_minute: u32,
    /// How often tunnel traffic is sampled into the history at /api/v1/stats.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    stats_interval: std::time::Duration,
    /// Log one line per HTTP request (visitor, host, method, path, status, time) and per TCP or
    /// TLS connection (visitor, tunnel, bytes, time), with visitors' real addresses.
    #[arg(long)]
    access_log: bool,
    /// Forget a UDP tunnel's visitor flow after this long without packets.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    udp_idle_timeout: std::time::Duration,
}

fn parse_header_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 8192 => Ok(n),
        Ok(_) => {
            Err("must be at least 8192 bytes (HTTP/1.1 servers read heads in 8 KiB buffers)".into())
        }
        Err(_) => Err(format!("{s:?} is not a number of bytes")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    util::init_logging("info");
    util::raise_fd_limit();
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
    let (token, created) = load_or_generate(data, "agent-token")?;
    let path = data.join("agent-token");
    if created {
        tracing::warn!(
            path = %path.display(),
            token = %token,
            "no --token given; generated an agent token, kept in the data directory (agents: --token TOKEN)"
        );
    } else {
        tracing::info!(path = %path.display(), "no --token given; using the token stored in the data directory");
    }
    Ok(token)
}

/// The secret kept in `DATA/file`, created (mode 0600) when absent or empty; true if created.
fn load_or_generate(data: &Path, file: &str) -> anyhow::Result<(String, bool)> {
    use anyhow::Context;
    let path = data.join(file);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok((t, false));
        }
    }
    util::private_dir(data).with_context(|| format!("creating {}", data.display()))?;
    let token = util::random_alnum(32);
    // An empty file is replaced; any other existing file was returned above.
    let _ = std::fs::remove_file(&path);
    util::write_private(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((token, true))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut tokens: Vec<Token> =
        args.tokens.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).map(Token::new).collect();
    if tokens.is_empty() {
        tokens.push(Token::new(load_or_generate_token(&args.data)?));
    }
    let admin_token = match args.admin_token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => t.to_owned(),
        None if args.no_api => String::new(),
        None => {
            let (t, created) = load_or_generate(&args.data, "admin-token")?;
            tracing::info!(
                path = %args.data.join("admin-token").display(),
                created,
                "API admin token (use it as `Authorization: Bearer TOKEN`)"
            );
            t
        }
    };
    let config = RelayConfig {
        domain: args.domain.trim_end_matches('.').to_ascii_lowercase(),
        control: args.control,
        quic: !args.no_quic,
        http: args.http,
        ports: args.ports,
        data_dir: args.data,
        tokens,
        lease_grace: args.lease_grace,
        caps: Caps {
            tunnels_per_token: args.max_tunnels_per_token,
            tunnels_per_session: args.max_tunnels_per_session,
            reservations_per_token: args.max_reservations,
        },
        tls_names: args.tls_names,
        https: (!args.no_https).then_some(args.https),
        cert_dir: args.cert_dir,
        prefer_https: args.prefer_https,
        edge: EdgeConfig {
            trust_proxy: args.trust_proxy,
            header_timeout: args.header_timeout,
            max_header_bytes: args.max_header_size,
            idle_timeout: args.idle_timeout,
            max_conns_per_ip: args.max_conns_per_ip,
            max_streams_per_agent: args.max_streams_per_agent,
            udp_idle_timeout: args.udp_idle_timeout,
            access_log: args.access_log,
        },
        api: (!args.no_api).then_some(args.api),
        admin_token: Token::new(admin_token),
        api_hosts: args.api_host,
        metrics_token: args.metrics_token.filter(|t| !t.trim().is_empty()).map(Token::new),
        auth_failures_per_minute: args.auth_failures_per_minute,
        stats_interval: args.stats_interval,
        overlay_pool: args.overlay_pool,
        handshakes: HandshakeLimits {
            per_ip: args.max_handshakes_per_ip,
            total: args.max_handshakes,
        },
        acme: args.acme_email.map(|email| warren_server::acme::AcmeSettings {
            email,
            directory: args.acme_directory,
            directory_ca: args.acme_ca,
            orders_per_hour: args.acme_orders_per_hour,
        }),
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

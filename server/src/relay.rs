//! Wiring: bind every listener, run until shut down, drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_transport::ControlListener;
use warren_transport::listen::{ListenError, tcp_listener};

use crate::auth::{AdminToken, Auth, Tokens};
use crate::certs::{self, CertError};
use crate::certstore::{CertStore, CertStoreError};
use crate::config::RelayConfig;
use crate::edge::Edge;
use crate::ingress::{self, HttpIngress};
use crate::pool::{PoolSocket, PortPool};
use crate::router::Router;
use crate::session::{self, Admission, Handshakes, Shared};
use crate::store::{Store, StoreError};
use crate::util;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The development CA or certificate.
    #[error("certificates in the data directory: {0}")]
    Cert(#[from] CertError),
    /// The control port.
    #[error(transparent)]
    Control(#[from] ListenError),
    /// The HTTP listener.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The system error.
        source: std::io::Error,
    },
    /// The HTTPS listener.
    #[error("cannot listen for HTTPS on {addr}: {source}")]
    Https {
        /// The address.
        addr: SocketAddr,
        /// The system error.
        source: std::io::Error,
    },
    /// The certificate directory.
    #[error(transparent)]
    CertDir(#[from] CertStoreError),
    /// The API listener.
    #[error("cannot listen for the API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// The system error.
        source: std::io::Error,
    },
    /// The state database.
    // The store's error follows through the source chain, which `main` prints.
    #[error("the relay's database {path}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: StoreError,
    },
    /// The data directory or one of its secrets cannot be made private.
    #[error("the data directory: {0}")]
    DataDir(std::io::Error),
    /// Nothing to check tokens against.
    #[error("no agent token configured")]
    NoTokens,
}

/// The relay, as a library: see [`Relay::bind`].
#[derive(Debug)]
pub struct Relay;

/// A relay whose listeners are bound; [`BoundRelay::run`] serves them.
#[derive(Debug)]
pub struct BoundRelay {
    /// The control port (TCP and UDP).
    pub control_addr: SocketAddr,
    /// The public HTTP listener.
    pub http_addr: SocketAddr,
    /// The public HTTPS listener, if any.
    pub https_addr: Option<SocketAddr>,
    /// The REST API and metrics listener, if any.
    pub api_addr: Option<SocketAddr>,
    /// Where the development CA certificate is.
    pub ca_path: PathBuf,
    /// The CA certificate, for in-process agents (the demo, tests).
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    /// SHA-256 of the CA certificate, hex.
    pub ca_fingerprint: String,
    /// True when the CA was created at this start.
    pub ca_created: bool,
    control: ControlListener,
    http: TcpListener,
    https: Option<(TcpListener, Arc<CertStore>)>,
    edge: Arc<Edge>,
    challenges: crate::acme::Challenges,
    api: Option<(TcpListener, crate::api::ApiState)>,
    handshakes: Handshakes,
    shared: Arc<Shared>,
}

/// Makes the data directory 0700 (see [`util::private_dir`]) and every secret kept in it 0600
/// ([`util::check_private_file`]): the CA's and the certificate's keys, the generated tokens, the
/// QUIC reset key, the ACME account and keys, the database with its journal files. Files made
/// by an older version or copied in with a wider mode are fixed, each with a WARN naming it.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<()> {
    util::private_dir(dir)?;
    let mut secrets: Vec<PathBuf> =
        ["ca-key.pem", "relay-key.pem", "admin-token", "agent-token", "quic-reset-key"]
            .iter()
            .map(|f| dir.join(f))
            .collect();
    secrets.push(dir.join("acme").join("account.json"));
    let is_db =
        |n: &str| [".db", ".db-wal", ".db-shm", ".db-journal"].iter().any(|s| n.ends_with(s));
    secrets.extend(files_named(dir, is_db)?);
    secrets.extend(files_named(&dir.join("acme").join("certs"), |n| n.ends_with("-key.pem"))?);
    secrets.iter().try_for_each(|p| util::check_private_file(p))
}

/// The entries of `dir` whose names pass `keep`; none when `dir` does not exist.
fn files_named(dir: &Path, keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(&keep) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// The addresses the relay's listeners are told to bind: control, HTTP, and HTTPS and API when
/// enabled.
fn listener_addrs(config: &RelayConfig) -> Vec<SocketAddr> {
    [Some(config.control), Some(config.http), config.https, config.api]
        .into_iter()
        .flatten()
        .collect()
}

impl Relay {
    /// Prepares certificates and binds the control port and the HTTP listener.
    pub async fn bind(config: RelayConfig) -> Result<BoundRelay, RelayError> {
        if config.tokens.is_empty() {
            return Err(RelayError::NoTokens);
        }
        secure_data_dir(&config.data_dir).map_err(RelayError::DataDir)?;
        let ca = certs::load_or_create(
            &config.data_dir,
            &certs::default_names(&config.domain, &config.tls_names, &listener_addrs(&config)),
        )?;
        let reset_key = certs::load_or_create_secret(&config.data_dir.join("quic-reset-key"))?;
        let control =
            ControlListener::bind(config.control, &ca.identity, config.quic, Some(&reset_key))
                .await?;
        let http = tcp_listener(config.http)
            .map_err(|source| RelayError::Http { addr: config.http, source })?;
        let http_addr =
            http.local_addr().map_err(|source| RelayError::Http { addr: config.http, source })?;
        let https = match config.https {
            Some(addr) => {
                let listener =
                    tcp_listener(addr).map_err(|source| RelayError::Https { addr, source })?;
                let store = CertStore::new(
                    &config.domain,
                    ca.issuer.clone(),
                    ca.identity.clone(),
                    config.cert_dir.clone(),
                )?;
                Some((listener, store))
            }
            None => None,
        };
        let challenges = crate::acme::Challenges::default();
        let acme = match (&config.acme, &https) {
            (Some(settings), Some((_, store))) => Some(crate::acme::Acme::new(
                settings.clone(),
                &config.data_dir,
                store.clone(),
                challenges.clone(),
            )),
            _ => None,
        };
        let https_addr = match &https {
            Some((l, _)) => Some(l.local_addr().map_err(|source| RelayError::Https {
                addr: config.https.unwrap_or(http_addr),
                source,
            })?),
            None => None,
        };
        let db_path = config.data_dir.join("warren.db");
        let store = Arc::new(
            Store::open(&db_path)
                .map_err(|source| RelayError::Store { path: db_path.clone(), source })?,
        );
        let api_listener = match config.api {
            Some(addr) => {
                Some(tcp_listener(addr).map_err(|source| RelayError::Api { addr, source })?)
            }
            None => None,
        };
        let api_addr = match &api_listener {
            Some(l) => Some(l.local_addr().map_err(|source| RelayError::Api {
                addr: config.api.unwrap_or(http_addr),
                source,
            })?),
            None => None,
        };
        let edge = Edge::new(config.edge.clone());
        let spawn_edge = edge.clone();
        let mut router = Router::new(
            config.domain.clone(),
            http_addr.port(),
            PortPool::new(config.ports),
            config.lease_grace,
            Box::new(move |socket, live| match socket {
                PoolSocket::Tcp(l) => ingress::spawn_tcp_tunnel(l, live, spawn_edge.clone()),
                PoolSocket::Udp(u) => {
                    crate::udp::spawn_udp_tunnel(u, live, Arc::new(spawn_edge.config.clone()))
                }
            }),
        );
        if let Some(addr) = https_addr {
            router = router.with_https(addr.port(), config.prefer_https);
        }
        let router = router.with_caps(config.caps).with_lease_store(store.clone());
        let restored = router
            .restore()
            .map_err(|source| RelayError::Store { path: db_path.clone(), source })?;
        if restored > 0 {
            info!(
                leases = restored,
                grace_s = config.lease_grace.as_secs(),
                "leases restored, held for their owners"
            );
        }
        let reserved = crate::api::reserved_index(&store)
            .map_err(|source| RelayError::Store { path: db_path.clone(), source })?;
        router.set_reserved(reserved);
        let overlays =
            crate::overlay::Overlays::load(store.clone(), config.overlay_pool, config.lease_grace)
                .map_err(|source| RelayError::Store { path: db_path.clone(), source })?;
        let shared = Arc::new(Shared {
            auth: Auth::new(Tokens::new(&config.tokens), Some(store.clone())),
            registry: Default::default(),
            router: Arc::new(router),
            domain: config.domain.clone(),
            lease_grace: config.lease_grace,
            shutdown: CancellationToken::new(),
            edge: Arc::new(config.edge.clone()),
            acme,
            store: Some(store.clone()),
            overlays: Arc::new(overlays),
            auth_throttle: Arc::new(warren_web::throttle::AuthThrottle::with_free_failures(
                config.auth_failures_per_minute,
            )),
        });
        Ok(BoundRelay {
            control_addr: control.local_addr(),
            http_addr,
            https_addr,
            ca_path: ca.ca_path,
            ca_der: ca.ca_der,
            ca_fingerprint: ca.fingerprint,
            ca_created: ca.created,
            control,
            http,
            https,
            edge,
            challenges,
            api: api_listener.map(|l| {
                let state = crate::api::ApiState {
                    shared: shared.clone(),
                    store,
                    admin: AdminToken::new(config.admin_token.expose()),
                    metrics: config.metrics_token.as_ref().map(|t| AdminToken::new(t.expose())),
                    stats_interval: config.stats_interval,
                    guard: warren_web::guard::ApiGuard::new(
                        api_addr.unwrap_or(http_addr),
                        config.api_hosts.clone(),
                        // One table for the API and the control port: a guesser gains nothing
                        // by switching between them.
                        shared.auth_throttle.clone(),
                    ),
                };
                (l, state)
            }),
            api_addr,
            handshakes: Handshakes::new(config.handshakes),
            shared,
        })
    }
}

impl BoundRelay {
    /// Serves until `shutdown` is cancelled, then tells every agent it is going away and waits
    /// (a few seconds at most) for sessions and visitor connections to end.
    pub async fn run(self, shutdown: CancellationToken) {
        let transports: Vec<String> =
            self.control.transports().iter().map(ToString::to_string).collect();
        info!(name = %"control", addr = %self.control_addr, transports = %transports.join(","), "listening");
        ingress::log_listening("http", self.http_addr);
        if let Some(addr) = self.https_addr {
            ingress::log_listening("https", addr);
        }

        let tasks = TaskTracker::new();
        let ingress = HttpIngress::new(
            self.shared.router.clone(),
            &self.shared.domain,
            self.edge.clone(),
            self.challenges.clone(),
        );
        if let Some((listener, state)) = self.api {
            crate::api::log_listening(self.api_addr.unwrap_or(self.http_addr));
            tasks.spawn(crate::api::sample_traffic(state.clone(), self.shared.shutdown.clone()));
            tasks.spawn(crate::api::serve(listener, state, self.shared.shutdown.clone()));
        }
        if let Some(acme) = &self.shared.acme {
            acme.watch_renewals(Duration::from_secs(3600), self.shared.shutdown.clone());
        }
        tasks.spawn(ingress.clone().serve(self.http, self.shared.shutdown.clone()));
        if let Some((listener, store)) = self.https {
            store.watch(Duration::from_secs(2), self.shared.shutdown.clone());
            let tls = store.server_config(&[b"h2", b"http/1.1"]);
            tasks.spawn(ingress.serve_tls(listener, tls, self.shared.shutdown.clone()));
        }

        let router = self.shared.router.clone();
        let changes = self.shared.clone();
        let stop = self.shared.shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if router.expire(Instant::now()) > 0 {
                            changes.registry.changed("tunnels");
                        }
                        if changes.overlays.expire(Instant::now()) > 0 {
                            changes.registry.changed("networks");
                        }
                    }
                    () = stop.cancelled() => break,
                }
            }
        });

        loop {
            tokio::select! {
                accepted = self.control.accept() => match accepted {
                    Ok(a) => match self.handshakes.admit(a.remote_addr().ip(), a.address_validated()) {
                        Admission::Serve(guard) => {
                            tasks.spawn(session::serve(a, self.shared.clone(), guard));
                        }
                        Admission::Validate => a.validate(),
                        Admission::Refuse(why) => {
                            // A flood would flood the log too: counted, logged at debug.
                            crate::metrics::global().error("handshake_refused");
                            debug!(peer = %a.remote_addr(), reason = why, "control connection turned away");
                            a.refuse();
                        }
                    },
                    Err(e) => {
                        warn!(error = %e, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = shutdown.cancelled() => break,
            }
        }
        info!("shutting down: telling agents, draining connections");
        self.shared.shutdown.cancel();
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.is_err() {
            warn!("some connections did not end within 5 s; closing them");
        }
        self.control.close();
        info!("relay stopped");
    }
}

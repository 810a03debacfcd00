//! The session loop: connect, say hello, bind every tunnel, serve data streams, heartbeat, and
//! reconnect with backoff when the session is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_proto::message::Token;
use warren_proto::overlay::NetMessage;
use warren_proto::{
    AgentId, Bind, Bound, ErrorCode, Hello, Message, Preface, Subdomain, TunnelName,
};
use warren_transport::{
    ControlError, ControlReader, ControlWriter, Mode, RelayAddr, Session, Stream, Trust,
};

use crate::forward::{self, Tunnels};
use crate::tunnel::TunnelSpec;

/// Interval between the agent's pings.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A session from which nothing arrived for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(20);
/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's control address.
    pub relay: RelayAddr,
    /// The token the relay expects.
    pub token: Token,
    /// How to trust the relay's certificate.
    pub trust: Trust,
    /// Transport choice.
    pub mode: Mode,
    /// This agent's identity.
    pub agent_id: AgentId,
    /// The tunnels to serve, in order.
    pub tunnels: Vec<TunnelSpec>,
    /// Targets the relay's API may open forwards to (`--allow-forward`); empty refuses all.
    pub allow_forward: Vec<crate::tunnel::ForwardRule>,
}

/// Things the agent reports as they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A tunnel is bound (again). `changed` is false when the URL is the one it had before.
    Bound {
        /// The tunnel.
        name: TunnelName,
        /// Its public URL.
        url: String,
        /// Whether the URL differs from the previous bind's.
        changed: bool,
    },
    /// A tunnel was removed through the relay's API.
    Removed {
        /// The tunnel.
        name: TunnelName,
    },
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A refusal that retrying cannot fix (token, version, names, trust).
    #[error("{0}")]
    Fatal(String),
}

enum End {
    Shutdown,
    Lost(String),
}

enum Failure {
    Fatal(String),
    Retry(String),
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        Failure::Retry(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Retry(e.to_string())
    }
}

/// What the local API asks of a running agent.
#[derive(Debug)]
pub enum Control {
    /// Open a tunnel; answered with its URL (or `None` while the relay is unreachable) or why
    /// the relay refused it.
    Add(Box<TunnelSpec>, AddReply),
    /// Close a tunnel (its own, or a forward); answered with whether it existed.
    Remove(TunnelName, oneshot::Sender<bool>),
    /// An overlay request to the relay, answered with the relay's answer.
    Net(NetCall),
    /// An overlay message the relay does not answer (path reports); dropped while
    /// disconnected.
    NetSend(NetMessage),
}

/// An overlay request: the message (given the request number the session loop picks) and
/// where its answer goes.
pub struct NetCall {
    /// Builds the request with its number.
    pub make: Box<dyn FnOnce(u32) -> NetMessage + Send>,
    /// The relay's answer, or why there is none.
    pub reply: oneshot::Sender<Result<NetMessage, NetCallError>>,
}

impl std::fmt::Debug for NetCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetCall")
    }
}

/// Why an overlay request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetCallError {
    /// There is no session to the relay now.
    #[error("this agent has no session to the relay now")]
    Disconnected,
    /// The relay refused it.
    #[error("{message}")]
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

/// What the agent's overlay networks need from its relay sessions; the session loop calls it.
pub trait OverlayHooks: Send + Sync + std::fmt::Debug {
    /// A session is up and its tunnels are bound.
    fn session_up(&self, session: &Session);
    /// The session ended.
    fn session_down(&self);
    /// An overlay push from the relay.
    fn push(&self, msg: NetMessage);
    /// An overlay datagram (QUIC).
    fn datagram(&self, d: bytes::Bytes);
    /// The relay opened the overlay stream (TLS + yamux); serves it until it ends.
    fn stream(&self, s: Stream) -> futures::future::BoxFuture<'static, ()>;
}

/// The answer to [`Control::Add`]: the URL (`None` while disconnected) or the refusal.
pub type AddReply = oneshot::Sender<Result<Option<String>, String>>;

/// One tunnel as the local API shows it.
#[derive(Debug, Clone)]
pub struct TunnelStatus {
    /// What it is.
    pub spec: Arc<TunnelSpec>,
    /// Its public URL, once bound.
    pub url: Option<String>,
    /// Opened by the relay (a forward) rather than by this agent.
    pub forwarded: bool,
}

/// The agent's state, shared with its local API.
#[derive(Debug, Default)]
pub struct AgentState {
    /// The tunnels to bind on every session, in order.
    desired: std::sync::Mutex<Vec<TunnelSpec>>,
    /// Every tunnel served or to be served, by name.
    status: std::sync::Mutex<std::collections::BTreeMap<TunnelName, TunnelStatus>>,
    /// Whether a session to the relay is up.
    connected: std::sync::atomic::AtomicBool,
    /// This agent has no relay (networks and the local API only).
    no_relay: std::sync::atomic::AtomicBool,
    /// Keeps HTTP exchanges of inspected tunnels, when the local API runs.
    inspector: std::sync::OnceLock<Arc<crate::inspect::Inspector>>,
    /// Traffic per tunnel name, kept across reconnects.
    traffic: std::sync::Mutex<HashMap<TunnelName, Arc<Traffic>>>,
    /// The overlay networks, when this agent manages networks.
    overlay: std::sync::OnceLock<Arc<dyn OverlayHooks>>,
    /// Where the local API listens: no tunnel may point at it.
    api: std::sync::OnceLock<std::net::SocketAddr>,
}

/// Bytes and streams through one tunnel since the agent started.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Visitor to target.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Target to visitor.
    pub bytes_out: std::sync::atomic::AtomicU64,
    /// Streams (connections, upstream HTTP connections, UDP flows over TCP) open now.
    pub open: std::sync::atomic::AtomicU64,
    /// Streams in all.
    pub total: std::sync::atomic::AtomicU64,
}

impl AgentState {
    /// Every tunnel, by name.
    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The traffic counters of tunnel `name`.
    pub fn traffic(&self, name: &TunnelName) -> Arc<Traffic> {
        self.traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Turns the inspector on for tunnels that ask for it.
    pub fn set_inspector(&self, inspector: Arc<crate::inspect::Inspector>) {
        let _ = self.inspector.set(inspector);
    }

    /// The inspector, if on.
    pub fn inspector(&self) -> Option<Arc<crate::inspect::Inspector>> {
        self.inspector.get().cloned()
    }

    /// Lets the overlay networks use the relay sessions.
    pub fn set_overlay(&self, hooks: Arc<dyn OverlayHooks>) {
        let _ = self.overlay.set(hooks);
    }

    /// The overlay networks' hooks, if any.
    pub fn overlay(&self) -> Option<Arc<dyn OverlayHooks>> {
        self.overlay.get().cloned()
    }

    /// Records where the local API listens.
    pub fn set_api_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.api.set(addr);
    }

    /// Whether `target` is this agent's own local API, which no tunnel may publish.
    pub fn is_own_api(&self, target: &crate::tunnel::Target) -> bool {
        let Some(api) = self.api.get() else { return false };
        if target.port != api.port() {
            return false;
        }
        let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
        match target.host.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) => ip == api.ip() || (local(ip) && local(api.ip())),
            Err(_) => target.host.eq_ignore_ascii_case("localhost") && local(api.ip()),
        }
    }

    /// Marks this agent as one without a relay.
    pub fn set_no_relay(&self) {
        self.no_relay.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this agent runs without a relay.
    pub fn no_relay(&self) -> bool {
        self.no_relay.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the agent has a session to the relay now.
    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, spec: &TunnelSpec, url: Option<String>, forwarded: bool) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).insert(
            spec.name.clone(),
            TunnelStatus { spec: Arc::new(spec.clone()), url, forwarded },
        );
    }

    fn forget(&self, name: &TunnelName) -> bool {
        let gone = self.status.lock().unwrap_or_else(|p| p.into_inner()).remove(name).is_some();
        let mut desired = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        let before = desired.len();
        desired.retain(|s| s.name != *name);
        gone || desired.len() != before
    }

    fn desired(&self) -> Vec<TunnelSpec> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The local API's side of a running agent.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    /// The agent's state.
    pub state: Arc<AgentState>,
    /// Requests to the session loop.
    pub control: mpsc::Sender<Control>,
}

/// The agent loop's side of [`AgentHandle`].
#[derive(Debug)]
pub struct AgentInbox {
    state: Arc<AgentState>,
    control: mpsc::Receiver<Control>,
}

impl AgentInbox {
    /// The next request from the local API (for an agent that serves them without a relay).
    pub async fn next_control(&mut self) -> Option<Control> {
        self.control.recv().await
    }
}

/// A handle for the local API and the inbox [`run_with`] serves it from, with `tunnels` to
/// start with.
pub fn channel(tunnels: Vec<TunnelSpec>) -> (AgentHandle, AgentInbox) {
    let state = Arc::new(AgentState::default());
    for t in &tunnels {
        state.set(t, None, false);
    }
    *state.desired.lock().unwrap_or_else(|p| p.into_inner()) = tunnels;
    let (tx, rx) = mpsc::channel(16);
    (AgentHandle { state: state.clone(), control: tx }, AgentInbox { state, control: rx })
}

/// What an earlier bind was granted, asked for again on reconnect.
#[derive(Debug, Clone, Default)]
struct Granted {
    subdomain: Option<Subdomain>,
    port: Option<u16>,
    url: String,
}

/// Runs the agent until `shutdown` or a fatal error.
pub async fn run(
    cfg: AgentConfig,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let (_handle, mut inbox) = channel(cfg.tunnels.clone());
    run_with(cfg, &mut inbox, events, shutdown).await
}

/// Runs the agent, taking requests from a local API through `inbox`, until `shutdown` or a
/// fatal error. The tunnels come from the inbox's state, not from `cfg.tunnels`.
pub async fn run_with(
    cfg: AgentConfig,
    inbox: &mut AgentInbox,
    events: mpsc::UnboundedSender<AgentEvent>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let tls =
        cfg.trust.client_config().map_err(|e| AgentError::Fatal(format!("TLS settings: {e}")))?;
    let mut granted: HashMap<TunnelName, Granted> = HashMap::new();
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    loop {
        let outcome = session_once(
            &cfg,
            tls.clone(),
            &mut granted,
            &events,
            &shutdown,
            &mut ever_connected,
            inbox,
        )
        .await;
        inbox.state.connected.store(false, std::sync::atomic::Ordering::Relaxed);
        // Forwards belong to a session; the relay opens them again on the next one.
        inbox.state.status.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, t| !t.forwarded);
        // Requests made while disconnected are taken into the desired list at once.
        while let Ok(cmd) = inbox.control.try_recv() {
            match cmd {
                Control::Add(spec, reply) => {
                    let spec = *spec;
                    let known = inbox.state.tunnels().iter().any(|t| t.spec.name == spec.name);
                    if known {
                        let _ = reply.send(Err(format!("a tunnel named {} exists", spec.name)));
                    } else {
                        inbox.state.set(&spec, None, false);
                        inbox.state.desired.lock().unwrap_or_else(|p| p.into_inner()).push(spec);
                        let _ = reply.send(Ok(None));
                    }
                }
                Control::Remove(name, reply) => {
                    let _ = reply.send(inbox.state.forget(&name));
                }
                Control::Net(call) => {
                    let _ = call.reply.send(Err(NetCallError::Disconnected));
                }
                Control::NetSend(_) => {}
            }
        }
        match outcome {
            Ok(End::Shutdown) => return Ok(()),
            Ok(End::Lost(why)) => {
                attempt = 0;
                warn!(relay = %cfg.relay, reason = %why, "session lost; reconnecting");
            }
            Err(Failure::Fatal(why)) => return Err(AgentError::Fatal(why)),
            Err(Failure::Retry(why)) => {
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                warn!(
                    relay = %cfg.relay,
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    reason = %why,
                    "cannot reach the relay; retrying (is warren-server running there?)"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
        }
        // A lost session is retried after a short, jittered pause.
        let delay = backoff(0);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, … capped at [`MAX_BACKOFF`], each
/// scaled by a random factor in [0.5, 1].
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << attempt.min(16)).min(MAX_BACKOFF);
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

async fn session_once(
    cfg: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    granted: &mut HashMap<TunnelName, Granted>,
    events: &mpsc::UnboundedSender<AgentEvent>,
    shutdown: &CancellationToken,
    ever_connected: &mut bool,
    inbox: &mut AgentInbox,
) -> Result<End, Failure> {
    let connected = tokio::select! {
        r = warren_transport::connect(&cfg.relay, cfg.mode, tls) => r,
        () = shutdown.cancelled() => return Ok(End::Shutdown),
    };
    let session = connected.map_err(|e| {
        if e.untrusted && !*ever_connected {
            Failure::Fatal(e.to_string())
        } else {
            Failure::Retry(e.to_string())
        }
    })?;
    let result =
        serve_session(cfg, &session, granted, events, shutdown, ever_connected, inbox).await;
    session.close("agent closing session");
    result
}

async fn serve_session(
    cfg: &AgentConfig,
    session: &Session,
    granted: &mut HashMap<TunnelName, Granted>,
    events: &mpsc::UnboundedSender<AgentEvent>,
    shutdown: &CancellationToken,
    ever_connected: &mut bool,
    inbox: &mut AgentInbox,
) -> Result<End, Failure> {
    let relay = &cfg.relay;
    let allow_forward = &cfg.allow_forward;
    let state = inbox.state.clone();
    let control = session.open().await?;
    let (rd, wr) = tokio::io::split(control);
    let mut reader = ControlReader::new(rd);
    let mut writer = ControlWriter::new(wr);
    let hello = Message::Hello(Hello {
        token: cfg.token.clone(),
        agent_id: cfg.agent_id.clone(),
        agent_version: crate::VERSION.into(),
    });
    writer.send_with_preface(Preface::ours(), &hello).await?;
    let welcome = match tokio::time::timeout(
        warren_transport::tuning::HANDSHAKE_TIMEOUT,
        reader.recv(),
    )
    .await
    {
        Err(_) => {
            return Err(Failure::Retry("the relay did not answer the handshake in time".into()));
        }
        Ok(r) => r?,
    };
    let welcome = match welcome {
        Message::Welcome(w) => w,
        Message::Error {
            code: code @ (ErrorCode::Unauthorized | ErrorCode::VersionMismatch),
            message,
            ..
        } => {
            return Err(Failure::Fatal(format!(
                "relay {relay} refused the session: {code}: {message}"
            )));
        }
        // Not a wrong token (it was not even checked): try again later.
        Message::Error { code: ErrorCode::Throttled, message, .. } => {
            return Err(Failure::Retry(format!(
                "relay {relay} refuses this address for now: {message} (an agent or script on \
                 this host keeps using a wrong token; fix its --token or stop it)"
            )));
        }
        Message::Error { code, message, .. } => {
            return Err(Failure::Retry(format!(
                "relay {relay} refused the session: {code}: {message}"
            )));
        }
        other => {
            return Err(Failure::Retry(format!(
                "unexpected first message from the relay: {other:?}"
            )));
        }
    };
    if !warren_proto::SUPPORTED_VERSIONS.contains(&welcome.version) {
        return Err(Failure::Fatal(format!(
            "relay {relay} chose protocol version {}, which this agent does not speak; upgrade the agent",
            welcome.version
        )));
    }
    *ever_connected = true;
    info!(
        relay = %relay,
        transport = %session.kind(),
        session = welcome.session_id,
        relay_version = %welcome.relay_version,
        "connected to relay"
    );

    // The messages the relay may send at any time (forwards it reopens, pings, overlay pushes,
    // answers to other requests) are handled the same way while the tunnels are being bound
    // as afterwards: each answer is matched to its request by id.
    let overlay = state.overlay();
    let mut h = Handler {
        relay,
        allow_forward,
        state: &state,
        events,
        overlay: overlay.clone(),
        tunnels: Tunnels::default(),
        granted,
        adding: HashMap::new(),
        net_calls: HashMap::new(),
    };
    // Bind every tunnel, in order, asking again for what earlier binds were granted.
    let desired = state.desired();
    // A refusal of a tunnel the agent was started with ends the agent; one added while it ran
    // (local API, Docker labels) while the relay was away is dropped alone, with a warning.
    let added_later = |spec: &TunnelSpec| !cfg.tunnels.iter().any(|t| t.name == spec.name);
    for (i, spec) in desired.iter().enumerate() {
        let before = h.granted.get(&spec.name).cloned();
        let req = (i + 1) as u32;
        let wanted = match spec.wanted_subdomain(&welcome.domain) {
            Ok(w) => w,
            Err(e) if added_later(spec) => {
                warn!(tunnel = %spec.name, "tunnel dropped: {e}");
                state.forget(&spec.name);
                continue;
            }
            Err(e) => return Err(Failure::Fatal(format!("tunnel {}: {e}", spec.name))),
        };
        let bind = Bind {
            req,
            name: spec.name.clone(),
            protocol: spec.protocol,
            subdomain: before.as_ref().and_then(|g| g.subdomain.clone()).or(wanted),
            remote_port: before.as_ref().and_then(|g| g.port).or(spec.remote_port),
            sticky: before.is_some(),
            options: spec.options.clone(),
        };
        writer.send(&Message::Bind(bind)).await?;
        let deadline = Instant::now() + warren_transport::tuning::HANDSHAKE_TIMEOUT;
        let reply: Result<Bound, (ErrorCode, String)> = loop {
            let msg = match tokio::time::timeout_at(deadline, reader.recv()).await {
                Err(_) => {
                    return Err(Failure::Retry(format!(
                        "relay {relay} did not answer the bind of tunnel {} within {} s",
                        spec.name,
                        warren_transport::tuning::HANDSHAKE_TIMEOUT.as_secs()
                    )));
                }
                Ok(m) => m?,
            };
            match msg {
                Message::Bound(b) if b.req == req => break Ok(b),
                Message::Error { req: r, code, message } if r == req => break Err((code, message)),
                other => {
                    if let Some(end) = h.handle(other, &mut writer).await? {
                        return Ok(end);
                    }
                }
            }
        };
        match reply {
            Ok(b) => {
                if !b.notice.is_empty() {
                    warn!(tunnel = %spec.name, notice = %b.notice, "the relay adjusted the tunnel");
                }
                let changed = before.as_ref().is_none_or(|g| g.url != b.url);
                info!(tunnel = %spec.name, url = %b.url, target = %spec.target, "tunnel bound");
                h.granted.insert(
                    spec.name.clone(),
                    Granted { subdomain: b.subdomain, port: b.remote_port, url: b.url.clone() },
                );
                state.set(spec, Some(b.url.clone()), false);
                let _ =
                    events.send(AgentEvent::Bound { name: spec.name.clone(), url: b.url, changed });
                h.tunnels
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(b.tunnel, Arc::new(spec.clone()));
            }
            Err((code, message)) if code.is_fatal() && added_later(spec) => {
                warn!(tunnel = %spec.name, %code, %message, "the relay refused the tunnel; dropped");
                state.forget(&spec.name);
            }
            Err((code, message)) if code.is_fatal() => {
                return Err(Failure::Fatal(format!(
                    "relay {relay} refused tunnel {}: {code}: {message}",
                    spec.name
                )));
            }
            Err((code, message)) => {
                return Err(Failure::Retry(format!(
                    "relay {relay} could not bind tunnel {}: {code}: {message}",
                    spec.name
                )));
            }
        }
    }
    let tunnels = h.tunnels.clone();
    state.connected.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut next_req = desired.len() as u32 + 1;
    let domain = welcome.domain.clone();
    // UDP tunnels may also arrive later as forwards: datagrams are always served over QUIC.
    let _datagrams = (session.kind() == warren_transport::TransportKind::Quic).then(|| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::udp::serve_datagrams(
            session.clone(),
            tunnels.clone(),
            crate::udp::FLOW_IDLE,
            overlay.clone(),
        )))
    });
    // The overlay networks use this session until it ends.
    struct Down(Option<Arc<dyn OverlayHooks>>);
    impl Drop for Down {
        fn drop(&mut self) {
            if let Some(h) = &self.0 {
                h.session_down();
            }
        }
    }
    if let Some(h) = &overlay {
        h.session_up(session);
    }
    let _down = Down(overlay.clone());

    let mut streams = JoinSet::new();
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Ok(stream) => {
                    while streams.try_join_next().is_some() {}
                    streams.spawn(forward::handle(stream, tunnels.clone(), state.clone()));
                }
                Err(e) => return Ok(End::Lost(format!("session closed: {e}"))),
            },
            m = reader.recv() => {
                let msg = match m {
                    Ok(m) => m,
                    Err(ControlError::Closed) => return Ok(End::Lost("the relay closed the session".into())),
                    Err(e) => return Ok(End::Lost(e.to_string())),
                };
                last_seen = Instant::now();
                if let Some(end) = h.handle(msg, &mut writer).await? {
                    return Ok(end);
                }
            }
            Some(cmd) = inbox.control.recv() => match cmd {
                Control::Add(spec, reply) => {
                    let spec = *spec;
                    if state.tunnels().iter().any(|t| t.spec.name == spec.name) {
                        let _ = reply.send(Err(format!("a tunnel named {} exists", spec.name)));
                        continue;
                    }
                    let subdomain = match spec.wanted_subdomain(&domain) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    let req = next_req;
                    next_req = next_req.wrapping_add(1).max(1);
                    writer.send(&Message::Bind(Bind {
                        req,
                        name: spec.name.clone(),
                        protocol: spec.protocol,
                        subdomain,
                        remote_port: spec.remote_port,
                        sticky: false,
                        options: spec.options.clone(),
                    })).await?;
                    state.set(&spec, None, false);
                    state.desired.lock().unwrap_or_else(|p| p.into_inner()).push(spec.clone());
                    h.adding.insert(req, (spec, reply));
                }
                Control::Remove(name, reply) => {
                    if state.tunnels().iter().any(|t| t.spec.name == name && t.forwarded) {
                        // The relay would open it again at the next connection.
                        let _ = reply.send(false);
                        continue;
                    }
                    let id = tunnels
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .find(|(_, s)| s.name == name)
                        .map(|(id, _)| *id);
                    if let Some(id) = id {
                        tunnels.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        let req = next_req;
                        next_req = next_req.wrapping_add(1).max(1);
                        writer.send(&Message::Unbind { req, tunnel: id }).await?;
                        h.granted.remove(&name);
                        info!(tunnel = %name, "tunnel closed through the local API");
                    }
                    let _ = reply.send(state.forget(&name) || id.is_some());
                }
                Control::Net(call) => {
                    let req = next_req;
                    next_req = next_req.wrapping_add(1).max(1);
                    writer.send(&Message::Net((call.make)(req))).await?;
                    h.net_calls.insert(req, call.reply);
                }
                Control::NetSend(m) => writer.send(&Message::Net(m)).await?,
            },
            _ = tick.tick() => {
                if last_seen.elapsed() > DEAD_AFTER {
                    return Ok(End::Lost(format!("no heartbeat from the relay for {} s", DEAD_AFTER.as_secs())));
                }
                nonce += 1;
                writer.send(&Message::Ping { nonce }).await?;
            }
            () = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), writer.send(&Message::GoAway { code: ErrorCode::ShuttingDown, message: "agent stopping".into() })).await;
                return Ok(End::Shutdown);
            }
        }
    }
}

/// What the handling of the relay's messages works on. One handler serves a session from the
/// first bind on, so a message that does not answer the request awaited (a forward the relay
/// reopens, a ping, an overlay push) is handled the same way in the bind phase as afterwards.
struct Handler<'a> {
    relay: &'a RelayAddr,
    allow_forward: &'a [crate::tunnel::ForwardRule],
    state: &'a Arc<AgentState>,
    events: &'a mpsc::UnboundedSender<AgentEvent>,
    overlay: Option<Arc<dyn OverlayHooks>>,
    /// The tunnels this session serves: its binds and the relay's forwards.
    tunnels: Tunnels,
    granted: &'a mut HashMap<TunnelName, Granted>,
    /// Binds asked for through the local API, by request id.
    adding: HashMap<u32, (TunnelSpec, AddReply)>,
    /// Overlay requests, by request id.
    net_calls: HashMap<u32, oneshot::Sender<Result<NetMessage, NetCallError>>>,
}

impl Handler<'_> {
    /// Handles one message from the relay; `Some` when it ends the session.
    async fn handle<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        msg: Message,
        writer: &mut ControlWriter<W>,
    ) -> Result<Option<End>, Failure> {
        let (state, events, relay) = (self.state, self.events, self.relay);
        match msg {
            Message::Ping { nonce } => writer.send(&Message::Pong { nonce }).await?,
            Message::Pong { .. } => {}
            Message::GoAway { code, message } => {
                return Ok(Some(End::Lost(format!("the relay is going away ({code}: {message})"))));
            }
            Message::TunnelClosed { tunnel, code: ErrorCode::Removed, message } => {
                let gone = self.tunnels.write().unwrap_or_else(|p| p.into_inner()).remove(&tunnel);
                if let Some(spec) = gone {
                    state.forget(&spec.name);
                    info!(tunnel = %spec.name, reason = %message, "tunnel removed by the relay");
                    let _ = events.send(AgentEvent::Removed { name: spec.name.clone() });
                }
            }
            Message::TunnelClosed { tunnel, code: ErrorCode::Replaced, message } => {
                let gone = self
                    .tunnels
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&tunnel)
                    .map(|s| s.name.clone());
                let name = gone.map_or_else(|| "?".to_owned(), |n| n.to_string());
                warn!(tunnel = %name, reason = %message, "another session of this agent took the tunnel over; stopping (give each command its own --name, or stop the other one)");
                return Err(Failure::Fatal(format!(
                    "relay {relay}: tunnel {name} taken over: {message}"
                )));
            }
            Message::TunnelClosed { code, message, .. } => {
                return Err(Failure::Fatal(format!("relay {relay}: {code}: {message}")));
            }
            Message::Forward(f) => {
                let reply = match f.target.parse::<crate::tunnel::Target>() {
                    Ok(target) if state.is_own_api(&target) => {
                        warn!(tunnel = %f.name, target = %target, "forward refused: that is this agent's own local API");
                        Message::Error {
                            req: f.req,
                            code: ErrorCode::InvalidRequest,
                            message: format!(
                                "{target} is this agent's own local API; it is never published"
                            ),
                        }
                    }
                    Ok(target) if !self.allow_forward.iter().any(|r| r.covers(&target)) => {
                        warn!(tunnel = %f.name, target = %target, "forward refused: no --allow-forward covers its target");
                        Message::Error {
                            req: f.req,
                            code: ErrorCode::InvalidRequest,
                            message: format!(
                                "this agent accepts no forward to {target}: start it with --allow-forward {target} (or a PORT, CIDR or CIDR:LOW-HIGH that covers it)"
                            ),
                        }
                    }
                    Ok(target) => {
                        let spec = TunnelSpec::new(f.name.clone(), f.protocol, target);
                        info!(tunnel = %f.name, url = %f.url, target = %spec.target, "forward from the relay's API");
                        state.set(&spec, Some(f.url.clone()), true);
                        self.tunnels
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(f.tunnel, Arc::new(spec));
                        let _ = events.send(AgentEvent::Bound {
                            name: f.name.clone(),
                            url: f.url.clone(),
                            changed: true,
                        });
                        Message::ForwardOk { req: f.req }
                    }
                    Err(e) => {
                        Message::Error { req: f.req, code: ErrorCode::InvalidRequest, message: e }
                    }
                };
                writer.send(&reply).await?;
            }
            Message::Bound(b) if self.adding.contains_key(&b.req) => {
                if let Some((spec, reply)) = self.adding.remove(&b.req) {
                    info!(tunnel = %spec.name, url = %b.url, target = %spec.target, "tunnel bound");
                    self.granted.insert(
                        spec.name.clone(),
                        Granted { subdomain: b.subdomain, port: b.remote_port, url: b.url.clone() },
                    );
                    state.set(&spec, Some(b.url.clone()), false);
                    self.tunnels
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(b.tunnel, Arc::new(spec.clone()));
                    let _ = events.send(AgentEvent::Bound {
                        name: spec.name.clone(),
                        url: b.url.clone(),
                        changed: true,
                    });
                    let _ = reply.send(Ok(Some(b.url)));
                }
            }
            Message::Error { req, code, message } if self.adding.contains_key(&req) => {
                if let Some((spec, reply)) = self.adding.remove(&req) {
                    state.forget(&spec.name);
                    warn!(tunnel = %spec.name, %code, %message, "the relay refused a tunnel asked for through the local API");
                    let _ = reply.send(Err(format!("{code}: {message}")));
                }
            }
            Message::Unbound { .. } => {}
            Message::Net(m) => match m.answers().and_then(|req| self.net_calls.remove(&req)) {
                Some(reply) => {
                    let _ = reply.send(Ok(m));
                }
                None => match &self.overlay {
                    Some(h) => h.push(m),
                    None => {
                        warn!("overlay message from the relay, but this agent manages no networks")
                    }
                },
            },
            Message::Error { req, code, message } if self.net_calls.contains_key(&req) => {
                if let Some(reply) = self.net_calls.remove(&req) {
                    let _ = reply.send(Err(NetCallError::Refused { code, message }));
                }
            }
            Message::Error { req: 0, code: ErrorCode::Malformed, message } => {
                return Ok(Some(End::Lost(format!("the relay rejected our frames: {message}"))));
            }
            Message::Error { code, message, .. } => {
                warn!(%code, %message, "relay reported an error")
            }
            Message::Unknown { kind } => {
                writer
                    .send(&Message::Error {
                        req: 0,
                        code: ErrorCode::UnknownMessage,
                        message: format!("unknown message type {kind:#x}"),
                    })
                    .await?;
            }
            other => warn!(message = ?other, "unexpected message from the relay"),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..50 {
            let first = backoff(0);
            assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
            assert!(backoff(3) >= Duration::from_secs(2) && backoff(3) <= Duration::from_secs(4));
            assert!(backoff(40) <= MAX_BACKOFF && backoff(40) >= MAX_BACKOFF / 2);
        }
    }
}

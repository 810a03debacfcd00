//! The session loop: connect, say hello, bind every tunnel, serve data streams, heartbeat, and
//! reconnect with backoff when the session is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_proto::message::Token;
use warren_proto::overlay::NetMessage;
use warren_proto::session::{AgentEvent as Event, AgentSession as Machine, Timing};
use warren_proto::{AgentId, Bind, ErrorCode, Hello, Preface, Subdomain, TunnelName};
use warren_transport::{
    ControlError, ControlReader, ControlWriter, Mode, RelayAddr, Session, Stream, Trust,
};

use crate::forward::{self, Tunnels};
use crate::tunnel::TunnelSpec;

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

/// Where a bind came from, and so what its answer means.
enum BindOrigin {
    /// One of the tunnels the session binds when it starts; `before` is what the previous
    /// session was granted.
    Start { before: Option<Granted> },
    /// Asked for through the local API while the session ran.
    Added(AddReply),
}

/// A bind in flight.
struct PendingBind {
    spec: TunnelSpec,
    origin: BindOrigin,
}

/// Drives one session: the control stream's protocol is [`warren_proto::session::AgentSession`]'s;
/// this loop only reads and writes the stream, keeps the clock, and decides what the machine's
/// events mean for the agent (tunnels, forwards, the local API's requests, the overlay).
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
    let state = inbox.state.clone();
    let control = session.open().await?;
    let (rd, wr) = tokio::io::split(control);
    let mut reader = ControlReader::new(rd);
    let mut writer = ControlWriter::new(wr);
    // Pings every 5 s, dead after 20 s of silence, answers (Welcome, binds) within 10 s.
    let timing = Timing::default();
    let hello = Hello {
        token: cfg.token.clone(),
        agent_id: cfg.agent_id.clone(),
        agent_version: crate::VERSION.into(),
    };
    let mut m = Machine::new(hello, std::time::Instant::now(), timing);
    if let Some(first) = m.poll_transmit() {
        writer.send_with_preface(Preface::ours(), &first).await?;
    }

    // The greeting: nothing but the relay's Welcome (or refusal) matters until it ends.
    let welcome = loop {
        match m.poll_event() {
            Some(Event::Welcomed(w)) => break w,
            Some(Event::Refused { code, message }) => {
                return Err(match code {
                    ErrorCode::Unauthorized | ErrorCode::VersionMismatch => Failure::Fatal(
                        format!("relay {relay} refused the session: {code}: {message}"),
                    ),
                    // Not a wrong token (it was not even checked): try again later.
                    ErrorCode::Throttled => Failure::Retry(format!(
                        "relay {relay} refuses this address for now: {message} (an agent or \
                         script on this host keeps using a wrong token; fix its --token or stop \
                         it)"
                    )),
                    _ => Failure::Retry(format!(
                        "relay {relay} refused the session: {code}: {message}"
                    )),
                });
            }
            Some(Event::Lost(why)) => return Err(Failure::Retry(why)),
            Some(_) => continue,
            None => {}
        }
        tokio::select! {
            msg = reader.recv() => m.handle_message(msg?, std::time::Instant::now()),
            () = warren_transport::control::sleep_until(m.poll_timeout()) => m.handle_timeout(std::time::Instant::now()),
            () = shutdown.cancelled() => return Ok(End::Shutdown),
        }
    };
    *ever_connected = true;
    info!(
        relay = %relay,
        transport = %session.kind(),
        session = welcome.session_id,
        relay_version = %welcome.relay_version,
        "connected to relay"
    );

    let overlay = state.overlay();
    let mut h = Handler {
        cfg,
        state: &state,
        events,
        overlay: overlay.clone(),
        tunnels: Tunnels::default(),
        granted,
        binds: HashMap::new(),
        net_calls: HashMap::new(),
    };
    // Every tunnel is asked for at once, with what earlier binds were granted; the answers are
    // matched to the binds by request id, whatever else the relay sends in between.
    let now = std::time::Instant::now();
    for spec in state.desired() {
        let before = h.granted.get(&spec.name).cloned();
        let wanted = match spec.wanted_subdomain(&welcome.domain) {
            Ok(w) => w,
            Err(e) if h.added_later(&spec) => {
                warn!(tunnel = %spec.name, "tunnel dropped: {e}");
                state.forget(&spec.name);
                continue;
            }
            Err(e) => return Err(Failure::Fatal(format!("tunnel {}: {e}", spec.name))),
        };
        let req = m.bind(
            Bind {
                req: 0,
                name: spec.name.clone(),
                protocol: spec.protocol,
                subdomain: before.as_ref().and_then(|g| g.subdomain.clone()).or(wanted),
                remote_port: before.as_ref().and_then(|g| g.port).or(spec.remote_port),
                sticky: before.is_some(),
                options: spec.options.clone(),
            },
            now,
        );
        h.binds.insert(req, PendingBind { spec, origin: BindOrigin::Start { before } });
    }
    let tunnels = h.tunnels.clone();
    let domain = welcome.domain.clone();
    // Set up once every starting bind is answered.
    struct Down(Option<Arc<dyn OverlayHooks>>);
    impl Drop for Down {
        fn drop(&mut self) {
            if let Some(h) = &self.0 {
                h.session_down();
            }
        }
    }
    let mut serving: Option<(Option<tokio_util::task::AbortOnDropHandle<()>>, Down)> = None;
    let mut streams = JoinSet::new();
    loop {
        while let Some(msg) = m.poll_transmit() {
            writer.send(&msg).await?;
        }
        if let Some(event) = m.poll_event() {
            if let Some(end) = h.on_event(event, &mut m)? {
                return Ok(end);
            }
            continue;
        }
        if serving.is_none()
            && !h.binds.values().any(|b| matches!(b.origin, BindOrigin::Start { .. }))
        {
            state.connected.store(true, std::sync::atomic::Ordering::Relaxed);
            // UDP tunnels may also arrive later as forwards: datagrams are always served over
            // QUIC.
            let datagrams = (session.kind() == warren_transport::TransportKind::Quic).then(|| {
                tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::udp::serve_datagrams(
                    session.clone(),
                    tunnels.clone(),
                    crate::udp::FLOW_IDLE,
                    overlay.clone(),
                )))
            });
            // The overlay networks use this session until it ends.
            if let Some(o) = &overlay {
                o.session_up(session);
            }
            serving = Some((datagrams, Down(overlay.clone())));
        }
        tokio::select! {
            // Data streams wait in the transport until the starting binds are answered, so none
            // arrives for a tunnel this loop does not know yet.
            s = session.accept(), if serving.is_some() => match s {
                Ok(stream) => {
                    while streams.try_join_next().is_some() {}
                    streams.spawn(forward::handle(stream, tunnels.clone(), state.clone()));
                }
                Err(e) => return Ok(End::Lost(format!("session closed: {e}"))),
            },
            msg = reader.recv() => match msg {
                Ok(msg) => m.handle_message(msg, std::time::Instant::now()),
                Err(ControlError::Closed) => {
                    return Ok(End::Lost("the relay closed the session".into()));
                }
                Err(e) => return Ok(End::Lost(e.to_string())),
            },
            () = warren_transport::control::sleep_until(m.poll_timeout()) => m.handle_timeout(std::time::Instant::now()),
            Some(cmd) = inbox.control.recv() => h.on_control(cmd, &mut m, &domain),
            () = shutdown.cancelled() => {
                m.go_away(ErrorCode::ShuttingDown, "agent stopping".into());
                let flush = async {
                    while let Some(msg) = m.poll_transmit() {
                        writer.send(&msg).await?;
                    }
                    Ok::<_, ControlError>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                return Ok(End::Shutdown);
            }
        }
    }
}

/// What the session's events mean for the agent. One handler serves a session from the first
/// bind on, so a message that does not answer a request (a forward the relay reopens, an
/// overlay push) is handled the same way while the tunnels are being bound as afterwards.
struct Handler<'a> {
    cfg: &'a AgentConfig,
    state: &'a Arc<AgentState>,
    events: &'a mpsc::UnboundedSender<AgentEvent>,
    overlay: Option<Arc<dyn OverlayHooks>>,
    /// The tunnels this session serves: its binds and the relay's forwards.
    tunnels: Tunnels,
    granted: &'a mut HashMap<TunnelName, Granted>,
    /// Binds in flight, by request id.
    binds: HashMap<u32, PendingBind>,
    /// Overlay requests in flight, by request id.
    net_calls: HashMap<u32, oneshot::Sender<Result<NetMessage, NetCallError>>>,
}

impl Handler<'_> {
    /// A tunnel the agent was not started with (local API, Docker labels): a refusal drops it
    /// alone rather than end the agent.
    fn added_later(&self, spec: &TunnelSpec) -> bool {
        !self.cfg.tunnels.iter().any(|t| t.name == spec.name)
    }

    fn serve(&mut self, id: warren_proto::TunnelId, spec: TunnelSpec) {
        self.tunnels.write().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(spec));
    }

    /// Handles one event of the session; `Some` when it ends the session.
    fn on_event(&mut self, event: Event, m: &mut Machine) -> Result<Option<End>, Failure> {
        let (state, events, relay) = (self.state, self.events, &self.cfg.relay);
        match event {
            Event::BindAnswered { req, result } => {
                let Some(PendingBind { spec, origin }) = self.binds.remove(&req) else {
                    return Ok(None);
                };
                match (result, origin) {
                    (Ok(b), origin) => {
                        if !b.notice.is_empty() {
                            warn!(tunnel = %spec.name, notice = %b.notice, "the relay adjusted the tunnel");
                        }
                        info!(tunnel = %spec.name, url = %b.url, target = %spec.target, "tunnel bound");
                        let changed = match &origin {
                            BindOrigin::Start { before } => {
                                before.as_ref().is_none_or(|g| g.url != b.url)
                            }
                            BindOrigin::Added(_) => true,
                        };
                        self.granted.insert(
                            spec.name.clone(),
                            Granted {
                                subdomain: b.subdomain.clone(),
                                port: b.remote_port,
                                url: b.url.clone(),
                            },
                        );
                        state.set(&spec, Some(b.url.clone()), false);
                        let _ = events.send(AgentEvent::Bound {
                            name: spec.name.clone(),
                            url: b.url.clone(),
                            changed,
                        });
                        self.serve(b.tunnel, spec);
                        if let BindOrigin::Added(reply) = origin {
                            let _ = reply.send(Ok(Some(b.url)));
                        }
                    }
                    (Err((code, message)), BindOrigin::Added(reply)) => {
                        state.forget(&spec.name);
                        warn!(tunnel = %spec.name, %code, %message, "the relay refused a tunnel asked for through the local API");
                        let _ = reply.send(Err(format!("{code}: {message}")));
                    }
                    (Err((code, message)), BindOrigin::Start { .. })
                        if code.is_fatal() && self.added_later(&spec) =>
                    {
                        warn!(tunnel = %spec.name, %code, %message, "the relay refused the tunnel; dropped");
                        state.forget(&spec.name);
                    }
                    (Err((code, message)), BindOrigin::Start { .. }) if code.is_fatal() => {
                        return Err(Failure::Fatal(format!(
                            "relay {relay} refused tunnel {}: {code}: {message}",
                            spec.name
                        )));
                    }
                    (Err((code, message)), BindOrigin::Start { .. }) => {
                        return Err(Failure::Retry(format!(
                            "relay {relay} could not bind tunnel {}: {code}: {message}",
                            spec.name
                        )));
                    }
                }
            }
            Event::UnbindAnswered { .. } | Event::Welcomed(_) | Event::Refused { .. } => {}
            Event::NetAnswered { req, result } => {
                if let Some(reply) = self.net_calls.remove(&req) {
                    let _ = reply.send(
                        result.map_err(|(code, message)| NetCallError::Refused { code, message }),
                    );
                }
            }
            Event::NetPush(msg) => match &self.overlay {
                Some(h) => h.push(msg),
                None => warn!("overlay message from the relay, but this agent manages no networks"),
            },
            Event::Forward(f) => {
                let answer = self.forward(&f);
                m.answer_forward(f.req, answer);
            }
            Event::TunnelClosed { tunnel, code: ErrorCode::Removed, message } => {
                let gone = self.tunnels.write().unwrap_or_else(|p| p.into_inner()).remove(&tunnel);
                if let Some(spec) = gone {
                    state.forget(&spec.name);
                    info!(tunnel = %spec.name, reason = %message, "tunnel removed by the relay");
                    let _ = events.send(AgentEvent::Removed { name: spec.name.clone() });
                }
            }
            Event::TunnelClosed { tunnel, code: ErrorCode::Replaced, message } => {
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
            Event::TunnelClosed { code, message, .. } => {
                return Err(Failure::Fatal(format!("relay {relay}: {code}: {message}")));
            }
            Event::RelayError { code, message } => {
                warn!(%code, %message, "relay reported an error")
            }
            Event::Unexpected(other) => {
                warn!(message = ?other, "unexpected message from the relay")
            }
            Event::Lost(why) => return Ok(Some(End::Lost(why))),
        }
        Ok(None)
    }

    /// Whether to serve a forward the relay asks for; if so it is served from now on.
    fn forward(&mut self, f: &warren_proto::Forward) -> Result<(), (ErrorCode, String)> {
        let target = f
            .target
            .parse::<crate::tunnel::Target>()
            .map_err(|e| (ErrorCode::InvalidRequest, e))?;
        if self.state.is_own_api(&target) {
            warn!(tunnel = %f.name, target = %target, "forward refused: that is this agent's own local API");
            return Err((
                ErrorCode::InvalidRequest,
                format!("{target} is this agent's own local API; it is never published"),
            ));
        }
        if !self.cfg.allow_forward.iter().any(|r| r.covers(&target)) {
            warn!(tunnel = %f.name, target = %target, "forward refused: no --allow-forward covers its target");
            return Err((
                ErrorCode::InvalidRequest,
                format!(
                    "this agent accepts no forward to {target}: start it with --allow-forward \
                     {target} (or a PORT, CIDR or CIDR:LOW-HIGH that covers it)"
                ),
            ));
        }
        let spec = TunnelSpec::new(f.name.clone(), f.protocol, target);
        info!(tunnel = %f.name, url = %f.url, target = %spec.target, "forward from the relay's API");
        self.state.set(&spec, Some(f.url.clone()), true);
        self.serve(f.tunnel, spec);
        let _ = self.events.send(AgentEvent::Bound {
            name: f.name.clone(),
            url: f.url.clone(),
            changed: true,
        });
        Ok(())
    }

    /// Takes one request of the local API.
    fn on_control(&mut self, cmd: Control, m: &mut Machine, domain: &str) {
        let state = self.state;
        match cmd {
            Control::Add(spec, reply) => {
                let spec = *spec;
                if state.tunnels().iter().any(|t| t.spec.name == spec.name) {
                    let _ = reply.send(Err(format!("a tunnel named {} exists", spec.name)));
                    return;
                }
                let subdomain = match spec.wanted_subdomain(domain) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let req = m.bind(
                    Bind {
                        req: 0,
                        name: spec.name.clone(),
                        protocol: spec.protocol,
                        subdomain,
                        remote_port: spec.remote_port,
                        sticky: false,
                        options: spec.options.clone(),
                    },
                    std::time::Instant::now(),
                );
                state.set(&spec, None, false);
                state.desired.lock().unwrap_or_else(|p| p.into_inner()).push(spec.clone());
                self.binds.insert(req, PendingBind { spec, origin: BindOrigin::Added(reply) });
            }
            Control::Remove(name, reply) => {
                if state.tunnels().iter().any(|t| t.spec.name == name && t.forwarded) {
                    // The relay would open it again at the next connection.
                    let _ = reply.send(false);
                    return;
                }
                let id = self
                    .tunnels
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|(_, s)| s.name == name)
                    .map(|(id, _)| *id);
                if let Some(id) = id {
                    self.tunnels.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    m.unbind(id, std::time::Instant::now());
                    self.granted.remove(&name);
                    info!(tunnel = %name, "tunnel closed through the local API");
                }
                let _ = reply.send(state.forget(&name) || id.is_some());
            }
            Control::Net(call) => {
                let req = m.net_call(call.make);
                self.net_calls.insert(req, call.reply);
            }
            Control::NetSend(msg) => m.net_send(msg),
        }
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

//! One agent session on the relay: handshake, control loop, heartbeats.
//!
//! Before `Welcome` a peer is a stranger, so what it can make the relay hold is bounded:
//! [`Handshakes`] caps handshakes in progress per address and in all, each has
//! [`HANDSHAKE_TIMEOUT`], the transports accept only the control stream with small windows
//! (see `warren_transport::mux` and [`Session::lift_pre_auth_limits`]), and addresses that
//! failed to authenticate too often are refused without their token being checked
//! ([`Shared::auth_throttle`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use warren_proto::preface::mismatch_message;
use warren_proto::session::{RelayEvent as Event, RelaySession as Machine, Timing};
use warren_proto::{ErrorCode, Message, Welcome};
use warren_transport::control::read_preface;
use warren_transport::{Accepted, ControlError, ControlReader, ControlWriter, Session};
use warren_web::throttle::AuthThrottle;

use crate::auth::Auth;
use crate::config::HandshakeLimits;
use crate::edge::{ConnGuard, ConnLimiter, EdgeConfig};
use crate::registry::{Registry, SessionInfo};
use crate::router::{Owner, Router, SessionCtx};

/// Deadline for everything before `Welcome`, counted from the connection's accept: transport
/// handshake, control stream, preface, hello. An agent on a slow link needs a few round trips;
/// a peer that needs longer holds a handshake slot of its address for nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every session needs from the relay.
#[derive(Debug)]
pub struct Shared {
    /// Accepted tokens.
    pub auth: Auth,
    /// Live sessions.
    pub registry: Registry,
    /// The registry of tunnels.
    pub router: Arc<Router>,
    /// The relay's domain.
    pub domain: String,
    /// Lease grace, told to agents.
    pub lease_grace: Duration,
    /// Cancelled when the relay shuts down.
    pub shutdown: CancellationToken,
    /// Limits of the public side (streams per agent).
    pub edge: Arc<EdgeConfig>,
    /// Obtains certificates for HTTP tunnels' names, when configured.
    pub acme: Option<Arc<crate::acme::Acme>>,
    /// The relay's database (forwards are reopened from it when their agent connects).
    pub store: Option<Arc<crate::store::Store>>,
    /// Overlay networks: their control plane and relay path.
    pub overlays: Arc<crate::overlay::Overlays>,
    /// Failed authentications per source address, shared by the control port and the API: a
    /// locked-out address is refused before its token is looked at.
    pub auth_throttle: Arc<AuthThrottle>,
}

/// Agent handshakes in progress on the control port, per source address and in all, each
/// counted from accept until `Welcome` or refusal.
#[derive(Debug)]
pub struct Handshakes {
    per_ip: Arc<ConnLimiter>,
    total: Option<Arc<Semaphore>>,
    total_max: usize,
}

/// One handshake in progress; it stops counting when dropped.
#[derive(Debug)]
pub struct HandshakeGuard {
    _ip: ConnGuard,
    _total: Option<OwnedSemaphorePermit>,
}

/// What to do with a connection just accepted on the control port.
#[derive(Debug)]
pub enum Admission {
    /// Serve it, counted until the guard is dropped.
    Serve(HandshakeGuard),
    /// Ask the (QUIC) peer to prove its address first.
    Validate,
    /// Turn it away, for this reason.
    Refuse(&'static str),
}

impl Handshakes {
    /// Counts within `limits`.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self {
            per_ip: ConnLimiter::new(limits.per_ip),
            total: (limits.total > 0).then(|| Arc::new(Semaphore::new(limits.total))),
            total_max: limits.total,
        }
    }

    /// Decides on a connection from `ip`; `validated` tells whether its address is proven (see
    /// [`Accepted::address_validated`]).
    ///
    /// A QUIC source address may be forged until validated, so one peer could use up another
    /// address's handshakes or the relay's: an unproven address is asked to prove itself (a
    /// stateless Retry, nothing kept) whenever it already has a handshake in progress or half of
    /// the relay's are taken. Proven addresses that are over a limit are refused.
    pub fn admit(&self, ip: IpAddr, validated: bool) -> Admission {
        let ip = ip.to_canonical();
        let crowded = self
            .total
            .as_ref()
            .is_some_and(|t| t.available_permits().saturating_mul(2) <= self.total_max);
        if !validated && (crowded || self.per_ip.count(ip) > 0) {
            return Admission::Validate;
        }
        let total = match &self.total {
            Some(t) => match t.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Admission::Refuse("too many agent handshakes in progress"),
            },
            None => None,
        };
        match self.per_ip.enter(ip) {
            Some(guard) => Admission::Serve(HandshakeGuard { _ip: guard, _total: total }),
            None => Admission::Refuse("too many agent handshakes in progress from this address"),
        }
    }
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Serves one accepted connection until it ends. Never panics on what the peer sends. The
/// handshake counts against its limits until `Welcome` or refusal.
pub async fn serve(accepted: Accepted, shared: Arc<Shared>, handshake: HandshakeGuard) {
    let peer = accepted.remote_addr();
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id, %peer);
    async move {
        match run(accepted, id, &shared, handshake).await {
            Ok(()) => info!("session ended"),
            Err(e) => info!(reason = %e, "session ended"),
        }
        shared.router.session_ended(id);
        shared.overlays.session_ended(id);
    }
    .instrument(span)
    .await;
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no message from the agent for {0:?}")]
    Dead(Duration),
    #[error("relay shutting down")]
    Shutdown,
    #[error("ended by the relay: {0}")]
    Ended(String),
}

async fn run(
    accepted: Accepted,
    id: u64,
    shared: &Shared,
    handshake: HandshakeGuard,
) -> Result<(), SessionError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let session = tokio::time::timeout_at(deadline, accepted.establish())
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    let result = run_session(&session, id, shared, deadline, handshake).await;
    if matches!(
        result,
        Err(SessionError::Refused(_) | SessionError::Shutdown | SessionError::Ended(_))
    ) {
        // The agent closes the session once it has read why; do not cut the answer off.
        let _ = timeout(Duration::from_secs(2), session.closed()).await;
    }
    session.close("session ended");
    result
}

async fn run_session(
    session: &Session,
    id: u64,
    shared: &Shared,
    deadline: Instant,
    handshake: HandshakeGuard,
) -> Result<(), SessionError> {
    // An agent sends no datagram before `Welcome`; a stranger's are dropped as they come rather
    // than left in QUIC's receive buffer (4 MiB).
    let discard_datagrams = (session.kind() == warren_transport::TransportKind::Quic).then(|| {
        let session = session.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while session.read_datagram().await.is_ok() {}
        }))
    });
    let stream = tokio::time::timeout_at(deadline, session.accept())
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = ControlReader::new(rd);
    let mut writer = ControlWriter::new(wr);
    // The control stream's protocol is the machine's from the first byte; this task drives it
    // (the preface, read below, is bytes the machine never sees).
    // Pings every 5 s; an agent silent for 20 s is dead (PROTOCOL.md §5).
    let timing = Timing::default();
    let mut m = Machine::new(std::time::Instant::now(), timing);

    // The version is chosen from the preface alone: a Hello of another version may not decode.
    let preface = tokio::time::timeout_at(deadline, read_preface(reader.get_mut()))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)?;
    let preface = match preface {
        Ok(p) => p,
        Err(ControlError::Decode(e)) => {
            m.refuse(ErrorCode::Malformed, format!("not a warren agent: {e}"));
            shut(&mut writer, &mut m).await;
            return Err(SessionError::Refused(format!("malformed preface: {e}")));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(version) = preface.negotiate() else {
        let msg = mismatch_message(preface);
        m.refuse(ErrorCode::VersionMismatch, msg.clone());
        shut(&mut writer, &mut m).await;
        return Err(SessionError::Refused(msg));
    };
    let first = match tokio::time::timeout_at(deadline, reader.recv()).await {
        Err(_) => return Err(SessionError::HandshakeTimeout),
        Ok(Ok(m)) => m,
        Ok(Err(ControlError::Decode(e))) => {
            m.refuse(ErrorCode::Malformed, format!("malformed Hello: {e}"));
            shut(&mut writer, &mut m).await;
            return Err(SessionError::Refused(format!("malformed Hello: {e}")));
        }
        Ok(Err(e)) => return Err(e.into()),
    };
    m.handle_message(first, std::time::Instant::now());
    let Some(Event::Hello(hello)) = m.poll_event() else {
        shut(&mut writer, &mut m).await;
        return Err(SessionError::Refused("no Hello".into()));
    };
    // As the throttle counts it: an IPv4 peer of a dual-stack listener as IPv4.
    let ip = session.remote_addr().ip().to_canonical();
    if let Some(wait) = shared.auth_throttle.locked(ip) {
        crate::metrics::global().error("auth_throttled");
        let msg = throttled_message(ip, wait);
        m.refuse(ErrorCode::Throttled, msg.clone());
        shut(&mut writer, &mut m).await;
        return Err(SessionError::Refused(msg));
    }
    let Some(accepted) = shared.auth.check(&hello.token) else {
        crate::metrics::global().error("bad_token");
        let message = match shared.auth_throttle.failed(ip) {
            None => "the relay does not accept this token".to_owned(),
            Some(wait) => {
                format!("the relay does not accept this token; {}", throttled_message(ip, wait))
            }
        };
        m.refuse(ErrorCode::Unauthorized, message);
        shut(&mut writer, &mut m).await;
        return Err(SessionError::Refused(format!("bad token from agent {}", hello.agent_id)));
    };
    // A success does not clear the address's failures: a tenant with a token of its own could
    // otherwise guess others' tokens between its own logins. Failures age out with the window.
    session.lift_pre_auth_limits();
    // The reader of the session's datagrams is started below, after `Welcome`: the agent
    // sends none before it has read that.
    drop(discard_datagrams);
    let owner = Owner { token: accepted.id, agent: hello.agent_id.clone() };
    m.welcome(
        Welcome {
            version,
            session_id: id,
            relay_version: crate::VERSION.into(),
            domain: shared.domain.clone(),
            heartbeat_secs: timing.heartbeat.as_secs() as u16,
            lease_grace_secs: shared.lease_grace.as_secs() as u32,
        },
        std::time::Instant::now(),
    );
    while let Some(msg) = m.poll_transmit() {
        writer.send(&msg).await?;
    }
    drop(handshake);
    crate::metrics::global().handshake.observe(Instant::now() - (deadline - HANDSHAKE_TIMEOUT));
    info!(
        agent = %owner.agent,
        token = %owner.token,
        transport = %session.kind(),
        agent_version = %hello.agent_version,
        protocol = version,
        "agent connected"
    );

    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let closing = matches!(msg, Message::GoAway { .. });
            if writer.send(&msg).await.is_err() {
                break;
            }
            if closing {
                let _ = writer.shutdown().await;
                break;
            }
        }
    });
    let _writer_guard = tokio_util::task::AbortOnDropHandle::new(writer_task);

    let max_streams = match shared.edge.max_streams_per_agent {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        n => n,
    };
    // What other tasks send the agent (forwards, tunnels closed) goes through the machine too.
    let (notify_tx, mut notify_rx) = mpsc::channel::<Message>(64);
    let ctx = SessionCtx {
        session_id: id,
        session: session.clone(),
        notify: notify_tx,
        streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        datagrams: Arc::default(),
        token_streams: accepted
            .limits
            .max_connections
            .map(|max| shared.registry.token_streams(owner.token, max)),
        max_tunnels: accepted.limits.max_tunnels,
    };
    let _datagram_reader = (session.kind() == warren_transport::TransportKind::Quic).then(|| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::udp::read_datagrams(
            session.clone(),
            ctx.datagrams.clone(),
            Some((shared.overlays.clone(), id)),
        )))
    });
    let caller = crate::overlay::Caller {
        account: crate::overlay::Account::of(owner.token),
        agent: owner.agent.clone(),
        session: id,
    };
    let mut overlay_changes = shared.overlays.subscribe();
    let mut overlay_sent = crate::overlay::View::new();
    // The relay path over TLS + yamux: one stream, opened at the first join.
    let mut _overlay_stream = None;

    let handle = crate::forwards::SessionHandle::new(ctx.clone(), owner.clone());
    let ended = CancellationToken::new();
    let reason = Arc::default();
    shared.registry.insert(SessionInfo {
        id,
        agent: owner.agent.clone(),
        token: owner.token,
        api_token: accepted.api_id.clone(),
        addr: session.remote_addr(),
        transport: session.kind(),
        version: hello.agent_version.clone(),
        since: crate::util::unix_now(),
        cancel: ended.clone(),
        reason: Arc::clone(&reason),
        handle: handle.clone(),
    });
    // The forwards stored for this agent open again, in the background: their answers come
    // through this very loop.
    let _reopen = {
        let (handle, router, store) = (handle.clone(), shared.router.clone(), shared.store.clone());
        let (acme, domain) = (shared.acme.clone(), shared.domain.clone());
        let (token, agent) = (owner.token.to_string(), owner.agent.to_string());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let Some(store) = store else { return };
            let mine = match store.list_forwards() {
                Ok(all) => all.into_iter().filter(|f| f.token == token && f.agent == agent),
                Err(e) => {
                    warn!(error = %e, "cannot read forwards from the store");
                    return;
                }
            };
            for f in mine {
                match crate::forwards::open(&router, &handle, &f).await {
                    Ok(b) => {
                        info!(forward = %f.id, url = %b.url, "forward opened again");
                        if let (Some(acme), Some(sub), "http") =
                            (&acme, &b.subdomain, f.proto.as_str())
                        {
                            acme.ensure(&format!("{sub}.{domain}"));
                        }
                    }
                    Err(e) => warn!(forward = %f.id, reason = %e, "forward not opened"),
                }
            }
        }))
    };
    struct Unregister<'a>(&'a Registry, u64);
    impl Drop for Unregister<'_> {
        fn drop(&mut self) {
            self.0.remove(self.1);
        }
    }
    let _unregister = Unregister(&shared.registry, id);

    // Overlay state is pushed only once the agent asked for it (Watch).
    let mut watching = false;

    loop {
        while let Some(msg) = m.poll_transmit() {
            if out_tx.send(msg).await.is_err() {
                return Ok(());
            }
        }
        if let Some(event) = m.poll_event() {
            match event {
                Event::Bind(req) => {
                    let answer = match shared.router.bind(&owner, &req, &ctx) {
                        Ok(bound) => {
                            shared.registry.changed("tunnels");
                            info!(tunnel = %req.name, url = %bound.url, "tunnel bound");
                            if let (Some(acme), Some(sub), warren_proto::Protocol::Http) =
                                (&shared.acme, &bound.subdomain, req.protocol)
                            {
                                acme.ensure(&format!("{sub}.{}", shared.domain));
                            }
                            if !bound.notice.is_empty() {
                                warn!(tunnel = %req.name, notice = %bound.notice, "bind adjusted");
                            }
                            Ok(Message::Bound(bound))
                        }
                        Err(e) => {
                            crate::metrics::global().error("bind_refused");
                            info!(tunnel = %req.name, code = %e.code, reason = %e.message, "bind refused");
                            Err((e.code, e.message))
                        }
                    };
                    m.answer(req.req, answer);
                }
                Event::Unbind { req, tunnel } => {
                    let answer = if shared.router.unbind(&owner, id, tunnel) {
                        shared.registry.changed("tunnels");
                        Ok(Message::Unbound { req, tunnel })
                    } else {
                        Err((
                            ErrorCode::UnknownTunnel,
                            format!("tunnel {tunnel} is not bound on this session"),
                        ))
                    };
                    m.answer(req, answer);
                }
                Event::ForwardAnswered { req, result } => {
                    handle.answer(
                        req,
                        result.map_err(|(_, message)| format!("the agent refused: {message}")),
                    );
                }
                Event::AgentError { code, message } => {
                    warn!(%code, %message, "agent reported an error")
                }
                Event::Net(n) => {
                    let joining = matches!(n, warren_proto::overlay::NetMessage::Join { .. });
                    if matches!(n, warren_proto::overlay::NetMessage::Watch { .. }) {
                        // The whole state first, then the answer (so the agent knows it has all
                        // of it), then changes as they come.
                        overlay_changes.mark_unchanged();
                        let now = shared.overlays.view(&caller.account, &caller.agent);
                        for msg in crate::overlay::diff(&Default::default(), &now) {
                            m.notify(Message::Net(msg));
                        }
                        overlay_sent = now;
                        watching = true;
                    }
                    let req = n.request().unwrap_or(0);
                    let Some(answer) = shared.overlays.handle(&caller, n) else { continue };
                    if joining && answer.is_ok() && !shared.overlays.has_sink(id) {
                        match session.kind() {
                            warren_transport::TransportKind::Quic => shared
                                .overlays
                                .set_sink(id, crate::overlay::Sink::Quic(session.clone())),
                            warren_transport::TransportKind::Tcp => {
                                _overlay_stream = Some(crate::overlay::relay_path::open_stream(
                                    shared.overlays.clone(),
                                    session.clone(),
                                    id,
                                ));
                            }
                        }
                    }
                    m.notify(match answer {
                        Ok(msg) => Message::Net(msg),
                        Err(e) => {
                            info!(code = %e.code(), reason = %e, "overlay request refused");
                            Message::Error { req, code: e.code(), message: e.to_string() }
                        }
                    });
                }
                Event::Unexpected(other) => m.notify(Message::Error {
                    req: 0,
                    code: ErrorCode::UnknownMessage,
                    message: format!("unexpected message from an agent: {other:?}"),
                }),
                Event::Hello(_) | Event::Lost(_) => {}
            }
            continue;
        }
        tokio::select! {
            msg = reader.recv() => match msg {
                Ok(msg) => {
                    m.handle_message(msg, std::time::Instant::now());
                    if m.is_closed() {
                        debug!("agent going away");
                        return Ok(());
                    }
                }
                Err(ControlError::Decode(e)) => {
                    let _ = out_tx
                        .send(Message::Error { req: 0, code: ErrorCode::Malformed, message: e.to_string() })
                        .await;
                    let _ = timeout(Duration::from_millis(200), out_tx.closed()).await;
                    return Err(ControlError::Decode(e).into());
                }
                Err(ControlError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            () = warren_transport::control::sleep_until(m.poll_timeout()) => {
                m.handle_timeout(std::time::Instant::now());
                if m.is_closed() {
                    // The machine's GoAway (Timeout) goes out first.
                    while let Some(msg) = m.poll_transmit() {
                        let _ = out_tx.try_send(msg);
                    }
                    return Err(SessionError::Dead(timing.dead_after));
                }
            }
            Some(msg) = notify_rx.recv() => match msg {
                Message::Forward(f) => m.forward(f),
                other => m.notify(other),
            },
            () = shared.shutdown.cancelled() => {
                m.go_away(ErrorCode::ShuttingDown, "relay shutting down".into());
                return finish(&mut m, &out_tx, SessionError::Shutdown).await;
            }
            () = session.closed() => return Ok(()),
            Ok(()) = overlay_changes.changed(), if watching => {
                let now = shared.overlays.view(&caller.account, &caller.agent);
                for msg in crate::overlay::diff(&overlay_sent, &now) {
                    m.notify(Message::Net(msg));
                }
                overlay_sent = now;
            }
            () = ended.cancelled() => {
                let (code, message) = reason
                    .lock()
                    .unwrap_or_else(|p: std::sync::PoisonError<_>| p.into_inner())
                    .clone()
                    .unwrap_or((ErrorCode::ShuttingDown, "session ended by the relay".into()));
                m.go_away(code, message.clone());
                return finish(&mut m, &out_tx, SessionError::Ended(message)).await;
            }
        }
    }
}

/// Sends what the machine has left (its `GoAway` last), gives the writer a moment to put it on
/// the wire, and ends the session with `why`.
async fn finish(
    m: &mut Machine,
    out_tx: &mpsc::Sender<Message>,
    why: SessionError,
) -> Result<(), SessionError> {
    while let Some(msg) = m.poll_transmit() {
        if out_tx.send(msg).await.is_err() {
            break;
        }
    }
    let _ = timeout(Duration::from_millis(500), out_tx.closed()).await;
    Err(why)
}

/// Writes what the machine has left (its refusal) and closes the sending side, within 2 s.
async fn shut<W: tokio::io::AsyncWrite + Unpin>(writer: &mut ControlWriter<W>, m: &mut Machine) {
    let _ = timeout(Duration::from_secs(2), async {
        while let Some(msg) = m.poll_transmit() {
            if writer.send(&msg).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Why a locked-out address is refused, and when it may try again (whole seconds, rounded up).
fn throttled_message(ip: IpAddr, wait: Duration) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    format!("too many failed authentications from {ip}; retry in {secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize, total: usize) -> Handshakes {
        Handshakes::new(HandshakeLimits { per_ip, total })
    }

    fn served(a: Admission) -> HandshakeGuard {
        match a {
            Admission::Serve(g) => g,
            other => panic!("expected to be served, got {other:?}"),
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    /// With a cap of 2 reached by `a` and `b`, `over` is refused until `a`'s handshake ends.
    fn refused_until_one_ends(h: &Handshakes, a: IpAddr, b: IpAddr, over: IpAddr) {
        let first = served(h.admit(a, true));
        let _second = served(h.admit(b, true));
        assert!(matches!(h.admit(over, true), Admission::Refuse(_)));
        drop(first);
        let _third = served(h.admit(over, true));
    }

    #[test]
    fn per_address_cap() {
        let h = limits(2, 0);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        refused_until_one_ends(&h, A, A, mapped);
        let _other = served(h.admit(B, true));
    }

    #[test]
    fn total_cap() {
        refused_until_one_ends(&limits(0, 2), A, B, IpAddr::from([192, 0, 2, 3]));
    }

    #[test]
    fn unproven_addresses_must_validate_when_busy() {
        let h = limits(16, 8);
        let _first = served(h.admit(A, false));
        assert!(matches!(h.admit(A, false), Admission::Validate), "A is busy");
        let _proven = served(h.admit(A, true));
        let _b = served(h.admit(B, false));
        // Half of the relay's 8 handshakes are now taken (3 + 1).
        let _c = served(h.admit(IpAddr::from([192, 0, 2, 3]), true));
        assert!(matches!(h.admit(IpAddr::from([192, 0, 2, 4]), false), Admission::Validate));
        let _d = served(h.admit(IpAddr::from([192, 0, 2, 4]), true));
    }

    #[test]
    fn throttled_message_rounds_up() {
        let m = throttled_message(A, Duration::from_millis(250));
        assert_eq!(m, "too many failed authentications from 192.0.2.1; retry in 1s");
        assert!(throttled_message(A, Duration::from_secs(4)).ends_with("retry in 4s"));
    }
}

//! One agent session on the relay: handshake, control loop, heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use warren_proto::preface::mismatch_message;
use warren_proto::{ErrorCode, Message, Welcome};
use warren_transport::control::read_preface;
use warren_transport::{Accepted, ControlError, ControlReader, ControlWriter, Session};

use crate::auth::Auth;
use crate::edge::EdgeConfig;
use crate::registry::{Registry, SessionInfo};
use crate::router::{Owner, Router, SessionCtx};

/// Deadline for everything before `Welcome`: transport handshake, control stream, preface,
/// hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between the relay's pings.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A session from which nothing arrived for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(20);

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
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Serves one accepted connection until it ends. Never panics on what the peer sends.
pub async fn serve(accepted: Accepted, shared: Arc<Shared>) {
    let peer = accepted.remote_addr();
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id, %peer);
    async move {
        match run(accepted, id, &shared).await {
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

async fn run(accepted: Accepted, id: u64, shared: &Shared) -> Result<(), SessionError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let session = tokio::time::timeout_at(deadline, accepted.establish())
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    let result = run_session(&session, id, shared, deadline).await;
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
) -> Result<(), SessionError> {
    let stream = tokio::time::timeout_at(deadline, session.accept())
        .await
        .map_err(|_| SessionError::HandshakeTimeout)??;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = ControlReader::new(rd);
    let mut writer = ControlWriter::new(wr);

    // The version is chosen from the preface alone: a Hello of another version may not decode.
    let preface = tokio::time::timeout_at(deadline, read_preface(reader.get_mut()))
        .await
        .map_err(|_| SessionError::HandshakeTimeout)?;
    let preface = match preface {
        Ok(p) => p,
        Err(ControlError::Decode(e)) => {
            refuse(&mut writer, ErrorCode::Malformed, format!("not a warren agent: {e}")).await;
            return Err(SessionError::Refused(format!("malformed preface: {e}")));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(version) = preface.negotiate() else {
        let msg = mismatch_message(preface);
        refuse(&mut writer, ErrorCode::VersionMismatch, msg.clone()).await;
        return Err(SessionError::Refused(msg));
    };
    let first = match tokio::time::timeout_at(deadline, reader.recv()).await {
        Err(_) => return Err(SessionError::HandshakeTimeout),
        Ok(Ok(m)) => m,
        Ok(Err(ControlError::Decode(e))) => {
            refuse(&mut writer, ErrorCode::Malformed, format!("malformed Hello: {e}")).await;
            return Err(SessionError::Refused(format!("malformed Hello: {e}")));
        }
        Ok(Err(e)) => return Err(e.into()),
    };
    let Message::Hello(hello) = first else {
        refuse(&mut writer, ErrorCode::Malformed, "expected Hello after the preface".into()).await;
        return Err(SessionError::Refused("no Hello".into()));
    };
    let Some(accepted) = shared.auth.check(&hello.token) else {
        crate::metrics::global().error("bad_token");
        refuse(&mut writer, ErrorCode::Unauthorized, "the relay does not accept this token".into())
            .await;
        return Err(SessionError::Refused(format!("bad token from agent {}", hello.agent_id)));
    };
    let owner = Owner { token: accepted.id, agent: hello.agent_id.clone() };
    writer
        .send(&Message::Welcome(Welcome {
            version,
            session_id: id,
            relay_version: crate::VERSION.into(),
            domain: shared.domain.clone(),
            heartbeat_secs: HEARTBEAT.as_secs() as u16,
            lease_grace_secs: shared.lease_grace.as_secs() as u32,
        }))
        .await?;
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
    let ctx = SessionCtx {
        session_id: id,
        session: session.clone(),
        notify: out_tx.clone(),
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

    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        let msg = tokio::select! {
            m = reader.recv() => m,
            _ = tick.tick() => {
                if last_seen.elapsed() > DEAD_AFTER {
                    let _ = out_tx.try_send(Message::GoAway { code: ErrorCode::Timeout, message: "no heartbeat".into() });
                    return Err(SessionError::Dead(DEAD_AFTER));
                }
                nonce += 1;
                let _ = out_tx.try_send(Message::Ping { nonce });
                continue;
            }
            () = shared.shutdown.cancelled() => {
                let _ = out_tx.send(Message::GoAway { code: ErrorCode::ShuttingDown, message: "relay shutting down".into() }).await;
                // Give the writer a moment to put the GoAway on the wire.
                let _ = timeout(Duration::from_millis(500), out_tx.closed()).await;
                return Err(SessionError::Shutdown);
            }
            () = session.closed() => return Ok(()),
            Ok(()) = overlay_changes.changed(), if watching => {
                let now = shared.overlays.view(&caller.account, &caller.agent);
                for m in crate::overlay::diff(&overlay_sent, &now) {
                    if out_tx.send(Message::Net(m)).await.is_err() {
                        return Ok(());
                    }
                }
                overlay_sent = now;
                continue;
            }
            () = ended.cancelled() => {
                let (code, message) = reason
                    .lock()
                    .unwrap_or_else(|p: std::sync::PoisonError<_>| p.into_inner())
                    .clone()
                    .unwrap_or((ErrorCode::ShuttingDown, "session ended by the relay".into()));
                let _ = out_tx.send(Message::GoAway { code, message: message.clone() }).await;
                let _ = timeout(Duration::from_millis(500), out_tx.closed()).await;
                return Err(SessionError::Ended(message));
            }
        };
        let msg = match msg {
            Ok(m) => m,
            Err(ControlError::Decode(e)) => {
                let _ = out_tx
                    .send(Message::Error {
                        req: 0,
                        code: ErrorCode::Malformed,
                        message: e.to_string(),
                    })
                    .await;
                let _ = timeout(Duration::from_millis(200), out_tx.closed()).await;
                return Err(ControlError::Decode(e).into());
            }
            Err(ControlError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        last_seen = Instant::now();
        let reply = match msg {
            Message::Bind(req) => match shared.router.bind(&owner, &req, &ctx) {
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
                    Message::Bound(bound)
                }
                Err(e) => {
                    crate::metrics::global().error("bind_refused");
                    info!(tunnel = %req.name, code = %e.code, reason = %e.message, "bind refused");
                    Message::Error { req: req.req, code: e.code, message: e.message }
                }
            },
            Message::Unbind { req, tunnel } => {
                if shared.router.unbind(&owner, id, tunnel) {
                    shared.registry.changed("tunnels");
                    Message::Unbound { req, tunnel }
                } else {
                    Message::Error {
                        req,
                        code: ErrorCode::UnknownTunnel,
                        message: format!("tunnel {tunnel} is not bound on this session"),
                    }
                }
            }
            Message::Ping { nonce } => Message::Pong { nonce },
            Message::Pong { .. } => continue,
            Message::GoAway { message, .. } => {
                debug!(%message, "agent going away");
                return Ok(());
            }
            Message::ForwardOk { req } => {
                handle.answer(req, Ok(()));
                continue;
            }
            Message::Error { req, code, message } => {
                if !handle.answer(req, Err(format!("the agent refused: {message}"))) {
                    warn!(%code, %message, "agent reported an error");
                }
                continue;
            }
            Message::Net(n) => {
                let joining = matches!(n, warren_proto::overlay::NetMessage::Join { .. });
                if matches!(n, warren_proto::overlay::NetMessage::Watch { .. }) {
                    // The whole state first, then the answer (so the agent knows it has all of
                    // it), then changes as they come.
                    overlay_changes.mark_unchanged();
                    let now = shared.overlays.view(&caller.account, &caller.agent);
                    for m in crate::overlay::diff(&Default::default(), &now) {
                        if out_tx.send(Message::Net(m)).await.is_err() {
                            return Ok(());
                        }
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
                match answer {
                    Ok(m) => Message::Net(m),
                    Err(e) => {
                        info!(code = %e.code(), reason = %e, "overlay request refused");
                        Message::Error { req, code: e.code(), message: e.to_string() }
                    }
                }
            }
            Message::Unknown { kind } => Message::Error {
                req: 0,
                code: ErrorCode::UnknownMessage,
                message: format!("unknown message type {kind:#x}"),
            },
            other => Message::Error {
                req: 0,
                code: ErrorCode::UnknownMessage,
                message: format!("unexpected message from an agent: {other:?}"),
            },
        };
        if out_tx.send(reply).await.is_err() {
            return Ok(());
        }
    }
}

async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut ControlWriter<W>,
    code: ErrorCode,
    message: String,
) {
    let _ = timeout(Duration::from_secs(2), async {
        let _ = writer.send(&Message::Error { req: 0, code, message }).await;
        let _ = writer.shutdown().await;
    })
    .await;
}

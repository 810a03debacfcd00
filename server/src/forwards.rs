//! Forwards: tunnels the relay opens on a connected agent's behalf (created through the API),
//! opened again each time that agent connects.
//!
//! The relay binds the tunnel itself, on the agent's session, then tells the agent with a
//! `Forward` message which tunnel id to serve and where its traffic goes; the agent answers
//! `ForwardOk`, or `Error` when it cannot (a target it cannot parse). Only then does the API
//! answer, with the public URL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use warren_proto::{
    Bind, Bound, ErrorCode, Forward, Message, Protocol, Subdomain, TunnelName, TunnelOptions,
};

use crate::router::{Owner, Router, SessionCtx};
use crate::store::ForwardRecord;

/// How long an agent may take to accept a forward.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<(), String>>>>>;

/// What it takes to open forwards on one session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The session's binding context.
    pub ctx: SessionCtx,
    /// Who the session is.
    pub owner: Owner,
    pending: Pending,
    next: Arc<AtomicU32>,
}

impl SessionHandle {
    /// A handle for the session described by `ctx`.
    pub fn new(ctx: SessionCtx, owner: Owner) -> Self {
        Self { ctx, owner, pending: Pending::default(), next: Arc::new(AtomicU32::new(1)) }
    }

    /// Hands the agent's answer to request `req` to whoever waits for it; false when nobody
    /// does (the message was about something else).
    pub fn answer(&self, req: u32, result: Result<(), String>) -> bool {
        let waiter = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&req);
        match waiter {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }
}

/// The tunnel name of forward `id` (`fwd_abc` → `fwd-abc`).
pub fn tunnel_name(id: &str) -> Option<TunnelName> {
    TunnelName::parse(&id.replacen('_', "-", 1)).ok()
}

/// The protocol named `proto`.
pub fn protocol(proto: &str) -> Option<Protocol> {
    match proto {
        "http" => Some(Protocol::Http),
        "tcp" => Some(Protocol::Tcp),
        "tls" => Some(Protocol::Tls),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

/// Binds forward `f` on the session of `handle` and waits until the agent serves it.
pub async fn open(
    router: &Router,
    handle: &SessionHandle,
    f: &ForwardRecord,
) -> Result<Bound, String> {
    let name = tunnel_name(&f.id).ok_or_else(|| format!("bad forward id {}", f.id))?;
    let protocol = protocol(&f.proto).ok_or_else(|| format!("unknown proto {:?}", f.proto))?;
    let subdomain = match &f.subdomain {
        Some(s) => Some(Subdomain::parse(s).map_err(|e| e.to_string())?),
        None => None,
    };
    let bind = Bind {
        req: 0,
        name: name.clone(),
        protocol,
        subdomain,
        remote_port: f.remote_port,
        sticky: false,
        options: TunnelOptions::default(),
    };
    let bound = router.bind(&handle.owner, &bind, &handle.ctx).map_err(|e| e.message)?;
    let req = handle.next.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    handle.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(req, tx);
    let msg = Message::Forward(Forward {
        req,
        tunnel: bound.tunnel,
        name: name.clone(),
        protocol,
        target: f.target.clone(),
        url: bound.url.clone(),
    });
    let answer = async {
        handle.ctx.notify.send(msg).await.map_err(|_| "the agent's session ended".to_owned())?;
        match tokio::time::timeout(ACCEPT_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the agent's session ended".to_owned()),
            Err(_) => Err("the agent did not answer in time".to_owned()),
        }
    };
    match answer.await {
        Ok(()) => Ok(bound),
        Err(e) => {
            handle.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&req);
            router.remove_lease(&handle.owner, &name, &e);
            Err(e)
        }
    }
}

/// Closes forward `f` wherever it is served: its lease ends and its agent is told.
pub fn close(router: &Router, owner: &Owner, f: &ForwardRecord) {
    if let Some(name) = tunnel_name(&f.id) {
        router.remove_lease(owner, &name, "the forward was deleted through the relay's API");
    }
}

/// The error code an agent's refusal carries.
pub const REFUSED: ErrorCode = ErrorCode::InvalidRequest;

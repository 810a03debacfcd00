//! The live agent sessions, for the API: who is connected, from where, since when, and a way
//! to end a session (disconnect, token revoked).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use warren_proto::{AgentId, ErrorCode};
use warren_transport::TransportKind;

use crate::auth::TokenId;

/// One connected agent session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The relay's number for the session.
    pub id: u64,
    /// The agent's identity.
    pub agent: AgentId,
    /// The token it presented.
    pub token: TokenId,
    /// The API's id of that token, if it was created through the API.
    pub api_token: Option<String>,
    /// Where it connects from.
    pub addr: SocketAddr,
    /// QUIC or TLS over TCP.
    pub transport: TransportKind,
    /// The agent's software version.
    pub version: String,
    /// Unix seconds when the session was accepted.
    pub since: i64,
    /// Cancelled to end the session; the reason is set first.
    pub cancel: CancellationToken,
    /// Why the session was ended from outside.
    pub reason: Arc<Mutex<Option<(ErrorCode, String)>>>,
    /// Opens forwards on the session.
    pub handle: crate::forwards::SessionHandle,
}

/// The live sessions, and the shared stream limits of tokens that have one.
#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<HashMap<u64, SessionInfo>>,
    token_streams: Mutex<HashMap<TokenId, (u32, Arc<Semaphore>)>>,
    changes: tokio::sync::broadcast::Sender<&'static str>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            sessions: Mutex::default(),
            token_streams: Mutex::default(),
            changes: tokio::sync::broadcast::channel(64).0,
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SessionInfo>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a session; [`Registry::remove`] it when it ends.
    pub fn insert(&self, info: SessionInfo) {
        self.lock().insert(info.id, info);
        self.changed("agents");
    }

    /// Forgets a session.
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.changed("agents");
    }

    /// Tells the dashboards that `what` (`agents`, `tunnels`, `forwards`, `tokens`) changed.
    pub fn changed(&self, what: &'static str) {
        let _ = self.changes.send(what);
    }

    /// Changes as they happen, for server-sent events.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<&'static str> {
        self.changes.subscribe()
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self.lock().values().cloned().collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// One live session.
    pub fn get(&self, id: u64) -> Option<SessionInfo> {
        self.lock().get(&id).cloned()
    }

    /// Ends session `id`, telling the agent why. False if there is no such session.
    pub fn end(&self, id: u64, code: ErrorCode, why: &str) -> bool {
        match self.get(id) {
            Some(s) => {
                *s.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, why.to_owned()));
                s.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Ends every session of the API token `api_id`; returns how many.
    pub fn end_token(&self, api_id: &str, why: &str) -> usize {
        let ids: Vec<u64> = self
            .lock()
            .values()
            .filter(|s| s.api_token.as_deref() == Some(api_id))
            .map(|s| s.id)
            .collect();
        ids.iter().filter(|id| self.end(**id, ErrorCode::Unauthorized, why)).count()
    }

    /// The semaphore that bounds the concurrent visitor streams of a token allowing `max`.
    pub fn token_streams(&self, token: TokenId, max: u32) -> Arc<Semaphore> {
        let mut map = self.token_streams.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&token) {
            Some((m, s)) if *m == max => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(max as usize));
                map.insert(token, (max, s.clone()));
                s
            }
        }
    }
}

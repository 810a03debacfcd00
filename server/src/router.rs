//! Tunnels, leases and routes: who serves which subdomain and which port.
//!
//! A tunnel is keyed by its [`LeaseKey`] — (token, agent identity, tunnel name) — and holds its
//! subdomain or port for as long as a session serves it, plus a grace period after that session
//! ends. A bind of the same key from a newer session takes the tunnel over at once; the older
//! session is told. The router is all in memory behind one lock; nothing in it awaits.
//!
//! With a [`LeaseStore`] the maps are written through: every lease granted, taken over, gone
//! offline or released is written, in order, after the change (behind a second lock, so
//! visitors' lookups never wait for the disk). [`Router::restore`] loads the stored leases at
//! start, all offline for one grace period. Binds are also capped per token and per session
//! ([`Caps`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::task::AbortOnDropHandle;
use warren_proto::{Bind, Bound, ErrorCode, Message, Protocol, Subdomain, TunnelId, TunnelName};
use warren_transport::Session;

use crate::auth::TokenId;
pub use crate::leases::{LeaseKey, Owner};
use crate::leases::{LeaseStore, StoredLease};
use crate::policy::Policy;
use crate::pool::{PoolError, PoolSocket, PortPool};
use crate::store::StoreError;
use crate::udp::DatagramRoutes;

/// What one token and one session may hold. A bind past a cap is refused with
/// `InvalidRequest`, naming the cap and the flag that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Tunnels one token may hold over all its sessions, offline leases included
    /// (`--max-tunnels-per-token`; 0: no cap). A token's own `max_tunnels` applies if smaller.
    pub tunnels_per_token: u32,
    /// Tunnels one agent session may hold (`--max-tunnels-per-session`; 0: no cap).
    pub tunnels_per_session: u32,
    /// Reservations an agent token may hold (`--max-reservations`; 0: none). The admin token
    /// may reserve past it, for any token.
    pub reservations_per_token: u32,
}

impl Default for Caps {
    fn default() -> Self {
        Self { tunnels_per_token: 256, tunnels_per_session: 256, reservations_per_token: 16 }
    }
}

/// The session currently serving a tunnel.
#[derive(Debug, Clone)]
pub struct Live {
    /// The relay's number for the session.
    pub session_id: u64,
    /// The session, to open data streams on.
    pub session: Session,
    /// The tunnel's id within that session's binds.
    pub tunnel: TunnelId,
    /// The tunnel's name.
    pub name: TunnelName,
    /// The session's control outbox.
    pub notify: mpsc::Sender<Message>,
    /// The tunnel's protocol.
    pub protocol: Protocol,
    /// What the tunnel lets in.
    pub policy: Arc<Policy>,
    /// Data streams the session may still open (the per-agent cap), shared by its tunnels.
    pub streams: Arc<Semaphore>,
    /// Where the session's datagram reader delivers UDP replies, by tunnel.
    pub datagrams: DatagramRoutes,
    /// Visitor streams the token may still open (its `max_connections`), if limited.
    pub token_streams: Option<Arc<Semaphore>>,
    /// The tunnel's traffic counters, kept across sessions for as long as its lease.
    pub stats: Arc<TunnelStats>,
}

/// Traffic through one tunnel since its lease began.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Bytes from visitors to the agent.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Bytes from the agent to visitors.
    pub bytes_out: std::sync::atomic::AtomicU64,
    /// Visitor streams (connections, HTTP upstream connections, UDP flows) open now.
    pub open: std::sync::atomic::AtomicU64,
    /// Visitor streams opened in all.
    pub total: std::sync::atomic::AtomicU64,
}

/// One tunnel as the API shows it.
#[derive(Debug, Clone)]
pub struct TunnelView {
    /// Who holds the lease.
    pub owner: Owner,
    /// The tunnel's name.
    pub name: TunnelName,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its public URL.
    pub url: String,
    /// The serving session, or `None` while the agent is away.
    pub session_id: Option<u64>,
    /// Its counters.
    pub stats: Arc<TunnelStats>,
}

/// What a session brings to every bind: its identity, connection and shared limits.
#[derive(Debug, Clone)]
pub struct SessionCtx {
    /// The relay's number for the session.
    pub session_id: u64,
    /// The session.
    pub session: Session,
    /// Its control outbox.
    pub notify: mpsc::Sender<Message>,
    /// Data streams it may still open.
    pub streams: Arc<Semaphore>,
    /// Its UDP reply routes.
    pub datagrams: DatagramRoutes,
    /// The token's stream limit, if it has one.
    pub token_streams: Option<Arc<Semaphore>>,
    /// The token's tunnel limit, if it has one.
    pub max_tunnels: Option<u32>,
}

/// What a public listener finds for a visitor.
#[derive(Debug, Clone)]
pub enum Route {
    /// The tunnel is served now.
    Live(Live),
    /// The tunnel is leased but its agent is away (reconnecting).
    Offline(TunnelName),
}

/// A refused bind: the code for the wire and a sentence for the user.
#[derive(Debug, Clone)]
pub struct BindError {
    /// Error code.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

impl BindError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Starts serving a TCP or UDP tunnel's public socket; the returned handle stops it when dropped.
pub type ListenerSpawner =
    Box<dyn Fn(PoolSocket, watch::Receiver<Option<Live>>) -> AbortOnDropHandle<()> + Send + Sync>;

/// A port of the pool, TCP and UDP being separate spaces.
pub type PortKey = (bool, u16);

struct Entry {
    protocol: Protocol,
    stats: Arc<TunnelStats>,
    subdomain: Option<Subdomain>,
    port: Option<u16>,
    live: watch::Sender<Option<Live>>,
    offline_since: Option<Instant>,
    _listener: Option<AbortOnDropHandle<()>>,
}

/// A change of a lease, to be written to the lease store.
enum LeaseOp {
    Put(StoredLease),
    Release(LeaseKey),
}

#[derive(Default)]
struct State {
    entries: HashMap<LeaseKey, Entry>,
    by_sub: HashMap<Subdomain, LeaseKey>,
    by_port: HashMap<PortKey, LeaseKey>,
    next_id: u32,
    /// Lease changes made under the lock and not yet written, in order.
    journal: Vec<LeaseOp>,
}

impl State {
    /// Records that `key`'s lease is now as its entry says; `offline_until` (Unix seconds) while
    /// its agent is away.
    fn journal_put(&mut self, key: &LeaseKey, offline_until: Option<i64>) {
        if let Some(e) = self.entries.get(key) {
            self.journal.push(LeaseOp::Put(StoredLease {
                key: key.clone(),
                protocol: e.protocol,
                subdomain: e.subdomain.clone(),
                port: e.port,
                offline_until,
            }));
        }
    }
}

/// Locks `m`. A panic while holding one of the router's locks cannot leave its maps
/// half-updated in a way that matters more than stopping the relay would; keep serving.
fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterStats {
    /// Tunnels with a live session.
    pub live: usize,
    /// Tunnels leased but offline.
    pub offline: usize,
}

/// The registry of tunnels.
pub struct Router {
    state: Mutex<State>,
    domain: String,
    http_port: u16,
    https_port: Option<u16>,
    prefer_https: bool,
    pool: PortPool,
    grace: Duration,
    spawn_listener: ListenerSpawner,
    reserved: std::sync::RwLock<ReservedIndex>,
    caps: Caps,
    leases: Option<Arc<dyn LeaseStore>>,
    /// Held by every change from before it takes `state` until its leases are written, so the
    /// store sees changes in the order the maps did.
    writes: Mutex<()>,
}

/// Subdomains and ports kept for tokens: no other token's tunnel is given them.
#[derive(Debug, Default, Clone)]
pub struct ReservedIndex {
    /// Reserved subdomains and their token.
    pub subdomains: HashMap<String, TokenId>,
    /// Reserved pool ports (`(udp, port)`) and their token.
    pub ports: HashMap<PortKey, TokenId>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("domain", &self.domain).finish_non_exhaustive()
    }
}

/// A subdomain derived from the lease key, so an agent that names none gets the same one back
/// after any reconnect or relay restart.
fn derived_subdomain(owner: &Owner, name: &TunnelName) -> Subdomain {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&owner.token.0);
    ctx.update(owner.agent.as_str().as_bytes());
    ctx.update(&[0]);
    ctx.update(name.as_str().as_bytes());
    let digest = ctx.finish();
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let label: String =
        digest.as_ref().iter().take(10).map(|b| ALPHABET[(*b as usize) % 32] as char).collect();
    // Built only from the alphabet above, so always a valid label.
    Subdomain::parse(&label).unwrap_or_else(|_| unreachable!("derived label {label} is valid"))
}

impl Router {
    /// An empty router.
    pub fn new(
        domain: String,
        http_port: u16,
        pool: PortPool,
        grace: Duration,
        spawn_listener: ListenerSpawner,
    ) -> Self {
        Self {
            state: Mutex::default(),
            domain,
            http_port,
            https_port: None,
            prefer_https: false,
            pool,
            grace,
            spawn_listener,
            reserved: std::sync::RwLock::default(),
            caps: Caps::default(),
            leases: None,
            writes: Mutex::default(),
        }
    }

    /// Caps binds per token and per session.
    pub fn with_caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
        self
    }

    /// The caps in force.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Writes every lease change through to `store`; [`Router::restore`] loads what it holds.
    pub fn with_lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.leases = Some(store);
        self
    }

    /// Loads the stored leases, each offline and held for its owner for one grace period from
    /// now (its agent could not reconnect while the relay was down): within it, its name or
    /// port is refused to everybody else and given back to its owner. A lease whose pool port
    /// cannot be bound any more (outside the pool now, or taken by another program) is dropped,
    /// with a warning. Returns how many were loaded.
    pub fn restore(&self) -> Result<usize, StoreError> {
        let Some(store) = &self.leases else { return Ok(0) };
        let stored = store.load()?;
        let until = crate::util::unix_now()
            .saturating_add(i64::try_from(self.grace.as_secs()).unwrap_or(i64::MAX));
        Ok(self.change(|st| {
            let now = Instant::now();
            let mut loaded = 0;
            for lease in stored {
                let udp = lease.protocol == Protocol::Udp;
                let clash = lease.subdomain.as_ref().is_some_and(|s| st.by_sub.contains_key(s))
                    || lease.port.is_some_and(|p| st.by_port.contains_key(&(udp, p)))
                    || st.entries.contains_key(&lease.key);
                let socket = match lease.port {
                    _ if clash => Err("another stored lease holds the same name or port".into()),
                    Some(p) => self.pool.bind(p, udp).map(Some).map_err(|e| e.to_string()),
                    None => Ok(None),
                };
                let socket = match socket {
                    Ok(s) => s,
                    Err(why) => {
                        tracing::warn!(
                            agent = %lease.key.0.agent, tunnel = %lease.key.1, reason = %why,
                            "stored lease dropped"
                        );
                        st.journal.push(LeaseOp::Release(lease.key));
                        continue;
                    }
                };
                let (live, watcher) = watch::channel(None);
                let listener = socket.map(|s| (self.spawn_listener)(s, watcher));
                if let Some(s) = &lease.subdomain {
                    st.by_sub.insert(s.clone(), lease.key.clone());
                }
                if let Some(p) = lease.port {
                    st.by_port.insert((udp, p), lease.key.clone());
                }
                st.entries.insert(
                    lease.key.clone(),
                    Entry {
                        protocol: lease.protocol,
                        stats: Arc::default(),
                        subdomain: lease.subdomain,
                        port: lease.port,
                        live,
                        offline_since: Some(now),
                        _listener: listener,
                    },
                );
                st.journal_put(&lease.key, Some(until));
                loaded += 1;
            }
            loaded
        }))
    }

    /// Runs `f` on the maps, then writes the lease changes it journaled to the lease store
    /// (outside the maps' lock, in order with every other change).
    fn change<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let _in_order = guard(&self.writes);
        let (out, ops) = {
            let mut st = self.lock();
            let out = f(&mut st);
            (out, std::mem::take(&mut st.journal))
        };
        if let Some(store) = &self.leases {
            persist(store.as_ref(), ops);
        }
        out
    }

    /// Replaces the reservations the router honours.
    pub fn set_reserved(&self, index: ReservedIndex) {
        *self.reserved.write().unwrap_or_else(|p| p.into_inner()) = index;
    }

    /// The token whose tunnel holds `sub` or `port` now, if any.
    pub fn holder(&self, sub: Option<&str>, port: Option<PortKey>) -> Option<TokenId> {
        let st = self.lock();
        let key = match (sub, port) {
            (Some(s), _) => Subdomain::parse(s).ok().and_then(|sub| st.by_sub.get(&sub)),
            (None, Some(p)) => st.by_port.get(&p),
            _ => None,
        }?;
        Some(key.0.token)
    }

    /// Tells the router the HTTPS listener's port, for tunnel URLs. With `prefer` set, HTTP
    /// tunnels are announced with their https:// URL.
    pub fn with_https(mut self, port: u16, prefer: bool) -> Self {
        self.https_port = Some(port);
        self.prefer_https = prefer;
        self
    }

    /// The port pool's range.
    pub fn pool_range(&self) -> crate::config::PortRange {
        self.pool.range()
    }

    /// The public HTTPS port, if there is an HTTPS listener.
    pub fn https_port(&self) -> Option<u16> {
        self.https_port
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        guard(&self.state)
    }

    fn url(&self, protocol: Protocol, sub: Option<&Subdomain>, port: Option<u16>) -> String {
        let host = |scheme: &str, default: u16, port: Option<u16>| match (sub, port) {
            (Some(s), Some(p)) if p != default => format!("{scheme}://{s}.{}:{p}", self.domain),
            (Some(s), _) => format!("{scheme}://{s}.{}", self.domain),
            (None, _) => String::new(),
        };
        match (protocol, port) {
            (Protocol::Http, _) => match self.https_port {
                Some(p) if self.prefer_https => host("https", 443, Some(p)),
                _ => host("http", 80, Some(self.http_port)),
            },
            (Protocol::Tls, _) => host("tls", 443, self.https_port),
            (Protocol::Udp, Some(p)) => format!("udp://{}:{p}", self.domain),
            (_, Some(p)) => format!("tcp://{}:{p}", self.domain),
            _ => String::new(),
        }
    }

    /// Binds (or takes over) a tunnel for `owner` on the session described by `live`.
    pub fn bind(&self, owner: &Owner, req: &Bind, ctx: &SessionCtx) -> Result<Bound, BindError> {
        let named = matches!(req.protocol, Protocol::Http | Protocol::Tls);
        match req.protocol {
            p if named && req.remote_port.is_some() => {
                return Err(BindError::new(
                    ErrorCode::InvalidRequest,
                    format!("a {p} tunnel takes a subdomain, not a remote port"),
                ));
            }
            p if !named && req.subdomain.is_some() => {
                return Err(BindError::new(
                    ErrorCode::InvalidRequest,
                    format!("a {p} tunnel takes a remote port, not a subdomain"),
                ));
            }
            Protocol::Tls if self.https_port.is_none() => {
                return Err(BindError::new(
                    ErrorCode::InvalidRequest,
                    "this relay has no HTTPS listener, so it cannot route tls tunnels (start it with --https)",
                ));
            }
            _ => {}
        }
        let policy = Policy::new(req.protocol, req.options.clone())
            .map_err(|e| BindError::new(ErrorCode::InvalidRequest, e.0))?;
        if policy.options.https_only && self.https_port.is_none() {
            return Err(BindError::new(
                ErrorCode::InvalidRequest,
                "--https-only needs a relay with an HTTPS listener (--https)",
            ));
        }
        let policy = Arc::new(policy);
        self.change(|st| self.grant(st, owner, req, ctx, policy))
    }

    /// Refuses a bind of `key` that would take its token or session past a cap.
    fn check_caps(&self, st: &State, key: &LeaseKey, ctx: &SessionCtx) -> Result<(), BindError> {
        let others = || st.entries.iter().filter(move |(k, _)| *k != key);
        let cap = |n: u32| (n > 0).then_some(n);
        let own = ctx.max_tunnels.map(|n| {
            (
                n,
                "the max_tunnels limit set on it through the relay's API",
                "ask the relay's operator for a higher limit",
            )
        });
        let flag = cap(self.caps.tunnels_per_token).map(|n| {
            (
                n,
                "the relay's --max-tunnels-per-token",
                "ask the relay's operator to raise --max-tunnels-per-token",
            )
        });
        // The smaller applies; on a tie, the token's own limit is the one named.
        let per_token = [own, flag].into_iter().flatten().min_by_key(|(n, _, _)| *n);
        if let Some((max, why, raise)) = per_token {
            let held = others().filter(|(k, _)| k.0.token == key.0.token).count();
            if held >= max as usize {
                return Err(BindError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "tunnel limit reached: this token may hold {max} tunnel(s) ({why}) and \
                         holds {held}; close one, or {raise}"
                    ),
                ));
            }
        }
        if let Some(max) = cap(self.caps.tunnels_per_session) {
            let ours = |e: &Entry| {
                e.live.borrow().as_ref().is_some_and(|l| l.session_id == ctx.session_id)
            };
            let held = others().filter(|(_, e)| ours(e)).count();
            if held >= max as usize {
                return Err(BindError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "tunnel limit reached: one agent session may hold {max} tunnel(s) (the \
                         relay's --max-tunnels-per-session) and this one holds {held}; close one, \
                         run another agent, or ask the relay's operator to raise \
                         --max-tunnels-per-session"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The part of [`Router::bind`] that runs under the lock.
    fn grant(
        &self,
        st: &mut State,
        owner: &Owner,
        req: &Bind,
        ctx: &SessionCtx,
        policy: Arc<Policy>,
    ) -> Result<Bound, BindError> {
        let key: LeaseKey = (owner.clone(), req.name.clone());
        self.check_caps(st, &key, ctx)?;
        let stats = st.entries.get(&key).map(|e| e.stats.clone()).unwrap_or_default();
        st.next_id = st.next_id.wrapping_add(1).max(1);
        let id = TunnelId(st.next_id);
        let session_id = ctx.session_id;
        let live = Live {
            session_id,
            session: ctx.session.clone(),
            tunnel: id,
            name: req.name.clone(),
            notify: ctx.notify.clone(),
            protocol: req.protocol,
            policy: policy.clone(),
            streams: ctx.streams.clone(),
            datagrams: ctx.datagrams.clone(),
            token_streams: ctx.token_streams.clone(),
            stats: stats.clone(),
        };

        let mut notice = String::new();
        if let Some(entry) = st.entries.get(&key) {
            let same = entry.protocol == req.protocol
                && (req.subdomain.is_none() || req.subdomain == entry.subdomain)
                && (req.remote_port.is_none() || req.remote_port == entry.port);
            if same {
                let entry = st.entries.get_mut(&key).unwrap_or_else(|| unreachable!());
                let previous = entry.live.send_replace(Some(live));
                entry.offline_since = None;
                let (sub, port) = (entry.subdomain.clone(), entry.port);
                st.journal_put(&key, None);
                tell_replaced(previous, &req.name, owner, ctx);
                return Ok(Bound {
                    req: req.req,
                    tunnel: id,
                    url: self.url(req.protocol, sub.as_ref(), port),
                    subdomain: sub,
                    remote_port: port,
                    notice,
                });
            }
            // The same tunnel name now asks for something else: its old lease goes, and the
            // session serving it learns that it lost it.
            let previous = st.entries.get(&key).and_then(|e| e.live.send_replace(None));
            tell_replaced(previous, &req.name, owner, ctx);
            remove(st, &key);
        }

        let (subdomain, port, listener) = match req.protocol {
            Protocol::Http | Protocol::Tls => {
                let derived = derived_subdomain(owner, &req.name);
                let wanted = req.subdomain.clone().unwrap_or_else(|| derived.clone());
                let reserved = self.reserved.read().unwrap_or_else(|p| p.into_inner());
                let free = |s: &Subdomain| {
                    st.by_sub.get(s).is_none_or(|k| *k == key)
                        && reserved.subdomains.get(s.as_str()).is_none_or(|t| *t == owner.token)
                };
                let sub = if free(&wanted) {
                    wanted
                } else if req.sticky && free(&derived) {
                    notice = format!("subdomain {wanted} is no longer free; got {derived}");
                    derived
                } else {
                    let why = if reserved
                        .subdomains
                        .get(wanted.as_str())
                        .is_some_and(|t| *t != owner.token)
                    {
                        "is reserved for another token"
                    } else {
                        "is taken by another tunnel"
                    };
                    return Err(BindError::new(
                        ErrorCode::SubdomainTaken,
                        format!("subdomain {wanted} {why}; choose another with --subdomain"),
                    ));
                };
                (Some(sub), None, None)
            }
            Protocol::Tcp | Protocol::Udp => {
                let udp = req.protocol == Protocol::Udp;
                let mut leased: HashSet<u16> =
                    st.by_port.keys().filter(|(u, _)| *u == udp).map(|(_, p)| *p).collect();
                let reserved_by_others: HashSet<u16> = self
                    .reserved
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .ports
                    .iter()
                    .filter(|((u, _), t)| *u == udp && **t != owner.token)
                    .map(|((_, p), _)| *p)
                    .collect();
                let fixed = match req.remote_port {
                    Some(p) if reserved_by_others.contains(&p) => Err(BindError::new(
                        ErrorCode::PortTaken,
                        format!("{} port {p} is reserved for another token", req.protocol),
                    )),
                    Some(p) if leased.contains(&p) => Err(BindError::new(
                        ErrorCode::PortTaken,
                        format!("{} port {p} is leased to another tunnel", req.protocol),
                    )),
                    Some(p) => self.pool.bind(p, udp).map(|l| (p, l)).map_err(pool_error),
                    None => Err(BindError::new(ErrorCode::Internal, "")),
                };
                leased.extend(reserved_by_others);
                let (p, l) = match fixed {
                    Ok(ok) => ok,
                    Err(e) if req.remote_port.is_some() && !req.sticky => return Err(e),
                    Err(e) => {
                        let got = self.pool.bind_any(&leased, udp).map_err(pool_error)?;
                        if req.remote_port.is_some() {
                            notice = format!("{}; got port {} instead", e.message, got.0);
                        }
                        got
                    }
                };
                (None, Some(p), Some(l))
            }
            _ => return Err(BindError::new(ErrorCode::InvalidRequest, "unsupported protocol")),
        };

        let (live_tx, live_rx) = watch::channel(Some(live));
        let listener = listener.map(|l| (self.spawn_listener)(l, live_rx));
        if let Some(s) = &subdomain {
            st.by_sub.insert(s.clone(), key.clone());
        }
        if let Some(p) = port {
            st.by_port.insert((req.protocol == Protocol::Udp, p), key.clone());
        }
        st.entries.insert(
            key.clone(),
            Entry {
                protocol: req.protocol,
                stats,
                subdomain: subdomain.clone(),
                port,
                live: live_tx,
                offline_since: None,
                _listener: listener,
            },
        );
        st.journal_put(&key, None);
        Ok(Bound {
            req: req.req,
            tunnel: id,
            url: self.url(req.protocol, subdomain.as_ref(), port),
            subdomain,
            remote_port: port,
            notice,
        })
    }

    /// Closes a tunnel of this session and releases its lease at once.
    pub fn unbind(&self, owner: &Owner, session_id: u64, tunnel: TunnelId) -> bool {
        self.change(|st| {
            let key = st.entries.iter().find_map(|(k, e)| {
                let live = e.live.borrow();
                let ours =
                    live.as_ref().is_some_and(|l| l.session_id == session_id && l.tunnel == tunnel);
                (ours && k.0 == *owner).then(|| k.clone())
            });
            match key {
                Some(k) => {
                    remove(st, &k);
                    true
                }
                None => false,
            }
        })
    }

    /// Marks every tunnel still served by this session offline; their leases start to run out.
    pub fn session_ended(&self, session_id: u64) {
        let until = crate::util::unix_now()
            .saturating_add(i64::try_from(self.grace.as_secs()).unwrap_or(i64::MAX));
        self.change(|st| {
            let now = Instant::now();
            let mut gone = Vec::new();
            for (key, entry) in &mut st.entries {
                let ours = entry.live.borrow().as_ref().is_some_and(|l| l.session_id == session_id);
                if ours {
                    entry.live.send_replace(None);
                    entry.offline_since = Some(now);
                    gone.push(key.clone());
                }
            }
            for key in &gone {
                st.journal_put(key, Some(until));
            }
        });
    }

    /// Releases leases whose grace period has run out; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let due = |e: &Entry| e.offline_since.is_some_and(|t| now.duration_since(t) >= self.grace);
        if !self.lock().entries.values().any(due) {
            // The common case, every second: nothing to write, so no need to wait for writers.
            return 0;
        }
        self.change(|st| {
            let expired: Vec<LeaseKey> =
                st.entries.iter().filter(|(_, e)| due(e)).map(|(k, _)| k.clone()).collect();
            for k in &expired {
                tracing::info!(agent = %k.0.agent, tunnel = %k.1, "lease expired");
                remove(st, k);
            }
            expired.len()
        })
    }

    /// The route for a subdomain: an HTTP or a TLS tunnel.
    pub fn named_route(&self, sub: &str) -> Option<(Protocol, Route)> {
        let sub = Subdomain::parse(sub).ok()?;
        let st = self.lock();
        let key = st.by_sub.get(&sub)?;
        let entry = st.entries.get(key)?;
        let live = entry.live.borrow().clone();
        Some((
            entry.protocol,
            match live {
                Some(l) => Route::Live(l),
                None => Route::Offline(key.1.clone()),
            },
        ))
    }

    /// The route for an HTTP host's subdomain (TLS tunnels are not served over HTTP).
    pub fn http_route(&self, sub: &str) -> Option<Route> {
        match self.named_route(sub)? {
            (Protocol::Http, route) => Some(route),
            _ => None,
        }
    }

    /// Ends the lease of `owner`'s tunnel `name` at once; its serving session is told with
    /// `TunnelClosed` code `Removed`. False if there was no such lease.
    pub fn remove_lease(&self, owner: &Owner, name: &TunnelName, why: &str) -> bool {
        let key = (owner.clone(), name.clone());
        let removed = self.change(|st| {
            let live = st.entries.get(&key).map(|e| e.live.borrow().clone());
            if live.is_some() {
                remove(st, &key);
            }
            live
        });
        let Some(live) = removed else { return false };
        if let Some(l) = live {
            let _ = l.notify.try_send(Message::TunnelClosed {
                tunnel: l.tunnel,
                code: ErrorCode::Removed,
                message: why.to_owned(),
            });
        }
        true
    }

    /// Every tunnel, for the API.
    pub fn tunnels(&self) -> Vec<TunnelView> {
        let st = self.lock();
        st.entries
            .iter()
            .map(|((owner, name), e)| TunnelView {
                owner: owner.clone(),
                name: name.clone(),
                protocol: e.protocol,
                url: self.url(e.protocol, e.subdomain.as_ref(), e.port),
                session_id: e.live.borrow().as_ref().map(|l| l.session_id),
                stats: e.stats.clone(),
            })
            .collect()
    }

    /// Live and offline tunnel counts.
    pub fn stats(&self) -> RouterStats {
        let st = self.lock();
        let live = st.entries.values().filter(|e| e.live.borrow().is_some()).count();
        RouterStats { live, offline: st.entries.len() - live }
    }
}

/// Tells the session that served a tunnel, if another one did, that a newer session of the same
/// agent took it over, and from where: that agent stops rather than serve nothing.
fn tell_replaced(previous: Option<Live>, name: &TunnelName, owner: &Owner, ctx: &SessionCtx) {
    if let Some(old) = previous.filter(|o| o.session_id != ctx.session_id) {
        let _ = old.notify.try_send(Message::TunnelClosed {
            tunnel: old.tunnel,
            code: ErrorCode::Replaced,
            message: format!(
                "tunnel {name} was taken over by a newer session of agent {} from {}",
                owner.agent,
                ctx.session.remote_addr()
            ),
        });
    }
}

fn remove(st: &mut State, key: &LeaseKey) {
    if let Some(e) = st.entries.remove(key) {
        if let Some(s) = e.subdomain {
            st.by_sub.remove(&s);
        }
        if let Some(p) = e.port {
            st.by_port.remove(&(e.protocol == Protocol::Udp, p));
        }
        st.journal.push(LeaseOp::Release(key.clone()));
    }
}

/// Writes lease changes in order, each run of puts or releases as one write. A failed write is
/// logged, not fatal: the tunnels keep being served, only a restart would forget those leases.
fn persist(store: &dyn LeaseStore, ops: Vec<LeaseOp>) {
    let mut puts = Vec::new();
    let mut releases = Vec::new();
    let report = |r: Result<(), StoreError>| {
        if let Err(e) = r {
            tracing::warn!(
                error = %e,
                "cannot write leases to the store; a relay restart would forget them"
            );
        }
    };
    for op in ops {
        match op {
            LeaseOp::Put(l) => {
                if !releases.is_empty() {
                    report(store.release(&std::mem::take(&mut releases)));
                }
                puts.push(l);
            }
            LeaseOp::Release(k) => {
                if !puts.is_empty() {
                    report(store.put(&std::mem::take(&mut puts)));
                }
                releases.push(k);
            }
        }
    }
    if !puts.is_empty() {
        report(store.put(&puts));
    }
    if !releases.is_empty() {
        report(store.release(&releases));
    }
}

fn pool_error(e: PoolError) -> BindError {
    let code = match e {
        PoolError::OutOfRange { .. } => ErrorCode::PortOutOfRange,
        PoolError::InUse(_) => ErrorCode::PortTaken,
        PoolError::Exhausted(_) => ErrorCode::PortPoolExhausted,
        PoolError::Bind { .. } => ErrorCode::Internal,
    };
    BindError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use warren_proto::AgentId;

    /// A router writing through to `store`; no tunnel in these tests needs a pool port.
    fn router(grace: Duration, store: Arc<Store>) -> Router {
        let pool = PortPool::new("127.0.0.1:1-1".parse().unwrap());
        let spawn: ListenerSpawner = Box::new(|_, _| unreachable!("no pool port in these tests"));
        Router::new("localhost".into(), 80, pool, grace, spawn).with_lease_store(store)
    }

    #[test]
    fn stored_leases_are_held_one_grace_from_the_start_then_expire() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let owner = Owner { token: TokenId([1; 8]), agent: AgentId::parse("laptop").unwrap() };
        let name = TunnelName::parse("web").unwrap();
        store
            .put(&[StoredLease {
                key: (owner.clone(), name.clone()),
                protocol: Protocol::Http,
                subdomain: Some(Subdomain::parse("shop").unwrap()),
                port: None,
                offline_until: Some(0),
            }])
            .unwrap();
        let grace = Duration::from_secs(60);
        let r = router(grace, store.clone());
        let before = Instant::now();
        assert_eq!(r.restore().unwrap(), 1);
        assert_eq!(r.holder(Some("shop"), None), Some(owner.token));
        assert!(matches!(r.http_route("shop"), Some(Route::Offline(n)) if n == name));
        assert_eq!(r.stats(), RouterStats { live: 0, offline: 1 });
        // Held from the start, whenever it went offline before.
        assert_ne!(store.load().unwrap()[0].offline_until, Some(0));
        assert_eq!(r.expire(before + grace - Duration::from_secs(1)), 0);
        assert_eq!(r.expire(Instant::now() + grace), 1);
        assert_eq!(r.holder(Some("shop"), None), None);
        assert!(store.load().unwrap().is_empty(), "an expired lease stays in the store");
    }

    #[test]
    fn a_router_without_a_store_restores_nothing() {
        let pool = PortPool::new("127.0.0.1:1-1".parse().unwrap());
        let spawn: ListenerSpawner = Box::new(|_, _| unreachable!("no pool port in these tests"));
        let r = Router::new("localhost".into(), 80, pool, Duration::from_secs(1), spawn);
        assert_eq!(r.restore().unwrap(), 0);
        assert_eq!(r.stats(), RouterStats { live: 0, offline: 0 });
    }
}

//! The relay's REST API (`/api/v1`, JSON) and its Prometheus metrics (`/metrics`).
//!
//! Callers authenticate with `Authorization: Bearer TOKEN`. The admin token manages everything;
//! an agent token sees only its own agents and tunnels and may not manage tokens. Every error is
//! `{"error": {"code": "...", "message": "..."}}` with a fitting status. The OpenAPI document
//! at `/api/v1/openapi.json` describes exactly the routes below; a test checks both agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_proto::ErrorCode;
use warren_proto::message::Token;

use crate::auth::{Accepted, AdminToken, TokenId, digest};
use crate::registry::SessionInfo;
use crate::router::ReservedIndex;
use crate::router::TunnelView;
use crate::session::Shared;
use crate::store::{
    ForwardRecord, Reservation, Reserved, Store, StoreError, TokenLimits, TokenRecord,
};
use crate::util::{random_alnum, rfc3339, unix_now};
use warren_web::guard::bearer;

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The relay's sessions, router and tokens.
    pub shared: Arc<Shared>,
    /// Tokens created through the API.
    pub store: Arc<Store>,
    /// The admin token.
    pub admin: AdminToken,
    /// A token for `/metrics` only.
    pub metrics: Option<AdminToken>,
    /// Hosts, origins, bodies and failed tokens, before any route.
    pub guard: warren_web::guard::ApiGuard,
    /// How often traffic is sampled into the history.
    pub stats_interval: std::time::Duration,
}

/// An API error: status, a stable code for programs and a sentence for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(name) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a token named {name:?} exists already"),
            ),
            StoreError::Taken(what) => {
                Self::new(StatusCode::CONFLICT, "conflict", format!("{what} is reserved already"))
            }
            other => {
                tracing::warn!(error = %other, "store error in the API");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed")
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who is calling.
enum Caller {
    Admin,
    Agent(Accepted),
}

impl Caller {
    /// Whether the caller may see things of `token`.
    fn sees(&self, token: TokenId) -> bool {
        match self {
            Self::Admin => true,
            Self::Agent(a) => a.id == token,
        }
    }
}

fn caller(state: &ApiState, headers: &HeaderMap) -> ApiResult<Caller> {
    let presented = bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer TOKEN` (the admin token, or an agent token)",
        )
    })?;
    if state.admin.matches(presented) {
        return Ok(Caller::Admin);
    }
    match state.shared.auth.check(&Token::new(presented)) {
        Some(a) => Ok(Caller::Agent(a)),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this token is not accepted by the relay",
        )),
    }
}

fn admin_only(state: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    match caller(state, headers)? {
        Caller::Admin => Ok(()),
        Caller::Agent(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the admin token may manage tokens",
        )),
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", get(get_token).delete(revoke_token))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{id}", get(get_agent).delete(disconnect_agent))
        .route("/api/v1/tunnels", get(list_tunnels))
        .route("/api/v1/tunnels/{id}", get(get_tunnel))
        .route("/api/v1/reservations", get(list_reservations).post(create_reservation))
        .route("/api/v1/reservations/{id}", axum::routing::delete(delete_reservation))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/forwards", get(list_forwards).post(create_forward))
        .route("/api/v1/forwards/{id}", get(get_forward).delete(delete_forward))
        .route("/api/v1/networks", get(list_networks).post(create_network))
        .route("/api/v1/networks/{name}", get(get_network).delete(delete_network))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/api/v1/events", get(events))
        .route("/", get(|| async { page("relay.html") }))
        .route("/static/{file}", get(|Path(file): Path<String>| async move { page(&file) }))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        })
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: CancellationToken) {
    let app = state.guard.wrap(router(state.clone()));
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "API server ended with an error");
    }
}

/// Server-sent events: `agents`, `tunnels`, `forwards` or `tokens` when those change, so a
/// dashboard reloads what it shows.
async fn events(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    caller(&st, &headers)?;
    let rx = st.shared.registry.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(what) => {
                    let ev = Event::default().event(what).data(what);
                    return Some((Ok::<_, std::convert::Infallible>(ev), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// A dashboard file, or the API's 404.
pub fn page(name: &str) -> Response {
    match warren_web::get(name) {
        Some(a) => ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response(),
        None => ApiError::not_found("file").into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "created_at": rfc3339(t.created_at),
        "revoked_at": t.revoked_at.map(rfc3339),
        "max_tunnels": t.limits.max_tunnels,
        "max_connections": t.limits.max_connections,
    })
}

async fn list_tokens(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    admin_only(&st, &headers)?;
    let tokens: Vec<Value> = st.store.list_tokens()?.iter().map(token_json).collect();
    Ok(Json(json!({ "tokens": tokens })))
}

async fn get_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    admin_only(&st, &headers)?;
    let t = st.store.token(&id)?.ok_or_else(|| ApiError::not_found("token"))?;
    Ok(Json(token_json(&t)))
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    max_tunnels: Option<u32>,
    max_connections: Option<u32>,
}

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// A request body as JSON, whatever `Content-Type` says (so `curl -d` works as is): bytes that
/// are not JSON give 400, JSON of the wrong shape 422.
async fn body<T: serde::de::DeserializeOwned>(body: axum::body::Body) -> ApiResult<T> {
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request bodies are at most {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("not JSON: {e}")),
    })
}

async fn create_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    payload: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    admin_only(&st, &headers)?;
    let req: CreateToken = body(payload).await?;
    let name = req.name.trim();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._- ".contains(&b));
    if !name_ok {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "name must be 1-64 characters: letters, digits, space, '.', '_' or '-'",
        ));
    }
    if req.max_tunnels == Some(0) || req.max_connections == Some(0) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "limits must be at least 1 (leave them out for no limit)",
        ));
    }
    let secret = format!("wt_{}", random_alnum(40));
    let limits = TokenLimits { max_tunnels: req.max_tunnels, max_connections: req.max_connections };
    let record = st.store.create_token(name, digest(&secret), limits, unix_now())?;
    tracing::info!(id = %record.id, name = %record.name, "token created through the API");
    st.shared.registry.changed("tokens");
    let mut out = token_json(&record);
    out["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

async fn revoke_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    admin_only(&st, &headers)?;
    let t = st.store.revoke_token(&id, unix_now())?.ok_or_else(|| ApiError::not_found("token"))?;
    let ended = st.shared.registry.end_token(&t.id, "the token was revoked");
    tracing::info!(id = %t.id, sessions_ended = ended, "token revoked through the API");
    st.shared.registry.changed("tokens");
    let mut out = token_json(&t);
    out["sessions_ended"] = json!(ended);
    Ok(Json(out))
}

fn agent_json(s: &SessionInfo, tunnels: usize) -> Value {
    json!({
        "id": s.id.to_string(),
        "agent_id": s.agent.as_str(),
        "token": s.token.to_string(),
        "token_id": s.api_token,
        "addr": s.addr.to_string(),
        "transport": s.transport.to_string(),
        "version": s.version,
        "connected_since": rfc3339(s.since),
        "tunnels": tunnels,
    })
}

fn tunnels_of(views: &[TunnelView], session: u64) -> usize {
    views.iter().filter(|t| t.session_id == Some(session)).count()
}

async fn list_agents(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let views = st.shared.router.tunnels();
    let agents: Vec<Value> = st
        .shared
        .registry
        .list()
        .iter()
        .filter(|s| who.sees(s.token))
        .map(|s| agent_json(s, tunnels_of(&views, s.id)))
        .collect();
    Ok(Json(json!({ "agents": agents })))
}

fn session_for(st: &ApiState, who: &Caller, id: &str) -> ApiResult<SessionInfo> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| st.shared.registry.get(id))
        .filter(|s| who.sees(s.token))
        .ok_or_else(|| ApiError::not_found("agent session"))
}

async fn get_agent(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let s = session_for(&st, &who, &id)?;
    Ok(Json(agent_json(&s, tunnels_of(&st.shared.router.tunnels(), s.id))))
}

async fn disconnect_agent(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let who = caller(&st, &headers)?;
    let s = session_for(&st, &who, &id)?;
    st.shared.registry.end(s.id, ErrorCode::ShuttingDown, "disconnected through the relay's API");
    st.shared.registry.changed("agents");
    tracing::info!(session = s.id, agent = %s.agent, "agent disconnected through the API");
    Ok(StatusCode::NO_CONTENT)
}

/// A tunnel's id in the API: token, agent and tunnel name (none of which holds `:`).
fn tunnel_id(t: &TunnelView) -> String {
    format!("{}:{}:{}", t.owner.token, t.owner.agent, t.name)
}

fn tunnel_json(t: &TunnelView) -> Value {
    json!({
        "id": tunnel_id(t),
        "name": t.name.as_str(),
        "agent_id": t.owner.agent.as_str(),
        "token": t.owner.token.to_string(),
        "protocol": t.protocol.as_str(),
        "url": t.url,
        "status": if t.session_id.is_some() { "online" } else { "offline" },
        "session": t.session_id.map(|s| s.to_string()),
        "bytes_in": t.stats.bytes_in.load(Ordering::Relaxed),
        "bytes_out": t.stats.bytes_out.load(Ordering::Relaxed),
        "connections_open": t.stats.open.load(Ordering::Relaxed),
        "connections_total": t.stats.total.load(Ordering::Relaxed),
    })
}

async fn list_tunnels(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let mut views: Vec<TunnelView> =
        st.shared.router.tunnels().into_iter().filter(|t| who.sees(t.owner.token)).collect();
    views.sort_by_key(tunnel_id);
    let tunnels: Vec<Value> = views.iter().map(tunnel_json).collect();
    let all = st.shared.router.tunnels();
    let leased = |p: warren_proto::Protocol| all.iter().filter(|t| t.protocol == p).count();
    let range = st.shared.router.pool_range();
    Ok(Json(json!({
        "tunnels": tunnels,
        "pool": {
            "range": range.to_string(),
            "size": range.len(),
            "tcp_leased": leased(warren_proto::Protocol::Tcp),
            "udp_leased": leased(warren_proto::Protocol::Udp),
        },
    })))
}

async fn get_tunnel(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let t = st
        .shared
        .router
        .tunnels()
        .into_iter()
        .find(|t| who.sees(t.owner.token) && tunnel_id(t) == id)
        .ok_or_else(|| ApiError::not_found("tunnel"))?;
    Ok(Json(tunnel_json(&t)))
}

/// A per-tunnel metric: name, type, help, and how to read it.
type Series = (&'static str, &'static str, &'static str, fn(&TunnelView) -> u64);

/// `POST /api/v1/forwards`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateForward {
    agent: String,
    proto: String,
    target: String,
    subdomain: Option<String>,
    remote_port: Option<u16>,
}

fn forward_json(f: &ForwardRecord, url: Option<&str>) -> Value {
    json!({
        "id": f.id,
        "agent": f.agent,
        "token": f.token,
        "proto": f.proto,
        "target": f.target,
        "subdomain": f.subdomain,
        "remote_port": f.remote_port,
        "created_at": rfc3339(f.created_at),
        "url": url,
    })
}

/// The public URL a forward is served under now, if its agent is connected.
fn forward_url(st: &ApiState, f: &ForwardRecord) -> Option<String> {
    let name = crate::forwards::tunnel_name(&f.id)?;
    st.shared
        .router
        .tunnels()
        .into_iter()
        .find(|t| {
            t.name == name
                && t.owner.agent.as_str() == f.agent
                && t.owner.token.to_string() == f.token
        })
        .map(|t| t.url)
}

fn visible_forwards(st: &ApiState, who: &Caller) -> ApiResult<Vec<ForwardRecord>> {
    Ok(st
        .store
        .list_forwards()?
        .into_iter()
        .filter(|f| TokenId::parse_hex(&f.token).is_some_and(|t| who.sees(t)))
        .collect())
}

async fn list_forwards(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let all: Vec<Value> = visible_forwards(&st, &who)?
        .iter()
        .map(|f| forward_json(f, forward_url(&st, f).as_deref()))
        .collect();
    Ok(Json(json!({ "forwards": all })))
}

async fn get_forward(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let f = visible_forwards(&st, &who)?
        .into_iter()
        .find(|f| f.id == id)
        .ok_or_else(|| ApiError::not_found("forward"))?;
    Ok(Json(forward_json(&f, forward_url(&st, &f).as_deref())))
}

async fn create_forward(
    State(st): State<ApiState>,
    headers: HeaderMap,
    payload: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let who = caller(&st, &headers)?;
    let req: CreateForward = body(payload).await?;
    let Some(protocol) = crate::forwards::protocol(&req.proto) else {
        return Err(invalid(format!("proto {:?}: http, tcp, tls or udp", req.proto)));
    };
    let named = matches!(protocol, warren_proto::Protocol::Http | warren_proto::Protocol::Tls);
    if (named && req.remote_port.is_some()) || (!named && req.subdomain.is_some()) {
        return Err(invalid(format!(
            "a {} forward takes {}",
            req.proto,
            if named { "a subdomain, not a remote_port" } else { "a remote_port, not a subdomain" }
        )));
    }
    if let Some(s) = &req.subdomain {
        warren_proto::Subdomain::parse(s).map_err(|e| invalid(e.to_string()))?;
    }
    let target = req.target.trim();
    if target.is_empty() || target.len() > 255 || target.contains(char::is_whitespace) {
        return Err(invalid("target must be PORT or HOST:PORT on the agent's side"));
    }
    // The newest session of that agent the caller may see.
    let session = st
        .shared
        .registry
        .list()
        .into_iter()
        .rev()
        .find(|s| s.agent.as_str() == req.agent && who.sees(s.token))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "agent_offline",
                format!("agent {:?} is not connected (with a token you may use)", req.agent),
            )
        })?;
    let record = ForwardRecord {
        id: String::new(),
        token: session.token.to_string(),
        agent: req.agent.clone(),
        proto: req.proto.clone(),
        target: target.to_owned(),
        subdomain: req.subdomain.clone(),
        remote_port: req.remote_port,
        created_at: unix_now(),
    };
    let record = st.store.create_forward(record)?;
    match crate::forwards::open(&st.shared.router, &session.handle, &record).await {
        Ok(bound) => {
            tracing::info!(forward = %record.id, agent = %record.agent, url = %bound.url, "forward created through the API");
            st.shared.registry.changed("forwards");
            st.shared.registry.changed("tunnels");
            if let (Some(acme), Some(sub), warren_proto::Protocol::Http) =
                (&st.shared.acme, &bound.subdomain, protocol)
            {
                acme.ensure(&format!("{sub}.{}", st.shared.domain));
            }
            Ok((StatusCode::CREATED, Json(forward_json(&record, Some(&bound.url)))))
        }
        Err(e) => {
            let _ = st.store.delete_forward(&record.id);
            let status = if e.contains("taken") || e.contains("reserved") || e.contains("leased") {
                StatusCode::CONFLICT
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            Err(ApiError::new(status, "refused", e))
        }
    }
}

async fn delete_forward(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let who = caller(&st, &headers)?;
    let f = visible_forwards(&st, &who)?
        .into_iter()
        .find(|f| f.id == id)
        .ok_or_else(|| ApiError::not_found("forward"))?;
    st.store.delete_forward(&f.id)?;
    st.shared.registry.changed("forwards");
    if let (Some(token), Ok(agent)) =
        (TokenId::parse_hex(&f.token), warren_proto::AgentId::parse(&f.agent))
    {
        crate::forwards::close(&st.shared.router, &crate::router::Owner { token, agent }, &f);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The router's view of the stored reservations.
pub fn reserved_index(store: &Store) -> Result<ReservedIndex, StoreError> {
    let mut index = ReservedIndex::default();
    for r in store.list_reservations()? {
        let Some(token) = TokenId::parse_hex(&r.token) else {
            return Err(StoreError::Corrupt(format!(
                "reservation {}: bad token {:?}",
                r.id, r.token
            )));
        };
        match r.what {
            Reserved::Subdomain(s) => {
                index.subdomains.insert(s, token);
            }
            Reserved::Port { port, udp } => {
                index.ports.insert((udp, port), token);
            }
        }
    }
    Ok(index)
}

fn reservation_json(r: &Reservation) -> Value {
    let mut v = json!({ "id": r.id, "token": r.token, "created_at": rfc3339(r.created_at) });
    match &r.what {
        Reserved::Subdomain(s) => v["subdomain"] = json!(s),
        Reserved::Port { port, udp } => {
            v["port"] = json!(port);
            v["proto"] = json!(if *udp { "udp" } else { "tcp" });
        }
    }
    v
}

/// `POST /api/v1/reservations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReservation {
    token: Option<String>,
    subdomain: Option<String>,
    port: Option<u16>,
    proto: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
}

async fn list_reservations(
    State(st): State<ApiState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let all: Vec<Value> = st
        .store
        .list_reservations()?
        .iter()
        .filter(|r| TokenId::parse_hex(&r.token).is_some_and(|t| who.sees(t)))
        .map(reservation_json)
        .collect();
    Ok(Json(json!({ "reservations": all })))
}

async fn create_reservation(
    State(st): State<ApiState>,
    headers: HeaderMap,
    payload: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let who = caller(&st, &headers)?;
    let req: CreateReservation = body(payload).await?;
    let token = match (&who, req.token.as_deref()) {
        (Caller::Agent(a), None) => a.id,
        (Caller::Agent(a), Some(t)) => {
            let named = resolve_token(&st, t)?;
            if named != a.id {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "an agent token may reserve only for itself",
                ));
            }
            named
        }
        (Caller::Admin, Some(t)) => resolve_token(&st, t)?,
        (Caller::Admin, None) => {
            return Err(invalid("name the token to reserve for: \"token\": \"tok_…\""));
        }
    };
    let what = match (req.subdomain, req.port) {
        (Some(s), None) => {
            if req.proto.is_some() {
                return Err(invalid("\"proto\" goes with \"port\", not \"subdomain\""));
            }
            let sub = warren_proto::Subdomain::parse(&s).map_err(|e| invalid(e.to_string()))?;
            Reserved::Subdomain(sub.as_str().to_owned())
        }
        (None, Some(port)) => {
            let udp = match req.proto.as_deref() {
                None | Some("tcp") => false,
                Some("udp") => true,
                Some(other) => return Err(invalid(format!("proto {other:?}: tcp or udp"))),
            };
            let range = st.shared.router.pool_range();
            if !range.contains(port) {
                return Err(invalid(format!("port {port} is outside the relay's pool {range}")));
            }
            Reserved::Port { port, udp }
        }
        _ => return Err(invalid("give exactly one of \"subdomain\" and \"port\"")),
    };
    let holder = match &what {
        Reserved::Subdomain(s) => st.shared.router.holder(Some(s), None),
        Reserved::Port { port, udp } => st.shared.router.holder(None, Some((*udp, *port))),
    };
    if holder.is_some_and(|h| h != token) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "another token's tunnel holds it now; reserve it once that lease ends",
        ));
    }
    // An agent token is capped; the admin token may reserve past the cap, for any token.
    let cap = st.shared.router.caps().reservations_per_token;
    let limit = matches!(who, Caller::Agent(_)).then_some(cap);
    let r = match st.store.create_reservation(&token.to_string(), what, unix_now(), limit) {
        Err(StoreError::TooMany { held }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "limit_reached",
                format!(
                    "this token holds {held} reservation(s) and an agent token may hold {cap} \
                     (the relay's --max-reservations); delete one with DELETE \
                     /api/v1/reservations/ID, or ask the relay's operator, whose admin token may \
                     reserve past the cap"
                ),
            ));
        }
        r => r?,
    };
    st.shared.router.set_reserved(reserved_index(&st.store)?);
    Ok((StatusCode::CREATED, Json(reservation_json(&r))))
}

/// A token named by its API id (`tok_…`) or by its 16 hex digits.
fn resolve_token(st: &ApiState, t: &str) -> ApiResult<TokenId> {
    if t.starts_with("tok_") {
        let rec = st.store.token(t)?.ok_or_else(|| invalid(format!("no token {t}")))?;
        return Ok(TokenId::of(&rec.digest));
    }
    TokenId::parse_hex(t)
        .ok_or_else(|| invalid("token: an API token id (tok_…) or a token's 16 hex digits"))
}

/// `POST /api/v1/networks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateNetwork {
    name: String,
    subnet: Option<String>,
    mtu: Option<u16>,
    /// The account (a token: `tok_…` or its 16 hex digits); the admin must give it.
    token: Option<String>,
}

/// `?token=` naming the account, for the admin.
#[derive(Debug, Deserialize)]
struct AccountQuery {
    token: Option<String>,
}

impl From<crate::overlay::OverlayError> for ApiError {
    fn from(e: crate::overlay::OverlayError) -> Self {
        use crate::overlay::OverlayError as E;
        match &e {
            E::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            E::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            E::Invalid(_) => invalid(e.to_string()),
            E::Store(_) => {
                tracing::warn!(error = %e, "store error in the API");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the store failed")
            }
        }
    }
}

/// The account a request is about: the caller's own, or (admin) the one named.
fn account_of(
    st: &ApiState,
    who: &Caller,
    named: Option<&str>,
) -> ApiResult<Option<crate::overlay::Account>> {
    use crate::overlay::Account;
    match (who, named) {
        (Caller::Agent(a), None) => Ok(Some(Account::of(a.id))),
        (Caller::Agent(a), Some(t)) => {
            if resolve_token(st, t)? != a.id {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "an agent token sees only its own account's networks",
                ));
            }
            Ok(Some(Account::of(a.id)))
        }
        (Caller::Admin, Some(t)) => Ok(Some(Account::of(resolve_token(st, t)?))),
        (Caller::Admin, None) => Ok(None),
    }
}

async fn list_networks(
    State(st): State<ApiState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<AccountQuery>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let account = account_of(&st, &who, q.token.as_deref())?;
    let relay = &st.shared.overlays.counters;
    Ok(Json(json!({
        "networks": st.shared.overlays.list(account.as_ref()),
        "relay_path": {
            "frames": relay.frames.load(Ordering::Relaxed),
            "bytes": relay.bytes.load(Ordering::Relaxed),
            "dropped": relay.dropped.load(Ordering::Relaxed),
        },
    })))
}

/// The one network called `name` the caller may see.
fn one_network(
    st: &ApiState,
    who: &Caller,
    name: &str,
    named: Option<&str>,
) -> ApiResult<crate::overlay::NetworkView> {
    let account = account_of(st, who, named)?;
    let mut found: Vec<_> =
        st.shared.overlays.list(account.as_ref()).into_iter().filter(|n| n.name == name).collect();
    match found.len() {
        0 => Err(ApiError::not_found("overlay network")),
        1 => Ok(found.remove(0)),
        _ => Err(invalid(format!(
            "several accounts have a network named {name}: add ?token=TOKEN_ID"
        ))),
    }
}

async fn get_network(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AccountQuery>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    Ok(Json(json!(one_network(&st, &who, &name, q.token.as_deref())?)))
}

async fn create_network(
    State(st): State<ApiState>,
    headers: HeaderMap,
    payload: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let who = caller(&st, &headers)?;
    let req: CreateNetwork = body(payload).await?;
    let account = account_of(&st, &who, req.token.as_deref())?
        .ok_or_else(|| invalid("name the account: \"token\": \"tok_…\" (or its 16 hex digits)"))?;
    let name = warren_proto::Label::parse(&req.name).map_err(|e| invalid(e.to_string()))?;
    let subnet = match req.subnet.as_deref() {
        None => None,
        Some(s) => {
            let net: ipnet::Ipv4Net = s.parse().map_err(|_| {
                invalid(format!("subnet {s:?} is not an IPv4 CIDR such as 10.214.5.0/24"))
            })?;
            if net != net.trunc() {
                return Err(invalid(format!(
                    "subnet {net} has host bits set; did you mean {}?",
                    net.trunc()
                )));
            }
            warren_proto::overlay::Subnet::new(net.network(), net.prefix_len())
        }
    };
    let def = st.shared.overlays.create(&account, name, subnet, req.mtu)?;
    st.shared.registry.changed("networks");
    let view = one_network(&st, &Caller::Admin, def.name.as_str(), Some(account.as_str()))?;
    Ok((StatusCode::CREATED, Json(json!(view))))
}

async fn delete_network(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AccountQuery>,
) -> ApiResult<StatusCode> {
    let who = caller(&st, &headers)?;
    let n = one_network(&st, &who, &name, q.token.as_deref())?;
    let account = crate::overlay::Account::parse(&n.account)
        .ok_or_else(|| ApiError::not_found("overlay network"))?;
    let label = warren_proto::Label::parse(&n.name).map_err(|e| invalid(e.to_string()))?;
    st.shared.overlays.delete(&account, &label)?;
    st.shared.registry.changed("networks");
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_reservation(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let who = caller(&st, &headers)?;
    let mine = st
        .store
        .list_reservations()?
        .into_iter()
        .any(|r| r.id == id && TokenId::parse_hex(&r.token).is_some_and(|t| who.sees(t)));
    if !mine {
        return Err(ApiError::not_found("reservation"));
    }
    st.store.delete_reservation(&id)?;
    st.shared.router.set_reserved(reserved_index(&st.store)?);
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/stats?since=UNIX&tunnel=ID`.
#[derive(Debug, Deserialize)]
struct StatsQuery {
    since: Option<i64>,
    tunnel: Option<String>,
}

async fn stats(
    State(st): State<ApiState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let who = caller(&st, &headers)?;
    let q = query.map_err(|e| invalid(e.body_text()))?.0;
    let since = q.since.unwrap_or_else(|| unix_now() - 3600);
    let mut series: Vec<(String, Vec<Value>)> = Vec::new();
    for (tunnel, p) in st.store.traffic(since)? {
        let token = tunnel.split(':').next().and_then(TokenId::parse_hex);
        if !token.is_some_and(|t| who.sees(t)) || q.tunnel.as_ref().is_some_and(|w| *w != tunnel) {
            continue;
        }
        let point =
            json!({ "at": rfc3339(p.at), "bytes_in": p.bytes_in, "bytes_out": p.bytes_out });
        match series.last_mut() {
            Some((t, points)) if *t == tunnel => points.push(point),
            _ => series.push((tunnel, vec![point])),
        }
    }
    let tunnels: Vec<Value> =
        series.into_iter().map(|(t, points)| json!({ "tunnel": t, "points": points })).collect();
    Ok(Json(json!({
        "interval_secs": st.stats_interval.as_secs(),
        "since": rfc3339(since),
        "tunnels": tunnels,
    })))
}

/// Samples every tunnel's counters each `interval` into the store's traffic history (kept a
/// week), until `shutdown`.
pub async fn sample_traffic(state: ApiState, shutdown: CancellationToken) {
    let interval = state.stats_interval.max(std::time::Duration::from_secs(1));
    let mut last: std::collections::HashMap<String, (u64, u64)> = Default::default();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = unix_now();
        let step = interval.as_secs() as i64;
        let at = now - now.rem_euclid(step.max(1));
        for t in st_tunnels(&state) {
            let id = tunnel_id(&t);
            let (bi, bo) = (
                t.stats.bytes_in.load(Ordering::Relaxed),
                t.stats.bytes_out.load(Ordering::Relaxed),
            );
            let (pi, po) = last.insert(id.clone(), (bi, bo)).unwrap_or((0, 0));
            let (di, dout) = (bi.saturating_sub(pi), bo.saturating_sub(po));
            if (di > 0 || dout > 0)
                && let Err(e) = state.store.add_traffic(&id, at, di, dout)
            {
                tracing::warn!(error = %e, "cannot record traffic");
            }
        }
        let _ = state.store.prune_traffic(now - 7 * 86_400);
    }
}

fn st_tunnels(state: &ApiState) -> Vec<TunnelView> {
    state.shared.router.tunnels()
}

/// Prometheus text exposition of the relay's state.
async fn metrics(State(st): State<ApiState>, headers: HeaderMap) -> ApiResult<Response> {
    use std::fmt::Write;
    let presented = bearer(&headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer TOKEN`: the admin token or the --metrics-token",
        )
    })?;
    if !(st.admin.matches(presented) || st.metrics.as_ref().is_some_and(|m| m.matches(presented))) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "/metrics takes the admin token or the --metrics-token",
        ));
    }
    let views = st.shared.router.tunnels();
    let online = views.iter().filter(|t| t.session_id.is_some()).count();
    let mut out = String::new();
    let _ = writeln!(out, "# HELP warren_sessions Agent sessions connected now.");
    let _ = writeln!(out, "# TYPE warren_sessions gauge");
    let _ = writeln!(out, "warren_sessions {}", st.shared.registry.list().len());
    let _ =
        writeln!(out, "# HELP warren_tunnels Tunnels leased, by whether their agent is online.");
    let _ = writeln!(out, "# TYPE warren_tunnels gauge");
    let _ = writeln!(out, "warren_tunnels{{state=\"online\"}} {online}");
    let _ = writeln!(out, "warren_tunnels{{state=\"offline\"}} {}", views.len() - online);
    let series: [Series; 4] = [
        ("warren_tunnel_bytes_in_total", "counter", "Bytes from visitors to the agent.", |t| {
            t.stats.bytes_in.load(Ordering::Relaxed)
        }),
        ("warren_tunnel_bytes_out_total", "counter", "Bytes from the agent to visitors.", |t| {
            t.stats.bytes_out.load(Ordering::Relaxed)
        }),
        ("warren_tunnel_streams_open", "gauge", "Visitor streams open now.", |t| {
            t.stats.open.load(Ordering::Relaxed)
        }),
        ("warren_tunnel_streams_total", "counter", "Visitor streams opened.", |t| {
            t.stats.total.load(Ordering::Relaxed)
        }),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for t in &views {
            let _ = writeln!(
                out,
                "{name}{{tunnel=\"{}\",agent=\"{}\",protocol=\"{}\"}} {}",
                t.name,
                t.owner.agent,
                t.protocol,
                value(t)
            );
        }
    }
    crate::metrics::global().render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// Logs the API's stable `listening` line.
pub fn log_listening(addr: SocketAddr) {
    tracing::info!(name = %"api", addr = %addr, "listening");
}

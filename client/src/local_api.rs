//! The agent's local API (`127.0.0.1:4040` by default, the next free port when that one is
//! taken): the tunnels of this agent, listed, opened and closed while it runs. Shapes follow
//! ngrok's agent API (`/api/tunnels`, `public_url`, `config.addr`) so scripts written for it
//! adapt easily. `warren ls` and `warren stop` use it.
//!
//! Every route but the dashboard's page and files needs `Authorization: Bearer TOKEN` (see
//! [`crate::api_access`] for where the token lives and how the CLI finds it), and the whole API
//! sits behind [`warren_web::guard`]: loopback or `--api-host` names only, no foreign origins,
//! JSON bodies only, failed tokens slowed down per address.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use warren_proto::{Protocol, Subdomain, TunnelName};

use std::convert::Infallible;
use std::sync::Arc;

use crate::agent::{AgentHandle, Control, TunnelStatus};
use crate::inspect::{Captured, Exchange, Inspector, lock};
use crate::tunnel::{OPTION_KEYS, Target, TunnelSpec};

/// The default address of an agent's local API.
pub const DEFAULT_ADDR: &str = "127.0.0.1:4040";

/// How many ports after the asked one are tried when it is taken.
pub const PORT_TRIES: u16 = 10;

/// Binds `addr`, or, when its port is taken, the next free one of the following
/// [`PORT_TRIES`] (so several agents can run side by side).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for i in 0..=PORT_TRIES {
        let Some(port) = addr.port().checked_add(i) else { break };
        if addr.port() == 0 && i > 0 {
            break;
        }
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port to try")))
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": { "code": self.1, "message": self.2 } }))).into_response()
    }
}

fn tunnel_json(t: &TunnelStatus, traffic: &crate::agent::Traffic) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "metrics": {
            "bytes_in": traffic.bytes_in.load(Relaxed),
            "bytes_out": traffic.bytes_out.load(Relaxed),
            "conns_open": traffic.open.load(Relaxed),
            "conns_total": traffic.total.load(Relaxed),
        },
        "name": t.spec.name.as_str(),
        "uri": format!("/api/tunnels/{}", t.spec.name),
        "public_url": t.url,
        "proto": t.spec.protocol.as_str(),
        "config": { "addr": t.spec.target.to_string() },
        "forwarded": t.forwarded,
        "container": t.spec.container,
    })
}

/// The routes.
pub fn router(handle: AgentHandle) -> Router {
    Router::new()
        .route("/api/tunnels", get(list).post(create))
        .route("/api/tunnels/{name}", get(one).delete(remove))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { page("agent.html") }))
        .route("/static/{file}", get(|Path(file): Path<String>| async move { page(&file) }))
        .route("/api/requests/http", get(list_requests).post(replay_request).delete(clear_requests))
        .route("/api/requests/http/{id}", get(one_request))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(handle)
}

/// Who may use the API, and under which host names.
#[derive(Clone)]
pub struct Access {
    token: Arc<str>,
    guard: warren_web::guard::ApiGuard,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("token", &"<redacted>").finish_non_exhaustive()
    }
}

impl Access {
    /// Requires `token`; answers loopback names, `bound`'s address and `hosts`.
    pub fn new(token: String, bound: SocketAddr, hosts: Vec<String>) -> Self {
        let throttle = Arc::new(warren_web::throttle::AuthThrottle::new());
        Self {
            token: token.into(),
            guard: warren_web::guard::ApiGuard::new(bound, hosts, throttle),
        }
    }
}

/// The dashboard's page and files are open; everything else needs the token.
async fn require_token(
    State(access): State<Access>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let open = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && (path == "/" || path.starts_with("/static/"));
    if open {
        return next.run(req).await;
    }
    let presented = warren_web::guard::bearer(req.headers());
    let ok = presented.is_some_and(|t| {
        use subtle::ConstantTimeEq;
        t.len() == access.token.len() && bool::from(t.as_bytes().ct_eq(access.token.as_bytes()))
    });
    if ok {
        return next.run(req).await;
    }
    let message = if presented.is_some() {
        "this token is not the agent's API token"
    } else {
        "send `Authorization: Bearer TOKEN`: the agent's API token (CONFIG_DIR/api-token, or \
         --api-token); `warren ls` and the other commands send it themselves"
    };
    let mut resp =
        ApiError(StatusCode::UNAUTHORIZED, "unauthorized", message.into()).into_response();
    resp.headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    resp
}

/// Serves the API until `shutdown`;
/// `networks` serves `/api/networks` (see [`crate::net::api`]).
pub async fn serve(
    listener: TcpListener,
    handle: AgentHandle,
    networks: Router,
    access: Access,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        handle.state.set_api_addr(addr);
    }
    let app = networks
        .merge(router(handle))
        .layer(axum::middleware::from_fn_with_state(access.clone(), require_token));
    let app = access.guard.wrap(app);
    if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::warn!(error = %e, "local API ended with an error");
    }
}

async fn list(State(h): State<AgentHandle>) -> Json<Value> {
    let tunnels: Vec<Value> =
        h.state.tunnels().iter().map(|t| tunnel_json(t, &h.state.traffic(&t.spec.name))).collect();
    Json(json!({ "tunnels": tunnels, "uri": "/api/tunnels" }))
}

async fn status(State(h): State<AgentHandle>) -> Json<Value> {
    Json(json!({
        "connected": h.state.connected(),
        "relay": !h.state.no_relay(),
        "tunnels": h.state.tunnels().len(),
    }))
}

fn find(h: &AgentHandle, name: &str) -> Result<TunnelStatus, ApiError> {
    h.state
        .tunnels()
        .into_iter()
        .find(|t| t.spec.name.as_str() == name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no tunnel {name}")))
}

async fn one(
    State(h): State<AgentHandle>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = find(&h, &name)?;
    Ok(Json(tunnel_json(&t, &h.state.traffic(&t.spec.name))))
}

async fn remove(
    State(h): State<AgentHandle>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = TunnelName::parse(&name)
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no tunnel {name}")))?;
    if h.state.tunnels().iter().any(|t| t.spec.name == name && t.forwarded) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "forward",
            format!(
                "{name} is a forward of the relay's API; delete it there (DELETE /api/v1/forwards/ID)"
            ),
        ));
    }
    let (tx, rx) = oneshot::channel();
    let gone = match h.control.send(Control::Remove(name.clone(), tx)).await {
        Ok(()) => tokio::time::timeout(Duration::from_secs(10), rx).await.ok().and_then(Result::ok),
        Err(_) => None,
    };
    match gone {
        Some(true) => Ok(StatusCode::NO_CONTENT),
        Some(false) => {
            Err(ApiError(StatusCode::NOT_FOUND, "not_found", format!("no tunnel {name}")))
        }
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the agent did not answer in time".into(),
        )),
    }
}

/// Prometheus text: the session, and traffic and requests per tunnel.
async fn metrics(State(h): State<AgentHandle>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP warren_agent_connected Whether a session to the relay is up.");
    let _ = writeln!(out, "# TYPE warren_agent_connected gauge");
    let _ = writeln!(out, "warren_agent_connected {}", u8::from(h.state.connected()));
    let tunnels = h.state.tunnels();
    let _ = writeln!(out, "# HELP warren_agent_tunnels Tunnels served or to be served.");
    let _ = writeln!(out, "# TYPE warren_agent_tunnels gauge");
    let _ = writeln!(out, "warren_agent_tunnels {}", tunnels.len());
    type Read = fn(&crate::agent::Traffic) -> u64;
    let series: [(&str, &str, Read); 4] = [
        ("warren_agent_tunnel_bytes_in_total", "counter", |t| t.bytes_in.load(Relaxed)),
        ("warren_agent_tunnel_bytes_out_total", "counter", |t| t.bytes_out.load(Relaxed)),
        ("warren_agent_tunnel_streams_open", "gauge", |t| t.open.load(Relaxed)),
        ("warren_agent_tunnel_streams_total", "counter", |t| t.total.load(Relaxed)),
    ];
    for (name, kind, read) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for t in &tunnels {
            let traffic = h.state.traffic(&t.spec.name);
            let _ = writeln!(out, "{name}{{tunnel=\"{}\"}} {}", t.spec.name, read(&traffic));
        }
    }
    if let Some(i) = h.state.inspector() {
        let usage = i.usage();
        let _ =
            writeln!(out, "# HELP warren_agent_requests_kept HTTP exchanges the inspector keeps.");
        let _ = writeln!(out, "# TYPE warren_agent_requests_kept gauge");
        let _ = writeln!(out, "warren_agent_requests_kept {}", usage.kept);
        let _ =
            writeln!(out, "# HELP warren_agent_requests_kept_bytes Bytes those exchanges hold.");
        let _ = writeln!(out, "# TYPE warren_agent_requests_kept_bytes gauge");
        let _ = writeln!(out, "warren_agent_requests_kept_bytes {}", usage.bytes);
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A dashboard file.
fn page(name: &str) -> Response {
    match warren_web::get(name) {
        Some(a) => ([(axum::http::header::CONTENT_TYPE, a.content_type)], a.body).into_response(),
        None => {
            ApiError(StatusCode::NOT_FOUND, "not_found", format!("no file {name}")).into_response()
        }
    }
}

/// Server-sent events for the dashboard: `request` (with the exchange's id) as the inspector
/// keeps one.
async fn events(State(h): State<AgentHandle>) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = inspector(&h)?.events.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(id) => {
                    return Some((
                        Ok::<_, Infallible>(Event::default().event("request").data(id)),
                        rx,
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

fn inspector(h: &AgentHandle) -> Result<Arc<Inspector>, ApiError> {
    h.state
        .inspector()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", "the inspector is off".into()))
}

fn headers_json(h: &crate::inspect::Heads) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in h.iter() {
        let v = Value::String(String::from_utf8_lossy(v).into_owned());
        match out.get_mut(k) {
            Some(Value::Array(a)) => a.push(v),
            _ => {
                out.insert(k.to_owned(), Value::Array(vec![v]));
            }
        }
    }
    Value::Object(out)
}

fn body_json(c: &Captured) -> Value {
    use base64::Engine;
    let truncated = c.size > c.bytes.len() as u64;
    let mut v = json!({ "size": c.size, "truncated": truncated, "complete": c.complete });
    match std::str::from_utf8(&c.bytes) {
        Ok(text) => v["text"] = json!(text),
        Err(_) => v["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&c.bytes)),
    }
    v
}

fn exchange_json(e: &Exchange, full: bool) -> Value {
    let response = lock(&e.response);
    let secs = (e.started_ms / 1000) as i64;
    let start = format!(
        "{}.{:03}Z",
        warren_server::util::rfc3339(secs).trim_end_matches('Z'),
        e.started_ms % 1000
    );
    let mut v = json!({
        "id": e.id,
        "uri": format!("/api/requests/http/{}", e.id),
        "tunnel_name": e.tunnel,
        "start": start,
        "replay_of": e.replay_of,
        "error": lock(&e.error).clone(),
        "request": { "method": e.method.as_str(), "uri": e.uri, "proto": format!("{:?}", e.version) },
        "response": response.as_ref().map(|r| json!({
            "status_code": r.status.as_u16(),
            "status": r.status.to_string(),
            "duration_us": r.duration_us,
        })),
    });
    if full {
        v["request"]["headers"] = headers_json(&e.request_headers);
        v["request"]["body"] = body_json(&lock(&e.request_body));
        if let Some(r) = response.as_ref() {
            v["response"]["headers"] = headers_json(&r.headers);
            v["response"]["body"] = body_json(&lock(&e.response_body));
        }
    }
    v
}

/// `GET /api/requests/http?tunnel_name=&status=&path=&limit=&before=`.
#[derive(Debug, serde::Deserialize)]
struct RequestQuery {
    tunnel_name: Option<String>,
    status: Option<u16>,
    path: Option<String>,
    limit: Option<usize>,
    before: Option<String>,
}

async fn list_requests(
    State(h): State<AgentHandle>,
    query: Result<axum::extract::Query<RequestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query.map_err(|e| invalid(e.body_text()))?.0;
    let insp = inspector(&h)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let all = insp.list();
    let start = match &q.before {
        Some(id) => all.iter().position(|e| e.id == *id).map_or(all.len(), |i| i + 1),
        None => 0,
    };
    let picked: Vec<Value> = all[start..]
        .iter()
        .filter(|e| q.tunnel_name.as_ref().is_none_or(|t| e.tunnel == *t))
        .filter(|e| {
            q.status
                .is_none_or(|s| lock(&e.response).as_ref().is_some_and(|r| r.status.as_u16() == s))
        })
        .filter(|e| q.path.as_ref().is_none_or(|p| e.uri.starts_with(p.as_str())))
        .take(limit)
        .map(|e| exchange_json(e, false))
        .collect();
    let (usage, limits) = (insp.usage(), insp.limits());
    Ok(Json(json!({
        "requests": picked,
        "uri": "/api/requests/http",
        "inspector": {
            "kept": usage.kept,
            "bytes": usage.bytes,
            "max_requests": limits.max_requests,
            "max_bytes": limits.max_bytes,
            "body_limit": limits.body_limit(),
        },
    })))
}

async fn one_request(
    State(h): State<AgentHandle>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let e = inspector(&h)?
        .get(&id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no request {id}")))?;
    Ok(Json(exchange_json(&e, true)))
}

async fn clear_requests(State(h): State<AgentHandle>) -> Result<StatusCode, ApiError> {
    inspector(&h)?.clear();
    Ok(StatusCode::NO_CONTENT)
}

async fn replay_request(
    State(h): State<AgentHandle>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_request", format!("not JSON: {e}")))?;
    let id = body["id"].as_str().ok_or_else(|| invalid("id: the request to replay"))?;
    let insp = inspector(&h)?;
    let original = insp
        .get(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no request {id}")))?;
    let spec = h
        .state
        .tunnels()
        .into_iter()
        .find(|t| t.spec.name.as_str() == original.tunnel)
        .ok_or_else(|| invalid(format!("tunnel {} is gone", original.tunnel)))?
        .spec;
    let m = &body["modify"];
    let method = match m["method"].as_str() {
        Some(s) => {
            Some(http::Method::from_bytes(s.as_bytes()).map_err(|_| invalid("modify.method"))?)
        }
        None => None,
    };
    let path = m["path"].as_str().map(str::to_owned);
    let mut headers = Vec::new();
    if let Some(obj) = m["headers"].as_object() {
        for (k, v) in obj {
            match v {
                Value::Null => headers.push((k.clone(), None)),
                Value::String(s) => headers.push((k.clone(), Some(s.clone()))),
                _ => return Err(invalid("modify.headers: values are strings, or null to remove")),
            }
        }
    }
    let new_body = match &m["body"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone().into_bytes()),
        _ => return Err(invalid("modify.body: a string")),
    };
    let ex = crate::inspect::replay(&insp, &spec, &original, method, path, headers, new_body)
        .await
        .map_err(invalid)?;
    Ok((StatusCode::CREATED, Json(exchange_json(&ex, true))))
}

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m.into())
}

/// A tunnel from a `POST /api/tunnels` body: `name`, `proto`, `addr`, and the same options as
/// the config file (`subdomain`, `hostname`, `remote_port`, `basic_auth`, ...).
fn spec_from(body: &Value) -> Result<TunnelSpec, ApiError> {
    let obj = body.as_object().ok_or_else(|| invalid("the body must be a JSON object"))?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str);
    let protocol = match text("proto") {
        Some("http") => Protocol::Http,
        Some("tcp") => Protocol::Tcp,
        Some("tls") => Protocol::Tls,
        Some("udp") => Protocol::Udp,
        other => return Err(invalid(format!("proto {other:?}: http, tcp, tls or udp"))),
    };
    let addr = match obj.get("addr") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(invalid("addr: PORT or HOST:PORT of the local service")),
    };
    let target: Target = addr.parse().map_err(invalid)?;
    let name =
        text("name").map(TunnelName::parse).transpose().map_err(|e| invalid(e.to_string()))?;
    let mut spec = TunnelSpec::unnamed(protocol, target);
    for (k, v) in obj {
        match k.as_str() {
            "name" | "proto" | "addr" => {}
            "subdomain" => {
                let s = v.as_str().ok_or_else(|| invalid("subdomain must be a string"))?;
                spec.subdomain = Some(Subdomain::parse(s).map_err(|e| invalid(e.to_string()))?);
            }
            "hostname" => {
                spec.hostname =
                    Some(v.as_str().ok_or_else(|| invalid("hostname must be a string"))?.to_owned())
            }
            "remote_port" => {
                let p = v.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0);
                spec.remote_port =
                    Some(p.ok_or_else(|| invalid("remote_port must be a port number"))?);
            }
            key if OPTION_KEYS.contains(&key) => {
                let values: Vec<String> = match v {
                    Value::Array(items) => items.iter().map(scalar).collect::<Option<_>>(),
                    other => scalar(other).map(|s| vec![s]),
                }
                .ok_or_else(|| {
                    invalid(format!("{key}: a string, number, boolean or list of strings"))
                })?;
                for value in values {
                    spec.apply(key, &value).map_err(|e| invalid(format!("{key}: {e}")))?;
                }
            }
            other => return Err(invalid(format!("unknown field {other:?}"))),
        }
    }
    spec.name_or_default(name);
    spec.check().map_err(invalid)?;
    Ok(spec)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

async fn create(
    State(h): State<AgentHandle>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_request", format!("not JSON: {e}")))?;
    let spec = spec_from(&body)?;
    if h.state.is_own_api(&spec.target) {
        return Err(invalid(format!(
            "addr {}: that is this agent's own local API, which is never published",
            spec.target
        )));
    }
    let (tx, rx) = oneshot::channel();
    h.control.send(Control::Add(Box::new(spec.clone()), tx)).await.map_err(|_| {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the agent is stopping".into())
    })?;
    match tokio::time::timeout(Duration::from_secs(15), rx).await {
        Ok(Ok(Ok(url))) => {
            let traffic = h.state.traffic(&spec.name);
            let t = TunnelStatus { spec: std::sync::Arc::new(spec), url, forwarded: false };
            Ok((StatusCode::CREATED, Json(tunnel_json(&t, &traffic))))
        }
        Ok(Ok(Err(e))) if e.contains("exists") => {
            Err(ApiError(StatusCode::CONFLICT, "conflict", e))
        }
        Ok(Ok(Err(e))) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, "refused", e)),
        _ => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the agent did not answer in time".into(),
        )),
    }
}

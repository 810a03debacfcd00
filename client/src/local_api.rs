//! The agent's local API (`127.0.0.1:4040` by default, the next free port when that one is
//! taken): the tunnels of this agent, listed, opened and closed while it runs. Shapes follow
//! ngrok's agent API (`/api/tunnels`, `public_url`, `config.addr`) so scripts written for it
//! adapt easily. `warren ls` and `warren stop` use it.

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

use crate::agent::{AgentHandle, Control, TunnelStatus};
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

fn tunnel_json(t: &TunnelStatus) -> Value {
    json!({
        "name": t.spec.name.as_str(),
        "uri": format!("/api/tunnels/{}", t.spec.name),
        "public_url": t.url,
        "proto": t.spec.protocol.as_str(),
        "config": { "addr": t.spec.target.to_string() },
        "forwarded": t.forwarded,
    })
}

/// The routes.
pub fn router(handle: AgentHandle) -> Router {
    Router::new()
        .route("/api/tunnels", get(list).post(create))
        .route("/api/tunnels/{name}", get(one).delete(remove))
        .route("/api/status", get(status))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .with_state(handle)
}

/// Serves the API until `shutdown`.
pub async fn serve(listener: TcpListener, handle: AgentHandle, shutdown: CancellationToken) {
    let app = router(handle);
    if let Err(e) = axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::warn!(error = %e, "local API ended with an error");
    }
}

async fn list(State(h): State<AgentHandle>) -> Json<Value> {
    let tunnels: Vec<Value> = h.state.tunnels().iter().map(tunnel_json).collect();
    Json(json!({ "tunnels": tunnels, "uri": "/api/tunnels" }))
}

async fn status(State(h): State<AgentHandle>) -> Json<Value> {
    Json(json!({ "connected": h.state.connected(), "tunnels": h.state.tunnels().len() }))
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
    Ok(Json(tunnel_json(&find(&h, &name)?)))
}

async fn remove(
    State(h): State<AgentHandle>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let name = TunnelName::parse(&name)
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, "not_found", format!("no tunnel {name}")))?;
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
    let name = match text("name") {
        Some(n) => TunnelName::parse(n).map_err(|e| invalid(e.to_string()))?,
        None => TunnelSpec::default_name(protocol, &target),
    };
    let mut spec = TunnelSpec::new(name, protocol, target);
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
    let (tx, rx) = oneshot::channel();
    h.control.send(Control::Add(Box::new(spec.clone()), tx)).await.map_err(|_| {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the agent is stopping".into())
    })?;
    match tokio::time::timeout(Duration::from_secs(15), rx).await {
        Ok(Ok(Ok(url))) => {
            let t = TunnelStatus { spec: std::sync::Arc::new(spec), url, forwarded: false };
            Ok((StatusCode::CREATED, Json(tunnel_json(&t))))
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

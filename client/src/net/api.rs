//! `/api/networks`: the networks part of the agent's local API (`warren net ...` uses it).
//!
//! Errors are `{"error": {"code", "message"}}` as in the rest of the local API, with 400 for
//! bad input, 404 for unknown names, 409 for taken, overlapping or exhausted things and 503
//! when this agent cannot manage networks (and says why).

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::manager::{Attach, CreateNetwork, CreateService, Publish};
use super::{NetError, NetManager};

struct Failure(NetError);

impl From<NetError> for Failure {
    fn from(e: NetError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let code = match self.0 {
            NetError::BadInput(_) => "bad_request",
            NetError::NotFound(_) => "not_found",
            NetError::Conflict(_) => "conflict",
            NetError::Unavailable(_) => "unavailable",
            NetError::System(_) => "system",
        };
        (status, Json(json!({"error": {"code": code, "message": self.0.to_string()}})))
            .into_response()
    }
}

type Net = State<Arc<NetManager>>;
type Answer = Result<Response, Failure>;

fn body<T>(r: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, Failure> {
    r.map(|Json(v)| v)
        .map_err(|e| Failure(NetError::BadInput(format!("bad request body: {}", e.body_text()))))
}

fn created(v: impl serde::Serialize) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

/// The routes, for an agent that manages networks.
pub fn router(m: Arc<NetManager>) -> Router {
    Router::new()
        .route("/api/networks", get(list).post(create))
        .route("/api/networks/resolve/{name}", get(resolve))
        .route("/api/networks/{net}", get(inspect).delete(remove))
        .route("/api/networks/{net}/endpoints", post(attach))
        .route("/api/networks/{net}/endpoints/{ep}", delete(detach))
        .route("/api/networks/{net}/ports", post(publish))
        .route("/api/networks/{net}/ports/{proto}/{port}", delete(unpublish))
        .route("/api/networks/{net}/services", post(service_create))
        .route("/api/networks/{net}/services/{name}", delete(service_remove))
        .with_state(m)
}

/// The routes of a process that does not manage networks (`warren http ...`): every call
/// says so.
pub fn absent_router() -> Router {
    async fn absent() -> Response {
        Failure(NetError::Unavailable(
            "this process runs tunnels only; networks are managed by `warren agent` (point \
             --agent-api at it)"
                .into(),
        ))
        .into_response()
    }
    Router::new()
        .route("/api/networks", axum::routing::any(absent))
        .route("/api/networks/{*rest}", axum::routing::any(absent))
}

async fn list(State(m): Net) -> Answer {
    Ok(Json(json!({"networks": m.list().await?})).into_response())
}

async fn create(
    State(m): Net,
    req: Result<Json<CreateNetwork>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    Ok(created(m.create_network(body(req)?).await?))
}

async fn inspect(State(m): Net, Path(net): Path<String>) -> Answer {
    Ok(Json(m.inspect(&net).await?).into_response())
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn remove(State(m): Net, Path(net): Path<String>, Query(q): Query<Force>) -> Answer {
    m.remove_network(&net, q.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn attach(
    State(m): Net,
    Path(net): Path<String>,
    req: Result<Json<Attach>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    Ok(created(m.attach(&net, body(req)?).await?))
}

async fn detach(State(m): Net, Path((net, ep)): Path<(String, String)>) -> Answer {
    m.detach(&net, &ep).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn publish(
    State(m): Net,
    Path(net): Path<String>,
    req: Result<Json<Publish>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    Ok(created(m.publish(&net, body(req)?).await?))
}

#[derive(Deserialize)]
struct HostIp {
    host_ip: Option<String>,
}

async fn unpublish(
    State(m): Net,
    Path((net, proto, port)): Path<(String, String, String)>,
    Query(q): Query<HostIp>,
) -> Answer {
    let port: u16 = port
        .parse()
        .map_err(|_| Failure(NetError::BadInput(format!("{port:?} is not a port number"))))?;
    m.unpublish(&net, &proto, port, q.host_ip.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn service_create(
    State(m): Net,
    Path(net): Path<String>,
    req: Result<Json<CreateService>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    Ok(created(m.create_service(&net, body(req)?).await?))
}

async fn service_remove(State(m): Net, Path((net, name)): Path<(String, String)>) -> Answer {
    m.remove_service(&net, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resolve(State(m): Net, Path(name): Path<String>) -> Answer {
    let addrs: Vec<Ipv4Addr> = m.resolve(&name).ok_or_else(|| {
        Failure(NetError::NotFound(format!(
            "{name} is not NAME.NETWORK of an endpoint, alias or service"
        )))
    })?;
    Ok(Json(json!({"name": name, "addresses": addrs})).into_response())
}

/// Asks the networks agent's local API for the addresses of `NAME.NETWORK`; for tunnel
/// processes whose target is an endpoint's name. The agent is found as the CLI finds it
/// (`WARREN_AGENT_API` and `WARREN_API_TOKEN`, else the newest agent in `agent.json` that
/// manages networks).
pub async fn ask_agent(name: &str) -> Option<Vec<Ipv4Addr>> {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return None;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let addr = env("WARREN_AGENT_API").and_then(|a| a.parse::<std::net::SocketAddr>().ok());
    let dir = env("WARREN_CONFIG_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(crate::identity::default_config_dir);
    let api = crate::api_access::resolve(
        addr,
        env("WARREN_API_TOKEN"),
        &dir,
        crate::api_access::Want::Networks,
    )
    .ok()?;
    let path = format!("/api/networks/resolve/{name}");
    let v = api.call("GET", &path, None, std::time::Duration::from_secs(3)).await.ok()?;
    let ips: Vec<Ipv4Addr> =
        v["addresses"].as_array()?.iter().filter_map(|x| x.as_str()?.parse().ok()).collect();
    (!ips.is_empty()).then_some(ips)
}

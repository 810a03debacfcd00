//! What stands in front of both HTTP APIs (the relay's `/api/v1` and the agent's local API),
//! before any route runs:
//!
//! - **Host**: answered only when `Host` (or HTTP/2's `:authority`) names a loopback name
//!   (`localhost`, `*.localhost`) or address, the address the API is bound to, or a name the
//!   operator allowed (`--api-host`); anything else gets `421 Misdirected Request`. A web page
//!   that rebinds its own name to 127.0.0.1 therefore reaches nothing.
//! - **Origin**: a request whose `Origin` is not the API's own (`http://` or `https://` plus the
//!   `Host` it came with) gets `403`, whatever its method; there is no CORS.
//! - **Bodies**: a request that carries a body, or a `POST`/`PUT`/`PATCH` that names a content
//!   type, must be `application/json`; otherwise `415`. A cross-site "simple" form or
//!   `text/plain` POST never reaches a handler.
//! - **Failed authentications** (a presented token answered `401`) are counted per source
//!   address in an [`AuthThrottle`]; a locked-out address gets `429` with `Retry-After` before
//!   its token is looked at.
//! - **Headers** on every answer: `Content-Security-Policy` (own origin only, `frame-ancestors
//!   'none'`), `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, `Referrer-Policy:
//!   no-referrer`, and `Cache-Control: no-store` unless the route set one.
//!
//! Errors have the APIs' shape: `{"error": {"code": "...", "message": "..."}}`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::throttle::AuthThrottle;

/// The policy the dashboards' pages are served under: scripts, styles and fetches from the
/// API's own origin only, never framed.
pub const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
                       base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One API's guard: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct ApiGuard {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bound: IpAddr,
    names: Vec<String>,
    throttle: Arc<AuthThrottle>,
}

impl ApiGuard {
    /// A guard for an API bound to `bound`, also answering the host `names` (lower-cased,
    /// without port), counting failed authentications in `throttle`.
    pub fn new(
        bound: SocketAddr,
        names: impl IntoIterator<Item = String>,
        throttle: Arc<AuthThrottle>,
    ) -> Self {
        let names = names
            .into_iter()
            .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        Self { inner: Arc::new(Inner { bound: bound.ip(), names, throttle }) }
    }

    /// `router` behind this guard. Serve it with
    /// `into_make_service_with_connect_info::<SocketAddr>()` so failures are counted per
    /// address.
    pub fn wrap(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), check))
    }

    /// Whether `host` (a `Host` header's value: name or address, maybe with a port) may be
    /// answered.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else { return false };
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            let ip = ip.to_canonical();
            return ip.is_loopback()
                || ip == self.inner.bound.to_canonical()
                || self.inner.bound.is_unspecified();
        }
        self.inner.names.contains(&name)
    }
}

/// The host part of a `Host` value, lower-cased, without port or trailing dot; `None` when it
/// is not a plausible host.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        &host[..=end]
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if is_port(p) => h,
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        });
    ok.then_some(name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// The token of an `Authorization: Bearer TOKEN` header, if the request sent a non-empty one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// An error in the APIs' shape.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message.into() } });
    (status, axum::Json(body)).into_response()
}

/// The request's `Host`: the single `Host` header, else HTTP/2's `:authority`; or why not.
fn request_host(req: &Request) -> Result<String, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let host = match first {
        Some(v) => v.to_str().ok().map(str::to_owned),
        None => req.uri().authority().map(|a| a.as_str().to_owned()),
    };
    host.filter(|h| !h.is_empty()).ok_or("a Host header is required")
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Whether `origin` is the API's own origin for a request that came with `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
        && rest.trim_end_matches('/').eq_ignore_ascii_case(host.trim())
}

async fn check(State(guard): State<ApiGuard>, req: Request, next: Next) -> Response {
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => return secured(error(StatusCode::BAD_REQUEST, "bad_request", why)),
    };
    if !guard.host_allowed(&host) {
        return secured(error(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            format!(
                "this API does not answer for host {host:?}: use a loopback address or a name \
                 allowed with --api-host"
            ),
        ));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let ok = origin.to_str().is_ok_and(|o| same_origin(o, &host));
        if !ok {
            return secured(error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "requests from other web origins are refused",
            ));
        }
    }
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    let named_type = req.headers().contains_key(header::CONTENT_TYPE);
    if (has_body(req.headers()) || (writes && named_type)) && !is_json(req.headers()) {
        return secured(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON: send `Content-Type: application/json` (curl: --json)",
        ));
    }
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let presented = req.headers().contains_key(header::AUTHORIZATION);
    if let Some(ip) = peer
        && let Some(wait) = guard.inner.throttle.locked(ip)
    {
        let secs = wait.as_secs().max(1);
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            format!("too many failed authentications from {ip}; retry in {secs} s"),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return secured(resp);
    }
    let resp = next.run(req).await;
    if presented
        && resp.status() == StatusCode::UNAUTHORIZED
        && let Some(ip) = peer
        && let Some(wait) = guard.inner.throttle.failed(ip)
    {
        tracing::warn!(peer = %ip, lockout_ms = wait.as_millis() as u64, "failed API authentications; slowing this address down");
    }
    secured(resp)
}

/// Adds the security headers every answer carries.
fn secured(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str, names: &[&str]) -> ApiGuard {
        ApiGuard::new(
            bound.parse().unwrap(),
            names.iter().map(|s| (*s).to_owned()),
            Arc::new(AuthThrottle::new()),
        )
    }

    #[test]
    fn hosts() {
        let g = guard("127.0.0.1:4040", &["Relay.Example.COM."]);
        for ok in [
            "127.0.0.1:4040",
            "127.0.0.9",
            "localhost:4040",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:4040",
            "[::ffff:127.0.0.1]",
            "relay.example.com",
            "relay.example.com.:7400",
        ] {
            assert!(g.host_allowed(ok), "{ok} should be allowed");
        }
        for bad in [
            "evil.example:4040",
            "localhost.evil.example",
            "10.0.0.1:4040",
            "relay.example.com.evil",
            "",
            "127.0.0.1:port",
            "[::1",
            "a b",
        ] {
            assert!(!g.host_allowed(bad), "{bad} should be refused");
        }
        let wide = guard("0.0.0.0:7400", &[]);
        assert!(wide.host_allowed("192.0.2.7:7400"), "an unspecified bind answers its addresses");
        assert!(!wide.host_allowed("evil.example"));
        let one = guard("192.0.2.7:7400", &[]);
        assert!(one.host_allowed("192.0.2.7:7400") && !one.host_allowed("192.0.2.8"));
    }

    #[test]
    fn origins() {
        assert!(same_origin("http://127.0.0.1:4040", "127.0.0.1:4040"));
        assert!(same_origin("https://Relay.example.com", "relay.example.com"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:4040"));
        assert!(!same_origin("null", "127.0.0.1:4040"));
        assert!(!same_origin("http://127.0.0.1:4041", "127.0.0.1:4040"));
        assert!(!same_origin("file://127.0.0.1:4040", "127.0.0.1:4040"));
    }
}

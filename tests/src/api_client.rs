//! A small JSON-over-HTTP client for the relay's REST API (`--api`): one request per fresh
//! HTTP/1.1 connection, an optional bearer token, and the whole answer with its body parsed on
//! demand.

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::Full;
use serde_json::Value;

use crate::client::HttpConn;
use crate::util::IO_TIMEOUT;

/// A client of one relay's API, with or without a token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: Option<String>,
}

/// One answer of the API.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// What was asked, for messages: `METHOD PATH`.
    pub request: String,
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl ApiClient {
    /// A client of the API at `addr` sending `Authorization: Bearer TOKEN`.
    pub fn new(addr: SocketAddr, token: &str) -> Self {
        Self { addr, token: Some(token.to_owned()) }
    }

    /// A client of the API at `addr` sending no `Authorization` header.
    pub fn anonymous(addr: SocketAddr) -> Self {
        Self { addr, token: None }
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> ApiResponse {
        self.send(Method::GET, path, &[], None).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> ApiResponse {
        self.send(Method::DELETE, path, &[], None).await
    }

    /// `POST path` with `body` as JSON (`Content-Type: application/json`).
    pub async fn post_json(&self, path: &str, body: &Value) -> ApiResponse {
        self.post_raw(path, "application/json", body.to_string()).await
    }

    /// `POST path` with a verbatim body and content type (for malformed bodies).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> ApiResponse {
        self.send(Method::POST, path, &[("content-type", content_type)], Some(body.into())).await
    }

    /// Any method, extra headers and an optional body. Panics if no answer comes within
    /// [`IO_TIMEOUT`] or the connection fails: the API must always answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> ApiResponse {
        let what = format!("{method} {path}");
        match tokio::time::timeout(IO_TIMEOUT, self.try_send(method, path, headers, body)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{what} to the API at {}: {e:#}", self.addr),
            Err(_) => panic!("{what} to the API at {}: no answer within {IO_TIMEOUT:?}", self.addr),
        }
    }

    /// Like [`ApiClient::send`] but returns connection errors instead of panicking.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> anyhow::Result<ApiResponse> {
        let request = format!("{method} {path}");
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(body.unwrap_or_default())).context("build request")?;
        let mut conn = HttpConn::connect(self.addr).await?;
        let resp = conn.send(req).await.with_context(|| request.clone())?;
        Ok(ApiResponse { request, status: resp.status, headers: resp.headers, body: resp.body })
    }
}

impl ApiResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics (showing it) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered {} with a body that is not JSON ({e}): {:?}",
                self.request,
                self.status,
                self.text()
            )
        })
    }

    /// The `Content-Type` header, or "".
    pub fn content_type(&self) -> &str {
        self.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// Panics (showing the body) unless the status is `want`; returns the body as JSON, or
    /// `Value::Null` when the body is empty.
    pub fn expect(&self, want: StatusCode) -> Value {
        assert_eq!(self.status, want, "{}: body {:?}", self.request, self.text());
        if self.body.is_empty() { Value::Null } else { self.json() }
    }

    /// The `(code, message)` of an API error body `{"error": {"code", "message"}}`; panics if
    /// the body has another shape.
    pub fn error(&self) -> (String, String) {
        let v = self.json();
        let code = v.pointer("/error/code").and_then(Value::as_str);
        let message = v.pointer("/error/message").and_then(Value::as_str);
        match (code, message) {
            (Some(c), Some(m)) => (c.to_owned(), m.to_owned()),
            _ => panic!(
                "{} answered {} without an {{\"error\": {{\"code\", \"message\"}}}} body: {v}",
                self.request, self.status
            ),
        }
    }

    /// Panics unless the status is `want` and the body is an API error with code `code`;
    /// returns the message.
    pub fn expect_error(&self, want: StatusCode, code: &str) -> String {
        assert_eq!(self.status, want, "{}: body {:?}", self.request, self.text());
        assert!(
            self.content_type().starts_with("application/json"),
            "{}: error with content type {:?}",
            self.request,
            self.content_type()
        );
        let (got, message) = self.error();
        assert_eq!(got, code, "{}: error code (message {message:?})", self.request);
        assert!(!message.is_empty(), "{}: error with an empty message", self.request);
        message
    }
}

/// `curl` as a client of a JSON API: `method url`, extra `-H` headers, an optional body sent
/// as is (`--data`). Returns the status and the body as JSON (`Null` when it is not JSON).
pub async fn curl_json(
    method: &str,
    url: &str,
    headers: &[String],
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data", b]);
    }
    let out = cmd.arg(url).output().await.expect("run curl");
    assert!(out.status.success(), "curl {method} {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

/// The tunnel names of an agent's `GET /api/tunnels` answer.
pub fn tunnel_names(v: &serde_json::Value) -> Vec<String> {
    v["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

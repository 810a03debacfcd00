//! Docker: a small client of the Engine API, label-driven auto-expose, and the network and IPAM
//! plugin.
//!
//! - [`Docker`]: the Engine API over its unix socket, with the API version negotiated (Docker
//!   20.10 refuses anything above 1.41), JSON requests and the event stream.
//! - [`expose`]: `warren agent --docker`: a tunnel for every running container labelled
//!   `warren.http=PORT` (or `tcp`, `tls`, `udp`), opened and closed as containers come and go.
//! - [`plugin`]: `warren agent --docker-plugin`: Docker's remote network driver and IPAM driver,
//!   backed by warren's networks.

pub mod expose;
pub mod plugin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Where the Docker daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The newest API version this client speaks; older daemons get their own version.
const MAX_VERSION: (u32, u32) = (1, 43);
/// The oldest daemon API this client works with (Docker 17.06).
const MIN_VERSION: (u32, u32) = (1, 30);
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Something went wrong talking to Docker.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The socket is not there or nobody listens.
    #[error(
        "cannot reach the Docker daemon at {path}: {why} (is dockerd running? --docker-socket PATH)"
    )]
    Unreachable {
        /// The socket.
        path: String,
        /// The OS's reason.
        why: String,
    },
    /// Docker answered with an error status.
    #[error("Docker answered {status} to {what}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request.
        what: String,
        /// Docker's message.
        message: String,
    },
    /// Anything else: a broken connection, a bad body.
    #[error("Docker API: {0}")]
    Other(String),
}

impl DockerError {
    /// Whether Docker said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }
}

/// A client of the Docker Engine API on a unix socket.
#[derive(Clone, Debug)]
pub struct Docker {
    socket: PathBuf,
    /// `v1.41`: the negotiated API version, as a path prefix.
    version: String,
}

/// One event of `GET /events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// `container`, `network`...
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// `start`, `die`, `destroy`, `connect`...
    #[serde(rename = "Action", default)]
    pub action: String,
    /// What it happened to.
    #[serde(rename = "Actor", default)]
    pub actor: Actor,
}

/// The object of an [`Event`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Actor {
    /// Its id.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Its attributes (a container's labels and name, a network's name and driver...).
    #[serde(rename = "Attributes", default)]
    pub attributes: std::collections::HashMap<String, String>,
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Docker {
    /// Connects to the daemon at `socket` and agrees on an API version: the daemon's own when it
    /// is older than this client's.
    pub async fn connect(socket: &Path) -> Result<Self, DockerError> {
        let mut me = Self { socket: socket.to_owned(), version: String::new() };
        let (status, headers, body) = me.send("GET", "/_ping", None).await?;
        if status != 200 {
            return Err(DockerError::Status {
                status,
                what: "GET /_ping".into(),
                message: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        let theirs = headers
            .get("api-version")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_version)
            .unwrap_or(MIN_VERSION);
        if theirs < MIN_VERSION {
            return Err(DockerError::Other(format!(
                "the Docker daemon speaks API {}.{}; warren needs {}.{} (Docker 17.06) or newer",
                theirs.0, theirs.1, MIN_VERSION.0, MIN_VERSION.1
            )));
        }
        let v = theirs.min(MAX_VERSION);
        me.version = format!("v{}.{}", v.0, v.1);
        Ok(me)
    }

    /// The negotiated API version, e.g. `1.41`.
    pub fn version(&self) -> &str {
        self.version.trim_start_matches('v')
    }

    async fn open(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, DockerError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            DockerError::Unreachable { path: self.socket.display().to_string(), why: e.to_string() }
        })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DockerError::Other(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    fn request(
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> http::Request<Full<Bytes>> {
        let mut b = http::Request::builder().method(method).uri(path).header("host", "docker");
        let bytes = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        b.body(Full::new(bytes)).unwrap_or_default()
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, http::HeaderMap, Bytes), DockerError> {
        let full = if path.starts_with("/_ping") {
            path.to_owned()
        } else {
            format!("/{}{path}", self.version)
        };
        let exchange = async {
            let mut send = self.open().await?;
            let resp = send
                .send_request(Self::request(method, &full, body))
                .await
                .map_err(|e| DockerError::Other(format!("{method} {path}: {e}")))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| DockerError::Other(format!("{method} {path}: {e}")))?
                .to_bytes();
            Ok((status, headers, body))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| DockerError::Other(format!("{method} {path}: no answer in {TIMEOUT:?}")))?
    }

    /// `GET path` (under the API version), decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let (status, _, body) = self.send("GET", path, None).await?;
        if !(200..300).contains(&status) {
            return Err(DockerError::Status {
                status,
                what: format!("GET {path}"),
                message: error_message(&body),
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| DockerError::Other(format!("GET {path}: unexpected answer: {e}")))
    }

    /// The event stream, filtered by `filters` (Docker's JSON filter object). Events arrive on
    /// the returned channel until the daemon ends the stream or the receiver is dropped; the
    /// channel then closes.
    pub async fn events(
        &self,
        filters: &serde_json::Value,
    ) -> Result<mpsc::Receiver<Event>, DockerError> {
        let path = format!("/{}/events?filters={}", self.version, urlencode(&filters.to_string()));
        let mut send = self.open().await?;
        let resp =
            tokio::time::timeout(TIMEOUT, send.send_request(Self::request("GET", &path, None)))
                .await
                .map_err(|_| DockerError::Other("GET /events: no answer".into()))?
                .map_err(|e| DockerError::Other(format!("GET /events: {e}")))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(DockerError::Status {
                status,
                what: "GET /events".into(),
                message: error_message(&body),
            });
        }
        let (tx, rx) = mpsc::channel(256);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    match serde_json::from_slice::<Event>(&line) {
                        Ok(ev) => {
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Err(e) if !line.iter().all(u8::is_ascii_whitespace) => {
                            tracing::debug!("docker: unreadable event: {e}");
                        }
                        Err(_) => {}
                    }
                }
                // A line this long is not an event; drop it rather than grow without bound.
                if buf.len() > 1 << 20 {
                    buf.clear();
                }
            }
        });
        Ok(rx)
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A container as `GET /containers/{id}/json` shows it (the parts warren reads).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Container {
    /// The full id.
    #[serde(rename = "Id", default)]
    pub id: String,
    /// `/name`.
    #[serde(rename = "Name", default)]
    pub name: String,
    /// Its configuration.
    #[serde(rename = "Config", default)]
    pub config: ContainerConfig,
    /// Running or not.
    #[serde(rename = "State", default)]
    pub state: ContainerState,
    /// Its networks.
    #[serde(rename = "NetworkSettings", default)]
    pub network_settings: NetworkSettings,
}

/// `Config` of a [`Container`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerConfig {
    /// Its labels.
    #[serde(rename = "Labels", default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Its host name.
    #[serde(rename = "Hostname", default)]
    pub hostname: String,
}

/// `State` of a [`Container`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerState {
    /// Whether it runs.
    #[serde(rename = "Running", default)]
    pub running: bool,
    /// Whether it is paused (it still counts as running).
    #[serde(rename = "Paused", default)]
    pub paused: bool,
}

/// `NetworkSettings` of a [`Container`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetworkSettings {
    /// Per network name.
    #[serde(rename = "Networks", default)]
    pub networks: Option<std::collections::BTreeMap<String, ContainerNetwork>>,
}

/// One network of a container.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerNetwork {
    /// Its address there (empty when it has none).
    #[serde(rename = "IPAddress", default)]
    pub ip_address: String,
    /// The endpoint's id.
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    /// `--network-alias` names (Docker adds the short id).
    #[serde(rename = "Aliases", default)]
    pub aliases: Option<Vec<String>>,
}

impl Container {
    /// The name without Docker's leading `/`.
    pub fn short_name(&self) -> &str {
        self.name.trim_start_matches('/')
    }

    /// Its labels.
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.config.labels.clone().unwrap_or_default()
    }

    /// Its networks by name.
    pub fn networks(&self) -> std::collections::BTreeMap<String, ContainerNetwork> {
        self.network_settings.networks.clone().unwrap_or_default()
    }
}

/// One row of `GET /containers/json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerSummary {
    /// The full id.
    #[serde(rename = "Id")]
    pub id: String,
    /// Its labels.
    #[serde(rename = "Labels", default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(parse_version("1.41"), Some((1, 41)));
        assert_eq!(parse_version(" 1.9 "), Some((1, 9)));
        assert_eq!(parse_version("1"), None);
        assert!((1, 41) < MAX_VERSION && (1, 9) < MIN_VERSION && (1, 47) > MAX_VERSION);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            urlencode(r#"{"type":["container"]}"#),
            "%7B%22type%22%3A%5B%22container%22%5D%7D"
        );
        assert_eq!(urlencode("a-b_c.d~"), "a-b_c.d~");
    }

    #[test]
    fn containers_decode_with_missing_parts() {
        let c: Container = serde_json::from_str(
            r#"{"Id":"abc","Name":"/shop","Config":{"Labels":null,"Hostname":"h"},
                "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2","Aliases":null}}}}"#,
        )
        .expect("decodes");
        assert_eq!(c.short_name(), "shop");
        assert!(c.labels().is_empty());
        assert_eq!(c.networks()["bridge"].ip_address, "172.17.0.2");
        assert!(!c.state.running);
    }
}

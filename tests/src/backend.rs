//! Local services the tunnels point at: an HTTP app and a TCP echo server, both on 127.0.0.1:0.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::routing::{any, get, post};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Largest body `/echo` accepts.
pub const ECHO_LIMIT: usize = 64 * 1024 * 1024;

/// An HTTP server on 127.0.0.1 with the routes the tests use:
/// - `GET /`: `hello from NAME` (so a test can tell which backend answered);
/// - `POST /echo`: the request body, unchanged;
/// - `GET /headers`: the request headers, one `name: value` per line;
/// - `GET /target`: the request target as it arrived (`/target`, or `http://NAME/target` when
///   a proxy passed on an absolute form);
/// - `GET /hop-by-hop`: an answer carrying the headers a proxy must not pass on (`Connection:
///   x-hop-secret`, `X-Hop-Secret`, `Keep-Alive`, `Proxy-Authenticate`) and one it must
///   (`X-End-To-End`);
/// - `GET /ws`: a WebSocket echo.
///
/// Stops on drop.
#[derive(Debug)]
pub struct HttpBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The name in its `/` answer.
    pub name: String,
    task: JoinHandle<()>,
}

impl HttpBackend {
    /// Starts a backend named `backend`.
    pub async fn start() -> Self {
        Self::start_named("backend").await
    }

    /// Starts a backend whose `/` answers `hello from NAME`.
    pub async fn start_named(name: &str) -> Self {
        let listener = listen_local().expect("bind http backend");
        Self::serve(listener, name)
    }

    /// Starts a backend named `name` on a listener bound elsewhere (e.g. inside a network
    /// namespace, where the listener was created).
    pub fn start_on(listener: std::net::TcpListener, name: &str) -> Self {
        Self::serve(tokio_listener(listener), name)
    }

    fn serve(listener: TcpListener, name: &str) -> Self {
        let greeting = Self::greeting_for(name);
        let app = Router::new()
            .route("/", get(move || async move { greeting }))
            .route("/echo", post(|body: Bytes| async move { body }))
            .route("/headers", any(headers))
            .route("/target", any(|uri: Uri| async move { uri.to_string() }))
            .route("/hop-by-hop", get(hop_by_hop))
            .route("/ws", get(ws))
            .layer(DefaultBodyLimit::max(ECHO_LIMIT));
        let addr = listener.local_addr().expect("backend addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, name: name.to_owned(), task }
    }

    /// The port, as given to `warren http`.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What `GET /` answers.
    pub fn greeting(&self) -> String {
        Self::greeting_for(&self.name)
    }

    fn greeting_for(name: &str) -> String {
        format!("hello from {name}\n")
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn headers(headers: HeaderMap) -> String {
    let mut out = String::new();
    for (name, value) in &headers {
        let _ = writeln!(out, "{}: {}", name, String::from_utf8_lossy(value.as_bytes()));
    }
    out
}

async fn hop_by_hop() -> ([(&'static str, &'static str); 5], &'static str) {
    (
        [
            ("connection", "x-hop-secret"),
            ("x-hop-secret", "for the next hop only"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"backend\""),
            ("x-end-to-end", "kept"),
        ],
        "hop-by-hop\n",
    )
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.max_message_size(ECHO_LIMIT).on_upgrade(ws_echo)
}

async fn ws_echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(t),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// Parses the `/headers` answer into (lower-case name, value) pairs.
pub fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect()
}

/// A TCP echo server on 127.0.0.1: every connection gets its bytes back until it closes.
/// Stops on drop.
#[derive(Debug)]
pub struct EchoBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Starts the echo server.
    pub async fn start() -> Self {
        let listener = listen_local().expect("bind echo backend");
        Self::serve(listener)
    }

    /// Starts the echo server on a listener bound elsewhere (e.g. inside a network namespace,
    /// where the listener was created).
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        Self::serve(tokio_listener(listener))
    }

    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("echo addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut stream, _)) = accepted else { continue };
                        counter.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(async move {
                            let (mut r, mut w) = stream.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Self { addr, connections, task }
    }

    /// The port, as given to `warren tcp`.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A std listener made non-blocking and registered with the runtime.
fn tokio_listener(listener: std::net::TcpListener) -> TcpListener {
    listener.set_nonblocking(true).expect("make the backend's listener non-blocking");
    TcpListener::from_std(listener).expect("register the backend's listener")
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on `127.0.0.1`, a free port, with the system's largest accept queue. A test that
/// connects thousands of times would otherwise overflow the default queue (1024): the kernel
/// then completes the client's handshake but drops the connection before `accept`, and a client
/// that sends nothing never finds out.
fn listen_local() -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(65_535)
}

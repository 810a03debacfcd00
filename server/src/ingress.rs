//! Public listeners: HTTP routed by `Host`, and one TCP listener per TCP tunnel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, info};
use warren_proto::{Protocol, StreamHeader};
use warren_transport::Stream;

use crate::router::{Live, Route, Router};

/// How long a visitor may take to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

type Body = Either<Incoming, Full<Bytes>>;

/// Opens a data stream to the agent for one visitor connection and writes its header.
pub async fn open_data_stream(
    live: &Live,
    visitor: SocketAddr,
    protocol: Protocol,
) -> std::io::Result<Stream> {
    let mut stream = live.session.open().await?;
    let mut header = Vec::with_capacity(32);
    StreamHeader { tunnel: live.tunnel, visitor, protocol }.encode(&mut header);
    stream.write_all(&header).await?;
    Ok(stream)
}

/// Serves one TCP tunnel's public listener: every visitor connection becomes a data stream to
/// whichever session serves the tunnel at that moment; while none does, visitors are closed at
/// once. The returned handle stops the listener and its connections when dropped.
pub fn spawn_tcp_tunnel(
    listener: TcpListener,
    live: watch::Receiver<Option<Live>>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            let Some(live) = live.borrow().clone() else {
                drop(tcp);
                continue;
            };
            conns.spawn(forward_tcp(tcp, peer, live));
        }
    }))
}

async fn forward_tcp(mut tcp: TcpStream, peer: SocketAddr, live: Live) {
    let _ = tcp.set_nodelay(true);
    let mut stream = match open_data_stream(&live, peer, Protocol::Tcp).await {
        Ok(s) => s,
        Err(e) => {
            debug!(tunnel = %live.name, error = %e, "cannot open data stream");
            return;
        }
    };
    if let Err(e) = warren_transport::splice(&mut tcp, &mut stream).await {
        debug!(tunnel = %live.name, %peer, error = %e, "tcp connection ended with an error");
    }
}

/// The public HTTP listener.
#[derive(Debug)]
pub struct HttpIngress {
    router: Arc<Router>,
    domain: String,
}

/// Which session and tunnel an upstream connection belongs to.
type UpstreamKey = (u64, warren_proto::TunnelId);

struct ConnState {
    ingress: Arc<HttpIngress>,
    peer: SocketAddr,
    tasks: TaskTracker,
    /// The upstream connection of the last tunnel this visitor connection used.
    upstream: Mutex<Option<(UpstreamKey, SendRequest<Incoming>)>>,
}

impl HttpIngress {
    /// Routes `NAME.domain` to the tunnels in `router`.
    pub fn new(router: Arc<Router>, domain: &str) -> Arc<Self> {
        Arc::new(Self { router, domain: domain.trim_end_matches('.').to_ascii_lowercase() })
    }

    /// Accepts visitors until `shutdown`; then waits up to `drain` for open requests.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let state = Arc::new(ConnState {
                ingress: self.clone(),
                peer,
                tasks: tasks.clone(),
                upstream: Mutex::new(None),
            });
            let cancel = shutdown.clone();
            tasks.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "visitor connection error") },
                    () = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }

    /// The subdomain label of a `Host` value, if it names a tunnel under our domain.
    fn label<'a>(&self, host: &'a str) -> Option<&'a str> {
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.trim_end_matches('.');
        let cut = host.len().checked_sub(self.domain.len() + 1)?;
        if !host.is_char_boundary(cut) {
            return None;
        }
        let (label, rest) = host.split_at(cut);
        (rest.as_bytes()[0] == b'.'
            && rest[1..].eq_ignore_ascii_case(&self.domain)
            && !label.is_empty()
            && !label.contains('.'))
        .then_some(label)
    }
}

impl ConnState {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let wants_json = req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let Some(label) = self.ingress.label(&host) else {
            return error_page(
                StatusCode::NOT_FOUND,
                "No such tunnel",
                &format!("No tunnel is served at host {host:?} on this relay."),
                wants_json,
            );
        };
        let label = label.to_ascii_lowercase();
        let live = match self.ingress.router.http_route(&label) {
            None => {
                return error_page(
                    StatusCode::NOT_FOUND,
                    "No such tunnel",
                    &format!("No tunnel is served at {host}."),
                    wants_json,
                );
            }
            Some(Route::Offline(name)) => {
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "Tunnel offline",
                    &format!(
                        "The agent serving tunnel {name} is disconnected; it may be reconnecting. Try again shortly."
                    ),
                    wants_json,
                );
            }
            Some(Route::Live(live)) => live,
        };

        let headers = req.headers_mut();
        let ip = self.peer.ip().to_string();
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        if let Ok(v) = HeaderValue::from_str(&host) {
            headers.insert("x-forwarded-host", v);
        }

        let upgrade =
            req.headers().contains_key(http::header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
        let key = (live.session_id, live.tunnel);
        let cached = self.upstream.lock().await.take().filter(|(k, s)| *k == key && !s.is_closed());
        let ready = match cached {
            Some((_, mut s)) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match ready {
            Some(s) => s,
            None => match self.connect(&live).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(tunnel = %live.name, error = %e, "cannot reach agent");
                    return error_page(
                        StatusCode::BAD_GATEWAY,
                        "Agent unreachable",
                        &format!(
                            "The relay could not open a stream to the agent serving tunnel {}.",
                            live.name
                        ),
                        wants_json,
                    );
                }
            },
        };
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                debug!(tunnel = %live.name, error = %e, "upstream request failed");
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    &format!("The request through tunnel {} failed: {e}", live.name),
                    wants_json,
                );
            }
        };
        match upgrade {
            Some(visitor) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let agent = hyper::upgrade::on(&mut resp);
                let name = live.name.clone();
                self.tasks.spawn(async move {
                    let (Ok(v), Ok(a)) = tokio::join!(visitor, agent) else {
                        debug!(tunnel = %name, "upgrade failed");
                        return;
                    };
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(v), &mut TokioIo::new(a))
                            .await;
                });
            }
            _ => *self.upstream.lock().await = Some((key, sender)),
        }
        resp.map(Either::Left)
    }

    async fn connect(
        &self,
        live: &Live,
    ) -> Result<SendRequest<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
        let stream = open_data_stream(live, self.peer, Protocol::Http).await?;
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        self.tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An error answer from the relay itself: a small HTML page, or JSON when the visitor asks.
pub fn error_page(status: StatusCode, title: &str, detail: &str, json: bool) -> Response<Body> {
    let (ctype, body) = if json {
        let j = format!(
            "{{\"error\":{{\"status\":{},\"title\":{:?},\"message\":{:?}}}}}\n",
            status.as_u16(),
            title,
            detail
        );
        ("application/json", j)
    } else {
        let page = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {t}</title></head>\
             <body style=\"font-family:system-ui,sans-serif;max-width:40em;margin:4em auto\">\
             <h1>{code} {t}</h1><p>{d}</p><hr><p><small>warren relay</small></p></body></html>\n",
            code = status.as_u16(),
            t = escape(title),
            d = escape(detail)
        );
        ("text/html; charset=utf-8", page)
    };
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}

/// Logs the stable `listening` line for a listener.
pub fn log_listening(name: &str, addr: SocketAddr) {
    info!(name = %name, addr = %addr, "listening");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(domain: &str) -> HttpIngress {
        let pool = crate::pool::PortPool::new("127.0.0.1:1-1".parse().unwrap());
        let router = Router::new(
            domain.into(),
            80,
            pool,
            Duration::from_secs(1),
            Box::new(|_, _| unreachable!()),
        );
        HttpIngress { router: Arc::new(router), domain: domain.into() }
    }

    #[test]
    fn host_labels() {
        let i = ingress("example.com");
        assert_eq!(i.label("shop.example.com"), Some("shop"));
        assert_eq!(i.label("shop.example.com:8080"), Some("shop"));
        assert_eq!(i.label("Shop.Example.COM."), Some("Shop"));
        assert_eq!(i.label("example.com"), None);
        assert_eq!(i.label("a.b.example.com"), None);
        assert_eq!(i.label("shopexample.com"), None);
        assert_eq!(i.label(".example.com"), None);
        assert_eq!(i.label("x.other.org"), None);
        assert_eq!(i.label(""), None);
        // Not a valid subdomain (the router refuses it), but no panic on non-ASCII bytes either.
        assert_eq!(i.label("é.example.com"), Some("é"));
        assert_eq!(i.label("éééééééx"), None);
    }
}

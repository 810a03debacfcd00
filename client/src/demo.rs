//! `warren demo`: a relay, an agent, a sample web page, and an HTTP and a TCP tunnel to it, all
//! in one process on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_proto::message::Token;
use warren_proto::{AgentId, Protocol, Subdomain, TunnelName};
use warren_server::Relay;
use warren_server::config::{PortRange, RelayConfig};
use warren_transport::{Mode, RelayAddr, Trust};

use crate::agent::{self, AgentConfig, AgentEvent};
use crate::tunnel::{Target, TunnelSpec};

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The relay's public HTTP listener.
    pub http: SocketAddr,
    /// The relay's TCP port pool.
    pub ports: PortRange,
}

/// What the demo serves, once everything is up.
#[derive(Debug, Clone)]
pub struct DemoUrls {
    /// The HTTP tunnel.
    pub http: String,
    /// The TCP tunnel.
    pub tcp: String,
    /// The sample service behind both.
    pub sample: SocketAddr,
    /// The HTTP tunnel over the relay's HTTPS listener.
    pub https: Option<String>,
    /// The relay's dashboard and API.
    pub dashboard: Option<String>,
    /// The relay API's admin token.
    pub admin_token: String,
    /// The development CA that signs the HTTPS certificates.
    pub ca_path: std::path::PathBuf,
}

/// Runs the demo until `shutdown`; `ready` gets the URLs once both tunnels are bound.
pub async fn run(
    opts: DemoOptions,
    ready: tokio::sync::oneshot::Sender<DemoUrls>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Its own fresh directory: a predictable name in /tmp could be made first by someone else.
    let dir = warren_server::util::PrivateTempDir::new("demo")
        .map_err(|e| anyhow::anyhow!("cannot create the demo's data directory: {e}"))?;
    run_in(dir.path(), opts, ready, shutdown).await
}

async fn run_in(
    dir: &std::path::Path,
    opts: DemoOptions,
    ready: tokio::sync::oneshot::Sender<DemoUrls>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = warren_server::util::random_alnum(24);
    let mut config = RelayConfig::loopback(dir.to_path_buf(), &token, opts.ports);
    config.http = opts.http;
    let admin_token = config.admin_token.expose().to_owned();
    let relay = Relay::bind(config).await?;
    let control = relay.control_addr;
    let ca = relay.ca_der.clone();
    let https_port = relay.https_addr.map(|a| a.port());
    let dashboard = relay.api_addr.map(|a| format!("http://{a}/"));
    let ca_path = relay.ca_path.clone();

    let sample = TcpListener::bind(("127.0.0.1", 0)).await?;
    let sample_addr = sample.local_addr()?;
    let tasks = TaskTracker::new();
    tasks.spawn(relay.run(shutdown.clone()));
    tasks.spawn(serve_sample(sample, shutdown.clone()));

    let target = Target { host: "127.0.0.1".into(), port: sample_addr.port() };
    let parse = |s: &str| TunnelName::parse(s).map_err(anyhow::Error::from);
    let agent_cfg = AgentConfig {
        relay: RelayAddr { host: "127.0.0.1".into(), port: control.port() },
        token: Token::new(token),
        trust: Trust::Roots(vec![ca]),
        mode: Mode::Auto,
        agent_id: AgentId::parse("demo")?,
        tunnels: vec![
            TunnelSpec {
                subdomain: Some(Subdomain::parse("demo")?),
                ..TunnelSpec::new(parse("demo-http")?, Protocol::Http, target.clone())
            },
            TunnelSpec::new(parse("demo-tcp")?, Protocol::Tcp, target),
        ],
        allow_forward: Vec::new(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let agent_stop = shutdown.clone();
    let agent = tokio::spawn(agent::run(agent_cfg, tx, agent_stop));

    let mut urls = (None, None);
    let mut ready = Some(ready);
    while let Some(event) = rx.recv().await {
        let AgentEvent::Bound { name, url, .. } = event else { continue };
        if name.as_str() == "demo-http" {
            urls.0 = Some(url);
        } else {
            urls.1 = Some(url);
        }
        if let (Some(http), Some(tcp)) = (&urls.0, &urls.1)
            && let Some(tx) = ready.take()
        {
            let https = https_port.map(|p| format!("https://demo.localhost:{p}"));
            let _ = tx.send(DemoUrls {
                http: http.clone(),
                tcp: tcp.clone(),
                sample: sample_addr,
                https,
                ca_path: ca_path.clone(),
                dashboard: dashboard.clone(),
                admin_token: admin_token.clone(),
            });
        }
    }
    let outcome = agent.await?;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    outcome.map_err(anyhow::Error::from)
}

async fn serve_sample(listener: TcpListener, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
            () = shutdown.cancelled() => break,
        };
        tasks.spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                Ok::<_, Infallible>(sample_page(&req))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
    tasks.close();
}

fn sample_page(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut rows = String::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).replace('&', "&amp;").replace('<', "&lt;");
        rows.push_str(&format!("<tr><td><code>{k}</code></td><td><code>{v}</code></td></tr>"));
    }
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>warren demo</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:48em;margin:3em auto\">\
         <h1>Hello through warren</h1><p>This page is served by a small service on 127.0.0.1 and \
         reached you through a warren tunnel. The relay added the <code>X-Forwarded-*</code> \
         headers below.</p><p><code>{} {}</code></p><table>{rows}</table></body></html>\n",
        req.method(),
        req.uri().path().replace('<', "&lt;")
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

//! Who may reach a tunnel and what they are known as: PROXY protocol headers to the target,
//! per-tunnel basic auth, allow/deny lists, rate limits, header rewrites, body limits, and the
//! relay believing load balancers in `--trust-proxy` networks.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use warren_tests::client::{RawResponse, chunked_body, dechunk, expect_eof, raw_exchange, request};
use warren_tests::{
    Agent, EchoBackend, HttpBackend, HttpConn, HttpResponse, IO_TIMEOUT, ProxyBackend, Relay,
    RelayOpts, TempDir, Transport, parse_headers, random_bytes, tcp_echo, within,
};

/// `GET path` with `Host: host` and extra headers, on a fresh connection.
async fn get_with(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut req = request(Method::GET, host, path, Bytes::new());
    for (name, value) in headers {
        req.headers_mut().append(
            header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            header::HeaderValue::from_str(value).expect("header value"),
        );
    }
    within(IO_TIMEOUT, "GET", async { HttpConn::connect(addr).await?.send(req).await })
        .await
        .unwrap_or_else(|e| panic!("GET {path} with Host {host}: {e:#}"))
}

/// The values the backend's `/headers` answer gives for `name` (lower case).
fn seen(resp: &HttpResponse, name: &str) -> Vec<String> {
    parse_headers(&resp.text()).into_iter().filter(|(n, _)| n == name).map(|(_, v)| v).collect()
}

/// The single value the backend saw for `name`.
fn seen_one(resp: &HttpResponse, name: &str) -> String {
    let values = seen(resp, name);
    assert_eq!(values.len(), 1, "backend saw {name} {values:?}; all headers:\n{}", resp.text());
    values[0].clone()
}

/// The hops of an `X-Forwarded-For` value.
fn hops(xff: &str) -> Vec<String> {
    xff.split(',').map(|h| h.trim().to_owned()).collect()
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

/// Connects to `addr`, writes `prefix` (e.g. a PROXY header) and then
/// `GET path HTTP/1.1` with `Host`, the extra header lines and `Connection: close`, and reads
/// the whole response.
async fn raw_get(
    addr: SocketAddr,
    prefix: &[u8],
    host: &str,
    path: &str,
    lines: &[&str],
) -> RawResponse {
    let mut req = prefix.to_vec();
    req.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for l in lines {
        req.extend_from_slice(format!("{l}\r\n").as_bytes());
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    raw_exchange(addr, &req).await.unwrap_or_else(|e| panic!("raw GET {path}: {e:#}"))
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol from the agent to the target.

warren_tests::each_transport!(proxy_protocol_v2);

async fn proxy_protocol_v2(t: Transport) {
    proxy_protocol(t, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1() {
    proxy_protocol(Transport::Quic, 1).await;
}

/// `warren tcp --proxy-protocol vN`: each visitor connection reaches the target behind a PROXY
/// header naming that visitor (127.0.0.1 and the visitor socket's own port).
async fn proxy_protocol(t: Transport, version: u8) {
    let tmp = TempDir::new("proxy-proto");
    let relay = Relay::start_default().await;
    let backend = ProxyBackend::start().await.expect("proxy backend");
    let v = format!("v{version}");
    let mut agent = relay.spawn_tunnel(
        &tmp,
        "tcp",
        "pp",
        backend.port(),
        &["--proxy-protocol", &v, "--transport", t.as_str()],
    );
    let url = agent.tcp_url().await;
    let mut visitors = Vec::new();
    for i in 0..2 {
        let fut = async {
            let mut s = TcpStream::connect(url.addr()).await?;
            let local = s.local_addr()?;
            let payload = format!("visitor {i} says hello");
            s.write_all(payload.as_bytes()).await?;
            let want = format!("from {local}\n{payload}");
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got).await?;
            anyhow::Ok((local, want, String::from_utf8_lossy(&got).into_owned()))
        };
        let (local, want, got) = within(IO_TIMEOUT, "PROXY exchange", fut)
            .await
            .unwrap_or_else(|e| panic!("visitor {i}: {e:#}"));
        assert_eq!(got, want, "visitor {i} ({local}): what the backend answered");
        visitors.push(local);
    }
    let headers = backend.headers();
    assert_eq!(headers.len(), 2, "one PROXY header per connection: {headers:?}");
    for (h, local) in headers.iter().zip(&visitors) {
        assert_eq!(h.version, version, "{h:?}");
        assert_eq!(h.source, *local, "the PROXY header should name the visitor: {h:?}");
    }
    assert_eq!(backend.rejected(), 0, "connections reached the backend without a header");
    agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Basic auth.

/// `--basic-auth`: 401 with a Basic challenge without or with wrong credentials; either right
/// user gets through, and the backend never sees the credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth() {
    let tmp = TempDir::new("basic-auth");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(
        &tmp,
        "http",
        "auth",
        backend.port(),
        &["--basic-auth", "alice:s3cret", "--basic-auth", "bob:hunter2:with:colons"],
    );
    let host = agent.http_url().await.host();
    let addr = relay.http_addr;

    let bad = [
        ("no credentials", None),
        ("wrong password", Some(basic("alice", "wrong"))),
        ("wrong user", Some(basic("mallory", "s3cret"))),
        ("password of the other user", Some(basic("alice", "hunter2:with:colons"))),
        ("empty", Some(basic("", ""))),
        ("not base64", Some("Basic !!!not-base64!!!".to_owned())),
        ("other scheme", Some("Bearer s3cret".to_owned())),
    ];
    for (what, auth) in bad {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let resp = get_with(addr, &host, "/headers", &headers).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{what}: body {:?}", resp.text());
        let challenge = resp
            .headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate: {:?}", resp.headers));
        assert!(challenge.starts_with("Basic realm="), "{what}: challenge {challenge:?}");
        assert!(!resp.text().contains("x-forwarded-for"), "{what}: the backend answered");
    }

    for (user, pass) in [("alice", "s3cret"), ("bob", "hunter2:with:colons")] {
        let auth = basic(user, pass);
        let resp = get_with(addr, &host, "/headers", &[("authorization", &auth)]).await;
        assert_eq!(resp.status, StatusCode::OK, "{user}: body {:?}", resp.text());
        assert!(
            seen(&resp, "authorization").is_empty(),
            "the backend saw the credentials:\n{}",
            resp.text()
        );
        assert_eq!(seen_one(&resp, "x-real-ip"), "127.0.0.1");
    }
    agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Allow / deny.

/// `--allow`/`--deny` on HTTP tunnels: refused visitors get 403 and the backend is not asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_deny_http() {
    let tmp = TempDir::new("acl-http");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let cases: [(&str, &[&str], StatusCode); 5] = [
        ("deny-lo", &["--deny", "127.0.0.1/32"], StatusCode::FORBIDDEN),
        ("allow-ten", &["--allow", "10.0.0.0/8"], StatusCode::FORBIDDEN),
        ("allow-lo", &["--allow", "127.0.0.0/8"], StatusCode::OK),
        (
            "deny-first",
            &["--allow", "127.0.0.0/8", "--deny", "127.0.0.1/32"],
            StatusCode::FORBIDDEN,
        ),
        ("deny-other", &["--deny", "10.0.0.0/8", "--deny", "2001:db8::/32"], StatusCode::OK),
    ];
    let mut agents = Vec::new();
    for (name, flags, want) in cases {
        let mut agent = relay.spawn_tunnel(&tmp, "http", name, backend.port(), flags);
        let host = agent.http_url().await.host();
        let resp = get_with(relay.http_addr, &host, "/", &[]).await;
        assert_eq!(resp.status, want, "{name} {flags:?}: body {:?}", resp.text());
        if want == StatusCode::OK {
            assert_eq!(resp.text(), backend.greeting(), "{name}");
        } else {
            assert_ne!(
                resp.text(),
                backend.greeting(),
                "{name}: the backend answered a refused visitor"
            );
        }
        agents.push(agent);
    }
}

/// `--allow`/`--deny` on TCP tunnels: refused visitors are closed without reaching the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_deny_tcp() {
    let tmp = TempDir::new("acl-tcp");
    let relay = Relay::start_default().await;
    let cases: [(&str, &[&str], bool); 3] = [
        ("deny-lo", &["--deny", "127.0.0.1/32"], false),
        ("allow-ten", &["--allow", "10.0.0.0/8"], false),
        ("allow-lo", &["--allow", "127.0.0.0/8"], true),
    ];
    let mut keep = Vec::new();
    for (name, flags, allowed) in cases {
        let backend = EchoBackend::start().await;
        let mut agent = relay.spawn_tunnel(&tmp, "tcp", name, backend.port(), flags);
        let url = agent.tcp_url().await;
        if allowed {
            tcp_echo(url.addr(), 4096).await.unwrap_or_else(|e| panic!("{name} {flags:?}: {e:#}"));
            assert_eq!(backend.connections(), 1, "{name}");
        } else {
            expect_eof(url.addr()).await.unwrap_or_else(|e| panic!("{name} {flags:?}: {e:#}"));
            // Bytes sent by a refused visitor never come back.
            let fut = async {
                let mut s = TcpStream::connect(url.addr()).await?;
                let _ = s.write_all(b"ping").await;
                let mut buf = [0u8; 16];
                anyhow::Ok(s.read(&mut buf).await.unwrap_or(0))
            };
            let n = within(IO_TIMEOUT, "refused visitor", fut).await.expect("connect");
            assert_eq!(n, 0, "{name}: a refused visitor got {n} bytes back");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                backend.connections(),
                0,
                "{name} {flags:?}: the target saw a refused visitor"
            );
        }
        agent.assert_running();
        keep.push((agent, backend));
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limits.

fn retry_after(resp: &HttpResponse) -> u64 {
    resp.headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", resp.headers))
}

/// `--rate-limit 5/s`: of a quick burst of 20 requests the first 5 pass and later ones get 429
/// with `Retry-After` of at least 1 s; after waiting, requests pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit() {
    let tmp = TempDir::new("rate");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "rate", backend.port(), &["--rate-limit", "5/s"]);
    let host = agent.http_url().await.host();
    let mut statuses = Vec::new();
    let mut limited = Vec::new();
    for _ in 0..20 {
        let resp = get_with(relay.http_addr, &host, "/", &[]).await;
        statuses.push(resp.status.as_u16());
        match resp.status {
            StatusCode::OK => assert_eq!(resp.text(), backend.greeting()),
            StatusCode::TOO_MANY_REQUESTS => limited.push(retry_after(&resp)),
            other => panic!("unexpected {other} in the burst: {:?}", resp.text()),
        }
    }
    assert_eq!(statuses[..5], [200; 5], "the first 5 requests must pass: {statuses:?}");
    assert!(!limited.is_empty(), "no 429 in a burst of 20 at 5/s: {statuses:?}");
    assert!(limited.iter().all(|&s| s >= 1), "Retry-After below 1 s: {limited:?} ({statuses:?})");
    eprintln!("rate limit 5/s, burst of 20: {statuses:?}, Retry-After {limited:?}");

    tokio::time::sleep(
        Duration::from_secs(limited.iter().copied().max().unwrap_or(1))
            .max(Duration::from_millis(1200)),
    )
    .await;
    let resp = get_with(relay.http_addr, &host, "/", &[]).await;
    assert_eq!(resp.status, StatusCode::OK, "after waiting Retry-After: {:?}", resp.text());
    agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Header rewrites and body limits.

/// `--request-header-add/-remove` change what the backend sees; `--response-header-add/-remove`
/// what the visitor sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rewrites() {
    let tmp = TempDir::new("headers");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(
        &tmp,
        "http",
        "rewrite",
        backend.port(),
        &[
            "--request-header-add",
            "X-Added: from-the-relay",
            "--request-header-add",
            "X-Replaced: by-the-relay",
            "--request-header-remove",
            "X-Secret",
            "--response-header-add",
            "X-Frame-Options: DENY",
            "--response-header-remove",
            "Content-Type",
        ],
    );
    let host = agent.http_url().await.host();
    let resp = get_with(
        relay.http_addr,
        &host,
        "/headers",
        &[("x-secret", "top"), ("x-replaced", "by-the-visitor"), ("x-kept", "yes")],
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
    assert_eq!(seen_one(&resp, "x-added"), "from-the-relay");
    assert_eq!(seen_one(&resp, "x-replaced"), "by-the-relay");
    assert_eq!(seen_one(&resp, "x-kept"), "yes");
    assert!(seen(&resp, "x-secret").is_empty(), "X-Secret reached the backend:\n{}", resp.text());

    let values: Vec<_> = resp.headers.get_all("x-frame-options").iter().collect();
    assert_eq!(values, ["DENY"], "response headers: {:?}", resp.headers);
    assert!(
        resp.headers.get(header::CONTENT_TYPE).is_none(),
        "Content-Type should have been removed: {:?}",
        resp.headers
    );
    agent.assert_running();
}

/// `--max-body 64KiB`: 413 for a declared length over it and for a chunked body that grows
/// past it; bodies up to it pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body() {
    const MAX: usize = 64 * 1024;
    let tmp = TempDir::new("max-body");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "body", backend.port(), &["--max-body", "64KiB"]);
    let host = agent.http_url().await.host();
    let addr = relay.http_addr;

    let post = |body: Vec<u8>| {
        let host = host.clone();
        async move {
            let req = request(Method::POST, &host, "/echo", Bytes::from(body));
            within(IO_TIMEOUT, "POST", async { HttpConn::connect(addr).await?.send(req).await })
                .await
        }
    };
    let chunked = |chunks: Vec<Bytes>| {
        let host = host.clone();
        async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/echo")
                .header(header::HOST, &host)
                .body(chunked_body(chunks))
                .expect("request");
            within(IO_TIMEOUT, "chunked POST", async {
                HttpConn::connect(addr).await?.send_body(req).await
            })
            .await
        }
    };

    let body = random_bytes(MAX);
    let resp = post(body.clone()).await.expect("POST of exactly the limit");
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
    assert!(resp.body == body, "echo of {} bytes differs", body.len());

    let resp = post(random_bytes(MAX + 1)).await.expect("POST one byte over the limit");
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", resp.text());

    let small: Vec<Bytes> = (0..4).map(|_| Bytes::from(random_bytes(MAX / 8))).collect();
    let whole: Vec<u8> = small.iter().flat_map(|c| c.to_vec()).collect();
    let resp = chunked(small).await.expect("chunked POST under the limit");
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
    assert!(resp.body == whole, "chunked echo differs");

    let big: Vec<Bytes> = (0..10).map(|_| Bytes::from(random_bytes(MAX / 8))).collect();
    let resp = chunked(big).await.expect("chunked POST over the limit");
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", resp.text());

    let resp = post(b"still fine".to_vec()).await.expect("POST after the refusals");
    assert_eq!(resp.status, StatusCode::OK);
    agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// --trust-proxy.

/// A relay trusting 127.0.0.1 as a load balancer, with an HTTP tunnel to `/headers`.
async fn trusted_http(
    trust: bool,
    agent_flags: &[&str],
) -> (Relay, HttpBackend, Agent, String, TempDir) {
    let tmp = TempDir::new("trust");
    let opts = if trust {
        RelayOpts::default().args(&["--trust-proxy", "127.0.0.1/32"])
    } else {
        RelayOpts::default()
    };
    let relay = Relay::start(opts).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "lb", backend.port(), agent_flags);
    let host = agent.http_url().await.host();
    (relay, backend, agent, host, tmp)
}

const PROXY_V1: &[u8] = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n";

fn proxy_v2(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = vec![0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// From a trusted peer, a PROXY v1 (and v2) header in front of an HTTP request names the
/// visitor the backend is told about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_header_http() {
    let (relay, _backend, mut agent, host, _tmp) = trusted_http(true, &[]).await;
    let resp = raw_get(relay.http_addr, PROXY_V1, &host, "/headers", &[]).await;
    assert_eq!(resp.status, 200, "{}\n\n{}", resp.head, resp.body);
    assert_eq!(resp.seen_one("x-real-ip"), "198.51.100.7");
    let xff = resp.seen_one("x-forwarded-for");
    assert_eq!(
        hops(&xff).last().map(String::as_str),
        Some("198.51.100.7"),
        "X-Forwarded-For {xff:?}"
    );

    let resp =
        raw_get(relay.http_addr, &proxy_v2([203, 0, 113, 77], 50000), &host, "/headers", &[]).await;
    assert_eq!(resp.status, 200, "{}\n\n{}", resp.head, resp.body);
    assert_eq!(resp.seen_one("x-real-ip"), "203.0.113.77");

    // Without a header, the trusted peer itself is the visitor.
    let resp = raw_get(relay.http_addr, b"", &host, "/headers", &[]).await;
    assert_eq!(resp.status, 200, "{}\n\n{}", resp.head, resp.body);
    assert_eq!(resp.seen_one("x-real-ip"), "127.0.0.1");
    agent.assert_running();
}

/// From a trusted peer, `X-Forwarded-For` is believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_xff_is_believed() {
    let (relay, _backend, mut agent, host, _tmp) = trusted_http(true, &[]).await;
    let resp =
        get_with(relay.http_addr, &host, "/headers", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
    assert_eq!(seen_one(&resp, "x-real-ip"), "203.0.113.9", "headers:\n{}", resp.text());
    let xff = seen_one(&resp, "x-forwarded-for");
    assert!(hops(&xff).contains(&"203.0.113.9".to_owned()), "X-Forwarded-For {xff:?}");

    // The rightmost untrusted hop is the visitor; what it claims about earlier hops is not.
    let resp = get_with(
        relay.http_addr,
        &host,
        "/headers",
        &[("x-forwarded-for", "192.0.2.1, 203.0.113.10, 127.0.0.1")],
    )
    .await;
    assert_eq!(seen_one(&resp, "x-real-ip"), "203.0.113.10", "headers:\n{}", resp.text());
    agent.assert_running();
}

/// Without `--trust-proxy`, a visitor's own `X-Forwarded-For` is not believed: the backend
/// sees the peer address in X-Real-IP and X-Forwarded-For.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_xff_is_ignored() {
    let (relay, _backend, mut agent, host, _tmp) = trusted_http(false, &[]).await;
    let resp =
        get_with(relay.http_addr, &host, "/headers", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
    assert_eq!(seen_one(&resp, "x-real-ip"), "127.0.0.1", "headers:\n{}", resp.text());
    assert_eq!(seen_one(&resp, "x-forwarded-for"), "127.0.0.1", "headers:\n{}", resp.text());
    agent.assert_running();
}

/// Allow/deny lists judge the visitor named by a trusted PROXY header, not the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_visitor_is_judged_by_acl() {
    let (relay, _backend, mut agent, host, _tmp) =
        trusted_http(true, &["--deny", "198.51.100.0/24"]).await;
    let resp = raw_get(relay.http_addr, PROXY_V1, &host, "/headers", &[]).await;
    assert_eq!(
        resp.status, 403,
        "a denied visitor behind a trusted proxy: {}\n\n{}",
        resp.head, resp.body
    );
    let resp =
        raw_get(relay.http_addr, &proxy_v2([203, 0, 113, 5], 1234), &host, "/headers", &[]).await;
    assert_eq!(
        resp.status, 200,
        "another visitor behind the same proxy: {}\n\n{}",
        resp.head, resp.body
    );
    let resp =
        get_with(relay.http_addr, &host, "/headers", &[("x-forwarded-for", "198.51.100.200")])
            .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "a denied visitor named by X-Forwarded-For");
    agent.assert_running();
}

/// Rate limits count per visitor named by a trusted `X-Forwarded-For`: one busy visitor behind
/// the load balancer does not use up another's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_visitor_has_own_rate_limit() {
    let (relay, _backend, mut agent, host, _tmp) =
        trusted_http(true, &["--rate-limit", "2/s"]).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let resp =
            get_with(relay.http_addr, &host, "/", &[("x-forwarded-for", "203.0.113.1")]).await;
        statuses.push(resp.status.as_u16());
    }
    assert!(statuses.contains(&429), "visitor 203.0.113.1 was never limited: {statuses:?}");
    let resp = get_with(relay.http_addr, &host, "/", &[("x-forwarded-for", "203.0.113.2")]).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "visitor 203.0.113.2 was limited for 203.0.113.1's requests"
    );
    agent.assert_running();
}

/// On the TCP pool, a trusted PROXY header's visitor travels with the data stream: the agent's
/// own `--proxy-protocol` header names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_header_tcp_reaches_target() {
    let tmp = TempDir::new("trust-tcp");
    let relay = Relay::start(RelayOpts::default().args(&["--trust-proxy", "127.0.0.1/32"])).await;
    let backend = ProxyBackend::start().await.expect("proxy backend");
    let mut agent =
        relay.spawn_tunnel(&tmp, "tcp", "pp", backend.port(), &["--proxy-protocol", "v2"]);
    let url = agent.tcp_url().await;
    let fut = async {
        let mut s = TcpStream::connect(url.addr()).await?;
        s.write_all(PROXY_V1).await?;
        s.write_all(b"payload").await?;
        let want = "from 198.51.100.7:40000\npayload";
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await?;
        anyhow::Ok(String::from_utf8_lossy(&got).into_owned())
    };
    let got = within(IO_TIMEOUT, "PROXY through the pool", fut).await.expect("exchange");
    assert_eq!(got, "from 198.51.100.7:40000\npayload");
    let headers = backend.headers();
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers[0].source, "198.51.100.7:40000".parse().unwrap());
    agent.assert_running();
}

/// `--access-log`: one line per HTTP request and per TCP connection, naming the real visitor
/// (here one a trusted load balancer vouches for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_the_real_visitor() {
    let tmp = TempDir::new("access-log");
    let relay =
        Relay::start(RelayOpts::default().args(&["--access-log", "--trust-proxy", "127.0.0.1/32"]))
            .await;
    let backend = HttpBackend::start().await;
    let mut web = relay.spawn_tunnel(&tmp, "http", "logged", backend.port(), &[]);
    let host = web.http_url().await.host();
    let resp =
        get_with(relay.http_addr, &host, "/headers?q=1", &[("x-forwarded-for", "203.0.113.9")])
            .await;
    assert_eq!(resp.status, StatusCode::OK);
    let resp = get_with(relay.http_addr, "nobody.localhost", "/x", &[]).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let echo = EchoBackend::start().await;
    let mut tcp = relay.spawn_tunnel(&tmp, "tcp", "logged-tcp", echo.port(), &[]);
    let url = tcp.tcp_url().await;
    within(IO_TIMEOUT, "tcp echo", tcp_echo(url.addr(), 1000)).await.expect("echo");

    let lines = || relay.stderr().into_iter().filter(|l| l.contains("warren_server::access"));
    let found = warren_tests::eventually(IO_TIMEOUT, || {
        let all: Vec<String> = lines().collect();
        async move {
            let request = all.iter().find(|l| l.contains("path=/headers?q=1")).cloned();
            let missing = all.iter().find(|l| l.contains("status=404")).cloned();
            let conn = all.iter().find(|l| l.contains("proto=tcp")).cloned();
            match (request, missing, conn) {
                (Some(r), Some(m), Some(c)) => Ok((r, m, c)),
                _ => anyhow::bail!("access lines so far: {all:#?}"),
            }
        }
    })
    .await;
    let (request, missing, conn) = found;
    assert!(request.contains("visitor=203.0.113.9"), "{request}");
    assert!(request.contains("status=200") && request.contains("method=GET"), "{request}");
    assert!(missing.contains("visitor=127.0.0.1") && missing.contains("host=nobody.localhost"));
    assert!(conn.contains("visitor=127.0.0.1:") && conn.contains("tunnel=logged-tcp"), "{conn}");
    assert!(conn.contains("bytes_in=1000") && conn.contains("bytes_out=1000"), "{conn}");
    web.assert_running();
    tcp.assert_running();
}

#[test]
fn base64_matches_rfc4648() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(i.as_bytes()), o);
    }
    assert_eq!(dechunk("5\r\nhello\r\n3\r\n...\r\n0\r\n\r\n"), "hello...");
}

//! The relay's public edge: slow visitors are cut off, one address cannot hold too many
//! connections, hop-by-hop headers stop at the relay, a request goes where its target says or
//! is refused, and every error a visitor can meet comes as an HTML page or, when asked for, as
//! JSON, with the right status.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use warren_tests::client::{RawResponse, raw_exchange, request};
use warren_tests::{
    EchoBackend, HttpBackend, HttpConn, HttpResponse, HttpSetup, IO_TIMEOUT, Relay, RelayOpts,
    TempDir, Transport, closed_port, eventually, expect_get, h2_get_with, parse_headers, tcp_echo,
    tls_connect, within,
};

/// Reads until the peer closes (EOF or reset) and returns what it sent before, or `None` if
/// it is still open at `until`.
async fn closed_by<S: AsyncRead + Unpin>(s: &mut S, until: Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Slow visitors.

/// The header timeout the slow-visitor tests give the relay.
const HEADER_TIMEOUT: &str = "1s";
/// Earliest a slow visitor may be cut off (the timeout, less some slack for timer jitter).
const CUT_NOT_BEFORE: Duration = Duration::from_millis(800);
/// Latest it must be cut off: "within ~1-3 s", plus some slack for a loaded machine.
const CUT_BY: Duration = Duration::from_millis(3500);

/// Whether a slow visitor that connected at `connected` was cut off in time; `closed` is when
/// and after what bytes from the relay.
fn cut_in_time(
    what: &str,
    connected: Instant,
    closed: Option<(Instant, Vec<u8>)>,
) -> Result<(), String> {
    let Some((at, said)) = closed else {
        return Err(format!(
            "{what}: still connected {CUT_BY:?} after connecting (--header-timeout {HEADER_TIMEOUT})"
        ));
    };
    let after = at - connected;
    let text = String::from_utf8_lossy(&said);
    eprintln!("{what}: cut off after {after:?}; the relay said {text:?}");
    if after < CUT_NOT_BEFORE {
        return Err(format!("{what}: cut off after only {after:?}, before the header timeout"));
    }
    let polite =
        said.is_empty() || ["HTTP/1.1 408", "HTTP/1.1 400"].iter().any(|s| text.starts_with(s));
    if !polite {
        return Err(format!("{what}: a cut-off visitor may get a 408 at most, got {text:?}"));
    }
    Ok(())
}

fn assert_cut_in_time(what: &str, connected: Instant, closed: Option<(Instant, Vec<u8>)>) {
    if let Err(e) = cut_in_time(what, connected, closed) {
        panic!("{e}");
    }
}

/// `--header-timeout 1s`: a visitor that sends part of a request head and then nothing, and one
/// that trickles its head a byte at a time, are cut off within about 1-3 s, while an ordinary
/// visitor is served normally meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_is_cut_off() {
    let s = HttpSetup::start_with(
        RelayOpts::default().args(&["--header-timeout", HEADER_TIMEOUT]),
        Transport::Quic,
    )
    .await;
    let addr = s.addr();
    let host = s.host();
    let greeting = s.backend.greeting();

    let partial = async {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let connected = Instant::now();
        c.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Partial: ").as_bytes())
            .await
            .expect("partial head");
        let closed = closed_by(&mut c, connected + CUT_BY).await.map(|b| (Instant::now(), b));
        (connected, closed)
    };
    let trickle = async {
        let c = TcpStream::connect(addr).await.expect("connect");
        let connected = Instant::now();
        let (mut r, mut w) = c.into_split();
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: {}\r\n\r\n", "a".repeat(64));
        let writer = tokio::spawn(async move {
            for b in head.as_bytes() {
                if w.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout_at(connected + CUT_BY, r.read(&mut buf)).await {
                Err(_) => break None,
                Ok(Ok(0) | Err(_)) => break Some((Instant::now(), got)),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        };
        writer.abort();
        (connected, closed)
    };
    let ordinary = async {
        // While the slow visitors hang, others are served at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..3 {
            let started = Instant::now();
            expect_get(addr, &host, &greeting)
                .await
                .unwrap_or_else(|e| panic!("ordinary request {i} during the slow ones: {e:#}"));
            let took = started.elapsed();
            // Much less than the header timeout: not queued behind the slow visitors.
            assert!(took < Duration::from_secs(1), "ordinary request {i} took {took:?}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let (p, t, ()) =
        within(IO_TIMEOUT, "slow visitors", async { tokio::join!(partial, trickle, ordinary) })
            .await;
    assert_cut_in_time("partial head", p.0, p.1);
    assert_cut_in_time("trickled head", t.0, t.1);
    expect_get(addr, &host, &greeting).await.expect("served after the slow visitors");
}

/// Connects to `addr`, sends `bytes` (maybe none) and waits to be cut off.
async fn cut_off_after_sending(
    addr: SocketAddr,
    bytes: &[u8],
) -> (Instant, Option<(Instant, Vec<u8>)>) {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    let connected = Instant::now();
    c.write_all(bytes).await.expect("write");
    let closed = closed_by(&mut c, connected + CUT_BY).await.map(|b| (Instant::now(), b));
    (connected, closed)
}

/// Completes a TLS handshake with the relay's HTTPS listener for `name`, then sends nothing.
async fn silent_after_tls_handshake(
    relay: &Relay,
    name: &str,
) -> (Instant, Option<(Instant, Vec<u8>)>) {
    let connected = Instant::now();
    let mut tls = tls_connect(relay.https_addr, name, &relay.ca_path, &[b"http/1.1"])
        .await
        .expect("TLS handshake");
    let closed = closed_by(&mut tls, connected + CUT_BY).await.map(|b| (Instant::now(), b));
    (connected, closed)
}

/// `--header-timeout 1s` also bounds how long a visitor may stay silent before its request
/// head (on HTTP, or on HTTPS after the TLS handshake), or stop inside the HTTP/2 preface
/// (which is sniffed before HTTP/1 parsing starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_visitor_is_cut_off() {
    let s = HttpSetup::start_with(
        RelayOpts::default().args(&["--header-timeout", HEADER_TIMEOUT]),
        Transport::Quic,
    )
    .await;
    let (relay, addr) = (&s.relay, s.addr());
    let name = format!("{}.localhost", s.url.subdomain);
    let (silent, preface, tls) = within(IO_TIMEOUT, "silent visitors", async {
        tokio::join!(
            cut_off_after_sending(addr, b""),
            cut_off_after_sending(addr, b"PRI * HTTP/2"),
            silent_after_tls_handshake(relay, &name),
        )
    })
    .await;
    let failures: Vec<String> = [
        ("silent visitor (HTTP)", silent),
        ("visitor stopping inside the HTTP/2 preface (HTTP)", preface),
        ("silent visitor after the TLS handshake (HTTPS)", tls),
    ]
    .into_iter()
    .filter_map(|(what, (connected, closed))| cut_in_time(what, connected, closed).err())
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `--header-timeout 1s` on the HTTPS listener: a visitor that sends half a TLS record header
/// and then nothing, and one that completes the handshake for a tunnel's name and then sends
/// half a request head, are cut off within about 1-3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_visitor_is_cut_off() {
    let mut s = HttpSetup::start_with(
        RelayOpts::default().args(&["--header-timeout", HEADER_TIMEOUT]),
        Transport::Quic,
    )
    .await;
    let https = s.relay.https_addr;
    let name = format!("{}.localhost", s.url.subdomain);
    let ca = s.relay.ca_path.clone();
    let half_hello = async {
        let mut c = TcpStream::connect(https).await.expect("connect to HTTPS");
        let connected = Instant::now();
        c.write_all(&[0x16, 0x03, 0x01]).await.expect("start of a TLS record");
        // Whatever the relay says on the way out (a TLS alert, say) does not matter here.
        let closed =
            closed_by(&mut c, connected + CUT_BY).await.map(|_| (Instant::now(), Vec::new()));
        (connected, closed)
    };
    let half_head = async {
        let connected = Instant::now();
        let mut tls = tls_connect(https, &name, &ca, &[b"http/1.1"]).await.expect("TLS handshake");
        tls.write_all(format!("GET / HTTP/1.1\r\nHost: {name}\r\nX-Partial: ").as_bytes())
            .await
            .expect("partial head");
        tls.flush().await.expect("flush");
        let closed = closed_by(&mut tls, connected + CUT_BY).await.map(|b| (Instant::now(), b));
        (connected, closed)
    };
    let (h, r) =
        within(IO_TIMEOUT, "slow TLS visitors", async { tokio::join!(half_hello, half_head) })
            .await;
    assert_cut_in_time("half a TLS hello", h.0, h.1);
    assert_cut_in_time("half a request head over TLS", r.0, r.1);
    s.relay.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Request head size and idle connections.

/// Sends `GET /` with an `X-Big` header of `len` bytes on a fresh connection and returns the
/// status, or `None` if the relay closed the connection without an answer.
async fn get_with_big_header(addr: SocketAddr, host: &str, len: usize) -> Option<u16> {
    let fut = async {
        let mut c = TcpStream::connect(addr).await?;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "b".repeat(len)
        );
        // The relay may refuse before reading everything; what it answered still counts.
        let _ = c.write_all(req.as_bytes()).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        anyhow::Ok(out)
    };
    let out = within(IO_TIMEOUT, "GET with a big header", fut).await.expect("connect");
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).and_then(|s| s.parse().ok())
}

/// `--max-header-size 16384`: a request head well under it passes; one of 20 KB or 64 KB is
/// refused (431/400 or closed) without reaching the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_size() {
    let s = HttpSetup::start_with(
        RelayOpts::default().args(&["--max-header-size", "16384"]),
        Transport::Quic,
    )
    .await;
    let host = s.host();
    assert_eq!(get_with_big_header(s.addr(), &host, 12 * 1024).await, Some(200), "a 12 KB head");
    for len in [20 * 1024, 64 * 1024] {
        let status = get_with_big_header(s.addr(), &host, len).await;
        assert!(
            matches!(status, None | Some(400 | 431)),
            "a head with a {len}-byte header and --max-header-size 16384 got {status:?}"
        );
    }
    expect_get(s.addr(), &host, &s.backend.greeting()).await.expect("served afterwards");
}

/// `--idle-timeout 2s`: a keep-alive connection with nothing more to say is closed after about
/// 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_is_closed() {
    let s = HttpSetup::start_with(
        RelayOpts::default().args(&["--idle-timeout", "2s"]),
        Transport::Quic,
    )
    .await;
    let mut c = TcpStream::connect(s.addr()).await.expect("connect");
    c.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", s.host()).as_bytes())
        .await
        .expect("request");
    let started = Instant::now();
    let said = closed_by(&mut c, started + Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection still open after 10 s (--idle-timeout 2s)");
    let after = started.elapsed();
    let text = String::from_utf8_lossy(&said);
    assert!(text.starts_with("HTTP/1.1 200"), "the request was not answered first: {text:?}");
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_secs(5),
        "idle connection closed after {after:?}, want about 2 s"
    );
}

// ---------------------------------------------------------------------------------------------
// Connections per address.

/// `--max-conns-per-ip 3`: with three connections held, a fourth from the same address (to any
/// listener) is closed at once, while the three held ones keep working; once one closes, a new
/// one is let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_per_ip() {
    let s = HttpSetup::start_with(
        RelayOpts::default().args(&["--max-conns-per-ip", "3"]),
        Transport::Tcp,
    )
    .await;
    let echo = EchoBackend::start().await;
    let mut tcp_agent =
        s.relay.spawn_tunnel(&s.tmp, "tcp", "echo", echo.port(), &["--transport", "tcp"]);
    let tcp_url = tcp_agent.tcp_url().await;
    let host = s.host();
    let greeting = s.backend.greeting();

    let mut held = Vec::new();
    for i in 0..3 {
        let mut conn =
            within(IO_TIMEOUT, "connect", HttpConn::connect(s.addr())).await.expect("connect");
        let resp = within(IO_TIMEOUT, "GET", conn.get(&host, "/"))
            .await
            .unwrap_or_else(|e| panic!("held connection {i}: {e:#}"));
        assert_eq!(resp.status, StatusCode::OK, "held connection {i}");
        held.push(conn);
    }

    for (what, addr) in [("HTTP", s.addr()), ("TCP pool", tcp_url.addr())] {
        let started = Instant::now();
        let mut fourth = TcpStream::connect(addr).await.expect("the kernel accepts the 4th");
        let _ =
            fourth.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await;
        let closed = closed_by(&mut fourth, started + Duration::from_secs(5)).await;
        let took = started.elapsed();
        let said = closed.unwrap_or_else(|| panic!("{what}: a 4th connection stayed open"));
        assert!(
            said.is_empty(),
            "{what}: the 4th connection was answered: {:?}",
            String::from_utf8_lossy(&said)
        );
        assert!(
            took < Duration::from_secs(2),
            "{what}: the 4th connection was closed only after {took:?}"
        );
    }
    assert_eq!(echo.connections(), 0, "the TCP target saw the refused 4th connection");

    for (i, conn) in held.iter_mut().enumerate() {
        let resp = within(IO_TIMEOUT, "GET", conn.get(&host, "/"))
            .await
            .unwrap_or_else(|e| panic!("held connection {i} after the refusals: {e:#}"));
        assert_eq!(resp.status, StatusCode::OK, "held connection {i}");
        assert_eq!(resp.text(), greeting);
    }

    held.pop();
    eventually(IO_TIMEOUT, || tcp_echo(tcp_url.addr(), 1024)).await;
    tcp_agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Error pages.

/// `GET /` with `Host: host`, asking for JSON or not.
async fn fetch(addr: SocketAddr, host: &str, json: bool) -> HttpResponse {
    let mut req = request(Method::GET, host, "/", Bytes::new());
    let accept =
        if json { "application/json" } else { "text/html,application/xhtml+xml,*/*;q=0.8" };
    req.headers_mut().insert(header::ACCEPT, accept.parse().expect("accept"));
    within(IO_TIMEOUT, "GET", async { HttpConn::connect(addr).await?.send(req).await })
        .await
        .unwrap_or_else(|e| panic!("GET / with Host {host}: {e:#}"))
}

fn content_type(resp: &HttpResponse) -> String {
    resp.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Checks an error page: status, and an HTML page or the JSON
/// `{"error":{"status","title","message"}}`; `title_has` must appear in the title (and the page).
fn check_error_page(
    what: &str,
    resp: &HttpResponse,
    status: StatusCode,
    json: bool,
    title_has: &str,
) {
    let body = resp.text();
    assert_eq!(resp.status, status, "{what}: body {body:?}");
    let ct = content_type(resp);
    if json {
        assert!(
            ct.starts_with("application/json"),
            "{what} (JSON): Content-Type {ct:?}; body {body:?}"
        );
        let v =
            parse_json(&body).unwrap_or_else(|e| panic!("{what}: invalid JSON ({e}): {body:?}"));
        let err = v.get("error").unwrap_or_else(|| panic!("{what}: no `error` object: {body:?}"));
        assert_eq!(
            err.get("status"),
            Some(&Json::Num(f64::from(status.as_u16()))),
            "{what}: error.status in {body:?}"
        );
        let title = match err.get("title") {
            Some(Json::Str(t)) if !t.is_empty() => t,
            other => panic!("{what}: error.title {other:?} in {body:?}"),
        };
        assert!(
            matches!(err.get("message"), Some(Json::Str(m)) if !m.is_empty()),
            "{what}: error.message in {body:?}"
        );
        assert!(
            title.to_ascii_lowercase().contains(&title_has.to_ascii_lowercase()),
            "{what}: title {title:?} should mention {title_has:?}"
        );
    } else {
        assert!(ct.starts_with("text/html"), "{what} (HTML): Content-Type {ct:?}; body {body:?}");
        let lower = body.to_ascii_lowercase();
        assert!(lower.contains("<html"), "{what}: not an HTML page: {body:?}");
        assert!(
            lower.contains(&title_has.to_ascii_lowercase()),
            "{what}: the page should mention {title_has:?}: {body:?}"
        );
    }
}

/// Both forms of the error page for `host`.
async fn check_both(
    what: &str,
    addr: SocketAddr,
    host: &str,
    status: StatusCode,
    title_has: &str,
) -> [HttpResponse; 2] {
    let html = fetch(addr, host, false).await;
    check_error_page(what, &html, status, false, title_has);
    let json = fetch(addr, host, true).await;
    check_error_page(what, &json, status, true, title_has);
    [html, json]
}

/// A host no tunnel serves: 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_unknown_host() {
    let relay = Relay::start_default().await;
    let host = format!("{}.localhost:{}", warren_tests::unique("nobody"), relay.http_addr.port());
    check_both("unknown host", relay.http_addr, &host, StatusCode::NOT_FOUND, "").await;
}

/// A leased tunnel whose agent is gone (within the lease grace): 502 "Tunnel offline".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_tunnel_offline() {
    let mut s = HttpSetup::start(Transport::Tcp).await;
    expect_get(s.addr(), &s.host(), &s.backend.greeting()).await.expect("tunnel up");
    s.agent.kill().await;
    let (addr, host) = (s.addr(), s.host());
    eventually(IO_TIMEOUT, || async {
        let resp = fetch(addr, &host, false).await;
        anyhow::ensure!(
            resp.status == StatusCode::BAD_GATEWAY,
            "still {} {:?}",
            resp.status,
            resp.text()
        );
        Ok(())
    })
    .await;
    check_both("tunnel offline", addr, &host, StatusCode::BAD_GATEWAY, "Tunnel offline").await;
}

/// A tunnel whose target refuses connections: the agent's 502, marked `x-warren-error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_target_unreachable() {
    let tmp = TempDir::new("err-target");
    let relay = Relay::start_default().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "down", closed_port(), &[]);
    let host = agent.http_url().await.host();
    for resp in
        check_both("target refused", relay.http_addr, &host, StatusCode::BAD_GATEWAY, "").await
    {
        let marker = resp.headers.get("x-warren-error").and_then(|v| v.to_str().ok());
        assert_eq!(marker, Some("target-unreachable"), "headers {:?}", resp.headers);
    }
    agent.assert_running();
}

/// Over the rate limit: 429, in both forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_rate_limited() {
    let tmp = TempDir::new("err-rate");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "rate", backend.port(), &["--rate-limit", "1/s"]);
    let host = agent.http_url().await.host();
    for json in [false, true] {
        let mut limited = None;
        for _ in 0..10 {
            let resp = fetch(relay.http_addr, &host, json).await;
            if resp.status == StatusCode::TOO_MANY_REQUESTS {
                limited = Some(resp);
                break;
            }
            assert_eq!(resp.status, StatusCode::OK, "{:?}", resp.text());
        }
        let resp =
            limited.unwrap_or_else(|| panic!("10 requests at 1/s without a 429 (json: {json})"));
        check_error_page("rate limited", &resp, StatusCode::TOO_MANY_REQUESTS, json, "");
        assert!(resp.headers.contains_key(header::RETRY_AFTER), "429 without Retry-After");
    }
    agent.assert_running();
}

/// A denied visitor: 403, in both forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_forbidden() {
    let tmp = TempDir::new("err-deny");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "deny", backend.port(), &["--deny", "127.0.0.0/8"]);
    let host = agent.http_url().await.host();
    check_both("forbidden", relay.http_addr, &host, StatusCode::FORBIDDEN, "").await;
    agent.assert_running();
}

/// Missing credentials: 401 with a challenge, in both forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_page_unauthorized() {
    let tmp = TempDir::new("err-auth");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "auth", backend.port(), &["--basic-auth", "u:p"]);
    let host = agent.http_url().await.host();
    for resp in
        check_both("unauthorized", relay.http_addr, &host, StatusCode::UNAUTHORIZED, "").await
    {
        assert!(resp.headers.contains_key(header::WWW_AUTHENTICATE), "401 without a challenge");
    }
    agent.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Hop-by-hop headers and the host a request is for.

/// Headers that describe one connection and must never reach the target.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// `raw_exchange`, failing the test on a broken exchange.
async fn exchange(addr: SocketAddr, request: &str) -> RawResponse {
    raw_exchange(addr, request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("request {request:?}: {e:#}"))
}

/// A request head naming `X-Secret` in `Connection`, with every other hop-by-hop header a
/// visitor can send, and one ordinary header.
fn hop_by_hop_request(target: &str, host: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: X-Secret, keep-alive\r\n\
         Connection: close\r\nX-Secret: for the relay only\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: trailers\r\n\
         Proxy-Authorization: Basic dTpw\r\nX-End-To-End: kept\r\n\r\n"
    )
}

/// The target saw none of `names` and `X-End-To-End: kept`.
fn assert_target_saw_none(what: &str, resp: &RawResponse, names: &[&str]) {
    assert_eq!(resp.status, 200, "{what}: {}\n\n{}", resp.head, resp.body);
    let leaked: Vec<(&str, Vec<String>)> =
        names.iter().map(|n| (*n, resp.seen(n))).filter(|(_, v)| !v.is_empty()).collect();
    assert!(leaked.is_empty(), "{what}: the target saw {leaked:?}; all it saw:\n{}", resp.body);
    assert_eq!(resp.seen_one("x-end-to-end"), "kept", "{what}");
}

/// HTTP/1.1 visitor, HTTP/1.1 upstream: `Connection` and the header it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE` and `Proxy-Authorization` stop at the relay, and so do the
/// target's `Connection`-named, `Keep-Alive` and `Proxy-Authenticate` on the way back; a
/// transfer coding the relay would have to drop unannounced is refused with 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_the_relay() {
    let s = HttpSetup::start(Transport::Quic).await;
    let (addr, host) = (s.addr(), s.host());
    let resp = exchange(addr, &hop_by_hop_request("/headers", &host)).await;
    let mut names = HOP_BY_HOP.to_vec();
    names.push("x-secret");
    assert_target_saw_none("HTTP/1.1 upstream", &resp, &names);

    let resp = exchange(
        addr,
        &format!("GET /hop-by-hop HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    for name in ["x-hop-secret", "keep-alive", "proxy-authenticate"] {
        assert!(resp.header(name).is_empty(), "the visitor got {name}:\n{}", resp.head);
    }
    let connection = resp.header("connection").join(", ").to_ascii_lowercase();
    assert!(!connection.contains("x-hop-secret"), "the visitor got {connection:?}");
    assert_eq!(resp.header("x-end-to-end"), ["kept"], "{}", resp.head);

    let resp = exchange(
        addr,
        &format!(
            "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(resp.status, 501, "gzip, chunked: {}\n\n{}", resp.head, resp.body);
    assert!(resp.body.contains("gzip"), "the 501 should name the coding: {}", resp.body);
}

/// HTTP/1.1 visitor, HTTP/2 upstream (`--upstream-http2`): the header `Connection` names stops
/// at the relay too (HTTP/2 forbids `Connection` itself), while `TE: trailers` goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_before_an_h2_upstream() {
    let tmp = TempDir::new("hop-h2");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "h2up", backend.port(), &["--upstream-http2"]);
    let host = agent.http_url().await.host();
    let resp = exchange(relay.http_addr, &hop_by_hop_request("/headers", &host)).await;
    let names: Vec<&str> =
        HOP_BY_HOP.iter().copied().filter(|n| *n != "te").chain(["x-secret"]).collect();
    assert_target_saw_none("HTTP/2 upstream", &resp, &names);
    assert_eq!(resp.seen_one("te"), "trailers", "gRPC needs `te: trailers`");
    agent.assert_running();
}

/// HTTP/2 visitors (h2c with prior knowledge): `te: trailers` does not reach an HTTP/1.1
/// upstream, and a `host` header naming another host than `:authority` is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_visitor_headers() {
    let s = HttpSetup::start(Transport::Quic).await;
    let (addr, host) = (s.addr(), s.host());
    let tcp = TcpStream::connect(addr).await.expect("connect to the HTTP listener");
    let (status, _, _, body) = h2_get_with(
        tcp,
        "http",
        &host,
        "/headers",
        &[("te", "trailers"), ("x-end-to-end", "kept")],
    )
    .await
    .expect("h2c GET /headers");
    let seen = parse_headers(&String::from_utf8_lossy(&body));
    assert_eq!(status, StatusCode::OK, "{seen:?}");
    assert!(seen.iter().all(|(n, _)| n != "te"), "the HTTP/1.1 target saw te: {seen:?}");
    assert!(seen.contains(&("x-end-to-end".into(), "kept".into())), "{seen:?}");

    let other = format!("{}.localhost:{}", warren_tests::unique("other"), addr.port());
    let tcp = TcpStream::connect(addr).await.expect("connect to the HTTP listener");
    let (status, _, headers, body) =
        h2_get_with(tcp, "http", &host, "/headers", &[("host", &other)]).await.expect("h2c GET");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_REQUEST, ":authority {host} with host {other}: {body}");
    assert!(body.contains("Host header"), "the page should say what is wrong: {body}");
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(ct.starts_with("text/html"), "{ct}");
}

/// Two `Host` headers, the same twice or two different ones: 400 from the relay, before any
/// tunnel is chosen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_host_is_refused() {
    let s = HttpSetup::start(Transport::Quic).await;
    let (addr, host) = (s.addr(), s.host());
    let other = format!("{}.localhost:{}", warren_tests::unique("other"), addr.port());
    for second in [host.clone(), other] {
        let resp = exchange(
            addr,
            &format!(
                "GET /headers HTTP/1.1\r\nHost: {host}\r\nHost: {second}\r\n\
                 Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(resp.status, 400, "Host {host} and {second}: {}\n\n{}", resp.head, resp.body);
        assert!(resp.body.contains("2 Host headers"), "{}", resp.body);
        assert!(!resp.body.contains("x-forwarded-for"), "the target answered: {}", resp.body);
    }
    expect_get(addr, &host, &s.backend.greeting()).await.expect("one Host still works");
}

/// `GET http://NAME/x HTTP/1.1`: routed by NAME, whatever tunnel `Host` would pick; a `Host`
/// naming another host (or port) is refused with 400; the target gets the origin form `/x`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_is_routed_by_its_authority() {
    let tmp = TempDir::new("absolute");
    let relay = Relay::start_default().await;
    let (a, b) = (HttpBackend::start_named("a").await, HttpBackend::start_named("b").await);
    let mut agent_a = relay.spawn_tunnel(&tmp, "http", "a", a.port(), &[]);
    let mut agent_b = relay.spawn_tunnel(&tmp, "http", "b", b.port(), &[]);
    let url_a = agent_a.http_url().await;
    let url_b = agent_b.http_url().await;
    let (host_a, host_b) = (url_a.host(), url_b.host());
    let addr = relay.http_addr;
    let get = |target: String, host: Option<String>| async move {
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        exchange(addr, &format!("GET {target} HTTP/1.1\r\n{host}Connection: close\r\n\r\n")).await
    };

    // Routed by the target, with or without a Host that agrees (in another case).
    for host in [None, Some(host_b.to_ascii_uppercase())] {
        let resp = get(format!("http://{host_b}/"), host.clone()).await;
        assert_eq!((resp.status, resp.body.as_str()), (200, "hello from b\n"), "Host {host:?}");
        let resp = get(format!("http://{host_b}/target"), host.clone()).await;
        assert_eq!(
            (resp.status, resp.body.as_str()),
            (200, "/target"),
            "the target must get the origin form (Host {host:?})"
        );
    }

    // A Host naming another tunnel, or the same name on another port: refused.
    let name_b = format!("{}.localhost", url_b.subdomain);
    for host in [host_a.clone(), name_b] {
        let resp = get(format!("http://{host_b}/"), Some(host.clone())).await;
        assert_eq!(resp.status, 400, "http://{host_b}/ with Host {host}: {}", resp.body);
        assert!(resp.body.contains("Host header says"), "{}", resp.body);
    }
    expect_get(addr, &host_a, &a.greeting()).await.expect("tunnel a by Host");
    agent_a.assert_running();
    agent_b.assert_running();
}

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader, to check the error bodies are real JSON.

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Self::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = JsonParser { s: text.as_bytes(), i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing bytes at {}", p.i));
    }
    Ok(v)
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| b" \t\r\n".contains(b)) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> Result<(), String> {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(format!("expected {lit:?} at {}", self.i))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return Err("nested too deep".into());
        }
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'n') => self.eat("null").map(|()| Json::Null),
            Some(b't') => self.eat("true").map(|()| Json::Bool(true)),
            Some(b'f') => self.eat("false").map(|()| Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("expected , or ] at {}", self.i)),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    self.eat(":")?;
                    fields.push((key, self.value(depth + 1)?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(format!("expected , or }} at {}", self.i)),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|b| b"+-.eE0123456789".contains(b)) {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                t.parse().map(Json::Num).map_err(|_| format!("bad number {t:?}"))
            }
            Some(b) => Err(format!("unexpected byte {:?} at {}", *b as char, self.i)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat("\"")?;
        let mut out = Vec::new();
        loop {
            let b = *self.s.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match b {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            self.i += 4;
                            let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                            let n = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            char::from_u32(n).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(format!("bad escape at {}", self.i)),
                    };
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                }
                0..=0x1f => return Err(format!("control character in string at {}", self.i)),
                _ => out.push(b),
            }
        }
    }
}

#[test]
fn json_reader() {
    let v = parse_json(r#" {"error": {"status": 404, "title": "Not \"found\"", "message": "a\u00e9", "x": [1, -2.5e1, true, null, {}]}} "#)
        .unwrap();
    let e = v.get("error").unwrap();
    assert_eq!(e.get("status"), Some(&Json::Num(404.0)));
    assert_eq!(e.get("title"), Some(&Json::Str("Not \"found\"".into())));
    assert_eq!(e.get("message"), Some(&Json::Str("a\u{e9}".into())));
    assert_eq!(
        e.get("x"),
        Some(&Json::Arr(vec![
            Json::Num(1.0),
            Json::Num(-25.0),
            Json::Bool(true),
            Json::Null,
            Json::Obj(vec![])
        ]))
    );
    for bad in ["", "{", "<html>", r#"{"a":1,}"#, r#"{"a" 1}"#, "[1 2]", "\"x", "{} x"] {
        assert!(parse_json(bad).is_err(), "{bad:?} accepted");
    }
}

/// Limits that cannot work are refused when the relay starts, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_limits_are_refused_at_start() {
    for (flag, value, says) in [
        ("--max-header-size", "4096", "at least 8192"),
        ("--header-timeout", "soon", "invalid duration"),
        ("--trust-proxy", "10.0.0.0/33", "invalid network"),
    ] {
        let out = tokio::process::Command::new(warren_tests::process::binary("warren-server"))
            .args([flag, value, "--data", "/nonexistent/never-created"])
            .output()
            .await
            .expect("run warren-server");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

//! HTTP tunnels through the real relay and agent, over each transport.

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use warren_tests::client::{chunked_body, websocket_echo};
use warren_tests::{
    BULK_TIMEOUT, HttpConn, HttpSetup, IO_TIMEOUT, RelayOpts, Transport, http_get, http_post,
    parse_headers, random_bytes, sha256, within,
};

warren_tests::each_transport!(
    get,
    post_10mb_echo,
    post_chunked_echo,
    keep_alive_200_requests,
    websocket_echo_through_tunnel,
    forwarded_headers,
);

/// A plain GET reaches the backend; the port in `Host` does not matter for routing.
async fn get(t: Transport) {
    let s = HttpSetup::start(t).await;
    let greeting = s.backend.greeting();
    for host in [
        s.host(),
        format!("{}.localhost", s.url.subdomain),
        format!("{}.localhost:1", s.url.subdomain),
    ] {
        let resp = within(IO_TIMEOUT, "GET /", http_get(s.addr(), &host, "/"))
            .await
            .unwrap_or_else(|e| panic!("GET / with Host {host}: {e:#}"));
        assert_eq!(resp.status, StatusCode::OK, "Host {host}: body {:?}", resp.text());
        assert_eq!(resp.text(), greeting, "Host {host}");
    }
}

/// A 10 MB body goes to the backend and back intact.
async fn post_10mb_echo(t: Transport) {
    let s = HttpSetup::start(t).await;
    let body = random_bytes(10 * 1024 * 1024);
    let resp =
        within(BULK_TIMEOUT, "10 MB POST", http_post(s.addr(), &s.host(), "/echo", body.clone()))
            .await
            .expect("POST /echo");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body.len(), body.len(), "echoed body length");
    assert!(sha256(&resp.body) == sha256(&body), "echoed 10 MB body differs from what was sent");
}

/// A body sent with `Transfer-Encoding: chunked` (no Content-Length), in chunks of many sizes,
/// reaches the backend and comes back intact.
async fn post_chunked_echo(t: Transport) {
    let s = HttpSetup::start(t).await;
    let data = random_bytes(3 * 1024 * 1024);
    let mut chunks = Vec::new();
    let (mut at, mut size) = (0usize, 1usize);
    while at < data.len() {
        let n = size.min(data.len() - at);
        chunks.push(Bytes::copy_from_slice(&data[at..at + n]));
        at += n;
        size = size * 3 % 70_001 + 1;
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri("/echo")
        .header(header::HOST, s.host())
        .body(chunked_body(chunks))
        .expect("request");
    let resp = within(BULK_TIMEOUT, "chunked POST", async {
        HttpConn::connect(s.addr()).await?.send_body(req).await
    })
    .await
    .expect("chunked POST /echo");
    assert_eq!(resp.status, StatusCode::OK, "body: {:?}", resp.text());
    assert_eq!(resp.body.len(), data.len(), "echoed body length");
    assert!(sha256(&resp.body) == sha256(&data), "echoed chunked body differs from what was sent");
}

/// 200 requests, GETs and POSTs alternating, on a single keep-alive connection.
async fn keep_alive_200_requests(t: Transport) {
    let s = HttpSetup::start(t).await;
    let host = s.host();
    let greeting = s.backend.greeting();
    within(BULK_TIMEOUT, "200 requests on one connection", async {
        let mut conn = HttpConn::connect(s.addr()).await.expect("connect to the relay");
        for i in 0..200 {
            if i % 2 == 0 {
                let resp =
                    conn.get(&host, "/").await.unwrap_or_else(|e| panic!("request {i}: {e:#}"));
                assert_eq!(resp.status, StatusCode::OK, "request {i}");
                assert_eq!(resp.text(), greeting, "request {i}");
            } else {
                let body = format!("request number {i} on one connection");
                let resp = conn
                    .post(&host, "/echo", Bytes::from(body.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
                assert_eq!(resp.status, StatusCode::OK, "request {i}");
                assert_eq!(resp.text(), body, "request {i}");
            }
        }
    })
    .await;
}

/// A WebSocket upgrade passes through and messages echo both ways.
async fn websocket_echo_through_tunnel(t: Transport) {
    let s = HttpSetup::start(t).await;
    within(IO_TIMEOUT, "websocket echo", websocket_echo(s.addr(), &s.host(), "/ws"))
        .await
        .expect("websocket echo through the tunnel");
}

/// The backend sees X-Forwarded-For/-Proto/-Host set by the relay.
async fn forwarded_headers(t: Transport) {
    let s = HttpSetup::start(t).await;
    let host = s.host();
    let resp = within(IO_TIMEOUT, "GET /headers", http_get(s.addr(), &host, "/headers"))
        .await
        .expect("GET /headers");
    assert_eq!(resp.status, StatusCode::OK);
    let headers = parse_headers(&resp.text());
    let one = |name: &str| -> String {
        let values: Vec<&String> =
            headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v).collect();
        assert_eq!(values.len(), 1, "backend saw {name} {values:?}; all headers:\n{}", resp.text());
        values[0].clone()
    };
    assert_eq!(one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(one("x-forwarded-proto"), "http");
    assert_eq!(one("x-forwarded-host"), host);
}

/// A relay without QUIC: an agent on `--transport auto` falls back to TCP, says so, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_transport_falls_back_to_tcp() {
    let s = HttpSetup::start_with(RelayOpts::default().no_quic(), Transport::Auto).await;
    let resp =
        within(IO_TIMEOUT, "GET /", http_get(s.addr(), &s.host(), "/")).await.expect("GET /");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), s.backend.greeting());
    let stderr = s.agent.stderr_text();
    assert!(
        stderr.to_ascii_lowercase().contains("falling back"),
        "agent stderr should say it is falling back to TCP:\n{stderr}"
    );
}

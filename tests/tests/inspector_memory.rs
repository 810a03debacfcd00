//! The request inspector is bounded in real memory: a flood of small requests through an
//! inspected tunnel leaves the agent's resident memory near its idle figure, and the inspector
//! keeps at most `--inspect-max-requests` exchanges and `--inspect-max-bytes` bytes, the newest.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use warren_tests::{
    Agent, HttpBackend, HttpConn, HttpUrl, IO_TIMEOUT, Relay, RelayOpts, TempDir, eventually,
    within,
};

/// Visitor connections the flood is spread over (keep-alive, requests one after another on
/// each).
const CONNECTIONS: usize = 8;

/// A request body of the flood: 100 bytes.
const BODY: &[u8; 100] = &[b'x'; 100];

/// `curl` against an agent's API: (status, JSON or Null).
async fn call(api: SocketAddr, path: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", warren_tests::AGENT_API_TOKEN);
    warren_tests::curl_json("GET", &format!("http://{api}{path}"), &[auth], None).await
}

/// Sends `total` POSTs of [`BODY`] to `/echo?n=I` over [`CONNECTIONS`] keep-alive connections
/// at once, checking every answer; returns how long it took.
async fn flood(url: &HttpUrl, total: usize) -> Duration {
    let started = Instant::now();
    let per_conn = total.div_ceil(CONNECTIONS);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let (addr, host) = (url.addr(), url.host());
        let range = (c * per_conn)..((c + 1) * per_conn).min(total);
        tasks.spawn(async move {
            let mut conn = HttpConn::connect(addr).await?;
            for n in range {
                let resp = conn.post(&host, &format!("/echo?n={n}"), &BODY[..]).await?;
                anyhow::ensure!(resp.body.as_ref() == BODY, "request {n}: {resp:?}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("flood task").expect("flood request");
    }
    started.elapsed()
}

/// One request on a connection of its own, after everything else: the newest exchange.
async fn last_request(url: &HttpUrl) {
    let mut conn =
        within(IO_TIMEOUT, "connect", HttpConn::connect(url.addr())).await.expect("connect");
    let resp = within(IO_TIMEOUT, "POST", conn.post(&url.host(), "/echo?last", &BODY[..]))
        .await
        .expect("POST");
    assert_eq!(resp.body.as_ref(), BODY);
}

/// The inspector's list (newest first, up to `limit`) once its newest exchange is `/echo?last`
/// with its response recorded.
async fn listed_after_last(api: SocketAddr, limit: usize) -> Value {
    eventually(IO_TIMEOUT, || async move {
        let (status, v) = call(api, &format!("/api/requests/http?limit={limit}")).await;
        anyhow::ensure!(status == 200, "{status}: {v}");
        anyhow::ensure!(v["requests"][0]["request"]["uri"] == "/echo?last", "newest: {v:.2000}");
        anyhow::ensure!(v["requests"][0]["response"]["status_code"] == 200, "{v:.2000}");
        Ok(v)
    })
    .await
}

fn number(v: &Value, key: &str) -> u64 {
    v["inspector"][key].as_u64().unwrap_or_else(|| panic!("no inspector.{key} in {v:.2000}"))
}

fn uris(v: &Value) -> Vec<String> {
    v["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["request"]["uri"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// A relay, a backend, and `warren http PORT` (with `extra` flags) to it: its public URL and
/// local API.
struct Inspected {
    agent: Agent,
    url: HttpUrl,
    api: SocketAddr,
    _backend: HttpBackend,
    _relay: Relay,
    _tmp: TempDir,
}

async fn inspected(label: &str, extra: &[&str]) -> Inspected {
    let tmp = TempDir::new(label);
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "inspected", backend.port(), extra);
    let url = agent.http_url().await;
    let api = agent.api_addr().await;
    Inspected { agent, url, api, _backend: backend, _relay: relay, _tmp: tmp }
}

/// POSTs `body` to `/echo?n=0` .. `/echo?n=COUNT-1`, one after another on one connection.
async fn post_in_order(url: &HttpUrl, count: usize, body: &[u8]) {
    let mut conn =
        within(IO_TIMEOUT, "connect", HttpConn::connect(url.addr())).await.expect("connect");
    let host = url.host();
    for n in 0..count {
        let path = format!("/echo?n={n}");
        let resp =
            within(IO_TIMEOUT, "POST", conn.post(&host, &path, body.to_vec())).await.expect("POST");
        assert_eq!(resp.body.as_ref(), body, "request {n}");
    }
}

/// Most the agent's resident memory may grow over its idle figure under a flood.
const SLACK: u64 = 48 << 20;

/// Floods an inspected tunnel (`warren http` with `extra` flags) with `requests` small
/// requests, checks the agent's resident memory stays within [`SLACK`] of its idle figure,
/// and returns the inspector's list (its newest exchange the last request).
async fn flood_within_slack(label: &str, extra: &[&str], requests: usize) -> Value {
    // Bound whole: the relay and backend live as long as it does.
    let mut t = inspected(label, extra).await;
    let (url, api) = (t.url.clone(), t.api);

    // Warm up every connection's buffers and the runtime, then take the idle figure.
    flood(&url, CONNECTIONS * 50).await;
    let idle = t.agent.rss_bytes();

    let took = flood(&url, requests).await;
    last_request(&url).await;
    let after = t.agent.rss_bytes();
    let v = listed_after_last(api, 5).await;
    eprintln!(
        "{requests} requests in {took:?} ({:.0}/s); agent RSS idle {} KiB, after {} KiB; inspector {}",
        requests as f64 / took.as_secs_f64(),
        idle >> 10,
        after >> 10,
        v["inspector"]
    );
    assert!(
        after <= idle + SLACK,
        "the agent holds {} MiB more than when idle ({} MiB), over the {} MiB allowed; inspector: {}",
        (after - idle) >> 20,
        idle >> 20,
        SLACK >> 20,
        v["inspector"]
    );
    t.agent.assert_running();
    v
}

/// 100,000 small requests: the agent stays within 48 MiB of its idle resident memory, and the
/// inspector within its default caps (1,000 exchanges, 32 MiB), keeping the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_small_requests_stays_within_the_caps_in_real_memory() {
    let v = flood_within_slack("inspector-memory", &[], 100_000).await;
    let (kept, bytes) = (number(&v, "kept"), number(&v, "bytes"));
    assert!(kept <= 1_000, "{kept} exchanges kept, over the 1,000 default");
    assert!(bytes <= 32 << 20, "{bytes} bytes kept, over the 32 MiB default");
    assert_eq!(number(&v, "max_requests"), 1_000);
    assert_eq!(number(&v, "max_bytes"), 32 << 20);
    assert_eq!(kept, 1_000, "a full ring: {v:.2000}");
}

/// With the count cap out of the way, the 32 MiB byte cap binds, and what it counts is what
/// the agent really holds: the ring fills to its byte cap and the agent's memory grows by no
/// more than that (and some slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_cap_counts_real_memory() {
    const REQUESTS: u64 = 40_000;
    let extra = ["--inspect-max-requests", "1000000"];
    let v = flood_within_slack("inspector-bytes-real", &extra, REQUESTS as usize).await;
    let (kept, bytes) = (number(&v, "kept"), number(&v, "bytes"));
    assert!(bytes <= 32 << 20, "{bytes} bytes kept, over the 32 MiB default");
    assert!(kept < REQUESTS, "the byte cap should have forgotten some of {REQUESTS}: {v}");
    assert!(bytes > 30 << 20, "the ring should be about full: {v}");
}

/// `--inspect-max-requests 10`: exactly the 10 newest exchanges are kept, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_cap_keeps_exactly_the_newest() {
    let mut t = inspected("inspector-count", &["--inspect-max-requests", "10"]).await;
    let (url, api) = (t.url.clone(), t.api);
    post_in_order(&url, 25, BODY).await;
    last_request(&url).await;
    let v = listed_after_last(api, 100).await;
    let mut want = vec!["/echo?last".to_owned()];
    want.extend((16..25).rev().map(|n| format!("/echo?n={n}")));
    assert_eq!(uris(&v), want, "{v:.2000}");
    assert_eq!(number(&v, "kept"), 10);
    assert_eq!(number(&v, "max_requests"), 10);
    t.agent.assert_running();
}

/// `--inspect-max-bytes 64KiB`: the oldest exchanges go once their bytes (bodies and heads
/// counted) pass the cap, whatever the count cap allows; the newest stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_cap_evicts_the_oldest() {
    let extra = ["--inspect-max-bytes", "64KiB", "--inspect-max-requests", "100000"];
    let mut t = inspected("inspector-bytes", &extra).await;
    let (url, api) = (t.url.clone(), t.api);
    post_in_order(&url, 200, &[b'y'; 1000]).await;
    last_request(&url).await;
    let v = listed_after_last(api, 1000).await;
    let (kept, bytes) = (number(&v, "kept"), number(&v, "bytes"));
    assert!(bytes <= 64 << 10, "{bytes} bytes kept: {v:.2000}");
    // Each exchange holds 2,000 body bytes and its heads: fewer than 32 fit.
    assert!((2..32).contains(&kept), "{kept} kept: {v:.2000}");
    assert_eq!(uris(&v).len() as u64, kept);
    assert_eq!(uris(&v)[1], "/echo?n=199", "{v:.2000}");
    assert_eq!(number(&v, "max_bytes"), 64 << 10);
    t.agent.assert_running();
}

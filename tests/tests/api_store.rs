//! What the relay keeps in its database through the API: reservations that hold subdomains and
//! ports for one token against every other, and the traffic history of tunnels; both survive a
//! relay restart. Requests go through the real `curl`.

use std::time::Duration;

use serde_json::Value;
use warren_tests::{
    ADMIN_TOKEN, Agent, EchoBackend, HttpBackend, IO_TIMEOUT, Outcome, Relay, RelayOpts, TempDir,
    eventually, expect_get, tcp_echo, within,
};

/// `curl` against the API: (status, JSON body or Null).
async fn call(
    relay: &Relay,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", relay.api_addr);
    warren_tests::curl_json(method, &url, &[format!("Authorization: Bearer {token}")], body).await
}

fn spawn(relay: &Relay, tmp: &TempDir, label: &str, token: &str, args: &[&str]) -> Agent {
    relay.spawn_with_token(tmp, label, token, args)
}

/// A subdomain and a TCP port reserved for one API token: another token's agent is refused
/// them (and gets other ports when it asks for none), the owner gets them, and all of it is
/// still true after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_hold_names_and_ports_across_restarts() {
    let tmp = TempDir::new("reservations");
    let mut relay = Relay::start(RelayOpts::default()).await;
    let (status, owner) =
        call(&relay, "POST", "/api/v1/tokens", ADMIN_TOKEN, Some(r#"{"name":"owner"}"#)).await;
    assert_eq!(status, 201, "{owner}");
    let owner_secret = owner["token"].as_str().expect("secret").to_owned();
    let owner_id = owner["id"].as_str().expect("id").to_owned();
    let port = relay.ports().low;
    let body = format!(r#"{{"token":"{owner_id}","subdomain":"kept"}}"#);
    let (status, sub_res) =
        call(&relay, "POST", "/api/v1/reservations", ADMIN_TOKEN, Some(&body)).await;
    assert_eq!(status, 201, "{sub_res}");
    let body = format!(r#"{{"token":"{owner_id}","port":{port}}}"#);
    let (status, port_res) =
        call(&relay, "POST", "/api/v1/reservations", ADMIN_TOKEN, Some(&body)).await;
    assert_eq!(status, 201, "{port_res}");
    // Taken twice, bad bodies.
    let (status, v) = call(&relay, "POST", "/api/v1/reservations", ADMIN_TOKEN, Some(&body)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    for bad in [
        format!(r#"{{"token":"{owner_id}"}}"#),
        format!(r#"{{"token":"{owner_id}","subdomain":"a","port":{port}}}"#),
        format!(r#"{{"token":"{owner_id}","subdomain":"Not_valid"}}"#),
        format!(r#"{{"token":"{owner_id}","port":1}}"#),
        r#"{"token":"tok_nonexistent","subdomain":"x"}"#.to_owned(),
        r#"{"subdomain":"x"}"#.to_owned(),
    ] {
        let (status, v) =
            call(&relay, "POST", "/api/v1/reservations", ADMIN_TOKEN, Some(&bad)).await;
        assert_eq!(status, 422, "{bad}: {v}");
    }
    // An agent token may not reserve for another token.
    let body = format!(r#"{{"token":"{owner_id}","subdomain":"stolen"}}"#);
    let (status, _) =
        call(&relay, "POST", "/api/v1/reservations", relay.token(), Some(&body)).await;
    assert_eq!(status, 403);

    relay.restart().await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    // Another token: refused the reserved name and port.
    let mut other = spawn(
        &relay,
        &tmp,
        "other-http",
        relay.token(),
        &["http", &backend.port().to_string(), "--subdomain", "kept"],
    );
    match other.outcome(IO_TIMEOUT).await {
        Some(Outcome::Exited(_, stderr)) => {
            assert!(stderr.contains("subdomain kept is reserved for another token"), "{stderr}")
        }
        o => panic!("another token's agent was not refused the reserved subdomain: {o:?}"),
    }
    let mut other_tcp = spawn(
        &relay,
        &tmp,
        "other-tcp",
        relay.token(),
        &["tcp", &echo.port().to_string(), "--remote-port", &port.to_string()],
    );
    match other_tcp.outcome(IO_TIMEOUT).await {
        Some(Outcome::Exited(_, stderr)) => assert!(stderr.contains("reserved"), "{stderr}"),
        o => panic!("another token's agent was not refused the reserved port: {o:?}"),
    }
    // The owner gets both.
    let mut web = spawn(
        &relay,
        &tmp,
        "owner-http",
        &owner_secret,
        &["http", &backend.port().to_string(), "--subdomain", "kept"],
    );
    let url = web.http_url().await;
    assert_eq!(url.subdomain, "kept");
    within(IO_TIMEOUT, "GET", expect_get(url.addr(), &url.host(), &backend.greeting()))
        .await
        .expect("owner's tunnel serves");
    let mut db = spawn(
        &relay,
        &tmp,
        "owner-tcp",
        &owner_secret,
        &["tcp", &echo.port().to_string(), "--remote-port", &port.to_string()],
    );
    assert_eq!(db.tcp_url().await.port, port);

    // Listing: the admin sees both, the other token none; releasing frees the name.
    let (_, all) = call(&relay, "GET", "/api/v1/reservations", ADMIN_TOKEN, None).await;
    assert_eq!(all["reservations"].as_array().map(Vec::len), Some(2), "{all}");
    let (_, theirs) = call(&relay, "GET", "/api/v1/reservations", relay.token(), None).await;
    assert_eq!(theirs["reservations"].as_array().map(Vec::len), Some(0), "{theirs}");
    let id = sub_res["id"].as_str().expect("id");
    let (status, _) =
        call(&relay, "DELETE", &format!("/api/v1/reservations/{id}"), relay.token(), None).await;
    assert_eq!(status, 404, "another token cannot release it");
    let (status, _) =
        call(&relay, "DELETE", &format!("/api/v1/reservations/{id}"), ADMIN_TOKEN, None).await;
    assert_eq!(status, 204);
    web.assert_running();
    db.assert_running();
}

/// Traffic through a tunnel shows in `/api/v1/stats` after a sampling interval, and the
/// history survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_history_is_sampled_and_kept() {
    let tmp = TempDir::new("stats");
    let mut relay = Relay::start(RelayOpts::default().args(&["--stats-interval", "1s"])).await;
    let echo = EchoBackend::start().await;
    let mut agent =
        spawn(&relay, &tmp, "stats-tcp", relay.token(), &["tcp", &echo.port().to_string()]);
    let url = agent.tcp_url().await;
    within(IO_TIMEOUT, "echo", tcp_echo(url.addr(), 100_000)).await.expect("echo");

    let total = |v: &Value, key: &str| -> u64 {
        v["tunnels"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["points"].as_array().into_iter().flatten())
            .map(|p| p[key].as_u64().unwrap_or(0))
            .sum()
    };
    let relay_ref = &relay;
    let seen = eventually(Duration::from_secs(10), || async move {
        let (status, v) = call(relay_ref, "GET", "/api/v1/stats?since=0", ADMIN_TOKEN, None).await;
        anyhow::ensure!(status == 200, "status {status}: {v}");
        anyhow::ensure!(total(&v, "bytes_in") >= 100_000, "not sampled yet: {v}");
        Ok(v)
    })
    .await;
    assert!(total(&seen, "bytes_out") >= 100_000, "{seen}");
    assert_eq!(seen["interval_secs"], 1);
    let tunnel = seen["tunnels"][0]["tunnel"].as_str().expect("tunnel id").to_owned();
    assert!(tunnel.ends_with(":tcp-") || tunnel.contains(":tcp-"), "{tunnel}");

    relay.restart().await;
    let (_, after) = call(&relay, "GET", "/api/v1/stats?since=0", ADMIN_TOKEN, None).await;
    assert!(total(&after, "bytes_in") >= 100_000, "history lost in a restart: {after}");
    let (status, v) = call(&relay, "GET", "/api/v1/stats?since=soon", ADMIN_TOKEN, None).await;
    assert_eq!(status, 422, "{v}");
    let (status, _) = call(&relay, "GET", "/api/v1/stats", "wrong", None).await;
    assert_eq!(status, 401);
    agent.assert_running();
}

/// A forward created through the API is served by the connected agent (`warren agent`, no
/// tunnels of its own) at the URL the API answers; it comes back after a relay restart and
/// after an agent restart; a bad target is refused with the agent's reason; deleting it closes
/// the tunnel while the agent keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_are_opened_kept_and_closed() {
    let tmp = TempDir::new("forwards");
    let mut relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let start_agent = |relay: &Relay| {
        let args = ["agent", "--agent-id", "laptop", "--allow-forward", "127.0.0.0/8"];
        spawn(relay, &tmp, "fw-agent", relay.token(), &args)
    };
    let mut agent = start_agent(&relay);
    let relay_ref = &relay;
    eventually(IO_TIMEOUT, || async move {
        let (_, v) = call(relay_ref, "GET", "/api/v1/agents", ADMIN_TOKEN, None).await;
        anyhow::ensure!(v["agents"].as_array().is_some_and(|a| !a.is_empty()), "no agent yet: {v}");
        Ok(())
    })
    .await;
    let body = format!(
        r#"{{"agent":"laptop","proto":"http","target":"{}","subdomain":"fwd-shop"}}"#,
        backend.port()
    );
    let (status, fwd) = call(&relay, "POST", "/api/v1/forwards", ADMIN_TOKEN, Some(&body)).await;
    assert_eq!(status, 201, "{fwd}");
    let url = fwd["url"].as_str().expect("url").to_owned();
    assert_eq!(url, format!("http://fwd-shop.localhost:{}", relay.http_addr.port()));
    let host = format!("fwd-shop.localhost:{}", relay.http_addr.port());
    within(IO_TIMEOUT, "GET", expect_get(relay.http_addr, &host, &backend.greeting()))
        .await
        .expect("the forward serves");
    // The agent printed the URL on stdout, as for its own tunnels.
    assert!(agent.stdout().iter().any(|l| l.trim() == url), "{:?}", agent.stdout());

    // Refusals: an agent that is not connected, a target the agent cannot parse, bad bodies.
    for (body, status) in [
        (r#"{"agent":"nobody","proto":"tcp","target":"22"}"#, 409),
        (r#"{"agent":"laptop","proto":"tcp","target":"host:"}"#, 422),
        (r#"{"agent":"laptop","proto":"ftp","target":"21"}"#, 422),
        (r#"{"agent":"laptop","proto":"http","target":"80","remote_port":20001}"#, 422),
        (r#"{"agent":"laptop","proto":"tcp"}"#, 422),
        (r#"{"agent":"laptop","#, 400),
    ] {
        let (got, v) = call(&relay, "POST", "/api/v1/forwards", ADMIN_TOKEN, Some(body)).await;
        assert_eq!(got, status, "{body}: {v}");
    }
    let (_, v) = call(
        &relay,
        "POST",
        "/api/v1/forwards",
        ADMIN_TOKEN,
        Some(r#"{"agent":"laptop","proto":"tcp","target":"host:"}"#),
    )
    .await;
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("agent refused")), "{v}");

    // Kept: after a relay restart, and after the agent restarts, the forward is served again.
    relay.restart().await;
    let host2 = host.clone();
    let relay_ref = &relay;
    let greeting = backend.greeting();
    eventually(Duration::from_secs(15), || {
        let (host, greeting) = (host2.clone(), greeting.clone());
        async move { expect_get(relay_ref.http_addr, &host, &greeting).await }
    })
    .await;
    agent.kill().await;
    let mut agent = start_agent(&relay);
    eventually(Duration::from_secs(15), || {
        let (host, greeting) = (host2.clone(), greeting.clone());
        async move { expect_get(relay_ref.http_addr, &host, &greeting).await }
    })
    .await;

    // Listed with its URL; deleted: the tunnel goes, the agent stays.
    let (_, list) = call(&relay, "GET", "/api/v1/forwards", ADMIN_TOKEN, None).await;
    assert_eq!(list["forwards"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["forwards"][0]["url"].as_str(), Some(url.as_str()), "{list}");
    let id = list["forwards"][0]["id"].as_str().expect("id").to_owned();
    let (status, _) =
        call(&relay, "DELETE", &format!("/api/v1/forwards/{id}"), ADMIN_TOKEN, None).await;
    assert_eq!(status, 204);
    let resp = within(IO_TIMEOUT, "GET", warren_tests::http_get(relay.http_addr, &host, "/"))
        .await
        .expect("GET after delete");
    assert_eq!(resp.status, http::StatusCode::NOT_FOUND, "{}", resp.text());
    let (status, _) =
        call(&relay, "GET", &format!("/api/v1/forwards/{id}"), ADMIN_TOKEN, None).await;
    assert_eq!(status, 404);
    agent.assert_running();
}

/// `/metrics` carries the handshake and request latency histograms and errors by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_histograms_and_errors() {
    let tmp = TempDir::new("metrics");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent =
        spawn(&relay, &tmp, "metrics-agent", relay.token(), &["http", &backend.port().to_string()]);
    let url = agent.http_url().await;
    within(IO_TIMEOUT, "GET", expect_get(url.addr(), &url.host(), &backend.greeting()))
        .await
        .expect("GET");
    let resp =
        within(IO_TIMEOUT, "GET", warren_tests::http_get(relay.http_addr, "nobody.localhost", "/"))
            .await
            .expect("GET unknown");
    assert_eq!(resp.status, http::StatusCode::NOT_FOUND);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{}/metrics", relay.api_addr)])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert!(value("warren_handshake_seconds_count") >= 1.0);
    assert!(value("warren_handshake_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert!(value("warren_http_request_seconds_count") >= 2.0);
    assert!(value("warren_errors_total{kind=\"http_404_unknown_host\"}") >= 1.0);
    assert!(text.contains("# TYPE warren_http_request_seconds histogram"), "{text}");
    agent.assert_running();
}

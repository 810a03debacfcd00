//! The agent's local API (`/api/tunnels`, ngrok-shaped) and the CLI commands that use it
//! (`warren ls`, `warren stop`), against real agents and relays.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use warren_tests::client::expect_eof;
use warren_tests::{
    Agent, EchoBackend, HttpBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir, closed_port,
    eventually, tcp_echo, within,
};

/// `curl` against an agent's API: (status, JSON or Null).
async fn call(api: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", warren_tests::AGENT_API_TOKEN);
    warren_tests::curl_json(method, &format!("http://{api}{path}"), &[auth], body).await
}

/// Runs `warren ARGS` to completion: (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(warren_tests::process::binary("warren"))
        .args(args)
        .env_remove("WARREN_AGENT_API")
        .env("WARREN_API_TOKEN", warren_tests::AGENT_API_TOKEN)
        .output()
        .await
        .expect("run warren");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

use warren_tests::api_client::tunnel_names as names;

/// Tunnels listed, opened and closed through the API and the CLI while the agent runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_through_the_local_api_and_cli() {
    let tmp = TempDir::new("local-api");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "web", backend.port(), &[]);
    let web_url = agent.http_url().await;
    let api = agent.api_addr().await;

    let (status, list) = call(api, "GET", "/api/tunnels", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(names(&list), ["web"]);
    assert_eq!(list["tunnels"][0]["public_url"].as_str(), Some(web_url.url.as_str()));
    assert_eq!(list["tunnels"][0]["proto"], "http");
    assert_eq!(list["tunnels"][0]["config"]["addr"], format!("127.0.0.1:{}", backend.port()));

    // Open a TCP tunnel while the agent runs; it carries traffic.
    let body = format!(r#"{{"name":"extra","proto":"tcp","addr":"{}"}}"#, echo.port());
    let (status, t) = call(api, "POST", "/api/tunnels", Some(&body)).await;
    assert_eq!(status, 201, "{t}");
    let url = t["public_url"].as_str().expect("public_url").to_owned();
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the URL");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    within(IO_TIMEOUT, "echo", tcp_echo(addr, 10_000)).await.expect("the new tunnel carries data");
    let (status, one) = call(api, "GET", "/api/tunnels/extra", None).await;
    assert_eq!((status, one["public_url"].as_str()), (200, Some(url.as_str())), "{one}");
    // Traffic is counted per tunnel, in the API and in /metrics.
    assert_eq!(one["metrics"]["bytes_in"], 10_000, "{one}");
    assert_eq!(one["metrics"]["bytes_out"], 10_000, "{one}");
    assert!(one["metrics"]["conns_total"].as_u64() >= Some(1), "{one}");
    let metrics = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{api}/metrics")])
        .args(["-H", &format!("Authorization: Bearer {}", warren_tests::AGENT_API_TOKEN)])
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.contains("warren_agent_connected 1"), "{text}");
    assert!(text.contains("warren_agent_tunnel_bytes_in_total{tunnel=\"extra\"} 10000"), "{text}");
    // The agent printed its URL too, like its first tunnel's.
    eventually(IO_TIMEOUT, || {
        let printed = agent.stdout().iter().any(|l| l.trim() == url);
        async move { if printed { Ok(()) } else { anyhow::bail!("URL not printed") } }
    })
    .await;

    // Refusals.
    for (body, want) in [
        (r#"{"name":"extra","proto":"tcp","addr":"1"}"#, 409),
        (r#"{"proto":"ftp","addr":"21"}"#, 422),
        (r#"{"proto":"tcp","addr":"not a port"}"#, 422),
        (r#"{"proto":"tcp","addr":"22","basic_auth":"a:b"}"#, 422),
        (r#"{"proto":"tcp","addr":"22","colour":"blue"}"#, 422),
        (r#"{"proto":"tcp","#, 400),
        (r#"{"name":"taken","proto":"http","addr":"80","subdomain":"SUB"}"#, 201),
    ] {
        let body = body.replace("SUB", &web_url.subdomain);
        let (status, v) = call(api, "POST", "/api/tunnels", Some(&body)).await;
        // A subdomain another tunnel holds is the relay's refusal, passed on.
        let want = if body.contains("taken") { 422 } else { want };
        assert_eq!(status, want, "{body}: {v}");
    }

    // The CLI lists and stops through the same API.
    let api_arg = api.to_string();
    let (code, out, err) = cli(&["ls", "--agent-api", &api_arg]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("web") && out.contains("extra") && out.contains(&url), "{out}");
    let (code, out, err) = cli(&["stop", "extra", "--agent-api", &api_arg]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("stopped extra"), "{out}");
    let (_, list) = call(api, "GET", "/api/tunnels", None).await;
    assert_eq!(names(&list), ["web"]);
    // The lease is released at once: its port is closed (or, if reused meanwhile, not ours).
    let refused = tokio::net::TcpStream::connect(addr).await.is_err();
    assert!(
        refused || within(IO_TIMEOUT, "closed", expect_eof(addr)).await.is_ok(),
        "the stopped tunnel still answers"
    );
    let (code, _, err) = cli(&["stop", "extra", "--agent-api", &api_arg]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("404") && err.contains("no tunnel extra"), "{err}");
    let (status, _) = call(api, "DELETE", "/api/tunnels/nothing", None).await;
    assert_eq!(status, 404);
    agent.assert_running();
}

/// Several agents side by side: the second finds the asked port taken and uses the next one;
/// `warren ls` without a running agent says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_side_by_side_and_no_agent() {
    let tmp = TempDir::new("local-api-ports");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let base = closed_port();
    let mut agents: Vec<Agent> = Vec::new();
    for i in 0..2 {
        let mut a = Agent::spawn_with_env(
            &format!("side-{i}"),
            [
                "http".to_owned(),
                backend.port().to_string(),
                "--name".into(),
                format!("side-{i}"),
                "--config-dir".into(),
                tmp.dir(&format!("a{i}")).display().to_string(),
            ]
            .into_iter()
            .chain(relay.agent_args()),
            &[("WARREN_API", &format!("127.0.0.1:{base}"))],
        );
        let _ = a.url().await;
        agents.push(a);
    }
    let first = agents[0].api_addr().await;
    let second = agents[1].api_addr().await;
    assert_eq!(first.port(), base);
    assert!(second.port() > base && second.port() <= base + 10, "{second}");
    assert!(
        agents[1].stderr_text().contains("local API port taken"),
        "{}",
        agents[1].stderr_text()
    );
    let (_, v) = call(second, "GET", "/api/tunnels", None).await;
    assert_eq!(names(&v), ["side-1"]);

    let dead = closed_port().to_string();
    let (code, _, err) = cli(&["ls", "--agent-api", &format!("127.0.0.1:{dead}")]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("is `warren` running there?"), "{err}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// A tunnel opened through the API while the relay is away, and refused when the agent
/// reconnects, is dropped alone: the agent and its other tunnels go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_refused_after_a_reconnect_is_dropped_alone() {
    let tmp = TempDir::new("local-api-refused");
    let mut relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "web", backend.port(), &[]);
    let web = agent.http_url().await;
    let api = agent.api_addr().await;
    relay.kill().await;
    eventually(IO_TIMEOUT, || async move {
        let (_, s) = call(api, "GET", "/api/status", None).await;
        anyhow::ensure!(s["connected"] == false, "{s}");
        Ok(())
    })
    .await;
    // Queued while disconnected: its host name is not under the relay's domain.
    let body = r#"{"name":"elsewhere","proto":"http","addr":"80","hostname":"shop.example.org"}"#;
    let (status, v) = call(api, "POST", "/api/tunnels", Some(body)).await;
    assert!(status == 201 || status == 202, "{status} {v}");
    relay.restart().await;
    eventually(Duration::from_secs(30), || async move {
        let (_, s) = call(api, "GET", "/api/status", None).await;
        let (_, list) = call(api, "GET", "/api/tunnels", None).await;
        anyhow::ensure!(s["connected"] == true, "{s}");
        anyhow::ensure!(names(&list) == ["web"], "{list}");
        Ok(())
    })
    .await;
    agent.assert_running();
    assert!(agent.stderr_text().contains("tunnel dropped"), "{}", agent.stderr_text());
    let resp = warren_tests::client::http_get(relay.http_addr, &web.host(), "/").await;
    assert_eq!(resp.map(|r| r.status.as_u16()).ok(), Some(200));
}

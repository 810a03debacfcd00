//! The request inspector: exchanges through an HTTP tunnel kept by the agent, listed, filtered,
//! shown and replayed through its local API and the CLI (`warren requests`, `warren replay`).

use std::net::SocketAddr;

use serde_json::Value;
use warren_tests::client::websocket_echo;
use warren_tests::{
    HttpBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir, eventually, http_get, http_post, within,
};

/// `curl` against an agent's API: (status, JSON or Null).
async fn call(api: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", warren_tests::AGENT_API_TOKEN);
    warren_tests::curl_json(method, &format!("http://{api}{path}"), &[auth], body).await
}

async fn cli(args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(warren_tests::process::binary("warren"))
        .args(args)
        .env("WARREN_API_TOKEN", warren_tests::AGENT_API_TOKEN)
        .output()
        .await
        .expect("run warren");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn ids(v: &Value) -> Vec<String> {
    v["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect()
}

/// Requests through a tunnel are kept with heads and bodies, filtered and paged; a replay (as
/// is, and changed) reaches the target again; the CLI shows and replays; clearing empties it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_list_show_replay_clear() {
    let tmp = TempDir::new("inspector");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "shop", backend.port(), &[]);
    let url = agent.http_url().await;
    let api = agent.api_addr().await;

    let resp = within(IO_TIMEOUT, "GET", http_get(url.addr(), &url.host(), "/headers?x=1"))
        .await
        .expect("GET");
    assert_eq!(resp.status, http::StatusCode::OK);
    let resp =
        within(IO_TIMEOUT, "POST", http_post(url.addr(), &url.host(), "/echo", b"hello".to_vec()))
            .await
            .expect("POST");
    assert_eq!(resp.text(), "hello");
    // WebSockets still pass through an inspected tunnel.
    within(IO_TIMEOUT, "ws", websocket_echo(url.addr(), &url.host(), "/ws")).await.expect("ws");

    let list = eventually(IO_TIMEOUT, || async move {
        let (status, v) = call(api, "GET", "/api/requests/http", None).await;
        anyhow::ensure!(status == 200 && ids(&v).len() >= 3, "{status}: {v}");
        Ok(v)
    })
    .await;
    let reqs = list["requests"].as_array().expect("requests").clone();
    // Newest first: the WebSocket upgrade, the POST, the GET.
    assert_eq!(reqs[0]["response"]["status_code"], 101, "{list}");
    assert_eq!(reqs[1]["request"]["method"], "POST");
    assert_eq!(reqs[2]["request"]["uri"], "/headers?x=1");
    assert_eq!(reqs[1]["tunnel_name"], "shop");
    let post_id = reqs[1]["id"].as_str().expect("id").to_owned();
    let get_id = reqs[2]["id"].as_str().expect("id").to_owned();

    // Details: headers and bodies of both sides.
    let (status, d) = call(api, "GET", &format!("/api/requests/http/{post_id}"), None).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["request"]["body"]["text"], "hello", "{d}");
    assert_eq!(d["response"]["body"]["text"], "hello", "{d}");
    assert_eq!(d["response"]["status_code"], 200);
    assert!(d["request"]["headers"]["x-forwarded-for"].is_array(), "{d}");
    assert_eq!(d["response"]["body"]["complete"], true);

    // Filters and paging.
    let (_, v) = call(api, "GET", "/api/requests/http?path=/echo", None).await;
    assert_eq!(ids(&v), [post_id.as_str()]);
    let (_, v) = call(api, "GET", "/api/requests/http?status=200&limit=1", None).await;
    assert_eq!(ids(&v), [post_id.as_str()]);
    let (_, v) = call(api, "GET", &format!("/api/requests/http?before={post_id}"), None).await;
    assert_eq!(ids(&v), [get_id.as_str()]);
    let (_, v) = call(api, "GET", "/api/requests/http?tunnel_name=other", None).await;
    assert!(ids(&v).is_empty());
    let (status, _) = call(api, "GET", "/api/requests/http?limit=many", None).await;
    assert_eq!(status, 422);
    let (status, _) = call(api, "GET", "/api/requests/http/req_nothing", None).await;
    assert_eq!(status, 404);

    // Replays: as it was, then with another body and a header.
    let (status, r) =
        call(api, "POST", "/api/requests/http", Some(&format!(r#"{{"id":"{post_id}"}}"#))).await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["response"]["body"]["text"], "hello", "{r}");
    assert_eq!(r["replay_of"], post_id.as_str());
    let body = format!(
        r#"{{"id":"{get_id}","modify":{{"path":"/echo","method":"POST","body":"changed","headers":{{"x-replayed":"yes"}}}}}}"#
    );
    let (status, r) = call(api, "POST", "/api/requests/http", Some(&body)).await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["response"]["body"]["text"], "changed", "{r}");
    assert_eq!(r["request"]["headers"]["x-replayed"][0], "yes", "{r}");
    for bad in
        [r#"{"id":"req_nothing"}"#, r#"{}"#, r#"{"id":"X","modify":{"method":"GE T"}}"#, "nope"]
    {
        let bad = bad.replace('X', &get_id);
        let (status, v) = call(api, "POST", "/api/requests/http", Some(&bad)).await;
        assert!([400, 404, 422].contains(&status), "{bad}: {status} {v}");
    }

    // The CLI.
    let api_arg = api.to_string();
    let (code, out) = cli(&["requests", "--agent-api", &api_arg]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&post_id) && out.contains("(replay)"), "{out}");
    let (code, out) = cli(&["replay", &post_id, "--agent-api", &api_arg]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("POST /echo -> 200 OK") && out.contains("hello"), "{out}");

    let (status, _) = call(api, "DELETE", "/api/requests/http", None).await;
    assert_eq!(status, 204);
    let (_, v) = call(api, "GET", "/api/requests/http", None).await;
    assert!(ids(&v).is_empty(), "{v}");
    agent.assert_running();
}

/// `--inspect false`: traffic flows, nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_off_keeps_nothing() {
    let tmp = TempDir::new("inspector-off");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "uninspected", backend.port(), &["--inspect", "false"]);
    let url = agent.http_url().await;
    let api = agent.api_addr().await;
    let resp =
        within(IO_TIMEOUT, "GET", http_get(url.addr(), &url.host(), "/")).await.expect("GET");
    assert_eq!(resp.text(), backend.greeting());
    let (status, v) = call(api, "GET", "/api/requests/http", None).await;
    assert_eq!(status, 200);
    assert!(ids(&v).is_empty(), "{v}");
}

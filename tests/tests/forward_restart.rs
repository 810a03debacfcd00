//! An agent with tunnels of its own and a forward opened through the relay's API survives a
//! relay restart: the relay reopens the forward while the agent still binds its own tunnels,
//! and the agent takes the `Forward` in stride instead of reading it as an answer to a bind.

use std::time::Duration;

use warren_tests::{
    ADMIN_TOKEN, EchoBackend, HttpBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir, Transport,
    eventually, expect_get, localhost, tcp_echo, unique, within,
};

/// How long after the relay is back every URL must answer again.
const BACK_WITHIN: Duration = Duration::from_secs(10);

warren_tests::each_transport!(own_tunnel_and_forward_survive_relay_restart);

/// `curl` against the relay's API as the admin: (status, JSON body or Null).
async fn admin(
    relay: &Relay,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", relay.api_addr);
    warren_tests::curl_json(method, &url, &[format!("Authorization: Bearer {ADMIN_TOKEN}")], body)
        .await
}

async fn own_tunnel_and_forward_survive_relay_restart(t: Transport) {
    let tmp = TempDir::new("forward-restart");
    let mut relay = Relay::start(RelayOpts::default().lease_grace("5m")).await;
    let web = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let agent_id = unique("fwd-agent");
    let subdomain = unique("app");
    let mut agent = relay.spawn_with_token(
        &tmp,
        "agent",
        relay.token(),
        &[
            "http",
            &web.port().to_string(),
            "--subdomain",
            &subdomain,
            "--allow-forward",
            "127.0.0.0/8",
            "--agent-id",
            &agent_id,
            "--transport",
            t.as_str(),
        ],
    );
    let url = agent.http_url().await;
    assert_eq!(url.subdomain, subdomain);
    expect_get(relay.http_addr, &url.host(), &web.greeting()).await.expect("own tunnel before");

    let body = format!(r#"{{"agent":"{agent_id}","proto":"tcp","target":"{}"}}"#, echo.port());
    let (status, fwd) = admin(&relay, "POST", "/api/v1/forwards", Some(&body)).await;
    assert_eq!(status, 201, "{fwd}");
    let fwd_url = fwd["url"].as_str().expect("forward url").to_owned();
    let fwd_port: u16 = fwd_url
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the forward's URL {fwd_url}"));
    within(IO_TIMEOUT, "forward before", tcp_echo(localhost(fwd_port), 4096))
        .await
        .expect("the forward serves before the restart");

    relay.restart().await;

    let (addr, host, greeting) = (relay.http_addr, url.host(), web.greeting());
    eventually(BACK_WITHIN, || expect_get(addr, &host, &greeting)).await;
    eventually(BACK_WITHIN, || tcp_echo(localhost(fwd_port), 4096)).await;
    // Same URLs: the agent still holds its subdomain and the forward its port.
    let (status, list) = admin(&relay, "GET", "/api/v1/forwards", None).await;
    assert_eq!(status, 200, "{list}");
    assert!(list.to_string().contains(&fwd_url), "the forward's URL changed: {list}");
    // Still the same process, no longer flapping: it stays up and keeps serving.
    agent.assert_running();
    expect_get(relay.http_addr, &url.host(), &web.greeting()).await.expect("own tunnel after");
    tcp_echo(localhost(fwd_port), 4096).await.expect("forward after");
    relay.assert_running();
}

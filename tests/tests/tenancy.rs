//! Tenants cannot take each other's names, ports or share of the relay: leases survive a relay
//! restart for their token, reservations and tunnels are capped per token (and per session).

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use warren_tests::{
    ADMIN_TOKEN, Agent, EchoBackend, HttpBackend, READY_TIMEOUT, Relay, RelayOpts, TempDir,
    eventually, expect_get, sha256, tcp_echo, unique,
};

const TOKEN_A: &str = "tenant-a-token";
const TOKEN_B: &str = "tenant-b-token";

/// How long after a relay restart an agent may take to rebind: its reconnect backoff plus a
/// slow machine.
const REBIND_TIMEOUT: Duration = Duration::from_secs(60);

/// `warren ARGS... --relay --token TOKEN --relay-ca --config-dir TMP/LABEL`.
fn spawn(relay: &Relay, tmp: &TempDir, label: &str, token: &str, args: &[&str]) -> Agent {
    relay.spawn_with_token(tmp, label, token, args)
}

/// Sends `signal` to a running agent.
fn signal(agent: &Agent, signal: Signal) {
    let pid = agent.pid().expect("agent is running");
    let pid = i32::try_from(pid).expect("pid fits an i32");
    kill(Pid::from_raw(pid), signal).expect("signal the agent");
}

/// `curl` against the relay's API: (status, JSON body or Null).
async fn call(relay: &Relay, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", relay.api_addr);
    let auth = [format!("Authorization: Bearer {token}")];
    warren_tests::curl_json(method, &url, &auth, Some(body)).await
}

/// The 16 hex digits the relay knows a token by.
fn token_id(token: &str) -> String {
    sha256(token.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Token A's agents hold `--subdomain NAME` and `--remote-port P`; the relay is SIGKILLed and
/// restarted on the same data directory while A's agents are stopped, so token B's agents ask
/// first: they are refused the name and the port. Then A's agents, resumed, reconnect and get
/// both back, and the name serves A's backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_hand_a_name_to_another_token() {
    let tmp = TempDir::new("tenancy-restart");
    let mut relay =
        Relay::start(RelayOpts::default().tokens(&[TOKEN_A, TOKEN_B]).lease_grace("5m")).await;
    let a_web = HttpBackend::start_named("tenant-a").await;
    let b_web = HttpBackend::start_named("tenant-b").await;
    let echo = EchoBackend::start().await;
    let sub = unique("shop");
    let port = (relay.ports().low + 3).to_string();
    let (a_web_port, b_web_port) = (a_web.port().to_string(), b_web.port().to_string());
    let echo_port = echo.port().to_string();
    // TCP transport: the agents see the dead relay's connection reset at once when resumed.
    let mut a_http = spawn(
        &relay,
        &tmp,
        "a-http",
        TOKEN_A,
        &["http", &a_web_port, "--subdomain", &sub, "--transport", "tcp"],
    );
    let mut a_tcp = spawn(
        &relay,
        &tmp,
        "a-tcp",
        TOKEN_A,
        &["tcp", &echo_port, "--remote-port", &port, "--transport", "tcp"],
    );
    let url = a_http.http_url().await;
    assert_eq!(url.subdomain, sub);
    let tcp_url = a_tcp.tcp_url().await;
    assert_eq!(tcp_url.port.to_string(), port);
    expect_get(relay.http_addr, &url.host(), &a_web.greeting()).await.expect("A serves");

    // A's agents cannot reconnect before B's ask: they are stopped across the restart.
    signal(&a_http, Signal::SIGSTOP);
    signal(&a_tcp, Signal::SIGSTOP);
    relay.kill().await;
    relay.restart().await;

    let mut b_http =
        spawn(&relay, &tmp, "b-http", TOKEN_B, &["http", &b_web_port, "--subdomain", &sub]);
    let stderr = b_http.expect_failure(READY_TIMEOUT).await;
    assert!(
        stderr.contains(&format!("subdomain {sub} is taken")),
        "token B should be refused A's subdomain after the restart:\n{stderr}"
    );
    let mut b_tcp =
        spawn(&relay, &tmp, "b-tcp", TOKEN_B, &["tcp", &echo_port, "--remote-port", &port]);
    let stderr = b_tcp.expect_failure(READY_TIMEOUT).await;
    assert!(
        stderr.contains(&format!("port {port} is leased to another tunnel")),
        "token B should be refused A's port after the restart:\n{stderr}"
    );

    signal(&a_http, Signal::SIGCONT);
    signal(&a_tcp, Signal::SIGCONT);
    let (addr, host, greeting) = (relay.http_addr, url.host(), a_web.greeting());
    eventually(REBIND_TIMEOUT, || expect_get(addr, &host, &greeting)).await;
    eventually(REBIND_TIMEOUT, || tcp_echo(tcp_url.addr(), 1024)).await;
    for agent in [&a_http, &a_tcp] {
        let moved = agent.stderr().into_iter().find(|l| l.contains("adjusted"));
        assert!(moved.is_none(), "A's agent was moved to another name or port: {moved:?}");
    }
    a_http.assert_running();
    a_tcp.assert_running();
    relay.assert_running();
}

/// An agent token may hold 16 reservations (the default `--max-reservations`): the 17th is
/// refused with 409 naming the flag, so the pool keeps ports for other tokens' tunnels. The
/// admin token may still reserve for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_capped_for_agent_tokens() {
    let tmp = TempDir::new("tenancy-reservations");
    let relay = Relay::start(RelayOpts::default().tokens(&[TOKEN_A, TOKEN_B])).await;
    let low = relay.ports().low;
    for i in 0..16 {
        let body = format!(r#"{{"port":{}}}"#, low + i);
        let (status, v) = call(&relay, "POST", "/api/v1/reservations", TOKEN_A, &body).await;
        assert_eq!(status, 201, "reservation {i}: {v}");
    }
    let body = format!(r#"{{"port":{}}}"#, low + 16);
    let (status, v) = call(&relay, "POST", "/api/v1/reservations", TOKEN_A, &body).await;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("limit_reached")), "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--max-reservations") && message.contains("16"), "{message}");

    // The admin is not capped and may reserve for A.
    let body = format!(r#"{{"token":"{}","port":{}}}"#, token_id(TOKEN_A), low + 16);
    let (status, v) = call(&relay, "POST", "/api/v1/reservations", ADMIN_TOKEN, &body).await;
    assert_eq!(status, 201, "{v}");

    // B's TCP tunnels still get a port of the pool.
    let echo = EchoBackend::start().await;
    let mut b = spawn(&relay, &tmp, "b-tcp", TOKEN_B, &["tcp", &echo.port().to_string()]);
    let url = b.tcp_url().await;
    assert!(url.port > low + 16, "B got a port reserved for A: {}", url.port);
    tcp_echo(url.addr(), 1024).await.expect("B's tunnel serves");
}

/// Writes a `warren start` file with `n` TCP tunnels to `target`.
fn config_with_tunnels(tmp: &TempDir, label: &str, n: usize, target: u16) -> String {
    let mut text = String::new();
    for i in 1..=n {
        text.push_str(&format!("[tunnels.t{i}]\nproto = \"tcp\"\ntarget = \"{target}\"\n\n"));
    }
    path_str(&tmp.write(&format!("{label}.toml"), &text))
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// With `--max-tunnels-per-token 3`, the token's fourth tunnel, asked for by a second agent, is
/// refused; with `--max-tunnels-per-session 2`, an agent's third tunnel is. Each refused agent
/// says which cap and which flag, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_capped_per_token_and_per_session() {
    let tmp = TempDir::new("tenancy-tunnels");
    let relay = Relay::start(RelayOpts::default().tokens(&[TOKEN_A, TOKEN_B]).args(&[
        "--max-tunnels-per-token",
        "3",
        "--max-tunnels-per-session",
        "2",
    ]))
    .await;
    let echo = EchoBackend::start().await;
    let two = config_with_tunnels(&tmp, "two", 2, echo.port());
    let three = config_with_tunnels(&tmp, "three", 3, echo.port());

    let mut first = spawn(&relay, &tmp, "a-first", TOKEN_A, &["start", "--config", &two]);
    for url in first.urls(2).await {
        let url = warren_tests::TcpUrl::parse(&url).expect("a tcp URL");
        tcp_echo(url.addr(), 256).await.expect("A's first tunnels serve");
    }
    let mut second = spawn(&relay, &tmp, "a-second", TOKEN_A, &["start", "--config", &two]);
    let stderr = second.expect_failure(READY_TIMEOUT).await;
    assert!(
        stderr.contains("may hold 3 tunnel(s)") && stderr.contains("--max-tunnels-per-token"),
        "the fourth tunnel of token A should be refused naming the cap:\n{stderr}"
    );

    let mut b = spawn(&relay, &tmp, "b", TOKEN_B, &["start", "--config", &three]);
    let stderr = b.expect_failure(READY_TIMEOUT).await;
    assert!(
        stderr.contains("may hold 2 tunnel(s)") && stderr.contains("--max-tunnels-per-session"),
        "the third tunnel of one session should be refused naming the cap:\n{stderr}"
    );
    first.assert_running();
}

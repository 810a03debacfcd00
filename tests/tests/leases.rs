//! Names and ports survive restarts: of the agent (lease takeover), of the relay (reconnect and
//! rebind), and are shared correctly between processes of one agent identity.

use std::time::Duration;

use anyhow::bail;
use tokio::net::TcpStream;
use warren_tests::{
    Agent, EchoBackend, HttpBackend, Outcome, READY_TIMEOUT, Relay, RelayOpts, TempDir, Transport,
    eventually, expect_get, tcp_echo, unique,
};

/// How long after a relay restart an agent may take to rebind: its reconnect backoff plus a
/// slow machine.
const REBIND_TIMEOUT: Duration = Duration::from_secs(60);

warren_tests::each_transport!(agent_restart_keeps_urls, relay_restart_restores_tunnels);

/// An agent SIGKILLed and started again with the same identity and tunnel name gets the same
/// URL at once (taking over from the session the relay may still think alive), and traffic
/// goes to the new process.
async fn agent_restart_keeps_urls(t: Transport) {
    let tmp = TempDir::new("agent-restart");
    let relay = Relay::start(RelayOpts::default().lease_grace("5m")).await;
    let first = HttpBackend::start_named("first").await;
    let echo = EchoBackend::start().await;
    let http_dir = tmp.dir("http-agent").display().to_string();
    let tcp_agent_id = unique("tcp-agent");
    let http_args = |port: u16| {
        [
            "http".to_owned(),
            port.to_string(),
            "--name".into(),
            "web".into(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            http_dir.clone(),
        ]
    };
    let tcp_args = [
        "tcp".to_owned(),
        echo.port().to_string(),
        "--transport".into(),
        t.as_str().into(),
        "--agent-id".into(),
        tcp_agent_id.clone(),
    ];

    let mut h1 = relay.spawn_agent("http-1", http_args(first.port()));
    let mut t1 = relay.spawn_agent("tcp-1", tcp_args.clone());
    let http_url = h1.http_url().await;
    let tcp_url = t1.tcp_url().await;
    expect_get(relay.http_addr, &http_url.host(), &first.greeting()).await.expect("first agent");
    tcp_echo(tcp_url.addr(), 4096).await.expect("first tcp agent");

    h1.kill().await;
    t1.kill().await;

    // Same identity and tunnel name, but the http tunnel now points at another backend, so an
    // answer proves the new process serves it.
    let second = HttpBackend::start_named("second").await;
    let mut h2 = relay.spawn_agent("http-2", http_args(second.port()));
    let mut t2 = relay.spawn_agent("tcp-2", tcp_args.clone());
    assert_eq!(h2.http_url().await, http_url, "restarted http agent got another URL");
    assert_eq!(t2.tcp_url().await, tcp_url, "restarted tcp agent got another port");
    expect_get(relay.http_addr, &http_url.host(), &second.greeting())
        .await
        .expect("http tunnel served by the restarted agent");
    tcp_echo(tcp_url.addr(), 4096).await.expect("tcp tunnel served by the restarted agent");
    h2.assert_running();
    t2.assert_running();
}

/// The relay is SIGKILLed and restarted on the same ports with the same data dir; the agents,
/// never restarted, reconnect and rebind the same subdomain and port.
async fn relay_restart_restores_tunnels(t: Transport) {
    let tmp = TempDir::new("relay-restart");
    let mut relay = Relay::start(RelayOpts::default().lease_grace("30s")).await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let mut h = relay.spawn_agent(
        "http",
        [
            "http".to_owned(),
            backend.port().to_string(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("http-agent").display().to_string(),
        ],
    );
    let mut c = relay.spawn_agent(
        "tcp",
        [
            "tcp".to_owned(),
            echo.port().to_string(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("tcp-agent").display().to_string(),
        ],
    );
    let http_url = h.http_url().await;
    let tcp_url = c.tcp_url().await;
    expect_get(relay.http_addr, &http_url.host(), &backend.greeting()).await.expect("before");
    tcp_echo(tcp_url.addr(), 4096).await.expect("tcp before restart");
    let ca_before = std::fs::read(&relay.ca_path).expect("read CA");

    relay.kill().await;
    assert!(
        TcpStream::connect(tcp_url.addr()).await.is_err(),
        "the tunnel port {} still accepts connections with the relay dead",
        tcp_url.port
    );
    relay.restart().await;
    assert_eq!(
        std::fs::read(&relay.ca_path).expect("read CA"),
        ca_before,
        "the restarted relay replaced its CA"
    );

    let (addr, host, greeting) = (relay.http_addr, http_url.host(), backend.greeting());
    eventually(REBIND_TIMEOUT, || expect_get(addr, &host, &greeting)).await;
    eventually(REBIND_TIMEOUT, || tcp_echo(tcp_url.addr(), 4096)).await;
    h.assert_running();
    c.assert_running();
    relay.assert_running();
}

/// Two processes with the same identity (same --config-dir), one `warren http` and one
/// `warren tcp`, run side by side without kicking each other off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_same_identity() {
    let tmp = TempDir::new("same-identity");
    let relay = Relay::start(RelayOpts::default().lease_grace("300")).await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let dir = tmp.dir("shared").display().to_string();
    let mut h = relay.spawn_agent(
        "http",
        ["http".to_owned(), backend.port().to_string(), "--config-dir".into(), dir.clone()],
    );
    let http_url = h.http_url().await;
    expect_get(relay.http_addr, &http_url.host(), &backend.greeting()).await.expect("http alone");

    let mut c = relay.spawn_agent(
        "tcp",
        ["tcp".to_owned(), echo.port().to_string(), "--config-dir".into(), dir],
    );
    let tcp_url = c.tcp_url().await;
    for round in 0..40 {
        expect_get(relay.http_addr, &http_url.host(), &backend.greeting())
            .await
            .unwrap_or_else(|e| panic!("http round {round}: {e:#}"));
        tcp_echo(tcp_url.addr(), 2048).await.unwrap_or_else(|e| panic!("tcp round {round}: {e:#}"));
    }
    h.assert_running();
    c.assert_running();
}

/// While an agent is dead but its lease is within grace, another agent cannot take its
/// subdomain; the same agent coming back gets it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_held_for_dead_agent() {
    let tmp = TempDir::new("lease-held");
    let relay = Relay::start(RelayOpts::default().lease_grace("5m")).await;
    let backend = HttpBackend::start().await;
    let sub = unique("held");
    let owner_args = [
        "http".to_owned(),
        backend.port().to_string(),
        "--subdomain".into(),
        sub.clone(),
        "--transport".into(),
        "tcp".into(),
        "--agent-id".into(),
        unique("owner"),
    ];
    let mut owner = relay.spawn_agent("owner", owner_args.clone());
    let url = owner.http_url().await;
    assert_eq!(url.subdomain, sub);
    owner.kill().await;

    let mut other = relay.spawn_agent(
        "other",
        [
            "http".to_owned(),
            backend.port().to_string(),
            "--subdomain".into(),
            sub.clone(),
            "--config-dir".into(),
            tmp.dir("other").display().to_string(),
        ],
    );
    let stderr = other.expect_failure(READY_TIMEOUT).await;
    assert!(stderr.contains("taken"), "stderr should say the subdomain is taken:\n{stderr}");

    let mut back = relay.spawn_agent("owner-again", owner_args);
    assert_eq!(back.http_url().await, url);
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("owner is back");
}

/// After the lease grace has passed, another agent may take a dead agent's subdomain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_released_after_grace() {
    let tmp = TempDir::new("lease-expiry");
    let relay = Relay::start(RelayOpts::default().lease_grace("2s")).await;
    let backend = HttpBackend::start_named("newcomer").await;
    let sub = unique("expiring");
    // TCP transport: the relay sees the SIGKILLed agent's connection close at once.
    let mut owner = relay.spawn_agent(
        "owner",
        [
            "http".to_owned(),
            backend.port().to_string(),
            "--subdomain".into(),
            sub.clone(),
            "--transport".into(),
            "tcp".into(),
            "--agent-id".into(),
            unique("owner"),
        ],
    );
    owner.http_url().await;
    owner.kill().await;

    let dir = tmp.dir("newcomer").display().to_string();
    let (relay_ref, sub_ref, port) = (&relay, &sub, backend.port());
    let mut newcomer: Agent = eventually(Duration::from_secs(60), || {
        let dir = dir.clone();
        async move {
            let mut a = relay_ref.spawn_agent(
                "newcomer",
                [
                    "http".to_owned(),
                    port.to_string(),
                    "--subdomain".into(),
                    sub_ref.clone(),
                    "--config-dir".into(),
                    dir,
                ],
            );
            match a.outcome(Duration::from_secs(8)).await {
                Some(Outcome::Url(_)) => Ok(a),
                Some(Outcome::Exited(status, stderr)) => {
                    bail!("newcomer exited with {status}: {stderr}")
                }
                None => bail!("newcomer neither bound nor exited"),
            }
        }
    })
    .await;
    let url = newcomer.http_url().await;
    assert_eq!(url.subdomain, sub);
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("newcomer serves");
}

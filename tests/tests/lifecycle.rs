//! Sessions that go half-open are found by heartbeats on both sides, and `warren demo` runs and
//! stops cleanly.

use std::process::Command;
use std::time::Duration;

use warren_tests::{
    Agent, HttpBackend, PortRange, Relay, TempDir, Transport, eventually, expect_get, http_get,
};

/// Heartbeats find a half-open session within 25 s; allow a slow machine some more.
const DETECT_TIMEOUT: Duration = Duration::from_secs(60);

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{sig} {pid} failed");
}

/// An agent exposing `backend` over the TLS+yamux transport, where only heartbeats (not QUIC's
/// idle timeout) can find a silent peer.
fn spawn_http_over_tcp(relay: &Relay, label: &str, backend: &HttpBackend, tmp: &TempDir) -> Agent {
    relay.spawn_agent(
        label,
        [
            "http".to_owned(),
            backend.port().to_string(),
            "--transport".into(),
            Transport::Tcp.as_str().into(),
            "--config-dir".into(),
            tmp.dir(label).display().to_string(),
        ],
    )
}

/// A frozen agent (SIGSTOP) keeps its TCP connection open, so only heartbeats can tell the relay
/// it is gone: the relay drops the session and shows the tunnel as offline, and once the agent
/// thaws it finds its session dead, reconnects and serves the same URL again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_finds_a_frozen_agent() {
    let tmp = TempDir::new("frozen-agent");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent = spawn_http_over_tcp(&relay, "frozen", &backend, &tmp);
    let url = agent.http_url().await;
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("before freezing");
    let pid = agent.pid().expect("agent pid");
    signal(pid, "STOP");
    eventually(DETECT_TIMEOUT, || {
        let lines = relay.stderr();
        async move {
            if lines.iter().any(|l| l.contains("no message from the agent")) {
                Ok(())
            } else {
                anyhow::bail!("relay has not dropped the frozen agent's session yet")
            }
        }
    })
    .await;
    let offline = http_get(relay.http_addr, &url.host(), "/").await.expect("request while frozen");
    assert_eq!(offline.status, http::StatusCode::BAD_GATEWAY, "{}", offline.text());
    assert!(offline.text().contains("offline"), "{}", offline.text());
    signal(pid, "CONT");
    let (host, greeting) = (url.host(), backend.greeting());
    eventually(DETECT_TIMEOUT, || expect_get(relay.http_addr, &host, &greeting)).await;
    agent.assert_running();
}

/// A frozen relay keeps its sockets open too: the agent notices the silence, says so, and
/// reconnects once the relay thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_finds_a_frozen_relay() {
    let tmp = TempDir::new("frozen-relay");
    let mut relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let mut agent = spawn_http_over_tcp(&relay, "patient", &backend, &tmp);
    let url = agent.http_url().await;
    let pid = relay.pid().expect("relay pid");
    signal(pid, "STOP");
    eventually(DETECT_TIMEOUT, || {
        let text = agent.stderr_text();
        async move {
            if text.contains("no heartbeat from the relay") {
                Ok(())
            } else {
                anyhow::bail!("agent has not noticed the frozen relay yet")
            }
        }
    })
    .await;
    signal(pid, "CONT");
    let (host, greeting) = (url.host(), backend.greeting());
    eventually(DETECT_TIMEOUT, || expect_get(relay.http_addr, &host, &greeting)).await;
    agent.assert_running();
    relay.assert_running();
}

/// `warren demo` prints its URLs, both tunnels reach the sample page, and SIGINT ends it with
/// status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_stops_on_ctrl_c() {
    let ports = PortRange::random(20);
    let mut demo = Agent::spawn("demo", ["demo".to_owned(), "--ports".into(), ports.arg()]);
    let (http_url, tcp_url) = eventually(Duration::from_secs(30), || {
        let out = demo.stdout();
        async move {
            let find = |prefix: &str| {
                out.iter().find_map(|l| {
                    l.split_whitespace().find(|w| w.starts_with(prefix)).map(str::to_owned)
                })
            };
            match (find("http://demo."), find("tcp://")) {
                (Some(h), Some(t)) => Ok((h, t)),
                _ => anyhow::bail!("demo has not printed both URLs yet: {out:?}"),
            }
        }
    })
    .await;
    let http = warren_tests::HttpUrl::parse(&http_url).expect("demo http url");
    let page = http_get(http.addr(), &http.host(), "/").await.expect("GET through the http tunnel");
    assert_eq!(page.status, http::StatusCode::OK);
    assert!(page.text().contains("Hello through warren"), "{}", page.text());
    assert!(page.text().to_ascii_lowercase().contains("x-forwarded-for"), "{}", page.text());
    let tcp = warren_tests::TcpUrl::parse(&tcp_url).expect("demo tcp url");
    assert!(ports.contains(tcp.addr().port()), "{tcp_url} is outside {}", ports.arg());
    let page = http_get(tcp.addr(), "localhost", "/").await.expect("GET through the tcp tunnel");
    assert!(page.text().contains("Hello through warren"), "{}", page.text());

    signal(demo.pid().expect("demo pid"), "INT");
    let (status, stderr) = demo.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "demo exited with {status} after SIGINT: {stderr}");
}

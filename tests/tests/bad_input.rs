//! Wrong credentials, conflicting requests, hostile bytes on the control port, dead targets.
//! The relay must refuse clearly and keep serving everyone else.

use std::time::Duration;

use http::StatusCode;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use warren_proto::message::kind;
use warren_proto::{ErrorCode, Message, PROTOCOL_VERSION};
use warren_tests::raw::{
    YamuxStream, client_hello, drain, frame_header, hello_frame, preface, quic_connect,
    read_message, tls_connect, yamux_header,
};
use warren_tests::{
    EchoBackend, HttpBackend, HttpSetup, IO_TIMEOUT, PortRange, READY_TIMEOUT, Relay, RelayOpts,
    TempDir, Transport, closed_port, expect_get, http_get, http_post, random_bytes, tcp_echo,
    unique, within,
};

/// How long a misbehaving peer waits for the relay to answer or hang up.
const HANG_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay is alive, the setup's existing tunnel still works, and a new agent can connect,
/// bind and carry traffic.
async fn assert_relay_healthy(s: &mut HttpSetup) {
    s.relay.assert_running();
    s.agent.assert_running();
    expect_get(s.addr(), &s.host(), &s.backend.greeting())
        .await
        .expect("the existing tunnel stopped working");
    for t in [Transport::Quic, Transport::Tcp] {
        let echo = EchoBackend::start().await;
        let mut fresh = s.relay.spawn_agent(
            &format!("fresh-{t}"),
            [
                "tcp".to_owned(),
                echo.port().to_string(),
                "--transport".into(),
                t.as_str().into(),
                "--config-dir".into(),
                s.tmp.dir(&format!("fresh-{t}")).display().to_string(),
            ],
        );
        let url = fresh.tcp_url().await;
        tcp_echo(url.addr(), 4096)
            .await
            .unwrap_or_else(|e| panic!("a new agent over {t} cannot carry traffic: {e:#}"));
    }
    s.relay.assert_running();
}

warren_tests::each_transport!(wrong_token);

/// A wrong token: the agent exits non-zero at once, naming the relay and `unauthorized`.
async fn wrong_token(t: Transport) {
    let tmp = TempDir::new("wrong-token");
    let relay = Relay::start_default().await;
    let mut agent = warren_tests::Agent::spawn(
        "bad-token",
        [
            "http".to_owned(),
            "8080".into(),
            "--relay".into(),
            relay.relay_arg(),
            "--token".into(),
            "not-the-token".into(),
            "--relay-ca".into(),
            relay.ca_path.display().to_string(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ],
    );
    // The contract says "within 5 s"; the deadline is wider for slow machines, but still far
    // below the first retries of a reconnect loop that would never end.
    let stderr = agent.expect_failure(Duration::from_secs(20)).await;
    assert!(
        stderr.contains(&relay.relay_arg()),
        "stderr should name the relay {}:\n{stderr}",
        relay.relay_arg()
    );
    assert!(
        stderr.to_ascii_lowercase().contains("unauthorized"),
        "stderr should say unauthorized:\n{stderr}"
    );
}

/// A subdomain held by one agent is refused to another (`taken`); the holder keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subdomain_taken_by_another_agent() {
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let sub = unique("shop");
    let args = |agent_id: &str| {
        [
            "http".to_owned(),
            backend.port().to_string(),
            "--subdomain".into(),
            sub.clone(),
            "--agent-id".into(),
            agent_id.to_owned(),
        ]
    };
    let mut holder = relay.spawn_agent("holder", args(&unique("holder")));
    let url = holder.http_url().await;
    assert_eq!(url.subdomain, sub);

    let mut intruder = relay.spawn_agent("intruder", args(&unique("intruder")));
    let stderr = intruder.expect_failure(READY_TIMEOUT).await;
    assert!(stderr.contains("taken"), "stderr should say the subdomain is taken:\n{stderr}");

    holder.assert_running();
    expect_get(relay.http_addr, &url.host(), &backend.greeting())
        .await
        .expect("holder still serves");
}

/// A pool of one port: the second TCP tunnel is refused (`exhausted`); the first keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_pool_exhausted() {
    let pool = PortRange::random(1);
    let relay = Relay::start(RelayOpts::default().ports(pool)).await;
    let echo = EchoBackend::start().await;
    let args = |name: &str| {
        [
            "tcp".to_owned(),
            echo.port().to_string(),
            "--name".into(),
            name.to_owned(),
            "--agent-id".into(),
            unique(name),
        ]
    };
    let mut first = relay.spawn_agent("first", args("one"));
    let url = first.tcp_url().await;
    assert_eq!(url.port, pool.low, "the only pool port");

    let mut second = relay.spawn_agent("second", args("two"));
    let stderr = second.expect_failure(READY_TIMEOUT).await;
    assert!(stderr.contains("exhausted"), "stderr should say the pool is exhausted:\n{stderr}");

    first.assert_running();
    tcp_echo(url.addr(), 4096).await.expect("first tunnel still works");
}

/// `--remote-port` outside the relay's pool is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_port_outside_pool() {
    let tmp = TempDir::new("outside-pool");
    let relay = Relay::start_default().await;
    let echo = EchoBackend::start().await;
    let outside =
        if relay.ports().high < 65000 { relay.ports().high + 1 } else { relay.ports().low - 1 };
    let mut agent = relay.spawn_agent(
        "outside",
        [
            "tcp".to_owned(),
            echo.port().to_string(),
            "--remote-port".into(),
            outside.to_string(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ],
    );
    let stderr = agent.expect_failure(READY_TIMEOUT).await;
    assert!(!stderr.trim().is_empty(), "the agent failed without saying why");
    assert!(agent.stdout().is_empty(), "no URL may be printed: {:?}", agent.stdout());
}

/// Subdomains that are not one DNS label are refused with `invalid subdomain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subdomain() {
    let tmp = TempDir::new("invalid-subdomain");
    let relay = Relay::start_default().await;
    for (i, bad) in ["bad_name", "-x", "a.b"].into_iter().enumerate() {
        let mut agent = relay.spawn_agent(
            &format!("invalid-{i}"),
            [
                "http".to_owned(),
                "8080".into(),
                // `=` so that `-x` is a value, not a flag.
                format!("--subdomain={bad}"),
                "--config-dir".into(),
                tmp.dir(&format!("agent-{i}")).display().to_string(),
            ],
        );
        let stderr = agent.expect_failure(READY_TIMEOUT).await;
        assert!(
            stderr.to_ascii_lowercase().contains("invalid subdomain"),
            "subdomain {bad:?}: stderr should say `invalid subdomain`:\n{stderr}"
        );
    }
}

/// Random bytes and a stray HTTP request on the control port's TCP side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_control_port_tcp() {
    let mut s = HttpSetup::start(Transport::Tcp).await;
    let control = s.relay.control_addr;

    let mut raw = TcpStream::connect(control).await.expect("connect control port");
    let _ = raw.write_all(&random_bytes(64 * 1024)).await;
    assert!(
        drain(&mut raw, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept a connection open that sent 64 KB of garbage"
    );

    let mut stray = TcpStream::connect(control).await.expect("connect control port");
    let _ = stray.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(
        drain(&mut stray, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept a plain HTTP request on its control port open"
    );

    assert_relay_healthy(&mut s).await;
}

/// Over TLS: a yamux header announcing a 4 GB frame, a warren frame header announcing 4 GB
/// inside a proper yamux stream, and plain garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_huge_frames_over_tls() {
    let mut s = HttpSetup::start(Transport::Tcp).await;
    let control = s.relay.control_addr;

    // yamux level: SYN data frame on stream 1 claiming u32::MAX bytes.
    let mut tls = tls_connect(control).await.expect("TLS to the relay");
    let mut bytes = yamux_header(0, 1, 1, u32::MAX);
    bytes.extend(random_bytes(16 * 1024));
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    assert!(
        drain(&mut tls, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept waiting for a 4 GB yamux frame"
    );

    // warren level: a good preface, then a Hello frame header claiming u32::MAX bytes.
    let tls = tls_connect(control).await.expect("TLS to the relay");
    let mut y = YamuxStream::open(tls).await.expect("yamux stream");
    let mut bytes = preface(PROTOCOL_VERSION, PROTOCOL_VERSION);
    bytes.extend(frame_header(kind::HELLO, u32::MAX));
    bytes.extend(random_bytes(1024));
    let _ = y.stream.write_all(&bytes).await;
    let _ = y.stream.flush().await;
    assert!(
        drain(&mut y.stream, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept waiting for a 4 GB warren frame"
    );
    drop(y);

    // plain garbage after a successful TLS handshake.
    let mut tls = tls_connect(control).await.expect("TLS to the relay");
    let _ = tls.write_all(&random_bytes(64 * 1024)).await;
    let _ = tls.flush().await;
    assert!(
        drain(&mut tls, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept a TLS session open that sent garbage"
    );

    assert_relay_healthy(&mut s).await;
}

/// Over QUIC: garbage on a stream, and a frame header announcing 4 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_huge_frames_over_quic() {
    let mut s = HttpSetup::start(Transport::Quic).await;
    let control = s.relay.control_addr;

    let (_ep, conn) = quic_connect(control).await.expect("QUIC to the relay");
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let _ = send.write_all(&random_bytes(64 * 1024)).await;
    let _ = send.finish();
    assert!(
        drain(&mut recv, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept a QUIC stream open that sent garbage"
    );

    let (_ep2, conn2) = quic_connect(control).await.expect("QUIC to the relay");
    let (mut send, mut recv) = conn2.open_bi().await.expect("open stream");
    let mut bytes = preface(PROTOCOL_VERSION, PROTOCOL_VERSION);
    bytes.extend(frame_header(kind::HELLO, u32::MAX));
    bytes.extend(random_bytes(1024));
    let _ = send.write_all(&bytes).await;
    assert!(
        drain(&mut recv, HANG_UP_TIMEOUT).await.is_some(),
        "the relay kept waiting for a 4 GB warren frame over QUIC"
    );

    assert_relay_healthy(&mut s).await;
}

/// Connections stuck mid-handshake do not keep new agents (on either transport) out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_finished_handshakes_do_not_block() {
    let mut s = HttpSetup::start(Transport::Tcp).await;
    let control = s.relay.control_addr;

    let mut held_tcp = Vec::new();
    for _ in 0..8 {
        held_tcp.push(TcpStream::connect(control).await.expect("connect control port"));
    }
    let hello = client_hello();
    assert!(hello.len() > 10, "ClientHello of {} bytes", hello.len());
    for _ in 0..4 {
        let mut c = TcpStream::connect(control).await.expect("connect control port");
        c.write_all(&hello[..hello.len() / 2]).await.expect("half a ClientHello");
        held_tcp.push(c);
    }
    let idle_tls = tls_connect(control).await.expect("TLS to the relay");
    let mut half_preface_tls =
        YamuxStream::open(tls_connect(control).await.expect("TLS")).await.expect("yamux");
    half_preface_tls.stream.write_all(b"WAR").await.expect("3 bytes of preface");
    half_preface_tls.stream.flush().await.expect("flush");

    let (_ep, quic_half) = quic_connect(control).await.expect("QUIC to the relay");
    let (mut send, _recv) = quic_half.open_bi().await.expect("open stream");
    send.write_all(b"WAR").await.expect("3 bytes of preface");
    let (_ep2, _quic_idle) = quic_connect(control).await.expect("QUIC to the relay");

    for t in [Transport::Quic, Transport::Tcp] {
        let backend = HttpBackend::start_named(&format!("fresh-{t}")).await;
        let mut fresh = s.relay.spawn_agent(
            &format!("fresh-{t}"),
            [
                "http".to_owned(),
                backend.port().to_string(),
                "--transport".into(),
                t.as_str().into(),
                "--config-dir".into(),
                s.tmp.dir(&format!("fresh-{t}")).display().to_string(),
            ],
        );
        let url = fresh.http_url().await;
        expect_get(s.addr(), &url.host(), &backend.greeting())
            .await
            .unwrap_or_else(|e| panic!("new agent over {t} while handshakes hang: {e:#}"));
    }
    expect_get(s.addr(), &s.host(), &s.backend.greeting()).await.expect("existing tunnel");
    s.relay.assert_running();

    drop((held_tcp, idle_tls, half_preface_tls, send));
}

fn assert_version_mismatch(msg: Message) {
    match msg {
        Message::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::VersionMismatch, "message: {message}");
            let relay = format!("{PROTOCOL_VERSION}-{PROTOCOL_VERSION}");
            assert!(
                message.contains(&relay) && message.contains("90-99"),
                "the message should name the relay's versions {relay} and the agent's 90-99: \
                 {message:?}"
            );
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

/// An agent speaking only versions 90-99 is told, over QUIC, that versions do not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_over_quic() {
    let mut relay = Relay::start_default().await;
    let (_ep, conn) = quic_connect(relay.control_addr).await.expect("QUIC to the relay");
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let mut bytes = preface(90, 99);
    bytes.extend(hello_frame(relay.token(), "version-test"));
    send.write_all(&bytes).await.expect("send preface and Hello");
    let msg = read_message(&mut recv, IO_TIMEOUT).await.expect("an answer from the relay");
    assert_version_mismatch(msg);
    relay.assert_running();
}

/// What the relay answers, over TLS + yamux, an agent whose preface says `min..=max`.
async fn answer_to_versions_over_tls(relay: &Relay, min: u16, max: u16) -> Message {
    let tls = tls_connect(relay.control_addr).await.expect("TLS to the relay");
    let mut y = YamuxStream::open(tls).await.expect("yamux stream");
    let mut bytes = preface(min, max);
    bytes.extend(hello_frame(relay.token(), "version-test"));
    y.stream.write_all(&bytes).await.expect("send preface and Hello");
    y.stream.flush().await.expect("flush");
    read_message(&mut y.stream, IO_TIMEOUT).await.expect("an answer from the relay")
}

/// The same over TLS + yamux.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_over_tls() {
    let mut relay = Relay::start_default().await;
    assert_version_mismatch(answer_to_versions_over_tls(&relay, 90, 99).await);
    relay.assert_running();
}

/// An agent of protocol version 1, which does not answer data streams with `StreamAccept`, is
/// told to upgrade rather than let in to serve streams the relay would reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_agent_is_told_to_upgrade() {
    let mut relay = Relay::start_default().await;
    match answer_to_versions_over_tls(&relay, 1, 1).await {
        Message::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::VersionMismatch, "message: {message}");
            assert!(message.contains("upgrade the agent"), "{message:?}");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    relay.assert_running();
}

warren_tests::each_transport!(http_target_down_gives_502);

/// An HTTP tunnel whose target refuses connections answers 502 naming the tunnel and target.
async fn http_target_down_gives_502(t: Transport) {
    let tmp = TempDir::new("http-down");
    let relay = Relay::start_default().await;
    let port = closed_port();
    let target = format!("127.0.0.1:{port}");
    let mut agent = relay.spawn_agent(
        "down",
        [
            "http".to_owned(),
            target.clone(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ],
    );
    let url = agent.http_url().await;
    let name = format!("http-{port}");
    // Several requests, with and without a body the agent never reads: each must get the
    // agent's 502, not a generic failure of the relay.
    for i in 0..10 {
        let fut = async {
            if i % 2 == 0 {
                http_get(relay.http_addr, &url.host(), "/").await
            } else {
                http_post(relay.http_addr, &url.host(), "/form", random_bytes(64 * 1024)).await
            }
        };
        let resp = within(IO_TIMEOUT, "request to a dead target", fut)
            .await
            .unwrap_or_else(|e| panic!("request {i}: no answer from the relay: {e:#}"));
        let body = resp.text();
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "request {i}: body {body:?}");
        assert!(
            body.contains(&name),
            "request {i}: the 502 body should name the tunnel {name:?}: {body:?}"
        );
        assert!(
            body.contains(&target),
            "request {i}: the 502 body should name the target {target:?}: {body:?}"
        );
    }
    agent.assert_running();
}

/// A TCP tunnel whose target refuses connections closes the visitor's connection cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_target_down_closes_cleanly() {
    let tmp = TempDir::new("tcp-down");
    let relay = Relay::start_default().await;
    let port = closed_port();
    let mut agent = relay.spawn_agent(
        "down",
        [
            "tcp".to_owned(),
            format!("127.0.0.1:{port}"),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ],
    );
    let url = agent.tcp_url().await;
    for _ in 0..3 {
        warren_tests::client::expect_eof(url.addr()).await.expect("a clean close");
    }
    agent.assert_running();
}

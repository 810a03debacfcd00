//! The control port against peers without a token: streams they open besides the control stream
//! are refused, what they send before `Welcome` is held in small windows, handshakes in progress
//! are capped per address, and failed authentications lock the address out for a while. Each
//! test runs the real relay (and, where it matters, a real agent serving a tunnel).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use warren_proto::{ErrorCode, Message, PROTOCOL_VERSION};
use warren_tests::raw::{
    YamuxStream, drain, hello_frame, insecure_client_config, preface, quic_connect, read_message,
    tls_connect,
};
use warren_tests::{
    HttpBackend, HttpSetup, IO_TIMEOUT, Relay, TempDir, Transport, eventually, expect_get,
};
use warren_transport::{Mode, RelayAddr, Session};

const KIB: usize = 1024;
const MIB: u64 = 1024 * 1024;
/// Peers flooding at once, and streams each tries to open.
const CONNECTIONS: usize = 4;
const STREAMS: usize = 2000;
/// How much the relay's resident memory may grow under the flood.
const MAX_GROWTH: u64 = 32 * MIB;
/// Longest a flood runs (a hang guard: the relay ends every flooding connection by its 5 s
/// handshake deadline at the latest).
const FLOOD_WINDOW: Duration = Duration::from_secs(8);

fn mode(t: Transport) -> Mode {
    match t {
        Transport::Quic => Mode::Quic,
        Transport::Tcp => Mode::Tcp,
        Transport::Auto => Mode::Auto,
    }
}

/// A session to the relay's control port as any TLS or QUIC client could open one: ALPN
/// `warren/1`, the relay's certificate not checked.
async fn raw_session(control: SocketAddr, t: Transport) -> anyhow::Result<Session> {
    let relay: RelayAddr = control.to_string().parse().map_err(anyhow::Error::msg)?;
    Ok(warren_transport::connect(&relay, mode(t), insecure_client_config()).await?)
}

/// What one flooding peer achieved.
#[derive(Debug, Default)]
struct Flooded {
    streams: usize,
    bytes: u64,
}

/// One peer without a token: a session whose control stream gets only the preface (so the relay
/// waits for `Hello`), then up to [`STREAMS`] more streams with `per_stream` bytes written on
/// each, all held open until the relay ends the session or `until`.
async fn flood_one(
    control: SocketAddr,
    t: Transport,
    per_stream: usize,
    until: Instant,
) -> Flooded {
    let mut done = Flooded::default();
    let Ok(Ok(session)) = tokio::time::timeout_at(until, raw_session(control, t)).await else {
        return done;
    };
    let Ok(Ok(mut first)) = tokio::time::timeout_at(until, session.open()).await else {
        return done;
    };
    if first.write_all(&preface(PROTOCOL_VERSION, PROTOCOL_VERSION)).await.is_err() {
        return done;
    }
    let bytes = Arc::new(AtomicU64::new(0));
    let mut writers = JoinSet::new();
    for _ in 0..STREAMS {
        let Ok(Ok(mut stream)) = tokio::time::timeout_at(until, session.open()).await else {
            break;
        };
        done.streams += 1;
        let (bytes, session) = (bytes.clone(), session.clone());
        writers.spawn(async move {
            let chunk = vec![0x5a_u8; 64 * KIB];
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(chunk.len());
                match tokio::time::timeout_at(until, stream.write_all(&chunk[..n])).await {
                    Ok(Ok(())) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        left -= n;
                    }
                    _ => break,
                }
            }
            // Held, not reset: the relay must not depend on the flooder letting go.
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = session.closed() => {}
            }
            drop(stream);
        });
    }
    while writers.join_next().await.is_some() {}
    done.bytes = bytes.load(Ordering::Relaxed);
    drop(first);
    done
}

warren_tests::each_transport!(flood_is_bounded);

/// Four peers without a token each open 2000 streams on one session and write on every one
/// (256 KiB over yamux, its initial stream window; 8 MiB over QUIC, its stream window). The relay
/// grows by less than 32 MiB and the tunnel of a real agent answers during and after the flood.
async fn flood_is_bounded(t: Transport) {
    let mut s = HttpSetup::start(t).await;
    for _ in 0..3 {
        expect_get(s.addr(), &s.host(), &s.backend.greeting()).await.expect("tunnel before flood");
    }
    let before = s.relay.rss_bytes();
    let per_stream = match t {
        Transport::Quic => 8 * KIB * KIB,
        _ => 256 * KIB,
    };
    let until = Instant::now() + FLOOD_WINDOW;
    let mut flood = JoinSet::new();
    for _ in 0..CONNECTIONS {
        flood.spawn(flood_one(s.relay.control_addr, t, per_stream, until));
    }
    let mut peak = before;
    let mut results = Vec::new();
    let mut ticks = 0u32;
    let mut served_during = 0u32;
    let mut sample = tokio::time::interval(Duration::from_millis(50));
    // Bounded: every flood task ends by `until`, and each tick is a bounded request at most.
    loop {
        tokio::select! {
            r = flood.join_next() => match r {
                Some(r) => results.push(r.expect("flood task")),
                None => break,
            },
            _ = sample.tick() => {
                peak = peak.max(s.relay.rss_bytes());
                // Fails at once rather than letting an unbounded relay eat the machine.
                assert!(
                    peak.saturating_sub(before) < MAX_GROWTH,
                    "relay RSS grew from {} MiB to {} MiB under the flood",
                    before / MIB,
                    peak / MIB
                );
                if ticks.is_multiple_of(5) {
                    expect_get(s.addr(), &s.host(), &s.backend.greeting())
                        .await
                        .expect("the tunnel must answer during the flood");
                    served_during += 1;
                }
                ticks += 1;
            }
        }
    }
    let streams: usize = results.iter().map(|r| r.streams).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    eprintln!(
        "flood over {t}: {streams} streams opened, {} MiB written, {served_during} requests \
         served meanwhile; relay RSS {} MiB before, {} MiB at most",
        bytes / MIB,
        before / MIB,
        peak / MIB
    );
    assert!(served_during > 0, "no request went through the tunnel during the flood");
    for _ in 0..3 {
        expect_get(s.addr(), &s.host(), &s.backend.greeting()).await.expect("tunnel after flood");
    }
    let after = s.relay.rss_bytes();
    assert!(
        after.saturating_sub(before) < MAX_GROWTH,
        "relay RSS grew from {} MiB to {} MiB after the flood",
        before / MIB,
        after / MIB
    );
    s.relay.assert_running();
    s.agent.assert_running();
}

warren_tests::each_transport!(only_the_control_stream);

/// An agent may open its control stream and nothing else: over yamux a second stream is reset at
/// once (the handshake on the control stream goes on and gets its `Welcome`); over QUIC the relay
/// grants no credit for a second stream at all.
async fn only_the_control_stream(t: Transport) {
    let relay = Relay::start_default().await;
    let session = raw_session(relay.control_addr, t).await.expect("session to the relay");
    let mut control = session.open().await.expect("control stream");
    control.write_all(&preface(PROTOCOL_VERSION, PROTOCOL_VERSION)).await.expect("preface");
    match t {
        Transport::Quic => {
            let second = tokio::time::timeout(Duration::from_secs(1), session.open()).await;
            assert!(second.is_err(), "the relay let an agent open a second QUIC stream");
        }
        _ => {
            let mut extra = session.open().await.expect("second stream (opened locally)");
            // Writing sends the stream's SYN; it may already fail if the reset came back.
            let _ = extra.write_all(b"more").await;
            let _ = extra.flush().await;
            // "At once": well within the handshake deadline (5 s), after which the relay would
            // close the whole connection anyway.
            assert!(
                drain(&mut extra, Duration::from_secs(3)).await.is_some(),
                "the relay kept a second yamux stream open instead of resetting it"
            );
        }
    }
    control.write_all(&hello_frame(relay.token(), "only-control")).await.expect("Hello");
    control.flush().await.expect("flush");
    match read_message(&mut control, IO_TIMEOUT).await.expect("the relay's answer") {
        Message::Welcome(_) => {}
        other => panic!("expected Welcome on the control stream, got {other:?}"),
    }
}

/// Whether the relay has closed `c` (end of stream or reset), without waiting.
fn is_closed(c: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match c.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Twenty connections at once from 127.0.0.1 that never start TLS: the relay holds 16 (the
/// default `--max-handshakes-per-ip`) and closes the other four at once; a QUIC attempt from the
/// same address is refused meanwhile; a real agent gets in once the held ones have timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_per_address_are_capped() {
    let tmp = TempDir::new("handshake-cap");
    let mut relay = Relay::start_default().await;
    let control = relay.control_addr;
    let conns: Vec<TcpStream> =
        futures::future::join_all((0..20).map(|_| TcpStream::connect(control)))
            .await
            .into_iter()
            .map(|c| c.expect("connect the control port"))
            .collect();
    // Well before the 5 s handshake deadline, which would close the held ones too.
    eventually(Duration::from_secs(4), || {
        let closed = conns.iter().filter(|c| is_closed(c)).count();
        async move {
            anyhow::ensure!(closed == 4, "{closed} of 20 closed, expected the 4 over the cap");
            Ok(())
        }
    })
    .await;
    let quic = tokio::time::timeout(IO_TIMEOUT, quic_connect(control))
        .await
        .expect("the QUIC attempt hung instead of being refused");
    assert!(quic.is_err(), "a 17th handshake from the same address was served over QUIC");

    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "after-cap", backend.port(), &["--transport", "tcp"]);
    let url = agent.http_url().await;
    expect_get(relay.http_addr, &url.host(), &backend.greeting())
        .await
        .expect("the agent's tunnel after the held handshakes timed out");
    eventually(IO_TIMEOUT, || {
        let open = conns.iter().filter(|c| !is_closed(c)).count();
        async move {
            anyhow::ensure!(open == 0, "{open} handshakes that never finished are still open");
            Ok(())
        }
    })
    .await;
    relay.assert_running();
}

/// The relay's first answer to a preface and `Hello` with `token`, over TLS + yamux.
async fn hello_answer(control: SocketAddr, token: &str) -> Message {
    let tls = tls_connect(control).await.expect("TLS to the relay");
    let mut y = YamuxStream::open(tls).await.expect("yamux stream");
    let mut bytes = preface(PROTOCOL_VERSION, PROTOCOL_VERSION);
    bytes.extend(hello_frame(token, "throttle-test"));
    y.stream.write_all(&bytes).await.expect("preface and Hello");
    y.stream.flush().await.expect("flush");
    read_message(&mut y.stream, IO_TIMEOUT).await.expect("an answer from the relay")
}

/// The `N` of "retry in Ns" in a refusal, if there is one.
fn retry_in(message: &str) -> Option<u64> {
    let rest = &message[message.find("retry in ")? + "retry in ".len()..];
    rest.split('s').next()?.parse().ok()
}

/// Wrong tokens from one address: ten a minute are free, then each locks the address out for
/// twice as long. While locked out, even the right token is refused as `Throttled` (it is not
/// looked at); the real agent says why, keeps retrying and gets in once the lockout is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_throttled() {
    let tmp = TempDir::new("throttle");
    let relay = Relay::start_default().await;
    let control = relay.control_addr;
    let mut failures = 0u32;
    let mut lockout = 0u64;
    // Lockouts of 0.25, 0.5, 1 and 2 s are waited out until one of at least 4 s is reached.
    let deadline = Instant::now() + Duration::from_secs(60);
    while lockout < 4 {
        assert!(
            Instant::now() < deadline && failures < 40,
            "{failures} wrong tokens and the relay never locked the address out for 4 s"
        );
        match hello_answer(control, "not-the-token").await {
            Message::Error { code: ErrorCode::Unauthorized, message, .. } => {
                failures += 1;
                if let Some(n) = retry_in(&message) {
                    assert!(failures > 10, "locked out after only {failures} failures: {message}");
                    lockout = n;
                }
            }
            Message::Error { code: ErrorCode::Throttled, message, .. } => {
                assert!(failures > 10, "throttled after only {failures} failures: {message}");
                // Polled until the current lockout has passed.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a wrong token was answered with {other:?}"),
        }
    }

    match hello_answer(control, relay.token()).await {
        Message::Error { code: ErrorCode::Throttled, message, .. } => assert!(
            message.contains("too many failed authentications from 127.0.0.1")
                && retry_in(&message).is_some(),
            "the refusal should say why and when to retry: {message:?}"
        ),
        other => panic!("the right token from a locked-out address got {other:?}"),
    }

    let backend = HttpBackend::start().await;
    let mut agent =
        relay.spawn_tunnel(&tmp, "http", "throttled", backend.port(), &["--transport", "tcp"]);
    let url = agent.http_url().await;
    let stderr = agent.stderr_text();
    assert!(
        stderr.contains("too many failed authentications") && stderr.contains("--token"),
        "the agent should have said why the relay refused it and what to check:\n{stderr}"
    );
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("tunnel");
    match hello_answer(control, relay.token()).await {
        Message::Welcome(_) => {}
        other => panic!("the right token after the lockout got {other:?}"),
    }
}

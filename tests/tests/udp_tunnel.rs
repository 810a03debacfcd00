//! UDP tunnels through the real relay and agent, over each transport: packets ride QUIC
//! datagrams (`--transport quic`) or a length-prefixed stream per visitor flow
//! (`--transport tcp`).

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::process::Command;
use warren_tests::udp::DNS_TYPE_A;
use warren_tests::{
    Agent, BULK_TIMEOUT, DnsBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir, Transport,
    UdpEchoBackend, UdpUrl, udp_flood, udp_roundtrip, within,
};

/// Packets in the flood.
const FLOOD_PACKETS: usize = 1000;
/// Fewest of them that must come back over loopback.
const FLOOD_MIN_BACK: usize = 990;

/// A relay, a UDP echo backend and one `warren udp` agent tunnelling to it.
struct UdpSetup {
    agent: Agent,
    url: UdpUrl,
    relay: Relay,
    backend: UdpEchoBackend,
    _tmp: TempDir,
}

impl UdpSetup {
    async fn start(opts: RelayOpts, t: Transport, extra: &[&str]) -> Self {
        let tmp = TempDir::new("udp");
        let relay = Relay::start(opts).await;
        let backend = UdpEchoBackend::start().await.expect("udp echo backend");
        let mut args = vec![
            "udp".to_owned(),
            backend.port().to_string(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut agent = relay.spawn_agent("udp-agent", args);
        let url = agent.udp_url().await;
        assert!(
            relay.ports().contains(url.port),
            "{} is outside the pool {:?}",
            url.url,
            relay.ports()
        );
        Self { agent, url, relay, backend, _tmp: tmp }
    }
}

warren_tests::each_transport!(
    flood_1000_packets,
    two_visitors_get_their_own_replies,
    dig_through_tunnel
);

/// 1000 packets of 512 bytes, 32 in flight at a time, echoed through the tunnel: over loopback
/// (nearly) all come back.
async fn flood_1000_packets(t: Transport) {
    let mut s = UdpSetup::start(RelayOpts::default(), t, &[]).await;
    // The tunnel carries a first packet (from another visitor) before the flood is measured.
    within(
        IO_TIMEOUT,
        "first UDP round trip",
        udp_roundtrip(s.url.addr(), &[b"warm-up".to_vec()], IO_TIMEOUT),
    )
    .await
    .expect("a first packet through the UDP tunnel");
    let back = within(
        BULK_TIMEOUT,
        "UDP flood",
        udp_flood(s.url.addr(), FLOOD_PACKETS, 512, BULK_TIMEOUT),
    )
    .await
    .expect("UDP flood");
    eprintln!(
        "udp flood over {t}: {back} of {FLOOD_PACKETS} packets came back; backend received {}",
        s.backend.received()
    );
    assert!(
        back >= FLOOD_MIN_BACK,
        "only {back} of {FLOOD_PACKETS} echoed packets came back over {t} (want >= {FLOOD_MIN_BACK}); \
         the backend received {}",
        s.backend.received()
    );
    s.agent.assert_running();
    s.relay.assert_running();
}

/// Two visitors (two client sockets) at the same time, each with its own payloads: each gets
/// only its own replies, and the backend sees two distinct flows.
async fn two_visitors_get_their_own_replies(t: Transport) {
    let mut s = UdpSetup::start(RelayOpts::default(), t, &[]).await;
    let target = s.url.addr();
    let payloads = |who: &str| -> Vec<Vec<u8>> {
        (0..20)
            .map(|i| format!("visitor {who} packet {i} {}", "x".repeat(i * 7)).into_bytes())
            .collect()
    };
    let (a, b) = (payloads("A"), payloads("B"));
    let (got_a, got_b) = within(BULK_TIMEOUT, "two UDP visitors", async {
        tokio::join!(udp_roundtrip(target, &a, IO_TIMEOUT), udp_roundtrip(target, &b, IO_TIMEOUT))
    })
    .await;
    let got_a = got_a.expect("visitor A's round trips");
    let got_b = got_b.expect("visitor B's round trips");
    for (i, (got, want)) in got_a.iter().zip(&a).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want),
            "visitor A, packet {i}: got another reply"
        );
    }
    for (i, (got, want)) in got_b.iter().zip(&b).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want),
            "visitor B, packet {i}: got another reply"
        );
    }
    let peers = s.backend.peers();
    assert_eq!(peers.len(), 2, "the backend should see one flow per visitor, saw peers {peers:?}");
    s.agent.assert_running();
}

/// The real `dig` resolves a name through a UDP tunnel to a DNS server.
async fn dig_through_tunnel(t: Transport) {
    let answer = Ipv4Addr::new(192, 0, 2, 53);
    let tmp = TempDir::new("udp-dns");
    let relay = Relay::start_default().await;
    let dns = DnsBackend::start(answer).await.expect("dns backend");
    let mut agent = relay.spawn_agent(
        "dns-agent",
        [
            "udp".to_owned(),
            dns.port().to_string(),
            "--transport".into(),
            t.as_str().into(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ],
    );
    let url = agent.udp_url().await;
    let port = url.port.to_string();
    let args = ["@127.0.0.1", "-p", &port, "shop.test", "A", "+short", "+tries=3", "+time=2"];
    let out = within(
        Duration::from_secs(30),
        "dig",
        Command::new("dig").args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|e| {
        panic!("cannot run `dig` ({e}); install it (apt-get install dnsutils) to run this test")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "dig {args:?} exited with {}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.trim(),
        answer.to_string(),
        "dig {args:?} printed:\n{stdout}\nstderr:\n{stderr}"
    );
    let questions = dns.questions();
    assert!(
        questions.iter().any(|q| q.name == "shop.test" && q.qtype == DNS_TYPE_A),
        "the DNS backend did not see the A question for shop.test: {questions:?}"
    );
    agent.assert_running();
}

/// `--remote-port` picks the public UDP port from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_port_is_honoured() {
    let opts = RelayOpts::default();
    let wanted = opts.ports.low + 3;
    let wanted_arg = wanted.to_string();
    let s = UdpSetup::start(opts, Transport::Quic, &["--remote-port", &wanted_arg]).await;
    assert_eq!(s.url.port, wanted, "{} is not on the requested port {wanted}", s.url.url);
    let replies = within(
        IO_TIMEOUT,
        "UDP round trip",
        udp_roundtrip(s.url.addr(), &[b"ping".to_vec()], IO_TIMEOUT),
    )
    .await
    .expect("a round trip on the requested port");
    assert_eq!(replies, vec![b"ping".to_vec()]);
}

/// With `--udp-idle-timeout 1s`, a visitor that pauses longer than that still gets its
/// replies afterwards (the relay forgets the flow and starts a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_survives_idle_timeout() {
    let s = UdpSetup::start(
        RelayOpts::default().args(&["--udp-idle-timeout", "1s"]),
        Transport::Quic,
        &[],
    )
    .await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind visitor socket");
    let target = s.url.addr();
    let exchange = |payload: &'static [u8]| {
        let socket = &socket;
        async move {
            let mut buf = [0u8; 64];
            for _ in 0..10 {
                // Late duplicates of earlier packets are not this packet's reply.
                while socket.try_recv_from(&mut buf).is_ok() {}
                socket.send_to(payload, target).await.expect("send");
                if let Ok(Ok((n, from))) =
                    tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf))
                        .await
                {
                    assert_eq!(from, target, "reply from an unexpected address");
                    assert_eq!(&buf[..n], payload);
                    return;
                }
            }
            panic!("no reply to {:?} within 10 tries", String::from_utf8_lossy(payload));
        }
    };
    exchange(b"before the pause").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    exchange(b"after the pause").await;
}

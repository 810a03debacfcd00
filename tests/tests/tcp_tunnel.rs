//! TCP tunnels through the real relay and agent, over each transport.

use tokio::task::JoinSet;
use warren_tests::client::tcp_bulk_echo;
use warren_tests::{BULK_TIMEOUT, TcpSetup, Transport, tcp_echo, within};

warren_tests::each_transport!(bulk_100mb_each_way, concurrent_200_connections);

/// 100 MB up and 100 MB down at the same time on one connection, checked by SHA-256.
async fn bulk_100mb_each_way(t: Transport) {
    let s = TcpSetup::start(t).await;
    within(BULK_TIMEOUT, "100 MB echo", tcp_bulk_echo(s.url.addr(), 100 * 1024 * 1024))
        .await
        .expect("100 MB through the tunnel and back");
    assert!(s.backend.connections() >= 1, "the echo backend saw no connection");
}

/// 200 visitor connections at once, each echoing a few KB.
async fn concurrent_200_connections(t: Transport) {
    let s = TcpSetup::start(t).await;
    let addr = s.url.addr();
    let mut set = JoinSet::new();
    for i in 0..200usize {
        set.spawn(async move { (i, tcp_echo(addr, 2048 + i * 37).await) });
    }
    let failures = within(BULK_TIMEOUT, "200 concurrent echoes", async {
        let mut failures = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, result) = joined.expect("echo task panicked");
            if let Err(e) = result {
                failures.push(format!("connection {i}: {e:#}"));
            }
        }
        failures
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of 200 connections failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(s.backend.connections() >= 200, "backend saw {} connections", s.backend.connections());
}

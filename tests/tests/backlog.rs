//! A burst of visitors at a TCP tunnel's public port is queued by the kernel at once: the relay
//! listens with the system's maximum backlog, so no SYN is dropped and retried a second later.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use warren_tests::{TcpSetup, Transport, within};

/// Visitors connecting at once.
const VISITORS: usize = 1000;
/// Every connect() must return within this of the burst's start. A dropped SYN is retried after
/// at least 1 s, so this fails exactly when the accept queue overflows.
const ACCEPT_BOUND: Duration = Duration::from_secs(1);
/// Every echo round trip must be done within this of the burst's start: a hang guard only.
const ROUND_TRIP_BOUND: Duration = Duration::from_secs(20);

/// One visitor: connects, then sends a few bytes and reads them back. Returns how long after
/// `start` its connect() returned.
async fn visitor(addr: SocketAddr, i: usize, start: Instant) -> Result<Duration, String> {
    let mut s = tokio::time::timeout(ROUND_TRIP_BOUND, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} did not return within {ROUND_TRIP_BOUND:?}"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let accepted = start.elapsed();
    let payload = format!("visitor {i} says hello\n").into_bytes();
    let round_trip = async {
        s.write_all(&payload).await.map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).await.map_err(|e| format!("read the echo: {e}"))?;
        if back != payload {
            return Err("the echo differs from what was sent".to_owned());
        }
        Ok(())
    };
    tokio::time::timeout(ROUND_TRIP_BOUND, round_trip)
        .await
        .map_err(|_| format!("no echo within {ROUND_TRIP_BOUND:?}"))??;
    Ok(accepted)
}

/// 1,000 visitors connect to a pool port at the same moment: all are accepted within 1 s and all
/// complete an echo round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_1000_visitors_is_accepted_at_once() {
    let s = TcpSetup::start(Transport::Quic).await;
    let addr = s.url.addr();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..VISITORS {
        set.spawn(async move { (i, visitor(addr, i, start).await) });
    }
    let (accept_times, failures) = within(ROUND_TRIP_BOUND * 2, "1000 visitors", async {
        let mut times = Vec::with_capacity(VISITORS);
        let mut failures = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined.expect("visitor task panicked") {
                (_, Ok(t)) => times.push(t),
                (i, Err(e)) => failures.push(format!("visitor {i}: {e}")),
            }
        }
        (times, failures)
    })
    .await;
    let all_done = start.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {VISITORS} visitors failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(all_done <= ROUND_TRIP_BOUND, "the round trips took {all_done:?}");
    let slowest = accept_times.iter().max().copied().unwrap_or_default();
    let late = accept_times.iter().filter(|t| **t > ACCEPT_BOUND).count();
    assert_eq!(
        late, 0,
        "{late} of {VISITORS} connects returned after {ACCEPT_BOUND:?} (slowest {slowest:?}): \
         the accept queue overflowed and SYNs were retried"
    );
    assert!(
        s.backend.connections() >= VISITORS,
        "the backend saw {} connections",
        s.backend.connections()
    );
}

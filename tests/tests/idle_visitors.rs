//! Idle visitors cost a stream each and nothing more: 5,000 visitors that connect to a TCP tunnel
//! and send nothing (nor does the target) all reach the target, over both transports, and a new
//! visitor is answered at once. Over TLS + yamux this needs the agent's `StreamAccept` answer
//! (PROTOCOL.md §7): yamux acknowledges a stream only with the receiver's first frame and lets a
//! side wait for at most 256 acknowledgements, after which every new stream of the session stalls.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use warren_tests::{RelayOpts, TcpSetup, Transport, within};

/// Visitors that connect and stay silent.
const IDLE: usize = 5000;
/// Connects in flight at once while the idle visitors arrive.
const CONNECT_BATCH: usize = 250;
/// The answer a new visitor must get, as the median of [`PROBES`] tries (the machine is shared,
/// so one slow try says little; the failure this guards against is a stall of seconds).
const ANSWER_BOUND: Duration = Duration::from_millis(100);
const PROBES: usize = 5;
/// Open files this test needs: each idle visitor is a socket here and one at the echo backend.
const FDS_NEEDED: u64 = 2 * IDLE as u64 + 1024;

/// One transport at a time: the two runs together would need twice the open files.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Raises this process's open-files limit (and so its children's) to what the test needs.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= FDS_NEEDED {
        return;
    }
    // Raising the hard limit needs root; without it the soft limit can still reach the hard one.
    let hard = hard.max(FDS_NEEDED);
    if setrlimit(Resource::RLIMIT_NOFILE, FDS_NEEDED, hard).is_err() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        soft >= FDS_NEEDED,
        "this test needs {FDS_NEEDED} open files and the limit is {soft}: run it as root or \
         raise `ulimit -n`"
    );
}

/// Connects and writes nothing.
async fn idle_visitor(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    Ok(s)
}

/// A visitor's whole request: connect, send a line, read its echo. Returns how long it took.
async fn ask(addr: SocketAddr, what: &[u8]) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(what).await.map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).await.map_err(|e| format!("read: {e}"))?;
    if back != what {
        return Err("the echo differs from what was sent".into());
    }
    Ok(start.elapsed())
}

async fn idle_visitors_wait_on_nobody(t: Transport) {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_fd_limit();
    let opts = RelayOpts::default().args(&["--max-conns-per-ip", "0", "--idle-timeout", "5m"]);
    let mut s = TcpSetup::start_with(opts, t).await;
    let addr = s.url.addr();

    let mut idle = Vec::with_capacity(IDLE);
    let mut failures = Vec::new();
    within(Duration::from_secs(120), "connecting the idle visitors", async {
        let mut left = IDLE;
        while left > 0 {
            let n = left.min(CONNECT_BATCH);
            let mut set = JoinSet::new();
            for _ in 0..n {
                set.spawn(idle_visitor(addr));
            }
            while let Some(r) = set.join_next().await {
                match r.expect("visitor task") {
                    Ok(s) => idle.push(s),
                    Err(e) => failures.push(e),
                }
            }
            left -= n;
        }
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} idle visitors failed: {:?}",
        failures.len(),
        &failures[..5.min(failures.len())]
    );

    // Every idle visitor is connected through to the target, though none has sent a byte.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.backend.connections() < IDLE && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.backend.connections() >= IDLE,
        "{} of {IDLE} idle visitors reached the target over {}: the agent's streams stall",
        s.backend.connections(),
        t.as_str()
    );

    // A new visitor is answered at once.
    let mut took = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        let line = format!("new visitor {i}\n");
        let d =
            within(Duration::from_secs(10), "a new visitor's request", ask(addr, line.as_bytes()))
                .await
                .unwrap_or_else(|e| panic!("new visitor {i} over {}: {e}", t.as_str()));
        took.push(d);
    }
    took.sort();
    let median = took[PROBES / 2];
    eprintln!(
        "{}: {} idle visitors connected through; a new visitor's request took {median:?} \
         (median of {took:?})",
        t.as_str(),
        s.backend.connections()
    );
    assert!(
        median < ANSWER_BOUND,
        "with {IDLE} idle visitors a new visitor's request took {median:?} (median of {took:?}) \
         over {}",
        t.as_str()
    );

    // And the idle ones are live connections: the first and the last still echo.
    let last = idle.len() - 1;
    for i in [0, last] {
        let v = &mut idle[i];
        let ping = b"still here\n";
        within(Duration::from_secs(10), "an idle visitor's echo", async {
            v.write_all(ping).await.expect("write on an idle visitor");
            let mut back = [0u8; 11];
            v.read_exact(&mut back).await.expect("echo on an idle visitor");
            assert_eq!(&back, ping);
        })
        .await;
    }
    drop(idle);
    s.agent.assert_running();
    s.relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_visitors_wait_on_nobody_tcp() {
    idle_visitors_wait_on_nobody(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_visitors_wait_on_nobody_quic() {
    idle_visitors_wait_on_nobody(Transport::Quic).await;
}

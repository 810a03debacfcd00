//! The relay and the agent raise their soft limit on open files to the hard limit at start, so a
//! burst of visitors is not refused at the usual soft limit of 1024 descriptors.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use warren_tests::{TcpSetup, Transport};

/// The soft and hard "Max open files" of process `pid`, from `/proc/PID/limits`.
fn open_files_limits(pid: u32) -> (String, String) {
    let path = format!("/proc/{pid}/limits");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no \"Max open files\" line in {path}:\n{text}"));
    let mut fields = line.trim_start_matches("Max open files").split_whitespace();
    let soft = fields.next().unwrap_or_default().to_owned();
    let hard = fields.next().unwrap_or_default().to_owned();
    (soft, hard)
}

/// Started with a soft limit below the hard one, both binaries run with the hard limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_agent_raise_the_open_files_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // Children inherit this process's limits; this test file runs alone in its process.
    let low = (hard / 2).min(1024);
    assert!(low >= 256, "the hard open-files limit {hard} is too low to run this test");
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).expect("lower the soft open-files limit");
    let mut s = TcpSetup::start(Transport::Quic).await;
    for (name, pid) in [("relay", s.relay.pid()), ("agent", s.agent.pid())] {
        let pid = pid.unwrap_or_else(|| panic!("the {name} is not running"));
        let (soft, hard) = open_files_limits(pid);
        assert_eq!(soft, hard, "the {name}'s soft open-files limit was not raised to the hard one");
    }
    s.relay.assert_running();
    s.agent.assert_running();
}

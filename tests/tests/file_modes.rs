//! File modes: what the relay and the agent keep on disk is their user's alone, whatever the
//! umask they were started with, and a wider mode found at start is tightened with a WARN naming
//! the file.
//!
//! - the relay's data directory (0700) and its secrets (0600), fresh under umask 000, and
//!   tightened when an older relay or an operator left them wide;
//! - the agent's config directory and identity, likewise;
//! - as root, in namespaces of the test's own (see `warren_tests::netns`): `networks.db` and the
//!   Docker plugin's socket (0660, group `docker` or root's) under umask 000, and `warren net
//!   run`'s resolv.conf, which no longer goes through a predictable path in `$TMPDIR` where a
//!   planted link made root write elsewhere.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use warren_tests::docker::plugin_socket_gid;
use warren_tests::netns::{HostNs, HostOpts, Netns, NsDaemon, require, retry};
use warren_tests::process::binary;
use warren_tests::relay::parse_listening;
use warren_tests::{
    Daemon, PortRange, READY_TIMEOUT, Relay, TempDir, closed_port, eventually, localhost,
};

/// The secrets a relay started without `--token` and `--admin-token` has written once it
/// listens, besides its database.
const RELAY_SECRETS: &[&str] =
    &["ca-key.pem", "relay-key.pem", "agent-token", "admin-token", "quic-reset-key"];

/// `sh` arguments that run `program args...` with umask 000, as a careless service manager
/// might.
fn umask_000(program: &Path, args: &[String]) -> Vec<String> {
    let mut all = vec![
        "-c".to_owned(),
        r#"umask 000; exec "$0" "$@""#.to_owned(),
        program.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    all
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn assert_mode(path: &Path, want: u32) {
    let got = mode(path);
    assert_eq!(got, want, "{} has mode {got:04o}, not {want:04o}", path.display());
}

/// Asserts that the SQLite database `db` and its journals, where there are any, are 0600.
fn assert_db_private(db: &Path) {
    assert_mode(db, 0o600);
    for suffix in ["-wal", "-shm"] {
        let mut journal = db.as_os_str().to_owned();
        journal.push(suffix);
        let journal = PathBuf::from(journal);
        if journal.exists() {
            assert_mode(&journal, 0o600);
        }
    }
}

/// Asserts that `log` has a WARN line naming `path` and saying it was tightened.
fn assert_warned(log: &str, path: &Path) {
    let name = path.display().to_string();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("tightened") && l.contains(&name)),
        "no WARN about tightening {name} in:\n{log}"
    );
}

/// Starts the workspace binary `bin` with `args` under umask 000 and waits until `ready` holds
/// (it is given the output so far).
async fn start_under_umask_000(bin: &str, args: &[String], ready: impl Fn(&str) -> bool) -> Daemon {
    let mut d = Daemon::spawn(bin, "sh", &umask_000(&binary(bin), args), &[]);
    wait_for_output(&mut d, ready).await;
    d
}

/// Waits (bounded) until `ready` holds for `d`'s output; fails at once if `d` exits first.
async fn wait_for_output(d: &mut Daemon, ready: impl Fn(&str) -> bool) -> String {
    eventually(READY_TIMEOUT, || {
        let out = d.output();
        let ok = ready(&out);
        assert!(ok || d.is_running(), "it exited before it was ready:\n{out}");
        async move {
            anyhow::ensure!(ok, "not ready yet:\n{out}");
            Ok(out)
        }
    })
    .await
}

/// `warren-server` on loopback under umask 000 with `data` as its data directory and no token
/// given (so it generates both); returns once its API listens.
async fn relay_under_umask_000(data: &Path) -> Daemon {
    let any = "127.0.0.1:0".to_owned();
    let args: Vec<String> = [
        "--domain",
        "localhost",
        "--control",
        &any,
        "--http",
        &any,
        "--https",
        &any,
        "--api",
        &any,
        "--ports",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([PortRange::random(4).arg(), "--data".into(), data.display().to_string()])
    .collect();
    start_under_umask_000("warren-server", &args, |out| {
        out.lines().filter_map(parse_listening).any(|(name, _)| name == "api")
    })
    .await
}

/// A relay started under umask 000 makes its data directory 0700 and every secret 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_data_dir_is_private_under_umask_000() {
    let tmp = TempDir::new("modes-relay");
    let data = tmp.join("data");
    let _relay = relay_under_umask_000(&data).await;
    assert_mode(&data, 0o700);
    for f in RELAY_SECRETS {
        assert_mode(&data.join(f), 0o600);
    }
    assert_db_private(&data.join("warren.db"));
}

/// A data directory left 0755 with 0644 secrets (an older relay, a copy) is tightened at the
/// next start, with a WARN naming each file, and the relay starts with the same CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_tightens_a_wide_data_dir_and_its_secrets() {
    let mut relay = Relay::start_default().await;
    let ca = std::fs::read(&relay.ca_path).expect("ca.pem");
    relay.kill().await;
    let data = relay.data_dir.clone();
    set_mode(&data, 0o755);
    let wide: Vec<PathBuf> = ["ca-key.pem", "quic-reset-key", "warren.db"]
        .iter()
        .map(|f| data.join(f))
        .filter(|p| p.exists())
        .collect();
    assert!(wide.len() == 3, "the relay's first run left {wide:?}");
    for f in &wide {
        set_mode(f, 0o644);
    }
    relay.restart().await;
    // This run's lines only: the harness made the directory 0755, so the first run warned too.
    let lines = relay.stderr();
    let start =
        lines.iter().rposition(|l| l.contains("test harness: relay (re)start")).unwrap_or(0);
    let log = lines[start..].join("\n");
    assert_mode(&data, 0o700);
    assert_warned(&log, &data);
    for f in &wide {
        assert_mode(f, 0o600);
        assert_warned(&log, f);
    }
    assert_eq!(std::fs::read(&relay.ca_path).expect("ca.pem"), ca, "the CA was kept");
}

/// `warren http ... --config-dir DIR` under umask 000 (its relay unreachable: the identity is
/// made before it connects), until `DIR/agent-id` exists.
async fn agent_with_config_dir(dir: &Path) -> Daemon {
    let args: Vec<String> = [
        "http".to_owned(),
        "8080".into(),
        "--relay".into(),
        localhost(closed_port()).to_string(),
        "--token".into(),
        "t".into(),
        "--insecure".into(),
        "--no-api".into(),
        "--config-dir".into(),
        dir.display().to_string(),
    ]
    .into();
    let id = dir.join("agent-id");
    start_under_umask_000("warren", &args, |_| {
        std::fs::read_to_string(&id).is_ok_and(|s| !s.trim().is_empty())
    })
    .await
}

/// The agent's config directory is 0700 and its identity 0600 under umask 000; wider modes
/// found there are tightened with a WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_config_dir_is_private() {
    let tmp = TempDir::new("modes-agent");
    let fresh = tmp.join("fresh");
    let _agent = agent_with_config_dir(&fresh).await;
    assert_mode(&fresh, 0o700);
    assert_mode(&fresh.join("agent-id"), 0o600);

    let wide = tmp.dir("wide");
    let id = tmp.write("wide/agent-id", "test-wide-1\n");
    set_mode(&wide, 0o755);
    set_mode(&id, 0o644);
    let mut agent = agent_with_config_dir(&wide).await;
    let log = wait_for_output(&mut agent, |out| out.matches("tightened").count() >= 2).await;
    assert_warned(&log, &wide);
    assert_warned(&log, &id);
    assert_mode(&wide, 0o700);
    assert_mode(&id, 0o600);
    assert_eq!(std::fs::read_to_string(&id).expect("agent-id"), "test-wide-1\n", "identity kept");
}

/// As root, in a namespace of its own: `warren agent --docker-plugin` under umask 000 makes its
/// `networks.db` 0600 in a 0700 config directory, and its plugin socket 0660 with group
/// `docker` (root's when there is no such group). No dockerd is needed to listen.
#[test]
fn networks_db_and_plugin_socket_under_umask_000() {
    if !require(&[]) {
        return;
    }
    let ns = Netns::new("fm");
    let tmp = TempDir::new("modes-net");
    let config = tmp.join("config");
    let socket = tmp.dir("plugins").join("wtfm.sock");
    let args: Vec<String> = [
        "agent",
        "--api",
        "127.0.0.1:4040",
        "--config-dir",
        &config.display().to_string(),
        "--docker-plugin",
        "--docker-plugin-socket",
        &socket.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut agent = NsDaemon::spawn(
        &ns,
        "plugin agent",
        Path::new("/bin/sh"),
        &umask_000(&binary("warren"), &args),
        &[],
    );
    retry(READY_TIMEOUT, "the plugin socket", || {
        anyhow::ensure!(agent.exited().is_none(), "the agent exited");
        anyhow::ensure!(socket.exists(), "no {} yet", socket.display());
        Ok(())
    });
    assert_db_private(&config.join("networks.db"));
    assert_mode(&config, 0o700);
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660, "the plugin socket's mode");
    assert_eq!(meta.gid(), plugin_socket_gid(), "the plugin socket's group");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.join("plugins"))
        .expect("plugins dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "wtfm.sock")
        .collect();
    assert!(leftovers.is_empty(), "besides the socket: {leftovers:?}");
}

/// How many pids after the last one allocated get a planted link: more than the processes and
/// threads this machine starts while `warren net run` starts its sandbox.
const PLANTED: u32 = 5000;

/// `warren net run` used to write `$TMPDIR/warren-resolv-<pid>` as root through whatever was
/// there. With links planted at every such path the sandbox could get (the pids after the
/// last allocated one), the link's target is left alone, the links too, the command still sees
/// the gateway as its nameserver, and nothing is left in the runtime directory.
#[test]
fn net_run_resolv_conf_follows_no_planted_link() {
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    let net = format!("fm{}", std::process::id());
    host.net_ok(&["create", &net, "--subnet", "10.213.9.0/24"]);
    let trap = TempDir::new("modes-trap");
    let victim = trap.write("victim", "untouched\n");
    let tmpdir = trap.dir("tmp");
    let pid_max: u32 = read_number("/proc/sys/kernel/pid_max");
    let mut attempts = 0;
    let (pid, out) = loop {
        attempts += 1;
        let last: u32 = read_number("/proc/sys/kernel/ns_last_pid");
        // Pids wrap around to 300 after pid_max.
        let planted: std::collections::BTreeSet<u32> = (1..=PLANTED)
            .map(|i| last + i)
            .map(|p| if p >= pid_max { p - pid_max + 300 } else { p })
            .collect();
        for p in &planted {
            let _ = std::os::unix::fs::symlink(&victim, tmpdir.join(format!("warren-resolv-{p}")));
        }
        let script = "echo pid=$$; cat /etc/resolv.conf";
        let out = host.warren_timeout(
            &["net", "run", &net, "--name", "job", "--", "sh", "-c", script],
            &[("TMPDIR", tmpdir.to_str().expect("utf-8"))],
            Duration::from_secs(60),
        );
        let text = out.ok().to_owned();
        let pid: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid= line in:\n{text}"));
        // Else too busy a machine: the sandbox's pid came after every planted link. Again.
        if planted.contains(&pid) {
            break (pid, text);
        }
        assert!(
            attempts < 3,
            "the sandbox's pid {pid} came after the {PLANTED} planted links three times: too busy a machine"
        );
    };
    let link = tmpdir.join(format!("warren-resolv-{pid}"));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched\n",
        "root wrote through the link planted at {}",
        link.display()
    );
    assert!(
        link.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()),
        "the link planted for the sandbox's pid {pid} is gone: was it used?"
    );
    assert!(
        out.lines().any(|l| l.trim() == "nameserver 10.213.9.1"),
        "resolv.conf in the sandbox:\n{out}"
    );
    let runtime = Path::new("/run/warren");
    let meta = std::fs::symlink_metadata(runtime).expect("/run/warren");
    assert!(meta.is_dir() && meta.uid() == 0, "{meta:?}");
    assert_eq!(meta.mode() & 0o022, 0, "/run/warren is writable by others: {meta:?}");
    let left = runtime.join(format!("resolv-{pid}.conf"));
    assert!(!left.exists(), "{} was left behind", left.display());
}

fn read_number(path: &str) -> u32 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim().parse().unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
}

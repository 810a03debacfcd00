//! `warren net run`: a command in a fresh network namespace attached to a network.
//!
//! The CLI starts itself again as a hidden child. The child leaves the CLI's network and mount
//! namespaces (before any thread exists, which `unshare` requires), waits until the agent has
//! attached its namespace (the default route appears), points `/etc/resolv.conf` at the
//! network's DNS with a private bind mount, and then becomes the command. The namespace belongs
//! to the command's processes: when they are gone, so are its interface and the veth's host
//! end.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// The hidden subcommand the child runs as.
pub const CHILD_COMMAND: &str = "net-sandbox-child";

/// How long the child waits for the agent to attach it.
pub const ATTACH_WAIT: Duration = Duration::from_secs(20);

/// The default gateway of the current network namespace, from `/proc/net/route`.
fn default_gateway() -> Option<Ipv4Addr> {
    let f = std::fs::File::open("/proc/net/route").ok()?;
    for line in std::io::BufReader::new(f).lines().skip(1).map_while(Result::ok) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000" {
            let gw = u32::from_str_radix(cols[2], 16).ok()?;
            return Some(Ipv4Addr::from(gw.swap_bytes()));
        }
    }
    None
}

/// The child: new namespaces, wait for the network, resolv.conf, then exec `cmd`.
pub fn child_main(network: &str, cmd: &[String]) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(125)
    };
    let Some((prog, args)) = cmd.split_first() else {
        return fail("no command given".into());
    };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS) {
        return fail(format!(
            "cannot create a network namespace: {e} (warren net run needs root: CAP_SYS_ADMIN)"
        ));
    }
    if let Err(e) =
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
    {
        return fail(format!("cannot make the mounts private: {e}"));
    }
    let deadline = Instant::now() + ATTACH_WAIT;
    let gateway = loop {
        if let Some(gw) = default_gateway() {
            break gw;
        }
        if Instant::now() > deadline {
            return fail(format!(
                "the agent did not attach this sandbox to {network} within {}s",
                ATTACH_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Err(e) = point_resolv_conf(gateway, network) {
        eprintln!("warning: /etc/resolv.conf not set for {network}: {e}");
    }
    let err = std::process::Command::new(prog).args(args).exec();
    eprintln!("error: cannot run {prog}: {err}");
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 })
}

fn point_resolv_conf(gateway: Ipv4Addr, network: &str) -> std::io::Result<()> {
    let target = Path::new("/etc/resolv.conf");
    if !target.exists() {
        std::fs::write(target, "")?;
    }
    let tmp = std::env::temp_dir().join(format!("warren-resolv-{}", std::process::id()));
    std::fs::write(&tmp, format!("nameserver {gateway}\nsearch {network}\noptions ndots:1\n"))?;
    let done = mount(Some(&tmp), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(std::io::Error::from);
    let _ = std::fs::remove_file(&tmp);
    done
}

/// Whether process `pid` has left our network namespace yet.
pub fn has_own_netns(pid: u32) -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (ino("/proc/self/ns/net"), ino(&format!("/proc/{pid}/ns/net"))) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

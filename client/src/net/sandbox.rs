//! `warren net run`: a command in a fresh network namespace attached to a network.
//!
//! The CLI starts itself again as a hidden child. The child leaves the CLI's network and mount
//! namespaces (before any thread exists, which `unshare` requires), waits until the agent has
//! attached its namespace (the default route appears), points `/etc/resolv.conf` at the
//! network's DNS with a private bind mount, and then becomes the command. The namespace belongs
//! to the command's processes: when they are gone, so are its interface and the veth's host
//! end.
//!
//! The file bind-mounted over `/etc/resolv.conf` is made in [`RUNTIME_DIR`], a directory that
//! must be this user's (root's) and writable by no one else, with `O_CREAT|O_EXCL|O_NOFOLLOW`
//! through the directory's descriptor, mounted through `/proc/self/fd`, and unlinked at once:
//! the mount keeps it alive for the command and no other user can plant a link to make root
//! write elsewhere. (A memfd would need no directory, but the kernel refuses to bind-mount
//! one: `EINVAL`, its file system is in no mount namespace.)

use std::io::{self, BufRead, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};

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

/// Where the sandbox's resolv.conf is made before it is bind-mounted (see the module's doc).
pub const RUNTIME_DIR: &str = "/run/warren";

fn point_resolv_conf(gateway: Ipv4Addr, network: &str) -> io::Result<()> {
    let target = Path::new("/etc/resolv.conf");
    // Something to mount over; made only where nothing is, not even a dangling link (whose
    // target would be created on the host).
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(target) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dir = private_runtime_dir(Path::new(RUNTIME_DIR))?;
    let name = format!("resolv-{}.conf", std::process::id());
    let mut file = create_exclusive(&dir, &name)?;
    let written = file
        .write_all(format!("nameserver {gateway}\nsearch {network}\noptions ndots:1\n").as_bytes())
        // Readable by the command whatever user it becomes, whatever the umask.
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(0o644)));
    let source = format!("/proc/self/fd/{}", file.as_raw_fd());
    let done = written.and_then(|()| {
        mount(Some(source.as_str()), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(io::Error::from)
    });
    let _ = unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
    done
}

/// Opens `path` as a directory, creating it (0700) when missing; refused unless it is a real
/// directory (not a link) of this user's that no one else may write to.
fn private_runtime_dir(path: &Path) -> io::Result<std::fs::File> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(context(e)),
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(path)
        .map_err(context)?;
    let meta = dir.metadata().map_err(context)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {} with mode {:04o}: it must be uid {me}'s and writable by no one else; remove it",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(dir)
}

/// Creates `name` in `dir` (`O_CREAT|O_EXCL|O_NOFOLLOW`); one left by a sandbox that died
/// before it removed its own (same pid, pid reuse) is replaced.
fn create_exclusive(dir: &std::fs::File, name: &str) -> io::Result<std::fs::File> {
    let flags =
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
    let create = || openat(dir, name, flags, Mode::from_bits_truncate(0o644));
    let fd = match create() {
        Err(Errno::EEXIST) => {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
            create()?
        }
        other => other?,
    };
    Ok(std::fs::File::from(fd))
}

/// Whether process `pid` has left our network namespace yet.
pub fn has_own_netns(pid: u32) -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (ino("/proc/self/ns/net"), ino(&format!("/proc/{pid}/ns/net"))) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use warren_server::util::PrivateTempDir;

    use super::*;

    #[test]
    fn runtime_dir_is_made_private_and_unsafe_ones_are_refused() {
        let s = PrivateTempDir::new("sandbox-dir").unwrap();
        let fresh = s.path().join("run");
        private_runtime_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o7777, 0o700);
        // Readable by others is fine: no one else can add, remove or replace anything there.
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_runtime_dir(&fresh).unwrap();
        for mode in [0o775, 0o757, 0o1777] {
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = private_runtime_dir(&fresh).unwrap_err();
            assert!(err.to_string().contains("writable by no one else"), "{mode:o}: {err}");
        }
        let link = s.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_runtime_dir(&link).is_err(), "a link to a good directory is refused too");
    }

    #[test]
    fn files_are_created_exclusively_without_following_links() {
        let s = PrivateTempDir::new("sandbox-file").unwrap();
        let dir = private_runtime_dir(&s.path().join("run")).unwrap();
        let victim = s.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, s.path().join("run/planted")).unwrap();
        let mut f = create_exclusive(&dir, "planted").unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let made = std::fs::symlink_metadata(s.path().join("run/planted")).unwrap();
        assert!(made.file_type().is_file(), "the link was replaced by a file of ours");
        assert_eq!(std::fs::read_to_string(s.path().join("run/planted")).unwrap(), "new");
    }
}

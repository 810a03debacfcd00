//! Small helpers shared by the relay and the agent binary.

use std::io;
use std::path::{Path, PathBuf};

use rand::Rng;

/// A random string of `len` characters from `a-z0-9`: tokens, identity suffixes.
pub fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
}

/// Creates `path` with mode 0600 and writes `data`; fails if the file already exists.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)
}

/// Makes `path` a directory only its owner can use: created (parents as the umask says) with
/// mode 0700 when missing; an existing one open to group or others is tightened to 0700 with a
/// WARN naming it.
///
/// Refused: a directory that belongs to another user than this one or root (its owner could
/// swap the files in it), a shared directory (sticky bit, like `/tmp`), which tightening would
/// lock everyone else out of, and a world-writable one that is not ours to tighten. One of
/// root's that is open only to its group or to reading (a volume root with the relay's group)
/// is kept with a WARN: the secrets in it are 0600 each (see [`check_private_file`]).
pub fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        // Whatever the umask took away, the owner needs all three bits.
        Ok(()) => return set_mode(path, 0o700),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", path.display())));
    }
    let (owner, me) = (meta.uid(), nix::unistd::geteuid().as_raw());
    if owner != me && owner != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {owner}, neither this user (uid {me}) nor root: its owner could swap the files in it; use a directory of your own",
                path.display()
            ),
        ));
    }
    let mode = mode_of(&meta);
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if mode & 0o1000 != 0 {
        return Err(io::Error::other(format!(
            "{} is a shared directory (mode {mode:04o}, like /tmp): give warren a directory of its own",
            path.display()
        )));
    }
    match set_mode(path, 0o700) {
        Ok(()) => {
            tracing::warn!(
                path = %path.display(),
                was = %format_args!("{mode:04o}"),
                "directory was open to other users; tightened to 0700"
            );
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && mode & 0o002 == 0 => {
            tracing::warn!(
                path = %path.display(),
                mode = %format_args!("{mode:04o}"),
                "directory is open to other users but not ours to tighten ({e}); the secrets in it stay 0600 (chmod 700 it)"
            );
            Ok(())
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} is open to other users (mode {mode:04o}) and cannot be made private: {e} (chmod 700 it, or use a directory of your own)",
                path.display()
            ),
        )),
    }
}

/// Checks that the secret at `path` is its owner's alone: a file group or others may use is
/// set to 0600 with a WARN naming it. A missing file is fine.
pub fn check_private_file(path: &Path) -> io::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is a directory where a secret file belongs",
            path.display()
        )));
    }
    let mode = mode_of(&meta);
    if mode & 0o077 == 0 {
        return Ok(());
    }
    set_mode(path, 0o600).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} is open to other users (mode {mode:04o}) and cannot be made private: {e} (chmod 600 it)",
                path.display()
            ),
        )
    })?;
    tracing::warn!(
        path = %path.display(),
        was = %format_args!("{mode:04o}"),
        "secret file was open to other users; tightened to 0600"
    );
    Ok(())
}

/// Creates an empty file at `path` with mode 0600 unless there is one, then checks it with
/// [`check_private_file`]: for files another library opens and would otherwise create with the
/// umask's mode (SQLite gives its `-wal` and `-shm` files the database's mode).
pub fn create_private_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match created {
        // The umask may have taken the owner's bits too; SQLite needs both.
        Ok(f) => f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_private_file(path),
        Err(e) => Err(e),
    }
}

/// A new directory of this user's alone (0700) under the system's temp dir, named so no one can
/// make it first, removed with its contents on drop: the demo's data directory, tests' scratch.
#[derive(Debug)]
pub struct PrivateTempDir(PathBuf);

impl PrivateTempDir {
    /// Creates `$TMPDIR/warren-LABEL-PID-RANDOM`; fails rather than use one that exists.
    pub fn new(label: &str) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let name = format!("warren-{label}-{}-{}", std::process::id(), random_alnum(12));
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The permission bits of `meta` (with setuid, setgid and sticky).
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Logs to stderr, filtered by `WARREN_LOG` (or `RUST_LOG`, else `default`), with colours only
/// on a terminal.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// An error and all its sources, `outer: inner: innermost`, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = inner.source();
    }
    out
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as an RFC 3339 UTC time, e.g. `2026-11-28T02:03:04Z`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Raises this process's soft limit on open files to its hard limit. A relay or agent holds
/// about one descriptor per visitor connection (two on the agent: visitor stream and backend),
/// and the usual soft limit of 1024 would refuse visitors long before the machine runs out.
/// Logged at debug; failing to raise is not an error (the process runs with what it has).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::debug!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_831_384), "2026-11-28T02:03:04Z");
        assert_eq!(super::rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    use super::*;

    fn mode(path: &Path) -> u32 {
        mode_of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn private_dir_creates_and_tightens() {
        let s = PrivateTempDir::new("dir").unwrap();
        let fresh = s.path().join("a/b");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let wide = s.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        set_mode(&wide, 0o755).unwrap();
        private_dir(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
        private_dir(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
    }

    #[test]
    fn private_dir_refuses_shared_directories_and_files() {
        let s = PrivateTempDir::new("shared").unwrap();
        let shared = s.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o1777).unwrap();
        let err = private_dir(&shared).unwrap_err();
        assert!(err.to_string().contains("shared directory"), "{err}");
        assert_eq!(mode(&shared), 0o1777, "a shared directory is left as it was");
        let file = s.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = private_dir(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn private_dir_refuses_other_users_directories() {
        if !nix::unistd::geteuid().is_root() {
            return; // Only root can give a directory away.
        }
        let s = PrivateTempDir::new("owner").unwrap();
        let theirs = s.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(54_321), None).unwrap();
        let err = private_dir(&theirs).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 54321"), "{err}");
    }

    #[test]
    fn private_temp_dirs_are_fresh_private_and_removed() {
        let a = PrivateTempDir::new("t").unwrap();
        let b = PrivateTempDir::new("t").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(mode(a.path()), 0o700);
        std::fs::write(a.path().join("f"), "x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn secrets_are_tightened_and_missing_ones_are_fine() {
        let s = PrivateTempDir::new("file").unwrap();
        check_private_file(&s.path().join("absent")).unwrap();
        let key = s.path().join("key");
        std::fs::write(&key, "secret").unwrap();
        set_mode(&key, 0o644).unwrap();
        check_private_file(&key).unwrap();
        assert_eq!(mode(&key), 0o600);
        set_mode(&key, 0o400).unwrap();
        check_private_file(&key).unwrap();
        assert_eq!(mode(&key), 0o400, "a file already private is left alone");
        assert!(check_private_file(s.path()).is_err(), "a directory is no secret file");
    }

    #[test]
    fn private_files_are_created_0600_or_tightened() {
        let s = PrivateTempDir::new("create").unwrap();
        let db = s.path().join("new.db");
        create_private_file(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        let old = s.path().join("old.db");
        std::fs::write(&old, "data").unwrap();
        set_mode(&old, 0o664).unwrap();
        create_private_file(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "data", "an existing file is kept");
    }

    #[test]
    fn random_names_use_the_alphabet() {
        let s = random_alnum(40);
        assert_eq!(s.len(), 40);
        assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{s}");
        assert_ne!(random_alnum(40), s);
    }
}

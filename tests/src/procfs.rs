//! What `/proc` says about a child process (open file descriptors, CPU time, TCP sockets), and
//! signals to it: for tests that freeze processes and look for leaks (resident memory:
//! [`crate::util::rss_bytes`]).

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Clock ticks per second of `/proc/PID/stat`'s CPU times (`USER_HZ`, 100 on Linux for every
/// architecture this runs on).
pub const TICKS_PER_SEC: u64 = 100;

/// How many file descriptors `pid` has open (entries of `/proc/PID/fd`); panics if the process
/// is gone.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// CPU time `pid` has used so far, user plus system, in [`TICKS_PER_SEC`] ticks; `None` once the
/// process is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The TCP sockets `pid` holds, as `ss -tanp` lists them (for a failing test's message), or why
/// they cannot be listed.
pub fn tcp_sockets(pid: u32) -> String {
    let out = match std::process::Command::new("ss").args(["-tanp"]).output() {
        Ok(out) => out,
        Err(e) => return format!("(cannot run ss: {e})"),
    };
    let needle = format!("pid={pid},");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends `sig` to `pid`; panics if that fails (the process is gone).
pub fn signal(pid: u32, sig: Signal) {
    let raw = i32::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
    nix::sys::signal::kill(Pid::from_raw(raw), sig)
        .unwrap_or_else(|e| panic!("cannot send {sig} to {pid}: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(fd_count(me) >= 3);
        assert!(cpu_ticks(me).is_some());
    }
}

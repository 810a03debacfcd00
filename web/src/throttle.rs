//! Slowing down failed authentications, per source address, for every API and the relay's
//! control port.
//!
//! Each address may fail [`FREE_FAILURES`] times a minute without consequence. Past that, every
//! further failure locks the address out for a delay that doubles each time (from
//! [`FIRST_DELAY`] up to [`MAX_DELAY`]); while locked out, its attempts are refused without
//! looking at the token, so parallel connections guess no faster than one. A success does not
//! clear the address (a tenant could otherwise guess others' tokens between its own logins);
//! failures age out with the window. The table is bounded: when full, the entry whose window is oldest is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures a minute an address may have before it is slowed down.
pub const FREE_FAILURES: u32 = 10;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The lockout after the first failure past the free ones.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest lockout.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

/// The failure table; share it behind an `Arc`.
#[derive(Debug)]
pub struct AuthThrottle {
    table: Mutex<HashMap<IpAddr, Entry>>,
    free: u32,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        Self::with_free_failures(FREE_FAILURES)
    }
}

impl AuthThrottle {
    /// An empty table allowing [`FREE_FAILURES`] a minute.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table allowing `free` failures a minute per address before lockouts.
    pub fn with_free_failures(free: u32) -> Self {
        Self { table: Mutex::default(), free }
    }

    /// Whether `ip` is locked out now; `Some(how long still)` if so. Check before the token.
    pub fn locked(&self, ip: IpAddr) -> Option<Duration> {
        self.locked_at(ip, Instant::now())
    }

    /// Records a failed authentication from `ip`; returns the lockout it now has, if any.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        self.failed_at(ip, Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn locked_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let table = self.lock();
        let until = table.get(&normalize(ip))?.locked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let ip = normalize(ip);
        let mut table = self.lock();
        if !table.contains_key(&ip) && table.len() >= MAX_ADDRESSES {
            // Forget whoever failed longest ago; expired windows first by construction.
            if let Some(oldest) = table.iter().min_by_key(|(_, e)| e.window_start).map(|(k, _)| *k)
            {
                table.remove(&oldest);
            }
        }
        let e =
            table.entry(ip).or_insert(Entry { window_start: now, failures: 0, locked_until: None });
        let locked = e.locked_until.is_some_and(|u| u > now);
        if !locked && now.duration_since(e.window_start) >= WINDOW {
            *e = Entry { window_start: now, failures: 0, locked_until: None };
        }
        e.failures = e.failures.saturating_add(1);
        if e.failures <= self.free {
            return None;
        }
        let over = (e.failures - self.free - 1).min(16);
        let delay = FIRST_DELAY.saturating_mul(1 << over).min(MAX_DELAY);
        e.locked_until = Some(now + delay);
        // The window restarts with the lockout, so the count survives until it has passed.
        e.window_start = now;
        Some(delay)
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn free_failures_then_doubling_lockouts() {
        let t = AuthThrottle::new();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed_at(A, now), None);
            assert_eq!(t.locked_at(A, now), None);
        }
        assert_eq!(t.failed_at(A, now), Some(FIRST_DELAY));
        assert_eq!(t.locked_at(A, now), Some(FIRST_DELAY));
        assert_eq!(t.locked_at(B, now), None, "other addresses are not affected");
        let later = now + FIRST_DELAY;
        assert_eq!(t.locked_at(A, later), None);
        assert_eq!(t.failed_at(A, later), Some(FIRST_DELAY * 2));
        let mut at = later;
        for _ in 0..40 {
            at += MAX_DELAY;
            t.failed_at(A, at);
        }
        assert_eq!(t.locked_at(A, at), Some(MAX_DELAY), "the delay is capped");
    }

    #[test]
    fn window_resets() {
        let t = AuthThrottle::new();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.failed_at(A, now);
        }
        assert_eq!(t.failed_at(A, now + WINDOW), None, "a new minute starts afresh");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            t.failed_at(mapped, now + WINDOW);
        }
        assert!(t.locked_at(A, now + WINDOW).is_some(), "mapped addresses count as IPv4");
    }

    #[test]
    fn table_is_bounded() {
        let t = AuthThrottle::new();
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            t.failed_at(IpAddr::V4(i.into()), now + Duration::from_millis(i.into()));
        }
        assert_eq!(t.lock().len(), MAX_ADDRESSES);
    }
}

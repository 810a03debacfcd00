//! Per-tunnel options carried in [`crate::Bind`]: visitor access control and HTTP behaviour that
//! the relay enforces, so that refused traffic never crosses the tunnel.
//!
//! On the wire the options are a list of `u16 key | u16 length | value` entries after the bind's
//! fixed fields. A receiver that meets a key it does not know keeps its number in
//! [`TunnelOptions::unknown`]; the relay refuses such a bind rather than silently ignoring what
//! may be a security setting (see `PROTOCOL.md`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use bytes::{Buf, BufMut};

use crate::frame::{DecodeError, Reader, Writer};

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A network; `None` when the prefix is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| Self { addr: mask(addr, prefix), prefix })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the network. IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid network {s:?}: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Self::new(ip, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One user allowed in by HTTP basic authentication. The relay never learns the password: it
/// gets the SHA-256 digest of `user:password` and compares visitors' credentials by digest.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// The user name.
    pub user: String,
    /// SHA-256 of `user:password`.
    pub digest: [u8; 32],
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth").field("user", &self.user).finish_non_exhaustive()
    }
}

/// Options of one tunnel. The default is a tunnel open to everyone with no changes to traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelOptions {
    /// Visitors must authenticate as one of these users (HTTP tunnels).
    pub basic_auth: Vec<BasicAuth>,
    /// When not empty, only visitors from these networks are let in.
    pub allow: Vec<Cidr>,
    /// Visitors from these networks are refused (checked before `allow`).
    pub deny: Vec<Cidr>,
    /// Most requests (HTTP) or connections (TCP, TLS) per second from one visitor address.
    pub rate_limit: Option<u32>,
    /// Headers added to (replacing any of the same name in) each request.
    pub request_header_add: Vec<(String, String)>,
    /// Header names removed from each request.
    pub request_header_remove: Vec<String>,
    /// Headers added to (replacing any of the same name in) each response.
    pub response_header_add: Vec<(String, String)>,
    /// Header names removed from each response.
    pub response_header_remove: Vec<String>,
    /// Largest request body accepted, in bytes (413 beyond it).
    pub max_body: Option<u64>,
    /// Plain-HTTP visitors are redirected to HTTPS.
    pub https_only: bool,
    /// The target speaks HTTP/2 without TLS (h2c); the relay forwards requests as HTTP/2.
    pub upstream_http2: bool,
    /// Options this version does not know, as received (key and raw value); sent on unchanged.
    pub unknown: Vec<(u16, Vec<u8>)>,
}

/// Option keys on the wire.
mod key {
    pub(super) const BASIC_AUTH: u16 = 1;
    pub(super) const ALLOW: u16 = 2;
    pub(super) const DENY: u16 = 3;
    pub(super) const RATE_LIMIT: u16 = 4;
    pub(super) const REQUEST_HEADER_ADD: u16 = 5;
    pub(super) const REQUEST_HEADER_REMOVE: u16 = 6;
    pub(super) const RESPONSE_HEADER_ADD: u16 = 7;
    pub(super) const RESPONSE_HEADER_REMOVE: u16 = 8;
    pub(super) const MAX_BODY: u16 = 9;
    pub(super) const HTTPS_ONLY: u16 = 10;
    pub(super) const UPSTREAM_HTTP2: u16 = 11;
}

/// At most this many options in one bind.
pub const MAX_OPTIONS: usize = 256;

/// At most this many bytes of options in one bind; entries past it are not sent, so a bind
/// always fits in a frame. Agents check their options against it before sending.
pub const MAX_OPTIONS_LEN: usize = 32 * 1024;

fn put_cidr(b: &mut Vec<u8>, c: &Cidr) {
    match c.addr {
        IpAddr::V4(v4) => {
            b.put_u8(4);
            b.put_u32(v4.into());
        }
        IpAddr::V6(v6) => {
            b.put_u8(6);
            b.put_u128(v6.into());
        }
    }
    b.put_u8(c.prefix);
}

fn get_cidr(p: &mut &[u8]) -> Result<Cidr, DecodeError> {
    const WHAT: &str = "network option";
    let addr = match p.u8_(WHAT)? {
        4 => IpAddr::V4(Ipv4Addr::from(p.u32_(WHAT)?)),
        6 => {
            p.need(16, WHAT)?;
            IpAddr::V6(Ipv6Addr::from(p.get_u128()))
        }
        _ => return Err(DecodeError::Malformed(WHAT)),
    };
    Cidr::new(addr, p.u8_(WHAT)?).ok_or(DecodeError::Malformed(WHAT))
}

impl TunnelOptions {
    /// True when nothing is set.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The size of the options on the wire and their number; a bind can carry at most
    /// [`MAX_OPTIONS_LEN`] bytes and [`MAX_OPTIONS`] entries.
    pub fn wire_size(&self) -> (usize, usize) {
        let entries = self.entries();
        (2 + entries.iter().map(|(_, v)| 4 + v.len()).sum::<usize>(), entries.len())
    }

    fn entries(&self) -> Vec<(u16, Vec<u8>)> {
        let mut entries: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut add = |k: u16, f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = Vec::new();
            f(&mut v);
            entries.push((k, v));
        };
        for a in &self.basic_auth {
            add(key::BASIC_AUTH, &|b| {
                b.string(&a.user);
                b.put_slice(&a.digest);
            });
        }
        for c in &self.allow {
            add(key::ALLOW, &|b| put_cidr(b, c));
        }
        for c in &self.deny {
            add(key::DENY, &|b| put_cidr(b, c));
        }
        if let Some(n) = self.rate_limit {
            add(key::RATE_LIMIT, &|b| b.put_u32(n));
        }
        for (k, list) in [
            (key::REQUEST_HEADER_ADD, &self.request_header_add),
            (key::RESPONSE_HEADER_ADD, &self.response_header_add),
        ] {
            for (name, value) in list {
                add(k, &|b| {
                    b.string(name);
                    b.string(value);
                });
            }
        }
        for (k, list) in [
            (key::REQUEST_HEADER_REMOVE, &self.request_header_remove),
            (key::RESPONSE_HEADER_REMOVE, &self.response_header_remove),
        ] {
            for name in list {
                add(k, &|b| b.string(name));
            }
        }
        if let Some(n) = self.max_body {
            add(key::MAX_BODY, &|b| b.put_u64(n));
        }
        if self.https_only {
            add(key::HTTPS_ONLY, &|_| {});
        }
        if self.upstream_http2 {
            add(key::UPSTREAM_HTTP2, &|_| {});
        }
        entries.extend(self.unknown.iter().cloned());
        entries
    }

    /// Appends the options' wire form: a count, then the entries. Entries past
    /// [`MAX_OPTIONS`] or [`MAX_OPTIONS_LEN`] are left out.
    pub(crate) fn encode(&self, dst: &mut Vec<u8>) {
        let mut entries = self.entries();
        entries.truncate(MAX_OPTIONS);
        let mut total = 2;
        let fits = entries
            .iter()
            .take_while(|(_, v)| {
                total += 4 + v.len();
                total <= MAX_OPTIONS_LEN
            })
            .count();
        entries.truncate(fits);
        dst.put_u16(entries.len() as u16);
        for (k, v) in entries {
            dst.put_u16(k);
            dst.put_u16(v.len() as u16);
            dst.put_slice(&v);
        }
    }

    /// Reads the options; an absent list (a bind from an agent that sends none) is the default.
    pub(crate) fn decode(p: &mut &[u8]) -> Result<Self, DecodeError> {
        let mut out = Self::default();
        if p.is_empty() {
            return Ok(out);
        }
        let start = p.len();
        let count = p.u16_("option count")? as usize;
        if count > MAX_OPTIONS {
            return Err(DecodeError::Malformed("option count"));
        }
        for _ in 0..count {
            let k = p.u16_("option key")?;
            let len = p.u16_("option length")? as usize;
            p.need(len, "option value")?;
            let (mut v, rest) = p.split_at(len);
            *p = rest;
            let v = &mut v;
            match k {
                key::BASIC_AUTH => {
                    let user = v.string("basic auth user")?;
                    v.need(32, "basic auth digest")?;
                    let mut digest = [0u8; 32];
                    v.copy_to_slice(&mut digest);
                    out.basic_auth.push(BasicAuth { user, digest });
                }
                key::ALLOW => out.allow.push(get_cidr(v)?),
                key::DENY => out.deny.push(get_cidr(v)?),
                key::RATE_LIMIT => out.rate_limit = Some(v.u32_("rate limit")?),
                key::REQUEST_HEADER_ADD => out
                    .request_header_add
                    .push((v.string("header name")?, v.string("header value")?)),
                key::RESPONSE_HEADER_ADD => out
                    .response_header_add
                    .push((v.string("header name")?, v.string("header value")?)),
                key::REQUEST_HEADER_REMOVE => {
                    out.request_header_remove.push(v.string("header name")?)
                }
                key::RESPONSE_HEADER_REMOVE => {
                    out.response_header_remove.push(v.string("header name")?)
                }
                key::MAX_BODY => out.max_body = Some(v.u64_("max body")?),
                key::HTTPS_ONLY => out.https_only = true,
                key::UPSTREAM_HTTP2 => out.upstream_http2 = true,
                other => out.unknown.push((other, v.to_vec())),
            }
            if start - p.len() > MAX_OPTIONS_LEN {
                return Err(DecodeError::Malformed("options longer than 32 KiB"));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.200.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.prefix(), 32);
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(
            v6.contains("2001:db8::".parse().unwrap())
                && !v6.contains("2001:db9::".parse().unwrap())
        );
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_kept_and_skipped() {
        let mut buf = Vec::new();
        buf.put_u16(2);
        buf.put_u16(999);
        buf.put_u16(3);
        buf.put_slice(b"abc");
        buf.put_u16(key::HTTPS_ONLY);
        buf.put_u16(0);
        let o = TunnelOptions::decode(&mut &buf[..]).unwrap();
        assert_eq!(o.unknown, vec![(999, b"abc".to_vec())]);
        // Re-encoded as received.
        let mut again = Vec::new();
        o.encode(&mut again);
        assert_eq!(TunnelOptions::decode(&mut &again[..]).unwrap(), o);
        assert!(o.https_only);
    }

    #[test]
    fn truncated_options_are_malformed() {
        let o = TunnelOptions {
            basic_auth: vec![BasicAuth { user: "u".into(), digest: [7; 32] }],
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            rate_limit: Some(5),
            ..TunnelOptions::default()
        };
        let mut buf = Vec::new();
        o.encode(&mut buf);
        assert_eq!(TunnelOptions::decode(&mut &buf[..]).unwrap(), o);
        for cut in 1..buf.len() {
            assert!(TunnelOptions::decode(&mut &buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}

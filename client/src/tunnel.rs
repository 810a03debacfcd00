//! Tunnels as the agent sees them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use warren_proto::proxy::ProxyVersion;
use warren_proto::{BasicAuth, Cidr, Protocol, Subdomain, TunnelName, TunnelOptions};

/// Where a tunnel's traffic goes: `PORT` (on 127.0.0.1) or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Target {
    /// The address to connect to, when the host is an IP literal (no lookup needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid target {s:?}: expected PORT or HOST:PORT, e.g. 8080 or 127.0.0.1:8080")
        };
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h), p),
            None => ("127.0.0.1", s),
        };
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A target the relay's API may open a forward to (`--allow-forward`): an agent obeys a
/// `Forward` only when one of its rules covers the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardRule {
    /// `HOST:PORT`: exactly that host (name or address) and port.
    Exact(Target),
    /// `PORT`: that port on a loopback address (or `localhost`).
    LoopbackPort(u16),
    /// `CIDR` (any port) or `CIDR:LOW-HIGH`: addresses in the network, ports in the range.
    Net(ipnet::IpNet, u16, u16),
}

impl ForwardRule {
    /// Whether this rule lets a forward reach `t`.
    pub fn covers(&self, t: &Target) -> bool {
        let ip = t.host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        match self {
            Self::Exact(x) => {
                x.port == t.port
                    && (x.host.eq_ignore_ascii_case(&t.host)
                        || matches!((x.host.parse::<IpAddr>(), ip), (Ok(a), Some(b)) if a.to_canonical() == b))
            }
            Self::LoopbackPort(p) => {
                *p == t.port
                    && (t.host.eq_ignore_ascii_case("localhost")
                        || ip.is_some_and(|ip| ip.is_loopback()))
            }
            Self::Net(net, lo, hi) => {
                ip.is_some_and(|ip| net.contains(&ip)) && (*lo..=*hi).contains(&t.port)
            }
        }
    }
}

impl FromStr for ForwardRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid forward rule {s:?}: expected HOST:PORT, PORT, CIDR or CIDR:LOW-HIGH \
                 (e.g. 127.0.0.1:8080, 8080, 10.0.0.0/8, 192.168.1.0/24:8000-8999)"
            )
        };
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            return if port == 0 { Err(bad()) } else { Ok(Self::LoopbackPort(port)) };
        }
        if s.contains('/') {
            let (net, ports) = match s.rsplit_once(':') {
                // An IPv6 network's own colons come before the slash.
                Some((n, p)) if !p.contains('/') => (n, Some(p)),
                _ => (s, None),
            };
            let net = net.trim_start_matches('[').trim_end_matches(']');
            let net: ipnet::IpNet = net.parse().map_err(|_| bad())?;
            let (lo, hi) = match ports {
                None => (1, u16::MAX),
                Some(p) => {
                    let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                    let lo = lo.parse::<u16>().map_err(|_| bad())?;
                    let hi = hi.parse::<u16>().map_err(|_| bad())?;
                    if lo == 0 || hi < lo {
                        return Err(bad());
                    }
                    (lo, hi)
                }
            };
            return Ok(Self::Net(net.trunc(), lo, hi));
        }
        if !s.contains(':') {
            return Err(bad());
        }
        s.parse::<Target>().map(Self::Exact).map_err(|_| bad())
    }
}

impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(t) => t.fmt(f),
            Self::LoopbackPort(p) => write!(f, "{p}"),
            Self::Net(n, 1, u16::MAX) => write!(f, "{n}"),
            Self::Net(n, lo, hi) if lo == hi => write!(f, "{n}:{lo}"),
            Self::Net(n, lo, hi) => write!(f, "{n}:{lo}-{hi}"),
        }
    }
}

/// One tunnel the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Unique per agent; the lease is keyed by it.
    pub name: TunnelName,
    /// HTTP, TCP, TLS or UDP.
    pub protocol: Protocol,
    /// The local service.
    pub target: Target,
    /// Subdomain wanted (HTTP, TLS).
    pub subdomain: Option<Subdomain>,
    /// Full host name wanted (TLS, HTTP): must lie under the relay's domain.
    pub hostname: Option<String>,
    /// Public port wanted (TCP, UDP).
    pub remote_port: Option<u16>,
    /// What the relay enforces for visitors.
    pub options: TunnelOptions,
    /// PROXY protocol header sent to the target before the visitor's bytes (TCP, TLS).
    pub proxy_protocol: Option<ProxyVersion>,
    /// HTTP exchanges are kept for the local API's inspector (HTTP; on by default).
    pub inspect: bool,
    /// The Docker container this tunnel serves, when its labels opened it (`--docker`).
    pub container: Option<String>,
}

/// The option keys [`TunnelSpec::apply`] knows, as config keys (flags use dashes).
pub const OPTION_KEYS: &[&str] = &[
    "basic_auth",
    "allow",
    "deny",
    "rate_limit",
    "request_header_add",
    "request_header_remove",
    "response_header_add",
    "response_header_remove",
    "max_body",
    "https_only",
    "upstream_http2",
    "proxy_protocol",
    "inspect",
];

/// The protocols each option and wish applies to.
const APPLIES: &[(&str, &[Protocol])] = &[
    ("basic_auth", &[Protocol::Http]),
    ("rate_limit", &[Protocol::Http, Protocol::Tcp, Protocol::Tls]),
    ("request_header_add", &[Protocol::Http]),
    ("request_header_remove", &[Protocol::Http]),
    ("response_header_add", &[Protocol::Http]),
    ("response_header_remove", &[Protocol::Http]),
    ("max_body", &[Protocol::Http]),
    ("https_only", &[Protocol::Http]),
    ("upstream_http2", &[Protocol::Http]),
    ("inspect", &[Protocol::Http]),
    ("proxy_protocol", &[Protocol::Tcp, Protocol::Tls]),
    ("subdomain", &[Protocol::Http, Protocol::Tls]),
    ("hostname", &[Protocol::Http, Protocol::Tls]),
    ("remote_port", &[Protocol::Tcp, Protocol::Udp]),
];

/// The protocols option `key` (an [`OPTION_KEYS`] entry, or a wish such as `subdomain`)
/// applies to; every protocol for the others (`allow`, `deny`).
pub fn protocols_of(key: &str) -> &'static [Protocol] {
    APPLIES
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(&[Protocol::Http, Protocol::Tcp, Protocol::Tls, Protocol::Udp], |(_, p)| p)
}

impl TunnelSpec {
    /// A tunnel with no options.
    pub fn new(name: TunnelName, protocol: Protocol, target: Target) -> Self {
        Self {
            name,
            protocol,
            target,
            subdomain: None,
            hostname: None,
            remote_port: None,
            options: TunnelOptions::default(),
            proxy_protocol: None,
            inspect: true,
            container: None,
        }
    }

    /// A tunnel still to be named by [`Self::name_or_default`] once its options are set, since
    /// its default name depends on them.
    pub fn unnamed(protocol: Protocol, target: Target) -> Self {
        let name = TunnelName::parse("unnamed").unwrap_or_else(|_| unreachable!("a valid name"));
        Self::new(name, protocol, target)
    }

    /// Names the tunnel: `name` when one was given, else [`Self::default_name`].
    pub fn name_or_default(&mut self, name: Option<TunnelName>) {
        self.name = name.unwrap_or_else(|| self.default_name());
    }

    /// Sets one option from its text form, as a flag or config value gives it. Repeatable
    /// options (basic_auth, allow, deny, header edits) add one entry per call.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), String> {
        let o = &mut self.options;
        match key {
            "basic_auth" => o.basic_auth.push(parse_basic_auth(value)?),
            "allow" => o.allow.push(value.parse::<Cidr>()?),
            "deny" => o.deny.push(value.parse::<Cidr>()?),
            "rate_limit" => o.rate_limit = Some(parse_rate(value)?),
            "request_header_add" => o.request_header_add.push(parse_header(value)?),
            "response_header_add" => o.response_header_add.push(parse_header(value)?),
            "request_header_remove" => o.request_header_remove.push(parse_header_name(value)?),
            "response_header_remove" => o.response_header_remove.push(parse_header_name(value)?),
            "max_body" => o.max_body = Some(parse_size(value)?),
            "https_only" => o.https_only = parse_bool(value)?,
            "upstream_http2" => o.upstream_http2 = parse_bool(value)?,
            "proxy_protocol" => self.proxy_protocol = Some(value.parse::<ProxyVersion>()?),
            "inspect" => self.inspect = parse_bool(value)?,
            other => return Err(format!("unknown tunnel option {other:?}")),
        }
        Ok(())
    }

    /// Checks that every option set fits the tunnel's protocol.
    pub fn check(&self) -> Result<(), String> {
        let o = &self.options;
        let p = self.protocol;
        let set = [
            ("basic_auth", !o.basic_auth.is_empty()),
            ("rate_limit", o.rate_limit.is_some()),
            ("request_header_add", !o.request_header_add.is_empty()),
            ("request_header_remove", !o.request_header_remove.is_empty()),
            ("response_header_add", !o.response_header_add.is_empty()),
            ("response_header_remove", !o.response_header_remove.is_empty()),
            ("max_body", o.max_body.is_some()),
            ("https_only", o.https_only),
            ("upstream_http2", o.upstream_http2),
            ("proxy_protocol", self.proxy_protocol.is_some()),
            ("subdomain", self.subdomain.is_some()),
            ("hostname", self.hostname.is_some()),
            ("remote_port", self.remote_port.is_some()),
        ];
        for (key, is_set) in set {
            let allowed = protocols_of(key);
            if is_set && !allowed.contains(&p) {
                let names: Vec<&str> = allowed.iter().map(|p| p.as_str()).collect();
                return Err(format!(
                    "tunnel {}: {} applies to {} tunnels, not {p}",
                    self.name,
                    key.replace('_', "-"),
                    names.join(" and ")
                ));
            }
        }
        if self.subdomain.is_some() && self.hostname.is_some() {
            return Err(format!("tunnel {}: give a subdomain or a hostname, not both", self.name));
        }
        let (len, count) = o.wire_size();
        if len > warren_proto::options::MAX_OPTIONS_LEN
            || count > warren_proto::options::MAX_OPTIONS
        {
            return Err(format!(
                "tunnel {}: too many or too long options ({count} options, {len} bytes; at most {} and {} bytes)",
                self.name,
                warren_proto::options::MAX_OPTIONS,
                warren_proto::options::MAX_OPTIONS_LEN
            ));
        }
        Ok(())
    }

    /// The subdomain to ask the relay for, given its domain: `subdomain`, or `hostname` with the
    /// domain taken off.
    pub fn wanted_subdomain(&self, domain: &str) -> Result<Option<Subdomain>, String> {
        let Some(host) = &self.hostname else { return Ok(self.subdomain.clone()) };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let label = match host.strip_suffix(&domain).and_then(|l| l.strip_suffix('.')) {
            Some(l) => l,
            None if !host.contains('.') => host.as_str(),
            None => {
                return Err(format!(
                    "hostname {host} is not under the relay's domain {domain}: the relay serves NAME.{domain}"
                ));
            }
        };
        Subdomain::parse(label).map(Some).map_err(|e| format!("hostname {host}: {e}"))
    }

    /// The default name of a tunnel: what makes it distinct, so that two commands asking for
    /// different URLs get two tunnels and the same command run again gets its lease back.
    /// Protocol, target (the host only when it is not this machine's loopback), then the
    /// requested hostname, subdomain or remote port: `http-8080`, `http-8080-app`,
    /// `tcp-10.0.0.5-22-2222`. Bytes a name cannot hold become `_`; a name longer than
    /// [`TunnelName::MAX_LEN`] keeps its start and ends with a hash of the whole.
    pub fn default_name(&self) -> TunnelName {
        let mut parts = vec![self.protocol.to_string()];
        if !matches!(self.target.host.as_str(), "127.0.0.1" | "localhost" | "::1") {
            parts.push(self.target.host.clone());
        }
        parts.push(self.target.port.to_string());
        if let Some(h) = &self.hostname {
            parts.push(h.trim_end_matches('.').to_ascii_lowercase());
        } else if let Some(s) = &self.subdomain {
            parts.push(s.as_str().to_owned());
        }
        if let Some(p) = self.remote_port {
            parts.push(p.to_string());
        }
        let full: String = parts
            .join("-")
            .chars()
            .map(
                |c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' },
            )
            .collect();
        let name = if full.len() <= TunnelName::MAX_LEN {
            full
        } else {
            let digest = ring::digest::digest(&ring::digest::SHA256, full.as_bytes());
            let hash: String = digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
            // Only ASCII is left, so any byte index is a character boundary.
            format!("{}-{hash}", &full[..TunnelName::MAX_LEN - hash.len() - 1])
        };
        // Built from name bytes only, and cut to the longest name.
        TunnelName::parse(&name).unwrap_or_else(|_| unreachable!("{name} is a valid name"))
    }
}

/// `USER:PASS` → the user and the SHA-256 of `USER:PASS`, which is all the relay gets.
pub fn parse_basic_auth(s: &str) -> Result<BasicAuth, String> {
    let (user, pass) = s
        .split_once(':')
        .filter(|(u, p)| !u.is_empty() && !p.is_empty())
        .ok_or_else(|| "basic auth must be USER:PASSWORD, both non-empty".to_owned())?;
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{user}:{pass}").as_bytes());
    let mut d = [0u8; 32];
    d.copy_from_slice(digest.as_ref());
    Ok(BasicAuth { user: user.to_owned(), digest: d })
}

fn parse_header_name(s: &str) -> Result<String, String> {
    let n = s.trim();
    http::HeaderName::from_bytes(n.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| format!("{n:?} is not a valid header name"))
}

/// `NAME: VALUE` (or `NAME=VALUE`).
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (n, v) = s
        .split_once(':')
        .or_else(|| s.split_once('='))
        .ok_or_else(|| format!("header {s:?} must be NAME:VALUE, e.g. \"X-Env: staging\""))?;
    let name = parse_header_name(n)?;
    let value = v.trim();
    http::HeaderValue::from_str(value).map_err(|_| format!("header {name}: invalid value"))?;
    Ok((name, value.to_owned()))
}

/// `N/s` or `N`: requests (HTTP) or connections (TCP, TLS) per second per visitor address.
fn parse_rate(s: &str) -> Result<u32, String> {
    let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    n.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("rate limit {s:?} must be N/s with N at least 1, e.g. 20/s"))
}

/// A size: `1048576`, `512KiB`, `10MB`, `1GiB`, `64k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} must be a number with an optional unit, e.g. 10MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_rules() {
        let t = |s: &str| s.parse::<Target>().unwrap();
        let r = |s: &str| s.parse::<ForwardRule>().unwrap();
        assert!(r("8080").covers(&t("8080")));
        assert!(r("8080").covers(&t("localhost:8080")));
        assert!(r("8080").covers(&t("[::1]:8080")));
        assert!(!r("8080").covers(&t("10.0.0.1:8080")));
        assert!(!r("8080").covers(&t("4040")));
        assert!(r("api.web:80").covers(&t("API.web:80")));
        assert!(!r("api.web:80").covers(&t("api.web:81")));
        assert!(r("127.0.0.1:22").covers(&t("127.0.0.1:22")));
        assert!(r("10.0.0.0/8").covers(&t("10.2.3.4:1")));
        assert!(!r("10.0.0.0/8").covers(&t("11.2.3.4:1")));
        assert!(!r("10.0.0.0/8").covers(&t("host.example:1")), "names are not in networks");
        let ranged = r("192.168.1.0/24:8000-8999");
        assert!(ranged.covers(&t("192.168.1.9:8500")) && !ranged.covers(&t("192.168.1.9:9000")));
        assert!(r("fd00::/8:443").covers(&t("[fd00::1]:443")));
        assert!(r("::1/128").covers(&t("[::1]:9")));
        for bad in ["0", "host", "10.0.0.0/33", "10.0.0.0/8:9-1", "10.0.0.0/8:0", "a b:1", ""] {
            assert!(bad.parse::<ForwardRule>().is_err(), "{bad} should be refused");
        }
        assert_eq!(r("192.168.1.7/24:8000-8999").to_string(), "192.168.1.0/24:8000-8999");
        assert_eq!(r("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn targets() {
        let t: Target = "8080".parse().unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:8080");
        let t: Target = "db.internal:5432".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("db.internal", 5432));
        assert!(t.socket_addr().is_none());
        let t: Target = "[::1]:80".parse().unwrap();
        assert_eq!(t.socket_addr(), Some("[::1]:80".parse().unwrap()));
        assert!("0".parse::<Target>().is_err());
        assert!("http://x:80".parse::<Target>().is_err());
        assert!("x:".parse::<Target>().is_err());
        assert!("99999".parse::<Target>().is_err());
    }

    fn spec(p: Protocol) -> TunnelSpec {
        TunnelSpec::new(TunnelName::parse("t").unwrap(), p, "80".parse().unwrap())
    }

    #[test]
    fn options_parse_and_fit_their_protocol() {
        let mut s = spec(Protocol::Http);
        s.apply("basic_auth", "ann:secret:with:colons").unwrap();
        assert_eq!(s.options.basic_auth[0].user, "ann");
        s.apply("allow", "10.0.0.0/8").unwrap();
        s.apply("rate_limit", "20/s").unwrap();
        s.apply("request_header_add", "X-Env: staging").unwrap();
        s.apply("response_header_remove", "Server").unwrap();
        s.apply("max_body", "10MiB").unwrap();
        assert_eq!(s.options.max_body, Some(10 << 20));
        assert_eq!(s.options.request_header_add[0], ("x-env".into(), "staging".into()));
        s.check().unwrap();
        for (k, v) in [
            ("basic_auth", "nopass"),
            ("basic_auth", ":x"),
            ("allow", "10.0.0.0/40"),
            ("rate_limit", "0/s"),
            ("rate_limit", "fast"),
            ("request_header_add", "novalue"),
            ("request_header_add", "bad name: v"),
            ("max_body", "10 parsecs"),
            ("https_only", "maybe"),
            ("proxy_protocol", "v3"),
            ("colour", "blue"),
        ] {
            assert!(spec(Protocol::Http).apply(k, v).is_err(), "{k}={v}");
        }
        let mut t = spec(Protocol::Tcp);
        t.apply("basic_auth", "a:b").unwrap();
        assert!(t.check().unwrap_err().contains("basic-auth applies to http"));
        let mut t = spec(Protocol::Tcp);
        t.apply("proxy_protocol", "v2").unwrap();
        t.check().unwrap();
        let mut u = spec(Protocol::Udp);
        u.apply("proxy_protocol", "v1").unwrap();
        assert!(u.check().is_err());
    }

    #[test]
    fn default_names_tell_tunnels_apart() {
        let name = |p: Protocol, target: &str, shape: &dyn Fn(&mut TunnelSpec)| {
            let mut spec = TunnelSpec::unnamed(p, target.parse().unwrap());
            shape(&mut spec);
            spec.name_or_default(None);
            spec.name.as_str().to_owned()
        };
        assert_eq!(name(Protocol::Http, "8080", &|_| {}), "http-8080");
        assert_eq!(name(Protocol::Http, "localhost:8080", &|_| {}), "http-8080");
        let sub = |s: &str| Subdomain::parse(s).unwrap();
        assert_eq!(
            name(Protocol::Http, "8080", &|t| t.subdomain = Some(sub("app"))),
            "http-8080-app"
        );
        assert_eq!(
            name(Protocol::Tls, "8443", &|t| t.hostname = Some("Api.Example.COM.".into())),
            "tls-8443-api.example.com"
        );
        assert_eq!(
            name(Protocol::Tcp, "10.0.0.5:22", &|t| t.remote_port = Some(2222)),
            "tcp-10.0.0.5-22-2222"
        );
        assert_eq!(name(Protocol::Udp, "[fd00::1]:53", &|_| {}), "udp-fd00__1-53");
        // Too long: the start kept, a hash of the whole at the end, still distinct.
        let long = |c: &'static str| {
            move |t: &mut TunnelSpec| t.hostname = Some(format!("{}.example.com", c.repeat(60)))
        };
        let (a, b) =
            (name(Protocol::Http, "80", &long("a")), name(Protocol::Http, "80", &long("b")));
        assert_eq!(a.len(), TunnelName::MAX_LEN, "{a}");
        assert_ne!(a, b);
        assert_eq!(a, name(Protocol::Http, "80", &long("a")), "stable across runs");
        // A given name is kept as it is.
        let mut spec = TunnelSpec::unnamed(Protocol::Http, "8080".parse().unwrap());
        spec.name_or_default(Some(TunnelName::parse("web").unwrap()));
        assert_eq!(spec.name.as_str(), "web");
    }

    #[test]
    fn hostnames_become_subdomains() {
        let mut s = spec(Protocol::Tls);
        s.hostname = Some("Secure.Example.com".into());
        assert_eq!(s.wanted_subdomain("example.com").unwrap().unwrap().as_str(), "secure");
        s.hostname = Some("secure".into());
        assert_eq!(s.wanted_subdomain("example.com").unwrap().unwrap().as_str(), "secure");
        s.hostname = Some("secure.other.org".into());
        assert!(s.wanted_subdomain("example.com").unwrap_err().contains("not under"));
        s.hostname = Some("a.b.example.com".into());
        assert!(s.wanted_subdomain("example.com").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("99999999999999999GiB").is_err());
        assert!(parse_size("MB").is_err());
    }
}

//! The relay's runtime configuration, validated once, and the small parsers its flags use.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use warren_proto::message::Token;

/// Everything the relay needs to run.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// HTTP tunnels are served as `NAME.DOMAIN`; TCP URLs use this host too.
    pub domain: String,
    /// Control port: QUIC on UDP and TLS on TCP.
    pub control: SocketAddr,
    /// Serve QUIC on the control port (TLS over TCP is always served).
    pub quic: bool,
    /// Public HTTP listener.
    pub http: SocketAddr,
    /// Public TCP port pool.
    pub ports: PortRange,
    /// Data directory (development CA, generated token).
    pub data_dir: PathBuf,
    /// Tokens agents may present.
    pub tokens: Vec<Token>,
    /// How long a tunnel's subdomain and port stay reserved after its session ends (and, after
    /// a restart, from the start for every stored lease).
    pub lease_grace: Duration,
    /// What one token and one session may hold: tunnels, reservations.
    pub caps: crate::router::Caps,
    /// Extra names for the relay's development certificate.
    pub tls_names: Vec<String>,
    /// Public HTTPS listener (SNI routing, TLS tunnels), if any.
    pub https: Option<SocketAddr>,
    /// Certificates for the HTTPS listener, by host name (reloaded when they change).
    pub cert_dir: Option<PathBuf>,
    /// Announce HTTP tunnels with their https:// URL.
    pub prefer_https: bool,
    /// Limits and timeouts of the public listeners.
    pub edge: crate::edge::EdgeConfig,
    /// Certificates from an ACME CA for HTTP tunnels' names.
    pub acme: Option<crate::acme::AcmeSettings>,
    /// The REST API and metrics listener, if any.
    pub api: Option<SocketAddr>,
    /// The API's admin token.
    pub admin_token: Token,
    /// More host names the API answers to (it always answers loopback names and addresses).
    pub api_hosts: Vec<String>,
    /// A token that may read `/metrics` only (the admin token may too).
    pub metrics_token: Option<Token>,
    /// Failed authentications a minute one address may have (API and control port) before it
    /// is locked out for a doubling while.
    pub auth_failures_per_minute: u32,
    /// How often tunnel traffic is sampled into the history the API serves.
    pub stats_interval: Duration,
    /// Where overlay networks created without a subnet get their /24.
    pub overlay_pool: ipnet::Ipv4Net,
    /// How many agent handshakes may be in progress at once on the control port.
    pub handshakes: HandshakeLimits,
}

/// Bounds on agent handshakes in progress (from accept to `Welcome` or refusal): what peers
/// without a token can make the relay hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Per source address (0: no limit).
    pub per_ip: usize,
    /// In all (0: no limit).
    pub total: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self { per_ip: 16, total: 1024 }
    }
}

/// The default overlay pool: 10.214.0.0/16 (agents' local networks default to 10.213.0.0/16).
pub fn default_overlay_pool() -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 214, 0, 0), 16).unwrap_or_default()
}

impl RelayConfig {
    /// A configuration for tests and the demo: everything on 127.0.0.1 with OS-chosen ports.
    pub fn loopback(data_dir: PathBuf, token: &str, ports: PortRange) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            domain: "localhost".into(),
            control: any,
            quic: true,
            http: any,
            ports,
            data_dir,
            tokens: vec![Token::new(token)],
            lease_grace: Duration::from_secs(300),
            caps: crate::router::Caps::default(),
            tls_names: Vec::new(),
            https: Some(any),
            cert_dir: None,
            prefer_https: false,
            edge: crate::edge::EdgeConfig::default(),
            acme: None,
            api: Some(any),
            admin_token: Token::new(format!("{token}-admin")),
            api_hosts: Vec::new(),
            metrics_token: None,
            auth_failures_per_minute: warren_web::throttle::FREE_FAILURES,
            stats_interval: Duration::from_secs(60),
            overlay_pool: default_overlay_pool(),
            handshakes: HandshakeLimits::default(),
        }
    }
}

/// A range of public ports on one address: `[IP:]LOW-HIGH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Address the ports are bound on.
    pub ip: IpAddr,
    /// Lowest port.
    pub low: u16,
    /// Highest port (inclusive).
    pub high: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// Number of ports.
    pub fn len(&self) -> u32 {
        u32::from(self.high) - u32::from(self.low) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}-{}", self.low, self.high),
            IpAddr::V4(ip) => write!(f, "{ip}:{}-{}", self.low, self.high),
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "invalid port range {s:?}: {why} (expected [IP:]LOW-HIGH, e.g. 0.0.0.0:20000-29999)"
            )
        };
        let (ip, range) = match s.rsplit_once(':') {
            Some((ip, range)) => {
                let ip = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(ip);
                (ip.parse::<IpAddr>().map_err(|_| bad("bad IP address"))?, range)
            }
            None => (IpAddr::from([0, 0, 0, 0]), s),
        };
        let (low, high) = range.split_once('-').unwrap_or((range, range));
        let low: u16 = low.trim().parse().map_err(|_| bad("bad low port"))?;
        let high: u16 = high.trim().parse().map_err(|_| bad("bad high port"))?;
        if low == 0 || low > high {
            return Err(bad("ports must be 1-65535 with LOW <= HIGH"));
        }
        Ok(Self { ip, low, high })
    }
}

/// Parses a duration written as `300`, `300s`, `5m`, `1h` or `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 5m, 1h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("invalid duration {s:?}: unit must be ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        let r: PortRange = "0.0.0.0:20000-29999".parse().unwrap();
        assert_eq!((r.low, r.high, r.len()), (20000, 29999, 10000));
        let r: PortRange = "127.0.0.1:5000".parse().unwrap();
        assert_eq!((r.low, r.high), (5000, 5000));
        let r: PortRange = "[::1]:10-20".parse().unwrap();
        assert!(r.ip.is_ipv6() && r.contains(15) && !r.contains(21));
        let r: PortRange = "100-200".parse().unwrap();
        assert!(r.ip.is_unspecified());
        assert!("200-100".parse::<PortRange>().is_err());
        assert!("x:1-2".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}

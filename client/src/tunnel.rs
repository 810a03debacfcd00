//! Tunnels as the agent sees them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use warren_proto::{Protocol, Subdomain, TunnelName};

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

/// One tunnel the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// Unique per agent; the lease is keyed by it.
    pub name: TunnelName,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// The local service.
    pub target: Target,
    /// Subdomain wanted (HTTP).
    pub subdomain: Option<Subdomain>,
    /// Public port wanted (TCP).
    pub remote_port: Option<u16>,
}

impl TunnelSpec {
    /// The default name of a tunnel: protocol and target port, e.g. `http-8080`.
    pub fn default_name(protocol: Protocol, target: &Target) -> TunnelName {
        let name = format!("{protocol}-{}", target.port);
        // Built from a protocol name and digits only.
        TunnelName::parse(&name).unwrap_or_else(|_| unreachable!("{name} is a valid name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

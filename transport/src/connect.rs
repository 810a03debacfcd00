//! The agent's side: reaching the relay over QUIC or TLS+yamux, with automatic fallback.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::listen::transport_config;
use crate::mux::{MuxHandle, Side};
use crate::session::{Session, TransportKind};
use crate::tuning;

/// Which transport the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// QUIC first; TLS over TCP when QUIC does not answer in time.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            _ => Err(format!("unknown transport {s:?}: expected auto, quic or tcp")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// A relay's control address as the user wrote it: `HOST:PORT`, `[V6]:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Control port.
    pub port: u16,
}

impl FromStr for RelayAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid relay address {s:?}: expected HOST:PORT, e.g. relay.example.com:7443")
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad());
        }
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        Ok(Self { host: host.to_owned(), port })
    }
}

impl fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why no session could be established.
#[derive(Debug)]
pub struct ConnectError {
    /// The relay as given.
    pub relay: String,
    /// The host the agent dialled (the name its certificate must carry).
    pub host: String,
    /// Each transport tried and why it failed.
    pub attempts: Vec<(TransportKind, String)>,
    /// True when the relay answered but its certificate was not trusted: retrying will not
    /// help until the trust settings change. Set together with `trust`.
    pub untrusted: bool,
    /// What was wrong with the relay's certificate, when `untrusted`.
    pub trust: Option<TrustProblem>,
}

/// Why the relay's certificate was refused, for a hint that tells the user what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustProblem {
    /// Signed by a CA the agent does not trust (or by another CA of the same name, or not
    /// matching the pinned fingerprint).
    UnknownCa,
    /// Signed by a trusted CA, but not for the host the agent dialled.
    WrongName,
    /// Expired or not valid yet.
    Time,
    /// Refused for another reason.
    Other,
}

impl TrustProblem {
    /// Classifies a handshake failure message (rustls' text, as QUIC and TLS report it); `None`
    /// when the failure was not about the certificate.
    pub fn of(msg: &str) -> Option<Self> {
        let m = msg.to_ascii_lowercase();
        if !m.contains("certificate") && !m.contains("fingerprint") {
            return None;
        }
        let any = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
        Some(if any(&["notvalidforname", "not valid for name"]) {
            Self::WrongName
        } else if any(&["unknownissuer", "badsignature", "fingerprint"]) {
            // Every warren development CA has the same name, so one relay's certificate checked
            // against another relay's CA fails on its signature rather than its issuer.
            Self::UnknownCa
        } else if any(&["expired", "notvalidyet", "not valid yet"]) {
            Self::Time
        } else {
            Self::Other
        })
    }
}

impl ConnectError {
    /// Records a failed attempt, noting whether it was about the relay's certificate.
    fn attempt(&mut self, kind: TransportKind, why: String) {
        if let Some(problem) = TrustProblem::of(&why) {
            self.untrusted = true;
            self.trust.get_or_insert(problem);
        }
        self.attempts.push((kind, why));
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot connect to relay {}", self.relay)?;
        for (kind, why) in &self.attempts {
            write!(f, "; over {kind}: {why}")?;
        }
        let host = &self.host;
        match self.trust {
            None => Ok(()),
            Some(TrustProblem::UnknownCa) => write!(
                f,
                " (the relay's certificate is signed by a CA this agent does not trust: pass \
                 --relay-ca FILE with the relay's DATA/ca.pem, or --relay-fingerprint with the \
                 fingerprint the relay printed)"
            ),
            Some(TrustProblem::WrongName) => write!(
                f,
                " (the relay's certificate is trusted but does not name {host}: start the relay \
                 with --tls-name {host}, or connect by a name its certificate has; \
                 `openssl x509 -in DATA/relay.pem -noout -ext subjectAltName` lists them)"
            ),
            Some(TrustProblem::Time) => write!(
                f,
                " (the relay's certificate is expired or not valid yet: check the clocks of this \
                 machine and the relay, and restart the relay to reissue its certificate)"
            ),
            Some(TrustProblem::Other) => write!(
                f,
                " (the relay's certificate is not trusted: pass --relay-ca DATA/ca.pem or \
                 --relay-fingerprint with the fingerprint the relay printed)"
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Connects to the relay with the given transport mode and TLS client configuration.
pub async fn connect(
    relay: &RelayAddr,
    mode: Mode,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Session, ConnectError> {
    let mut err = ConnectError {
        relay: relay.to_string(),
        host: relay.host.clone(),
        attempts: Vec::new(),
        untrusted: false,
        trust: None,
    };
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((relay.host.as_str(), relay.port))
        .await
    {
        Ok(a) => a.collect(),
        Err(e) => {
            err.attempts.push((TransportKind::Tcp, format!("cannot resolve {}: {e}", relay.host)));
            return Err(err);
        }
    };
    let name = match relay.host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => match ServerName::try_from(relay.host.clone()) {
            Ok(n) => n,
            Err(e) => {
                err.attempts.push((TransportKind::Tcp, format!("invalid host name: {e}")));
                return Err(err);
            }
        },
    };
    if matches!(mode, Mode::Auto | Mode::Quic) {
        let limit = if mode == Mode::Auto {
            tuning::QUIC_FALLBACK_AFTER
        } else {
            tuning::HANDSHAKE_TIMEOUT
        };
        match tokio::time::timeout(limit, connect_quic(&addrs, &relay.host, tls.clone())).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => err.attempt(TransportKind::Quic, e.to_string()),
            Err(_) => err.attempt(
                TransportKind::Quic,
                format!("no answer within {} ms (UDP blocked?)", limit.as_millis()),
            ),
        }
        if let Some((_, why)) = err.attempts.last()
            && mode == Mode::Auto
            && !err.untrusted
        {
            tracing::warn!(relay = %relay, reason = %why, "QUIC failed; falling back to TLS over TCP");
        }
        if mode == Mode::Quic || err.untrusted {
            return Err(err);
        }
    }
    match tokio::time::timeout(tuning::HANDSHAKE_TIMEOUT, connect_tcp(&addrs, name, tls)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            err.attempt(TransportKind::Tcp, e.to_string());
            Err(err)
        }
        Err(_) => {
            err.attempt(TransportKind::Tcp, "TCP/TLS handshake timed out".into());
            Err(err)
        }
    }
}

async fn connect_quic(
    addrs: &[SocketAddr],
    host: &str,
    tls: Arc<rustls::ClientConfig>,
) -> io::Result<Session> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(
        tuning::MAX_STREAMS,
        tuning::QUIC_CONN_WINDOW,
        tuning::AGENT_KEEP_ALIVE,
    )));
    let mut last = io::Error::other("relay host resolved to no address");
    for addr in addrs {
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let runtime = quinn::default_runtime()
            .ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            crate::listen::udp_socket(bind)?,
            runtime,
        )?;
        let connecting = match endpoint.connect_with(cfg.clone(), *addr, host) {
            Ok(c) => c,
            Err(e) => {
                last = io::Error::other(e);
                continue;
            }
        };
        match connecting.await {
            Ok(conn) => return Ok(Session::quic(conn, Some(endpoint))),
            Err(e) => last = io::Error::other(e),
        }
    }
    Err(last)
}

async fn connect_tcp(
    addrs: &[SocketAddr],
    name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> io::Result<Session> {
    let mut last = io::Error::other("relay host resolved to no address");
    for addr in addrs {
        let tcp = match TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(tls.clone()).connect(name.clone(), tcp).await?;
        return Ok(Session::mux(MuxHandle::start(stream, Side::Client), *addr));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses() {
        let a: RelayAddr = "example.com:7443".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("example.com", 7443));
        let v6: RelayAddr = "[::1]:7443".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:7443");
        assert!("example.com".parse::<RelayAddr>().is_err());
        assert!("example.com:0".parse::<RelayAddr>().is_err());
        assert!(":7443".parse::<RelayAddr>().is_err());
    }

    #[test]
    fn certificate_failures_are_told_apart() {
        use rustls::{CertificateError as C, Error};
        let of = |e: C| TrustProblem::of(&Error::InvalidCertificate(e).to_string());
        assert_eq!(of(C::UnknownIssuer), Some(TrustProblem::UnknownCa));
        assert_eq!(of(C::NotValidForName), Some(TrustProblem::WrongName));
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(127, 0, 0, 4).into());
        let ctx = C::NotValidForNameContext { expected: name, presented: vec!["localhost".into()] };
        assert_eq!(of(ctx), Some(TrustProblem::WrongName));
        assert_eq!(of(C::Expired), Some(TrustProblem::Time));
        assert_eq!(of(C::NotValidYet), Some(TrustProblem::Time));
        assert_eq!(of(C::BadSignature), Some(TrustProblem::UnknownCa));
        assert_eq!(of(C::UnhandledCriticalExtension), Some(TrustProblem::Other));
        let pin = "the relay's certificate does not match the pinned fingerprint";
        assert_eq!(TrustProblem::of(pin), Some(TrustProblem::UnknownCa));
        assert_eq!(TrustProblem::of("connection refused"), None);
    }
}

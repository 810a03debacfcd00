//! What of a visitor's request the relay passes on to the next hop, and which requests it
//! refuses because it cannot tell where they go.
//!
//! - [`strip_hop_by_hop`]: headers that describe one connection (RFC 9110 §7.6.1) never cross
//!   the relay, in either direction: `Connection` and every header it names, `Keep-Alive`,
//!   `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate` and
//!   `Proxy-Authorization`. Left in, they let a visitor remove headers the next hop relies on
//!   or pass it credentials and options meant for the relay. An upgrade keeps `Upgrade` and
//!   `Connection: upgrade` ([`Keep::Upgrade`]); a request to an HTTP/2 upstream keeps
//!   `TE: trailers`, which gRPC needs ([`Keep::TeTrailers`]).
//! - [`target_host`]: the one host a request is for. Two `Host` headers, or a request target
//!   (`GET http://NAME/x`, or HTTP/2's `:authority`) naming another host than `Host`, are
//!   refused: each hop behind the relay could believe a different one.
//! - [`foreign_coding`]: a transfer coding other than `chunked`, which the relay cannot undo.
//!
//! Not here: message framing. hyper parses bodies on the visitor's side and frames them again
//! on the upstream's; the relay only marks a body of unknown length as chunked towards an
//! HTTP/1.1 upstream (see `ingress`). `Trailer` is kept: it is no hop-by-hop header in RFC
//! 9110, and hyper's HTTP/1.1 side sends only the trailer fields it announces.

use http::header::{
    CONNECTION, HOST, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING,
    UPGRADE,
};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Request};

/// Headers that only mean something on one connection (RFC 9110 §7.6.1, and the two
/// `Proxy-*` ones, which are for the relay, not the service).
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// What [`strip_hop_by_hop`] leaves of the connection headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing.
    Nothing,
    /// `Upgrade`, with `Connection: upgrade` and nothing else in it: for a request that asks to
    /// switch protocols (see [`asks_upgrade`]) and the `101` that grants it.
    Upgrade,
    /// `TE: trailers` (and no other coding), for a request to an HTTP/2 upstream.
    TeTrailers,
}

/// Removes the hop-by-hop headers and every header that `Connection` names, except what `keep`
/// says.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep: Keep) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect();
    let trailers =
        keep == Keep::TeTrailers && headers.get_all(TE).iter().any(|v| has_token(v, "trailers"));
    let upgrade: Vec<HeaderValue> = match keep {
        Keep::Upgrade => headers.get_all(UPGRADE).iter().cloned().collect(),
        _ => Vec::new(),
    };
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if !upgrade.is_empty() {
        for v in upgrade {
            headers.append(UPGRADE, v);
        }
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks to switch protocols: an `Upgrade` header that `Connection` names
/// (RFC 9110 §7.8); an `Upgrade` alone is only a hop-by-hop header to drop.
pub fn asks_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers.get_all(CONNECTION).iter().any(|v| has_token(v, "upgrade"))
}

/// Whether a comma-separated header value lists `token` (parameters after `;` ignored).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.as_bytes().split(|b| *b == b',').any(|item| {
        let name = item.split(|b| *b == b';').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(token.as_bytes())
    })
}

/// The first transfer coding of a request other than `chunked`, if any. hyper takes the chunked
/// framing off; anything under it (`gzip, chunked`) would reach the service unannounced once
/// `Transfer-Encoding` is dropped, so such requests are refused (501, RFC 9112 §6.1).
pub fn foreign_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.eq_ignore_ascii_case(b"chunked"))
        .map(|coding| String::from_utf8_lossy(coding).into_owned())
}

/// Why the relay cannot tell which host a request is for. Each is answered `400`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// More than one `Host` header.
    #[error("the request has {0} Host headers; send exactly one")]
    DuplicateHost(usize),
    /// A `Host` header that is not `host[:port]`.
    #[error("the Host header {0:?} is not a host name with an optional port")]
    BadHost(String),
    /// A request target whose authority is not `host[:port]`, user information (`user@`)
    /// included.
    #[error(
        "the request target names {0:?}, not a host name with an optional port; send \
         credentials in an Authorization header, not in the URL"
    )]
    BadTarget(String),
    /// The request target and the `Host` header name different hosts.
    #[error(
        "the request target is for {authority} but the Host header says {host}; send the same \
         host in both, or only one of them"
    )]
    Mismatch {
        /// The request target's authority (or HTTP/2's `:authority`).
        authority: String,
        /// The `Host` header.
        host: String,
    },
}

/// The host a request is for, as `host[:port]`: the authority of its target when it has one
/// (absolute form, `GET http://NAME/x`, and HTTP/2's `:authority`), which wins over `Host`
/// (RFC 9112 §3.2.2); otherwise its `Host` header; empty when it has neither. A `Host` that
/// names another host than the target (names compared without case or a trailing dot, ports
/// with the scheme's default filled in) is refused, as are two `Host` headers.
pub fn target_host<B>(req: &Request<B>) -> Result<String, TargetError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    let extra = hosts.count();
    if extra > 0 {
        return Err(TargetError::DuplicateHost(extra + 1));
    }
    let host = match host {
        Some(v) if !v.is_empty() => Some(parse_host(v)?),
        _ => None,
    };
    let Some(authority) = req.uri().authority() else {
        return Ok(host.map(|h| h.as_str().to_owned()).unwrap_or_default());
    };
    if !plain(authority) {
        return Err(TargetError::BadTarget(authority.as_str().to_owned()));
    }
    let default_port = match req.uri().scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => Some(80),
        Some(s) if s.eq_ignore_ascii_case("https") => Some(443),
        _ => None,
    };
    let differs = match &host {
        Some(h) => same_host(h, default_port) != same_host(authority, default_port),
        // An empty `Host` beside a target that names one.
        None => req.headers().contains_key(HOST),
    };
    if differs {
        return Err(TargetError::Mismatch {
            authority: authority.as_str().to_owned(),
            host: host.map(|h| h.as_str().to_owned()).unwrap_or_default(),
        });
    }
    Ok(authority.as_str().to_owned())
}

fn parse_host(v: &HeaderValue) -> Result<Authority, TargetError> {
    let bad = || TargetError::BadHost(String::from_utf8_lossy(v.as_bytes()).into_owned());
    let text = v.to_str().map_err(|_| bad())?;
    text.parse::<Authority>().ok().filter(plain).ok_or_else(bad)
}

/// Whether an authority is only `host[:port]`: no user information, a port that is a number
/// (or empty, which means the default).
fn plain(a: &Authority) -> bool {
    !a.as_str().contains('@') && (a.port().is_some() || a.as_str().len() <= a.host().len() + 1)
}

/// What two authorities must share to name the same host: the name without case or a trailing
/// dot, and the port, with `default_port` when none is written.
fn same_host(a: &Authority, default_port: Option<u16>) -> (String, Option<u16>) {
    (a.host().trim_end_matches('.').to_ascii_lowercase(), a.port_u16().or(default_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h.keys().map(|k| k.as_str().to_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_named_ones_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", " x-other ,close"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-checksum"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut h, Keep::Nothing);
        assert_eq!(names(&h), ["trailer", "x-kept"]);
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection_upgrade_only() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(asks_upgrade(&h));
        strip_hop_by_hop(&mut h, Keep::Upgrade);
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        // An `Upgrade` that `Connection` does not name asks for nothing.
        assert!(!asks_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!asks_upgrade(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn te_trailers_only_towards_h2() {
        let mut h = headers(&[("te", "gzip;q=0.5, trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h, Keep::TeTrailers);
        assert_eq!(names(&h), ["te"]);
        assert_eq!(h["te"], "trailers");
        let mut h = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, Keep::TeTrailers);
        assert!(h.is_empty());
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, Keep::Nothing);
        assert!(h.is_empty());
    }

    #[test]
    fn odd_connection_tokens_do_not_panic() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_bytes(b",, \t,\xff\xfe, x-a ,").unwrap());
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-b", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, Keep::Nothing);
        assert_eq!(names(&h), ["x-b"]);
    }

    #[test]
    fn codings_other_than_chunked() {
        assert_eq!(foreign_coding(&headers(&[("transfer-encoding", "chunked")])), None);
        assert_eq!(foreign_coding(&headers(&[("transfer-encoding", "Chunked")])), None);
        assert_eq!(foreign_coding(&HeaderMap::new()), None);
        assert_eq!(
            foreign_coding(&headers(&[("transfer-encoding", "gzip, chunked")])),
            Some("gzip".into())
        );
    }

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_host_a_request_is_for() {
        assert_eq!(target_host(&req("/x", &["shop.example.com"])), Ok("shop.example.com".into()));
        assert_eq!(target_host(&req("/x", &[])), Ok(String::new()));
        assert_eq!(target_host(&req("/x", &[""])), Ok(String::new()));
        // The target wins and must agree with Host: case, a trailing dot and a default port
        // make no difference; another name or port does.
        for host in ["shop.example.com", "SHOP.example.com.", "shop.example.com:80"] {
            assert_eq!(
                target_host(&req("http://shop.example.com/x", &[host])),
                Ok("shop.example.com".into()),
                "{host}"
            );
        }
        assert_eq!(
            target_host(&req("https://shop.example.com:443/x", &["shop.example.com"])),
            Ok("shop.example.com:443".into())
        );
        assert_eq!(
            target_host(&req("http://other.example.com/x", &[])),
            Ok("other.example.com".into())
        );
        for host in ["shop.example.com", "other.example.com:8080", ""] {
            assert!(
                matches!(
                    target_host(&req("http://other.example.com:8080/x", &[host])),
                    Err(TargetError::Mismatch { .. })
                ) == !host.starts_with("other"),
                "{host}"
            );
        }
        assert_eq!(
            target_host(&req("/x", &["a.example.com", "a.example.com"])),
            Err(TargetError::DuplicateHost(2))
        );
        for bad in ["http://u:p@shop.example.com/x", "http://shop.example.com:http/x"] {
            assert!(matches!(target_host(&req(bad, &[])), Err(TargetError::BadTarget(_))), "{bad}");
        }
        assert_eq!(target_host(&req("/x", &["shop.example.com:"])), Ok("shop.example.com:".into()));
        for bad in ["a b", "u@shop.example.com", "shop.example.com:http"] {
            assert!(
                matches!(target_host(&req("/x", &[bad])), Err(TargetError::BadHost(_))),
                "{bad}"
            );
        }
    }
}

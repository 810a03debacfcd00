//! What a tunnel lets in: its options from the bind, compiled once and checked for every visitor
//! at the relay, so refused traffic never crosses the tunnel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::{HeaderName, HeaderValue};
use subtle::ConstantTimeEq;
use warren_proto::{Protocol, TunnelOptions};

/// Why a bind's options were refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// A tunnel's compiled options.
#[derive(Debug, Default)]
pub struct Policy {
    /// The options as bound (for status and the API).
    pub options: TunnelOptions,
    request_add: Vec<(HeaderName, HeaderValue)>,
    request_remove: Vec<HeaderName>,
    response_add: Vec<(HeaderName, HeaderValue)>,
    response_remove: Vec<HeaderName>,
    limiter: Option<RateLimiter>,
}

/// The outcome of checking a visitor's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Let in.
    Yes,
    /// Refused by `--deny` or not in `--allow`.
    Forbidden,
    /// Over `--rate-limit`; retry after this many seconds.
    RateLimited(u64),
}

fn header_name(s: &str) -> Result<HeaderName, PolicyError> {
    HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| PolicyError(format!("{s:?} is not a valid HTTP header name")))
}

fn header_pairs(list: &[(String, String)]) -> Result<Vec<(HeaderName, HeaderValue)>, PolicyError> {
    list.iter()
        .map(|(n, v)| {
            let value = HeaderValue::from_str(v.trim())
                .map_err(|_| PolicyError(format!("the value of header {n} is not valid")))?;
            Ok((header_name(n)?, value))
        })
        .collect()
}

impl Policy {
    /// Compiles a bind's options for a tunnel of `protocol`.
    pub fn new(protocol: Protocol, options: TunnelOptions) -> Result<Self, PolicyError> {
        if !options.unknown.is_empty() {
            let keys: Vec<u16> = options.unknown.iter().map(|(k, _)| *k).collect();
            return Err(PolicyError(format!(
                "this relay does not know tunnel option(s) {:?}; upgrade the relay or drop the option",
                keys
            )));
        }
        let http_only = [
            (!options.basic_auth.is_empty(), "--basic-auth"),
            (!options.request_header_add.is_empty(), "--request-header-add"),
            (!options.request_header_remove.is_empty(), "--request-header-remove"),
            (!options.response_header_add.is_empty(), "--response-header-add"),
            (!options.response_header_remove.is_empty(), "--response-header-remove"),
            (options.max_body.is_some(), "--max-body"),
            (options.https_only, "--https-only"),
            (options.upstream_http2, "--upstream-http2"),
        ];
        if protocol != Protocol::Http
            && let Some((_, flag)) = http_only.iter().find(|(set, _)| *set)
        {
            return Err(PolicyError(format!("{flag} applies to http tunnels only")));
        }
        if protocol == Protocol::Udp && options.rate_limit.is_some() {
            return Err(PolicyError("--rate-limit applies to http, tcp and tls tunnels".into()));
        }
        if options.rate_limit == Some(0) {
            return Err(PolicyError("--rate-limit must be at least 1/s".into()));
        }
        Ok(Self {
            request_add: header_pairs(&options.request_header_add)?,
            request_remove: options
                .request_header_remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
            response_add: header_pairs(&options.response_header_add)?,
            response_remove: options
                .response_header_remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
            limiter: options.rate_limit.map(RateLimiter::new),
            options,
        })
    }

    /// Whether a visitor from `ip` may come in now. Counts against the rate limit.
    pub fn admit(&self, ip: IpAddr) -> Admit {
        let o = &self.options;
        if o.deny.iter().any(|c| c.contains(ip))
            || (!o.allow.is_empty() && !o.allow.iter().any(|c| c.contains(ip)))
        {
            return Admit::Forbidden;
        }
        match &self.limiter {
            Some(l) => l.take(ip, Instant::now()).map_or_else(Admit::RateLimited, |()| Admit::Yes),
            None => Admit::Yes,
        }
    }

    /// Whether the tunnel asks for basic authentication.
    pub fn needs_auth(&self) -> bool {
        !self.options.basic_auth.is_empty()
    }

    /// Checks an `Authorization` header value against the tunnel's users.
    pub fn authorized(&self, header: Option<&HeaderValue>) -> bool {
        if !self.needs_auth() {
            return true;
        }
        let Some(creds) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic ")))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        else {
            return false;
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &creds);
        // Compare with every user, without stopping early.
        self.options
            .basic_auth
            .iter()
            .fold(subtle::Choice::from(0), |acc, a| acc | a.digest.ct_eq(digest.as_ref()))
            .into()
    }

    /// Applies the request header edits.
    pub fn edit_request(&self, headers: &mut http::HeaderMap) {
        for n in &self.request_remove {
            headers.remove(n);
        }
        for (n, v) in &self.request_add {
            headers.insert(n.clone(), v.clone());
        }
    }

    /// Applies the response header edits.
    pub fn edit_response(&self, headers: &mut http::HeaderMap) {
        for n in &self.response_remove {
            headers.remove(n);
        }
        for (n, v) in &self.response_add {
            headers.insert(n.clone(), v.clone());
        }
    }
}

/// Most visitor addresses tracked per tunnel; past it, addresses with full buckets are dropped.
const MAX_TRACKED: usize = 65_536;

/// A token bucket per visitor address: `rate` per second, bursts up to `rate`.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self { rate: f64::from(rate), buckets: Mutex::default() }
    }

    /// Takes one token for `ip`, or says in how many whole seconds one will be there.
    fn take(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_TRACKED {
            let rate = self.rate;
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
            if b.len() >= MAX_TRACKED {
                // Every tracked address is busy: refuse newcomers rather than grow without bound.
                return Err(1);
            }
        }
        let (tokens, at) = b.entry(ip).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / self.rate);
            Err(wait.as_secs().max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::BasicAuth;

    fn auth(user: &str, pass: &str) -> BasicAuth {
        let d = ring::digest::digest(&ring::digest::SHA256, format!("{user}:{pass}").as_bytes());
        BasicAuth { user: user.into(), digest: d.as_ref().try_into().unwrap() }
    }

    fn basic(s: &str) -> HeaderValue {
        let b = base64::engine::general_purpose::STANDARD.encode(s);
        HeaderValue::from_str(&format!("Basic {b}")).unwrap()
    }

    #[test]
    fn basic_auth() {
        let opts = TunnelOptions {
            basic_auth: vec![auth("ann", "pw1"), auth("bob", "pw:2")],
            ..TunnelOptions::default()
        };
        let p = Policy::new(Protocol::Http, opts).unwrap();
        assert!(p.authorized(Some(&basic("ann:pw1"))));
        assert!(p.authorized(Some(&basic("bob:pw:2"))));
        assert!(!p.authorized(Some(&basic("ann:pw2"))));
        assert!(!p.authorized(Some(&basic("ann"))));
        assert!(!p.authorized(Some(&HeaderValue::from_static("Basic !!!"))));
        assert!(!p.authorized(Some(&HeaderValue::from_static("Bearer x"))));
        assert!(!p.authorized(None));
        assert!(Policy::new(Protocol::Tcp, TunnelOptions::default()).unwrap().authorized(None));
    }

    #[test]
    fn allow_and_deny() {
        let opts = TunnelOptions {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            deny: vec!["127.0.0.2/32".parse().unwrap()],
            ..TunnelOptions::default()
        };
        let p = Policy::new(Protocol::Tcp, opts).unwrap();
        assert_eq!(p.admit("127.0.0.1".parse().unwrap()), Admit::Yes);
        assert_eq!(p.admit("127.0.0.2".parse().unwrap()), Admit::Forbidden);
        assert_eq!(p.admit("10.0.0.1".parse().unwrap()), Admit::Forbidden);
    }

    #[test]
    fn rate_limit_refills() {
        let l = RateLimiter::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.take(ip, t0).is_ok());
        assert!(l.take(ip, t0).is_ok());
        assert_eq!(l.take(ip, t0), Err(1));
        // Another visitor has its own bucket.
        assert!(l.take("127.0.0.9".parse().unwrap(), t0).is_ok());
        assert!(l.take(ip, t0 + Duration::from_millis(600)).is_ok());
        assert!(l.take(ip, t0 + Duration::from_millis(600)).is_err());
    }

    #[test]
    fn options_checked_per_protocol() {
        let o = TunnelOptions { https_only: true, ..TunnelOptions::default() };
        assert!(Policy::new(Protocol::Tcp, o.clone()).is_err());
        assert!(Policy::new(Protocol::Http, o).is_ok());
        let o = TunnelOptions { unknown: vec![(77, Vec::new())], ..TunnelOptions::default() };
        assert!(Policy::new(Protocol::Http, o).unwrap_err().0.contains("77"));
        let o = TunnelOptions {
            request_header_add: vec![("bad name".into(), "v".into())],
            ..TunnelOptions::default()
        };
        assert!(Policy::new(Protocol::Http, o).is_err());
        let o = TunnelOptions { rate_limit: Some(0), ..TunnelOptions::default() };
        assert!(Policy::new(Protocol::Http, o).is_err());
    }
}

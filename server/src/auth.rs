//! Token checks: tokens given on the command line, and tokens created through the API (kept
//! in the store as digests), plus the admin token of the API.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use warren_proto::message::Token;

use crate::store::{Store, TokenLimits};

/// Which configured token a session presented: the first 16 hex digits of its SHA-256, so
/// leases can be keyed by it without keeping the secret around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(pub [u8; 8]);

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The tokens a relay accepts, stored as SHA-256 digests.
#[derive(Debug, Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

/// SHA-256 of a token: what is kept instead of the secret.
pub fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Tokens {
    /// Accepts exactly these tokens.
    pub fn new(tokens: &[Token]) -> Self {
        Self { digests: tokens.iter().map(|t| digest(t.expose())).collect() }
    }

    /// Checks a presented token against every accepted one, in time independent of where (or
    /// whether) it matches.
    pub fn check(&self, presented: &Token) -> Option<TokenId> {
        let d = digest(presented.expose());
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&d);
        }
        if bool::from(found) {
            let mut id = [0u8; 8];
            id.copy_from_slice(&d[..8]);
            Some(TokenId(id))
        } else {
            None
        }
    }
}

impl TokenId {
    /// Parses the 16 hex digits [`TokenId`] displays as.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 16 {
            return None;
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(id))
    }

    /// The id of a token with this digest.
    pub fn of(digest: &[u8; 32]) -> Self {
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

/// A token the relay accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Keys leases and limits.
    pub id: TokenId,
    /// The API's id for the token, when it was created through the API.
    pub api_id: Option<String>,
    /// What it may do.
    pub limits: TokenLimits,
}

/// Every token the relay accepts: those given on the command line and those in the store.
#[derive(Debug, Clone)]
pub struct Auth {
    flags: Tokens,
    store: Option<Arc<Store>>,
}

impl Auth {
    /// Accepts `flags` and the store's unrevoked tokens.
    pub fn new(flags: Tokens, store: Option<Arc<Store>>) -> Self {
        Self { flags, store }
    }

    /// Checks a presented token. A store that cannot be read refuses (and logs why).
    pub fn check(&self, presented: &Token) -> Option<Accepted> {
        if let Some(id) = self.flags.check(presented) {
            return Some(Accepted { id, api_id: None, limits: TokenLimits::default() });
        }
        let store = self.store.as_ref()?;
        let d = digest(presented.expose());
        match store.token_by_digest(&d) {
            Ok(Some(t)) if t.revoked_at.is_none() => {
                Some(Accepted { id: TokenId::of(&d), api_id: Some(t.id), limits: t.limits })
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read tokens from the store; refusing");
                None
            }
        }
    }
}

/// The API's admin token, kept as a digest and compared in constant time.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl AdminToken {
    /// The admin token `secret`.
    pub fn new(secret: &str) -> Self {
        Self(digest(secret))
    }

    /// Whether `presented` is the admin token.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.ct_eq(&digest(presented)).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_tokens_pass() {
        let t = Tokens::new(&[Token::new("a"), Token::new("b")]);
        assert!(t.check(&Token::new("a")).is_some());
        assert!(t.check(&Token::new("b")).is_some());
        assert!(t.check(&Token::new("c")).is_none());
        assert!(t.check(&Token::new("")).is_none());
        assert_ne!(t.check(&Token::new("a")), t.check(&Token::new("b")));
    }
}

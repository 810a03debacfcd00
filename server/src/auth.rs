//! Token checks.

use subtle::ConstantTimeEq;
use warren_proto::message::Token;

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

fn digest(s: &str) -> [u8; 32] {
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

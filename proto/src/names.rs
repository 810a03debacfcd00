//! Validated newtypes for the identities and names that cross the wire.
//!
//! Each type can only be built through its parser, so code past `decode` never sees an unchecked
//! name.

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// Which kind of name.
    pub what: &'static str,
    /// The refused input (truncated to 80 characters).
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl NameError {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        let value = value.chars().take(80).collect();
        Self { what, value, reason }
    }
}

fn check_chars(
    what: &'static str,
    s: &str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
    reason: &'static str,
) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::new(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(NameError::new(what, s, "is too long"));
    }
    if !s.bytes().all(allowed) {
        return Err(NameError::new(what, s, reason));
    }
    Ok(())
}

/// A stable agent identity: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

impl AgentId {
    /// Longest accepted identity, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Parses an agent identity.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_chars(
            "agent id",
            s,
            Self::MAX_LEN,
            is_name_byte,
            "use only letters, digits, '.', '_' and '-'",
        )?;
        Ok(Self(s.to_owned()))
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tunnel's name, unique per agent: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelName(String);

impl TunnelName {
    /// Longest accepted name, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Parses a tunnel name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_chars(
            "tunnel name",
            s,
            Self::MAX_LEN,
            is_name_byte,
            "use only letters, digits, '.', '_' and '-'",
        )?;
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// One DNS label under the relay's domain: 1 to 63 characters from `a-z 0-9 -`, not starting or
/// ending with `-`. Upper case is folded to lower case when parsing.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subdomain(String);

impl Subdomain {
    /// Longest DNS label.
    pub const MAX_LEN: usize = 63;

    /// Parses a subdomain label, folding ASCII upper case to lower case.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let lower = s.to_ascii_lowercase();
        check_chars(
            "subdomain",
            &lower,
            Self::MAX_LEN,
            |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
            "a subdomain is one DNS label: letters, digits and '-' only",
        )?;
        if lower.starts_with('-') || lower.ends_with('-') {
            return Err(NameError::new("subdomain", s, "must not start or end with '-'"));
        }
        Ok(Self(lower))
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name in an overlay network (the network's own, an endpoint's, an alias, a service's): one
/// DNS label, 1 to 63 characters from `a-z 0-9 -`, not starting or ending with `-`. Upper case
/// is refused, not folded: these names are also DNS names that agents answer for.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// Longest DNS label.
    pub const MAX_LEN: usize = 63;

    /// Parses a label.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_chars(
            "name",
            s,
            Self::MAX_LEN,
            |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
            "a name is one DNS label: a-z, 0-9 and '-' only",
        )?;
        if s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::new("name", s, "must not start or end with '-'"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tunnel's number within one relay, chosen by the relay.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TunnelId(pub u32);

macro_rules! text_impls {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }
    )*};
}
text_impls!(AgentId, TunnelName, Subdomain, Label);

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomain_rules() {
        assert_eq!(Subdomain::parse("Shop").unwrap().as_str(), "shop");
        assert!(Subdomain::parse("a-b-1").is_ok());
        assert!(Subdomain::parse("").is_err());
        assert!(Subdomain::parse("-a").is_err());
        assert!(Subdomain::parse("a-").is_err());
        assert!(Subdomain::parse("a.b").is_err());
        assert!(Subdomain::parse("a_b").is_err());
        assert!(Subdomain::parse(&"a".repeat(64)).is_err());
        assert!(Subdomain::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn names() {
        assert!(TunnelName::parse("http-8080").is_ok());
        assert!(TunnelName::parse("a b").is_err());
        assert!(AgentId::parse("laptop.01_x").is_ok());
        assert!(AgentId::parse("é").is_err());
        assert!(Label::parse("db-1").is_ok());
        assert!(Label::parse("Db").is_err());
        assert!(Label::parse("a.b").is_err());
        assert!(Label::parse("-a").is_err());
        let e = Subdomain::parse("bad_name").unwrap_err();
        assert!(e.to_string().contains("bad_name"), "{e}");
    }
}

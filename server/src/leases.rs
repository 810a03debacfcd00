//! Leases: which owner (token and agent identity) holds which subdomain or pool port under which
//! tunnel name, kept where a restart of the relay does not lose them.
//!
//! The router's maps are the working copy; every change of a lease (granted, taken over, gone
//! offline, released, expired) is written through a [`LeaseStore`], one row per lease, never per
//! visitor. At start the relay loads the stored leases as offline: each is held for its owner
//! for one lease grace from that start (its agent could not reconnect while the relay was down),
//! so a name held by token A is refused to every other token, whoever reconnects first.
//!
//! [`LeaseStore`] is the seam for a shared store: SQLite ([`crate::store::Store`]) implements it
//! now; an etcd store would implement the same three calls with leases and compare-and-swap.
//!
//! Not here: deciding who gets a name (the router does), reservations (kept by the API's
//! tables, honoured by the router).

use std::fmt;

use rusqlite::params;
use warren_proto::{AgentId, Protocol, Subdomain, TunnelName};

use crate::auth::TokenId;
use crate::store::{Store, StoreError};

/// Who owns a lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The token the agent presented.
    pub token: TokenId,
    /// The agent's identity.
    pub agent: AgentId,
}

/// The key of a lease: one owner's tunnel name.
pub type LeaseKey = (Owner, TunnelName);

/// One lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// Whose it is, under which tunnel name.
    pub key: LeaseKey,
    /// The tunnel's protocol.
    pub protocol: Protocol,
    /// The subdomain held (HTTP and TLS tunnels).
    pub subdomain: Option<Subdomain>,
    /// The pool port held (TCP and UDP tunnels; the protocol says which space).
    pub port: Option<u16>,
    /// While its agent is away: until when (Unix seconds) it is held. `None` while served.
    pub offline_until: Option<i64>,
}

/// Where leases are kept across restarts. Calls are made in the order the router changed its
/// leases, never concurrently; each call is one atomic write.
pub trait LeaseStore: Send + Sync + fmt::Debug {
    /// Every stored lease.
    fn load(&self) -> Result<Vec<StoredLease>, StoreError>;
    /// Writes these leases, replacing whatever held the same key, subdomain or port before.
    fn put(&self, leases: &[StoredLease]) -> Result<(), StoreError>;
    /// Forgets the leases of these keys (absent ones are no error).
    fn release(&self, keys: &[LeaseKey]) -> Result<(), StoreError>;
}

/// The protocol a lease row names.
fn protocol_of(s: &str) -> Option<Protocol> {
    [Protocol::Http, Protocol::Tcp, Protocol::Tls, Protocol::Udp]
        .into_iter()
        .find(|p| p.as_str() == s)
}

/// One row of `leases`, as read, before it is checked.
struct Row {
    token: String,
    agent: String,
    name: String,
    proto: String,
    subdomain: Option<String>,
    port: Option<i64>,
    offline_until: Option<i64>,
}

impl Row {
    /// The lease this row describes; a row this relay cannot have written is `Corrupt`.
    fn parse(self) -> Result<StoredLease, StoreError> {
        let what = format!("lease of agent {:?}, tunnel {:?}", self.agent, self.name);
        let bad = |why: String| StoreError::Corrupt(format!("{what}: {why}"));
        let token = TokenId::parse_hex(&self.token)
            .ok_or_else(|| bad(format!("token {:?}", self.token)))?;
        let agent = AgentId::parse(&self.agent).map_err(|e| bad(e.to_string()))?;
        let name = TunnelName::parse(&self.name).map_err(|e| bad(e.to_string()))?;
        let protocol =
            protocol_of(&self.proto).ok_or_else(|| bad(format!("protocol {:?}", self.proto)))?;
        let subdomain = match &self.subdomain {
            Some(s) => Some(Subdomain::parse(s).map_err(|e| bad(e.to_string()))?),
            None => None,
        };
        let port = match self.port {
            Some(p) => Some(u16::try_from(p).map_err(|_| bad(format!("port {p}")))?),
            None => None,
        };
        let named = matches!(protocol, Protocol::Http | Protocol::Tls);
        if named != subdomain.is_some() || named == port.is_some() {
            return Err(bad(format!(
                "a {protocol} lease with subdomain {subdomain:?}, port {port:?}"
            )));
        }
        Ok(StoredLease {
            key: (Owner { token, agent }, name),
            protocol,
            subdomain,
            port,
            offline_until: self.offline_until,
        })
    }
}

impl LeaseStore for Store {
    fn load(&self) -> Result<Vec<StoredLease>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT token, agent, name, proto, subdomain, port, offline_until FROM leases \
             ORDER BY token, agent, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Row {
                token: r.get(0)?,
                agent: r.get(1)?,
                name: r.get(2)?,
                proto: r.get(3)?,
                subdomain: r.get(4)?,
                port: r.get(5)?,
                offline_until: r.get(6)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.parse()?);
        }
        Ok(out)
    }

    fn put(&self, leases: &[StoredLease]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            // REPLACE drops any row that held the key, the subdomain or the port: the router's
            // maps are the truth, the table their copy.
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO leases \
                 (token, agent, name, proto, subdomain, port, offline_until) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for l in leases {
                let (owner, name) = &l.key;
                stmt.execute(params![
                    owner.token.to_string(),
                    owner.agent.as_str(),
                    name.as_str(),
                    l.protocol.as_str(),
                    l.subdomain.as_ref().map(Subdomain::as_str),
                    l.port,
                    l.offline_until,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn release(&self, keys: &[LeaseKey]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM leases WHERE token = ?1 AND agent = ?2 AND name = ?3",
            )?;
            for (owner, name) in keys {
                stmt.execute(params![
                    owner.token.to_string(),
                    owner.agent.as_str(),
                    name.as_str()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(agent: &str, name: &str, sub: Option<&str>, port: Option<u16>) -> StoredLease {
        let protocol = if sub.is_some() { Protocol::Http } else { Protocol::Tcp };
        StoredLease {
            key: (
                Owner { token: TokenId([7; 8]), agent: AgentId::parse(agent).unwrap() },
                TunnelName::parse(name).unwrap(),
            ),
            protocol,
            subdomain: sub.map(|s| Subdomain::parse(s).unwrap()),
            port,
            offline_until: None,
        }
    }

    #[test]
    fn put_load_release() {
        let store = Store::open_in_memory().unwrap();
        let web = lease("laptop", "web", Some("shop"), None);
        let mut db = lease("laptop", "db", None, Some(20001));
        store.put(&[web.clone(), db.clone()]).unwrap();
        let mut loaded = store.load().unwrap();
        loaded.sort_by(|a, b| a.key.1.as_str().cmp(b.key.1.as_str()));
        assert_eq!(loaded, vec![db.clone(), web.clone()]);

        // An upsert of the same key replaces its row.
        db.offline_until = Some(1234);
        store.put(std::slice::from_ref(&db)).unwrap();
        assert_eq!(store.load().unwrap().len(), 2);
        assert!(store.load().unwrap().contains(&db));

        store.release(&[web.key.clone(), web.key.clone()]).unwrap();
        assert_eq!(store.load().unwrap(), vec![db]);
    }

    #[test]
    fn a_name_has_one_row() {
        let store = Store::open_in_memory().unwrap();
        store.put(&[lease("old", "web", Some("shop"), None)]).unwrap();
        let newer = lease("new", "site", Some("shop"), None);
        store.put(std::slice::from_ref(&newer)).unwrap();
        assert_eq!(store.load().unwrap(), vec![newer]);
    }

    #[test]
    fn bad_rows_are_corrupt_not_panics() {
        let store = Store::open_in_memory().unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO leases (token, agent, name, proto, port) \
                 VALUES ('0707070707070707', 'a', 'web', 'tcp', 70000)",
                [],
            )
            .unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }
}

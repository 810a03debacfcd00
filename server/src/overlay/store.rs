//! Overlay networks in the relay's SQLite store: definitions, address claims, services.
//!
//! A claim is one row per (network, address) with a primary key on it and a unique owner per
//! network, so no address and no endpoint name is ever handed out twice, whichever agents ask
//! at once and across restarts of the relay.

use std::net::Ipv4Addr;
use std::str::FromStr;

use rusqlite::{OptionalExtension, params};
use warren_proto::Label;
use warren_proto::overlay::{NetDef, ServiceMode, Subnet, Vni};

use crate::store::{Store, StoreError, unique_violation};

/// Who holds an address in an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A member agent's own address (its bridge's, for traffic it originates).
    Host,
    /// An endpoint, by name.
    Endpoint(Label),
    /// A service's virtual address, by service name.
    Service(Label),
}

impl Owner {
    fn text(&self, agent: &str) -> String {
        match self {
            Self::Host => format!("host:{agent}"),
            Self::Endpoint(n) => format!("endpoint:{n}"),
            Self::Service(n) => format!("service:{n}"),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        let (kind, name) = s.split_once(':')?;
        match kind {
            "host" => Some(Self::Host),
            "endpoint" => Label::parse(name).ok().map(Self::Endpoint),
            "service" => Label::parse(name).ok().map(Self::Service),
            _ => None,
        }
    }
}

/// One claimed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The address.
    pub ip: Ipv4Addr,
    /// What holds it.
    pub owner: Owner,
    /// The agent it belongs to (empty for services, which belong to the network).
    pub agent: String,
}

/// A stored network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRow {
    /// Its account.
    pub account: String,
    /// What it is.
    pub def: NetDef,
    /// Unix seconds.
    pub created_at: i64,
}

/// A stored service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    /// Its name.
    pub name: Label,
    /// vip or dnsrr.
    pub mode: ServiceMode,
    /// Its virtual address (vip).
    pub vip: Option<Ipv4Addr>,
    /// Its endpoints, by name.
    pub endpoints: Vec<Label>,
}

fn corrupt(what: &str, v: &str) -> StoreError {
    StoreError::Corrupt(format!("overlay {what} {v:?}"))
}

fn ip(v: &str) -> Result<Ipv4Addr, StoreError> {
    Ipv4Addr::from_str(v).map_err(|_| corrupt("address", v))
}

fn mode_text(m: ServiceMode) -> &'static str {
    match m {
        ServiceMode::Vip => "vip",
        ServiceMode::Dnsrr => "dnsrr",
    }
}

impl Store {
    /// Every overlay network.
    pub fn overlay_networks(&self) -> Result<Vec<NetRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT account, name, vni, subnet, gateway, mtu, created_at FROM overlay_networks \
             ORDER BY account, name",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(account, name, vni, subnet, gateway, mtu, created_at)| {
                let (addr, prefix) =
                    subnet.split_once('/').ok_or_else(|| corrupt("subnet", &subnet))?;
                let subnet = prefix
                    .parse()
                    .ok()
                    .and_then(|p| Subnet::new(ip(addr).ok()?, p))
                    .ok_or_else(|| corrupt("subnet", &subnet))?;
                Ok(NetRow {
                    account,
                    def: NetDef {
                        name: Label::parse(&name).map_err(|_| corrupt("network name", &name))?,
                        vni: u32::try_from(vni)
                            .ok()
                            .and_then(Vni::new)
                            .ok_or_else(|| corrupt("vni", &vni.to_string()))?,
                        subnet,
                        gateway: ip(&gateway)?,
                        mtu: u16::try_from(mtu).map_err(|_| corrupt("mtu", &mtu.to_string()))?,
                    },
                    created_at,
                })
            })
            .collect()
    }

    /// Stores a new network; [`StoreError::Taken`] when its name (in the account) or its VNI
    /// is taken.
    pub fn insert_overlay(&self, account: &str, def: &NetDef, now: i64) -> Result<(), StoreError> {
        let done = self.conn().execute(
            "INSERT INTO overlay_networks (account, name, vni, subnet, gateway, mtu, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                account,
                def.name.as_str(),
                def.vni.get(),
                def.subnet.to_string(),
                def.gateway.to_string(),
                def.mtu,
                now
            ],
        );
        match done {
            Ok(_) => Ok(()),
            Err(e) => match unique_violation(&e) {
                Some(col) if col.contains("vni") => {
                    Err(StoreError::Taken(format!("vni {}", def.vni)))
                }
                Some(_) => Err(StoreError::Taken(format!("network name {}", def.name))),
                None => Err(e.into()),
            },
        }
    }

    /// Forgets a network with its claims and services.
    pub fn delete_overlay(&self, vni: Vni) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["overlay_networks", "overlay_claims", "overlay_services"] {
            tx.execute(&format!("DELETE FROM {table} WHERE vni = ?1"), [vni.get()])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every claimed address of a network.
    pub fn overlay_claims(&self, vni: Vni) -> Result<Vec<Claim>, StoreError> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT ip, owner, agent FROM overlay_claims WHERE vni = ?1 ORDER BY ip")?;
        let rows = st
            .query_map([vni.get()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(a, owner, agent)| {
                Ok(Claim {
                    ip: ip(&a)?,
                    owner: Owner::parse(&owner).ok_or_else(|| corrupt("owner", &owner))?,
                    agent,
                })
            })
            .collect()
    }

    /// Holds `ip` in a network for `owner` of `agent`; false when the address or the owner is
    /// taken already.
    pub fn claim_overlay(
        &self,
        vni: Vni,
        ip: Ipv4Addr,
        owner: &Owner,
        agent: &str,
    ) -> Result<bool, StoreError> {
        let done = self.conn().execute(
            "INSERT INTO overlay_claims (vni, ip, owner, agent) VALUES (?1, ?2, ?3, ?4)",
            params![vni.get(), ip.to_string(), owner.text(agent), agent],
        );
        match done {
            Ok(_) => Ok(true),
            Err(e) if unique_violation(&e).is_some() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lets an address go.
    pub fn release_overlay(&self, vni: Vni, ip: Ipv4Addr) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM overlay_claims WHERE vni = ?1 AND ip = ?2",
            params![vni.get(), ip.to_string()],
        )?;
        Ok(())
    }

    /// Every service of a network.
    pub fn overlay_services(&self, vni: Vni) -> Result<Vec<ServiceRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT name, mode, vip, endpoints FROM overlay_services WHERE vni = ?1 ORDER BY name",
        )?;
        let rows = st
            .query_map([vni.get()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, mode, vip, eps)| {
                Ok(ServiceRow {
                    name: Label::parse(&name).map_err(|_| corrupt("service name", &name))?,
                    mode: match mode.as_str() {
                        "vip" => ServiceMode::Vip,
                        "dnsrr" => ServiceMode::Dnsrr,
                        _ => return Err(corrupt("service mode", &mode)),
                    },
                    vip: vip.as_deref().map(ip).transpose()?,
                    endpoints: eps
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|e| Label::parse(e).map_err(|_| corrupt("service endpoint", e)))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect()
    }

    /// Stores a service (new or changed).
    pub fn put_overlay_service(&self, vni: Vni, s: &ServiceRow) -> Result<(), StoreError> {
        let eps: Vec<&str> = s.endpoints.iter().map(Label::as_str).collect();
        self.conn().execute(
            "INSERT INTO overlay_services (vni, name, mode, vip, endpoints) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (vni, name) DO UPDATE SET mode = excluded.mode, vip = excluded.vip, \
             endpoints = excluded.endpoints",
            params![
                vni.get(),
                s.name.as_str(),
                mode_text(s.mode),
                s.vip.map(|v| v.to_string()),
                eps.join(",")
            ],
        )?;
        Ok(())
    }

    /// Forgets a service and its virtual address.
    pub fn delete_overlay_service(&self, vni: Vni, name: &Label) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let vip: Option<Option<String>> = tx
            .query_row(
                "SELECT vip FROM overlay_services WHERE vni = ?1 AND name = ?2",
                params![vni.get(), name.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "DELETE FROM overlay_services WHERE vni = ?1 AND name = ?2",
            params![vni.get(), name.as_str()],
        )?;
        if let Some(Some(vip)) = vip {
            tx.execute(
                "DELETE FROM overlay_claims WHERE vni = ?1 AND ip = ?2",
                params![vni.get(), vip],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, vni: u32) -> NetDef {
        NetDef {
            name: Label::parse(name).expect("label"),
            vni: Vni::new(vni).expect("vni"),
            subnet: Subnet::new(Ipv4Addr::new(10, 214, 0, 0), 24).expect("subnet"),
            gateway: Ipv4Addr::new(10, 214, 0, 1),
            mtu: 1450,
        }
    }

    #[test]
    fn networks_claims_and_services_persist_and_stay_unique() {
        let s = Store::open_in_memory().expect("store");
        s.insert_overlay("acct", &def("backend", 4096), 1).expect("insert");
        assert!(matches!(
            s.insert_overlay("acct", &def("backend", 4097), 1),
            Err(StoreError::Taken(_))
        ));
        assert!(matches!(s.insert_overlay("other", &def("x", 4096), 1), Err(StoreError::Taken(_))));
        s.insert_overlay("other", &def("backend", 4098), 1).expect("same name, other account");
        let rows = s.overlay_networks().expect("list");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].def, def("backend", 4096));

        let vni = Vni::new(4096).expect("vni");
        let api = Owner::Endpoint(Label::parse("api").expect("label"));
        let a = Ipv4Addr::new(10, 214, 0, 2);
        assert!(s.claim_overlay(vni, a, &api, "host-a").expect("claim"));
        assert!(!s.claim_overlay(vni, a, &Owner::Host, "host-b").expect("same address"));
        assert!(
            !s.claim_overlay(vni, Ipv4Addr::new(10, 214, 0, 3), &api, "host-b").expect("same name")
        );
        assert!(
            s.claim_overlay(vni, Ipv4Addr::new(10, 214, 0, 254), &Owner::Host, "host-a")
                .expect("host")
        );
        let claims = s.overlay_claims(vni).expect("claims");
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0], Claim { ip: a, owner: api, agent: "host-a".into() });

        let svc = ServiceRow {
            name: Label::parse("web").expect("label"),
            mode: ServiceMode::Vip,
            vip: Some(Ipv4Addr::new(10, 214, 0, 9)),
            endpoints: vec![Label::parse("api").expect("label")],
        };
        let web = Owner::Service(svc.name.clone());
        assert!(s.claim_overlay(vni, Ipv4Addr::new(10, 214, 0, 9), &web, "").expect("vip"));
        s.put_overlay_service(vni, &svc).expect("service");
        assert_eq!(s.overlay_services(vni).expect("services"), vec![svc.clone()]);
        s.delete_overlay_service(vni, &svc.name).expect("delete service");
        assert!(s.overlay_services(vni).expect("services").is_empty());
        assert_eq!(s.overlay_claims(vni).expect("claims").len(), 2, "the vip was released");

        s.delete_overlay(vni).expect("delete");
        assert_eq!(s.overlay_networks().expect("list").len(), 1);
        assert!(s.overlay_claims(vni).expect("claims").is_empty());
    }
}

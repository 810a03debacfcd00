//! The networks' desired state in SQLite (`CONFIG_DIR/networks.db`).
//!
//! Every object is a JSON document keyed by its names. Addresses have their own table with a
//! primary key per (network, address), so no address is ever handed out twice, across restarts
//! too. Writes that belong together go in one transaction.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::model::{Endpoint, NetError, Network, Port, Service};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS networks (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (network TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
    PRIMARY KEY (network, name));
CREATE TABLE IF NOT EXISTS addresses (network TEXT NOT NULL, ip TEXT NOT NULL, owner TEXT NOT NULL,
    PRIMARY KEY (network, ip));
CREATE TABLE IF NOT EXISTS ports (proto TEXT NOT NULL, host_port INTEGER NOT NULL, host_ip TEXT NOT NULL,
    network TEXT NOT NULL, spec TEXT NOT NULL, PRIMARY KEY (proto, host_port, host_ip));
CREATE TABLE IF NOT EXISTS services (network TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL,
    PRIMARY KEY (network, name));
CREATE TABLE IF NOT EXISTS cursors (network TEXT PRIMARY KEY, last TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (kind TEXT NOT NULL, key TEXT NOT NULL, spec TEXT NOT NULL,
    PRIMARY KEY (kind, key));
";

/// The state database.
#[derive(Debug)]
pub struct Store {
    db: Mutex<Connection>,
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(s: &str) -> Result<T, NetError> {
    serde_json::from_str(s)
        .map_err(|e| NetError::System(format!("state database: bad record: {e}")))
}

/// Who holds an address: an endpoint or a service's virtual address.
pub fn owner_endpoint(name: &str) -> String {
    format!("endpoint:{name}")
}

/// See [`owner_endpoint`].
pub fn owner_service(name: &str) -> String {
    format!("service:{name}")
}

impl Store {
    /// Opens (creating) the database at `path`, its owner's alone: the directory 0700, the file
    /// created 0600 before SQLite opens it (SQLite gives its `-wal` and `-shm` files the same
    /// mode), wider modes found tightened with a WARN.
    pub fn open(path: &Path) -> Result<Self, NetError> {
        use warren_server::util;
        let private = |p: &Path, r: std::io::Result<()>| {
            r.map_err(|e| NetError::System(format!("cannot make {} private: {e}", p.display())))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private(dir, util::private_dir(dir))?;
        }
        private(path, util::create_private_file(path))?;
        for suffix in ["-wal", "-shm"] {
            let mut journal = path.as_os_str().to_owned();
            journal.push(suffix);
            let journal = Path::new(&journal);
            private(journal, util::check_private_file(journal))?;
        }
        let db = Connection::open(path)?;
        db.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")?;
        db.execute_batch(SCHEMA)?;
        Ok(Self { db: Mutex::new(db) })
    }

    /// An in-memory database (tests).
    pub fn memory() -> Result<Self, NetError> {
        let db = Connection::open_in_memory()?;
        db.execute_batch(SCHEMA)?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let mut db = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut db)
    }

    fn all<T: DeserializeOwned>(&self, sql: &str, arg: Option<&str>) -> Result<Vec<T>, NetError> {
        self.with(|db| {
            let mut st = db.prepare(sql)?;
            let rows: Vec<String> = match arg {
                Some(a) => st.query_map([a], |r| r.get(0))?.collect::<Result<_, _>>()?,
                None => st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?,
            };
            rows.iter().map(|s| parse(s)).collect()
        })
    }

    /// Every network, by name.
    pub fn networks(&self) -> Result<Vec<Network>, NetError> {
        self.all("SELECT spec FROM networks ORDER BY name", None)
    }

    /// One network.
    pub fn network(&self, name: &str) -> Result<Option<Network>, NetError> {
        self.with(|db| {
            let s: Option<String> = db
                .query_row("SELECT spec FROM networks WHERE name = ?1", [name], |r| r.get(0))
                .optional()?;
            s.map(|s| parse(&s)).transpose()
        })
    }

    /// Stores a new network; false when the name is taken.
    pub fn insert_network(&self, n: &Network) -> Result<bool, NetError> {
        self.with(|db| {
            Ok(db.execute(
                "INSERT OR IGNORE INTO networks (name, spec) VALUES (?1, ?2)",
                params![n.name, json(n)],
            )? == 1)
        })
    }

    /// Stores a changed network.
    pub fn put_network(&self, n: &Network) -> Result<(), NetError> {
        self.with(|db| {
            db.execute("UPDATE networks SET spec = ?2 WHERE name = ?1", params![n.name, json(n)])?;
            Ok(())
        })
    }

    /// Forgets a network and everything in it.
    pub fn delete_network(&self, name: &str) -> Result<(), NetError> {
        self.with(|db| {
            let tx = db.transaction()?;
            for table in
                ["networks WHERE name", "endpoints WHERE network", "addresses WHERE network"]
                    .iter()
                    .chain(
                        ["ports WHERE network", "services WHERE network", "cursors WHERE network"]
                            .iter(),
                    )
            {
                tx.execute(&format!("DELETE FROM {table} = ?1"), [name])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Every endpoint of a network (or of all of them), by name.
    pub fn endpoints(&self, network: Option<&str>) -> Result<Vec<Endpoint>, NetError> {
        match network {
            Some(n) => {
                self.all("SELECT spec FROM endpoints WHERE network = ?1 ORDER BY name", Some(n))
            }
            None => self.all("SELECT spec FROM endpoints ORDER BY network, name", None),
        }
    }

    /// Every address held in a network.
    pub fn addresses(&self, network: &str) -> Result<Vec<(Ipv4Addr, String)>, NetError> {
        self.with(|db| {
            let mut st = db.prepare("SELECT ip, owner FROM addresses WHERE network = ?1")?;
            let rows = st
                .query_map([network], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.into_iter().filter_map(|(ip, o)| Some((ip.parse().ok()?, o))).collect())
        })
    }

    /// Holds `ip` in `network` for `owner`; false when someone holds it already.
    pub fn claim_address(
        &self,
        network: &str,
        ip: Ipv4Addr,
        owner: &str,
    ) -> Result<bool, NetError> {
        self.with(|db| {
            let tx = db.transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO addresses (network, ip, owner) VALUES (?1, ?2, ?3)",
                params![network, ip.to_string(), owner],
            )?;
            if n == 1 {
                tx.execute(
                    "INSERT INTO cursors (network, last) VALUES (?1, ?2)
                     ON CONFLICT(network) DO UPDATE SET last = excluded.last",
                    params![network, ip.to_string()],
                )?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }

    /// Lets an address go.
    pub fn release_address(&self, network: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        self.with(|db| {
            db.execute(
                "DELETE FROM addresses WHERE network = ?1 AND ip = ?2",
                params![network, ip.to_string()],
            )?;
            Ok(())
        })
    }

    /// The last address handed out in a network (allocation goes on after it).
    pub fn cursor(&self, network: &str) -> Result<Option<Ipv4Addr>, NetError> {
        self.with(|db| {
            let s: Option<String> = db
                .query_row("SELECT last FROM cursors WHERE network = ?1", [network], |r| r.get(0))
                .optional()?;
            Ok(s.and_then(|s| s.parse().ok()))
        })
    }

    /// Stores an endpoint (new or changed).
    pub fn put_endpoint(&self, e: &Endpoint) -> Result<(), NetError> {
        self.with(|db| {
            db.execute(
                "INSERT INTO endpoints (network, name, spec) VALUES (?1, ?2, ?3)
                 ON CONFLICT(network, name) DO UPDATE SET spec = excluded.spec",
                params![e.network, e.name, json(e)],
            )?;
            Ok(())
        })
    }

    /// Forgets an endpoint, its address and its ports.
    pub fn delete_endpoint(&self, e: &Endpoint) -> Result<(), NetError> {
        let ports = self.ports(Some(&e.network))?;
        self.with(|db| {
            let tx = db.transaction()?;
            tx.execute(
                "DELETE FROM endpoints WHERE network = ?1 AND name = ?2",
                params![e.network, e.name],
            )?;
            // Only the endpoint's own claim: an address Docker's IPAM handed out stays held
            // until Docker releases it.
            tx.execute(
                "DELETE FROM addresses WHERE network = ?1 AND ip = ?2 AND owner = ?3",
                params![e.network, e.ip.to_string(), owner_endpoint(&e.name)],
            )?;
            for p in ports.iter().filter(|p| p.endpoint == e.name) {
                tx.execute(
                    "DELETE FROM ports WHERE proto = ?1 AND host_port = ?2 AND host_ip = ?3",
                    params![p.proto.as_str(), p.host_port, host_ip_key(p)],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Every published port (of one network).
    pub fn ports(&self, network: Option<&str>) -> Result<Vec<Port>, NetError> {
        match network {
            Some(n) => self.all(
                "SELECT spec FROM ports WHERE network = ?1 ORDER BY proto, host_port, host_ip",
                Some(n),
            ),
            None => self.all("SELECT spec FROM ports ORDER BY proto, host_port, host_ip", None),
        }
    }

    /// Stores a published port; false when the same (proto, port, host address) is taken.
    pub fn insert_port(&self, p: &Port) -> Result<bool, NetError> {
        self.with(|db| {
            Ok(db.execute(
                "INSERT OR IGNORE INTO ports (proto, host_port, host_ip, network, spec)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![p.proto.as_str(), p.host_port, host_ip_key(p), p.network, json(p)],
            )? == 1)
        })
    }

    /// Forgets a published port.
    pub fn delete_port(&self, p: &Port) -> Result<(), NetError> {
        self.with(|db| {
            db.execute(
                "DELETE FROM ports WHERE proto = ?1 AND host_port = ?2 AND host_ip = ?3",
                params![p.proto.as_str(), p.host_port, host_ip_key(p)],
            )?;
            Ok(())
        })
    }

    /// Every service (of one network).
    pub fn services(&self, network: Option<&str>) -> Result<Vec<Service>, NetError> {
        match network {
            Some(n) => {
                self.all("SELECT spec FROM services WHERE network = ?1 ORDER BY name", Some(n))
            }
            None => self.all("SELECT spec FROM services ORDER BY network, name", None),
        }
    }

    /// Stores a new service (and its virtual address, claimed earlier); false when taken.
    pub fn insert_service(&self, s: &Service) -> Result<bool, NetError> {
        self.with(|db| {
            Ok(db.execute(
                "INSERT OR IGNORE INTO services (network, name, spec) VALUES (?1, ?2, ?3)",
                params![s.network, s.name, json(s)],
            )? == 1)
        })
    }

    /// Stores a changed service.
    pub fn update_service(&self, s: &Service) -> Result<(), NetError> {
        self.with(|db| {
            db.execute(
                "UPDATE services SET spec = ?3 WHERE network = ?1 AND name = ?2",
                params![s.network, s.name, json(s)],
            )?;
            Ok(())
        })
    }

    /// Forgets a service and its virtual address.
    pub fn delete_service(&self, s: &Service) -> Result<(), NetError> {
        self.with(|db| {
            let tx = db.transaction()?;
            tx.execute(
                "DELETE FROM services WHERE network = ?1 AND name = ?2",
                params![s.network, s.name],
            )?;
            if let Some(vip) = s.vip {
                tx.execute(
                    "DELETE FROM addresses WHERE network = ?1 AND ip = ?2",
                    params![s.network, vip.to_string()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}

/// Documents of other parts of the agent (the Docker plugin's pools, networks and endpoints),
/// by kind and key.
impl Store {
    /// Stores (replacing) one document.
    pub fn put_doc<T: Serialize>(&self, kind: &str, key: &str, doc: &T) -> Result<(), NetError> {
        self.with(|db| {
            db.execute(
                "INSERT INTO documents (kind, key, spec) VALUES (?1, ?2, ?3)
                 ON CONFLICT(kind, key) DO UPDATE SET spec = excluded.spec",
                params![kind, key, json(doc)],
            )?;
            Ok(())
        })
    }

    /// One document.
    pub fn doc<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Result<Option<T>, NetError> {
        self.with(|db| {
            let s: Option<String> = db
                .query_row(
                    "SELECT spec FROM documents WHERE kind = ?1 AND key = ?2",
                    [kind, key],
                    |r| r.get(0),
                )
                .optional()?;
            s.map(|s| parse(&s)).transpose()
        })
    }

    /// Every document of a kind, by key.
    pub fn docs<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, NetError> {
        self.all("SELECT spec FROM documents WHERE kind = ?1 ORDER BY key", Some(kind))
    }

    /// Forgets one document; false when there was none.
    pub fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, NetError> {
        self.with(|db| {
            Ok(db.execute("DELETE FROM documents WHERE kind = ?1 AND key = ?2", [kind, key])? == 1)
        })
    }
}

fn host_ip_key(p: &Port) -> String {
    p.host_ip.map(|i| i.to_string()).unwrap_or_default()
}

//! The relay's embedded SQLite store: state that must outlive a restart.
//!
//! That is the agent tokens managed through the API, reservations, forwards, traffic history,
//! tunnels' leases (`crate::leases`), and overlay networks with their address claims and
//! services (`crate::overlay::store`). The store keeps only a token's SHA-256 digest, never the
//! secret itself, so a leaked database file does not leak usable tokens.
//!
//! The schema is versioned: `MIGRATIONS` lists SQL batches in order, and the database's
//! `PRAGMA user_version` records how many of them have run. [`Store::open`] runs the missing
//! ones, each in its own transaction, and refuses a database written by a newer build rather
//! than guess at a schema it does not know.
//!
//! Not here: connection pooling (the relay's writes are rare and small, so one connection
//! behind a mutex is enough) and async wrappers (callers on a runtime use `spawn_blocking`).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

/// The schema, one SQL batch per version: after batch `i` has run, `user_version` is `i + 1`.
///
/// Append only: never edit or reorder a batch that has shipped, since databases in the field
/// have already run it. Later migrations append here (reservations, forwards and traffic
/// history come with later work).
const MIGRATIONS: &[&str] = &[
    // 1: API-managed agent tokens.
    "CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        digest BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER,
        max_tunnels INTEGER,
        max_connections INTEGER
    );",
    // 2: names and ports kept for a token, and traffic history per tunnel.
    "CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        subdomain TEXT UNIQUE,
        port INTEGER,
        proto TEXT,
        created_at INTEGER NOT NULL,
        UNIQUE (port, proto),
        CHECK ((subdomain IS NULL) <> (port IS NULL))
    );
    CREATE TABLE traffic (
        tunnel TEXT NOT NULL,
        at INTEGER NOT NULL,
        bytes_in INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        PRIMARY KEY (tunnel, at)
    );",
    // 3: forwards: tunnels the relay opens on an agent's behalf whenever it connects.
    "CREATE TABLE forwards (
        id TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        agent TEXT NOT NULL,
        proto TEXT NOT NULL,
        target TEXT NOT NULL,
        subdomain TEXT,
        remote_port INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX forwards_by_agent ON forwards (token, agent);",
    // 4: overlay networks, their global address claims and their services.
    "CREATE TABLE overlay_networks (
        account TEXT NOT NULL,
        name TEXT NOT NULL,
        vni INTEGER NOT NULL UNIQUE,
        subnet TEXT NOT NULL,
        gateway TEXT NOT NULL,
        mtu INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (account, name)
    );
    CREATE TABLE overlay_claims (
        vni INTEGER NOT NULL,
        ip TEXT NOT NULL,
        owner TEXT NOT NULL,
        agent TEXT NOT NULL,
        PRIMARY KEY (vni, ip),
        UNIQUE (vni, owner)
    );
    CREATE TABLE overlay_services (
        vni INTEGER NOT NULL,
        name TEXT NOT NULL,
        mode TEXT NOT NULL,
        vip TEXT,
        endpoints TEXT NOT NULL,
        PRIMARY KEY (vni, name)
    );",
    // 5: leases (`crate::leases`): which owner holds which subdomain or pool port, so a relay
    // restart hands them back to their owners rather than to whoever asks first.
    "CREATE TABLE leases (
        token TEXT NOT NULL,
        agent TEXT NOT NULL,
        name TEXT NOT NULL,
        proto TEXT NOT NULL,
        subdomain TEXT UNIQUE,
        port INTEGER,
        offline_until INTEGER,
        PRIMARY KEY (token, agent, name),
        UNIQUE (port, proto),
        CHECK ((subdomain IS NULL) <> (port IS NULL))
    );",
];

/// How long a statement waits for another process's lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many random characters follow `tok_` in a token id.
const TOKEN_ID_LEN: usize = 12;

/// How many times `create_token` draws a new id after an id collision (astronomically rare).
const ID_ATTEMPTS: usize = 4;

/// The columns of `tokens`, in the order [`token_from_row`] reads them.
const TOKEN_COLUMNS: &str =
    "id, name, digest, created_at, revoked_at, max_tunnels, max_connections";

/// Limits attached to a token; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenLimits {
    /// How many tunnels agents using this token may hold at once.
    pub max_tunnels: Option<u32>,
    /// How many visitor connections this token's tunnels may carry at once.
    pub max_connections: Option<u32>,
}

/// What a reservation keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// A subdomain, for HTTP and TLS tunnels.
    Subdomain(String),
    /// A port of the pool; `udp` false for TCP.
    Port {
        /// The port.
        port: u16,
        /// UDP rather than TCP.
        udp: bool,
    },
}

/// A subdomain or port kept for one token: no other token's tunnel gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// `res_` and 12 random characters.
    pub id: String,
    /// The owner: the 16 hex digits that identify a token (its digest's start).
    pub token: String,
    /// What is kept.
    pub what: Reserved,
    /// Unix seconds.
    pub created_at: i64,
}

/// Bytes through one tunnel in one sampling interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficPoint {
    /// Unix seconds at the start of the interval.
    pub at: i64,
    /// Visitors to agent.
    pub bytes_in: u64,
    /// Agent to visitors.
    pub bytes_out: u64,
}

/// A tunnel the relay opens on an agent's behalf, stored so it is opened again whenever that
/// agent connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRecord {
    /// `fwd_` and 12 random characters.
    pub id: String,
    /// The agent's token: 16 hex digits.
    pub token: String,
    /// The agent's identity.
    pub agent: String,
    /// `http`, `tcp`, `tls` or `udp`.
    pub proto: String,
    /// `PORT` or `HOST:PORT` on the agent's side.
    pub target: String,
    /// Subdomain wanted (http, tls).
    pub subdomain: Option<String>,
    /// Port wanted (tcp, udp).
    pub remote_port: Option<u16>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A token as stored: never the secret itself, only its SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Stable public identifier: `tok_` followed by 12 characters from `a-z0-9`.
    pub id: String,
    /// Human-chosen name, unique among all tokens, revoked ones included.
    pub name: String,
    /// SHA-256 of the secret the agent presents.
    pub digest: [u8; 32],
    /// Creation time, in seconds since the Unix epoch.
    pub created_at: i64,
    /// Revocation time, in seconds since the Unix epoch; `None` while the token is valid.
    pub revoked_at: Option<i64>,
    /// What agents using this token may do.
    pub limits: TokenLimits,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another token already has this name (revoked tokens keep theirs).
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    /// Another reservation keeps this subdomain or port.
    #[error("{0} is reserved already")]
    Taken(String),
    /// The token holds as many reservations as it may.
    #[error("the token holds {held} reservation(s) already, as many as it may")]
    TooMany {
        /// How many it holds.
        held: u32,
    },
    /// The database was migrated by a newer build; running on would risk misreading it.
    #[error(
        "database schema version {found} was created by a newer warren-server \
         (this build knows up to {known}); upgrade"
    )]
    NewerSchema {
        /// The database's `user_version`.
        found: u32,
        /// How many migrations this build has.
        known: u32,
    },
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file could not be created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The database holds a value this build cannot have written.
    #[error("corrupt database: {0}")]
    Corrupt(String),
    /// Another relay runs on the same data directory: two relays on one database would each
    /// think they own its leases.
    #[error(
        "{} is in use by another warren-server{}: stop it or use another --data dir",
        dir.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The other relay's process id, as it wrote it into the lock file.
        pid: Option<u32>,
    },
    /// Another process holds a lock on the database file itself (SQLite's busy error at open).
    #[error(
        "{} is locked by another process ({sqlite}): stop whatever holds it open (an sqlite3 \
         shell, a backup tool, another relay) or use another --data dir",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
        /// SQLite's error (in the message, not a source: it says nothing more).
        sqlite: rusqlite::Error,
    },
}

/// The relay's database: one SQLite connection behind a mutex.
///
/// Every method takes the lock for its whole duration, so calls from one process are
/// serialised. A file database is also held under an exclusive advisory lock (`flock` on
/// `DB.lock`, which records the holder's pid) for the store's lifetime, so a second relay on
/// the same data dir refuses to start instead of sharing leases it believes it owns alone.
pub struct Store {
    conn: Mutex<Connection>,
    /// `None` for an in-memory database.
    path: Option<PathBuf>,
    /// The advisory lock on a file database, released on drop.
    _lock: Option<Flock<File>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path: &dyn fmt::Debug = match &self.path {
            Some(p) => p,
            None => &":memory:",
        };
        f.debug_struct("Store").field("path", path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it with mode 0600 if absent) the database at `path` and brings its
    /// schema up to date.
    ///
    /// Fails with [`StoreError::NewerSchema`] if the database has run more migrations than
    /// this build knows. The parent directory must exist.
    ///
    /// Fails with [`StoreError::InUse`] while another store (another relay) holds the database,
    /// and with [`StoreError::Locked`] when another process keeps SQLite's lock on it for
    /// longer than the busy timeout.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let lock = lock_exclusive(path)?;
        create_private(path)?;
        let opened = (|| {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // Refuse a newer database before changing anything about it, the journal mode
            // included.
            check_version(&conn)?;
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), journal_mode = %mode, "database is not in WAL mode");
            }
            Self::finish(conn, Some(path.to_owned()), Some(lock))
        })();
        opened.map_err(|e| match e {
            StoreError::Sqlite(sqlite) if is_busy(&sqlite) => {
                StoreError::Locked { path: path.to_owned(), sqlite }
            }
            e => e,
        })
    }

    /// A fresh, empty database that lives in memory only and vanishes on drop: for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::finish(Connection::open_in_memory()?, None, None)
    }

    /// Settings common to both kinds of database, then the migrations.
    fn finish(
        mut conn: Connection,
        path: Option<PathBuf>,
        lock: Option<Flock<File>>,
    ) -> Result<Self, StoreError> {
        // A no-op inside a transaction, so set before migrating.
        conn.pragma_update(None, "foreign_keys", true)?;
        // Always takes SQLite's write lock once (even with nothing to migrate), so a database
        // another process keeps locked is refused here rather than on the first lease write.
        migrate(&mut conn)?;
        Ok(Self { conn: Mutex::new(conn), path, _lock: lock })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many migrations the database has run; after `open`, all that this build knows.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        user_version(&self.conn())
    }

    /// New token record with a generated id `tok_` + 12 random `[a-z0-9]`;
    /// [`StoreError::NameTaken`] if the name exists (revoked or not).
    ///
    /// Two tokens with the same digest are refused with a [`StoreError::Sqlite`] constraint
    /// error: callers generate secrets randomly, so that only happens by mistake.
    pub fn create_token(
        &self,
        name: &str,
        digest: [u8; 32],
        limits: TokenLimits,
        now: i64,
    ) -> Result<TokenRecord, StoreError> {
        let conn = self.conn();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = format!("tok_{}", crate::util::random_alnum(TOKEN_ID_LEN));
            let inserted = conn.execute(
                "INSERT INTO tokens (id, name, digest, created_at, revoked_at, max_tunnels, \
                 max_connections) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)",
                params![id, name, &digest[..], now, limits.max_tunnels, limits.max_connections],
            );
            match inserted {
                Ok(_) => {
                    return Ok(TokenRecord {
                        id,
                        name: name.to_owned(),
                        digest,
                        created_at: now,
                        revoked_at: None,
                        limits,
                    });
                }
                Err(e) => match unique_violation(&e) {
                    Some("tokens.name") => return Err(StoreError::NameTaken(name.to_owned())),
                    Some("tokens.id") if attempt < ID_ATTEMPTS => continue,
                    _ => return Err(e.into()),
                },
            }
        }
    }

    /// Keeps `what` for `token`; `Taken` when another reservation has it, `TooMany` when the
    /// token holds `limit` reservations already (counted in the same transaction, so concurrent
    /// calls cannot go past it).
    pub fn create_reservation(
        &self,
        token: &str,
        what: Reserved,
        now: i64,
        limit: Option<u32>,
    ) -> Result<Reservation, StoreError> {
        let id = format!("res_{}", crate::util::random_alnum(TOKEN_ID_LEN));
        let (sub, port, proto) = match &what {
            Reserved::Subdomain(s) => (Some(s.clone()), None, None),
            Reserved::Port { port, udp } => {
                (None, Some(i64::from(*port)), Some(if *udp { "udp" } else { "tcp" }))
            }
        };
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(limit) = limit {
            let held: u32 = tx.query_row(
                "SELECT COUNT(*) FROM reservations WHERE token = ?1",
                params![token],
                |row| row.get(0),
            )?;
            if held >= limit {
                return Err(StoreError::TooMany { held });
            }
        }
        let inserted = tx.execute(
            "INSERT INTO reservations (id, token, subdomain, port, proto, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, token, sub, port, proto, now],
        );
        match inserted.and_then(|_| tx.commit()) {
            Ok(()) => Ok(Reservation { id, token: token.to_owned(), what, created_at: now }),
            Err(e) if unique_violation(&e).is_some() => Err(StoreError::Taken(match what {
                Reserved::Subdomain(s) => format!("subdomain {s}"),
                Reserved::Port { port, udp } => {
                    format!("{} port {port}", if udp { "udp" } else { "tcp" })
                }
            })),
            Err(e) => Err(e.into()),
        }
    }

    /// Every reservation, oldest first.
    pub fn list_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, token, subdomain, port, proto, created_at FROM reservations \
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |row| {
            let id: String = row.get(0)?;
            let token: String = row.get(1)?;
            let sub: Option<String> = row.get(2)?;
            let port: Option<i64> = row.get(3)?;
            let proto: Option<String> = row.get(4)?;
            let created_at: i64 = row.get(5)?;
            Ok((id, token, sub, port, proto, created_at))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, token, sub, port, proto, created_at) = row?;
            let what = match (sub, port) {
                (Some(s), None) => Reserved::Subdomain(s),
                (None, Some(p)) => Reserved::Port {
                    port: u16::try_from(p).map_err(|_| {
                        StoreError::Corrupt(format!("reservation {id}: port {p} out of range"))
                    })?,
                    udp: proto.as_deref() == Some("udp"),
                },
                _ => return Err(StoreError::Corrupt(format!("reservation {id}: neither or both"))),
            };
            out.push(Reservation { id, token, what, created_at });
        }
        Ok(out)
    }

    /// Removes a reservation; `None` if there was none with that id.
    pub fn delete_reservation(&self, id: &str) -> Result<Option<Reservation>, StoreError> {
        let found = self.list_reservations()?.into_iter().find(|r| r.id == id);
        if found.is_some() {
            self.conn().execute("DELETE FROM reservations WHERE id = ?1", params![id])?;
        }
        Ok(found)
    }

    /// Stores a forward (its id is generated).
    pub fn create_forward(&self, mut f: ForwardRecord) -> Result<ForwardRecord, StoreError> {
        f.id = format!("fwd_{}", crate::util::random_alnum(TOKEN_ID_LEN));
        self.conn().execute(
            "INSERT INTO forwards (id, token, agent, proto, target, subdomain, remote_port, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                f.id,
                f.token,
                f.agent,
                f.proto,
                f.target,
                f.subdomain,
                f.remote_port,
                f.created_at
            ],
        )?;
        Ok(f)
    }

    /// Every forward, oldest first.
    pub fn list_forwards(&self) -> Result<Vec<ForwardRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, token, agent, proto, target, subdomain, remote_port, created_at \
             FROM forwards ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |row| {
            let port: Option<i64> = row.get(6)?;
            Ok(ForwardRecord {
                id: row.get(0)?,
                token: row.get(1)?,
                agent: row.get(2)?,
                proto: row.get(3)?,
                target: row.get(4)?,
                subdomain: row.get(5)?,
                remote_port: port.and_then(|p| u16::try_from(p).ok()),
                created_at: row.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a forward; `None` if there was none with that id.
    pub fn delete_forward(&self, id: &str) -> Result<Option<ForwardRecord>, StoreError> {
        let found = self.list_forwards()?.into_iter().find(|f| f.id == id);
        if found.is_some() {
            self.conn().execute("DELETE FROM forwards WHERE id = ?1", params![id])?;
        }
        Ok(found)
    }

    /// Adds bytes to a tunnel's traffic at interval start `at`.
    pub fn add_traffic(
        &self,
        tunnel: &str,
        at: i64,
        bytes_in: u64,
        bytes_out: u64,
    ) -> Result<(), StoreError> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.conn().execute(
            "INSERT INTO traffic (tunnel, at, bytes_in, bytes_out) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (tunnel, at) DO UPDATE SET bytes_in = bytes_in + excluded.bytes_in, \
             bytes_out = bytes_out + excluded.bytes_out",
            params![tunnel, at, clamp(bytes_in), clamp(bytes_out)],
        )?;
        Ok(())
    }

    /// Traffic points since `since` (unix seconds), by tunnel, each series in time order.
    pub fn traffic(&self, since: i64) -> Result<Vec<(String, TrafficPoint)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT tunnel, at, bytes_in, bytes_out FROM traffic WHERE at >= ?1 \
             ORDER BY tunnel, at",
        )?;
        let rows = stmt.query_map(params![since], |row| {
            let tunnel: String = row.get(0)?;
            let at: i64 = row.get(1)?;
            let bytes_in: i64 = row.get(2)?;
            let bytes_out: i64 = row.get(3)?;
            Ok((
                tunnel,
                TrafficPoint {
                    at,
                    bytes_in: u64::try_from(bytes_in).unwrap_or(0),
                    bytes_out: u64::try_from(bytes_out).unwrap_or(0),
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets traffic older than `before` (unix seconds); returns how many points.
    pub fn prune_traffic(&self, before: i64) -> Result<usize, StoreError> {
        Ok(self.conn().execute("DELETE FROM traffic WHERE at < ?1", params![before])?)
    }

    /// All tokens, revoked ones included, oldest first (ties broken by id).
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], token_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// The token with this id, if any.
    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        token_where(&self.conn(), "id = ?1", &id)
    }

    /// The token whose secret has this SHA-256 digest, if any, revoked or not: the caller
    /// decides what a revoked token means.
    pub fn token_by_digest(&self, digest: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        token_where(&self.conn(), "digest = ?1", &&digest[..])
    }

    /// Marks the token revoked at `now` (keeps the first revocation time if already revoked);
    /// `None` if no such id.
    pub fn revoke_token(&self, id: &str, now: i64) -> Result<Option<TokenRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id, now],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        let record = token_where(&tx, "id = ?1", &id)?;
        tx.commit()?;
        Ok(record)
    }
}

/// Creates `path` with mode 0600 if it does not exist, so SQLite (which would use 0644 less the
/// umask) never creates it world-readable. SQLite gives the `-wal` and `-shm` files the same
/// mode as the database.
/// Takes the exclusive advisory lock of the database at `path` (on `PATH.lock`, created 0600)
/// and writes this process's id into it; [`StoreError::InUse`] with the holder's pid when
/// another process has it.
fn lock_exclusive(path: &Path) -> Result<Flock<File>, StoreError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let io = |source| StoreError::Io { path: lock_path.clone(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
            let dir = path.parent().unwrap_or(path).to_owned();
            return Err(StoreError::InUse { dir, pid });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    locked.set_len(0).map_err(io)?;
    locked.rewind().map_err(io)?;
    writeln!(locked, "{}", std::process::id()).map_err(io)?;
    Ok(locked)
}

/// Whether SQLite gave up waiting for another connection's lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Io { path: path.to_owned(), source }),
    }
}

/// How many migrations this build has.
fn known_version() -> u32 {
    // A list of SQL literals in the source: never near u32::MAX.
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The database's `user_version`, checked to be a count this store could have written.
fn user_version(conn: &Connection) -> Result<u32, StoreError> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative user_version {v}")))
}

/// Fails if the database has run more migrations than this build knows.
fn check_version(conn: &Connection) -> Result<u32, StoreError> {
    let found = user_version(conn)?;
    let known = known_version();
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    Ok(found)
}

/// Runs the migrations the database lacks, each in its own transaction together with the
/// `user_version` bump that records it.
///
/// The version is re-read inside each write transaction, so two processes opening the same
/// file at once do not both run a migration.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = check_version(&tx)?;
        let Some(sql) = MIGRATIONS.get(version as usize) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        let next = version + 1;
        tx.pragma_update(None, "user_version", next)?;
        tx.commit()?;
        tracing::info!(version = next, "applied database migration");
    }
}

/// If `e` is a UNIQUE or PRIMARY KEY constraint failure, the `table.column` it names.
pub(crate) fn unique_violation(e: &rusqlite::Error) -> Option<&str> {
    match e {
        rusqlite::Error::SqliteFailure(err, Some(msg))
            if err.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            msg.strip_prefix("UNIQUE constraint failed: ")
        }
        _ => None,
    }
}

/// The one token matching `condition` (on a unique column), with `arg` bound to `?1`.
fn token_where(
    conn: &Connection,
    condition: &str,
    arg: &dyn rusqlite::ToSql,
) -> Result<Option<TokenRecord>, StoreError> {
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE {condition}");
    let row = conn.query_row(&sql, [arg], token_from_row).optional()?;
    row.transpose()
}

/// Reads a row selected with [`TOKEN_COLUMNS`]. SQLite errors go in the outer result, values
/// this store cannot have written in the inner one.
fn token_from_row(row: &Row<'_>) -> rusqlite::Result<Result<TokenRecord, StoreError>> {
    let id: String = row.get(0)?;
    let name: String = row.get(1)?;
    let digest: Vec<u8> = row.get(2)?;
    let created_at: i64 = row.get(3)?;
    let revoked_at: Option<i64> = row.get(4)?;
    let max_tunnels: Option<i64> = row.get(5)?;
    let max_connections: Option<i64> = row.get(6)?;
    Ok((|| {
        let digest = <[u8; 32]>::try_from(digest.as_slice()).map_err(|_| {
            StoreError::Corrupt(format!("token {id}: digest is {} bytes, not 32", digest.len()))
        })?;
        let limit = |column: &str, v: Option<i64>| {
            v.map(|n| {
                u32::try_from(n).map_err(|_| {
                    StoreError::Corrupt(format!("token {id}: {column} {n} is out of range"))
                })
            })
            .transpose()
        };
        let limits = TokenLimits {
            max_tunnels: limit("max_tunnels", max_tunnels)?,
            max_connections: limit("max_connections", max_connections)?,
        };
        Ok(TokenRecord { id: id.clone(), name, digest, created_at, revoked_at, limits })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicU32, Ordering};

    /// A database path under the temp dir, unique to this test; removed (with its WAL files)
    /// on drop.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!(
                "warren-store-{tag}-{}-{}-{nanos}.db",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            Self(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm", "-journal", ".lock"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn digest(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn migrations_run_once() {
        let db = TempDb::new("migrate");
        let store = Store::open(&db.0).unwrap();
        assert_eq!(store.schema_version().unwrap() as usize, MIGRATIONS.len());
        drop(store);
        // Reopening runs nothing again (re-running migration 1 would fail: the table exists).
        let store = Store::open(&db.0).unwrap();
        assert_eq!(store.schema_version().unwrap() as usize, MIGRATIONS.len());
        let mode: String =
            store.conn().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = store.conn().pragma_query_value(None, "foreign_keys", |r| r.get(0)).unwrap();
        assert_eq!(fk, 1);

        let mem = Store::open_in_memory().unwrap();
        assert_eq!(mem.schema_version().unwrap() as usize, MIGRATIONS.len());
    }

    #[test]
    fn reopening_keeps_data() {
        let db = TempDb::new("reopen");
        let store = Store::open(&db.0).unwrap();
        let created = store.create_token("ci", digest(7), TokenLimits::default(), 100).unwrap();
        drop(store);

        let store = Store::open(&db.0).unwrap();
        assert_eq!(store.token(&created.id).unwrap(), Some(created.clone()));
        assert_eq!(store.token_by_digest(&digest(7)).unwrap(), Some(created));
        assert_eq!(store.token_by_digest(&digest(8)).unwrap(), None);
        assert_eq!(store.token("tok_nosuchtoken").unwrap(), None);
    }

    #[test]
    fn a_second_store_on_one_file_is_refused_until_the_first_closes() {
        let db = TempDb::new("in-use");
        let first = Store::open(&db.0).unwrap();
        let err = Store::open(&db.0).unwrap_err();
        let pid = std::process::id();
        assert!(matches!(err, StoreError::InUse { pid: Some(p), .. } if p == pid), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("in use by another warren-server (pid {pid})")), "{msg}");
        assert!(msg.contains("use another --data dir"), "{msg}");
        drop(first);
        Store::open(&db.0).expect("the lock goes with the store");
    }

    #[test]
    fn a_database_locked_by_another_connection_is_refused_clearly() {
        let db = TempDb::new("locked");
        drop(Store::open(&db.0).unwrap());
        let holder = Connection::open(&db.0).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let err = Store::open(&db.0).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("is locked by another process"), "{err}");
        holder.execute_batch("COMMIT").unwrap();
        Store::open(&db.0).expect("open once the lock is gone");
    }

    #[test]
    fn newer_schema_is_refused() {
        let db = TempDb::new("newer");
        drop(Store::open(&db.0).unwrap());
        let newer = known_version() + 1;
        {
            let conn = Connection::open(&db.0).unwrap();
            conn.pragma_update(None, "user_version", newer).unwrap();
        }
        let err = Store::open(&db.0).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, known } if found == newer && known == known_version()),
            "{err:?}"
        );
        assert!(err.to_string().contains("created by a newer warren-server"), "{err}");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[test]
    fn duplicate_name_is_taken() {
        let store = Store::open_in_memory().unwrap();
        let first = store.create_token("laptop", digest(1), TokenLimits::default(), 1).unwrap();
        let err = store.create_token("laptop", digest(2), TokenLimits::default(), 2).unwrap_err();
        assert!(matches!(&err, StoreError::NameTaken(n) if n == "laptop"), "{err:?}");
        // Revoked tokens keep their name.
        store.revoke_token(&first.id, 3).unwrap();
        let err = store.create_token("laptop", digest(3), TokenLimits::default(), 4).unwrap_err();
        assert!(matches!(&err, StoreError::NameTaken(n) if n == "laptop"), "{err:?}");
        // A duplicate digest is not a name clash.
        let err = store.create_token("other", digest(1), TokenLimits::default(), 5).unwrap_err();
        assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
        assert_eq!(store.list_tokens().unwrap().len(), 1);
    }

    #[test]
    fn token_ids_have_the_documented_shape() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_token("a", digest(1), TokenLimits::default(), 1).unwrap();
        let suffix = t.id.strip_prefix("tok_").unwrap();
        assert_eq!(suffix.len(), 12);
        assert!(suffix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{}", t.id);
    }

    #[test]
    fn revoke_sets_revoked_at_once() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_token("a", digest(1), TokenLimits::default(), 10).unwrap();
        assert_eq!(t.revoked_at, None);
        let revoked = store.revoke_token(&t.id, 20).unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(20));
        assert_eq!(revoked, TokenRecord { revoked_at: Some(20), ..t.clone() });
        let again = store.revoke_token(&t.id, 30).unwrap().unwrap();
        assert_eq!(again.revoked_at, Some(20));
        assert_eq!(store.token(&t.id).unwrap().unwrap().revoked_at, Some(20));
        assert_eq!(store.revoke_token("tok_nosuchtoken", 40).unwrap(), None);
    }

    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let db = TempDb::new("mode");
        let store = Store::open(&db.0).unwrap();
        store.create_token("a", digest(1), TokenLimits::default(), 1).unwrap();
        let mode = std::fs::metadata(&db.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(format!("{store:?}").contains(&db.0.display().to_string()), "{store:?}");
    }

    #[test]
    fn list_is_ordered_by_creation_then_id() {
        let store = Store::open_in_memory().unwrap();
        let late = store.create_token("late", digest(1), TokenLimits::default(), 300).unwrap();
        let early = store.create_token("early", digest(2), TokenLimits::default(), 100).unwrap();
        let tie_a = store.create_token("tie-a", digest(3), TokenLimits::default(), 200).unwrap();
        let tie_b = store.create_token("tie-b", digest(4), TokenLimits::default(), 200).unwrap();
        let mut ties = [tie_a, tie_b];
        ties.sort_by(|a, b| a.id.cmp(&b.id));
        let [first_tie, second_tie] = ties;
        assert_eq!(store.list_tokens().unwrap(), vec![early, first_tie, second_tie, late]);
    }

    #[test]
    fn limits_round_trip() {
        let store = Store::open_in_memory().unwrap();
        let cases = [
            TokenLimits::default(),
            TokenLimits { max_tunnels: Some(3), max_connections: None },
            TokenLimits { max_tunnels: None, max_connections: Some(250) },
            TokenLimits { max_tunnels: Some(0), max_connections: Some(u32::MAX) },
        ];
        for (i, limits) in cases.into_iter().enumerate() {
            let b = u8::try_from(i).unwrap();
            let t = store.create_token(&format!("t{i}"), digest(b), limits, 1).unwrap();
            assert_eq!(t.limits, limits);
            assert_eq!(store.token(&t.id).unwrap().unwrap().limits, limits);
        }
    }

    #[test]
    fn bad_values_are_corrupt_not_panics() {
        let store = Store::open_in_memory().unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO tokens (id, name, digest, created_at) VALUES ('tok_short', 's', ?1, 1)",
                [&[1u8; 31][..]],
            )
            .unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO tokens (id, name, digest, created_at, max_tunnels) \
                 VALUES ('tok_negative', 'n', ?1, 1, -1)",
                [&[2u8; 32][..]],
            )
            .unwrap();
        let err = store.token("tok_short").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let err = store.token("tok_negative").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let err = store.list_tokens().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }
}

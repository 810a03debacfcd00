//! The certificates of the public HTTPS listener, chosen per handshake by SNI.
//!
//! For a visitor's server name (lower-cased, trailing dot removed) the store answers, in order:
//! 1. a certificate from the certificate directory for exactly that name;
//! 2. a wildcard certificate from the directory, `*.rest` for `label.rest` (one label only);
//! 3. for the relay's domain and names one label under it (`NAME.domain`), a certificate for
//!    exactly that name issued on demand by the development CA and cached (at most
//!    [`ON_DEMAND_CAP`] names, oldest dropped first). curl and OpenSSL refuse a wildcard directly
//!    under a one-label domain (`*.localhost`), so the relay's own `*.domain` is not enough there;
//! 4. the relay's own certificate (domain, `*.domain`, `localhost`, loopback addresses), also
//!    used when the client sends no SNI.
//!
//! # Certificate directory
//!
//! One PEM pair per host, named after the host:
//! - `HOST.pem` with `HOST-key.pem` (mkcert's naming), or `HOST.crt` with `HOST.key`;
//! - a wildcard is `_wildcard.example.com.pem` (mkcert) or `*.example.com.pem` (and the matching
//!   key file, e.g. `_wildcard.example.com-key.pem`).
//!
//! The certificate file may hold a chain, leaf first. The key is PKCS#8, PKCS#1 (RSA) or SEC1
//! (EC). Names are case-insensitive. Files with other extensions, hidden files and key files are
//! otherwise ignored; when two files name the same host, the first in sorted order wins.
//!
//! A pair is refused, with a reason in the [`ReloadReport`], when a file cannot be read or
//! parsed, the key does not match the certificate, the leaf certificate is not valid for the
//! file's name, or the file name is not a host name (mkcert's multi-host `example.com+2.pem`:
//! rename it, one file per host). Wildcards need two labels after the `*` (`*.localhost` is
//! refused, as clients refuse it). Expiry is not checked.
//!
//! The directory is re-read by [`CertStore::reload`], which [`CertStore::watch`] calls when a
//! file name, size or modification time changes. A refused file never replaces a certificate
//! loaded before for the same name (a half-written file keeps the old one serving); a removed
//! file is dropped at the next reload.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use warren_transport::ServerIdentity;

use crate::certs::DevIssuer;

/// How many names the on-demand cache holds before dropping the oldest.
pub const ON_DEMAND_CAP: usize = 1024;

/// Certificate and key files larger than this are refused.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the store could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertStoreError {
    /// The certificate directory cannot be listed.
    #[error("certificate directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The relay's own certificate or key is unusable.
    #[error("the relay's certificate: {0}")]
    Default(rustls::Error),
}

/// What one [`CertStore::reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Names (`host` or `*.domain`) loaded from the directory, sorted.
    pub loaded: Vec<String>,
    /// Files (or the directory itself) refused, with the reason.
    pub refused: Vec<(PathBuf, String)>,
}

/// Picks the certificate for each TLS handshake on the public HTTPS listener.
pub struct CertStore {
    /// The relay's domain, normalized.
    domain: String,
    issuer: DevIssuer,
    default: Arc<CertifiedKey>,
    cert_dir: Option<PathBuf>,
    /// Certificates from the directory by name (`host` or `*.rest`).
    files: RwLock<HashMap<String, FileCert>>,
    /// The directory as the last reload saw it (`None`: unreadable).
    last_seen: Mutex<Option<Vec<FileStamp>>>,
    /// Serializes reloads.
    reloading: Mutex<()>,
    on_demand: Mutex<OnDemand>,
    /// Certificates obtained from an ACME CA, by exact name.
    acme: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

/// A certificate loaded from the directory.
struct FileCert {
    key: Arc<CertifiedKey>,
}

/// Certificates issued on demand, bounded; the oldest is dropped first.
struct OnDemand {
    certs: HashMap<String, Arc<CertifiedKey>>,
    order: VecDeque<String>,
    cap: usize,
}

/// One directory entry, for change detection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileStamp {
    name: std::ffi::OsString,
    len: u64,
    modified: Option<SystemTime>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("domain", &self.domain)
            .field("cert_dir", &self.cert_dir)
            .field("files", &read_lock(&self.files).len())
            .field("on_demand", &lock(&self.on_demand).certs.len())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// `domain` is the relay's domain (tunnels are NAME.domain); `default` is the relay's own
    /// certificate (covers domain, *.domain, localhost, loopback IPs) used when nothing better
    /// matches or there is no SNI.
    ///
    /// Loads `cert_dir` (logging what was loaded and refused); fails when it cannot be listed at
    /// all, or when `default` is unusable.
    pub fn new(
        domain: &str,
        issuer: DevIssuer,
        default: ServerIdentity,
        cert_dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, CertStoreError> {
        let signing = any_supported_type(&default.key).map_err(CertStoreError::Default)?;
        let default = Arc::new(CertifiedKey::new(default.chain, signing));
        let store = Arc::new(Self {
            domain: normalize(domain),
            issuer,
            default,
            cert_dir,
            files: RwLock::new(HashMap::new()),
            last_seen: Mutex::new(None),
            reloading: Mutex::new(()),
            on_demand: Mutex::new(OnDemand {
                certs: HashMap::new(),
                order: VecDeque::new(),
                cap: ON_DEMAND_CAP,
            }),
            acme: RwLock::new(HashMap::new()),
        });
        let report = store.try_reload()?;
        log_report(&report);
        Ok(store)
    }

    /// Re-reads the cert dir; returns what was loaded and what was refused (with reasons).
    /// Called at start (`new` calls it and fails if the directory cannot be read at all) and
    /// periodically. When the directory cannot be read, everything loaded before is kept and the
    /// directory is reported as refused.
    pub fn reload(&self) -> ReloadReport {
        match self.try_reload() {
            Ok(report) => report,
            Err(e) => {
                let path = self.cert_dir.clone().unwrap_or_default();
                ReloadReport {
                    loaded: Vec::new(),
                    refused: vec![(path, format!("{e}; keeping the certificates loaded before"))],
                }
            }
        }
    }

    /// Spawns a tokio task polling the cert dir every `every` (file names, sizes, modification
    /// times) and calling [`Self::reload`] when something changed; logs loaded names (info) and
    /// refused files with the reason (warn). The task stops when `shutdown` is cancelled or the
    /// store is dropped. Does nothing without a certificate directory.
    pub fn watch(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let Some(dir) = self.cert_dir.clone() else { return };
        let store = Arc::downgrade(self);
        let span = info_span!("certstore", dir = %dir.display());
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await; // The first tick is immediate; `new` has just loaded.
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let Some(store) = store.upgrade() else { break };
                    match tokio::task::spawn_blocking(move || store.reload_if_changed()).await {
                        Ok(Some(report)) => log_report(&report),
                        Ok(None) => {}
                        Err(e) => warn!(error = %e, "certificate reload failed"),
                    }
                }
                debug!("certificate watcher stopped");
            }
            .instrument(span),
        );
    }

    /// A rustls server configuration (ring provider) that picks certificates from this store and
    /// offers `alpn`, in order of preference.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// The certificate for a handshake with server name `sni` (see the module docs for the
    /// order).
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(normalize) else { return self.default.clone() };
        if name.is_empty() || name.contains('*') {
            return self.default.clone();
        }
        {
            let files = read_lock(&self.files);
            if let Some(found) = files.get(&name) {
                return found.key.clone();
            }
            if let Some((_, rest)) = name.split_once('.')
                && !rest.is_empty()
                && let Some(found) = files.get(&format!("*.{rest}"))
            {
                return found.key.clone();
            }
        }
        if let Some(key) = read_lock(&self.acme).get(&name) {
            return key.clone();
        }
        if self.is_relay_name(&name)
            && is_dns_name(&name)
            && let Some(key) = self.on_demand(&name)
        {
            return key;
        }
        self.default.clone()
    }

    /// Whether a certificate from the cert dir (exact or wildcard) or from ACME covers `name`,
    /// so that nothing needs to be obtained for it.
    pub fn covered(&self, name: &str) -> bool {
        let name = normalize(name);
        if read_lock(&self.acme).contains_key(&name) {
            return true;
        }
        let files = read_lock(&self.files);
        files.contains_key(&name)
            || name
                .split_once('.')
                .is_some_and(|(_, rest)| files.contains_key(&format!("*.{rest}")))
    }

    /// Serves `chain` and `key` (PEM) for exactly `name` from now on: a certificate obtained
    /// from an ACME CA. Refused when they do not parse or do not match.
    pub fn set_acme(&self, name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
        if chain.is_empty() {
            return Err("no certificate in the chain".to_owned());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("not a PEM private key: {e}"))?;
        let signing = any_supported_type(&key).map_err(|e| format!("unusable key: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(format!("the key does not match the certificate ({e})")),
        }
        write_lock(&self.acme).insert(normalize(name), Arc::new(certified));
        Ok(())
    }

    /// The domain itself or one label under it.
    fn is_relay_name(&self, name: &str) -> bool {
        name == self.domain
            || name
                .strip_suffix(self.domain.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
    }

    /// The cached certificate for `name`, issuing it when absent. `None` when issuing fails.
    fn on_demand(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = lock(&self.on_demand).certs.get(name) {
            return Some(key.clone());
        }
        // Issued without the lock so handshakes for other names do not wait.
        let issued = self.issuer.issue(&[name.to_owned()]).map_err(|e| e.to_string()).and_then(
            |(chain, key)| {
                let signing = any_supported_type(&key).map_err(|e| e.to_string())?;
                Ok(Arc::new(CertifiedKey::new(chain, signing)))
            },
        );
        let key = match issued {
            Ok(key) => key,
            Err(e) => {
                debug!(name, error = %e, "cannot issue a certificate on demand");
                return None;
            }
        };
        let mut cache = lock(&self.on_demand);
        if let Some(raced) = cache.certs.get(name) {
            return Some(raced.clone());
        }
        cache.certs.insert(name.to_owned(), key.clone());
        cache.order.push_back(name.to_owned());
        while cache.order.len() > cache.cap {
            if let Some(oldest) = cache.order.pop_front() {
                cache.certs.remove(&oldest);
            }
        }
        debug!(name, "issued a certificate on demand");
        Some(key)
    }

    /// Reloads when the directory changed since the last reload.
    fn reload_if_changed(&self) -> Option<ReloadReport> {
        let dir = self.cert_dir.as_deref()?;
        let now = stamp(dir).ok();
        if *lock(&self.last_seen) == now {
            return None;
        }
        Some(self.reload())
    }

    fn try_reload(&self) -> Result<ReloadReport, CertStoreError> {
        let Some(dir) = self.cert_dir.as_deref() else { return Ok(ReloadReport::default()) };
        let _serial = lock(&self.reloading);
        // Stamped before reading, so a change during the reload triggers another one.
        let seen = stamp(dir);
        *lock(&self.last_seen) = seen.as_ref().ok().cloned();
        let dir_err = |source| CertStoreError::Dir { path: dir.to_owned(), source };
        seen.map_err(dir_err)?;
        let Scan { pairs, mut refused } = scan(dir).map_err(dir_err)?;

        let mut fresh = HashMap::new();
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        for pair in pairs {
            if fresh.contains_key(&pair.name) {
                let why = format!("another file already provides {}", pair.name);
                refused.push((pair.cert, why));
                continue;
            }
            match load_pair(&pair) {
                Ok(key) => {
                    loaded.push(pair.name.clone());
                    fresh.insert(pair.name, FileCert { key: Arc::new(key) });
                }
                Err(why) => failed.push((pair, why)),
            }
        }

        let mut files = write_lock(&self.files);
        for (pair, why) in failed {
            match files.remove(&pair.name) {
                Some(old) if !fresh.contains_key(&pair.name) => {
                    fresh.insert(pair.name.clone(), old);
                    let why = format!("{why}; still serving the certificate loaded before");
                    refused.push((pair.cert, why));
                }
                _ => refused.push((pair.cert, why)),
            }
        }
        *files = fresh;
        drop(files);
        loaded.sort();
        Ok(ReloadReport { loaded, refused })
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(client_hello.server_name()))
    }
}

/// A certificate file, its key file and the name they are for.
#[derive(Debug)]
struct Pair {
    /// `host` or `*.rest`, lower-case.
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

/// What [`scan`] found in the directory.
struct Scan {
    /// Certificate files and their key files (not checked yet).
    pairs: Vec<Pair>,
    /// Files refused for their name alone.
    refused: Vec<(PathBuf, String)>,
}

/// Lists the certificate pairs in `dir`.
fn scan(dir: &Path) -> io::Result<Scan> {
    let mut names = BTreeSet::new();
    let mut refused = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        match entry.file_name().into_string() {
            Ok(name) if name.starts_with('.') => {}
            Ok(name) => {
                if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                    names.insert(name);
                }
            }
            Err(_) => {
                if matches!(path.extension().and_then(|e| e.to_str()), Some("pem" | "crt")) {
                    refused.push((path, "the file name is not UTF-8".to_owned()));
                }
            }
        }
    }
    let mut pairs = Vec::new();
    for file in &names {
        let (stem, key_file) = if let Some(stem) = file.strip_suffix(".pem") {
            // `HOST-key.pem` is a key, unless it has a key of its own (host `HOST-key`).
            if stem.ends_with("-key") && !names.contains(&format!("{stem}-key.pem")) {
                continue;
            }
            (stem, format!("{stem}-key.pem"))
        } else if let Some(stem) = file.strip_suffix(".crt") {
            (stem, format!("{stem}.key"))
        } else {
            continue;
        };
        let cert = dir.join(file);
        let lower = stem.to_ascii_lowercase();
        let name = match lower.strip_prefix("_wildcard.") {
            Some(rest) => format!("*.{rest}"),
            None => lower,
        };
        if !is_cert_name(&name) {
            let why = format!(
                "{stem:?} is not a host name (expected HOST.pem, _wildcard.DOMAIN.pem or \
                 *.DOMAIN.pem; mkcert's multi-host files must be renamed, one per host)"
            );
            refused.push((cert, why));
            continue;
        }
        pairs.push(Pair { name, cert, key: dir.join(key_file) });
    }
    Ok(Scan { pairs, refused })
}

/// Loads and checks one pair.
fn load_pair(pair: &Pair) -> Result<CertifiedKey, String> {
    if let Some(rest) = pair.name.strip_prefix("*.")
        && !rest.contains('.')
    {
        return Err(format!(
            "a wildcard needs two labels after the `*` (clients refuse {}); use one certificate \
             per host",
            pair.name
        ));
    }
    if !pair.key.exists() {
        let key_file = pair.key.file_name().unwrap_or_default().to_string_lossy();
        return Err(format!("no key file {key_file} next to it"));
    }
    let cert_pem = read_small(&pair.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the file (expected PEM)".to_owned());
    };
    let key_pem = read_small(&pair.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", pair.key.display()))?;
    let signing = any_supported_type(&key)
        .map_err(|e| format!("{}: unusable private key: {e}", pair.key.display()))?;

    let parsed = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    // A wildcard file must hold a wildcard certificate: probe it with a name no exact SAN has.
    let probe = match pair.name.strip_prefix("*.") {
        Some(rest) => format!("warren-wildcard-probe.{rest}"),
        None => pair.name.clone(),
    };
    let subject = ServerName::try_from(probe.as_str()).map_err(|e| format!("{e}"))?;
    parsed
        .verify_is_valid_for_subject_name(&subject)
        .map_err(|e| format!("the certificate is not valid for {} ({e})", pair.name))?;

    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => {
            Err(format!("the key in {} does not match the certificate ({e})", pair.key.display()))
        }
    }
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    let fail = |e: io::Error| format!("{}: {e}", path.display());
    let file = fs::File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(fail)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{}: larger than {MAX_FILE_BYTES} bytes", path.display()));
    }
    Ok(bytes)
}

/// Names, sizes and modification times of the directory's entries, sorted.
fn stamp(dir: &Path) -> io::Result<Vec<FileStamp>> {
    let mut all = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // Follows symlinks (certbot and Kubernetes secrets use them); a dangling one counts too.
        let meta = fs::metadata(entry.path()).ok();
        all.push(FileStamp {
            name: entry.file_name(),
            len: meta.as_ref().map_or(0, |m| m.len()),
            modified: meta.and_then(|m| m.modified().ok()),
        });
    }
    all.sort();
    Ok(all)
}

fn log_report(report: &ReloadReport) {
    if !report.loaded.is_empty() {
        info!(names = ?report.loaded, "certificates loaded");
    }
    for (path, reason) in &report.refused {
        warn!(file = %path.display(), reason = %reason, "certificate refused");
    }
}

/// Lower-case, without a trailing dot.
fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A host name the CA may issue for: at most 253 bytes of `[a-z0-9.-]`, labels of 1 to 63 bytes
/// not starting or ending with `-`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A name a directory certificate may be filed under: a host name or `*.` and one.
fn is_cert_name(name: &str) -> bool {
    is_dns_name(name.strip_prefix("*.").unwrap_or(name))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::KeyPair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::certs::{self, DevCa};

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("warren-certstore-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(path.join("certs")).unwrap();
            Self(path)
        }

        fn certs(&self) -> PathBuf {
            self.0.join("certs")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dev_ca(tmp: &TempDir, domain: &str) -> DevCa {
        certs::load_or_create(&tmp.0.join("data"), &certs::default_names(domain, &[], &[])).unwrap()
    }

    fn store(tmp: &TempDir, ca: &DevCa, domain: &str, dir: bool) -> Arc<CertStore> {
        let dir = dir.then(|| tmp.certs());
        CertStore::new(domain, ca.issuer.clone(), ca.identity.clone(), dir).unwrap()
    }

    /// Writes a self-signed certificate for `sans` as `cert_file` (+ `key_file`); returns its DER.
    fn write_pair(
        tmp: &TempDir,
        cert_file: &str,
        key_file: &str,
        sans: &[&str],
    ) -> CertificateDer<'static> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(sans).unwrap();
        fs::write(tmp.certs().join(cert_file), made.cert.pem()).unwrap();
        fs::write(tmp.certs().join(key_file), made.signing_key.serialize_pem()).unwrap();
        made.cert.der().clone()
    }

    fn leaf(key: &CertifiedKey) -> &CertificateDer<'static> {
        &key.cert[0]
    }

    fn valid_for(key: &CertifiedKey, name: &str) -> bool {
        let cert = webpki::EndEntityCert::try_from(leaf(key)).unwrap();
        let name = ServerName::try_from(name).unwrap();
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }

    fn refusal<'a>(report: &'a ReloadReport, file: &str) -> &'a str {
        report
            .refused
            .iter()
            .find(|(p, _)| p.file_name().is_some_and(|n| n == file))
            .map(|(_, why)| why.as_str())
            .unwrap_or_else(|| panic!("{file} not refused: {report:?}"))
    }

    #[test]
    fn resolution_order_exact_wildcard_on_demand_default() {
        let tmp = TempDir::new("order");
        let ca = dev_ca(&tmp, "example.test");
        let exact = write_pair(
            &tmp,
            "shop.example.test.pem",
            "shop.example.test-key.pem",
            &["shop.example.test"],
        );
        let wild = write_pair(
            &tmp,
            "_wildcard.example.test.pem",
            "_wildcard.example.test-key.pem",
            &["*.example.test"],
        );
        let crt = write_pair(&tmp, "api.other.test.crt", "api.other.test.key", &["api.other.test"]);
        let star = write_pair(&tmp, "*.other.test.pem", "*.other.test-key.pem", &["*.other.test"]);
        let store = store(&tmp, &ca, "Example.Test.", true);
        assert_eq!(
            store.reload(),
            ReloadReport {
                loaded: vec![
                    "*.example.test".into(),
                    "*.other.test".into(),
                    "api.other.test".into(),
                    "shop.example.test".into()
                ],
                refused: vec![],
            }
        );
        let default = &ca.identity.chain[0];

        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &exact);
        assert_eq!(leaf(&store.pick(Some("SHOP.example.test."))), &exact);
        // The wildcard beats issuing on demand.
        assert_eq!(leaf(&store.pick(Some("blog.example.test"))), &wild);
        assert_eq!(leaf(&store.pick(Some("api.other.test"))), &crt);
        assert_eq!(leaf(&store.pick(Some("www.other.test"))), &star);
        // The wildcard does not cover the domain itself: issued on demand.
        let apex = store.pick(Some("example.test"));
        assert_ne!(leaf(&apex), default);
        assert!(valid_for(&apex, "example.test"));
        assert_eq!(apex.cert[1], ca.ca_der);
        // Two labels under a wildcard, other domains, no SNI: the default.
        assert_eq!(leaf(&store.pick(Some("a.b.example.test"))), default);
        assert_eq!(leaf(&store.pick(Some("a.b.other.test"))), default);
        assert_eq!(leaf(&store.pick(Some("elsewhere.test"))), default);
        assert_eq!(leaf(&store.pick(None)), default);
        assert_eq!(leaf(&store.pick(Some("*.example.test"))), default);
    }

    #[test]
    fn on_demand_only_for_the_domain_and_one_label() {
        let tmp = TempDir::new("ondemand");
        let ca = dev_ca(&tmp, "localhost");
        let store = store(&tmp, &ca, "localhost", false);
        let default = &ca.identity.chain[0];
        let shop = store.pick(Some("shop.localhost"));
        assert_ne!(leaf(&shop), default);
        assert!(valid_for(&shop, "shop.localhost"));
        assert!(!valid_for(&shop, "other.localhost"));
        for name in
            ["a.b.localhost", "xlocalhost", "bad_name.localhost", "-x.localhost", "example.com"]
        {
            assert_eq!(leaf(&store.pick(Some(name))), default, "{name}");
        }
        let long = format!("{}.localhost", "a".repeat(64));
        assert_eq!(leaf(&store.pick(Some(&long))), default);
    }

    #[test]
    fn on_demand_certificates_are_cached_and_bounded() {
        let tmp = TempDir::new("cache");
        let ca = dev_ca(&tmp, "localhost");
        let store = store(&tmp, &ca, "localhost", false);
        assert_eq!(lock(&store.on_demand).cap, ON_DEMAND_CAP);
        lock(&store.on_demand).cap = 3;

        let a = store.pick(Some("a.localhost"));
        assert!(Arc::ptr_eq(&a, &store.pick(Some("a.localhost"))));
        assert!(Arc::ptr_eq(&a, &store.pick(Some("A.localhost."))));
        for name in ["b.localhost", "c.localhost", "d.localhost"] {
            store.pick(Some(name));
        }
        {
            let cache = lock(&store.on_demand);
            assert_eq!(cache.certs.len(), 3);
            assert_eq!(cache.order.len(), 3);
            assert!(!cache.certs.contains_key("a.localhost"), "the oldest was dropped");
        }
        let again = store.pick(Some("a.localhost"));
        assert!(!Arc::ptr_eq(&a, &again));
        assert!(valid_for(&again, "a.localhost"));
        assert_eq!(lock(&store.on_demand).certs.len(), 3);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let tmp = TempDir::new("refused");
        let ca = dev_ca(&tmp, "example.test");
        // The key belongs to another certificate.
        write_pair(&tmp, "bad.example.test.pem", "bad.example.test-key.pem", &["bad.example.test"]);
        let other = KeyPair::generate().unwrap();
        fs::write(tmp.certs().join("bad.example.test-key.pem"), other.serialize_pem()).unwrap();
        // The certificate is for another name.
        write_pair(
            &tmp,
            "wrong.example.test.pem",
            "wrong.example.test-key.pem",
            &["other.example.test"],
        );
        // A wildcard file holding a plain certificate.
        write_pair(
            &tmp,
            "_wildcard.plain.test.pem",
            "_wildcard.plain.test-key.pem",
            &["www.plain.test"],
        );
        // A wildcard directly under a one-label domain.
        write_pair(
            &tmp,
            "_wildcard.localhost.pem",
            "_wildcard.localhost-key.pem",
            &["*.localhost"],
        );
        // No key, not PEM, mkcert's multi-host naming.
        let made = rcgen::generate_simple_self_signed(vec!["lonely.example.test".into()]).unwrap();
        fs::write(tmp.certs().join("lonely.example.test.pem"), made.cert.pem()).unwrap();
        fs::write(tmp.certs().join("junk.example.test.crt"), "not a certificate").unwrap();
        fs::write(tmp.certs().join("junk.example.test.key"), "not a key").unwrap();
        write_pair(&tmp, "example.test+2.pem", "example.test+2-key.pem", &["example.test"]);
        // Ignored: hidden files, other extensions.
        fs::write(tmp.certs().join(".swp"), "x").unwrap();
        fs::write(tmp.certs().join("README.txt"), "x").unwrap();

        let store = store(&tmp, &ca, "example.test", true);
        let report = store.reload();
        assert!(report.loaded.is_empty(), "{report:?}");
        assert_eq!(report.refused.len(), 7, "{report:?}");
        assert!(refusal(&report, "bad.example.test.pem").contains("does not match"), "{report:?}");
        assert!(refusal(&report, "wrong.example.test.pem").contains("not valid for"), "{report:?}");
        assert!(refusal(&report, "_wildcard.plain.test.pem").contains("not valid for"));
        assert!(refusal(&report, "_wildcard.localhost.pem").contains("two labels"));
        assert!(refusal(&report, "lonely.example.test.pem").contains("no key file"));
        assert!(refusal(&report, "junk.example.test.crt").contains("certificate"));
        assert!(refusal(&report, "example.test+2.pem").contains("not a host name"));

        // Nothing refused is served.
        let default = &ca.identity.chain[0];
        let bad = store.pick(Some("bad.example.test"));
        assert!(valid_for(&bad, "bad.example.test"), "issued on demand");
        assert_eq!(bad.cert[1], ca.ca_der);
        assert_eq!(leaf(&store.pick(Some("x.plain.test"))), default);
    }

    #[test]
    fn reload_switches_keeps_on_refusal_and_falls_back() {
        let tmp = TempDir::new("reload");
        let ca = dev_ca(&tmp, "example.test");
        let (pem, key) = ("shop.example.test.pem", "shop.example.test-key.pem");
        let first = write_pair(&tmp, pem, key, &["shop.example.test"]);
        let store = store(&tmp, &ca, "example.test", true);
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &first);

        let second = write_pair(&tmp, pem, key, &["shop.example.test"]);
        let report = store.reload();
        assert_eq!(report.loaded, vec!["shop.example.test".to_owned()]);
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &second);

        // A half-written file keeps the good certificate serving.
        fs::write(tmp.certs().join(pem), "-----BEGIN CERTIFICATE-----\nAAA").unwrap();
        let report = store.reload();
        assert!(refusal(&report, pem).contains("still serving"), "{report:?}");
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &second);
        // Still kept at the next reload while the file stays broken.
        store.reload();
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &second);
        // Also while the key file is missing (a pair being replaced file by file).
        fs::remove_file(tmp.certs().join(key)).unwrap();
        let report = store.reload();
        assert!(refusal(&report, pem).contains("no key file"), "{report:?}");
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &second);

        fs::remove_file(tmp.certs().join(pem)).unwrap();
        assert_eq!(store.reload(), ReloadReport::default());
        let fallback = store.pick(Some("shop.example.test"));
        assert_ne!(leaf(&fallback), &second);
        assert_eq!(fallback.cert[1], ca.ca_der, "issued on demand");

        // An unreadable directory keeps what was loaded.
        let third = write_pair(&tmp, pem, key, &["shop.example.test"]);
        store.reload();
        fs::rename(tmp.certs(), tmp.0.join("moved")).unwrap();
        let report = store.reload();
        assert_eq!(report.refused.len(), 1, "{report:?}");
        assert_eq!(leaf(&store.pick(Some("shop.example.test"))), &third);
    }

    #[test]
    fn an_unreadable_directory_fails_new() {
        let tmp = TempDir::new("missing");
        let ca = dev_ca(&tmp, "example.test");
        let err = CertStore::new(
            "example.test",
            ca.issuer.clone(),
            ca.identity.clone(),
            Some(tmp.0.join("absent")),
        )
        .unwrap_err();
        assert!(matches!(err, CertStoreError::Dir { .. }), "{err}");
    }

    #[tokio::test]
    async fn watch_reloads_on_change_and_stops_on_shutdown() {
        let tmp = TempDir::new("watch");
        let ca = dev_ca(&tmp, "example.test");
        let store = store(&tmp, &ca, "example.test", true);
        let shutdown = CancellationToken::new();
        store.watch(Duration::from_millis(10), shutdown.clone());
        let name = Some("api.example.test");
        let issued = store.pick(name);
        assert_eq!(issued.cert[1], ca.ca_der);

        let file = write_pair(
            &tmp,
            "api.example.test.pem",
            "api.example.test-key.pem",
            &["api.example.test"],
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while leaf(&store.pick(name)) != &file {
            assert!(tokio::time::Instant::now() < deadline, "the watcher never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
        // The task holds only a weak reference.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&store) > 1 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn handshake_gets_an_on_demand_certificate_and_h2() {
        let tmp = TempDir::new("handshake");
        let ca = dev_ca(&tmp, "localhost");
        let store = store(&tmp, &ca, "localhost", false);
        let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config(&[b"h2", b"http/1.1"]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_der.clone()).unwrap();
        let mut client =
            rustls::ClientConfig::builder_with_provider(warren_transport::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));

        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            assert_eq!(tls.get_ref().1.server_name(), Some("shop.localhost"));
            tls.write_all(b"hi").await.unwrap();
            tls.shutdown().await.unwrap();
        };
        let client = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let sni = ServerName::try_from("shop.localhost").unwrap();
            // Succeeds only if the certificate chains to the dev CA and is valid for the name.
            let mut tls = connector.connect(sni, tcp).await.unwrap();
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            let peer = conn.peer_certificates().unwrap()[0].clone();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hi");
            peer
        };
        let ((), peer) = tokio::join!(server, client);
        assert_ne!(peer, ca.identity.chain[0], "not the relay's own certificate");
        assert_eq!(&peer, leaf(&store.pick(Some("shop.localhost"))), "the cached one");
    }
}

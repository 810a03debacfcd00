//! The development CA kept in the data directory, and the relay certificate it signs.
//!
//! On first start the relay creates `ca.pem` and `ca-key.pem` in its data directory. At every
//! start it issues a fresh certificate for its domain (and `*.domain`, `localhost`, loopback
//! addresses, the specific IP addresses its listeners are bound to and any extra names) signed by
//! that CA, and writes it to `relay.pem` and
//! `relay-key.pem`. Agents trust the relay with
//! `--relay-ca DATA/ca.pem` or by pinning the CA's fingerprint.
//!
//! The CA key stays in memory as a [`DevIssuer`] so the relay can issue more leaf certificates
//! later (the HTTPS listener's [`crate::certstore`] issues one per tunnel host on demand).

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use warren_transport::ServerIdentity;

use crate::util::write_private;

/// Why the CA or certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// Generating or parsing a key or certificate failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The development CA and the identity the relay presents.
#[derive(Debug)]
pub struct DevCa {
    /// Path of the CA certificate (PEM).
    pub ca_path: PathBuf,
    /// The CA certificate (DER).
    pub ca_der: CertificateDer<'static>,
    /// SHA-256 of the CA certificate, hex.
    pub fingerprint: String,
    /// True when the CA was created by this call.
    pub created: bool,
    /// The relay's certificate chain (leaf, CA) and key.
    pub identity: ServerIdentity,
    /// Issues further leaf certificates signed by this CA.
    pub issuer: DevIssuer,
}

/// The development CA's key and certificate, for issuing leaf certificates.
///
/// Cheap to clone (the key is shared). Its `Debug` shows the CA fingerprint, never the key.
#[derive(Clone)]
pub struct DevIssuer {
    key: Arc<KeyPair>,
    ca_der: CertificateDer<'static>,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("ca_fingerprint", &warren_transport::tls::fingerprint(&self.ca_der))
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Issues a certificate for `names` (DNS names or IP addresses; the first is also the common
    /// name) with a fresh key. Returns the chain `[leaf, CA]` and the leaf's key (PKCS#8).
    pub fn issue(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
        let (leaf, leaf_key) = self.issue_leaf(names)?;
        Ok((vec![leaf.der().clone(), self.ca_der.clone()], pkcs8(&leaf_key)))
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// [`Self::issue`], keeping rcgen's types (for writing PEM files).
    fn issue_leaf(&self, names: &[String]) -> Result<(rcgen::Certificate, KeyPair), CertError> {
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().map_or("warren relay", |n| n));
        let issuer = Issuer::new(ca_params(), &*self.key);
        let leaf = params.signed_by(&leaf_key, &issuer)?;
        Ok((leaf, leaf_key))
    }
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "warren development CA");
    p.distinguished_name.push(DnType::OrganizationName, "warren");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Loads the CA from `data_dir`, creating it when absent, and issues the relay's certificate for
/// `names`.
pub fn load_or_create(data_dir: &Path, names: &[String]) -> Result<DevCa, CertError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    let ca_path = data_dir.join("ca.pem");
    let key_path = data_dir.join("ca-key.pem");
    let created = !key_path.exists();
    let ca_key = if created {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io_err(&key_path))?;
        fs::write(&ca_path, cert.pem()).map_err(io_err(&ca_path))?;
        key
    } else {
        let pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        KeyPair::from_pem(&pem)?
    };
    let ca_der = warren_transport::tls::load_certs(&ca_path)
        .map_err(|e| CertError::Io { path: ca_path.clone(), source: io::Error::other(e) })?
        .remove(0);

    let issuer = DevIssuer { key: Arc::new(ca_key), ca_der: ca_der.clone() };
    let (leaf, leaf_key) = issuer.issue_leaf(names)?;
    // Kept for inspection (`openssl x509 -in DATA/relay.pem -text`); reissued at every start.
    let relay_pem = data_dir.join("relay.pem");
    fs::write(&relay_pem, leaf.pem()).map_err(io_err(&relay_pem))?;
    let relay_key = data_dir.join("relay-key.pem");
    let _ = fs::remove_file(&relay_key);
    write_private(&relay_key, leaf_key.serialize_pem().as_bytes()).map_err(io_err(&relay_key))?;
    let identity =
        ServerIdentity { chain: vec![leaf.der().clone(), ca_der.clone()], key: pkcs8(&leaf_key) };
    Ok(DevCa {
        fingerprint: warren_transport::tls::fingerprint(&ca_der),
        ca_path,
        ca_der,
        created,
        identity,
        issuer,
    })
}

/// Reads the 32-byte secret at `path`, creating it (mode 0600) when absent.
pub fn load_or_create_secret(path: &Path) -> Result<[u8; 32], CertError> {
    use ring::rand::SecureRandom;
    let io_err = |source| CertError::Io { path: path.to_owned(), source };
    if let Ok(bytes) = fs::read(path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
        return Err(io_err(io::Error::other(
            "expected exactly 32 bytes; delete the file to regenerate it",
        )));
    }
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| io_err(io::Error::other("no system randomness")))?;
    write_private(path, &key).map_err(io_err)?;
    Ok(key)
}

/// The names the relay's certificate covers by default: the domain and `*.domain`,
/// `localhost`, the loopback addresses, `extra` (`--tls-name`) and every specific IP address in
/// `listeners` (an agent dialling the address the relay was told to listen on must find it in the
/// certificate; unspecified addresses, `0.0.0.0` and `::`, name nothing).
pub fn default_names(domain: &str, extra: &[String], listeners: &[SocketAddr]) -> Vec<String> {
    let mut names = vec![domain.to_owned(), format!("*.{domain}")];
    for n in ["localhost", "127.0.0.1", "::1"] {
        names.push(n.to_owned());
    }
    names.extend(extra.iter().cloned());
    names.extend(
        listeners.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).map(|ip| ip.to_string()),
    );
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_specific_listener_addresses_once() {
        let listeners: Vec<SocketAddr> =
            ["10.251.0.1:7443", "0.0.0.0:80", "[::]:443", "127.0.0.1:9000", "[fd00::1]:7443"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        let names = default_names("example.com", &["relay.example.net".into()], &listeners);
        assert_eq!(
            names,
            [
                "example.com",
                "*.example.com",
                "localhost",
                "127.0.0.1",
                "::1",
                "relay.example.net",
                "10.251.0.1",
                "fd00::1"
            ]
        );
    }
}

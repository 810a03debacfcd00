//! Certificates and trust, and the rustls configurations of both sides.
//!
//! Only the `ring` crypto provider is used, and it is passed explicitly, so no process-wide
//! default provider is needed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// What was expected in the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// A fingerprint is not 64 hexadecimal digits.
    #[error("invalid fingerprint {0:?}: expected a SHA-256 as 64 hex digits (colons allowed)")]
    Fingerprint(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, as the relay presents them.
pub struct ServerIdentity {
    /// Leaf first, then intermediates (and the CA, for development certificates).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity").field("chain_len", &self.chain.len()).finish()
    }
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl ServerIdentity {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn load_pem(chain: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self { chain: load_certs(chain)?, key: load_key(key)? })
    }

    /// The rustls server configuration for this identity, with warren's ALPN.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![warren_proto::ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Reads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Pem { what: "certificates", path: path.into(), reason };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.into(),
        reason: e.to_string(),
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The SHA-256 fingerprint of a DER certificate, as 64 lower-case hex digits.
pub fn fingerprint(cert: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, cert).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a fingerprint written as hex, with or without `:` separators, any case.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    let bad = || TlsError::Fingerprint(s.to_owned());
    if digits.len() != 64 || !digits.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// How the agent decides to trust the relay's certificate.
#[derive(Clone)]
pub enum Trust {
    /// The operating system's root certificates (for relays with public certificates).
    System,
    /// These CA certificates only (for example the relay's `ca.pem`).
    Roots(Vec<CertificateDer<'static>>),
    /// Any chain containing a certificate with this SHA-256 fingerprint (the relay's CA or its
    /// leaf). The host name is not checked: the pin is the trust.
    Fingerprint([u8; 32]),
    /// Anything. Only for experiments: the session is encrypted but not authenticated.
    Insecure,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::System => f.write_str("System"),
            Self::Roots(r) => write!(f, "Roots({} certificates)", r.len()),
            Self::Fingerprint(fp) => write!(f, "Fingerprint({})", hex(fp)),
            Self::Insecure => f.write_str("Insecure"),
        }
    }
}

impl Trust {
    /// Trust the CA certificates in a PEM file.
    pub fn ca_file(path: &Path) -> Result<Self, TlsError> {
        load_certs(path).map(Self::Roots)
    }

    /// The rustls client configuration with warren's ALPN.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let mut cfg = match self {
            Self::System => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // Unparsable system certificates are skipped, as browsers do.
                    let _ = roots.add(cert);
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Self::Roots(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs {
                    roots.add(cert.clone())?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Self::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: Some(*fp),
                    provider,
                }))
                .with_no_client_auth(),
            Self::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier { pin: None, provider }))
                .with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![warren_proto::ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Accepts a chain that contains the pinned certificate (or any chain, without a pin), and
/// still checks that the server holds the key of the certificate it presented.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pin else { return Ok(ServerCertVerified::assertion()) };
        let matches = std::iter::once(end_entity).chain(intermediates).any(|c| {
            ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref() == pin.as_slice()
        });
        if matches {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the relay's certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hexed = "AB".repeat(32);
        assert_eq!(parse_fingerprint(&hexed).unwrap(), [0xab; 32]);
        let coloned = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&coloned).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}

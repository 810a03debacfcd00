//! Certificates for tests, made with the `openssl` command-line tool (the test script installs
//! it), so they come from an implementation independent of the one under test.

use std::path::PathBuf;
use std::process::Stdio;

use crate::util::TempDir;

/// Certificates made with the `openssl` CLI in one directory (EC P-256 keys, 2 days).
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A new, empty directory; panics when the `openssl` CLI is not installed.
    pub fn new(label: &str) -> Self {
        let works = std::process::Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(works, "the `openssl` command-line tool is missing (scripts/test-all installs it)");
        Self { dir: TempDir::new(label) }
    }

    /// Runs `openssl ARGS` in the PKI's directory; panics with its stderr when it fails.
    pub fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file in the PKI's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A self-signed CA: `NAME.pem`, `NAME.key`.
    pub fn ca(&self, name: &str) -> PathBuf {
        let (key, pem, subj) =
            (format!("{name}.key"), format!("{name}.pem"), format!("/CN={name}"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
        ]);
        self.path(&pem)
    }

    /// A leaf for DNS name `dns` signed by CA `ca` (made by [`Pki::ca`]): `NAME.pem`,
    /// `NAME.key`. Returns (certificate, key).
    pub fn leaf(&self, name: &str, ca: &str, dns: &str) -> (PathBuf, PathBuf) {
        self.leaf_san(name, ca, dns, &format!("DNS:{dns}"))
    }

    /// A leaf with common name `cn` and subject alternative names `san` (openssl syntax, e.g.
    /// `DNS:localhost,IP:127.0.0.1`), signed by CA `ca`. Returns (certificate, key).
    pub fn leaf_san(&self, name: &str, ca: &str, cn: &str, san: &str) -> (PathBuf, PathBuf) {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        self.dir
            .write(&ext, &format!("subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"));
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (self.path(&pem), self.path(&key))
    }

    /// A self-signed leaf for `dns` (not a CA): `NAME.pem`, `NAME.key`.
    pub fn self_signed(&self, name: &str, dns: &str) -> (PathBuf, PathBuf) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN={dns}"),
            "-addext",
            &format!("subjectAltName=DNS:{dns}"),
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ]);
        (self.path(&pem), self.path(&key))
    }
}

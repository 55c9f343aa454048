//! Who a peer is: a long-lived self-signed certificate and its fingerprint.
//!
//! qpunch has no certificate authorities. A peer *is* its key pair, and people compare
//! fingerprints (like ssh host keys or Syncthing device IDs) instead of trusting a CA.
//! The certificate is only a container that TLS 1.3 knows how to carry: its names and
//! dates are never checked, only the public key inside it.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Name of the certificate file inside the config directory.
pub const CERT_FILE: &str = "identity.crt";
/// Name of the private key file inside the config directory (mode 0600).
pub const KEY_FILE: &str = "identity.key";

/// Number of fingerprint bytes kept: 160 bits of SHA-256, short enough to read aloud
/// (32 base32 characters) and far beyond what a second-preimage search can reach.
const FINGERPRINT_LEN: usize = 20;

/// Errors about identities and fingerprints.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the identity files failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate identity: {0}")]
    Generate(#[from] rcgen::Error),
    /// The stored files are not a usable certificate and key.
    #[error(
        "identity files in {dir} are damaged ({what}); move them away to create a new identity"
    )]
    Damaged {
        /// The config directory.
        dir: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A certificate could not be parsed for its public key.
    #[error("peer certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// A fingerprint string is not 32 base32 characters.
    #[error(
        "not a qpunch fingerprint: {0:?} (expected 32 base32 characters, as printed by `qpunch id`)"
    )]
    BadFingerprint(String),
    /// No config directory could be determined.
    #[error("no config directory: set QPUNCH_HOME, XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
}

/// A short, stable name for a public key: SHA-256 of the certificate's
/// SubjectPublicKeyInfo, truncated to 160 bits, written in lowercase base32.
///
/// Hashing the public key rather than the whole certificate means a peer may renew its
/// certificate (new dates, new serial) without changing who it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&digest.as_ref()[..FINGERPRINT_LEN]);
        Fingerprint(out)
    }

    /// Fingerprint of the public key inside a DER certificate.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Ok(Self::of_spki(parsed.subject_public_key_info().as_ref()))
    }

    /// The raw fingerprint bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A fingerprint from its raw bytes, as carried in binary messages
    /// ([`crate::meet::pake::Hello`]).
    pub const fn from_bytes(bytes: [u8; FINGERPRINT_LEN]) -> Self {
        Fingerprint(bytes)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &data_encoding::BASE32_NOPAD
                .encode(&self.0)
                .to_ascii_lowercase(),
        )
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;

    /// Parses the form `Display` prints; case-insensitive, and `-` or spaces used to
    /// group characters when reading a fingerprint aloud are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let cleaned: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(cleaned.as_bytes())
            .map_err(|_| IdentityError::BadFingerprint(s.to_string()))?;
        let arr: [u8; FINGERPRINT_LEN] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadFingerprint(s.to_string()))?;
        Ok(Fingerprint(arr))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A certificate and its private key: what this peer proves in every TLS handshake.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl Identity {
    /// A fresh identity (ECDSA P-256), kept only in memory.
    pub fn generate() -> Result<Self, IdentityError> {
        let (cert_pem, key_pem) = generate_pem()?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|what| IdentityError::Damaged {
            dir: PathBuf::new(),
            what,
        })
    }

    /// Load the identity stored in `dir`, creating it (and `dir`) on first use.
    ///
    /// The key file is created with mode 0600 before any secret is written to it.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if !cert_path.exists() && !key_path.exists() {
            create_dir_private(dir)?;
            let (cert_pem, key_pem) = generate_pem()?;
            write_private(&key_path, key_pem.as_bytes())?;
            fs::write(&cert_path, cert_pem).map_err(|source| IdentityError::Io {
                action: "cannot write",
                path: cert_path.clone(),
                source,
            })?;
        }
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| IdentityError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        Self::from_pem(&cert_pem, &key_pem).map_err(|what| IdentityError::Damaged {
            dir: dir.to_path_buf(),
            what,
        })
    }

    /// Build an identity from PEM text (a certificate and a PKCS#8 private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("private key: {e}"))?;
        let fingerprint = Fingerprint::of_cert(&cert).map_err(|e| e.to_string())?;
        // Check that the key belongs to the certificate, so a mixed-up pair fails here
        // and not as an obscure handshake error on the peer's side.
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("private key: {e}"))?;
        if let Some(spki) = signer.public_key()
            && Fingerprint::of_spki(spki.as_ref()) != fingerprint
        {
            return Err("private key does not match certificate".into());
        }
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The DER certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A copy of the private key, for building TLS configurations.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The directory holding identity and `known_peers`: `$QPUNCH_HOME`, else
/// `$XDG_CONFIG_HOME/qpunch`, else `~/.config/qpunch`.
pub fn config_dir() -> Result<PathBuf, IdentityError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(home) = var("QPUNCH_HOME") {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(xdg).join("qpunch"));
    }
    var("HOME")
        .map(|home| PathBuf::from(home).join(".config").join("qpunch"))
        .ok_or(IdentityError::NoConfigDir)
}

fn generate_pem() -> Result<(String, String), IdentityError> {
    // The name is irrelevant (peers are identified by key), but TLS needs one.
    let certified = rcgen::generate_simple_self_signed(vec![crate::tls::SERVER_NAME.to_string()])?;
    Ok((certified.cert.pem(), certified.signing_key.serialize_pem()))
}

fn create_dir_private(dir: &Path) -> Result<(), IdentityError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| IdentityError::Io {
        action: "cannot create config directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let io = |source| IdentityError::Io {
        action: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_ignores_grouping() {
        let id = Identity::generate().unwrap();
        let text = id.fingerprint().to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<Fingerprint>().unwrap(), id.fingerprint());
        let grouped = format!(
            "{}-{} {}",
            &text[..8],
            &text[8..16].to_uppercase(),
            &text[16..]
        );
        assert_eq!(grouped.parse::<Fingerprint>().unwrap(), id.fingerprint());
        assert!("tooshort".parse::<Fingerprint>().is_err());
        assert!(format!("{text}aa").parse::<Fingerprint>().is_err());
    }

    #[test]
    fn identity_persists_with_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("cfg");
        let first = Identity::load_or_create(&home).unwrap();
        let second = Identity::load_or_create(&home).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_ne!(
            first.fingerprint(),
            Identity::generate().unwrap().fingerprint()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(home.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn damaged_identity_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    /// The published test-only fixture in `certs/` must keep its fingerprint: if this
    /// changes, the fingerprint algorithm changed and every user's `known_peers` and
    /// `--peer` pins would break.
    #[test]
    fn fixture_fingerprint_is_stable() {
        let id = Identity::from_pem(
            include_str!("../certs/test-only.crt"),
            include_str!("../certs/test-only.key"),
        )
        .unwrap();
        assert_eq!(
            id.fingerprint().to_string(),
            "rkuyixiuzn3g6fimwckvmzw6hi3r62kx"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = generate_pem().unwrap();
        let b = generate_pem().unwrap();
        let err = Identity::from_pem(&a.0, &b.1).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }
}

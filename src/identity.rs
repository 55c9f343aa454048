//! Who a peer is: a long-lived self-signed certificate and its fingerprint.
//!
//! qpunch has no certificate authorities. A peer *is* its key pair, and people compare
//! fingerprints (like ssh host keys or Syncthing device IDs) instead of trusting a CA.
//! The certificate is only a container that TLS 1.3 knows how to carry: its names and
//! dates are never checked, only the public key inside it.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::durable::{self, Existing};

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
    /// The private key may be read or written by group or others (like ssh, refused).
    #[error(
        "{path} is accessible by group or others (mode {mode:04o}): a private key must be \
         yours alone, and someone else may hold a copy. Run `chmod 600 {path}`, or move the \
         identity files away to create a new identity"
    )]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The certificate is there but its private key is not: nothing can prove the
    /// identity any more.
    #[error(
        "{cert} has no private key {key}: restore the key from a backup, or move {cert} away \
         to create a new identity (peers that pinned the old one will refuse the new one)"
    )]
    KeyMissing {
        /// The certificate file.
        cert: PathBuf,
        /// Where the key should be.
        key: PathBuf,
    },
    /// No config directory could be determined.
    #[error("no config directory: set QPUNCH_HOME, XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
}

/// Something about the stored identity the user should hear of, though it can be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityWarning {
    /// The config directory may be written by group or others, who could replace the
    /// identity or the list of trusted peers.
    #[error(
        "{dir} is writable by group or others (mode {mode:04o}), who could replace this \
         identity or known_peers: run `chmod 700 {dir}`"
    )]
    DirWritable {
        /// The config directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The certificate was missing (a crash while it was first written) and was rebuilt
    /// from the private key: same key, same fingerprint.
    #[error("{cert} was missing; rebuilt it from the private key (the fingerprint is unchanged)")]
    CertRebuilt {
        /// The certificate file.
        cert: PathBuf,
    },
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

    /// Load the identity stored in `dir`, creating it (and `dir`) on first use; anything
    /// the user should hear about (see [`IdentityWarning`]) is logged with `tracing`.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let (identity, warnings) = Self::load_or_create_with_warnings(dir)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(identity)
    }

    /// Load the identity stored in `dir`, creating it (and `dir`, mode 0700) on first use,
    /// and say what the user should hear about.
    ///
    /// Like ssh with its host keys: a private key that group or others may read or write
    /// is refused ([`IdentityError::KeyExposed`]): someone else may hold it, and then they
    /// are us. A config directory others may write to only warns (they could swap the
    /// identity, or known_peers, but the key is not known to be out).
    ///
    /// Both files are written atomically, key first, each in a temporary file renamed into
    /// place, so a crash leaves nothing half-written. A crash between the two leaves a key
    /// without its certificate: the certificate is then rebuilt from the key (the
    /// fingerprint, a hash of the public key, stays the same). A certificate without its
    /// key cannot be repaired and is an error that says what to do.
    pub fn load_or_create_with_warnings(
        dir: &Path,
    ) -> Result<(Self, Vec<IdentityWarning>), IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let mut warnings = Vec::new();
        create_dir_private(dir)?;
        if let Some(mode) = group_or_other_writable(dir)? {
            warnings.push(IdentityWarning::DirWritable {
                dir: dir.to_path_buf(),
                mode,
            });
        }
        if !cert_path.exists() && !key_path.exists() {
            let key = rcgen::KeyPair::generate()?;
            // Two processes starting at once for the first time: whichever writes the key
            // first wins, and the other loads the winner's identity below.
            if write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)? {
                write_new(&cert_path, self_signed_pem(&key)?.as_bytes(), 0o644)?;
            }
        }
        let key_pem = match read_key(&key_path)? {
            Some(key_pem) => key_pem,
            None => {
                return Err(IdentityError::KeyMissing {
                    cert: cert_path,
                    key: key_path,
                });
            }
        };
        let damaged = |what: String| IdentityError::Damaged {
            dir: dir.to_path_buf(),
            what,
        };
        let cert_pem = match read_text(&cert_path)? {
            Some(cert_pem) => cert_pem,
            None => {
                let key = rcgen::KeyPair::from_pem(&key_pem)
                    .map_err(|e| damaged(format!("private key: {e}")))?;
                // Someone else may rebuild it at the same moment: theirs is as good.
                write_new(&cert_path, self_signed_pem(&key)?.as_bytes(), 0o644)?;
                warnings.push(IdentityWarning::CertRebuilt {
                    cert: cert_path.clone(),
                });
                read_text(&cert_path)?.ok_or_else(|| damaged("certificate vanished".into()))?
            }
        };
        let identity = Self::from_pem(&cert_pem, &key_pem).map_err(damaged)?;
        Ok((identity, warnings))
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

/// The directory holding identity and `known_peers` (see [`crate::home::dir`]).
pub fn config_dir() -> Result<PathBuf, IdentityError> {
    crate::home::dir().map_err(|_| IdentityError::NoConfigDir)
}

/// The TLS server name every qpunch peer uses. Peers are identified by key, not by name,
/// so this is a constant that only satisfies the protocol (and our certificates carry it).
pub const SERVER_NAME: &str = "qpunch.invalid";

fn generate_pem() -> Result<(String, String), IdentityError> {
    let key = rcgen::KeyPair::generate()?;
    Ok((self_signed_pem(&key)?, key.serialize_pem()))
}

/// A self-signed certificate for `key`. The name is irrelevant (peers are identified by
/// key), but TLS needs one.
fn self_signed_pem(key: &rcgen::KeyPair) -> Result<String, IdentityError> {
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    Ok(params.self_signed(key)?.pem())
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

/// Write a new file atomically (see [`crate::durable`]) with permission bits `mode`;
/// `false` if it already exists (someone else wrote it first), which is left alone.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<bool, IdentityError> {
    match durable::write(path, contents, mode, Existing::Keep) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(IdentityError::Io {
            action: "cannot write",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A text file's contents; `None` if it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, IdentityError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io {
            action: "cannot read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The private key's PEM, refused if group or others may read or write it. The mode is
/// read from the opened file, so it is the mode of what we read.
fn read_key(path: &Path) -> Result<Option<String>, IdentityError> {
    let io = |source| IdentityError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source,
    };
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyExposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(io)?;
    Ok(Some(text))
}

/// The directory's permission bits if group or others may write to it.
fn group_or_other_writable(dir: &Path) -> Result<Option<u32>, IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(dir).map_err(|source| IdentityError::Io {
            action: "cannot inspect",
            path: dir.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        Ok((mode & 0o022 != 0).then_some(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(None)
    }
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

    #[cfg(unix)]
    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Like ssh: a private key others may read is not used, and the error says how to fix it.
    #[cfg(unix)]
    #[test]
    fn key_open_to_others_is_refused_like_ssh() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("cfg");
        let first = Identity::load_or_create(&home).unwrap();
        let key = home.join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o620] {
            chmod(&key, mode);
            let err = Identity::load_or_create(&home).unwrap_err();
            assert!(
                matches!(err, IdentityError::KeyExposed { mode: m, .. } if m == mode),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", key.display())),
                "{text}"
            );
        }
        chmod(&key, 0o400);
        let again = Identity::load_or_create(&home).unwrap();
        assert_eq!(again.fingerprint(), first.fingerprint());
    }

    #[cfg(unix)]
    #[test]
    fn config_dir_writable_by_others_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("cfg");
        let (_, warnings) = Identity::load_or_create_with_warnings(&home).unwrap();
        assert_eq!(warnings, [], "a fresh directory is private");
        chmod(&home, 0o777);
        let (_, warnings) = Identity::load_or_create_with_warnings(&home).unwrap();
        assert_eq!(
            warnings,
            [IdentityWarning::DirWritable {
                dir: home.clone(),
                mode: 0o777
            }]
        );
        assert!(
            warnings[0].to_string().contains("chmod 700"),
            "{}",
            warnings[0]
        );
        chmod(&home, 0o755);
        let (_, warnings) = Identity::load_or_create_with_warnings(&home).unwrap();
        assert_eq!(warnings, [], "readable by others is fine, as for ~/.ssh");
    }

    /// A crash between writing the key and the certificate: the certificate is rebuilt
    /// from the key, and the identity (its fingerprint) is the same.
    #[test]
    fn missing_certificate_is_rebuilt_from_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("cfg");
        let first = Identity::load_or_create(&home).unwrap();
        let key_before = fs::read(home.join(KEY_FILE)).unwrap();
        fs::remove_file(home.join(CERT_FILE)).unwrap();
        // And the crash left the temporary file of the certificate behind.
        fs::write(home.join(format!(".{CERT_FILE}.crashed.tmp")), "-----BEGIN").unwrap();

        let (rebuilt, warnings) = Identity::load_or_create_with_warnings(&home).unwrap();
        assert_eq!(rebuilt.fingerprint(), first.fingerprint());
        assert_eq!(
            warnings,
            [IdentityWarning::CertRebuilt {
                cert: home.join(CERT_FILE)
            }]
        );
        assert_eq!(fs::read(home.join(KEY_FILE)).unwrap(), key_before);
        // Written for good: the next load has nothing to say.
        let (again, warnings) = Identity::load_or_create_with_warnings(&home).unwrap();
        assert_eq!(
            (again.fingerprint(), warnings),
            (first.fingerprint(), vec![])
        );
    }

    #[test]
    fn certificate_without_key_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("cfg");
        Identity::load_or_create(&home).unwrap();
        fs::remove_file(home.join(KEY_FILE)).unwrap();
        let err = Identity::load_or_create(&home).unwrap_err();
        assert!(matches!(err, IdentityError::KeyMissing { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("move") && text.contains(CERT_FILE), "{text}");
        // Nothing was made up in its place.
        assert!(!home.join(KEY_FILE).exists());
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

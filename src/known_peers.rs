//! Trust on first use: the `known_peers` file, like ssh's `known_hosts`.
//!
//! When a sender reaches a receiver without `--peer`, the fingerprint it sees is written
//! down under the name the user typed (`host:port`). Next time, a different fingerprint
//! under the same name is refused: either the receiver got a new identity, or someone
//! sits in the middle, and only a human can tell which.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::identity::Fingerprint;

/// The file name inside the config directory.
pub const FILE: &str = "known_peers";

/// Errors reading or updating `known_peers`.
#[derive(Debug, thiserror::Error)]
pub enum KnownPeersError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is not `NAME FINGERPRINT`.
    #[error("{path}:{line}: not `host:port fingerprint`; fix or delete that line")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// The remembered peers, one `host:port fingerprint` per line; `#` starts a comment.
#[derive(Debug, Clone)]
pub struct KnownPeers {
    path: PathBuf,
    entries: Vec<(String, Fingerprint)>,
}

impl KnownPeers {
    /// Load `path`; a missing file is an empty list.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, KnownPeersError> {
        let path = path.into();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(KnownPeersError::Io { path, source }),
        };
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || KnownPeersError::Malformed {
                path: path.clone(),
                line: i + 1,
            };
            let mut words = line.split_whitespace();
            let (Some(name), Some(fp), None) = (words.next(), words.next(), words.next()) else {
                return Err(malformed());
            };
            entries.push((name.to_string(), fp.parse().map_err(|_| malformed())?));
        }
        Ok(KnownPeers { path, entries })
    }

    /// The fingerprint remembered for `name`, if any.
    pub fn get(&self, name: &str) -> Option<Fingerprint> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, fp)| *fp)
    }

    /// Remember `fingerprint` for `name`, appending to the file.
    pub fn remember(
        &mut self,
        name: &str,
        fingerprint: Fingerprint,
    ) -> Result<(), KnownPeersError> {
        let io = |source| KnownPeersError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(parent) = self.path.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        writeln!(file, "{name} {fingerprint}").map_err(io)?;
        self.entries.push((name.to_string(), fingerprint));
        Ok(())
    }

    /// Where the list lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn remembers_across_loads_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let fp = Identity::generate().unwrap().fingerprint();
        let mut peers = KnownPeers::load(&path).unwrap();
        assert_eq!(peers.get("example:9199"), None);
        peers.remember("example:9199", fp).unwrap();
        let again = KnownPeers::load(&path).unwrap();
        assert_eq!(again.get("example:9199"), Some(fp));
        assert_eq!(again.get("other:9199"), None);

        fs::write(&path, "# comment\n\nhost:1 notafingerprint\n").unwrap();
        let err = KnownPeers::load(&path).unwrap_err();
        assert!(err.to_string().contains(":3:"), "{err}");
    }
}

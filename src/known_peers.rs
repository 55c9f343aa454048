//! Trust on first use: the `known_peers` file, like ssh's `known_hosts`.
//!
//! When a sender reaches a receiver without `--peer`, the fingerprint it sees is written
//! down under the name the user typed (`host:port`). Next time, a different fingerprint
//! under the same name is refused: either the receiver got a new identity, or someone
//! sits in the middle, and only a human can tell which.
//!
//! The file is the user's as much as ours: a line we cannot read is skipped and reported
//! ([`KnownPeers::skipped`]), never fatal and never rewritten, so one typo does not stop
//! every later send. Updates write a new file and rename it over the old one, under a
//! lock, so two senders remembering at once both get their line in, and a crash leaves
//! the old file intact.

use std::fs;
use std::path::{Path, PathBuf};

use crate::durable::{self, Existing};
use crate::identity::Fingerprint;

/// The file name inside the config directory.
pub const FILE: &str = "known_peers";

/// The lock file next to [`FILE`]. The list itself cannot be locked: every update
/// replaces it with a new file (a new inode), so a lock on the old one would guard nothing.
pub const LOCK_FILE: &str = "known_peers.lock";

/// Permission bits of a new `known_peers` (an existing one keeps its own): what is
/// trusted is not secret, but only its owner should change it.
const NEW_FILE_MODE: u32 = 0o644;

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
}

/// The remembered peers, one `host:port fingerprint` per line; `#` starts a comment.
#[derive(Debug, Clone)]
pub struct KnownPeers {
    path: PathBuf,
    entries: Vec<(String, Fingerprint)>,
    skipped: Vec<usize>,
}

impl KnownPeers {
    /// Load `path`; a missing file is an empty list. Lines that are not
    /// `NAME FINGERPRINT` (nor blank, nor comments) are skipped: see [`skipped`](Self::skipped).
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, KnownPeersError> {
        let path = path.into();
        let bytes = read(&path)?;
        let (entries, skipped) = parse(&bytes);
        Ok(KnownPeers {
            path,
            entries,
            skipped,
        })
    }

    /// 1-based numbers of the lines that were not understood when the file was last read,
    /// for the user to fix; they are kept as they are when the file is updated.
    pub fn skipped(&self) -> &[usize] {
        &self.skipped
    }

    /// The fingerprint remembered for `name`, if any (the first, if several lines name it).
    pub fn get(&self, name: &str) -> Option<Fingerprint> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, fp)| *fp)
    }

    /// Remember `fingerprint` for `name`.
    ///
    /// Under an exclusive lock on [`LOCK_FILE`], the file is read again (another process
    /// may have added lines since [`load`](Self::load)), the line is appended to what is
    /// there, byte for byte, and the result replaces the file atomically. If the file
    /// already has exactly this line, nothing is written. `self` then reflects the file.
    pub fn remember(
        &mut self,
        name: &str,
        fingerprint: Fingerprint,
    ) -> Result<(), KnownPeersError> {
        let io = |source| KnownPeersError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        // Blocks while another process updates; released when `lock` is closed.
        lock.lock().map_err(io)?;

        let mut bytes = read(&self.path)?;
        let (entries, _) = parse(&bytes);
        let present = entries
            .iter()
            .any(|(n, fp)| n == name && *fp == fingerprint);
        if !present {
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                bytes.push(b'\n');
            }
            bytes.extend_from_slice(format!("{name} {fingerprint}\n").as_bytes());
            let mode = existing_mode(&self.path).unwrap_or(NEW_FILE_MODE);
            durable::write(&self.path, &bytes, mode, Existing::Replace).map_err(io)?;
        }
        (self.entries, self.skipped) = parse(&bytes);
        Ok(())
    }

    /// Where the list lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The file's bytes; a missing file is empty.
fn read(path: &Path) -> Result<Vec<u8>, KnownPeersError> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(KnownPeersError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The entries, and the 1-based numbers of lines that are not entries, blank or comments
/// (including lines that are not UTF-8).
fn parse(bytes: &[u8]) -> (Vec<(String, Fingerprint)>, Vec<usize>) {
    let (mut entries, mut skipped) = (Vec::new(), Vec::new());
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(line) else {
            skipped.push(i + 1);
            continue;
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let entry = match (words.next(), words.next(), words.next()) {
            (Some(name), Some(fp), None) => fp.parse().ok().map(|fp| (name.to_string(), fp)),
            _ => None,
        };
        match entry {
            Some(entry) => entries.push(entry),
            None => skipped.push(i + 1),
        }
    }
    (entries, skipped)
}

/// The permission bits of an existing file, which a rewrite keeps.
fn existing_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn fingerprint() -> Fingerprint {
        Identity::generate().unwrap().fingerprint()
    }

    #[test]
    fn remembers_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let fp = fingerprint();
        let mut peers = KnownPeers::load(&path).unwrap();
        assert_eq!(peers.get("example:9199"), None);
        peers.remember("example:9199", fp).unwrap();
        assert_eq!(peers.get("example:9199"), Some(fp));
        let again = KnownPeers::load(&path).unwrap();
        assert_eq!(again.get("example:9199"), Some(fp));
        assert_eq!(again.get("other:9199"), None);
        assert!(again.skipped().is_empty());
        // Remembering the same pair again writes nothing new.
        let before = fs::read(&path).unwrap();
        KnownPeers::load(&path)
            .unwrap()
            .remember("example:9199", fp)
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    /// A bad line is skipped and reported, the good lines around it still count, and
    /// remembering keeps the bad line byte for byte (it is the user's to fix).
    #[test]
    fn bad_lines_are_skipped_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let (a, b) = (fingerprint(), fingerprint());
        let mut original =
            format!("# comment\n\nhost:1 notafingerprint\na:1 {a}\nthree words {a}\n").into_bytes();
        // Line 6: not UTF-8. Line 7: no newline at the end of the file.
        original.extend_from_slice(b"\xff\xfe:1 ");
        original.extend_from_slice(format!("{a}\nno-newline-at-end").as_bytes());
        assert_eq!(original.iter().filter(|b| **b == b'\n').count(), 6);
        fs::write(&path, &original).unwrap();

        let mut peers = KnownPeers::load(&path).unwrap();
        assert_eq!(peers.skipped(), [3, 5, 6, 7]);
        assert_eq!(peers.get("a:1"), Some(a));
        assert_eq!(peers.get("host:1"), None);

        peers.remember("b:2", b).unwrap();
        let written = fs::read(&path).unwrap();
        original.extend_from_slice(format!("\nb:2 {b}\n").as_bytes());
        assert_eq!(written, original);
        let again = KnownPeers::load(&path).unwrap();
        assert_eq!(again.skipped(), [3, 5, 6, 7]);
        assert_eq!((again.get("a:1"), again.get("b:2")), (Some(a), Some(b)));
    }

    /// The file is replaced, never edited in place: a reader that opened the old file
    /// (or a crash in the middle of the update) sees the old content, whole.
    #[test]
    fn remember_replaces_the_file_and_never_edits_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let a = fingerprint();
        let old = format!("a:1 {a}\n");
        fs::write(&path, &old).unwrap();
        let mut reader = fs::File::open(&path).unwrap();
        // A crash during an earlier update left its temporary file behind.
        let stale = dir.path().join(format!(".{FILE}.crashed.tmp"));
        fs::write(&stale, "b:2 half-writ").unwrap();

        let mut peers = KnownPeers::load(&path).unwrap();
        assert!(peers.skipped().is_empty());
        peers.remember("b:2", fingerprint()).unwrap();

        let mut seen = String::new();
        std::io::Read::read_to_string(&mut reader, &mut seen).unwrap();
        assert_eq!(seen, old, "the old file was modified in place");
        let new = fs::read_to_string(&path).unwrap();
        assert!(new.starts_with(&old) && new.lines().count() == 2, "{new:?}");
        assert!(KnownPeers::load(&path).unwrap().get("b:2").is_some());
    }

    /// Many writers at once, each with a list loaded before any of them wrote: every
    /// line arrives, none is torn.
    #[test]
    fn concurrent_remembers_lose_nothing() {
        const WRITERS: usize = 8;
        const EACH: usize = 25;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let fp = fingerprint();
        let barrier = std::sync::Barrier::new(WRITERS);
        std::thread::scope(|scope| {
            for w in 0..WRITERS {
                let (path, barrier) = (&path, &barrier);
                scope.spawn(move || {
                    let mut peers = KnownPeers::load(path).unwrap();
                    barrier.wait();
                    for i in 0..EACH {
                        peers.remember(&format!("w{w}-{i}:1"), fp).unwrap();
                    }
                });
            }
        });
        let peers = KnownPeers::load(&path).unwrap();
        assert!(
            peers.skipped().is_empty(),
            "torn lines {:?}",
            peers.skipped()
        );
        for w in 0..WRITERS {
            for i in 0..EACH {
                assert_eq!(peers.get(&format!("w{w}-{i}:1")), Some(fp), "w{w}-{i} lost");
            }
        }
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, WRITERS * EACH);
    }
}

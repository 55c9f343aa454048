//! Whose key a sender expects at an address: a key given by the user, else the one
//! remembered in [`KnownPeers`], else trust on first use (like ssh).
//!
//! The policy lives here rather than in a front end so that every app embedding qpunch
//! makes the same three checks in the same order: (1) with nothing pinned, the probe
//! reply must come from the address the probe went to, because a reply is matched by its
//! transaction id, not its source, and anyone who saw the probe could answer from
//! elsewhere and be trusted; (2) a key that differs from the pin is refused, and the
//! refusal says whether the user's own pin or the remembered one was contradicted;
//! (3) the key that passed is remembered under the name the user typed.
//! Front ends only render what [`Trust`] decides.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::identity::Fingerprint;
use crate::known_peers::{KnownPeers, KnownPeersError};
use crate::punch::same_endpoint;

/// Why a sender must not go on with a peer.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Nothing was pinned, and the probe reply came from another address than the one
    /// probed: whoever answered might be someone who only saw the probe.
    #[error("the probe reply came from {answered}, not from {target} where the probe went")]
    ReplyFromElsewhere {
        /// Where the probe went.
        target: SocketAddr,
        /// Where the reply came from (IPv4-mapped addresses shown as IPv4).
        answered: SocketAddr,
    },
    /// The peer presented another key than the one the user gave.
    #[error("the peer at {key} presented identity {actual}, not the expected {expected}")]
    NotTheGivenKey {
        /// The name the user typed.
        key: String,
        /// The key the user gave.
        expected: Fingerprint,
        /// The key the peer presented.
        actual: Fingerprint,
    },
    /// The peer presented another key than the one remembered for its name.
    #[error("the peer at {key} presented identity {actual}, but {} remembers {expected}", known_peers.display())]
    Changed {
        /// The name the user typed.
        key: String,
        /// The remembered key.
        expected: Fingerprint,
        /// The key the peer presented.
        actual: Fingerprint,
        /// The file that remembers it.
        known_peers: PathBuf,
    },
    /// The key could not be remembered.
    #[error(transparent)]
    KnownPeers(#[from] KnownPeersError),
}

/// How a peer came to be trusted (see [`Trust::accept`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustDecision {
    /// It showed the key that was given or remembered.
    Pinned,
    /// Nothing was pinned: its key is trusted on first use and now remembered in `file`.
    FirstUse {
        /// The known_peers file that remembers it.
        file: PathBuf,
    },
}

/// The trust decision for one name (`host:port` as the user typed it).
#[derive(Debug)]
pub struct Trust {
    known: KnownPeers,
    key: String,
    given: Option<Fingerprint>,
    remembered: Option<Fingerprint>,
}

impl Trust {
    /// Trust for `key` with the user's own pin `given` (if any) and what `known` remembers.
    pub fn new(known: KnownPeers, key: impl Into<String>, given: Option<Fingerprint>) -> Self {
        let key = key.into();
        let remembered = known.get(&key);
        Trust {
            known,
            key,
            given,
            remembered,
        }
    }

    /// The name the decision is about.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The known_peers file consulted.
    pub fn known_peers(&self) -> &KnownPeers {
        &self.known
    }

    /// The key to require in the TLS handshake: the given one wins over the remembered
    /// one; `None` means trust on first use.
    pub fn expected(&self) -> Option<Fingerprint> {
        self.given.or(self.remembered)
    }

    /// Check 1: may a peer that `answered` our probe to `target` be connected to? With a
    /// pin the address does not matter (TLS refuses any other key); without one it must
    /// be where the probe went.
    pub fn check_reply(&self, target: SocketAddr, answered: SocketAddr) -> Result<(), TrustError> {
        if self.expected().is_none() && !same_endpoint(answered, target) {
            let answered = SocketAddr::new(answered.ip().to_canonical(), answered.port());
            return Err(TrustError::ReplyFromElsewhere { target, answered });
        }
        Ok(())
    }

    /// Check 2: the error for a handshake that showed `actual` where `expected` was pinned.
    pub fn mismatch(&self, expected: Fingerprint, actual: Fingerprint) -> TrustError {
        let key = self.key.clone();
        if self.given.is_some() {
            TrustError::NotTheGivenKey {
                key,
                expected,
                actual,
            }
        } else {
            TrustError::Changed {
                key,
                expected,
                actual,
                known_peers: self.known.path().to_path_buf(),
            }
        }
    }

    /// Check 3: the handshake proved `actual` (which matched any pin): remember it under
    /// the name if nothing was remembered yet, and say how it came to be trusted.
    pub fn accept(&mut self, actual: Fingerprint) -> Result<TrustDecision, TrustError> {
        if let Some(expected) = self.expected()
            && expected != actual
        {
            return Err(self.mismatch(expected, actual));
        }
        if self.remembered.is_none() {
            self.known.remember(&self.key, actual)?;
            self.remembered = Some(actual);
            if self.given.is_none() {
                return Ok(TrustDecision::FirstUse {
                    file: self.known.path().to_path_buf(),
                });
            }
        }
        Ok(TrustDecision::Pinned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn fp() -> Fingerprint {
        Identity::generate().unwrap().fingerprint()
    }

    fn known(dir: &tempfile::TempDir) -> KnownPeers {
        KnownPeers::load(dir.path().join("known_peers")).unwrap()
    }

    #[test]
    fn first_use_is_remembered_then_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let key = fp();
        let mut trust = Trust::new(known(&dir), "host:9199", None);
        assert_eq!(trust.expected(), None);
        assert!(matches!(
            trust.accept(key).unwrap(),
            TrustDecision::FirstUse { .. }
        ));
        // The next send expects that key, and refuses another as changed.
        let mut again = Trust::new(known(&dir), "host:9199", None);
        assert_eq!(again.expected(), Some(key));
        assert_eq!(again.accept(key).unwrap(), TrustDecision::Pinned);
        let other = fp();
        assert!(matches!(
            again.accept(other),
            Err(TrustError::Changed { actual, .. }) if actual == other
        ));
    }

    #[test]
    fn a_given_key_wins_and_is_remembered_silently() {
        let dir = tempfile::tempdir().unwrap();
        let (remembered, given) = (fp(), fp());
        known(&dir).remember("a:1", remembered).unwrap();
        let trust = Trust::new(known(&dir), "a:1", Some(given));
        assert_eq!(trust.expected(), Some(given));
        assert!(matches!(
            trust.mismatch(given, remembered),
            TrustError::NotTheGivenKey { .. }
        ));
        let mut fresh = Trust::new(known(&dir), "b:1", Some(given));
        assert_eq!(fresh.accept(given).unwrap(), TrustDecision::Pinned);
        assert_eq!(known(&dir).get("b:1"), Some(given));
    }

    #[test]
    fn an_unpinned_reply_must_come_from_the_probed_address() {
        let dir = tempfile::tempdir().unwrap();
        let target: SocketAddr = "192.0.2.1:9199".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:9199".parse().unwrap();
        let elsewhere: SocketAddr = "[::ffff:198.51.100.9]:4000".parse().unwrap();
        let trust = Trust::new(known(&dir), "192.0.2.1:9199", None);
        assert!(trust.check_reply(target, mapped).is_ok());
        match trust.check_reply(target, elsewhere) {
            Err(TrustError::ReplyFromElsewhere { answered, .. }) => {
                assert_eq!(answered.to_string(), "198.51.100.9:4000")
            }
            other => panic!("{other:?}"),
        }
        // With a pin, TLS decides: the address does not matter.
        let pinned = Trust::new(known(&dir), "192.0.2.1:9199", Some(fp()));
        assert!(pinned.check_reply(target, elsewhere).is_ok());
    }
}

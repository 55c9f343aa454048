//! Naming the two versions when a sender and a receiver speak different file protocols.
//!
//! A QUIC handshake with no application protocol in common ends in a bare TLS alert
//! (`no_application_protocol`, transport error 0x178): neither user learns what the other
//! runs. So both sides also *offer* the older files ALPNs they know of ([`OLD_ALPNS`]),
//! after their own, only to be able to name them: a handshake with an older peer then
//! succeeds on the older ALPN, and whichever side notices ([`check`]) closes the
//! connection at once with [`codes::VERSION`](super::codes::VERSION) and a reason that
//! names both versions and the side to upgrade. Nothing of the old protocol is spoken.
//!
//! rustls picks the *server's* first protocol that the client also offers, and every
//! current qpunch lists [`ALPN`] first, so two current peers always agree on it.
//!
//! A *newer* peer that no longer lists our version refuses us with the bare alert:
//! [`crate::tls::is_no_common_protocol`] recognises it, for
//! [`VersionError::NoCommonProtocol`].

use super::ALPN;

/// Files ALPNs of earlier releases, oldest first: offered after [`ALPN`] only to name the
/// version of a peer that speaks one of them.
pub const OLD_ALPNS: &[&[u8]] = &[b"qpunch-files/1", b"qpunch-files/2"];

/// The files ALPNs a node offers: [`ALPN`] first (so that it wins), then [`OLD_ALPNS`].
pub fn alpns() -> Vec<Vec<u8>> {
    std::iter::once(ALPN)
        .chain(OLD_ALPNS.iter().copied())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Which end of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that offers files.
    Sender,
    /// The side that stores them.
    Receiver,
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::Sender => Role::Receiver,
            Role::Receiver => Role::Sender,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        })
    }
}

/// The two sides speak different versions of the files protocol.
///
/// Messages may carry text the peer chose (its close reason): it is escaped when
/// displayed (see [`crate::text`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// We noticed: the peer negotiated an older files ALPN.
    #[error(
        "version mismatch: the {older} speaks {theirs} and the {newer} {ours}: upgrade the {older}",
        newer = .older.other()
    )]
    PeerOlder {
        /// The peer's role (the side to upgrade).
        older: Role,
        /// The ALPN the peer speaks.
        theirs: String,
        /// Ours ([`ALPN`]).
        ours: String,
    },
    /// The peer noticed, and closed with [`codes::VERSION`](super::codes::VERSION) and
    /// this reason (which names both versions).
    #[error("the peer refused our version: {}", crate::text::peer(.0))]
    Refused(String),
    /// The peer refused the handshake: it speaks none of our ALPNs (a newer peer that
    /// dropped ours, or not a qpunch at all).
    #[error(
        "the peer does not speak {} (ours); it is probably a different version: run \
         `qpunch --version` on both sides; the older side should upgrade",
        String::from_utf8_lossy(ALPN)
    )]
    NoCommonProtocol,
}

/// The files ALPN `connection` negotiated, when it is one of [`OLD_ALPNS`]: then `peer`
/// (its role) is older than us, and the error says so. Any other ALPN (ours, the meet
/// protocol, an application's own) passes.
pub fn check(connection: &quinn::Connection, peer: Role) -> Result<(), VersionError> {
    match negotiated(connection) {
        Some(alpn) if OLD_ALPNS.contains(&alpn.as_slice()) => Err(VersionError::PeerOlder {
            older: peer,
            theirs: String::from_utf8_lossy(&alpn).into_owned(),
            ours: String::from_utf8_lossy(ALPN).into_owned(),
        }),
        _ => Ok(()),
    }
}

/// [`check`], and on a mismatch close `connection` with
/// [`codes::VERSION`](super::codes::VERSION) and the error's text, so that the peer (of
/// any version: older ones show a close reason as it is) reads the same sentence.
pub fn check_or_close(connection: &quinn::Connection, peer: Role) -> Result<(), VersionError> {
    check(connection, peer).inspect_err(|e| {
        let reason = e.to_string();
        crate::close_gate::close(connection, super::codes::VERSION.into(), reason.as_bytes());
    })
}

/// The ALPN a connection negotiated.
fn negotiated(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpns_put_the_current_version_first() {
        let alpns = alpns();
        assert_eq!(alpns[0], ALPN);
        assert_eq!(alpns.len(), 1 + OLD_ALPNS.len());
        assert!(!OLD_ALPNS.contains(&ALPN), "the current ALPN is not old");
    }

    #[test]
    fn a_mismatch_names_both_versions_and_the_side_to_upgrade() {
        let e = VersionError::PeerOlder {
            older: Role::Sender,
            theirs: "qpunch-files/2".into(),
            ours: "qpunch-files/3".into(),
        };
        assert_eq!(
            e.to_string(),
            "version mismatch: the sender speaks qpunch-files/2 and the receiver \
             qpunch-files/3: upgrade the sender"
        );
    }

    #[test]
    fn a_refusal_escapes_the_peers_reason() {
        let e = VersionError::Refused("old\n\u{1b}[2J".into());
        assert!(!e.to_string().contains(['\n', '\u{1b}']), "{e}");
    }
}

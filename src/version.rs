//! The protocol versions this build speaks, read off the constants that define them.
//!
//! Two qpunches that do not talk are usually two versions: `qpunch --version` prints
//! [`summary`] and [`alpns`] so that two users can compare, and an app that embeds qpunch
//! can print the same. The numbers are not kept here but taken from each protocol's own
//! constant, so they cannot drift from what is on the wire.

use crate::{meet, rendezvous, tcp, transfer, wire};

/// One protocol and the version of it this build speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// Short name, as `qpunch --version` prints it.
    pub name: &'static str,
    /// The version number.
    pub version: u32,
}

/// The protocols a user may need to compare, bottom up: the probe datagrams
/// ([`wire::VERSION`]), the file transfer ([`transfer::ALPN`]), the meeting by code
/// ([`meet::pake::VERSION`]) and the rendezvous ([`rendezvous::VERSION`]).
pub fn protocols() -> [Protocol; 4] {
    [
        Protocol {
            name: "probe",
            version: wire::VERSION.into(),
        },
        Protocol {
            name: "files",
            version: alpn_version(transfer::ALPN),
        },
        Protocol {
            name: "meet",
            version: meet::pake::VERSION.into(),
        },
        Protocol {
            name: "rendezvous",
            version: rendezvous::VERSION.into(),
        },
    ]
}

/// `probe 1, files 3, meet 2, rendezvous 2`: [`protocols`] on one line.
pub fn summary() -> String {
    protocols()
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every ALPN this build offers as its own, comma-separated (the exact strings a TLS
/// handshake compares).
pub fn alpns() -> String {
    [transfer::ALPN, meet::lan::ALPN, rendezvous::ALPN, tcp::ALPN]
        .iter()
        .map(|a| String::from_utf8_lossy(a))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The number after the last `/` of an ALPN like `qpunch-files/3`.
fn alpn_version(alpn: &[u8]) -> u32 {
    let text = std::str::from_utf8(alpn).expect("our ALPNs are ASCII");
    let (_, number) = text.rsplit_once('/').expect("our ALPNs end in /N");
    number.parse().expect("our ALPNs end in a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_takes_the_numbers_from_the_protocols() {
        let files = std::str::from_utf8(transfer::ALPN).unwrap();
        let files = files.rsplit_once('/').unwrap().1;
        assert_eq!(
            summary(),
            format!(
                "probe {}, files {files}, meet {}, rendezvous {}",
                wire::VERSION,
                meet::pake::VERSION,
                rendezvous::VERSION
            )
        );
        // The rendezvous says its version twice; they must agree.
        assert_eq!(
            alpn_version(rendezvous::ALPN),
            u32::from(rendezvous::VERSION)
        );
    }

    #[test]
    fn alpns_lists_every_own_protocol() {
        let alpns = alpns();
        for alpn in [transfer::ALPN, meet::lan::ALPN, rendezvous::ALPN, tcp::ALPN] {
            assert!(
                alpns.contains(std::str::from_utf8(alpn).unwrap()),
                "{alpns}"
            );
        }
    }
}

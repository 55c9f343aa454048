//! Meeting by code with no server at all: two peers on one network find each other by
//! multicast DNS (mDNS, RFC 6762, with DNS-SD, RFC 6763), then prove the code to each other
//! over the direct QUIC connection itself. Two laptops on one Wi-Fi need no rendezvous and
//! no internet.
//!
//! ```text
//! receiver (printed 7-clockwork-crossover)                  sender (typed it in)
//!  announce _qpunch._udp.local.  ◀──────────────────────────  browse: who has nameplate 7?
//!   instance "qpunch-7-…", TXT v=1 np=7, port, addresses ───▶  found (and 300 ms for rivals)
//!  ◀════ QUIC + TLS 1.3, ALPN qpunch-meet/1, unpinned (no key is known yet) ═════
//!  ◀── SPAKE2 message ──────────────────────────────────────── Pake::start(code, Sender)
//!  ── SPAKE2 message ─────────────────────────────────────────▶
//!  ◀── bind tag over the TLS fingerprints the sender sees ────
//!  takes the code (one try), checks the tag, admits the sender (a ticket)
//!  ── bind tag over the TLS fingerprints the receiver sees ──▶ checks it
//!  ◀════ the same connection: manifest, files (the qpunch-files/1 protocol) ══════
//! ```
//!
//! **Why a separate ALPN.** The receiver offers `qpunch-meet/1` next to the files ALPN, and
//! a sender holding a code asks for it. The protocol is then fixed at the handshake: the
//! receiver knows before reading a byte that this connection must prove a code first (a
//! files connection never sees a meet stream, a meet connection never reaches the files
//! protocol unproven), a receiver without an open code or an old qpunch refuses it cleanly
//! (no common ALPN, or [`codes::NO_CODE`]), and a change to the exchange is a new ALPN.
//! After the exchange the connection speaks the files protocol unchanged, so the sender's
//! manifest arrives on the connection that proved the code: "meet, then files".
//!
//! **Why the fingerprints are bound.** Neither side knows the other's key, so the TLS
//! handshake pins nothing, and someone on the LAN could splice two connections, relaying
//! the PAKE messages unchanged (then both sides derive the same keys). The bind tags
//! ([`SessionKeys::bind`](crate::meet::pake::SessionKeys::bind)/[`SessionKeys::confirm`](crate::meet::pake::SessionKeys::confirm)) cover the fingerprints each side
//! *sees*, which differ across a splice, and can only be made with the code.
//!
//! **Hostile LAN peers.** Anyone on the network can browse the announcement and connect.
//! - *A guess costs the code.* The receiver checks exactly one tag per code: the first tag
//!   to arrive takes the code out ([`Desk`]), right or wrong; a wrong one burns it (the
//!   announcement is withdrawn, a new code is made) and costs the guesser its one chance
//!   in 65 536.
//! - *The sender shows its tag first.* A receiver's tag would let whoever holds it test
//!   their one guess offline, so the receiver sends it only after the sender's checked
//!   out. A connection that stalls, or leaves after the PAKE messages, has learned nothing
//!   and so does not use up the code, and nobody can hold the code hostage: exchanges run
//!   in parallel, and only the tag check is exclusive.
//! - *Impostors make the sender refuse, not guess.* The sender connects to every address
//!   announced for the nameplate, and if more than one identity answers it refuses
//!   ([`LanError::Ambiguous`]) before any PAKE: a peer announcing the same nameplate next
//!   to the receiver gets no guess against the sender's code. (One that can also silence
//!   the receiver, by spoofing ARP say, gets the single guess a code allows.)
//! - *Strangers stay guarded.* Meet connections come through the same
//!   [`crate::server::Server`] budgets as any other, run on the guarded windows (the files
//!   protocol opens them only after the manifest), read fixed-size messages only, and
//!   must finish within [`EXCHANGE_TIMEOUT`].
//! - *What a LAN peer says is checked or escaped.* Announcements are parsed strictly (a
//!   nameplate that is not `a-z0-9`, another version, no usable address: ignored and
//!   counted), and close reasons are escaped before they reach an error message.
//!
//! **What is announced.** The nameplate, the protocol version, a port and addresses. No
//! fingerprint (a long-lived identity broadcast to everyone would let any observer follow
//! the machine from network to network), and a random host name, not the machine's.

use std::net::SocketAddr;
use std::time::Duration;

use rand::RngExt;

use super::code::Nameplate;
use super::pake::PakeError;
use crate::node::NodeError;

mod mdns;
mod prove;

pub use mdns::{Announced, Announcement, BadAnnouncement, Lan, Sightings, read_announcement, txt};
pub use prove::{Desk, Dialed, Door, LanStats, Opened, Outcome, dial, meet_at};

/// The DNS-SD service type receivers announce.
pub const SERVICE_TYPE: &str = "_qpunch._udp.local.";
/// The ALPN of a connection that proves a code, then carries the files protocol.
pub const ALPN: &[u8] = b"qpunch-meet/1";
/// TXT key of the meet protocol version ([`crate::meet::pake::VERSION`]).
pub const TXT_VERSION: &str = "v";
/// TXT key of the nameplate.
pub const TXT_NAMEPLATE: &str = "np";
/// How long a sender looks for the receiver by default.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(5);
/// After the first announcement (or answer) for a nameplate, how long to wait for rivals.
pub const SETTLE: Duration = Duration::from_millis(300);
/// How long one connection attempt to an announced address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole exchange on a meet connection (both PAKE messages and both tags).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most addresses a sender tries (and keeps per announcement).
pub const MAX_ADDRESSES: usize = 8;
/// How long the ticket of a sender that proved the code lasts: it is used on the same
/// connection right away.
pub const ADMIT_TTL: Duration = Duration::from_secs(60);
/// Codes a long-running receiver should let be burned before it stops making new ones:
/// each wrong tag is one guess in 65 536, and a receiver that made codes forever would
/// give a patient guesser on the LAN as many guesses as it liked.
pub const MAX_WRONG_CODES: u32 = 3;
/// LAN nameplates are numbers below this: no allocator hands them out, so they are
/// random, and three digits keep a clash between two receivers on one network rare.
pub const NAMEPLATES: u32 = 1000;

/// QUIC application error codes of a meet connection (distinct from
/// [`crate::transfer::codes`], which the same connection uses afterwards).
pub mod codes {
    /// The receiver has no open code (used, expired, or replaced): nothing was guessed.
    pub const NO_CODE: u32 = 16;
    /// The tag did not check out: the code is burned.
    pub const WRONG_CODE: u32 = 17;
    /// A malformed message, another version, or a stall.
    pub const PROTOCOL: u32 = 18;
    /// The sender saw more than one identity answer for the nameplate.
    pub const AMBIGUOUS: u32 = 19;
}

/// A fresh random LAN nameplate (`1` to `999`).
pub fn random_nameplate() -> Nameplate {
    Nameplate::from(rand::rng().random_range(1..NAMEPLATES))
}

/// Why a LAN meeting failed. Messages are for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum LanError {
    /// The mDNS responder could not start or was refused an operation.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// Nobody announced the nameplate in time.
    #[error(
        "no receiver on this network announces nameplate {nameplate} (looked for {} s): is \
         `qpunch receive` running on this network, without a rendezvous? (codes made through \
         a rendezvous need --via)",
        .waited.as_secs_f64()
    )]
    NotFound {
        /// The nameplate looked for.
        nameplate: Nameplate,
        /// How long.
        waited: Duration,
    },
    /// More than one receiver answered for the nameplate (two announcements of it, or two
    /// identities on the connections): two receivers picked the same one, or someone is
    /// impersonating the receiver. No guess was made.
    #[error(
        "{identities} different machines on this network answer for nameplate {nameplate}: \
         two receivers chose the same one, or someone is impersonating the receiver. \
         Nothing was sent and the code was not tried: ask for a new code"
    )]
    Ambiguous {
        /// The nameplate.
        nameplate: Nameplate,
        /// How many distinct receivers answered: announcements seen while browsing, or
        /// identities that answered the connections.
        identities: usize,
    },
    /// No announced address answered a QUIC handshake.
    #[error("the receiver announced {tried:?} but none answered: {last}")]
    Unreachable {
        /// The addresses tried.
        tried: Vec<SocketAddr>,
        /// The last failure (escaped).
        last: String,
    },
    /// The tags did not check out: a mistyped code, a guess, or a spliced connection.
    #[error(
        "the code did not match: it was mistyped, or someone tampered with the connection. \
         It cannot be used again: ask for a new code"
    )]
    WrongCode,
    /// The receiver has no open code (it was used, or expired, or is being replaced).
    #[error("the receiver has no open code any more (used, or expired): ask for a new code")]
    NoCode,
    /// The exchange did not finish in time.
    #[error("the receiver did not finish the code exchange within {0:?}")]
    Timeout(Duration),
    /// The peer broke the meet protocol (its words, escaped).
    #[error("meeting protocol: {}", crate::text::peer(.0))]
    Protocol(String),
    /// The PAKE refused the peer's message (another version, or not a SPAKE2 message).
    #[error("meeting protocol: {0}")]
    Pake(PakeError),
    /// Sockets or QUIC failed.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<mdns_sd::Error> for LanError {
    fn from(e: mdns_sd::Error) -> Self {
        LanError::Mdns(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_nameplates_are_short_numbers() {
        for _ in 0..200 {
            let n: u32 = random_nameplate().as_str().parse().unwrap();
            assert!((1..NAMEPLATES).contains(&n));
        }
    }
}

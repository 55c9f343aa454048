//! Meet by code: find a peer through an untrusted rendezvous with a short one-time code.
//!
//! `qpunch receive` prints a code like `7-clockwork-crossover`; the other person types it
//! into `qpunch send`. The **nameplate** (`7`) is public and is all the rendezvous sees: it
//! pairs the two peers and relays their messages. The **words** are a secret that never
//! leaves either machine: both peers run a PAKE (SPAKE2) keyed by the whole code, so they
//! end up with shared keys that the rendezvous, or anyone guessing the code, cannot
//! compute. Under those keys each peer sends a sealed hello: its TLS fingerprint and its
//! addresses. The QUIC handshake then pins that fingerprint, so a rendezvous that lies can
//! only make the meeting fail, never insert itself.
//!
//! Meet sits above [`crate::rendezvous`] (whose client [`session`] drives, and whose
//! [`Nameplate`](code::Nameplate) and message sizes [`code`] and [`pake`] re-export) and
//! above the leaf [`crate::nat`]; nothing below imports it.
//!
//! - [`code`]: the codes, their word list, lenient parsing with typo help.
//! - [`pake`]: the PAKE, the sealed hello, and key confirmation over an existing
//!   connection. Sans-IO: bytes in, bytes out, randomness injected.
//! - [`candidates`]: our addresses to offer, and what kind each of the peer's is.
//! - [`session`]: both ends of a meeting through a [`crate::rendezvous`], then the punch
//!   ([`crate::traverse`], birthday included) and, for the sender, the pinned connection.
//! - [`strategy`]: which technique each side uses, and how long it waits, by both NATs'
//!   mapping behaviour (pure, with the whole NAT matrix tested).
//! - [`lan`]: meeting with no rendezvous at all, on one network: the receiver announces
//!   the nameplate by mDNS, and the PAKE runs over the direct connection itself.

pub mod candidates;
pub mod code;
pub mod guesses;
pub mod lan;
pub mod pake;
pub mod session;
pub mod strategy;

pub use session::{MeetError, MeetEvents, Meeting, Met, Silent, Welcomed};
pub use strategy::MeetConfig;

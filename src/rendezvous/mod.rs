//! The rendezvous: where two peers that cannot reach each other yet meet by nameplate.
//!
//! A rendezvous is a small public server (`qpunch rendezvous`, UDP 9200). It is
//! **untrusted**: it sees nameplates, public addresses and opaque PAKE messages, never the
//! code's secret words, never who the peers really are. What it does:
//!
//! 1. It tells a client how it sees it: the client's public (server-reflexive) address,
//!    observed on the very socket that will carry the client's QUIC connections, and its
//!    own addresses, so the client can classify its NAT ([`crate::natcheck`]): probes to a
//!    second port and a second address, and replies sent *from* them on request.
//! 2. A receiver *opens* a nameplate (chosen by the rendezvous, or by the client) with its
//!    first PAKE message; a sender *joins* it with its own. The rendezvous pairs them at
//!    once: each gets the other's PAKE message and public address, so both start punching
//!    at the same moment.
//! 3. It relays one sealed hello each way (opaque to it) and, when a peer says the code was
//!    wrong, tells the other. A nameplate is single use: it is gone after one join.
//! 4. When no direct path can be punched, it relays the pair's QUIC packets: QUIC DATAGRAM
//!    frames tagged [`RELAY_PACKET`] on either peer's connection to it are passed unchanged
//!    to the other's ([`RelayGrant`] says within which limits, [`RelayLink`] is the peer's
//!    side, a [`crate::path::Carrier`]). The packets are end-to-end encrypted; a third
//!    connection cannot reach a pair (see `slot.rs`).
//!
//! The protocol is QUIC (ALPN [`ALPN`]), one bidirectional stream per exchange, messages
//! as length-prefixed JSON ([`crate::frame`]). Every connection must first pass a QUIC
//! Retry, so nothing the rendezvous sends to an unvalidated address is larger than what it
//! received.
//!
//! **Layering.** The rendezvous sits *below* [`crate::meet`] and [`crate::natcheck`]: it
//! owns the wire protocol, its client, and what it carries ([`Nameplate`],
//! [`PAKE_MSG_LEN`], [`MAX_SEALED`]), and knows nothing of codes' words, the PAKE or NAT
//! classes. The meeting (`meet::session`) and the NAT check drive its client; `meet::code`
//! and `meet::pake` re-export what they share with it. So the order is a line:
//! `node -> server -> rendezvous -> natcheck, meet -> cli`.
//!
//! Rooms: `book.rs` is the pairing book, sans-IO (register, join, PAKE relay, expiry,
//! limits) with its unit tests; `server.rs` drives it on QUIC streams; `slot.rs` is the
//! relay between a paired receiver and sender, `relay.rs` the peer's end of it; `reflector.rs`
//! answers NAT checks on the second port and from other addresses; `held.rs` is a
//! connection's idle bookkeeping and `events.rs` what the operator is told (both shared by
//! the server and its slots); `client.rs` is the peer's side; `nameplate.rs` the one name
//! both sides share.

mod book;
mod client;
mod events;
mod held;
mod nameplate;
mod reflector;
mod relay;
mod server;
mod slot;

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use client::{
    CONNECT_TIMEOUT, ClientError, ConnectOptions, Exchange, Opened, Paired, RendezvousClient,
    TcpMode, Transport, UDP_HEAD_START, Welcome,
};
pub use events::{NoEvents, RendezvousEvents};
pub(crate) use nameplate::shown;
pub use nameplate::{MAX_NAMEPLATE_LEN, Nameplate, NameplateError};
pub use relay::RelayLink;
pub use server::{
    Bound, IDLE_CLOSE, RELAY_EXPIRED, RELAY_QUOTA, RelayLimits, Rendezvous, RendezvousConfig,
    RendezvousStats, TcpPort, TurnMint,
};

/// ALPN of the rendezvous protocol. Version 2: [`Response::Paired`] no longer carries the
/// peer's address (addresses travel only in the sealed hellos), so a client or server of
/// version 1 fails at the handshake ("no application protocol") instead of mid-exchange.
pub const ALPN: &[u8] = b"qpunch-rendezvous/2";
/// Default UDP port of a rendezvous; the next port answers probes only (NAT checks).
pub const DEFAULT_PORT: u16 = 9200;
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 8 << 10;
/// Protocol version carried in [`Response::Welcome`] (the one in [`ALPN`]).
pub const VERSION: u8 = 2;
/// Length of a PAKE message the rendezvous relays: the meet protocol's version byte and
/// SPAKE2's side byte plus point. [`crate::meet::pake`] builds them, to this length.
pub const PAKE_MSG_LEN: usize = 1 + 33;
/// Largest sealed hello the rendezvous relays: a hello of at most 2048 bytes and its
/// 16-byte authentication tag ([`crate::meet::pake`] checks at compile time that they fit).
pub const MAX_SEALED: usize = 2048 + 16;

/// What a client asks. The first request of a stream says what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// How do you see me, and where are you? Answered with [`Response::Welcome`].
    Info,
    /// Receiver: reserve a nameplate (this one, or any free one) for `ttl_secs`.
    /// Answered with [`Response::Opened`]; the receiver then sends [`Request::Pake`] (its
    /// PAKE message depends on the whole code, nameplate included), and gets
    /// [`Response::Paired`] when a sender joins.
    Open {
        /// A nameplate the client chose (`qpunch receive --code`), or `None`.
        nameplate: Option<String>,
        /// Lifetime requested; the rendezvous may shorten it.
        ttl_secs: u32,
    },
    /// Receiver, after [`Response::Opened`]: its PAKE message. Until it arrives, the
    /// nameplate cannot be joined.
    Pake {
        /// The receiver's PAKE message, hex.
        pake: String,
    },
    /// Sender: pair with the receiver waiting on `nameplate`. Answered with
    /// [`Response::Paired`] (or an error).
    Join {
        /// The code's public part.
        nameplate: String,
        /// The sender's PAKE message, hex.
        pake: String,
    },
    /// After pairing: pass this sealed hello (hex, opaque) to the peer.
    Seal {
        /// The sealed hello.
        sealed: String,
    },
    /// After pairing: the meeting failed here (the peer's hello did not open: wrong code,
    /// or tampering); tell the peer.
    Fail {
        /// For the peer's user.
        reason: String,
    },
    /// NAT check: send a probe reply with `txid` to my address, from your other address
    /// (`change_ip`) or your other port (`change_port`). Answered with
    /// [`Response::Reflected`] once sent.
    Reflect {
        /// The probe transaction id to echo, hex (24 digits).
        txid: String,
        /// Send from the rendezvous's other IP address.
        change_ip: bool,
        /// Send from the rendezvous's other port.
        change_port: bool,
    },
}

/// What the rendezvous answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Info`].
    Welcome {
        /// [`VERSION`].
        version: u8,
        /// The client's address as seen here.
        observed: SocketAddr,
        /// The rendezvous's own addresses (for NAT checks: probe each, same port).
        addrs: Vec<IpAddr>,
        /// The second port that answers probes.
        alt_port: u16,
    },
    /// The nameplate is reserved.
    Opened {
        /// The nameplate.
        nameplate: String,
        /// Seconds until it expires.
        expires_secs: u32,
        /// The client's address as seen here.
        observed: SocketAddr,
    },
    /// The peer is here. Its address is not given: before the PAKE, anyone who joins
    /// would learn it, and an address the rendezvous gives is one it could make up. Each
    /// side puts its own `observed` address into its sealed hello instead.
    Paired {
        /// The peer's PAKE message, hex.
        pake: String,
        /// Our own address as seen here.
        observed: SocketAddr,
        /// The relay slot the rendezvous opened for this pair (see [`RelayGrant`]); `None`
        /// when it relays nothing (relaying off, or a side without datagram support).
        /// Absent in the JSON of older rendezvous, hence the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay: Option<RelayGrant>,
        /// Short-lived credentials for the rendezvous's TURN server, minted for this side of
        /// this pairing (see [`TurnGrant`]). Absent from older rendezvous (and ignored by
        /// older clients, which skip unknown fields): optional, so no protocol version bump.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        turn: Option<TurnGrant>,
    },
    /// The peer's sealed hello, hex.
    Sealed {
        /// Opaque to the rendezvous.
        sealed: String,
    },
    /// The peer reported failure (what it said is peer text: print it escaped).
    PeerFailed {
        /// The peer's reason.
        reason: String,
    },
    /// The reflected probe reply was sent.
    Reflected,
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

/// What the rendezvous relays for one pair: QUIC DATAGRAM frames on each side's connection
/// to it, each a tag byte ([`RELAY_PACKET`]) and an opaque payload, passed unchanged to the
/// partner's connection. The payloads are the peers' own QUIC packets, end-to-end
/// encrypted: the rendezvous holds no key to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayGrant {
    /// Bytes the pair may relay, both directions together (tags included); past them the
    /// rendezvous closes both connections with [`RELAY_QUOTA`].
    pub quota: u64,
    /// Bytes per second the pair may relay, both directions together (0: no limit); what
    /// arrives faster is dropped.
    pub rate: u64,
    /// Seconds the slot lives; then the rendezvous closes both connections with
    /// [`RELAY_EXPIRED`].
    pub expires_secs: u64,
}

/// Credentials for a TURN server, minted by the rendezvous for one side of one pairing
/// (`qpunch rendezvous --turn URL --turn-secret FILE`), in the TURN REST API scheme that
/// coturn's `use-auth-secret` checks ([`crate::turn::mint`]). The username's tag is random:
/// the TURN server never learns a nameplate, let alone a code.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnGrant {
    /// The server: `turn:HOST:PORT` or `turns:HOST:PORT`.
    pub url: String,
    /// `<expiry unix time>:<random tag>`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
    /// Seconds the credentials live.
    pub expires_secs: u64,
}

impl std::fmt::Debug for TurnGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: it ends up in logs.
        f.debug_struct("TurnGrant")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("expires_secs", &self.expires_secs)
            .finish_non_exhaustive()
    }
}

impl TurnGrant {
    /// The TURN server to allocate on (`None` when the URL is not one we understand).
    pub fn server(&self) -> Option<crate::turn::TurnServer> {
        Some(crate::turn::TurnServer {
            url: self.url.parse().ok()?,
            username: self.username.clone(),
            password: self.password.clone(),
        })
    }
}

/// Tag of a relayed datagram that carries a packet for the partner. Other tags are
/// reserved: the rendezvous drops them (and counts them), a client skips them.
pub const RELAY_PACKET: u8 = 0x00;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No receiver waits on that nameplate (never opened, already used, burned, expired).
    UnknownNameplate,
    /// The nameplate expired before anyone joined.
    Expired,
    /// The chosen nameplate is in use.
    Taken,
    /// Too many nameplates (in all, or from this address).
    TooMany,
    /// Too many requests from this address; try later.
    RateLimited,
    /// The request breaks the protocol.
    Protocol,
    /// The rendezvous cannot do this (e.g. it has no second address).
    Unsupported,
}

/// Hex for the opaque byte fields (small: PAKE messages and sealed hellos).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Parse a hex field of at most `max` bytes.
pub(crate) fn from_hex(s: &str, max: usize) -> Option<Vec<u8>> {
    if s.len() > max * 2 {
        return None;
    }
    data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let open = Request::Open {
            nameplate: None,
            ttl_secs: 600,
        };
        let json = serde_json::to_string(&open).unwrap();
        assert_eq!(json, r#"{"type":"open","nameplate":null,"ttl_secs":600}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), open);
        let pake = Request::Pake {
            pake: to_hex(&[1, 2, 3]),
        };
        let json = serde_json::to_string(&pake).unwrap();
        assert_eq!(json, r#"{"type":"pake","pake":"010203"}"#);
        let err = Response::Error {
            code: ErrorCode::UnknownNameplate,
            message: "no".into(),
        };
        let json = serde_json::to_string(&err).unwrap();
        assert!(json.contains(r#""code":"unknown_nameplate""#), "{json}");
        assert!(serde_json::from_str::<Request>(r#"{"type":"nope"}"#).is_err());
    }

    /// A client of this version reads an older rendezvous's pairing (no grant), and an
    /// older client ignores the grant (serde skips unknown fields).
    #[test]
    fn the_relay_grant_is_optional_on_the_wire() {
        let observed: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let old = r#"{"type":"paired","pake":"01","observed":"192.0.2.1:5"}"#;
        assert_eq!(
            serde_json::from_str::<Response>(old).unwrap(),
            Response::Paired {
                pake: "01".into(),
                observed,
                relay: None,
                turn: None,
            }
        );
        let paired = Response::Paired {
            pake: "01".into(),
            observed,
            relay: Some(RelayGrant {
                quota: 8 << 30,
                rate: 0,
                expires_secs: 21600,
            }),
            turn: None,
        };
        let json = serde_json::to_string(&paired).unwrap();
        assert!(
            json.contains(r#""relay":{"quota":8589934592,"rate":0,"expires_secs":21600}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), paired);
        let without = Response::Paired {
            pake: "01".into(),
            observed,
            relay: None,
            turn: None,
        };
        assert_eq!(serde_json::to_string(&without).unwrap(), old);
        // TURN credentials likewise: optional, skipped when absent.
        let turn = TurnGrant {
            url: "turn:192.0.2.9:3478".into(),
            username: "1700000000:ab".into(),
            password: "pw".into(),
            expires_secs: 600,
        };
        let with_turn = Response::Paired {
            pake: "01".into(),
            observed,
            relay: None,
            turn: Some(turn.clone()),
        };
        let json = serde_json::to_string(&with_turn).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), with_turn);
        assert!(!format!("{turn:?}").contains("pw"));
        assert_eq!(turn.server().unwrap().url.port, 3478);
    }

    /// Minted credentials: a random tag each, expiring `lifetime` from now, with the
    /// password coturn computes from the username and the secret.
    #[test]
    fn minted_turn_credentials_differ_and_expire() {
        let mint = TurnMint {
            url: "turn:192.0.2.9:3478".parse().unwrap(),
            secret: b"secret".to_vec(),
            lifetime: std::time::Duration::from_secs(600),
        };
        let (a, b) = (mint.grant(), mint.grant());
        assert_ne!(a.username, b.username);
        assert_eq!(
            (a.url.as_str(), a.expires_secs),
            ("turn:192.0.2.9:3478", 600)
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (expiry, tag) = a.username.split_once(':').unwrap();
        let expiry: u64 = expiry.parse().unwrap();
        assert!(
            (now + 599..=now + 601).contains(&expiry),
            "{expiry} vs {now}"
        );
        assert_eq!(tag.len(), 16);
        let (_, password) = crate::turn::mint(b"secret", tag, expiry);
        assert_eq!(a.password, password);
    }

    #[test]
    fn hex_fields_are_bounded() {
        assert_eq!(from_hex("0a0B", 2), Some(vec![10, 11]));
        assert_eq!(from_hex("0a0b0c", 2), None);
        assert_eq!(from_hex("zz", 2), None);
    }
}

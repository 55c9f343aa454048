//! STUN (RFC 8489) Binding messages and RFC 5780's attributes: the wire format, sans-IO.
//! The transactions on the node's socket are [`crate::stun_client`]'s, and the RFC 5780
//! check against a server is [`crate::natcheck::check_stun`]. This room is a leaf: the
//! socket's demultiplexer uses it to tell STUN from probes and QUIC.
//!
//! A rendezvous already tells us our public address and, with its second port and
//! address, how our NAT maps and filters ([`crate::natcheck`]). A STUN server does the
//! same for anyone: it lets `nat-check` work without a rendezvous, and a public address
//! learned from it becomes one more candidate in our sealed hello.
//!
//! The requests go out on the socket QUIC uses (a mapping belongs to one local port), so
//! their answers arrive there too: [`crate::socket::DemuxSocket`] tells STUN from QUIC and
//! probes as RFC 7983 does ([`is_stun`]) and hands each answer to whoever waits for its
//! transaction id, from the address it asked. Everything else is counted and dropped.
//!
//! What a STUN server says is trusted for nothing but our own candidates: a reflexive
//! address is vetted ([`plausible_public`]), at most offered in our hello (which the peer
//! probes before using, and QUIC is pinned by fingerprint), and never decides where a
//! connection goes. An OTHER-ADDRESS is probed only when it is plausibly the server's own
//! (the rule `natcheck::check_known` applies to a rendezvous), so a lying server
//! cannot aim our requests at a victim.
//!
//! The message format is [`stun_types`] (the parser of the sans-IO `stun-proto` family,
//! also under `turn-client-proto`): maintained, `no_std`-clean, it checks lengths,
//! attribute padding and FINGERPRINT for us. Its agent's transaction state machine is not
//! used: our transactions wait on the demultiplexer, with the bounded retransmissions
//! below. RFC 5780's attributes (CHANGE-REQUEST, OTHER-ADDRESS, RESPONSE-ORIGIN) are not in
//! it; they are read and written as raw attributes with its address codec.

use std::net::SocketAddr;
use std::time::Duration;

use stun_types::attribute::{AttributeType, MappedSocketAddr, RawAttribute, XorMappedAddress};
use stun_types::message::{
    BINDING, Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteVec,
    TransactionId,
};

use crate::addr::canonical;

/// STUN's magic cookie (RFC 8489 §5), at bytes 4..8 of every message.
pub const MAGIC_COOKIE: [u8; 4] = 0x2112_A442u32.to_be_bytes();

/// The STUN port when a server is named without one.
pub const DEFAULT_PORT: u16 = 3478;

/// A transaction id: 96 random bits.
pub type TxId = [u8; 12];

/// How long one Binding transaction may take, retransmissions included. RFC 8489's
/// default (39.5 s) is for reliability; a NAT check, like the rendezvous's, prefers an
/// answer within a second and a half.
pub const WAIT: Duration = Duration::from_millis(1500);

/// CHANGE-REQUEST (RFC 5780 §7.2).
const CHANGE_REQUEST: AttributeType = AttributeType::new(0x0003);
/// OTHER-ADDRESS (RFC 5780 §7.4).
const OTHER_ADDRESS: AttributeType = AttributeType::new(0x802C);
/// RESPONSE-ORIGIN (RFC 5780 §7.3).
const RESPONSE_ORIGIN: AttributeType = AttributeType::new(0x802B);
/// MAPPED-ADDRESS (RFC 8489 §14.1), what RFC 3489 servers answer with.
const MAPPED_ADDRESS: AttributeType = AttributeType::new(0x0001);

/// Public STUN servers `nat-check` asks when neither a rendezvous nor a `stun` list is
/// configured (and only then: see the README on what qpunch sends to third parties).
pub const DEFAULT_SERVERS: &[&str] = &[
    "stun.l.google.com:19302",
    "stun.cloudflare.com:3478",
    "stun.nextcloud.com:3478",
];

/// Whether a datagram is a STUN message, as RFC 7983 and RFC 8489 §5 tell it: the two top
/// bits of its first byte are 0, the magic cookie is at bytes 4..8, and its length field is
/// the rest of the datagram, a multiple of four.
///
/// Our probes may start with 0x01 too (see [`crate::wire`]), which is why the first byte
/// alone is not enough; their bytes 4..8 are inside `qpch`, never the cookie.
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= 20
        && data[0] & 0xC0 == 0
        && data[4..8] == MAGIC_COOKIE
        && usize::from(u16::from_be_bytes([data[2], data[3]])) == data.len() - 20
        && data.len().is_multiple_of(4)
}

/// The transaction id of a datagram that [`is_stun`].
pub fn transaction_id(data: &[u8]) -> Option<TxId> {
    data.get(8..20)?.try_into().ok()
}

/// Whether a datagram that [`is_stun`] is a response (success or error) rather than a
/// request or indication: only responses are waited for. (The class's high bit, C1, is
/// bit 8 of the message type: 0x0101 is a success, 0x0111 an error.)
pub fn is_response(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b & 0x01 != 0)
}

/// What RFC 5780's CHANGE-REQUEST asks the server to answer from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// From its other IP address.
    pub ip: bool,
    /// From its other port.
    pub port: bool,
}

/// A Binding request with transaction id `txid` (and CHANGE-REQUEST when `change` asks
/// for anything), with a FINGERPRINT.
pub fn binding_request(txid: TxId, change: Change) -> Vec<u8> {
    let mut message = Message::builder(
        MessageType::from_class_method(MessageClass::Request, BINDING),
        TransactionId::from(txid_u128(txid)),
        MessageWriteVec::new(),
    );
    if change != Change::default() {
        let flags = (u8::from(change.ip) << 2) | (u8::from(change.port) << 1);
        let value = [0, 0, 0, flags];
        // Cannot fail: a fresh message has no attribute that must come last.
        let _ = message.add_attribute(&RawAttribute::new(CHANGE_REQUEST, &value));
    }
    let _ = message.add_fingerprint();
    message.finish()
}

fn txid_u128(txid: TxId) -> u128 {
    txid.iter().fold(0u128, |n, b| (n << 8) | u128::from(*b))
}

/// A fresh random transaction id.
pub fn new_txid() -> TxId {
    rand::random()
}

/// What a Binding success response told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Our address as the server saw it (XOR-MAPPED-ADDRESS), vetted.
    pub mapped: SocketAddr,
    /// OTHER-ADDRESS: the server's other address and port (RFC 5780), if it has one.
    pub other: Option<SocketAddr>,
    /// RESPONSE-ORIGIN: where the server says it answered from.
    pub origin: Option<SocketAddr>,
}

/// Why a STUN answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a well-formed STUN message.
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// Not an answer to the transaction we asked.
    #[error("STUN answer to another transaction")]
    WrongTransaction,
    /// Not a Binding success response.
    #[error("STUN server refused the Binding request{}", .0.map(|c| format!(" (error {c})")).unwrap_or_default())]
    Refused(Option<u16>),
    /// A success without our address in it.
    #[error("STUN answer without a mapped address")]
    NoMappedAddress,
    /// A mapped address no NAT could have given us.
    #[error("STUN answer names an impossible public address {0}")]
    Absurd(SocketAddr),
    /// No answer in time.
    #[error("no STUN answer from {0}")]
    Timeout(SocketAddr),
    /// The socket failed.
    #[error("cannot send to the STUN server: {0}")]
    Io(String),
}

/// Parse and vet a Binding response to `txid`, from a server we reached over IPv4 when
/// `server_v4`.
///
/// The mapped address must be one a NAT could have given us (see [`plausible_public`]) and
/// of the family we asked over: anything else is a liar's or garbage, and is refused.
pub fn parse_binding_response(
    data: &[u8],
    txid: TxId,
    server_v4: bool,
) -> Result<Binding, StunError> {
    let message = Message::from_bytes(data).map_err(|e| StunError::Malformed(e.to_string()))?;
    if u128::from(message.transaction_id()) != txid_u128(txid) {
        return Err(StunError::WrongTransaction);
    }
    if !message.has_method(BINDING) {
        return Err(StunError::Malformed("not a Binding message".into()));
    }
    match message.class() {
        MessageClass::Success => {}
        MessageClass::Error => {
            let code = message
                .raw_attribute(AttributeType::new(0x0009))
                .and_then(|raw| {
                    let v = raw.value;
                    (v.len() >= 4).then(|| u16::from(v[2] & 0x07) * 100 + u16::from(v[3]))
                });
            return Err(StunError::Refused(code));
        }
        _ => return Err(StunError::Malformed("not a response".into())),
    }
    let mapped = match message.attribute::<XorMappedAddress>() {
        Ok(xor) => xor.addr(message.transaction_id()),
        Err(_) => message
            .raw_attribute(MAPPED_ADDRESS)
            .and_then(|raw| MappedSocketAddr::from_raw(&raw).ok())
            .map(|m| m.addr())
            .ok_or(StunError::NoMappedAddress)?,
    };
    let mapped = canonical(mapped);
    if !plausible_public(mapped) || mapped.is_ipv4() != server_v4 {
        return Err(StunError::Absurd(mapped));
    }
    let address = |atype| {
        message
            .raw_attribute(atype)
            .and_then(|raw| MappedSocketAddr::from_raw(&raw).ok())
            .map(|m| canonical(m.addr()))
            .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
    };
    Ok(Binding {
        mapped,
        other: address(OTHER_ADDRESS),
        origin: address(RESPONSE_ORIGIN),
    })
}

/// Whether `addr` could be our address as some server outside saw it: not unspecified,
/// loopback, multicast, broadcast, link-local or documentation-free nonsense, and a port.
///
/// Private and CGNAT ranges are allowed: a STUN server inside the same network (the lab's,
/// a company's) sees those, and a candidate in our hello costs only a probe.
pub fn plausible_public(addr: SocketAddr) -> bool {
    addr.port() != 0 && !crate::addr::is_unroutable(addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A Binding success response to `txid` with `mapped` (and OTHER-ADDRESS `other`), as
    /// a server would write it.
    pub(crate) fn response(txid: TxId, mapped: SocketAddr, other: Option<SocketAddr>) -> Vec<u8> {
        let id = TransactionId::from(txid_u128(txid));
        let mut message = Message::builder(
            MessageType::from_class_method(MessageClass::Success, BINDING),
            id,
            MessageWriteVec::new(),
        );
        message
            .add_attribute(&XorMappedAddress::new(mapped, id))
            .unwrap();
        if let Some(other) = other {
            let other = MappedSocketAddr::new(other);
            let mut value = vec![0; usize::from(other.length())];
            other.write_into_unchecked(&mut value);
            message
                .add_attribute(&RawAttribute::new(OTHER_ADDRESS, &value))
                .unwrap();
        }
        message.add_fingerprint().unwrap();
        message.finish()
    }

    #[test]
    fn requests_are_stun_and_probes_are_not() {
        let txid = [7; 12];
        let plain = binding_request(txid, Change::default());
        assert!(is_stun(&plain), "{plain:?}");
        assert!(!is_response(&plain));
        assert_eq!(transaction_id(&plain), Some(txid));
        let change = binding_request(
            txid,
            Change {
                ip: true,
                port: true,
            },
        );
        let parsed = Message::from_bytes(&change).unwrap();
        assert_eq!(
            &parsed.raw_attribute(CHANGE_REQUEST).unwrap().value[..],
            &[0, 0, 0, 6]
        );
        // Our probes (first byte 0x01 too) and QUIC are never taken for STUN.
        let mut probe = Vec::new();
        crate::wire::Message::Probe { txid: [1; 12] }.encode(&mut probe);
        assert!(!is_stun(&probe));
        let mut quic = plain.clone();
        quic[0] |= 0x40;
        assert!(!is_stun(&quic));
        // A length that does not match the datagram.
        let mut short = plain.clone();
        short.truncate(plain.len() - 4);
        assert!(!is_stun(&short));
    }

    #[test]
    fn responses_parse_and_are_vetted() {
        let txid = new_txid();
        let mapped = a("203.0.113.7:40000");
        let other = a("198.51.100.11:3479");
        let ok = response(txid, mapped, Some(other));
        assert!(is_stun(&ok) && is_response(&ok));
        let binding = parse_binding_response(&ok, txid, true).unwrap();
        assert_eq!(binding.mapped, mapped);
        assert_eq!(binding.other, Some(other));
        assert_eq!(
            parse_binding_response(&ok, new_txid(), true),
            Err(StunError::WrongTransaction)
        );
        // Asked over IPv6, answered with an IPv4 mapping: refused.
        assert!(matches!(
            parse_binding_response(&ok, txid, false),
            Err(StunError::Absurd(_))
        ));
        for absurd in [
            "0.0.0.0:4000",
            "127.0.0.1:4000",
            "224.0.0.1:4000",
            "255.255.255.255:4000",
            "169.254.1.1:4000",
            "203.0.113.7:0",
            "240.0.0.1:4000",
        ] {
            let bad = response(txid, a(absurd), None);
            assert_eq!(
                parse_binding_response(&bad, txid, true),
                Err(StunError::Absurd(a(absurd))),
                "{absurd}"
            );
        }
        for absurd in [
            "[::1]:4000",
            "[fe80::1]:4000",
            "[ff02::1]:4000",
            "[::]:4000",
        ] {
            let bad = response(txid, a(absurd), None);
            assert!(
                parse_binding_response(&bad, txid, false).is_err(),
                "{absurd}"
            );
        }
        let v6 = response(txid, a("[2001:db8::7]:4000"), None);
        assert!(parse_binding_response(&v6, txid, false).is_ok());
        // A corrupted FINGERPRINT, a truncation: malformed.
        let mut corrupt = ok.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(matches!(
            parse_binding_response(&corrupt, txid, true),
            Err(StunError::Malformed(_))
        ));
        assert!(parse_binding_response(&ok[..ok.len() - 8], txid, true).is_err());
        // A request is no answer.
        let request = binding_request(txid, Change::default());
        assert!(parse_binding_response(&request, txid, true).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Garbage, and real answers with bytes flipped: the demultiplexer's test and
            /// the parser never panic, and whatever parses passes the vetting.
            #[test]
            fn parsing_never_panics_and_only_vetted_addresses_pass(
                bytes in proptest::collection::vec(any::<u8>(), 0..200),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
                port in any::<u16>(),
                ip in any::<[u8; 4]>(),
            ) {
                let txid = [9; 12];
                let _ = is_stun(&bytes);
                if let Ok(binding) = parse_binding_response(&bytes, txid, true) {
                    prop_assert!(plausible_public(binding.mapped));
                }
                let mapped = SocketAddr::from((ip, port));
                let mut real = response(txid, mapped, Some(a("198.51.100.11:3479")));
                for (at, bits) in flips {
                    let len = real.len();
                    real[at % len] ^= bits;
                }
                if let Ok(binding) = parse_binding_response(&real, txid, true) {
                    prop_assert!(plausible_public(binding.mapped));
                    prop_assert!(binding.mapped.is_ipv4());
                }
            }
        }
    }
}

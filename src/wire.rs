//! The probe datagram format.
//!
//! Probes and replies travel on the *same* UDP socket that QUIC uses afterwards,
//! because the NAT mapping we punch belongs to that socket: a second socket would
//! get a different mapping and the hole would be useless. So every incoming
//! datagram must be told apart ([`classify`]): first the two exact datagrams of the
//! classic Go demo (below), then by first byte (RFC 9443): QUIC always sets the
//! fixed bit `0x40` (we disable greasing it), while our type bytes live in
//! `0..=3`, like STUN's.
//!
//! | bytes              | field          | notes                                          |
//! |--------------------|----------------|------------------------------------------------|
//! | 0                  | type           | `0x01` probe, `0x02` reply                     |
//! | 1..5               | magic          | [`MAGIC`], `b"qpch"`                           |
//! | 5                  | version        | [`VERSION`]                                    |
//! | 6..18              | txid           | chosen by the prober, echoed by the reply      |
//! | 18 (reply)         | family         | `4` or `6`, in the clear                       |
//! | 19..21 (reply)     | port           | u16 big-endian, XOR the first 2 bytes of magic |
//! | 21..25/37 (reply)  | address        | 4 or 16 bytes, XOR `magic ‖ txid`              |
//! | next               | greeting len   | one byte                                       |
//! | next               | greeting       | UTF-8, any text                                |
//! | rest (probe)       | padding        | zero bytes up to [`PROBE_LEN`]                 |
//!
//! ## Authenticated probes
//!
//! After a meeting by code both peers hold keys from the PAKE, and their probes prove it:
//! an authenticated probe or reply is the datagram above with the type byte `0x11`
//! (probe) or `0x12` (reply), a probe followed by the address it was sent to (encoded like
//! a reply's observed address), then a 16-byte tag, keyed BLAKE3 under the sender's
//! [`ProbeKey`] over everything before it (so over the txid and the address). Each direction has its own key ([`ProbeKeys`]), so a probe reflected back at
//! its sender does not verify. An authenticated probe is at least [`AUTH_PROBE_LEN`] bytes,
//! least as long as any authenticated reply (64 bytes at most), so it amplifies nothing
//! either. Without a PAKE (a direct punch, the Go demo) the plain format above is used,
//! unchanged; the plain decoder ([`Message::decode`]) refuses the authenticated types
//! ([`WireError::UnknownType`]) and [`Message::decode_authenticated`] refuses the plain ones.
//!
//! The observed address is XORed (STUN's XOR-MAPPED-ADDRESS trick) because some
//! NATs "helpfully" rewrite anything in a payload that looks like their own
//! address. The greeting is there for humans staring at packet captures.
//!
//! Probes are padded so that a reply is never larger than the probe that caused it:
//! anyone may probe a listening peer, with a forged source address too, and the
//! padding keeps a peer from being used to amplify traffic toward a victim.
//!
//! ## The Go demo's datagrams
//!
//! | datagram           | bytes | contents     | sent by                                       |
//! |--------------------|-------|--------------|-----------------------------------------------|
//! | [`LEGACY_PROBE`]   | 13    | "ただいま~"  | the demo client, once, to the server          |
//! | [`LEGACY_REPLY`]   | 10    | "お帰り~"    | the demo server, to the source of *any* datagram |
//!
//! The seed of this project is a Go program whose client sends the bare UTF-8 text
//! "ただいま~" and whose server answers "お帰り~" to the source of every datagram. qpunch
//! speaks with it both ways ([`Class::Legacy`]): a legacy probe is answered with the
//! legacy reply (10 < 13 bytes, so never an amplifier), and a legacy reply to our probe
//! proves the path, though it carries neither a txid nor an observed address (see
//! [`crate::punch::Puncher::handle_datagram`]).
//!
//! Both start with `0xE3` (the first byte of "た" and "お"), which has the QUIC fixed bit
//! and the long-header bit set, so the first byte alone would send them to QUIC. They
//! are recognised only as *exact* whole datagrams, and no QUIC packet is 10 or 13 bytes
//! long:
//! - a long-header packet with a packet number (Initial, 0-RTT, Handshake) is
//!   header-protected, and RFC 9001 §5.4.2 samples 16 bytes starting 4 bytes into the
//!   packet number field, which follows at least 1 (first byte) + 4 (version) + 1 + 1
//!   (the two connection id lengths; the ids may be empty) + 1 (the Length varint)
//!   bytes: at least 8 + 4 + 16 = 28 bytes;
//! - a Retry packet ends with a 16-byte integrity tag after that same 7-byte prefix:
//!   at least 23 bytes;
//! - a short-header packet (and a stateless reset, which mimics one) is at least 21
//!   bytes, "short header packets that are smaller than 21 bytes are never valid"
//!   (RFC 9000 §10.3), and has bit `0x80` clear anyway;
//! - only a Version Negotiation packet may be shorter, but its version field (bytes
//!   1..5) is zero, while these datagrams have `81 9F E3 81` and `81 8A E5 B8` there.
//!
//! A datagram may coalesce several QUIC packets, but each one is at least that long: a
//! datagram that is exactly one of these two is never QUIC.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Wire format version; bumped on any incompatible change so old peers fail loudly.
pub const VERSION: u8 = 1;

/// Marks our datagrams, so stray traffic in the `0..=3` first-byte range is rejected.
pub const MAGIC: [u8; 4] = *b"qpch";

/// Largest datagram we accept. Real messages are under 64 bytes; refusing
/// anything bigger bounds the work spent on junk.
pub const MAX_DATAGRAM: usize = 256;

/// Minimum probe length: at least as long as the largest reply (48 bytes, IPv6), so
/// answering a probe never sends more bytes than it received.
pub const PROBE_LEN: usize = 64;

/// Greeting carried by probes ("I'm home~"), as in the classic Go hole-punching demo.
pub const PROBE_GREETING: &str = "ただいま~";

/// Greeting carried by replies ("welcome back~").
pub const REPLY_GREETING: &str = "お帰り~";

/// The classic Go demo client's probe: exactly the 13 bytes of "ただいま~", nothing else.
pub const LEGACY_PROBE: &[u8] = PROBE_GREETING.as_bytes();

/// The classic Go demo server's reply: exactly the 10 bytes of "お帰り~", nothing else.
pub const LEGACY_REPLY: &[u8] = REPLY_GREETING.as_bytes();

/// No QUIC packet but Version Negotiation is shorter than this (see the module docs).
const MIN_QUIC_PACKET: usize = 21;

// Neither legacy datagram can be mistaken for a QUIC packet (see the module docs).
const _: () = assert!(LEGACY_PROBE.len() == 13 && LEGACY_REPLY.len() == 10);
const _: () = assert!(LEGACY_PROBE.len() < MIN_QUIC_PACKET && LEGACY_REPLY.len() < MIN_QUIC_PACKET);
const _: () = assert!(LEGACY_REPLY.len() < LEGACY_PROBE.len(), "no amplification");

/// Transaction id: lets a prober match a reply to the exact probe it answers.
pub type TxId = [u8; 12];

/// Length of the tag that ends an authenticated probe or reply.
pub const AUTH_TAG_LEN: usize = 16;

/// Shortest authenticated probe: a padded probe, an IPv4 destination and the tag. Any
/// authenticated reply (at most 48 + 16 bytes) is shorter.
pub const AUTH_PROBE_LEN: usize = PROBE_LEN + 7 + AUTH_TAG_LEN;

const TYPE_PROBE: u8 = 0x01;
const TYPE_REPLY: u8 = 0x02;
/// A plain type with this bit set: the authenticated variant (tag appended).
const AUTHENTICATED: u8 = 0x10;
const QUIC_FIXED_BIT: u8 = 0x40;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Where a datagram on the shared socket belongs, so the socket can route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The QUIC fixed bit is set: hand it to the QUIC endpoint.
    Quic,
    /// Anything else, including empty datagrams: hand it to [`Message::decode`],
    /// which rejects (and lets the caller count) whatever is not really ours.
    Probe,
    /// Exactly one of the Go demo's datagrams.
    Legacy(Legacy),
}

/// One of the two datagrams of the classic Go demo (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// [`LEGACY_PROBE`]: answer it with [`LEGACY_REPLY`].
    Probe,
    /// [`LEGACY_REPLY`]: an answer to one of our probes, from a Go demo server.
    Reply,
}

/// Routes a datagram: the Go demo's exact datagrams first, then by the first byte,
/// without parsing the rest.
pub fn classify(datagram: &[u8]) -> Class {
    if let Some(legacy) = legacy(datagram) {
        return Class::Legacy(legacy);
    }
    match datagram.first() {
        Some(byte) if byte & QUIC_FIXED_BIT != 0 => Class::Quic,
        _ => Class::Probe,
    }
}

/// Whether `datagram` is, byte for byte and nothing more, one of the Go demo's.
pub fn legacy(datagram: &[u8]) -> Option<Legacy> {
    if datagram == LEGACY_PROBE {
        Some(Legacy::Probe)
    } else if datagram == LEGACY_REPLY {
        Some(Legacy::Reply)
    } else {
        None
    }
}

/// A decoded probe datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Can you hear me?" Sent by the side punching the hole.
    Probe {
        /// Echoed by the reply.
        txid: TxId,
    },
    /// "Yes, and this is where you came from." Sent back to the probe's source.
    Reply {
        /// The txid of the probe being answered.
        txid: TxId,
        /// The probe's source address as the responder saw it: the prober's
        /// public (server-reflexive) address. IPv6 flow info and scope id are
        /// not carried; they mean nothing outside the responder's host.
        observed: SocketAddr,
    },
}

/// Why a datagram is not a valid [`Message`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum WireError {
    /// Zero-length datagram.
    #[error("empty datagram")]
    Empty,
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes exceeds the {max}-byte limit", max = MAX_DATAGRAM)]
    TooLong(usize),
    /// The first byte has the QUIC fixed bit set: this belongs to QUIC.
    #[error("first byte has the QUIC fixed bit set")]
    NotProbe,
    /// A type byte we do not know.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// Bytes 1..5 are not [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// A version other than [`VERSION`].
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// The datagram ends before a field it announces.
    #[error("datagram truncated")]
    Truncated,
    /// The reply's address family is neither 4 nor 6.
    #[error("bad address family {0}")]
    BadAddressFamily(u8),
    /// The greeting is not valid UTF-8.
    #[error("greeting is not valid UTF-8")]
    BadGreeting,
    /// Bytes left over after the greeting (for probes: padding that is not zero).
    #[error("trailing bytes after the greeting")]
    TrailingBytes,
    /// A probe shorter than [`PROBE_LEN`]: answering it could amplify traffic.
    #[error("probe of {0} bytes is not padded to {len}", len = PROBE_LEN)]
    Unpadded(usize),
    /// An authenticated probe or reply whose tag does not verify under the key.
    #[error("authentication tag does not verify")]
    BadTag,
}

impl Message {
    /// Appends the encoding to `out`, so callers can reuse one buffer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (kind, txid) = match self {
            Message::Probe { txid } => (TYPE_PROBE, txid),
            Message::Reply { txid, .. } => (TYPE_REPLY, txid),
        };
        out.push(kind);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(txid);
        let greeting = match self {
            Message::Probe { .. } => PROBE_GREETING,
            Message::Reply { txid, observed } => {
                encode_address(out, txid, *observed);
                REPLY_GREETING
            }
        };
        out.push(greeting.len() as u8);
        out.extend_from_slice(greeting.as_bytes());
        if let Message::Probe { .. } = self {
            out.resize(out.len().max(start + PROBE_LEN), 0);
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode(&mut out);
        out
    }

    /// Parses one datagram. Never panics and never allocates, whatever the input,
    /// because the input comes straight off the network.
    pub fn decode(datagram: &[u8]) -> Result<Message, WireError> {
        let first = *datagram.first().ok_or(WireError::Empty)?;
        if first & QUIC_FIXED_BIT != 0 {
            return Err(WireError::NotProbe);
        }
        if datagram.len() > MAX_DATAGRAM {
            return Err(WireError::TooLong(datagram.len()));
        }
        let mut r = Reader { rest: datagram };
        let is_reply = match r.byte()? {
            TYPE_PROBE => false,
            TYPE_REPLY => true,
            other => return Err(WireError::UnknownType(other)),
        };
        if r.array()? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.byte()?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let txid: TxId = r.array()?;
        let message = if is_reply {
            let observed = decode_address(&mut r, &txid)?;
            Message::Reply { txid, observed }
        } else {
            Message::Probe { txid }
        };
        let len = r.byte()?;
        let greeting = r.take(len.into())?;
        std::str::from_utf8(greeting).map_err(|_| WireError::BadGreeting)?;
        match message {
            Message::Reply { .. } if !r.rest.is_empty() => Err(WireError::TrailingBytes),
            Message::Probe { .. } if r.rest.iter().any(|&b| b != 0) => {
                Err(WireError::TrailingBytes)
            }
            Message::Probe { .. } if datagram.len() < PROBE_LEN => {
                Err(WireError::Unpadded(datagram.len()))
            }
            _ => Ok(message),
        }
    }

    /// The transaction id, whichever kind of message this is.
    pub fn txid(&self) -> TxId {
        match self {
            Message::Probe { txid } | Message::Reply { txid, .. } => *txid,
        }
    }
}

impl Message {
    /// Appends the authenticated encoding under `key` (ours: see [`ProbeKeys`]). A probe
    /// names no destination (see [`authenticated_probe`]).
    pub fn encode_authenticated(&self, key: &ProbeKey, out: &mut Vec<u8>) {
        self.encode_authenticated_to(None, key, out);
    }

    fn encode_authenticated_to(&self, to: Option<SocketAddr>, key: &ProbeKey, out: &mut Vec<u8>) {
        let start = out.len();
        self.encode(out);
        out[start] |= AUTHENTICATED;
        if let Message::Probe { txid } = self {
            let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
            encode_address(out, txid, to.unwrap_or(unspecified));
        }
        let tag = key.tag(&out[start..]);
        out.extend_from_slice(&tag);
    }

    /// Encodes, authenticated under `key`, into a fresh buffer.
    pub fn to_authenticated_vec(&self, key: &ProbeKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(AUTH_PROBE_LEN);
        self.encode_authenticated(key, &mut out);
        out
    }

    /// Like [`decode_authenticated`](Self::decode_authenticated), also returning the
    /// address an authenticated probe was sent to, as its sender knew it (`None` for a
    /// reply, or a probe that names none): the receiver's own address as the peer sees it.
    pub fn decode_authenticated_to(
        datagram: &[u8],
        key: &ProbeKey,
    ) -> Result<(Message, Option<SocketAddr>), WireError> {
        let message = Message::decode_authenticated(datagram, key)?;
        let to = match message {
            Message::Probe { txid } => {
                // Verified and parsed already: the address follows the padded probe.
                let body = &datagram[PROBE_LEN..datagram.len() - AUTH_TAG_LEN];
                let to = decode_address(&mut Reader { rest: body }, &txid)?;
                Some(to).filter(|to| !to.ip().is_unspecified() || to.port() != 0)
            }
            Message::Reply { .. } => None,
        };
        Ok((message, to))
    }

    /// Parses an authenticated datagram whose tag must verify under `key` (the peer's:
    /// see [`ProbeKeys`]). The tag is checked, in constant time, before anything else is
    /// parsed. Never panics and never allocates, whatever the input.
    pub fn decode_authenticated(datagram: &[u8], key: &ProbeKey) -> Result<Message, WireError> {
        let first = *datagram.first().ok_or(WireError::Empty)?;
        if first & QUIC_FIXED_BIT != 0 {
            return Err(WireError::NotProbe);
        }
        if datagram.len() > MAX_DATAGRAM {
            return Err(WireError::TooLong(datagram.len()));
        }
        if first != TYPE_PROBE | AUTHENTICATED && first != TYPE_REPLY | AUTHENTICATED {
            return Err(WireError::UnknownType(first));
        }
        let (body, tag) = datagram
            .split_last_chunk::<AUTH_TAG_LEN>()
            .ok_or(WireError::Truncated)?;
        if !key.verify(body, tag) {
            return Err(WireError::BadTag);
        }
        let mut plain = [0u8; MAX_DATAGRAM];
        let plain = &mut plain[..body.len()];
        plain.copy_from_slice(body);
        plain[0] &= !AUTHENTICATED;
        if first == TYPE_PROBE | AUTHENTICATED {
            // A padded probe, then the address it was sent to.
            let (probe, to) = plain
                .split_at_checked(PROBE_LEN)
                .ok_or(WireError::Truncated)?;
            let message = Message::decode(probe)?;
            let mut r = Reader { rest: to };
            decode_address(&mut r, &message.txid())?;
            if !r.rest.is_empty() {
                return Err(WireError::TrailingBytes);
            }
            return Ok(message);
        }
        Message::decode(plain)
    }
}

/// An authenticated probe with transaction id `txid`, sent to `to`, tagged under our key
/// `key`. The destination travels with it (XORed like a reply's observed address) so the
/// peer learns how we reach it, and knows a path both ways exists when it probed us too.
pub fn authenticated_probe(txid: TxId, to: SocketAddr, key: &ProbeKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_PROBE_LEN);
    Message::Probe { txid }.encode_authenticated_to(Some(to), key, &mut out);
    out
}

/// Whether `datagram` is of an authenticated type (it may still fail to verify).
pub fn is_authenticated(datagram: &[u8]) -> bool {
    datagram
        .first()
        .is_some_and(|&b| b == TYPE_PROBE | AUTHENTICATED || b == TYPE_REPLY | AUTHENTICATED)
}

/// Whether `datagram` is of the authenticated reply type (it may still fail to verify).
pub fn is_authenticated_reply(datagram: &[u8]) -> bool {
    datagram.first() == Some(&(TYPE_REPLY | AUTHENTICATED))
}

/// A key that tags probes and replies (keyed BLAKE3, truncated to [`AUTH_TAG_LEN`]).
/// Made from a PAKE's shared secret, one per direction ([`ProbeKeys`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeKey([u8; 32]);

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

impl ProbeKey {
    /// A key from 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ProbeKey(bytes)
    }

    fn tag(&self, body: &[u8]) -> [u8; AUTH_TAG_LEN] {
        let hash = blake3::keyed_hash(&self.0, body);
        let mut tag = [0; AUTH_TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..AUTH_TAG_LEN]);
        tag
    }

    /// Constant time: how much of a forged tag is right must not show in the timing.
    fn verify(&self, body: &[u8], tag: &[u8; AUTH_TAG_LEN]) -> bool {
        let ours = self.tag(body);
        ours.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }
}

/// The probe keys of one meeting, as one side holds them: `ours` tags what this side
/// sends (probes and replies), `theirs` checks what the peer sends. The peer holds the same
/// two keys the other way round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeKeys {
    /// Tags our probes and replies.
    pub ours: ProbeKey,
    /// Checks the peer's.
    pub theirs: ProbeKey,
}

/// `MAGIC ‖ txid`: the 16-byte mask for the observed address.
fn xor_key(txid: &TxId) -> [u8; 16] {
    let mut key = [0; 16];
    key[..4].copy_from_slice(&MAGIC);
    key[4..].copy_from_slice(txid);
    key
}

/// XORs `bytes` with the first `N` bytes of `key`. Its own inverse.
fn xor<const N: usize>(mut bytes: [u8; N], key: &[u8; 16]) -> [u8; N] {
    for (b, k) in bytes.iter_mut().zip(key) {
        *b ^= k;
    }
    bytes
}

fn port_mask() -> u16 {
    u16::from_be_bytes([MAGIC[0], MAGIC[1]])
}

fn encode_address(out: &mut Vec<u8>, txid: &TxId, addr: SocketAddr) {
    let key = xor_key(txid);
    let port = (addr.port() ^ port_mask()).to_be_bytes();
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&port);
            out.extend_from_slice(&xor(ip.octets(), &key));
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&port);
            out.extend_from_slice(&xor(ip.octets(), &key));
        }
    }
}

fn decode_address(r: &mut Reader<'_>, txid: &TxId) -> Result<SocketAddr, WireError> {
    let key = xor_key(txid);
    let family = r.byte()?;
    if family != FAMILY_V4 && family != FAMILY_V6 {
        return Err(WireError::BadAddressFamily(family));
    }
    let port = u16::from_be_bytes(r.array()?) ^ port_mask();
    let ip = if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(xor(r.array()?, &key)))
    } else {
        IpAddr::V6(Ipv6Addr::from(xor(r.array()?, &key)))
    };
    Ok(SocketAddr::new(ip, port))
}

/// A cursor whose reads fail with [`WireError::Truncated`] instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(WireError::Truncated)?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(WireError::Truncated)?;
        self.rest = tail;
        Ok(*head)
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        let [b] = self.array()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TXID: TxId = *b"0123456789ab";

    fn reply_v4() -> Message {
        Message::Reply {
            txid: TXID,
            observed: "203.0.113.7:40000".parse().unwrap(),
        }
    }

    /// Offset of the greeting length byte in an encoded IPv4 reply.
    const V4_GREETING_AT: usize = 18 + 1 + 2 + 4;

    #[test]
    fn an_authenticated_reply_is_never_longer_than_the_probe() {
        let key = ProbeKey::from_bytes([3; 32]);
        let probe = Message::Probe { txid: TXID }.to_authenticated_vec(&key);
        assert_eq!(probe.len(), AUTH_PROBE_LEN);
        assert_eq!(probe[0], 0x11);
        let v6 = Message::Reply {
            txid: TXID,
            observed: "[2001:db8::1]:9".parse().unwrap(),
        };
        let reply = v6.to_authenticated_vec(&key);
        assert_eq!(reply[0], 0x12);
        assert!(
            reply.len() <= probe.len(),
            "{} > {}",
            reply.len(),
            probe.len()
        );
        // The plain formats are untouched by the authenticated ones.
        assert_eq!(Message::Probe { txid: TXID }.to_vec().len(), PROBE_LEN);
        assert!(!is_authenticated(&Message::Probe { txid: TXID }.to_vec()));
    }

    #[test]
    fn an_authenticated_probe_names_its_destination() {
        let key = ProbeKey::from_bytes([4; 32]);
        for to in ["198.51.100.7:40000", "[2001:db8::7]:9"] {
            let to: SocketAddr = to.parse().unwrap();
            let bytes = authenticated_probe(TXID, to, &key);
            assert!(bytes.len() <= MAX_DATAGRAM && bytes.len() >= AUTH_PROBE_LEN);
            assert_eq!(
                Message::decode_authenticated_to(&bytes, &key),
                Ok((Message::Probe { txid: TXID }, Some(to)))
            );
            // The destination is XORed, like a reply's observed address.
            let port = to.port().to_be_bytes();
            assert!(!bytes.windows(2).any(|w| w == port), "{to} in the clear");
            // And tagged: an edited destination does not verify.
            let mut forged = bytes.clone();
            forged[PROBE_LEN + 3] ^= 1;
            assert_eq!(
                Message::decode_authenticated(&forged, &key),
                Err(WireError::BadTag)
            );
        }
        let bare = Message::Probe { txid: TXID }.to_authenticated_vec(&key);
        assert_eq!(
            Message::decode_authenticated_to(&bare, &key),
            Ok((Message::Probe { txid: TXID }, None))
        );
    }

    #[test]
    fn classify_routes_by_fixed_bit() {
        assert_eq!(classify(&[]), Class::Probe);
        assert_eq!(classify(&[0x01]), Class::Probe);
        assert_eq!(classify(&[0x03, 0xff]), Class::Probe);
        assert_eq!(classify(&[0xc0]), Class::Quic);
        assert_eq!(classify(&[0x40]), Class::Quic);
        assert_eq!(
            classify(&Message::Probe { txid: TXID }.to_vec()),
            Class::Probe
        );
    }

    #[test]
    fn legacy_datagrams_are_the_go_demos_exact_bytes() {
        // From the Go program: `msg := "ただいま~"` and `reply := "お帰り~"`, sent as is.
        assert_eq!(
            LEGACY_PROBE,
            b"\xe3\x81\x9f\xe3\x81\xa0\xe3\x81\x84\xe3\x81\xbe~"
        );
        assert_eq!(LEGACY_REPLY, b"\xe3\x81\x8a\xe5\xb8\xb0\xe3\x82\x8a~");
        assert_eq!(classify(LEGACY_PROBE), Class::Legacy(Legacy::Probe));
        assert_eq!(classify(LEGACY_REPLY), Class::Legacy(Legacy::Reply));
        assert_eq!(legacy(LEGACY_PROBE), Some(Legacy::Probe));
        assert_eq!(legacy(LEGACY_REPLY), Some(Legacy::Reply));
        // Without the exact-match rule their first byte would route them to QUIC,
        // and our own decoder rightly refuses them.
        assert_eq!(LEGACY_PROBE[0] & QUIC_FIXED_BIT, QUIC_FIXED_BIT);
        assert_eq!(Message::decode(LEGACY_PROBE), Err(WireError::NotProbe));
        assert_eq!(Message::decode(LEGACY_REPLY), Err(WireError::NotProbe));
    }

    #[test]
    fn only_the_exact_legacy_datagrams_are_legacy() {
        for exact in [LEGACY_PROBE, LEGACY_REPLY] {
            let mut longer = exact.to_vec();
            longer.push(b'\n');
            let mut other = exact.to_vec();
            *other.last_mut().unwrap() = b'!';
            let near: [&[u8]; 4] = [&exact[..exact.len() - 1], &exact[1..], &longer, &other];
            for datagram in near {
                assert_eq!(legacy(datagram), None, "{datagram:x?}");
                // Back to first-byte routing (0xE3 → QUIC, 0x81 → probe decoder).
                let by_first_byte = if datagram[0] == 0xe3 {
                    Class::Quic
                } else {
                    Class::Probe
                };
                assert_eq!(classify(datagram), by_first_byte, "{datagram:x?}");
            }
        }
        // Right length, wrong bytes: a 10-byte non-greeting is not a reply.
        let ten = b"\xe3\x81\x8aabcdefg";
        assert_eq!(legacy(ten), None);
        assert_eq!(classify(ten), Class::Quic);
        assert_eq!(legacy(&[0u8; 13]), None);
        assert_eq!(classify(&[0u8; 13]), Class::Probe);
        // A qpunch probe carries the same greeting, but inside its own format.
        let probe = Message::Probe { txid: TXID }.to_vec();
        assert_eq!(classify(&probe), Class::Probe);
    }

    #[test]
    fn probe_layout_matches_the_table() {
        let bytes = Message::Probe { txid: TXID }.to_vec();
        assert_eq!(bytes[0], 0x01);
        assert_eq!(&bytes[1..5], b"qpch");
        assert_eq!(bytes[5], VERSION);
        assert_eq!(&bytes[6..18], &TXID);
        assert_eq!(usize::from(bytes[18]), PROBE_GREETING.len());
        let end = 19 + PROBE_GREETING.len();
        assert_eq!(&bytes[19..end], PROBE_GREETING.as_bytes());
        assert_eq!(bytes.len(), PROBE_LEN);
        assert!(bytes[end..].iter().all(|&b| b == 0), "zero padding");
    }

    #[test]
    fn replies_are_never_larger_than_probes() {
        let largest = Message::Reply {
            txid: TXID,
            observed: "[2001:db8::1]:65535".parse().unwrap(),
        };
        let probe = Message::Probe { txid: TXID }.to_vec();
        assert!(largest.to_vec().len() <= probe.len());
    }

    #[test]
    fn error_unpadded_probe() {
        let bytes = Message::Probe { txid: TXID }.to_vec();
        let unpadded = &bytes[..19 + PROBE_GREETING.len()];
        assert_eq!(
            Message::decode(unpadded),
            Err(WireError::Unpadded(unpadded.len()))
        );
        let mut dirty = bytes.clone();
        *dirty.last_mut().unwrap() = 1;
        assert_eq!(Message::decode(&dirty), Err(WireError::TrailingBytes));
        let mut longer = bytes;
        longer.extend_from_slice(&[0; 10]);
        assert_eq!(Message::decode(&longer), Ok(Message::Probe { txid: TXID }));
    }

    #[test]
    fn reply_address_is_not_in_the_clear() {
        let bytes = reply_v4().to_vec();
        assert_eq!(bytes[0], 0x02);
        assert_eq!(bytes[18], 4);
        assert_ne!(&bytes[19..21], &40000u16.to_be_bytes());
        assert_ne!(&bytes[21..25], &[203, 0, 113, 7]);
        assert_eq!(&bytes[V4_GREETING_AT + 1..], REPLY_GREETING.as_bytes());
    }

    #[test]
    fn ipv4_mapped_ipv6_is_kept_as_ipv6() {
        let observed: SocketAddr = "[::ffff:192.0.2.1]:9".parse().unwrap();
        let msg = Message::Reply {
            txid: TXID,
            observed,
        };
        assert_eq!(msg.to_vec()[18], 6);
        assert_eq!(Message::decode(&msg.to_vec()), Ok(msg));
    }

    #[test]
    fn txid_accessor() {
        assert_eq!(Message::Probe { txid: TXID }.txid(), TXID);
        assert_eq!(reply_v4().txid(), TXID);
    }

    #[test]
    fn error_empty() {
        assert_eq!(Message::decode(&[]), Err(WireError::Empty));
    }

    #[test]
    fn error_too_long() {
        let mut bytes = Message::Probe { txid: TXID }.to_vec();
        bytes.resize(MAX_DATAGRAM + 1, 0);
        assert_eq!(Message::decode(&bytes), Err(WireError::TooLong(257)));
    }

    #[test]
    fn error_not_probe() {
        assert_eq!(Message::decode(&[0xc3, 0, 0]), Err(WireError::NotProbe));
    }

    #[test]
    fn error_unknown_type() {
        let mut bytes = Message::Probe { txid: TXID }.to_vec();
        bytes[0] = 0x03;
        assert_eq!(Message::decode(&bytes), Err(WireError::UnknownType(3)));
        assert_eq!(Message::decode(&[0x00]), Err(WireError::UnknownType(0)));
    }

    #[test]
    fn error_bad_magic() {
        let mut bytes = Message::Probe { txid: TXID }.to_vec();
        bytes[2] = b'X';
        assert_eq!(Message::decode(&bytes), Err(WireError::BadMagic));
    }

    #[test]
    fn error_unsupported_version() {
        let mut bytes = Message::Probe { txid: TXID }.to_vec();
        bytes[5] = 2;
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn error_truncated() {
        let bytes = reply_v4().to_vec();
        assert_eq!(Message::decode(&bytes[..1]), Err(WireError::Truncated));
        assert_eq!(Message::decode(&bytes[..20]), Err(WireError::Truncated));
        assert_eq!(
            Message::decode(&bytes[..bytes.len() - 1]),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn error_bad_address_family() {
        let mut bytes = reply_v4().to_vec();
        bytes[18] = 5;
        assert_eq!(Message::decode(&bytes), Err(WireError::BadAddressFamily(5)));
    }

    #[test]
    fn error_bad_greeting() {
        let mut bytes = reply_v4().to_vec();
        bytes[V4_GREETING_AT + 1] = 0xff;
        assert_eq!(Message::decode(&bytes), Err(WireError::BadGreeting));
    }

    #[test]
    fn any_utf8_greeting_is_accepted() {
        let mut bytes = Message::Probe { txid: TXID }.to_vec();
        bytes.truncate(18);
        bytes.extend_from_slice(&[2, b'h', b'i']);
        bytes.resize(PROBE_LEN, 0);
        assert_eq!(Message::decode(&bytes), Ok(Message::Probe { txid: TXID }));
        bytes.truncate(18);
        bytes.push(0);
        bytes.resize(PROBE_LEN, 0);
        assert_eq!(Message::decode(&bytes), Ok(Message::Probe { txid: TXID }));
    }

    #[test]
    fn error_trailing_bytes() {
        let mut bytes = reply_v4().to_vec();
        bytes.push(0);
        assert_eq!(Message::decode(&bytes), Err(WireError::TrailingBytes));
    }

    #[test]
    fn encode_appends() {
        let mut out = vec![0xaa];
        Message::Probe { txid: TXID }.encode(&mut out);
        assert_eq!(out[0], 0xaa);
        assert_eq!(&out[1..], Message::Probe { txid: TXID }.to_vec());
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<Ipv4Addr>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
            (any::<Ipv6Addr>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(ip.into(), p)),
        ]
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<TxId>().prop_map(|txid| Message::Probe { txid }),
            (any::<TxId>(), any_addr())
                .prop_map(|(txid, observed)| Message::Reply { txid, observed }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in any_message()) {
            let bytes = msg.to_vec();
            prop_assert!(bytes.len() <= MAX_DATAGRAM);
            prop_assert_eq!(classify(&bytes), Class::Probe);
            prop_assert_eq!(legacy(&bytes), None);
            prop_assert_eq!(Message::decode(&bytes), Ok(msg));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_near_valid(msg in any_message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = msg.to_vec();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Ok(decoded) = Message::decode(&bytes) {
                prop_assert_eq!(Message::decode(&decoded.to_vec()), Ok(decoded));
            }
        }

        #[test]
        fn authenticated_round_trip_and_any_edit_fails(msg in any_message(), at in any::<prop::sample::Index>(), flip in 1u8..) {
            let (key, other) = (ProbeKey::from_bytes([7; 32]), ProbeKey::from_bytes([8; 32]));
            let bytes = msg.to_authenticated_vec(&key);
            prop_assert!(bytes.len() <= AUTH_PROBE_LEN);
            prop_assert_eq!(classify(&bytes), Class::Probe);
            prop_assert!(is_authenticated(&bytes));
            prop_assert_eq!(Message::decode_authenticated(&bytes, &key), Ok(msg.clone()));
            prop_assert_eq!(Message::decode_authenticated(&bytes, &other), Err(WireError::BadTag));
            prop_assert!(Message::decode(&bytes).is_err(), "the plain decoder refuses it");
            prop_assert!(Message::decode_authenticated(&msg.to_vec(), &key).is_err(), "a plain one is refused");
            let mut edited = bytes.clone();
            let i = at.index(edited.len());
            edited[i] ^= flip;
            prop_assert!(Message::decode_authenticated(&edited, &key).is_err(), "byte {} edited", i);
        }

        #[test]
        fn decode_authenticated_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode_authenticated(&bytes, &ProbeKey::from_bytes([1; 32]));
        }

        #[test]
        fn every_truncation_is_an_error(msg in any_message()) {
            let bytes = msg.to_vec();
            for len in 0..bytes.len() {
                prop_assert!(Message::decode(&bytes[..len]).is_err(), "prefix of {} bytes decoded", len);
            }
        }
    }
}

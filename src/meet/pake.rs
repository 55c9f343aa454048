//! The PAKE and the sealed hello: how two holders of a [`Code`] learn each other's TLS
//! fingerprint and addresses through a rendezvous that may lie.
//!
//! Sans-IO: no sockets, no clocks, randomness injected. The exchange, relayed as opaque
//! bytes by the rendezvous:
//!
//! ```text
//! receiver                                     sender
//! Pake::start(code, Receiver, rng) ── msg ──▶
//!                                  ◀── msg ── Pake::start(code, Sender, rng)
//! finish(peer msg) → SessionKeys               finish(peer msg) → SessionKeys
//! seal(&hello) ─────────────────── sealed ──▶  open(sealed) → receiver's Hello
//! open(sealed) → sender's Hello ◀── sealed ── seal(&hello)
//! ```
//!
//! **PAKE.** Symmetric SPAKE2 over Ed25519 (the `spake2` crate), with the whole canonical
//! code as password and `qpunch-meet/1:NAMEPLATE` as identity. A message is a
//! [`VERSION`] byte followed by the 33-byte SPAKE2 message. SPAKE2 lets only *online*
//! guessing succeed: someone who relays or replaces messages without the code learns
//! nothing they can test guesses against, and ends up with keys unrelated to the peer's.
//!
//! **Keys.** The SPAKE2 output (already a hash over password, identity, both messages and
//! the shared point) is the HKDF-SHA256 input key; the salt is a hash of the nameplate and
//! both framed messages in role order. HKDF expands it, under distinct labels, into one
//! ChaCha20-Poly1305 key per direction (receiver → sender, sender → receiver), one
//! HMAC-SHA256 key for [`SessionKeys::bind`], and one probe key per direction
//! ([`SessionKeys::probe_keys`]). Separate directions mean a peer's own sealed
//! hello, reflected back at it, fails to open, and so does a hello from a peer that took
//! the same role.
//!
//! **One message per key.** Each direction's key seals exactly one hello, so its nonce is
//! fixed (all zeros). That is only safe because [`SessionKeys::seal`] can run once: it
//! takes the key out, and a second call fails with [`PakeError::AlreadySealed`]. Fresh
//! SPAKE2 randomness makes every session's keys new, so a retry never reuses a key.
//!
//! **What fails, and how.** A wrong code (one word off, or another nameplate), a swapped
//! or edited sealed hello, messages replayed from an older session, messages mixed between
//! two pairings, a reflected message: all end in [`PakeError::WrongCodeOrTampered`], and
//! never in a hello. The PAKE cannot tell a mistyped code from an attack, and the message
//! says both.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::CryptoRng;
use ring::{aead, digest, hkdf, hmac};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use super::code::{Code, Nameplate};
use crate::identity::Fingerprint;
use crate::wire::{ProbeKey, ProbeKeys};

/// HKDF output length for a probe key.
struct ProbeKeyLen;

impl hkdf::KeyType for ProbeKeyLen {
    fn len(&self) -> usize {
        32
    }
}

/// Version of the meet protocol: the first byte of every PAKE message and of every hello,
/// bumped on any incompatible change so mismatched peers fail with a clear error instead
/// of a confusing "wrong code". Version 2: the rendezvous no longer gives the peer's
/// address (only the hellos carry addresses), and probes after the PAKE are authenticated
/// ([`SessionKeys::probe_keys`]); a version-1 peer would neither be probed nor answered.
pub const VERSION: u8 = 2;

// The sizes the rendezvous carries are its own (it checks them on the wire, and sits
// below this module); the PAKE and the sealed hello are built to fit them exactly.
pub use crate::rendezvous::{MAX_SEALED, PAKE_MSG_LEN};

/// Most address candidates a hello may carry.
pub const MAX_CANDIDATES: usize = 32;

/// Longest NAT description a hello may carry, in bytes (printable ASCII only).
pub const MAX_NAT_LEN: usize = 64;

/// Largest encoded hello accepted. A valid one is at most 696 bytes (32 IPv6 candidates
/// and a full NAT description); anything bigger is refused before it is looked at.
pub const MAX_HELLO: usize = 2048;

// A sealed hello is at most [`MAX_HELLO`] plus the authentication tag, which is what
// the rendezvous lets through.
const _: () = assert!(MAX_SEALED == MAX_HELLO + TAG_LEN);

/// Length of a [`SessionKeys::bind`] tag (HMAC-SHA256).
pub const BIND_TAG_LEN: usize = 32;

const TAG_LEN: usize = 16;
const FINGERPRINT_LEN: usize = 20;
const SPAKE_IDENTITY: &[u8] = b"qpunch-meet/1";
const TRANSCRIPT_LABEL: &[u8] = b"qpunch-meet/1 transcript";
const RECEIVER_TO_SENDER: &[u8] = b"qpunch-meet/1 hello receiver->sender";
const SENDER_TO_RECEIVER: &[u8] = b"qpunch-meet/1 hello sender->receiver";
const BIND_LABEL: &[u8] = b"qpunch-meet/1 bind tls";
const PROBES_RECEIVER_TO_SENDER: &[u8] = b"qpunch-meet/2 probes receiver->sender";
const PROBES_SENDER_TO_RECEIVER: &[u8] = b"qpunch-meet/2 probes sender->receiver";
const HELLO_AAD: &[u8] = b"qpunch-meet/1 hello";
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Which end of a transfer a peer is. The two peers of a meeting must take different roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Printed the code, and receives files.
    Receiver,
    /// Typed the code in, and sends files.
    Sender,
}

impl Role {
    /// The role the other peer must have.
    pub fn peer(self) -> Role {
        match self {
            Role::Receiver => Role::Sender,
            Role::Sender => Role::Receiver,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Role::Receiver => 1,
            Role::Sender => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Role> {
        match byte {
            1 => Some(Role::Receiver),
            2 => Some(Role::Sender),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Receiver => "receiver",
            Role::Sender => "sender",
        })
    }
}

/// What each peer tells the other once the PAKE has given them shared keys.
///
/// Encoded compactly (all integers big-endian):
///
/// | bytes        | field        | notes                                             |
/// |--------------|--------------|---------------------------------------------------|
/// | 0            | version      | must be [`VERSION`]                               |
/// | 1            | role         | `1` receiver, `2` sender                          |
/// | 2..22        | fingerprint  | 20 raw bytes                                      |
/// | 22           | count        | at most [`MAX_CANDIDATES`]                        |
/// | per candidate| address      | family `4`/`6`, port (2 bytes), 4 or 16 bytes     |
/// | next         | nat length   | at most [`MAX_NAT_LEN`]                           |
/// | next         | nat          | printable ASCII                                   |
///
/// IPv6 flow info and scope ids are not carried: they mean nothing on the peer's host.
/// Candidates are hints from someone who knows the code, not facts: the one connection
/// that counts is the one whose TLS fingerprint matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's meet protocol version ([`VERSION`]).
    pub version: u8,
    /// The sender's role.
    pub role: Role,
    /// The fingerprint its TLS certificate will show: the peer pins it.
    pub fingerprint: Fingerprint,
    /// Addresses it may be reached at, best first (at most [`MAX_CANDIDATES`]).
    pub candidates: Vec<SocketAddr>,
    /// How its NAT behaves, as a short printable ASCII word (at most [`MAX_NAT_LEN`]).
    pub nat: String,
}

/// Why bytes are not a valid [`Hello`], or a hello cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Longer than [`MAX_HELLO`].
    #[error("hello of {0} bytes exceeds the {max}-byte limit", max = MAX_HELLO)]
    TooLong(usize),
    /// Ends before a field it announces.
    #[error("hello truncated")]
    Truncated,
    /// A protocol version other than [`VERSION`].
    #[error(
        "peer speaks meet protocol version {0}, this qpunch speaks {VERSION}: \
         use the same qpunch version on both ends"
    )]
    UnsupportedVersion(u8),
    /// The role byte is neither receiver nor sender.
    #[error("unknown role {0}")]
    BadRole(u8),
    /// The hello is from the wrong end: both peers took the same role.
    #[error("hello is from a {0}, but this side is one too")]
    UnexpectedRole(Role),
    /// More than [`MAX_CANDIDATES`] candidates.
    #[error("{0} address candidates, at most {MAX_CANDIDATES} allowed")]
    TooManyCandidates(usize),
    /// An address family other than 4 or 6.
    #[error("bad address family {0}")]
    BadAddressFamily(u8),
    /// NAT description longer than [`MAX_NAT_LEN`].
    #[error("NAT description of {0} bytes, at most {MAX_NAT_LEN} allowed")]
    NatTooLong(usize),
    /// NAT description with bytes other than printable ASCII.
    #[error("NAT description is not printable ASCII")]
    BadNat,
    /// Bytes left over after the last field.
    #[error("trailing bytes after the hello")]
    TrailingBytes,
}

impl Hello {
    /// Encodes the hello, or says why it is out of bounds.
    pub fn encode(&self) -> Result<Vec<u8>, HelloError> {
        if self.candidates.len() > MAX_CANDIDATES {
            return Err(HelloError::TooManyCandidates(self.candidates.len()));
        }
        check_nat(self.nat.as_bytes())?;
        let mut out = Vec::with_capacity(64);
        out.push(self.version);
        out.push(self.role.byte());
        out.extend_from_slice(self.fingerprint.as_bytes());
        out.push(self.candidates.len() as u8);
        for addr in &self.candidates {
            let port = addr.port().to_be_bytes();
            match addr.ip() {
                IpAddr::V4(ip) => {
                    out.push(FAMILY_V4);
                    out.extend_from_slice(&port);
                    out.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    out.push(FAMILY_V6);
                    out.extend_from_slice(&port);
                    out.extend_from_slice(&ip.octets());
                }
            }
        }
        out.push(self.nat.len() as u8);
        out.extend_from_slice(self.nat.as_bytes());
        Ok(out)
    }

    /// Parses an encoded hello. Never panics; allocates only after the length check.
    pub fn decode(bytes: &[u8]) -> Result<Hello, HelloError> {
        if bytes.len() > MAX_HELLO {
            return Err(HelloError::TooLong(bytes.len()));
        }
        let mut r = Reader { rest: bytes };
        let version = r.byte()?;
        if version != VERSION {
            return Err(HelloError::UnsupportedVersion(version));
        }
        let role_byte = r.byte()?;
        let role = Role::from_byte(role_byte).ok_or(HelloError::BadRole(role_byte))?;
        let fingerprint = Fingerprint::from_bytes(r.array::<FINGERPRINT_LEN>()?);
        let count = usize::from(r.byte()?);
        if count > MAX_CANDIDATES {
            return Err(HelloError::TooManyCandidates(count));
        }
        let mut candidates = Vec::with_capacity(count);
        for _ in 0..count {
            let family = r.byte()?;
            let port = u16::from_be_bytes(r.array()?);
            let ip = match family {
                FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
                other => return Err(HelloError::BadAddressFamily(other)),
            };
            candidates.push(SocketAddr::new(ip, port));
        }
        let nat_len = usize::from(r.byte()?);
        let nat = r.take(nat_len)?;
        check_nat(nat)?;
        if !r.rest.is_empty() {
            return Err(HelloError::TrailingBytes);
        }
        Ok(Hello {
            version,
            role,
            fingerprint,
            candidates,
            // check_nat allowed printable ASCII only.
            nat: String::from_utf8_lossy(nat).into_owned(),
        })
    }
}

fn check_nat(nat: &[u8]) -> Result<(), HelloError> {
    if nat.len() > MAX_NAT_LEN {
        return Err(HelloError::NatTooLong(nat.len()));
    }
    if !nat.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(HelloError::BadNat);
    }
    Ok(())
}

/// Why the exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PakeError {
    /// The peer's message or sealed hello does not fit our keys: the codes differ, or
    /// someone (the rendezvous, a guesser) swapped, replayed, reflected or edited messages.
    #[error(
        "the code is wrong, or someone tampered with the exchange: \
         check the code with the other person and try again with a new one"
    )]
    WrongCodeOrTampered,
    /// A message that cannot be a PAKE message or a sealed hello at all.
    #[error("malformed meet message: {0}")]
    Malformed(&'static str),
    /// The peer's PAKE message is for another version of the meet protocol.
    #[error(
        "peer speaks meet protocol version {0}, this qpunch speaks {VERSION}: \
         use the same qpunch version on both ends"
    )]
    UnsupportedVersion(u8),
    /// Our own hello cannot be sealed: it is out of bounds or claims the wrong role.
    #[error("cannot send hello: {0}")]
    OwnHello(HelloError),
    /// The peer's hello is authentic but invalid: a peer with the code that misbehaves,
    /// or speaks another version.
    #[error("invalid hello from the peer: {0}")]
    PeerHello(HelloError),
    /// [`SessionKeys::seal`] was already called: a key seals one message only.
    #[error("this session already sealed its hello (one message per key)")]
    AlreadySealed,
}

/// One side of the PAKE, between sending its message and receiving the peer's.
pub struct Pake {
    spake: Spake2<Ed25519Group>,
    role: Role,
    nameplate: Nameplate,
    own_msg: Vec<u8>,
}

impl fmt::Debug for Pake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The SPAKE2 state holds the password: never print it.
        f.debug_struct("Pake")
            .field("role", &self.role)
            .field("nameplate", &self.nameplate.as_str())
            .finish_non_exhaustive()
    }
}

impl Pake {
    /// Starts the PAKE for `code` as `role`; returns the state and the message for the
    /// peer ([`PAKE_MSG_LEN`] bytes).
    pub fn start(code: &Code, role: Role, rng: &mut impl CryptoRng) -> (Pake, Vec<u8>) {
        let password = Password::new(code.secret_bytes());
        let mut identity = SPAKE_IDENTITY.to_vec();
        identity.push(b':');
        identity.extend_from_slice(code.nameplate().as_str().as_bytes());
        let (spake, spake_msg) = Spake2::<Ed25519Group>::start_symmetric_with_rng(
            &password,
            &Identity::new(&identity),
            Rng06(rng),
        );
        let mut own_msg = Vec::with_capacity(PAKE_MSG_LEN);
        own_msg.push(VERSION);
        own_msg.extend_from_slice(&spake_msg);
        let pake = Pake {
            spake,
            role,
            nameplate: code.nameplate().clone(),
            own_msg: own_msg.clone(),
        };
        (pake, own_msg)
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Finishes with the peer's message. Succeeds for any well-formed message: whether
    /// the peer had the same code only shows when its sealed hello (or bind tag) is
    /// checked, which fails with [`PakeError::WrongCodeOrTampered`] if not. Our own
    /// message reflected back is refused here already.
    pub fn finish(self, peer_msg: &[u8]) -> Result<SessionKeys, PakeError> {
        let (&version, spake_msg) = peer_msg
            .split_first()
            .ok_or(PakeError::Malformed("empty PAKE message"))?;
        if version != VERSION {
            return Err(PakeError::UnsupportedVersion(version));
        }
        if peer_msg == self.own_msg {
            return Err(PakeError::WrongCodeOrTampered);
        }
        let key = self.spake.finish(spake_msg).map_err(|e| match e {
            spake2::Error::WrongLength => PakeError::Malformed("PAKE message of wrong length"),
            spake2::Error::BadSide => PakeError::Malformed("not a symmetric SPAKE2 message"),
            spake2::Error::CorruptMessage => PakeError::Malformed("PAKE message is not a point"),
        })?;
        let (receiver_msg, sender_msg) = match self.role {
            Role::Receiver => (self.own_msg.as_slice(), peer_msg),
            Role::Sender => (peer_msg, self.own_msg.as_slice()),
        };
        Ok(SessionKeys::derive(
            self.role,
            &key,
            &self.nameplate,
            receiver_msg,
            sender_msg,
        ))
    }
}

/// Keys shared with the peer after the PAKE: one sealed hello each way, and tags that bind
/// an existing TLS connection to the code.
pub struct SessionKeys {
    role: Role,
    /// Taken by the one [`SessionKeys::seal`] allowed.
    seal_key: Option<aead::LessSafeKey>,
    open_key: aead::LessSafeKey,
    bind_key: hmac::Key,
    probe_keys: ProbeKeys,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("role", &self.role)
            .field("sealed", &self.seal_key.is_none())
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    fn derive(
        role: Role,
        spake_key: &[u8],
        nameplate: &Nameplate,
        receiver_msg: &[u8],
        sender_msg: &[u8],
    ) -> SessionKeys {
        // Both messages are fixed-length and the nameplate is length-prefixed, so the
        // transcript is unambiguous.
        let mut transcript = digest::Context::new(&digest::SHA256);
        transcript.update(TRANSCRIPT_LABEL);
        transcript.update(&[nameplate.as_str().len() as u8]);
        transcript.update(nameplate.as_str().as_bytes());
        transcript.update(receiver_msg);
        transcript.update(sender_msg);
        let transcript = transcript.finish();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, transcript.as_ref()).extract(spake_key);
        let aead_key = |label: &[u8]| {
            let label = [label];
            let okm = prk
                .expand(&label, &aead::CHACHA20_POLY1305)
                .expect("a 32-byte HKDF output is within limits");
            aead::LessSafeKey::new(aead::UnboundKey::from(okm))
        };
        let (seal_key, open_key) = match role {
            Role::Receiver => (aead_key(RECEIVER_TO_SENDER), aead_key(SENDER_TO_RECEIVER)),
            Role::Sender => (aead_key(SENDER_TO_RECEIVER), aead_key(RECEIVER_TO_SENDER)),
        };
        let bind_key = hmac::Key::from(
            prk.expand(&[BIND_LABEL], hmac::HMAC_SHA256)
                .expect("a 32-byte HKDF output is within limits"),
        );
        let probe_key = |label: &[u8]| {
            let mut bytes = [0; 32];
            prk.expand(&[label], ProbeKeyLen)
                .and_then(|okm| okm.fill(&mut bytes))
                .expect("a 32-byte HKDF output is within limits");
            ProbeKey::from_bytes(bytes)
        };
        let (to_sender, to_receiver) = (
            probe_key(PROBES_RECEIVER_TO_SENDER),
            probe_key(PROBES_SENDER_TO_RECEIVER),
        );
        let probe_keys = match role {
            Role::Receiver => ProbeKeys {
                ours: to_sender,
                theirs: to_receiver,
            },
            Role::Sender => ProbeKeys {
                ours: to_receiver,
                theirs: to_sender,
            },
        };
        SessionKeys {
            role,
            seal_key: Some(seal_key),
            open_key,
            bind_key,
            probe_keys,
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The keys that authenticate this meeting's probes and replies (one per direction,
    /// each under its own HKDF label): only someone who knows the code can make a probe
    /// the peer answers as ours, or a reply that counts (see [`crate::traverse`]).
    pub fn probe_keys(&self) -> ProbeKeys {
        self.probe_keys.clone()
    }

    /// Seals our hello for the peer. Works once: the key is used for this one message
    /// (its nonce is fixed), and a second call fails with [`PakeError::AlreadySealed`].
    /// A hello that cannot be encoded, or that claims the other role, does not use up
    /// the key.
    pub fn seal(&mut self, hello: &Hello) -> Result<Vec<u8>, PakeError> {
        if hello.role != self.role {
            return Err(PakeError::OwnHello(HelloError::UnexpectedRole(hello.role)));
        }
        let mut buf = hello.encode().map_err(PakeError::OwnHello)?;
        let key = self.seal_key.take().ok_or(PakeError::AlreadySealed)?;
        key.seal_in_place_append_tag(nonce(), hello_aad(self.role), &mut buf)
            .expect("a hello is far below the AEAD length limit");
        Ok(buf)
    }

    /// Opens the peer's sealed hello. Anything not sealed by a peer with the same code,
    /// in this session, in the other role, fails with [`PakeError::WrongCodeOrTampered`].
    pub fn open(&self, sealed: &[u8]) -> Result<Hello, PakeError> {
        if sealed.len() > MAX_SEALED {
            return Err(PakeError::Malformed("sealed hello too long"));
        }
        if sealed.len() < TAG_LEN {
            return Err(PakeError::Malformed("sealed hello too short"));
        }
        let mut buf = sealed.to_vec();
        let plain = self
            .open_key
            .open_in_place(nonce(), hello_aad(self.role.peer()), &mut buf)
            .map_err(|_| PakeError::WrongCodeOrTampered)?;
        let hello = Hello::decode(plain).map_err(PakeError::PeerHello)?;
        if hello.role != self.role.peer() {
            return Err(PakeError::PeerHello(HelloError::UnexpectedRole(hello.role)));
        }
        Ok(hello)
    }

    /// Key confirmation for a PAKE run over an already-open but *unpinned* connection
    /// (the LAN case: peers found each other by broadcast, and know no fingerprints yet).
    ///
    /// The threat: someone on the path terminates TLS towards each peer with certificates
    /// of its own and relays the bytes between the two connections. It cannot learn the
    /// code, but if it relays the PAKE messages unchanged both peers derive the *same*
    /// keys, so the PAKE alone would look fine while it reads and edits everything else
    /// on the spliced connections. So each peer sends a tag over the fingerprints *it*
    /// sees (its own and the peer's), which the other checks against what *it* sees
    /// ([`SessionKeys::confirm`]). Across a splice the two views differ (A sees A and M1,
    /// B sees M2 and B), and a matching tag needs the key, which needs the code.
    ///
    /// The tag also names our role, so it cannot be reflected back as the peer's.
    pub fn bind(&self, own: &Fingerprint, peer: &Fingerprint) -> [u8; BIND_TAG_LEN] {
        let tag = hmac::sign(&self.bind_key, &bind_input(self.role, own, peer));
        let mut out = [0; BIND_TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Checks the peer's [`SessionKeys::bind`] tag against the fingerprints this side
    /// sees on the connection (`own` ours, `peer` the one the peer presented), in
    /// constant time. Fails with [`PakeError::WrongCodeOrTampered`].
    pub fn confirm(
        &self,
        own: &Fingerprint,
        peer: &Fingerprint,
        tag: &[u8],
    ) -> Result<(), PakeError> {
        // The peer computed bind(its own = our `peer`, its peer = our `own`).
        hmac::verify(
            &self.bind_key,
            &bind_input(self.role.peer(), peer, own),
            tag,
        )
        .map_err(|_| PakeError::WrongCodeOrTampered)
    }
}

/// The fixed nonce: safe only because each key seals a single message.
fn nonce() -> aead::Nonce {
    aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN])
}

/// Associated data naming the sealer's role: a second, independent guard against
/// reflection on top of the per-direction keys.
fn hello_aad(sealer: Role) -> aead::Aad<[u8; HELLO_AAD.len() + 1]> {
    let mut aad = [0; HELLO_AAD.len() + 1];
    aad[..HELLO_AAD.len()].copy_from_slice(HELLO_AAD);
    aad[HELLO_AAD.len()] = sealer.byte();
    aead::Aad::from(aad)
}

fn bind_input(signer: Role, signer_fp: &Fingerprint, other_fp: &Fingerprint) -> Vec<u8> {
    let mut input = Vec::with_capacity(BIND_LABEL.len() + 1 + 2 * FINGERPRINT_LEN);
    input.extend_from_slice(BIND_LABEL);
    input.push(signer.byte());
    input.extend_from_slice(signer_fp.as_bytes());
    input.extend_from_slice(other_fp.as_bytes());
    input
}

/// rand 0.10's generator seen through rand_core 0.6's traits, which `spake2` 0.4 takes.
struct Rng06<'a, R: ?Sized>(&'a mut R);

impl<R: CryptoRng + ?Sized> rand_core_06::RngCore for Rng06<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core_06::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl<R: CryptoRng + ?Sized> rand_core_06::CryptoRng for Rng06<'_, R> {}

/// A cursor whose reads fail with [`HelloError::Truncated`] instead of panicking.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(HelloError::Truncated)?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], HelloError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(HelloError::Truncated)?;
        self.rest = tail;
        Ok(*head)
    }

    fn byte(&mut self) -> Result<u8, HelloError> {
        let [b] = self.array()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn code(text: &str) -> Code {
        text.parse().unwrap()
    }

    fn fp(name: &str) -> Fingerprint {
        Fingerprint::of_spki(name.as_bytes())
    }

    fn hello(role: Role, name: &str) -> Hello {
        Hello {
            version: VERSION,
            role,
            fingerprint: fp(name),
            candidates: vec![
                "198.51.100.7:9199".parse().unwrap(),
                "[2001:db8::7]:9199".parse().unwrap(),
                "10.0.0.7:40000".parse().unwrap(),
            ],
            nat: "endpoint-independent".into(),
        }
    }

    /// One side's whole view of a meeting: its PAKE state and what it sent.
    struct Side {
        pake: Pake,
        msg: Vec<u8>,
    }

    fn start(code_text: &str, role: Role, seed: u64) -> Side {
        let (pake, msg) = Pake::start(&code(code_text), role, &mut StdRng::seed_from_u64(seed));
        Side { pake, msg }
    }

    /// Runs the PAKE for a receiver and a sender (honest relay), each with its own code.
    fn pair(receiver_code: &str, sender_code: &str, seed: u64) -> (SessionKeys, SessionKeys) {
        let r = start(receiver_code, Role::Receiver, seed);
        let s = start(sender_code, Role::Sender, seed + 1_000_000);
        (
            r.pake.finish(&s.msg).unwrap(),
            s.pake.finish(&r.msg).unwrap(),
        )
    }

    /// Both sides seal their hello; returns what each one opened from the other.
    fn exchange(
        receiver: &mut SessionKeys,
        sender: &mut SessionKeys,
    ) -> (Result<Hello, PakeError>, Result<Hello, PakeError>) {
        let to_sender = receiver.seal(&hello(Role::Receiver, "receiver")).unwrap();
        let to_receiver = sender.seal(&hello(Role::Sender, "sender")).unwrap();
        (receiver.open(&to_receiver), sender.open(&to_sender))
    }

    const CODE: &str = "7-clockwork-crossover";

    #[test]
    fn round_trip() {
        let (mut receiver, mut sender) = pair(CODE, CODE, 1);
        let (at_receiver, at_sender) = exchange(&mut receiver, &mut sender);
        assert_eq!(at_receiver, Ok(hello(Role::Sender, "sender")));
        assert_eq!(at_sender, Ok(hello(Role::Receiver, "receiver")));
        // The same code typed differently is the same code.
        let (mut receiver, mut sender) = pair(CODE, " 7 Crossover CLOCKWORK", 2);
        let (at_receiver, at_sender) = exchange(&mut receiver, &mut sender);
        assert!(at_receiver.is_ok() && at_sender.is_ok());
    }

    #[test]
    fn messages_are_versioned_and_deterministic_for_a_seed() {
        let a = start(CODE, Role::Receiver, 9);
        let b = start(CODE, Role::Receiver, 9);
        let c = start(CODE, Role::Receiver, 10);
        assert_eq!(a.msg.len(), PAKE_MSG_LEN);
        assert_eq!(a.msg[0], VERSION);
        assert_eq!(a.msg, b.msg);
        assert_ne!(a.msg, c.msg);
        assert_eq!(a.pake.role(), Role::Receiver);
        let debug = format!("{:?}", a.pake);
        assert!(!debug.contains("clockwork"), "{debug}");
    }

    #[test]
    fn wrong_code_fails_on_both_sides() {
        for wrong in [
            "7-clockwork-councilman", // odd word off by one byte
            "7-cobra-crossover",      // even word off by one byte
            "8-clockwork-crossover",  // same words, other nameplate
            "7-aardvark-adroitness",
        ] {
            let (mut receiver, mut sender) = pair(CODE, wrong, 3);
            let (at_receiver, at_sender) = exchange(&mut receiver, &mut sender);
            assert_eq!(at_receiver, Err(PakeError::WrongCodeOrTampered), "{wrong}");
            assert_eq!(at_sender, Err(PakeError::WrongCodeOrTampered), "{wrong}");
        }
    }

    #[test]
    fn any_edit_of_a_sealed_hello_fails() {
        let (mut receiver, mut sender) = pair(CODE, CODE, 4);
        let sealed = sender.seal(&hello(Role::Sender, "sender")).unwrap();
        receiver.seal(&hello(Role::Receiver, "receiver")).unwrap();
        for i in 0..sealed.len() {
            for flip in [0x01, 0x80] {
                let mut edited = sealed.clone();
                edited[i] ^= flip;
                assert_eq!(receiver.open(&edited), Err(PakeError::WrongCodeOrTampered));
            }
        }
        let cut = &sealed[..sealed.len() - 1];
        assert_eq!(receiver.open(cut), Err(PakeError::WrongCodeOrTampered));
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(receiver.open(&longer), Err(PakeError::WrongCodeOrTampered));
        assert!(
            receiver.open(&sealed).is_ok(),
            "the untouched hello still opens"
        );
    }

    /// A rendezvous that wants peers to pin *its* fingerprint and dial *its* addresses
    /// must seal a hello of its own, which needs keys, which need the code.
    #[test]
    fn middleman_cannot_swap_fingerprint_or_candidates() {
        let r = start(CODE, Role::Receiver, 5);
        let s = start(CODE, Role::Sender, 6);
        // The middleman runs a PAKE with each side, guessing the code.
        let guess = "7-clockwork-councilman";
        let m_to_r = start(guess, Role::Sender, 7);
        let m_to_s = start(guess, Role::Receiver, 8);
        let mut receiver = r.pake.finish(&m_to_r.msg).unwrap();
        let mut sender = s.pake.finish(&m_to_s.msg).unwrap();
        let mut m_r = m_to_r.pake.finish(&r.msg).unwrap();
        let mut m_s = m_to_s.pake.finish(&s.msg).unwrap();
        let mut evil = hello(Role::Sender, "middleman");
        evil.candidates = vec!["198.51.100.66:1".parse().unwrap()];
        let to_receiver = m_r.seal(&evil).unwrap();
        evil.role = Role::Receiver;
        let to_sender = m_s.seal(&evil).unwrap();
        assert_eq!(
            receiver.open(&to_receiver),
            Err(PakeError::WrongCodeOrTampered)
        );
        assert_eq!(sender.open(&to_sender), Err(PakeError::WrongCodeOrTampered));
        // Nor does it learn the real hellos.
        let real_r = receiver.seal(&hello(Role::Receiver, "receiver")).unwrap();
        let real_s = sender.seal(&hello(Role::Sender, "sender")).unwrap();
        assert_eq!(m_r.open(&real_r), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(m_s.open(&real_s), Err(PakeError::WrongCodeOrTampered));
    }

    #[test]
    fn replay_of_an_old_session_fails() {
        // Session 1 completes honestly; the rendezvous records everything.
        let r1 = start(CODE, Role::Receiver, 10);
        let s1 = start(CODE, Role::Sender, 11);
        let mut sender1 = s1.pake.finish(&r1.msg).unwrap();
        let old_sealed = sender1.seal(&hello(Role::Sender, "sender")).unwrap();
        assert!(r1.pake.finish(&s1.msg).unwrap().open(&old_sealed).is_ok());

        // Session 2, same code (say, a retry): the old PAKE message and hello replayed.
        let r2 = start(CODE, Role::Receiver, 12);
        let receiver2 = r2.pake.finish(&s1.msg).unwrap();
        assert_eq!(
            receiver2.open(&old_sealed),
            Err(PakeError::WrongCodeOrTampered)
        );

        // Fresh PAKE messages, but the old sealed hello.
        let r3 = start(CODE, Role::Receiver, 13);
        let s3 = start(CODE, Role::Sender, 14);
        let receiver3 = r3.pake.finish(&s3.msg).unwrap();
        assert_eq!(
            receiver3.open(&old_sealed),
            Err(PakeError::WrongCodeOrTampered)
        );
    }

    #[test]
    fn mixing_two_pairings_fails() {
        // Two meetings at once, (r1, s1) and (r2, s2); the rendezvous crosses their PAKE
        // messages, so r1 talks to s2 and r2 to s1.
        let other = "8-aardvark-adroitness";
        let r1 = start(CODE, Role::Receiver, 20);
        let s1 = start(CODE, Role::Sender, 21);
        let r2 = start(other, Role::Receiver, 22);
        let s2 = start(other, Role::Sender, 23);
        let mut receiver1 = r1.pake.finish(&s2.msg).unwrap();
        let mut sender2 = s2.pake.finish(&r1.msg).unwrap();
        let mut receiver2 = r2.pake.finish(&s1.msg).unwrap();
        let mut sender1 = s1.pake.finish(&r2.msg).unwrap();
        for (receiver, sender) in [
            (&mut receiver1, &mut sender2),
            (&mut receiver2, &mut sender1),
        ] {
            let (at_receiver, at_sender) = exchange(receiver, sender);
            assert_eq!(at_receiver, Err(PakeError::WrongCodeOrTampered));
            assert_eq!(at_sender, Err(PakeError::WrongCodeOrTampered));
        }
    }

    /// Same code, two honest sessions (a retry racing the first attempt, say): the
    /// rendezvous delivers the PAKE messages faithfully but swaps the sealed hellos.
    #[test]
    fn hellos_swapped_between_two_honest_pairings_fail() {
        let (mut r1, mut s1) = pair(CODE, CODE, 30);
        let (mut r2, mut s2) = pair(CODE, CODE, 40);
        let from_s1 = s1.seal(&hello(Role::Sender, "s1")).unwrap();
        let from_s2 = s2.seal(&hello(Role::Sender, "s2")).unwrap();
        let from_r1 = r1.seal(&hello(Role::Receiver, "r1")).unwrap();
        let from_r2 = r2.seal(&hello(Role::Receiver, "r2")).unwrap();
        assert_eq!(r1.open(&from_s2), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(r2.open(&from_s1), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(s1.open(&from_r2), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(s2.open(&from_r1), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(r1.open(&from_s1).unwrap().fingerprint, fp("s1"));
    }

    #[test]
    fn reflection_fails() {
        // Our own PAKE message back.
        let r = start(CODE, Role::Receiver, 50);
        let own = r.msg.clone();
        assert_eq!(
            r.pake.finish(&own).err(),
            Some(PakeError::WrongCodeOrTampered)
        );
        // Our own sealed hello back.
        let (mut receiver, _) = pair(CODE, CODE, 51);
        let sealed = receiver.seal(&hello(Role::Receiver, "receiver")).unwrap();
        assert_eq!(receiver.open(&sealed), Err(PakeError::WrongCodeOrTampered));
        // Two peers that both took the receiver role (same code): neither opens the other.
        let a = start(CODE, Role::Receiver, 52);
        let b = start(CODE, Role::Receiver, 53);
        let mut a_keys = a.pake.finish(&b.msg).unwrap();
        let mut b_keys = b.pake.finish(&a.msg).unwrap();
        let from_a = a_keys.seal(&hello(Role::Receiver, "a")).unwrap();
        let from_b = b_keys.seal(&hello(Role::Receiver, "b")).unwrap();
        assert_eq!(a_keys.open(&from_b), Err(PakeError::WrongCodeOrTampered));
        assert_eq!(b_keys.open(&from_a), Err(PakeError::WrongCodeOrTampered));
    }

    /// Reflection is stopped twice over: by a key per direction, and by the sealer's role
    /// in the associated data. Each guard alone must hold.
    #[test]
    fn directions_have_distinct_keys_and_aad() {
        let (receiver, sender) = pair(CODE, CODE, 55);
        let seal = |key: &aead::LessSafeKey, sealer: Role| {
            let mut buf = b"same plaintext".to_vec();
            key.seal_in_place_append_tag(nonce(), hello_aad(sealer), &mut buf)
                .unwrap();
            buf
        };
        let r_seal = receiver.seal_key.as_ref().unwrap();
        let s_seal = sender.seal_key.as_ref().unwrap();
        // The two sides agree on each direction's key...
        assert_eq!(
            seal(r_seal, Role::Receiver),
            seal(&sender.open_key, Role::Receiver)
        );
        assert_eq!(
            seal(s_seal, Role::Sender),
            seal(&receiver.open_key, Role::Sender)
        );
        // ...and the two directions differ.
        assert_ne!(seal(r_seal, Role::Receiver), seal(s_seal, Role::Receiver));
        // The right key with the wrong role in the associated data does not open.
        let mut wrong_aad = hello(Role::Sender, "sender").encode().unwrap();
        s_seal
            .seal_in_place_append_tag(nonce(), hello_aad(Role::Receiver), &mut wrong_aad)
            .unwrap();
        assert_eq!(
            receiver.open(&wrong_aad),
            Err(PakeError::WrongCodeOrTampered)
        );
    }

    #[test]
    fn probe_keys_agree_per_direction_and_differ_across_sessions_and_codes() {
        let (receiver, sender) = pair(CODE, CODE, 56);
        let (r, s) = (receiver.probe_keys(), sender.probe_keys());
        assert_eq!(
            r.ours, s.theirs,
            "the receiver's probes verify at the sender"
        );
        assert_eq!(s.ours, r.theirs, "and the other way");
        assert_ne!(r.ours, r.theirs, "a reflected probe does not verify");
        let (again, _) = pair(CODE, CODE, 57);
        assert_ne!(again.probe_keys().ours, r.ours, "fresh keys each session");
        let (_, guesser) = pair(CODE, "7-clockwork-councilman", 56);
        assert_ne!(
            guesser.probe_keys().ours,
            r.theirs,
            "a wrong code gives other keys"
        );
    }

    #[test]
    fn seal_works_once() {
        let (mut receiver, _) = pair(CODE, CODE, 60);
        let mut wrong_role = hello(Role::Receiver, "receiver");
        wrong_role.role = Role::Sender;
        assert_eq!(
            receiver.seal(&wrong_role),
            Err(PakeError::OwnHello(HelloError::UnexpectedRole(
                Role::Sender
            )))
        );
        let mut too_big = hello(Role::Receiver, "receiver");
        too_big.nat = "x".repeat(MAX_NAT_LEN + 1);
        assert_eq!(
            receiver.seal(&too_big),
            Err(PakeError::OwnHello(HelloError::NatTooLong(MAX_NAT_LEN + 1)))
        );
        // Neither refusal used the key up.
        assert!(receiver.seal(&hello(Role::Receiver, "receiver")).is_ok());
        assert_eq!(
            receiver.seal(&hello(Role::Receiver, "receiver")),
            Err(PakeError::AlreadySealed)
        );
        assert!(format!("{receiver:?}").contains("sealed: true"));
    }

    #[test]
    fn peer_hello_that_authenticates_but_lies_about_its_role_is_refused() {
        let (mut receiver, sender) = pair(CODE, CODE, 61);
        // A buggy peer: bypass seal's own check by sealing with the sender's key by hand.
        let mut lying = hello(Role::Receiver, "liar").encode().unwrap();
        sender
            .seal_key
            .as_ref()
            .unwrap()
            .seal_in_place_append_tag(nonce(), hello_aad(Role::Sender), &mut lying)
            .unwrap();
        assert_eq!(
            receiver.open(&lying),
            Err(PakeError::PeerHello(HelloError::UnexpectedRole(
                Role::Receiver
            )))
        );
        receiver.seal(&hello(Role::Receiver, "receiver")).unwrap();
    }

    #[test]
    fn malformed_pake_messages() {
        let peer = start(CODE, Role::Sender, 70).msg;
        let finish = |msg: &[u8]| start(CODE, Role::Receiver, 71).pake.finish(msg).err();
        assert_eq!(
            finish(&[]),
            Some(PakeError::Malformed("empty PAKE message"))
        );
        assert_eq!(
            finish(&peer[..PAKE_MSG_LEN - 1]),
            Some(PakeError::Malformed("PAKE message of wrong length"))
        );
        let mut newer = peer.clone();
        newer[0] = VERSION + 1;
        assert_eq!(
            finish(&newer),
            Some(PakeError::UnsupportedVersion(VERSION + 1))
        );
        // A peer of the previous version (it would probe unauthenticated) fails by name.
        let mut older = peer.clone();
        older[0] = 1;
        assert_eq!(finish(&older), Some(PakeError::UnsupportedVersion(1)));
        let text = PakeError::UnsupportedVersion(1).to_string();
        assert!(text.contains("version 1, this qpunch speaks 2"), "{text}");
        let mut side = peer.clone();
        side[1] = b'A';
        assert_eq!(
            finish(&side),
            Some(PakeError::Malformed("not a symmetric SPAKE2 message"))
        );
        // y = 2 is not on the curve.
        let mut not_a_point = vec![VERSION, b'S', 2];
        not_a_point.resize(PAKE_MSG_LEN, 0);
        assert_eq!(
            finish(&not_a_point),
            Some(PakeError::Malformed("PAKE message is not a point"))
        );
        let (receiver, _) = pair(CODE, CODE, 72);
        assert_eq!(
            receiver.open(&[0; TAG_LEN - 1]),
            Err(PakeError::Malformed("sealed hello too short"))
        );
        assert_eq!(
            receiver.open(&vec![0; MAX_SEALED + 1]),
            Err(PakeError::Malformed("sealed hello too long"))
        );
    }

    #[test]
    fn bind_and_confirm() {
        let (a, b) = pair(CODE, CODE, 80);
        let (fa, fb) = (fp("a"), fp("b"));
        // Honest: each side sees the other's real certificate.
        assert_eq!(b.confirm(&fb, &fa, &a.bind(&fa, &fb)), Ok(()));
        assert_eq!(a.confirm(&fa, &fb, &b.bind(&fb, &fa)), Ok(()));
        // Spliced: a middleman terminates TLS towards each side with its own keys and
        // relays the PAKE untouched, so both sides hold the same session keys.
        let (fm1, fm2) = (fp("middleman towards a"), fp("middleman towards b"));
        let tag_a = a.bind(&fa, &fm1);
        let tag_b = b.bind(&fb, &fm2);
        assert_eq!(
            b.confirm(&fb, &fm2, &tag_a),
            Err(PakeError::WrongCodeOrTampered)
        );
        assert_eq!(
            a.confirm(&fa, &fm1, &tag_b),
            Err(PakeError::WrongCodeOrTampered)
        );
        // Reflected: our own tag is not the peer's.
        let tag = a.bind(&fa, &fb);
        assert_eq!(
            a.confirm(&fa, &fb, &tag),
            Err(PakeError::WrongCodeOrTampered)
        );
        // Wrong code: right fingerprints, wrong key.
        let (c, d) = pair(CODE, "7-clockwork-councilman", 81);
        assert_eq!(
            d.confirm(&fb, &fa, &c.bind(&fa, &fb)),
            Err(PakeError::WrongCodeOrTampered)
        );
        // Truncated or empty tags.
        let tag = a.bind(&fa, &fb);
        assert_eq!(
            b.confirm(&fb, &fa, &tag[..16]),
            Err(PakeError::WrongCodeOrTampered)
        );
        assert_eq!(
            b.confirm(&fb, &fa, &[]),
            Err(PakeError::WrongCodeOrTampered)
        );
    }

    #[test]
    fn hello_layout_matches_the_table() {
        let mut h = hello(Role::Sender, "sender");
        h.candidates.truncate(2);
        h.nat = "symmetric".into();
        let bytes = h.encode().unwrap();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(bytes[1], 2);
        assert_eq!(&bytes[2..22], h.fingerprint.as_bytes());
        assert_eq!(bytes[22], 2);
        assert_eq!(&bytes[23..30], &[4, 0x23, 0xef, 198, 51, 100, 7]);
        assert_eq!(bytes[30], 6);
        assert_eq!(&bytes[31..33], &9199u16.to_be_bytes());
        assert_eq!(
            &bytes[33..49],
            &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(bytes[49], 9);
        assert_eq!(&bytes[50..], b"symmetric");
        assert_eq!(Hello::decode(&bytes), Ok(h));
    }

    #[test]
    fn hello_bounds() {
        let mut h = hello(Role::Receiver, "r");
        h.candidates = vec!["[2001:db8::1]:1".parse().unwrap(); MAX_CANDIDATES];
        h.nat = "n".repeat(MAX_NAT_LEN);
        let largest = h.encode().unwrap();
        assert_eq!(largest.len(), 696, "the documented maximum");
        assert_eq!(Hello::decode(&largest), Ok(h.clone()));

        h.candidates.push("198.51.100.1:1".parse().unwrap());
        assert_eq!(
            h.encode(),
            Err(HelloError::TooManyCandidates(MAX_CANDIDATES + 1))
        );
        let mut over = largest.clone();
        over[22] = (MAX_CANDIDATES + 1) as u8;
        assert_eq!(Hello::decode(&over), Err(HelloError::TooManyCandidates(33)));

        h.candidates.clear();
        h.nat = "bell\x07".into();
        assert_eq!(h.encode(), Err(HelloError::BadNat));
        h.nat = "é".into();
        assert_eq!(h.encode(), Err(HelloError::BadNat));
        h.nat = String::new();
        let empty = h.encode().unwrap();
        assert_eq!(empty.len(), 24);
        assert_eq!(Hello::decode(&empty), Ok(h));

        assert_eq!(
            Hello::decode(&vec![VERSION; MAX_HELLO + 1]),
            Err(HelloError::TooLong(MAX_HELLO + 1))
        );
        let mut trailing = empty.clone();
        trailing.push(0);
        assert_eq!(Hello::decode(&trailing), Err(HelloError::TrailingBytes));
        assert_eq!(Hello::decode(&empty[..23]), Err(HelloError::Truncated));
        assert_eq!(Hello::decode(&[]), Err(HelloError::Truncated));
        // A hello of the previous version (no authenticated probes) is refused by name.
        let mut version = empty.clone();
        version[0] = 1;
        assert_eq!(
            Hello::decode(&version),
            Err(HelloError::UnsupportedVersion(1))
        );
        let mut role = empty.clone();
        role[1] = 3;
        assert_eq!(Hello::decode(&role), Err(HelloError::BadRole(3)));
        let mut family = hello(Role::Receiver, "r").encode().unwrap();
        family[23] = 5;
        assert_eq!(Hello::decode(&family), Err(HelloError::BadAddressFamily(5)));
        let mut nat = empty;
        nat[23] = 1;
        nat.push(0x7f);
        assert_eq!(Hello::decode(&nat), Err(HelloError::BadNat));
    }

    fn any_hello() -> impl Strategy<Value = Hello> {
        let addr = prop_oneof![
            any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            any::<([u8; 16], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ];
        (
            any::<bool>(),
            any::<[u8; 20]>(),
            proptest::collection::vec(addr, 0..=MAX_CANDIDATES),
            "[ -~]{0,64}",
        )
            .prop_map(|(receiver, fp, candidates, nat)| Hello {
                version: VERSION,
                role: if receiver {
                    Role::Receiver
                } else {
                    Role::Sender
                },
                fingerprint: Fingerprint::from_bytes(fp),
                candidates,
                nat,
            })
    }

    proptest! {
        #[test]
        fn hello_round_trip(h in any_hello()) {
            let bytes = h.encode().unwrap();
            prop_assert!(bytes.len() <= MAX_HELLO);
            prop_assert_eq!(Hello::decode(&bytes), Ok(h));
        }

        #[test]
        fn hello_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
            if let Ok(h) = Hello::decode(&bytes) {
                prop_assert_eq!(h.encode(), Ok(bytes));
            }
        }

        #[test]
        fn hello_decode_never_panics_near_valid(h in any_hello(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = h.encode().unwrap();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Ok(h) = Hello::decode(&bytes) {
                prop_assert_eq!(h.encode(), Ok(bytes));
            }
        }
    }

    proptest! {
        // Each case runs SPAKE2: fewer cases keep the test fast.
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn finish_and_open_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..80),
            point in any::<[u8; 32]>(),
            sealed in proptest::collection::vec(any::<u8>(), 0..200),
            seed in any::<u64>(),
        ) {
            let _ = start(CODE, Role::Receiver, seed).pake.finish(&raw);
            // Well framed, so about half of these are points and reach the key schedule.
            let mut framed = vec![VERSION, b'S'];
            framed.extend_from_slice(&point);
            if let Ok(keys) = start(CODE, Role::Receiver, seed).pake.finish(&framed) {
                // Random bytes never authenticate.
                prop_assert!(keys.open(&sealed).is_err());
                prop_assert!(keys.confirm(&fp("a"), &fp("b"), &sealed).is_err());
            }
        }
    }
}

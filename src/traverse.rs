//! Simultaneous hole punching between two peers that both probe (ICE-like), sans-IO.
//!
//! [`crate::punch::Puncher`] serves the seed's setting: one side is reachable and the other
//! probes it. When both sides sit behind NATs, each must probe the other *at the same
//! time*: each outgoing probe opens its own NAT for the peer's address, and the first of
//! our probes that the peer answers proves a path both ways (our probe got in through
//! their NAT because they had sent to us; the reply got in through ours because we had
//! sent to them). A [`Traversal`] is one side of that:
//!
//! - **Candidates** are the peer's addresses, each of a [`Kind`]; more arrive while it runs
//!   (host candidates from the sealed hello, peer-reflexive ones from probes that reach
//!   us). They are checked in order of kind: LAN first, then IPv6, then the addresses
//!   the NATs made.
//! - **Pacing**: one check per [`TraverseConfig::pacing`] (RFC 8445's Ta, 50 ms), each
//!   candidate retransmitted with exponential backoff, so a dozen candidates cost a
//!   few datagrams a second.
//! - **Triggered checks**: a probe from the peer, answered by the socket, also makes us
//!   probe its source at once: the peer's NAT just opened for us there.
//! - **Birthday mode** (one NAT endpoint-independent, the other not): the easy side also
//!   probes random ports of the hard side's public IP at a bounded rate, while the hard
//!   side holds many sockets open toward the easy side (see [`crate::meet`]); a probe
//!   that lands on one of those mappings is answered and wins.
//!
//! Every probe has its own transaction id (a random base XOR a sequence number), so a
//! reply identifies exactly the probe it answers, and only ours count.
//!
//! **Authenticated mode** ([`Traversal::authenticated`]), after a meeting by code: the
//! peer is whoever knows the code, not whoever probes, so every probe and reply carries a
//! tag under a key from the PAKE ([`crate::wire::ProbeKeys`]), and the rules tighten:
//! - a probe from the peer becomes a candidate (a triggered check) only if its tag
//!   verifies: an unauthenticated prober cannot add an address, let alone a preferred one.
//!   A verified probe from an address we have probed ourselves finishes the traversal at
//!   once: each side's probe got through the other's NAT, so the path works both ways
//!   (half a round trip sooner than waiting for our reply; it names the address it was
//!   sent to, our reflexive address);
//! - a reply counts only if its tag verifies *and* it comes from the very address its probe
//!   went to: a reply with a guessed or sniffed txid from elsewhere does not choose the path;
//! - random ports are probed ([`Traversal::start_birthday`]) only on the IP of a candidate
//!   we already have, i.e. one the peer sealed into its hello or one an authenticated probe
//!   came from, never an IP someone else names.
//!
//! Candidates themselves come from the caller: in a meeting, only from the peer's sealed
//! hello (the rendezvous gives no addresses), so a rendezvous cannot aim probes anywhere.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::addr::canonical;
use crate::punch::Transmit;
use crate::wire::{Message, ProbeKeys, TxId};

/// Most candidates tracked: the sealed hello carries at most 32, the rest are
/// peer-reflexive, and a peer spraying probes from many ports must not grow this.
pub const MAX_CANDIDATES: usize = 64;

/// Probes remembered for matching replies (a ring indexed by sequence number): at the
/// birthday rate that is about four seconds of history, far more than an RTT.
const SENT_RING: usize = 1024;

/// Timing of one [`Traversal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraverseConfig {
    /// Gap between two paced checks (RFC 8445's Ta; default 50 ms).
    pub pacing: Duration,
    /// First retransmission of a candidate (default 200 ms), doubling up to `max_rto`.
    pub initial_rto: Duration,
    /// Longest gap between two probes to one candidate (default 1 s).
    pub max_rto: Duration,
    /// Give up this long after the start (default 12 s).
    pub timeout: Duration,
}

impl Default for TraverseConfig {
    fn default() -> Self {
        TraverseConfig {
            pacing: Duration::from_millis(50),
            initial_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(1),
            timeout: Duration::from_secs(12),
        }
    }
}

/// Random-port probing of the hard side's public IP (birthday mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Birthday {
    /// The hard side's public address (its port is unknown: that is the point).
    pub ip: IpAddr,
    /// Probes per second.
    pub rate: u32,
    /// Probes in all; then only the ordinary candidates go on.
    pub budget: u32,
}

impl Birthday {
    /// The default budget: 250 probes a second for 12 s. Against 256 mappings held open
    /// on the hard side, each random probe hits one with p = 256/64512, so 1,200 probes
    /// (under 5 s) succeed with 99 % probability; 3,000 is the worst case sent.
    pub fn toward(ip: IpAddr) -> Self {
        Birthday {
            ip,
            rate: 250,
            budget: 3000,
        }
    }
}

/// What a candidate is, which decides the order of checks (earlier variants first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A private address on one of our own networks: the peers share a LAN.
    Lan,
    /// A port the peer's router forwards to it (PCP, NAT-PMP or UPnP, see
    /// [`crate::portmap`]): reachable from anywhere, whatever its NAT does.
    Mapped,
    /// A global IPv6 address: no NAT, only (usually) a stateful firewall.
    Ipv6,
    /// Where a probe from the peer came from: a NAT mapping that certainly exists.
    PeerReflexive,
    /// The peer's public address as the rendezvous saw it (and the peer sealed into its
    /// hello).
    Reflexive,
    /// Any other address of the peer's interfaces.
    Host,
    /// A random port of the hard side's public IP.
    Birthday,
}

impl Kind {
    /// A short stable name, for events.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Lan => "lan",
            Kind::Mapped => "mapped",
            Kind::Ipv6 => "ipv6",
            Kind::PeerReflexive => "peer_reflexive",
            Kind::Reflexive => "reflexive",
            Kind::Host => "host",
            Kind::Birthday => "birthday",
        }
    }
}

/// Success: a path that carried a probe and its reply (or, in authenticated mode, our
/// probe to an address and the peer's probe from it, which proves the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Where the reply came from: the address QUIC should use.
    pub peer: SocketAddr,
    /// The kind of the candidate whose probe was answered.
    pub kind: Kind,
    /// Our address as the peer saw it.
    pub reflexive: SocketAddr,
    /// From the answered probe to its reply (from our first probe to the address, when
    /// the peer's probe from it came first: then less than a round trip).
    pub rtt: Duration,
}

/// Why no path was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraverseError {
    /// Nothing answered in time.
    #[error("no path after {probes} probes to {candidates} candidates in {elapsed:?}")]
    TimedOut {
        /// Probes sent in all.
        probes: u64,
        /// Candidates known at the end.
        candidates: usize,
        /// Time from start to giving up.
        elapsed: Duration,
    },
}

/// Counters, for diagnostics and the probe budget published in docs/design.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TraverseStats {
    /// Probes to candidates.
    pub probes: u64,
    /// Of which random-port (birthday) probes.
    pub birthday_probes: u64,
    /// Probes from the peer that we saw (each a triggered check).
    pub peer_probes: u64,
    /// Replies that matched none of our outstanding probes (or, authenticated, did not
    /// verify or came from another address than the probe went to).
    pub replies_ignored: u64,
    /// Probes from someone who is not the peer (authenticated mode: no valid tag); they
    /// made no candidate.
    pub probes_ignored: u64,
    /// Birthday hunts refused because their IP was no candidate's (authenticated mode).
    pub birthdays_refused: u64,
    /// Candidates not added because [`MAX_CANDIDATES`] were known.
    pub candidates_dropped: u64,
}

#[derive(Debug)]
struct Check {
    addr: SocketAddr,
    kind: Kind,
    due: Instant,
    rto: Duration,
    /// When we first probed it (`None` until then).
    first_sent: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u32,
    kind: Kind,
    at: Instant,
    /// Where the probe went: in authenticated mode, the only address whose reply counts.
    destination: SocketAddr,
}

#[derive(Debug)]
struct BirthdayState {
    config: Birthday,
    next: Instant,
    interval: Duration,
    sent: u32,
    /// Ports probed so far (at most the budget): a probe from one of them is the hard
    /// side's mapping answering the hunt, so its address counts as found by birthday.
    probed: std::collections::HashSet<u16>,
}

/// One side of a simultaneous punch.
#[derive(Debug)]
pub struct Traversal {
    config: TraverseConfig,
    start: Instant,
    deadline: Instant,
    checks: Vec<Check>,
    next_paced: Instant,
    txid_base: TxId,
    seq: u32,
    ring: Vec<Option<Sent>>,
    birthday: Option<BirthdayState>,
    rng: u64,
    stats: TraverseStats,
    outcome: Option<Result<Path, TraverseError>>,
    /// Authenticated mode: our key tags probes, the peer's checks its probes and replies.
    keys: Option<ProbeKeys>,
}

impl Traversal {
    /// Start at `now` with no candidates yet. `seed` must be random: it makes the
    /// transaction ids (which stop off-path forgeries) and the birthday ports.
    pub fn new(config: TraverseConfig, now: Instant, seed: [u8; 20]) -> Self {
        let mut txid_base = [0; 12];
        txid_base.copy_from_slice(&seed[..12]);
        let rng = u64::from_le_bytes(seed[12..20].try_into().expect("8 bytes")) | 1;
        Traversal {
            config,
            start: now,
            deadline: now + config.timeout,
            checks: Vec::new(),
            next_paced: now,
            txid_base,
            seq: 0,
            ring: vec![None; SENT_RING],
            birthday: None,
            rng,
            stats: TraverseStats::default(),
            outcome: None,
            keys: None,
        }
    }

    /// Like [`new`](Self::new), in authenticated mode (see the module docs): for a peer
    /// met by code, whose probe keys `keys` came from the PAKE.
    pub fn authenticated(
        config: TraverseConfig,
        now: Instant,
        seed: [u8; 20],
        keys: ProbeKeys,
    ) -> Self {
        Traversal {
            keys: Some(keys),
            ..Traversal::new(config, now, seed)
        }
    }

    /// Whether probes and replies must carry the peer's tag.
    pub fn is_authenticated(&self) -> bool {
        self.keys.is_some()
    }

    /// Also probe random ports of `birthday.ip`, starting now. In authenticated mode only
    /// the IP of a known candidate is hunted (one the peer sealed, or one its authenticated
    /// probe came from); any other is refused, and false returned.
    pub fn start_birthday(&mut self, now: Instant, birthday: Birthday) -> bool {
        let birthday = Birthday {
            ip: birthday.ip.to_canonical(),
            ..birthday
        };
        if self.keys.is_some() && !self.checks.iter().any(|c| c.addr.ip() == birthday.ip) {
            self.stats.birthdays_refused += 1;
            return false;
        }
        let interval = Duration::from_secs(1) / birthday.rate.max(1);
        self.birthday = Some(BirthdayState {
            config: birthday,
            next: now,
            interval,
            sent: 0,
            probed: std::collections::HashSet::new(),
        });
        true
    }

    /// Add a candidate (ignored if known, or if [`MAX_CANDIDATES`] are). New candidates
    /// are due at once; their place in the queue is their [`Kind`].
    pub fn add_candidate(&mut self, now: Instant, addr: SocketAddr, kind: Kind) {
        let addr = canonical(addr);
        if let Some(check) = self.checks.iter_mut().find(|c| c.addr == addr) {
            // A better kind for a known address (e.g. it turned out to be on our LAN).
            check.kind = check.kind.min(kind);
            return;
        }
        if self.checks.len() >= MAX_CANDIDATES {
            self.stats.candidates_dropped += 1;
            return;
        }
        self.checks.push(Check {
            addr,
            kind,
            due: now,
            rto: self.config.initial_rto,
            first_sent: None,
        });
    }

    /// The peer's probe `datagram` from `from` reached us (and was answered by the
    /// socket): its NAT is open toward us there, so probe that address at once (a
    /// triggered check). In authenticated mode a probe whose tag does not verify under the
    /// peer's key is only counted ([`TraverseStats::probes_ignored`]).
    pub fn handle_peer_probe(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if self.outcome.is_some() {
            return;
        }
        let mut to = None;
        if let Some(keys) = &self.keys {
            match Message::decode_authenticated_to(datagram, &keys.theirs) {
                Ok((Message::Probe { .. }, probed)) => to = probed,
                _ => {
                    self.stats.probes_ignored += 1;
                    return;
                }
            }
        }
        self.stats.peer_probes += 1;
        let from = canonical(from);
        // Authenticated, from an address we have probed ourselves: the peer's NAT let our
        // probe's mapping in (it probes us from it) and ours let its probe in, so the path
        // works both ways; no need to wait another half round trip for our reply.
        if let Some(to) = to
            && let Some(check) = self.checks.iter().find(|c| c.addr == from)
            && let Some(first_sent) = check.first_sent
        {
            self.outcome = Some(Ok(Path {
                peer: from,
                kind: check.kind,
                reflexive: canonical(to),
                rtt: now.saturating_duration_since(first_sent),
            }));
            return;
        }
        let hunted = self
            .birthday
            .as_ref()
            .is_some_and(|b| b.config.ip == from.ip() && b.probed.contains(&from.port()));
        let kind = if hunted {
            Kind::Birthday
        } else {
            Kind::PeerReflexive
        };
        match self.checks.iter_mut().find(|c| c.addr == from) {
            Some(check) => {
                check.due = now;
                check.rto = self.config.initial_rto;
            }
            None => self.add_candidate(now, from, kind),
        }
        // Triggered checks jump the pacing queue: this is the fastest way through.
        self.next_paced = self.next_paced.min(now);
    }

    /// Feed a probe reply (any datagram the socket routed to punchers). Returns true when
    /// it answers one of our probes, which finishes the traversal successfully. In
    /// authenticated mode the reply must verify under the peer's key and come from the
    /// address the probe went to.
    pub fn handle_reply(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        if self.outcome.is_some() {
            return false;
        }
        let from = canonical(from);
        let decoded = match &self.keys {
            Some(keys) => Message::decode_authenticated(datagram, &keys.theirs),
            None => Message::decode(datagram),
        };
        let Ok(Message::Reply { txid, observed }) = decoded else {
            self.stats.replies_ignored += 1;
            return false;
        };
        let Some(sent) = self
            .lookup(&txid)
            .filter(|sent| self.keys.is_none() || sent.destination == from)
        else {
            self.stats.replies_ignored += 1;
            return false;
        };
        self.outcome = Some(Ok(Path {
            peer: from,
            kind: sent.kind,
            reflexive: canonical(observed),
            rtt: now.saturating_duration_since(sent.at),
        }));
        true
    }

    /// The next probe to send now, if any (call until `None`).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.outcome.is_some() || now >= self.deadline {
            return None;
        }
        if let Some((destination, kind)) = self.next_birthday(now) {
            self.stats.birthday_probes += 1;
            return Some(self.probe(now, destination, kind));
        }
        if now < self.next_paced {
            return None;
        }
        let check = self
            .checks
            .iter_mut()
            .filter(|c| c.due <= now)
            .min_by_key(|c| (c.kind, c.due))?;
        let (destination, kind) = (check.addr, check.kind);
        check.first_sent.get_or_insert(now);
        check.due = now + check.rto;
        check.rto = (check.rto * 2).min(self.config.max_rto);
        self.next_paced = now + self.config.pacing;
        Some(self.probe(now, destination, kind))
    }

    /// When [`handle_timeout`](Self::handle_timeout) (or `poll_transmit`) is next due;
    /// `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        let paced = self
            .checks
            .iter()
            .map(|c| c.due)
            .min()
            .map(|due| due.max(self.next_paced));
        let birthday = self
            .birthday
            .as_ref()
            .filter(|b| b.sent < b.config.budget)
            .map(|b| b.next);
        [Some(self.deadline), paced, birthday]
            .into_iter()
            .flatten()
            .min()
    }

    /// Give up once the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_none() && now >= self.deadline {
            self.outcome = Some(Err(TraverseError::TimedOut {
                probes: self.stats.probes,
                candidates: self.checks.len(),
                elapsed: now.saturating_duration_since(self.start),
            }));
        }
    }

    /// `None` while running, then the result.
    pub fn outcome(&self) -> Option<&Result<Path, TraverseError>> {
        self.outcome.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> TraverseStats {
        self.stats
    }

    /// The candidates known so far, in check order.
    pub fn candidates(&self) -> Vec<(SocketAddr, Kind)> {
        let mut all: Vec<_> = self.checks.iter().map(|c| (c.addr, c.kind)).collect();
        all.sort_by_key(|&(_, kind)| kind);
        all
    }

    fn next_birthday(&mut self, now: Instant) -> Option<(SocketAddr, Kind)> {
        let b = self.birthday.as_mut()?;
        if b.sent >= b.config.budget || now < b.next {
            return None;
        }
        b.sent += 1;
        // Never burst to catch up after a late wake-up: the rate is a promise.
        b.next = (b.next + b.interval).max(now);
        let port = loop {
            // xorshift64*: plenty for spreading probes over ports.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let port = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as u16;
            if port >= 1024 {
                break port;
            }
        };
        b.probed.insert(port);
        Some((SocketAddr::new(b.config.ip, port), Kind::Birthday))
    }

    fn probe(&mut self, now: Instant, destination: SocketAddr, kind: Kind) -> Transmit {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut txid = self.txid_base;
        for (b, s) in txid[8..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        self.ring[seq as usize % SENT_RING] = Some(Sent {
            seq,
            kind,
            at: now,
            destination: canonical(destination),
        });
        self.stats.probes += 1;
        let contents = match &self.keys {
            Some(keys) => crate::wire::authenticated_probe(txid, destination, &keys.ours),
            None => Message::Probe { txid }.to_vec(),
        };
        Transmit {
            destination,
            contents,
        }
    }

    fn lookup(&self, txid: &TxId) -> Option<Sent> {
        if txid[..8] != self.txid_base[..8] {
            return None;
        }
        let mut seq = [0; 4];
        for (i, s) in seq.iter_mut().enumerate() {
            *s = txid[8 + i] ^ self.txid_base[8 + i];
        }
        let seq = u32::from_be_bytes(seq);
        self.ring[seq as usize % SENT_RING].filter(|sent| sent.seq == seq && seq < self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BinaryHeap, HashMap, HashSet};
    use std::net::Ipv4Addr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn seed(n: u8) -> [u8; 20] {
        let mut s = [n; 20];
        s[19] = n.wrapping_mul(31).wrapping_add(7);
        s
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum NatKind {
        /// Endpoint-independent mapping, no filtering (DNAT of every port).
        Open,
        /// Endpoint-independent mapping, address-and-port-dependent filtering.
        Cone,
        /// A new random port per destination, address-and-port-dependent filtering.
        Symmetric,
    }

    /// A NAT in front of one private network, simulated at the level of mappings.
    struct Nat {
        kind: NatKind,
        ip: IpAddr,
        /// (private source, destination or None for EIM) -> public port
        map: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
        /// public port -> private source
        back: HashMap<u16, SocketAddr>,
        /// (public port, remote) allowed in
        allowed: HashSet<(u16, SocketAddr)>,
        rng: u64,
    }

    impl Nat {
        fn new(kind: NatKind, ip: &str, rng: u64) -> Self {
            Nat {
                kind,
                ip: ip.parse().unwrap(),
                map: HashMap::new(),
                back: HashMap::new(),
                allowed: HashSet::new(),
                rng: rng | 1,
            }
        }

        fn outbound(&mut self, src: SocketAddr, dst: SocketAddr) -> SocketAddr {
            let key = match self.kind {
                NatKind::Symmetric => (src, Some(dst)),
                _ => (src, None),
            };
            let port = match self.map.get(&key) {
                Some(&p) => p,
                None => {
                    let p = match self.kind {
                        // Port preserved, like plain masquerade.
                        NatKind::Open | NatKind::Cone => src.port(),
                        NatKind::Symmetric => loop {
                            self.rng ^= self.rng << 13;
                            self.rng ^= self.rng >> 7;
                            self.rng ^= self.rng << 17;
                            let p = (self.rng >> 48) as u16;
                            if p >= 1024 && !self.back.contains_key(&p) {
                                break p;
                            }
                        },
                    };
                    self.map.insert(key, p);
                    self.back.insert(p, src);
                    p
                }
            };
            self.allowed.insert((port, dst));
            SocketAddr::new(self.ip, port)
        }

        fn inbound(&self, from: SocketAddr, to: SocketAddr) -> Option<SocketAddr> {
            let private = *self.back.get(&to.port())?;
            match self.kind {
                NatKind::Open => Some(private),
                _ => self.allowed.contains(&(to.port(), from)).then_some(private),
            }
        }
    }

    /// One socket of a peer: its private address and its traversal.
    struct Socket {
        private: SocketAddr,
        trav: Traversal,
    }

    /// A peer: one or more sockets behind one NAT (or none: `nat` is None on a LAN test).
    /// With `keys`, its sockets answer only authenticated probes, as a meeting's do.
    struct Peer {
        nat: Nat,
        sockets: Vec<Socket>,
        keys: Option<ProbeKeys>,
    }

    #[derive(PartialEq, Eq)]
    struct Packet {
        at: Instant,
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    }

    impl Ord for Packet {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            other.at.cmp(&self.at) // min-heap on time
        }
    }
    impl PartialOrd for Packet {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    /// Two peers on "the internet" with `one_way` latency between them.
    struct World {
        now: Instant,
        peers: [Peer; 2],
        wire: BinaryHeap<Packet>,
        one_way: Duration,
        /// Which socket (peer, index) won, and when.
        won: [Option<(usize, Duration, Path)>; 2],
        start: Instant,
    }

    impl World {
        fn new(a: Peer, b: Peer, one_way: Duration) -> Self {
            let now = Instant::now();
            World {
                now,
                start: now,
                peers: [a, b],
                wire: BinaryHeap::new(),
                one_way,
                won: [None, None],
            }
        }

        fn send(&mut self, p: usize, s: usize, to: SocketAddr, bytes: Vec<u8>) {
            let private = self.peers[p].sockets[s].private;
            let from = self.peers[p].nat.outbound(private, to);
            self.wire.push(Packet {
                at: self.now + self.one_way,
                from,
                to,
                bytes,
            });
        }

        fn deliver(&mut self, packet: Packet) {
            for p in 0..2 {
                if self.peers[p].nat.ip != packet.to.ip() {
                    continue;
                }
                let Some(private) = self.peers[p].nat.inbound(packet.from, packet.to) else {
                    return; // filtered
                };
                let Some(s) = self.peers[p]
                    .sockets
                    .iter()
                    .position(|sock| sock.private == private)
                else {
                    return;
                };
                let decoded = match &self.peers[p].keys {
                    Some(keys) => Message::decode_authenticated(&packet.bytes, &keys.theirs),
                    None => Message::decode(&packet.bytes),
                };
                match decoded {
                    Ok(Message::Probe { txid }) => {
                        // The socket answers, and the traversal makes a triggered check.
                        let reply = match &self.peers[p].keys {
                            Some(keys) => {
                                crate::punch::authenticated_reply_to(packet.from, txid, &keys.ours)
                            }
                            None => crate::punch::reply_to(packet.from, txid),
                        };
                        self.send(p, s, reply.destination, reply.contents);
                        let now = self.now;
                        let trav = &mut self.peers[p].sockets[s].trav;
                        trav.handle_peer_probe(now, packet.from, &packet.bytes);
                        // Authenticated, a probe may prove the path by itself.
                        if let Some(Ok(path)) = trav.outcome()
                            && self.won[p].is_none()
                        {
                            self.won[p] = Some((s, now - self.start, path.clone()));
                        }
                    }
                    Ok(Message::Reply { .. }) => {
                        let now = self.now;
                        let trav = &mut self.peers[p].sockets[s].trav;
                        if trav.handle_reply(now, packet.from, &packet.bytes)
                            && self.won[p].is_none()
                        {
                            let path = trav.outcome().unwrap().clone().unwrap();
                            self.won[p] = Some((s, now - self.start, path));
                        }
                    }
                    Err(_) => {}
                }
                return;
            }
        }

        /// Run until both peers found a path or every traversal gave up.
        fn run(&mut self) {
            loop {
                for p in 0..2 {
                    for s in 0..self.peers[p].sockets.len() {
                        let now = self.now;
                        self.peers[p].sockets[s].trav.handle_timeout(now);
                        while let Some(t) = self.peers[p].sockets[s].trav.poll_transmit(now) {
                            self.send(p, s, t.destination, t.contents);
                        }
                    }
                }
                let done = |peer: &Peer| peer.sockets.iter().all(|s| s.trav.outcome().is_some());
                if (self.won[0].is_some() && self.won[1].is_some())
                    || (done(&self.peers[0]) && done(&self.peers[1]))
                {
                    return;
                }
                let next_timer = self
                    .peers
                    .iter()
                    .flat_map(|p| p.sockets.iter())
                    .filter_map(|s| s.trav.poll_timeout())
                    .min();
                let next_packet = self.wire.peek().map(|p| p.at);
                let Some(next) = [next_timer, next_packet].into_iter().flatten().min() else {
                    return;
                };
                self.now = next.max(self.now);
                while self.wire.peek().is_some_and(|p| p.at <= self.now) {
                    let packet = self.wire.pop().unwrap();
                    self.deliver(packet);
                }
            }
        }
    }

    const RV: &str = "198.51.100.10:9200";

    /// A peer with one socket whose traversal will probe the other's reflexive address.
    fn peer(kind: NatKind, public_ip: &str, private: &str, n: u8) -> Peer {
        Peer {
            nat: Nat::new(kind, public_ip, u64::from(n) * 0x9e37_79b9),
            sockets: vec![Socket {
                private: addr(private),
                trav: Traversal::new(TraverseConfig::default(), Instant::now(), seed(n)),
            }],
            keys: None,
        }
    }

    /// The probe keys of one meeting, as side `a` (true) or side `b` holds them.
    fn keys(a: bool) -> ProbeKeys {
        let (x, y) = (
            crate::wire::ProbeKey::from_bytes([0xa1; 32]),
            crate::wire::ProbeKey::from_bytes([0xb2; 32]),
        );
        if a {
            ProbeKeys { ours: x, theirs: y }
        } else {
            ProbeKeys { ours: y, theirs: x }
        }
    }

    /// A traversal, authenticated with side `a`'s or `b`'s keys when `auth`.
    fn trav(now: Instant, n: u8, auth: Option<bool>) -> Traversal {
        match auth {
            Some(a) => Traversal::authenticated(TraverseConfig::default(), now, seed(n), keys(a)),
            None => Traversal::new(TraverseConfig::default(), now, seed(n)),
        }
    }

    /// The address the rendezvous saw for socket 0 of `p` (a mapping toward it).
    fn reflexive(p: &mut Peer) -> SocketAddr {
        let private = p.sockets[0].private;
        p.nat.outbound(private, addr(RV))
    }

    fn pair(a_kind: NatKind, b_kind: NatKind) -> World {
        pair_with(a_kind, b_kind, false)
    }

    /// Two peers, each probing the other's reflexive address (as from its sealed hello),
    /// authenticated when `auth` (as after a PAKE).
    fn pair_with(a_kind: NatKind, b_kind: NatKind, auth: bool) -> World {
        let mut a = peer(a_kind, "203.0.113.1", "10.0.1.2:5000", 1);
        let mut b = peer(b_kind, "203.0.113.2", "10.0.2.2:6000", 2);
        if auth {
            (a.keys, b.keys) = (Some(keys(true)), Some(keys(false)));
        }
        let (ra, rb) = (reflexive(&mut a), reflexive(&mut b));
        let mut world = World::new(a, b, ms(20));
        let now = world.now;
        for p in world.peers[0].sockets.iter_mut() {
            p.trav = trav(now, 1, auth.then_some(true));
            p.trav.add_candidate(now, rb, Kind::Reflexive);
        }
        for p in world.peers[1].sockets.iter_mut() {
            p.trav = trav(now, 2, auth.then_some(false));
            p.trav.add_candidate(now, ra, Kind::Reflexive);
        }
        world
    }

    #[test]
    fn cone_and_cone_meet_within_two_round_trips() {
        let mut world = pair(NatKind::Cone, NatKind::Cone);
        world.run();
        for p in 0..2 {
            let (_, took, path) = world.won[p].clone().expect("a path");
            assert_eq!(path.kind, Kind::Reflexive);
            // Both probe at t=0; each probe crosses in 20 ms and is answered: 40 ms.
            assert_eq!(took, ms(40), "peer {p}");
            assert_eq!(path.rtt, ms(40));
        }
    }

    #[test]
    fn open_and_symmetric_meet_through_a_peer_reflexive_candidate() {
        let mut world = pair(NatKind::Open, NatKind::Symmetric);
        world.run();
        let (_, _, open_side) = world.won[0].clone().expect("open side finds a path");
        let (_, _, hard_side) = world.won[1].clone().expect("symmetric side finds a path");
        assert_eq!(open_side.kind, Kind::PeerReflexive, "{open_side:?}");
        assert_eq!(hard_side.kind, Kind::Reflexive);
    }

    #[test]
    fn symmetric_and_symmetric_time_out() {
        let mut world = pair(NatKind::Symmetric, NatKind::Symmetric);
        world.run();
        assert!(world.won.iter().all(Option::is_none));
        for p in &world.peers {
            let Some(Err(TraverseError::TimedOut {
                elapsed, probes, ..
            })) = p.sockets[0].trav.outcome()
            else {
                panic!("{:?}", p.sockets[0].trav.outcome())
            };
            assert_eq!(*elapsed, Duration::from_secs(12));
            // Backoff keeps a hopeless candidate cheap: 1 s apart once warmed up.
            assert!(*probes <= 16, "{probes}");
        }
    }

    /// Peer 1 (hard) holds 256 sockets, each probing peer 0's reflexive address; peer 0
    /// (easy) probes random ports of peer 1's public IP, which its sealed hello named (its
    /// reflexive address toward the rendezvous, a mapping nobody else may use).
    fn birthday_world(auth: bool) -> World {
        let mut easy = peer(NatKind::Cone, "203.0.113.1", "10.0.1.2:5000", 1);
        let mut hard = Peer {
            nat: Nat::new(NatKind::Symmetric, "203.0.113.2", 77),
            sockets: Vec::new(),
            keys: auth.then(|| keys(false)),
        };
        easy.keys = auth.then(|| keys(true));
        let easy_reflexive = reflexive(&mut easy);
        let mut world = World::new(easy, hard_placeholder(), ms(20));
        let now = world.now;
        for i in 0..256u16 {
            let mut trav = trav(now, 3 + (i % 200) as u8, auth.then_some(false));
            trav.add_candidate(now, easy_reflexive, Kind::Reflexive);
            hard.sockets.push(Socket {
                private: SocketAddr::new(Ipv4Addr::new(10, 0, 2, 2).into(), 20_000 + i),
                trav,
            });
        }
        world.peers[1] = hard;
        let trav_easy = &mut world.peers[0].sockets[0].trav;
        *trav_easy = trav(now, 1, auth.then_some(true));
        trav_easy.add_candidate(now, addr("203.0.113.2:40000"), Kind::Reflexive);
        assert!(trav_easy.start_birthday(now, Birthday::toward("203.0.113.2".parse().unwrap())));
        world
    }

    fn meet_by_birthday(auth: bool) {
        let mut world = birthday_world(auth);
        world.run();
        let (_, took_easy, easy_path) = world.won[0].clone().expect("easy side");
        let (_, took_hard, _) = world.won[1].clone().expect("hard side");
        assert_eq!(easy_path.kind, Kind::Birthday);
        eprintln!("birthday: easy side after {took_easy:?}, hard side after {took_hard:?}");
        assert!(took_easy <= Duration::from_secs(5), "{took_easy:?}");
        // The hard side follows within one round trip (its triggered check).
        assert!(
            took_hard <= took_easy + ms(50),
            "{took_hard:?} vs {took_easy:?}"
        );
        let stats = world.peers[0].sockets[0].trav.stats();
        assert!(stats.birthday_probes <= 3000);
    }

    #[test]
    fn cone_and_symmetric_meet_by_birthday() {
        meet_by_birthday(false);
    }

    #[test]
    fn cone_and_symmetric_meet_by_birthday_authenticated() {
        meet_by_birthday(true);
    }

    #[test]
    fn authenticated_pairs_meet_at_least_as_fast_as_plain_ones() {
        // Crossing probes prove a cone x cone path half a round trip sooner.
        for (a, b, sooner) in [
            (NatKind::Cone, NatKind::Cone, [ms(20), ms(20)]),
            (NatKind::Open, NatKind::Symmetric, [ms(0), ms(0)]),
        ] {
            let (mut plain, mut auth) = (pair(a, b), pair_with(a, b, true));
            plain.run();
            auth.run();
            for (p, sooner) in sooner.into_iter().enumerate() {
                let (_, took_plain, path_plain) = plain.won[p].clone().expect("plain path");
                let (_, took_auth, path_auth) = auth.won[p].clone().expect("authenticated path");
                assert_eq!(took_auth + sooner, took_plain, "{a:?} x {b:?}, peer {p}");
                assert_eq!(
                    (path_auth.peer, path_auth.kind, path_auth.reflexive),
                    (path_plain.peer, path_plain.kind, path_plain.reflexive),
                    "{a:?} x {b:?}, peer {p}"
                );
            }
        }
    }

    #[test]
    fn after_a_pake_the_peers_probe_from_a_probed_address_proves_the_path() {
        let t0 = Instant::now();
        let peer = addr("198.51.100.1:1");
        let (mut t, _) = authenticated_probe_sent(t0, peer);
        let ours = addr("203.0.113.9:9");
        let theirs = |to| crate::wire::authenticated_probe([5; 12], to, &keys(false).ours);
        // From an address we never probed: only a triggered check.
        t.handle_peer_probe(t0 + ms(5), addr("198.51.100.1:2"), &theirs(ours));
        assert!(t.outcome().is_none());
        // From the probed one: the path, our address as the peer names it.
        t.handle_peer_probe(t0 + ms(20), peer, &theirs(ours));
        let Some(Ok(path)) = t.outcome() else {
            panic!("{:?}", t.outcome())
        };
        assert_eq!((path.peer, path.reflexive, path.rtt), (peer, ours, ms(20)));
    }

    /// A traversal after a PAKE (as side a) that has probed `peer` once: the probe's txid.
    fn authenticated_probe_sent(t0: Instant, peer: SocketAddr) -> (Traversal, TxId) {
        let mut t = trav(t0, 4, Some(true));
        t.add_candidate(t0, peer, Kind::Reflexive);
        let probe = t.poll_transmit(t0).unwrap();
        assert_eq!(probe.contents.len(), crate::wire::AUTH_PROBE_LEN);
        let Ok(Message::Probe { txid }) =
            Message::decode_authenticated(&probe.contents, &keys(false).theirs)
        else {
            panic!("the peer can verify our probe")
        };
        (t, txid)
    }

    #[test]
    fn after_a_pake_an_unauthenticated_reply_does_not_choose_the_path() {
        let t0 = Instant::now();
        let peer = addr("198.51.100.1:1");
        let (mut t, txid) = authenticated_probe_sent(t0, peer);
        let observed = addr("203.0.113.9:9");
        let reply = Message::Reply { txid, observed };
        // The right txid (sniffed, or guessed) in a plain reply, from the right address.
        assert!(!t.handle_reply(t0, peer, &reply.to_vec()));
        // Tagged under a wrong key (a wrong code), or under our own (reflected).
        let wrong = crate::wire::ProbeKey::from_bytes([9; 32]);
        assert!(!t.handle_reply(t0, peer, &reply.to_authenticated_vec(&wrong)));
        assert!(!t.handle_reply(t0, peer, &reply.to_authenticated_vec(&keys(true).ours)));
        assert_eq!(t.stats().replies_ignored, 3);
        assert!(t.outcome().is_none());
        // The peer's own reply counts.
        assert!(t.handle_reply(
            t0 + ms(30),
            peer,
            &reply.to_authenticated_vec(&keys(false).ours)
        ));
        assert_eq!(t.outcome().unwrap().as_ref().unwrap().peer, peer);
    }

    #[test]
    fn after_a_pake_a_reply_from_another_address_than_probed_does_not_count() {
        let t0 = Instant::now();
        let peer = addr("198.51.100.1:1");
        let (mut t, txid) = authenticated_probe_sent(t0, peer);
        let genuine = Message::Reply {
            txid,
            observed: addr("203.0.113.9:9"),
        }
        .to_authenticated_vec(&keys(false).ours);
        // A valid reply, relayed from elsewhere (another port, another host).
        for elsewhere in ["198.51.100.1:2", "192.0.2.66:1"] {
            assert!(
                !t.handle_reply(t0, addr(elsewhere), &genuine),
                "{elsewhere}"
            );
        }
        assert!(t.outcome().is_none());
        // The same reply from the probed address, written IPv4-mapped, counts.
        assert!(t.handle_reply(t0, addr("[::ffff:198.51.100.1]:1"), &genuine));
    }

    #[test]
    fn after_a_pake_an_unauthenticated_probe_makes_no_candidate() {
        let t0 = Instant::now();
        let mut t = trav(t0, 5, Some(true));
        let stranger = addr("192.0.2.66:4444");
        let plain = Message::Probe { txid: [1; 12] };
        t.handle_peer_probe(t0, stranger, &plain.to_vec());
        let wrong = crate::wire::ProbeKey::from_bytes([9; 32]);
        t.handle_peer_probe(t0, stranger, &plain.to_authenticated_vec(&wrong));
        // Our own probe reflected back at us is not the peer's either.
        t.handle_peer_probe(t0, stranger, &plain.to_authenticated_vec(&keys(true).ours));
        assert_eq!(t.candidates(), vec![]);
        assert_eq!(t.poll_transmit(t0), None, "nothing to probe");
        assert_eq!((t.stats().probes_ignored, t.stats().peer_probes), (3, 0));
        // The peer's authenticated probe is a triggered check, as ever.
        let peer = addr("198.51.100.7:7");
        t.handle_peer_probe(t0, peer, &plain.to_authenticated_vec(&keys(false).ours));
        assert_eq!(t.candidates(), vec![(peer, Kind::PeerReflexive)]);
        assert_eq!(t.poll_transmit(t0).unwrap().destination, peer);
    }

    #[test]
    fn after_a_pake_random_ports_are_hunted_only_on_a_candidates_ip() {
        let t0 = Instant::now();
        let mut t = trav(t0, 6, Some(true));
        let victim: IpAddr = "192.0.2.66".parse().unwrap();
        assert!(!t.start_birthday(t0, Birthday::toward(victim)));
        assert_eq!(t.poll_transmit(t0), None, "no spray toward a named IP");
        assert_eq!(t.stats().birthdays_refused, 1);
        // The IP of the address the peer sealed (as the session adds it) is hunted.
        t.add_candidate(t0, addr("203.0.113.2:40000"), Kind::Reflexive);
        assert!(t.start_birthday(t0, Birthday::toward("::ffff:203.0.113.2".parse().unwrap())));
        let mut sent = 0;
        while let Some(tx) = t.poll_transmit(t0) {
            assert_eq!(
                tx.destination.ip(),
                "203.0.113.2".parse::<IpAddr>().unwrap()
            );
            sent += 1;
        }
        assert!(sent >= 1);
        // Without a PAKE (a plain traversal) the caller's word is taken, as before.
        let mut plain = trav(t0, 7, None);
        assert!(plain.start_birthday(t0, Birthday::toward(victim)));
    }

    fn hard_placeholder() -> Peer {
        Peer {
            nat: Nat::new(NatKind::Symmetric, "203.0.113.2", 77),
            sockets: Vec::new(),
            keys: None,
        }
    }

    #[test]
    fn checks_are_paced_by_kind_and_triggered_checks_jump_the_queue() {
        let t0 = Instant::now();
        let mut t = Traversal::new(TraverseConfig::default(), t0, seed(9));
        t.add_candidate(t0, addr("198.51.100.1:1"), Kind::Reflexive);
        t.add_candidate(t0, addr("10.0.0.5:1"), Kind::Lan);
        t.add_candidate(t0, addr("[2001:db8::5]:1"), Kind::Ipv6);
        let first = t.poll_transmit(t0).unwrap();
        assert_eq!(first.destination, addr("10.0.0.5:1"), "LAN first");
        assert_eq!(t.poll_transmit(t0), None, "paced");
        assert_eq!(t.poll_timeout(), Some(t0 + ms(50)));
        let second = t.poll_transmit(t0 + ms(50)).unwrap();
        assert_eq!(second.destination, addr("[2001:db8::5]:1"), "then IPv6");
        // A probe from a new address: checked at once, pacing or not.
        t.handle_peer_probe(t0 + ms(60), addr("198.51.100.9:7"), &[]);
        let triggered = t.poll_transmit(t0 + ms(60)).unwrap();
        assert_eq!(triggered.destination, addr("198.51.100.9:7"));
        assert_eq!(t.stats().peer_probes, 1);
    }

    #[test]
    fn only_replies_to_our_own_probes_count() {
        let t0 = Instant::now();
        let mut t = Traversal::new(TraverseConfig::default(), t0, seed(4));
        let peer = addr("198.51.100.1:1");
        t.add_candidate(t0, peer, Kind::Reflexive);
        let probe = t.poll_transmit(t0).unwrap();
        let Ok(Message::Probe { txid }) = Message::decode(&probe.contents) else {
            panic!()
        };
        let mut forged = txid;
        forged[11] ^= 0x40; // a sequence number never sent
        let reply = |txid| {
            Message::Reply {
                txid,
                observed: addr("203.0.113.9:9"),
            }
            .to_vec()
        };
        assert!(!t.handle_reply(t0, peer, &reply(forged)));
        assert!(!t.handle_reply(t0, peer, b"\x02junk"));
        assert!(!t.handle_reply(t0, peer, &Message::Probe { txid }.to_vec()));
        assert_eq!(t.stats().replies_ignored, 3);
        assert!(t.handle_reply(t0 + ms(30), addr("198.51.100.1:2"), &reply(txid)));
        let Some(Ok(path)) = t.outcome() else {
            panic!()
        };
        assert_eq!(
            path.peer,
            addr("198.51.100.1:2"),
            "the address that answered"
        );
        assert_eq!(path.rtt, ms(30));
        assert_eq!(path.reflexive, addr("203.0.113.9:9"));
        assert!(!t.handle_reply(t0, peer, &reply(txid)), "finished");
    }

    #[test]
    fn candidates_are_bounded_and_deduplicated() {
        let t0 = Instant::now();
        let mut t = Traversal::new(TraverseConfig::default(), t0, seed(5));
        for port in 0..200 {
            t.handle_peer_probe(
                t0,
                SocketAddr::new(Ipv4Addr::new(198, 51, 100, 1).into(), port),
                &[],
            );
        }
        assert_eq!(t.candidates().len(), MAX_CANDIDATES);
        assert_eq!(t.stats().candidates_dropped, 200 - MAX_CANDIDATES as u64);
        let mapped = addr("[::ffff:198.51.100.1]:3");
        t.add_candidate(t0, mapped, Kind::Lan);
        assert_eq!(
            t.candidates().len(),
            MAX_CANDIDATES,
            "same address as 198.51.100.1:3"
        );
        assert!(
            t.candidates()
                .contains(&(addr("198.51.100.1:3"), Kind::Lan))
        );
    }

    #[test]
    fn a_probe_from_a_hunted_port_counts_as_found_by_birthday() {
        let t0 = Instant::now();
        let mut t = Traversal::new(TraverseConfig::default(), t0, seed(7));
        let hard: IpAddr = "203.0.113.2".parse().unwrap();
        t.start_birthday(t0, Birthday::toward(hard));
        let hunted = t.poll_transmit(t0).unwrap().destination;
        t.handle_peer_probe(t0, hunted, &[]);
        t.handle_peer_probe(t0, SocketAddr::new(hard, hunted.port() ^ 1), &[]);
        let kinds: Vec<Kind> = t.candidates().iter().map(|&(_, k)| k).collect();
        assert_eq!(kinds, vec![Kind::PeerReflexive, Kind::Birthday]);
        assert!(t.candidates().contains(&(hunted, Kind::Birthday)));
    }

    #[test]
    fn birthday_rate_and_budget_hold() {
        let t0 = Instant::now();
        let mut t = Traversal::new(TraverseConfig::default(), t0, seed(6));
        t.start_birthday(
            t0,
            Birthday {
                ip: "203.0.113.2".parse().unwrap(),
                rate: 100,
                budget: 50,
            },
        );
        let mut now = t0;
        let mut sent = Vec::new();
        while let Some(next) = t.poll_timeout() {
            if next >= t0 + Duration::from_secs(2) {
                break;
            }
            now = next;
            while let Some(tx) = t.poll_transmit(now) {
                sent.push((now, tx.destination));
            }
        }
        assert_eq!(sent.len(), 50, "budget");
        assert!(sent.windows(2).all(|w| w[1].0 - w[0].0 >= ms(10)), "rate");
        assert!(sent.iter().all(|(_, d)| d.port() >= 1024));
        let ports: HashSet<u16> = sent.iter().map(|(_, d)| d.port()).collect();
        assert!(ports.len() >= 45, "spread over ports: {}", ports.len());
        let _ = now;
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn replies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let t0 = Instant::now();
                let mut t = Traversal::new(TraverseConfig::default(), t0, seed(8));
                t.add_candidate(t0, addr("198.51.100.1:1"), Kind::Reflexive);
                let _ = t.poll_transmit(t0);
                let _ = t.handle_reply(t0, addr("198.51.100.1:1"), &bytes);
            }
        }
    }
}

//! The hole-punching state machine.
//!
//! Sans-IO: no sockets, no clocks. The driver owns the UDP socket and passes the
//! current [`Instant`] in, which makes every timing decision testable to the
//! millisecond. A driver loop looks like this:
//!
//! ```text
//! loop {
//!     while let Some(t) = puncher.poll_transmit(now) { socket.send_to(&t.contents, t.destination) }
//!     if puncher.outcome().is_some() { break }
//!     select! {
//!         (from, buf) = socket.recv_from() => puncher.handle_datagram(now, from, &buf),
//!         _ = sleep_until(puncher.poll_timeout()) => puncher.handle_timeout(now),
//!     }
//! }
//! ```
//!
//! Both peers usually run a [`Puncher`] *and* a [`Responder`] on the same socket:
//! each side's outgoing probes open its own NAT, and each side answers the other.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::{self, Legacy, Message, TxId};

/// How many sent probes we remember. Replies to older probes are ignored, which
/// bounds memory no matter how many candidates or rounds there are.
const SENT_CAP: usize = 64;

/// Retransmission timing. Exponential backoff so an unreachable candidate
/// costs little traffic, capped so a late-opening NAT is still caught quickly.
///
/// Durations must be realistic: `Instant + Duration` panics on overflow, and a
/// zero `initial_interval` would make the driver spin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchConfig {
    /// Gap between the first and second round of probes (default 100 ms).
    pub initial_interval: Duration,
    /// The gap doubles each round up to this (default 1 s).
    pub max_interval: Duration,
    /// Give up this long after [`Puncher::new`] (default 10 s).
    pub timeout: Duration,
}

impl Default for PunchConfig {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A datagram the driver must send. Owned bytes, so the driver can queue it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// The encoded [`Message`].
    pub contents: Vec<u8>,
}

/// How a punch proved its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// A qpunch reply echoed the txid of one of our probes: the peer speaks qpunch's
    /// probe protocol and told us our reflexive address.
    Probe,
    /// The exact reply of the classic Go demo ([`wire::LEGACY_REPLY`]) came back from
    /// an address we probed. It proves the path only: it carries no txid (so anyone
    /// who can forge that source address could fake it) and no observed address, and
    /// such a peer does not speak qpunch. Identity is still checked by TLS pinning.
    Legacy,
}

impl Method {
    /// A short stable name, as in the CLI's `--json` output: `direct`, `legacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Probe => "direct",
            Method::Legacy => "legacy",
        }
    }
}

/// Success: the path that answered, which is the one QUIC should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Punched {
    /// Source of the reply. For [`Method::Probe`] it may differ from every candidate
    /// (a peer-reflexive address, in ICE terms), and it is the address that actually
    /// works; for [`Method::Legacy`] it is always one of the candidates.
    pub peer: SocketAddr,
    /// Our own public address as the peer observed it; `None` when the reply does
    /// not say ([`Method::Legacy`]).
    pub reflexive: Option<SocketAddr>,
    /// What proved the path.
    pub method: Method,
    /// Time from sending the answered probe to receiving its reply. Each probe
    /// has its own txid, so retransmissions cannot skew this (Karn's problem).
    /// A legacy reply cannot say which probe it answers: then this is measured from
    /// the latest probe to that address, a lower bound.
    pub rtt: Duration,
    /// Probing rounds started, including the first.
    pub attempts: u32,
}

/// Why punching failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PunchError {
    /// No candidate answered before [`PunchConfig::timeout`].
    #[error("no reply after {attempts} attempts in {elapsed:?}")]
    TimedOut {
        /// Probing rounds started.
        attempts: u32,
        /// Time from start until the timeout was noticed.
        elapsed: Duration,
    },
}

/// Counters for diagnostics: why did punching fail, was anything arriving?
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PunchStats {
    /// Probes handed to the driver.
    pub probes_sent: u64,
    /// Well-formed datagrams that were not an answer to an outstanding probe:
    /// unknown or forgotten txids, probes, replies after we finished, and the Go
    /// demo's reply from an address we did not probe.
    pub replies_ignored: u64,
    /// Datagrams that failed to decode.
    pub malformed: u64,
}

/// Initiator side: probes one or more candidate addresses.
///
/// ICE-style, all candidates are probed together each round and the first
/// valid reply wins; a rendezvous service can later supply more candidates.
#[derive(Debug)]
pub struct Puncher {
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
    start: Instant,
    deadline: Instant,
    txid_base: TxId,
    /// Index of the next candidate to probe in the current round.
    next_candidate: usize,
    /// Per-probe sequence number, mixed into the txid.
    seq: u32,
    rounds: u32,
    interval: Duration,
    next_round: Instant,
    sent: VecDeque<SentProbe>,
    stats: PunchStats,
    outcome: Option<Result<Punched, PunchError>>,
}

#[derive(Debug)]
struct SentProbe {
    txid: TxId,
    to: SocketAddr,
    at: Instant,
}

impl Puncher {
    /// Starts punching at `now`; the first round is ready to send at once.
    ///
    /// `txid_base` must be random (the caller owns the RNG): txids are what
    /// stop an off-path attacker from forging a reply.
    pub fn new(
        candidates: Vec<SocketAddr>,
        config: PunchConfig,
        now: Instant,
        txid_base: TxId,
    ) -> Self {
        Self {
            candidates,
            config,
            start: now,
            deadline: now + config.timeout,
            txid_base,
            next_candidate: 0,
            seq: 0,
            rounds: 1,
            interval: config.initial_interval,
            next_round: now + config.initial_interval,
            sent: VecDeque::with_capacity(SENT_CAP),
            stats: PunchStats::default(),
            outcome: None,
        }
    }

    /// The next probe to send, one per call, or `None` when this round is done
    /// or punching has finished. `now` is recorded as the probe's send time.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.outcome.is_some() {
            return None;
        }
        let destination = *self.candidates.get(self.next_candidate)?;
        self.next_candidate += 1;
        let txid = self.probe_txid();
        if self.sent.len() == SENT_CAP {
            self.sent.pop_front();
        }
        self.sent.push_back(SentProbe {
            txid,
            to: destination,
            at: now,
        });
        self.stats.probes_sent += 1;
        Some(Transmit {
            destination,
            contents: Message::Probe { txid }.to_vec(),
        })
    }

    /// Advances timers: starts a new round when it is due, or gives up at the deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        if now >= self.deadline {
            self.outcome = Some(Err(PunchError::TimedOut {
                attempts: self.rounds,
                elapsed: now.saturating_duration_since(self.start),
            }));
        } else if now >= self.next_round {
            self.next_candidate = 0;
            self.rounds += 1;
            self.interval = (self.interval * 2).min(self.config.max_interval);
            // Schedule from `now`, not from the missed instant, so a late
            // driver does not get a burst of catch-up rounds.
            self.next_round = now + self.interval;
        }
    }

    /// When the driver should next call [`handle_timeout`](Self::handle_timeout);
    /// `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outcome
            .is_none()
            .then(|| self.next_round.min(self.deadline))
    }

    /// Feeds a received datagram. Returns `true` if it was a valid reply to one
    /// of our probes, which finishes punching successfully. Anything else is
    /// counted in [`stats`](Self::stats) and ignored; never panics.
    ///
    /// A qpunch reply's source is not checked against the candidates: NATs may remap
    /// the peer's port, and the txid already proves the reply answers our probe. It does
    /// not prove *who* answered (anyone who saw the probe knows its txid), so a caller
    /// that is about to trust whatever key answers, with nothing pinned, must compare
    /// [`Punched::peer`] with where it meant to go itself ([`same_endpoint`]).
    ///
    /// The Go demo's reply ([`wire::LEGACY_REPLY`]) carries nothing to match, so it
    /// counts ([`Method::Legacy`]) only when it comes from exactly an address we sent a
    /// probe to (IPv4-mapped IPv6 and plain IPv4 compare equal, for dual-stack sockets).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        let (at, reflexive, method) = match wire::legacy(datagram) {
            Some(Legacy::Reply) => {
                // The latest probe to that address: the reply answers it or an earlier one.
                let probe = self.sent.iter().rev().find(|p| same_endpoint(p.to, from));
                (probe.map(|p| p.at), None, Method::Legacy)
            }
            Some(Legacy::Probe) => {
                self.stats.replies_ignored += 1;
                return false;
            }
            None => match Message::decode(datagram) {
                Ok(Message::Reply { txid, observed }) => {
                    let probe = self.sent.iter().find(|p| p.txid == txid);
                    (probe.map(|p| p.at), Some(observed), Method::Probe)
                }
                Ok(Message::Probe { .. }) => {
                    self.stats.replies_ignored += 1;
                    return false;
                }
                Err(_) => {
                    self.stats.malformed += 1;
                    return false;
                }
            },
        };
        let (None, Some(at)) = (&self.outcome, at) else {
            self.stats.replies_ignored += 1;
            return false;
        };
        self.outcome = Some(Ok(Punched {
            peer: from,
            reflexive,
            method,
            rtt: now.saturating_duration_since(at),
            attempts: self.rounds,
        }));
        true
    }

    /// `None` while still punching, then the final result.
    pub fn outcome(&self) -> Option<&Result<Punched, PunchError>> {
        self.outcome.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> PunchStats {
        self.stats
    }

    /// A txid unique to this probe: the base with its last 4 bytes XOR the sequence number.
    fn probe_txid(&mut self) -> TxId {
        let mut txid = self.txid_base;
        for (b, s) in txid[8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self.seq.wrapping_add(1);
        txid
    }
}

/// The same IP (IPv4-mapped IPv6 counts as IPv4) and port. Flow info and scope id
/// are not compared: the kernel fills them in on receipt, a candidate may lack them.
pub fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}

/// Counters for the answering side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponderStats {
    /// Probes answered.
    pub answered: u64,
    /// The Go demo's probes ([`wire::LEGACY_PROBE`]) answered.
    pub legacy_answered: u64,
    /// Datagrams that failed to decode.
    pub malformed: u64,
    /// Well-formed datagrams that need no answer (replies).
    pub ignored: u64,
}

/// Answering side: stateless apart from counters, so it cannot be exhausted
/// by a flood of probes.
///
/// Every valid probe is answered to the address it came from with a reply
/// echoing the txid and carrying that address as `observed`; the Go demo's probe
/// gets the Go demo's reply. A reply is never larger than the probe it answers, so
/// this cannot amplify traffic toward a forged source.
#[derive(Debug, Default)]
pub struct Responder {
    stats: ResponderStats,
}

/// The answer to probe `txid` from `from`: sent back to the address the probe came from,
/// carrying that address, so the prober learns how it looks from here. For callers
/// that have already decoded the probe (the shared socket does, to route datagrams).
pub fn reply_to(from: SocketAddr, txid: TxId) -> Transmit {
    Transmit {
        destination: from,
        contents: Message::Reply {
            txid,
            observed: from,
        }
        .to_vec(),
    }
}

/// The reply to the authenticated probe `txid` from `from` (a peer met by code), tagged
/// under our probe key `ours` so the peer can tell it from a forgery (see
/// [`crate::wire::Message::encode_authenticated`]).
pub fn authenticated_reply_to(from: SocketAddr, txid: TxId, ours: &wire::ProbeKey) -> Transmit {
    Transmit {
        destination: from,
        contents: Message::Reply {
            txid,
            observed: from,
        }
        .to_authenticated_vec(ours),
    }
}

/// The answer to the Go demo's probe from `from`: its exact reply ([`wire::LEGACY_REPLY`],
/// 10 bytes for 13), back to the address the probe came from. It cannot carry a txid or
/// the observed address: the demo's client expects exactly these bytes.
pub fn legacy_reply_to(from: SocketAddr) -> Transmit {
    Transmit {
        destination: from,
        contents: wire::LEGACY_REPLY.to_vec(),
    }
}

impl Responder {
    /// The reply to send, if `datagram` is a valid probe (ours or the Go demo's).
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8]) -> Option<Transmit> {
        match wire::legacy(datagram) {
            Some(Legacy::Probe) => {
                self.stats.legacy_answered += 1;
                return Some(legacy_reply_to(from));
            }
            Some(Legacy::Reply) => {
                self.stats.ignored += 1;
                return None;
            }
            None => {}
        }
        match Message::decode(datagram) {
            Ok(Message::Probe { txid }) => {
                self.stats.answered += 1;
                Some(reply_to(from, txid))
            }
            Ok(Message::Reply { .. }) => {
                self.stats.ignored += 1;
                None
            }
            Err(_) => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ResponderStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: TxId = [7; 12];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(p: &mut Puncher, now: Instant) -> Vec<Transmit> {
        std::iter::from_fn(|| p.poll_transmit(now)).collect()
    }

    fn txid_of(t: &Transmit) -> TxId {
        Message::decode(&t.contents).unwrap().txid()
    }

    fn reply(txid: TxId, observed: &str) -> Vec<u8> {
        Message::Reply {
            txid,
            observed: addr(observed),
        }
        .to_vec()
    }

    /// Drives a puncher that never hears back; returns the send offsets.
    fn run_silent(p: &mut Puncher, t0: Instant) -> Vec<Duration> {
        let mut now = t0;
        let mut sends = Vec::new();
        while p.outcome().is_none() {
            sends.extend(drain(p, now).iter().map(|_| now - t0));
            now = p.poll_timeout().unwrap();
            p.handle_timeout(now);
        }
        sends
    }

    #[test]
    fn resends_back_off_and_cap() {
        let t0 = Instant::now();
        let mut p = Puncher::new(vec![addr("192.0.2.1:1")], PunchConfig::default(), t0, BASE);
        let sends = run_silent(&mut p, t0);
        let gaps: Vec<_> = sends.windows(2).map(|w| w[1] - w[0]).collect();
        let mut expected = vec![ms(100), ms(200), ms(400), ms(800)];
        expected.extend([ms(1000); 8]);
        assert_eq!(gaps, expected);
        assert_eq!(sends.last(), Some(&ms(9500)));
    }

    #[test]
    fn times_out_at_exactly_ten_seconds() {
        let t0 = Instant::now();
        let mut p = Puncher::new(vec![addr("192.0.2.1:1")], PunchConfig::default(), t0, BASE);
        run_silent(&mut p, t0);
        let timed_out = PunchError::TimedOut {
            attempts: 13,
            elapsed: Duration::from_secs(10),
        };
        assert_eq!(p.outcome(), Some(&Err(timed_out)));
        assert_eq!(p.stats().probes_sent, 13);
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn not_timed_out_just_before_deadline() {
        let t0 = Instant::now();
        let mut p = Puncher::new(vec![], PunchConfig::default(), t0, BASE);
        p.handle_timeout(t0 + ms(9999));
        assert_eq!(p.outcome(), None);
        p.handle_timeout(t0 + ms(10_000));
        assert!(matches!(p.outcome(), Some(Err(_))));
    }

    #[test]
    fn every_candidate_probed_each_round_with_distinct_txids() {
        let t0 = Instant::now();
        let cands = vec![
            addr("192.0.2.1:1"),
            addr("192.0.2.2:2"),
            addr("[2001:db8::1]:3"),
        ];
        let mut p = Puncher::new(cands.clone(), PunchConfig::default(), t0, BASE);
        let first = drain(&mut p, t0);
        assert_eq!(p.poll_timeout(), Some(t0 + ms(100)));
        p.handle_timeout(t0 + ms(100));
        let second = drain(&mut p, t0 + ms(100));
        for round in [&first, &second] {
            let dests: Vec<_> = round.iter().map(|t| t.destination).collect();
            assert_eq!(dests, cands);
        }
        let mut txids: Vec<_> = first.iter().chain(&second).map(txid_of).collect();
        txids.sort();
        txids.dedup();
        assert_eq!(txids.len(), 6);
        assert_eq!(p.stats().probes_sent, 6);
    }

    #[test]
    fn rtt_is_measured_from_the_answered_probe() {
        let t0 = Instant::now();
        let peer = addr("192.0.2.1:1");
        let mut p = Puncher::new(vec![peer], PunchConfig::default(), t0, BASE);
        let early = txid_of(&p.poll_transmit(t0).unwrap());
        p.handle_timeout(t0 + ms(100));
        let late = txid_of(&p.poll_transmit(t0 + ms(100)).unwrap());
        assert_ne!(early, late);
        assert!(p.handle_datagram(t0 + ms(150), peer, &reply(early, "198.51.100.9:7")));
        let Some(Ok(punched)) = p.outcome() else {
            panic!("not punched")
        };
        assert_eq!(punched.rtt, ms(150));
        assert_eq!(punched.attempts, 2);
        assert_eq!(punched.peer, peer);
        assert_eq!(punched.reflexive, Some(addr("198.51.100.9:7")));
        assert_eq!(punched.method, Method::Probe);
    }

    #[test]
    fn reply_with_unknown_txid_is_ignored() {
        let t0 = Instant::now();
        let peer = addr("192.0.2.1:1");
        let mut p = Puncher::new(vec![peer], PunchConfig::default(), t0, BASE);
        drain(&mut p, t0);
        assert!(!p.handle_datagram(t0, peer, &reply([9; 12], "198.51.100.9:7")));
        assert!(!p.handle_datagram(t0, peer, &Message::Probe { txid: BASE }.to_vec()));
        assert_eq!(p.outcome(), None);
        assert_eq!(p.stats().replies_ignored, 2);
    }

    #[test]
    fn malformed_is_ignored_and_counted() {
        let t0 = Instant::now();
        let peer = addr("192.0.2.1:1");
        let mut p = Puncher::new(vec![peer], PunchConfig::default(), t0, BASE);
        let txid = txid_of(&p.poll_transmit(t0).unwrap());
        let mut truncated = reply(txid, "198.51.100.9:7");
        truncated.pop();
        for junk in [&[][..], &[0xc0, 1, 2], &[0x02, b'q'], &truncated] {
            assert!(!p.handle_datagram(t0, peer, junk));
        }
        assert_eq!(p.outcome(), None);
        assert_eq!(p.stats().malformed, 4);
    }

    #[test]
    fn nothing_happens_after_success() {
        let t0 = Instant::now();
        let peer = addr("192.0.2.1:1");
        let mut p = Puncher::new(
            vec![peer, addr("192.0.2.2:2")],
            PunchConfig::default(),
            t0,
            BASE,
        );
        let txid = txid_of(&p.poll_transmit(t0).unwrap());
        let answer = reply(txid, "198.51.100.9:7");
        assert!(p.handle_datagram(t0 + ms(5), peer, &answer));
        let done = p.outcome().cloned();
        assert_eq!(
            p.poll_transmit(t0 + ms(5)),
            None,
            "rest of the round is dropped"
        );
        assert_eq!(p.poll_timeout(), None);
        p.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(p.poll_transmit(t0 + Duration::from_secs(60)), None);
        assert!(!p.handle_datagram(t0 + ms(6), peer, &answer), "duplicate");
        assert_eq!(p.outcome().cloned(), done);
        assert_eq!(p.stats().replies_ignored, 1);
    }

    #[test]
    fn legacy_reply_from_a_probed_address_proves_the_path() {
        let t0 = Instant::now();
        let (go_server, other) = (addr("198.51.100.2:9199"), addr("198.51.100.3:9199"));
        let mut p = Puncher::new(vec![other, go_server], PunchConfig::default(), t0, BASE);
        assert_eq!(drain(&mut p, t0).len(), 2);
        p.handle_timeout(t0 + ms(100));
        assert_eq!(drain(&mut p, t0 + ms(100)).len(), 2);
        assert!(p.handle_datagram(t0 + ms(130), go_server, wire::LEGACY_REPLY));
        let Some(Ok(punched)) = p.outcome() else {
            panic!("not punched: {:?}", p.outcome())
        };
        assert_eq!(punched.method, Method::Legacy);
        assert_eq!(punched.peer, go_server);
        assert_eq!(punched.reflexive, None, "a legacy reply does not say");
        // No txid: measured from the latest probe to that address, a lower bound.
        assert_eq!(punched.rtt, ms(30));
        assert_eq!(punched.attempts, 2);
        assert_eq!(p.stats().replies_ignored, 0);
        // A repeat (the Go server answers every probe) changes nothing.
        assert!(!p.handle_datagram(t0 + ms(140), go_server, wire::LEGACY_REPLY));
        assert_eq!(p.stats().replies_ignored, 1);
    }

    #[test]
    fn legacy_reply_from_an_unprobed_address_is_ignored() {
        let t0 = Instant::now();
        let candidate = addr("198.51.100.2:9199");
        let mut p = Puncher::new(
            vec![candidate, addr("198.51.100.4:1")],
            PunchConfig::default(),
            t0,
            BASE,
        );
        // Only the first candidate has been probed so far.
        assert!(p.poll_transmit(t0).is_some());
        let unprobed = [
            addr("198.51.100.2:9200"),  // right host, other port
            addr("198.51.100.3:9199"),  // other host, right port
            addr("198.51.100.4:1"),     // a candidate, but not probed yet
            addr("[2001:db8::2]:9199"), // other family
        ];
        for from in unprobed {
            assert!(
                !p.handle_datagram(t0 + ms(5), from, wire::LEGACY_REPLY),
                "{from}"
            );
        }
        assert_eq!(p.outcome(), None);
        assert_eq!(p.stats().replies_ignored, unprobed.len() as u64);
    }

    #[test]
    fn legacy_reply_to_a_dual_stack_socket_matches_its_ipv4_candidate() {
        let t0 = Instant::now();
        let candidate = addr("198.51.100.2:9199");
        let mut p = Puncher::new(vec![candidate], PunchConfig::default(), t0, BASE);
        drain(&mut p, t0);
        let mapped = addr("[::ffff:198.51.100.2]:9199");
        assert!(p.handle_datagram(t0 + ms(1), mapped, wire::LEGACY_REPLY));
        assert!(matches!(
            p.outcome(),
            Some(Ok(Punched {
                method: Method::Legacy,
                ..
            }))
        ));
    }

    #[test]
    fn near_legacy_datagrams_do_not_count() {
        let t0 = Instant::now();
        let peer = addr("198.51.100.2:9199");
        let mut p = Puncher::new(vec![peer], PunchConfig::default(), t0, BASE);
        drain(&mut p, t0);
        let mut extra = wire::LEGACY_REPLY.to_vec();
        extra.push(0);
        // Ten bytes, but not the greeting; the greeting, but not alone; the probe.
        let near: [&[u8]; 4] = [
            b"0123456789",
            &wire::LEGACY_REPLY[..9],
            &extra,
            wire::LEGACY_PROBE,
        ];
        for datagram in near {
            assert!(
                !p.handle_datagram(t0 + ms(1), peer, datagram),
                "{datagram:x?}"
            );
        }
        assert_eq!(p.outcome(), None);
        let stats = p.stats();
        assert_eq!((stats.malformed, stats.replies_ignored), (3, 1));
    }

    #[test]
    fn legacy_reply_before_any_probe_is_ignored() {
        let t0 = Instant::now();
        let peer = addr("198.51.100.2:9199");
        let mut p = Puncher::new(vec![peer], PunchConfig::default(), t0, BASE);
        assert!(!p.handle_datagram(t0, peer, wire::LEGACY_REPLY));
        assert_eq!(p.outcome(), None);
        assert_eq!(p.stats().replies_ignored, 1);
    }

    #[test]
    fn method_names_match_the_json_output() {
        assert_eq!(Method::Probe.as_str(), "direct");
        assert_eq!(Method::Legacy.as_str(), "legacy");
    }

    #[test]
    fn responder_answers_the_go_demo_with_its_own_reply() {
        let mut r = Responder::default();
        let from = addr("203.0.113.7:40000");
        let t = r.handle_datagram(from, wire::LEGACY_PROBE).unwrap();
        assert_eq!(t.destination, from);
        assert_eq!(t.contents, wire::LEGACY_REPLY);
        assert!(
            t.contents.len() < wire::LEGACY_PROBE.len(),
            "never amplifies"
        );
        assert_eq!(r.handle_datagram(from, wire::LEGACY_REPLY), None);
        assert_eq!(r.handle_datagram(from, &wire::LEGACY_PROBE[..12]), None);
        let stats = r.stats();
        assert_eq!(
            (
                stats.legacy_answered,
                stats.answered,
                stats.ignored,
                stats.malformed
            ),
            (1, 0, 1, 1)
        );
    }

    #[test]
    fn responder_answers_to_source_with_observed_address() {
        let mut r = Responder::default();
        let from = addr("203.0.113.7:40000");
        let txid = *b"abcdefghijkl";
        let t = r
            .handle_datagram(from, &Message::Probe { txid }.to_vec())
            .unwrap();
        assert_eq!(t.destination, from);
        assert_eq!(
            Message::decode(&t.contents),
            Ok(Message::Reply {
                txid,
                observed: from
            })
        );
        assert_eq!(r.stats().answered, 1);
    }

    #[test]
    fn responder_ignores_replies_and_garbage() {
        let mut r = Responder::default();
        let from = addr("203.0.113.7:40000");
        assert_eq!(r.handle_datagram(from, &reply(BASE, "192.0.2.1:1")), None);
        assert_eq!(r.handle_datagram(from, b"\x01garbage"), None);
        assert_eq!(r.handle_datagram(from, &[0xc0; 1200]), None);
        let stats = r.stats();
        assert_eq!((stats.answered, stats.ignored, stats.malformed), (0, 1, 2));
    }

    /// A one-mapping NAT: rewrites the private source to its public address on
    /// the way out, and the public destination back on the way in.
    struct Nat {
        private: SocketAddr,
        public: SocketAddr,
    }

    impl Nat {
        fn outbound(&self, from: SocketAddr) -> SocketAddr {
            assert_eq!(from, self.private);
            self.public
        }

        fn inbound(&self, to: SocketAddr) -> Option<SocketAddr> {
            (to == self.public).then_some(self.private)
        }
    }

    #[test]
    fn simulated_exchange_through_a_nat() {
        let t0 = Instant::now();
        let nat = Nat {
            private: addr("192.168.1.10:5000"),
            public: addr("203.0.113.7:40000"),
        };
        let server = addr("198.51.100.2:4433");
        let unreachable = addr("10.9.9.9:4433");
        let one_way = ms(15);
        let mut p = Puncher::new(vec![unreachable, server], PunchConfig::default(), t0, BASE);
        let mut r = Responder::default();

        let mut now = t0;
        let mut round = 0;
        while p.outcome().is_none() {
            round += 1;
            for t in drain(&mut p, now) {
                // The first round to the server is lost, to exercise retransmission.
                if t.destination != server || round == 1 {
                    continue;
                }
                let src = nat.outbound(nat.private);
                let answer = r.handle_datagram(src, &t.contents).unwrap();
                let to = nat.inbound(answer.destination).unwrap();
                assert_eq!(to, nat.private);
                p.handle_datagram(now + 2 * one_way, server, &answer.contents);
            }
            now = p.poll_timeout().unwrap_or(now);
            p.handle_timeout(now);
        }

        let Some(Ok(punched)) = p.outcome() else {
            panic!("{:?}", p.outcome())
        };
        assert_eq!(punched.reflexive, Some(nat.public));
        assert_eq!(punched.method, Method::Probe);
        assert_eq!(punched.peer, server);
        assert_eq!(punched.rtt, 2 * one_way);
        assert_eq!(punched.attempts, 2);
        assert_eq!(p.stats().probes_sent, 4);
        assert_eq!(r.stats().answered, 1);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn handle_datagram_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                let t0 = Instant::now();
                let mut p = Puncher::new(vec![addr("192.0.2.1:1")], PunchConfig::default(), t0, BASE);
                drain(&mut p, t0);
                let mut r = Responder::default();
                let _ = p.handle_datagram(t0, addr("192.0.2.1:1"), &bytes);
                let _ = r.handle_datagram(addr("192.0.2.1:1"), &bytes);
            }
        }
    }
}

//! The pairing book: which nameplates wait, for whom and until when; who may join; what a
//! pairing passes on. Sans-IO, like [`crate::punch`]: time comes in as `now`, randomness as
//! an `rng`, and every method returns what happened instead of doing it.
//! [`super::server`] drives it: it holds the book under a lock, does the talking, and
//! turns each outcome into an answer and a counter.
//!
//! A receiver **registers** a nameplate (a chosen one, or a random free one) for a
//! lifetime, within limits in all and per source; each registration gets an id, since a
//! nameplate is reused as soon as it is free again and only its own registration may
//! release it. The receiver's PAKE message arrives next; until then the nameplate cannot
//! be joined, but a sender who asks is told to wait a little ([`PAKE_WAIT`]). A sender
//! **joins** (rate limited per source): the registration leaves the book at once (single
//! use) and the two sessions then **relay** one sealed hello and at most one failure each
//! way ([`Relaying`]).
//!
//! `T` is what the driver attaches to a registration to reach the receiver's session (a
//! channel, in the server; anything in tests).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngExt;

use super::{MAX_SEALED, Nameplate, Request, Response, from_hex, to_hex};
use crate::ratelimit::{RateConfig, RateLimiter, source_key};

/// How long a join waits for a registered nameplate's PAKE message. A receiver shows its
/// code as soon as the nameplate is opened and sends its PAKE message right after; a quick
/// sender (a script) can join in between, and on a lossy path the PAKE message may lag by
/// a retransmission or two. Turning that sender away would waste a good code.
pub(crate) const PAKE_WAIT: Duration = Duration::from_secs(3);

/// Longest failure reason passed on, in characters.
const MAX_REASON: usize = 200;

/// The book's limits (from [`super::RendezvousConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    /// Nameplates waiting at once, in all.
    pub max_nameplates: usize,
    /// Nameplates waiting at once from one source (IPv4 address or IPv6 /64).
    pub max_per_source: usize,
    /// Longest lifetime a receiver may ask for.
    pub max_ttl: Duration,
    /// Joins per source.
    pub join_rate: RateConfig,
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// [`Limits::max_nameplates`] are waiting.
    Full,
    /// [`Limits::max_per_source`] are waiting from this source.
    SourceFull,
    /// The chosen nameplate is not one.
    BadNameplate,
    /// The chosen nameplate is waiting already.
    Taken,
    /// Too many chosen nameplates asked for from this source: each one tells whether a
    /// nameplate is waiting, so they are charged to the join limit like joins.
    Lookups,
}

/// A nameplate reserved for a receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    /// The nameplate.
    pub nameplate: String,
    /// Which registration of it this is.
    pub id: u64,
    /// The lifetime granted (asked for, at least a second, at most [`Limits::max_ttl`]).
    pub ttl: Duration,
    /// When it expires.
    pub expires: Instant,
}

/// A registration a sender took: what the sender needs of the receiver.
#[derive(Debug)]
pub(crate) struct Taken<T> {
    /// The receiver's PAKE message.
    pub pake: Vec<u8>,
    /// The receiver's address as seen here.
    pub observed: SocketAddr,
    /// The way to the receiver's session.
    pub session: T,
}

/// What a join found.
#[derive(Debug)]
pub(crate) enum Join<T> {
    /// Paired: the registration left the book.
    Paired(Taken<T>),
    /// Registered, but its PAKE message has not arrived yet: ask again shortly.
    Pending,
    /// Nobody waits on that nameplate (never opened, taken, expired, or its PAKE message
    /// did not come within [`PAKE_WAIT`]).
    Unknown,
}

/// A receiver waiting on a nameplate.
#[derive(Debug)]
struct Waiting<T> {
    id: u64,
    /// Its PAKE message; a nameplate cannot be joined before it arrives.
    pake: Option<Vec<u8>>,
    observed: SocketAddr,
    source: IpAddr,
    expires: Instant,
    session: T,
}

/// The nameplates waiting, and the join limiter.
#[derive(Debug)]
pub(crate) struct Book<T> {
    limits: Limits,
    waiting: HashMap<String, Waiting<T>>,
    per_source: HashMap<IpAddr, usize>,
    /// The id of the next registration.
    next_id: u64,
    joins: RateLimiter,
}

impl<T> Book<T> {
    /// An empty book.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Book {
            limits,
            waiting: HashMap::new(),
            per_source: HashMap::new(),
            next_id: 0,
            joins: RateLimiter::new(limits.join_rate, now),
        }
    }

    /// Nameplates waiting (their PAKE message arrived or not, expired or not: a
    /// registration stays until it is taken or released).
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Reserve `wanted` (or a random free nameplate) for a receiver at `observed`, for
    /// `ttl_secs` (bounded by the limits), reachable through `session`.
    pub fn register(
        &mut self,
        now: Instant,
        observed: SocketAddr,
        wanted: Option<&str>,
        ttl_secs: u32,
        session: T,
        rng: &mut impl rand::Rng,
    ) -> Result<Registration, Refused> {
        let source = source_key(observed.ip());
        if self.waiting.len() >= self.limits.max_nameplates {
            return Err(Refused::Full);
        }
        if self.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source {
            return Err(Refused::SourceFull);
        }
        let nameplate = match wanted {
            Some(wanted) => {
                let nameplate = wanted
                    .parse::<Nameplate>()
                    .map_err(|_| Refused::BadNameplate)?;
                let nameplate = nameplate.as_str().to_string();
                // Charged before it is looked at: `taken` would otherwise find waiting
                // nameplates for a guesser at no cost (~1,300 lookups a second).
                if !self.joins.allow(now, observed.ip()) {
                    return Err(Refused::Lookups);
                }
                if self.waiting.contains_key(&nameplate) {
                    return Err(Refused::Taken);
                }
                nameplate
            }
            None => self.free_nameplate(rng),
        };
        let ttl = Duration::from_secs(ttl_secs.max(1).into()).min(self.limits.max_ttl);
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.insert(
            nameplate.clone(),
            Waiting {
                id,
                pake: None,
                observed,
                source,
                expires: now + ttl,
                session,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        Ok(Registration {
            nameplate,
            id,
            ttl,
            expires: now + ttl,
        })
    }

    /// The receiver's PAKE message for registration `id` of `nameplate`: from now on it
    /// can be joined. False if that registration is gone.
    pub fn pake(&mut self, nameplate: &str, id: u64, pake: Vec<u8>) -> bool {
        match self.waiting.get_mut(nameplate) {
            Some(waiting) if waiting.id == id => {
                waiting.pake = Some(pake);
                true
            }
            _ => false,
        }
    }

    /// Whether a join from `source` is within its rate (ask once per join request).
    pub fn allow_join(&mut self, now: Instant, source: IpAddr) -> bool {
        self.joins.allow(now, source)
    }

    /// A sender, which first asked at `asked`, joins `nameplate`.
    pub fn join(&mut self, now: Instant, nameplate: &str, asked: Instant) -> Join<T> {
        match self.waiting.get(nameplate) {
            Some(waiting) if now >= waiting.expires => Join::Unknown,
            Some(waiting) if waiting.pake.is_some() => {
                let waiting = self.remove(nameplate).expect("just seen");
                Join::Paired(Taken {
                    pake: waiting.pake.unwrap_or_default(),
                    observed: waiting.observed,
                    session: waiting.session,
                })
            }
            Some(_) if now < asked + PAKE_WAIT => Join::Pending,
            _ => Join::Unknown,
        }
    }

    /// The receiver's exchange ended: free registration `id` of `nameplate`, unless a join
    /// took it already (then the nameplate may be registered again by another receiver,
    /// and that registration is not this one's to free). True if it was freed.
    pub fn release(&mut self, nameplate: &str, id: u64) -> bool {
        if self.waiting.get(nameplate).is_none_or(|w| w.id != id) {
            return false;
        }
        self.remove(nameplate).is_some()
    }

    fn remove(&mut self, nameplate: &str) -> Option<Waiting<T>> {
        let waiting = self.waiting.remove(nameplate)?;
        if let Some(count) = self.per_source.get_mut(&waiting.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&waiting.source);
            }
        }
        Some(waiting)
    }

    /// A random free numeric nameplate, short while few are in use: numbers below
    /// max(100, 4 × waiting), so they stay one or two digits for humans and are not simply
    /// the lowest free one (which anyone could predict and burn).
    fn free_nameplate(&self, rng: &mut impl rand::Rng) -> String {
        let mut range = (self.waiting.len() as u32 * 4).max(100);
        loop {
            for _ in 0..16 {
                let candidate = rng.random_range(1..range).to_string();
                if !self.waiting.contains_key(&candidate) {
                    return candidate;
                }
            }
            range = range.saturating_mul(2);
        }
    }
}

/// What one side of a pairing passes to the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Passed {
    /// Its sealed hello.
    Sealed(Vec<u8>),
    /// Its failure report.
    Failed(String),
}

/// What to do with what our client said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromClient {
    /// Pass it to the partner.
    Pass(Passed),
    /// The request breaks the protocol: say so and end.
    Malformed(&'static str),
    /// Nothing to do; keep going (the client stopped talking, the partner may not have).
    Wait,
    /// The relay is over.
    End,
}

/// What to do with what the partner passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromPartner {
    /// Tell our client, then end if `last`.
    Tell { response: Response, last: bool },
    /// The relay is over.
    End,
}

/// One side of a pairing: one sealed hello and at most one failure each way, until both
/// sides are done. A partner that leaves before saying anything (a guesser that joined and
/// went away, a crashed peer) is reported as a failure, so the client learns why its
/// meeting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Relaying {
    sealed: bool,
    failed: bool,
    client_gone: bool,
    heard: bool,
}

impl Relaying {
    /// Whether the client may still say something (its stream is open).
    pub fn listening(&self) -> bool {
        !self.client_gone
    }

    /// Our client said `request` (`None`: it finished its stream).
    pub fn client(&mut self, request: Option<Request>) -> FromClient {
        match request {
            Some(Request::Seal { sealed }) if !self.sealed => {
                self.sealed = true;
                match from_hex(&sealed, MAX_SEALED) {
                    Some(bytes) => FromClient::Pass(Passed::Sealed(bytes)),
                    None => FromClient::Malformed("bad sealed hello"),
                }
            }
            Some(Request::Fail { reason }) if !self.failed => {
                self.failed = true;
                FromClient::Pass(Passed::Failed(reason.chars().take(MAX_REASON).collect()))
            }
            Some(_) => FromClient::Malformed("unexpected request in a pairing"),
            // The client hung up its side, and everything it said was passed on. Once the
            // partner has said its piece too, this pairing is over here (it must not hold
            // the client's stream for the whole timeout).
            None if self.heard => FromClient::End,
            None => {
                self.client_gone = true;
                FromClient::Wait
            }
        }
    }

    /// The partner passed `passed` (`None`: its session ended, nothing more will come).
    pub fn partner(&mut self, passed: Option<Passed>) -> FromPartner {
        let (response, last) = match passed {
            Some(Passed::Sealed(bytes)) => (
                Response::Sealed {
                    sealed: to_hex(&bytes),
                },
                false,
            ),
            Some(Passed::Failed(reason)) => (Response::PeerFailed { reason }, false),
            // If the partner said nothing at all, tell the client, which would otherwise
            // only see its stream end.
            None if !self.heard => {
                let reason = "the other side left before finishing the exchange";
                (
                    Response::PeerFailed {
                        reason: reason.into(),
                    },
                    true,
                )
            }
            None => return FromPartner::End,
        };
        self.heard = true;
        FromPartner::Tell { response, last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn limits() -> Limits {
        Limits {
            max_nameplates: 100,
            max_per_source: 3,
            max_ttl: Duration::from_secs(600),
            join_rate: RateConfig {
                per_source_burst: 2,
                per_source_rate: 1.0,
                global_burst: 1000,
                global_rate: 1000.0,
                max_sources: 64,
            },
        }
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    struct World {
        book: Book<u32>,
        now: Instant,
        rng: StdRng,
    }

    impl World {
        fn new(limits: Limits) -> Self {
            let now = Instant::now();
            World {
                book: Book::new(limits, now),
                now,
                rng: StdRng::seed_from_u64(7),
            }
        }

        fn register(&mut self, from: &str, wanted: Option<&str>, session: u32) -> Registration {
            self.try_register(from, wanted, 60, session).unwrap()
        }

        fn try_register(
            &mut self,
            from: &str,
            wanted: Option<&str>,
            ttl_secs: u32,
            session: u32,
        ) -> Result<Registration, Refused> {
            self.book
                .register(self.now, at(from), wanted, ttl_secs, session, &mut self.rng)
        }

        fn join(&mut self, nameplate: &str) -> Join<u32> {
            self.book.join(self.now, nameplate, self.now)
        }
    }

    #[test]
    fn register_pake_join_pairs_once() {
        let mut w = World::new(limits());
        let r = w.register("198.51.100.1:4000", Some("Seven7"), 11);
        assert_eq!(r.nameplate, "seven7", "kept lowercase");
        assert!(w.book.pake("seven7", r.id, vec![1, 2, 3]));
        match w.join("seven7") {
            Join::Paired(taken) => {
                assert_eq!(taken.pake, vec![1, 2, 3]);
                assert_eq!(taken.observed, at("198.51.100.1:4000"));
                assert_eq!(taken.session, 11);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.book.len(), 0, "single use");
        assert!(matches!(w.join("seven7"), Join::Unknown));
        assert!(matches!(w.join("never"), Join::Unknown));
        // The receiver's exchange ends after the join took its nameplate: nothing to free.
        assert!(!w.book.release("seven7", r.id));
    }

    #[test]
    fn a_join_before_the_pake_waits_then_gives_up() {
        let mut w = World::new(limits());
        let r = w.register("198.51.100.1:4000", None, 1);
        let asked = w.now;
        assert!(matches!(w.join(&r.nameplate), Join::Pending));
        let later = asked + PAKE_WAIT - Duration::from_millis(1);
        assert!(matches!(
            w.book.join(later, &r.nameplate, asked),
            Join::Pending
        ));
        assert!(matches!(
            w.book.join(asked + PAKE_WAIT, &r.nameplate, asked),
            Join::Unknown
        ));
        assert_eq!(w.book.len(), 1, "a join that gave up leaves the nameplate");
        // Once the PAKE message is there, a join in time pairs.
        assert!(w.book.pake(&r.nameplate, r.id, vec![9]));
        assert!(matches!(
            w.book.join(later, &r.nameplate, asked),
            Join::Paired(_)
        ));
    }

    #[test]
    fn expiry_and_lifetimes() {
        let mut w = World::new(limits());
        let r = w.try_register("198.51.100.1:1", None, 0, 1).unwrap();
        assert_eq!(r.ttl, Duration::from_secs(1), "at least a second");
        let r = w.try_register("198.51.100.1:1", None, 86_400, 2).unwrap();
        assert_eq!(r.ttl, Duration::from_secs(600), "at most max_ttl");
        assert_eq!(r.expires, w.now + r.ttl);
        assert!(w.book.pake(&r.nameplate, r.id, vec![1]));
        let (before, after) = (r.expires - Duration::from_millis(1), r.expires);
        assert!(matches!(
            w.book.join(after, &r.nameplate, after),
            Join::Unknown
        ));
        assert!(matches!(
            w.book.join(before, &r.nameplate, before),
            Join::Paired(_)
        ));
    }

    #[test]
    fn limits_in_all_and_per_source() {
        let mut w = World::new(Limits {
            max_nameplates: 5,
            ..limits()
        });
        let ids: Vec<Registration> = (0..3)
            .map(|i| w.register("198.51.100.1:1000", None, i))
            .collect();
        // Another port, same address: same source.
        assert_eq!(
            w.try_register("198.51.100.1:2000", None, 60, 9),
            Err(Refused::SourceFull)
        );
        // An IPv6 source is its /64.
        w.register("[2001:db8::1]:1", None, 3);
        w.register("[2001:db8::2]:1", None, 4);
        assert_eq!(
            w.try_register("[2001:db8:0:1::1]:1", None, 60, 5),
            Err(Refused::Full)
        );
        // Releasing one frees a place for its source and in all.
        assert!(w.book.release(&ids[0].nameplate, ids[0].id));
        assert!(!w.book.release(&ids[0].nameplate, ids[0].id), "only once");
        w.register("198.51.100.1:3000", None, 6);
        assert_eq!(w.book.len(), 5);
    }

    #[test]
    fn chosen_nameplates_taken_bad_and_reused() {
        let mut w = World::new(limits());
        let first = w.register("198.51.100.1:1", Some("42"), 1);
        assert_eq!(
            w.try_register("198.51.100.2:1", Some(" 42 "), 60, 2),
            Err(Refused::Taken)
        );
        for bad in ["", "a-b", "x".repeat(33).as_str()] {
            assert_eq!(
                w.try_register("198.51.100.2:1", Some(bad), 60, 2),
                Err(Refused::BadNameplate),
                "{bad:?}"
            );
        }
        // Taken by a join, the nameplate is free for a new registration at once ...
        assert!(w.book.pake("42", first.id, vec![1]));
        assert!(matches!(w.join("42"), Join::Paired(t) if t.session == 1));
        let second = w.register("198.51.100.2:1", Some("42"), 2);
        assert_ne!(first.id, second.id, "registration ids differ");
        // ... and the first receiver's late release or PAKE message cannot touch it.
        assert!(!w.book.release("42", first.id));
        assert!(!w.book.pake("42", first.id, vec![7]));
        assert!(matches!(w.join("42"), Join::Pending));
        assert!(w.book.pake("42", second.id, vec![2]));
        assert!(matches!(w.join("42"), Join::Paired(t) if t.session == 2 && t.pake == [2]));
    }

    #[test]
    fn random_nameplates_are_short_and_free() {
        let mut w = World::new(Limits {
            max_per_source: 1000,
            max_nameplates: 1000,
            ..limits()
        });
        let mut seen = std::collections::HashSet::new();
        // Below 100 while at most 25 wait; then below 4 × waiting, so drawing never stalls.
        for i in 0..260 {
            let bound = (w.book.len() as u32 * 4).max(100);
            let r = w.register("198.51.100.1:1", None, i);
            let n: u32 = r.nameplate.parse().unwrap();
            assert!((1..bound).contains(&n), "{n} of {bound}");
            assert!(
                seen.insert(r.nameplate),
                "a waiting nameplate is never drawn"
            );
        }
        assert_eq!(w.book.len(), 260);
    }

    #[test]
    fn joins_are_rate_limited_per_source() {
        let mut w = World::new(limits());
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(w.book.allow_join(w.now, a));
        assert!(w.book.allow_join(w.now, a));
        assert!(!w.book.allow_join(w.now, a), "burst of 2");
        assert!(
            w.book.allow_join(w.now, b),
            "another source is not affected"
        );
        assert!(w.book.allow_join(w.now + Duration::from_secs(1), a), "1/s");
    }

    #[test]
    fn chosen_nameplates_are_charged_to_the_join_limit() {
        let mut w = World::new(limits());
        // Two lookups of a taken nameplate spend the burst of 2 ...
        w.register("198.51.100.1:1", Some("42"), 1);
        for _ in 0..2 {
            let taken = w.try_register("198.51.100.9:1", Some("42"), 60, 2);
            assert_eq!(taken, Err(Refused::Taken));
        }
        // ... so the third is refused as a lookup, and so is a join from that source.
        let third = w.try_register("198.51.100.9:1", Some("43"), 60, 3);
        assert_eq!(third, Err(Refused::Lookups));
        assert!(!w.book.allow_join(w.now, "198.51.100.9".parse().unwrap()));
        // A random nameplate is no lookup, and another source is not affected.
        assert!(w.try_register("198.51.100.9:1", None, 60, 4).is_ok());
        let other = w.try_register("198.51.100.8:1", Some("42"), 60, 5);
        assert_eq!(other, Err(Refused::Taken));
    }

    fn seal(bytes: &[u8]) -> Request {
        Request::Seal {
            sealed: to_hex(bytes),
        }
    }

    #[test]
    fn relay_passes_one_hello_and_one_failure() {
        let mut r = Relaying::default();
        assert_eq!(
            r.client(Some(seal(&[1, 2]))),
            FromClient::Pass(Passed::Sealed(vec![1, 2]))
        );
        assert_eq!(
            r.client(Some(seal(&[3]))),
            FromClient::Malformed("unexpected request in a pairing"),
            "one hello only"
        );
        let mut r = Relaying::default();
        let long = "x".repeat(500);
        assert_eq!(
            r.client(Some(Request::Fail { reason: long })),
            FromClient::Pass(Passed::Failed("x".repeat(MAX_REASON)))
        );
        assert!(matches!(
            r.client(Some(Request::Fail { reason: "y".into() })),
            FromClient::Malformed(_)
        ));
        let mut r = Relaying::default();
        assert!(matches!(
            r.client(Some(Request::Info)),
            FromClient::Malformed(_)
        ));
        let too_big = Request::Seal {
            sealed: "00".repeat(MAX_SEALED + 1),
        };
        assert_eq!(
            r.client(Some(too_big)),
            FromClient::Malformed("bad sealed hello")
        );
    }

    #[test]
    fn relay_ends_when_both_sides_are_done() {
        // The client finishes first: wait for the partner, then end after its word.
        let mut r = Relaying::default();
        assert_eq!(r.client(None), FromClient::Wait);
        assert!(!r.listening());
        assert_eq!(
            r.partner(Some(Passed::Sealed(vec![5]))),
            FromPartner::Tell {
                response: Response::Sealed {
                    sealed: "05".into()
                },
                last: false
            }
        );
        assert_eq!(r.partner(None), FromPartner::End);
        // The partner spoke first: the client's end ends the relay.
        let mut r = Relaying::default();
        assert!(matches!(
            r.partner(Some(Passed::Failed("wrong code".into()))),
            FromPartner::Tell {
                response: Response::PeerFailed { .. },
                last: false
            }
        ));
        assert!(r.listening());
        assert_eq!(r.client(None), FromClient::End);
    }

    #[test]
    fn a_partner_that_leaves_silently_is_reported() {
        let mut r = Relaying::default();
        match r.partner(None) {
            FromPartner::Tell {
                response: Response::PeerFailed { reason },
                last: true,
            } => assert!(reason.contains("left"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}

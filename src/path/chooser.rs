//! The pure chooser: which of a peer's live paths carries its packets now.
//!
//! Plain data and functions, like [`crate::traverse`]: the path driver feeds it what it heard
//! and when, and asks it which path to use; it reads no clock and touches no socket, so every
//! rule (preference, liveness, latency, hysteresis) is tested deterministically below.
//!
//! The rules, in order:
//! 1. Only live paths count: one heard from within [`ChooserConfig::stale_after`].
//! 2. The current path, if dead, is replaced at once by the best live one (a connection must
//!    not wait for its idle timeout while a relay answers).
//! 3. A path of a better kind (LAN > direct or birthday > relayed UDP > relayed TCP) replaces
//!    a live current one only once it is *steady*: heard with no gap longer than
//!    [`ChooserConfig::steady_gap`] for [`ChooserConfig::settle`], and heard within that gap
//!    now. A direct path that answers a few probes and dies again must not pull the
//!    connection off the relay and back.
//! 4. Within one kind, a steady path replaces the current one only when its RTT is lower by
//!    [`ChooserConfig::faster_by`] and the current one has been used for at least
//!    [`ChooserConfig::settle`].

use std::time::{Duration, Instant};

use super::PathKind;

/// The chooser's tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChooserConfig {
    /// A path not heard from for this long is dead.
    pub stale_after: Duration,
    /// How long a better path must have been steady before it replaces a live current one,
    /// and how long the current one is kept before a faster path of its kind replaces it.
    pub settle: Duration,
    /// The longest silence a steady path may have (a path being tried is probed several
    /// times a second).
    pub steady_gap: Duration,
    /// How much lower (as a fraction of the current RTT) a path's RTT must be to replace a
    /// path of its own kind.
    pub faster_by: f64,
}

impl Default for ChooserConfig {
    /// Keep-alives and probes run every few seconds, so a path silent for 5 s is gone; a
    /// second of answers with no gap over half a second is enough to trust a better one; a
    /// quarter lower RTT is worth a move, less is noise.
    fn default() -> Self {
        ChooserConfig {
            stale_after: Duration::from_secs(5),
            settle: Duration::from_secs(1),
            steady_gap: Duration::from_millis(500),
            faster_by: 0.25,
        }
    }
}

/// One path, as the chooser knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u32);

/// Why the chooser moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The first live path.
    First,
    /// The current path went silent.
    CurrentDead,
    /// A path of a better kind has been live long enough.
    BetterKind,
    /// A path of the same kind answers faster.
    Faster,
}

impl SwitchReason {
    /// The name in events: `first`, `current-dead`, `better-kind`, `faster`.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::First => "first",
            SwitchReason::CurrentDead => "current-dead",
            SwitchReason::BetterKind => "better-kind",
            SwitchReason::Faster => "faster",
        }
    }

    /// Why, for people.
    pub fn explain(self) -> &'static str {
        match self {
            SwitchReason::First => "the first path that answered",
            SwitchReason::CurrentDead => "the path in use went silent",
            SwitchReason::BetterKind => "a better path has been answering steadily",
            SwitchReason::Faster => "a path of the same kind answers faster",
        }
    }
}

/// A move from one path to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The path used until now (`None` for the first).
    pub from: Option<PathId>,
    /// The path to use from now on.
    pub to: PathId,
    /// Why.
    pub reason: SwitchReason,
}

#[derive(Debug, Clone)]
struct PathState {
    id: PathId,
    kind: PathKind,
    /// Smoothed RTT, once one was measured.
    rtt: Option<Duration>,
    last_heard: Option<Instant>,
    /// Since when it has been heard with no gap longer than `steady_gap`.
    steady_since: Option<Instant>,
}

impl PathState {
    /// Best first: the better kind, then the lower RTT (unmeasured last), then the older.
    fn rank(&self) -> (u8, Duration, PathId) {
        (
            self.kind.class(),
            self.rtt.unwrap_or(Duration::MAX),
            self.id,
        )
    }
}

/// Picks the path for one peer.
#[derive(Debug, Clone)]
pub struct Chooser {
    config: ChooserConfig,
    paths: Vec<PathState>,
    next_id: u32,
    current: Option<(PathId, Instant)>,
}

impl Chooser {
    /// No paths yet.
    pub fn new(config: ChooserConfig) -> Self {
        Chooser {
            config,
            paths: Vec::new(),
            next_id: 0,
            current: None,
        }
    }

    /// A new path of `kind`, not heard from yet.
    pub fn add(&mut self, kind: PathKind) -> PathId {
        let id = PathId(self.next_id);
        self.next_id += 1;
        self.paths.push(PathState {
            id,
            kind,
            rtt: None,
            last_heard: None,
            steady_since: None,
        });
        id
    }

    /// Path `id` turned out to be of another kind (an address first learnt as direct is on
    /// our own network).
    pub fn set_kind(&mut self, id: PathId, kind: PathKind) {
        if let Some(path) = self.paths.iter_mut().find(|p| p.id == id) {
            path.kind = kind;
        }
    }

    /// The path is gone for good (its socket closed, the relay slot expired).
    pub fn remove(&mut self, id: PathId) {
        self.paths.retain(|p| p.id != id);
    }

    /// Something authenticated arrived on `id` at `now`, with an RTT sample if it answered
    /// one of ours.
    pub fn heard(&mut self, id: PathId, now: Instant, rtt: Option<Duration>) {
        let gap = self.config.steady_gap;
        let Some(path) = self.paths.iter_mut().find(|p| p.id == id) else {
            return;
        };
        let unbroken = path
            .last_heard
            .is_some_and(|t| now.saturating_duration_since(t) <= gap);
        if !unbroken {
            path.steady_since = Some(now);
        }
        path.last_heard = Some(now);
        if let Some(sample) = rtt {
            // Like TCP's SRTT: 7/8 of the old estimate, 1/8 of the sample.
            path.rtt = Some(match path.rtt {
                Some(old) => (old * 7 + sample) / 8,
                None => sample,
            });
        }
    }

    /// The path in use, if any.
    pub fn current(&self) -> Option<PathId> {
        self.current.map(|(id, _)| id)
    }

    /// The kind of path `id`.
    pub fn kind(&self, id: PathId) -> Option<PathKind> {
        self.paths.iter().find(|p| p.id == id).map(|p| p.kind)
    }

    /// The smoothed RTT of path `id`, once measured.
    pub fn rtt(&self, id: PathId) -> Option<Duration> {
        self.paths.iter().find(|p| p.id == id).and_then(|p| p.rtt)
    }

    fn live(&self, path: &PathState, now: Instant) -> bool {
        path.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.stale_after)
    }

    /// Decide at `now`: `Some` when the connection should move to another path.
    pub fn poll(&mut self, now: Instant) -> Option<Switch> {
        let settle = self.config.settle;
        let best = self
            .paths
            .iter()
            .filter(|p| self.live(p, now))
            .min_by_key(|p| p.rank())?
            .clone();
        let Some((current_id, chosen_at)) = self.current else {
            return self.switch(None, best.id, SwitchReason::First, now);
        };
        let current = self.paths.iter().find(|p| p.id == current_id).cloned();
        let Some(current) = current.filter(|c| self.live(c, now)) else {
            return self.switch(Some(current_id), best.id, SwitchReason::CurrentDead, now);
        };
        if best.id == current.id {
            return None;
        }
        let gap = self.config.steady_gap;
        let settled = |p: &PathState| {
            p.steady_since
                .is_some_and(|t| now.saturating_duration_since(t) >= settle)
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) < gap)
        };
        // A better kind, steadily live: move, whatever the RTTs.
        let better = self
            .paths
            .iter()
            .filter(|p| self.live(p, now) && p.kind.class() < current.kind.class() && settled(p))
            .min_by_key(|p| p.rank())
            .map(|p| p.id);
        if let Some(to) = better {
            return self.switch(Some(current.id), to, SwitchReason::BetterKind, now);
        }
        // The same kind, clearly faster, and the current one has had its time.
        if now.saturating_duration_since(chosen_at) < settle {
            return None;
        }
        let current_rtt = current.rtt?;
        let faster = self
            .paths
            .iter()
            .filter(|p| settled(p) && p.kind.class() == current.kind.class())
            .filter_map(|p| p.rtt.map(|rtt| (rtt, p.id)))
            .filter(|(rtt, _)| {
                rtt.as_secs_f64() < current_rtt.as_secs_f64() * (1.0 - self.config.faster_by)
            })
            .min()
            .map(|(_, id)| id);
        let to = faster?;
        self.switch(Some(current.id), to, SwitchReason::Faster, now)
    }

    fn switch(
        &mut self,
        from: Option<PathId>,
        to: PathId,
        reason: SwitchReason,
        now: Instant,
    ) -> Option<Switch> {
        self.current = Some((to, now));
        Some(Switch { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn chooser() -> Chooser {
        Chooser::new(ChooserConfig::default())
    }

    /// Hear `id` every 100 ms from `from` for `span`, with RTT `rtt`.
    fn keep_hearing(c: &mut Chooser, id: PathId, from: Instant, span: Duration, rtt: Duration) {
        let mut t = from;
        while t <= from + span {
            c.heard(id, t, Some(rtt));
            t += 100 * MS;
        }
    }

    #[test]
    fn kinds_have_their_names_and_order() {
        let names: Vec<_> = [
            PathKind::Lan,
            PathKind::Direct,
            PathKind::Birthday,
            PathKind::RelayedUdp,
            PathKind::RelayedTcp,
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        assert_eq!(
            names,
            ["lan", "direct", "birthday", "relayed", "relayed-tcp"]
        );
        assert!(PathKind::RelayedTcp.is_relayed() && !PathKind::Birthday.is_relayed());
        assert_eq!(PathKind::Direct.class(), PathKind::Birthday.class());
    }

    #[test]
    fn nothing_is_chosen_until_a_path_is_heard_and_the_first_is_taken_at_once() {
        let t0 = Instant::now();
        let mut c = chooser();
        let relay = c.add(PathKind::RelayedUdp);
        let direct = c.add(PathKind::Direct);
        assert_eq!(c.poll(t0), None);
        c.heard(relay, t0, Some(40 * MS));
        let first = c.poll(t0).unwrap();
        assert_eq!(
            (first.from, first.to, first.reason),
            (None, relay, SwitchReason::First)
        );
        // The direct path answers: not yet settled, so the relay stays.
        c.heard(direct, t0 + 100 * MS, Some(20 * MS));
        assert_eq!(c.poll(t0 + 100 * MS), None);
        keep_hearing(&mut c, relay, t0, 2000 * MS, 40 * MS);
        keep_hearing(&mut c, direct, t0 + 100 * MS, 1000 * MS, 20 * MS);
        let up = c.poll(t0 + 1100 * MS).unwrap();
        assert_eq!(
            (up.from, up.to, up.reason),
            (Some(relay), direct, SwitchReason::BetterKind)
        );
        assert_eq!(c.current(), Some(direct));
    }

    #[test]
    fn a_dead_current_path_is_replaced_at_once_by_the_best_live_one() {
        let t0 = Instant::now();
        let mut c = chooser();
        let direct = c.add(PathKind::Direct);
        let tcp = c.add(PathKind::RelayedTcp);
        let udp = c.add(PathKind::RelayedUdp);
        keep_hearing(&mut c, direct, t0, 2000 * MS, 20 * MS);
        c.poll(t0 + 2000 * MS);
        assert_eq!(c.current(), Some(direct));
        // The direct path goes silent; both relays keep answering.
        keep_hearing(&mut c, tcp, t0, 9000 * MS, 50 * MS);
        keep_hearing(&mut c, udp, t0 + 6500 * MS, 2500 * MS, 45 * MS);
        let at = t0 + 2000 * MS + ChooserConfig::default().stale_after;
        let down = c.poll(at).unwrap();
        // UDP relay is preferred to TCP, even though it has been live only briefly.
        assert_eq!(
            (down.from, down.to, down.reason),
            (Some(direct), udp, SwitchReason::CurrentDead)
        );
    }

    #[test]
    fn a_flapping_direct_path_does_not_pull_the_connection_off_the_relay() {
        let t0 = Instant::now();
        let mut c = chooser();
        let relay = c.add(PathKind::RelayedUdp);
        let direct = c.add(PathKind::Direct);
        keep_hearing(&mut c, relay, t0, 30_000 * MS, 40 * MS);
        c.poll(t0);
        // The direct path answers for 500 ms, dies for 6 s, answers again for 500 ms ...
        let mut switches = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(30) {
            if (t - t0).as_millis() % 6500 < 500 {
                c.heard(direct, t, Some(10 * MS));
            }
            if c.poll(t).is_some() {
                switches += 1;
            }
            t += 100 * MS;
        }
        assert_eq!(switches, 0, "never live for a whole settle period");
        assert_eq!(c.current(), Some(relay));
    }

    #[test]
    fn within_a_kind_only_a_clearly_faster_path_wins_and_not_at_once() {
        let t0 = Instant::now();
        let mut c = chooser();
        let a = c.add(PathKind::Direct);
        let b = c.add(PathKind::Birthday);
        keep_hearing(&mut c, a, t0, 5000 * MS, 100 * MS);
        c.poll(t0);
        assert_eq!(c.current(), Some(a));
        // 10 % faster: noise, no move.
        keep_hearing(&mut c, b, t0, 3000 * MS, 90 * MS);
        assert_eq!(c.poll(t0 + 3000 * MS), None);
        // 40 % faster: a move (the current path has been used for more than `settle`).
        let mut faster = c.clone();
        keep_hearing(&mut faster, b, t0 + 3000 * MS, 2000 * MS, 50 * MS);
        let moved = faster.poll(t0 + 5000 * MS).unwrap();
        assert_eq!((moved.to, moved.reason), (b, SwitchReason::Faster));
        // ... and not straight back when it gets a little slower.
        keep_hearing(&mut faster, b, t0 + 5100 * MS, 500 * MS, 70 * MS);
        assert_eq!(faster.poll(t0 + 5600 * MS), None);
    }

    #[test]
    fn a_removed_current_path_is_dead_and_a_path_never_heard_is_never_chosen() {
        let t0 = Instant::now();
        let mut c = chooser();
        let lan = c.add(PathKind::Lan);
        let relay = c.add(PathKind::RelayedTcp);
        let _silent = c.add(PathKind::Direct);
        keep_hearing(&mut c, lan, t0, 1000 * MS, 1 * MS);
        keep_hearing(&mut c, relay, t0, 1000 * MS, 60 * MS);
        assert_eq!(c.poll(t0 + 1000 * MS).map(|s| s.to), Some(lan));
        c.remove(lan);
        let moved = c.poll(t0 + 1000 * MS).unwrap();
        assert_eq!((moved.to, moved.reason), (relay, SwitchReason::CurrentDead));
        assert_eq!(c.kind(relay), Some(PathKind::RelayedTcp));
        assert!(c.rtt(relay).is_some_and(|r| r == 60 * MS));
        // Everything silent: nothing to choose, the current one is kept as it was.
        assert_eq!(c.poll(t0 + Duration::from_secs(60)), None);
    }
}

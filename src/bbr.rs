//! A BBR congestion controller for quinn that measures the bottleneck the way kernel BBR
//! does, so that a bulk sender keeps about one bandwidth-delay product in flight, not
//! several.
//!
//! Why not quinn's own `Bbr` (which it marks experimental): on the path bench
//! (`benches/path.rs`, 100 Mbit/s, 40 ms RTT, 50 ms of bottleneck queue) it kept several
//! bandwidth-delay products in flight and lost a large share of its packets at 0 % random
//! loss, and it spent the first ~250 ms of every connection in ProbeRTT. Both come from its
//! model: its bandwidth sample is one packet's bytes over the gap between two ACKs (so a
//! bunch of ACKs reads as a huge rate, and the max filter keeps it), and its ProbeRTT timer
//! counts as expired before the first probe. quinn's pacer then sends 1.25 windows per
//! smoothed RTT, so an inflated window is an inflated rate.
//!
//! The model here, after the BBR draft and Linux `tcp_bbr.c` / `tcp_rate.c`:
//! - **Bandwidth** (`bw`): the largest *delivery-rate* sample of the last
//!   [`BW_WINDOW_ROUNDS`] round trips, where a sample is the bytes delivered between a
//!   packet's send and its ACK, over the longer of the send and ACK intervals (never
//!   shorter than the minimum RTT): a burst of ACKs cannot inflate it. Samples taken while
//!   the application had nothing to send only count when they raise the estimate.
//! - **Minimum RTT**: the smallest `ack time - send time` of the last [`MIN_RTT_WINDOW`].
//!   No ProbeRTT phase: the window below never builds a standing queue for long, and the
//!   0.75 phase of every gain cycle drains what the 1.25 phase added, so fresh minimum
//!   samples keep coming.
//! - **Window**: the only lever a quinn controller has (the pacer derives the rate from
//!   it). Startup grows it by every acknowledged byte up to 2 bandwidth-delay products
//!   until the bandwidth stops growing by 25 % for 3 rounds; Drain holds one product until
//!   the queue is gone; ProbeBW cycles through 1.25, 0.75 and six 1.0 products, one
//!   minimum RTT each, plus the ACK aggregation seen in the last rounds (a receiver that
//!   acknowledges in bursts must not stall the sender).
//! - **Loss** is not congestion here (random loss would otherwise collapse the rate, as it
//!   does for CUBIC); only persistent congestion (everything lost for several RTOs) resets
//!   the model to Startup. Loss that recurs every round is given back as window (see
//!   [`Model`]'s `steady_loss`): lost packets occupy window for a round trip without ever
//!   reaching the bottleneck.
//!
//! On the path bench it loses no packets at 0 % random loss where quinn's loses more than
//! half, with the same or better goodput (as kernel TCP bbr); its standing queue is the
//! ACK-aggregation allowance. The figures, and why a larger allowance was not taken, are in
//! `docs/performance.md` ("Speed on real links").
//!
//! [`Model`] is the sans-IO core (time and events in, window out), tested with a small
//! simulated bottleneck; [`BbrConfig`] / the `Controller` impl are the adapter quinn calls.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Startup window gain, in bandwidth-delay products: BBRv3's startup `cwnd_gain` (v1 used
/// 2.885). Growth comes from adding every acknowledged byte, i.e. doubling per round trip;
/// the gain only caps how far ahead of the measured rate the window may run, so with 2 the
/// start-up queue stays within one bandwidth-delay product.
const STARTUP_GAIN: f64 = 2.0;
/// Window gains of one ProbeBW cycle, one minimum RTT each: probe, drain, cruise.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Where a fresh ProbeBW cycle starts: cruising, so a flow leaving Drain does not probe
/// at once.
const CYCLE_START: usize = 2;
/// Round trips the bandwidth filter remembers.
pub const BW_WINDOW_ROUNDS: u64 = 10;
/// How long a minimum RTT sample stays valid.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Startup ends after this many rounds without 25 % more bandwidth.
const FULL_BW_ROUNDS: u32 = 3;
/// Growth that counts as "still growing" in Startup.
const FULL_BW_GROWTH: f64 = 1.25;
/// Initial window in datagrams (Chromium's QUIC default; RFC 9002 suggests 10, quinn's
/// BBR uses 200): 38 KB, a good start on a long fat path without a 240 KB first burst.
const INITIAL_PACKETS: u64 = 32;
/// Rounds over which loss must recur to count as steady (see [`Model::steady_loss`]).
const LOSS_ROUNDS: usize = 4;
/// The window never goes below this many datagrams.
const MIN_PACKETS: u64 = 4;
/// Send records kept at most (one per distinct send instant in flight): a bound on
/// memory whatever the peer does with its ACKs.
const MAX_RECORDS: usize = 1 << 16;

/// Which part of the BBR cycle the model is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Grow until the bandwidth stops growing.
    Startup,
    /// Empty the queue Startup built.
    Drain,
    /// Cruise at the estimate, probing for more once per cycle.
    ProbeBw,
}

/// What the delivery-rate estimator remembers about packets sent at one instant.
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    time: Instant,
    /// Bytes delivered (acknowledged) when it was sent.
    delivered: u64,
    /// When `delivered` last grew, as of the send.
    delivered_time: Instant,
    /// Send time of the packet whose ACK last produced a sample, as of the send.
    first_sent_time: Instant,
}

/// The sans-IO congestion model: feed it sends, ACKs and losses; read [`Model::window`].
#[derive(Debug, Clone)]
pub struct Model {
    mtu: u64,
    phase: Phase,
    window: u64,
    // Delivery-rate estimation.
    records: VecDeque<SendRecord>,
    delivered: u64,
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    in_flight: u64,
    // Rounds: a round ends when a packet sent after it began is acknowledged.
    round: u64,
    round_end: u64,
    round_started: bool,
    /// (round, largest sample of that round), last [`BW_WINDOW_ROUNDS`] rounds.
    bw_samples: VecDeque<(u64, u64)>,
    min_rtt: Option<(Duration, Instant)>,
    // Startup exit.
    full_bw: u64,
    full_bw_count: u32,
    round_app_limited: bool,
    // ProbeBW.
    cycle_index: usize,
    cycle_start: Option<Instant>,
    // ACK aggregation: bytes acknowledged beyond `bw` since the epoch began.
    epoch_start: Option<Instant>,
    epoch_acked: u64,
    /// (round, largest excess of that round), last [`BW_WINDOW_ROUNDS`] rounds.
    extra_acked: VecDeque<(u64, u64)>,
    acked_in_batch: u64,
    // Loss: bytes declared lost in the current round, and in the last complete ones.
    lost_this_round: u64,
    lost_rounds: VecDeque<u64>,
}

impl Model {
    /// A fresh model for a path whose datagrams are `mtu` bytes.
    pub fn new(mtu: u16) -> Model {
        let mtu = u64::from(mtu);
        Model {
            mtu,
            phase: Phase::Startup,
            window: INITIAL_PACKETS * mtu,
            records: VecDeque::new(),
            delivered: 0,
            delivered_time: None,
            first_sent_time: None,
            in_flight: 0,
            round: 0,
            round_end: 0,
            round_started: false,
            bw_samples: VecDeque::new(),
            min_rtt: None,
            full_bw: 0,
            full_bw_count: 0,
            round_app_limited: false,
            cycle_index: CYCLE_START,
            cycle_start: None,
            epoch_start: None,
            epoch_acked: 0,
            extra_acked: VecDeque::new(),
            acked_in_batch: 0,
            lost_this_round: 0,
            lost_rounds: VecDeque::new(),
        }
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The phase the model is in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The bottleneck bandwidth estimate, bytes per second (0 before the first sample).
    pub fn bandwidth(&self) -> u64 {
        self.bw_samples.iter().map(|&(_, bw)| bw).max().unwrap_or(0)
    }

    /// The minimum RTT estimate, once there is one.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(rtt, _)| rtt)
    }

    /// `gain` bandwidth-delay products, if both estimates exist.
    fn bdp(&self, gain: f64) -> Option<u64> {
        let bw = self.bandwidth();
        let rtt = self.min_rtt()?;
        (bw > 0).then_some((gain * bw as f64 * rtt.as_secs_f64()) as u64)
    }

    fn min_window(&self) -> u64 {
        MIN_PACKETS * self.mtu
    }

    /// `bytes` were sent at `now` (one datagram, or several with one timestamp).
    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        if self.in_flight == 0 {
            // Restarting from idle: the next sample must not span the idle time.
            self.first_sent_time = Some(now);
            self.delivered_time = Some(now);
        }
        self.in_flight = self.in_flight.saturating_add(bytes);
        if self.records.back().is_some_and(|r| r.time == now) {
            return; // same instant, same state: one record serves them all
        }
        if self.records.len() == MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(SendRecord {
            time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent_time: self.first_sent_time.unwrap_or(now),
        });
    }

    /// A packet of `bytes` sent at `sent` was acknowledged at `now`. `app_limited`: the
    /// sender ran out of data before this ACK.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.delivered = self.delivered.saturating_add(bytes);
        self.delivered_time = Some(now);
        self.in_flight = self.in_flight.saturating_sub(bytes);
        self.acked_in_batch = self.acked_in_batch.saturating_add(bytes);
        self.on_rtt_sample(now, now.saturating_duration_since(sent));
        // Records older than `sent` belong to packets acknowledged or lost by now.
        while self.records.front().is_some_and(|r| r.time < sent) {
            self.records.pop_front();
        }
        let Some(record) = self.records.front().copied().filter(|r| r.time == sent) else {
            return; // reordered past a newer ACK: no sample
        };
        self.first_sent_time = Some(record.time);
        if record.delivered >= self.round_end {
            self.round += 1;
            self.round_end = self.delivered;
            self.round_started = true;
            if self.lost_rounds.len() == LOSS_ROUNDS {
                self.lost_rounds.pop_front();
            }
            self.lost_rounds
                .push_back(std::mem::take(&mut self.lost_this_round));
        }
        if app_limited {
            self.round_app_limited = true;
        }
        let send_elapsed = record
            .time
            .saturating_duration_since(record.first_sent_time);
        let ack_elapsed = now.saturating_duration_since(record.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // Shorter than a round trip means compressed ACKs, not a rate (tcp_rate.c).
        if interval.is_zero() || self.min_rtt().is_some_and(|rtt| interval < rtt) {
            return;
        }
        let rate = ((self.delivered - record.delivered) as f64 / interval.as_secs_f64()) as u64;
        if app_limited && rate <= self.bandwidth() {
            return;
        }
        push_max(&mut self.bw_samples, self.round, rate);
    }

    fn on_rtt_sample(&mut self, now: Instant, rtt: Duration) {
        let expired = self.min_rtt.is_none_or(|(min, at)| {
            rtt <= min || now.saturating_duration_since(at) > MIN_RTT_WINDOW
        });
        if expired && !rtt.is_zero() {
            self.min_rtt = Some((rtt, now));
        }
    }

    /// The ACKs of one ACK frame have all been passed to [`Model::on_ack`]; `in_flight`
    /// is what the connection still has in flight. Updates the window.
    pub fn on_end_acks(&mut self, now: Instant, in_flight: u64) {
        self.in_flight = in_flight;
        let acked = std::mem::take(&mut self.acked_in_batch);
        self.expire_rounds();
        self.update_aggregation(now, acked);
        let round_start = std::mem::take(&mut self.round_started);
        if round_start {
            self.check_full_bandwidth();
            tracing::trace!(
                round = self.round,
                phase = ?self.phase,
                bw = self.bandwidth(),
                min_rtt = ?self.min_rtt(),
                window = self.window,
                in_flight,
                extra = self.extra(),
                steady_loss = self.steady_loss(),
                "bbr round"
            );
        }
        match self.phase {
            Phase::Startup => {
                let target = self.bdp(STARTUP_GAIN).map(|t| t + self.extra());
                // Grow by what was acknowledged, never above the target, never shrink.
                if target.is_none_or(|t| self.window < t) {
                    self.window = self.window.saturating_add(acked);
                }
            }
            Phase::Drain => {
                let bdp = self.bdp(1.0).unwrap_or(self.window);
                self.window = bdp;
                if in_flight <= bdp {
                    self.enter_probe_bw(now);
                }
            }
            Phase::ProbeBw => {
                self.advance_cycle(now, in_flight);
                let gain = CYCLE[self.cycle_index];
                if let (Some(target), Some(bdp)) = (self.bdp(gain), self.bdp(1.0)) {
                    let lost = if gain <= 1.0 {
                        self.steady_loss().min(bdp)
                    } else {
                        0
                    };
                    self.window = target + self.extra() + lost;
                }
            }
        }
        self.window = self.window.max(self.min_window());
    }

    /// Bandwidth samples and aggregation older than the filter window are forgotten.
    fn expire_rounds(&mut self) {
        let oldest = self.round.saturating_sub(BW_WINDOW_ROUNDS - 1);
        while self.bw_samples.len() > 1 && self.bw_samples.front().is_some_and(|&(r, _)| r < oldest)
        {
            self.bw_samples.pop_front();
        }
        while self.extra_acked.front().is_some_and(|&(r, _)| r < oldest) {
            self.extra_acked.pop_front();
        }
    }

    /// BBR's "extra acked": how far ACKs ran ahead of the estimated rate.
    fn update_aggregation(&mut self, now: Instant, acked: u64) {
        let bw = self.bandwidth();
        if bw == 0 || acked == 0 {
            return;
        }
        let start = *self.epoch_start.get_or_insert(now);
        let mut expected = (bw as f64 * now.saturating_duration_since(start).as_secs_f64()) as u64;
        if self.epoch_acked <= expected {
            // ACKs are not ahead of the rate: a new epoch starts here.
            self.epoch_start = Some(now);
            self.epoch_acked = 0;
            expected = 0;
        }
        self.epoch_acked = self.epoch_acked.saturating_add(acked);
        let extra = self.epoch_acked.saturating_sub(expected).min(self.window);
        push_max(&mut self.extra_acked, self.round, extra);
    }

    /// Bytes lost in *every* one of the last [`LOSS_ROUNDS`] rounds (their minimum).
    ///
    /// Lost packets hold window until they are declared lost (about a round trip) without
    /// ever reaching the bottleneck, so random loss p would leave the link idle p of the
    /// time: ProbeBW gives that much room back (not while probing, at most one
    /// bandwidth-delay product). Only loss that recurs every round counts: the loss a probe
    /// causes by overflowing a shallow queue comes once a cycle and must not be refilled at
    /// once.
    fn steady_loss(&self) -> u64 {
        if self.lost_rounds.len() < LOSS_ROUNDS {
            return 0;
        }
        self.lost_rounds.iter().copied().min().unwrap_or(0)
    }

    fn extra(&self) -> u64 {
        self.extra_acked.iter().map(|&(_, e)| e).max().unwrap_or(0)
    }

    /// At a round start in Startup: has the bandwidth stopped growing?
    fn check_full_bandwidth(&mut self) {
        let app_limited = std::mem::take(&mut self.round_app_limited);
        if self.phase != Phase::Startup || app_limited {
            return;
        }
        let bw = self.bandwidth();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_count = 0;
            return;
        }
        self.full_bw_count += 1;
        if self.full_bw_count >= FULL_BW_ROUNDS {
            self.phase = Phase::Drain;
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.phase = Phase::ProbeBw;
        self.cycle_index = CYCLE_START;
        self.cycle_start = Some(now);
    }

    /// Next gain after one minimum RTT; the drain phase ends early once the queue is gone.
    fn advance_cycle(&mut self, now: Instant, in_flight: u64) {
        let (Some(start), Some(rtt)) = (self.cycle_start, self.min_rtt()) else {
            return;
        };
        let elapsed = now.saturating_duration_since(start) > rtt;
        let gain = CYCLE[self.cycle_index];
        let drained = gain < 1.0 && self.bdp(1.0).is_some_and(|bdp| in_flight <= bdp);
        if elapsed || drained {
            self.cycle_index = (self.cycle_index + 1) % CYCLE.len();
            self.cycle_start = Some(now);
        }
    }

    /// Packets were declared lost. Random loss is not congestion; persistent congestion
    /// (nothing acknowledged for several probe timeouts) starts over.
    pub fn on_loss(&mut self, lost_bytes: u64, persistent: bool) {
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        self.lost_this_round = self.lost_this_round.saturating_add(lost_bytes);
        if persistent {
            let mtu = self.mtu;
            *self = Model {
                delivered: self.delivered,
                ..Model::new(mtu as u16)
            };
            self.window = self.min_window();
        }
    }

    /// The path's datagram size changed.
    pub fn on_mtu(&mut self, mtu: u16) {
        self.mtu = mtu.into();
        self.window = self.window.max(self.min_window());
    }

    /// The pacing rate BBR would use, for qlog (bits per second).
    fn pacing_rate(&self) -> Option<u64> {
        let gain = match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain => 1.0 / STARTUP_GAIN,
            Phase::ProbeBw => CYCLE[self.cycle_index],
        };
        let bw = self.bandwidth();
        (bw > 0).then_some((gain * bw as f64 * 8.0) as u64)
    }
}

/// Record `value` for `round` in a per-round max filter.
fn push_max(filter: &mut VecDeque<(u64, u64)>, round: u64, value: u64) {
    match filter.back_mut() {
        Some((r, max)) if *r == round => *max = (*max).max(value),
        _ => filter.push_back((round, value)),
    }
}

/// Builds a [`Model`]-driven controller for each connection: pass it to
/// `TransportConfig::congestion_controller_factory`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BbrConfig;

impl ControllerFactory for BbrConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr(Model::new(current_mtu)))
    }
}

/// The quinn adapter around [`Model`].
#[derive(Debug, Clone)]
pub struct Bbr(pub Model);

impl Controller for Bbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, _last_packet_number: u64) {
        self.0.on_sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        _app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.0.on_end_acks(now, in_flight);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.0.on_loss(lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.0.window();
        metrics.pacing_rate = self.0.pacing_rate();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_PACKETS * self.0.mtu
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    //! A small simulated path: a sender driven by [`Model`] (with a pacer like quinn's), a
    //! drop-tail bottleneck queue, random loss in front of it, propagation delay, and a
    //! receiver that acknowledges every second packet.

    use super::*;
    use std::collections::BTreeMap;

    const MTU: u16 = 1452;
    const STEP: Duration = Duration::from_micros(50);

    struct Path {
        /// Bottleneck rate, bytes per second.
        rate: f64,
        /// Propagation delay each way (all of it after the bottleneck, and on the ACKs).
        one_way: Duration,
        /// Bottleneck queue, bytes.
        buffer: u64,
        /// Random loss in front of the queue, 0..1.
        loss: f64,
    }

    impl Path {
        fn lab(loss: f64) -> Path {
            // benches/path.rs: 100 Mbit/s, 40 ms RTT, tbf queue of 50 ms.
            Path {
                rate: 12.5e6,
                one_way: Duration::from_millis(20),
                buffer: 625_000,
                loss,
            }
        }

        fn bdp(&self) -> f64 {
            self.rate * 2.0 * self.one_way.as_secs_f64()
        }
    }

    /// What happened over a stretch of simulated time.
    #[derive(Debug, Default, Clone, Copy)]
    struct Tally {
        sent: u64,
        acked: u64,
        /// Dropped by the full queue (the controller's doing), not by random loss.
        overflowed: u64,
        randomly_lost: u64,
        max_queue: u64,
    }

    struct Sim {
        model: Model,
        path: Path,
        start: Instant,
        now: Instant,
        rng: u64,
        next_pn: u64,
        /// In flight: packet number -> (sent, bytes).
        flight: BTreeMap<u64, (Instant, u64)>,
        in_flight: u64,
        queue: VecDeque<(u64, u64)>,
        queued: u64,
        link_budget: f64,
        /// Packets on the wire after the bottleneck: (arrival, pn).
        wire: VecDeque<(Instant, u64)>,
        unacked_at_receiver: Vec<u64>,
        /// ACKs on their way back: (arrival, pns).
        acks: VecDeque<(Instant, Vec<u64>)>,
        pacer_tokens: f64,
        srtt: Duration,
        /// The application's send rate limit (bytes per second), if any.
        app_rate: Option<f64>,
        app_budget: f64,
        tally: Tally,
    }

    impl Sim {
        fn new(path: Path, seed: u64) -> Sim {
            let start = Instant::now();
            Sim {
                model: Model::new(MTU),
                path,
                start,
                now: start,
                rng: seed | 1,
                next_pn: 0,
                flight: BTreeMap::new(),
                in_flight: 0,
                queue: VecDeque::new(),
                queued: 0,
                link_budget: 0.0,
                wire: VecDeque::new(),
                unacked_at_receiver: Vec::new(),
                acks: VecDeque::new(),
                pacer_tokens: 0.0,
                srtt: Duration::from_millis(333),
                app_rate: None,
                app_budget: 0.0,
                tally: Tally::default(),
            }
        }

        fn random(&mut self) -> f64 {
            // xorshift64*: deterministic, good enough for loss.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Run for `duration`; return what happened meanwhile.
        fn run(&mut self, duration: Duration) -> Tally {
            let before = self.tally;
            let end = self.now + duration;
            while self.now < end {
                self.now += STEP;
                self.step();
            }
            let t = self.tally;
            Tally {
                sent: t.sent - before.sent,
                acked: t.acked - before.acked,
                overflowed: t.overflowed - before.overflowed,
                randomly_lost: t.randomly_lost - before.randomly_lost,
                max_queue: t.max_queue,
            }
        }

        fn step(&mut self) {
            let now = self.now;
            let dt = STEP.as_secs_f64();
            // The bottleneck serves its queue.
            self.link_budget = (self.link_budget + self.path.rate * dt).min(2.0 * f64::from(MTU));
            while let Some(&(pn, bytes)) = self.queue.front() {
                if self.link_budget < bytes as f64 {
                    break;
                }
                self.link_budget -= bytes as f64;
                self.queue.pop_front();
                self.queued -= bytes;
                self.wire.push_back((now + self.path.one_way, pn));
            }
            if self.queue.is_empty() {
                self.link_budget = self.link_budget.min(f64::from(MTU));
            }
            // The receiver: an ACK for every second packet.
            while self.wire.front().is_some_and(|&(at, _)| at <= now) {
                let (_, pn) = self.wire.pop_front().unwrap();
                self.unacked_at_receiver.push(pn);
                if self.unacked_at_receiver.len() >= 2 {
                    let pns = std::mem::take(&mut self.unacked_at_receiver);
                    self.acks.push_back((now + self.path.one_way, pns));
                }
            }
            // The sender: ACKs, then loss detection (3 packets of reordering threshold).
            while self.acks.front().is_some_and(|&(at, _)| at <= now) {
                let (_, pns) = self.acks.pop_front().unwrap();
                let app_limited = self.app_rate.is_some();
                let mut largest = 0;
                for pn in pns {
                    largest = largest.max(pn);
                    if let Some((sent, bytes)) = self.flight.remove(&pn) {
                        self.in_flight -= bytes;
                        self.tally.acked += bytes;
                        let rtt = now - sent;
                        self.srtt = (self.srtt * 7 + rtt) / 8;
                        self.model.on_ack(now, sent, bytes, app_limited);
                    }
                }
                let lost: Vec<u64> = self
                    .flight
                    .range(..largest.saturating_sub(2))
                    .map(|(&pn, _)| pn)
                    .collect();
                let mut lost_bytes = 0;
                for pn in lost {
                    lost_bytes += self.flight.remove(&pn).unwrap().1;
                }
                if lost_bytes > 0 {
                    self.in_flight -= lost_bytes;
                    self.model.on_loss(lost_bytes, false);
                }
                self.model.on_end_acks(now, self.in_flight);
            }
            // Sending, paced like quinn: 1.25 windows per smoothed RTT.
            let window = self.model.window() as f64;
            let burst = (window * 0.002 / self.srtt.as_secs_f64())
                .clamp(2.0 * f64::from(MTU), 10.0 * f64::from(MTU));
            self.pacer_tokens =
                (self.pacer_tokens + 1.25 * window * dt / self.srtt.as_secs_f64()).min(burst);
            if let Some(rate) = self.app_rate {
                self.app_budget = (self.app_budget + rate * dt).min(4.0 * f64::from(MTU));
            }
            let bytes = u64::from(MTU);
            while self.in_flight + bytes <= self.model.window()
                && self.pacer_tokens >= bytes as f64
                && (self.app_rate.is_none() || self.app_budget >= bytes as f64)
            {
                self.pacer_tokens -= bytes as f64;
                self.app_budget -= bytes as f64;
                let pn = self.next_pn;
                self.next_pn += 1;
                self.flight.insert(pn, (now, bytes));
                self.in_flight += bytes;
                self.tally.sent += bytes;
                self.model.on_sent(now, bytes);
                if self.random() < self.path.loss {
                    self.tally.randomly_lost += bytes;
                } else if self.queued + bytes > self.path.buffer {
                    self.tally.overflowed += bytes;
                } else {
                    self.queue.push_back((pn, bytes));
                    self.queued += bytes;
                    self.tally.max_queue = self.tally.max_queue.max(self.queued);
                }
            }
        }

        fn elapsed(&self) -> Duration {
            self.now - self.start
        }
    }

    fn rate(t: &Tally, over: Duration) -> f64 {
        t.acked as f64 / over.as_secs_f64()
    }

    #[test]
    fn fills_a_clean_long_link_without_overflowing_its_queue() {
        let mut sim = Sim::new(Path::lab(0.0), 1);
        let start = sim.run(Duration::from_secs(1));
        assert_eq!(sim.model.phase(), Phase::ProbeBw, "left startup");
        // Start-up runs at most one bandwidth-delay product ahead: the 50 ms queue holds it.
        assert_eq!(start.overflowed, 0, "startup {start:?}");
        let steady = sim.run(Duration::from_secs(4));
        let got = rate(&steady, Duration::from_secs(4));
        assert!(got > 0.97 * sim.path.rate, "{got:.0} B/s, {steady:?}");
        assert_eq!(steady.overflowed, 0, "{steady:?}");
        let bw = sim.model.bandwidth() as f64;
        assert!((bw / sim.path.rate - 1.0).abs() < 0.1, "bw {bw:.0}");
        let min_rtt = sim.model.min_rtt().unwrap();
        assert!(
            min_rtt >= Duration::from_millis(40) && min_rtt < Duration::from_millis(42),
            "{min_rtt:?}"
        );
        // About one bandwidth-delay product in flight, not several.
        assert!(
            (sim.model.window() as f64) < 1.6 * sim.path.bdp(),
            "window {} vs BDP {:.0}",
            sim.model.window(),
            sim.path.bdp()
        );
        assert!(sim.elapsed() > Duration::from_secs(4));
    }

    #[test]
    fn reaches_the_link_rate_within_a_few_round_trips() {
        let mut sim = Sim::new(Path::lab(0.0), 2);
        sim.run(Duration::from_millis(400)); // 10 round trips
        let next = sim.run(Duration::from_millis(200));
        let got = rate(&next, Duration::from_millis(200));
        assert!(got > 0.9 * sim.path.rate, "{got:.0} B/s after 400 ms");
    }

    #[test]
    fn random_loss_does_not_collapse_the_rate() {
        for loss in [0.02, 0.10] {
            let mut sim = Sim::new(Path::lab(loss), 3);
            sim.run(Duration::from_secs(1));
            let steady = sim.run(Duration::from_secs(4));
            let got = rate(&steady, Duration::from_secs(4));
            // Lost packets never reach the bottleneck: the link stays busy anyway.
            assert!(
                got > 0.95 * sim.path.rate,
                "loss {loss}: {got:.0} B/s, {steady:?}"
            );
            assert!(
                steady.overflowed < steady.sent / 100,
                "loss {loss}: {steady:?}"
            );
        }
    }

    #[test]
    fn shallow_queue_still_fills_the_link() {
        let mut path = Path::lab(0.0);
        path.buffer = 62_500; // 5 ms of queue: an eighth of the BDP
        let mut sim = Sim::new(path, 4);
        sim.run(Duration::from_secs(1));
        let steady = sim.run(Duration::from_secs(4));
        let got = rate(&steady, Duration::from_secs(4));
        assert!(got > 0.9 * sim.path.rate, "{got:.0} B/s, {steady:?}");
        assert!(steady.overflowed < steady.sent / 50, "{steady:?}");
    }

    #[test]
    fn follows_the_link_when_it_slows_down() {
        let mut sim = Sim::new(Path::lab(0.0), 5);
        sim.run(Duration::from_secs(2));
        sim.path.rate = 3e6;
        sim.run(Duration::from_secs(2));
        let steady = sim.run(Duration::from_secs(3));
        let got = rate(&steady, Duration::from_secs(3));
        assert!(got > 0.95 * 3e6, "{got:.0} B/s");
        assert!(steady.overflowed < steady.sent / 100, "{steady:?}");
        let bw = sim.model.bandwidth() as f64;
        assert!((bw / 3e6 - 1.0).abs() < 0.15, "bw {bw:.0} after the drop");
    }

    #[test]
    fn an_application_limited_sender_keeps_its_estimate() {
        let mut sim = Sim::new(Path::lab(0.0), 6);
        sim.run(Duration::from_secs(2));
        let full = sim.model.bandwidth();
        sim.app_rate = Some(1e6);
        sim.run(Duration::from_secs(2));
        // Slow application data does not teach the model that the link is slow...
        assert!(
            sim.model.bandwidth() >= full * 9 / 10,
            "{} < {full}",
            sim.model.bandwidth()
        );
        // ...so the link is used again at once when there is more to send.
        sim.app_rate = None;
        let after = sim.run(Duration::from_millis(400));
        let got = rate(&after, Duration::from_millis(400));
        assert!(got > 0.85 * sim.path.rate, "{got:.0} B/s after the pause");
    }

    #[test]
    fn persistent_congestion_starts_over_small() {
        let mut sim = Sim::new(Path::lab(0.0), 7);
        sim.run(Duration::from_secs(1));
        sim.model.on_loss(100_000, true);
        assert_eq!(sim.model.phase(), Phase::Startup);
        assert_eq!(sim.model.window(), u64::from(MTU) * MIN_PACKETS);
        assert_eq!(sim.model.bandwidth(), 0);
    }

    #[test]
    fn nonsense_events_are_harmless() {
        let mut model = Model::new(1200);
        let t = Instant::now();
        // ACKs for packets never sent, before anything was sent, out of order.
        model.on_ack(t, t + Duration::from_secs(1), 1200, false);
        model.on_ack(t + Duration::from_secs(1), t, u64::MAX / 2, true);
        model.on_end_acks(t, 0);
        model.on_loss(u64::MAX, false);
        model.on_sent(t, 1200);
        model.on_sent(t, 1200);
        model.on_end_acks(t, u64::MAX);
        model.on_mtu(1500);
        assert!(model.window() >= 4 * 1500);
    }
}

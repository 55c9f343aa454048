//! Relay slots: the rendezvous passing a pair's QUIC packets when no direct path works.
//!
//! When the rendezvous pairs a receiver and a sender it opens a [`Slot`] bound to exactly
//! those two QUIC connections (the connection *objects*, not their addresses: a third
//! connection, or a forged source address, has no way in). A QUIC DATAGRAM frame on either
//! connection whose first byte is [`RELAY_PACKET`](super::RELAY_PACKET) is passed, unchanged,
//! to the other with `send_datagram`: never waiting, so a partner slower than its peer
//! loses the oldest queued datagrams, as a congested UDP path would, and the peers' own
//! QUIC recovers. The payloads are the peers' own QUIC packets (their end-to-end TLS): the
//! rendezvous holds no key and sees no plaintext.
//!
//! A slot outlives the pairing exchange (which ends after the sealed hellos): it hangs off
//! each connection's [`Link`], which the connection's serve loop reads datagrams through.
//! While it lives, both connections count as holding an exchange (no idle eviction). It
//! ends when either connection ends, when its lifetime ends (both connections are then
//! closed with [`RELAY_EXPIRED`]), or when its quota is used up (closed with
//! [`RELAY_QUOTA`]): either way both peers learn why from the close.
//!
//! **Memory.** A slot is a few hundred bytes and one small task (it waits for either
//! connection to close or the lifetime to end); what a relaying pair can make the
//! rendezvous buffer is bounded by quinn's datagram buffers of its two connections
//! ([`crate::node::Datagrams::RELAY`]: 256 KiB in, 64 KiB out, each).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::events::RendezvousEvents;
use super::held::{Held, Holding, now};
use super::{RELAY_PACKET, RelayGrant};

/// The code a rendezvous closes both connections of a pair with when the pair used up its
/// relay quota ([`RelayLimits::quota`]).
pub const RELAY_QUOTA: u32 = 0x11;
/// The code a rendezvous closes both connections of a pair with when its relay slot's
/// lifetime ([`RelayLimits::lifetime`]) ended.
pub const RELAY_EXPIRED: u32 = 0x12;

/// What one pair may relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Bytes per pair, both directions together (tag bytes included). Default 8 GiB.
    pub quota: u64,
    /// Bytes per second per pair, both directions together, as a token bucket holding one
    /// second's worth (at least 64 KiB); 0 is no limit (the default). Datagrams over the
    /// rate are dropped.
    pub rate: u64,
    /// How long a slot lives. Default 6 hours.
    pub lifetime: Duration,
    /// A slot through which nothing passed for this long ends (default 2 minutes), and its
    /// connections become idle (evicted after [`RendezvousConfig::idle_grace`]). Without
    /// it, a client pairing two of its own connections would hold them for the whole
    /// lifetime; a pair that keeps its relay as a spare path keeps it alive with the path
    /// layer's probes.
    ///
    /// [`RendezvousConfig::idle_grace`]: super::RendezvousConfig::idle_grace
    pub idle: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            quota: 8 << 30,
            rate: 0,
            lifetime: Duration::from_secs(6 * 3600),
            idle: Duration::from_secs(120),
        }
    }
}

/// The relay's counters and the operator's events, shared by every slot.
#[derive(Default)]
pub(super) struct RelayShared {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
    pub cut: AtomicU64,
    pub live: AtomicUsize,
    /// Held while a slot is checked for and installed on two links: a connection that
    /// pairs twice at once (an open and a join) must not end up in two slots.
    pub opening: Mutex<()>,
}

/// One rendezvous connection as the relay sees it: the connection, its idle bookkeeping,
/// and the slot it is bound to, if any (a watch, so the serve loop wakes when a slot opens
/// or ends and re-reads its idle deadline).
pub(super) struct Link {
    conn: quinn::Connection,
    /// The client's real address (a client that came over TCP is at a mapped address).
    observed: std::net::SocketAddr,
    held: Arc<Held>,
    slot: watch::Sender<Option<(Arc<Slot>, usize)>>,
}

impl Link {
    pub fn new(
        conn: quinn::Connection,
        observed: std::net::SocketAddr,
        held: Arc<Held>,
    ) -> Arc<Link> {
        Arc::new(Link {
            conn,
            observed,
            held,
            slot: watch::Sender::new(None),
        })
    }

    /// The client's address, as seen here (its real one, also over TCP).
    pub fn observed(&self) -> std::net::SocketAddr {
        self.observed
    }

    /// The connection's idle bookkeeping.
    pub fn held(&self) -> &Arc<Held> {
        &self.held
    }

    /// Wakes whenever a slot opens or ends on this connection.
    pub fn subscribe(&self) -> watch::Receiver<Option<(Arc<Slot>, usize)>> {
        self.slot.subscribe()
    }

    /// A datagram arrived on this connection: pass it on, or drop it (counted).
    pub fn received(&self, datagram: Bytes, shared: &RelayShared) {
        let slot = self.slot.borrow().clone();
        match slot {
            Some((slot, side)) => slot.forward(side, datagram),
            None => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The connection ended: so does its slot.
    pub fn closed(&self) {
        let slot = self.slot.borrow().clone();
        if let Some((slot, _)) = slot {
            slot.end("a peer left");
        }
    }
}

/// A token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, at: Instant) -> Bucket {
        let burst = rate.max(64 << 10) as f64;
        Bucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            at,
        }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// One pair's relay.
pub(super) struct Slot {
    conns: [quinn::Connection; 2],
    links: [Weak<Link>; 2],
    quota: u64,
    used: AtomicU64,
    /// When the slot opened, and how long after it the last datagram passed (ms).
    opened: Instant,
    last: AtomicU64,
    /// `None`: no rate limit.
    bucket: Option<Mutex<Bucket>>,
    /// What keeps both connections from idle eviction while the slot lives; dropped when
    /// it ends (before the links are told, so their loops read the new state).
    holding: Mutex<Option<[Holding; 2]>>,
    ended: AtomicBool,
    nameplate: String,
    shared: Arc<RelayShared>,
    events: Arc<dyn RendezvousEvents>,
}

impl Slot {
    /// Open a slot between `a` and `b` (the receiver's and the sender's connections) and
    /// return what the pair is granted; `None` when the pair gets no relay: either side
    /// did not turn datagrams on (an older client), both are one connection (it joined its
    /// own nameplate), or a side relays for another pairing already (one slot per
    /// connection).
    pub fn open(
        a: &Arc<Link>,
        b: &Arc<Link>,
        limits: RelayLimits,
        nameplate: &str,
        shared: &Arc<RelayShared>,
        events: &Arc<dyn RendezvousEvents>,
    ) -> Option<(Arc<Slot>, RelayGrant)> {
        let _opening = shared.opening.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(a, b)
            || a.conn.max_datagram_size().is_none()
            || b.conn.max_datagram_size().is_none()
            || a.slot.borrow().is_some()
            || b.slot.borrow().is_some()
        {
            return None;
        }
        let slot = Arc::new(Slot {
            conns: [a.conn.clone(), b.conn.clone()],
            links: [Arc::downgrade(a), Arc::downgrade(b)],
            quota: limits.quota,
            used: AtomicU64::new(0),
            opened: now(),
            last: AtomicU64::new(0),
            bucket: (limits.rate > 0).then(|| Mutex::new(Bucket::new(limits.rate, now()))),
            holding: Mutex::new(Some([Held::enter(&a.held), Held::enter(&b.held)])),
            ended: AtomicBool::new(false),
            nameplate: nameplate.to_string(),
            shared: shared.clone(),
            events: events.clone(),
        });
        shared.live.fetch_add(1, Ordering::Relaxed);
        a.slot.send_replace(Some((slot.clone(), 0)));
        b.slot.send_replace(Some((slot.clone(), 1)));
        tokio::spawn(slot.clone().watch(limits.lifetime, limits.idle));
        let grant = RelayGrant {
            quota: limits.quota,
            rate: limits.rate,
            expires_secs: limits.lifetime.as_secs_f64().ceil() as u64,
        };
        Some((slot, grant))
    }

    /// Bytes relayed so far (counting the datagram that broke the quota, if one did).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Until either connection ends, the lifetime does, or nothing passed for `idle`.
    async fn watch(self: Arc<Self>, lifetime: Duration, idle: Duration) {
        let [a, b] = &self.conns;
        let expires = tokio::time::Instant::from_std(self.opened + lifetime);
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let idle_at = tokio::time::Instant::from_std(self.opened + last + idle);
            // Cancel-safe: `closed` and timers only wait.
            tokio::select! {
                _ = a.closed() => return self.end("a peer left"),
                _ = b.closed() => return self.end("a peer left"),
                () = tokio::time::sleep_until(expires) => {
                    let reason = format!(
                        "relay lifetime of {} ended",
                        humantime::format_duration(lifetime)
                    );
                    self.close_both(RELAY_EXPIRED, &reason);
                    return self.end("lifetime ended");
                }
                () = tokio::time::sleep_until(idle_at) => {
                    if self.last.load(Ordering::Relaxed) == last.as_millis() as u64 {
                        return self.end("idle");
                    }
                }
            }
        }
    }

    fn close_both(&self, code: u32, reason: &str) {
        for conn in &self.conns {
            crate::close_gate::close(conn, code.into(), reason.as_bytes());
        }
    }

    /// Pass a datagram that arrived on side `from` to the other side.
    fn forward(&self, from: usize, datagram: Bytes) {
        let shared = &self.shared;
        let drop = || {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        };
        if self.ended.load(Ordering::Relaxed) || datagram.first() != Some(&RELAY_PACKET) {
            return drop();
        }
        let len = datagram.len();
        if let Some(bucket) = &self.bucket {
            let ok = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(len, now());
            if !ok {
                return drop();
            }
        }
        let used = self.used.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if used > self.quota {
            shared.cut.fetch_add(1, Ordering::Relaxed);
            let reason = format!("relay quota of {} bytes used up", self.quota);
            self.close_both(RELAY_QUOTA, &reason);
            self.end("quota used up");
            return drop();
        }
        match self.conns[1 - from].send_datagram(datagram) {
            Ok(()) => {
                let since = now().saturating_duration_since(self.opened).as_millis() as u64;
                self.last.fetch_max(since, Ordering::Relaxed);
                shared.packets.fetch_add(1, Ordering::Relaxed);
                shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(quinn::SendDatagramError::ConnectionLost(_)) => {
                drop();
                self.end("a peer left");
            }
            // Larger than the partner's connection takes now (its path MTU is smaller):
            // the sender's MTU discovery learns from the loss.
            Err(_) => drop(),
        }
    }

    /// End the slot (once): both connections become idle again, their loops learn it.
    pub fn end(&self, why: &str) {
        if self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        self.holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for link in self.links.iter().filter_map(Weak::upgrade) {
            link.slot.send_if_modified(|slot| match slot {
                Some((ours, _)) if std::ptr::eq(Arc::as_ptr(ours), self) => {
                    *slot = None;
                    true
                }
                _ => false,
            });
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        self.events.relay_ended(&self.nameplate, self.used(), why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_a_second_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(100_000, t0);
        assert!(bucket.take(100_000, t0));
        assert!(!bucket.take(1, t0));
        assert!(!bucket.take(20_000, t0 + Duration::from_millis(100)));
        assert!(bucket.take(10_000, t0 + Duration::from_millis(100)));
        // Never more than the burst, however long it rested.
        assert!(!bucket.take(100_001, t0 + Duration::from_secs(60)));
        assert!(bucket.take(100_000, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_small_rate_still_passes_a_whole_packet() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(1, t0);
        assert!(bucket.take(1500, t0));
    }

    #[test]
    fn defaults_are_generous_but_bounded() {
        let d = RelayLimits::default();
        assert_eq!(d.quota, 8 << 30);
        assert_eq!(d.rate, 0);
        assert_eq!(d.lifetime, Duration::from_secs(6 * 3600));
        assert_eq!(d.idle, Duration::from_secs(120));
    }
}

//! Serving strangers: the accept loop every listening qpunch runs.
//!
//! A receiver listens on a public port, and so will the rendezvous and the relay: anyone
//! may connect, forge source addresses, start handshakes and never finish them, or open
//! connections by the hundred. The shape follows mini-redis's `server.rs`:
//!
//! - a [`Server`] whose listener takes a permit from a semaphore for each connection (the
//!   global budget) and a slot in a per-address table (the per-source budget); a connection
//!   over either budget is refused at once, before any handshake work, rather than left
//!   queued inside quinn where its client would wait for a timeout;
//! - one handler task per connection, **handshake included**, so a stalled handshake holds
//!   only its own task, for at most [`Limits::handshake_timeout`]; while many handshakes are
//!   half-open, new clients must first prove their address with a QUIC Retry, so forged
//!   sources cannot fill the table;
//! - a shutdown broadcast every handler listens to, and a drain: [`Server::run`] returns only
//!   when every handler has finished.
//!
//! What a connection is *for* is the [`Service`]'s business (files, rendezvous, relay).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, broadcast, mpsc};

use crate::node::{Node, NodeError, PeerConnection};
use crate::ratelimit::{prefix, source_key};
use crate::tls;

/// Budgets of one [`Server`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, handshakes included; more are refused.
    pub max_connections: usize,
    /// Connections from one source at once (an IPv4 address, or an IPv6 /64).
    pub max_per_ip: usize,
    /// Connections from one IPv6 /56 at once, and from one /48: one site is usually given
    /// a /56 or a /48, so without these a single customer could spread over 256 or 65,536
    /// /64s and fill the whole budget (129 /64s held all 4,096 of a rendezvous's slots).
    pub max_per_56: usize,
    /// See [`Limits::max_per_56`].
    pub max_per_48: usize,
    /// A handshake that has not completed after this long is abandoned.
    pub handshake_timeout: Duration,
    /// Half-open handshakes beyond which clients must first pass a QUIC Retry (address
    /// validation: a forged source cannot answer it, so it cannot hold a slot).
    pub retry_above: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_per_ip: 32,
            max_per_56: 64,
            max_per_48: 128,
            handshake_timeout: Duration::from_secs(5),
            retry_above: 16,
        }
    }
}

/// What the listener has done so far. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// Connections that completed the handshake and were handed to the service.
    pub connections_accepted: u64,
    /// Connection attempts refused by a budget (global or per source).
    pub connections_refused: u64,
    /// Connection attempts asked to validate their address first (QUIC Retry).
    pub retries_sent: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// A cheap handle on a server's counters, readable after the server is gone.
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters now.
    pub fn get(&self) -> ServerStats {
        let c = &self.0;
        ServerStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            retries_sent: c.retried.load(Ordering::Relaxed),
            handshakes_failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

/// What a server does with each authenticated connection.
pub trait Service: Send + Sync + 'static {
    /// Serve `peer` until done, or until `shutdown` fires (then return promptly).
    fn serve(
        self: Arc<Self>,
        peer: PeerConnection,
        shutdown: Shutdown,
    ) -> impl Future<Output = ()> + Send;

    /// A connection attempt from `remote` failed before authentication (handshake error or
    /// timeout). Called for every failure, so keep it cheap; the default only logs.
    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        tracing::debug!(%remote, "handshake failed: {error}");
    }
}

/// Tells a handler that the server is shutting down (mini-redis's `Shutdown`).
#[derive(Debug)]
pub struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    /// A listener on `notify`: it fires when every sender is dropped.
    fn new(notify: broadcast::Receiver<()>) -> Self {
        Shutdown {
            is_shutdown: false,
            notify,
        }
    }

    /// Whether shutdown has been seen.
    pub fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// Another listener for the same shutdown, for a task the handler spawns.
    pub fn resubscribe(&self) -> Shutdown {
        Shutdown {
            is_shutdown: self.is_shutdown,
            notify: self.notify.resubscribe(),
        }
    }

    /// Wait for the shutdown notice. Cancel-safe: it only waits on a broadcast receiver,
    /// which loses nothing when the wait is dropped.
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Only the "all senders dropped" close is ever sent.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}

/// The accept loop over one [`Node`], with its budgets, serving connections with `S`.
pub struct Server<S: Service> {
    node: Arc<Node>,
    service: Arc<S>,
    limits: Limits,
    stats: StatsHandle,
}

impl<S: Service> Server<S> {
    /// A server for `service` on `node`'s endpoint (the node must accept connections).
    pub fn new(node: Arc<Node>, service: Arc<S>, limits: Limits) -> Self {
        Server {
            node,
            service,
            limits,
            stats: StatsHandle::default(),
        }
    }

    /// A handle on the counters, usable after [`run`](Self::run) consumed the server.
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Accept and serve connections until `shutdown` completes (or the endpoint closes),
    /// then tell every handler to stop and wait for all of them to finish.
    pub async fn run(self, shutdown: impl Future) {
        let (notify_shutdown, _) = broadcast::channel(1);
        let (shutdown_complete_tx, mut shutdown_complete_rx) = mpsc::channel::<()>(1);
        let mut listener = Listener {
            node: self.node,
            service: self.service,
            limits: self.limits,
            stats: self.stats,
            permits: Arc::new(Semaphore::new(self.limits.max_connections)),
            per_source: Arc::new(PerSource::default()),
            half_open: Arc::new(AtomicUsize::new(0)),
            notify_shutdown,
            shutdown_complete_tx,
        };
        tokio::select! {
            // Cancel-safe: dropping the accept loop loses no connection (quinn keeps queued
            // attempts; the endpoint is closed by the caller), and handlers are separate tasks.
            () = listener.run() => {}
            _ = shutdown => {}
        }
        let Listener {
            notify_shutdown,
            shutdown_complete_tx,
            ..
        } = listener;
        // Dropping the only sender wakes every handler's `Shutdown::recv`; each handler holds
        // a clone of `shutdown_complete_tx`, so the channel closes when the last one ends.
        drop(notify_shutdown);
        drop(shutdown_complete_tx);
        let _ = shutdown_complete_rx.recv().await;
    }
}

/// Concurrent connections per source, and per IPv6 prefix above it.
#[derive(Debug, Default)]
struct PerSource(Mutex<HashMap<SourceKey, usize>>);

/// A source or prefix, with its length: an IPv6 /64, /56 and /48 can be the same address.
type SourceKey = (u8, IpAddr);

/// The keys a connection from `ip` counts against, each with its cap: the source (an IPv4
/// address or an IPv6 /64), and for IPv6 its /56 and /48.
fn source_keys(ip: IpAddr, limits: &Limits) -> Vec<(SourceKey, usize)> {
    let source = source_key(ip);
    if source.is_ipv4() {
        return vec![((32, source), limits.max_per_ip)];
    }
    let key = |bits: u8| (bits, prefix(source, bits));
    vec![
        (key(64), limits.max_per_ip),
        (key(56), limits.max_per_56),
        (key(48), limits.max_per_48),
    ]
}

impl PerSource {
    /// A slot for `ip`, or `None` when its source or one of its prefixes is full.
    fn claim(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<SourceSlot> {
        let keys = source_keys(ip, limits);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if keys
            .iter()
            .any(|(key, max)| map.get(key).copied().unwrap_or(0) >= *max)
        {
            return None;
        }
        for (key, _) in &keys {
            *map.entry(*key).or_insert(0) += 1;
        }
        Some(SourceSlot {
            table: self.clone(),
            keys: keys.into_iter().map(|(key, _)| key).collect(),
        })
    }
}

/// One connection's place in [`PerSource`]; freed on drop, so no path can leak it.
struct SourceSlot {
    table: Arc<PerSource>,
    keys: Vec<SourceKey>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            if let Some(count) = map.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

/// Counts a handshake as half-open while alive.
struct HalfOpen(Arc<AtomicUsize>);

impl HalfOpen {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        HalfOpen(count.clone())
    }
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Listener<S: Service> {
    node: Arc<Node>,
    service: Arc<S>,
    limits: Limits,
    stats: StatsHandle,
    permits: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    half_open: Arc<AtomicUsize>,
    notify_shutdown: broadcast::Sender<()>,
    shutdown_complete_tx: mpsc::Sender<()>,
}

impl<S: Service> Listener<S> {
    async fn run(&mut self) {
        let counters = self.stats.0.clone();
        while let Some(incoming) = self.node.endpoint().accept().await {
            // A client carried over TCP (see `crate::tcp`) is at a mapped address: budgets
            // count its real one.
            let remote = self.node.paths().real_addr(incoming.remote_address());
            if !incoming.remote_address_validated()
                && incoming.may_retry()
                && self.half_open.load(Ordering::Relaxed) >= self.limits.retry_above
            {
                // The client comes back with a token only if it really owns `remote`.
                if incoming.retry().is_ok() {
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            let slot = self.per_source.claim(remote.ip(), &self.limits);
            let permit = self.permits.clone().try_acquire_owned().ok();
            let (Some(slot), Some(permit)) = (slot, permit) else {
                tracing::debug!(%remote, "connection refused: over budget");
                counters.refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            };
            let handler = Handler {
                incoming,
                service: self.service.clone(),
                limits: self.limits,
                counters: counters.clone(),
                // Counted from here, not from when the task first runs: a burst of
                // Initials is accepted in one go, before any handler has started.
                half_open: HalfOpen::enter(&self.half_open),
                shutdown: Shutdown::new(self.notify_shutdown.subscribe()),
                _permit: permit,
                _slot: slot,
                _done: self.shutdown_complete_tx.clone(),
            };
            tokio::spawn(handler.run());
        }
    }
}

/// One connection, from the first packet to the end of its service.
struct Handler<S: Service> {
    incoming: quinn::Incoming,
    service: Arc<S>,
    limits: Limits,
    counters: Arc<Counters>,
    half_open: HalfOpen,
    shutdown: Shutdown,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: SourceSlot,
    /// Dropped last, when the handler ends: the drain waits for every clone.
    _done: mpsc::Sender<()>,
}

impl<S: Service> Handler<S> {
    async fn run(self) {
        let Handler {
            incoming,
            service,
            limits,
            counters,
            half_open,
            mut shutdown,
            ..
        } = self;
        let remote = incoming.remote_address();
        let handshake = {
            let _half_open = half_open;
            let connecting = async { Ok::<_, NodeError>(incoming.accept()?.await?) };
            tokio::select! {
                // Cancel-safe: dropping the handshake abandons it, which is the point.
                r = tokio::time::timeout(limits.handshake_timeout, connecting) => r,
                () = shutdown.recv() => return,
            }
        };
        let peer = match handshake {
            Ok(Ok(connection)) => match tls::peer_fingerprint(&connection) {
                Some(fingerprint) => PeerConnection {
                    connection,
                    fingerprint,
                },
                None => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    service.handshake_failed(remote, &NodeError::NoPeerIdentity);
                    return;
                }
            },
            Ok(Err(e)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                service.handshake_failed(remote, &e);
                return;
            }
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                service.handshake_failed(
                    remote,
                    &NodeError::HandshakeTimeout(limits.handshake_timeout),
                );
                return;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        service.serve(peer, shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fill(
        table: &Arc<PerSource>,
        limits: &Limits,
        ips: impl Iterator<Item = IpAddr>,
    ) -> Vec<SourceSlot> {
        ips.filter_map(|ip| table.claim(ip, limits)).collect()
    }

    #[test]
    fn one_ipv6_site_cannot_spread_over_its_64s_to_fill_the_budget() {
        let limits = Limits::default();
        let table = Arc::new(PerSource::default());
        // 64 /64s of one /56, each trying for all its 32 slots: the /56 cap holds.
        let of_56 =
            (0..64u16).flat_map(|n| (0..32).map(move |_| ip(&format!("2001:db8:0:{n:x}::1"))));
        let slots = fill(&table, &limits, of_56);
        assert_eq!(slots.len(), limits.max_per_56);
        // Another /56 of the same /48 gets its share, up to the /48 cap.
        let of_48 = (0..4u16).flat_map(|site| {
            (0..64).map(move |n| ip(&format!("2001:db8:0:{:x}::1", (site << 8) + 0x100 + n)))
        });
        let more = fill(&table, &limits, of_48);
        assert_eq!(slots.len() + more.len(), limits.max_per_48);
        // Someone else is not affected, and a freed slot is reusable.
        assert!(table.claim(ip("2001:db8:1::1"), &limits).is_some());
        drop(more);
        assert!(table.claim(ip("2001:db8:0:100::1"), &limits).is_some());
    }

    #[test]
    fn an_ipv4_source_and_a_64_get_max_per_ip() {
        let limits = Limits::default();
        let table = Arc::new(PerSource::default());
        let v4 = fill(&table, &limits, (0..100).map(|_| ip("198.51.100.7")));
        assert_eq!(v4.len(), limits.max_per_ip);
        // Addresses of one /64 are one source.
        let v6 = fill(
            &table,
            &limits,
            (0..100u16).map(|n| ip(&format!("2001:db8::{n:x}"))),
        );
        assert_eq!(v6.len(), limits.max_per_ip);
        drop(v4);
        drop(v6);
        assert!(table.0.lock().unwrap().is_empty(), "every key is released");
    }
}

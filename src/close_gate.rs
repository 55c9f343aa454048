//! Lets a closing connection's CONNECTION_CLOSE past its congestion controller.
//!
//! quinn-proto 0.11 (up to 0.11.19, the newest release) gates the packet that carries
//! CONNECTION_CLOSE like any data packet: if the congestion window is full when a
//! connection is closed, the close is never sent (a closed connection processes no more
//! ACKs, so the window never drains), and the peer only learns of it at its idle timeout
//! (quinn issue #2785, fixed upstream by #2787, not yet released). A bulk sender is
//! window-limited most of the time, so Ctrl-C on `qpunch send` left the receiver
//! waiting a minute about one time in two.
//!
//! Every controller a [`Node`](crate::node::Node) builds is wrapped in [`Gated`], which
//! reports an unlimited window (no congestion gate, no pacing) once its connection, or
//! its whole node, is closing. Close connections with [`close`] (or
//! [`Node::close`](crate::node::Node::close)) rather than `quinn::Connection::close`
//! directly, so the gate opens first. Nothing but the close is sent after that: quinn
//! builds no data packets for a closed connection.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Builds [`Gated`] controllers around another factory's, sharing one node-wide flag.
pub(crate) struct GatedFactory {
    pub(crate) inner: Arc<dyn ControllerFactory + Send + Sync>,
    /// Set when the node closes (all its connections at once).
    pub(crate) node_closing: Arc<AtomicBool>,
}

impl ControllerFactory for GatedFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Gated {
            inner: self.inner.clone().build(now, current_mtu),
            factory: self.inner.clone(),
            mtu: current_mtu,
            closing: Arc::new(AtomicBool::new(false)),
            restart: Arc::new(AtomicBool::new(false)),
            node_closing: self.node_closing.clone(),
        })
    }
}

/// A congestion controller that steps aside once its connection is closing.
pub struct Gated {
    inner: Box<dyn Controller>,
    /// Builds a fresh `inner` when the connection's path changes (see [`path_changed`]).
    factory: Arc<dyn ControllerFactory + Send + Sync>,
    /// The current MTU, for a fresh controller.
    mtu: u16,
    /// Set by [`path_changed`]: start over at the next event that has a clock.
    restart: Arc<AtomicBool>,
    /// This connection is closing. Shared with the clones quinn hands out
    /// (`Connection::congestion_state`), which is how [`close`] reaches it.
    closing: Arc<AtomicBool>,
    node_closing: Arc<AtomicBool>,
}

impl Gated {
    /// The controller doing the work.
    pub fn inner(&self) -> &dyn Controller {
        self.inner.as_ref()
    }

    /// A path change was signalled: the old path's model (its bandwidth, its RTT, its
    /// window) says nothing about the new one, so start over, as on a new connection.
    fn restart_if_moved(&mut self, now: Instant) {
        if self.restart.swap(false, Ordering::Relaxed) {
            self.inner = self.factory.clone().build(now, self.mtu);
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed) || self.node_closing.load(Ordering::Relaxed)
    }
}

impl Controller for Gated {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.restart_if_moved(now);
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.restart_if_moved(now);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.restart_if_moved(now);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        if self.is_closing() {
            // Above u32::MAX quinn's pacer stands aside too.
            u64::MAX / 2
        } else {
            self.inner.window()
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Gated {
            inner: self.inner.clone_box(),
            factory: self.factory.clone(),
            mtu: self.mtu,
            closing: self.closing.clone(),
            restart: self.restart.clone(),
            node_closing: self.node_closing.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Tell `connection`'s congestion controller that its packets now take another path
/// (see [`crate::path`]): it starts over there, like a new connection's, at its next event.
/// Works on any connection; only those of a [`Node`](crate::node::Node) have the gate.
pub fn path_changed(connection: &quinn::Connection) {
    if let Ok(gated) = connection.congestion_state().into_any().downcast::<Gated>() {
        gated.restart.store(true, Ordering::Relaxed);
    }
}

/// Close `connection` with `code` and `reason`, making sure the close can leave even when
/// its congestion window is full (see the module docs). Works on any connection; the gate
/// only exists on those of a [`Node`](crate::node::Node).
pub fn close(connection: &quinn::Connection, code: quinn::VarInt, reason: &[u8]) {
    if let Ok(gated) = connection.congestion_state().into_any().downcast::<Gated>() {
        gated.closing.store(true, Ordering::Relaxed);
    }
    connection.close(code, reason);
}

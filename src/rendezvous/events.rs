//! What a rendezvous tells its operator (the CLI renders it as events).

use std::net::SocketAddr;

/// What a rendezvous tells its operator.
pub trait RendezvousEvents: Send + Sync + 'static {
    /// Two peers were paired on `nameplate`.
    fn paired(&self, _nameplate: &str, _receiver: SocketAddr, _sender: SocketAddr) {}
    /// The relay slot of the pair that met on `nameplate` ended, after relaying `bytes`
    /// (both directions): `why` is one of "a peer left", "lifetime ended", "quota used up",
    /// "idle" (nothing passed for [`RelayLimits::idle`](super::RelayLimits::idle)).
    fn relay_ended(&self, _nameplate: &str, _bytes: u64, _why: &str) {}
}

/// [`RendezvousEvents`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl RendezvousEvents for NoEvents {}

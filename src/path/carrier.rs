//! What a relay must provide to carry one peer's datagrams.
//!
//! A relayed path is not a socket address: the datagrams travel inside another connection
//! (QUIC DATAGRAM frames on the connection to the rendezvous, or length-prefixed frames on a
//! TLS/TCP stream). A [`Carrier`] is that connection as the path layer sees it: a way to send
//! one datagram, and how large a datagram fits. What comes back is handed to the path layer by
//! whoever reads the carrier (see [`super::socket::PathSocket`]).

use super::PathKind;

/// One relayed way to the peer.
///
/// `send` must never block and never queue without bound: a carrier that cannot take a
/// datagram now drops it (and says so with an error), as a congested UDP path would. QUIC's
/// own loss recovery and congestion control then do what they do on any lossy path.
pub trait Carrier: Send + Sync + std::fmt::Debug + 'static {
    /// The kind of path this carrier makes: [`PathKind::RelayedUdp`] or
    /// [`PathKind::RelayedTcp`].
    fn kind(&self) -> PathKind;

    /// Send one datagram (a QUIC packet or an authenticated probe) to the peer.
    fn send(&self, datagram: &[u8]) -> std::io::Result<()>;

    /// The largest datagram the carrier takes right now; 0 once it is closed. Larger QUIC
    /// packets are dropped (quinn's MTU black-hole detection then shrinks its packets).
    fn max_datagram(&self) -> usize;
}

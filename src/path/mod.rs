//! The path layer under quinn, shaped like iroh's magicsock.
//!
//! quinn sees one stable *mapped* address per peer (an address of a reserved range that
//! no real host has); this layer maps it onto whichever real path is best right now: the LAN,
//! a direct punched path on the node's socket, or a relay over UDP or TCP (a [`Carrier`]).
//! Packets are rewritten both ways, so a QUIC connection never learns that its path changed,
//! and never restarts because of it: `node` and `transfer` know nothing of paths.
//!
//! - [`chooser`]: the pure, sans-IO choice among a peer's paths (preference, liveness,
//!   latency, hysteresis), tested deterministically.
//! - [`carrier`]: what a relay must provide to carry a peer's datagrams.
//! - [`socket`]: [`PathSocket`], the quinn socket that does the mapping.
//! - [`peer`]: the driver of one peer's paths: it probes each path with authenticated
//!   probes, feeds the chooser, and moves the peer's route when the chooser says so.

pub mod carrier;
pub mod chooser;
pub mod peer;
pub mod socket;

pub use carrier::Carrier;
pub use chooser::{Chooser, ChooserConfig, PathId, Switch, SwitchReason};
pub use peer::{PathAdder, PathConfig, PathEvent, PeerPaths, Relayed};
pub use socket::{Attached, PathBytes, PathSocket, PathSocketStats, is_mapped};

/// How a packet reaches the peer. Ordered by preference, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    /// A direct path on the local network.
    Lan,
    /// A direct path across the internet (both NATs punched by probes).
    Direct,
    /// A direct path found by the birthday technique (a socket of its own on one side).
    Birthday,
    /// Relayed by the rendezvous, inside the peer's own QUIC connection to it (UDP).
    RelayedUdp,
    /// Relayed by the rendezvous over TLS on TCP (when UDP is blocked).
    RelayedTcp,
    /// Relayed by a TURN server (RFC 8656) over UDP, through both peers' allocations
    /// ([`crate::turn`]).
    Turn,
    /// Relayed by a TURN server reached over TCP (when UDP is blocked).
    TurnTcp,
}

impl PathKind {
    /// The name in events and on the command line: `lan`, `direct`, `birthday`, `relayed`,
    /// `relayed-tcp`, `turn`, `turn-tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Birthday => "birthday",
            PathKind::RelayedUdp => "relayed",
            PathKind::RelayedTcp => "relayed-tcp",
            PathKind::Turn => "turn",
            PathKind::TurnTcp => "turn-tcp",
        }
    }

    /// Preference class: lower is better. Direct and birthday paths are equally direct; a
    /// TURN server relaying UDP is as good a relay as our own over QUIC (latency decides
    /// between them), and both beat a relay over TCP.
    pub(crate) fn class(self) -> u8 {
        match self {
            PathKind::Lan => 0,
            PathKind::Direct | PathKind::Birthday => 1,
            PathKind::RelayedUdp | PathKind::Turn => 2,
            PathKind::RelayedTcp | PathKind::TurnTcp => 3,
        }
    }

    /// Every kind, best first.
    pub const ALL: [PathKind; 7] = [
        PathKind::Lan,
        PathKind::Direct,
        PathKind::Birthday,
        PathKind::RelayedUdp,
        PathKind::RelayedTcp,
        PathKind::Turn,
        PathKind::TurnTcp,
    ];

    /// Position in [`ALL`](Self::ALL) (for per-kind counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether packets on this path pass through a relay.
    pub fn is_relayed(self) -> bool {
        matches!(
            self,
            PathKind::RelayedUdp | PathKind::RelayedTcp | PathKind::Turn | PathKind::TurnTcp
        )
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

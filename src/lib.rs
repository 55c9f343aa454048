//! # qpunch
//!
//! Punch a hole through NATs and firewalls with a small UDP probe exchange, then hand the
//! *same* socket to a QUIC endpoint ([quinn]) so two peers get encrypted, reliable,
//! multiplexed streams straight across the traversed path.
//!
//! The layers, bottom up. A room imports only from the layers below it, never sideways
//! (`tests/layers.rs` holds the same list and fails on an import that runs up):
//! 1. Leaves: [`wire`] (the probe/reply datagram format), [`addr`], [`text`] (making
//!    peer-controlled text safe for terminals), [`home`] (where identity and config live),
//!    [`ratelimit`], [`nat`] (NAT behaviour types and their classification), [`bbr`] (our
//!    congestion controller, sans-IO core) and [`close_gate`].
//! 2. [`punch`] (the punch state machine, sans-IO: datagrams and time in, datagrams out),
//!    [`frame`] (length-prefixed JSON messages on QUIC streams), [`identity`] (who a peer
//!    is), [`congestion`] (the choice of controller), [`stun`] (the STUN wire format,
//!    which the socket's demultiplexer needs) and [`portmap`] (asking the router to
//!    forward our port: PCP, NAT-PMP, UPnP IGD).
//! 3. [`traverse`] (simultaneous punching between two NATed peers, sans-IO), [`socket`] (the
//!    one UDP socket, shared by probes and QUIC after hand-over), [`tls`] and
//!    [`known_peers`] (pinning a peer's identity).
//! 4. [`path`]: the path layer under quinn: one mapped address per peer, mapped onto
//!    direct and relayed paths, and the pure chooser among them.
//! 5. [`driver`]: the tokio loop that runs the state machines on a socket; [`tcp`]: the
//!    rendezvous over TLS on TCP, a carrier of QUIC datagrams for networks that block UDP;
//!    [`stun_client`]: STUN transactions on the node's socket; [`turn`]: a TURN client
//!    (RFC 8656) as one more relay carrier of the path layer.
//! 6. [`node`]: a QUIC endpoint on a punched socket: connect, accept, punch again.
//! 7. [`server`]: the accept loop of every listening peer: budgets, concurrent handshakes,
//!    shutdown and drain.
//! 8. [`transfer`] (verified file transfer on a connection) and [`rendezvous`] (the
//!    untrusted meeting point for two NATed peers: its protocol, its pairing book, its
//!    server and its client).
//! 9. [`natcheck`]: classifying our NAT's mapping and filtering against a rendezvous.
//! 10. [`meet`]: one-time codes and the PAKE, to find a peer through a rendezvous or on the
//!     LAN, then the punch.
//! 11. [`trust`]: whose key a sender expects at an address (trust on first use).
//! 12. [`share`]: the high-level API of `qpunch send` and `qpunch receive` (meeting,
//!     trust, consent, transfer and typed events), for apps that embed qpunch.
//! 13. [`version`]: the protocol versions this build speaks (what `qpunch --version`
//!     prints).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use qpunch::{identity::Identity, node::{self, NodeConfig}, punch::PunchConfig};
//! let config = NodeConfig::new(Identity::generate()?, b"my-app/1", false);
//! let peer = "198.51.100.7:9199".parse()?;
//! // Punch, then hand the same socket to QUIC.
//! let node::HandOver { node, punched, .. } =
//!     node::punch_and_hand_over(peer, config, PunchConfig::default()).await?;
//! let conn = node.connect(punched.peer, Some("…fingerprint…".parse()?)).await?;
//! let (mut send, _recv) = conn.connection.open_bi().await?;
//! send.write_all(b"hello").await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod addr;
pub mod bbr;
pub mod close_gate;
pub mod congestion;
pub mod driver;
mod durable;
pub mod frame;
pub mod home;
pub mod identity;
pub mod known_peers;
pub mod meet;
pub mod nat;
pub mod natcheck;
pub mod node;
pub mod path;
pub mod portmap;
pub mod punch;
pub mod ratelimit;
pub mod rendezvous;
pub mod server;
pub mod share;
pub mod socket;
pub mod stun;
pub mod stun_client;
pub mod tcp;
pub mod text;
pub mod tls;
pub mod transfer;
pub mod traverse;
pub mod trust;
pub mod turn;
pub mod version;
pub mod wire;

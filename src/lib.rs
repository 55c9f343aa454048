//! # qpunch
//!
//! Punch a hole through NATs and firewalls with a small UDP probe exchange, then hand the
//! *same* socket to a QUIC endpoint ([quinn]) so two peers get encrypted, reliable,
//! multiplexed streams straight across the traversed path.
//!
//! The layers, bottom up:
//! - [`wire`]: the probe/reply datagram format (sans-IO).
//! - [`punch`]: the punch state machine (sans-IO: datagrams and time in, datagrams out).
//! - [`socket`]: the one UDP socket, shared by probes and QUIC after hand-over;
//!   [`ratelimit`] rations its answers to strangers.
//! - [`driver`]: the tokio loop that runs the state machine on a socket.
//! - [`identity`], [`known_peers`], [`tls`]: who a peer is, and pinning it.
//! - [`traverse`]: simultaneous punching between two NATed peers (sans-IO).
//! - [`node`]: a QUIC endpoint on a punched socket: connect, accept, punch again.
//! - [`server`]: the accept loop of every listening peer: budgets, concurrent
//!   handshakes, shutdown and drain.
//! - [`transfer`]: verified file transfer on a connection.
//! - [`natcheck`]: classifying our NAT's mapping and filtering against a rendezvous.
//! - [`rendezvous`]: the untrusted meeting point for two NATed peers, and its client.
//! - [`frame`]: length-prefixed JSON control messages on QUIC streams.
//! - [`text`]: making peer-controlled text safe for terminals.
//! - [`meet`]: one-time codes and the PAKE, to find a peer through an untrusted rendezvous.
//! - [`trust`]: whose key a sender expects at an address (trust on first use).
//! - [`share`]: the high-level API of `qpunch send` and `qpunch receive` (meeting, trust,
//!   consent, transfer, typed events), for apps that embed qpunch.
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

pub mod bbr;
pub mod close_gate;
pub mod driver;
mod durable;
pub mod frame;
pub mod identity;
pub mod known_peers;
pub mod meet;
pub mod natcheck;
pub mod node;
pub mod punch;
pub mod ratelimit;
pub mod rendezvous;
pub mod server;
pub mod share;
pub mod socket;
pub mod text;
pub mod tls;
pub mod transfer;
pub mod traverse;
pub mod trust;
pub mod wire;

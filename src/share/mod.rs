//! Sharing files the way `qpunch send` and `qpunch receive` do, for apps that embed qpunch.
//!
//! The command line is one front end of this module: it parses arguments, calls
//! [`Share::send`] or [`Share::receive`], and renders the [`Event`]s. Another app gets the
//! same meeting (by address, by one-time code through a rendezvous, or by code on the
//! LAN), the same trust on first use ([`crate::trust`]), the same consent policy
//! ([`consent`]) and the same verified, resumable transfer, without rebuilding them
//! from the lower layers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use qpunch::identity::Identity;
//! use qpunch::share::{Event, ReceiveConfig, SendConfig, Share, Target};
//! // Print every event; a GUI would update its widgets instead.
//! let share = Share::new(Identity::generate()?, |event: Event| println!("{event:?}"));
//! // Receive into `inbox` until Ctrl-C, asking before taking files from anyone.
//! let mut config = ReceiveConfig::new("inbox");
//! config.accept = config.accept.ask_with(|_sender, files| vec![true; files.len()]);
//! # let receiving = share.receive(config, async { let _ = tokio::signal::ctrl_c().await; });
//! // Or send a file to a receiver's address (or its one-time code).
//! let files = qpunch::transfer::select(&["photo.jpg".into()])?;
//! let to = Target::parse("192.0.2.7:9199")?;
//! let sent = share.send(&to, files, &SendConfig::default(), std::future::pending()).await?;
//! println!("{} file(s) verified", sent.reports.iter().filter(|r| r.is_verified()).count());
//! # Ok(()) }
//! ```

pub mod consent;
mod events;
mod meeting;
mod net;
mod receive;
mod send;

use std::net::SocketAddr;
use std::sync::Arc;

pub use events::{Event, Events, FileEvent};
pub use net::{DEFAULT_PORT, bind_dual_stack, reachable_addrs, resolve_host, resolve_host_all};
pub use receive::ReceiveConfig;
pub use send::{SendConfig, Sent, Target};

use crate::addr::canonical;
use crate::identity::{Fingerprint, Identity, IdentityError};
use crate::known_peers::KnownPeersError;
use crate::meet::MeetError;
use crate::meet::lan::LanError;
use crate::node::NodeError;
use crate::rendezvous::ClientError;
use crate::transfer::TransferError;
use crate::trust::TrustError;

/// A port mapper's notices as [`Event`]s: the mapping itself, or a warning.
fn port_notices(events: Arc<dyn Events>) -> crate::portmap::OnNotice {
    use crate::portmap::Notice;
    Arc::new(move |notice| {
        events.event(match notice {
            Notice::Mapped(mapped) => Event::PortMapped(mapped),
            Notice::Ignored { protocol, reason } => {
                Event::Warning(format!("ignored the router's {protocol} answer: {reason}"))
            }
            // The gateway's own words may be in it: escaped, as all text from the network.
            Notice::Lost { reason } => Event::Warning(format!(
                "the router's port mapping could not be renewed and is no longer offered: {}",
                crate::text::peer(&reason)
            )),
        })
    })
}

/// One identity and one place to report to: the two things every send and receive of an
/// app share.
#[derive(Clone)]
pub struct Share {
    identity: Identity,
    events: Arc<dyn Events>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("fingerprint", &self.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Share {
    /// Send and receive as `identity`, telling `events` what happens (a closure taking an
    /// [`Event`], or an `mpsc::UnboundedSender<Event>` for a stream of them).
    pub fn new(identity: Identity, events: impl Events + 'static) -> Self {
        Share {
            identity,
            events: Arc::new(events),
        }
    }

    /// This side's fingerprint, for a receiver to show its senders.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Like [`new`](Self::new), with events that the caller keeps a handle on too.
    pub fn with_events(identity: Identity, events: Arc<dyn Events>) -> Self {
        Share { identity, events }
    }

    fn emit(&self, event: Event) {
        self.events.event(event);
    }
}

/// Why a send or a receive failed. Messages read as sentences for the user; peer-chosen
/// text in them is escaped (see [`crate::text`]).
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A host name did not resolve.
    #[error("cannot resolve {name}")]
    Resolve {
        /// The name with its port.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// A host name resolved to nothing.
    #[error("{name} has no address")]
    NoAddress {
        /// The name with its port.
        name: String,
    },
    /// The local socket or endpoint failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A local socket could not be bound.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The qpunch home (identity, known_peers) is unusable.
    #[error(transparent)]
    Home(#[from] IdentityError),
    /// known_peers could not be read.
    #[error(transparent)]
    KnownPeers(#[from] KnownPeersError),
    /// Nothing answered the probes.
    #[error("no answer from {target}: is `qpunch receive` running there, and UDP open?")]
    NoAnswer {
        /// Where the probes went.
        target: SocketAddr,
        /// What punching saw.
        source: NodeError,
    },
    /// The trust policy refused the peer; nothing was sent.
    #[error(transparent)]
    Trust(TrustError),
    /// The peer answered like the Go hole-punching demo and cannot take files.
    #[error(
        "{peer} answered like the Go hole-punching demo (a plain \"{}\") but does not speak \
         QUIC/qpunch ({why}). The UDP path is open, yet nothing there can receive files: \
         run `qpunch receive` on that machine",
        crate::wire::REPLY_GREETING
    )]
    NotQpunch {
        /// Who answered.
        peer: SocketAddr,
        /// What QUIC saw.
        why: String,
    },
    /// The QUIC handshake failed.
    #[error("QUIC connection to {peer} failed")]
    Connect {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        source: NodeError,
    },
    /// The rendezvous could not be used.
    #[error("cannot use the rendezvous {name}")]
    Rendezvous {
        /// As configured.
        name: String,
        /// Why.
        source: ClientError,
    },
    /// The rendezvous connection failed while serving codes.
    #[error(transparent)]
    RendezvousLost(ClientError),
    /// Checking our NAT through the rendezvous failed.
    #[error("NAT check against {name} failed")]
    NatCheck {
        /// The rendezvous.
        name: String,
        /// Why.
        source: ClientError,
    },
    /// The meeting by code failed.
    #[error("could not meet the receiver of {code}")]
    Meet {
        /// The code.
        code: String,
        /// Why.
        source: MeetError,
    },
    /// The meeting by code on the LAN failed.
    #[error("could not meet the receiver of {code}")]
    MeetOnLan {
        /// The code.
        code: String,
        /// Why.
        source: LanError,
    },
    /// mDNS could not start.
    #[error("cannot {what} on the local network")]
    Lan {
        /// What it was for.
        what: &'static str,
        /// Why.
        source: LanError,
    },
    /// The transfer failed as a whole (per-file failures are in the reports).
    #[error("{0}")]
    Transfer(TransferError),
    /// The send was cancelled; what arrived is kept at the receiver for a resume.
    #[error("interrupted")]
    Interrupted,
    /// A code was chosen but there is nowhere to meet with it: no rendezvous, and bound
    /// to loopback (no LAN to announce it on).
    #[error("a code needs a rendezvous or a LAN address to listen on")]
    CodeNeedsNetwork,
    /// See [`consent::NobodyToAsk`].
    #[error(transparent)]
    NobodyToAsk(#[from] consent::NobodyToAsk),
}

/// An error and its causes on one line, like `{:#}` of anyhow, but without repeating a
/// cause that an outer message already quotes (errors often show their source inline too).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

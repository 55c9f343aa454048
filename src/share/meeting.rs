//! Meeting by code through a rendezvous: connecting to it with a NAT check, and the
//! meeting's progress as [`Event`]s.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Event, Events, ShareError, canonical, resolve_host};
use crate::meet::MeetEvents;
use crate::meet::code::{Code, Nameplate};
use crate::meet::pake::Hello;
use crate::natcheck::{self, NatReport};
use crate::node::Node;
use crate::path::PathKind;
use crate::rendezvous::{self, RendezvousClient};
use crate::traverse::Path;

/// Connect `node` to the rendezvous `name` (HOST or HOST:PORT) and check our NAT's
/// mapping through it (the filtering test would cost a second, and only the mapping
/// decides how to punch); the [`Event::Nat`] is emitted.
pub(super) async fn connect(
    events: &dyn Events,
    node: &Node,
    name: &str,
    options: rendezvous::ConnectOptions,
) -> Result<(RendezvousClient, NatReport), ShareError> {
    let (_, addr) = resolve_host(name, rendezvous::DEFAULT_PORT).await?;
    connect_to(events, node, name, addr, options).await
}

/// [`connect`] to `name` already resolved to `addr`.
pub(super) async fn connect_to(
    events: &dyn Events,
    node: &Node,
    name: &str,
    addr: SocketAddr,
    options: rendezvous::ConnectOptions,
) -> Result<(RendezvousClient, NatReport), ShareError> {
    let client = RendezvousClient::connect_with(node, addr, options)
        .await
        .map_err(|source| ShareError::Rendezvous {
            name: name.to_string(),
            source,
        })?;
    if client.transport() == rendezvous::Transport::Tcp {
        events.event(Event::RendezvousOverTcp {
            via: name.to_string(),
            tcp_port: options.tcp_port.unwrap_or(addr.port()),
        });
    }
    let report = natcheck::check_mapping(node, &client)
        .await
        .map_err(|source| ShareError::NatCheck {
            name: name.to_string(),
            source,
        })?;
    events.event(Event::Nat(report.clone()));
    Ok((client, report))
}

/// A receiver's announcement of each new code.
pub(super) type Announce = Box<dyn Fn(&Code, Duration) + Send + Sync>;

/// A meeting's [`MeetEvents`] as [`Event`]s.
pub(super) struct Meeting {
    pub(super) events: Arc<dyn Events>,
    /// Receiver: how to announce each new code.
    pub(super) announce: Option<Announce>,
    /// The nameplate of the pairing in progress, completed by the peer's hello into one
    /// `Matched` event.
    pairing: Mutex<Option<String>>,
    /// A pairing was made and its peer's hello has not (yet) opened under our keys.
    unproven: std::sync::atomic::AtomicBool,
    /// The last code announced, until a pairing spends it: what a receiver re-registers
    /// when its rendezvous restarts.
    unspent: Mutex<Option<Code>>,
}

impl Meeting {
    pub(super) fn new(events: Arc<dyn Events>, announce: Option<Announce>) -> Self {
        Meeting {
            events,
            announce,
            pairing: Mutex::new(None),
            unproven: std::sync::atomic::AtomicBool::new(false),
            unspent: Mutex::new(None),
        }
    }

    /// The code announced last, if no pairing has spent it yet (cleared by the call).
    pub(super) fn take_unspent_code(&self) -> Option<Code> {
        self.unspent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Whether the last pairing ended without its peer proving the code (its hello never
    /// opened): then it was given a guess. Resets for the next pairing.
    pub(super) fn take_unproven_pairing(&self) -> bool {
        self.unproven
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

impl MeetEvents for Meeting {
    fn code(&self, code: &Code, expires: Duration) {
        *self.unspent.lock().unwrap_or_else(|e| e.into_inner()) = Some(code.clone());
        if let Some(announce) = &self.announce {
            announce(code, expires);
        }
    }

    fn paired(&self, nameplate: &Nameplate) {
        self.unspent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.unproven
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let nameplate = nameplate.to_string();
        *self.pairing.lock().unwrap_or_else(|e| e.into_inner()) = Some(nameplate.clone());
        self.events.event(Event::Pairing { nameplate });
    }

    fn hello(&self, hello: &Hello) {
        self.unproven
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let nameplate = self
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        // The peer's public address is its last candidate (the one the rendezvous saw,
        // sealed by the peer itself).
        let peer = hello
            .candidates
            .last()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |&c| canonical(c));
        self.events.event(Event::Matched {
            nameplate,
            peer,
            candidates: hello.candidates.clone(),
            peer_nat: crate::meet::candidates::nat_of(hello).0,
        });
    }

    fn warning(&self, message: &str) {
        self.events.event(Event::Warning(message.to_string()));
    }

    fn punched(&self, path: &Path, method: PathKind) {
        self.events.event(Event::PathFound {
            peer: path.peer,
            reflexive: path.reflexive,
            rtt: path.rtt,
            method,
        });
    }
}

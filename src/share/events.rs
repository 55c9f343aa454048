//! What a send or a receive tells its front end, as typed events.
//!
//! Events carry facts, not sentences: the command line renders them into its human lines
//! and `--json` objects, an app into whatever it shows. They are delivered on the task
//! that produced them, in the order things happened, so a handler must not block for
//! long (progress events come many times a second per transfer).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::Fingerprint;
use crate::meet::code::Code;
use crate::meet::lan::LanStats;
use crate::natcheck::{Mapping, NatReport};
use crate::path::{PathKind, SwitchReason};
use crate::punch::Punched;
use crate::server::ServerStats;
use crate::socket::SocketStats;
use crate::transfer::{FileReport, Observer};

/// Receives a send's or a receive's [`Event`]s.
pub trait Events: Send + Sync {
    /// One event. Events of one connection come in order, but the files of a
    /// connection (and several connections) may report from several tasks at once.
    fn event(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> Events for F {
    fn event(&self, event: Event) {
        self(event)
    }
}

/// A stream of events: read them from the channel's receiver.
impl Events for tokio::sync::mpsc::UnboundedSender<Event> {
    fn event(&self, event: Event) {
        let _ = self.send(event);
    }
}

/// Something that happened. Addresses are shown as IPv4 where they are IPv4-mapped.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Something left out or surprising (a skipped line of known_peers).
    Warning(String),
    /// Something failed, and the receiver goes on (an mDNS announcement, one meeting).
    Error(String),
    /// Sender: probing the receiver's address.
    Punching {
        /// Where the probes go.
        target: SocketAddr,
    },
    /// Sender: the probe exchange proved a path; `from` is our socket while punching,
    /// which the QUIC connection keeps.
    Punched {
        /// What the exchange found.
        punched: Punched,
        /// Our socket's address.
        from: SocketAddr,
    },
    /// Sender: nothing was pinned for `key`, so the key that answered at `addr` is now
    /// trusted and remembered in `known_peers`.
    TrustedOnFirstUse {
        /// The name as the user typed it.
        key: String,
        /// The key trusted.
        fingerprint: Fingerprint,
        /// The address dialled.
        addr: SocketAddr,
        /// The file that remembers it.
        known_peers: PathBuf,
    },
    /// Our NAT, checked against the rendezvous before meeting by code.
    Nat(NatReport),
    /// The rendezvous `via` was reached over TLS on TCP: UDP does not get through from
    /// here (or `--rendezvous-tcp only` was asked), so no direct path can be punched.
    RendezvousOverTcp {
        /// The rendezvous, as named.
        via: String,
        /// Its TCP port.
        tcp_port: u16,
    },
    /// Sender: meeting the receiver of `code` through the rendezvous `via`, or on the LAN
    /// when `via` is `None`.
    Meeting {
        /// The code.
        code: Code,
        /// The rendezvous.
        via: Option<String>,
    },
    /// Sender: the receiver's announcement of the nameplate was found on the LAN and the
    /// code matched.
    Found {
        /// The nameplate.
        nameplate: String,
        /// The addresses announced for it.
        addrs: Vec<SocketAddr>,
    },
    /// The rendezvous paired us with a peer; the sealed hellos are swapped next (the peer's
    /// address travels only inside its hello).
    Pairing {
        /// The nameplate.
        nameplate: String,
    },
    /// The code matched: the peer's sealed hello opened.
    Matched {
        /// The nameplate.
        nameplate: String,
        /// The peer's public address, as its sealed hello gives it (its last candidate).
        peer: SocketAddr,
        /// The addresses it offers.
        candidates: Vec<SocketAddr>,
        /// Its NAT's mapping behaviour.
        peer_nat: Mapping,
    },
    /// A meeting's probes found a path.
    PathFound {
        /// The peer's address on it.
        peer: SocketAddr,
        /// How the peer sees us.
        reflexive: SocketAddr,
        /// Round-trip time of the probe.
        rtt: Duration,
        /// `direct`, `lan` or `birthday`.
        method: PathKind,
    },
    /// The connection to a peer met by code moved to another path (or took its first).
    PathChanged {
        /// The kind of path now used.
        path: PathKind,
        /// The kind used before.
        from: Option<PathKind>,
        /// Why.
        reason: SwitchReason,
        /// The new path's round-trip time, as its probes measured it.
        rtt: Option<Duration>,
    },
    /// An authenticated QUIC connection is up. `conn` names it in later events.
    Connected {
        /// The connection's id.
        conn: usize,
        /// The peer's address.
        peer: SocketAddr,
        /// The key it proved.
        fingerprint: Fingerprint,
        /// The path it starts on: [`PathKind::Direct`], [`PathKind::Lan`] (a birthday
        /// path is direct), [`PathKind::RelayedUdp`] or [`PathKind::RelayedTcp`]; later
        /// moves come as [`Event::PathChanged`].
        path: PathKind,
        /// Our socket's address.
        local: SocketAddr,
        /// The direct path runs through a port a router forwards (ours or the peer's, see
        /// [`crate::portmap`]): the peer's mapped address answered, or we hold a mapping
        /// and the path is direct across the internet.
        port_mapped: bool,
    },
    /// Our router forwards a public port to our socket (PCP, NAT-PMP or UPnP IGD); it is
    /// offered to peers met by code and deleted when we stop. A renewal that moved it
    /// comes again.
    PortMapped(crate::portmap::Mapped),
    /// How the files of connection `conn` move.
    File {
        /// The connection's id.
        conn: usize,
        /// What happened.
        event: FileEvent,
    },
    /// Receiver: ready; senders reach it at `addrs` (every interface's for a wildcard
    /// bind) with the fingerprint pinned.
    Listening {
        /// Our socket.
        local: SocketAddr,
        /// Addresses to give senders.
        addrs: Vec<SocketAddr>,
        /// Our key.
        fingerprint: Fingerprint,
        /// Where files go.
        out_dir: PathBuf,
    },
    /// Receiver: a one-time code to pass on, valid for `expires`, for one sender through
    /// the rendezvous `via` (or on the LAN when `None`).
    Code {
        /// The code.
        code: Code,
        /// How long it stays valid.
        expires: Duration,
        /// The rendezvous.
        via: Option<String>,
        /// Our socket.
        local: SocketAddr,
        /// Our addresses.
        addrs: Vec<SocketAddr>,
        /// Our key.
        fingerprint: Fingerprint,
        /// Where files go.
        out_dir: PathBuf,
    },
    /// Receiver: the code expired unused; a new `Code` follows.
    CodeExpired,
    /// Receiver: this many senders paired on our codes in the last `window` without
    /// knowing them (each had one guess): no new code for `resume_in`, so that guessers,
    /// however many addresses they use, get at most [`crate::meet::guesses::MAX_GUESSES`]
    /// tries in any `window`.
    CodesPaused {
        /// Guesses given away in the window.
        guesses: usize,
        /// The window.
        window: Duration,
        /// How long until a new code.
        resume_in: Duration,
    },
    /// Receiver: `sender` at `remote` proved the LAN code `code`.
    CodeUsed {
        /// Its key (it now holds a ticket).
        sender: Fingerprint,
        /// Its address.
        remote: SocketAddr,
        /// The code.
        code: Code,
    },
    /// Receiver: someone at `remote` tried a wrong LAN code; `code` is burned. After
    /// `max` wrong codes (`wrong == max`) no more codes are offered.
    CodeBurned {
        /// Its address.
        remote: SocketAddr,
        /// The burned code.
        code: Code,
        /// Wrong codes so far.
        wrong: u32,
        /// The limit.
        max: u32,
    },
    /// Receiver: a meeting by code failed; the next code follows.
    MeetingFailed(String),
    /// Receiver: the rendezvous went away (`error`); it is tried again in `retry_in`.
    RendezvousLost {
        /// The rendezvous.
        via: String,
        /// What failed, with its causes.
        error: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// Receiver: a sender's batch ended, with every file's report or what failed.
    Finished {
        /// The connection's id.
        conn: usize,
        /// The sender.
        fingerprint: Fingerprint,
        /// The reports, or the connection-level failure.
        result: Result<Vec<FileReport>, String>,
    },
    /// Receiver: counters at exit.
    Stats {
        /// The socket's.
        socket: SocketStats,
        /// The accept loop's.
        server: Option<ServerStats>,
        /// Codes offered on the LAN.
        lan: Option<LanStats>,
    },
}

/// How one connection's files move (the [`Observer`] calls, as values).
#[derive(Debug, Clone)]
pub enum FileEvent {
    /// A file is hashed before it is offered (large files take a moment).
    Hashing {
        /// Its id on the connection.
        id: u32,
        /// Its name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// `files` files of `bytes` bytes will move (or resume).
    Batch {
        /// How many.
        files: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// A file's bytes start to move.
    Started {
        /// Its id.
        id: u32,
        /// Its name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// `bytes` of the file were already at the receiver (a resume).
    Skipped {
        /// Its id.
        id: u32,
        /// How many.
        bytes: u64,
    },
    /// `bytes` more bytes of the file moved.
    Progress {
        /// Its id.
        id: u32,
        /// How many.
        bytes: u64,
    },
    /// A file ended: verified, declined or failed.
    Finished(FileReport),
    /// A text arrived, verified (the sender's words, unescaped).
    Text {
        /// Its id.
        id: u32,
        /// The text.
        text: String,
    },
}

impl FileEvent {
    /// Replay the event on an [`Observer`] (a progress display written for one).
    pub fn replay(self, observer: &dyn Observer) {
        match self {
            FileEvent::Hashing { id, name, size } => observer.hashing(id, &name, size),
            FileEvent::Batch { files, bytes } => observer.batch(files, bytes),
            FileEvent::Started { id, name, size } => observer.started(id, &name, size),
            FileEvent::Skipped { id, bytes } => observer.skipped(id, bytes),
            FileEvent::Progress { id, bytes } => observer.progress(id, bytes),
            FileEvent::Finished(report) => observer.finished(&report),
            FileEvent::Text { id, text } => observer.text(id, &text),
        }
    }
}

/// An [`Observer`] that turns one connection's calls into [`Event::File`]s.
pub(super) struct FileEvents {
    pub(super) conn: usize,
    pub(super) events: std::sync::Arc<dyn Events>,
}

impl FileEvents {
    fn emit(&self, event: FileEvent) {
        self.events.event(Event::File {
            conn: self.conn,
            event,
        });
    }
}

impl Observer for FileEvents {
    fn hashing(&self, id: u32, name: &str, size: u64) {
        let name = name.to_string();
        self.emit(FileEvent::Hashing { id, name, size });
    }
    fn started(&self, id: u32, name: &str, size: u64) {
        let name = name.to_string();
        self.emit(FileEvent::Started { id, name, size });
    }
    fn progress(&self, id: u32, bytes: u64) {
        self.emit(FileEvent::Progress { id, bytes });
    }
    fn finished(&self, report: &FileReport) {
        self.emit(FileEvent::Finished(report.clone()));
    }
    fn batch(&self, files: u64, bytes: u64) {
        self.emit(FileEvent::Batch { files, bytes });
    }
    fn skipped(&self, id: u32, bytes: u64) {
        self.emit(FileEvent::Skipped { id, bytes });
    }
    fn text(&self, id: u32, text: &str) {
        let text = text.to_string();
        self.emit(FileEvent::Text { id, text });
    }
}

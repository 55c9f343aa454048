//! Meeting by code with no server at all: two peers on one network find each other by
//! multicast DNS (mDNS, RFC 6762, with DNS-SD, RFC 6763), then prove the code to each other
//! over the direct QUIC connection itself. Two laptops on one Wi-Fi need no rendezvous and
//! no internet.
//!
//! ```text
//! receiver (printed 7-clockwork-crossover)                  sender (typed it in)
//!  announce _qpunch._udp.local.  ◀──────────────────────────  browse: who has nameplate 7?
//!   instance "qpunch-7-…", TXT v=1 np=7, port, addresses ───▶  found (and 300 ms for rivals)
//!  ◀════ QUIC + TLS 1.3, ALPN qpunch-meet/1, unpinned (no key is known yet) ═════
//!  ◀── SPAKE2 message ──────────────────────────────────────── Pake::start(code, Sender)
//!  ── SPAKE2 message ─────────────────────────────────────────▶
//!  ◀── bind tag over the TLS fingerprints the sender sees ────
//!  takes the code (one try), checks the tag, admits the sender (a ticket)
//!  ── bind tag over the TLS fingerprints the receiver sees ──▶ checks it
//!  ◀════ the same connection: manifest, files (the qpunch-files/1 protocol) ══════
//! ```
//!
//! **Why a separate ALPN.** The receiver offers `qpunch-meet/1` next to the files ALPN, and
//! a sender holding a code asks for it. The protocol is then fixed at the handshake: the
//! receiver knows before reading a byte that this connection must prove a code first (a
//! files connection never sees a meet stream, a meet connection never reaches the files
//! protocol unproven), a receiver without an open code or an old qpunch refuses it cleanly
//! (no common ALPN, or [`codes::NO_CODE`]), and a change to the exchange is a new ALPN.
//! After the exchange the connection speaks the files protocol unchanged, so the sender's
//! manifest arrives on the connection that proved the code: "meet, then files".
//!
//! **Why the fingerprints are bound.** Neither side knows the other's key, so the TLS
//! handshake pins nothing, and someone on the LAN could splice two connections, relaying
//! the PAKE messages unchanged (then both sides derive the same keys). The bind tags
//! ([`SessionKeys::bind`]/[`SessionKeys::confirm`]) cover the fingerprints each side
//! *sees*, which differ across a splice, and can only be made with the code.
//!
//! **Hostile LAN peers.** Anyone on the network can browse the announcement and connect.
//! - *A guess costs the code.* The receiver checks exactly one tag per code: the first tag
//!   to arrive takes the code out ([`Desk`]), right or wrong; a wrong one burns it (the
//!   announcement is withdrawn, a new code is made) and costs the guesser its one chance
//!   in 65 536.
//! - *The sender shows its tag first.* A receiver's tag would let whoever holds it test
//!   their one guess offline, so the receiver sends it only after the sender's checked
//!   out. A connection that stalls, or leaves after the PAKE messages, has learned nothing
//!   and so does not use up the code, and nobody can hold the code hostage: exchanges run
//!   in parallel, and only the tag check is exclusive.
//! - *Impostors make the sender refuse, not guess.* The sender connects to every address
//!   announced for the nameplate, and if more than one identity answers it refuses
//!   ([`LanError::Ambiguous`]) before any PAKE: a peer announcing the same nameplate next
//!   to the receiver gets no guess against the sender's code. (One that can also silence
//!   the receiver, by spoofing ARP say, gets the single guess a code allows.)
//! - *Strangers stay guarded.* Meet connections come through the same
//!   [`crate::server::Server`] budgets as any other, run on the guarded windows (the files
//!   protocol opens them only after the manifest), read fixed-size messages only, and
//!   must finish within [`EXCHANGE_TIMEOUT`].
//! - *What a LAN peer says is checked or escaped.* Announcements are parsed strictly (a
//!   nameplate that is not `a-z0-9`, another version, no usable address: ignored and
//!   counted), and close reasons are escaped before they reach an error message.
//!
//! **What is announced.** The nameplate, the protocol version, a port and addresses. No
//! fingerprint (a long-lived identity broadcast to everyone would let any observer follow
//! the machine from network to network), and a random host name, not the machine's.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use rand::RngExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::candidates::Interface;
use super::code::{Code, Nameplate};
use super::pake::{self, BIND_TAG_LEN, PAKE_MSG_LEN, Pake, PakeError, Role, SessionKeys};
use crate::identity::Fingerprint;
use crate::node::{Node, NodeError, PeerConnection};
use crate::server::{Service, Shutdown};

/// The DNS-SD service type receivers announce.
pub const SERVICE_TYPE: &str = "_qpunch._udp.local.";
/// The ALPN of a connection that proves a code, then carries the files protocol.
pub const ALPN: &[u8] = b"qpunch-meet/1";
/// TXT key of the meet protocol version ([`pake::VERSION`]).
pub const TXT_VERSION: &str = "v";
/// TXT key of the nameplate.
pub const TXT_NAMEPLATE: &str = "np";
/// How long a sender looks for the receiver by default.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(5);
/// After the first announcement (or answer) for a nameplate, how long to wait for rivals.
pub const SETTLE: Duration = Duration::from_millis(300);
/// How long one connection attempt to an announced address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole exchange on a meet connection (both PAKE messages and both tags).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most addresses a sender tries (and keeps per announcement).
pub const MAX_ADDRESSES: usize = 8;
/// Most announcements of one nameplate a sender keeps (one is the normal case).
pub const MAX_INSTANCES: usize = 16;
/// How long the ticket of a sender that proved the code lasts: it is used on the same
/// connection right away.
pub const ADMIT_TTL: Duration = Duration::from_secs(60);
/// Codes a long-running receiver should let be burned before it stops making new ones:
/// each wrong tag is one guess in 65 536, and a receiver that made codes forever would
/// give a patient guesser on the LAN as many guesses as it liked.
pub const MAX_WRONG_CODES: u32 = 3;
/// LAN nameplates are numbers below this: no allocator hands them out, so they are
/// random, and three digits keep a clash between two receivers on one network rare.
pub const NAMEPLATES: u32 = 1000;

/// QUIC application error codes of a meet connection (distinct from
/// [`crate::transfer::codes`], which the same connection uses afterwards).
pub mod codes {
    /// The receiver has no open code (used, expired, or replaced): nothing was guessed.
    pub const NO_CODE: u32 = 16;
    /// The tag did not check out: the code is burned.
    pub const WRONG_CODE: u32 = 17;
    /// A malformed message, another version, or a stall.
    pub const PROTOCOL: u32 = 18;
    /// The sender saw more than one identity answer for the nameplate.
    pub const AMBIGUOUS: u32 = 19;
}

/// A fresh random LAN nameplate (`1` to `999`).
pub fn random_nameplate() -> Nameplate {
    Nameplate::from(rand::rng().random_range(1..NAMEPLATES))
}

/// Why a LAN meeting failed. Messages are for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum LanError {
    /// The mDNS responder could not start or was refused an operation.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// Nobody announced the nameplate in time.
    #[error(
        "no receiver on this network announces nameplate {nameplate} (looked for {} s): is \
         `qpunch receive` running on this network, without a rendezvous? (codes made through \
         a rendezvous need --via)",
        .waited.as_secs_f64()
    )]
    NotFound {
        /// The nameplate looked for.
        nameplate: Nameplate,
        /// How long.
        waited: Duration,
    },
    /// More than one identity answered for the nameplate: two receivers picked the same
    /// one, or someone is impersonating the receiver. No guess was made.
    #[error(
        "{identities} different machines on this network answer for nameplate {nameplate}: \
         two receivers chose the same one, or someone is impersonating the receiver. \
         Nothing was sent and the code was not tried: ask for a new code"
    )]
    Ambiguous {
        /// The nameplate.
        nameplate: Nameplate,
        /// How many distinct identities answered.
        identities: usize,
    },
    /// No announced address answered a QUIC handshake.
    #[error("the receiver announced {tried:?} but none answered: {last}")]
    Unreachable {
        /// The addresses tried.
        tried: Vec<SocketAddr>,
        /// The last failure (escaped).
        last: String,
    },
    /// The tags did not check out: a mistyped code, a guess, or a spliced connection.
    #[error(
        "the code did not match: it was mistyped, or someone tampered with the connection. \
         It cannot be used again: ask for a new code"
    )]
    WrongCode,
    /// The receiver has no open code (it was used, or expired, or is being replaced).
    #[error("the receiver has no open code any more (used, or expired): ask for a new code")]
    NoCode,
    /// The exchange did not finish in time.
    #[error("the receiver did not finish the code exchange within {0:?}")]
    Timeout(Duration),
    /// The peer broke the meet protocol (its words, escaped).
    #[error("meeting protocol: {}", crate::text::peer(.0))]
    Protocol(String),
    /// The PAKE refused the peer's message (another version, or not a SPAKE2 message).
    #[error("meeting protocol: {0}")]
    Pake(PakeError),
    /// Sockets or QUIC failed.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<mdns_sd::Error> for LanError {
    fn from(e: mdns_sd::Error) -> Self {
        LanError::Mdns(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Announcements (sans-IO)
// ---------------------------------------------------------------------------------------

/// One receiver's announcement, as a sender read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The DNS-SD instance's full name (peer-chosen text: escape before showing).
    pub instance: String,
    /// The nameplate it announces.
    pub nameplate: Nameplate,
    /// The receiver's addresses, usable ones only, our own networks first.
    pub addrs: Vec<SocketAddr>,
}

/// Why an announcement is ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnnouncement {
    /// No `v`, or not the version we speak.
    #[error("meet protocol version {0:?}")]
    Version(Option<String>),
    /// No `np`, or not a nameplate.
    #[error("no valid nameplate")]
    Nameplate,
    /// Port 0.
    #[error("no port")]
    Port,
    /// No address we could connect to.
    #[error("no usable address")]
    NoAddress,
}

/// The TXT properties of an announcement for `nameplate`.
pub fn txt(nameplate: &Nameplate) -> Vec<(&'static str, String)> {
    vec![
        (TXT_VERSION, pake::VERSION.to_string()),
        (TXT_NAMEPLATE, nameplate.to_string()),
    ]
}

/// Read an announcement: its instance name, port, addresses, and the raw values of its
/// `v` and `np` TXT properties (`None` when absent). Strict: anything off is refused.
/// Addresses keep their order; [`Sightings`] ranks them.
pub fn read_announcement(
    instance: &str,
    port: u16,
    ips: impl IntoIterator<Item = IpAddr>,
    version: Option<&[u8]>,
    nameplate: Option<&[u8]>,
) -> Result<Announced, BadAnnouncement> {
    fn text(bytes: Option<&[u8]>) -> Option<&str> {
        std::str::from_utf8(bytes?).ok()
    }
    if text(version) != Some(pake::VERSION.to_string().as_str()) {
        let shown = version.map(|v| crate::text::peer_bytes(&v[..v.len().min(16)]));
        return Err(BadAnnouncement::Version(shown));
    }
    let nameplate: Nameplate = text(nameplate)
        .and_then(|np| np.parse().ok())
        .ok_or(BadAnnouncement::Nameplate)?;
    if port == 0 {
        return Err(BadAnnouncement::Port);
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for ip in ips {
        let addr = SocketAddr::new(ip.to_canonical(), port);
        if usable(addr.ip()) && !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(BadAnnouncement::NoAddress);
    }
    Ok(Announced {
        instance: instance.to_string(),
        nameplate,
        addrs,
    })
}

/// An address a sender can connect to without more context: not unspecified, multicast or
/// broadcast, and not IPv6 link-local (which needs an interface scope the announcement
/// does not carry in a form a socket address can use portably).
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Our own networks first (the path the announcement itself came over), then IPv4, then
/// the rest; loopback last.
fn rank(addrs: &mut [SocketAddr], ours: &[Interface]) {
    addrs.sort_by_key(|a| {
        let lan = super::candidates::kind_of(*a, ours) == crate::traverse::Kind::Lan;
        (a.ip().is_loopback(), !lan, a.is_ipv6())
    });
}

/// What a sender has seen while browsing for one nameplate: every matching announcement
/// (merged by instance, at most [`MAX_INSTANCES`]), and counts of the rest.
#[derive(Debug, Clone)]
pub struct Sightings {
    wanted: Nameplate,
    ours: Vec<Interface>,
    found: Vec<Announced>,
    first: Option<Instant>,
    /// Announcements for other nameplates.
    pub others: u64,
    /// Announcements refused by [`read_announcement`].
    pub ignored: u64,
}

impl Sightings {
    /// Looking for `wanted` from a machine with interfaces `ours` (which rank addresses:
    /// see [`super::candidates::interfaces`]).
    pub fn new(wanted: Nameplate, ours: Vec<Interface>) -> Self {
        Sightings {
            wanted,
            ours,
            found: Vec::new(),
            first: None,
            others: 0,
            ignored: 0,
        }
    }

    /// One announcement read at `now`.
    pub fn see(&mut self, now: Instant, read: Result<Announced, BadAnnouncement>) {
        match read {
            Err(bad) => {
                self.ignored += 1;
                tracing::debug!("ignored a LAN announcement: {bad}");
            }
            Ok(seen) if seen.nameplate != self.wanted => self.others += 1,
            Ok(mut seen) => {
                self.first.get_or_insert(now);
                let full = self.found.len() >= MAX_INSTANCES;
                match self.found.iter_mut().find(|a| a.instance == seen.instance) {
                    // An update (mDNS sends addresses as it learns them): merge.
                    Some(known) => {
                        for addr in seen.addrs {
                            if !known.addrs.contains(&addr) && known.addrs.len() < MAX_ADDRESSES {
                                known.addrs.push(addr);
                            }
                        }
                        rank(&mut known.addrs, &self.ours);
                    }
                    // More than one is already ambiguous: a flood needs no memory.
                    None if full => self.ignored += 1,
                    None => {
                        seen.addrs.truncate(MAX_ADDRESSES);
                        rank(&mut seen.addrs, &self.ours);
                        self.found.push(seen);
                    }
                }
            }
        }
    }

    /// When to stop browsing: `deadline`, or [`SETTLE`] after the first match.
    pub fn until(&self, deadline: Instant) -> Instant {
        self.first
            .map_or(deadline, |first| (first + SETTLE).min(deadline))
    }

    /// The matching announcements.
    pub fn found(&self) -> &[Announced] {
        &self.found
    }

    /// Every address of every matching announcement, at most [`MAX_ADDRESSES`], each
    /// announcement's best first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = Vec::new();
        let longest = self.found.iter().map(|a| a.addrs.len()).max().unwrap_or(0);
        for i in 0..longest {
            for announced in &self.found {
                if let Some(&addr) = announced.addrs.get(i)
                    && !all.contains(&addr)
                {
                    all.push(addr);
                }
            }
        }
        all.truncate(MAX_ADDRESSES);
        all
    }
}

// ---------------------------------------------------------------------------------------
// mDNS: announcing and browsing
// ---------------------------------------------------------------------------------------

/// The mDNS responder and browser: a [`ServiceDaemon`] (its own thread and sockets, port
/// 5353 on every interface, shared with any other responder on the machine). Create it in
/// the network namespace it should serve; it stops when dropped.
pub struct Lan {
    daemon: ServiceDaemon,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan").finish_non_exhaustive()
    }
}

impl Lan {
    /// Start the responder. Its sockets join the mDNS groups on every interface at once:
    /// do not start it where no multicast may be sent.
    pub fn start() -> Result<Lan, LanError> {
        let daemon = ServiceDaemon::new()?;
        // The responder reports trouble (an interface it cannot send on, a renamed
        // instance) only through its monitor channel: log it. The thread ends with it.
        let monitor = daemon.monitor()?;
        std::thread::Builder::new()
            .name("mdns-monitor".into())
            .spawn(move || {
                while let Ok(event) = monitor.recv() {
                    tracing::debug!("mDNS: {event:?}");
                }
            })
            .map_err(|e| LanError::Mdns(format!("cannot start its monitor: {e}")))?;
        Ok(Lan { daemon })
    }

    /// Announce `nameplate` for a node bound to `local` until the [`Announcement`] is
    /// dropped or withdrawn. A wildcard `local` is announced with the addresses of every
    /// interface (IPv4 only for `0.0.0.0`), each interface telling its own; a specific
    /// one with just that address, on its interface only.
    pub fn announce(
        &self,
        nameplate: &Nameplate,
        local: SocketAddr,
    ) -> Result<Announcement, LanError> {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 4]>());
        let instance = format!("qpunch-{nameplate}-{token}");
        // A random host name: the machine's own is nobody's business, and another
        // responder on this machine may already own it.
        let host = format!("qpunch-{token}.local.");
        let properties = txt(nameplate);
        let info = if local.ip().is_unspecified() {
            let mut info = ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                (),
                local.port(),
                &properties[..],
            )?
            .enable_addr_auto();
            if local.is_ipv4() {
                info.set_interfaces(vec![IfKind::IPv4]);
            }
            info
        } else {
            let mut info = ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                local.ip(),
                local.port(),
                &properties[..],
            )?;
            info.set_interfaces(vec![IfKind::Addr(local.ip())]);
            info
        };
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        tracing::debug!(%fullname, %local, "announcing on the LAN");
        Ok(Announcement {
            daemon: self.daemon.clone(),
            fullname: Some(fullname),
        })
    }

    /// Browse for `nameplate` for up to `timeout`; once one announcement is seen, wait
    /// [`SETTLE`] more for rivals. Returns what was seen; fails with
    /// [`LanError::NotFound`] when no announcement matched.
    pub async fn find(
        &self,
        nameplate: &Nameplate,
        timeout: Duration,
    ) -> Result<Sightings, LanError> {
        let events = self.daemon.browse(SERVICE_TYPE)?;
        let deadline = Instant::now() + timeout;
        let mut sightings = Sightings::new(nameplate.clone(), super::candidates::interfaces());
        loop {
            // Cancel-safe: flume's receive future takes a message only when it returns it.
            let event = tokio::time::timeout_at(sightings.until(deadline), events.recv_async());
            match event.await {
                Err(_) => break,
                Ok(Err(_)) => {
                    let _ = self.daemon.stop_browse(SERVICE_TYPE);
                    return Err(LanError::Mdns("the mDNS responder stopped".into()));
                }
                Ok(Ok(ServiceEvent::ServiceResolved(resolved))) => {
                    let read = read_announcement(
                        &resolved.fullname,
                        resolved.port,
                        resolved.addresses.iter().map(|ip| ip.to_ip_addr()),
                        resolved.get_property_val(TXT_VERSION).flatten(),
                        resolved.get_property_val(TXT_NAMEPLATE).flatten(),
                    );
                    sightings.see(Instant::now(), read);
                }
                Ok(Ok(_)) => {}
            }
        }
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        if sightings.found().is_empty() {
            return Err(LanError::NotFound {
                nameplate: nameplate.clone(),
                waited: timeout,
            });
        }
        Ok(sightings)
    }

    /// Stop the responder, saying goodbye for whatever is still announced (waits up to a
    /// second for the goodbyes to go out).
    pub async fn shutdown(&self) {
        if let Ok(status) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Without this the daemon thread (which holds its own command sender) runs on.
        let _ = self.daemon.shutdown();
    }
}

/// A live announcement; withdrawn (with mDNS goodbyes) when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: Option<String>,
}

impl std::fmt::Debug for Announcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcement")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Announcement {
    /// The instance's full name.
    pub fn fullname(&self) -> &str {
        self.fullname.as_deref().unwrap_or_default()
    }

    /// Withdraw now and wait (up to a second) until the goodbyes are sent.
    pub async fn withdraw(mut self) {
        if let Some(fullname) = self.fullname.take()
            && let Ok(done) = self.daemon.unregister(&fullname)
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
        }
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Some(fullname) = self.fullname.take() {
            let _ = self.daemon.unregister(&fullname);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The receiver: one open code at a time, and the door meet connections come through
// ---------------------------------------------------------------------------------------

/// How an open code ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A sender proved the code and holds a ticket.
    Used {
        /// Its fingerprint.
        sender: Fingerprint,
        /// Where it connected from.
        remote: SocketAddr,
    },
    /// A tag did not check out (a wrong code, a guess, a spliced connection): the code is
    /// burned.
    Burned {
        /// Where the tag came from.
        remote: SocketAddr,
    },
}

/// What a [`Desk`] has done so far. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LanStats {
    /// Codes a sender proved.
    pub codes_used: u64,
    /// Codes burned by a tag that did not check out.
    pub wrong_codes: u64,
    /// Meet connections refused without a guess: no open code, or it went meanwhile.
    pub meet_refused: u64,
    /// Meet connections that sent something that is not the protocol (counted, dropped).
    pub meet_malformed: u64,
    /// Meet connections that stalled or left before their tag.
    pub meet_abandoned: u64,
}

#[derive(Debug, Default)]
struct Counters {
    used: AtomicU64,
    wrong: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    abandoned: AtomicU64,
}

/// The receiver's open code, at most one: plain data behind a lock, no IO.
///
/// Any number of meet connections may run their PAKE against the open code at once, but
/// the tag check is exclusive and final: the first connection to present a tag takes the
/// code out ([`Desk::open`]'s [`Opened`] learns the [`Outcome`]), and every later tag is
/// refused unchecked.
#[derive(Debug, Default)]
pub struct Desk {
    state: Mutex<DeskState>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct DeskState {
    open: Option<OpenCode>,
    next: u64,
}

#[derive(Debug)]
struct OpenCode {
    generation: u64,
    code: Code,
    outcome: oneshot::Sender<Outcome>,
}

impl Desk {
    /// A desk with no open code.
    pub fn new() -> Arc<Desk> {
        Arc::default()
    }

    /// Open `code`, replacing any open one (whose [`Opened::outcome`] then ends with
    /// `None`).
    pub fn open(self: &Arc<Self>, code: Code) -> Opened {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        state.next += 1;
        let generation = state.next;
        state.open = Some(OpenCode {
            generation,
            code: code.clone(),
            outcome: tx,
        });
        Opened {
            desk: self.clone(),
            generation,
            code,
            outcome: rx,
        }
    }

    /// The counters now.
    pub fn stats(&self) -> LanStats {
        let c = &self.counters;
        LanStats {
            codes_used: c.used.load(Ordering::Relaxed),
            wrong_codes: c.wrong.load(Ordering::Relaxed),
            meet_refused: c.refused.load(Ordering::Relaxed),
            meet_malformed: c.malformed.load(Ordering::Relaxed),
            meet_abandoned: c.abandoned.load(Ordering::Relaxed),
        }
    }

    /// Whether a code is open.
    pub fn is_open(&self) -> bool {
        self.lock().open.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open code, to run a PAKE against.
    fn current(&self) -> Option<(u64, Code)> {
        let state = self.lock();
        state.open.as_ref().map(|o| (o.generation, o.code.clone()))
    }

    /// The one try: take the code out if it is still the one of `generation`.
    fn take(&self, generation: u64) -> Option<oneshot::Sender<Outcome>> {
        let mut state = self.lock();
        match &state.open {
            Some(open) if open.generation == generation => state.open.take().map(|o| o.outcome),
            _ => None,
        }
    }

    fn withdraw(&self, generation: u64) {
        let mut state = self.lock();
        if state
            .open
            .as_ref()
            .is_some_and(|o| o.generation == generation)
        {
            state.open = None;
        }
    }

    /// The receiver's side of the exchange on `peer` (see the [module docs](self)).
    async fn welcome(
        &self,
        peer: &PeerConnection,
        own: Fingerprint,
        admit: &(dyn Fn(Fingerprint, Duration) + Send + Sync),
    ) -> Result<(), Refusal> {
        let Some((generation, code)) = self.current() else {
            return Err(Refusal::NoCode);
        };
        let (mut send, mut recv) = peer
            .connection
            .accept_bi()
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let mut their_msg = [0u8; PAKE_MSG_LEN];
        read_exact(&mut recv, &mut their_msg)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let (pake, our_msg) = Pake::start(&code, Role::Receiver, &mut rand::rng());
        let keys = pake.finish(&their_msg).map_err(Refusal::Malformed)?;
        send.write_all(&our_msg)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let mut tag = [0u8; BIND_TAG_LEN];
        read_exact(&mut recv, &mut tag)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        // The one try. Nothing awaits between taking the code and reporting the outcome,
        // so no cancellation can lose it.
        let outcome = self.take(generation).ok_or(Refusal::Gone)?;
        let remote = peer.connection.remote_address();
        if keys.confirm(&own, &peer.fingerprint, &tag).is_err() {
            let _ = outcome.send(Outcome::Burned { remote });
            return Err(Refusal::WrongCode);
        }
        admit(peer.fingerprint, ADMIT_TTL);
        let _ = outcome.send(Outcome::Used {
            sender: peer.fingerprint,
            remote,
        });
        send.write_all(&keys.bind(&own, &peer.fingerprint))
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let _ = send.finish();
        Ok(())
    }
}

/// An open code, from the code loop's side. Dropping it withdraws the code (if no
/// connection has taken it meanwhile).
#[derive(Debug)]
pub struct Opened {
    desk: Arc<Desk>,
    generation: u64,
    code: Code,
    outcome: oneshot::Receiver<Outcome>,
}

impl Opened {
    /// The code.
    pub fn code(&self) -> &Code {
        &self.code
    }

    /// Wait until a connection used or burned the code; `None` if it was replaced.
    /// Cancel-safe: it only waits on a oneshot receiver, which keeps its value.
    pub async fn outcome(&mut self) -> Option<Outcome> {
        (&mut self.outcome).await.ok()
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.desk.withdraw(self.generation);
    }
}

/// Why the receiver refused a meet connection.
#[derive(Debug)]
enum Refusal {
    NoCode,
    Gone,
    Malformed(PakeError),
    Abandoned,
    Timeout,
    WrongCode,
}

/// The receiving side's [`Service`]: connections that negotiated [`ALPN`] prove the open
/// code first (and are admitted with a ticket), then every connection goes on to `inner`
/// (e.g. a [`crate::transfer::Receiver`]) on the same connection.
pub struct Door<S> {
    inner: Arc<S>,
    desk: Arc<Desk>,
    own: Fingerprint,
    admit: Box<dyn Fn(Fingerprint, Duration) + Send + Sync>,
}

impl<S> std::fmt::Debug for Door<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl<S: Service> Door<S> {
    /// A door in front of `inner` for a node whose fingerprint is `own`, taking codes from
    /// `desk`; `admit` gives a sender that proved the code its ticket (e.g.
    /// [`crate::transfer::Receiver::admit`]).
    pub fn new(
        inner: Arc<S>,
        desk: Arc<Desk>,
        own: Fingerprint,
        admit: impl Fn(Fingerprint, Duration) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Door {
            inner,
            desk,
            own,
            admit: Box::new(admit),
        })
    }
}

impl<S: Service> Service for Door<S> {
    async fn serve(self: Arc<Self>, peer: PeerConnection, mut shutdown: Shutdown) {
        if negotiated(&peer.connection).as_deref() == Some(ALPN) {
            let exchange = self.desk.welcome(&peer, self.own, &*self.admit);
            let welcomed = tokio::select! {
                // Cancel-safe: dropping the exchange abandons it; the code is only ever
                // taken together with its outcome, with nothing awaited in between.
                r = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange) => r.unwrap_or(Err(Refusal::Timeout)),
                () = shutdown.recv() => return,
            };
            let counters = &self.desk.counters;
            let remote = peer.connection.remote_address();
            let (code, reason): (u32, &[u8]) = match welcomed {
                Ok(()) => {
                    counters.used.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, sender = %peer.fingerprint, "a sender proved the code");
                    return self.inner.clone().serve(peer, shutdown).await;
                }
                Err(Refusal::NoCode | Refusal::Gone) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    (codes::NO_CODE, b"no open code")
                }
                Err(Refusal::WrongCode) => {
                    counters.wrong.fetch_add(1, Ordering::Relaxed);
                    (codes::WRONG_CODE, b"the code did not match")
                }
                Err(Refusal::Malformed(e)) => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "malformed meet message: {e}");
                    (codes::PROTOCOL, b"malformed meet message")
                }
                Err(Refusal::Abandoned | Refusal::Timeout) => {
                    counters.abandoned.fetch_add(1, Ordering::Relaxed);
                    (codes::PROTOCOL, b"meet exchange abandoned")
                }
            };
            tracing::info!(%remote, "meet connection refused: {}", String::from_utf8_lossy(reason));
            crate::close_gate::close(&peer.connection, code.into(), reason);
            return;
        }
        self.inner.clone().serve(peer, shutdown).await
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        self.inner.handshake_failed(remote, error);
    }
}

/// The ALPN a connection negotiated.
fn negotiated(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

// ---------------------------------------------------------------------------------------
// The sender
// ---------------------------------------------------------------------------------------

/// A sender's LAN meeting that succeeded.
#[derive(Debug)]
pub struct Dialed {
    /// The connection: the receiver proved the code on it, and it now speaks the files
    /// protocol.
    pub peer: PeerConnection,
    /// What browsing saw.
    pub sightings: Sightings,
}

/// Sender: find the receiver of `code` on the LAN (for up to `timeout`), then
/// [`meet_at`] its addresses.
pub async fn dial(
    node: &Node,
    lan: &Lan,
    code: &Code,
    timeout: Duration,
) -> Result<Dialed, LanError> {
    let sightings = lan.find(code.nameplate(), timeout).await?;
    let peer = meet_at(node, &sightings.addrs(), code).await?;
    Ok(Dialed { peer, sightings })
}

/// Sender: connect (unpinned, [`ALPN`]) to the receiver at `addrs`, refuse if more than
/// one identity answers, and prove the code both ways. On success the connection carries
/// the files protocol next, and its fingerprint is the receiver's, confirmed by the code.
pub async fn meet_at(
    node: &Node,
    addrs: &[SocketAddr],
    code: &Code,
) -> Result<PeerConnection, LanError> {
    let peer = connect_one(node, addrs, code.nameplate()).await?;
    let own = node.fingerprint();
    let proved = tokio::time::timeout(EXCHANGE_TIMEOUT, prove(&peer, own, code)).await;
    let error = match proved {
        Ok(Ok(())) => return Ok(peer),
        Ok(Err(e)) => e,
        Err(_) => LanError::Timeout(EXCHANGE_TIMEOUT),
    };
    let close = match error {
        LanError::WrongCode => codes::WRONG_CODE,
        _ => codes::PROTOCOL,
    };
    crate::close_gate::close(&peer.connection, close.into(), b"meeting failed");
    Err(error)
}

/// Connect to every address at once; the first to answer is the one, unless another
/// identity answers too within [`SETTLE`].
async fn connect_one(
    node: &Node,
    addrs: &[SocketAddr],
    nameplate: &Nameplate,
) -> Result<PeerConnection, LanError> {
    let alpn = [ALPN.to_vec()];
    let mut attempts: FuturesUnordered<_> = addrs
        .iter()
        .take(MAX_ADDRESSES)
        .map(|&addr| {
            let connecting = node.connect_with_alpn(addr, None, &alpn);
            async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                    Ok(result) => result,
                    Err(_) => Err(NodeError::HandshakeTimeout(CONNECT_TIMEOUT)),
                }
            }
        })
        .collect();
    let mut connected: Vec<PeerConnection> = Vec::new();
    let mut last = String::from("no address to try");
    let mut settle_until: Option<Instant> = None;
    loop {
        // Cancel-safe: `FuturesUnordered::next` loses no finished attempt when dropped.
        let next = match settle_until {
            Some(until) => match tokio::time::timeout_at(until, attempts.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => attempts.next().await,
        };
        match next {
            None => break,
            Some(Ok(peer)) => {
                settle_until.get_or_insert(Instant::now() + SETTLE);
                connected.push(peer);
            }
            Some(Err(e)) => last = e.to_string(),
        }
    }
    drop(attempts);
    let identities: HashSet<Fingerprint> = connected.iter().map(|p| p.fingerprint).collect();
    if identities.len() > 1 {
        for peer in &connected {
            crate::close_gate::close(&peer.connection, codes::AMBIGUOUS.into(), b"ambiguous");
        }
        return Err(LanError::Ambiguous {
            nameplate: nameplate.clone(),
            identities: identities.len(),
        });
    }
    let mut connected = connected.into_iter();
    let Some(first) = connected.next() else {
        return Err(LanError::Unreachable {
            tried: addrs.iter().take(MAX_ADDRESSES).copied().collect(),
            last,
        });
    };
    for spare in connected {
        crate::close_gate::close(&spare.connection, 0u32.into(), b"another path won");
    }
    Ok(first)
}

/// The sender's side of the exchange (see the [module docs](self)).
async fn prove(peer: &PeerConnection, own: Fingerprint, code: &Code) -> Result<(), LanError> {
    let (mut send, mut recv) = peer.connection.open_bi().await.map_err(|e| lost(&e))?;
    let (pake, our_msg) = Pake::start(code, Role::Sender, &mut rand::rng());
    send.write_all(&our_msg).await.map_err(write_failed)?;
    let mut their_msg = [0u8; PAKE_MSG_LEN];
    read_exact(&mut recv, &mut their_msg).await?;
    let keys: SessionKeys = pake.finish(&their_msg).map_err(|e| match e {
        PakeError::WrongCodeOrTampered => LanError::WrongCode,
        other => LanError::Pake(other),
    })?;
    send.write_all(&keys.bind(&own, &peer.fingerprint))
        .await
        .map_err(write_failed)?;
    let mut tag = [0u8; BIND_TAG_LEN];
    read_exact(&mut recv, &mut tag).await?;
    keys.confirm(&own, &peer.fingerprint, &tag)
        .map_err(|_| LanError::WrongCode)?;
    let _ = send.finish();
    Ok(())
}

/// Read exactly `buf.len()` bytes, telling a refusal by the peer from other failures.
async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), LanError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(LanError::Protocol(
            "the peer ended the exchange early".into(),
        )),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(lost(&e)),
        Err(quinn::ReadExactError::ReadError(e)) => Err(LanError::Protocol(e.to_string())),
    }
}

fn write_failed(e: quinn::WriteError) -> LanError {
    match e {
        quinn::WriteError::ConnectionLost(e) => lost(&e),
        other => LanError::Protocol(other.to_string()),
    }
}

/// What a lost connection means for the exchange: the receiver's refusals by their code.
fn lost(e: &quinn::ConnectionError) -> LanError {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        match u32::try_from(close.error_code.into_inner()) {
            Ok(codes::WRONG_CODE) => return LanError::WrongCode,
            Ok(codes::NO_CODE) => return LanError::NoCode,
            _ => {}
        }
    }
    // The close reason is the peer's text: `Protocol` escapes it when shown.
    LanError::Protocol(format!("connection lost: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(s: &str) -> Nameplate {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn announced(
        instance: &str,
        nameplate: &str,
        ips: &[&str],
    ) -> Result<Announced, BadAnnouncement> {
        read_announcement(
            instance,
            9199,
            ips.iter().map(|s| ip(s)),
            Some(b"1"),
            Some(nameplate.as_bytes()),
        )
    }

    #[test]
    fn txt_round_trips_through_the_reader() {
        let props = txt(&np("42"));
        let get = |key| {
            props
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_bytes())
        };
        let read = read_announcement(
            "qpunch-42-abcd._qpunch._udp.local.",
            9199,
            [ip("198.51.100.7")],
            get(TXT_VERSION),
            get(TXT_NAMEPLATE),
        )
        .unwrap();
        assert_eq!(read.nameplate, np("42"));
        assert_eq!(read.addrs, vec!["198.51.100.7:9199".parse().unwrap()]);
    }

    #[test]
    fn announcements_are_read_strictly() {
        let one = |v: Option<&[u8]>, n: Option<&[u8]>, port, ips: &[&str]| {
            read_announcement("x", port, ips.iter().map(|s| ip(s)), v, n)
        };
        let good = ["198.51.100.7"];
        assert_eq!(
            one(None, Some(b"7"), 1, &good),
            Err(BadAnnouncement::Version(None))
        );
        assert!(matches!(
            one(Some(b"2"), Some(b"7"), 1, &good),
            Err(BadAnnouncement::Version(Some(_)))
        ));
        // The version shown is escaped and short.
        let Err(BadAnnouncement::Version(Some(shown))) = one(
            Some(b"\x1b[2J\x1b]0;pwned\x07 and much more text"),
            Some(b"7"),
            1,
            &good,
        ) else {
            panic!("refused")
        };
        assert!(!shown.chars().any(crate::text::is_unsafe), "{shown:?}");
        assert!(shown.len() < 40, "{shown:?}");
        for bad in [&b""[..], b"7-x", b"\xff", b"seven eight", &[b'1'; 40]] {
            assert_eq!(
                one(Some(b"1"), Some(bad), 1, &good),
                Err(BadAnnouncement::Nameplate),
                "{bad:?}"
            );
        }
        assert_eq!(
            one(Some(b"1"), None, 1, &good),
            Err(BadAnnouncement::Nameplate)
        );
        assert_eq!(
            one(Some(b"1"), Some(b"7"), 0, &good),
            Err(BadAnnouncement::Port)
        );
        let useless = [
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "fe80::1",
            "::",
            "ff02::fb",
        ];
        assert_eq!(
            one(Some(b"1"), Some(b"7"), 1, &useless),
            Err(BadAnnouncement::NoAddress)
        );
        // Mixed: only the usable ones stay, IPv4-mapped shown as IPv4, no duplicates.
        let read = one(
            Some(b"1"),
            Some(b"Seven7"),
            5,
            &[
                "fe80::1",
                "::ffff:198.51.100.7",
                "198.51.100.7",
                "2001:db8::7",
            ],
        )
        .unwrap();
        assert_eq!(read.nameplate, np("seven7"));
        assert_eq!(
            read.addrs,
            vec![
                "198.51.100.7:5".parse().unwrap(),
                "[2001:db8::7]:5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn sightings_merge_updates_and_settle_after_the_first_match() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(5);
        let mut seen = Sightings::new(np("7"), Vec::new());
        assert_eq!(seen.until(deadline), deadline);
        seen.see(t0, announced("other", "8", &["198.51.100.8"]));
        seen.see(t0, Err(BadAnnouncement::Port));
        assert_eq!(seen.until(deadline), deadline, "only a match settles");
        let t1 = t0 + Duration::from_millis(100);
        seen.see(t1, announced("a", "7", &["198.51.100.7"]));
        assert_eq!(seen.until(deadline), t1 + SETTLE);
        seen.see(t1, announced("a", "7", &["2001:db8::7", "198.51.100.7"]));
        seen.see(t1 + SETTLE / 2, announced("b", "7", &["198.51.100.9"]));
        assert_eq!(
            seen.until(deadline),
            t1 + SETTLE,
            "the first match sets the pace"
        );
        assert_eq!(seen.found().len(), 2);
        assert_eq!((seen.others, seen.ignored), (1, 1));
        // Each announcement's best address first, then the next ones.
        let addrs: Vec<String> = seen.addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "198.51.100.7:9199",
                "198.51.100.9:9199",
                "[2001:db8::7]:9199"
            ]
        );
        // Near the deadline, the deadline wins.
        let mut late = Sightings::new(np("7"), Vec::new());
        late.see(
            deadline - SETTLE / 3,
            announced("a", "7", &["198.51.100.7"]),
        );
        assert_eq!(late.until(deadline), deadline);
    }

    #[test]
    fn a_flood_of_announcements_is_capped() {
        let mut seen = Sightings::new(np("7"), Vec::new());
        for i in 0..20 {
            let addr = format!("198.51.100.{i}");
            seen.see(Instant::now(), announced(&format!("i{i}"), "7", &[&addr]));
        }
        assert_eq!(seen.found().len(), MAX_INSTANCES);
        assert_eq!(seen.ignored, 20 - MAX_INSTANCES as u64);
        assert_eq!(seen.addrs().len(), MAX_ADDRESSES);
        let many: Vec<String> = (0..40).map(|i| format!("198.51.100.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut one = Sightings::new(np("7"), Vec::new());
        one.see(Instant::now(), announced("a", "7", &many));
        one.see(Instant::now(), announced("a", "7", &["203.0.113.1"]));
        assert_eq!(one.found()[0].addrs.len(), MAX_ADDRESSES);
    }

    #[test]
    fn addresses_on_our_networks_come_first_and_loopback_last() {
        let ours = vec![Interface {
            ip: ip("10.0.1.2"),
            prefix: 24,
        }];
        let mut seen = Sightings::new(np("7"), ours);
        seen.see(
            Instant::now(),
            announced(
                "a",
                "7",
                &["127.0.0.1", "2001:db8::7", "198.51.100.7", "10.0.1.9"],
            ),
        );
        let addrs: Vec<String> = seen.addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.0.1.9:9199",
                "198.51.100.7:9199",
                "[2001:db8::7]:9199",
                "127.0.0.1:9199"
            ]
        );
    }

    fn code(text: &str) -> Code {
        text.parse().unwrap()
    }

    #[test]
    fn a_code_is_taken_once_and_only_in_its_generation() {
        let desk = Desk::new();
        assert!(desk.current().is_none());
        let mut first = desk.open(code("7-clockwork-crossover"));
        let (generation, current) = desk.current().unwrap();
        assert_eq!(&current, first.code());
        let outcome = desk.take(generation).expect("the one try");
        assert!(
            desk.take(generation).is_none(),
            "a second tag finds nothing"
        );
        assert!(!desk.is_open());
        let remote: SocketAddr = "198.51.100.9:1".parse().unwrap();
        outcome.send(Outcome::Burned { remote }).unwrap();
        let got = futures_util::FutureExt::now_or_never(first.outcome()).unwrap();
        assert_eq!(got, Some(Outcome::Burned { remote }));

        // A tag that arrives after the code was replaced is refused unchecked.
        let old = desk.open(code("8-clockwork-crossover"));
        let (stale, _) = desk.current().unwrap();
        let mut new = desk.open(code("9-clockwork-crossover"));
        assert!(desk.take(stale).is_none());
        drop(old); // withdrawing the replaced code leaves the new one open
        assert!(desk.is_open());
        let (generation, current) = desk.current().unwrap();
        assert_eq!(current.nameplate().as_str(), "9");
        drop(desk.take(generation));
        // The taker went away without a word: the code is gone, no outcome.
        assert_eq!(
            futures_util::FutureExt::now_or_never(new.outcome()),
            Some(None)
        );
    }

    #[test]
    fn dropping_an_open_code_withdraws_it() {
        let desk = Desk::new();
        let opened = desk.open(code("7-clockwork-crossover"));
        let (generation, _) = desk.current().unwrap();
        drop(opened);
        assert!(!desk.is_open());
        assert!(desk.take(generation).is_none());
    }

    #[test]
    fn random_nameplates_are_short_numbers() {
        for _ in 0..200 {
            let n: u32 = random_nameplate().as_str().parse().unwrap();
            assert!((1..NAMEPLATES).contains(&n));
        }
    }

    #[test]
    fn refusals_are_read_from_close_codes() {
        let closed = |code: u32, reason: &[u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: bytes::Bytes::copy_from_slice(reason),
            })
        };
        assert!(matches!(
            lost(&closed(codes::WRONG_CODE, b"")),
            LanError::WrongCode
        ));
        assert!(matches!(
            lost(&closed(codes::NO_CODE, b"")),
            LanError::NoCode
        ));
        let other = lost(&closed(99, b"\x1b[2Jgotcha\nforged line"));
        let message = other.to_string();
        assert!(!message.chars().any(crate::text::is_unsafe), "{message:?}");
        assert!(message.contains("gotcha"), "{message}");
    }
}

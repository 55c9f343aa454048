//! The driver of one peer's paths: probe each, feed the [`Chooser`], move the route.
//!
//! A [`PeerPaths`] owns one mapped address of the [`PathSocket`]. Its task sends
//! authenticated probes (under the meeting's PAKE keys, so nobody else can make a path look
//! alive) along every path it knows, direct addresses on the node's socket and relay
//! carriers alike, and turns the replies into liveness and RTT for the chooser. When the
//! chooser moves, the route moves: the QUIC connection on the mapped address goes on,
//! unaware.
//!
//! Probing is paced by need: fast (every [`FAST`]) while no path is chosen, while the
//! current one has gone quiet, or for a better path that is being proven; every [`SLOW`] on
//! the current path (its liveness is what lets a dead direct path fall back to the relay
//! within [`ChooserConfig::stale_after`]); every [`IDLE`] on worse paths kept in reserve,
//! so a relay carries almost nothing once the direct path took over. Paths that never
//! answered back off to [`IDLE`] after [`GIVE_UP`].
//!
//! New direct paths come from the meeting's traversal ([`PeerPaths::add_direct`]) and from
//! the peer itself: an authenticated probe from an address we did not know (the peer's NAT
//! gave it a new public address) is answered by the [`DemuxSocket`](crate::socket::DemuxSocket)
//! and that address is tried at once, which is how a roaming peer gets a direct path back.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

use super::chooser::{Chooser, ChooserConfig, PathId, SwitchReason};
use super::socket::{PathBytes, PathSocket, Route, Target};
use super::{Carrier, PathKind};
use crate::addr::canonical;
use crate::punch;
use crate::socket::{Authenticating, ProbeReply};
use crate::wire::{self, Class, Message, ProbeKeys, TxId};

/// Probe interval of a path being proven, or of every path while the current one is quiet.
pub const FAST: Duration = Duration::from_millis(200);
/// Probe interval of the current path while it answers. Its probes also keep the NAT
/// mappings of the path open, like keep-alives.
pub const SLOW: Duration = Duration::from_secs(1);
/// Probe interval of paths kept in reserve, and of paths that never answered.
pub const IDLE: Duration = Duration::from_secs(10);
/// A path that has not answered for this long since it was added stops being probed fast.
pub const GIVE_UP: Duration = Duration::from_secs(15);

/// How a peer's paths are probed and chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathConfig {
    /// The choice among live paths.
    pub chooser: ChooserConfig,
    /// See [`FAST`].
    pub fast: Duration,
    /// See [`SLOW`].
    pub slow: Duration,
    /// See [`IDLE`].
    pub idle: Duration,
    /// See [`GIVE_UP`].
    pub give_up: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            chooser: ChooserConfig::default(),
            fast: FAST,
            slow: SLOW,
            idle: IDLE,
            give_up: GIVE_UP,
        }
    }
}
/// Most direct paths one peer keeps (each peer probe from a new address adds one).
const MAX_DIRECT: usize = 8;
/// Probes remembered per path, to match replies and measure RTT.
const OUTSTANDING: usize = 16;

/// A move of the peer's traffic to another path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathEvent {
    /// The kind of path now used.
    pub kind: PathKind,
    /// The kind used before (`None` for the first path).
    pub from: Option<PathKind>,
    /// Why the move.
    pub reason: SwitchReason,
    /// The new path's smoothed RTT, as its probes measured it.
    pub rtt: Option<Duration>,
}

enum Command {
    Direct(SocketAddr, PathKind),
    /// The peer probed us from this address.
    Seen(SocketAddr),
    /// The peer says, through a relay, that it can be reached here.
    Offered(SocketAddr),
    Carrier(usize, Arc<dyn Carrier>),
    /// An authenticated reply that came through carrier `usize`.
    CarriedReply(usize, Bytes, Instant),
}

struct Shared {
    socket: Arc<PathSocket>,
    route: Arc<Route>,
    mapped: SocketAddr,
    keys: ProbeKeys,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<PathEvent>,
    current: Mutex<Option<PathEvent>>,
    next_carrier: Mutex<usize>,
    /// Our public address, as our rendezvous sees it: offered to the peer in the probes we
    /// send through relays.
    reflexive: Mutex<Option<SocketAddr>>,
}

/// One peer's paths, behind one mapped address. Dropping it forgets the peer: its
/// connection then has nowhere to send.
pub struct PeerPaths {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// Tasks that serve these paths (a relay's reader, a punch still going on): they end
    /// with them.
    held: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _answering: Authenticating,
}

/// A handle that adds paths to a [`PeerPaths`] from another task (a punch that goes on
/// behind a connection that started relayed).
#[derive(Clone)]
pub struct PathAdder(Arc<Shared>);

impl std::fmt::Debug for PathAdder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PathAdder").field(&self.0.mapped).finish()
    }
}

impl PathAdder {
    /// See [`PeerPaths::add_direct`].
    pub fn add_direct(&self, addr: SocketAddr, kind: PathKind) {
        add_direct(&self.0, addr, kind);
    }

    /// See [`PeerPaths::set_reflexive`].
    pub fn set_reflexive(&self, addr: SocketAddr) {
        *self.0.reflexive.lock().unwrap_or_else(|e| e.into_inner()) = Some(canonical(addr));
    }
}

fn add_direct(shared: &Shared, addr: SocketAddr, kind: PathKind) {
    let addr = canonical(addr);
    shared.socket.tie(addr, shared.mapped, kind);
    let _ = shared.commands.try_send(Command::Direct(addr, kind));
}

impl std::fmt::Debug for PeerPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPaths")
            .field("mapped", &self.shared.mapped)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl Drop for PeerPaths {
    fn drop(&mut self) {
        self.task.abort();
        for task in self
            .held
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.shared.socket.remove_route(self.shared.mapped);
    }
}

impl PeerPaths {
    /// A new mapped peer on `socket`, whose probes and replies are tagged under `keys` (the
    /// meeting's). It has no path until [`add_direct`](Self::add_direct) or
    /// [`add_relay`](Self::add_relay) gives it one that answers. Must be called inside a
    /// tokio runtime.
    pub fn new(socket: &Arc<PathSocket>, keys: ProbeKeys, config: PathConfig) -> Self {
        let route = socket.add_route();
        let (commands, receive) = mpsc::channel(256);
        let (events, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            socket: socket.clone(),
            mapped: route.mapped(),
            route,
            keys: keys.clone(),
            commands,
            events,
            current: Mutex::new(None),
            next_carrier: Mutex::new(0),
            reflexive: Mutex::new(None),
        });
        // A verified probe from an address of the peer's: tie it to the mapped address right
        // away, as its QUIC packets may follow in the same batch, and tell the driver, which
        // tries it as a path only when the current one has gone quiet (the peer's NAT gave
        // it a new address). Not before: during a meeting the peer also probes from birthday
        // sockets, which no QUIC endpoint of its serves.
        let hook = {
            let shared = Arc::downgrade(&shared);
            Arc::new(move |from: SocketAddr| {
                if let Some(shared) = shared.upgrade() {
                    shared.socket.tie(from, shared.mapped, PathKind::Direct);
                    let _ = shared.commands.try_send(Command::Seen(canonical(from)));
                }
            })
        };
        let answering = socket.demux().authenticate_with(keys, hook);
        let replies = socket.demux().subscribe();
        let task = tokio::spawn(drive(shared.clone(), receive, replies, config));
        PeerPaths {
            shared,
            task,
            held: Mutex::default(),
            _answering: answering,
        }
    }

    /// The address quinn dials (or sees the peer's packets come from).
    pub fn mapped(&self) -> SocketAddr {
        self.shared.mapped
    }

    /// A direct path to try: the peer's address as the traversal proved it. An address
    /// already known (the peer probed us from it) takes this kind.
    pub fn add_direct(&self, addr: SocketAddr, kind: PathKind) {
        add_direct(&self.shared, addr, kind);
    }

    /// A handle that adds direct paths from elsewhere.
    pub fn adder(&self) -> PathAdder {
        PathAdder(self.shared.clone())
    }

    /// Keep `task` running as long as these paths live, and abort it with them.
    pub fn hold(&self, task: tokio::task::JoinHandle<()>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|t| !t.is_finished());
        held.push(task);
    }

    /// A relay to the peer. Whoever reads the carrier gives what arrives to the returned
    /// [`Relayed`].
    pub fn add_relay(&self, carrier: Arc<dyn Carrier>) -> Relayed {
        let slot = {
            let mut next = self
                .shared
                .next_carrier
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let _ = self
            .shared
            .commands
            .try_send(Command::Carrier(slot, carrier.clone()));
        Relayed {
            shared: self.shared.clone(),
            carrier,
            slot,
        }
    }

    /// Our public address as our rendezvous sees it (after a move to another network, ask
    /// it again): offered to the peer inside the probes sent through relays, so that a peer
    /// whose NAT filters unknown sources probes it, and opens the way back for a direct
    /// path. Only the peer can read it there: the probes are tagged under the meeting's keys.
    pub fn set_reflexive(&self, addr: SocketAddr) {
        self.adder().set_reflexive(addr);
    }

    /// Every move from now on.
    pub fn events(&self) -> broadcast::Receiver<PathEvent> {
        self.shared.events.subscribe()
    }

    /// The path in use, if any.
    pub fn current(&self) -> Option<PathEvent> {
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes that went each way, by kind of path.
    pub fn bytes(&self) -> PathBytes {
        self.shared.route.bytes()
    }

    /// Wait up to `timeout` for a path to be chosen.
    pub async fn first_path(&self, timeout: Duration) -> Option<PathEvent> {
        let mut events = self.events();
        if let Some(current) = self.current() {
            return Some(current);
        }
        tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Ok(event) => return Some(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(current) = self.current() {
                            return Some(current);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// The inbound side of one relay to one peer: hand it every datagram the carrier reads.
#[derive(Clone)]
pub struct Relayed {
    shared: Arc<Shared>,
    carrier: Arc<dyn Carrier>,
    slot: usize,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("carrier", &self.carrier)
            .finish_non_exhaustive()
    }
}

impl Relayed {
    /// One datagram from the peer through this relay: a QUIC packet goes to quinn, an
    /// authenticated probe is answered back through the relay, a reply goes to the driver.
    /// Anything else (nothing the peer sends) is dropped.
    pub fn deliver(&self, datagram: Bytes) {
        let shared = &self.shared;
        match wire::classify(&datagram) {
            Class::Quic => shared
                .socket
                .deliver(&shared.route, self.carrier.kind(), datagram),
            Class::Probe if wire::is_authenticated_reply(&datagram) => {
                // Checked here, not only by the driver: what a relay injects must not crowd
                // the driver's channel.
                if Message::decode_authenticated(&datagram, &shared.keys.theirs).is_ok() {
                    let at = Instant::now();
                    let _ = shared
                        .commands
                        .try_send(Command::CarriedReply(self.slot, datagram, at));
                }
            }
            Class::Probe => {
                if let Ok((Message::Probe { txid }, offered)) =
                    Message::decode_authenticated_to(&datagram, &shared.keys.theirs)
                {
                    let reply =
                        punch::authenticated_reply_to(shared.mapped, txid, &shared.keys.ours);
                    shared.socket.carry(&*self.carrier, &reply.contents);
                    // On a relay the probe's address field says where the peer can be
                    // reached directly (see `PeerPaths::set_reflexive`).
                    if let Some(offered) = offered.filter(|a| !super::is_mapped(*a)) {
                        let offered = Command::Offered(canonical(offered));
                        let _ = shared.commands.try_send(offered);
                    }
                }
            }
            Class::Legacy(_) => {}
        }
    }
}

enum Via {
    Direct(SocketAddr),
    Carrier(usize, Arc<dyn Carrier>),
}

struct Known {
    id: PathId,
    kind: PathKind,
    via: Via,
    added: Instant,
    last_heard: Option<Instant>,
    next_probe: Instant,
    sent: VecDeque<(TxId, Instant)>,
}

impl Known {
    fn target(&self) -> Target {
        match &self.via {
            Via::Direct(addr) => Target::Direct {
                addr: *addr,
                kind: self.kind,
            },
            Via::Carrier(_, carrier) => Target::Carried(carrier.clone()),
        }
    }

    /// Match a verified reply to one of our probes: its RTT.
    fn answered(&mut self, txid: TxId, now: Instant) -> Option<Duration> {
        let at = self.sent.iter().position(|(t, _)| *t == txid)?;
        let (_, sent) = self.sent.remove(at)?;
        self.last_heard = Some(now);
        Some(now.saturating_duration_since(sent))
    }
}

/// A peer-suggested address (offered through a relay, or seen probing us) becomes a path
/// at most this often.
const OFFER_EVERY: Duration = Duration::from_secs(2);

/// An address worth probing: unicast, not loopback, not unspecified.
fn routable(addr: SocketAddr) -> bool {
    let ip = addr.ip();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast() || v4.octets()[0] >= 240)
}

/// The peer's paths, the chooser over them, and when to probe each.
struct Driver {
    shared: Arc<Shared>,
    config: PathConfig,
    /// When a peer-suggested address last became a path.
    adopted: Option<Instant>,
    chooser: Chooser,
    paths: Vec<Known>,
}

impl Driver {
    fn add(&mut self, via: Via, kind: PathKind, now: Instant) {
        let exists = self.paths.iter().position(|p| match (&p.via, &via) {
            (Via::Direct(a), Via::Direct(b)) => a == b,
            (Via::Carrier(a, _), Via::Carrier(b, _)) => a == b,
            _ => false,
        });
        if let Some(at) = exists {
            // Learnt first as direct (offered by the peer), then named by the traversal,
            // which knows a LAN address when it sees one: the path keeps its state.
            if self.paths[at].kind.class() > kind.class() {
                self.relabel(at, kind);
            }
            return;
        }
        if matches!(via, Via::Direct(_)) {
            let direct = self
                .paths
                .iter()
                .filter(|p| matches!(p.via, Via::Direct(_)))
                .count();
            if direct >= MAX_DIRECT {
                // Make room: forget the direct path heard from longest ago (never counts as
                // longest), unless it is the one in use.
                let current = self.chooser.current();
                let Some(at) = self
                    .paths
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| matches!(p.via, Via::Direct(_)) && Some(p.id) != current)
                    .min_by_key(|(_, p)| p.last_heard)
                    .map(|(at, _)| at)
                else {
                    return;
                };
                self.forget(at);
            }
        }
        let id = self.chooser.add(kind);
        self.paths.push(Known {
            id,
            kind,
            via,
            added: now,
            last_heard: None,
            next_probe: now,
            sent: VecDeque::new(),
        });
    }

    fn relabel(&mut self, at: usize, kind: PathKind) {
        let path = &mut self.paths[at];
        path.kind = kind;
        self.chooser.set_kind(path.id, kind);
        if let Via::Direct(addr) = path.via {
            self.shared.socket.untie(addr, self.shared.mapped);
            self.shared.socket.tie(addr, self.shared.mapped, kind);
        }
        if self.chooser.current() == Some(path.id) {
            self.shared.route.set(path.target());
            let mut current = self
                .shared
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(event) = current.as_mut() {
                event.kind = kind;
            }
        }
    }

    /// Whether a peer-suggested address may become a path now (see [`OFFER_EVERY`]).
    fn may_adopt(&mut self, now: Instant) -> bool {
        if self
            .adopted
            .is_some_and(|t| now.saturating_duration_since(t) < OFFER_EVERY)
        {
            return false;
        }
        self.adopted = Some(now);
        true
    }

    fn forget(&mut self, at: usize) {
        let path = self.paths.remove(at);
        self.chooser.remove(path.id);
        if let Via::Direct(addr) = path.via {
            self.shared.socket.untie(addr, self.shared.mapped);
        }
    }

    fn current(&self) -> Option<&Known> {
        let id = self.chooser.current()?;
        self.paths.iter().find(|p| p.id == id)
    }

    /// Whether the current path has missed its last probes.
    fn quiet(&self, now: Instant) -> bool {
        match self.current() {
            None => true,
            Some(c) => c
                .last_heard
                .is_none_or(|t| now.saturating_duration_since(t) > self.config.slow * 2),
        }
    }

    fn interval(&self, path: &Known, now: Instant) -> Duration {
        let c = &self.config;
        let never = path.last_heard.is_none();
        if never && now.saturating_duration_since(path.added) > c.give_up {
            return c.idle;
        }
        if self.quiet(now) {
            return c.fast;
        }
        let current = self
            .current()
            .expect("not quiet, so there is a current path");
        if current.id == path.id {
            c.slow
        } else if path.kind.class() < current.kind.class() {
            c.fast
        } else {
            c.idle
        }
    }

    async fn probe_due(&mut self, now: Instant) {
        let shared = self.shared.clone();
        // Closed carriers are gone for good.
        while let Some(at) = self
            .paths
            .iter()
            .position(|p| matches!(&p.via, Via::Carrier(_, c) if c.max_datagram() == 0))
        {
            self.forget(at);
        }
        for i in 0..self.paths.len() {
            if self.paths[i].next_probe > now {
                continue;
            }
            let interval = self.interval(&self.paths[i], now);
            let path = &mut self.paths[i];
            path.next_probe = now + interval;
            let txid: TxId = rand::random();
            if path.sent.len() == OUTSTANDING {
                path.sent.pop_front();
            }
            path.sent.push_back((txid, now));
            match &path.via {
                Via::Direct(addr) => {
                    let probe = wire::authenticated_probe(txid, *addr, &shared.keys.ours);
                    // Best effort, like any probe: a lost one is covered by the next.
                    let _ = shared.socket.demux().send_probe(*addr, &probe).await;
                }
                Via::Carrier(_, carrier) => {
                    // No destination address on a relay: the field offers ours instead.
                    let offer = *shared.reflexive.lock().unwrap_or_else(|e| e.into_inner());
                    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                    let to = offer.unwrap_or(unspecified);
                    let probe = wire::authenticated_probe(txid, to, &shared.keys.ours);
                    shared.socket.carry(&**carrier, &probe);
                }
            }
        }
    }

    fn heard(&mut self, find: impl Fn(&Via) -> bool, data: &[u8], now: Instant) {
        let Ok(Message::Reply { txid, .. }) =
            Message::decode_authenticated(data, &self.shared.keys.theirs)
        else {
            return;
        };
        let Some(path) = self.paths.iter_mut().find(|p| find(&p.via)) else {
            return;
        };
        if let Some(rtt) = path.answered(txid, now) {
            self.chooser.heard(path.id, now, Some(rtt));
        }
    }

    fn choose(&mut self, now: Instant) {
        let Some(switch) = self.chooser.poll(now) else {
            return;
        };
        let Some(path) = self.paths.iter().find(|p| p.id == switch.to) else {
            return;
        };
        let from = switch
            .from
            .and_then(|id| self.paths.iter().find(|p| p.id == id))
            .map(|p| p.kind);
        self.shared.route.set(path.target());
        let event = PathEvent {
            kind: path.kind,
            from,
            reason: switch.reason,
            rtt: self.chooser.rtt(path.id),
        };
        tracing::debug!(peer = %self.shared.mapped, ?event, "path changed");
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(event);
        self.shared
            .socket
            .epoch()
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shared.events.send(event);
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let soonest = self.paths.iter().map(|p| p.next_probe).min();
        // The chooser's settling and staleness are checked at least this often.
        let tick = now + self.config.fast;
        soonest.map_or(tick, |t| t.min(tick))
    }
}

async fn drive(
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
    mut replies: broadcast::Receiver<ProbeReply>,
    config: PathConfig,
) {
    let mut driver = Driver {
        shared,
        config,
        adopted: None,
        chooser: Chooser::new(config.chooser),
        paths: Vec::new(),
    };
    loop {
        let now = Instant::now();
        driver.probe_due(now).await;
        driver.choose(Instant::now());
        let wake = driver.next_wake(Instant::now());
        // Cancel-safe: channel receives and a timer lose nothing when another branch wins.
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Direct(addr, kind)) => {
                    driver.add(Via::Direct(canonical(addr)), kind, Instant::now());
                }
                Some(Command::Offered(addr)) => {
                    let now = Instant::now();
                    // One new offered path per OFFER_EVERY, and only a routable unicast
                    // address: a hostile peer cannot aim our probes at a list of victims.
                    let fresh = !driver.paths.iter().any(|p| matches!(p.via, Via::Direct(a) if a == addr));
                    if routable(addr) && (!fresh || driver.may_adopt(now)) {
                        driver.add(Via::Direct(addr), PathKind::Direct, now);
                    }
                }
                Some(Command::Seen(addr)) => {
                    let now = Instant::now();
                    if routable(addr) && driver.quiet(now) && driver.current().is_some() && driver.may_adopt(now) {
                        driver.add(Via::Direct(addr), PathKind::Direct, now);
                    }
                }
                Some(Command::Carrier(slot, carrier)) => {
                    let kind = carrier.kind();
                    driver.add(Via::Carrier(slot, carrier), kind, Instant::now());
                }
                Some(Command::CarriedReply(slot, data, at)) => {
                    driver.heard(|via| matches!(via, Via::Carrier(s, _) if *s == slot), &data, at);
                }
                None => return,
            },
            reply = replies.recv() => match reply {
                Ok((from, data)) if wire::is_authenticated_reply(&data) => {
                    let from = canonical(from);
                    driver.heard(|via| matches!(via, Via::Direct(a) if *a == from), &data, Instant::now());
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

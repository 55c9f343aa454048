//! Meeting by code through a rendezvous: both ends of the exchange, then the punch.
//!
//! ```text
//! receiver                      rendezvous                      sender
//!  open ───────────────────────▶ nameplate 7
//!  ◀─── opened 7 ─────────────
//!  pake(code) ─────────────────▶              ◀──────────────── join 7, pake(code)
//!  ◀─── paired: B's pake, A's own address ─┴─ paired: A's pake, B's own address ───▶
//!  seal(hello A) ──────────────▶ relayed ────────────────────────▶ open → A's fingerprint,
//!  open → B's fingerprint,  ◀──── relayed ◀─────────────────────── seal(hello B)   addresses
//!    addresses
//!  punch B ════════════════ authenticated probes both ways at once ═════════ punch A
//!  ticket for B                                                    QUIC to the answered
//!  ◀══════════════════ QUIC, TLS pinned to A's fingerprint ═════════ address, pinned
//! ```
//!
//! The rendezvous gives no peer addresses: before the PAKE anyone who joins would learn
//! them, and a rendezvous could name any address it likes. Each side puts its own public
//! address (as the rendezvous saw it) into its hello, sealed under the PAKE's keys with its
//! LAN and IPv6 addresses and its NAT behaviour, so only someone who knows the code can read
//! or write them. Punching starts as soon as the peer's hello opens (or, if the peer's
//! authenticated probes arrive first, at once toward them), with probes and replies tagged
//! under keys from the PAKE ([`crate::traverse`]'s authenticated mode), and the hellos pick
//! the strategy: ordinary simultaneous punching, or the birthday technique when exactly one
//! side's NAT maps per destination. A hello that does not open means a wrong code or
//! tampering: that side says so through the rendezvous, and the nameplate is already gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::candidates::{self, Interface};
use super::code::{Code, Nameplate};
use super::pake::{self, Hello, Pake, PakeError, Role, SessionKeys};
pub use super::strategy::MeetConfig;
use super::strategy::{self, BirthdayRole};
use crate::addr::canonical;
use crate::driver::{self, DriveError, Update};
use crate::identity::Fingerprint;
use crate::nat::Mapping;
use crate::node::{Node, NodeConfig, NodeError, PeerConnection};
use crate::path::{PathKind, PeerPaths, SwitchReason};
use crate::rendezvous::{ClientError, Exchange, Paired, RendezvousClient};
use crate::traverse::{Birthday, Kind, Path, Traversal};
use crate::turn::{TurnAllocation, TurnCarrier};

/// How long a side that found the path keeps probing it for the other side's benefit.
const BEACON: Duration = Duration::from_secs(3);
/// How long a finished exchange waits for the rendezvous to acknowledge our last message.
const FINISH: Duration = Duration::from_secs(5);
/// How long our hello waits for the router's port mapping, if it has not settled yet. The
/// mapper starts when the node is bound, so by the time a peer is paired a gateway on the
/// LAN has long answered; a silent one costs at most this.
const MAPPING_WAIT: Duration = Duration::from_millis(50);

/// What a meeting tells the user interface on the way.
pub trait MeetEvents: Send + Sync {
    /// Receiver: a code is ready to be passed on.
    fn code(&self, _code: &Code, _expires: Duration) {}
    /// The rendezvous paired us with a peer (its addresses come with its sealed hello).
    fn paired(&self, _nameplate: &Nameplate) {}
    /// The peer's sealed hello opened: its addresses and NAT behaviour are known.
    fn hello(&self, _hello: &Hello) {}
    /// A path was found.
    fn punched(&self, _path: &Path, _kind: PathKind) {}
    /// Something surprising that does not stop the meeting (a port mapping not offered).
    fn warning(&self, _message: &str) {}
}

/// [`MeetEvents`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl MeetEvents for Silent {}

/// Why a meeting failed.
#[derive(Debug, thiserror::Error)]
pub enum MeetError {
    /// The rendezvous failed or refused.
    #[error(transparent)]
    Rendezvous(#[from] ClientError),
    /// The peer's hello did not open under our keys.
    #[error(
        "the code did not match: it was mistyped, or someone tampered with the exchange. \
         It cannot be used again: ask for a new code"
    )]
    WrongCode,
    /// The peer reported a failure (its words, escaped).
    #[error("the other side gave up: {}", crate::text::peer(.0))]
    PeerFailed(String),
    /// No direct path could be found in time.
    #[error(
        "no direct path between the peers: this side's NAT mapping is {}, the other side's is {}. {}",
        .ours.as_str(), .theirs.as_str(), strategy::advice(*.ours, *.theirs)
    )]
    NoPath {
        /// This side's mapping behaviour.
        ours: Mapping,
        /// The peer's, from its hello.
        theirs: Mapping,
    },
    /// The PAKE or the hello could not be built.
    #[error("meeting protocol: {0}")]
    Pake(#[from] PakeError),
    /// Sockets or QUIC failed.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// A meeting that found its path, on the sender's side.
#[derive(Debug)]
pub struct Met {
    /// The connection, pinned to the fingerprint the code confirmed.
    pub peer: PeerConnection,
    /// The path that carried a probe and its reply (`None` when the connection started on
    /// the relay before any direct path answered).
    pub path: Option<Path>,
    /// The kind of path the connection started on.
    pub method: PathKind,
    /// The peer's hello.
    pub hello: Hello,
    /// When the birthday technique won on this side, the node on the winning socket:
    /// keep it as long as the connection is used.
    pub node: Option<Arc<Node>>,
    /// The peer's paths under the connection (direct, relayed, and any found later): keep
    /// them as long as the connection is used; their events say when it moves.
    pub paths: Option<PeerPaths>,
    /// The direct path runs through a port a router forwards: the address that answered is
    /// the peer's mapped one, or we offered one and the path is direct across the internet
    /// (then it may also have come through our NAT's own mapping; the dialling side knows
    /// for sure).
    pub port_mapped: bool,
}

/// A meeting that found its path, on the receiver's side (the sender connects to us).
#[derive(Debug)]
pub struct Welcomed {
    /// The code that was used.
    pub code: Code,
    /// Who is coming: the fingerprint its hello showed (it now holds a ticket).
    pub sender: Fingerprint,
    /// The path our probes proved (`None` when the meeting went on over the relay).
    pub path: Option<Path>,
    /// The kind of path the sender's connection will start on.
    pub method: PathKind,
    /// When the birthday technique won on this side: the node on the winning socket,
    /// which must accept the sender's connection (serve it like the main node).
    pub node: Option<Arc<Node>>,
    /// The sender's paths under its coming connection: keep them as long as it is served.
    pub paths: Option<PeerPaths>,
    /// The direct path runs through a port a router forwards: the address that answered is
    /// the peer's mapped one, or we offered one and the path is direct across the internet
    /// (then it may also have come through our NAT's own mapping; the dialling side knows
    /// for sure).
    pub port_mapped: bool,
}

/// Everything a meeting needs on one side: our node and its connection to the
/// rendezvous, our NAT's mapping behaviour (from [`crate::natcheck::check`]), how to punch,
/// and whom to tell.
pub struct Meeting<'a> {
    /// Our node: the socket the rendezvous saw, which the peer connection will use.
    pub node: &'a Arc<Node>,
    /// Our connection to the rendezvous.
    pub rendezvous: &'a RendezvousClient,
    /// Our NAT's mapping behaviour.
    pub nat: Mapping,
    /// How to punch.
    pub config: MeetConfig,
    /// Whom to tell.
    pub events: &'a dyn MeetEvents,
    /// A TURN server of the user's own (static credentials from `config.toml`): both sides
    /// allocate on theirs and relay through them when no direct path is found (credentials
    /// the rendezvous mints for the pairing take precedence).
    pub turn: Option<&'a crate::turn::TurnServer>,
}

impl Meeting<'_> {
    /// Sender: meet the receiver behind `code`, punch, and connect with the receiver's
    /// confirmed fingerprint pinned.
    pub async fn dial(&self, code: &Code) -> Result<Met, MeetError> {
        // Listen before anyone can know where we are: the receiver's first probe may
        // arrive before the rendezvous's answer does.
        let heard = driver::Heard::subscribe(self.node.socket());
        let (pake, message) = Pake::start(code, Role::Sender, &mut rand::rng());
        let (mut exchange, paired) = self.rendezvous.join(code.nameplate(), &message).await?;
        self.events.paired(code.nameplate());
        let keys = pake
            .finish(&paired.pake)
            .map_err(|_| MeetError::WrongCode)?;
        let found = self.meet(&mut exchange, keys, &paired, heard, |_| {}).await;
        finish(exchange, found.is_err()).await;
        let found = found?;
        if let Some(path) = &found.path {
            self.events.punched(path, found.method);
        }
        // A birthday path is dialled directly, from its own node when it is ours; every other
        // way goes through the peer's mapped address, so the connection can move between
        // paths.
        let fingerprint = Some(found.hello.fingerprint);
        let connecting = found.node.as_deref().unwrap_or(self.node);
        let peer = match (&found.paths, &found.path) {
            (Some(paths), _) => connecting.connect(paths.mapped(), fingerprint).await?,
            (None, Some(path)) => connecting.connect(path.peer, fingerprint).await?,
            (None, None) => unreachable!("a meeting finds a path or the relay"),
        };
        Ok(Met {
            peer,
            path: found.path,
            method: found.method,
            hello: found.hello,
            node: found.node,
            paths: found.paths,
            port_mapped: found.port_mapped,
        })
    }

    /// Receiver: open a nameplate (the one in `chosen`, or any), announce the code through
    /// the events, wait up to `ttl` for a sender, meet it, and `admit` it (a one-time
    /// ticket, e.g. [`crate::transfer::Receiver::admit`]). Returns once our probes found
    /// the path; the sender then connects.
    pub async fn welcome(
        &self,
        chosen: Option<&Code>,
        ttl: Duration,
        admit: &(dyn Fn(Fingerprint, Duration) + Send + Sync),
    ) -> Result<Welcomed, MeetError> {
        let (mut exchange, opened) = self
            .rendezvous
            .open(chosen.map(|c| c.nameplate()), ttl)
            .await?;
        let code = match chosen {
            Some(code) => code.clone(),
            None => Code::generate(opened.nameplate, &mut rand::rng()),
        };
        let (pake, message) = Pake::start(&code, Role::Receiver, &mut rand::rng());
        let heard = driver::Heard::subscribe(self.node.socket());
        exchange.pake(&message).await?;
        self.events.code(&code, opened.expires);
        let paired = exchange.paired().await?;
        self.events.paired(code.nameplate());
        let keys = pake
            .finish(&paired.pake)
            .map_err(|_| MeetError::WrongCode)?;
        // The ticket must exist before the sender can connect: the sender dials as soon as
        // its own probes are answered, which may be before ours are.
        let ticket_ttl = self.config.ticket_ttl;
        let found = self
            .meet(&mut exchange, keys, &paired, heard, |hello| {
                admit(hello.fingerprint, ticket_ttl)
            })
            .await;
        finish(exchange, found.is_err()).await;
        let found = found?;
        if let Some(path) = &found.path {
            self.events.punched(path, found.method);
        }
        Ok(Welcomed {
            code,
            sender: found.hello.fingerprint,
            path: found.path,
            method: found.method,
            node: found.node,
            paths: found.paths,
            port_mapped: found.port_mapped,
        })
    }
}

/// End our side of the exchange. After a failed meeting the caller may exit at once (the
/// CLI does): wait, at most [`FINISH`], until the rendezvous has our last messages (our
/// sealed hello, why we gave up), or the peer never learns that the code was wrong. After a
/// success, let that happen in the background.
async fn finish(exchange: Exchange, failed: bool) {
    if failed {
        exchange.finish(FINISH).await;
    } else {
        tokio::spawn(exchange.finish(FINISH));
    }
}

/// What [`meet`] found.
struct Found {
    path: Option<Path>,
    method: PathKind,
    hello: Hello,
    node: Option<Arc<Node>>,
    paths: Option<PeerPaths>,
    /// The punched path runs through a router's port mapping: the address that answered
    /// is the one the peer offered as mapped, or we offered one and the path is direct
    /// across the internet (then it may also have come through our NAT's own mapping;
    /// the dialling side knows for sure).
    port_mapped: bool,
}

impl Meeting<'_> {
    /// Both sides after pairing: punch at once, swap sealed hellos (`on_hello` sees the
    /// peer's as soon as it opens), pick the strategy, and wait for the first path.
    async fn meet(
        &self,
        exchange: &mut Exchange,
        mut keys: SessionKeys,
        paired: &Paired,
        heard: driver::Heard,
        on_hello: impl FnOnce(&Hello),
    ) -> Result<Found, MeetError> {
        let (node, ours, config, events) = (self.node, self.nat, self.config, self.events);
        let probe_keys = keys.probe_keys();
        // The peer may open our hello before we open its own, and probe at once: answer
        // (and count) its authenticated probes from now on. Nobody else's count.
        let answering = node.socket().authenticate(probe_keys.clone());
        // The peer's paths under the coming connection. From now on, a probe of the peer's
        // from an address we did not know ties that address to the peer (see
        // `PeerPaths`), so its QUIC packets from there reach the connection.
        let paths = PeerPaths::new(node.paths(), probe_keys.clone(), config.paths);
        // No candidates yet: addresses come only from the sealed hello, or from the peer's
        // authenticated probes (a triggered check each), whichever arrives first.
        let (updates, receive_updates) = mpsc::unbounded_channel();
        let traversal = Traversal::authenticated(
            config.traverse,
            Instant::now(),
            rand::random(),
            probe_keys.clone(),
        );
        let socket = node.socket().clone();
        let mut punching = AbortOnDrop(tokio::spawn(async move {
            driver::traverse_heard(&socket, traversal, receive_updates, heard).await
        }));

        let ifaces = candidates::interfaces();
        // All bounded: a silent router or STUN server costs MAPPING_WAIT at most, a TURN
        // allocation its own bound.
        let (mapped, reflexive, turn) = tokio::join!(
            self.mapped_port(paired.observed),
            node.stun_reflexive(MAPPING_WAIT),
            self.allocate(paired)
        );
        let relayed_at = turn.as_ref().map(|t| t.relayed());
        let hello = own_hello(
            node,
            keys.role(),
            paired.observed,
            ours,
            &ifaces,
            Extra {
                mapped,
                reflexive: &reflexive,
                relayed: relayed_at,
            },
        )?;
        exchange.seal(&keys.seal(&hello)?).await?;
        let peer_hello = match exchange.sealed().await? {
            Ok(sealed) => match keys.open(&sealed) {
                Ok(peer_hello) => peer_hello,
                Err(_) => {
                    let _ = exchange.fail("the code did not match").await;
                    return Err(MeetError::WrongCode);
                }
            },
            Err(reason) => return Err(MeetError::PeerFailed(reason)),
        };
        on_hello(&peer_hello);
        events.hello(&peer_hello);
        // The peer's public address, as it sealed it: what the rendezvous told *it*.
        let peer_public = public_of(&peer_hello, paired.observed, &ifaces);
        let (theirs, peer_mapped) = candidates::nat_of(&peer_hello);
        let peer_mapped = peer_mapped.map(canonical);
        // The peer's TURN relayed address is reached through our own allocation only.
        let peer_turn = candidates::turn_of(&peer_hello).map(canonical);
        let mut offered: Vec<(SocketAddr, Kind)> = peer_hello
            .candidates
            .iter()
            .filter(|&&candidate| Some(canonical(candidate)) != peer_turn)
            .map(|&candidate| {
                let candidate = canonical(candidate);
                let kind = match candidates::kind_of(candidate, &ifaces) {
                    Kind::Host if Some(candidate) == peer_mapped => Kind::Mapped,
                    Kind::Host if Some(candidate) == peer_public => Kind::Reflexive,
                    kind => kind,
                };
                (candidate, kind)
            })
            .collect();
        // Best first: the traversal probes the first one it learns at once and paces the
        // rest, so a private address of the peer's must not delay its public one.
        offered.sort_by_key(|&(_, kind)| kind);
        for (candidate, kind) in offered {
            let _ = updates.send(Update::Candidate(candidate, kind));
        }
        let any_mapped = mapped.is_some() || peer_mapped.is_some();
        let strategy = strategy::choose_with(ours, theirs, any_mapped, &config);
        let mut birthday = None;
        match (strategy.birthday, peer_public) {
            (Some(BirthdayRole::Hunt), Some(peer_public)) => {
                let _ = updates.send(Update::Birthday(Birthday::toward(peer_public.ip())));
            }
            (Some(BirthdayRole::Hold { sockets }), Some(peer_public)) => {
                let bind = SocketAddr::new(
                    if peer_public.is_ipv4() {
                        std::net::Ipv4Addr::UNSPECIFIED.into()
                    } else {
                        std::net::Ipv6Addr::UNSPECIFIED.into()
                    },
                    0,
                );
                let traverse = config.traverse;
                let keys = Some(probe_keys.clone());
                birthday = Some(AbortOnDrop(tokio::spawn(async move {
                    driver::birthday(bind, peer_public, sockets, traverse, keys).await
                })));
            }
            // No public address of the peer's family: ordinary punching only.
            _ => {}
        }
        let patience = strategy.patience;
        let relayed = self.relay(paired, turn, peer_turn);
        // Time to first byte is not held hostage by punching: unless the birthday technique
        // is in play (its sockets cannot move under a connection; both sides know it from
        // the same two NAT types), the relay gets a head start.
        let head_start = (relayed.is_some() && strategy.birthday.is_none()).then_some(RELAY_AFTER);
        let no_path = MeetError::NoPath { ours, theirs };
        let first = tokio::time::timeout(patience, async {
        // Cancel-safe: polling a JoinHandle again after another branch won loses nothing,
        // and the relay branch only reads the paths' state.
        tokio::select! {
            joined = &mut punching.0 => match joined {
                Ok((Ok(path), _)) => Some(Won::Punched(path, None)),
                _ => None,
            },
            joined = async { (&mut birthday.as_mut().expect("guarded").0).await }, if birthday.is_some() => match joined {
                Ok(Ok((socket, path))) => Some(Won::Punched(path, Some(socket))),
                _ => None,
            },
            kind = relay_ready(&paths, head_start, relayed.as_ref()), if head_start.is_some() => kind.map(Won::Relayed),
        }
    })
    .await;
        let won = match first {
            Ok(Some(won)) => won,
            // One branch gave up: the other may still be running (birthday after a quick
            // failure of the ordinary punch, or the reverse), and the relay may answer.
            Ok(None) => match second_chance(&mut punching, &mut birthday, patience).await {
                Some((path, socket)) => Won::Punched(path, socket),
                None => match relay_ready(&paths, Some(Duration::ZERO), relayed.as_ref()).await {
                    Some(kind) => Won::Relayed(kind),
                    None => return Err(no_path),
                },
            },
            Err(_) => match relay_ready(&paths, Some(Duration::ZERO), relayed.as_ref()).await {
                Some(kind) => Won::Relayed(kind),
                None => return Err(no_path),
            },
        };
        let (path, socket) = match won {
            Won::Punched(path, socket) => (path, socket),
            Won::Relayed(kind) => {
                // The peer's addresses stay candidates: the paths probe them from time to
                // time, both ways, which punches again should the way open later (a
                // firewall rule lifted, a punch that needed longer than the traversal).
                for &candidate in &peer_hello.candidates {
                    let candidate = canonical(candidate);
                    if Some(candidate) == peer_turn {
                        continue;
                    }
                    let lan = candidates::kind_of(candidate, &ifaces) == Kind::Lan;
                    let kind = if lan { PathKind::Lan } else { PathKind::Direct };
                    paths.add_direct(candidate, kind);
                }
                // The punch goes on behind the connection: a direct path it finds later is
                // handed to the paths, which move the connection once it is steady.
                let ifaces = ifaces.clone();
                let found = paths.adder();
                paths.hold(tokio::spawn(async move {
                    if let Ok((Ok(path), _)) = (&mut punching.0).await {
                        found.add_direct(path.peer, kind_of(&path, &ifaces));
                    }
                }));
                paths.hold(tokio::spawn(async move {
                    // The answering registration lives as long as the paths do.
                    std::future::pending::<()>().await;
                    drop(answering);
                }));
                return Ok(Found {
                    path: None,
                    method: kind,
                    hello: peer_hello,
                    node: None,
                    paths: Some(paths),
                    port_mapped: false,
                });
            }
        };
        let (method, side) = match socket {
            Some(socket) => {
                let config = NodeConfig {
                    accept: keys.role() == Role::Receiver,
                    ..node.config().clone()
                };
                let side = Arc::new(Node::new(socket, config)?);
                (PathKind::Birthday, Some(side))
            }
            None => (kind_of(&path, &ifaces), None),
        };
        // Our probes found the path; the peer's may not have yet (it may not have been
        // listening when ours arrived). Keep showing it the way for a few seconds.
        // Our socket keeps answering the peer's authenticated probes for as long as its own
        // traversal may run.
        let winner = side.as_ref().unwrap_or(node).socket().clone();
        let answering_winner = winner.authenticate(probe_keys.clone());
        let linger = config.traverse.timeout;
        let peer = path.peer;
        tokio::spawn(async move {
            driver::beacon(winner, peer, BEACON, Some(probe_keys)).await;
            tokio::time::sleep(linger.saturating_sub(BEACON)).await;
            drop((answering, answering_winner));
        });
        let paths = match side {
            // A birthday socket is not under the path layer: its node (ours, or the peer's
            // behind the hunted port) is dialled directly, so the paths, and the addresses
            // they tie to the peer, go.
            _ if method == PathKind::Birthday => None,
            Some(_) => None,
            None => {
                paths.add_direct(path.peer, method);
                // The path just answered our probes: it answers the paths' own at once.
                paths.first_path(FIRST_PATH).await;
                // Now the relay, as the fallback should this path die.
                if let Some(relay) = &relayed {
                    relay.attach(&paths);
                }
                Some(paths)
            }
        };
        let port_mapped = Some(canonical(path.peer)) == peer_mapped
            || (mapped.is_some() && method == PathKind::Direct);
        Ok(Found {
            path: Some(path),
            port_mapped,
            method: paths
                .as_ref()
                .and_then(|p| p.current())
                .map_or(method, |c| c.kind),
            hello: peer_hello,
            node: side,
            paths,
        })
    }

    /// The port our router forwards to us, to offer in our hello: waited for at most
    /// [`MAPPING_WAIT`], and only when it names the public address the rendezvous saw us
    /// at (anything else would aim the peer's probes at somebody else).
    async fn mapped_port(&self, observed: SocketAddr) -> Option<SocketAddr> {
        let mapped = self.node.port_mapper()?.settled(MAPPING_WAIT).await?;
        match crate::portmap::vet::agrees_with(mapped.external, observed) {
            Ok(()) => Some(canonical(mapped.external)),
            Err(refused) => {
                let message = format!(
                    "the router's port mapping ({}) is not offered: {refused}",
                    mapped.protocol
                );
                tracing::warn!("{message}");
                self.events.warning(&message);
                None
            }
        }
    }

    /// The relays for this pairing: our rendezvous's, when it granted one, and a TURN
    /// server's, when both sides allocated on one.
    fn relay(
        &self,
        paired: &Paired,
        turn: Option<TurnAllocation>,
        peer_turn: Option<SocketAddr>,
    ) -> Option<PendingRelay> {
        let ours = paired.relay.as_ref().map(|_| OurRelay {
            link: self.rendezvous.relay_link(),
            rendezvous: self.rendezvous.clone(),
            observed: paired.observed,
        });
        let turn = match (turn, peer_turn) {
            (Some(turn), Some(peer)) if crate::turn::plausible_relayed(peer) => {
                Some(Arc::new(turn.carrier(peer)))
            }
            (Some(_), _) => {
                // Dropping the allocation deletes it on the server.
                tracing::info!("the peer offers no TURN relayed address: ours is not used");
                None
            }
            (None, Some(_)) => {
                tracing::info!("the peer offers a TURN relayed address, but we have no allocation");
                None
            }
            (None, None) => None,
        };
        if ours.is_none() && turn.is_none() {
            return None;
        }
        Some(PendingRelay {
            ours,
            turn,
            attached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A relayed address on a TURN server, when we have one to use: credentials the
    /// rendezvous minted for this pairing, else the user's own. Waits at most
    /// [`TURN_WAIT`]; a failure is a warning (the meeting goes on without it).
    async fn allocate(&self, paired: &Paired) -> Option<TurnAllocation> {
        let minted = match &paired.turn {
            Some(grant) => match grant.server() {
                Some(server) => Some(server),
                None => {
                    let message = format!(
                        "the rendezvous offers a TURN server this qpunch cannot use: {}",
                        crate::text::peer(&grant.url)
                    );
                    tracing::warn!("{message}");
                    self.events.warning(&message);
                    None
                }
            },
            None => None,
        };
        let server = minted.as_ref().or(self.turn)?;
        match TurnAllocation::allocate(server, TURN_WAIT).await {
            Ok(allocation) => Some(allocation),
            Err(e) => {
                let message = format!("no TURN relay: {e}");
                tracing::warn!("{message}");
                self.events.warning(&message);
                None
            }
        }
    }
}

/// How long our hello waits for a TURN allocation: two round trips to the server (the
/// first Allocate is always refused for its nonce), with room for one lost packet.
const TURN_WAIT: Duration = Duration::from_secs(3);

/// Our rendezvous's relay, granted for the pairing.
struct OurRelay {
    link: crate::rendezvous::RelayLink,
    rendezvous: RendezvousClient,
    observed: SocketAddr,
}

/// A relay granted for the pairing, not yet among the peer's paths: it joins them once the
/// race is decided (a punched path is chosen first, so a small transfer is not stuck on
/// the relay for the settle time), or when punching has had its head start.
struct PendingRelay {
    ours: Option<OurRelay>,
    turn: Option<Arc<TurnCarrier>>,
    attached: std::sync::atomic::AtomicBool,
}

impl PendingRelay {
    /// Add the relays to `paths` (once), with their readers, and keep our public address in
    /// our relayed probes.
    fn attach(&self, paths: &PeerPaths) {
        if self
            .attached
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some(turn) = &self.turn {
            let inbound = paths.add_relay(turn.clone());
            let turn = turn.clone();
            paths.hold(tokio::spawn(async move {
                // Cancel-safe: `recv` loses no datagram when dropped.
                while let Some(datagram) = turn.recv().await {
                    inbound.deliver(datagram);
                }
            }));
        }
        if let Some(ours) = &self.ours {
            ours.attach(paths);
        }
    }
}

impl OurRelay {
    fn attach(&self, paths: &PeerPaths) {
        let link = self.link.clone();
        let inbound = paths.add_relay(Arc::new(link.clone()));
        paths.hold(tokio::spawn(async move {
            // Cancel-safe: `recv` loses no datagram when dropped.
            while let Some(datagram) = link.recv().await {
                inbound.deliver(datagram);
            }
        }));
        // Our public address rides in our relayed probes; when we fall back to the relay
        // (our network changed under us, most likely), the rendezvous tells us the new one.
        paths.set_reflexive(self.observed);
        let (rendezvous, adder, mut moves) =
            (self.rendezvous.clone(), paths.adder(), paths.events());
        paths.hold(tokio::spawn(async move {
            loop {
                // Cancel-safe: a broadcast receive.
                match moves.recv().await {
                    Ok(moved)
                        if moved.reason == SwitchReason::CurrentDead && moved.kind.is_relayed() =>
                    {
                        // The new mapping may take a moment to settle: ask again later too.
                        for wait in [0, 2, 5] {
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                            if let Ok(welcome) = rendezvous.info().await {
                                adder.set_reflexive(welcome.observed);
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        }));
    }
}

/// What won the race after pairing.
enum Won {
    Punched(Path, Option<std::net::UdpSocket>),
    Relayed(PathKind),
}

/// How long the relay lets punching try alone before the connection starts relayed.
pub const RELAY_AFTER: Duration = Duration::from_millis(300);
/// How long a just-proven direct path may take to answer the paths' own probes.
const FIRST_PATH: Duration = Duration::from_secs(1);

/// After `after`, the kind of path the peer's paths chose, once they chose one (`None` when
/// there is no relay to wait for).
async fn relay_ready(
    paths: &PeerPaths,
    after: Option<Duration>,
    relay: Option<&PendingRelay>,
) -> Option<PathKind> {
    let relay = relay?;
    tokio::time::sleep(after?).await;
    relay.attach(paths);
    paths
        .first_path(Duration::from_secs(5))
        .await
        .map(|event| event.kind)
}

/// The kind of a punched path, judged by the address that answered (a candidate first
/// probed as the peer's public address may turn out to be on our own network).
fn kind_of(path: &Path, ifaces: &[Interface]) -> PathKind {
    if path.kind == Kind::Birthday {
        PathKind::Birthday
    } else if candidates::kind_of(path.peer, ifaces) == Kind::Lan {
        PathKind::Lan
    } else {
        PathKind::Direct
    }
}

type Birthdays = Option<AbortOnDrop<Result<(std::net::UdpSocket, Path), DriveError>>>;
type Punching = AbortOnDrop<(
    Result<Path, crate::traverse::TraverseError>,
    crate::traverse::TraverseStats,
)>;

/// After one strategy failed, wait for the other (if it is still running).
async fn second_chance(
    punching: &mut Punching,
    birthday: &mut Birthdays,
    patience: Duration,
) -> Option<(Path, Option<std::net::UdpSocket>)> {
    let wait = async {
        if !punching.0.is_finished()
            && let Ok((Ok(path), _)) = (&mut punching.0).await
        {
            return Some((path, None));
        }
        match birthday {
            Some(task) if !task.0.is_finished() => match (&mut task.0).await {
                Ok(Ok((socket, path))) => Some((path, Some(socket))),
                _ => None,
            },
            _ => None,
        }
    };
    tokio::time::timeout(patience, wait).await.ok().flatten()
}

/// A task aborted when dropped: a meeting that ends (found a path, or failed) stops every
/// probe it started.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The peer's public address from its hello: the last candidate (its hello puts its
/// reflexive address last) of our own public address's family that is not on our networks.
fn public_of(hello: &Hello, ours: SocketAddr, ifaces: &[Interface]) -> Option<SocketAddr> {
    let ours = canonical(ours);
    let family = |a: &SocketAddr| a.is_ipv4() == ours.is_ipv4();
    hello
        .candidates
        .iter()
        .map(|&c| canonical(c))
        .filter(family)
        .rfind(|&c| candidates::kind_of(c, ifaces) != Kind::Lan)
}

/// The candidates beyond our interfaces and the rendezvous's view of us.
struct Extra<'a> {
    /// The port our router forwards.
    mapped: Option<SocketAddr>,
    /// What STUN servers saw.
    reflexive: &'a [SocketAddr],
    /// Our TURN allocation's relayed address.
    relayed: Option<SocketAddr>,
}

/// Our hello: fingerprint, addresses (LAN first, then the router's mapped port if any, our
/// TURN relayed address if any, then what STUN servers saw where it differs, the public
/// one last), NAT behaviour (and which candidates are mapped and relayed, see
/// [`candidates::nat_token`] and [`candidates::with_turn`]).
///
/// A STUN server's answer (`reflexive`, vetted by [`crate::stun`]) only ever adds a
/// candidate here: the peer probes it before using it, and our connection's path is never
/// taken from it.
fn own_hello(
    node: &Node,
    role: Role,
    observed: SocketAddr,
    ours: Mapping,
    ifaces: &[Interface],
    extra: Extra,
) -> Result<Hello, MeetError> {
    let Extra {
        mapped,
        reflexive,
        relayed,
    } = extra;
    let local = node.local_addr().map_err(NodeError::from)?;
    let observed = canonical(observed);
    let mut addrs = candidates::host_candidates(local, ifaces, observed.ip().is_loopback());
    let mut mapped_at = None;
    if let Some(mapped) = mapped {
        if let Some(at) = addrs.iter().position(|&a| a == mapped) {
            mapped_at = Some(at);
        } else {
            mapped_at = Some(addrs.len());
            addrs.push(mapped);
        }
    }
    let mut relayed_at = None;
    let observed_room = usize::from(!addrs.contains(&observed));
    if let Some(relayed) = relayed.map(canonical)
        && !addrs.contains(&relayed)
        // Only with room for it and the public address, which must stay last.
        && addrs.len() + 1 + observed_room <= pake::MAX_CANDIDATES
    {
        relayed_at = Some(addrs.len());
        addrs.push(relayed);
    }
    candidates::add_reflexive(&mut addrs, reflexive, observed);
    if !addrs.contains(&observed) {
        addrs.push(observed);
    }
    addrs.truncate(pake::MAX_CANDIDATES);
    Ok(Hello {
        version: pake::VERSION,
        role,
        fingerprint: node.fingerprint(),
        candidates: addrs,
        nat: candidates::with_turn(candidates::nat_token(ours, mapped_at), relayed_at),
    })
}

//! Receiving: listen, hand out one-time codes (through a rendezvous or on the LAN), let
//! in who the consent policy allows, store verified files, stop cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::consent::Accept;
use super::events::FileEvents;
use super::{DEFAULT_PORT, Event, Events, Share, ShareError, canonical, meeting, net};
use crate::meet::code::Code;
use crate::meet::guesses::{self, GuessBudget};
use crate::meet::lan::{self, Desk, Door, Lan, Outcome};
use crate::meet::{MeetConfig, MeetError, Meeting};
use crate::node::{self, Congestion, Node, NodeConfig, NodeError, PeerConnection};
use crate::rendezvous::{ClientError, ErrorCode};
use crate::server::{Limits, Server};
use crate::transfer::{
    self, FileReport, Observer, Policy, ReceiveEvents, ReceiveOptions, Receiver, TransferError,
};

/// The options of a receiver (those of `qpunch receive`).
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Where files go; it must exist. Nothing is ever written outside it.
    pub out_dir: PathBuf,
    /// The address to bind; `None` binds every address (IPv6 and IPv4) on `port`.
    pub bind: Option<SocketAddr>,
    /// The UDP port when `bind` is `None` (0 picks a free one).
    pub port: u16,
    /// Who may send (see [`Accept::policy`]).
    pub accept: Accept,
    /// The rendezvous to hand out codes through (`HOST[:PORT]`). Without one, codes are
    /// announced on the LAN (mDNS), unless bound to loopback only.
    pub rendezvous: Option<String>,
    /// How to reach the rendezvous: UDP, TCP, or UDP then TCP (the default).
    pub rendezvous_connect: crate::rendezvous::ConnectOptions,
    /// The first code to use instead of a generated one.
    pub code: Option<Code>,
    /// How long each code stays valid.
    pub code_ttl: Duration,
    /// Serve one accepted transfer, then return.
    pub once: bool,
    /// Replace existing files instead of saving as `name (1).ext`.
    pub overwrite: bool,
    /// Remove partial files (kept for resumes) untouched for this long when starting.
    pub partial_max_age: Duration,
    /// Keep file names that start with `.` (else `.x` is saved as `_x`).
    pub allow_dotfiles: bool,
    /// Connection budgets of the accept loop.
    pub limits: Limits,
    /// Give up on a sender that moves no data for this long.
    pub stall_timeout: Duration,
    /// Cut off a sender slower than this many bytes per second.
    pub min_rate: u64,
    /// The congestion controller of the receiver's connections (it only paces what the
    /// receiver sends; the sender's sets the speed).
    pub congestion: Congestion,
    /// Write the one accepted file here rather than into `out_dir` (see
    /// [`ReceiveOptions::sink`]).
    pub sink: Option<transfer::Sink>,
    /// Ask the router to forward our port (PCP, NAT-PMP, UPnP IGD; see
    /// [`crate::portmap`]). Never on a loopback bind.
    pub port_mapping: bool,
    /// STUN servers (`HOST[:PORT]`) to ask for our public address when handing out codes
    /// through a rendezvous: each distinct answer is one more candidate in our hello
    /// (see [`crate::stun_client::Discovery`]). Empty: none is asked.
    pub stun: Vec<String>,
    /// A TURN server of the user's own, for relaying when meeting by code finds no direct
    /// path (credentials the rendezvous mints take precedence).
    pub turn: Option<crate::turn::TurnServer>,
}

impl ReceiveConfig {
    /// Store into `out_dir`, on every address of [`DEFAULT_PORT`], asking nobody (set
    /// [`accept`](Self::accept)), everything else as `qpunch receive` has it.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        ReceiveConfig {
            out_dir: out_dir.into(),
            bind: None,
            port: DEFAULT_PORT,
            accept: Accept::default(),
            rendezvous: None,
            rendezvous_connect: Default::default(),
            code: None,
            code_ttl: Duration::from_secs(600),
            once: false,
            overwrite: false,
            partial_max_age: transfer::PARTIAL_MAX_AGE,
            allow_dotfiles: false,
            limits: Limits::default(),
            stall_timeout: transfer::STALL_TIMEOUT,
            min_rate: transfer::MIN_RATE,
            congestion: Congestion::default(),
            sink: None,
            port_mapping: true,
            stun: Vec::new(),
            turn: None,
        }
    }

    /// Whether codes are met on the LAN: announced by mDNS on the interfaces this
    /// receiver listens on. Bound to loopback only, there is no LAN to announce on (and
    /// the mDNS responder would still join the groups of every interface).
    pub fn lan_codes(&self) -> bool {
        self.rendezvous.is_none() && !self.bind.is_some_and(|b| b.ip().is_loopback())
    }

    /// The consent policy this receiver enforces, or why it cannot run: checked before
    /// anything is bound or created, so a front end can call it first.
    pub fn policy(&self) -> Result<Policy, ShareError> {
        let codes = self.rendezvous.is_some() || self.lan_codes();
        if self.code.is_some() && !codes {
            return Err(ShareError::CodeNeedsNetwork);
        }
        Ok(self.accept.policy(codes)?)
    }
}

impl Share {
    /// Receive until `stop` completes (or, with [`ReceiveConfig::once`], until one
    /// accepted transfer has ended). Returns whether the one transfer arrived verified
    /// (always `true` without `once`).
    pub async fn receive(
        &self,
        config: ReceiveConfig,
        stop: impl Future<Output = ()>,
    ) -> Result<bool, ShareError> {
        let policy = config.policy()?;
        if let Some(code) = &config.code {
            warn_if_reused(self.events.as_ref(), &code.to_string());
        }
        let lan_codes = config.lan_codes();
        let socket = match config.bind {
            Some(bind) => crate::socket::bind(bind)?,
            None => net::bind_dual_stack(config.port)?,
        };
        let mut node_config = NodeConfig {
            congestion: config.congestion,
            ..NodeConfig::new(self.identity.clone(), transfer::ALPN, true)
        };
        if lan_codes {
            // Senders holding a LAN code ask for the meet protocol first (see `lan::ALPN`).
            node_config.alpn.push(lan::ALPN.to_vec());
        }
        // Older files versions last, only to name them (see `transfer::version`).
        node_config
            .alpn
            .extend(transfer::version::OLD_ALPNS.iter().map(|a| a.to_vec()));
        let node = Arc::new(Node::new(socket, node_config)?);
        let served = Arc::new(Served {
            events: self.events.clone(),
            node: node.clone(),
        });
        let out = config.out_dir.clone();
        let receiver = Receiver::with_events(
            ReceiveOptions {
                overwrite: config.overwrite,
                stall_timeout: config.stall_timeout,
                min_rate: config.min_rate,
                allow_dotfiles: config.allow_dotfiles,
                once: config.once,
                partial_max_age: config.partial_max_age,
                sink: config.sink.clone(),
                ..ReceiveOptions::new(&out, policy)
            },
            served,
        )
        .map_err(ShareError::Transfer)?;
        let local = node.local_addr()?;
        self.emit(Event::Listening {
            local,
            addrs: net::reachable_addrs(local),
            fingerprint: node.fingerprint(),
            out_dir: out.clone(),
        });

        // Connections that negotiated the meet protocol prove a LAN code at the door
        // first; the rest go straight to the receiver. (Without LAN codes the node does
        // not offer the meet protocol, and the desk stays empty.)
        let desk = Desk::new();
        let door = Door::for_receiver(receiver.clone(), desk.clone(), node.fingerprint());
        let server = Server::new(node.clone(), door, config.limits);
        let server_stats = server.stats();
        // Nodes on other sockets that a birthday punch handed us: served like this one,
        // and stopped with it.
        let (stop_side, side_stopped) = tokio::sync::watch::channel(false);
        // Started here, owned here: the code loop is aborted at the end, then the
        // responder says goodbye for whatever is still announced.
        let lan = if lan_codes {
            let lan = Lan::start().map_err(|source| ShareError::Lan {
                what: "announce codes",
                source,
            })?;
            Some(Arc::new(lan))
        } else {
            None
        };
        let lan_loop = lan.clone().map(|lan| {
            let serving = LanCodes {
                events: self.events.clone(),
                node: node.clone(),
                desk: desk.clone(),
                out: out.clone(),
                first: config.code.clone(),
                ttl: config.code_ttl,
                once: config.once,
            };
            tokio::spawn(serving.run(lan))
        });
        let codes = config.rendezvous.clone().map(|name| {
            let serving = Codes {
                events: self.events.clone(),
                node: node.clone(),
                receiver: receiver.clone(),
                out: out.clone(),
                rendezvous: name,
                connect: config.rendezvous_connect,
                first: config.code.clone(),
                ttl: config.code_ttl,
                once: config.once,
                limits: config.limits,
                side_stopped,
                guesses: GuessBudget::default(),
                reregister: false,
                turn: config.turn.clone(),
            };
            tokio::spawn(serving.run())
        });
        if config.port_mapping {
            node.map_port(Default::default(), super::port_notices(self.events.clone()));
        }
        // Only a meeting through a rendezvous offers them (in the background, bounded).
        if config.rendezvous.is_some() {
            node.discover_stun(&config.stun);
        }
        let once = config.once;
        let stopped = async {
            // Cancel-safe: both branches only wait for a value.
            tokio::select! {
                ok = receiver.finished_once(), if once => ok,
                () = stop => false,
            }
        };
        // The server stops accepting when `stopped` completes, then waits for its
        // handlers: a transfer interrupted by `stop` is cut short (its partial files kept
        // or removed as the store decides).
        let (tx, rx) = tokio::sync::oneshot::channel();
        server
            .run(async {
                let _ = tx.send(stopped.await);
            })
            .await;
        let ok = rx.await.unwrap_or(false);
        if let Some(codes) = codes {
            codes.abort();
        }
        if let Some(lan_loop) = lan_loop {
            lan_loop.abort();
        }
        if let Some(lan) = &lan {
            lan.shutdown().await;
        }
        let _ = stop_side.send(true);
        node.close(node::QUICK_LINGER).await;
        node.release_port_mapping().await;
        self.emit(Event::Stats {
            socket: node.socket_stats(),
            server: Some(server_stats.get()),
            lan: lan.is_some().then(|| desk.stats()),
        });
        // Without `once` a receiver runs until told to stop: that is success.
        Ok(!once || ok)
    }
}

/// The receiver's callbacks as [`Event`]s.
struct Served {
    events: Arc<dyn Events>,
    node: Arc<Node>,
}

impl ReceiveEvents for Served {
    fn connected(&self, peer: &PeerConnection) -> Arc<dyn Observer> {
        let remote = peer.connection.remote_address();
        let conn = peer.connection.stable_id();
        if let Ok(local) = self.node.local_addr() {
            let path = net::path_to(remote);
            // Through our router's mapping only if the connection is on a direct path
            // across the internet (a sender met by code is behind the path layer's address
            // for it; a relayed one has no real address there).
            let real = self.node.paths().real_addr(remote);
            let direct = !crate::path::socket::is_mapped(real)
                && net::path_to(real) == crate::path::PathKind::Direct;
            let mapping = self.node.port_mapper().and_then(|m| m.current());
            self.events.event(Event::Connected {
                conn,
                peer: canonical(remote),
                fingerprint: peer.fingerprint,
                path,
                local,
                port_mapped: mapping.is_some() && direct,
            });
        }
        Arc::new(FileEvents {
            conn,
            events: self.events.clone(),
        })
    }

    fn finished(&self, peer: &PeerConnection, outcome: &Result<Vec<FileReport>, TransferError>) {
        self.events.event(Event::Finished {
            conn: peer.connection.stable_id(),
            fingerprint: peer.fingerprint,
            result: match outcome {
                Ok(reports) => Ok(reports.clone()),
                Err(e) => Err(e.to_string()),
            },
        });
        tracing::debug!(stats = ?self.node.socket_stats(), "socket counters");
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        // Scanners and strangers are counted in `Stats`, not reported one by one.
        tracing::info!(%remote, "incoming connection failed: {error}");
    }
}

/// Emit the [`Event::Code`] of a new code.
fn announce_code(
    events: &dyn Events,
    node: &Node,
    out: &std::path::Path,
    via: Option<&str>,
    code: &Code,
    expires: Duration,
) {
    if let Ok(local) = node.local_addr() {
        events.event(Event::Code {
            code: code.clone(),
            expires,
            via: via.map(str::to_string),
            local,
            addrs: net::reachable_addrs(local),
            fingerprint: node.fingerprint(),
            out_dir: out.to_path_buf(),
        });
    }
}

/// A fixed code is remembered (salted) in the qpunch home; one used before gets a warning:
/// the guess bound holds per run, so a code reused across runs gives guessers more tries.
fn warn_if_reused(events: &dyn Events, code: &str) {
    let Ok(home) = crate::home::dir() else { return };
    match crate::home::note_fixed_code(&home, code) {
        Ok(true) => events.event(Event::Warning(
            "this code was used before on this machine: every pairing on a code gives its \
             joiner one guess at it, so reusing a code across runs adds up the guesses; \
             leave --code out for a fresh one"
                .into(),
        )),
        Ok(false) => {}
        Err(e) => tracing::debug!("cannot remember the fixed code: {e}"),
    }
}

/// Meeting senders by one-time code: a code at a time, each announced, until stopped.
struct Codes {
    events: Arc<dyn Events>,
    node: Arc<Node>,
    receiver: Arc<Receiver>,
    out: PathBuf,
    rendezvous: String,
    connect: crate::rendezvous::ConnectOptions,
    first: Option<Code>,
    ttl: Duration,
    once: bool,
    limits: Limits,
    side_stopped: tokio::sync::watch::Receiver<bool>,
    /// Guesses at our codes given away lately (see [`crate::meet::guesses`]): kept across
    /// reconnections to the rendezvous.
    guesses: GuessBudget,
    /// `first` is a code registered before, to register again after a reconnection.
    reregister: bool,
    /// The user's own TURN server, if any.
    turn: Option<crate::turn::TurnServer>,
}

/// How serving codes through one rendezvous connection ended.
enum CodesEnded {
    /// A meeting ended `once`.
    Done,
    /// The guess budget is spent: no new code for this long.
    Pause(Duration),
}

impl Codes {
    async fn run(mut self) {
        let mut delay = Duration::from_secs(1);
        loop {
            let error = match self.serve().await {
                Ok(CodesEnded::Done) => return,
                Ok(CodesEnded::Pause(pause)) => {
                    self.events.event(Event::CodesPaused {
                        guesses: self.guesses.spent(std::time::Instant::now()),
                        window: guesses::WINDOW,
                        resume_in: pause,
                    });
                    // Off the rendezvous meanwhile: an idle connection would only be
                    // evicted, and nothing is open for anyone to guess at.
                    tokio::time::sleep(pause).await;
                    delay = Duration::from_secs(1);
                    continue;
                }
                Err(e) => super::describe(&e),
            };
            // The rendezvous went away (restarted, network change): try again, slower.
            self.events.event(Event::RendezvousLost {
                via: self.rendezvous.clone(),
                error,
                retry_in: delay,
            });
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }

    /// Connect to the rendezvous and serve codes until a meeting ends `once`, or until the
    /// guess budget is spent.
    async fn serve(&mut self) -> Result<CodesEnded, ShareError> {
        if let Some(pause) = self.guesses.wait(std::time::Instant::now()) {
            return Ok(CodesEnded::Pause(pause));
        }
        let (client, report) = meeting::connect(
            self.events.as_ref(),
            &self.node,
            &self.rendezvous,
            self.connect,
        )
        .await?;
        let (events, node, out, via) = (
            self.events.clone(),
            self.node.clone(),
            self.out.clone(),
            self.rendezvous.clone(),
        );
        let meeting_events = meeting::Meeting::new(
            self.events.clone(),
            Some(Box::new(move |code, expires| {
                announce_code(events.as_ref(), &node, &out, Some(&via), code, expires);
            })),
        );
        let meeting = Meeting {
            node: &self.node,
            rendezvous: &client,
            nat: report.mapping,
            config: MeetConfig::default(),
            events: &meeting_events,
            turn: self.turn.as_ref(),
        };
        let receiver = self.receiver.clone();
        let admit = move |sender, ttl| receiver.admit(sender, ttl);
        // A code holder may connect before its hello has reached us: let it wait for its
        // ticket rather than be refused.
        let _expecting = self.receiver.expect_tickets();
        loop {
            if let Some(pause) = self.guesses.wait(std::time::Instant::now()) {
                return Ok(CodesEnded::Pause(pause));
            }
            let chosen = self.first.take();
            let again = chosen.is_some() && std::mem::take(&mut self.reregister);
            let result = meeting.welcome(chosen.as_ref(), self.ttl, &admit).await;
            // A code nobody paired on yet outlives its rendezvous: after a reconnection it
            // is registered again, so what the user passed on still works.
            let unspent = meeting_events.take_unspent_code();
            // A pairing whose peer never proved the code gave it one guess, however the
            // meeting ended (a wrong code, a peer that gave up or vanished).
            if meeting_events.take_unproven_pairing() {
                self.guesses.spend(std::time::Instant::now());
            }
            match result {
                Ok(welcomed) => {
                    if let Some(side) = welcomed.node {
                        self.serve_side_node(side);
                    }
                    if let Some(paths) = welcomed.paths {
                        paths.hold(super::send::forward_path_events(
                            &paths,
                            self.events.clone(),
                            None,
                        ));
                        self.keep_paths(paths);
                    }
                    if self.once {
                        return Ok(CodesEnded::Done);
                    }
                }
                Err(MeetError::Rendezvous(ClientError::Refused {
                    code: ErrorCode::Expired,
                    ..
                })) => self.events.event(Event::CodeExpired),
                // Someone registered the nameplate while the rendezvous was away.
                Err(MeetError::Rendezvous(ClientError::Refused {
                    code: ErrorCode::Taken,
                    ..
                })) if again => self.events.event(Event::Warning(
                    "the code's nameplate was taken while the rendezvous was away: here is a \
                     new code"
                        .into(),
                )),
                Err(MeetError::Rendezvous(e)) => {
                    if let Some(code) = unspent {
                        self.first = Some(code);
                        self.reregister = true;
                    }
                    return Err(ShareError::RendezvousLost(e));
                }
                Err(e) => self.events.event(Event::MeetingFailed(e.to_string())),
            }
        }
    }

    /// Keep a sender's paths (its connection runs on their mapped address) while its
    /// connection is alive: until nothing has come from it for [`PATHS_IDLE`] (its
    /// keep-alives come every few seconds while it is connected), or until stopped.
    fn keep_paths(&self, paths: crate::path::PeerPaths) {
        let mut stopped = self.side_stopped.clone();
        tokio::spawn(async move {
            let mut last = paths.bytes();
            let mut quiet_since = tokio::time::Instant::now();
            loop {
                // Cancel-safe: a timer and a watch.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stopped.wait_for(|stop| *stop) => return,
                }
                let now = paths.bytes();
                if now.received != last.received {
                    last = now;
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() > PATHS_IDLE {
                    return;
                }
            }
        });
    }

    /// Serve a node a birthday punch made (the sender connects there) until stopped.
    fn serve_side_node(&self, side: Arc<Node>) {
        let server = Server::new(side.clone(), self.receiver.clone(), self.limits);
        let mut stopped = self.side_stopped.clone();
        tokio::spawn(async move {
            // `wait_for` is cancel-safe: it only watches a value.
            server
                .run(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
            side.close(node::QUICK_LINGER).await;
        });
    }
}

/// How long a met sender's paths are kept once nothing comes from it: longer than its
/// connection's idle timeout, so the paths never go before the connection does.
const PATHS_IDLE: Duration = Duration::from_secs(90);

/// Meeting senders by one-time code on the LAN, with no rendezvous: a code at a time,
/// announced by mDNS until it is used, burned or expired.
struct LanCodes {
    events: Arc<dyn Events>,
    node: Arc<Node>,
    desk: Arc<Desk>,
    out: PathBuf,
    first: Option<Code>,
    ttl: Duration,
    once: bool,
}

impl LanCodes {
    async fn run(mut self, lan: Arc<Lan>) {
        let reporter = self.events.clone();
        let error = move |message: String| reporter.event(Event::Error(message));
        let local = match self.node.local_addr() {
            Ok(local) => local,
            Err(e) => return error(format!("no local address to announce: {e}")),
        };
        let mut wrong = 0u32;
        loop {
            let code = self
                .first
                .take()
                .unwrap_or_else(|| Code::generate(lan::random_nameplate(), &mut rand::rng()));
            // Open before announcing: a sender who finds the announcement finds the code.
            let mut opened = self.desk.open(code.clone());
            let announcement = match lan.announce(code.nameplate(), local) {
                Ok(announcement) => announcement,
                Err(e) => {
                    return error(format!(
                        "cannot announce the code on the local network: {e}"
                    ));
                }
            };
            let events = self.events.as_ref();
            announce_code(events, &self.node, &self.out, None, &code, self.ttl);
            // Cancel-safe: `outcome` waits on a oneshot receiver, the timer only waits.
            let ended = tokio::select! {
                outcome = opened.outcome() => outcome,
                () = tokio::time::sleep(self.ttl) => None,
            };
            // Withdrawn from the desk first, then from the network.
            drop(opened);
            announcement.withdraw().await;
            match ended {
                None => events.event(Event::CodeExpired),
                Some(Outcome::Used { sender, remote }) => {
                    let remote = canonical(remote);
                    events.event(Event::CodeUsed {
                        sender,
                        remote,
                        code,
                    });
                    if self.once {
                        return;
                    }
                }
                Some(Outcome::Burned { remote }) => {
                    wrong += 1;
                    events.event(Event::CodeBurned {
                        remote: canonical(remote),
                        code,
                        wrong,
                        max: lan::MAX_WRONG_CODES,
                    });
                    if wrong >= lan::MAX_WRONG_CODES {
                        return;
                    }
                }
            }
        }
    }
}

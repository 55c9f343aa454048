//! The rendezvous service: the async driver of the pairing [`book`](super::book), and of
//! the NAT-check [`reflector`](super::reflector).
//!
//! It runs as a [`Service`] under [`crate::server::Server`] (so every budget there applies:
//! connections in all and per source, handshake timeouts, and here a Retry for every
//! connection) and adds its own: nameplates in all and per source, a join rate per source,
//! a lifetime for every nameplate and every pairing. Its state is the book of waiting
//! nameplates, under one lock; what the book decides (who pairs, what is refused, what
//! each side of a pairing passes on) is said here, on the streams. A pairing lives only
//! in the two session tasks it connects.
//!
//! **Memory.** A client costs its QUIC connection and at most two sessions (the guarded
//! transport allows two streams); nothing else grows with clients. Measured on
//! `qpunch rendezvous` (`tests/rendezvous_abuse.rs`, `benches/rendezvous.rs`): a receiver
//! waiting with a nameplate costs about 20 KiB (release build; 40 KiB debug), a connection
//! doing its worst (two nameplates, never reading, requests until flow control stops it)
//! about 110 KiB, held to that by a 16 KiB receive window, one-deep request queues and a
//! timeout on every answer. With the default 4096 connections that bounds the rendezvous
//! at about 640 MiB above its idle size against the worst clients, a third of that for
//! honest ones.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::book::{self, Book, FromClient, FromPartner, Join, Limits, Passed, Refused, Relaying};
use super::events::{NoEvents, RendezvousEvents};
use super::held::{Held, now};
use super::reflector::{Reflector, announced_addrs};
use super::slot::{Link, RelayShared, Slot};
pub use super::slot::{RELAY_EXPIRED, RELAY_QUOTA, RelayLimits};
use super::{
    ErrorCode, MAX_MESSAGE, PAKE_MSG_LEN, RelayGrant, Request, Response, VERSION, from_hex, to_hex,
};
use crate::frame;
use crate::node::{Node, PeerConnection};
use crate::ratelimit::RateConfig;
use crate::server::{Service, Shutdown};
use crate::wire::TxId;

/// Receive window of every rendezvous connection (two messages' worth).
const WINDOW: u32 = 2 * MAX_MESSAGE as u32;

/// How long the sessions of a client that closed its connection may take to pass on
/// what it said last.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// Limits of one rendezvous.
#[derive(Debug, Clone, PartialEq)]
pub struct RendezvousConfig {
    /// Nameplates waiting at once, in all.
    pub max_nameplates: usize,
    /// Nameplates waiting at once from one source (IPv4 address or IPv6 /64).
    pub max_per_source: usize,
    /// Longest lifetime a receiver may ask for.
    pub max_ttl: Duration,
    /// How long a pairing may take to exchange its sealed hellos.
    pub pairing_timeout: Duration,
    /// Joins per source (a guesser gets this many tries, slowly).
    pub join_rate: RateConfig,
    /// How long one answer may wait for a client to read it before its exchange is
    /// dropped (with its nameplate).
    pub write_timeout: Duration,
    /// A connection that holds no open or join exchange for this long is closed, however
    /// alive its keep-alives keep it: a slot is for a meeting, not for holding. A
    /// connection whose pair is relaying holds an exchange.
    pub idle_grace: Duration,
    /// What a pair may relay through the rendezvous once paired (see [`RelayLimits`]);
    /// `None`: no relaying (pairs get no grant, every datagram is dropped).
    pub relay: Option<RelayLimits>,
    /// Whether and where [`Rendezvous::bind`] also listens on TCP (TLS), for clients whose
    /// network blocks UDP ([`crate::tcp`]).
    pub tcp: TcpPort,
    /// The budgets of the TCP listener.
    pub tcp_limits: crate::tcp::ServerLimits,
    /// A TURN server whose REST API secret we hold: each side of each pairing gets
    /// credentials of its own (see [`super::TurnGrant`]).
    pub turn: Option<TurnMint>,
}

/// What a rendezvous needs to mint TURN credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnMint {
    /// The TURN server, as clients are told it (`turn:HOST:PORT`, `turns:HOST:PORT`).
    pub url: crate::turn::TurnUrl,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`).
    pub secret: Vec<u8>,
    /// How long minted credentials live. A TURN allocation made with them can be refreshed
    /// only until then, so this bounds how long a pair may relay through TURN.
    pub lifetime: Duration,
}

impl std::fmt::Debug for TurnMint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("TurnMint")
            .field("url", &self.url)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TurnMint {
    /// Fresh credentials for one side of one pairing, with a random tag: nothing in them
    /// names the nameplate or the peer.
    pub fn grant(&self) -> super::TurnGrant {
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + self.lifetime;
        let tag = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 8]>());
        let (username, password) = crate::turn::mint(&self.secret, &tag, expires.as_secs());
        super::TurnGrant {
            url: self.url.to_string(),
            username,
            password,
            expires_secs: self.lifetime.as_secs(),
        }
    }
}

/// Where a rendezvous listens on TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpPort {
    /// Not at all: UDP only.
    Off,
    /// The UDP port's number (when the UDP port was chosen by the system, and that number
    /// is taken on TCP, any free TCP port).
    #[default]
    SameAsUdp,
    /// This port (443 in production: what a firewall that blocks UDP lets through).
    Port(u16),
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        RendezvousConfig {
            max_nameplates: 10_000,
            max_per_source: 16,
            max_ttl: Duration::from_secs(3600),
            pairing_timeout: Duration::from_secs(60),
            join_rate: RateConfig {
                per_source_burst: 8,
                per_source_rate: 1.0,
                global_burst: 1000,
                global_rate: 1000.0,
                max_sources: 4096,
            },
            write_timeout: Duration::from_secs(10),
            idle_grace: Duration::from_secs(30),
            relay: Some(RelayLimits::default()),
            tcp: TcpPort::SameAsUdp,
            tcp_limits: crate::tcp::ServerLimits::default(),
            turn: None,
        }
    }
}

/// Counters of a rendezvous. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RendezvousStats {
    /// Nameplates opened.
    pub opened: u64,
    /// Joins that paired two peers.
    pub paired: u64,
    /// Pairings where a peer reported a failure (wrong code, tampering).
    pub failed: u64,
    /// Nameplates that expired unused.
    pub expired: u64,
    /// Joins to nameplates nobody waits on.
    pub unknown: u64,
    /// Requests refused by a limit (nameplates, join rate).
    pub limited: u64,
    /// Requests that broke the protocol.
    pub malformed: u64,
    /// Connections closed because they held no exchange (see
    /// [`RendezvousConfig::idle_grace`]).
    pub evicted: u64,
    /// Datagrams relayed from one peer to its partner.
    pub relayed_packets: u64,
    /// Bytes relayed (tags included).
    pub relayed_bytes: u64,
    /// Datagrams dropped: on a connection with no live relay slot (never paired, partner
    /// gone, slot ended, relaying off), with a reserved tag, over the pair's rate, or not
    /// taken by the partner's connection.
    pub relay_dropped: u64,
    /// Pairs cut for using up their relay quota.
    pub relay_cut: u64,
}

#[derive(Debug, Default)]
struct Counters {
    opened: AtomicU64,
    paired: AtomicU64,
    failed: AtomicU64,
    expired: AtomicU64,
    unknown: AtomicU64,
    limited: AtomicU64,
    malformed: AtomicU64,
    evicted: AtomicU64,
}

/// What one session tells the other, once paired.
#[derive(Debug)]
enum Relay {
    /// The sender joined (to the receiver's session): its PAKE and the way back.
    Paired {
        pake: Vec<u8>,
        partner: mpsc::Sender<Relay>,
        relay: Option<RelayGrant>,
    },
    /// A sealed hello or a failure report.
    Passed(Passed),
}

impl RendezvousConfig {
    fn book_limits(&self) -> Limits {
        Limits {
            max_nameplates: self.max_nameplates,
            max_per_source: self.max_per_source,
            max_ttl: self.max_ttl,
            join_rate: self.join_rate,
        }
    }
}

/// The rendezvous service. Build it with [`Rendezvous::new`] and run it under a
/// [`crate::server::Server`] on its node (see [`Rendezvous::serve`] for the whole thing).
pub struct Rendezvous {
    config: RendezvousConfig,
    reflector: Reflector,
    book: Mutex<Book<Waiter>>,
    counters: Counters,
    relay: Arc<RelayShared>,
    events: Arc<dyn RendezvousEvents>,
    /// The node's path layer: a client that came over TCP is seen by quinn at a mapped
    /// address, and this gives its real (TCP) address back.
    paths: Arc<crate::path::PathSocket>,
    /// The TCP listener, when [`Rendezvous::bind`] started one; it stops when the
    /// rendezvous is dropped.
    tcp: std::sync::OnceLock<crate::tcp::TcpServer>,
}

/// What the book keeps of a waiting receiver: the way to its session, and its connection
/// (to bind a relay slot to).
struct Waiter {
    session: mpsc::Sender<Relay>,
    link: Arc<Link>,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("config", &self.config)
            .field("addrs", &self.reflector.addrs())
            .finish_non_exhaustive()
    }
}

impl Rendezvous {
    /// A rendezvous on `node` (which must accept connections and speak [`super::ALPN`]),
    /// with `alt` bound to the same address and another port (it answers probes), telling
    /// clients it can be reached at `addrs`.
    ///
    /// To relay, `node` must have datagrams on ([`crate::node::NodeConfig::datagrams`],
    /// [`crate::node::Datagrams::RELAY`], as [`Rendezvous::bind`] sets them); without, set
    /// [`RendezvousConfig::relay`] to `None`.
    pub fn new(
        node: Arc<Node>,
        alt: std::net::UdpSocket,
        addrs: Vec<IpAddr>,
        config: RendezvousConfig,
        events: Arc<dyn RendezvousEvents>,
    ) -> std::io::Result<Arc<Self>> {
        let paths = node.paths().clone();
        let reflector = Reflector::new(node, alt, addrs)?;
        let book = Mutex::new(Book::new(config.book_limits(), now()));
        Ok(Arc::new(Rendezvous {
            paths,
            tcp: std::sync::OnceLock::new(),
            config,
            reflector,
            book,
            counters: Counters::default(),
            relay: Arc::default(),
            events,
        }))
    }

    /// Counters so far.
    pub fn stats(&self) -> RendezvousStats {
        let c = &self.counters;
        RendezvousStats {
            opened: c.opened.load(Ordering::Relaxed),
            paired: c.paired.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            unknown: c.unknown.load(Ordering::Relaxed),
            limited: c.limited.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            relayed_packets: self.relay.packets.load(Ordering::Relaxed),
            relayed_bytes: self.relay.bytes.load(Ordering::Relaxed),
            relay_dropped: self.relay.dropped.load(Ordering::Relaxed),
            relay_cut: self.relay.cut.load(Ordering::Relaxed),
        }
    }

    /// Relay slots live right now (pairs that may relay).
    pub fn relaying(&self) -> usize {
        self.relay.live.load(Ordering::Relaxed)
    }

    /// The TCP listener's address, if it has one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.get().map(|tcp| tcp.local_addr())
    }

    /// The TCP listener's counters (all zero without one).
    pub fn tcp_stats(&self) -> crate::tcp::TcpStats {
        self.tcp.get().map(|tcp| tcp.stats()).unwrap_or_default()
    }

    /// Nameplates waiting right now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book<Waiter>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One stream: read its first request, then serve that exchange.
    async fn session(
        self: Arc<Self>,
        observed: SocketAddr,
        ours: Option<IpAddr>,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        mut shutdown: Shutdown,
        link: Arc<Link>,
    ) {
        // Reading frames is not cancel-safe, so a task reads them into a channel; the
        // session only ever selects on channels and timers. One deep: a client that
        // talks while its session waits can park two requests here (one queued, one
        // being sent), no more; the rest waits in its connection's small window.
        let (tx, mut requests) = mpsc::channel(1);
        let reader = tokio::spawn(read_requests(recv, tx));
        let first = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), requests.recv()) => r.ok().flatten(),
            () = shutdown.recv() => None,
        };
        // Only a nameplate or a join holds the connection (info and reflect answer at once,
        // and a stream that says nothing is dropped above).
        let _holding = matches!(first, Some(Request::Open { .. } | Request::Join { .. }))
            .then(|| Held::enter(link.held()));
        let answer = match first {
            Some(Request::Info) => Some(self.welcome(observed)),
            Some(Request::Reflect {
                txid,
                change_ip,
                change_port,
            }) => Some(
                self.reflect(observed, ours, &txid, change_ip, change_port)
                    .await,
            ),
            Some(Request::Open {
                nameplate,
                ttl_secs,
            }) => {
                self.open(
                    nameplate,
                    ttl_secs,
                    &link,
                    &mut send,
                    &mut requests,
                    &mut shutdown,
                )
                .await;
                None
            }
            Some(Request::Join { nameplate, pake }) => {
                self.join(
                    nameplate,
                    pake,
                    &link,
                    &mut send,
                    &mut requests,
                    &mut shutdown,
                )
                .await;
                None
            }
            Some(_) => {
                Some(self.malformed("an exchange must start with info, open, join or reflect"))
            }
            None => None,
        };
        if let Some(answer) = answer {
            let _ = self.say(&mut send, &answer).await;
        }
        let _ = send.finish();
        reader.abort();
    }

    /// Write one message to the client, giving up after
    /// [`RendezvousConfig::write_timeout`]: a client that does not read (its flow control
    /// window stays shut) must not hold its session, and its nameplate, for ever.
    async fn say(&self, send: &mut quinn::SendStream, message: &Response) -> Result<(), ()> {
        match tokio::time::timeout(self.config.write_timeout, frame::write(send, message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(()),
            Err(_) => {
                // Half a frame went out: the stream is unusable.
                let _ = send.reset(0u32.into());
                Err(())
            }
        }
    }

    fn welcome(&self, observed: SocketAddr) -> Response {
        Response::Welcome {
            version: VERSION,
            observed,
            addrs: self.reflector.addrs().to_vec(),
            alt_port: self.reflector.alt_port(),
        }
    }

    fn malformed(&self, why: &str) -> Response {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        error(ErrorCode::Protocol, why)
    }

    fn limited(&self, why: &str) -> Response {
        self.counters.limited.fetch_add(1, Ordering::Relaxed);
        error(ErrorCode::RateLimited, why)
    }

    /// Send a probe reply to `to` from the other address or port.
    async fn reflect(
        &self,
        to: SocketAddr,
        ours: Option<IpAddr>,
        txid: &str,
        change_ip: bool,
        change_port: bool,
    ) -> Response {
        let Some(txid) = from_hex(txid, 12).and_then(|t| TxId::try_from(t.as_slice()).ok()) else {
            return self.malformed("reflect needs a 12-byte txid");
        };
        match self
            .reflector
            .reflect(to, ours, txid, change_ip, change_port)
            .await
        {
            Ok(()) => Response::Reflected,
            // Either way the client learns this rendezvous cannot do it (the test is skipped).
            Err(e) => error(ErrorCode::Unsupported, &e.to_string()),
        }
    }

    /// A receiver: reserve the nameplate, take its PAKE message, wait for a sender, then
    /// relay.
    async fn open(
        &self,
        wanted: Option<String>,
        ttl_secs: u32,
        link: &Arc<Link>,
        send: &mut quinn::SendStream,
        requests: &mut mpsc::Receiver<Request>,
        shutdown: &mut Shutdown,
    ) {
        let observed = link.observed();
        let (to_session, mut inbox) = mpsc::channel(4);
        let registered = self.lock().register(
            now(),
            observed,
            wanted.as_deref(),
            ttl_secs,
            Waiter {
                session: to_session,
                link: link.clone(),
            },
            &mut rand::rng(),
        );
        let book::Registration {
            nameplate,
            id,
            ttl,
            expires,
        } = match registered {
            Ok(registration) => registration,
            Err(refused) => {
                let _ = self.say(send, &self.refused(refused)).await;
                return;
            }
        };
        // Whatever ends this exchange, the nameplate goes with it (unless a join took it
        // already, and it now belongs to someone else).
        let _release = Release(self, nameplate.clone(), id);
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        let opened = Response::Opened {
            nameplate: nameplate.clone(),
            expires_secs: ttl.as_secs() as u32,
            observed,
        };
        if self.say(send, &opened).await.is_err() {
            return;
        }
        // The book's deadline: a join after it is refused there, whatever this timer does.
        let expiry = tokio::time::sleep_until(expires.into());
        tokio::pin!(expiry);
        // Cancel-safe, this select and the next: channel receives and timers.
        let pake = tokio::select! {
            request = requests.recv() => match request {
                Some(Request::Pake { pake }) => from_hex(&pake, PAKE_MSG_LEN),
                _ => None,
            },
            _ = &mut expiry => {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                let _ = self.say(send, &error(ErrorCode::Expired, "the code expired before its PAKE message arrived")).await;
                return;
            }
            () = shutdown.recv() => return,
        };
        let Some(pake) = pake else {
            let _ = self
                .say(
                    send,
                    &self.malformed("open must be followed by the PAKE message"),
                )
                .await;
            return;
        };
        self.lock().pake(&nameplate, id, pake);
        let paired = tokio::select! {
            relay = inbox.recv() => relay,
            _ = &mut expiry => {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                let _ = self.say(send, &error(ErrorCode::Expired, "nobody used the code in time")).await;
                return;
            }
            // The receiver gave up (closed its stream or sent something out of turn).
            _ = requests.recv() => return,
            () = shutdown.recv() => return,
        };
        let Some(Relay::Paired {
            pake,
            partner,
            relay,
        }) = paired
        else {
            return;
        };
        let message = Response::Paired {
            pake: to_hex(&pake),
            observed,
            relay,
            turn: self.config.turn.as_ref().map(TurnMint::grant),
        };
        if self.say(send, &message).await.is_ok() {
            self.relay(send, requests, &mut inbox, &partner, shutdown)
                .await;
        }
    }

    /// The answer to a refused registration (counted).
    fn refused(&self, refused: Refused) -> Response {
        match refused {
            Refused::Full => {
                self.counters.limited.fetch_add(1, Ordering::Relaxed);
                error(
                    ErrorCode::TooMany,
                    "the rendezvous is full; try again later",
                )
            }
            Refused::SourceFull => {
                self.counters.limited.fetch_add(1, Ordering::Relaxed);
                error(ErrorCode::TooMany, "too many codes open from your address")
            }
            Refused::BadNameplate => self.malformed("not a valid nameplate"),
            Refused::Taken => error(ErrorCode::Taken, "that code is in use; pick another"),
            Refused::Lookups => {
                self.limited("too many chosen codes from your address; wait a little")
            }
        }
    }

    /// A sender: take the nameplate (single use), pair, then relay.
    async fn join(
        &self,
        nameplate: String,
        pake: String,
        link: &Arc<Link>,
        send: &mut quinn::SendStream,
        requests: &mut mpsc::Receiver<Request>,
        shutdown: &mut Shutdown,
    ) {
        let observed = link.observed();
        let allowed = self.lock().allow_join(now(), observed.ip());
        if !allowed {
            let _ = self
                .say(
                    send,
                    &self.limited("too many joins from your address; wait a little"),
                )
                .await;
            return;
        }
        let Some(pake) = from_hex(&pake, PAKE_MSG_LEN) else {
            let _ = self.say(send, &self.malformed("bad PAKE message")).await;
            return;
        };
        // Not joinable until the receiver's PAKE message is there; a registered nameplate
        // whose PAKE message is on its way is waited for (see [`book::PAKE_WAIT`]).
        let asked = now();
        let waiting = loop {
            let joined = self.lock().join(now(), &nameplate, asked);
            match joined {
                Join::Paired(taken) => break Some(taken),
                Join::Unknown => break None,
                Join::Pending => {}
            }
            // Cancel-safe: a timer and the shutdown broadcast.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = shutdown.recv() => return,
            }
        };
        let Some(waiting) = waiting else {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            let answer = error(
                ErrorCode::UnknownNameplate,
                "no receiver is waiting on that code (mistyped, already used, or expired)",
            );
            let _ = self.say(send, &answer).await;
            return;
        };
        let (partner, mut inbox) = mpsc::channel(4);
        // The slot opens before either side hears of the pairing, so neither side's first
        // relayed packet can arrive before it.
        let slot = self.config.relay.and_then(|limits| {
            Slot::open(
                &waiting.session.link,
                link,
                limits,
                &nameplate,
                &self.relay,
                &self.events,
            )
        });
        let relay = slot.as_ref().map(|(_, grant)| *grant);
        let paired = Relay::Paired {
            pake,
            partner,
            relay,
        };
        if waiting.session.session.send(paired).await.is_err() {
            if let Some((slot, _)) = slot {
                slot.end("a peer left");
            }
            // The receiver left just now: as good as unknown.
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .say(
                    send,
                    &error(ErrorCode::UnknownNameplate, "the receiver left"),
                )
                .await;
            return;
        }
        self.counters.paired.fetch_add(1, Ordering::Relaxed);
        self.events.paired(&nameplate, waiting.observed, observed);
        let message = Response::Paired {
            pake: to_hex(&waiting.pake),
            observed,
            relay,
            turn: self.config.turn.as_ref().map(TurnMint::grant),
        };
        if self.say(send, &message).await.is_ok() {
            self.relay(
                send,
                requests,
                &mut inbox,
                &waiting.session.session,
                shutdown,
            )
            .await;
        }
    }

    /// Pass one sealed hello and at most one failure each way, until both sides are done
    /// or the pairing times out ([`Relaying`] decides; this only carries).
    async fn relay(
        &self,
        send: &mut quinn::SendStream,
        requests: &mut mpsc::Receiver<Request>,
        inbox: &mut mpsc::Receiver<Relay>,
        partner: &mpsc::Sender<Relay>,
        shutdown: &mut Shutdown,
    ) {
        let deadline = tokio::time::sleep(self.config.pairing_timeout);
        tokio::pin!(deadline);
        let mut relaying = Relaying::default();
        loop {
            // Cancel-safe: channel receives and a timer.
            tokio::select! {
                request = requests.recv(), if relaying.listening() => match relaying.client(request) {
                    FromClient::Pass(passed) => {
                        if matches!(passed, Passed::Failed(_)) {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = partner.send(Relay::Passed(passed)).await;
                    }
                    FromClient::Malformed(why) => {
                        let _ = self.say(send, &self.malformed(why)).await;
                        return;
                    }
                    FromClient::Wait => {}
                    FromClient::End => return,
                },
                relay = inbox.recv() => {
                    let passed = match relay {
                        Some(Relay::Passed(passed)) => Some(passed),
                        // The partner's session ended: nothing more will come.
                        Some(Relay::Paired { .. }) | None => None,
                    };
                    match relaying.partner(passed) {
                        FromPartner::Tell { response, last } => {
                            if self.say(send, &response).await.is_err() || last {
                                return;
                            }
                        }
                        FromPartner::End => return,
                    }
                }
                _ = &mut deadline => return,
                () = shutdown.recv() => return,
            }
        }
    }
}

/// Frees a nameplate when its exchange ends, unless a join took it already: then the
/// nameplate may be registered again by another receiver (a random one is soon drawn
/// again, a chosen one may be reused at once), and that registration is not ours to free.
struct Release<'a>(&'a Rendezvous, String, u64);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.lock().release(&self.1, self.2);
    }
}

fn error(code: ErrorCode, message: &str) -> Response {
    Response::Error {
        code,
        message: message.to_string(),
    }
}

/// Read requests off a stream into `tx` until it ends, fails or sends garbage.
async fn read_requests(mut recv: quinn::RecvStream, tx: mpsc::Sender<Request>) {
    while let Ok(Some(request)) = frame::read::<Request>(&mut recv, MAX_MESSAGE).await {
        if tx.send(request).await.is_err() {
            return;
        }
    }
}

/// The code a rendezvous closes an idle connection with (the client reconnects when it
/// needs the rendezvous again).
pub const IDLE_CLOSE: u32 = 0x10;

impl Service for Rendezvous {
    async fn serve(self: Arc<Self>, peer: PeerConnection, shutdown: Shutdown) {
        let conn = peer.connection;
        let mut sessions = tokio::task::JoinSet::new();
        let mut shutdown = shutdown;
        let held = Held::new();
        // A client that came over TCP is at a mapped address: its real one is what it is
        // told and what the book's budgets count.
        let observed = self.paths.real_addr(conn.remote_address());
        let link = Link::new(conn.clone(), observed, held.clone());
        let mut slot_changed = link.subscribe();
        loop {
            let evict_at = held.evict_at(self.config.idle_grace);
            let idle = async {
                match evict_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Cancel-safe: `accept_bi` and `read_datagram` yield a stream or a datagram
            // only when they return it; the timer, the watch and `join_next` lose nothing
            // when dropped.
            let (send, recv) = tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(_) => break,
                },
                datagram = conn.read_datagram() => match datagram {
                    Ok(datagram) => {
                        link.received(datagram, &self.relay);
                        continue;
                    }
                    Err(_) => break,
                },
                // A relay slot opened or ended: the idle deadline changed.
                Ok(()) = slot_changed.changed() => continue,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
                () = idle => {
                    if held.evict_at(self.config.idle_grace).is_some_and(|at| at <= now()) {
                        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                        crate::close_gate::close(&conn, IDLE_CLOSE.into(), b"idle: no open exchange");
                        break;
                    }
                    continue;
                }
                () = shutdown.recv() => {
                    link.closed();
                    sessions.shutdown().await;
                    return;
                }
            };
            // The guarded transport allows two streams at once, so this set stays tiny.
            let session_shutdown = shutdown.resubscribe();
            sessions.spawn(self.clone().session(
                // A client that came over TCP is at a mapped address: its real one is what
                // it is told and what the book's budgets count.
                self.paths.real_addr(conn.remote_address()),
                conn.local_ip(),
                send,
                recv,
                session_shutdown,
                link.clone(),
            ));
        }
        // Whatever ended the connection ends its relay slot (the slot's own watch would
        // see it too; this is at once).
        link.closed();
        // The client left. What it sent last (its sealed hello, a failure) may still be
        // on its way through a session: let sessions pass it on, briefly, then stop them.
        let drain = async { while sessions.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LEAVE_GRACE, drain).await;
        sessions.shutdown().await;
    }
}

/// A TCP listener on `addr` (dual-stack for `[::]`, as the UDP socket).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("TCP {addr}: {e}")))
}

/// A rendezvous bound and ready: its node, its service, the server to run.
pub struct Bound {
    /// The node on the main port (QUIC and probes).
    pub node: Arc<Node>,
    /// The service, for its counters.
    pub rendezvous: Arc<Rendezvous>,
    /// The accept loop; call [`crate::server::Server::run`].
    pub server: crate::server::Server<Rendezvous>,
}

impl Rendezvous {
    /// Bind a rendezvous on `bind` (main port) and the next port (probes only), as
    /// `identity`. A wildcard `bind` announces every non-loopback interface address of its
    /// families (so clients can test their NAT against a second address when there is one).
    pub fn bind(
        bind: SocketAddr,
        identity: crate::identity::Identity,
        config: RendezvousConfig,
        events: Arc<dyn RendezvousEvents>,
    ) -> Result<Bound, crate::node::NodeError> {
        let socket = crate::socket::bind(bind)?;
        let main = socket.local_addr()?;
        let alt = crate::socket::bind(SocketAddr::new(bind.ip(), main.port().wrapping_add(1)))?;
        // Messages are at most 8 KiB and read as they come: a 16 KiB window is plenty,
        // and it is what a client that stops being read can make us buffer.
        let node_config = crate::node::NodeConfig {
            guarded_window: WINDOW,
            // The relay rides on QUIC DATAGRAM frames (see `slot`); a rendezvous that
            // relays nothing still reads and drops what comes.
            datagrams: Some(crate::node::Datagrams::RELAY),
            ..crate::node::NodeConfig::new(identity, super::ALPN, true)
        };
        let node = Arc::new(Node::new(socket, node_config)?);
        let addrs = announced_addrs(main);
        let (tcp_port, tcp_limits) = (config.tcp, config.tcp_limits);
        let rendezvous = Rendezvous::new(node.clone(), alt, addrs, config, events)?;
        let tcp = match tcp_port {
            TcpPort::Off => None,
            TcpPort::SameAsUdp => Some(bind_tcp(SocketAddr::new(bind.ip(), main.port())).or_else(
                |e| match bind.port() {
                    // The UDP port was the system's choice: so may the TCP port be.
                    0 => bind_tcp(SocketAddr::new(bind.ip(), 0)),
                    _ => Err(e),
                },
            )?),
            TcpPort::Port(port) => Some(bind_tcp(SocketAddr::new(bind.ip(), port))?),
        };
        if let Some(listener) = tcp {
            let server = crate::tcp::TcpServer::spawn(
                listener,
                node.paths().clone(),
                &node.config().identity,
                tcp_limits,
            )
            .map_err(std::io::Error::other)?;
            let _ = rendezvous.tcp.set(server);
        }
        let limits = crate::server::Limits {
            max_connections: 4096,
            max_per_ip: 32,
            max_per_56: 64,
            max_per_48: 128,
            handshake_timeout: Duration::from_secs(5),
            // Every client proves its address first: nothing larger than a Retry ever
            // goes to a source that may be forged.
            retry_above: 0,
        };
        let server = crate::server::Server::new(node.clone(), rendezvous.clone(), limits);
        Ok(Bound {
            node,
            rendezvous,
            server,
        })
    }

    /// Bind and serve until `shutdown` completes (the library's `qpunch rendezvous`).
    pub async fn serve(
        bind: SocketAddr,
        identity: crate::identity::Identity,
        config: RendezvousConfig,
        shutdown: impl std::future::Future,
    ) -> Result<RendezvousStats, crate::node::NodeError> {
        let bound = Self::bind(bind, identity, config, Arc::new(NoEvents))?;
        bound.server.run(shutdown).await;
        bound.node.close(crate::node::QUICK_LINGER).await;
        Ok(bound.rendezvous.stats())
    }
}

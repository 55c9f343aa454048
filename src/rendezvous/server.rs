//! The rendezvous service: nameplates, pairing, relaying, NAT-check reflections.
//!
//! It runs as a [`Service`] under [`crate::server::Server`] (so every budget there applies:
//! connections in all and per source, handshake timeouts, and here a Retry for every
//! connection) and adds its own: nameplates in all and per source, a join rate per source,
//! a lifetime for every nameplate and every pairing. Its state is one map of waiting
//! nameplates; a pairing lives only in the two session tasks it connects.
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt;
use tokio::sync::mpsc;

use super::{
    ErrorCode, MAX_MESSAGE, MAX_SEALED, Nameplate, PAKE_MSG_LEN, Request, Response, VERSION,
    from_hex, to_hex,
};
use crate::frame;
use crate::node::{Node, PeerConnection};
use crate::ratelimit::{RateConfig, RateLimiter, source_key};
use crate::server::{Service, Shutdown};
use crate::wire::{Message, TxId};

/// Receive window of every rendezvous connection (two messages' worth).
const WINDOW: u32 = 2 * MAX_MESSAGE as u32;

/// How long a join waits for a registered nameplate's PAKE message. A receiver shows its
/// code as soon as the nameplate is opened and sends its PAKE message right after; a quick
/// sender (a script) can join in between, and on a lossy path the PAKE message may lag by
/// a retransmission or two. Turning that sender away would waste a good code.
const PAKE_WAIT: Duration = Duration::from_secs(3);

/// How long the sessions of a client that closed its connection may take to pass on
/// what it said last.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// Limits of one rendezvous.
#[derive(Debug, Clone, Copy, PartialEq)]
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
}

/// What a rendezvous tells its operator.
pub trait RendezvousEvents: Send + Sync + 'static {
    /// Two peers were paired on `nameplate`.
    fn paired(&self, _nameplate: &str, _receiver: SocketAddr, _sender: SocketAddr) {}
}

/// [`RendezvousEvents`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl RendezvousEvents for NoEvents {}

/// What one session tells the other, once paired.
#[derive(Debug)]
enum Relay {
    /// The sender joined (to the receiver's session): its PAKE, address, and the way back.
    Paired {
        pake: Vec<u8>,
        peer: SocketAddr,
        partner: mpsc::Sender<Relay>,
    },
    Sealed(Vec<u8>),
    Failed(String),
}

/// A receiver waiting on a nameplate.
#[derive(Debug)]
struct Waiting {
    /// Which registration this is: a nameplate is reused once it is taken, and only the
    /// exchange that registered it may release it (see [`Release`]).
    id: u64,
    /// Its PAKE message; a nameplate cannot be joined before it arrives.
    pake: Option<Vec<u8>>,
    observed: SocketAddr,
    source: IpAddr,
    to_session: mpsc::Sender<Relay>,
}

#[derive(Debug, Default)]
struct Book {
    waiting: HashMap<String, Waiting>,
    per_source: HashMap<IpAddr, usize>,
    /// The id of the next registration.
    next_id: u64,
}

impl Book {
    /// Remove `nameplate` if it is registration `id` (any registration when `None`).
    fn remove(&mut self, nameplate: &str, id: Option<u64>) -> Option<Waiting> {
        if id.is_some_and(|id| self.waiting.get(nameplate).is_none_or(|w| w.id != id)) {
            return None;
        }
        let waiting = self.waiting.remove(nameplate)?;
        if let Some(count) = self.per_source.get_mut(&waiting.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&waiting.source);
            }
        }
        Some(waiting)
    }
}

/// The rendezvous service. Build it with [`Rendezvous::new`] and run it under a
/// [`crate::server::Server`] on its node (see [`Rendezvous::serve`] for the whole thing).
pub struct Rendezvous {
    config: RendezvousConfig,
    node: Arc<Node>,
    /// Answers probes on the second port, and sends change-port reflections.
    alt: Arc<tokio::net::UdpSocket>,
    /// One socket on each announced address (any port): change-address reflections leave
    /// from another address and another port, as RFC 5780's "change IP and port" test.
    others: Vec<tokio::net::UdpSocket>,
    addrs: Vec<IpAddr>,
    book: Mutex<Book>,
    joins: Mutex<RateLimiter>,
    counters: Counters,
    events: Arc<dyn RendezvousEvents>,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("config", &self.config)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Rendezvous {
    /// A rendezvous on `node` (which must accept connections and speak [`super::ALPN`]),
    /// with `alt` bound to the same address and another port (it answers probes), telling
    /// clients it can be reached at `addrs`.
    pub fn new(
        node: Arc<Node>,
        alt: std::net::UdpSocket,
        addrs: Vec<IpAddr>,
        config: RendezvousConfig,
        events: Arc<dyn RendezvousEvents>,
    ) -> std::io::Result<Arc<Self>> {
        alt.set_nonblocking(true)?;
        let alt = Arc::new(tokio::net::UdpSocket::from_std(alt)?);
        let others = addrs
            .iter()
            .filter_map(|&ip| {
                let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).ok()?;
                socket.set_nonblocking(true).ok()?;
                tokio::net::UdpSocket::from_std(socket).ok()
            })
            .collect();
        let rendezvous = Arc::new(Rendezvous {
            config,
            node,
            alt: alt.clone(),
            others,
            addrs,
            book: Mutex::default(),
            joins: Mutex::new(RateLimiter::new(config.join_rate, Instant::now())),
            counters: Counters::default(),
            events,
        });
        tokio::spawn(answer_probes(alt));
        Ok(rendezvous)
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
        }
    }

    /// Nameplates waiting right now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
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
                    observed,
                    nameplate,
                    ttl_secs,
                    &mut send,
                    &mut requests,
                    &mut shutdown,
                )
                .await;
                None
            }
            Some(Request::Join { nameplate, pake }) => {
                self.join(
                    observed,
                    nameplate,
                    pake,
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
            addrs: self.addrs.clone(),
            alt_port: self.alt.local_addr().map(|a| a.port()).unwrap_or(0),
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
        let contents = Message::Reply { txid, observed: to }.to_vec();
        let to_v4 = to.ip().to_canonical().is_ipv4();
        let sent = if change_ip {
            // A socket on another address of the client's family (and another port).
            let other = self.others.iter().find(|socket| {
                socket.local_addr().is_ok_and(|a| {
                    a.ip().to_canonical().is_ipv4() == to_v4
                        && Some(a.ip().to_canonical()) != ours.map(|o| o.to_canonical())
                })
            });
            let Some(other) = other else {
                return error(
                    ErrorCode::Unsupported,
                    "this rendezvous has no second address",
                );
            };
            let to = SocketAddr::new(to.ip().to_canonical(), to.port());
            other.send_to(&contents, to).await.map(drop)
        } else if change_port {
            self.alt.send_to(&contents, to).await.map(drop)
        } else {
            self.node.socket().send_probe(to, &contents).await
        };
        match sent {
            Ok(()) => Response::Reflected,
            Err(e) => error(ErrorCode::Unsupported, &format!("cannot send: {e}")),
        }
    }

    /// A receiver: reserve the nameplate, take its PAKE message, wait for a sender, then
    /// relay.
    async fn open(
        &self,
        observed: SocketAddr,
        wanted: Option<String>,
        ttl_secs: u32,
        send: &mut quinn::SendStream,
        requests: &mut mpsc::Receiver<Request>,
        shutdown: &mut Shutdown,
    ) {
        let ttl = Duration::from_secs(ttl_secs.max(1).into()).min(self.config.max_ttl);
        let (to_session, mut inbox) = mpsc::channel(4);
        let (nameplate, id) = match self.reserve(observed, wanted, to_session) {
            Ok(reserved) => reserved,
            Err(answer) => {
                let _ = self.say(send, &answer).await;
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
        let expiry = tokio::time::sleep(ttl);
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
        if let Some(waiting) = self.lock().waiting.get_mut(&nameplate)
            && waiting.id == id
        {
            waiting.pake = Some(pake);
        }
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
            peer,
            partner,
        }) = paired
        else {
            return;
        };
        let message = Response::Paired {
            pake: to_hex(&pake),
            peer,
            observed,
        };
        if self.say(send, &message).await.is_ok() {
            self.relay(send, requests, &mut inbox, &partner, shutdown)
                .await;
        }
    }

    /// Reserve `wanted` (or a free nameplate) for a receiver at `observed`: the nameplate
    /// and the registration's id.
    fn reserve(
        &self,
        observed: SocketAddr,
        wanted: Option<String>,
        to_session: mpsc::Sender<Relay>,
    ) -> Result<(String, u64), Response> {
        let source = source_key(observed.ip());
        let mut book = self.lock();
        if book.waiting.len() >= self.config.max_nameplates {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return Err(error(
                ErrorCode::TooMany,
                "the rendezvous is full; try again later",
            ));
        }
        if book.per_source.get(&source).copied().unwrap_or(0) >= self.config.max_per_source {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return Err(error(
                ErrorCode::TooMany,
                "too many codes open from your address",
            ));
        }
        let nameplate = match wanted {
            Some(wanted) => {
                let Ok(nameplate) = wanted.parse::<Nameplate>() else {
                    return Err(self.malformed("not a valid nameplate"));
                };
                let nameplate = nameplate.as_str().to_string();
                if book.waiting.contains_key(&nameplate) {
                    return Err(error(ErrorCode::Taken, "that code is in use; pick another"));
                }
                nameplate
            }
            None => free_nameplate(&book),
        };
        let id = book.next_id;
        book.next_id += 1;
        book.waiting.insert(
            nameplate.clone(),
            Waiting {
                id,
                pake: None,
                observed,
                source,
                to_session,
            },
        );
        *book.per_source.entry(source).or_insert(0) += 1;
        Ok((nameplate, id))
    }

    /// A sender: take the nameplate (single use), pair, then relay.
    async fn join(
        &self,
        observed: SocketAddr,
        nameplate: String,
        pake: String,
        send: &mut quinn::SendStream,
        requests: &mut mpsc::Receiver<Request>,
        shutdown: &mut Shutdown,
    ) {
        let allowed = {
            let mut joins = self.joins.lock().unwrap_or_else(|e| e.into_inner());
            joins.allow(Instant::now(), observed.ip())
        };
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
        // whose PAKE message is on its way is waited for (see [`PAKE_WAIT`]).
        let deadline = tokio::time::Instant::now() + PAKE_WAIT;
        let waiting = loop {
            let (taken, pending) = {
                let mut book = self.lock();
                match book.waiting.get(&nameplate) {
                    Some(w) if w.pake.is_some() => (book.remove(&nameplate, None), false),
                    Some(_) => (None, true),
                    None => (None, false),
                }
            };
            if taken.is_some() || !pending || tokio::time::Instant::now() >= deadline {
                break taken;
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
        let paired = Relay::Paired {
            pake,
            peer: observed,
            partner,
        };
        if waiting.to_session.send(paired).await.is_err() {
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
            pake: to_hex(waiting.pake.as_deref().unwrap_or_default()),
            peer: waiting.observed,
            observed,
        };
        if self.say(send, &message).await.is_ok() {
            self.relay(send, requests, &mut inbox, &waiting.to_session, shutdown)
                .await;
        }
    }

    /// Pass one sealed hello and at most one failure each way, until both sides are done
    /// or the pairing times out. A partner that leaves before its hello (a guesser that
    /// joined and went away, a crashed peer) is reported as a failure, so the client
    /// learns why its meeting ended.
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
        let (mut sealed, mut failed, mut client_open) = (false, false, true);
        let mut heard = false;
        loop {
            // Cancel-safe: channel receives and a timer.
            tokio::select! {
                request = requests.recv(), if client_open => match request {
                    Some(Request::Seal { sealed: hex }) if !sealed => {
                        sealed = true;
                        match from_hex(&hex, MAX_SEALED) {
                            Some(bytes) => { let _ = partner.send(Relay::Sealed(bytes)).await; }
                            None => { let _ = self.say(send, &self.malformed("bad sealed hello")).await; return; }
                        }
                    }
                    Some(Request::Fail { reason }) if !failed => {
                        failed = true;
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        let reason: String = reason.chars().take(200).collect();
                        let _ = partner.send(Relay::Failed(reason)).await;
                    }
                    Some(_) => {
                        let _ = self.say(send, &self.malformed("unexpected request in a pairing")).await;
                        return;
                    }
                    // The client hung up its side, and everything it said was passed
                    // on. Once the partner has said its piece too, this pairing is over
                    // here (it must not hold the client's stream for the whole timeout).
                    None if heard => return,
                    None => client_open = false,
                },
                relay = inbox.recv() => {
                    let (message, last) = match relay {
                        Some(Relay::Sealed(bytes)) => (Response::Sealed { sealed: to_hex(&bytes) }, false),
                        Some(Relay::Failed(reason)) => (Response::PeerFailed { reason }, false),
                        // The partner's session ended: nothing more will come. If it said
                        // nothing at all, tell the client, which would otherwise only see
                        // its stream end.
                        Some(Relay::Paired { .. }) | None if !heard => {
                            let reason = "the other side left before finishing the exchange";
                            (Response::PeerFailed { reason: reason.into() }, true)
                        }
                        Some(Relay::Paired { .. }) | None => return,
                    };
                    heard = true;
                    if self.say(send, &message).await.is_err() || last {
                        return;
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
        self.0.lock().remove(&self.1, Some(self.2));
    }
}

/// A random free numeric nameplate, short while few are in use: numbers below
/// max(100, 4 × waiting), so they stay one or two digits for humans and are not simply
/// the lowest free one (which anyone could predict and burn).
fn free_nameplate(book: &Book) -> String {
    let mut range = (book.waiting.len() as u32 * 4).max(100);
    let mut rng = rand::rng();
    loop {
        for _ in 0..16 {
            let candidate = rng.random_range(1..range).to_string();
            if !book.waiting.contains_key(&candidate) {
                return candidate;
            }
        }
        range = range.saturating_mul(2);
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

/// The second port: answer probes (rate limited, like the main socket), nothing else.
async fn answer_probes(socket: Arc<tokio::net::UdpSocket>) {
    let mut limiter = RateLimiter::new(RateConfig::default(), Instant::now());
    let mut buf = vec![0u8; crate::wire::MAX_DATAGRAM + 1];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            // ICMP errors surface here on some systems; anything else means the socket
            // is gone, and there is nothing to answer with.
            continue;
        };
        if let Ok(Message::Probe { txid }) = Message::decode(&buf[..n])
            && limiter.allow(Instant::now(), from.ip())
        {
            let reply = crate::punch::reply_to(from, txid);
            let _ = socket.send_to(&reply.contents, reply.destination).await;
        }
    }
}

impl Service for Rendezvous {
    async fn serve(self: Arc<Self>, peer: PeerConnection, shutdown: Shutdown) {
        let conn = peer.connection;
        let mut sessions = tokio::task::JoinSet::new();
        let mut shutdown = shutdown;
        loop {
            // Cancel-safe: `accept_bi` yields a stream only when it returns it.
            let (send, recv) = tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(_) => break,
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
                () = shutdown.recv() => {
                    sessions.shutdown().await;
                    return;
                }
            };
            // The guarded transport allows two streams at once, so this set stays tiny.
            let session_shutdown = shutdown.resubscribe();
            sessions.spawn(self.clone().session(
                conn.remote_address(),
                conn.local_ip(),
                send,
                recv,
                session_shutdown,
            ));
        }
        // The client left. What it sent last (its sealed hello, a failure) may still be
        // on its way through a session: let sessions pass it on, briefly, then stop them.
        let drain = async { while sessions.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LEAVE_GRACE, drain).await;
        sessions.shutdown().await;
    }
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
            ..crate::node::NodeConfig::new(identity, super::ALPN, true)
        };
        let node = Arc::new(Node::new(socket, node_config)?);
        let addrs = announced_addrs(main);
        let rendezvous = Rendezvous::new(node.clone(), alt, addrs, config, events)?;
        let limits = crate::server::Limits {
            max_connections: 4096,
            max_per_ip: 32,
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

/// The addresses a rendezvous bound to `main` tells clients about.
fn announced_addrs(main: SocketAddr) -> Vec<IpAddr> {
    if !main.ip().is_unspecified() {
        return vec![main.ip()];
    }
    let dual = main.is_ipv6();
    let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| !ip.is_loopback() && (dual || ip.is_ipv4()))
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .collect();
    if addrs.is_empty() {
        addrs.push(if dual {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    addrs
}

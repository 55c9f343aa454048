//! The one UDP socket: bound and tuned here, shared by probes and QUIC after hand-over.
//!
//! The NAT mapping that a punch opens belongs to one local port, so the socket that
//! punched must be the socket QUIC uses. [`DemuxSocket`] wraps quinn's own socket (keeping
//! its GSO/GRO batching) and splits traffic by the first byte of each datagram
//! (RFC 9443): QUIC always sets bit 0x40 (greasing is turned off in [`crate::node`]),
//! probes start with 0x01 or 0x02, and the classic Go demo's two exact datagrams are
//! recognised before that (see [`crate::wire`]). Probes are answered right here, inside
//! quinn's receive path, so a running endpoint keeps answering late or repeated probes,
//! and replies to probes *we* send are handed to whoever is punching
//! ([`DemuxSocket::subscribe`]). While a meeting by code runs, its probe keys are
//! registered here ([`DemuxSocket::authenticate`]): authenticated probes that verify under
//! one of them are answered with an authenticated reply, and the others go unanswered.
//!
//! STUN (RFC 8489) shares the socket too, told apart as RFC 7983 does: the two top bits
//! of its first byte are 0 and its magic cookie is at bytes 4..8 (our probes may start
//! with 0x01 as well, so the cookie decides; see [`crate::stun::is_stun`]). A STUN
//! response goes to whoever waits for its transaction id ([`DemuxSocket::expect_stun`]),
//! and only if it comes from an address that transaction asked; anything else is counted
//! and dropped. STUN never reaches QUIC, and nothing it says moves a connection.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::broadcast;

use crate::punch::{self, reply_to};
use crate::ratelimit::{RateConfig, RateLimiter};
use crate::wire::{self, Class, Legacy, Message, ProbeKeys};

/// Kernel send/receive buffer size requested for the socket. quinn does not size them,
/// and the default (~200 KiB) caps throughput at high rates: 4 MiB roughly doubles it.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Bind a UDP socket tuned for bulk QUIC: large kernel buffers, and dual-stack when bound
/// to the IPv6 wildcard so `[::]` also serves IPv4 peers.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Ignore failure: some systems are IPv6-only by policy.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel clamps to net.core.{r,w}mem_max without root.
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    Ok(socket.into())
}

/// Most UDP payload one `sendmsg` may carry, a GSO batch included: the IPv4 limit (65535
/// less the IP and UDP headers), which also fits IPv6.
const MAX_SEND: usize = 65_507;

/// Counters of what the demultiplexer saw. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SocketStats {
    /// Valid probes answered.
    pub probes_answered: u64,
    /// The Go demo's probes ([`wire::LEGACY_PROBE`]) answered with its reply.
    pub legacy_answered: u64,
    /// Valid probes (ours or the Go demo's) not answered because their source (or
    /// everyone) exceeded the reply rate (see [`crate::ratelimit`]).
    pub probes_limited: u64,
    /// Probe replies (the Go demo's included) handed to punchers.
    pub replies_routed: u64,
    /// Non-QUIC datagrams that were not valid probes or replies: dropped.
    pub malformed_dropped: u64,
    /// STUN responses handed to the transaction that waited for them.
    pub stun_routed: u64,
    /// STUN messages dropped unread: a transaction id nobody waits for, a source the
    /// transaction did not ask, or a request or indication (we serve no STUN).
    pub stun_dropped: u64,
    /// STUN responses that reached their transaction but did not parse or vet (a wrong
    /// class, an absurd XOR-MAPPED-ADDRESS): ignored, the transaction waits on.
    pub stun_rejected: u64,
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    legacy_answered: AtomicU64,
    limited: AtomicU64,
    routed: AtomicU64,
    malformed: AtomicU64,
    stun_routed: AtomicU64,
    stun_dropped: AtomicU64,
    stun_rejected: AtomicU64,
}

/// A reply to one of our probes: where it came from and its bytes.
pub type ProbeReply = (SocketAddr, Vec<u8>);

/// While alive, the socket answers probes authenticated under one meeting's keys (see
/// [`DemuxSocket::authenticate`]). Keep it as long as the peer may still probe.
#[derive(Debug)]
pub struct Authenticating {
    socket: Arc<DemuxSocket>,
    id: u64,
}

impl Drop for Authenticating {
    fn drop(&mut self) {
        self.socket.lock_keys().retain(|r| r.id != self.id);
    }
}

/// Told the source of every probe that verifies under one registration's keys, before the
/// datagrams that follow it in the same batch reach QUIC (see [`DemuxSocket::authenticate_with`]).
pub type OnProbe = Arc<dyn Fn(SocketAddr) + Send + Sync>;

/// One registration of probe keys.
struct Registered {
    id: u64,
    keys: ProbeKeys,
    on_probe: Option<OnProbe>,
    /// Recent transaction ids and the source each first came from.
    seen: std::collections::VecDeque<(wire::TxId, SocketAddr)>,
}

/// One STUN transaction waiting for its response.
struct StunWaiter {
    id: u64,
    txid: crate::stun::TxId,
    /// Where an answer may come from (canonical): the server, or with CHANGE-REQUEST the
    /// other address or port it was asked to answer from.
    sources: Vec<SocketAddr>,
    answers: tokio::sync::mpsc::Sender<ProbeReply>,
}

/// Answers queued per STUN transaction: a real server sends one per request (a few with
/// retransmissions); a flood of forged ones beyond this is dropped, not buffered.
const STUN_QUEUE: usize = 8;

/// A STUN transaction registered with [`DemuxSocket::expect_stun`]: receives the answers
/// from the addresses it asked, until dropped.
#[derive(Debug)]
pub struct StunWait {
    socket: Arc<DemuxSocket>,
    id: u64,
    answers: tokio::sync::mpsc::Receiver<ProbeReply>,
}

impl StunWait {
    /// The next answer (source and bytes), unparsed. Cancel-safe.
    pub async fn recv(&mut self) -> Option<ProbeReply> {
        self.answers.recv().await
    }
}

impl Drop for StunWait {
    fn drop(&mut self) {
        self.socket.lock_stun().retain(|w| w.id != self.id);
    }
}

/// Transaction ids remembered per registration, to tell a replayed probe from its original.
const SEEN_TXIDS: usize = 256;

/// A quinn [`AsyncUdpSocket`] that also speaks the probe protocol on the same port.
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    replies: broadcast::Sender<ProbeReply>,
    /// Valid probes we answered, with their sources: a peer we are meeting probes us from
    /// an address its NAT just opened, which is worth probing back at once (whether the
    /// prober is the peer, the traversal decides from the datagram).
    probes: broadcast::Sender<ProbeReply>,
    /// The probe keys of the meetings (and peer connections) in progress.
    keys: Mutex<Vec<Registered>>,
    next_key: AtomicU64,
    /// STUN transactions in progress (a handful at most: a NAT check runs four at once).
    stun: Mutex<Vec<StunWaiter>>,
    counters: Counters,
    /// Replies are rationed per source: probes are unauthenticated and may be forged.
    limiter: Mutex<RateLimiter>,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket")
            .field("inner", &self.inner)
            .field("stats", &self.stats())
            .finish()
    }
}

impl DemuxSocket {
    /// Wrap a bound socket (it must be inside a tokio runtime). The socket is moved, not
    /// re-bound: its local port, and so any NAT mapping made through it, is kept.
    pub fn new(socket: UdpSocket) -> io::Result<Arc<Self>> {
        Self::with_rate(socket, RateConfig::default())
    }

    /// Like [`new`](Self::new), with explicit limits on how fast probes are answered.
    pub fn with_rate(socket: UdpSocket, rate: RateConfig) -> io::Result<Arc<Self>> {
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
        let (replies, _) = broadcast::channel(64);
        let (probes, _) = broadcast::channel(64);
        Ok(Arc::new(DemuxSocket {
            inner,
            replies,
            probes,
            keys: Mutex::new(Vec::new()),
            next_key: AtomicU64::new(0),
            stun: Mutex::new(Vec::new()),
            counters: Counters::default(),
            limiter: Mutex::new(RateLimiter::new(rate, Instant::now())),
        }))
    }

    /// Receive every probe reply that arrives from now on (for a punch in progress).
    pub fn subscribe(&self) -> broadcast::Receiver<ProbeReply> {
        self.replies.subscribe()
    }

    /// Every valid probe this socket answers from now on, with its source (see
    /// [`crate::traverse::Traversal::handle_peer_probe`]).
    pub fn subscribe_probes(&self) -> broadcast::Receiver<ProbeReply> {
        self.probes.subscribe()
    }

    /// Answer authenticated probes that verify under `keys` (a meeting's, from its PAKE)
    /// until the returned guard is dropped.
    pub fn authenticate(self: &Arc<Self>, keys: ProbeKeys) -> Authenticating {
        self.register(keys, None)
    }

    /// [`authenticate`](Self::authenticate), and call `on_probe` with the source of each
    /// probe that verifies, synchronously: the path layer learns a peer's new address
    /// before the QUIC packets the peer sends from it right after its probe.
    pub fn authenticate_with(
        self: &Arc<Self>,
        keys: ProbeKeys,
        on_probe: OnProbe,
    ) -> Authenticating {
        self.register(keys, Some(on_probe))
    }

    fn register(self: &Arc<Self>, keys: ProbeKeys, on_probe: Option<OnProbe>) -> Authenticating {
        let id = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.lock_keys().push(Registered {
            id,
            keys,
            on_probe,
            seen: std::collections::VecDeque::new(),
        });
        Authenticating {
            socket: self.clone(),
            id,
        }
    }

    /// Receive the STUN responses to transaction `txid` that come from one of `sources`,
    /// until the returned guard is dropped (see [`crate::stun_client::binding`]). Responses from
    /// anywhere else, or to another transaction, are counted in
    /// [`SocketStats::stun_dropped`].
    pub fn expect_stun(
        self: &Arc<Self>,
        txid: crate::stun::TxId,
        sources: Vec<SocketAddr>,
    ) -> StunWait {
        let id = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, answers) = tokio::sync::mpsc::channel(STUN_QUEUE);
        self.lock_stun().push(StunWaiter {
            id,
            txid,
            sources: sources.into_iter().map(crate::addr::canonical).collect(),
            answers: tx,
        });
        StunWait {
            socket: self.clone(),
            id,
            answers,
        }
    }

    /// Count a STUN response its transaction refused (see [`SocketStats::stun_rejected`]).
    pub fn count_stun_rejected(&self) {
        self.counters.stun_rejected.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_stun(&self) -> std::sync::MutexGuard<'_, Vec<StunWaiter>> {
        self.stun.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand a STUN response to the transaction waiting for it from `from`, or drop it.
    fn handle_stun(&self, from: SocketAddr, data: &[u8]) {
        let routed = crate::stun::is_response(data)
            && crate::stun::transaction_id(data).is_some_and(|txid| {
                let from = crate::addr::canonical(from);
                let waiters = self.lock_stun();
                waiters
                    .iter()
                    .find(|w| w.txid == txid && w.sources.contains(&from))
                    .is_some_and(|w| w.answers.try_send((from, data.to_vec())).is_ok())
            });
        if routed {
            self.counters.stun_routed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.stun_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%from, "dropped a STUN message nobody asked for");
        }
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The authenticated reply to `data`, if it is a probe that verifies under a
    /// registered key.
    ///
    /// Probes carry no clock, so one seen on the way can be replayed from any source. It is
    /// answered (a reply is never larger than its probe, and rationed), but only the first
    /// source of a transaction id is told to the hooks: a replay from elsewhere ties no
    /// address to the peer.
    fn authenticated_reply(&self, from: SocketAddr, data: &[u8]) -> Option<punch::Transmit> {
        let (reply, hooks) =
            {
                let mut keys = self.lock_keys();
                let (at, txid) =
                    keys.iter().enumerate().find_map(
                        |(at, r)| match Message::decode_authenticated(data, &r.keys.theirs) {
                            Ok(Message::Probe { txid }) => Some((at, txid)),
                            _ => None,
                        },
                    )?;
                let verified = keys[at].keys.clone();
                let reply = punch::authenticated_reply_to(from, txid, &verified.ours);
                let seen = &mut keys[at].seen;
                let first = match seen.iter().find(|(t, _)| *t == txid) {
                    Some(&(_, source)) => source == from,
                    None => {
                        if seen.len() == SEEN_TXIDS {
                            seen.pop_front();
                        }
                        seen.push_back((txid, from));
                        true
                    }
                };
                // Every registration of the same keys hears of it (a meeting and its paths may
                // both hold them).
                let hooks: Vec<OnProbe> = keys
                    .iter()
                    .filter(|r| first && r.keys == verified)
                    .filter_map(|r| r.on_probe.clone())
                    .collect();
                (reply, hooks)
            };
        // Outside the lock: a hook takes the path layer's own.
        for hook in hooks {
            hook(from);
        }
        Some(reply)
    }

    /// Whether an authenticated reply verifies under a registered key: only those reach
    /// whoever punches (a flood of forged ones must not crowd out the real ones).
    fn verified_reply(&self, data: &[u8]) -> bool {
        self.lock_keys().iter().any(|r| {
            matches!(
                Message::decode_authenticated(data, &r.keys.theirs),
                Ok(Message::Reply { .. })
            )
        })
    }

    /// Send one probe datagram, waiting while the socket's send buffer is full.
    pub async fn send_probe(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        self.send_probe_from(destination, contents, None).await
    }

    /// [`send_probe`](Self::send_probe) from a chosen local address (the socket must be
    /// bound to a wildcard that covers it): a rendezvous with two addresses answers from
    /// the other one to test a NAT's filtering.
    pub async fn send_probe_from(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        src_ip: Option<IpAddr>,
    ) -> io::Result<()> {
        let destination = self.map_family(destination);
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip,
        };
        let mut poller = self.inner.clone().create_io_poller();
        loop {
            match self.inner.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
                }
                other => return other,
            }
        }
    }

    /// What the demultiplexer has seen so far.
    pub fn stats(&self) -> SocketStats {
        SocketStats {
            probes_answered: self.counters.answered.load(Ordering::Relaxed),
            legacy_answered: self.counters.legacy_answered.load(Ordering::Relaxed),
            probes_limited: self.counters.limited.load(Ordering::Relaxed),
            replies_routed: self.counters.routed.load(Ordering::Relaxed),
            malformed_dropped: self.counters.malformed.load(Ordering::Relaxed),
            stun_routed: self.counters.stun_routed.load(Ordering::Relaxed),
            stun_dropped: self.counters.stun_dropped.load(Ordering::Relaxed),
            stun_rejected: self.counters.stun_rejected.load(Ordering::Relaxed),
        }
    }

    /// An IPv4 destination on a dual-stack IPv6 socket must be written as IPv4-mapped.
    pub(crate) fn map_family(&self, addr: SocketAddr) -> SocketAddr {
        match (self.inner.local_addr(), addr) {
            (Ok(SocketAddr::V6(_)), SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        }
    }

    /// Handle one non-QUIC datagram of class `class`: answer a probe, route a reply, or
    /// count it dropped.
    fn handle_probe_datagram(
        &self,
        class: Class,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
    ) {
        match class {
            Class::Legacy(Legacy::Probe) => {
                if self.answer(&punch::legacy_reply_to(from), local_ip) {
                    self.counters
                        .legacy_answered
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            // A Go demo server's answer to our probe: the puncher decides if it counts.
            Class::Legacy(Legacy::Reply) => self.route(from, data),
            // An authenticated probe is answered only under a meeting's keys; an
            // authenticated reply goes to the traversal, which checks it.
            Class::Probe if wire::is_authenticated(data) => {
                if wire::is_authenticated_reply(data) {
                    if self.verified_reply(data) {
                        self.route(from, data);
                    } else {
                        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(reply) = self.authenticated_reply(from, data) {
                    if self.answer(&reply, local_ip) {
                        self.counters.answered.fetch_add(1, Ordering::Relaxed);
                        let _ = self.probes.send((from, data.to_vec()));
                    }
                } else {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(%from, "dropped a probe that no meeting's key verifies");
                }
            }
            // (`Quic` is never passed here; the decoder would refuse it.)
            Class::Probe | Class::Quic => match Message::decode(data) {
                Ok(Message::Probe { txid }) => {
                    if self.answer(&reply_to(from, txid), local_ip) {
                        self.counters.answered.fetch_add(1, Ordering::Relaxed);
                        // Nobody listening is the common case: nothing is being met.
                        let _ = self.probes.send((from, data.to_vec()));
                    }
                }
                Ok(Message::Reply { .. }) => self.route(from, data),
                Err(e) => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(%from, "dropped non-QUIC datagram: {e}");
                }
            },
        }
    }

    /// Hand a reply to whoever is punching.
    fn route(&self, from: SocketAddr, data: &[u8]) {
        self.counters.routed.fetch_add(1, Ordering::Relaxed);
        // No subscriber means nobody is punching: the reply is simply late.
        let _ = self.replies.send((from, data.to_vec()));
    }

    /// Send an answer to a probe (ours or the Go demo's); true if it was sent.
    ///
    /// Every datagram this socket sends unasked goes through here, so this is where the
    /// rate limit applies: answers are never larger than the probes that caused them, but
    /// probes may carry forged sources, and a flood would otherwise cost as many answers.
    fn answer(&self, reply: &punch::Transmit, local_ip: Option<IpAddr>) -> bool {
        if !self.may_answer(reply.destination) {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let transmit = Transmit {
            destination: reply.destination,
            ecn: None,
            contents: &reply.contents,
            segment_size: None,
            // Answer from the address the probe was sent to (multi-homed hosts).
            src_ip: local_ip,
        };
        // Best effort, like any UDP: a lost reply is covered by the prober's resend.
        match self.inner.try_send(&transmit) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(to = %reply.destination, "probe reply not sent: {e}");
                false
            }
        }
    }

    /// Whether `from` may get one more probe reply now (token buckets, see [`RateLimiter`]).
    fn may_answer(&self, from: SocketAddr) -> bool {
        let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        limiter.allow(Instant::now(), from.ip())
    }

    /// Remove probe segments from one received buffer (which may hold several GRO
    /// segments of `stride` bytes), handling each; returns the QUIC bytes left.
    fn filter_buffer(&self, buf: &mut [u8], meta: &RecvMeta) -> usize {
        if reserved_source(meta.addr) {
            // Never a real sender's address, and the path layer's mapped addresses live
            // there: a datagram claiming one is forged.
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        if meta.len == 0 {
            // An empty datagram is nobody's: count it with the other garbage.
            self.handle_probe_datagram(Class::Probe, meta.addr, meta.dst_ip, &[]);
            return 0;
        }
        let stride = meta.stride.max(1);
        let mut write = 0;
        let mut read = 0;
        while read < meta.len {
            let end = (read + stride).min(meta.len);
            if crate::stun::is_stun(&buf[read..end]) {
                self.handle_stun(meta.addr, &buf[read..end]);
                read = end;
                continue;
            }
            match wire::classify(&buf[read..end]) {
                Class::Quic => {
                    // Only move bytes once a probe segment has been cut out before them:
                    // the common all-QUIC buffer is left untouched.
                    if write != read {
                        buf.copy_within(read..end, write);
                    }
                    write += end - read;
                }
                class => self.handle_probe_datagram(class, meta.addr, meta.dst_ip, &buf[read..end]),
            }
            read = end;
        }
        write
    }
}

/// Whether `addr` is in `240.0.0.0/4` (reserved, never a source on the internet).
fn reserved_source(addr: SocketAddr) -> bool {
    match crate::addr::canonical(addr) {
        SocketAddr::V4(v4) => v4.ip().octets()[0] >= 240,
        SocketAddr::V6(_) => false,
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.segment_size {
            // quinn batches up to 10 packets per transmit whatever their size; with packets
            // larger than Ethernet's (see `crate::node::MAX_UDP_PAYLOAD`) the batch can
            // outgrow what one `sendmsg` carries, and the kernel would drop it whole
            // (EMSGSIZE, which quinn-udp swallows). Send it as several GSO batches of whole
            // packets instead. Should one of them block, quinn retries the whole
            // transmit: the peer discards the repeated packets, nothing is lost.
            Some(segment) if transmit.contents.len() > MAX_SEND && segment > 0 => {
                let per_send = (MAX_SEND / segment).max(1) * segment;
                for part in transmit.contents.chunks(per_send) {
                    self.inner.try_send(&Transmit {
                        contents: part,
                        segment_size: (part.len() > segment).then_some(segment),
                        ..*transmit
                    })?;
                }
                Ok(())
            }
            _ => self.inner.try_send(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            // Compact the batch: keep QUIC datagrams, in order, at the front.
            let mut kept = 0;
            for i in 0..n {
                let len = self.filter_buffer(&mut bufs[i], &meta[i]);
                if len == 0 {
                    continue;
                }
                if kept != i {
                    let (front, back) = bufs.split_at_mut(i);
                    front[kept][..len].copy_from_slice(&back[0][..len]);
                    meta[kept] = meta[i];
                }
                meta[kept].len = len;
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Only probes arrived: poll again, which either yields more or registers
            // the waker with the reactor.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

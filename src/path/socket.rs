//! [`PathSocket`]: the socket quinn sees, with one stable mapped address per peer.
//!
//! quinn dials and answers *mapped* addresses (`240.x.y.z:1`, a reserved range no real host
//! uses). Each one has a route: where its packets go now (a direct
//! address on the node's own socket, or a relay [`Carrier`]), chosen by the peer's path
//! driver ([`super::peer`]). Packets from the peer, whichever way they come, reach quinn
//! with the mapped address as their source. Everything else (the rendezvous, a direct-mode
//! peer given as `host:port`) passes through untouched, so the layer costs one hash lookup
//! per datagram batch when no peer is mapped.
//!
//! A real address tied to a mapped peer belongs to it: its packets all reach quinn from the
//! mapped address. So while a [`super::PeerPaths`] lives, talk to that peer through its
//! mapped address only; a second connection dialled to its real address from the same node
//! would not recognise the answers.
//!
//! Why not let quinn migrate between real addresses? Only a client can migrate in QUIC, a
//! relay is not an address at all, and a connection that sees its peer's address change
//! would re-validate and restart its congestion state on every flap. Here the connection
//! lives on; the path driver decides, with hysteresis, and tells the congestion controller
//! (see [`PathSocket::epoch`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::{Carrier, PathKind};
use crate::addr::canonical;
use crate::socket::DemuxSocket;

/// The first byte of every mapped address: `240.0.0.0/8`, reserved since 1989 and never
/// routed, so no real peer has one. IPv4 so that a node on an IPv4 socket can dial it
/// (quinn refuses an IPv6 peer there); a dual-stack socket sees it as `::ffff:240.x.y.z`,
/// which [`canonical`] folds back.
const MAPPED_PREFIX: u8 = 240;

/// Most real addresses tied to one mapped peer: its paths, and the addresses it probed us
/// from (a bound on what replayed probes could make us hold).
const MAX_TIES: usize = 16;

/// Relayed datagrams waiting for quinn to read them: beyond this many bytes, new ones are
/// dropped (as a full socket buffer would). quinn reads in batches, so this is only reached
/// if the endpoint stalls; it bounds what a relay (or a TCP client of a rendezvous) can make
/// a node buffer, like the kernel's receive buffer does for UDP.
const INBOX_BYTES: usize = 4 << 20;

/// Whether `addr` is one of ours.
pub fn is_mapped(addr: SocketAddr) -> bool {
    match canonical(addr) {
        SocketAddr::V4(v4) => v4.ip().octets()[0] == MAPPED_PREFIX,
        SocketAddr::V6(_) => false,
    }
}

/// The `n`th mapped address (n < 2^24; a node maps far fewer peers in its life).
fn mapped_addr(n: u64) -> SocketAddr {
    let [_, _, _, _, _, a, b, c] = n.to_be_bytes();
    SocketAddr::new(Ipv4Addr::new(MAPPED_PREFIX, a, b, c).into(), 1)
}

/// Where a mapped address's packets go now.
#[derive(Clone)]
pub(crate) enum Target {
    /// Nowhere yet (no live path): packets are dropped, quinn retransmits.
    Nowhere,
    /// To a real address, on the node's socket.
    Direct { addr: SocketAddr, kind: PathKind },
    /// Through a relay.
    Carried(Arc<dyn Carrier>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Nowhere => f.write_str("Nowhere"),
            Target::Direct { addr, kind } => write!(f, "{kind} {addr}"),
            Target::Carried(c) => write!(f, "{} {c:?}", c.kind()),
        }
    }
}

/// Bytes sent and received one way, by kind of path.
#[derive(Debug, Default)]
struct ByKind([AtomicU64; PathKind::ALL.len()]);

impl ByKind {
    fn add(&self, kind: PathKind, n: usize) {
        self.0[kind.index()].fetch_add(n as u64, Ordering::Relaxed);
    }

    fn get(&self) -> [u64; PathKind::ALL.len()] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Bytes that went each way, by kind of path: what a transfer's summary shows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PathBytes {
    /// Sent, indexed by [`PathKind::index`].
    pub sent: [u64; PathKind::ALL.len()],
    /// Received, likewise.
    pub received: [u64; PathKind::ALL.len()],
}

impl PathBytes {
    /// Bytes sent and received over paths of `kind`.
    pub fn of(&self, kind: PathKind) -> (u64, u64) {
        (self.sent[kind.index()], self.received[kind.index()])
    }
}

/// One mapped address: where its packets go, and what went which way.
#[derive(Debug)]
pub(crate) struct Route {
    mapped: SocketAddr,
    /// For an [attached](PathSocket::attach) route: the real address behind the carrier.
    real: Option<SocketAddr>,
    target: RwLock<Target>,
    sent: ByKind,
    received: ByKind,
    /// Datagrams dropped on the way out: no path, or larger than the relay carries.
    dropped: AtomicU64,
    /// Connection ids our endpoint gave this peer's connection, as seen in its short-header
    /// packets from its tied addresses: a packet with one of them from a new address is
    /// this peer's after its NAT rebound the port.
    cids: Mutex<VecDeque<Cid>>,
}

/// The destination connection id of a short-header packet: quinn's endpoint issues 8-byte
/// ids (its default generator, which `crate::node` keeps).
type Cid = [u8; 8];

/// Connection ids remembered per mapped peer.
const CIDS: usize = 8;

/// The destination connection id of a short-header QUIC packet.
fn short_header_cid(packet: &[u8]) -> Option<Cid> {
    if packet.first()? & 0x80 != 0 {
        return None;
    }
    packet.get(1..9)?.try_into().ok()
}

impl Route {
    fn remember(&self, cid: Cid) {
        let mut cids = self.cids.lock().unwrap_or_else(|e| e.into_inner());
        if !cids.contains(&cid) {
            if cids.len() == CIDS {
                cids.pop_front();
            }
            cids.push_back(cid);
        }
    }

    fn knows(&self, cid: &Cid) -> bool {
        self.cids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(cid)
    }

    pub(crate) fn mapped(&self) -> SocketAddr {
        self.mapped
    }

    pub(crate) fn set(&self, target: Target) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = target;
    }

    fn target(&self) -> Target {
        self.target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn bytes(&self) -> PathBytes {
        PathBytes {
            sent: self.sent.get(),
            received: self.received.get(),
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    routes: HashMap<SocketAddr, Arc<Route>>,
    /// Real addresses known to belong to a mapped peer: their packets reach quinn from the
    /// mapped address.
    by_real: HashMap<SocketAddr, (SocketAddr, PathKind)>,
}

#[derive(Debug, Default)]
struct Inbox {
    queue: VecDeque<(SocketAddr, Bytes)>,
    /// Bytes in `queue`.
    bytes: usize,
    waker: Option<Waker>,
}

/// Counters of the path layer. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PathSocketStats {
    /// Datagrams delivered by carriers (relayed in).
    pub carried_in: u64,
    /// Datagrams given to carriers (relayed out).
    pub carried_out: u64,
    /// Outgoing datagrams dropped: no live path, too large for the relay, relay refused.
    pub dropped_out: u64,
    /// Incoming relayed datagrams dropped: quinn was not reading (inbox full).
    pub dropped_in: u64,
}

#[derive(Debug, Default)]
struct Counters {
    carried_in: AtomicU64,
    carried_out: AtomicU64,
    dropped_out: AtomicU64,
    dropped_in: AtomicU64,
}

/// quinn's socket: the node's [`DemuxSocket`], plus mapped addresses and relays.
pub struct PathSocket {
    demux: Arc<DemuxSocket>,
    table: RwLock<Table>,
    inbox: Mutex<Inbox>,
    counters: Counters,
    epoch: Arc<AtomicU64>,
    /// Which source a receive serves first, in turn: relayed datagrams (a TCP client of a
    /// rendezvous sends as fast as it likes) must not starve the real socket, nor the
    /// reverse.
    socket_first: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket")
            .field("demux", &self.demux)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PathSocket {
    /// The path layer over `demux`, with no peer mapped yet.
    pub fn new(demux: Arc<DemuxSocket>) -> Arc<Self> {
        Arc::new(PathSocket {
            demux,
            table: RwLock::default(),
            inbox: Mutex::default(),
            counters: Counters::default(),
            epoch: Arc::default(),
            socket_first: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The node's real socket.
    pub fn demux(&self) -> &Arc<DemuxSocket> {
        &self.demux
    }

    /// Bumped whenever a mapped peer's path changes: the node's congestion controllers
    /// start over on the new path when they see it move (see [`crate::close_gate`]).
    pub fn epoch(&self) -> &Arc<AtomicU64> {
        &self.epoch
    }

    /// What went through the layer so far.
    pub fn stats(&self) -> PathSocketStats {
        let c = &self.counters;
        PathSocketStats {
            carried_in: c.carried_in.load(Ordering::Relaxed),
            carried_out: c.carried_out.load(Ordering::Relaxed),
            dropped_out: c.dropped_out.load(Ordering::Relaxed),
            dropped_in: c.dropped_in.load(Ordering::Relaxed),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A new mapped address, with nowhere to go yet.
    pub(crate) fn add_route(&self) -> Arc<Route> {
        self.new_route(None)
    }

    fn new_route(&self, real: Option<SocketAddr>) -> Arc<Route> {
        let mut table = self.write();
        // Skip addresses still in use once the counter wraps (2^24 routes).
        let mapped = loop {
            table.next = (table.next + 1) % (1 << 24);
            let mapped = mapped_addr(table.next);
            if table.next != 0 && !table.routes.contains_key(&mapped) {
                break mapped;
            }
        };
        let route = Arc::new(Route {
            mapped,
            real,
            target: RwLock::new(Target::Nowhere),
            sent: ByKind::default(),
            received: ByKind::default(),
            dropped: AtomicU64::new(0),
            cids: Mutex::default(),
        });
        table.routes.insert(mapped, route.clone());
        route
    }

    /// Forget a mapped address and every real address tied to it.
    pub(crate) fn remove_route(&self, mapped: SocketAddr) {
        let mut table = self.write();
        table.routes.remove(&mapped);
        table.by_real.retain(|_, (m, _)| *m != mapped);
    }

    /// Tie a real address to a mapped peer: what comes from it reaches quinn from `mapped`
    /// (and is counted as `kind`). Returns false if the address already belongs to another
    /// peer (it stays theirs).
    pub(crate) fn tie(&self, real: SocketAddr, mapped: SocketAddr, kind: PathKind) -> bool {
        let real = canonical(real);
        let mut table = self.write();
        if !table.routes.contains_key(&mapped) {
            // The peer is gone (a late hook, a punch aborted with it).
            return false;
        }
        match table.by_real.get(&real) {
            Some((owner, _)) => *owner == mapped,
            None => {
                let ties = table.by_real.values().filter(|(m, _)| *m == mapped).count();
                if ties >= MAX_TIES {
                    return false;
                }
                table.by_real.insert(real, (mapped, kind));
                true
            }
        }
    }

    /// Untie a real address from `mapped` (a path given up).
    pub(crate) fn untie(&self, real: SocketAddr, mapped: SocketAddr) {
        let real = canonical(real);
        let mut table = self.write();
        if table
            .by_real
            .get(&real)
            .is_some_and(|(owner, _)| *owner == mapped)
        {
            table.by_real.remove(&real);
        }
    }

    /// The real address behind `addr` when it is a mapped peer currently on a direct path
    /// (for display and per-address budgets); `addr` itself otherwise.
    pub fn real_addr(&self, addr: SocketAddr) -> SocketAddr {
        if !is_mapped(addr) {
            return addr;
        }
        let route = self.read().routes.get(&canonical(addr)).cloned();
        match route {
            Some(route) => match (route.target(), route.real) {
                (Target::Direct { addr, .. }, _) => addr,
                (_, Some(real)) => real,
                _ => addr,
            },
            None => addr,
        }
    }

    /// A fixed route through `carrier` to a host that is not a peer met by code: a
    /// rendezvous reached over TCP, or, on the rendezvous, a client that came over TCP.
    /// quinn dials (or sees) [`Attached::mapped`]; [`real_addr`](Self::real_addr) gives
    /// `real` back for it (what the rendezvous reports as the client's address, and what
    /// per-address budgets count). Dropping the handle removes the route.
    pub fn attach(self: &Arc<Self>, carrier: Arc<dyn Carrier>, real: SocketAddr) -> Attached {
        let route = self.new_route(Some(canonical(real)));
        route.set(Target::Carried(carrier.clone()));
        Attached {
            socket: self.clone(),
            route,
            kind: carrier.kind(),
        }
    }

    /// A relayed datagram from the peer behind `route`, for quinn.
    pub(crate) fn deliver(&self, route: &Route, kind: PathKind, datagram: Bytes) {
        self.counters.carried_in.fetch_add(1, Ordering::Relaxed);
        route.received.add(kind, datagram.len());
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.bytes + datagram.len() > INBOX_BYTES {
            self.counters.dropped_in.fetch_add(1, Ordering::Relaxed);
            return;
        }
        inbox.bytes += datagram.len();
        inbox.queue.push_back((route.mapped, datagram));
        if let Some(waker) = inbox.waker.take() {
            waker.wake();
        }
    }

    /// Send one datagram of ours (a probe) through a carrier, counted like QUIC's.
    pub(crate) fn carry(&self, carrier: &dyn Carrier, datagram: &[u8]) -> bool {
        if datagram.len() > carrier.max_datagram() || carrier.send(datagram).is_err() {
            self.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.counters.carried_out.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Send what quinn wrote to a mapped peer along its route.
    fn send_mapped(&self, route: &Route, transmit: &Transmit) -> io::Result<()> {
        match route.target() {
            Target::Nowhere => {
                route.dropped.fetch_add(1, Ordering::Relaxed);
                self.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Target::Direct { addr, kind } => {
                let sent = self.demux.try_send(&Transmit {
                    destination: self.demux.map_family(addr),
                    // The local address quinn saw belongs to whichever path brought the
                    // peer's last packet; let the kernel pick the one for this path.
                    src_ip: None,
                    ..*transmit
                });
                if sent.is_ok() {
                    route.sent.add(kind, transmit.contents.len());
                }
                sent
            }
            Target::Carried(carrier) => {
                let kind = carrier.kind();
                let segment = transmit.segment_size.unwrap_or(transmit.contents.len());
                for packet in transmit.contents.chunks(segment.max(1)) {
                    if self.carry(&*carrier, packet) {
                        route.sent.add(kind, packet.len());
                    } else {
                        route.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Dropped or not, the transmit is done: a relay is a lossy path to QUIC.
                Ok(())
            }
        }
    }

    /// Relayed datagrams into quinn's buffers; 0 if none waits (the waker is then set).
    fn take_inbox(
        &self,
        cx: &Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.queue.is_empty() {
            inbox.waker = Some(cx.waker().clone());
            return 0;
        }
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((from, datagram)) = inbox.queue.pop_front() else {
                break;
            };
            inbox.bytes -= datagram.len();
            if datagram.len() > bufs[n].len() {
                self.counters.dropped_in.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..datagram.len()].copy_from_slice(&datagram);
            meta[n] = RecvMeta {
                addr: self.demux.map_family(from),
                len: datagram.len(),
                stride: datagram.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n == 0 {
            // Registered before the real socket is polled: a delivery in between wakes us.
            inbox.waker = Some(cx.waker().clone());
        }
        n
    }
}

/// The mapped peer whose connection uses connection id `cid`.
fn rebound_owner(table: &Table, cid: Cid) -> Option<(SocketAddr, PathKind)> {
    let route = table.routes.values().find(|r| r.knows(&cid))?;
    Some((route.mapped, PathKind::Direct))
}

/// A fixed carried route (see [`PathSocket::attach`]).
#[derive(Debug)]
pub struct Attached {
    socket: Arc<PathSocket>,
    route: Arc<Route>,
    kind: PathKind,
}

impl Attached {
    /// The address quinn uses for the host behind the carrier.
    pub fn mapped(&self) -> SocketAddr {
        self.route.mapped
    }

    /// One datagram read from the carrier. Only QUIC travels on an attached route; anything
    /// else is dropped and counted.
    pub fn deliver(&self, datagram: Bytes) {
        if crate::wire::classify(&datagram) == crate::wire::Class::Quic {
            self.socket.deliver(&self.route, self.kind, datagram);
        } else {
            self.socket
                .counters
                .dropped_in
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes sent and received on this route.
    pub fn bytes(&self) -> PathBytes {
        self.route.bytes()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.socket.remove_route(self.route.mapped);
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.demux.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if is_mapped(transmit.destination) {
            let route = self
                .read()
                .routes
                .get(&canonical(transmit.destination))
                .cloned();
            return match route {
                Some(route) => self.send_mapped(&route, transmit),
                // A peer forgotten while its connection still talks: nowhere to go.
                None => {
                    self.counters.dropped_out.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            };
        }
        self.demux.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let socket_first = self.socket_first.fetch_xor(true, Ordering::Relaxed);
        if !socket_first {
            let carried = self.take_inbox(cx, bufs, meta);
            if carried > 0 {
                return Poll::Ready(Ok(carried));
            }
        }
        let n = match self.demux.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            // Nothing on the socket (its waker is registered): relayed datagrams, if any
            // (otherwise the inbox's waker is registered too).
            Poll::Pending if socket_first => {
                let carried = self.take_inbox(cx, bufs, meta);
                return if carried > 0 {
                    Poll::Ready(Ok(carried))
                } else {
                    Poll::Pending
                };
            }
            other => return other,
        };
        let mut rebound = Vec::new();
        {
            let table = self.read();
            if !table.by_real.is_empty() {
                for (m, buf) in meta[..n].iter_mut().zip(bufs.iter()) {
                    let real = canonical(m.addr);
                    let cid = short_header_cid(&buf[..m.len.min(buf.len())]);
                    let owner = match table.by_real.get(&real).copied() {
                        Some(owner) => {
                            if let (Some(cid), Some(route)) = (cid, table.routes.get(&owner.0)) {
                                route.remember(cid);
                            }
                            Some(owner)
                        }
                        // A packet of a mapped peer's connection (one of the ids we gave
                        // it) from an address not tied to it: its NAT rebound the port (or
                        // moved it). Tied now, or quinn would see its peer migrate to a
                        // real address, outside the path layer, and back again once the
                        // peer's probe ties it.
                        None => cid
                            .and_then(|cid| rebound_owner(&table, cid))
                            .inspect(|&o| {
                                rebound.push((real, Some(o)));
                            }),
                    };
                    if let Some((mapped, kind)) = owner {
                        if let Some(route) = table.routes.get(&mapped) {
                            route.received.add(kind, m.len);
                        }
                        // As quinn wrote it: on a dual-stack socket a client connection
                        // drops packets whose source is not spelt like its peer's address.
                        m.addr = self.demux.map_family(mapped);
                    }
                }
            }
        }
        for (real, owner) in rebound {
            if let Some((mapped, kind)) = owner {
                self.tie(real, mapped, kind);
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.demux.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.demux.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.demux.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.demux.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What relays deliver while quinn does not read waits within a byte bound; the rest is
    /// dropped and counted, as a full socket buffer would drop it.
    #[tokio::test]
    async fn relayed_datagrams_wait_within_a_byte_bound() {
        let socket = crate::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let paths = PathSocket::new(DemuxSocket::new(socket).unwrap());
        let route = paths.add_route();
        let datagram = Bytes::from(vec![0x40u8; 1200]);
        let fit = INBOX_BYTES / 1200;
        for _ in 0..fit + 10 {
            paths.deliver(&route, PathKind::RelayedUdp, datagram.clone());
        }
        let stats = paths.stats();
        assert_eq!(stats.carried_in, fit as u64 + 10);
        assert_eq!(stats.dropped_in, 10, "{stats:?}");
        assert_eq!(
            route.bytes().of(PathKind::RelayedUdp).1,
            (fit as u64 + 10) * 1200
        );
    }

    /// A peer holds at most `MAX_TIES` real addresses, and a gone peer none.
    #[tokio::test]
    async fn ties_are_bounded_and_die_with_their_peer() {
        let socket = crate::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let paths = PathSocket::new(DemuxSocket::new(socket).unwrap());
        let route = paths.add_route();
        let tied = (0..MAX_TIES + 4)
            .filter(|&i| {
                let real = SocketAddr::from(([203, 0, 113, 7], 1000 + i as u16));
                paths.tie(real, route.mapped(), PathKind::Direct)
            })
            .count();
        assert_eq!(tied, MAX_TIES);
        paths.remove_route(route.mapped());
        let late = SocketAddr::from(([203, 0, 113, 8], 1));
        assert!(!paths.tie(late, route.mapped(), PathKind::Direct));
        assert!(paths.read().by_real.is_empty());
    }

    #[test]
    fn mapped_addresses_are_recognised_and_distinct() {
        let a = mapped_addr(1);
        let b = mapped_addr(2);
        assert_ne!(a, b);
        assert!(is_mapped(a) && is_mapped(b));
        // The same address as a dual-stack socket would write it is still ours.
        let dual_stack: SocketAddr = "[::ffff:240.0.0.1]:1".parse().unwrap();
        assert!(is_mapped(dual_stack));
        assert!(!is_mapped("203.0.113.5:9".parse().unwrap()));
        assert!(!is_mapped("[2001:db8::1]:9".parse().unwrap()));
        assert!(!is_mapped("241.0.0.1:1".parse().unwrap()));
    }
}

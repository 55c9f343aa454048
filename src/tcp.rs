//! The rendezvous over TLS on TCP, for networks that block UDP.
//!
//! Not a second protocol: a transport *below* quinn. The client's whole QUIC connection to
//! the rendezvous travels as length-prefixed datagrams (a 2-byte big-endian length, then the
//! datagram, as Tailscale's DERP frames them) on one TLS-over-TCP stream (ALPN [`ALPN`]).
//! On each end a [`Carrier`] writes into that stream and a reader hands what comes out to
//! the node's [`PathSocket`] through an [attached](PathSocket::attach) route, so quinn sees
//! an ordinary peer at a mapped address. Meeting by code, the PAKE, NAT information and
//! relayed datagrams all work unchanged over it.
//!
//! Why TLS, when the rendezvous is untrusted and the QUIC connection inside has TLS of its
//! own? So the stream looks like any HTTPS flow to the middleboxes that let only such flows
//! through (the certificate is the rendezvous's self-signed identity and is not checked).
//!
//! **Never blocking, always bounded.** [`Carrier::send`] is called from quinn's send path:
//! it only pushes the datagram onto a queue bounded in bytes ([`LinkConfig::queue_bytes`])
//! and drops it when the queue is full, as a full UDP socket buffer would; QUIC's loss
//! recovery and congestion control then do what they do on any lossy path. One task per
//! link drains the queue into the stream and reads frames out of it. A peer that stops
//! reading stalls our writes: a write that does not complete within
//! [`LinkConfig::write_timeout`] closes the link, so such a peer costs at most its queue
//! and buffers for a few seconds. A frame of length 0, longer than [`MAX_FRAME`], or that
//! is not QUIC closes the link too (only that link).
//!
//! **Memory of one link**, at most: its queue ([`LinkConfig::queue_bytes`], 64 KiB by
//! default), one write batch being written (≤ [`WRITE_BATCH`] + one frame, 32 KiB), one frame
//! being read (16 KiB), and rustls's buffers (encrypted data waiting for the socket, at most
//! 32 KiB; a record being received, ~17 KiB): about 165 KiB, plus the kernel's socket
//! buffers, which are not ours to count. Measured: see `docs/rendezvous.md`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use crate::identity::Identity;
use crate::path::{Attached, Carrier, PathKind, PathSocket};
use crate::tls::TlsError;

/// The outer TLS's ALPN: what a rendezvous's TCP port speaks.
pub const ALPN: &[u8] = b"qpunch-rendezvous-tcp/1";

/// The largest datagram a link carries: above the node's largest QUIC packet
/// ([`crate::node::MAX_UDP_PAYLOAD`]), far below what the 2-byte length could say.
pub const MAX_FRAME: usize = 16 * 1024;

/// The most the writer gathers from the queue into one write (then flushes): large enough
/// for one TLS record's worth of small packets, small enough to bound the batch buffer.
pub const WRITE_BATCH: usize = 16 * 1024;

/// What rustls may hold of encrypted data waiting for the socket (its default is 64 KiB):
/// with the write batch above it, one write's worth.
const TLS_BUFFER: usize = 32 * 1024;

/// How long connecting over TCP and the TLS handshake may take, client side.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a TCP link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The TCP connection failed (refused, unreachable).
    #[error("cannot connect over TCP to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// No TCP connection and TLS handshake within the time allowed.
    #[error("no TLS-over-TCP answer from {addr} within {timeout:?}")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// The TLS handshake failed (not a rendezvous, or something in the way).
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The server does not speak [`ALPN`].
    #[error("{0} does not speak the rendezvous's TCP protocol (ALPN qpunch-rendezvous-tcp/1)")]
    Alpn(SocketAddr),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Config(#[from] TlsError),
    /// Binding or accepting on the listening socket failed.
    #[error("TCP listener: {0}")]
    Listen(io::Error),
}

/// The limits of one link (both ends use them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bytes of datagrams waiting to be written, at most; beyond, datagrams are dropped.
    pub queue_bytes: usize,
    /// How long one write may take before the peer is taken for one that does not read
    /// and the link is closed.
    pub write_timeout: Duration,
    /// A link on which nothing arrives for this long is closed. The QUIC connection inside
    /// sends keep-alives every [`crate::node::KEEP_ALIVE`], so only a dead one is idle.
    pub idle_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            queue_bytes: 64 * 1024,
            write_timeout: Duration::from_secs(5),
            // As a QUIC connection's own idle timeout (`crate::node::IDLE_TIMEOUT`).
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a link ended.
#[derive(Debug)]
pub enum LinkEnd {
    /// The peer closed the stream.
    Closed,
    /// Nothing arrived for [`LinkConfig::idle_timeout`].
    Idle,
    /// A write did not complete within [`LinkConfig::write_timeout`]: the peer does not read.
    SlowReader,
    /// The peer sent a frame of this length that is 0, over [`MAX_FRAME`], or not QUIC.
    BadFrame(usize),
    /// Our side let go of the link (its carrier is gone).
    Dropped,
    /// The stream failed.
    Io(io::Error),
}

/// The writing end of a link, as the path layer sees it.
#[derive(Debug)]
struct TcpCarrier {
    queue: mpsc::UnboundedSender<Bytes>,
    /// Bytes queued and not yet taken by the writer: what bounds the queue.
    queued: AtomicUsize,
    limit: usize,
    open: AtomicBool,
}

impl Carrier for TcpCarrier {
    fn kind(&self) -> PathKind {
        PathKind::RelayedTcp
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        if !self.open.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::NotConnected.into());
        }
        if datagram.is_empty() || datagram.len() > MAX_FRAME {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // Reserve first, so concurrent senders cannot together overshoot the limit.
        let before = self.queued.fetch_add(datagram.len(), Ordering::AcqRel);
        if before + datagram.len() > self.limit {
            self.queued.fetch_sub(datagram.len(), Ordering::AcqRel);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.queue.send(Bytes::copy_from_slice(datagram)).is_err() {
            self.queued.fetch_sub(datagram.len(), Ordering::AcqRel);
            self.open.store(false, Ordering::Relaxed);
            return Err(io::ErrorKind::NotConnected.into());
        }
        Ok(())
    }

    fn max_datagram(&self) -> usize {
        if self.open.load(Ordering::Relaxed) {
            MAX_FRAME
        } else {
            0
        }
    }
}

fn carrier(config: &LinkConfig) -> (Arc<TcpCarrier>, mpsc::UnboundedReceiver<Bytes>) {
    let (queue, rx) = mpsc::unbounded_channel();
    let carrier = Arc::new(TcpCarrier {
        queue,
        queued: AtomicUsize::new(0),
        limit: config.queue_bytes,
        open: AtomicBool::new(true),
    });
    (carrier, rx)
}

/// Run one link until either direction ends: frames from `stream` go to `attached`,
/// datagrams from `queue` go into `stream`.
async fn run_link<S>(
    stream: S,
    attached: &Attached,
    carrier: &TcpCarrier,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    config: &LinkConfig,
) -> LinkEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let end = {
        let reading = read_frames(&mut rd, attached, config.idle_timeout);
        let writing = write_frames(&mut wr, &mut queue, carrier, config.write_timeout);
        // Neither branch is cancel-safe, on purpose: whichever direction ends first ends
        // the link, and the other's half-read or half-written frame goes with the stream.
        tokio::select! {
            end = reading => end,
            end = writing => end,
        }
    };
    carrier.open.store(false, Ordering::Relaxed);
    queue.close();
    if !matches!(end, LinkEnd::SlowReader | LinkEnd::Io(_)) {
        // A clean close (TLS close_notify, then FIN) when the peer still reads; bounded,
        // since it may not.
        let mut stream = rd.unsplit(wr);
        let _ = tokio::time::timeout(Duration::from_millis(500), stream.shutdown()).await;
    }
    end
}

async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    attached: &Attached,
    idle: Duration,
) -> LinkEnd {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, rd.read_exact(&mut len)).await {
            Err(_) => return LinkEnd::Idle,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return LinkEnd::Closed,
            Ok(Err(e)) => return LinkEnd::Io(e),
            Ok(Ok(_)) => {}
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 || n > MAX_FRAME {
            return LinkEnd::BadFrame(n);
        }
        let mut datagram = vec![0; n];
        match tokio::time::timeout(idle, rd.read_exact(&mut datagram)).await {
            Err(_) => return LinkEnd::Idle,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return LinkEnd::Closed,
            Ok(Err(e)) => return LinkEnd::Io(e),
            Ok(Ok(_)) => {}
        }
        // Only QUIC travels on a link: anything else is a broken or hostile peer.
        if crate::wire::classify(&datagram) != crate::wire::Class::Quic {
            return LinkEnd::BadFrame(n);
        }
        attached.deliver(Bytes::from(datagram));
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    queue: &mut mpsc::UnboundedReceiver<Bytes>,
    carrier: &TcpCarrier,
    write_timeout: Duration,
) -> LinkEnd {
    let mut batch = Vec::with_capacity(WRITE_BATCH + MAX_FRAME + 2);
    loop {
        let Some(first) = queue.recv().await else {
            return LinkEnd::Dropped;
        };
        batch.clear();
        let mut next = Some(first);
        while let Some(datagram) = next.take() {
            carrier.queued.fetch_sub(datagram.len(), Ordering::AcqRel);
            // `send` refuses empty and oversized datagrams, so the length fits.
            batch.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
            batch.extend_from_slice(&datagram);
            if batch.len() < WRITE_BATCH {
                next = queue.try_recv().ok();
            }
        }
        let write = async {
            wr.write_all(&batch).await?;
            wr.flush().await
        };
        match tokio::time::timeout(write_timeout, write).await {
            Err(_) => return LinkEnd::SlowReader,
            Ok(Err(e)) => return LinkEnd::Io(e),
            Ok(Ok(())) => {}
        }
    }
}

/// A client's link to a rendezvous over TLS/TCP: quinn dials [`mapped`](Self::mapped).
/// Dropping it closes the stream and removes the route.
#[derive(Debug)]
pub struct TcpLink {
    attached: Arc<Attached>,
    carrier: Arc<TcpCarrier>,
    remote: SocketAddr,
    local: SocketAddr,
    task: tokio::task::AbortHandle,
}

impl TcpLink {
    /// The address quinn uses for the rendezvous behind the link.
    pub fn mapped(&self) -> SocketAddr {
        self.attached.mapped()
    }

    /// The rendezvous's TCP address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Our end of the TCP connection (what the rendezvous observes, behind any NAT).
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Whether the stream is still up.
    pub fn is_open(&self) -> bool {
        self.carrier.open.load(Ordering::Relaxed)
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connect over TLS/TCP to the rendezvous at `addr` (within `timeout`) and attach a route
/// for it on `paths`.
pub async fn connect(
    paths: &Arc<PathSocket>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpLink, TcpError> {
    connect_from(paths, None, addr, timeout).await
}

/// [`connect`] from `local` (any port), when given: the address of the node's own socket,
/// so the rendezvous sees the host at one address whichever transport it uses.
pub async fn connect_from(
    paths: &Arc<PathSocket>,
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpLink, TcpError> {
    let tls = tokio_rustls::TlsConnector::from(crate::tls::stream_client_config(&[ALPN.to_vec()])?);
    let handshake = async {
        let connect = async {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            if let Some(ip) = local {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(addr).await
        };
        let tcp = connect
            .await
            .map_err(|source| TcpError::Connect { addr, source })?;
        // QUIC handshakes and acknowledgements are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME)
            .map_err(|e| TcpError::Tls {
                addr,
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?
            .to_owned();
        tls.connect(name, tcp)
            .await
            .map_err(|source| TcpError::Tls { addr, source })
    };
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| TcpError::Timeout { addr, timeout })??;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(TcpError::Alpn(addr));
    }
    let mut stream = stream;
    stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
    let local = stream
        .get_ref()
        .0
        .local_addr()
        .map_err(|source| TcpError::Connect { addr, source })?;
    let config = LinkConfig::default();
    let (carrier, queue) = carrier(&config);
    let attached = Arc::new(paths.attach(carrier.clone(), addr));
    let task = {
        let attached = attached.clone();
        let carrier = carrier.clone();
        tokio::spawn(async move {
            let end = run_link(stream, &attached, &carrier, queue, &config).await;
            tracing::debug!(%addr, ?end, "TCP link to the rendezvous ended");
        })
        .abort_handle()
    };
    Ok(TcpLink {
        attached,
        carrier,
        remote: addr,
        local,
        task,
    })
}

/// The budgets of a [`TcpServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// TCP clients at once, in all (handshaking or linked).
    pub max_clients: usize,
    /// TCP clients at once from one source (an IPv4 address or an IPv6 /64).
    pub max_per_source: usize,
    /// How long the TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Each link's limits.
    pub link: LinkConfig,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_clients: 1024,
            max_per_source: 16,
            handshake_timeout: Duration::from_secs(5),
            link: LinkConfig::default(),
        }
    }
}

/// Counters of a [`TcpServer`]. `live` is the only gauge; the rest never go down.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TcpStats {
    /// Clients connected right now (handshaking or linked).
    pub live: u64,
    /// Clients that completed the TLS handshake.
    pub linked: u64,
    /// Connections refused by a budget (in all, or per source).
    pub refused: u64,
    /// TLS handshakes that failed or timed out.
    pub handshake_failed: u64,
    /// Links closed because the client did not read.
    pub slow_readers: u64,
    /// Links closed because the client sent a bad frame.
    pub bad_frames: u64,
    /// Links closed because nothing arrived for the idle timeout.
    pub idle: u64,
}

#[derive(Debug, Default)]
struct Counters {
    live: AtomicU64,
    linked: AtomicU64,
    refused: AtomicU64,
    handshake_failed: AtomicU64,
    slow_readers: AtomicU64,
    bad_frames: AtomicU64,
    idle: AtomicU64,
}

/// Clients per source, released on drop.
#[derive(Debug, Default)]
struct PerSource(Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct SourceSlot(Arc<PerSource>, std::net::IpAddr);

impl PerSource {
    fn claim(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<SourceSlot> {
        let key = crate::ratelimit::source_key(ip);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SourceSlot(self.clone(), key))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Counts a client as live while it exists.
struct Live(Arc<Counters>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The TCP side of a rendezvous: accepts TLS clients and attaches each one's link on the
/// rendezvous node's [`PathSocket`], so its QUIC endpoint serves them as any client, from
/// a mapped address whose [`real_addr`](PathSocket::real_addr) is the client's TCP address.
/// Dropping it stops accepting and closes every link.
#[derive(Debug)]
pub struct TcpServer {
    local: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::AbortHandle,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpServer {
    /// Serve `listener` (must be called within a tokio runtime) for `paths`, presenting
    /// `identity`'s certificate.
    pub fn spawn(
        listener: std::net::TcpListener,
        paths: Arc<PathSocket>,
        identity: &Identity,
        limits: ServerLimits,
    ) -> Result<Self, TcpError> {
        let tls = tokio_rustls::TlsAcceptor::from(crate::tls::stream_server_config(
            identity,
            &[ALPN.to_vec()],
        )?);
        listener.set_nonblocking(true).map_err(TcpError::Listen)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(TcpError::Listen)?;
        let local = listener.local_addr().map_err(TcpError::Listen)?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(listener, tls, paths, limits, counters.clone()))
            .abort_handle();
        Ok(TcpServer {
            local,
            counters,
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Counters so far.
    pub fn stats(&self) -> TcpStats {
        let c = &self.counters;
        TcpStats {
            live: c.live.load(Ordering::Relaxed),
            linked: c.linked.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            handshake_failed: c.handshake_failed.load(Ordering::Relaxed),
            slow_readers: c.slow_readers.load(Ordering::Relaxed),
            bad_frames: c.bad_frames.load(Ordering::Relaxed),
            idle: c.idle.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    paths: Arc<PathSocket>,
    limits: ServerLimits,
    counters: Arc<Counters>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_clients));
    let per_source = Arc::new(PerSource::default());
    // Dropped with this task (when the server is): every client task is aborted with it.
    let mut clients = tokio::task::JoinSet::new();
    loop {
        // Cancel-safe: `accept` returns a connection only when it yields it, and
        // `join_next` loses nothing when dropped.
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
        };
        let permit = permits.clone().try_acquire_owned().ok();
        let slot = per_source.claim(remote.ip(), limits.max_per_source);
        let (Some(permit), Some(slot)) = (permit, slot) else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, "TCP client refused: over budget");
            // Dropping the stream closes it at once.
            continue;
        };
        counters.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(counters.clone());
        let tls = tls.clone();
        let paths = paths.clone();
        let counters = counters.clone();
        clients.spawn(async move {
            let _held = (permit, slot, live);
            serve_client(tcp, remote, tls, paths, limits, counters).await;
        });
    }
}

async fn serve_client(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    paths: Arc<PathSocket>,
    limits: ServerLimits,
    counters: Arc<Counters>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp)).await {
        Ok(Ok(mut stream)) if stream.get_ref().1.alpn_protocol() == Some(ALPN) => {
            stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
            stream
        }
        _ => {
            counters.handshake_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    counters.linked.fetch_add(1, Ordering::Relaxed);
    let (carrier, queue) = carrier(&limits.link);
    let attached = paths.attach(carrier.clone(), remote);
    let end = run_link(stream, &attached, &carrier, queue, &limits.link).await;
    tracing::debug!(%remote, ?end, "TCP client left");
    let counter = match end {
        LinkEnd::SlowReader => &counters.slow_readers,
        LinkEnd::BadFrame(_) => &counters.bad_frames,
        LinkEnd::Idle => &counters.idle,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

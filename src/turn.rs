//! A TURN (RFC 8656) client as one more relay transport of the path layer.
//!
//! Our own rendezvous relays when it may; a TURN server relays where a user (or the
//! rendezvous, with short-lived credentials it mints) has one, on networks our relay's QUIC
//! cannot cross, with software many operators already run (coturn). It is a [`Carrier`] like
//! our relay: the path layer probes it, chooses it or not, and moves a connection on and off
//! it without QUIC noticing.
//!
//! **Both peers allocate.** Each side allocates a relayed address on its TURN server, seals
//! it into its hello (so only the code's holder learns it), and sends to the *peer's relayed
//! address* through its own allocation: a permission and a channel for the peer's relayed
//! address, then ChannelData (4 bytes of overhead). This is ICE's relay-to-relay pair rather
//! than iroh/Tailscale DERP's "one side relays, the other sends straight to it": the DERP
//! way needs the non-relaying side to reach the relayed address from its own socket, which is
//! exactly what fails on a network that blocks UDP (and what TURN over TCP/TLS is for); with
//! both relaying, neither side ever sends a datagram to anything but its TURN server, and each
//! side's permission names the other's relayed IP (the server's own), which does not depend
//! on the peer's NAT. The price is one more hop when both use the same server, which costs
//! nothing measurable on the server's own loopback-like path.
//!
//! **Why `turn-client-proto`.** It is sans-IO (we own the socket and the clock, as with
//! quinn and our own traversal), maintained (0.7, 2025, by a GStreamer/WebRTC maintainer),
//! pure Rust with no C, implements allocation, permissions, channels, refreshes and
//! deallocation over UDP and TCP, and needs no async runtime of its own. The `webrtc-rs`
//! `turn` crate drives its own tokio tasks and sockets, which would fight the path layer.
//!
//! What the TURN server sees: the two relayed addresses, the peers' public addresses, the
//! volume and timing of their packets, and QUIC ciphertext (the probes are tagged under the
//! meeting's keys). Never a code: credentials are minted per pairing without one.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::Instant;
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::stun::types::message::TransactionId;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

turn_client_proto::impl_client!(AnyClient, (Udp, TurnClientUdp), (Tcp, TurnClientTcp));

use crate::path::{Carrier, PathKind};

/// The largest QUIC datagram we hand a TURN server: an Ethernet MTU less IPv4 and UDP headers
/// (28), the ChannelData header (4), and room for a Send indication's 36 bytes before the
/// channel is bound.
pub const MAX_DATAGRAM: usize = 1500 - 28 - 40;

/// Datagrams from the peer waiting for the path layer: beyond, they are dropped.
const INBOUND: usize = 1024;

/// How a TURN client reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnTransport {
    /// `turn:HOST:PORT` (or `?transport=udp`).
    Udp,
    /// `turn:HOST:PORT?transport=tcp`.
    Tcp,
    /// `turns:HOST:PORT`: TCP with TLS.
    Tls,
}

/// A TURN server's address as in RFC 7065: `turn:HOST[:PORT][?transport=udp|tcp]` or
/// `turns:HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUrl {
    /// How to reach it.
    pub transport: TurnTransport,
    /// Its host name or address.
    pub host: String,
    /// Its port (3478 by default, 5349 for `turns:`).
    pub port: u16,
}

impl std::str::FromStr for TurnUrl {
    type Err = TurnError;

    fn from_str(s: &str) -> Result<TurnUrl, TurnError> {
        let bad = |why: &str| TurnError::BadUrl(format!("{}: {why}", crate::text::peer(s)));
        let (tls, rest) = if let Some(rest) = s.strip_prefix("turns:") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("turn:") {
            (false, rest)
        } else {
            return Err(bad("it must start with turn: or turns:"));
        };
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let transport = match (tls, query) {
            (true, None | Some("transport=tcp")) => TurnTransport::Tls,
            (false, None | Some("transport=udp")) => TurnTransport::Udp,
            (false, Some("transport=tcp")) => TurnTransport::Tcp,
            _ => {
                return Err(bad(
                    "the only options are ?transport=udp and ?transport=tcp",
                ));
            }
        };
        let default_port = if tls { 5349 } else { 3478 };
        // A bracketed IPv6 literal, or host[:port].
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("junk after the address")),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        // A host name or an address, nothing else: the URL may come from a rendezvous, and
        // it is printed in messages.
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(bad("the host is not a host name or an address"));
        }
        let port = match port {
            Some(port) => port.parse().map_err(|_| bad("the port is not a number"))?,
            None => default_port,
        };
        Ok(TurnUrl {
            transport,
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for TurnUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.transport {
            TurnTransport::Udp => write!(f, "turn:{host}:{}", self.port),
            TurnTransport::Tcp => write!(f, "turn:{host}:{}?transport=tcp", self.port),
            TurnTransport::Tls => write!(f, "turns:{host}:{}", self.port),
        }
    }
}

/// A TURN server and the long-term credentials to allocate on it.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    /// Where it is.
    pub url: TurnUrl,
    /// The username (with minted credentials: `<expiry>:<tag>`).
    pub username: String,
    /// The password.
    pub password: String,
}

impl TurnServer {
    /// The `[turn]` table of config.toml, its URL checked.
    pub fn from_config(config: &crate::home::TurnConfig) -> Result<TurnServer, TurnError> {
        Ok(TurnServer {
            url: config.url.parse()?,
            username: config.username.clone(),
            password: config.password.clone(),
        })
    }
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: it ends up in logs.
        f.debug_struct("TurnServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Credentials for a TURN server that implements the TURN REST API scheme (coturn's
/// `use-auth-secret`): username `<expiry unix time>:<tag>`, password
/// base64(HMAC-SHA1(secret, username)). The server checks the HMAC and refuses the username
/// once its time has passed, so a minted credential needs no state anywhere and dies alone.
pub fn mint(secret: &[u8], tag: &str, expires_unix: u64) -> (String, String) {
    let username = format!("{expires_unix}:{tag}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, username.as_bytes());
    let password = data_encoding::BASE64.encode(tag.as_ref());
    (username, password)
}

/// Why a TURN relay is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    /// The configured URL is not a TURN URL.
    #[error("not a TURN server address: {0}")]
    BadUrl(String),
    /// The server's name did not resolve.
    #[error("TURN server {url}: cannot resolve it: {why}")]
    Resolve {
        /// The server.
        url: String,
        /// Why.
        why: String,
    },
    /// A socket failed.
    #[error("TURN server {url}: {why}")]
    Io {
        /// The server.
        url: String,
        /// Why.
        why: String,
    },
    /// The server refused our credentials (401: unknown user, wrong password, or a minted
    /// credential past its expiry).
    #[error(
        "TURN server {url} refused the credentials of user {user} ({code} {reason}): \
         the password is wrong, or the credentials have expired"
    )]
    Refused {
        /// The server.
        url: String,
        /// The username we offered (escaped).
        user: String,
        /// Its error code.
        code: u16,
        /// Its reason phrase (escaped).
        reason: String,
    },
    /// The server answered the allocation with another error.
    #[error("TURN server {url} refused the allocation ({code} {reason})")]
    Failed {
        /// The server.
        url: String,
        /// Its error code.
        code: u16,
        /// Its reason phrase (escaped).
        reason: String,
    },
    /// The server did not answer in time.
    #[error("TURN server {0} did not answer in time")]
    Timeout(String),
    /// The allocation ended (expired or deleted).
    #[error("TURN server {0}: the allocation is gone")]
    Closed(String),
}

/// The clock of the sans-IO client: nanoseconds since the first use in this process.
fn now() -> Instant {
    Instant::from_std(*base())
}

fn base() -> &'static std::time::Instant {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
}

/// Where an allocation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pending,
    Allocated(SocketAddr),
    Failed(TurnError),
}

struct Shared {
    url: String,
    user: String,
    out: Out,
    transport: TransportType,
    server: SocketAddr,
    local: SocketAddr,
    client: Mutex<AnyClient>,
    wake: Notify,
    status: watch::Sender<Status>,
    /// The last error response of the server (code, escaped reason): what a failed
    /// allocation is reported with (the sans-IO client only says that it failed).
    last_error: Mutex<Option<(u16, String)>>,
    /// The transaction of the server's first 401 (its challenge).
    challenge: Mutex<Option<TransactionId>>,
    /// The peer's relayed address, once known, and where its datagrams go (a queue, not the
    /// path layer's handle: that handle holds the carrier, which holds this).
    peer: Mutex<Option<(SocketAddr, mpsc::Sender<Bytes>)>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, AnyClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(&self) -> TurnError {
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match error {
            Some((code @ 401, reason)) => TurnError::Refused {
                url: self.url.clone(),
                user: crate::text::peer(&self.user),
                code,
                reason,
            },
            Some((code, reason)) => TurnError::Failed {
                url: self.url.clone(),
                code,
                reason,
            },
            None => TurnError::Closed(self.url.clone()),
        }
    }

    /// Run the client's timers, send what it wants sent, and take its events. Returns when
    /// to come back, or `None` once the client is closed.
    fn progress(&self) -> Option<std::time::Instant> {
        let now = now();
        let mut client = self.lock();
        let wait = match client.poll(now) {
            TurnPollRet::WaitUntil(at) => Some(at.to_std(*base())),
            TurnPollRet::Closed => None,
            // TCP allocations (RFC 6062) are never asked for.
            _ => Some(std::time::Instant::now() + Duration::from_millis(50)),
        };
        while let Some(transmit) = client.poll_transmit(now) {
            // A full socket buffer loses the request; over UDP the client retransmits it.
            let _ = self.out.send(&transmit.data);
        }
        while let Some(event) = client.poll_event() {
            match event {
                TurnEvent::AllocationCreated(_, relayed) => {
                    self.status.send_replace(Status::Allocated(relayed));
                }
                TurnEvent::AllocationCreateFailed(_) => {
                    let failure = self.failure();
                    tracing::warn!("{failure}");
                    self.status.send_replace(Status::Failed(failure));
                }
                TurnEvent::PermissionCreateFailed(_, ip) => {
                    tracing::warn!(%ip, url = %self.url, "TURN permission refused");
                }
                TurnEvent::ChannelCreateFailed(_, peer) => {
                    tracing::warn!(%peer, url = %self.url, "TURN channel refused");
                }
                event => tracing::debug!(?event, url = %self.url, "TURN"),
            }
        }
        if wait.is_none() && matches!(*self.status.borrow(), Status::Allocated(_)) {
            self.status
                .send_replace(Status::Failed(TurnError::Closed(self.url.clone())));
        }
        wait
    }

    /// One packet from the server.
    fn incoming(&self, packet: &[u8]) {
        if let Some((401, transaction)) = remember_error(packet, &self.last_error) {
            // The first 401 is the server's challenge (its realm and nonce); a 401 to another
            // transaction answers our authenticated request: the credentials are refused.
            // The sans-IO client ignores that one (it carries no integrity to check) and
            // would retransmit until it times out, which says nothing useful.
            let mut challenge = self.challenge.lock().unwrap_or_else(|e| e.into_inner());
            match *challenge {
                None => *challenge = Some(transaction),
                Some(first) if first != transaction => {
                    let failure = self.failure();
                    tracing::warn!("{failure}");
                    self.status.send_replace(Status::Failed(failure));
                    self.lock().protocol_error();
                    return;
                }
                Some(_) => {}
            }
        }
        let now = now();
        let transmit = Transmit::new(packet, self.transport, self.server, self.local);
        let mut data = Vec::new();
        {
            let mut client = self.lock();
            if let TurnRecvRet::PeerData(peer) = client.recv(transmit, now) {
                data.push((peer.peer, Bytes::copy_from_slice(peer.data())));
            }
            // Over TCP one read may hold several messages: the client keeps the rest.
            while let Some(peer) = client.poll_recv(now) {
                data.push((peer.peer, Bytes::copy_from_slice(peer.data())));
            }
        }
        for (from, datagram) in data {
            let peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((peer, inbound)) = &*peer
                && *peer == from
            {
                // Full: dropped, as a congested path would.
                let _ = inbound.try_send(datagram);
            }
        }
    }
}

/// Keep the code and reason of a STUN error response (what the sans-IO client does not
/// report), escaped for a terminal; returns the code and the response's transaction.
fn remember_error(
    packet: &[u8],
    last: &Mutex<Option<(u16, String)>>,
) -> Option<(u16, TransactionId)> {
    use turn_client_proto::stun::types::attribute::ErrorCode;
    use turn_client_proto::stun::types::message::{Message, MessageClass};
    let message = Message::from_bytes(packet).ok()?;
    if message.class() != MessageClass::Error {
        return None;
    }
    let error = message.attribute::<ErrorCode>().ok()?;
    *last.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((error.code(), crate::text::peer(error.reason())));
    Some((error.code(), message.transaction_id()))
}

/// Where the client's messages to the server go.
enum Out {
    /// A UDP socket connected to the server.
    Udp(Arc<tokio::net::UdpSocket>),
    /// The writer of a TCP connection: whole messages, in order, a bounded queue.
    Stream(mpsc::Sender<Vec<u8>>),
}

impl Out {
    /// Send one message (a STUN message or ChannelData) without waiting: a full queue
    /// drops it, as a congested UDP path would.
    fn send(&self, message: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Udp(socket) => socket.try_send(message).map(|_| ()),
            Out::Stream(queue) => {
                let mut framed = message.to_vec();
                // Over a stream, ChannelData is padded to a multiple of 4 (RFC 8656 12.5);
                // the sans-IO client does not pad.
                if is_channel_data(message) {
                    framed.resize(message.len().next_multiple_of(4), 0);
                }
                queue.try_send(framed).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => std::io::ErrorKind::WouldBlock.into(),
                    mpsc::error::TrySendError::Closed(_) => std::io::ErrorKind::NotConnected.into(),
                })
            }
        }
    }
}

/// ChannelData starts with a channel number, 0x4000..=0x7fff; a STUN message with 0b00.
fn is_channel_data(message: &[u8]) -> bool {
    message.first().is_some_and(|b| b & 0xc0 == 0x40)
}

/// The first whole message at the start of a TCP stream's bytes: its length, and its
/// length with padding (`None`: not all there yet; `Err`: not TURN).
fn stream_frame(buf: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let (message, framed) = match buf[0] & 0xc0 {
        // STUN: a 20-byte header, then attributes (always a multiple of 4).
        0x00 => (20 + len, 20 + len),
        0x40 => (4 + len, (4 + len).next_multiple_of(4)),
        _ => return Err(()),
    };
    Ok((buf.len() >= framed).then_some((message, framed)))
}

/// Where the server's messages come from.
enum In {
    Udp(Arc<tokio::net::UdpSocket>),
    /// Whole messages read from a TCP connection, padding removed.
    Stream(mpsc::Receiver<Vec<u8>>),
}

/// Drive one allocation: the server's packets, the client's timers, and wake-ups when a
/// carrier asked for something (a permission).
async fn drive(shared: Arc<Shared>, mut inbound: In) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Some(wait) = shared.progress() else {
            return;
        };
        let received = async {
            match &mut inbound {
                In::Udp(socket) => (socket.recv(&mut buf).await)
                    .map(|n| buf[..n].to_vec())
                    .map_err(|_| false),
                In::Stream(messages) => messages.recv().await.ok_or(true),
            }
        };
        // Cancel-safe: `recv` on a UDP socket or a channel, `notified` and `sleep_until`
        // lose nothing when another branch wins.
        tokio::select! {
            received = received => match received {
                Ok(message) => shared.incoming(&message),
                // The TCP connection closed: the allocation is gone with it.
                Err(true) => {
                    let closed = TurnError::Closed(shared.url.clone());
                    shared.status.send_replace(Status::Failed(closed));
                    return;
                }
                // An ICMP error from the server's address (nothing listens): its requests
                // time out on their own.
                Err(false) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(wait.into()) => {}
        }
    }
}

/// Read whole messages off a TCP (or TLS) connection to the TURN server.
async fn read_stream(mut read: impl tokio::io::AsyncRead + Unpin, messages: mpsc::Sender<Vec<u8>>) {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(65536);
    loop {
        while let Ok(Some((message, framed))) = stream_frame(&buf) {
            if messages.send(buf[..message].to_vec()).await.is_err() {
                return;
            }
            buf.drain(..framed);
        }
        if stream_frame(&buf).is_err() {
            tracing::warn!("TURN over TCP: the server sent something that is not TURN");
            return;
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Write whole messages to a TCP connection to the TURN server, in order.
async fn write_stream(
    mut write: impl tokio::io::AsyncWrite + Unpin,
    mut messages: mpsc::Receiver<Vec<u8>>,
) {
    use tokio::io::AsyncWriteExt;
    while let Some(message) = messages.recv().await {
        if write.write_all(&message).await.is_err() {
            return;
        }
        // Nothing more queued: push what TLS buffered onto the wire.
        if messages.is_empty() && write.flush().await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// TLS over `stream` to the TURN server `host` (`turns:`).
///
/// The certificate is not checked against any authority, as for the rendezvous over TCP
/// ([`crate::tls::turn_client_config`]): TLS is here so that a network that lets only
/// TLS on 443 through still relays. What it would protect is not at stake: the long-term
/// credential mechanism never sends the password (messages carry an HMAC under a key
/// derived from it), a minted credential is random and short-lived, and what is relayed is
/// QUIC, end-to-end encrypted and pinned. Anyone on the path can drop or delay packets
/// with or without TLS.
async fn tls_connect(
    host: &str,
    stream: tokio::net::TcpStream,
    patience: Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let config = crate::tls::turn_client_config().map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    tokio::time::timeout(patience, connector.connect(name, stream))
        .await
        .map_err(|_| "the TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))
}

/// Messages waiting for a TCP connection to the TURN server; beyond, they are dropped.
const STREAM_QUEUE: usize = 1024;

/// A relayed address on a TURN server, kept alive (refreshed) until dropped, then deleted.
pub struct TurnAllocation {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    relayed: SocketAddr,
}

impl std::fmt::Debug for TurnAllocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnAllocation")
            .field("server", &self.shared.url)
            .field("relayed", &self.relayed)
            .finish_non_exhaustive()
    }
}

impl TurnAllocation {
    /// Allocate a relayed address on `server`, waiting at most `patience`.
    pub async fn allocate(
        server: &TurnServer,
        patience: Duration,
    ) -> Result<TurnAllocation, TurnError> {
        let url = server.url.to_string();
        let io = |e: std::io::Error| TurnError::Io {
            url: url.clone(),
            why: e.to_string(),
        };
        let resolve = |why: String| TurnError::Resolve {
            url: url.clone(),
            why,
        };
        let target = tokio::net::lookup_host((server.url.host.as_str(), server.url.port))
            .await
            .map_err(|e| resolve(e.to_string()))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| resolve("no IPv4 address".into()))?;
        let credentials = TurnCredentials::new(&server.username, &server.password);
        let config = TurnConfig::new(credentials);
        let mut tasks = Vec::new();
        let (client, out, inbound, local, transport) = if server.url.transport == TurnTransport::Udp
        {
            let socket = tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
                .await
                .map_err(io)?;
            socket.connect(target).await.map_err(io)?;
            let local = socket.local_addr().map_err(io)?;
            let socket = Arc::new(socket);
            let client = AnyClient::Udp(TurnClientUdp::allocate(local, target, config));
            let (out, inbound) = (Out::Udp(socket.clone()), In::Udp(socket));
            (client, out, inbound, local, TransportType::Udp)
        } else {
            let stream = tokio::time::timeout(patience, tokio::net::TcpStream::connect(target))
                .await
                .map_err(|_| TurnError::Timeout(url.clone()))?
                .map_err(io)?;
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().map_err(io)?;
            let (to_server, queue) = mpsc::channel(STREAM_QUEUE);
            let (from_server, messages) = mpsc::channel(STREAM_QUEUE);
            if server.url.transport == TurnTransport::Tls {
                let tls = tls_connect(&server.url.host, stream, patience)
                    .await
                    .map_err(|why| TurnError::Io {
                        url: url.clone(),
                        why,
                    })?;
                let (read, write) = tokio::io::split(tls);
                tasks.push(tokio::spawn(read_stream(read, from_server)));
                // Not aborted with the others: it ends once the last message (a deletion)
                // is written and every sender is gone, and closes the connection.
                tokio::spawn(write_stream(write, queue));
            } else {
                let (read, write) = stream.into_split();
                tasks.push(tokio::spawn(read_stream(read, from_server)));
                // Likewise.
                tokio::spawn(write_stream(write, queue));
            }
            let client = AnyClient::Tcp(TurnClientTcp::allocate(local, target, config));
            let (out, inbound) = (Out::Stream(to_server), In::Stream(messages));
            (client, out, inbound, local, TransportType::Tcp)
        };
        let (status, mut watching) = watch::channel(Status::Pending);
        let shared = Arc::new(Shared {
            url: url.clone(),
            user: server.username.clone(),
            out,
            transport,
            server: target,
            local,
            client: Mutex::new(client),
            wake: Notify::new(),
            status,
            last_error: Mutex::new(None),
            challenge: Mutex::new(None),
            peer: Mutex::new(None),
        });
        tasks.push(tokio::spawn(drive(shared.clone(), inbound)));
        let outcome = tokio::time::timeout(patience, async {
            loop {
                match watching.borrow_and_update().clone() {
                    Status::Allocated(relayed) => return Ok(relayed),
                    Status::Failed(failure) => return Err(failure),
                    Status::Pending => {}
                }
                if watching.changed().await.is_err() {
                    return Err(TurnError::Closed(url.clone()));
                }
            }
        })
        .await;
        let relayed = match outcome {
            Ok(Ok(relayed)) => relayed,
            Ok(Err(failure)) => {
                tasks.iter().for_each(|t| t.abort());
                return Err(failure);
            }
            Err(_) => {
                tasks.iter().for_each(|t| t.abort());
                return Err(TurnError::Timeout(url));
            }
        };
        Ok(TurnAllocation {
            shared,
            tasks,
            relayed,
        })
    }

    /// Our relayed address: what the peer sends to, through its own allocation.
    pub fn relayed(&self) -> SocketAddr {
        self.relayed
    }

    /// The carrier to the peer whose relayed address is `peer`: asks the server for a
    /// permission and a channel toward it. What the peer sends comes out of
    /// [`TurnCarrier::recv`].
    pub fn carrier(self, peer: SocketAddr) -> TurnCarrier {
        let (deliver, inbound) = mpsc::channel(INBOUND);
        *self.shared.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some((peer, deliver));
        {
            let now = now();
            let mut client = self.shared.lock();
            if let Err(e) = client.create_permission(TransportType::Udp, peer.ip(), now) {
                tracing::debug!(%e, "TURN permission");
            }
            if let Err(e) = client.bind_channel(TransportType::Udp, peer, now) {
                tracing::debug!(%e, "TURN channel");
            }
        }
        self.shared.wake.notify_one();
        TurnCarrier {
            allocation: self,
            peer,
            inbound: tokio::sync::Mutex::new(inbound),
        }
    }
}

impl Drop for TurnAllocation {
    /// Delete the allocation on the server (best effort: one Refresh with lifetime 0, not
    /// retransmitted), so it does not hold a port until it expires.
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
        let now = now();
        let mut client = self.shared.lock();
        if client.delete(now).is_ok() {
            while let Some(transmit) = client.poll_transmit(now) {
                let _ = self.shared.out.send(&transmit.data);
            }
        }
    }
}

/// The way to one peer through our TURN allocation and the peer's.
#[derive(Debug)]
pub struct TurnCarrier {
    allocation: TurnAllocation,
    peer: SocketAddr,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

impl TurnCarrier {
    /// The next datagram from the peer (`None` once the allocation is gone). Cancel-safe:
    /// a channel receive loses nothing when dropped.
    pub async fn recv(&self) -> Option<Bytes> {
        self.inbound.lock().await.recv().await
    }

    /// The peer's relayed address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Our relayed address.
    pub fn relayed(&self) -> SocketAddr {
        self.allocation.relayed
    }

    fn open(&self) -> bool {
        !matches!(*self.allocation.shared.status.borrow(), Status::Failed(_))
    }
}

impl Carrier for TurnCarrier {
    fn kind(&self) -> PathKind {
        match self.allocation.shared.transport {
            TransportType::Tcp => PathKind::TurnTcp,
            _ => PathKind::Turn,
        }
    }

    fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        let shared = &self.allocation.shared;
        let built = {
            let mut client = shared.lock();
            client
                .send_to(TransportType::Udp, self.peer, datagram, now())
                .map_err(|e| Error::new(ErrorKind::NotConnected, format!("TURN: {e}")))?
                .map(|transmit| transmit.build())
        };
        match built {
            Some(transmit) => shared.out.send(&transmit.data),
            None => Ok(()),
        }
    }

    fn max_datagram(&self) -> usize {
        if self.open() { MAX_DATAGRAM } else { 0 }
    }
}

/// Whether `ip` could be a TURN relayed address worth a permission (not unspecified).
pub fn plausible_relayed(addr: SocketAddr) -> bool {
    let ip: IpAddr = addr.ip();
    !ip.is_unspecified() && !ip.is_multicast() && addr.port() != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_table_becomes_a_server_only_with_a_turn_url() {
        let config = |url: &str| crate::home::TurnConfig {
            url: url.into(),
            username: "u".into(),
            password: "p".into(),
        };
        let server = TurnServer::from_config(&config("turns:198.51.100.10:443")).unwrap();
        assert_eq!(server.url.to_string(), "turns:198.51.100.10:443");
        assert_eq!(server.username, "u");
        assert!(TurnServer::from_config(&config("http://x")).is_err());
    }

    #[test]
    fn urls_parse_as_rfc_7065_says() {
        let u: TurnUrl = "turn:198.51.100.10:3478".parse().unwrap();
        assert_eq!(u.transport, TurnTransport::Udp);
        assert_eq!((u.host.as_str(), u.port), ("198.51.100.10", 3478));
        let u: TurnUrl = "turn:turn.example?transport=tcp".parse().unwrap();
        assert_eq!((u.transport, u.port), (TurnTransport::Tcp, 3478));
        let u: TurnUrl = "turns:turn.example:443".parse().unwrap();
        assert_eq!((u.transport, u.port), (TurnTransport::Tls, 443));
        let u: TurnUrl = "turns:[2001:db8::1]".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 5349));
        assert_eq!(u.to_string(), "turns:[2001:db8::1]:5349");
        for bad in [
            "stun:x:1",
            "turn:",
            "turn:x:port",
            "turns:x?transport=udp",
            "turn:x?foo",
            "turn:evil\u{1b}[2J:3478",
            "turn:a b:1",
        ] {
            assert!(bad.parse::<TurnUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_frames_are_found_and_unpadded() {
        // ChannelData of 5 bytes: 4 + 5, padded to 12 on a stream.
        let mut stream = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(stream_frame(&stream[..11]), Ok(None));
        assert_eq!(stream_frame(&stream), Ok(Some((9, 12))));
        // A STUN message: header and attributes, never padded further.
        stream.extend([0x01, 0x01, 0x00, 0x04]);
        assert_eq!(stream_frame(&stream[12..]), Ok(None));
        stream.extend([0u8; 20]);
        assert_eq!(stream_frame(&stream[12..]), Ok(Some((24, 24))));
        assert_eq!(stream_frame(&[0x80, 0, 0, 0]), Err(()));
        assert!(is_channel_data(&[0x7f, 0xff]) && !is_channel_data(&[0x01, 0x01]));
    }

    #[test]
    fn minted_credentials_are_coturns_rest_api_scheme() {
        // RFC 2202's HMAC-SHA1 test case 2: key "Jefe", data "what do ya want for nothing?"
        // is effcdf6ae5eb2fa2d27416d5f184df9c259a7c79; ours signs the username instead.
        let (user, password) = mint(b"Jefe", "x", 1_700_000_000);
        assert_eq!(user, "1700000000:x");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"Jefe");
        let known = ring::hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            data_encoding::HEXLOWER.encode(known.as_ref()),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        let expected = ring::hmac::sign(&key, user.as_bytes());
        assert_eq!(password, data_encoding::BASE64.encode(expected.as_ref()));
        assert_eq!(
            data_encoding::BASE64
                .decode(password.as_bytes())
                .unwrap()
                .len(),
            20
        );
    }

    #[test]
    fn an_error_response_is_remembered_escaped() {
        use turn_client_proto::stun::types::attribute::ErrorCode;
        use turn_client_proto::stun::types::message::{
            Message, MessageWrite, MessageWriteExt, MessageWriteVec,
        };
        let request = Message::builder_request(
            turn_client_proto::types::message::ALLOCATE,
            MessageWriteVec::new(),
        )
        .finish();
        let request = Message::from_bytes(&request).unwrap();
        let mut response = Message::builder_error(&request, MessageWriteVec::new());
        let code = ErrorCode::builder(401)
            .reason("Unauthorized\x1b[2J")
            .build()
            .unwrap();
        response.add_attribute(&code).unwrap();
        let last = Mutex::new(None);
        let (code, transaction) = remember_error(&response.finish(), &last).unwrap();
        assert_eq!((code, transaction), (401, request.transaction_id()));
        assert_eq!(remember_error(&[0u8; 20], &last), None);
        let (code, reason) = last.into_inner().unwrap().unwrap();
        assert_eq!(code, 401);
        assert!(!reason.contains('\x1b'), "{reason}");
    }
}

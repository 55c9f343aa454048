//! A QUIC endpoint built on the punched socket: connect, accept, and keep punching.
//!
//! A [`Node`] owns one [`DemuxSocket`] and one quinn endpoint on it. Both roles live in
//! one node (it can accept *and* connect) because in peer-to-peer use either side may
//! dial, and after a rendezvous both do at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use crate::congestion::{Congestion, UnknownCongestion};
use crate::driver::{self, DriveError};
use crate::identity::{Fingerprint, Identity};
use crate::path::PathSocket;
use crate::punch::{PunchConfig, Punched};
use crate::ratelimit::RateConfig;
use crate::socket::{DemuxSocket, SocketStats};
use crate::tls::{self, TlsError};

/// How often an idle connection sends a keep-alive: far below the ~30 s UDP mapping
/// timeout of strict NATs (the seed's router kept holes > 5 minutes; many keep 30 s).
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A linger long enough for [`Node::close`] to complete the QUIC draining period.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Enough for a CONNECTION_CLOSE to be written to the socket, not for the drain.
pub const QUICK_LINGER: Duration = Duration::from_millis(10);
/// How long a silent connection lives before it is declared dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Node::accept`] waits for a handshake to complete.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-stream receive window: one file can have this much in flight, so one file moves at
/// most `STREAM_WINDOW / RTT`: 168 MB/s (1.34 Gbit/s) at 100 ms RTT, above the 12.5 MB
/// bandwidth-delay product of 1 Gbit/s x 100 ms. Fixed, because it is a limit, not an
/// allocation: a receiver holds that much of a file only while its disk falls behind the
/// network. Measured (`benches/path.rs`, 100 Mbit/s, 40 ms RTT): a 256 KiB window caps a
/// file at 4.8 MB/s (256 KiB per ~55 ms of loaded RTT), 1 MiB already leaves the link as
/// the limit (10.4 MB/s, as with 16 MiB).
const STREAM_WINDOW: u32 = 16 << 20;
/// Connection receive window once a connection is trusted (see
/// [`PeerConnection::open_windows`]): the most it can make us buffer across all streams
/// (four files at full stream window; 670 MB/s at 100 ms RTT). Also the sender's
/// `send_window` (unacknowledged data it keeps): BBR keeps up to ~3 bandwidth-delay
/// products in flight, 37 MB at 1 Gbit/s x 100 ms.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Connection receive window of an incoming connection until the application trusts it:
/// a stranger can make us buffer at most this much, however many streams it opens.
pub const GUARDED_WINDOW: u32 = 64 << 10;
/// Bidirectional streams an incoming connection may open until it is trusted: enough for
/// a control stream (and one spare), not for a swarm of unread streams.
pub const GUARDED_STREAMS: u32 = 2;
/// Largest UDP payload a node accepts, and the upper bound of its path MTU discovery.
///
/// quinn's default bound (1452) fits Ethernet, but on loopback (MTU 64 KiB) or a jumbo-frame
/// LAN every 1.4 KB then pays a whole trip through quinn's packet assembly, ACK
/// bookkeeping and the kernel's UDP path (~20 % of the sender's CPU on loopback). Discovery
/// only raises the packet size once a probe of that size was acknowledged, and a lost probe
/// is neither a congestion signal nor lost data, so on an Ethernet path the search settles
/// at ~1.45 KB after a few lost probes. 16376 is the largest size of which four packets fit
/// one GSO `sendmsg` (65507 bytes, see [`crate::socket`]). What each size measured is in
/// `docs/performance.md`.
pub const MAX_UDP_PAYLOAD: u16 = 16376;

/// Everything needed to build a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This peer's identity, presented in every handshake.
    pub identity: Identity,
    /// Application protocols (ALPN) spoken, e.g. [`crate::transfer::ALPN`].
    pub alpn: Vec<Vec<u8>>,
    /// Accept incoming connections (a receiver); a pure sender leaves this off.
    pub accept: bool,
    /// Interval of QUIC keep-alives on idle connections, which also keep the NAT
    /// mapping alive; `None` disables them (then an idle hole closes after the NAT's
    /// UDP timeout). Defaults to [`KEEP_ALIVE`].
    pub keep_alive: Option<Duration>,
    /// How fast the socket answers probes, per source and in total.
    pub probe_rate: RateConfig,
    /// The congestion controller of every connection of this node (dialled and
    /// accepted). Defaults to [`Congestion::default`].
    pub congestion: Congestion,
    /// Connection receive window of incoming connections until the application trusts
    /// them ([`GUARDED_WINDOW`] by default): what a stranger can make us buffer. A server
    /// whose messages are small (the rendezvous) sets less.
    pub guarded_window: u32,
    /// QUIC DATAGRAM frames on every connection of this node (dialled and accepted), or
    /// `None` (the default): nothing here reads datagrams, so a peer gets no buffer to
    /// fill. The rendezvous turns them on to relay ([`Datagrams::RELAY`]); a peer turns
    /// them on for one connection only, with [`Node::connect_with_options`].
    pub datagrams: Option<Datagrams>,
}

/// Datagram support of a connection: how much each way may wait in quinn's buffers. Both
/// are limits, not allocations: a full receive buffer drops the oldest datagram received,
/// a full send buffer the oldest unsent one, as a congested UDP path would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagrams {
    /// Received datagrams waiting to be read, in bytes.
    pub receive_buffer: usize,
    /// Datagrams waiting for the congestion window, in bytes.
    pub send_buffer: usize,
    /// UDP payload size from the first packet on: a relay needs room for a whole QUIC
    /// packet (at least 1200 bytes) plus its framing in every datagram, before path MTU
    /// discovery has said anything.
    pub initial_mtu: u16,
}

impl Datagrams {
    /// What a relay connection uses (both ends of a rendezvous connection): 256 KiB in
    /// (read at once; it fills only while the reader falls behind), 64 KiB out (about 50
    /// full-size packets, 5 ms at 100 Mbit/s, queued for a partner slower than its peer:
    /// a deeper queue would only add delay before the peers' congestion control sees the
    /// loss, and memory a client that stops reading can pin on a rendezvous), and
    /// 1280-byte packets from the start, so that a datagram carries 1200-byte QUIC
    /// Initials and their tag from the handshake on (quinn falls back to 1200 if the path
    /// drops them).
    pub const RELAY: Datagrams = Datagrams {
        receive_buffer: 256 << 10,
        send_buffer: 64 << 10,
        initial_mtu: 1280,
    };
}

/// Per-connection options of [`Node::connect_with_options`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Datagram support on this connection (overrides [`NodeConfig::datagrams`]).
    pub datagrams: Option<Datagrams>,
}

impl NodeConfig {
    /// A configuration for `identity` speaking `alpn`.
    pub fn new(identity: Identity, alpn: &[u8], accept: bool) -> Self {
        NodeConfig {
            identity,
            alpn: vec![alpn.to_vec()],
            accept,
            keep_alive: Some(KEEP_ALIVE),
            probe_rate: RateConfig::default(),
            congestion: Congestion::default(),
            guarded_window: GUARDED_WINDOW,
            datagrams: None,
        }
    }
}

/// Errors from building a node or connecting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused to start the connection (e.g. address family mismatch).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection or handshake failed. The peer may have chosen the close reason, so
    /// it is shown escaped, and the quinn error is deliberately not exposed as the
    /// `source()`: error-chain printers (anyhow's `{:#}`) would print it raw.
    #[error("connection failed: {}", crate::text::peer(&.0.to_string()))]
    Connection(quinn::ConnectionError),
    /// The handshake did not complete in time.
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer proved a different key than the pinned one.
    #[error("peer identity mismatch: expected {expected}, but the peer presented {actual}")]
    PeerMismatch {
        /// The pinned fingerprint.
        expected: Fingerprint,
        /// What the peer presented.
        actual: Fingerprint,
    },
    /// The handshake finished without a usable peer certificate (should not happen).
    #[error("peer presented no identity")]
    NoPeerIdentity,
    /// Punching failed.
    #[error(transparent)]
    Punch(#[from] DriveError),
}

impl From<quinn::ConnectionError> for NodeError {
    fn from(e: quinn::ConnectionError) -> Self {
        NodeError::Connection(e)
    }
}

/// An authenticated connection: the quinn connection and who is on the other end.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    /// The QUIC connection; open your own streams on it.
    pub connection: quinn::Connection,
    /// The key the peer proved in the handshake.
    pub fingerprint: Fingerprint,
}

impl PeerConnection {
    /// Close the connection with an application `code` and a `reason` for the peer. It
    /// goes through the [close gate](crate::close_gate), so the close leaves even when
    /// the congestion window is full: use this, never `connection.close` directly, or a
    /// bulk sender's close may wait in the window until the peer's idle timeout.
    pub fn close(&self, code: impl Into<quinn::VarInt>, reason: &[u8]) {
        crate::close_gate::close(&self.connection, code.into(), reason);
    }

    /// Lift the guard on an incoming connection once the application trusts it: grow the
    /// receive window to [`CONNECTION_WINDOW`] and allow `streams` concurrent
    /// bidirectional streams.
    ///
    /// Incoming connections start guarded ([`GUARDED_WINDOW`], [`GUARDED_STREAMS`], no
    /// unidirectional streams, no datagrams): the handshake proves a key, not good intent,
    /// and a stranger with a throwaway key must not be able to make us buffer megabytes.
    pub fn open_windows(&self, streams: u32) {
        self.open_windows_to(CONNECTION_WINDOW, streams);
    }

    /// [`open_windows`](Self::open_windows) with an explicit receive window (in bytes), for
    /// servers that share a memory budget among many trusted connections.
    pub fn open_windows_to(&self, window: u32, streams: u32) {
        self.connection.set_receive_window(window.into());
        self.connection
            .set_max_concurrent_bi_streams(streams.into());
    }
}

/// One socket, one QUIC endpoint, one identity.
#[derive(Debug)]
pub struct Node {
    endpoint: quinn::Endpoint,
    socket: Arc<DemuxSocket>,
    paths: Arc<PathSocket>,
    config: NodeConfig,
    /// Set by [`Node::close`]: every connection's congestion gate opens (see
    /// [`crate::close_gate`]).
    closing: Arc<AtomicBool>,
    /// The router's forwarding of our port, when one was asked for: a meeting offers
    /// its address to the peer.
    port_mapper: std::sync::OnceLock<crate::portmap::PortMapper>,
    /// STUN servers asked for our address, when [`Node::discover_stun`] was called.
    stun: std::sync::OnceLock<crate::stun_client::Discovery>,
}

impl Node {
    /// Hand a bound (and possibly already punched) socket to QUIC. The socket is moved,
    /// not re-bound, so the local port and its NAT mapping survive. Must be called inside
    /// a tokio runtime.
    pub fn new(socket: std::net::UdpSocket, config: NodeConfig) -> Result<Self, NodeError> {
        socket.set_nonblocking(true)?;
        let socket = DemuxSocket::with_rate(socket, config.probe_rate)?;
        let paths = PathSocket::new(socket.clone());
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Datagrams up to this size are accepted (and advertised as acceptable to peers).
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .expect("MAX_UDP_PAYLOAD is a valid UDP payload size");
        // Keep bit 0x40 set on every QUIC packet, so the first byte tells QUIC from probes.
        endpoint_config.grease_quic_bit(false);
        let closing = Arc::new(AtomicBool::new(false));
        let server = if config.accept {
            let crypto = tls::server_crypto(&config.identity, &config.alpn)?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            server.transport_config(guarded_transport(&config, &closing));
            // Connection attempts waiting for the application: beyond this many quinn
            // refuses at once. The server's own budgets (see `crate::server`) are smaller.
            server.max_incoming(1024);
            server.incoming_buffer_size(64 << 10);
            server.incoming_buffer_size_total(8 << 20);
            Some(server)
        } else {
            None
        };
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            server,
            paths.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Node {
            endpoint,
            socket,
            paths,
            config,
            closing,
            port_mapper: std::sync::OnceLock::new(),
            stun: std::sync::OnceLock::new(),
        })
    }

    /// Ask the router to forward this node's port ([`crate::portmap`]), once; `notice`
    /// hears how it goes. Nothing happens on a loopback bind or without a gateway.
    /// Whoever calls this releases the mapping ([`Node::release_port_mapping`]).
    pub fn map_port(
        &self,
        config: crate::portmap::PortMapConfig,
        notice: crate::portmap::OnNotice,
    ) {
        let Ok(local) = self.local_addr() else { return };
        if self.port_mapper.get().is_some() {
            return;
        }
        if let Some(mapper) = crate::portmap::PortMapper::start(local, config, notice) {
            let _ = self.port_mapper.set(mapper);
        }
    }

    /// Ask STUN servers (`HOST[:PORT]`) for our public address, once, in the background
    /// ([`crate::stun_client::Discovery`]): what they answer becomes candidates when meeting by
    /// code ([`Node::stun_reflexive`]). Nothing happens with no servers.
    pub fn discover_stun(&self, servers: &[String]) {
        if servers.is_empty() || self.stun.get().is_some() {
            return;
        }
        let _ = self.stun.set(crate::stun_client::Discovery::start(
            self.socket.clone(),
            servers,
        ));
    }

    /// Our addresses as STUN servers saw them ([`Node::discover_stun`]), waiting up to
    /// `wait` for servers not heard yet; empty when none was asked.
    pub async fn stun_reflexive(&self, wait: Duration) -> Vec<SocketAddr> {
        match self.stun.get() {
            Some(discovery) => discovery.settled(wait).await,
            None => Vec::new(),
        }
    }

    /// The port mapper, when [`Node::map_port`] started one.
    pub fn port_mapper(&self) -> Option<&crate::portmap::PortMapper> {
        self.port_mapper.get()
    }

    /// Delete the router's forwarding of our port, if any (bounded; see
    /// [`crate::portmap::PortMapper::release`]).
    pub async fn release_port_mapping(&self) {
        if let Some(mapper) = self.port_mapper.get() {
            mapper.release().await;
        }
    }

    /// The local address: the same port the socket had before hand-over.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This node's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.config.identity.fingerprint()
    }

    /// The configuration this node was built with (to build a sibling on another socket).
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The underlying quinn endpoint, for applications that want full control.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Probe and malformed-datagram counters of the shared socket.
    pub fn socket_stats(&self) -> SocketStats {
        self.socket.stats()
    }

    /// The shared socket, for probing through it (see [`crate::driver`]).
    pub fn socket(&self) -> &Arc<DemuxSocket> {
        &self.socket
    }

    /// The path layer quinn runs on: map a peer met by code onto its paths (see
    /// [`crate::path::PeerPaths`]) and dial its mapped address.
    pub fn paths(&self) -> &Arc<PathSocket> {
        &self.paths
    }

    /// Punch to the first answering candidate through the live socket (no hand-over
    /// needed): the hook for rendezvous, new peers and path changes.
    pub async fn punch(
        &self,
        candidates: Vec<SocketAddr>,
        config: PunchConfig,
    ) -> Result<Punched, NodeError> {
        Ok(driver::punch_demux(&self.socket, candidates, config).await?)
    }

    /// Connect to `peer` and require its key to match `expected` (any key when `None`:
    /// the caller then decides, e.g. trust on first use). On a mismatch the handshake is
    /// aborted before any application data is exchanged.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        expected: Option<Fingerprint>,
    ) -> Result<PeerConnection, NodeError> {
        self.connect_with_alpn(peer, expected, &self.config.alpn)
            .await
    }

    /// [`connect`](Self::connect) speaking `alpn` instead of the node's own protocols: one
    /// node talks to its rendezvous and to its peers from the same socket (and so through
    /// the same NAT mapping).
    pub async fn connect_with_alpn(
        &self,
        peer: SocketAddr,
        expected: Option<Fingerprint>,
        alpn: &[Vec<u8>],
    ) -> Result<PeerConnection, NodeError> {
        let options = ConnectOptions {
            datagrams: self.config.datagrams,
        };
        self.connect_with_options(peer, expected, alpn, &options)
            .await
    }

    /// [`connect_with_alpn`](Self::connect_with_alpn) with per-connection `options`: a
    /// peer dials its rendezvous with datagrams on (the relay), and keeps them off on every
    /// other connection.
    pub async fn connect_with_options(
        &self,
        peer: SocketAddr,
        expected: Option<Fingerprint>,
        alpn: &[Vec<u8>],
        options: &ConnectOptions,
    ) -> Result<PeerConnection, NodeError> {
        let (crypto, seen) = tls::client_crypto(&self.config.identity, expected, alpn)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = base_transport(&self.config, &self.closing);
        datagrams(&mut transport, options.datagrams);
        client.transport_config(Arc::new(transport));
        let connecting = self.endpoint.connect_with(client, peer, tls::SERVER_NAME)?;
        let connection = match connecting.await {
            Ok(connection) => connection,
            Err(e) => {
                return Err(match (expected, seen.get()) {
                    (Some(expected), Some(actual)) if expected != actual => {
                        NodeError::PeerMismatch { expected, actual }
                    }
                    _ => NodeError::Connection(e),
                });
            }
        };
        let fingerprint = tls::peer_fingerprint(&connection).ok_or(NodeError::NoPeerIdentity)?;
        Ok(PeerConnection {
            connection,
            fingerprint,
        })
    }

    /// Wait for the next incoming connection and complete its handshake (within
    /// `HANDSHAKE_TIMEOUT`). `None` once the endpoint is closed.
    ///
    /// This handles one connection attempt at a time, which suits a quick tool or a test.
    /// Anything listening for strangers should run a [`crate::server::Server`] instead:
    /// it handshakes concurrently, with budgets, so one stalled client cannot block others.
    pub async fn accept(&self) -> Option<Result<PeerConnection, NodeError>> {
        let incoming = self.endpoint.accept().await?;
        Some(
            async {
                let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming.accept()?)
                    .await
                    .map_err(|_| NodeError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
                let fingerprint =
                    tls::peer_fingerprint(&connection).ok_or(NodeError::NoPeerIdentity)?;
                Ok(PeerConnection {
                    connection,
                    fingerprint,
                })
            }
            .await,
        )
    }

    /// Close every connection, then wait up to `linger` for the close to reach peers.
    ///
    /// A full QUIC drain lasts three probe timeouts (~80 ms even on loopback, because
    /// of the peer's ack delay); it only matters if the close is lost, and then the peer
    /// learns from its idle timeout instead. A caller whose peer has already confirmed
    /// everything (as the file sender has) can use a few milliseconds; [`CLOSE_LINGER`]
    /// waits for the full drain.
    pub async fn close(&self, linger: Duration) {
        self.closing.store(true, Ordering::Relaxed);
        self.endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(linger, self.endpoint.wait_idle()).await;
    }
}

/// Transport for connections we accept: as [`transport`], but guarded until the application
/// calls [`PeerConnection::open_windows`].
fn guarded_transport(
    config: &NodeConfig,
    closing: &Arc<AtomicBool>,
) -> Arc<quinn::TransportConfig> {
    let mut transport = base_transport(config, closing);
    transport.max_concurrent_bidi_streams(GUARDED_STREAMS.into());
    transport.receive_window(config.guarded_window.into());
    Arc::new(transport)
}

/// Transport tuning shared by both roles.
fn base_transport(config: &NodeConfig, closing: &Arc<AtomicBool>) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Unidirectional streams are never used, datagrams only where the configuration
    // says so (see `datagrams` below): a peer gets nothing else to fill.
    transport.max_concurrent_uni_streams(0u32.into());
    transport.keep_alive_interval(config.keep_alive);
    transport.congestion_controller_factory(Arc::new(crate::close_gate::GatedFactory {
        inner: config.congestion.factory(),
        node_closing: closing.clone(),
    }));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
    ));
    // Streams a peer may have open at once. Each incoming file holds a file descriptor,
    // a disk thread and its buffers, so this bounds what one sender can make a receiver
    // commit (the file sender itself uses far fewer).
    transport.max_concurrent_bidi_streams(64u32.into());
    // Flow-control windows sized for bulk transfer: quinn's defaults (1.25 MB per stream)
    // stall a fast path on STREAM_DATA_BLOCKED. The connection window bounds what a
    // receiver buffers in total, however many files are in flight. quinn's other knobs
    // stay at their defaults, measured on the path bench with quinn's BBR (medians of 5,
    // interleaved, MB/s at 0 % / 1 % loss per router; defaults 9.95 / 9.58): a 100 ms
    // initial RTT (10.16 / 9.65), no send fairness (10.00 / 9.53) and asking the peer to
    // ACK within 5 ms (10.03 / 9.60) are within the noise; asking it to ACK only every
    // 10th packet is slower (9.54 / 9.20).
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtud));
    transport.stream_receive_window(STREAM_WINDOW.into());
    transport.receive_window(CONNECTION_WINDOW.into());
    transport.send_window(u64::from(CONNECTION_WINDOW));
    datagrams(&mut transport, config.datagrams);
    transport
}

/// Turn datagrams on (or leave them off) in `transport`.
fn datagrams(transport: &mut quinn::TransportConfig, datagrams: Option<Datagrams>) {
    match datagrams {
        None => {
            transport.datagram_receive_buffer_size(None);
        }
        Some(d) => {
            transport.datagram_receive_buffer_size(Some(d.receive_buffer));
            transport.datagram_send_buffer_size(d.send_buffer);
            transport.initial_mtu(d.initial_mtu);
        }
    }
}

/// What [`punch_and_hand_over`] produced.
#[derive(Debug)]
pub struct HandOver {
    /// The QUIC node now owning the socket.
    pub node: Node,
    /// The path the punch proved.
    pub punched: Punched,
    /// The socket's local address *while punching*, read before hand-over, so callers
    /// can check (and show) that QUIC kept the port the NAT mapping belongs to.
    pub punched_from: SocketAddr,
}

/// Bind an ephemeral socket fitting `peer`'s address family, punch to it, and hand the
/// same socket to a new node: the sender's whole direct-mode set-up in one call.
pub async fn punch_and_hand_over(
    peer: SocketAddr,
    config: NodeConfig,
    punch: PunchConfig,
) -> Result<HandOver, NodeError> {
    let any: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = crate::socket::bind(any)?;
    socket.set_nonblocking(true)?;
    let raw = tokio::net::UdpSocket::from_std(socket)?;
    let punched_from = raw.local_addr()?;
    let punched = driver::punch(&raw, vec![peer], punch).await?;
    // Same file descriptor, same port: only the owner changes.
    let socket = raw.into_std()?;
    Ok(HandOver {
        node: Node::new(socket, config)?,
        punched,
        punched_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::congestion::{Cubic, NewReno};

    #[test]
    fn congestion_names_round_trip() {
        for cc in Congestion::ALL {
            assert_eq!(cc.as_str().parse::<Congestion>(), Ok(cc));
            assert_eq!(cc.to_string(), cc.as_str());
        }
        assert_eq!(" BBR ".parse::<Congestion>(), Ok(Congestion::Bbr));
        assert_eq!("new-reno".parse::<Congestion>(), Ok(Congestion::NewReno));
        assert_eq!(
            "vegas".parse::<Congestion>(),
            Err(UnknownCongestion("vegas".into()))
        );
    }

    fn node(accept: bool, congestion: Option<Congestion>) -> Node {
        let socket = crate::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut config = NodeConfig::new(Identity::generate().unwrap(), b"cc-test/1", accept);
        if let Some(congestion) = congestion {
            config.congestion = congestion;
        }
        Node::new(socket, config).unwrap()
    }

    /// The controller quinn actually runs on a live connection.
    fn controller(conn: &PeerConnection) -> Box<dyn std::any::Any> {
        let gated = conn
            .connection
            .congestion_state()
            .into_any()
            .downcast::<crate::close_gate::Gated>()
            .expect("every controller of a node is gated");
        gated.inner().clone_box().into_any()
    }

    /// Each side's choice reaches its own connections, for dialled (`transport`) and
    /// accepted (`guarded_transport`) ones alike, and the default is BBR on both.
    #[tokio::test]
    async fn each_side_runs_its_configured_controller() {
        let cases = [
            (Some(Congestion::Cubic), Some(Congestion::NewReno)),
            (Some(Congestion::NewReno), Some(Congestion::Bbr)),
            (Some(Congestion::QuinnBbr), Some(Congestion::Cubic)),
            (None, None),
        ];
        for (client_cc, server_cc) in cases {
            let (client, server) = (node(false, client_cc), node(true, server_cc));
            let target = server.local_addr().unwrap();
            let (c, s) = tokio::join!(
                client.connect(target, Some(server.fingerprint())),
                server.accept()
            );
            let (c, s) = (c.unwrap(), s.unwrap().unwrap());
            for (conn, cc) in [(&c, client_cc), (&s, server_cc)] {
                let running = controller(conn);
                let ok = match cc.unwrap_or_default() {
                    Congestion::Bbr => running.is::<crate::bbr::Bbr>(),
                    Congestion::QuinnBbr => running.is::<quinn::congestion::Bbr>(),
                    Congestion::Cubic => running.is::<Cubic>(),
                    Congestion::NewReno => running.is::<NewReno>(),
                };
                assert!(ok, "{client_cc:?}/{server_cc:?}: wanted {cc:?}");
            }
            client.close(QUICK_LINGER).await;
            server.close(QUICK_LINGER).await;
        }
    }

    /// A bulk sender is congestion-limited most of the time, and quinn 0.11 holds a
    /// CONNECTION_CLOSE behind a full window for ever (see [`crate::close_gate`]): the peer
    /// would learn of the close only at its idle timeout. Closed mid-transfer, again and
    /// again, each close must reach the peer at once, whichever way it is closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_in_the_middle_of_a_bulk_send_reaches_the_peer() {
        for round in 0..12 {
            let (client, server) = (node(false, None), node(true, None));
            let target = server.local_addr().unwrap();
            let (c, s) = tokio::join!(
                client.connect(target, Some(server.fingerprint())),
                server.accept()
            );
            let (c, s) = (c.unwrap(), s.unwrap().unwrap());
            s.open_windows(4);
            let (mut send, _recv) = c.connection.open_bi().await.unwrap();
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 64 << 10];
                while send.write_all(&chunk).await.is_ok() {}
            });
            let (_, mut recv) = s.connection.accept_bi().await.unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < (2 << 20) {
                got += recv.read(&mut buf).await.unwrap().unwrap();
            }
            // Keep reading (acknowledging) while the close is on its way.
            let reader =
                tokio::spawn(async move { while let Ok(Some(_)) = recv.read(&mut buf).await {} });
            if round % 2 == 0 {
                crate::close_gate::close(&c.connection, 42u32.into(), b"cut");
            } else {
                client.close(QUICK_LINGER).await;
            }
            let closed = tokio::time::timeout(Duration::from_secs(2), s.connection.closed())
                .await
                .unwrap_or_else(|_| panic!("round {round}: the close never reached the peer"));
            assert!(
                matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
                "round {round}: {closed:?}"
            );
            writer.abort();
            reader.abort();
            client.close(QUICK_LINGER).await;
            server.close(QUICK_LINGER).await;
        }
    }
}

//! The client side of the rendezvous protocol, on a peer's own node (so the rendezvous
//! observes the very socket, and NAT mapping, that the peer connection will use).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::relay::RelayLink;
use super::{
    ALPN, ErrorCode, MAX_MESSAGE, MAX_SEALED, Nameplate, PAKE_MSG_LEN, RelayGrant, Request,
    Response, from_hex, to_hex,
};
use crate::frame::{self, FrameError};
use crate::node::{ConnectOptions as DialOptions, Datagrams, Node, NodeError};
use crate::wire::TxId;

/// How long connecting to a rendezvous may take (a Retry adds one round trip).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why talking to the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No QUIC connection to the rendezvous.
    #[error("cannot reach the rendezvous at {addr}: {source}")]
    Connect {
        /// The rendezvous.
        addr: SocketAddr,
        /// Why.
        source: NodeError,
    },
    /// The rendezvous refused the handshake: it speaks none of our ALPNs, so it is
    /// (usually) another version of qpunch.
    #[error(
        "the rendezvous at {addr} does not speak {ours} (ours); it is probably a different \
         version: compare `qpunch --version` with its operator's; the older side should upgrade",
        ours = String::from_utf8_lossy(ALPN)
    )]
    Version {
        /// The rendezvous.
        addr: SocketAddr,
    },
    /// No answer at all within `CONNECT_TIMEOUT` (5 s): usually UDP is blocked on the way.
    #[error(
        "no answer from the rendezvous at {0} within {CONNECT_TIMEOUT:?}: is it running, and is UDP \
         allowed on this network?"
    )]
    Unreachable(SocketAddr),
    /// Neither UDP nor TLS over TCP reached the rendezvous.
    #[error(
        "cannot reach the rendezvous at {addr}: no answer over UDP within {CONNECT_TIMEOUT:?}, \
         and over TCP: {tcp}"
    )]
    NoTransport {
        /// The rendezvous (its UDP address).
        addr: SocketAddr,
        /// Why TCP failed too.
        tcp: String,
    },
    /// The TLS-over-TCP link to the rendezvous could not be made.
    #[error(transparent)]
    Tcp(#[from] crate::tcp::TcpError),
    /// The exchange broke.
    #[error("rendezvous: {0}")]
    Frame(#[from] FrameError),
    /// The rendezvous refused the request (its message is shown escaped).
    #[error("rendezvous: {}", crate::text::peer(message))]
    Refused {
        /// What kind of refusal.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The rendezvous said something that does not fit the exchange.
    #[error("rendezvous broke the protocol: {0}")]
    Protocol(String),
    /// The rendezvous ended the exchange.
    #[error("the rendezvous ended the exchange")]
    Closed,
}

/// How a rendezvous sees us and where it is (its [`Response::Welcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Our public address, as the rendezvous sees it.
    pub observed: SocketAddr,
    /// The rendezvous's addresses.
    pub addrs: Vec<IpAddr>,
    /// Its second, probe-only port.
    pub alt_port: u16,
}

/// A nameplate reserved for us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The nameplate.
    pub nameplate: Nameplate,
    /// How long it lives.
    pub expires: Duration,
    /// Our public address.
    pub observed: SocketAddr,
}

/// The peer arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paired {
    /// Its PAKE message.
    pub pake: Vec<u8>,
    /// Our public address, as the rendezvous sees it (the peer's is in its sealed hello).
    pub observed: SocketAddr,
    /// The relay the rendezvous opened for the pair ([`RendezvousClient::relay_link`]),
    /// or `None` (it relays nothing).
    pub relay: Option<RelayGrant>,
    /// TURN credentials the rendezvous minted for us for this pairing, if it has a TURN
    /// server.
    pub turn: Option<super::TurnGrant>,
}

/// How long UDP has to answer before [`TcpMode::Auto`] tries TCP as well (UDP goes on
/// trying: whichever connects first is used). A rendezvous answers a QUIC Initial with a
/// Retry at once, so 1.5 s is many round trips even on a bad path.
pub const UDP_HEAD_START: Duration = Duration::from_millis(1500);

/// Whether to reach the rendezvous over TLS on TCP (`--rendezvous-tcp` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpMode {
    /// UDP first; TCP when UDP fails or has not answered within [`UDP_HEAD_START`].
    #[default]
    Auto,
    /// UDP only (as before TCP existed).
    Never,
    /// TCP only (a network known to block UDP, or a test).
    Only,
}

impl std::str::FromStr for TcpMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TcpMode::Auto),
            "never" => Ok(TcpMode::Never),
            "only" => Ok(TcpMode::Only),
            other => Err(format!("{other:?}: expected auto, never or only")),
        }
    }
}

/// How [`RendezvousClient::connect_with`] reaches the rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectOptions {
    /// Whether to use TCP.
    pub tcp: TcpMode,
    /// The rendezvous's TCP port; `None`: the same number as its UDP port.
    pub tcp_port: Option<u16>,
}

/// How a [`RendezvousClient`] reached its rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP, from the node's socket.
    Udp,
    /// QUIC carried over TLS on TCP ([`crate::tcp`]): UDP is blocked (or was not tried).
    Tcp,
}

impl Transport {
    /// `udp` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection to a rendezvous.
#[derive(Debug, Clone)]
pub struct RendezvousClient {
    conn: quinn::Connection,
    addr: SocketAddr,
    /// The TCP link the connection travels on, if it does: it (its route and its task)
    /// must live as long as any clone of the client.
    tcp: Option<Arc<crate::tcp::TcpLink>>,
}

impl RendezvousClient {
    /// Connect from `node` to the rendezvous at `addr`, over UDP or, when UDP does not
    /// answer, TLS over TCP on the same port number ([`ConnectOptions::default`]). Its
    /// identity is not checked: the rendezvous is untrusted by design (the PAKE protects
    /// the meeting).
    ///
    /// The connection carries QUIC datagrams ([`Datagrams::RELAY`]), so that once paired
    /// it can be the pair's relay ([`relay_link`](Self::relay_link)); the node's other
    /// connections keep them off.
    pub async fn connect(node: &Node, addr: SocketAddr) -> Result<Self, ClientError> {
        Self::connect_with(node, addr, ConnectOptions::default()).await
    }

    /// [`connect`](Self::connect), choosing whether and where to use TCP.
    pub async fn connect_with(
        node: &Node,
        addr: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        let tcp_addr = SocketAddr::new(addr.ip(), options.tcp_port.unwrap_or(addr.port()));
        match options.tcp {
            TcpMode::Never => Self::connect_udp(node, addr).await,
            TcpMode::Only => Self::connect_tcp(node, addr, tcp_addr).await,
            TcpMode::Auto => {
                let udp = Self::connect_udp(node, addr);
                tokio::pin!(udp);
                // Cancel-safe: dropping a connection attempt abandons it, which is what
                // happens to the loser.
                let failed_early = tokio::select! {
                    r = &mut udp => match r {
                        Ok(client) => return Ok(client),
                        Err(e) => Some(e),
                    },
                    () = tokio::time::sleep(UDP_HEAD_START) => None,
                };
                let tcp = Self::connect_tcp(node, addr, tcp_addr);
                let Some(udp_error) = failed_early else {
                    // UDP is slow: race it against TCP.
                    tokio::pin!(tcp);
                    let (tcp_error, udp_result) = tokio::select! {
                        r = &mut tcp => match r {
                            Ok(client) => return Ok(client),
                            Err(e) => (e, udp.await),
                        },
                        r = &mut udp => match r {
                            Ok(client) => return Ok(client),
                            Err(e) => match tcp.await {
                                Ok(client) => return Ok(client),
                                Err(tcp_error) => (tcp_error, Err(e)),
                            },
                        },
                    };
                    return udp_result.map_err(|_| ClientError::NoTransport {
                        addr,
                        tcp: tcp_error.to_string(),
                    });
                };
                if !udp_unanswered(&udp_error) {
                    // UDP got an answer (a refusal, a protocol mismatch): UDP works, and
                    // TCP would only be a way around the rendezvous's budgets.
                    return Err(udp_error);
                }
                tracing::debug!(%addr, "rendezvous over UDP failed ({udp_error}); trying TCP");
                tcp.await.map_err(|tcp_error| ClientError::NoTransport {
                    addr,
                    tcp: tcp_error.to_string(),
                })
            }
        }
    }

    async fn connect_udp(node: &Node, addr: SocketAddr) -> Result<Self, ClientError> {
        let alpn = [ALPN.to_vec()];
        let options = DialOptions {
            datagrams: Some(Datagrams::RELAY),
        };
        let connect = node.connect_with_options(addr, None, &alpn, &options);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect).await;
        match connected {
            Ok(Ok(peer)) => Ok(RendezvousClient {
                conn: peer.connection,
                addr,
                tcp: None,
            }),
            Ok(Err(source)) => Err(connect_error(addr, source)),
            Err(_) => Err(ClientError::Unreachable(addr)),
        }
    }

    async fn connect_tcp(
        node: &Node,
        addr: SocketAddr,
        tcp_addr: SocketAddr,
    ) -> Result<Self, ClientError> {
        // From the node's own address when it is bound to one: the same host, seen (and
        // budgeted) at the same address over TCP as over UDP.
        let local = node
            .local_addr()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == tcp_addr.is_ipv4());
        let link =
            crate::tcp::connect_from(node.paths(), local, tcp_addr, crate::tcp::CONNECT_TIMEOUT)
                .await?;
        let alpn = [ALPN.to_vec()];
        let options = DialOptions {
            datagrams: Some(Datagrams::RELAY),
        };
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            node.connect_with_options(link.mapped(), None, &alpn, &options),
        )
        .await;
        match connected {
            Ok(Ok(peer)) => Ok(RendezvousClient {
                conn: peer.connection,
                addr,
                tcp: Some(Arc::new(link)),
            }),
            Ok(Err(source)) => Err(connect_error(tcp_addr, source)),
            Err(_) => Err(ClientError::Unreachable(tcp_addr)),
        }
    }

    /// The rendezvous's address (its UDP address, also when reached over TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Our end of the TCP connection when we reached the rendezvous over TCP (the address
    /// it observes for us, NAT aside).
    pub fn tcp_local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().map(|link| link.local())
    }

    /// How we reached the rendezvous.
    pub fn transport(&self) -> Transport {
        match self.tcp {
            Some(_) => Transport::Tcp,
            None => Transport::Udp,
        }
    }

    /// The QUIC connection (it keeps our NAT mapping alive while we wait).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The relay through this connection: what the pair's [`Paired::relay`] grant allows
    /// travels as datagrams to the partner. Any number of links may share a connection.
    pub fn relay_link(&self) -> RelayLink {
        RelayLink::new(self.conn.clone(), self.tcp.clone())
    }

    /// Ask how the rendezvous sees us.
    pub async fn info(&self) -> Result<Welcome, ClientError> {
        let mut exchange = self.start(&Request::Info).await?;
        match exchange.next().await? {
            Response::Welcome {
                observed,
                addrs,
                alt_port,
                ..
            } => Ok(Welcome {
                observed,
                addrs,
                alt_port,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Ask for a probe reply carrying `txid`, sent to us from the other address or port.
    pub async fn reflect(
        &self,
        txid: TxId,
        change_ip: bool,
        change_port: bool,
    ) -> Result<(), ClientError> {
        let request = Request::Reflect {
            txid: to_hex(&txid),
            change_ip,
            change_port,
        };
        match self.start(&request).await?.next().await? {
            Response::Reflected => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Receiver: reserve `nameplate` (or any) for `ttl`. Then send the PAKE message with
    /// [`Exchange::pake`]: nobody can join before it.
    pub async fn open(
        &self,
        nameplate: Option<&Nameplate>,
        ttl: Duration,
    ) -> Result<(Exchange, Opened), ClientError> {
        let request = Request::Open {
            nameplate: nameplate.map(|n| n.as_str().to_string()),
            ttl_secs: ttl.as_secs().clamp(1, u32::MAX.into()) as u32,
        };
        let mut exchange = self.start(&request).await?;
        match exchange.next().await? {
            Response::Opened {
                nameplate,
                expires_secs,
                observed,
            } => {
                let nameplate = nameplate
                    .parse()
                    .map_err(|_| ClientError::Protocol("opened an invalid nameplate".into()))?;
                Ok((
                    exchange,
                    Opened {
                        nameplate,
                        expires: Duration::from_secs(expires_secs.into()),
                        observed,
                    },
                ))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Sender: join the receiver waiting on `nameplate` with our PAKE message.
    pub async fn join(
        &self,
        nameplate: &Nameplate,
        pake: &[u8],
    ) -> Result<(Exchange, Paired), ClientError> {
        let request = Request::Join {
            nameplate: nameplate.as_str().to_string(),
            pake: to_hex(pake),
        };
        let mut exchange = self.start(&request).await?;
        let paired = exchange.paired().await?;
        Ok((exchange, paired))
    }

    async fn start(&self, first: &Request) -> Result<Exchange, ClientError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Frame(FrameError::Connection(e)))?;
        frame::write(&mut send, first).await?;
        let (tx, responses) = mpsc::channel(4);
        let reader = tokio::spawn(read_responses(recv, tx));
        Ok(Exchange {
            send,
            responses,
            reader,
            _tcp: self.tcp.clone(),
        })
    }
}

/// One exchange (stream) with the rendezvous. Reading is done by a task, so
/// [`next`](Self::next) is cancel-safe and can sit in a `select!`.
#[derive(Debug)]
pub struct Exchange {
    send: quinn::SendStream,
    responses: mpsc::Receiver<Result<Response, FrameError>>,
    reader: tokio::task::JoinHandle<()>,
    /// The TCP link the connection travels on, if any: an exchange finishing in the
    /// background ([`Exchange::finish`]) must outlive the client that started it.
    _tcp: Option<Arc<crate::tcp::TcpLink>>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Exchange {
    /// The next message (an error response becomes [`ClientError::Refused`]).
    /// Cancel-safe: it only receives from a channel.
    pub async fn next(&mut self) -> Result<Response, ClientError> {
        match self.responses.recv().await {
            Some(Ok(Response::Error { code, message })) => {
                Err(ClientError::Refused { code, message })
            }
            Some(Ok(response)) => Ok(response),
            Some(Err(e)) => Err(e.into()),
            None => Err(ClientError::Closed),
        }
    }

    /// Wait for [`Response::Paired`] (a receiver waits here after opening).
    pub async fn paired(&mut self) -> Result<Paired, ClientError> {
        match self.next().await? {
            Response::Paired {
                pake,
                observed,
                relay,
                turn,
            } => {
                let pake = from_hex(&pake, PAKE_MSG_LEN)
                    .ok_or_else(|| ClientError::Protocol("bad PAKE message".into()))?;
                Ok(Paired {
                    pake,
                    observed,
                    relay,
                    turn,
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Wait for the peer's sealed hello; a [`Response::PeerFailed`] is returned as
    /// `Err(Ok(reason))` so callers can tell it from a broken exchange.
    pub async fn sealed(&mut self) -> Result<Result<Vec<u8>, String>, ClientError> {
        match self.next().await? {
            Response::Sealed { sealed } => from_hex(&sealed, MAX_SEALED)
                .map(Ok)
                .ok_or_else(|| ClientError::Protocol("bad sealed hello".into())),
            Response::PeerFailed { reason } => Ok(Err(reason)),
            other => Err(unexpected(other)),
        }
    }

    /// Finish our side of the exchange and wait (at most `wait`) until the rendezvous has
    /// acknowledged everything we sent. Closing the connection right after a meeting would
    /// otherwise abandon our last message (a sealed hello, a failure notice) in flight,
    /// leaving the peer waiting for it. Run it in the background: the stream keeps the
    /// connection alive until then.
    pub async fn finish(mut self, wait: Duration) {
        let _ = self.send.finish();
        let _ = tokio::time::timeout(wait, self.send.stopped()).await;
    }

    /// Receiver, after opening: our PAKE message (which needs the nameplate).
    pub async fn pake(&mut self, pake: &[u8]) -> Result<(), ClientError> {
        self.send(&Request::Pake { pake: to_hex(pake) }).await
    }

    /// Send our sealed hello.
    pub async fn seal(&mut self, sealed: &[u8]) -> Result<(), ClientError> {
        self.send(&Request::Seal {
            sealed: to_hex(sealed),
        })
        .await
    }

    /// Tell the peer (through the rendezvous) that the meeting failed here.
    pub async fn fail(&mut self, reason: &str) -> Result<(), ClientError> {
        self.send(&Request::Fail {
            reason: reason.to_string(),
        })
        .await
    }

    async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        Ok(frame::write(&mut self.send, request).await?)
    }
}

/// Whether a failed UDP connect means "nobody answered" (so TCP's error says more).
/// Why connecting to the rendezvous at `addr` failed: a refusal for lack of a common
/// ALPN is named as a version mismatch.
fn connect_error(addr: SocketAddr, source: NodeError) -> ClientError {
    match source {
        NodeError::Connection(e) if crate::tls::is_no_common_protocol(&e) => {
            ClientError::Version { addr }
        }
        source => ClientError::Connect { addr, source },
    }
}

fn udp_unanswered(error: &ClientError) -> bool {
    match error {
        ClientError::Unreachable(_) => true,
        ClientError::Connect { source, .. } => matches!(
            source,
            NodeError::Io(_)
                | NodeError::Connect(_)
                | NodeError::Connection(quinn::ConnectionError::TimedOut)
        ),
        _ => false,
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected {response:?}"))
}

async fn read_responses(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Result<Response, FrameError>>,
) {
    loop {
        let read = frame::read::<Response>(&mut recv, MAX_MESSAGE).await;
        let end = !matches!(read, Ok(Some(_)));
        let item = match read {
            Ok(Some(response)) => Ok(response),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

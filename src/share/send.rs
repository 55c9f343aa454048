//! Sending: reach the receiver (its address, or its code through a rendezvous or on the
//! LAN), decide whether to trust it, deliver the files, and close cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::events::FileEvents;
use super::{DEFAULT_PORT, Event, Share, ShareError, canonical, meeting, net};
use crate::identity::Fingerprint;
use crate::known_peers::KnownPeers;
use crate::meet::code::Code;
use crate::meet::lan::{self, Lan};
use crate::node::{self, Congestion, Node, NodeConfig, NodeError, PeerConnection};
use crate::path::{PathBytes, PathKind};
use crate::punch::{Method, PunchConfig};
use crate::transfer::tree::TreeCache;
use crate::transfer::{self, FileReport, Selection, TransferError};
use crate::trust::{Trust, TrustDecision, TrustError};

/// How long to wait for a QUIC handshake with a peer that answered like the Go demo. Such
/// a peer has already shown it is not qpunch (a qpunch receiver answers probes with
/// qpunch replies), and quinn would otherwise wait out the whole idle timeout.
const LEGACY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to send: a receiver's one-time code or its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `NAMEPLATE-WORD-WORD`: met through a rendezvous, or on the LAN without one.
    Code(Code),
    /// `HOST`, `HOST:PORT`, `IP` or `[IPv6]:PORT` (port [`DEFAULT_PORT`] when omitted).
    Host(String),
}

impl Target {
    /// Tell a code from a host: a code has no dot, no colon, and three dash-separated
    /// parts. A mistyped code word is an error, not a name to look up in DNS.
    pub fn parse(to: &str) -> Result<Target, crate::meet::code::CodeError> {
        let trimmed = to.trim();
        let parts = trimmed.split(['-', ' ']).filter(|p| !p.is_empty()).count();
        if trimmed.contains(['.', ':', '[']) || parts != 3 {
            return Ok(Target::Host(to.to_string()));
        }
        trimmed.parse().map(Target::Code)
    }
}

/// The options of a send (those of `qpunch send`).
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// The rendezvous to meet a code's receiver through (`HOST[:PORT]`); `None` looks for
    /// it on the local network.
    pub rendezvous: Option<String>,
    /// How to reach the rendezvous: UDP, TCP, or UDP then TCP (the default).
    pub rendezvous_connect: crate::rendezvous::ConnectOptions,
    /// The receiver's fingerprint, when known: then nothing is trusted on first use.
    pub peer: Option<Fingerprint>,
    /// The known_peers file of trust on first use [default: in the qpunch home].
    pub known_peers: Option<PathBuf>,
    /// Where hashed files' trees are cached for resumes [default: the home's `cache`].
    pub cache_dir: Option<PathBuf>,
    /// Give up when the receiver takes no data for this long.
    pub stall_timeout: Duration,
    /// Give up punching after this long.
    pub punch_timeout: Duration,
    /// The congestion controller (the sender's decides how fast files move).
    pub congestion: Congestion,
    /// When meeting by code through a rendezvous, ask the router to forward our port
    /// (see [`crate::portmap`]). A send to an address never asks: the receiver never
    /// dials the sender, so a forwarded port would open nothing anybody uses.
    pub port_mapping: bool,
    /// STUN servers (`HOST[:PORT]`) to ask for our public address when meeting by code
    /// through a rendezvous: each distinct answer is one more candidate in our hello
    /// (see [`crate::stun_client::Discovery`]). Empty: none is asked.
    pub stun: Vec<String>,
    /// A TURN server of the user's own, for relaying when meeting by code finds no direct
    /// path (credentials the rendezvous mints take precedence).
    pub turn: Option<crate::turn::TurnServer>,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            rendezvous: None,
            rendezvous_connect: Default::default(),
            peer: None,
            known_peers: None,
            cache_dir: None,
            stall_timeout: transfer::STALL_TIMEOUT,
            punch_timeout: PunchConfig::default().timeout,
            congestion: Congestion::default(),
            port_mapping: true,
            stun: Vec::new(),
            turn: None,
        }
    }
}

/// A finished send.
#[derive(Debug, Clone)]
pub struct Sent {
    /// One report per file: [`FileReport::is_verified`] when the receiver stored it
    /// under its final name with the right hash.
    pub reports: Vec<FileReport>,
    /// From the first byte offered to the last verdict.
    pub elapsed: Duration,
    /// The receiver's address.
    pub to: SocketAddr,
    /// For a meeting by code: bytes that went each way, by kind of path.
    pub paths: Option<PathBytes>,
    /// The connection started on a direct path through a router's port mapping.
    pub port_mapped: bool,
}

impl Share {
    /// Send `files` (see [`transfer::select`]) to `to`. When `cancel` completes during
    /// the transfer, the receiver is told at once (it keeps what arrived for a resume) and
    /// [`ShareError::Interrupted`] is returned. It is not polled before the transfer
    /// starts, except in a meeting by code through a rendezvous, which it also ends (so
    /// that the router's port mapping is deleted on the way out).
    pub async fn send(
        &self,
        to: &Target,
        files: Selection,
        config: &SendConfig,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        match (to, &config.rendezvous) {
            (Target::Host(host), _) => self.send_to_host(host, files, config, cancel).await,
            (Target::Code(code), Some(rendezvous)) => {
                let code = code.clone();
                self.send_by_code(code, rendezvous, files, config, cancel)
                    .await
            }
            (Target::Code(code), None) => {
                self.send_on_lan(code.clone(), files, config, cancel).await
            }
        }
    }

    fn node_config(&self, config: &SendConfig) -> NodeConfig {
        NodeConfig {
            congestion: config.congestion,
            // Older versions too, only to name them (see `transfer::version`).
            alpn: transfer::version::alpns(),
            ..NodeConfig::new(self.identity.clone(), transfer::ALPN, false)
        }
    }

    async fn send_to_host(
        &self,
        to: &str,
        files: Selection,
        config: &SendConfig,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        let (key, target) = net::resolve_host(to, DEFAULT_PORT).await?;
        let known_peers = match &config.known_peers {
            Some(path) => path.clone(),
            None => crate::identity::config_dir()?.join(crate::known_peers::FILE),
        };
        let known = KnownPeers::load(known_peers)?;
        if let Some(warning) = skipped_lines_warning(&known) {
            self.emit(Event::Warning(warning));
        }
        let mut trust = Trust::new(known, key.clone(), config.peer);

        self.emit(Event::Punching { target });
        let punch = PunchConfig {
            timeout: config.punch_timeout,
            ..PunchConfig::default()
        };
        let node::HandOver {
            node,
            punched,
            punched_from,
        } = node::punch_and_hand_over(target, self.node_config(config), punch)
            .await
            .map_err(|source| ShareError::NoAnswer { target, source })?;
        self.emit(Event::Punched {
            punched: punched.clone(),
            from: punched_from,
        });
        if let Err(refused) = trust.check_reply(target, punched.peer) {
            node.close(node::QUICK_LINGER).await;
            return Err(ShareError::Trust(refused));
        }
        // A legacy punch proved the path, not the peer: TLS pinning below decides as always.
        let legacy = punched.method == Method::Legacy;
        let connecting = node.connect(punched.peer, trust.expected());
        let connected = if legacy {
            match tokio::time::timeout(LEGACY_HANDSHAKE_TIMEOUT, connecting).await {
                Ok(connected) => connected,
                Err(_) => {
                    node.close(node::QUICK_LINGER).await;
                    let why = format!("no QUIC handshake within {LEGACY_HANDSHAKE_TIMEOUT:?}");
                    return Err(ShareError::NotQpunch {
                        peer: punched.peer,
                        why,
                    });
                }
            }
        } else {
            connecting.await
        };
        let peer = match connected {
            Ok(peer) => peer,
            Err(NodeError::PeerMismatch { expected, actual }) => {
                node.close(node::QUICK_LINGER).await;
                return Err(ShareError::Trust(trust.mismatch(expected, actual)));
            }
            Err(e) if legacy => {
                let why = e.to_string();
                return Err(ShareError::NotQpunch {
                    peer: punched.peer,
                    why,
                });
            }
            Err(NodeError::Connection(e)) if crate::tls::is_no_common_protocol(&e) => {
                let refused = transfer::version::VersionError::NoCommonProtocol;
                return Err(ShareError::Transfer(refused.into()));
            }
            Err(source) => {
                let peer = punched.peer;
                return Err(ShareError::Connect { peer, source });
            }
        };
        match trust.accept(peer.fingerprint) {
            Ok(TrustDecision::FirstUse { file }) => self.emit(Event::TrustedOnFirstUse {
                key,
                fingerprint: peer.fingerprint,
                // The address actually dialled, which `check_reply` tied to `to`.
                addr: canonical(peer.connection.remote_address()),
                known_peers: file,
            }),
            Ok(TrustDecision::Pinned) => {}
            Err(TrustError::KnownPeers(e)) => return Err(e.into()),
            Err(refused) => return Err(ShareError::Trust(refused)),
        }
        self.connected(&node, &peer, PathKind::Direct, false)?;
        let to = canonical(punched.peer);
        self.deliver(&node, &peer, files, config, to, cancel).await
    }

    /// Meet the receiver behind `code` through the rendezvous, then deliver. Nothing is
    /// remembered in known_peers: the code pinned the receiver, once.
    async fn send_by_code(
        &self,
        code: Code,
        rendezvous: &str,
        files: Selection,
        config: &SendConfig,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        let socket = net::bind_dual_stack(0)?;
        let node = Arc::new(Node::new(socket, self.node_config(config))?);
        let (_, rendezvous_addr) =
            net::resolve_host(rendezvous, crate::rendezvous::DEFAULT_PORT).await?;
        // A rendezvous on this machine means peers on this machine: no router is in the
        // way, and none is asked.
        if config.port_mapping && !rendezvous_addr.ip().to_canonical().is_loopback() {
            node.map_port(Default::default(), super::port_notices(self.events.clone()));
        }
        // In the background from now on, like the port mapping: the meeting takes what has
        // come back when it needs it (bounded), and never waits longer.
        node.discover_stun(&config.stun);
        let cancel = futures_util::FutureExt::shared(Box::pin(cancel));
        // Cancel-safe: dropping the meeting aborts its probes; the mapping is released
        // below on every way out.
        let result = tokio::select! {
            result = self.send_by_code_on(&node, code, (rendezvous, rendezvous_addr), files, config, cancel.clone()) => result,
            () = cancel => {
                node.close(node::QUICK_LINGER).await;
                Err(ShareError::Interrupted)
            }
        };
        node.release_port_mapping().await;
        result
    }

    /// [`Share::send_by_code`] on its node.
    async fn send_by_code_on(
        &self,
        node: &Arc<Node>,
        code: Code,
        (rendezvous, rendezvous_addr): (&str, SocketAddr),
        files: Selection,
        config: &SendConfig,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        let node = node.clone();
        let (client, report) = meeting::connect_to(
            self.events.as_ref(),
            &node,
            rendezvous,
            rendezvous_addr,
            config.rendezvous_connect,
        )
        .await?;
        let events = meeting::Meeting::new(self.events.clone(), None);
        let meeting = crate::meet::Meeting {
            node: &node,
            rendezvous: &client,
            nat: report.mapping,
            config: crate::meet::MeetConfig::default(),
            events: &events,
            turn: config.turn.as_ref(),
        };
        self.emit(Event::Meeting {
            code: code.clone(),
            via: Some(rendezvous.to_string()),
        });
        let met = meeting
            .dial(&code)
            .await
            .map_err(|source| ShareError::Meet {
                code: code.to_string(),
                source,
            })?;
        // The rendezvous connection ends by itself once our last message there is delivered
        // (or, when it relays for us, once the paths let go of it).
        drop(client);
        if let Some(paths) = &met.paths {
            let connection = Some(met.peer.connection.clone());
            paths.hold(forward_path_events(paths, self.events.clone(), connection));
        }
        let sending = met.node.clone().unwrap_or_else(|| node.clone());
        // A birthday path is direct to the user.
        let path = match met.method {
            PathKind::Birthday => PathKind::Direct,
            kind => kind,
        };
        self.connected(&sending, &met.peer, path, met.port_mapped)?;
        let to = canonical(
            sending
                .paths()
                .real_addr(met.peer.connection.remote_address()),
        );
        let delivered = self
            .deliver(&sending, &met.peer, files, config, to, cancel)
            .await;
        node.close(node::QUICK_LINGER).await;
        delivered.map(|sent| Sent {
            paths: met.paths.as_ref().map(|p| p.bytes()),
            port_mapped: met.port_mapped,
            ..sent
        })
    }

    /// With no rendezvous: find the receiver of `code` on the local network (mDNS), prove
    /// the code over the direct connection, then deliver on it. Nothing is remembered in
    /// known_peers: the code confirmed the receiver, once.
    async fn send_on_lan(
        &self,
        code: Code,
        files: Selection,
        config: &SendConfig,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        let node = Node::new(net::bind_dual_stack(0)?, self.node_config(config))?;
        let lan = Lan::start().map_err(|source| ShareError::Lan {
            what: "look for the receiver",
            source,
        })?;
        self.emit(Event::Meeting {
            code: code.clone(),
            via: None,
        });
        let dialed = lan::dial(&node, &lan, &code, lan::FIND_TIMEOUT).await;
        lan.shutdown().await;
        let dialed = match dialed {
            Ok(dialed) => dialed,
            Err(source) => {
                node.close(node::QUICK_LINGER).await;
                let code = code.to_string();
                return Err(ShareError::MeetOnLan { code, source });
            }
        };
        self.emit(Event::Found {
            nameplate: code.nameplate().to_string(),
            addrs: dialed.sightings.addrs().to_vec(),
        });
        self.connected(&node, &dialed.peer, PathKind::Lan, false)?;
        let to = canonical(dialed.peer.connection.remote_address());
        self.deliver(&node, &dialed.peer, files, config, to, cancel)
            .await
    }

    fn connected(
        &self,
        node: &Node,
        peer: &PeerConnection,
        path: PathKind,
        port_mapped: bool,
    ) -> Result<(), ShareError> {
        self.emit(Event::Connected {
            conn: peer.connection.stable_id(),
            peer: canonical(node.paths().real_addr(peer.connection.remote_address())),
            fingerprint: peer.fingerprint,
            path,
            local: node.local_addr()?,
            port_mapped,
        });
        Ok(())
    }

    /// Send the files on an authenticated connection and close it, and the node.
    async fn deliver(
        &self,
        node: &Node,
        peer: &PeerConnection,
        files: Selection,
        config: &SendConfig,
        to: SocketAddr,
        cancel: impl Future<Output = ()>,
    ) -> Result<Sent, ShareError> {
        let observer = Arc::new(FileEvents {
            conn: peer.connection.stable_id(),
            events: self.events.clone(),
        });
        let options = transfer::SendOptions {
            cache: tree_cache(config.cache_dir.clone()),
            empty_dirs: files.empty_dirs,
            stall_timeout: config.stall_timeout,
        };
        let started = std::time::Instant::now();
        let sending = transfer::send_files_with(&peer.connection, files.files, observer, options);
        // Cancel-safe: on cancel the transfer future is dropped; the receiver is told at
        // once (it keeps what arrived for a resume) instead of waiting for a timeout.
        let result = tokio::select! {
            result = sending => result,
            () = cancel => {
                peer.close(transfer::codes::CANCELLED, b"sender interrupted");
                node.close(node::QUICK_LINGER).await;
                return Err(ShareError::Interrupted);
            }
        };
        tracing::debug!(stats = ?peer.connection.stats(), "connection statistics");
        // A file we could not read ends the send before anything is offered: say so.
        let (code, reason): (u32, &[u8]) = match &result {
            Err(TransferError::File { .. }) => (
                transfer::codes::READ_FAILED,
                b"the sender could not read its files",
            ),
            _ => (transfer::codes::DONE, b"done"),
        };
        peer.close(code, reason);
        node.close(node::QUICK_LINGER).await;
        let reports = result.map_err(ShareError::Transfer)?;
        Ok(Sent {
            paths: None,
            port_mapped: false,
            reports,
            elapsed: started.elapsed(),
            to,
        })
    }
}

/// The trees of hashed files (`dir`, else `<qpunch home>/cache`); a cache that cannot be
/// opened only costs hashing again.
/// Tell `events` every move of `paths`, until they end, and `connection`'s congestion
/// controller that its path changed.
pub(super) fn forward_path_events(
    paths: &crate::path::PeerPaths,
    events: Arc<dyn super::Events>,
    connection: Option<quinn::Connection>,
) -> tokio::task::JoinHandle<()> {
    // The first path is the one `Connected` names: only moves follow.
    let mut moves = paths.events();
    tokio::spawn(async move {
        loop {
            // Cancel-safe: a broadcast receive.
            match moves.recv().await {
                Ok(event) => {
                    // The bulk sender's controller re-probes the new path.
                    if let Some(connection) = &connection {
                        crate::close_gate::path_changed(connection);
                    }
                    events.event(path_changed(event));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

fn path_changed(event: crate::path::PathEvent) -> Event {
    Event::PathChanged {
        path: event.kind,
        from: event.from,
        reason: event.reason,
        rtt: event.rtt,
    }
}

fn tree_cache(dir: Option<PathBuf>) -> Option<Arc<TreeCache>> {
    let dir = match dir {
        Some(dir) => dir,
        None => crate::home::cache_dir(&crate::home::dir().ok()?),
    };
    match TreeCache::open(&dir) {
        Ok(cache) => Some(Arc::new(cache)),
        Err(e) => {
            tracing::warn!("no tree cache in {}: {e}", dir.display());
            None
        }
    }
}

/// What to tell the user about lines of known_peers that were not understood, if any.
fn skipped_lines_warning(known: &KnownPeers) -> Option<String> {
    let skipped = known.skipped();
    if skipped.is_empty() {
        return None;
    }
    let lines: Vec<String> = skipped.iter().map(|n| n.to_string()).collect();
    let (noun, them) = if skipped.len() == 1 {
        ("line", "it")
    } else {
        ("lines", "them")
    };
    Some(format!(
        "{}: ignoring {noun} {} (not `host:port fingerprint`); fix or delete {them}",
        known.path().display(),
        lines.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_told_from_hosts() {
        for host in [
            "example.com",
            "192.0.2.1:9199",
            "localhost",
            "my-laptop",
            "[::1]",
        ] {
            assert_eq!(Target::parse(host), Ok(Target::Host(host.into())), "{host}");
        }
        match Target::parse("7-crossover-clockwork") {
            Ok(Target::Code(code)) => assert_eq!(code.nameplate().as_str(), "7"),
            other => panic!("{other:?}"),
        }
        let typo = Target::parse("7-crossover-clokwork").unwrap_err();
        assert!(typo.to_string().contains("clockwork"), "{typo}");
    }
}

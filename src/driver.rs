//! The thin tokio layer that runs the sans-IO [`crate::punch::Puncher`].
//!
//! All decisions (when to resend, which reply counts, when to give up) live in the state
//! machine; this module only moves datagrams and sleeps until the machine's next
//! deadline. It runs either on a raw socket before hand-over, or on a [`DemuxSocket`]
//! after, so a live endpoint can punch to new peers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::broadcast;

use crate::punch::{PunchConfig, PunchError, Punched, Puncher, Transmit};
use crate::socket::DemuxSocket;
use crate::traverse::{
    Birthday, Kind, Path, Traversal, TraverseConfig, TraverseError, TraverseStats,
};
use crate::wire::ProbeKeys;

/// Why a punch did not produce a path.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Nobody answered in time.
    #[error(transparent)]
    Punch(#[from] PunchError),
    /// The socket failed.
    #[error("UDP socket error while punching: {0}")]
    Io(#[from] io::Error),
    /// A simultaneous punch found no path.
    #[error(transparent)]
    Traverse(#[from] TraverseError),
}

/// How the driver reaches the network: send one datagram, receive the next candidate one.
trait ProbeIo {
    async fn send(&self, transmit: &Transmit) -> io::Result<()>;
    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr>;
}

/// Before hand-over: the raw socket, nobody else reading it.
struct Raw<'a>(&'a tokio::net::UdpSocket);

impl ProbeIo for Raw<'_> {
    async fn send(&self, t: &Transmit) -> io::Result<()> {
        self.0.send_to(&t.contents, t.destination).await.map(drop)
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr> {
        buf.resize(crate::wire::MAX_DATAGRAM + 1, 0);
        loop {
            match self.0.recv_from(buf).await {
                Ok((n, from)) => {
                    buf.truncate(n);
                    return Ok(from);
                }
                // ICMP "port unreachable" from a peer not listening yet surfaces as
                // ConnectionRefused on some systems: keep trying until the deadline.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// After hand-over: replies come from the demultiplexer's broadcast.
struct Demux<'a> {
    socket: &'a DemuxSocket,
    replies: broadcast::Receiver<crate::socket::ProbeReply>,
}

impl ProbeIo for Demux<'_> {
    async fn send(&self, t: &Transmit) -> io::Result<()> {
        self.socket.send_probe(t.destination, &t.contents).await
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr> {
        loop {
            match self.replies.recv().await {
                Ok((from, data)) => {
                    *buf = data;
                    return Ok(from);
                }
                // Missed some replies under load; the next resend covers it.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "socket closed"));
                }
            }
        }
    }
}

/// Punch from a raw socket to the first answering candidate. The socket is borrowed, so
/// the caller can hand the very same socket to QUIC afterwards.
pub async fn punch(
    socket: &tokio::net::UdpSocket,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    run(Raw(socket), candidates, config).await
}

/// Punch through a socket already handed to QUIC.
pub async fn punch_demux(
    socket: &DemuxSocket,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    let replies = socket.subscribe();
    run(Demux { socket, replies }, candidates, config).await
}

async fn run(
    mut io: impl ProbeIo,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    let mut puncher = Puncher::new(candidates, config, Instant::now(), rand::random());
    let mut buf = Vec::new();
    loop {
        let now = Instant::now();
        puncher.handle_timeout(now);
        while let Some(transmit) = puncher.poll_transmit(now) {
            if let Err(e) = io.send(&transmit).await {
                // One unreachable candidate (e.g. no IPv6 route) must not end the punch.
                tracing::debug!(to = %transmit.destination, "probe not sent: {e}");
            }
        }
        if let Some(outcome) = puncher.outcome() {
            return outcome.clone().map_err(DriveError::from);
        }
        let Some(deadline) = puncher.poll_timeout() else {
            continue;
        };
        tokio::select! {
            received = io.recv(&mut buf) => {
                let from = received?;
                puncher.handle_datagram(Instant::now(), from, &buf);
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// Something learned while a [`traverse`] runs.
#[derive(Debug, Clone)]
pub enum Update {
    /// A new candidate address of the peer.
    Candidate(SocketAddr, Kind),
    /// Start probing random ports of the peer's public IP (this side is the easy one).
    Birthday(Birthday),
}

/// Run a [`Traversal`] through a live node's socket until it finds a path or gives up.
/// `updates` feeds it what arrives meanwhile (the peer's sealed hello, say); the result
/// comes with the traversal's counters.
///
/// The socket answers the peer's probes by itself; their sources become triggered checks.
pub async fn traverse(
    socket: &DemuxSocket,
    traversal: Traversal,
    updates: tokio::sync::mpsc::UnboundedReceiver<Update>,
) -> (Result<Path, TraverseError>, TraverseStats) {
    traverse_heard(socket, traversal, updates, Heard::subscribe(socket)).await
}

/// What a socket heard since [`Heard::subscribe`]: replies to probes and the sources of
/// probes it answered. Subscribe *before* the peer may start probing (when the rendezvous
/// pairs), so nothing it sends in the meantime is missed.
#[derive(Debug)]
pub struct Heard {
    replies: broadcast::Receiver<crate::socket::ProbeReply>,
    probes: broadcast::Receiver<crate::socket::ProbeReply>,
}

impl Heard {
    /// Start listening on `socket`.
    pub fn subscribe(socket: &DemuxSocket) -> Self {
        Heard {
            replies: socket.subscribe(),
            probes: socket.subscribe_probes(),
        }
    }
}

/// [`traverse`], fed by what `heard` has collected since it subscribed.
pub async fn traverse_heard(
    socket: &DemuxSocket,
    mut traversal: Traversal,
    mut updates: tokio::sync::mpsc::UnboundedReceiver<Update>,
    heard: Heard,
) -> (Result<Path, TraverseError>, TraverseStats) {
    let Heard {
        mut replies,
        mut probes,
    } = heard;
    let mut updates_open = true;
    loop {
        let now = Instant::now();
        traversal.handle_timeout(now);
        while let Some(t) = traversal.poll_transmit(now) {
            tracing::trace!(to = %t.destination, "probe");
            if let Err(e) = socket.send_probe(t.destination, &t.contents).await {
                tracing::debug!(to = %t.destination, "probe not sent: {e}");
            }
        }
        if let Some(outcome) = traversal.outcome() {
            tracing::debug!(?outcome, stats = ?traversal.stats(), "traversal ended");
            return (outcome.clone(), traversal.stats());
        }
        let deadline = traversal
            .poll_timeout()
            .unwrap_or_else(|| now + std::time::Duration::from_millis(50));
        // Every branch is cancel-safe: broadcast and mpsc receivers lose nothing when a
        // `recv` is dropped, and the sleep is only a timer.
        tokio::select! {
            reply = replies.recv() => match reply {
                Ok((from, data)) => {
                    let ours = traversal.handle_reply(Instant::now(), from, &data);
                    tracing::debug!(%from, ours, "probe reply");
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return (Err(closed(&traversal)), traversal.stats());
                }
            },
            probe = probes.recv() => {
                if let Ok((from, data)) = probe {
                    tracing::debug!(%from, "peer probe: triggered check");
                    traversal.handle_peer_probe(Instant::now(), from, &data);
                }
            }
            update = updates.recv(), if updates_open => match update.inspect(|u| tracing::debug!(?u, "traversal update")) {
                Some(Update::Candidate(addr, kind)) => traversal.add_candidate(Instant::now(), addr, kind),
                Some(Update::Birthday(b)) => {
                    if !traversal.start_birthday(Instant::now(), b) {
                        tracing::debug!(ip = %b.ip, "birthday hunt refused: not a candidate's IP");
                    }
                }
                None => updates_open = false,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// After finding a path, keep probing it for a while (every 150 ms for `linger`): the peer
/// may not have heard us yet (our first probe can arrive before it listens), and each of
/// these probes is a triggered check for it. Replies are ignored; answering is the socket's.
/// With a meeting's `keys` the probes are authenticated (the peer counts no others).
pub async fn beacon(
    socket: std::sync::Arc<DemuxSocket>,
    peer: SocketAddr,
    linger: std::time::Duration,
    keys: Option<ProbeKeys>,
) {
    let until = tokio::time::Instant::now() + linger;
    while tokio::time::Instant::now() < until {
        let probe = crate::wire::Message::Probe {
            txid: rand::random(),
        };
        let contents = match &keys {
            Some(keys) => crate::wire::authenticated_probe(probe.txid(), peer, &keys.ours),
            None => probe.to_vec(),
        };
        let _ = socket.send_probe(peer, &contents).await;
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
}

/// The socket went away under a traversal: report it as giving up now.
fn closed(traversal: &Traversal) -> TraverseError {
    let stats = traversal.stats();
    TraverseError::TimedOut {
        probes: stats.probes,
        candidates: traversal.candidates().len(),
        elapsed: std::time::Duration::ZERO,
    }
}

/// The hard side of a birthday punch: `count` fresh sockets on `bind` (an IP with port 0),
/// each probing `target` (the easy side's public address) with its own [`Traversal`] and
/// answering the easy side's random-port probes. The winner is returned, with its path, to
/// be handed to QUIC; the others are closed.
///
/// The winner is the socket the easy side *probed first*, once its own probe is answered
/// (a reply on another socket waits). The easy side picks the first of our replies it
/// sees, and we reply the moment a probe arrives, so both sides pick the same socket: if
/// we took the first socket answered instead, a second random hit a few milliseconds after
/// the first could win here while the easy side connects to the first, and the QUIC
/// handshake would go to a closed socket (1 meeting in ~40 in the lab).
///
/// Sockets start a few milliseconds apart, so `count` first probes do not leave as one
/// burst; each then backs off like any traversal.
///
/// With a meeting's `keys` every socket's traversal is authenticated, and a socket answers
/// (and counts as probed) only probes that verify: nobody but the peer can make one win.
/// Each socket then probes `target` once, and again only when the peer's probe reaches it
/// (a triggered check): the first probe is what opens the mapping the hunt looks for, and
/// until the peer has answered, `target` is only what the rendezvous told the peer about
/// itself, so a lie there gets one probe per socket, not a dozen.
pub async fn birthday(
    bind: SocketAddr,
    target: SocketAddr,
    count: usize,
    config: TraverseConfig,
    keys: Option<ProbeKeys>,
) -> Result<(std::net::UdpSocket, Path), DriveError> {
    let mut tasks = tokio::task::JoinSet::new();
    let spread = std::time::Duration::from_millis(500) / count.max(1) as u32;
    let first_probed = Arc::new(AtomicUsize::new(NOT_PROBED));
    for i in 0..count {
        let (first_probed, keys) = (first_probed.clone(), keys.clone());
        let socket = tokio::net::UdpSocket::from_std({
            let s = crate::socket::bind(bind)?;
            s.set_nonblocking(true)?;
            s
        })?;
        tasks.spawn(async move {
            tokio::time::sleep(spread * i as u32).await;
            let mut traversal = match &keys {
                Some(keys) => {
                    let once = TraverseConfig {
                        initial_rto: config.timeout,
                        max_rto: config.timeout,
                        ..config
                    };
                    Traversal::authenticated(once, Instant::now(), rand::random(), keys.clone())
                }
                None => Traversal::new(config, Instant::now(), rand::random()),
            };
            traversal.add_candidate(Instant::now(), target, Kind::Reflexive);
            let outcome =
                one_birthday_socket(&socket, traversal, i, &first_probed, keys.as_ref()).await;
            outcome.map(|path| (socket, path))
        });
    }
    let mut last = None;
    // `join_next` is cancel-safe, and this loop owns the set: dropping it aborts the rest.
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((socket, path))) => {
                tasks.abort_all();
                return Ok((socket.into_std()?, path));
            }
            Ok(Err(e)) => last = Some(e),
            Err(e) if e.is_cancelled() => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    Err(last.unwrap_or(DriveError::Io(io::Error::other("no birthday sockets"))))
}

/// No socket of a [`birthday`] has been probed by the peer yet.
const NOT_PROBED: usize = usize::MAX;

/// One socket (number `me`) of [`birthday`]: probe, answer probes (a triggered check
/// each), until a reply to one of ours arrives or the traversal gives up. A socket that
/// has its reply while another was probed first by the peer keeps answering probes but
/// never wins (see [`birthday`]).
async fn one_birthday_socket(
    socket: &tokio::net::UdpSocket,
    mut traversal: Traversal,
    me: usize,
    first_probed: &AtomicUsize,
    keys: Option<&ProbeKeys>,
) -> Result<Path, DriveError> {
    let mut buf = vec![0u8; crate::wire::MAX_DATAGRAM + 1];
    loop {
        let now = Instant::now();
        traversal.handle_timeout(now);
        while let Some(t) = traversal.poll_transmit(now) {
            let _ = socket.send_to(&t.contents, t.destination).await;
        }
        let mut deadline = traversal.poll_timeout().unwrap_or(now);
        match traversal.outcome() {
            Some(Ok(path)) => match first_probed.load(Ordering::SeqCst) {
                NOT_PROBED => return Ok(path.clone()),
                first if first == me => return Ok(path.clone()),
                // The peer chose another of our sockets: stand by (answering probes)
                // until the winner's task ends this one.
                _ => deadline = now + std::time::Duration::from_secs(3600),
            },
            Some(Err(e)) => return Err(DriveError::Traverse(e.clone())),
            None => {}
        }
        tokio::select! {
            // `recv_from` on a tokio socket is cancel-safe.
            received = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                let data = &buf[..n];
                let decoded = match keys {
                    Some(keys) => crate::wire::Message::decode_authenticated(data, &keys.theirs),
                    None => crate::wire::Message::decode(data),
                };
                match decoded {
                    Ok(crate::wire::Message::Probe { txid }) => {
                        // Only the peer can know these sockets exist (and, after a PAKE,
                        // only it can make a probe that verifies): no rate limit needed
                        // beyond the traversal's own pacing of its answers' triggers.
                        let reply = match keys {
                            Some(keys) => crate::punch::authenticated_reply_to(from, txid, &keys.ours),
                            None => crate::punch::reply_to(from, txid),
                        };
                        let _ = socket.send_to(&reply.contents, reply.destination).await;
                        let _ = first_probed.compare_exchange(
                            NOT_PROBED,
                            me,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        traversal.handle_peer_probe(Instant::now(), from, data);
                    }
                    Ok(crate::wire::Message::Reply { .. }) => {
                        traversal.handle_reply(Instant::now(), from, data);
                    }
                    Err(_) => {}
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;
    use std::collections::HashMap;
    use std::time::Duration;

    /// After a PAKE each birthday socket probes the target once (until the peer's probe
    /// reaches it), with a tag, and answers only probes that carry the peer's tag.
    #[tokio::test]
    async fn authenticated_birthday_sockets_probe_once_and_answer_only_the_peer() {
        use crate::wire::{ProbeKey, ProbeKeys};
        let (x, y) = (ProbeKey::from_bytes([1; 32]), ProbeKey::from_bytes([2; 32]));
        let hard_keys = ProbeKeys {
            ours: x.clone(),
            theirs: y.clone(),
        };
        let easy_keys = ProbeKeys { ours: y, theirs: x };
        let easy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = easy.local_addr().unwrap();
        let hard = tokio::spawn(birthday(
            "127.0.0.1:0".parse().unwrap(),
            target,
            4,
            TraverseConfig::default(),
            Some(hard_keys),
        ));
        let mut buf = [0u8; 1500];
        let mut probes: HashMap<SocketAddr, usize> = HashMap::new();
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        while let Ok(Ok((n, from))) = tokio::time::timeout_at(until, easy.recv_from(&mut buf)).await
        {
            let Ok(Message::Probe { .. }) =
                Message::decode_authenticated(&buf[..n], &easy_keys.theirs)
            else {
                panic!("an unauthenticated datagram from {from}")
            };
            *probes.entry(from).or_default() += 1;
        }
        assert_eq!(probes.len(), 4, "{probes:?}");
        assert!(probes.values().all(|&n| n == 1), "{probes:?}");
        let a = *probes.keys().next().unwrap();
        // A stranger's plain probe is not answered.
        let plain = Message::Probe {
            txid: rand::random(),
        };
        easy.send_to(&plain.to_vec(), a).await.unwrap();
        let heard =
            tokio::time::timeout(Duration::from_millis(300), easy.recv_from(&mut buf)).await;
        assert!(heard.is_err(), "answered a plain probe: {heard:?}");
        // The peer's is: a tagged reply, and a triggered check back.
        easy.send_to(&plain.to_authenticated_vec(&easy_keys.ours), a)
            .await
            .unwrap();
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (n, from) = tokio::time::timeout(Duration::from_secs(2), easy.recv_from(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(from, a);
            match Message::decode_authenticated(&buf[..n], &easy_keys.theirs) {
                Ok(Message::Reply { txid, .. }) => {
                    assert_eq!(txid, plain.txid());
                    kinds.push("reply");
                }
                Ok(Message::Probe { .. }) => kinds.push("probe"),
                other => panic!("{other:?}"),
            }
        }
        kinds.sort();
        assert_eq!(kinds, ["probe", "reply"]);
        hard.abort();
    }

    /// The easy side probes socket B first and answers socket A's probe before B's: A has
    /// its reply first, yet B, the socket the easy side chose, must win.
    #[tokio::test]
    async fn the_socket_the_peer_probed_first_wins_the_birthday() {
        let easy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = easy.local_addr().unwrap();
        let hard = tokio::spawn(birthday(
            "127.0.0.1:0".parse().unwrap(),
            target,
            2,
            TraverseConfig::default(),
            None,
        ));
        // The latest probe of each hard socket, until both have probed.
        let mut buf = [0u8; 1500];
        let mut latest: HashMap<SocketAddr, crate::wire::TxId> = HashMap::new();
        while latest.len() < 2 {
            let (n, from) = easy.recv_from(&mut buf).await.unwrap();
            if let Ok(Message::Probe { txid }) = Message::decode(&buf[..n]) {
                latest.insert(from, txid);
            }
        }
        let mut sockets: Vec<SocketAddr> = latest.keys().copied().collect();
        sockets.sort();
        let (a, b) = (sockets[0], sockets[1]);

        // Probe B, and wait for its reply: B has been probed first.
        let probe = Message::Probe {
            txid: rand::random(),
        };
        easy.send_to(&probe.to_vec(), b).await.unwrap();
        loop {
            let (n, from) = easy.recv_from(&mut buf).await.unwrap();
            match Message::decode(&buf[..n]) {
                Ok(Message::Reply { .. }) if from == b => break,
                Ok(Message::Probe { txid }) => {
                    latest.insert(from, txid);
                }
                _ => {}
            }
        }
        // Answer A first: A now has its reply, before B.
        let reply = crate::punch::reply_to(a, latest[&a]);
        easy.send_to(&reply.contents, a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!hard.is_finished(), "A won although B was probed first");
        // Then answer B's latest probe (its triggered check, or a retransmission).
        loop {
            let (n, from) = easy.recv_from(&mut buf).await.unwrap();
            if from == b
                && let Ok(Message::Probe { txid }) = Message::decode(&buf[..n])
            {
                let reply = crate::punch::reply_to(b, txid);
                easy.send_to(&reply.contents, b).await.unwrap();
                break;
            }
        }
        let (socket, path) = tokio::time::timeout(Duration::from_secs(5), hard)
            .await
            .expect("B wins")
            .unwrap()
            .unwrap();
        assert_eq!(socket.local_addr().unwrap(), b);
        assert_eq!(path.peer, target);
    }
}

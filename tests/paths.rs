//! The path layer under quinn, between two real nodes on loopback: one QUIC connection on a
//! mapped address that starts on a relay, moves to the direct path when it answers, and back
//! to the relay when the direct path dies, without the connection or a stream noticing.
//!
//! The relay here is an in-process carrier (two channels and a switch that can cut them),
//! so that these tests exercise the layer alone; the rendezvous's real relay is tested in
//! `tests/relay.rs` and the whole meeting across real NATs in `tests/nat_lab.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::path::{Carrier, PathConfig, PathEvent, PathKind, PeerPaths, Relayed};
use qpunch::wire::{ProbeKey, ProbeKeys};
use tokio::sync::mpsc;

const ALPN: &[u8] = b"paths-test/1";

/// One side of an in-process relay: what it sends comes out of the other side's channel.
#[derive(Debug)]
struct ChannelCarrier {
    to_peer: mpsc::UnboundedSender<Bytes>,
    open: Arc<AtomicBool>,
    carried: Arc<AtomicU64>,
    /// Every byte it carried, to look for plaintext in.
    log: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Carrier for ChannelCarrier {
    fn kind(&self) -> PathKind {
        PathKind::RelayedUdp
    }

    fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        if !self.open.load(Ordering::Relaxed) {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        self.carried
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        self.log.lock().unwrap().extend_from_slice(datagram);
        self.to_peer
            .send(Bytes::copy_from_slice(datagram))
            .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }

    fn max_datagram(&self) -> usize {
        // What a relay inside a 1280-byte QUIC packet carries.
        if self.open.load(Ordering::Relaxed) {
            1232
        } else {
            0
        }
    }
}

struct Relay {
    carried: Arc<AtomicU64>,
    log: Arc<std::sync::Mutex<Vec<u8>>>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Join `a` and `b` through an in-process relay.
fn relay(a: &PeerPaths, b: &PeerPaths) -> Relay {
    let open = Arc::new(AtomicBool::new(true));
    let carried = Arc::new(AtomicU64::new(0));
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (to_b, mut at_b) = mpsc::unbounded_channel();
    let (to_a, mut at_a) = mpsc::unbounded_channel();
    let carrier = |to_peer| {
        Arc::new(ChannelCarrier {
            to_peer,
            open: open.clone(),
            carried: carried.clone(),
            log: log.clone(),
        })
    };
    let in_a: Relayed = a.add_relay(carrier(to_b));
    let in_b: Relayed = b.add_relay(carrier(to_a));
    let tasks = vec![
        tokio::spawn(async move {
            while let Some(d) = at_b.recv().await {
                in_b.deliver(d);
            }
        }),
        tokio::spawn(async move {
            while let Some(d) = at_a.recv().await {
                in_a.deliver(d);
            }
        }),
    ];
    Relay {
        carried,
        log,
        _tasks: tasks,
    }
}

fn keys() -> (ProbeKeys, ProbeKeys) {
    let (k1, k2) = (rand::random(), rand::random());
    (
        ProbeKeys {
            ours: ProbeKey::from_bytes(k1),
            theirs: ProbeKey::from_bytes(k2),
        },
        ProbeKeys {
            ours: ProbeKey::from_bytes(k2),
            theirs: ProbeKey::from_bytes(k1),
        },
    )
}

fn node(accept: bool) -> Node {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Node::new(
        socket,
        NodeConfig::new(Identity::generate().unwrap(), ALPN, accept),
    )
    .unwrap()
}

async fn wait_for(paths: &PeerPaths, kind: PathKind, timeout: Duration) -> PathEvent {
    let mut events = paths.events();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(current) = paths.current().filter(|c| c.kind == kind) {
            return current;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(event)) if event.kind == kind => return event,
            Ok(_) => {}
            Err(_) => panic!(
                "no move to {kind} within {timeout:?}: {:?}",
                paths.current()
            ),
        }
    }
}

/// The sender writes `total` bytes on one stream; the receiver reads and checks them.
async fn transfer(client: &PeerConnection, server: &PeerConnection, total: usize) {
    let (mut send, _) = client.connection.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            send.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        send.finish().unwrap();
        send
    });
    let (_, mut recv) = server.connection.accept_bi().await.unwrap();
    let got = recv.read_to_end(total + 1).await.unwrap();
    assert_eq!(got.len(), total);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == ((i % (64 * 1024)) % 251) as u8)
    );
    let _ = writer.await.unwrap().stopped().await;
}

struct Pair {
    a: Node,
    b: Node,
    pa: PeerPaths,
    pb: PeerPaths,
}

fn pair() -> Pair {
    let (a, b) = (node(false), node(true));
    let (ka, kb) = keys();
    let config = PathConfig::default();
    let pa = PeerPaths::new(a.paths(), ka, config);
    let pb = PeerPaths::new(b.paths(), kb, config);
    Pair { a, b, pa, pb }
}

async fn connect(p: &Pair) -> (PeerConnection, PeerConnection) {
    let (c, s) = tokio::join!(
        p.a.connect(p.pa.mapped(), Some(p.b.fingerprint())),
        p.b.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    s.open_windows(4);
    (c, s)
}

fn addr(node: &Node) -> SocketAddr {
    node.local_addr().unwrap()
}

/// A connection made over the relay only: its bytes arrive intact, the relay carried them,
/// and the accepting side sees the peer at its mapped address, not at any real one. The
/// relay saw only ciphertext: a marker the peers exchanged is nowhere in what it carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_relay_alone_carries_ciphertext() {
    let p = pair();
    let relay = relay(&p.pa, &p.pb);
    let first = wait_for(&p.pa, PathKind::RelayedUdp, Duration::from_secs(5)).await;
    assert_eq!(first.from, None);
    wait_for(&p.pb, PathKind::RelayedUdp, Duration::from_secs(5)).await;
    let (c, s) = connect(&p).await;
    assert_eq!(s.connection.remote_address(), p.pb.mapped());
    let marker = b"MARKER-only-the-peers-see-this-7c1f";
    let (mut send, _) = c.connection.open_bi().await.unwrap();
    send.write_all(marker).await.unwrap();
    send.finish().unwrap();
    let (_, mut recv) = s.connection.accept_bi().await.unwrap();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), marker);
    transfer(&c, &s, 2 << 20).await;
    let carried = relay.carried.load(Ordering::Relaxed);
    assert!(carried > 2 << 20, "the relay carried only {carried} bytes");
    let (sent, _) = p.pa.bytes().of(PathKind::RelayedUdp);
    assert!(sent > 2 << 20, "{:?}", p.pa.bytes());
    assert_eq!(p.pa.bytes().of(PathKind::Direct), (0, 0));
    let log = relay.log.lock().unwrap();
    assert!(
        !log.windows(marker.len()).any(|w| w == marker),
        "the relay saw the plaintext marker"
    );
}

/// One stream that runs until `done` is set, then `tail` bytes more; the receiver checks
/// every byte. Returns the bytes sent.
async fn stream_until(
    client: &PeerConnection,
    server: &PeerConnection,
    done: Arc<AtomicBool>,
    tail: usize,
) -> usize {
    let (mut send, _) = client.connection.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut after = 0;
        while after < tail {
            send.write_all(&chunk).await.unwrap();
            sent += chunk.len();
            if done.load(Ordering::Relaxed) {
                after += chunk.len();
            }
        }
        send.finish().unwrap();
        let _ = send.stopped().await;
        sent
    });
    let (_, mut recv) = server.connection.accept_bi().await.unwrap();
    let got = recv.read_to_end(usize::MAX).await.unwrap();
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == ((i % (64 * 1024)) % 251) as u8)
    );
    let sent = writer.await.unwrap();
    assert_eq!(got.len(), sent);
    sent
}

/// Relayed first, then the direct path appears: the connection moves to it mid-stream (the
/// relay stops carrying the bulk) and the stream goes on to the end, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_connection_moves_to_the_direct_path_mid_transfer() {
    let p = pair();
    let relay = relay(&p.pa, &p.pb);
    wait_for(&p.pa, PathKind::RelayedUdp, Duration::from_secs(5)).await;
    let (c, s) = connect(&p).await;
    let moved_flag = Arc::new(AtomicBool::new(false));
    let moved = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.pa.add_direct(addr(&p.b), PathKind::Direct);
        p.pb.add_direct(addr(&p.a), PathKind::Direct);
        let event = wait_for(&p.pa, PathKind::Direct, Duration::from_secs(5)).await;
        wait_for(&p.pb, PathKind::Direct, Duration::from_secs(5)).await;
        moved_flag.store(true, Ordering::Relaxed);
        event
    };
    let (event, sent) = tokio::join!(moved, stream_until(&c, &s, moved_flag.clone(), 16 << 20));
    assert_eq!(event.from, Some(PathKind::RelayedUdp));
    assert!(event.rtt.is_some());
    let (direct_sent, _) = p.pa.bytes().of(PathKind::Direct);
    assert!(direct_sent >= 16 << 20, "{:?}", p.pa.bytes());
    let (relayed_sent, _) = p.pa.bytes().of(PathKind::RelayedUdp);
    assert!(
        relayed_sent > 0 && relayed_sent < sent as u64,
        "{:?}",
        p.pa.bytes()
    );
    // Once moved, the relay carries probes only: a few hundred bytes every few seconds.
    let before = relay.carried.load(Ordering::Relaxed);
    transfer(&c, &s, 4 << 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = relay.carried.load(Ordering::Relaxed);
    assert!(
        after - before < 4096,
        "the relay still carried {} bytes",
        after - before
    );
}

/// A user-space NAT between two sockets: `a` talks to the forwarder's address, which passes
/// it to `b` (who sees it come from the forwarder) and back. Cutting it kills the path the way
/// a router that stops forwarding does.
struct Forwarder {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

fn forwarder(a: SocketAddr, b: SocketAddr) -> Forwarder {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let addr = socket.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let stop = cut.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if stop.load(Ordering::Relaxed) {
                continue;
            }
            let to = if from == a {
                b
            } else if from == b {
                a
            } else {
                continue;
            };
            let _ = socket.send_to(&buf[..n], to).await;
        }
    });
    Forwarder {
        addr,
        cut,
        _task: task,
    }
}

/// A direct connection whose direct path dies (the router between them stops forwarding)
/// falls back to the relay before anything times out, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_direct_path_falls_back_to_the_relay() {
    let p = pair();
    let nat = forwarder(addr(&p.a), addr(&p.b));
    p.pa.add_direct(nat.addr, PathKind::Direct);
    p.pb.add_direct(nat.addr, PathKind::Direct);
    wait_for(&p.pa, PathKind::Direct, Duration::from_secs(5)).await;
    wait_for(&p.pb, PathKind::Direct, Duration::from_secs(5)).await;
    let (c, s) = connect(&p).await;
    transfer(&c, &s, 1 << 20).await;
    let relay = relay(&p.pa, &p.pb);
    let cut_at = Instant::now();
    nat.cut.store(true, Ordering::Relaxed);
    let (event, ()) = tokio::join!(
        wait_for(&p.pa, PathKind::RelayedUdp, Duration::from_secs(15)),
        transfer(&c, &s, 4 << 20)
    );
    assert_eq!(event.from, Some(PathKind::Direct));
    let took = cut_at.elapsed();
    assert!(took < Duration::from_secs(15), "fell back after {took:?}");
    assert!(relay.carried.load(Ordering::Relaxed) > 4 << 20);
}

//! The rendezvous as a relay: a real rendezvous served in this process, real QUIC clients
//! on loopback (distinct 127.0.0.x sources), pairs made with `open`/`join` (the rendezvous
//! does not look inside PAKE messages, so any 34 bytes do), and datagrams through
//! [`RelayLink`], the path layer's [`Carrier`].

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::path::{Carrier, PathKind};
use qpunch::rendezvous::{
    self, Exchange, Paired, RELAY_EXPIRED, RELAY_QUOTA, RelayLimits, RelayLink, RendezvousClient,
    RendezvousConfig, Request, Response,
};

/// Bound for one step (a handshake, a pairing, an expected datagram).
const STEP: Duration = Duration::from_secs(10);
/// How long to wait for a datagram that must not come.
const QUIET: Duration = Duration::from_millis(300);

fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

use common::rendezvous::{Served as Rv, serve};

/// A peer's node on `127.0.0.n` (datagrams off, as every peer node) and its client.
struct Peer {
    _node: Arc<Node>,
    client: RendezvousClient,
}

impl Peer {
    async fn connect(rv: &Rv, n: u8) -> Peer {
        let socket = qpunch::socket::bind(SocketAddr::new(lo(n), 0)).unwrap();
        let config = NodeConfig::new(Identity::generate().unwrap(), b"relay-test/1", false);
        let node = Arc::new(Node::new(socket, config).unwrap());
        let client = tokio::time::timeout(STEP, RendezvousClient::connect(&node, rv.addr))
            .await
            .unwrap()
            .expect("connect to the rendezvous");
        Peer {
            _node: node,
            client,
        }
    }

    fn link(&self) -> RelayLink {
        self.client.relay_link()
    }
}

/// A pair made at the rendezvous: the exchanges are kept open (they end when dropped).
struct Pair {
    receiver: Peer,
    sender: Peer,
    exchanges: Vec<Exchange>,
    paired: [Paired; 2],
}

async fn pair_peers(receiver: Peer, sender: Peer) -> Pair {
    let (mut rx, opened) = receiver
        .client
        .open(None, Duration::from_secs(60))
        .await
        .expect("open");
    rx.pake(&[1; rendezvous::PAKE_MSG_LEN]).await.expect("pake");
    let (tx, sender_paired) = sender
        .client
        .join(&opened.nameplate, &[2; rendezvous::PAKE_MSG_LEN])
        .await
        .expect("join");
    let receiver_paired = tokio::time::timeout(STEP, rx.paired())
        .await
        .unwrap()
        .expect("paired");
    assert_eq!(receiver_paired.pake, [2; rendezvous::PAKE_MSG_LEN]);
    Pair {
        receiver,
        sender,
        exchanges: vec![rx, tx],
        paired: [receiver_paired, sender_paired],
    }
}

async fn pair(rv: &Rv, a: u8, b: u8) -> Pair {
    let receiver = Peer::connect(rv, a).await;
    let sender = Peer::connect(rv, b).await;
    pair_peers(receiver, sender).await
}

/// Run the meeting's exchange to its end, as a real meeting does (a sealed hello each way,
/// then both sides finish): the rendezvous's pairing sessions end.
async fn end_meeting(mut exchanges: Vec<Exchange>) {
    for exchange in exchanges.iter_mut() {
        exchange.seal(b"sealed hello").await.unwrap();
    }
    for exchange in exchanges.iter_mut() {
        let sealed = tokio::time::timeout(STEP, exchange.sealed()).await.unwrap();
        assert_eq!(sealed.unwrap().unwrap(), b"sealed hello");
    }
    for exchange in exchanges {
        exchange.finish(Duration::from_secs(1)).await;
    }
}

/// A payload of `len` bytes that differs from its neighbours.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn recv(link: &RelayLink) -> Option<bytes::Bytes> {
    tokio::time::timeout(STEP, link.recv())
        .await
        .expect("a relayed datagram in time")
}

/// Nothing arrives on `link` for a while.
async fn silent(link: &RelayLink) -> bool {
    tokio::time::timeout(QUIET, link.recv()).await.is_err()
}

/// Wait until `check` holds (counters move a little after the datagrams).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn datagrams_flow_both_ways_byte_exact() {
    let rv = serve(RendezvousConfig::default());
    let pair = pair(&rv, 2, 3).await;
    let grant = pair.paired[0]
        .relay
        .expect("the receiver got a relay grant");
    assert_eq!(pair.paired[1].relay, Some(grant));
    assert_eq!(grant.quota, RelayLimits::default().quota);
    assert_eq!(rv.rendezvous.relaying(), 1);
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    assert_eq!(a.kind(), PathKind::RelayedUdp);
    let max = a.max_datagram().min(b.max_datagram());
    let mut sent = 0;
    let mut bytes = 0;
    for (i, len) in [1, 2, 100, 1200, max].into_iter().enumerate() {
        for (from, to, seed) in [(&a, &b, i as u8), (&b, &a, 100 + i as u8)] {
            let data = payload(len, seed);
            from.send(&data).expect("send");
            let got = recv(to).await.expect("relayed");
            assert_eq!(got.as_ref(), &data[..], "{len} bytes");
            sent += 1;
            bytes += len as u64 + 1;
        }
    }
    let stats = rv.rendezvous.stats();
    assert_eq!(stats.relayed_packets, sent);
    assert_eq!(stats.relayed_bytes, bytes);
    assert_eq!(stats.relay_dropped, 0);
    // Larger than the relay takes: refused at once, with the limit in the message.
    let err = a.send(&vec![0; a.max_datagram() + 1]).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    drop((a, b, pair));
    until("the slot ends with its pair", || {
        rv.rendezvous.relaying() == 0
    })
    .await;
}

#[tokio::test]
async fn a_relay_datagram_fits_a_quic_initial_from_the_first_packet() {
    let rv = serve(RendezvousConfig::default());
    let peer = Peer::connect(&rv, 2).await;
    // Before anything else happened on the connection (no MTU discovery yet).
    let max = peer.link().max_datagram();
    assert!(
        max >= 1200,
        "a relayed datagram takes {max} bytes, less than a QUIC Initial"
    );
    assert!(
        peer.client.connection().max_datagram_size().unwrap() >= 1201,
        "{max}"
    );
    // And the rendezvous's side of a fresh pair forwards 1200 bytes at once, both ways.
    let pair = pair(&rv, 3, 4).await;
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    a.send(&payload(1200, 1)).unwrap();
    assert_eq!(recv(&b).await.unwrap().len(), 1200);
    b.send(&payload(1200, 2)).unwrap();
    assert_eq!(recv(&a).await.unwrap().len(), 1200);
    assert_eq!(rv.rendezvous.stats().relay_dropped, 0);
}

#[tokio::test]
async fn datagrams_before_pairing_and_after_the_partner_left_are_dropped() {
    let rv = serve(RendezvousConfig::default());
    let receiver = Peer::connect(&rv, 2).await;
    let sender = Peer::connect(&rv, 3).await;
    for i in 0..5 {
        receiver.link().send(&payload(500, i)).unwrap();
        sender.link().send(&payload(500, 10 + i)).unwrap();
    }
    until("10 unpaired datagrams dropped", || {
        rv.rendezvous.stats().relay_dropped == 10
    })
    .await;
    let pair = pair_peers(receiver, sender).await;
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    // Nothing sent before the pairing comes out after it: the first datagram is the new one.
    assert!(
        silent(&b).await,
        "a datagram sent before pairing was relayed"
    );
    a.send(b"after").unwrap();
    assert_eq!(recv(&b).await.unwrap().as_ref(), b"after");
    assert_eq!(rv.rendezvous.stats().relayed_packets, 1);

    // The partner leaves: the slot ends, and what its peer sends goes nowhere.
    let Pair {
        receiver,
        sender,
        exchanges,
        ..
    } = pair;
    sender.client.connection().close(0u32.into(), b"bye");
    until("the slot ends", || rv.rendezvous.relaying() == 0).await;
    let dropped = rv.rendezvous.stats().relay_dropped;
    for i in 0..3 {
        receiver.link().send(&payload(300, i)).unwrap();
    }
    until("3 more dropped", || {
        rv.rendezvous.stats().relay_dropped == dropped + 3
    })
    .await;
    assert_eq!(rv.rendezvous.stats().relayed_packets, 1);
    drop(exchanges);
}

#[tokio::test]
async fn a_third_connection_cannot_reach_a_pair() {
    let rv = serve(RendezvousConfig::default());
    let pair = pair(&rv, 2, 3).await;
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    // An unpaired connection, even from the receiver's own address.
    let stranger = Peer::connect(&rv, 2).await;
    for i in 0..5 {
        stranger.link().send(&payload(200, i)).unwrap();
    }
    // Another pair, on the same rendezvous at the same time.
    let other = pair_peers(stranger, Peer::connect(&rv, 4).await).await;
    other.receiver.link().send(b"to my partner only").unwrap();
    assert_eq!(
        recv(&other.sender.link()).await.unwrap().as_ref(),
        b"to my partner only"
    );
    assert!(
        silent(&a).await && silent(&b).await,
        "a stranger reached the pair"
    );
    assert_eq!(rv.rendezvous.stats().relay_dropped, 5);
    assert_eq!(rv.rendezvous.relaying(), 2);
    // The pair itself still works.
    a.send(b"ours").unwrap();
    assert_eq!(recv(&b).await.unwrap().as_ref(), b"ours");
    assert!(silent(&other.sender.link()).await);
}

#[tokio::test]
async fn with_relaying_off_a_pair_gets_no_grant_and_nothing_is_forwarded() {
    let rv = serve(RendezvousConfig {
        relay: None,
        ..RendezvousConfig::default()
    });
    let pair = pair(&rv, 2, 3).await;
    assert_eq!(pair.paired[0].relay, None);
    assert_eq!(pair.paired[1].relay, None);
    assert_eq!(rv.rendezvous.relaying(), 0);
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    a.send(b"hello?").unwrap();
    b.send(b"hello?").unwrap();
    assert!(silent(&a).await && silent(&b).await);
    until("both dropped", || rv.rendezvous.stats().relay_dropped == 2).await;
    assert_eq!(rv.rendezvous.stats().relayed_packets, 0);
}

#[tokio::test]
async fn a_peer_without_datagrams_gets_no_grant_and_neither_does_its_partner() {
    let rv = serve(RendezvousConfig::default());
    let receiver = Peer::connect(&rv, 2).await;
    let (mut rx, opened) = receiver
        .client
        .open(None, Duration::from_secs(60))
        .await
        .unwrap();
    rx.pake(&[1; rendezvous::PAKE_MSG_LEN]).await.unwrap();
    // An older client: the same protocol, datagrams off (the node's default).
    let socket = qpunch::socket::bind(SocketAddr::new(lo(3), 0)).unwrap();
    let config = NodeConfig::new(Identity::generate().unwrap(), b"relay-test/1", false);
    let old = Node::new(socket, config).unwrap();
    let conn = old
        .connect_with_alpn(rv.addr, None, &[rendezvous::ALPN.to_vec()])
        .await
        .unwrap()
        .connection;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let join = Request::Join {
        nameplate: opened.nameplate.as_str().to_string(),
        pake: "02".repeat(rendezvous::PAKE_MSG_LEN),
    };
    qpunch::frame::write(&mut send, &join).await.unwrap();
    let answer: Response = qpunch::frame::read(&mut recv, rendezvous::MAX_MESSAGE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(answer, Response::Paired { relay: None, .. }),
        "{answer:?}"
    );
    let paired = rx.paired().await.unwrap();
    assert_eq!(paired.relay, None);
    assert_eq!(rv.rendezvous.relaying(), 0);
}

#[tokio::test]
async fn a_pair_past_its_quota_is_cut_and_both_peers_are_told_why() {
    let quota = 20_000;
    let rv = serve(RendezvousConfig {
        relay: Some(RelayLimits {
            quota,
            ..RelayLimits::default()
        }),
        ..RendezvousConfig::default()
    });
    let pair = pair(&rv, 2, 3).await;
    assert_eq!(pair.paired[0].relay.unwrap().quota, quota);
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    // One datagram at a time each way, until the rendezvous cuts the pair.
    let mut relayed = 0u64;
    for i in 0..100u8 {
        let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        if from.send(&payload(999, i)).is_err() {
            break;
        }
        match tokio::time::timeout(STEP, to.recv()).await.unwrap() {
            Some(_) => relayed += 1000,
            None => break,
        }
    }
    assert!(
        relayed <= quota,
        "{relayed} bytes relayed past a quota of {quota}"
    );
    assert!(relayed >= quota - 1000, "cut early, after {relayed} bytes");
    for (side, link) in [("receiver", &a), ("sender", &b)] {
        let closed = tokio::time::timeout(STEP, link.connection().closed())
            .await
            .unwrap();
        let quinn::ConnectionError::ApplicationClosed(close) = closed else {
            panic!("{side}: {closed:?}");
        };
        assert_eq!(close.error_code, RELAY_QUOTA.into(), "{side}");
        let why = link.cut_reason().expect("a cut reason");
        assert!(
            why.contains("relay quota of 20000 bytes used up"),
            "{side}: {why}"
        );
        assert_eq!(link.max_datagram(), 0);
        assert!(link.recv().await.is_none());
        let err = link.send(b"more").unwrap_err();
        assert!(err.to_string().contains("relay quota"), "{side}: {err}");
    }
    let stats = rv.rendezvous.stats();
    assert_eq!(stats.relay_cut, 1);
    assert!(stats.relayed_bytes <= quota);
    assert_eq!(rv.rendezvous.relaying(), 0);
}

#[tokio::test]
async fn datagrams_over_the_rate_are_dropped() {
    let rate = 64 << 10;
    let rv = serve(RendezvousConfig {
        relay: Some(RelayLimits {
            rate,
            ..RelayLimits::default()
        }),
        ..RendezvousConfig::default()
    });
    let pair = pair(&rv, 2, 3).await;
    assert_eq!(pair.paired[1].relay.unwrap().rate, rate);
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    // 400 KB in about 200 ms (in small batches, so nothing is lost before the rendezvous):
    // the bucket passes one second's worth (64 KiB) and about 13 KiB more.
    let started = tokio::time::Instant::now();
    for batch in 0..40u8 {
        for i in 0..10u8 {
            a.send(&payload(999, batch.wrapping_add(i))).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut received = 0u64;
    while tokio::time::timeout(QUIET, b.recv()).await.is_ok() {
        received += 1000;
    }
    let allowed = (64 << 10) as f64 + elapsed * rate as f64 + 1000.0;
    assert!(
        (received as f64) <= allowed,
        "{received} bytes passed a rate of {rate} B/s within {elapsed:.2} s"
    );
    assert!(received >= 60_000, "only {received} bytes passed");
    let stats = rv.rendezvous.stats();
    assert!(stats.relay_dropped >= 250, "{stats:?}");
    assert_eq!(stats.relayed_packets * 1000, received);
}

#[tokio::test]
async fn a_relaying_pair_is_not_evicted_as_idle_and_its_survivor_is_once_alone() {
    let grace = Duration::from_millis(300);
    let rv = serve(RendezvousConfig {
        idle_grace: grace,
        ..RendezvousConfig::default()
    });
    let pair = pair(&rv, 2, 3).await;
    let Pair {
        receiver,
        sender,
        exchanges,
        ..
    } = pair;
    // Only the relay slot holds the connections now.
    end_meeting(exchanges).await;
    tokio::time::sleep(grace * 4).await;
    let (a, b) = (receiver.link(), sender.link());
    a.send(b"still here").unwrap();
    assert_eq!(recv(&b).await.unwrap().as_ref(), b"still here");
    assert_eq!(rv.rendezvous.stats().evicted, 0);
    assert!(a.connection().close_reason().is_none());

    // The partner leaves: the survivor holds nothing any more and is evicted after the grace.
    b.connection().close(0u32.into(), b"bye");
    let closed = tokio::time::timeout(STEP, a.connection().closed())
        .await
        .expect("the survivor is evicted");
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("{closed:?}");
    };
    assert_eq!(close.error_code, rendezvous::IDLE_CLOSE.into());
    assert_eq!(rv.rendezvous.stats().evicted, 1);
    assert_eq!(a.cut_reason(), None);
}

#[tokio::test]
async fn reserved_tags_are_dropped_and_skipped() {
    let rv = serve(RendezvousConfig::default());
    let pair = pair(&rv, 2, 3).await;
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    a.connection()
        .send_datagram(bytes::Bytes::from_static(b"\x01reserved"))
        .unwrap();
    a.send(b"packet").unwrap();
    assert_eq!(recv(&b).await.unwrap().as_ref(), b"packet");
    until("the reserved tag dropped", || {
        rv.rendezvous.stats().relay_dropped == 1
    })
    .await;
    assert_eq!(rv.rendezvous.stats().relayed_packets, 1);
}

/// The application close both ends of a relay see.
async fn closed_with(link: &RelayLink) -> quinn::ApplicationClose {
    let closed = tokio::time::timeout(STEP, link.connection().closed())
        .await
        .expect("closed in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => close,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_slot_past_its_lifetime_ends_and_both_peers_are_told_why() {
    let rv = serve(RendezvousConfig {
        relay: Some(RelayLimits {
            lifetime: Duration::from_millis(700),
            ..RelayLimits::default()
        }),
        ..RendezvousConfig::default()
    });
    let started = tokio::time::Instant::now();
    let pair = pair(&rv, 2, 3).await;
    assert_eq!(pair.paired[0].relay.unwrap().expires_secs, 1);
    let (a, b) = (pair.receiver.link(), pair.sender.link());
    a.send(b"while it lasts").unwrap();
    assert_eq!(recv(&b).await.unwrap().as_ref(), b"while it lasts");
    for link in [&a, &b] {
        let close = closed_with(link).await;
        assert_eq!(close.error_code, RELAY_EXPIRED.into());
        let why = link.cut_reason().unwrap();
        assert!(why.contains("relay lifetime of 700ms ended"), "{why}");
    }
    assert!(started.elapsed() >= Duration::from_millis(700));
    until("the slot is gone", || rv.rendezvous.relaying() == 0).await;
}

#[tokio::test]
async fn a_slot_nothing_passes_through_ends_and_its_connections_go_idle() {
    let grace = Duration::from_millis(200);
    let idle = Duration::from_millis(600);
    let rv = serve(RendezvousConfig {
        idle_grace: grace,
        relay: Some(RelayLimits {
            idle,
            ..RelayLimits::default()
        }),
        ..RendezvousConfig::default()
    });
    let pair = pair(&rv, 2, 3).await;
    let Pair {
        receiver,
        sender,
        exchanges,
        ..
    } = pair;
    end_meeting(exchanges).await;
    let (a, b) = (receiver.link(), sender.link());
    // Traffic keeps it: a datagram every 200 ms for 1.2 s (twice the idle time).
    for i in 0..6u8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.send(&[i]).unwrap();
        assert_eq!(recv(&b).await.unwrap().as_ref(), &[i]);
    }
    assert_eq!(rv.rendezvous.relaying(), 1);
    // Then silence: the slot ends, and both connections are evicted as idle.
    for link in [&a, &b] {
        assert_eq!(
            closed_with(link).await.error_code,
            rendezvous::IDLE_CLOSE.into()
        );
        assert_eq!(link.cut_reason(), None);
    }
    assert_eq!(rv.rendezvous.relaying(), 0);
    assert_eq!(rv.rendezvous.stats().evicted, 2);
}

/// Everything one side gives its relay link, i.e. everything the relay forwards from it.
#[derive(Debug)]
struct Captured {
    link: RelayLink,
    log: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Carrier for Captured {
    fn kind(&self) -> PathKind {
        self.link.kind()
    }

    fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        self.log.lock().unwrap().extend_from_slice(datagram);
        self.link.send(datagram)
    }

    fn max_datagram(&self) -> usize {
        self.link.max_datagram()
    }
}

/// A node on `127.0.0.n` and its rendezvous client.
async fn endpoint(rv: &Rv, n: u8, accept: bool) -> (Arc<Node>, RendezvousClient) {
    let socket = qpunch::socket::bind(SocketAddr::new(lo(n), 0)).unwrap();
    let config = NodeConfig::new(Identity::generate().unwrap(), b"relay-test/1", accept);
    let node = Arc::new(Node::new(socket, config).unwrap());
    let client = RendezvousClient::connect(&node, rv.addr).await.unwrap();
    (node, client)
}

/// A whole QUIC connection through the real relay, on the path layer: TLS stays end to end.
/// Everything the relay forwards is captured, and a marker the peers exchanged inside the
/// connection is nowhere in it; the relay counted at least what the peers sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_through_the_relay_shows_it_only_ciphertext() {
    use qpunch::path::{PathConfig, PeerPaths};
    use qpunch::wire::{ProbeKey, ProbeKeys};
    let rv = serve(RendezvousConfig::default());
    let (rnode, rclient) = endpoint(&rv, 61, true).await;
    let (snode, sclient) = endpoint(&rv, 62, false).await;
    let receiver = Peer {
        _node: rnode.clone(),
        client: rclient,
    };
    let sender = Peer {
        _node: snode.clone(),
        client: sclient,
    };
    let pair = pair_peers(receiver, sender).await;
    assert!(
        pair.paired.iter().all(|p| p.relay.is_some()),
        "relay granted"
    );
    let (k1, k2): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    let keys = |ours, theirs| ProbeKeys {
        ours: ProbeKey::from_bytes(ours),
        theirs: ProbeKey::from_bytes(theirs),
    };
    let rpaths = PeerPaths::new(rnode.paths(), keys(k1, k2), PathConfig::default());
    let spaths = PeerPaths::new(snode.paths(), keys(k2, k1), PathConfig::default());
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    for (paths, peer) in [(&rpaths, &pair.receiver), (&spaths, &pair.sender)] {
        let link = peer.link();
        let inbound = paths.add_relay(Arc::new(Captured {
            link: link.clone(),
            log: log.clone(),
        }));
        paths.hold(tokio::spawn(async move {
            while let Some(datagram) = link.recv().await {
                inbound.deliver(datagram);
            }
        }));
    }
    let relayed = spaths.first_path(STEP).await.expect("a path");
    assert_eq!(relayed.kind, PathKind::RelayedUdp);
    let (c, s) = tokio::join!(
        snode.connect(spaths.mapped(), Some(rnode.fingerprint())),
        rnode.accept()
    );
    let (c, s) = (c.expect("connect through the relay"), s.unwrap().unwrap());
    s.open_windows(4);
    let marker = b"MARKER-7f3a-only-the-two-peers-can-read-this";
    let mut body = marker.to_vec();
    body.extend(payload(256 << 10, 5));
    let (mut send, _) = c.connection.open_bi().await.unwrap();
    send.write_all(&body).await.unwrap();
    send.finish().unwrap();
    let (_, mut recv) = s.connection.accept_bi().await.unwrap();
    let got = tokio::time::timeout(STEP, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, body, "the bytes arrived through the relay");
    let log = log.lock().unwrap();
    assert!(
        log.len() > body.len(),
        "the relay carried the connection ({} bytes)",
        log.len()
    );
    assert!(
        !log.windows(marker.len()).any(|w| w == marker),
        "the relay saw the plaintext marker"
    );
    let stats = rv.rendezvous.stats();
    assert!(stats.relayed_bytes >= body.len() as u64, "{stats:?}");
}

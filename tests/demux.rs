//! The shared socket after hand-over: probes are still answered, a live node can punch
//! to new peers, and garbage is dropped and counted, all while QUIC keeps working.

mod common;

use std::time::Duration;

use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::punch::PunchConfig;

const ALPN: &[u8] = b"qpunch-test/1";

fn node(accept: bool) -> Node {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Node::new(
        socket,
        NodeConfig::new(Identity::generate().unwrap(), ALPN, accept),
    )
    .unwrap()
}

fn quick() -> PunchConfig {
    PunchConfig {
        timeout: Duration::from_secs(5),
        ..PunchConfig::default()
    }
}

/// Round-trip a message on a fresh stream, proving the connection still carries data.
async fn echo_once(client: &PeerConnection, server: &PeerConnection, msg: &[u8]) {
    let (mut send, mut recv) = client.connection.open_bi().await.unwrap();
    send.write_all(msg).await.unwrap();
    send.finish().unwrap();
    let (mut s_send, mut s_recv) = server.connection.accept_bi().await.unwrap();
    let got = s_recv.read_to_end(1 << 20).await.unwrap();
    s_send.write_all(&got).await.unwrap();
    s_send.finish().unwrap();
    assert_eq!(recv.read_to_end(1 << 20).await.unwrap(), msg);
}

async fn connected_pair() -> (Node, Node, PeerConnection, PeerConnection) {
    let server = node(true);
    let client = node(false);
    let target = server.local_addr().unwrap();
    let fp = server.fingerprint();
    let (c, s) = tokio::join!(client.connect(target, Some(fp)), server.accept());
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    assert_eq!(s.fingerprint, client.fingerprint());
    (server, client, c, s)
}

#[tokio::test]
async fn probes_are_answered_after_hand_over() {
    let (server, _client, c, s) = connected_pair().await;
    let target = server.local_addr().unwrap();

    // A late prober on a raw socket still gets its reply from the QUIC socket.
    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let punched = qpunch::driver::punch(&raw, vec![target], quick())
        .await
        .unwrap();
    assert_eq!(punched.peer, target);
    assert_eq!(punched.reflexive, Some(raw.local_addr().unwrap()));
    assert_eq!(punched.method, qpunch::punch::Method::Probe);
    assert!(server.socket_stats().probes_answered >= 1);

    echo_once(&c, &s, b"still flowing").await;
}

#[tokio::test]
async fn live_nodes_punch_each_other_then_connect() {
    // Both sockets are already QUIC endpoints: punching goes through the demultiplexer.
    let a = node(true);
    let b = node(true);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let (from_a, from_b) = tokio::join!(
        a.punch(vec![b_addr], quick()),
        b.punch(vec![a_addr], quick())
    );
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    assert_eq!(from_a.peer, b_addr);
    assert_eq!(from_a.reflexive, Some(a_addr));
    assert_eq!(from_b.peer, a_addr);
    assert_eq!(
        a.local_addr().unwrap(),
        a_addr,
        "punching must not move the port"
    );

    let (c, s) = tokio::join!(a.connect(b_addr, Some(b.fingerprint())), b.accept());
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    assert_eq!(c.fingerprint, b.fingerprint());
    assert_eq!(s.fingerprint, a.fingerprint());
    echo_once(&c, &s, b"hello from a punched pair").await;
}

#[tokio::test]
async fn garbage_is_dropped_and_counted_without_hurting_quic() {
    let (server, _client, c, s) = connected_pair().await;
    let target = server.local_addr().unwrap();
    let before = server.socket_stats().malformed_dropped;

    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bad: [&[u8]; 5] = [
        b"",
        &[0x01],
        b"\x01qpch\x01short",
        b"\x02qpch\x09aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        &[0x03; 300],
    ];
    for datagram in bad {
        raw.send_to(datagram, target).await.unwrap();
    }
    // Datagrams are processed when the endpoint reads; a stream round trip forces that.
    echo_once(&c, &s, b"after garbage").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.socket_stats().malformed_dropped < before + bad.len() as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "garbage not counted: {:?}",
            server.socket_stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.socket_stats().probes_answered, 0);
}

#[tokio::test]
async fn wrong_pin_aborts_the_handshake() {
    let server = node(true);
    let client = node(false);
    let target = server.local_addr().unwrap();
    let impostor = Identity::generate().unwrap().fingerprint();
    let accept = tokio::spawn(async move {
        let r = server.accept().await;
        (r.map(|r| r.is_ok()), server)
    });
    match client.connect(target, Some(impostor)).await {
        Err(qpunch::node::NodeError::PeerMismatch { expected, actual }) => {
            assert_eq!(expected, impostor);
            assert_ne!(actual, impostor);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let (accepted, _server) = tokio::time::timeout(Duration::from_secs(5), accept)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        accepted,
        Some(false),
        "server must not complete a handshake with a refused client"
    );
}

/// quinn hands the socket up to 10 packets per GSO transmit, which at our largest packet
/// size (`node::MAX_UDP_PAYLOAD`) is more than one `sendmsg` may carry: the kernel would
/// drop it whole. The socket must split it, so every packet arrives.
#[tokio::test]
async fn oversized_gso_batches_arrive_whole() {
    use quinn::AsyncUdpSocket;
    let segment = usize::from(qpunch::node::MAX_UDP_PAYLOAD);
    let count = 10;
    let sink = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let socket = qpunch::socket::DemuxSocket::new(
        qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
    )
    .unwrap();
    if socket.max_transmit_segments() < 2 {
        // Loud, or a failure under CI (`.ci/run` sets CI=1): never an invisible pass.
        common::sys::skip(
            "oversized_gso_batches_arrive_whole",
            "no UDP GSO on this kernel, quinn never batches",
        );
        return;
    }
    let mut contents = Vec::with_capacity(segment * count);
    for i in 0..count {
        // QUIC's fixed bit set, so the receiving side of a DemuxSocket would keep it too.
        contents.extend(std::iter::repeat_n(0x40 | i as u8, segment));
    }
    assert!(contents.len() > 65_507, "the batch must exceed one sendmsg");
    let transmit = quinn::udp::Transmit {
        destination: sink.local_addr().unwrap(),
        ecn: None,
        contents: &contents,
        segment_size: Some(segment),
        src_ip: None,
    };
    let mut writable = socket.clone().create_io_poller();
    loop {
        match socket.try_send(&transmit) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                    .await
                    .unwrap();
            }
            other => break other.unwrap(),
        }
    }
    let mut buf = vec![0; 1 << 16];
    for i in 0..count {
        let n = sink
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {count} lost: {e}"));
        assert_eq!(n, segment, "datagram {i}");
        assert!(
            buf[..n].iter().all(|&b| b == 0x40 | i as u8),
            "datagram {i}"
        );
    }
}

/// On loopback, path MTU discovery takes packets past Ethernet's size (up to our bound):
/// the configuration reaches both the endpoint and the connections.
#[tokio::test]
async fn loopback_connections_discover_large_packets() {
    let (_server, _client, c, s) = connected_pair().await;
    s.open_windows(4);
    echo_once(&c, &s, &vec![7u8; 1 << 20]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mtu = c.connection.stats().path.current_mtu;
        assert!(mtu <= qpunch::node::MAX_UDP_PAYLOAD, "{mtu}");
        if mtu > 1452 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "MTU still {mtu} after 5 s"
        );
        echo_once(&c, &s, b"more").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A meeting's authenticated probe can be seen on the way and replayed from anywhere: it
/// is still answered (never more bytes than the probe), but only its first source is told
/// to the path layer (which would tie that address to the peer). Forged authenticated
/// replies reach nobody, and a source in 240.0.0.0/4 (where mapped addresses live) is
/// dropped as forged.
#[tokio::test]
async fn replayed_probes_tie_nothing_and_forged_replies_reach_nobody() {
    use qpunch::wire::{self, ProbeKey, ProbeKeys};
    use std::sync::{Arc, Mutex};
    let node = node(true);
    let target = node.local_addr().unwrap();
    let (k1, k2): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    let keys = ProbeKeys {
        ours: ProbeKey::from_bytes(k1),
        theirs: ProbeKey::from_bytes(k2),
    };
    let heard = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let heard = heard.clone();
        Arc::new(move |from| heard.lock().unwrap().push(from))
    };
    let _auth = node.socket().authenticate_with(keys, hook);
    let mut replies = node.socket().subscribe();
    let probe = wire::authenticated_probe(rand::random(), target, &ProbeKey::from_bytes(k2));
    let first = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let replayer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 512];
    for socket in [&first, &replayer, &first] {
        socket.send_to(&probe, target).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
            .await
            .expect("every verified probe is answered")
            .unwrap();
        assert!(n <= probe.len());
    }
    assert_eq!(
        *heard.lock().unwrap(),
        vec![first.local_addr().unwrap(); 2],
        "the replay's source was never told"
    );
    let before = node.socket_stats().malformed_dropped;
    let mut forged = probe.clone();
    forged[0] = 0x12; // an authenticated reply's type, with a tag that does not verify
    first.send_to(&forged, target).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(replies.try_recv().is_err(), "a forged reply was routed");
    assert_eq!(node.socket_stats().malformed_dropped, before + 1);
}

//! qpunch and the seed's Go demo, both ways, over real UDP on loopback.
//!
//! The Go demo's client sends exactly "ただいま~" (13 bytes) and its server answers exactly
//! "お帰り~" (10 bytes) to the source of any datagram. First those exact bytes are replayed
//! by hand against `qpunch receive` and against library nodes; then (where `go` is on
//! PATH) the original program itself, built from `tests/seed/main.go`, meets qpunch.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::punch::{Method, PunchConfig, Punched};
use qpunch::wire::{LEGACY_PROBE, LEGACY_REPLY};
use serde_json::Value;

const ALPN: &[u8] = b"qpunch-test/1";

fn punch_config(timeout: Duration) -> PunchConfig {
    PunchConfig {
        timeout,
        ..PunchConfig::default()
    }
}

/// A std UDP socket on loopback, connected to `peer` (so it only hears from `peer`).
fn raw_client(peer: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

/// Receive one datagram (panics after the socket's read timeout).
fn recv(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).expect("an answer within 5 s");
    buf[..n].to_vec()
}

fn assert_legacy(punched: &Punched, peer: SocketAddr) {
    assert_eq!(punched.method, Method::Legacy, "{punched:?}");
    assert_eq!(punched.peer, peer, "{punched:?}");
    assert_eq!(punched.reflexive, None, "{punched:?}");
}

/// The Go server's behaviour, replayed: answer every datagram with `answer`, from the
/// probed socket itself or, if `from_another_socket`, from another port. Returns the
/// address to probe.
async fn fake_go_server(answer: &'static [u8], from_another_socket: bool) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf).await {
            let out = if from_another_socket { &other } else { &socket };
            let _ = out.send_to(answer, from).await;
        }
    });
    addr
}

/// `qpunch receive` answers the Go client's exact probe with the exact reply, every
/// time, from the port it was sent to; ignores near misses and unasked replies; counts
/// what it answered; and still serves a real sender on the same socket afterwards.
#[test]
fn receive_answers_the_go_demos_probe() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("after-legacy.bin");
    random_file(&file, 10_000, 7);
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let target: SocketAddr = receiver.addr().parse().unwrap();

    let go_client = raw_client(target);
    let mut near_miss = LEGACY_PROBE.to_vec();
    *near_miss.last_mut().unwrap() = b'!';
    for _ in 0..3 {
        // Datagrams are handled in order: had the near miss (off to QUIC, which drops
        // it) or the unasked reply (routed to punchers, of which there are none) been
        // answered, that answer would arrive first.
        go_client.send(&near_miss).unwrap();
        go_client.send(LEGACY_REPLY).unwrap();
        go_client.send(LEGACY_PROBE).unwrap();
        assert_eq!(recv(&go_client), LEGACY_REPLY);
    }

    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();
    let punched = sender.one("punched");
    assert_eq!(punched["method"], "direct", "{punched}");
    assert!(punched["reflexive_addr"].is_string(), "{punched}");
    assert_eq!(received.all("received").len(), 1, "{received:#?}");
    let stats = received.one("stats");
    assert_eq!(stats["legacy_answered"], 3, "{stats}");
    assert!(stats["probes_answered"].as_u64().unwrap() >= 1, "{stats}");
}

/// A live node (its socket handed to QUIC) answers the Go client's probe and counts it,
/// and a punch from it accepts the Go server's plain reply from the probed address, with
/// QUIC between two nodes still working on the same sockets.
#[tokio::test]
async fn library_nodes_speak_with_the_go_demo() {
    let node = |accept| {
        let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Node::new(
            socket,
            NodeConfig::new(Identity::generate().unwrap(), ALPN, accept),
        )
        .unwrap()
    };
    let (server, client) = (node(true), node(false));
    let target = server.local_addr().unwrap();

    let go_client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    go_client.connect(target).await.unwrap();
    go_client.send(LEGACY_PROBE).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), go_client.recv(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    assert_eq!(&buf[..n], LEGACY_REPLY);
    let stats = server.socket_stats();
    assert_eq!((stats.legacy_answered, stats.probes_answered), (1, 0));

    // The client node punches a Go server through its live (demultiplexed) socket.
    let go_server = fake_go_server(LEGACY_REPLY, false).await;
    let punched = client
        .punch(vec![go_server], punch_config(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_legacy(&punched, go_server);
    assert!(client.socket_stats().replies_routed >= 1);

    // Nothing above disturbed QUIC on either socket.
    let (c, s) = tokio::join!(
        client.connect(target, Some(server.fingerprint())),
        server.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    let (mut send, mut recv) = c.connection.open_bi().await.unwrap();
    send.write_all(b"after the Go demo").await.unwrap();
    send.finish().unwrap();
    let (mut s_send, mut s_recv) = s.connection.accept_bi().await.unwrap();
    let got = s_recv.read_to_end(1 << 10).await.unwrap();
    s_send.write_all(&got).await.unwrap();
    s_send.finish().unwrap();
    assert_eq!(
        recv.read_to_end(1 << 10).await.unwrap(),
        b"after the Go demo"
    );
}

/// Before hand-over (a raw socket, as the sender uses): the plain reply from the probed
/// address proves the path; from another address, or with other 10 bytes, it does not.
#[tokio::test]
async fn raw_punch_accepts_only_the_exact_reply_from_the_probed_address() {
    let good = fake_go_server(LEGACY_REPLY, false).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let punched = qpunch::driver::punch(&socket, vec![good], punch_config(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_legacy(&punched, good);

    // Both must fail; one second of punching each, run side by side.
    let elsewhere = fake_go_server(LEGACY_REPLY, true).await;
    let not_greeting = fake_go_server("お帰り!".as_bytes(), false).await;
    assert_eq!("お帰り!".len(), LEGACY_REPLY.len());
    let (a, b) = (
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let second = punch_config(Duration::from_secs(1));
    let (from_elsewhere, wrong_bytes) = tokio::join!(
        qpunch::driver::punch(&a, vec![elsewhere], second),
        qpunch::driver::punch(&b, vec![not_greeting], second),
    );
    for result in [from_elsewhere, wrong_bytes] {
        assert!(
            matches!(result, Err(qpunch::driver::DriveError::Punch(_))),
            "{result:?}"
        );
    }
}

/// A free UDP port on 0.0.0.0 right now (for the Go server, which cannot report one).
fn free_udp_port() -> u16 {
    UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The original Go program against qpunch, both ways:
/// - the Go client against `qpunch receive` prints its "Success: NAT traversed! ^-^";
/// - `qpunch::driver::punch` against the Go server succeeds with [`Method::Legacy`];
/// - `qpunch send` against the Go server punches, then fails with a clear message.
#[test]
fn seed_go_program_works_with_qpunch_both_ways() {
    const TEST: &str = "seed_go_program_works_with_qpunch_both_ways";
    let Some(go) = seed::build(TEST) else {
        return;
    };

    // Go client -> qpunch receive.
    let (rhome, out) = (Home::new(), tempdir());
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let port = receiver.port.to_string();
    let (status, printed) = go
        .spawn(&["-port", &port, "127.0.0.1"])
        .wait_exit(Duration::from_secs(10));
    assert!(status.success(), "Go client: {status}\n{printed}");
    for line in [
        "\tSent: ただいま~\n",
        &format!("Received a UDP packet back from 127.0.0.1:{port}\n"),
        "\tResponse: お帰り~\n",
        "Success: NAT traversed! ^-^\n",
    ] {
        assert!(
            printed.contains(line),
            "Go client lacks {line:?}:\n{printed}"
        );
    }
    // Ctrl-C: the receiver stops and reports its counters.
    // SAFETY: kill(2) on the pid of our own child, which is still running (it was not
    // waited for), so the pid cannot have been reused.
    let rc = unsafe { libc::kill(receiver.proc.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0, "kill -INT: {}", std::io::Error::last_os_error());
    let stopped = receiver.proc.finish(SHORT);
    stopped.assert_success();
    let stats = stopped.one("stats");
    assert_eq!(stats["legacy_answered"], 1, "{stats}");
    assert_eq!(stats["probes_answered"], 0, "{stats}");

    // qpunch punch (library) -> Go server.
    let mut server = None;
    for _ in 0..3 {
        // The port may be taken between our check and the Go bind: try another.
        let port = free_udp_port();
        let mut proc = go.spawn(&["-port", &port.to_string()]);
        let listening = format!("Listening on :{port}\n---\n");
        let outcomes = [listening.as_str(), "Unable to listen"];
        if proc.wait_for_any(&outcomes, Duration::from_secs(10)) == 0 {
            server = Some((proc, port));
            break;
        }
    }
    let (mut go_server, port) = server.expect("the Go server could not bind a port");
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (punched, us) = runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let punched =
            qpunch::driver::punch(&socket, vec![target], punch_config(Duration::from_secs(5)))
                .await
                .expect("punch to the Go server");
        (punched, socket.local_addr().unwrap())
    });
    assert_legacy(&punched, target);
    go_server.wait_for(&format!("Sent reply to {us}\n\tReply: お帰り~\n"), SHORT);
    assert!(
        go_server
            .output()
            .contains(&format!("Received a packet from: {us}\n")),
        "{}",
        go_server.output()
    );

    // qpunch send -> Go server: the path opens, but nobody there speaks QUIC.
    let (shome, src) = (Home::new(), tempdir());
    let file = src.path().join("nobody.txt");
    random_file(&file, 100, 8);
    let sender = send(shome.path(), &[&file], port, &[], SHORT);
    sender.assert_failure();
    let punched: &Value = sender.one("punched");
    assert_eq!(punched["method"], "legacy", "{punched}");
    assert_eq!(punched["peer"], target.to_string(), "{punched}");
    assert!(punched["reflexive_addr"].is_null(), "{punched}");
    assert!(sender.all("connected").is_empty(), "{sender:#?}");
    let message = sender.messages();
    assert!(
        message.contains("answered like the Go hole-punching demo")
            && message.contains("does not speak QUIC/qpunch"),
        "{message}"
    );
}

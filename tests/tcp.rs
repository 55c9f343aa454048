//! The rendezvous over TLS on TCP (`src/tcp.rs`): real TCP, real TLS, real QUIC carried
//! inside, on loopback. A client told to use TCP only stands for one whose network blocks
//! UDP (the NAT lab has the real thing: `tests/meet_lab.rs`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::rendezvous::{
    self, ConnectOptions, PAKE_MSG_LEN, Rendezvous, RendezvousClient, RendezvousConfig, TcpMode,
    Transport,
};
use tokio::io::AsyncWriteExt;

use common::rendezvous::{Served as Rv, serve};

fn node() -> Arc<Node> {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Arc::new(
        Node::new(
            socket,
            NodeConfig::new(Identity::generate().unwrap(), qpunch::transfer::ALPN, false),
        )
        .unwrap(),
    )
}

fn tcp_only(rv: &Rv) -> ConnectOptions {
    ConnectOptions {
        tcp: TcpMode::Only,
        tcp_port: Some(rv.tcp().port()),
    }
}

/// Wait until `f` holds, for at most `limit`.
async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A raw TLS client of the TCP port: what a hostile or broken client can do.
async fn raw_tls(
    tcp: SocketAddr,
    recv_buffer: Option<u32>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(tcp).await.unwrap();
    let config = qpunch::tls::stream_client_config(&[qpunch::tcp::ALPN.to_vec()]).unwrap();
    let name = rustls::pki_types::ServerName::try_from("qpunch").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .unwrap()
}

/// Over TCP, the rendezvous tells the client its real TCP source address (not the mapped
/// one quinn sees), and a receiver over TCP pairs with a sender over UDP.
#[tokio::test]
async fn a_tcp_client_is_seen_at_its_tcp_address_and_pairs_with_a_udp_client() {
    let rv = serve(RendezvousConfig::default());
    assert_eq!(
        rv.tcp().port(),
        rv.addr.port(),
        "same port number by default"
    );
    let (a, b) = (node(), node());
    let over_tcp = RendezvousClient::connect_with(&a, rv.addr, tcp_only(&rv))
        .await
        .expect("connect over TCP");
    assert_eq!(over_tcp.transport(), Transport::Tcp);
    let tcp_local = over_tcp.tcp_local_addr().unwrap();
    let welcome = over_tcp.info().await.unwrap();
    assert_eq!(welcome.observed, tcp_local, "the real TCP source address");
    assert_ne!(welcome.observed.port(), a.local_addr().unwrap().port());
    assert_eq!(rv.rendezvous.tcp_stats().linked, 1);

    let over_udp = RendezvousClient::connect(&b, rv.addr).await.unwrap();
    assert_eq!(over_udp.transport(), Transport::Udp);
    let (mut receiver, opened) = over_tcp
        .open(None, Duration::from_secs(60))
        .await
        .expect("open over TCP");
    assert_eq!(opened.observed, tcp_local);
    receiver.pake(&[7; PAKE_MSG_LEN]).await.unwrap();
    let (mut sender, paired) = over_udp
        .join(&opened.nameplate, &[9; PAKE_MSG_LEN])
        .await
        .expect("join over UDP");
    assert_eq!(paired.pake, vec![7; PAKE_MSG_LEN]);
    assert_eq!(paired.observed, b.local_addr().unwrap());
    let seen = receiver.paired().await.expect("paired over TCP");
    assert_eq!(seen.pake, vec![9; PAKE_MSG_LEN]);
    // Sealed hellos pass both ways through the TCP side too.
    sender.seal(b"from udp").await.unwrap();
    assert_eq!(receiver.sealed().await.unwrap().unwrap(), b"from udp");
    // The exchange keeps the TCP link up after the client that opened it is gone.
    drop(over_tcp);
    receiver.seal(b"from tcp").await.unwrap();
    let sealed = tokio::time::timeout(Duration::from_secs(5), sender.sealed()).await;
    assert_eq!(sealed.expect("in time").unwrap().unwrap(), b"from tcp");
    assert_eq!(rv.rendezvous.stats().paired, 1);
}

/// `Auto` uses UDP when it answers, and TCP when UDP does not (here: a rendezvous with no
/// UDP listener behind the port the client tries, but TCP on its port).
#[tokio::test]
async fn auto_falls_back_to_tcp_when_udp_does_not_answer() {
    let rv = serve(RendezvousConfig::default());
    let a = node();
    let udp = RendezvousClient::connect(&a, rv.addr).await.unwrap();
    assert_eq!(udp.transport(), Transport::Udp);
    // A UDP port where nobody answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nowhere = silent.local_addr().unwrap();
    let started = Instant::now();
    let client = RendezvousClient::connect_with(
        &node(),
        nowhere,
        ConnectOptions {
            tcp: TcpMode::Auto,
            tcp_port: Some(rv.tcp().port()),
        },
    )
    .await
    .expect("fell back to TCP");
    let took = started.elapsed();
    assert_eq!(client.transport(), Transport::Tcp);
    assert!(
        took >= rendezvous::UDP_HEAD_START && took < Duration::from_secs(4),
        "{took:?}"
    );
    client.info().await.unwrap();
}

/// A TCP client that never reads, while the rendezvous writes to it, is dropped within the
/// write timeout (5 s), and what the rendezvous queues for it meanwhile stays bounded
/// (datagrams beyond the queue are dropped, not kept).
#[tokio::test]
async fn a_tcp_client_that_never_reads_is_dropped() {
    let rv = serve(RendezvousConfig::default());
    let timeout = qpunch::tcp::LinkConfig::default().write_timeout;
    let mut silent = raw_tls(rv.tcp(), Some(4096)).await;
    assert!(
        until(Duration::from_secs(2), || rv.rendezvous.tcp_stats().linked
            == 1)
        .await
    );
    // The rendezvous's side writes to the client's mapped address (the first one mapped
    // on its node), as its QUIC endpoint would answer.
    let paths = rv.node.paths().clone();
    let mapped: SocketAddr = "240.0.0.1:1".parse().unwrap();
    assert_eq!(
        paths.real_addr(mapped),
        silent.get_ref().0.local_addr().unwrap()
    );
    let packet = [0xc0u8; 1200];
    let started = Instant::now();
    let mut dropped = false;
    // Sampled 2 s in, long before the write timeout: the link is up, its writes stalled.
    let mut refused_while_linked = None;
    while started.elapsed() < timeout + Duration::from_secs(5) {
        if refused_while_linked.is_none() && started.elapsed() >= Duration::from_secs(2) {
            let refused = paths.stats().dropped_out;
            assert_eq!(rv.rendezvous.tcp_stats().live, 1, "still linked at 2 s");
            refused_while_linked = Some(refused);
        }
        for _ in 0..64 {
            let transmit = quinn::udp::Transmit {
                destination: mapped,
                ecn: None,
                contents: &packet,
                segment_size: None,
                src_ip: None,
            };
            quinn::AsyncUdpSocket::try_send(&*paths, &transmit).unwrap();
        }
        if rv.rendezvous.tcp_stats().live == 0 {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let stats = rv.rendezvous.tcp_stats();
    assert!(dropped, "still connected after {took:?}: {stats:?}");
    assert_eq!(stats.slow_readers, 1, "{stats:?}");
    assert!(
        took < timeout + Duration::from_secs(3),
        "dropped after {took:?}"
    );
    // Megabytes were offered in those 2 s; the queue took 64 KiB of them.
    let refused = refused_while_linked.unwrap();
    assert!(
        refused > 1_000,
        "the queue refused what did not fit: {refused}"
    );
    // The route went with the client.
    assert_eq!(paths.real_addr(mapped), mapped);
    let _ = silent.shutdown().await;
}

/// One source gets at most `max_per_source` TCP clients; the next is refused, and a freed
/// slot is reusable.
#[tokio::test]
async fn the_per_source_tcp_budget_refuses_the_next_client() {
    let mut config = RendezvousConfig::default();
    config.tcp_limits.max_per_source = 2;
    let rv = serve(config);
    let a = node();
    let first = qpunch::tcp::connect(a.paths(), rv.tcp(), Duration::from_secs(5))
        .await
        .unwrap();
    let _second = qpunch::tcp::connect(a.paths(), rv.tcp(), Duration::from_secs(5))
        .await
        .unwrap();
    let third = qpunch::tcp::connect(a.paths(), rv.tcp(), Duration::from_secs(5)).await;
    assert!(third.is_err(), "the third is refused");
    assert_eq!(rv.rendezvous.tcp_stats().refused, 1);
    drop(first);
    assert!(
        until(Duration::from_secs(3), || rv.rendezvous.tcp_stats().live
            == 1)
        .await
    );
    qpunch::tcp::connect(a.paths(), rv.tcp(), Duration::from_secs(5))
        .await
        .expect("a freed slot is reusable");
}

/// An oversized frame, an empty one or one that is not QUIC closes that client's link, and
/// only that one: a client over TCP beside it goes on.
#[tokio::test]
async fn bad_frames_close_only_their_link() {
    let rv = serve(RendezvousConfig::default());
    let good = RendezvousClient::connect_with(&node(), rv.addr, tcp_only(&rv))
        .await
        .unwrap();
    good.info().await.unwrap();
    let frames: [&[u8]; 3] = [
        &[0xff, 0xff],                // 64 KiB: over MAX_FRAME
        &[0x00, 0x00],                // empty
        &[0x00, 0x05, 0, 1, 2, 3, 4], // not QUIC (no fixed bit)
    ];
    for (i, frame) in frames.iter().enumerate() {
        let mut bad = raw_tls(rv.tcp(), None).await;
        bad.write_all(frame).await.unwrap();
        bad.flush().await.unwrap();
        let closed = until(Duration::from_secs(3), || {
            rv.rendezvous.tcp_stats().bad_frames == i as u64 + 1
        })
        .await;
        assert!(closed, "frame {i}: {:?}", rv.rendezvous.tcp_stats());
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::io::AsyncReadExt::read_to_end(&mut bad, &mut rest),
        )
        .await;
        assert!(read.is_ok(), "frame {i}: the stream was closed");
    }
    good.info().await.expect("the good client is unaffected");
    assert_eq!(rv.rendezvous.tcp_stats().live, 1);
}

/// `--no-tcp` and a chosen port.
#[tokio::test]
async fn tcp_can_be_off_or_on_another_port() {
    let off = serve_or_none(RendezvousConfig {
        tcp: rendezvous::TcpPort::Off,
        ..RendezvousConfig::default()
    });
    assert!(off.is_none());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rv = serve(RendezvousConfig {
        tcp: rendezvous::TcpPort::Port(port),
        ..RendezvousConfig::default()
    });
    assert_eq!(rv.tcp().port(), port);
    let client = RendezvousClient::connect_with(&node(), rv.addr, tcp_only(&rv))
        .await
        .unwrap();
    client.info().await.unwrap();
}

fn serve_or_none(config: RendezvousConfig) -> Option<SocketAddr> {
    let bound = Rendezvous::bind(
        "127.0.0.1:0".parse().unwrap(),
        Identity::generate().unwrap(),
        config,
        Arc::new(rendezvous::NoEvents),
    )
    .unwrap();
    bound.rendezvous.tcp_addr()
}

/// `qpunch rendezvous --port P --json` on 127.0.0.1, with its TCP port.
fn rendezvous_proc(home: &common::Home, extra: &[&str]) -> (common::Proc, u16, Option<u16>) {
    let port = common::free_port_pair();
    let mut args = vec!["rendezvous", "--bind", "127.0.0.1", "--json"];
    let port_s = port.to_string();
    args.extend(["--port", &port_s]);
    args.extend(extra);
    let mut proc = common::Proc::spawn("rendezvous", home.path(), &args);
    let event = proc.wait_event("rendezvous", common::SHORT);
    let tcp = event["tcp_port"].as_u64().map(|p| p as u16);
    (proc, port, tcp)
}

/// `qpunch nat-check --rendezvous-tcp only` reaches the rendezvous over TCP, says so, and
/// reports that UDP does not get through (exit status 1, as with UDP blocked);
/// `qpunch rendezvous --no-tcp` has no TCP port, and `--tcp-port` picks it.
#[test]
fn the_cli_reaches_the_rendezvous_over_tcp() {
    let home = common::Home::new();
    let (_rv, port, tcp) = rendezvous_proc(&home, &[]);
    assert_eq!(tcp, Some(port), "the UDP port's number by default");
    let via = format!("127.0.0.1:{port}");
    let check = common::Proc::spawn(
        "nat-check",
        common::Home::new().path(),
        &[
            "nat-check",
            "--via",
            &via,
            "--rendezvous-tcp",
            "only",
            "--json",
        ],
    )
    .finish(common::SHORT);
    assert!(!check.status.success(), "{}", check.messages());
    let nat = check.one("nat");
    assert_eq!(nat["udp"], false, "{nat}");
    let over = check.one("rendezvous_over_tcp");
    assert_eq!(over["tcp_port"], port, "{over}");
    // A rendezvous on this machine: no router is asked to map anything.
    assert!(check.all("port_mapping").is_empty(), "{}", check.messages());

    let other = common::Home::new();
    let (_off, _, none) = rendezvous_proc(&other, &["--no-tcp"]);
    assert_eq!(none, None);
    let chosen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let third = common::Home::new();
    let (_chosen, _, tcp) = rendezvous_proc(&third, &["--tcp-port", &chosen.to_string()]);
    assert_eq!(tcp, Some(chosen));
}

/// What idle TCP clients cost `qpunch rendezvous` (its resident memory before and after
/// 512 clients that completed the TLS handshake and wait). A measurement, not a check:
/// `cargo test --release --test tcp -- --ignored --nocapture memory`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement"]
async fn memory_of_idle_tcp_clients() {
    const CLIENTS: usize = 512;
    let home = common::Home::new();
    let (rv, _, tcp) = rendezvous_proc(&home, &[]);
    let tcp = SocketAddr::from(([127, 0, 0, 1], tcp.unwrap()));
    let rss = || common::sys::status_field(rv.id(), "VmRSS").unwrap();
    // Warm up (TLS tables, the first task), then measure from there.
    let warm = raw_tls_from(tcp, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        // 16 clients per source address (the per-source budget): 127.0.0.2, .3, ...
        clients.push(raw_tls_from(tcp, 2 + (i / 16) as u8).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss();
    let per = (after - before) as f64 / CLIENTS as f64;
    eprintln!(
        "memory_of_idle_tcp_clients: {CLIENTS} clients: VmRSS {before} kB -> {after} kB, \
         {per:.1} KiB per client"
    );
    drop((warm, clients));
}

async fn raw_tls_from(
    tcp: SocketAddr,
    last_octet: u8,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from(([127, 0, 0, last_octet], 0)))
        .unwrap();
    let stream = socket.connect(tcp).await.unwrap();
    let config = qpunch::tls::stream_client_config(&[qpunch::tcp::ALPN.to_vec()]).unwrap();
    let name = rustls::pki_types::ServerName::try_from("qpunch").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .unwrap()
}

/// The QUIC connection budgets (32 per address) count a TCP client at its real address:
/// with 32 connections over UDP from one address, a 33rd over TCP from it is refused too.
#[tokio::test]
async fn quic_budgets_count_tcp_clients_at_their_real_address() {
    let rv = serve(RendezvousConfig::default());
    let ip = std::net::IpAddr::from([127, 0, 0, 9]);
    let node_on = || {
        let socket = qpunch::socket::bind(SocketAddr::new(ip, 0)).unwrap();
        Arc::new(
            Node::new(
                socket,
                NodeConfig::new(Identity::generate().unwrap(), qpunch::transfer::ALPN, false),
            )
            .unwrap(),
        )
    };
    let mut held = Vec::new();
    for _ in 0..32 {
        let node = node_on();
        let options = ConnectOptions {
            tcp: TcpMode::Never,
            tcp_port: None,
        };
        let client = RendezvousClient::connect_with(&node, rv.addr, options)
            .await
            .unwrap();
        held.push((node, client));
    }
    let extra = node_on();
    let refused = RendezvousClient::connect_with(&extra, rv.addr, tcp_only(&rv)).await;
    assert!(refused.is_err(), "a 33rd connection from {ip} over TCP");
    assert_eq!(
        rv.rendezvous.tcp_stats().linked,
        1,
        "it did reach the TCP port"
    );
    // `Auto` takes UDP's refusal as the answer: UDP works, TCP is no way around a budget.
    let refused = RendezvousClient::connect(&extra, rv.addr).await;
    assert!(refused.is_err(), "a 33rd connection from {ip}, auto");
    assert_eq!(rv.rendezvous.tcp_stats().linked, 1, "TCP was not tried");
    // Another address is not affected.
    RendezvousClient::connect_with(&node(), rv.addr, tcp_only(&rv))
        .await
        .expect("another address over TCP");
}

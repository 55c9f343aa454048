//! Self-tests of the NAT lab (`nat_lab/topology.rs`): each NAT mode maps and filters as
//! documented, IPv6 needs both sides to punch, LAN clients talk directly, and the link
//! impairments (delay element, tbf rate, loss) do what they say. Other tests rely on
//! these behaviours, so they are checked here with plain sockets, no qpunch.
//!
//! Needs root, iproute2, nftables and /dev/net/tun; without root each test prints a loud
//! SKIPPED message and passes, unless `CI` is set: then it fails.

#[path = "nat_lab/lab.rs"]
mod lab;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::{Nat, PUBLIC_V4, PUBLIC_V4_ALT, Rate, SiteSpec, Topology};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The next datagram within `timeout`: source and payload.
fn recv(socket: &UdpSocket, timeout: Duration) -> Option<(SocketAddr, String)> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => Some((from, String::from_utf8_lossy(&buf[..n]).into_owned())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// Every payload that arrives until `marker` did (panics if it does not within 5 s),
/// plus whatever arrives in a short grace period after it.
fn payloads_until(socket: &UdpSocket, marker: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while !got.iter().any(|p| p == marker) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{marker:?} never arrived; got {got:?}");
        if let Some((_, payload)) = recv(socket, left) {
            got.push(payload);
        }
    }
    while let Some((_, payload)) = recv(socket, Duration::from_millis(200)) {
        got.push(payload);
    }
    got.sort();
    got
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Mapping behaviour: one client socket sends to 198.51.100.10:7001, .10:7002 and
/// .11:7001; the servers report the source they see. Open and Cone keep one mapping
/// (the local port), Symmetric makes one per destination. IPv6 is not translated.
#[test]
fn nat_modes_map_as_specified() {
    const TEST: &str = "nat_modes_map_as_specified";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new(
        "map",
        &[
            SiteSpec::new(Nat::Open),
            SiteSpec::new(Nat::Cone),
            SiteSpec::new(Nat::Symmetric),
        ],
    );
    let public = topo.public();
    let servers = [
        public.udp(sa(PUBLIC_V4, 7001)),
        public.udp(sa(PUBLIC_V4, 7002)),
        public.udp(sa(PUBLIC_V4_ALT, 7001)),
    ];
    let servers6 = [public.udp6(7001), public.udp6(7002)];
    for site in topo.sites() {
        let client = site.client(0);
        let socket = client.udp(sa([0, 0, 0, 0], 0));
        let local = socket.local_addr().unwrap().port();
        let seen: Vec<SocketAddr> = servers
            .iter()
            .map(|server| {
                let to = server.local_addr().unwrap();
                socket.send_to(b"map", to).unwrap();
                recv(server, Duration::from_secs(3))
                    .unwrap_or_else(|| {
                        panic!(
                            "site {} ({:?}): nothing reached {to}",
                            site.letter, site.spec.nat
                        )
                    })
                    .0
            })
            .collect();
        assert!(
            seen.iter().all(|s| s.ip() == IpAddr::from(site.wan_v4)),
            "site {}: not translated to its WAN address: {seen:?}",
            site.letter
        );
        let ports: Vec<u16> = seen.iter().map(SocketAddr::port).collect();
        match site.spec.nat {
            Nat::Open | Nat::Cone => assert_eq!(
                ports, [local; 3],
                "site {} ({:?}): one mapping, keeping the local port",
                site.letter, site.spec.nat
            ),
            Nat::Symmetric => {
                let mut distinct = ports.clone();
                distinct.sort();
                distinct.dedup();
                assert_eq!(
                    distinct.len(),
                    3,
                    "symmetric: one mapping per destination: {ports:?}"
                );
            }
            Nat::UdpBlocked => unreachable!(),
        }

        let socket6 = client.udp6(0);
        let local6 = socket6.local_addr().unwrap();
        for server in &servers6 {
            socket6
                .send_to(b"map6", server.local_addr().unwrap())
                .unwrap();
            let (from, _) = recv(server, Duration::from_secs(3)).expect("IPv6 datagram");
            assert_eq!(
                from, local6,
                "site {}: IPv6 must not be translated",
                site.letter
            );
        }
        eprintln!(
            "{TEST}: {:?} local port {local} seen as {ports:?}",
            site.spec.nat
        );
    }
}

/// Filtering: before the client sent anything, a datagram to its WAN port; after it
/// contacted 198.51.100.10:7001, datagrams from .10:7002 and .11:7001 to its mapping, and
/// the contacted endpoint's reply last (the positive control). Open lets everything in;
/// Cone and Symmetric only the reply. Over IPv6 every site's firewall lets only the reply in.
#[test]
fn inbound_filtering_per_nat_mode() {
    const TEST: &str = "inbound_filtering_per_nat_mode";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new(
        "flt",
        &[
            SiteSpec::new(Nat::Open),
            SiteSpec::new(Nat::Cone),
            SiteSpec::new(Nat::Symmetric),
        ],
    );
    let public = topo.public();
    let (contacted, other_port, other_host) = (
        public.udp(sa(PUBLIC_V4, 7001)),
        public.udp(sa(PUBLIC_V4, 7002)),
        public.udp(sa(PUBLIC_V4_ALT, 7001)),
    );
    let (contacted6, other_port6) = (public.udp6(7001), public.udp6(7002));
    const PORT: u16 = 40000;
    let sites = topo.sites();
    let clients: Vec<UdpSocket> = sites
        .iter()
        .map(|s| s.client(0).udp(sa([0, 0, 0, 0], PORT)))
        .collect();
    let clients6: Vec<UdpSocket> = sites.iter().map(|s| s.client(0).udp6(PORT)).collect();

    for (site, socket6) in sites.iter().zip(&clients6) {
        other_port
            .send_to(b"unsolicited", sa(site.wan_v4, PORT))
            .unwrap();
        other_port6
            .send_to(b"unsolicited", socket6.local_addr().unwrap())
            .unwrap();
    }
    let mut mapped = Vec::new();
    for (socket, socket6) in clients.iter().zip(&clients6) {
        socket
            .send_to(b"hello", contacted.local_addr().unwrap())
            .unwrap();
        mapped.push(recv(&contacted, Duration::from_secs(3)).expect("hello").0);
        socket6
            .send_to(b"hello", contacted6.local_addr().unwrap())
            .unwrap();
        recv(&contacted6, Duration::from_secs(3)).expect("hello over IPv6");
    }
    for (&to, socket6) in mapped.iter().zip(&clients6) {
        other_port.send_to(b"other-port", to).unwrap();
        other_host.send_to(b"other-host", to).unwrap();
        other_port6
            .send_to(b"other-port", socket6.local_addr().unwrap())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    for (&to, socket6) in mapped.iter().zip(&clients6) {
        contacted.send_to(b"reply", to).unwrap();
        contacted6
            .send_to(b"reply", socket6.local_addr().unwrap())
            .unwrap();
    }

    for ((site, socket), socket6) in sites.iter().zip(&clients).zip(&clients6) {
        let got = payloads_until(socket, "reply");
        let expected = match site.spec.nat {
            Nat::Open => sorted(&["unsolicited", "other-port", "other-host", "reply"]),
            _ => sorted(&["reply"]),
        };
        assert_eq!(
            got, expected,
            "site {} ({:?}) IPv4",
            site.letter, site.spec.nat
        );
        let got6 = payloads_until(socket6, "reply");
        assert_eq!(
            got6,
            ["reply"],
            "site {} ({:?}) IPv6 firewall",
            site.letter,
            site.spec.nat
        );
        eprintln!(
            "{TEST}: {:?}: IPv4 let in {got:?}, IPv6 {got6:?}",
            site.spec.nat
        );
    }
}

/// A UdpBlocked site: UDP to the internet is dropped by the router (its counter moves),
/// IPv4 and IPv6, while TCP gets through (NATed over IPv4); and two clients on its LAN
/// reach each other directly over UDP, seeing each other's private addresses.
#[test]
fn udp_blocked_site_and_direct_lan_traffic() {
    const TEST: &str = "udp_blocked_site_and_direct_lan_traffic";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new("blk", &[SiteSpec::new(Nat::UdpBlocked).clients(2)]);
    let (site, public) = (topo.site(0), topo.public());
    let (c0, c1) = (site.client(0), site.client(1));

    let (server, server6) = (public.udp4(7001), public.udp6(7001));
    let (s0, s0_6) = (c0.udp4(0), c0.udp6(0));
    s0.send_to(b"out", server.local_addr().unwrap()).unwrap();
    s0_6.send_to(b"out", server6.local_addr().unwrap()).unwrap();

    for v6 in [false, true] {
        let listener = public.run(|| TcpListener::bind(sa(public.addr(v6), 7100)).unwrap());
        let to = listener.local_addr().unwrap();
        let mut stream = c0
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("TCP (IPv6: {v6}) must pass a UDP-blocking site: {e}"));
        stream.write_all(b"tcp").unwrap();
        let (mut accepted, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 3];
        accepted.read_exact(&mut buf).unwrap();
        let expected: IpAddr = if v6 {
            c0.addr(true)
        } else {
            site.wan_v4.into()
        };
        assert_eq!(peer.ip(), expected, "TCP source (IPv6: {v6})");
    }
    assert_eq!(
        recv(&server, Duration::from_millis(300)),
        None,
        "UDP got out over IPv4"
    );
    assert_eq!(
        recv(&server6, Duration::from_millis(100)),
        None,
        "UDP got out over IPv6"
    );
    for (family, table) in [("ip", "natlab"), ("ip6", "natlab6")] {
        let out = site.router_exec("nft", &["list", "chain", family, table, "forward"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let dropped: u64 = text
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in\n{text}"));
        assert!(
            dropped >= 1,
            "the router's {family} UDP drop counter did not move:\n{text}"
        );
    }

    // The LAN: client 0 to client 1, both families, no NAT on the way.
    let (l1, l1_6) = (c1.udp4(7200), c1.udp6(7200));
    s0.send_to(b"lan", l1.local_addr().unwrap()).unwrap();
    s0_6.send_to(b"lan", l1_6.local_addr().unwrap()).unwrap();
    let (from, _) = recv(&l1, Duration::from_secs(3)).expect("LAN UDP over IPv4");
    assert_eq!(
        from,
        s0.local_addr().unwrap(),
        "LAN traffic must not be NATed"
    );
    let (from6, _) = recv(&l1_6, Duration::from_secs(3)).expect("LAN UDP over IPv6");
    assert_eq!(from6, s0_6.local_addr().unwrap());
    eprintln!(
        "{TEST}: UDP blocked both families, TCP passes, LAN {from} -> {}",
        l1.local_addr().unwrap()
    );
}

/// IPv6 between two sites: no NAT, but two stateful firewalls. A's first datagram to B
/// is dropped by B's firewall (and an unsolicited one from the internet by A's), yet it
/// opens A's; B's answer then gets in and opens B's; A's next datagram gets through.
#[test]
fn ipv6_punching_through_two_firewalls_needs_both_sides() {
    const TEST: &str = "ipv6_punching_through_two_firewalls_needs_both_sides";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new(
        "v6",
        &[SiteSpec::new(Nat::Cone), SiteSpec::new(Nat::Symmetric)],
    );
    let a = topo.site(0).client(0).udp6(50000);
    let b = topo.site(1).client(0).udp6(50001);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());

    topo.public()
        .udp6(0)
        .send_to(b"from-public", a_addr)
        .unwrap();
    a.send_to(b"a1", b_addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    b.send_to(b"b1", a_addr).unwrap();
    let got_a = payloads_until(&a, "b1");
    a.send_to(b"a2", b_addr).unwrap();
    let got_b = payloads_until(&b, "a2");
    assert_eq!(got_a, ["b1"], "A: only B's answer may get in");
    assert_eq!(
        got_b,
        ["a2"],
        "B: A's first datagram must have been dropped"
    );

    b.send_to(b"seen?", a_addr).unwrap();
    let (from, _) = recv(&a, Duration::from_secs(3)).expect("B to A after the punch");
    assert_eq!(from, b_addr, "IPv6 is not translated");
    eprintln!("{TEST}: {a_addr} <-> {b_addr} after both sent");
}

/// A UDP echo server on its own thread; stops when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(socket: UdpSocket) -> Echo {
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `count` sequential round trips to an echo server (after a few to warm up ARP/ND):
/// (minimum, median).
fn rtts(socket: &UdpSocket, to: SocketAddr, count: usize) -> (Duration, Duration) {
    let mut samples = Vec::new();
    for i in 0..count + 3 {
        let payload = format!("ping {i}");
        let start = Instant::now();
        socket.send_to(payload.as_bytes(), to).unwrap();
        loop {
            let (_, got) =
                recv(socket, Duration::from_secs(2)).unwrap_or_else(|| panic!("no echo from {to}"));
            if got == payload {
                break;
            }
        }
        if i >= 3 {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    (samples[0], samples[samples.len() / 2])
}

/// The delay element: 10 ms one way on each site link gives 20 ms RTT to the public
/// host and 40 ms between the two sites (each crossing both links twice). A delay is a
/// lower bound, so the minimum may not be below it; the median must be close to it.
#[test]
fn delay_element_gives_the_configured_rtt() {
    const TEST: &str = "delay_element_gives_the_configured_rtt";
    if !lab::require(TEST, &[]) {
        return;
    }
    let one_way = Duration::from_millis(10);
    let topo = Topology::new(
        "rtt",
        &[
            SiteSpec::new(Nat::Cone).delay(one_way),
            SiteSpec::new(Nat::Open).delay(one_way),
        ],
    );
    let (a, b) = (topo.site(0), topo.site(1));
    let public_echo = Echo::start(topo.public().udp4(7300));
    // B is Open: its client is reachable at B's WAN address.
    let site_echo = Echo::start(b.client(0).udp4(7300));
    let socket = a.client(0).udp4(0);
    let tolerance = Duration::from_millis(10);

    let (min, median) = rtts(&socket, public_echo.addr, 15);
    eprintln!("{TEST}: A <-> public: min {min:.2?}, median {median:.2?} (expected 20 ms)");
    assert!(min >= 2 * one_way, "faster than the delay: {min:?}");
    assert!(
        median <= 2 * one_way + tolerance,
        "A <-> public median {median:?}"
    );

    let (min, median) = rtts(&socket, sa(b.wan_v4, site_echo.addr.port()), 15);
    eprintln!("{TEST}: A <-> B: min {min:.2?}, median {median:.2?} (expected 40 ms)");
    assert!(min >= 4 * one_way, "faster than the delays: {min:?}");
    assert!(
        median <= 4 * one_way + tolerance,
        "A <-> B median {median:?}"
    );

    for site in [a, b] {
        let stats = site.delay_stats().expect("a delay element");
        assert!(
            stats.a_to_b.frames > 0 && stats.b_to_a.frames > 0,
            "{stats:?}"
        );
        assert_eq!(
            stats.a_to_b.overflow + stats.b_to_a.overflow,
            0,
            "{stats:?}"
        );
    }

    // The delay can change at run time.
    a.set_delay(Duration::ZERO);
    b.set_delay(Duration::ZERO);
    let (_, median) = rtts(&socket, sa(b.wan_v4, site_echo.addr.port()), 9);
    assert!(median < 4 * one_way / 2, "delay 0 still slow: {median:?}");
}

/// TCP goodput in bit/s (payload over time, measured at the receiving end) of one
/// connection from `send_host` to a listener on `listen_host` (`upload`) or back
/// (`!upload`), sending for `time`.
fn tcp_goodput(
    send_host: &lab::Host,
    listen_host: &lab::Host,
    listen_on: SocketAddr,
    upload: bool,
    time: Duration,
) -> f64 {
    let listener = listen_host.run(|| TcpListener::bind(listen_on).unwrap());
    let to = listener.local_addr().unwrap();
    let connecting = send_host.run(|| TcpStream::connect(to)).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    // `upload`: the connecting side sends; otherwise the listening side does.
    let (mut tx, mut rx) = if upload {
        (connecting, accepted)
    } else {
        (accepted, connecting)
    };
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
        loop {
            let n = rx.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            let now = Instant::now();
            // Goodput from the end of the first read: the bytes of that read were on
            // the wire before the clock started.
            if first.is_none() {
                first = Some(now);
            } else {
                bytes += n as u64;
            }
            last = now;
        }
        bytes as f64 * 8.0 / (last - first.unwrap()).as_secs_f64()
    });
    let chunk = vec![0x5au8; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < time {
        tx.write_all(&chunk).unwrap();
    }
    drop(tx);
    reader.join().unwrap()
}

/// tbf limits the site link both ways: TCP goodput through a 20 Mbit/s link (with a
/// delay element, as the path benchmark uses it) is a little below 20 Mbit/s (headers),
/// never above.
#[test]
fn rate_limit_caps_goodput_both_ways() {
    const TEST: &str = "rate_limit_caps_goodput_both_ways";
    if !lab::require(TEST, &["tc"]) {
        return;
    }
    let mbit = 20.0;
    let topo = Topology::new(
        "tbf",
        &[SiteSpec::new(Nat::Cone)
            .delay(Duration::from_millis(5))
            .rate(Rate::mbit(mbit))],
    );
    let (client, public) = (topo.site(0).client(0), topo.public());
    let time = Duration::from_millis(1500);
    for upload in [true, false] {
        let goodput = tcp_goodput(client, public, sa(PUBLIC_V4, 0), upload, time) / 1e6;
        eprintln!(
            "{TEST}: {} {goodput:.2} Mbit/s through a {mbit} Mbit/s link",
            if upload { "upload" } else { "download" }
        );
        // 1448 payload bytes per 1514-byte frame: ~95.6 % at best.
        assert!(
            (0.85 * mbit..=mbit).contains(&goodput),
            "{} goodput {goodput:.2} Mbit/s, link {mbit} Mbit/s",
            if upload { "upload" } else { "download" }
        );
    }
}

/// Loss: 20 % each way on the site link drops about a fifth of 1000 datagrams, and the
/// counters account for every one of them.
#[test]
fn loss_drops_the_configured_share_and_counts_it() {
    const TEST: &str = "loss_drops_the_configured_share_and_counts_it";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new("los", &[SiteSpec::new(Nat::Cone).loss_percent(20.0)]);
    let (site, public) = (topo.site(0), topo.public());
    let server = public.udp4(7001);
    let client = site.client(0).udp4(0);
    // Open the mapping first, so none of the counted datagrams is lost to ARP.
    while recv(&server, Duration::from_millis(100)).is_none() {
        client
            .send_to(b"warm-up", server.local_addr().unwrap())
            .unwrap();
    }
    site.set_loss(20.0); // resets the counters
    let sent = 1000u64;
    for i in 0..sent {
        client
            .send_to(format!("{i}").as_bytes(), server.local_addr().unwrap())
            .unwrap();
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2)); // stay well below buffer sizes
        }
    }
    let mut received = 0u64;
    while let Some((_, payload)) = recv(&server, Duration::from_millis(300)) {
        received += u64::from(payload != "warm-up");
    }
    let c = site.loss_counters();
    eprintln!("{TEST}: sent {sent}, received {received}, counters {c:?}");
    assert_eq!(c.seen_out, sent, "{c:?}");
    assert_eq!(received, sent - c.dropped_out, "every loss is counted");
    // Binomial(1000, 0.2): mean 200, sd 12.6; 140..260 is beyond 4.5 sd.
    assert!(
        (140..=260).contains(&c.dropped_out),
        "dropped {} of {sent}",
        c.dropped_out
    );
}

/// Library code runs inside namespaces without a process: a qpunch server node on the
/// public host (a background thread there) and, on a client behind a symmetric NAT with
/// a delay element, `node::punch_and_hand_over`, which binds its own socket deep inside.
/// The punch learns the router's WAN address (so that socket was bound in the client's
/// namespace), and a pinned QUIC stream echoes across.
#[test]
fn qpunch_nodes_run_inside_namespaces() {
    use qpunch::identity::Identity;
    use qpunch::node::{self, Node, NodeConfig};
    const TEST: &str = "qpunch_nodes_run_inside_namespaces";
    if !lab::require(TEST, &[]) {
        return;
    }
    let topo = Topology::new(
        "nod",
        &[SiteSpec::new(Nat::Symmetric).delay(Duration::from_millis(5))],
    );
    let site = topo.site(0);
    let (ready, ready_rx) = std::sync::mpsc::channel();
    let server = lab::spawn_in_netns(&topo.public().ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let config = NodeConfig::new(Identity::generate().unwrap(), b"qpunch-lab/1", true);
            let socket = qpunch::socket::bind(sa(PUBLIC_V4, 0)).unwrap();
            let node = Node::new(socket, config).unwrap();
            ready
                .send((node.local_addr().unwrap(), node.fingerprint()))
                .unwrap();
            let serve = async {
                let conn = node.accept().await.unwrap().unwrap();
                let (mut send, mut recv) = conn.connection.accept_bi().await.unwrap();
                let message = recv.read_to_end(64).await.unwrap();
                send.write_all(&message).await.unwrap();
                send.finish().unwrap();
                conn.connection.closed().await;
            };
            tokio::time::timeout(Duration::from_secs(20), serve)
                .await
                .expect("the client finished within 20 s");
        })
    });
    let (target, fingerprint) = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let (punched, echoed) = lab::block_on_in_netns(&site.client(0).ns, || async move {
        let config = NodeConfig::new(Identity::generate().unwrap(), b"qpunch-lab/1", false);
        let node::HandOver { node, punched, .. } =
            node::punch_and_hand_over(target, config, Default::default())
                .await
                .expect("punch from inside the client namespace");
        let conn = node.connect(punched.peer, Some(fingerprint)).await.unwrap();
        let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
        send.write_all(b"hello from site A").await.unwrap();
        send.finish().unwrap();
        let echoed = recv.read_to_end(64).await.unwrap();
        conn.connection.close(0u32.into(), b"done");
        node.close(Duration::from_millis(50)).await;
        (punched, echoed)
    });
    server.join().expect("server thread");
    let reflexive = punched
        .reflexive
        .expect("a qpunch reply carries the observed address");
    assert_eq!(
        reflexive.ip(),
        IpAddr::from(site.wan_v4),
        "not punched through the site's NAT: {punched:?}"
    );
    assert_eq!(echoed, b"hello from site A");
    eprintln!(
        "{TEST}: punched {} -> {target} in {:?} (RTT through the delay element)",
        reflexive, punched.rtt
    );
    assert!(punched.rtt >= Duration::from_millis(10), "{punched:?}");
}

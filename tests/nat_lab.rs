//! The NAT lab: `qpunch` end to end through real Linux NATs built from network namespaces
//! and nftables (see `nat_lab/lab.rs` for [`Lab`], a one-site `nat_lab/topology.rs`).
//!
//! Needs root, iproute2 (`ip`, `tc`), nftables (`nft`), conntrack-tools (`conntrack`),
//! procps (`sysctl`) and python3 (and `go` for the seed's Go program). Without them each
//! test prints a loud SKIPPED message and passes, unless the `CI` environment variable is
//! set: then it fails.

mod common;
#[path = "nat_lab/lab.rs"]
mod lab;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::seed;
use lab::{CLIENT_IP, Lab, Nat, PUBLIC_IP, Proc, ROUTER_WAN_IP};
use serde_json::Value;

const MIB: usize = 1 << 20;
const RECEIVER_PORT: u16 = 9199;

fn qpunch() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qpunch"))
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .unwrap_or_else(|| panic!("not an address string: {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("bad address {v}: {e}"))
}

/// One `qpunch` role: its own config home (identity, known_peers).
struct Role {
    home: tempfile::TempDir,
}

impl Role {
    fn new() -> Role {
        Role {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self) -> [(&'static str, &Path); 1] {
        [("QPUNCH_HOME", self.home.path())]
    }
}

/// A `qpunch receive --once` on the public host, with its announced fingerprint.
struct PublicReceiver {
    proc: Proc,
    fingerprint: String,
    out: tempfile::TempDir,
    role: Role,
}

impl PublicReceiver {
    fn start(lab: &Lab) -> PublicReceiver {
        let role = Role::new();
        let out = tempfile::tempdir().unwrap();
        let port = RECEIVER_PORT.to_string();
        let mut proc = lab.spawn(
            &lab.public(),
            &qpunch(),
            &[
                "receive",
                "--bind",
                PUBLIC_IP,
                "--port",
                &port,
                "--out",
                out.path().to_str().unwrap(),
                "--yes",
                "--once",
                "--json",
            ],
            &role.env(),
        );
        let listening = proc.wait_for("listening", Duration::from_secs(20));
        assert_eq!(listening["port"], RECEIVER_PORT, "{listening}");
        let fingerprint = listening["fingerprint"].as_str().unwrap().to_string();
        PublicReceiver {
            proc,
            fingerprint,
            out,
            role,
        }
    }

    fn target(&self) -> String {
        format!("{PUBLIC_IP}:{RECEIVER_PORT}")
    }

    /// After the sender finished: the `received` event for `hash`, the receiver's exit
    /// status, and the stored file checked against `hash` on disk.
    fn finish(&mut self, name: &str, size: usize, hash: &str) -> Value {
        let received = self.proc.wait_for("received", Duration::from_secs(20));
        assert_eq!(received["name"], name, "{received}");
        assert_eq!(received["bytes"], size as u64, "{received}");
        assert_eq!(received["blake3"], hash, "{received}");
        let (status, rest) = self.proc.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "receiver failed: {status}\n{}",
            self.proc.describe()
        );
        let stats = rest
            .iter()
            .find(|v| v["event"] == "stats")
            .unwrap_or_else(|| panic!("no stats event\n{}", self.proc.describe()));
        assert!(
            stats["probes_answered"].as_u64().unwrap() >= 1,
            "the receiver never answered a probe: {stats}"
        );
        let saved = self.out.path().join(received["saved_as"].as_str().unwrap());
        let on_disk = blake3::hash(&std::fs::read(&saved).unwrap());
        assert_eq!(
            on_disk.to_hex().as_str(),
            hash,
            "{} on disk",
            saved.display()
        );
        received
    }
}

/// A `qpunch send` from the client behind the NAT.
fn start_sender(lab: &Lab, role: &Role, file: &Path, rx: &PublicReceiver) -> Proc {
    lab.spawn(
        &lab.client(),
        &qpunch(),
        &[
            "send",
            file.to_str().unwrap(),
            "--to",
            &rx.target(),
            "--peer",
            &rx.fingerprint,
            "--punch-timeout",
            "10s",
            "--json",
        ],
        &role.env(),
    )
}

/// Wait for the sender to exit 0 with a `sent` event for the file.
fn sender_succeeds(tx: &mut Proc, name: &str, hash: &str, timeout: Duration) {
    let (status, rest) = tx.wait_exit(timeout);
    assert!(
        status.success(),
        "sender failed: {status}\n{}",
        tx.describe()
    );
    let sent = rest
        .iter()
        .find(|v| v["event"] == "sent")
        .unwrap_or_else(|| panic!("no sent event\n{}", tx.describe()));
    assert_eq!(sent["name"], name, "{sent}");
    assert_eq!(sent["blake3"], hash, "{sent}");
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// The mapped (public) ports the router holds for the client's UDP flows to the receiver.
fn mapped_ports(lab: &Lab) -> Vec<u16> {
    // e.g. "udp 17 29 src=10.0.1.2 dst=198.51.100.10 sport=41234 dport=9199
    //       src=198.51.100.10 dst=198.51.100.1 sport=9199 dport=41234 [ASSURED] ..."
    lab.conntrack_list()
        .lines()
        .filter(|l| l.contains(&format!("src={CLIENT_IP} ")))
        .filter(|l| l.contains(&format!("dst={PUBLIC_IP} ")))
        .filter_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix("dport="))
                .nth(1)
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

/// Test 1: Cone NAT: the sender learns its public address through the NAT from the probe
/// reply, QUIC then runs from the very same mapping, and the file arrives verified.
#[test]
fn cone_nat_send_to_public_receiver() {
    const TEST: &str = "cone_nat_send_to_public_receiver";
    if !lab::require(TEST, &[]) {
        return;
    }
    let lab = Lab::new("c", Nat::Cone);
    let work = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let (file, hash) = lab::make_file(work.path(), "cone.bin", size);
    let mut rx = PublicReceiver::start(&lab);

    // `qpunch id` prints the same fingerprint the receiver announces.
    let mut id = lab.spawn(&lab.public(), &qpunch(), &["id"], &rx.role.env());
    let (status, lines) = id.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "qpunch id: {}", id.describe());
    assert_eq!(
        lines.first().and_then(|l| l.as_str()),
        Some(rx.fingerprint.as_str()),
        "qpunch id vs listening.fingerprint\n{}",
        id.describe()
    );

    let sender = Role::new();
    let start = Instant::now();
    let mut tx = start_sender(&lab, &sender, &file, &rx);
    let punched = tx.wait_for("punched", Duration::from_secs(20));
    let tx_connected = tx.wait_for("connected", Duration::from_secs(20));
    let rx_connected = rx.proc.wait_for("connected", Duration::from_secs(20));
    sender_succeeds(&mut tx, "cone.bin", &hash, Duration::from_secs(90));
    let elapsed = start.elapsed();
    rx.finish("cone.bin", size, &hash);

    let reflexive = addr(&punched["reflexive_addr"]);
    let local = addr(&punched["local_addr"]);
    let quic_local = addr(&tx_connected["local_addr"]);
    let seen_by_rx = addr(&rx_connected["peer"]);
    assert_eq!(addr(&punched["peer"]).to_string(), rx.target(), "{punched}");
    assert_eq!(addr(&tx_connected["peer"]).to_string(), rx.target());
    assert_eq!(tx_connected["fingerprint"], rx.fingerprint.as_str());
    // The reflexive address was learned through the NAT: the router's WAN, not 10.0.1.2.
    assert_eq!(
        reflexive.ip().to_string(),
        ROUTER_WAN_IP,
        "reflexive address: {punched}"
    );
    // The receiver sees the QUIC connection from exactly the mapping the probes opened:
    // the socket (and port) survived the hand-over to quinn.
    assert_eq!(seen_by_rx, reflexive, "receiver: {rx_connected}");
    assert_eq!(local.port(), quic_local.port(), "port changed at hand-over");
    // Plain masquerade keeps the source port.
    assert_eq!(
        reflexive.port(),
        local.port(),
        "masquerade should preserve the port"
    );
    // And the router really holds that mapping.
    assert!(
        mapped_ports(&lab).contains(&reflexive.port()),
        "conntrack lacks the mapping to port {}:\n{}",
        reflexive.port(),
        lab.conntrack_list()
    );
    eprintln!(
        "{TEST}: 16 MiB via {reflexive} (local {local}) in {elapsed:.2?} ({:.1} MiB/s), punch rtt {} ms",
        mib_per_s(size, elapsed),
        punched["rtt_ms"]
    );
}

/// A tiny UDP socket tool: binds argv[1]:argv[2], prints `bound` and every datagram
/// received as JSON lines, and sends `IP PORT PAYLOAD` lines read from stdin.
const UDP_TOOL: &str = r#"
import json, socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"event": "bound", "addr": "%s:%d" % s.getsockname()}), flush=True)
def commands():
    for line in sys.stdin:
        ip, port, payload = line.split()
        s.sendto(payload.encode(), (ip, int(port)))
        print(json.dumps({"event": "sent", "to": "%s:%s" % (ip, port), "payload": payload}), flush=True)
threading.Thread(target=commands, daemon=True).start()
while True:
    data, src = s.recvfrom(65535)
    print(json.dumps({"event": "recv", "from": "%s:%d" % src, "payload": data.decode(errors="replace")}), flush=True)
"#;

fn udp_tool(lab: &Lab, ns: &str, ip: &str, port: u16) -> Proc {
    let python = lab::tool("python3").unwrap();
    let port = port.to_string();
    let mut p = lab.spawn(ns, &python, &["-u", "-c", UDP_TOOL, ip, &port], &[]);
    p.wait_for("bound", Duration::from_secs(10));
    p
}

/// Send from a tool and wait until it confirms.
fn udp_send(p: &mut Proc, to: &str, payload: &str) {
    let (ip, port) = to.rsplit_once(':').unwrap();
    p.send_line(&format!("{ip} {port} {payload}"));
    p.wait_for("sent", Duration::from_secs(5));
}

/// Every datagram a tool receives within `window`.
fn udp_received(p: &mut Proc, window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    while let Some(v) = p.next_line(deadline.saturating_duration_since(Instant::now())) {
        if v["event"] == "recv" {
            got.push(v);
        }
    }
    got
}

/// Test 2: Negative control: the NAT really filters. Unsolicited datagrams to the router's WAN
/// never reach a socket in the client namespace, not before the client sent anything,
/// not from another port or another host after it did; only the contacted
/// address:port gets through (which proves the listener itself works).
#[test]
fn nat_drops_unsolicited_datagrams() {
    const TEST: &str = "nat_drops_unsolicited_datagrams";
    if !lab::require(TEST, &["python3"]) {
        return;
    }
    let lab = Lab::new("n", Nat::Cone);
    // The public host's second address, to test filtering by address as well as port.
    let other_ip = &lab::PUBLIC_V4_ALT.to_string();
    let client_port = 40404;
    let wan_target = format!("{ROUTER_WAN_IP}:{client_port}");

    let mut listener = udp_tool(&lab, &lab.client(), "0.0.0.0", client_port);
    let mut a = udp_tool(&lab, &lab.public(), PUBLIC_IP, 5000);
    let mut b = udp_tool(&lab, &lab.public(), PUBLIC_IP, 5001);
    let mut c = udp_tool(&lab, &lab.public(), other_ip, 5000);

    // Before the client sent anything: nothing maps the port.
    udp_send(&mut a, &wan_target, "unsolicited-before");
    udp_send(&mut c, &wan_target, "unsolicited-before-other-host");
    // Also aim straight at the private address, as a neighbour on the WAN link could
    // (with a route via the router): the forward chain must not let it through.
    lab.ip(
        &lab.public(),
        &format!("route add 10.0.1.0/24 via {ROUTER_WAN_IP}"),
    );
    udp_send(
        &mut a,
        &format!("{CLIENT_IP}:{client_port}"),
        "to-private-address",
    );
    let early = udp_received(&mut listener, Duration::from_millis(700));
    assert!(early.is_empty(), "unsolicited datagrams got in: {early:?}");

    // The client contacts a:5000; a sees the router's address with the mapped port.
    udp_send(&mut listener, &format!("{PUBLIC_IP}:5000"), "hello");
    let hello = a.wait_for("recv", Duration::from_secs(5));
    let mapped = addr(&hello["from"]);
    assert_eq!(mapped.ip().to_string(), ROUTER_WAN_IP, "not NATed: {hello}");
    let mapped = mapped.to_string();

    // Same host, other port; other host, same port: both filtered.
    udp_send(&mut b, &mapped, "from-other-port");
    udp_send(&mut c, &mapped, "from-other-host");
    // The contacted endpoint answers: it must get through (positive control).
    std::thread::sleep(Duration::from_millis(200));
    udp_send(&mut a, &mapped, "reply");
    let got = udp_received(&mut listener, Duration::from_millis(1500));
    let payloads: Vec<&str> = got.iter().map(|v| v["payload"].as_str().unwrap()).collect();
    assert_eq!(
        payloads,
        ["reply"],
        "only the contacted endpoint's reply may pass the NAT"
    );
    assert_eq!(got[0]["from"], format!("{PUBLIC_IP}:5000"));
    eprintln!("{TEST}: unsolicited/other-port/other-host filtered, mapping {mapped}");
}

/// Test 3: Symmetric NAT (`masquerade fully-random`): sending to a public receiver still
/// works, and the reflexive port the probe reply reports is not the local port.
#[test]
fn symmetric_nat_send_to_public_receiver() {
    const TEST: &str = "symmetric_nat_send_to_public_receiver";
    if !lab::require(TEST, &[]) {
        return;
    }
    let lab = Lab::new("s", Nat::Symmetric);
    let work = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (file, hash) = lab::make_file(work.path(), "symmetric.bin", size);
    let mut rx = PublicReceiver::start(&lab);
    let sender = Role::new();
    let start = Instant::now();
    let mut tx = start_sender(&lab, &sender, &file, &rx);
    let punched = tx.wait_for("punched", Duration::from_secs(20));
    let rx_connected = rx.proc.wait_for("connected", Duration::from_secs(20));
    sender_succeeds(&mut tx, "symmetric.bin", &hash, Duration::from_secs(90));
    let elapsed = start.elapsed();
    rx.finish("symmetric.bin", size, &hash);

    let reflexive = addr(&punched["reflexive_addr"]);
    let local = addr(&punched["local_addr"]);
    assert_eq!(reflexive.ip().to_string(), ROUTER_WAN_IP, "{punched}");
    // A random port; equal by chance with probability ~1/64000.
    assert_ne!(
        reflexive.port(),
        local.port(),
        "fully-random masquerade kept the port: {punched}"
    );
    assert_eq!(addr(&rx_connected["peer"]), reflexive, "{rx_connected}");
    eprintln!(
        "{TEST}: local {local} mapped to {reflexive}, 4 MiB in {elapsed:.2?} ({:.1} MiB/s)",
        mib_per_s(size, elapsed)
    );
}

/// Test 4: A lossy link: 2 % random drop each way on the router's WAN side; an 8 MiB transfer
/// still completes verified (QUIC retransmits; the punch resends probes).
#[test]
fn lossy_link_transfer_completes() {
    const TEST: &str = "lossy_link_transfer_completes";
    if !lab::require(TEST, &[]) {
        return;
    }
    let lab = Lab::new("l", Nat::Cone);
    // quinn sends batches as UDP GSO buffers, and veth forwards those unsegmented: a
    // drop would take out a whole burst. Segment in the hosts' stacks, so the link sees
    // (and loses) single datagrams, as a real wire does.
    lab.ip(&lab.client(), "link set eth0 gso_max_segs 1");
    lab.ip(&lab.public(), "link set eth0 gso_max_segs 1");
    lab.add_loss(2);
    let work = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let (file, hash) = lab::make_file(work.path(), "lossy.bin", size);
    let mut rx = PublicReceiver::start(&lab);
    let sender = Role::new();
    let start = Instant::now();
    let mut tx = start_sender(&lab, &sender, &file, &rx);
    tx.wait_for("punched", Duration::from_secs(30));
    sender_succeeds(&mut tx, "lossy.bin", &hash, Duration::from_secs(120));
    let elapsed = start.elapsed();
    rx.finish("lossy.bin", size, &hash);
    let [seen_in, seen_out, dropped_in, dropped_out] = lab.loss_counters()[..] else {
        panic!("unexpected natloss counters: {:?}", lab.loss_counters());
    };
    assert!(
        dropped_in > 0 && dropped_out > 0,
        "the lossy link dropped nothing: in {dropped_in}/{seen_in}, out {dropped_out}/{seen_out}"
    );
    eprintln!(
        "{TEST}: 8 MiB in {elapsed:.2?} ({:.1} MiB/s); link dropped {dropped_in}/{seen_in} in, {dropped_out}/{seen_out} out",
        mib_per_s(size, elapsed)
    );
}

/// Test 5: NAT rebinding mid-transfer: while a rate-limited 32 MiB upload runs, the router
/// forgets its mappings and re-maps the client to a new random port. The receiver must
/// follow the sender to its new address (QUIC connection migration) and the file must
/// still arrive verified.
#[test]
fn nat_rebinding_mid_transfer() {
    const TEST: &str = "nat_rebinding_mid_transfer";
    if !lab::require(TEST, &["conntrack", "tc"]) {
        return;
    }
    let lab = Lab::new("r", Nat::Cone);
    lab.limit_upload("50mbit");
    let work = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let (file, hash) = lab::make_file(work.path(), "rebind.bin", size);
    let mut rx = PublicReceiver::start(&lab);
    let sender = Role::new();
    let start = Instant::now();
    let mut tx = start_sender(&lab, &sender, &file, &rx);
    let punched = tx.wait_for("punched", Duration::from_secs(20));
    let old = addr(&punched["reflexive_addr"]);
    let rx_connected = rx.proc.wait_for("connected", Duration::from_secs(20));
    assert_eq!(addr(&rx_connected["peer"]), old, "{rx_connected}");
    std::thread::sleep(Duration::from_secs(1));

    assert!(
        tx.try_exit().is_none(),
        "the transfer ended before the rebinding: make it slower\n{}",
        tx.describe()
    );
    assert_eq!(mapped_ports(&lab), [old.port()], "{}", lab.conntrack_list());
    // Rebind: new mappings get random ports, and the current ones are forgotten.
    lab.set_nat(Nat::Symmetric);
    lab.flush_conntrack();
    let rebound_at = start.elapsed();

    // The client's next packet creates the new mapping.
    let deadline = Instant::now() + Duration::from_secs(5);
    let new_port = loop {
        let ports = mapped_ports(&lab);
        if let Some(&p) = ports.iter().find(|&&p| p != old.port()) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no new mapping after the flush:\n{}",
            lab.conntrack_list()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        tx.try_exit().is_none(),
        "the transfer ended before the rebinding took effect\n{}",
        tx.describe()
    );

    sender_succeeds(&mut tx, "rebind.bin", &hash, Duration::from_secs(120));
    let elapsed = start.elapsed();
    rx.finish("rebind.bin", size, &hash);
    eprintln!(
        "{TEST}: 32 MiB in {elapsed:.2?} ({:.1} MiB/s); mapping {old} -> {ROUTER_WAN_IP}:{new_port} at {rebound_at:.2?}",
        mib_per_s(size, elapsed)
    );
}

/// Bind a UDP socket inside namespace `ns` (it stays there; the test drives it from here).
fn bind_in(ns: &str, addr: &str) -> std::net::UdpSocket {
    lab::bind_udp_in(ns, addr.parse().unwrap())
}

/// Punch from the client namespace to a node in the public one, connect (pinned), and
/// prove the connection with one client-opened stream. Returns both ends.
async fn connect_through_nat(
    lab: &Lab,
    server: &qpunch::node::Node,
    keep_alive: Option<Duration>,
) -> (
    qpunch::node::Node,
    qpunch::node::PeerConnection,
    qpunch::node::PeerConnection,
) {
    use qpunch::node::{Node, NodeConfig};
    let target = server.local_addr().unwrap();
    let raw = bind_in(&lab.client(), "0.0.0.0:0");
    raw.set_nonblocking(true).unwrap();
    let raw = tokio::net::UdpSocket::from_std(raw).unwrap();
    let punched = qpunch::driver::punch(&raw, vec![target], Default::default())
        .await
        .expect("punch through the NAT");
    let reflexive = punched
        .reflexive
        .expect("a qpunch reply carries the reflexive address");
    assert_eq!(reflexive.ip().to_string(), ROUTER_WAN_IP);
    let mut config = NodeConfig::new(
        qpunch::identity::Identity::generate().unwrap(),
        b"qpunch-lab/1",
        false,
    );
    config.keep_alive = keep_alive;
    let client = Node::new(raw.into_std().unwrap(), config).unwrap();
    let (c, s) = tokio::join!(
        client.connect(punched.peer, Some(server.fingerprint())),
        server.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    let (mut send, _recv) = c.connection.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let (_s_send, mut s_recv) = s.connection.accept_bi().await.unwrap();
    let mut hello = [0u8; 5];
    s_recv.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello");
    (client, c, s)
}

/// Whether a stream the *server* opens after `idle` reaches the client: that direction
/// only works while the NAT still holds the client's mapping.
async fn server_reaches_client_after(
    client: &qpunch::node::PeerConnection,
    server: &qpunch::node::PeerConnection,
    idle: Duration,
) -> bool {
    tokio::time::sleep(idle).await;
    let (mut send, _recv) = server.connection.open_bi().await.unwrap();
    send.write_all(b"still there?").await.unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(3), async {
        let (_send, mut recv) = client.connection.accept_bi().await.unwrap();
        let mut buf = [0u8; 12];
        recv.read_exact(&mut buf).await.unwrap();
        buf == *b"still there?"
    })
    .await;
    arrived.unwrap_or(false)
}

/// QUIC keep-alives hold the NAT hole open: with a router that forgets idle UDP
/// mappings after 2 s, a connection idle for 6 s still carries server-to-client data
/// when keep-alives run, and (the control) does not when they are off.
#[test]
fn keepalive_holds_the_hole_open_while_idle() {
    if !lab::require(
        "keepalive_holds_the_hole_open_while_idle",
        &["ip", "nft", "sysctl"],
    ) {
        return;
    }
    let lab = Lab::new("ka", Nat::Cone);
    lab.exec(
        &lab.router(),
        "sysctl",
        &[
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=2",
            "net.netfilter.nf_conntrack_udp_timeout_stream=2",
        ],
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use qpunch::node::{Node, NodeConfig};
        let server = Node::new(
            bind_in(&lab.public(), &format!("{PUBLIC_IP}:0")),
            NodeConfig::new(
                qpunch::identity::Identity::generate().unwrap(),
                b"qpunch-lab/1",
                true,
            ),
        )
        .unwrap();
        let idle = Duration::from_secs(6);

        let (_node, c, s) =
            connect_through_nat(&lab, &server, Some(Duration::from_millis(500))).await;
        assert!(
            server_reaches_client_after(&c, &s, idle).await,
            "with keep-alives the hole must stay open"
        );

        let (_node, c, s) = connect_through_nat(&lab, &server, None).await;
        assert!(
            !server_reaches_client_after(&c, &s, idle).await,
            "control: without keep-alives the router must have closed the hole"
        );
    });
}

/// The seed's own scenario through a real NAT, with its own Go program on one side:
/// the Go client behind the cone NAT gets its "Success: NAT traversed! ^-^" from a public
/// `qpunch receive`, and a qpunch punch from behind the NAT is answered by the public Go
/// server, which sees it come from the router's WAN address (method Legacy).
#[test]
fn seed_go_program_through_a_cone_nat_both_ways() {
    const TEST: &str = "seed_go_program_through_a_cone_nat_both_ways";
    if !lab::require(TEST, &[]) {
        return;
    }
    let Some(go) = seed::build(TEST) else {
        return;
    };
    let lab = Lab::new("go", Nat::Cone);
    let ip = lab::tool("ip").unwrap();
    let in_ns = |ns: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(&ip);
        cmd.args(["netns", "exec", ns]).arg(go.bin()).args(args);
        go.spawn_with(&mut cmd)
    };

    // Go client (behind the NAT) -> qpunch receive (public).
    let mut rx = PublicReceiver::start(&lab);
    let port = RECEIVER_PORT.to_string();
    let (status, printed) =
        in_ns(&lab.client(), &["-port", &port, PUBLIC_IP]).wait_exit(Duration::from_secs(20));
    assert!(status.success(), "Go client: {status}\n{printed}");
    for line in [
        format!("Received a UDP packet back from {PUBLIC_IP}:{RECEIVER_PORT}\n"),
        "\tResponse: お帰り~\n".to_string(),
        "Success: NAT traversed! ^-^\n".to_string(),
    ] {
        assert!(
            printed.contains(&line),
            "Go client lacks {line:?}:\n{printed}"
        );
    }
    // SAFETY: kill(2) on our own child (`ip netns exec` execs qpunch), not yet reaped.
    let rc = unsafe { libc::kill(rx.proc.pid() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0, "kill -INT: {}", std::io::Error::last_os_error());
    let (_, rest) = rx.proc.wait_exit(Duration::from_secs(20));
    let stats = rest
        .iter()
        .find(|v| v["event"] == "stats")
        .unwrap_or_else(|| panic!("no stats event\n{}", rx.proc.describe()));
    assert_eq!(stats["legacy_answered"], 1, "{stats}");

    // qpunch punch (behind the NAT) -> Go server (public).
    let go_port = 9299;
    let mut go_server = in_ns(&lab.public(), &["-port", &go_port.to_string()]);
    go_server.wait_for(
        &format!("Listening on :{go_port}\n"),
        Duration::from_secs(20),
    );
    let target: SocketAddr = format!("{PUBLIC_IP}:{go_port}").parse().unwrap();
    let raw = bind_in(&lab.client(), "0.0.0.0:0");
    raw.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let punched = runtime.block_on(async {
        let raw = tokio::net::UdpSocket::from_std(raw).unwrap();
        qpunch::driver::punch(&raw, vec![target], Default::default()).await
    });
    let punched = punched.expect("punch through the NAT to the Go server");
    assert_eq!(punched.method, qpunch::punch::Method::Legacy, "{punched:?}");
    assert_eq!(punched.peer, target, "{punched:?}");
    assert_eq!(punched.reflexive, None, "{punched:?}");
    // The Go server answered the NAT's public side, not 10.0.1.2.
    go_server.wait_for(
        &format!("Sent reply to {ROUTER_WAN_IP}:"),
        Duration::from_secs(20),
    );
    let seen = go_server.output();
    assert!(
        seen.contains(&format!("Received a packet from: {ROUTER_WAN_IP}:"))
            && !seen.contains(CLIENT_IP),
        "{seen}"
    );
}

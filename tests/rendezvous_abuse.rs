//! The rendezvous under abuse, and a rendezvous that lies.
//!
//! **Abuse.** A real rendezvous (the library's, served in this process; for memory, the
//! `qpunch rendezvous` binary in a child process) is attacked over loopback with real QUIC:
//! 100,000 junk datagrams at both of its ports, 10,000 registrations from one address,
//! joins to unknown and expired nameplates, guessing. Each time an honest pair still meets,
//! every refusal says why, no reply is larger than the datagram that caused it, and memory
//! stays under a stated bound.
//!
//! **Lies.** The rendezvous is untrusted by design, so the other half makes it the
//! attacker: [`Liar`] is a test double speaking the protocol (`qpunch::rendezvous::ALPN`,
//! frames from `qpunch::frame`) that sits between two honest [`Meeting`]s (a receiver with
//! a [`Receiver`] and [`Server`] writing into a temporary directory, a sender trying to send
//! a file) and substitutes, replays, mixes and redirects. It never knows the code's words.
//! Every lie ends in a clear refusal, and nothing is written.
//!
//! Distinct source addresses are 127.0.0.x (all of 127/8 is loopback on Linux).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qpunch::frame;
use qpunch::identity::{Fingerprint, Identity};
use qpunch::meet::code::{Code, Nameplate};
use qpunch::meet::pake::{self, Hello, Pake, Role};
use qpunch::meet::{MeetConfig, MeetError, MeetEvents, Meeting, Silent, Welcomed};
use qpunch::natcheck::Mapping;
use qpunch::node::{Node, NodeConfig};
use qpunch::rendezvous::{
    self, ClientError, ErrorCode, Exchange, RendezvousClient, RendezvousConfig, Request, Response,
};
use qpunch::server::{Limits, Server};
use qpunch::transfer::{
    self, FileReport, Outgoing, Policy, Quiet, ReceiveOptions, Receiver, TransferError,
};
use tokio::sync::{mpsc, oneshot};

/// Bound for one step of a test (a meeting, a handshake, an answer).
const STEP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Shared set-up: rendezvous, nodes, meetings
// ---------------------------------------------------------------------------------------

/// `127.0.0.n`.
fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// The `i`-th of many distinct sources, away from the `lo(n)` ones: 127.0.(10 + i/200).x.
fn source(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 10 + (i / 200) as u8, 1 + (i % 200) as u8])
}

use common::rendezvous::serve;

/// A node on `ip` (any port) speaking the transfer protocol.
fn node_on(ip: IpAddr, accept: bool) -> Arc<Node> {
    node_as(Identity::generate().unwrap(), ip, accept)
}

fn node_as(identity: Identity, ip: IpAddr, accept: bool) -> Arc<Node> {
    let socket = qpunch::socket::bind(SocketAddr::new(ip, 0)).unwrap();
    Arc::new(Node::new(socket, NodeConfig::new(identity, transfer::ALPN, accept)).unwrap())
}

/// A receiving node on `ip` whose server admits only senders holding a ticket from a code.
fn receiving_on(ip: IpAddr, out: &Path) -> (Arc<Node>, Arc<Receiver>) {
    receiving_as(Identity::generate().unwrap(), ip, out)
}

fn receiving_as(identity: Identity, ip: IpAddr, out: &Path) -> (Arc<Node>, Arc<Receiver>) {
    let node = node_as(identity, ip, true);
    let receiver = Receiver::new(ReceiveOptions::new(out, Policy::Allow(Vec::new()))).unwrap();
    let server = Server::new(node.clone(), receiver.clone(), Limits::default());
    tokio::spawn(server.run(std::future::pending::<()>()));
    (node, receiver)
}

async fn connect(node: &Node, rendezvous: SocketAddr) -> RendezvousClient {
    RendezvousClient::connect(node, rendezvous)
        .await
        .expect("connect to the rendezvous")
}

/// Both sides are on loopback: no NAT at all.
fn meeting<'a>(
    node: &'a Arc<Node>,
    rendezvous: &'a RendezvousClient,
    events: &'a dyn MeetEvents,
) -> Meeting<'a> {
    Meeting {
        node,
        rendezvous,
        nat: Mapping::EndpointIndependent,
        config: MeetConfig::default(),
        events,
        turn: None,
    }
}

/// Hands the receiver's code to the test when the rendezvous chose the nameplate.
struct Announce(Mutex<Option<oneshot::Sender<Code>>>);

impl MeetEvents for Announce {
    fn code(&self, code: &Code, _: Duration) {
        if let Some(tx) = self.0.lock().unwrap().take() {
            let _ = tx.send(code.clone());
        }
    }
}

/// The receiver's side of a meeting, in a task: open `chosen` (or any nameplate), wait for
/// a sender, and give it a ticket. The code is sent on `code` once it exists.
fn welcome(
    node: Arc<Node>,
    receiver: Arc<Receiver>,
    client: RendezvousClient,
    chosen: Option<Code>,
) -> (
    tokio::task::JoinHandle<Result<Welcomed, MeetError>>,
    oneshot::Receiver<Code>,
) {
    let (code_tx, code_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let admit = |fp, ttl| receiver.admit(fp, ttl);
        // The sender may connect before its hello reaches us through the rendezvous.
        let _expecting = receiver.expect_tickets();
        let events = Announce(Mutex::new(Some(code_tx)));
        let meeting = meeting(&node, &client, &events);
        tokio::time::timeout(
            STEP,
            meeting.welcome(chosen.as_ref(), Duration::from_secs(60), &admit),
        )
        .await
        .expect("the receiver's meeting ended in time")
    });
    (task, code_rx)
}

/// What a sender that tried to send a file by code got.
type Sent = Result<Result<Vec<FileReport>, TransferError>, MeetError>;

/// The sender's side, in a task: meet the receiver behind `code`, then send `file` over
/// the pinned connection.
fn send_by_code(
    node: Arc<Node>,
    client: RendezvousClient,
    code: Code,
    file: PathBuf,
) -> tokio::task::JoinHandle<Sent> {
    tokio::spawn(async move {
        let attempt = async {
            let met = meeting(&node, &client, &Silent).dial(&code).await?;
            let outgoing = vec![Outgoing::from_path(&file).expect("source file")];
            Ok(transfer::send_files(&met.peer.connection, outgoing, Arc::new(Quiet)).await)
        };
        tokio::time::timeout(STEP, attempt)
            .await
            .expect("the sender's meeting ended in time")
    })
}

/// A small file to send, in its own temporary directory.
fn source_file(seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = common::tempdir();
    let path = dir.path().join("payload.bin");
    common::random_file(&path, 100_000, seed);
    (dir, path)
}

/// An honest pair on `receiver_ip` and `sender_ip` meets through the rendezvous at `rv`
/// (which picks the nameplate) and a file arrives verified. Returns how long it took.
async fn honest_pair(
    rv: SocketAddr,
    receiver_ip: IpAddr,
    sender_ip: IpAddr,
    seed: u64,
) -> Duration {
    let started = Instant::now();
    let out = common::tempdir();
    let (rnode, receiver) = receiving_on(receiver_ip, out.path());
    let rclient = connect(&rnode, rv).await;
    let (welcoming, code) = welcome(rnode.clone(), receiver.clone(), rclient, None);
    let code = tokio::time::timeout(STEP, code)
        .await
        .expect("a code in time")
        .expect("a code");
    let snode = node_on(sender_ip, false);
    let sclient = connect(&snode, rv).await;
    let (_src, file) = source_file(seed);
    let sent = send_by_code(snode, sclient, code, file.clone())
        .await
        .unwrap();
    let welcomed = welcoming.await.unwrap();
    let sent = match (sent, &welcomed) {
        (Ok(Ok(sent)), Ok(_)) => sent,
        (sent, welcomed) => panic!("an honest pair failed: sender {sent:?}, receiver {welcomed:?}"),
    };
    assert!(sent[0].is_verified(), "{sent:?}");
    let welcomed = welcomed.unwrap();
    assert_eq!(welcomed.code.nameplate(), welcomed.code.nameplate());
    assert_eq!(
        common::blake3_file(&out.path().join("payload.bin")),
        common::blake3_file(&file),
        "the file arrived whole"
    );
    started.elapsed()
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(text: &str) -> Vec<u8> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .expect("hex from an honest client")
}

/// A real PAKE message for a throwaway code, for registrations that never meet anyone.
fn some_pake(nameplate: &Nameplate) -> Vec<u8> {
    let code = Code::generate(nameplate.clone(), &mut rand::rng());
    Pake::start(&code, Role::Receiver, &mut rand::rng()).1
}

/// Whether a meeting ended the way a wrong code (or tampering) must: each side checks the
/// other's sealed hello itself, so each finds the code wrong (never just "the other side
/// gave up").
fn refused_as_wrong_code(result: &Result<impl std::fmt::Debug, MeetError>) -> bool {
    matches!(result, Err(MeetError::WrongCode))
}

// =======================================================================================
// The rendezvous under abuse
// =======================================================================================

// ---------------------------------------------------------------------------------------
// 1.1 Junk datagrams
// ---------------------------------------------------------------------------------------

/// One kind of junk: every datagram of a kind has the same size, so each reply can be
/// compared with the datagram that caused it.
struct Junk {
    name: &'static str,
    /// How many to send to each port.
    count: usize,
    make: MakeJunk,
}

type MakeJunk = Box<dyn Fn(&mut rand::rngs::StdRng) -> Vec<u8> + Send>;

fn junk(
    name: &'static str,
    count: usize,
    make: impl Fn(&mut rand::rngs::StdRng) -> Vec<u8> + Send + 'static,
) -> Junk {
    Junk {
        name,
        count,
        make: Box::new(make),
    }
}

fn random_bytes(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    use rand::Rng;
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// A real QUIC Initial, as a qpunch client sends it to a rendezvous (captured from a
/// connection attempt to a plain UDP socket).
async fn captured_initial() -> Vec<u8> {
    let catcher = tokio::net::UdpSocket::bind((lo(1), 0)).await.unwrap();
    let to = catcher.local_addr().unwrap();
    let node = node_on(lo(1), false);
    let alpn = [rendezvous::ALPN.to_vec()];
    let connecting = tokio::spawn(async move {
        let _ = node.connect_with_alpn(to, None, &alpn).await;
    });
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(STEP, catcher.recv_from(&mut buf))
        .await
        .expect("an Initial in time")
        .unwrap();
    connecting.abort();
    buf.truncate(n);
    assert_eq!(buf[0] & 0xf0, 0xc0, "a long-header Initial");
    buf
}

/// The junk for one port: 100,000 datagrams over both ports together.
fn junk_kinds(initial: &[u8]) -> Vec<Junk> {
    use qpunch::wire::{self, Message};
    use rand::RngExt;
    let probe = |txid| Message::Probe { txid }.to_vec();
    let initial = initial.to_vec();
    let (i1, i2, i3, i4) = (
        initial.clone(),
        initial.clone(),
        initial.clone(),
        initial.clone(),
    );
    vec![
        junk("random 1 byte", 3000, |r| random_bytes(r, 1)),
        junk("random 40 bytes", 3000, |r| random_bytes(r, 40)),
        junk("random 300 bytes", 3000, |r| random_bytes(r, 300)),
        junk("random 1200 bytes", 3000, |r| random_bytes(r, 1200)),
        junk("oversized 9000 bytes", 1000, |r| random_bytes(r, 9000)),
        junk("oversized 60000 bytes", 100, |r| random_bytes(r, 60_000)),
        junk("QUIC short header, unknown connection", 3000, |r| {
            let mut d = random_bytes(r, 100);
            d[0] = 0x40 | (d[0] & 0x3f);
            d
        }),
        junk("QUIC long header, unknown version", 3000, |r| {
            let mut d = random_bytes(r, 1200);
            d[0] = 0xc0 | (d[0] & 0x3f);
            d[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, r.random::<u8>() | 0x0a]);
            d[5] = 8;
            d[14] = 8;
            d
        }),
        junk("QUIC Initial, replayed whole", 3000, move |_| i1.clone()),
        junk("QUIC Initial, truncated by 1 byte", 3000, move |_| {
            i2[..i2.len() - 1].to_vec()
        }),
        junk("QUIC Initial, truncated to 600 bytes", 3000, move |_| {
            i3[..600].to_vec()
        }),
        junk("QUIC Initial, truncated to 60 bytes", 3000, move |_| {
            i4[..60].to_vec()
        }),
        junk("probe, bad magic", 2500, move |r| {
            let mut d = probe(r.random());
            d[1] ^= 0xff;
            d
        }),
        junk("probe, bad version", 2500, move |r| {
            let mut d = probe(r.random());
            d[5] = 0xee;
            d
        }),
        junk("probe, truncated to 30 bytes", 2500, move |r| {
            probe(r.random())[..30].to_vec()
        }),
        junk("probe, non-zero padding", 2500, move |r| {
            let mut d = probe(r.random());
            *d.last_mut().unwrap() = 1;
            d
        }),
        junk("probe, padded past the size limit", 2500, move |r| {
            let mut d = probe(r.random());
            d.resize(wire::MAX_DATAGRAM + 44, 0);
            d
        }),
        junk("reply nobody asked for", 2500, |r| {
            Message::Reply {
                txid: r.random(),
                observed: "127.0.0.2:9".parse().unwrap(),
            }
            .to_vec()
        }),
        junk("valid probe", 2000, move |r| probe(r.random())),
        junk("the Go demo's probe", 1900, |_| wire::LEGACY_PROBE.to_vec()),
    ]
}

/// What came back to one junk socket.
#[derive(Debug, Default, Clone)]
struct Back {
    sent: usize,
    size: usize,
    replies: usize,
    largest: usize,
    /// First bytes of the replies (to tell a Retry from a version negotiation).
    firsts: Vec<u8>,
}

/// Send every kind of junk to `targets` from one socket per (kind, target) on 127.0.0.2,
/// about `rate` datagrams per second, counting into `progress`; collect what comes back.
fn flood(
    kinds: Vec<Junk>,
    targets: [SocketAddr; 2],
    rate: f64,
    progress: Arc<AtomicUsize>,
) -> BTreeMap<(String, u16), Back> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    struct Lane {
        kind: usize,
        target: SocketAddr,
        socket: UdpSocket,
        back: Back,
    }
    let mut lanes: Vec<Lane> = Vec::new();
    for (kind, _) in kinds.iter().enumerate() {
        for target in targets {
            let socket = UdpSocket::bind((lo(2), 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            lanes.push(Lane {
                kind,
                target,
                socket,
                back: Back::default(),
            });
        }
    }
    let drain = |lane: &mut Lane, buf: &mut [u8]| {
        while let Ok(n) = lane.socket.recv(buf) {
            lane.back.replies += 1;
            lane.back.largest = lane.back.largest.max(n);
            if lane.back.firsts.len() < 64 {
                lane.back.firsts.push(buf[0]);
            }
        }
    };
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    let (mut sent, mut rounds) = (0usize, 0usize);
    loop {
        let mut any = false;
        rounds += 1;
        for lane in &mut lanes {
            let kind = &kinds[lane.kind];
            if lane.back.sent < kind.count {
                let datagram = (kind.make)(&mut rng);
                lane.back.size = datagram.len();
                // A full socket buffer (EAGAIN) is the flooder's problem: count it sent.
                let _ = lane.socket.send_to(&datagram, lane.target);
                lane.back.sent += 1;
                sent += 1;
                any = true;
            }
            if rounds % 16 == 0 {
                drain(lane, &mut buf);
            }
        }
        progress.store(sent, Ordering::Relaxed);
        if !any {
            break;
        }
        let due = Duration::from_secs_f64(sent as f64 / rate);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    // Late replies.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        for lane in &mut lanes {
            drain(lane, &mut buf);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lanes
        .into_iter()
        .map(|lane| {
            (
                (kinds[lane.kind].name.to_string(), lane.target.port()),
                lane.back,
            )
        })
        .collect()
}

/// 100,000 junk datagrams (random bytes, oversized ones, QUIC packets for no connection or
/// an unknown version, real Initials replayed whole and truncated, malformed probes,
/// unsolicited replies, valid probes) at the main and the alternate port, while an honest
/// pair meets and transfers a file. Every datagram that comes back is no larger than the
/// one that caused it (QUIC answers an unvalidated Initial with a small Retry, probes are
/// padded), valid probes are rate limited, and the honest pair is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_at_both_ports_gets_no_amplification_and_honest_pairs_still_meet() {
    const RATE: f64 = 40_000.0;
    let rv = serve(RendezvousConfig::default());
    let kinds = junk_kinds(&captured_initial().await);
    let total: usize = kinds.iter().map(|k| 2 * k.count).sum();
    assert_eq!(total, 100_000);
    let names: Vec<&'static str> = kinds.iter().map(|k| k.name).collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let flooding = {
        let (targets, progress) = ([rv.addr, rv.alt], progress.clone());
        tokio::task::spawn_blocking(move || flood(kinds, targets, RATE, progress))
    };
    // Honest pairs, one after another, for as long as the flood lasts.
    let started = Instant::now();
    let mut pairs = Vec::new();
    while !flooding.is_finished() {
        let at = progress.load(Ordering::Relaxed);
        // Each from its own addresses: joins are rate limited per source.
        let n = pairs.len();
        let took = honest_pair(rv.addr, source(2 * n), source(2 * n + 1), n as u64).await;
        pairs.push((at, took));
        // Leave the machine's two cores to the flood most of the time.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let flood_took = started.elapsed();
    let back = flooding.await.unwrap();
    let (main_port, alt_port) = (rv.addr.port(), rv.alt.port());
    let port_name = |port| if port == main_port { "main" } else { "alt" };
    let mut report = String::new();
    for ((name, port), b) in &back {
        report.push_str(&format!(
            "  {:5} {name:40} {:>5} x {:>5} B -> {:>5} replies, largest {:>4} B\n",
            port_name(*port),
            b.sent,
            b.size,
            b.replies,
            b.largest
        ));
    }
    let stats = rv.node.socket_stats();
    eprintln!(
        "{total} junk datagrams in {flood_took:?}; meanwhile {} honest pairs met and \
         transferred (started at datagram, took): {pairs:?}\n{report}main socket: {stats:?}\n\
         server: {:?}",
        pairs.len(),
        rv.server.get()
    );
    assert!(
        pairs.len() >= 3,
        "the flood should outlast a few honest meetings: {pairs:?}"
    );

    for ((name, port), b) in &back {
        assert!(
            b.largest <= b.size,
            "{} port: {name} ({} B) got a {} B reply",
            port_name(*port),
            b.size,
            b.largest
        );
    }
    let replies = |name: &str, port: u16| back[&(name.to_string(), port)].replies;
    // Nothing answers malformed probes, unsolicited replies or truncated Initials, on
    // either port (random bytes may look like a QUIC packet of an unknown version, and get
    // a version negotiation).
    for name in &names {
        let answered = name.starts_with("QUIC Initial, replayed")
            || name.starts_with("QUIC long header")
            || name.starts_with("QUIC short header")
            || *name == "valid probe"
            || *name == "the Go demo's probe"
            || name.starts_with("random")
            || name.starts_with("oversized");
        if !answered {
            for port in [main_port, alt_port] {
                assert_eq!(
                    replies(name, port),
                    0,
                    "{} port answered {name}",
                    port_name(port)
                );
            }
        }
    }
    // A replayed Initial gets a Retry (long header, type 3), never a handshake.
    let initials = &back[&("QUIC Initial, replayed whole".to_string(), main_port)];
    assert!(initials.replies > 0, "no Retry for a replayed Initial");
    assert!(
        initials.firsts.iter().all(|b| b & 0xf0 == 0xf0),
        "only Retries: {:x?}",
        initials.firsts
    );
    // The alternate port speaks nothing but probes.
    for name in [
        "QUIC Initial, replayed whole",
        "QUIC long header, unknown version",
    ] {
        assert_eq!(replies(name, alt_port), 0, "alt port answered {name}");
    }
    // One source gets a burst of 32 replies, then 16 a second, per port (the main port
    // counts the Go demo's probes in the same bucket).
    let seconds = flood_took.as_secs_f64() + 1.0;
    let limit = 32 + (16.0 * seconds) as usize;
    let main_probes = replies("valid probe", main_port) + replies("the Go demo's probe", main_port);
    assert!(
        main_probes <= limit,
        "main port answered {main_probes} probes (limit {limit})"
    );
    assert!(main_probes > 0, "the main port answers probes");
    let alt_probes = replies("valid probe", alt_port);
    assert!(
        alt_probes <= limit,
        "alt port answered {alt_probes} probes (limit {limit})"
    );
    assert!(alt_probes > 0, "the alt port answers probes");
    assert!(
        stats.malformed_dropped > 0 && stats.probes_limited > 0,
        "{stats:?}"
    );
    // And it still serves: another pair after the flood.
    honest_pair(rv.addr, lo(5), lo(6), 2).await;
    assert_eq!(rv.rendezvous.waiting(), 0);
}

// ---------------------------------------------------------------------------------------
// 1.2 Registrations from one source
// ---------------------------------------------------------------------------------------

/// 10,000 registrations (open requests) from one address, over as many connections as it
/// may have (32; the 33rd is refused): 16 nameplates are opened, every other request is
/// refused with `too_many` and a message saying why, and meanwhile an honest pair from other
/// addresses meets. When the flooder leaves, its nameplates are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_registrations_from_one_address_hit_the_per_source_limit() {
    const REGISTRATIONS: usize = 10_000;
    const PER_IP: usize = 32;
    let rv = serve(RendezvousConfig::default());
    let flooder = lo(7);
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..PER_IP {
        let node = node_on(flooder, false);
        clients.push(connect(&node, rv.addr).await);
        nodes.push(node);
    }
    // One connection too many from the same address.
    let extra = node_on(flooder, false);
    let refused = RendezvousClient::connect(&extra, rv.addr).await;
    let refused = refused.expect_err("a 33rd connection from one address");
    eprintln!("33rd connection: {refused}");
    assert!(
        matches!(refused, ClientError::Connect { .. }),
        "{refused:?}"
    );

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let held = Arc::new(tokio::sync::Mutex::new(Vec::<Exchange>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for client in &clients {
        let client = client.clone();
        let (next, outcomes, held) = (next.clone(), outcomes.clone(), held.clone());
        tasks.spawn(async move {
            // A connection has two streams (the guarded transport): a client holding an
            // open nameplate stops there, so its other stream is never needed, and the
            // flood goes on through the others.
            while next.fetch_add(1, Ordering::Relaxed) < REGISTRATIONS {
                let (outcome, holding) = match client.open(None, Duration::from_secs(600)).await {
                    Ok((mut exchange, opened)) => {
                        exchange.pake(&some_pake(&opened.nameplate)).await.unwrap();
                        held.lock().await.push(exchange);
                        ("opened".to_string(), true)
                    }
                    Err(ClientError::Refused { code, message }) => {
                        (format!("{code:?}: {message}"), false)
                    }
                    Err(other) => (format!("failed: {other}"), false),
                };
                *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
                if holding {
                    break;
                }
            }
        });
    }
    // An honest pair from elsewhere while the flood runs.
    while next.load(Ordering::Relaxed) < REGISTRATIONS / 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = next.load(Ordering::Relaxed);
    let took = honest_pair(rv.addr, lo(8), lo(9), 3).await;
    let after = next.load(Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let outcomes = outcomes.lock().unwrap().clone();
    eprintln!(
        "{REGISTRATIONS} registrations from one address in {elapsed:?}: {outcomes:#?}\n\
         honest pair met in {took:?} (registrations {during}..{after})\n\
         rendezvous: {:?}\nserver: {:?}",
        rv.rendezvous.stats(),
        rv.server.get()
    );
    assert_eq!(outcomes.values().sum::<usize>(), REGISTRATIONS);
    assert_eq!(outcomes.get("opened"), Some(&16), "{outcomes:#?}");
    assert_eq!(
        outcomes.get("TooMany: too many codes open from your address"),
        Some(&(REGISTRATIONS - 16)),
        "{outcomes:#?}"
    );
    assert_eq!(rv.rendezvous.waiting(), 16);
    assert_eq!(rv.rendezvous.stats().limited, (REGISTRATIONS - 16) as u64);
    assert!(rv.server.get().connections_refused >= 1);

    // The flooder leaves: its nameplates go with its connections.
    drop(held);
    for client in &clients {
        client.connection().close(0u32.into(), b"bye");
    }
    let deadline = Instant::now() + STEP;
    while rv.rendezvous.waiting() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rv.rendezvous.waiting(), 0, "nameplates left behind");
}

// ---------------------------------------------------------------------------------------
// 1.3 Unknown and expired nameplates, guessing, join rate
// ---------------------------------------------------------------------------------------

/// Expect `result` to be a refusal with `code`; returns its message.
fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Refused { code: got, message }) if got == code => message,
        other => panic!("expected a {code:?} refusal, got {other:?}"),
    }
}

/// Joins to a nameplate never opened, to one that expired after its PAKE message, and to
/// one that expired before it: `unknown_nameplate` for joins, `expired` for the waiting
/// receiver (in both cases: a registration that never sent its PAKE message is told it
/// expired, not that it broke the protocol), and nothing is left behind.
#[tokio::test]
async fn unknown_and_expired_nameplates_are_refused_clearly() {
    let rv = serve(RendezvousConfig {
        max_ttl: Duration::from_millis(300),
        ..RendezvousConfig::default()
    });
    let receiver = node_on(lo(11), false);
    let rclient = connect(&receiver, rv.addr).await;
    let sender = node_on(lo(12), false);
    let sclient = connect(&sender, rv.addr).await;
    let pake = some_pake(&Nameplate::from(1));

    let never: Nameplate = "4242".parse().unwrap();
    let message = refusal(
        sclient.join(&never, &pake).await,
        ErrorCode::UnknownNameplate,
    );
    assert!(message.contains("no receiver is waiting"), "{message}");

    // Expires while waiting for a sender.
    let (mut exchange, opened) = rclient.open(None, Duration::from_secs(60)).await.unwrap();
    exchange.pake(&some_pake(&opened.nameplate)).await.unwrap();
    let message = refusal(exchange.paired().await, ErrorCode::Expired);
    assert!(
        message.contains("nobody used the code in time"),
        "{message}"
    );
    refusal(
        sclient.join(&opened.nameplate, &pake).await,
        ErrorCode::UnknownNameplate,
    );

    // Expires before the receiver even sent its PAKE message.
    let (mut exchange, opened) = rclient.open(None, Duration::from_secs(60)).await.unwrap();
    let message = refusal(exchange.next().await, ErrorCode::Expired);
    assert!(message.contains("expired"), "{message}");
    refusal(
        sclient.join(&opened.nameplate, &pake).await,
        ErrorCode::UnknownNameplate,
    );

    let stats = rv.rendezvous.stats();
    assert_eq!(
        (stats.expired, stats.unknown, stats.malformed),
        (2, 3, 0),
        "{stats:?}"
    );
    assert_eq!(rv.rendezvous.waiting(), 0);
}

/// A rendezvous holding as many nameplates as it may says so (`too_many`), and serves
/// again once one is free.
#[tokio::test]
async fn a_full_rendezvous_says_it_is_full() {
    let rv = serve(RendezvousConfig {
        max_nameplates: 2,
        ..RendezvousConfig::default()
    });
    let mut held = Vec::new();
    for n in 22..24 {
        let node = node_on(lo(n), false);
        let client = connect(&node, rv.addr).await;
        let (exchange, _) = client.open(None, Duration::from_secs(60)).await.unwrap();
        held.push((node, client, exchange));
    }
    let late = node_on(lo(24), false);
    let client = connect(&late, rv.addr).await;
    let message = refusal(
        client.open(None, Duration::from_secs(60)).await,
        ErrorCode::TooMany,
    );
    assert!(message.contains("the rendezvous is full"), "{message}");
    drop(held.pop());
    let deadline = Instant::now() + STEP;
    while rv.rendezvous.waiting() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .open(None, Duration::from_secs(60))
        .await
        .expect("room again");
}

/// A guess (a join with the right nameplate and wrong words) burns the nameplate: the
/// receiver and the guesser are both told the code did not match, and every later join,
/// even with the right code, gets `unknown_nameplate`. A guesser that joins and simply
/// leaves burns it too, and the receiver is told the other side left.
#[tokio::test]
async fn a_wrong_guess_burns_the_nameplate_and_both_sides_are_told() {
    let rv = serve(RendezvousConfig::default());
    let out = common::tempdir();

    // A guesser that runs the whole meeting with a wrong word.
    let (rnode, receiver) = receiving_on(lo(13), out.path());
    let rclient = connect(&rnode, rv.addr).await;
    let (welcoming, code) = welcome(rnode.clone(), receiver.clone(), rclient, None);
    let code = code.await.unwrap();
    let guesser = node_on(lo(14), false);
    let gclient = connect(&guesser, rv.addr).await;
    let guessed = meeting(&guesser, &gclient, &Silent)
        .dial(&common::wrong_code(&code))
        .await;
    let welcomed = welcoming.await.unwrap();
    eprintln!("guesser: {guessed:?}\nreceiver: {welcomed:?}");
    assert!(refused_as_wrong_code(&guessed), "{guessed:?}");
    assert!(refused_as_wrong_code(&welcomed), "{welcomed:?}");
    for text in [
        guessed.unwrap_err().to_string(),
        welcomed.unwrap_err().to_string(),
    ] {
        assert!(text.contains("the code did not match"), "{text}");
    }
    // The right code is no use now, from anywhere.
    let late = node_on(lo(15), false);
    let lclient = connect(&late, rv.addr).await;
    let retry = meeting(&late, &lclient, &Silent).dial(&code).await;
    assert!(
        matches!(
            retry,
            Err(MeetError::Rendezvous(ClientError::Refused {
                code: ErrorCode::UnknownNameplate,
                ..
            }))
        ),
        "{retry:?}"
    );

    // A guesser that joins with any PAKE message and goes away.
    let rclient = connect(&rnode, rv.addr).await;
    let (welcoming, code) = welcome(rnode.clone(), receiver.clone(), rclient, None);
    let code = code.await.unwrap();
    let (exchange, _paired) = gclient
        .join(code.nameplate(), &some_pake(code.nameplate()))
        .await
        .unwrap();
    drop(exchange);
    let welcomed = welcoming.await.unwrap();
    let text = match &welcomed {
        Err(MeetError::PeerFailed(_)) => welcomed.unwrap_err().to_string(),
        other => panic!("the receiver should be told the guesser left: {other:?}"),
    };
    assert!(text.contains("left before finishing"), "{text}");
    refusal(
        lclient
            .join(code.nameplate(), &some_pake(code.nameplate()))
            .await,
        ErrorCode::UnknownNameplate,
    );
    assert_eq!(rv.rendezvous.waiting(), 0);
    assert_eq!(rv.rendezvous.stats().paired, 2);
    assert!(common::list_dir(out.path()).is_empty());
}

/// Guessing is slow: joins are rate limited per source (a burst of 8, then one a second).
/// 40 joins from one address as fast as it can: at most the burst and what refilled is
/// answered, the rest are refused with `rate_limited`; another address is unaffected.
#[tokio::test]
async fn joins_are_rate_limited_per_source() {
    const JOINS: usize = 40;
    let rv = serve(RendezvousConfig::default());
    let guesser = node_on(lo(16), false);
    let client = connect(&guesser, rv.addr).await;
    let pake = some_pake(&Nameplate::from(1));
    let started = Instant::now();
    let (mut unknown, mut limited) = (0, 0);
    for n in 0..JOINS {
        let nameplate = Nameplate::from(1000 + n as u32);
        match client.join(&nameplate, &pake).await {
            Err(ClientError::Refused {
                code: ErrorCode::UnknownNameplate,
                ..
            }) => unknown += 1,
            Err(ClientError::Refused {
                code: ErrorCode::RateLimited,
                message,
            }) => {
                assert!(message.contains("too many joins"), "{message}");
                limited += 1;
            }
            other => panic!("join {n}: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("{JOINS} joins in {elapsed:?}: {unknown} answered, {limited} rate limited");
    let allowed = 8 + elapsed.as_secs_f64().ceil() as usize;
    assert!(
        unknown >= 8 && unknown <= allowed,
        "{unknown} answered (allowed {allowed})"
    );
    assert_eq!(unknown + limited, JOINS);
    assert_eq!(rv.rendezvous.stats().limited, limited as u64);
    assert_eq!(rv.rendezvous.stats().unknown, unknown as u64);
    // Someone else is not limited by the guesser.
    let other = node_on(lo(17), false);
    let oclient = connect(&other, rv.addr).await;
    refusal(
        oclient.join(&Nameplate::from(999), &pake).await,
        ErrorCode::UnknownNameplate,
    );
}

/// A nameplate taken by a join may be opened again (a chosen one at once; a random one is
/// soon drawn again): the end of the first pairing must not free the new registration.
/// A sender may join between the receiver's `open` (when the code is shown) and its PAKE
/// message (which a lossy path may delay): the join waits for it and pairs, instead of
/// being told nobody waits. An unknown nameplate is still refused at once.
#[tokio::test]
async fn a_join_before_the_receivers_pake_message_waits_for_it() {
    let rv = serve(RendezvousConfig::default());
    let nameplate: Nameplate = "78".parse().unwrap();
    let receiver = connect(&node_on(lo(26), false), rv.addr).await;
    let sender = connect(&node_on(lo(27), false), rv.addr).await;
    let (mut opened, _) = receiver
        .open(Some(&nameplate), Duration::from_secs(60))
        .await
        .unwrap();
    let joining = tokio::spawn(async move {
        sender
            .join(&"78".parse().unwrap(), &some_pake(&"78".parse().unwrap()))
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !joining.is_finished(),
        "the join waits for the PAKE message"
    );
    let pake = some_pake(&nameplate);
    opened.pake(&pake).await.unwrap();
    let (_exchange, paired) = joining
        .await
        .unwrap()
        .expect("paired once the PAKE arrived");
    assert_eq!(paired.pake, pake);
    opened.paired().await.unwrap();

    let stranger = connect(&node_on(lo(28), false), rv.addr).await;
    let started = Instant::now();
    let unknown = stranger
        .join(&"79".parse().unwrap(), &some_pake(&"79".parse().unwrap()))
        .await;
    refusal(unknown, ErrorCode::UnknownNameplate);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_reused_nameplate_survives_the_end_of_the_previous_pairing() {
    let rv = serve(RendezvousConfig::default());
    let nameplate: Nameplate = "77".parse().unwrap();
    let clients: Vec<RendezvousClient> = {
        let mut clients = Vec::new();
        for n in 18..22 {
            let node = node_on(lo(n), false);
            clients.push(connect(&node, rv.addr).await);
        }
        clients
    };
    let [first_receiver, first_sender, second_receiver, second_sender] = &clients[..] else {
        unreachable!()
    };
    let ttl = Duration::from_secs(60);
    let (mut a, _) = first_receiver.open(Some(&nameplate), ttl).await.unwrap();
    a.pake(&some_pake(&nameplate)).await.unwrap();
    let (s1, _) = first_sender
        .join(&nameplate, &some_pake(&nameplate))
        .await
        .unwrap();
    a.paired().await.unwrap();
    // Taken, so free to open again.
    let (mut b, _) = second_receiver.open(Some(&nameplate), ttl).await.unwrap();
    let b_pake = some_pake(&nameplate);
    b.pake(&b_pake).await.unwrap();
    // The first pairing ends, each side giving up in turn, and then the sender leaving.
    let mut s1 = s1;
    s1.fail("the sender gives up").await.unwrap();
    assert!(
        matches!(a.sealed().await, Ok(Err(_))),
        "the receiver is told"
    );
    a.fail("the receiver gives up").await.unwrap();
    assert!(
        matches!(s1.sealed().await, Ok(Err(_))),
        "the sender is told"
    );
    s1.finish(STEP).await;
    // The rendezvous ends the receiver's exchange once its partner's is over: it lets go
    // of what that exchange registered first, and then closes the stream. So once the
    // stream is closed here, the release has happened (no time to guess).
    assert!(
        matches!(a.next().await, Err(ClientError::Closed)),
        "the first pairing's exchange ends"
    );
    first_receiver.connection().close(0u32.into(), b"bye");
    first_sender.connection().close(0u32.into(), b"bye");
    assert_eq!(
        rv.rendezvous.waiting(),
        1,
        "the second registration is still there"
    );
    let (_s2, paired) = second_sender
        .join(&nameplate, &some_pake(&nameplate))
        .await
        .expect("the second receiver is still waiting");
    assert_eq!(paired.pake, b_pake, "paired with the second receiver");
    b.paired().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 1.4 Memory
// ---------------------------------------------------------------------------------------

/// Peak memory of `qpunch rendezvous` per registration (a connection from its own address
/// holding an open nameplate with its PAKE message), measured over this many.
const HELD: usize = 400;

/// What one registration may cost the rendezvous at most, in bytes, as asserted below.
/// Measured growth of `VmHWM` over [`HELD`] registrations: about 40 KiB each with the debug
/// build the tests run, about 19 KiB with a release build (`cargo bench --bench
/// rendezvous`, 1000 registrations): almost all of it the QUIC connection (quinn's state,
/// TLS secrets, buffers) and its tasks; the nameplate itself is a few dozen bytes.
///
/// The bound for the default limits follows. At most 4096 connections at once, each with
/// at most 2 streams, so at most 8192 nameplates can ever be held (below the 10,000
/// nameplate limit). Honest receivers holding all of them cost at most
/// 4096 × 2 × `PER_REGISTRATION` = 512 MiB above the idle size (about 12 MiB); the
/// measured figures put it at 160 to 320 MiB. Connections doing their worst instead cost
/// at most [`PER_STUCK_CONNECTION`] each: 4096 × 160 KiB = 640 MiB. Junk adds nothing that
/// lasts: quinn buffers at most 8 MiB of early datagrams, and the probe limiter tracks at
/// most 4096 sources.
const PER_REGISTRATION: u64 = 64 << 10;

/// `qpunch rendezvous` serving on loopback in a process of its own (so its memory is its
/// alone): its home (keep it), the process and its address.
fn rendezvous_process() -> (common::Home, common::Proc, SocketAddr) {
    let home = common::Home::new();
    let (proc, port, _) = common::rendezvous_anywhere(&home);
    (home, proc, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Hold a registration at the rendezvous on `addr` from `ip`: connect, open, send the
/// PAKE message. Everything returned must be kept alive to keep it.
async fn register(ip: IpAddr, addr: SocketAddr) -> (Arc<Node>, RendezvousClient, Exchange) {
    let node = node_on(ip, false);
    let client = connect(&node, addr).await;
    let (mut exchange, opened) = client
        .open(None, Duration::from_secs(600))
        .await
        .expect("open");
    exchange.pake(&some_pake(&opened.nameplate)).await.unwrap();
    (node, client, exchange)
}

/// `qpunch rendezvous` with [`HELD`] registrations from as many addresses: its peak memory
/// stays under its idle size plus [`PER_REGISTRATION`] each (see there for the bound with
/// the default limits).
#[test]
fn memory_per_registration_is_bounded() {
    let (_home, proc, addr) = rendezvous_process();
    let pid = proc.id();
    let kib = |field| common::sys::status_field(pid, field).expect("rendezvous alive") * 1024;
    let rt = runtime();
    let (idle, peak, rss) = rt.block_on(async {
        // Warm up (first connections, first allocations of every kind), then let go.
        let warm: Vec<_> =
            futures_util::future::join_all((0..8).map(|i| register(source(i), addr))).await;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let idle = kib("VmRSS");
        let mut held = Vec::new();
        for batch in 0..HELD / 50 {
            let ips = (0..50).map(|i| source(8 + batch * 50 + i));
            held.extend(futures_util::future::join_all(ips.map(|ip| register(ip, addr))).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (peak, rss) = (kib("VmHWM"), kib("VmRSS"));
        drop(held);
        (idle, peak, rss)
    });
    let finished = proc.interrupt(common::SHORT);
    let per = peak.saturating_sub(idle) / HELD as u64;
    eprintln!(
        "rendezvous: idle {:.1} MiB, {HELD} registrations: peak {:.1} MiB, now {:.1} MiB; \
         {:.1} KiB per registration (bound {} KiB)",
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        rss as f64 / 1048576.0,
        per as f64 / 1024.0,
        PER_REGISTRATION >> 10
    );
    assert!(
        peak <= idle + HELD as u64 * PER_REGISTRATION,
        "peak {peak} B over idle {idle} B + {HELD} x {PER_REGISTRATION} B"
    );
    let stats = finished.one("stats");
    assert!(
        stats["connections_accepted"].as_u64().unwrap() >= HELD as u64,
        "{stats}"
    );
}

// =======================================================================================
// A rendezvous that lies
// =======================================================================================

/// One exchange (stream) a client opened on the [`Liar`], with its first request.
struct Ex {
    /// The client's address as the liar sees it.
    observed: SocketAddr,
    first: Request,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Ex {
    async fn say(&mut self, response: &Response) {
        frame::write(&mut self.send, response)
            .await
            .expect("the liar's message is sent");
    }

    /// The client's next request (`None` once it has nothing more to say).
    async fn hear(&mut self) -> Option<Request> {
        tokio::time::timeout(STEP, frame::read(&mut self.recv, rendezvous::MAX_MESSAGE))
            .await
            .ok()?
            .ok()?
    }

    /// The client's next request, which must be `Pake`: its PAKE message.
    async fn pake(&mut self) -> Vec<u8> {
        match self.hear().await {
            Some(Request::Pake { pake }) => unhex(&pake),
            other => panic!("expected the receiver's PAKE message, got {other:?}"),
        }
    }

    /// The client's next request, which must be `Seal`: its sealed hello.
    async fn sealed(&mut self) -> Vec<u8> {
        match self.hear().await {
            Some(Request::Seal { sealed }) => unhex(&sealed),
            other => panic!("expected a sealed hello, got {other:?}"),
        }
    }

    /// For a `Join`: its PAKE message.
    fn join_pake(&self) -> Vec<u8> {
        match &self.first {
            Request::Join { pake, .. } => unhex(pake),
            other => panic!("expected a join, got {other:?}"),
        }
    }

    async fn opened(&mut self, nameplate: &str) {
        assert!(
            matches!(self.first, Request::Open { .. }),
            "{:?}",
            self.first
        );
        let observed = self.observed;
        self.say(&Response::Opened {
            nameplate: nameplate.to_string(),
            expires_secs: 60,
            observed,
        })
        .await;
    }

    /// `Paired`, naming `peer` as the peer's address: a field the protocol no longer has
    /// (clients must ignore it), which a lying rendezvous may still send.
    async fn paired(&mut self, pake: &[u8], peer: SocketAddr) {
        let message = serde_json::json!({
            "type": "paired",
            "pake": hex(pake),
            "peer": peer,
            "observed": self.observed,
        });
        frame::write(&mut self.send, &message)
            .await
            .expect("the liar's message is sent");
    }

    async fn seal(&mut self, sealed: &[u8]) {
        self.say(&Response::Sealed {
            sealed: hex(sealed),
        })
        .await;
    }
}

/// Every connection the liar's node saw, by protocol.
#[derive(Debug, Default)]
struct Seen {
    /// Clients of the (fake) rendezvous.
    rendezvous: usize,
    /// Peers that completed a handshake to send files to the liar.
    transfer: usize,
    /// Handshakes that failed (a peer that refused the liar's certificate, for one).
    failed: Vec<String>,
}

/// A lying rendezvous: a qpunch node speaking the rendezvous protocol (and accepting the
/// transfer protocol, in case a peer is fooled into connecting to it), which hands every
/// exchange to the test to script. It never learns the code's words.
struct Liar {
    node: Arc<Node>,
    addr: SocketAddr,
    exchanges: mpsc::Receiver<Ex>,
    seen: Arc<Mutex<Seen>>,
}

impl Liar {
    fn start(ip: IpAddr) -> Liar {
        let socket = qpunch::socket::bind(SocketAddr::new(ip, 0)).unwrap();
        let config = NodeConfig {
            alpn: vec![rendezvous::ALPN.to_vec(), transfer::ALPN.to_vec()],
            ..NodeConfig::new(Identity::generate().unwrap(), rendezvous::ALPN, true)
        };
        let node = Arc::new(Node::new(socket, config).unwrap());
        let addr = node.local_addr().unwrap();
        let (tx, exchanges) = mpsc::channel(16);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (accepting, seen_by_loop) = (node.clone(), seen.clone());
        tokio::spawn(async move {
            while let Some(incoming) = accepting.endpoint().accept().await {
                let (tx, seen) = (tx.clone(), seen_by_loop.clone());
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => {
                            seen.lock().unwrap().failed.push(e.to_string());
                            return;
                        }
                    };
                    let alpn = conn
                        .handshake_data()
                        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                        .and_then(|d| d.protocol);
                    if alpn.as_deref() != Some(rendezvous::ALPN) {
                        seen.lock().unwrap().transfer += 1;
                        // Hold it a moment, like a real impostor would, then hang up.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        conn.close(0u32.into(), b"impostor");
                        return;
                    }
                    seen.lock().unwrap().rendezvous += 1;
                    let observed = conn.remote_address();
                    while let Ok((send, mut recv)) = conn.accept_bi().await {
                        let first = frame::read(&mut recv, rendezvous::MAX_MESSAGE).await;
                        let Ok(Some(first)) = first else { continue };
                        let ex = Ex {
                            observed,
                            first,
                            send,
                            recv,
                        };
                        if tx.send(ex).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Liar {
            node,
            addr,
            exchanges,
            seen,
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        self.node.fingerprint()
    }

    async fn next(&mut self) -> Ex {
        tokio::time::timeout(STEP, self.exchanges.recv())
            .await
            .expect("a client exchange in time")
            .expect("the liar is listening")
    }

    /// The next `n` exchanges, opens first, then joins, each in order of the clients'
    /// addresses.
    async fn next_n(&mut self, n: usize) -> (Vec<Ex>, Vec<Ex>) {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(self.next().await);
        }
        all.sort_by_key(|ex| ex.observed);
        all.into_iter()
            .partition(|ex| matches!(ex.first, Request::Open { .. }))
    }

    /// The receiver's open and the sender's join, whichever came first.
    async fn open_and_join(&mut self) -> (Ex, Ex) {
        let (mut opens, mut joins) = self.next_n(2).await;
        assert_eq!((opens.len(), joins.len()), (1, 1), "one open and one join");
        (opens.remove(0), joins.remove(0))
    }

    /// Wait a little for connection attempts in flight, then report what the node saw.
    async fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.seen.lock().unwrap()
    }
}

/// One honest side of a lie: the nodes, the receiver's directory, the sender's file.
struct Pair {
    out: tempfile::TempDir,
    rnode: Arc<Node>,
    receiver: Arc<Receiver>,
    snode: Arc<Node>,
    _src: tempfile::TempDir,
    file: PathBuf,
}

impl Pair {
    fn new(receiver_ip: IpAddr, sender_ip: IpAddr) -> Pair {
        let out = common::tempdir();
        let (rnode, receiver) = receiving_on(receiver_ip, out.path());
        let snode = node_on(sender_ip, false);
        let (src, file) = source_file(7);
        Pair {
            out,
            rnode,
            receiver,
            snode,
            _src: src,
            file,
        }
    }

    /// Start both meetings through `rendezvous` with `code` (the receiver chooses it).
    async fn meet(
        &self,
        rendezvous: SocketAddr,
        code: &Code,
    ) -> (
        tokio::task::JoinHandle<Result<Welcomed, MeetError>>,
        tokio::task::JoinHandle<Sent>,
    ) {
        let rclient = connect(&self.rnode, rendezvous).await;
        let (welcoming, _) = welcome(
            self.rnode.clone(),
            self.receiver.clone(),
            rclient,
            Some(code.clone()),
        );
        let sclient = connect(&self.snode, rendezvous).await;
        let sending = send_by_code(self.snode.clone(), sclient, code.clone(), self.file.clone());
        (welcoming, sending)
    }

    fn assert_nothing_written(&self) {
        let left = common::list_dir(self.out.path());
        assert!(left.is_empty(), "the receiver wrote {left:?}");
    }
}

fn fresh_code(nameplate: u32) -> Code {
    Code::generate(Nameplate::from(nameplate), &mut rand::rng())
}

/// The hello an impostor would send: its own fingerprint, its own address.
fn impostor_hello(role: Role, liar: &Liar) -> Hello {
    Hello {
        version: pake::VERSION,
        role,
        fingerprint: liar.fingerprint(),
        candidates: vec![liar.addr],
        nat: Mapping::EndpointIndependent.token().to_string(),
    }
}

/// The impostor's script: run its own PAKE with each side using `guess` for the code, and
/// send each a sealed hello with its own fingerprint and address. Returns the meetings'
/// ends once both are over.
async fn impersonate(
    liar: &mut Liar,
    pair: &Pair,
    code: &Code,
    guess: &Code,
) -> (Result<Welcomed, MeetError>, Sent) {
    let (welcoming, sending) = pair.meet(liar.addr, code).await;
    let (mut open, mut join) = liar.open_and_join().await;
    open.opened(code.nameplate().as_str()).await;
    let receiver_pake = open.pake().await;
    let sender_pake = join.join_pake();
    // Toward the receiver it plays the sender, and the other way round.
    let (as_sender, to_receiver) = Pake::start(guess, Role::Sender, &mut rand::rng());
    let (as_receiver, to_sender) = Pake::start(guess, Role::Receiver, &mut rand::rng());
    open.paired(&to_receiver, liar.addr).await;
    join.paired(&to_sender, liar.addr).await;
    let mut with_receiver = as_sender.finish(&receiver_pake).unwrap();
    let mut with_sender = as_receiver.finish(&sender_pake).unwrap();
    // Like a real peer, it answers probes authenticated under its keys (with a wrong
    // guess, nobody's probes verify under them).
    let _answering = (
        liar.node.socket().authenticate(with_receiver.probe_keys()),
        liar.node.socket().authenticate(with_sender.probe_keys()),
    );
    open.seal(
        &with_receiver
            .seal(&impostor_hello(Role::Sender, liar))
            .unwrap(),
    )
    .await;
    join.seal(
        &with_sender
            .seal(&impostor_hello(Role::Receiver, liar))
            .unwrap(),
    )
    .await;
    // What the peers sealed for each other means nothing to it, unless it guessed right.
    let (from_receiver, from_sender) = (open.sealed().await, join.sealed().await);
    let opened = (
        with_receiver.open(&from_receiver).is_ok(),
        with_sender.open(&from_sender).is_ok(),
    );
    assert_eq!(
        opened,
        (guess == code, guess == code),
        "the impostor reads the hellos only with the code"
    );
    let welcomed = welcoming.await.unwrap();
    let sent = sending.await.unwrap();
    // Hold the exchanges until both sides are done: hanging up is not the lie tested here.
    drop((open, join));
    (welcomed, sent)
}

/// The rendezvous answers each side with its own PAKE messages and sealed hellos that
/// carry its own fingerprint, guessing the code's words. Both sides refuse (the hellos do
/// not open), no peer connects to the impostor, nothing is written.
#[tokio::test]
async fn a_rendezvous_substituting_its_own_fingerprint_is_refused() {
    let mut liar = Liar::start(lo(30));
    let pair = Pair::new(lo(31), lo(32));
    let code = fresh_code(7);
    let (welcomed, sent) = impersonate(&mut liar, &pair, &code, &common::wrong_code(&code)).await;
    eprintln!("receiver: {welcomed:?}\nsender: {sent:?}");
    for (side, text) in [
        ("receiver", welcomed.map(drop).unwrap_err().to_string()),
        ("sender", sent.map(drop).unwrap_err().to_string()),
    ] {
        assert!(text.contains("the code did not match"), "{side}: {text}");
    }
    let seen = liar.seen().await;
    assert_eq!((seen.rendezvous, seen.transfer), (2, 0), "{seen:?}");
    assert!(seen.failed.is_empty(), "{seen:?}");
    pair.assert_nothing_written();
}

/// The control for the test above: the same impostor with the right code (an online guess that
/// succeeded, 1 in 65,536) does get the sender to connect to it, so the refusal above
/// comes from the code alone, not from a broken test double.
#[tokio::test]
async fn an_impostor_that_knows_the_code_is_believed() {
    let mut liar = Liar::start(lo(33));
    let pair = Pair::new(lo(34), lo(35));
    let code = fresh_code(8);
    let (welcomed, sent) = impersonate(&mut liar, &pair, &code, &code.clone()).await;
    let welcomed = welcomed.expect("the receiver believes the impostor");
    assert_eq!(welcomed.sender, liar.fingerprint());
    // The sender met "the receiver" (the impostor), which then hung up on its files.
    let sent = sent.expect("the sender believes the impostor");
    assert!(sent.is_err(), "{sent:?}");
    let seen = liar.seen().await;
    assert_eq!((seen.rendezvous, seen.transfer), (2, 1), "{seen:?}");
    pair.assert_nothing_written();
}

/// The liar relays one honest pairing faithfully and records it, then replays it into a
/// new meeting with the same code (a receiver may reuse a chosen code): the old PAKE
/// messages and sealed hellos go to the new receiver and the new sender. Both refuse. The
/// old sender, whose fingerprint the replayed hello carries, gets no ticket.
#[tokio::test]
async fn a_replayed_pairing_is_refused() {
    let mut liar = Liar::start(lo(40));
    let code = fresh_code(9);
    let receiver_identity = Identity::generate().unwrap();

    // An honest meeting, faithfully relayed: the file arrives.
    let first = {
        let out = common::tempdir();
        let (rnode, receiver) = receiving_as(receiver_identity.clone(), lo(41), out.path());
        let snode = node_on(lo(42), false);
        (out, rnode, receiver, snode)
    };
    let (out1, rnode1, receiver1, snode1) = &first;
    let (_src, file) = source_file(9);
    let rclient = connect(rnode1, liar.addr).await;
    let (welcoming, _) = welcome(
        rnode1.clone(),
        receiver1.clone(),
        rclient,
        Some(code.clone()),
    );
    let sclient = connect(snode1, liar.addr).await;
    let sending = send_by_code(snode1.clone(), sclient, code.clone(), file.clone());
    let (mut open, mut join) = liar.open_and_join().await;
    open.opened(code.nameplate().as_str()).await;
    let old_receiver_pake = open.pake().await;
    let old_sender_pake = join.join_pake();
    let (receiver_at, sender_at) = (open.observed, join.observed);
    open.paired(&old_sender_pake, sender_at).await;
    join.paired(&old_receiver_pake, receiver_at).await;
    let old_receiver_hello = open.sealed().await;
    let old_sender_hello = join.sealed().await;
    open.seal(&old_sender_hello).await;
    join.seal(&old_receiver_hello).await;
    // Kept while the sender uses its connection: the receiver's side runs on its paths.
    let _welcomed = welcoming.await.unwrap().expect("the relayed meeting works");
    let reports = sending
        .await
        .unwrap()
        .expect("the relayed sender met the receiver")
        .expect("the relayed transfer");
    assert!(reports[0].is_verified(), "{reports:?}");
    assert_eq!(common::list_dir(out1.path()).len(), 1);
    drop((open, join));

    // The replay: same receiver key, same code, a new sender.
    let out2 = common::tempdir();
    let (rnode2, receiver2) = receiving_as(receiver_identity, lo(43), out2.path());
    let snode2 = node_on(lo(44), false);
    let rclient = connect(&rnode2, liar.addr).await;
    let (welcoming, _) = welcome(
        rnode2.clone(),
        receiver2.clone(),
        rclient,
        Some(code.clone()),
    );
    let sclient = connect(&snode2, liar.addr).await;
    let sending = send_by_code(snode2.clone(), sclient, code.clone(), file.clone());
    let (mut open, mut join) = liar.open_and_join().await;
    open.opened(code.nameplate().as_str()).await;
    let _fresh = open.pake().await;
    open.paired(&old_sender_pake, sender_at).await;
    join.paired(&old_receiver_pake, receiver_at).await;
    let _ = (open.sealed().await, join.sealed().await);
    open.seal(&old_sender_hello).await;
    join.seal(&old_receiver_hello).await;
    let welcomed = welcoming.await.unwrap();
    let sent = sending.await.unwrap();
    eprintln!("receiver: {welcomed:?}\nsender: {sent:?}");
    assert!(
        matches!(welcomed, Err(MeetError::WrongCode)),
        "{welcomed:?}"
    );
    assert!(matches!(sent, Err(MeetError::WrongCode)), "{sent:?}");
    assert!(
        sent.unwrap_err()
            .to_string()
            .contains("the code did not match")
    );
    // Had the replayed hello been believed, the old sender would hold a ticket now.
    common::assert_sender_refused(snode1, &rnode2, &file).await;
    let seen = liar.seen().await;
    assert_eq!((seen.rendezvous, seen.transfer), (4, 0), "{seen:?}");
    let left = common::list_dir(out2.path());
    assert!(left.is_empty(), "the receiver wrote {left:?}");
}

/// Two concurrent pairings, both told the same nameplate (the liar can do that): how the
/// liar crosses them.
#[derive(Debug, Clone, Copy)]
enum Mix {
    /// Pair each receiver with the other pairing's sender, end to end.
    Partners,
    /// PAKE messages stay within each pairing, sealed hellos are swapped between them.
    Hellos,
}

/// Two pairings (A and B, codes with the same nameplate and different words) mixed by the
/// liar: all four meetings are refused, nothing is written.
async fn mixed_pairings(mix: Mix, base: u8) {
    let mut liar = Liar::start(lo(base));
    let a = Pair::new(lo(base + 1), lo(base + 2));
    let b = Pair::new(lo(base + 3), lo(base + 4));
    let code_a = fresh_code(5);
    let code_b = {
        let mut code = fresh_code(5);
        while code == code_a {
            code = fresh_code(5);
        }
        code
    };
    let (welcoming_a, sending_a) = a.meet(liar.addr, &code_a).await;
    let (welcoming_b, sending_b) = b.meet(liar.addr, &code_b).await;
    // Sorted by address: receiver A, receiver B; sender A, sender B.
    let (mut opens, mut joins) = liar.next_n(4).await;
    assert_eq!((opens.len(), joins.len()), (2, 2));
    for open in &mut opens {
        open.opened("5").await;
    }
    let receiver_pakes = [opens[0].pake().await, opens[1].pake().await];
    let sender_pakes = [joins[0].join_pake(), joins[1].join_pake()];
    let sender_addrs = [joins[0].observed, joins[1].observed];
    let receiver_addrs = [opens[0].observed, opens[1].observed];
    // Receiver i hears the PAKE message of sender `pake_from[i]`, and its hello from
    // sender `hello_from[i]` (and the same the other way round).
    let (pake_from, hello_from) = match mix {
        Mix::Partners => ([1, 0], [1, 0]),
        Mix::Hellos => ([0, 1], [1, 0]),
    };
    for i in 0..2 {
        opens[i]
            .paired(&sender_pakes[pake_from[i]], sender_addrs[pake_from[i]])
            .await;
        joins[pake_from[i]]
            .paired(&receiver_pakes[i], receiver_addrs[i])
            .await;
    }
    let receiver_hellos = [opens[0].sealed().await, opens[1].sealed().await];
    let sender_hellos = [joins[0].sealed().await, joins[1].sealed().await];
    for i in 0..2 {
        opens[i].seal(&sender_hellos[hello_from[i]]).await;
        joins[hello_from[i]].seal(&receiver_hellos[i]).await;
    }
    let results = [
        ("receiver A", welcoming_a.await.unwrap().map(drop)),
        ("receiver B", welcoming_b.await.unwrap().map(drop)),
        ("sender A", sending_a.await.unwrap().map(drop)),
        ("sender B", sending_b.await.unwrap().map(drop)),
    ];
    eprintln!("{mix:?}: {results:?}");
    for (side, result) in &results {
        assert!(refused_as_wrong_code(result), "{side}: {result:?}");
    }
    drop((opens, joins));
    let seen = liar.seen().await;
    assert_eq!((seen.rendezvous, seen.transfer), (4, 0), "{seen:?}");
    assert!(seen.failed.is_empty(), "{seen:?}");
    a.assert_nothing_written();
    b.assert_nothing_written();
}

/// Two pairings crossed end to end (receiver A with sender B, receiver B with
/// sender A): all four refuse.
#[tokio::test]
async fn crossed_partners_of_two_pairings_are_refused() {
    mixed_pairings(Mix::Partners, 50).await;
}

/// Two pairings whose PAKE messages are relayed honestly but whose sealed hellos are
/// swapped between them: all four refuse.
#[tokio::test]
async fn hellos_swapped_between_two_pairings_are_refused() {
    mixed_pairings(Mix::Hellos, 60).await;
}

/// (d) A would-be man in the middle on the path: the liar relays the PAKE and the hellos
/// faithfully (it cannot change them) but names itself as each side's peer, and holds the
/// hellos back for a while, answering probes. Version 1 of the protocol punched toward the
/// named address at once, found the liar's answering socket and connected to it (refused
/// only by the pin). Now nobody probes an address the rendezvous names: both sides wait for
/// the sealed hellos, meet each other directly, and the file arrives.
#[tokio::test]
async fn a_rendezvous_redirecting_the_peers_to_itself_is_not_followed() {
    let mut liar = Liar::start(lo(70));
    let pair = Pair::new(lo(71), lo(72));
    let code = fresh_code(11);
    let (welcoming, sending) = pair.meet(liar.addr, &code).await;
    let (mut open, mut join) = liar.open_and_join().await;
    open.opened(code.nameplate().as_str()).await;
    let receiver_pake = open.pake().await;
    let sender_pake = join.join_pake();
    open.paired(&sender_pake, liar.addr).await;
    join.paired(&receiver_pake, liar.addr).await;
    let (receiver_hello, sender_hello) = (open.sealed().await, join.sealed().await);
    // Version 1 punched toward the liar now, and it answered their probes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    open.seal(&sender_hello).await;
    join.seal(&receiver_hello).await;
    let welcomed = welcoming.await.unwrap();
    let sent = sending.await.unwrap();
    eprintln!("receiver: {welcomed:?}\nsender: {sent:?}");
    let welcomed = welcomed.expect("the receiver's side of the meeting completes");
    assert_eq!(
        welcomed.path.as_ref().unwrap().peer,
        pair.snode.local_addr().unwrap()
    );
    assert_eq!(welcomed.sender, pair.snode.fingerprint());
    let sent = sent
        .expect("the sender met the receiver")
        .expect("the file was sent");
    assert!(sent[0].is_verified(), "{sent:?}");
    assert_eq!(
        liar.node.socket().stats().probes_answered,
        0,
        "no probe went to the address the liar named"
    );
    let seen = liar.seen().await;
    assert_eq!((seen.rendezvous, seen.transfer), (2, 0), "{seen:?}");
    assert!(seen.failed.is_empty(), "nobody tried the liar: {seen:?}");
}

/// (e) A rendezvous aiming probes at a victim: it relays every sealed message untouched
/// (so both sides find "the code matched") but names a victim's address as each side's
/// peer. Version 1 probed it before the hello opened, and made it the birthday target
/// (~6,600 probes per meeting in the measurement). Now the victim, a socket that
/// counts what reaches it, gets nothing, and the honest meeting still succeeds.
#[tokio::test]
async fn a_rendezvous_lying_about_the_peer_address_aims_no_probe_at_the_victim() {
    let victim = tokio::net::UdpSocket::bind(SocketAddr::new(lo(80), 0))
        .await
        .unwrap();
    let victim_addr = victim.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counting = {
        let hits = hits.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while victim.recv_from(&mut buf).await.is_ok() {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut liar = Liar::start(lo(81));
    let pair = Pair::new(lo(82), lo(83));
    let code = fresh_code(12);
    let (welcoming, sending) = pair.meet(liar.addr, &code).await;
    let (mut open, mut join) = liar.open_and_join().await;
    open.opened(code.nameplate().as_str()).await;
    let receiver_pake = open.pake().await;
    let sender_pake = join.join_pake();
    open.paired(&sender_pake, victim_addr).await;
    join.paired(&receiver_pake, victim_addr).await;
    // Relay the hellos untouched, a little late (version 1 was probing the victim by now).
    let (receiver_hello, sender_hello) = (open.sealed().await, join.sealed().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    open.seal(&sender_hello).await;
    join.seal(&receiver_hello).await;
    let welcomed = welcoming
        .await
        .unwrap()
        .expect("the receiver met the sender");
    let sent = sending.await.unwrap();
    let sent = sent
        .expect("the sender met the receiver")
        .expect("the file was sent");
    assert!(sent[0].is_verified(), "{sent:?}");
    assert_eq!(
        welcomed.path.as_ref().unwrap().peer,
        pair.snode.local_addr().unwrap()
    );
    // Anything in flight (a beacon, a late retransmission) has arrived by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    counting.abort();
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "datagrams reached the victim the rendezvous named"
    );
    drop((open, join));
}

/// A connection that makes the rendezvous hold as much as it can: both of its streams
/// open a nameplate, then it never reads (its stream windows are 1 byte, so every answer
/// is stuck) and sends 8 KiB requests until the rendezvous stops taking them.
async fn stuck_connection(ip: IpAddr, addr: SocketAddr) -> Stuck {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.grease_quic_bit(false);
    let endpoint =
        quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).unwrap();
    let identity = Identity::generate().unwrap();
    let (crypto, _) =
        qpunch::tls::client_crypto(&identity, None, &[rendezvous::ALPN.to_vec()]).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(1u32.into());
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    let conn = endpoint
        .connect_with(config, addr, qpunch::tls::SERVER_NAME)
        .unwrap()
        .await
        .expect("handshake");
    let big = Request::Fail {
        reason: "x".repeat(rendezvous::MAX_MESSAGE - 40),
    };
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let open = Request::Open {
            nameplate: None,
            ttl_secs: 600,
        };
        frame::write(&mut send, &open).await.unwrap();
        streams.push((send, recv));
    }
    // On both streams, until flow control stops us (the rendezvous's connection window
    // is shared by its streams), or enough.
    for _ in 0..16 {
        let mut took = 0;
        for (send, _) in &mut streams {
            let write = frame::write(send, &big);
            if tokio::time::timeout(Duration::from_millis(200), write)
                .await
                .is_ok()
            {
                took += 1;
            }
        }
        if took == 0 {
            break;
        }
    }
    (endpoint, conn, streams)
}

/// What a [`stuck_connection`] must keep alive.
type Stuck = (
    quinn::Endpoint,
    quinn::Connection,
    Vec<(quinn::SendStream, quinn::RecvStream)>,
);

/// What a connection doing its worst ([`stuck_connection`]: two nameplates, answers it
/// never reads, requests until flow control stops it) may cost the rendezvous at most.
/// Measured (debug build): about 109 KiB: the connection itself, two sessions, the 16 KiB
/// receive window a rendezvous grants, and two parsed requests of up to 8 KiB per stream
/// (before the rendezvous had its own window and a one-deep request queue: 207 KiB). Every
/// stuck answer is abandoned after 10 s, with the session and its nameplate.
const PER_STUCK_CONNECTION: u64 = 160 << 10;

/// Connections that do the worst they can (see [`stuck_connection`]): `qpunch rendezvous`
/// stays under its idle size plus [`PER_STUCK_CONNECTION`] each.
#[test]
fn memory_per_stuck_connection_is_bounded() {
    const STUCK: usize = 100;
    let (_home, proc, addr) = rendezvous_process();
    let pid = proc.id();
    let kib = |field| common::sys::status_field(pid, field).expect("rendezvous alive") * 1024;
    let rt = runtime();
    let (idle, peak) = rt.block_on(async {
        let warm: Vec<_> =
            futures_util::future::join_all((0..8).map(|i| register(source(i), addr))).await;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let idle = kib("VmRSS");
        let mut held = Vec::new();
        for batch in 0..STUCK / 25 {
            let ips = (0..25).map(|i| source(8 + batch * 25 + i));
            held.extend(
                futures_util::future::join_all(ips.map(|ip| stuck_connection(ip, addr))).await,
            );
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let peak = kib("VmHWM");
        drop(held);
        (idle, peak)
    });
    let _ = proc.interrupt(common::SHORT);
    let per = peak.saturating_sub(idle) / STUCK as u64;
    eprintln!(
        "rendezvous: idle {:.1} MiB, {STUCK} stuck connections: peak {:.1} MiB: {:.1} KiB each",
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        per as f64 / 1024.0,
    );
    assert!(
        peak <= idle + STUCK as u64 * PER_STUCK_CONNECTION,
        "peak {peak} B over idle {idle} B + {STUCK} x {PER_STUCK_CONNECTION} B"
    );
}

/// A client that never reads the answers does not keep its nameplates: each answer waits
/// at most the write timeout, then the exchange is dropped with its nameplate.
#[tokio::test]
async fn a_client_that_does_not_read_loses_its_nameplates() {
    let rv = serve(RendezvousConfig {
        write_timeout: Duration::from_millis(300),
        ..RendezvousConfig::default()
    });
    let _stuck = stuck_connection(lo(25), rv.addr).await;
    assert_eq!(rv.rendezvous.stats().opened, 2);
    let deadline = Instant::now() + STEP;
    while rv.rendezvous.waiting() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rv.rendezvous.waiting(),
        0,
        "nameplates held by a client that never reads"
    );
}

/// A connection that holds no exchange is closed after the grace, however alive its
/// keep-alives keep it, and a stream that never says anything does not count as one (129
/// /64s once held every slot of a rendezvous for minutes this way, refusing everyone). A
/// connection holding a nameplate stays, and its receiver is still paired after the grace.
#[tokio::test]
async fn idle_connections_are_evicted_and_holders_are_kept() {
    let grace = Duration::from_millis(600);
    let rv = serve(RendezvousConfig {
        idle_grace: grace,
        ..RendezvousConfig::default()
    });
    let holder = node_on(lo(71), false);
    let hclient = connect(&holder, rv.addr).await;
    let (mut exchange, opened) = hclient.open(None, Duration::from_secs(60)).await.unwrap();
    exchange.pake(&some_pake(&opened.nameplate)).await.unwrap();

    let idler = node_on(lo(72), false);
    let iclient = connect(&idler, rv.addr).await;
    iclient.info().await.expect("an answer before the grace");
    // Half a frame's length on a stream of its own: a session that never starts.
    let (mut silent, _recv) = iclient.connection().open_bi().await.unwrap();
    silent.write_all(&[0, 0]).await.unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(STEP, iclient.connection().closed())
        .await
        .expect("the idle connection is closed by the rendezvous");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == rendezvous::IDLE_CLOSE.into()),
        "{closed:?}"
    );
    assert!(started.elapsed() >= grace / 2, "not before the grace");
    assert_eq!(rv.rendezvous.stats().evicted, 1);

    // The holder outlived the grace: a sender joins its nameplate and both are paired.
    assert!(hclient.connection().close_reason().is_none());
    let sender = node_on(lo(73), false);
    let sclient = connect(&sender, rv.addr).await;
    let joined = sclient
        .join(&opened.nameplate, &some_pake(&opened.nameplate))
        .await;
    assert!(joined.is_ok(), "{joined:?}");
    let paired = tokio::time::timeout(STEP, exchange.paired()).await.unwrap();
    assert!(paired.is_ok(), "{paired:?}");
    assert_eq!(rv.rendezvous.stats().evicted, 1, "only the idler");
}

/// A lying rendezvous names a victim as its second address and as its IPv6 one: `nat-check`
/// probes only addresses that are plausibly the rendezvous's own (the same /24 or /48, or
/// what its name resolved to), so not one probe reaches the victim. Before, up to three
/// targets of the rendezvous's choosing were probed.
#[tokio::test]
async fn nat_check_probes_no_address_a_lying_rendezvous_names() {
    let mut liar = Liar::start(lo(81));
    // The victim listens where the liar points: another /24, the rendezvous's port.
    let victim_ip = IpAddr::from([127, 0, 1, 81]);
    let victim = UdpSocket::bind(SocketAddr::new(victim_ip, liar.addr.port())).unwrap();
    victim.set_nonblocking(true).unwrap();
    let node = node_on(lo(82), false);
    let client = connect(&node, liar.addr).await;
    let liar_port = liar.addr.port();
    let checking = tokio::spawn(async move { qpunch::natcheck::check(&node, &client).await });
    let answering = async {
        loop {
            let mut ex = liar.next().await;
            let answer = match ex.first {
                Request::Info => Response::Welcome {
                    version: rendezvous::VERSION,
                    observed: ex.observed,
                    addrs: vec![victim_ip, "2001:db8::81".parse().unwrap()],
                    alt_port: liar_port + 1,
                },
                _ => Response::Error {
                    code: ErrorCode::Unsupported,
                    message: "no".into(),
                },
            };
            ex.say(&answer).await;
        }
    };
    let report = tokio::select! {
        report = checking => report.unwrap(),
        () = answering => unreachable!(),
    };
    let report = report.expect("the check completes");
    let mut probes = 0;
    let mut buf = [0u8; 2048];
    while victim.recv_from(&mut buf).is_ok() {
        probes += 1;
    }
    assert_eq!(probes, 0, "probes sent to the victim ({report:?})");
    assert!(
        report
            .observations
            .iter()
            .all(|(target, _)| target.ip() != victim_ip),
        "{report:?}"
    );
}

/// Asking for a chosen nameplate tells whether it is waiting (`taken`), so each ask is
/// charged to the join limit: a guesser finding live nameplates that way gets the join
/// burst, then `rate_limited`, where it used to get ~1,300 answers a second.
#[tokio::test]
async fn chosen_nameplate_lookups_are_charged_to_the_join_limit() {
    let rv = serve(RendezvousConfig::default());
    let receiver = node_on(lo(91), false);
    let rclient = connect(&receiver, rv.addr).await;
    let live: Nameplate = "7707".parse().unwrap();
    let (_exchange, _opened) = rclient
        .open(Some(&live), Duration::from_secs(60))
        .await
        .unwrap();
    let guesser = node_on(lo(92), false);
    let gclient = connect(&guesser, rv.addr).await;
    let mut answers = BTreeMap::new();
    for _ in 0..20 {
        let code = match gclient.open(Some(&live), Duration::from_secs(60)).await {
            Err(ClientError::Refused { code, .. }) => format!("{code:?}"),
            other => panic!("a lookup of a taken nameplate: {other:?}"),
        };
        *answers.entry(code).or_insert(0) += 1;
    }
    let burst = RendezvousConfig::default().join_rate.per_source_burst;
    assert_eq!(answers.get("Taken"), Some(&(burst as i32)), "{answers:?}");
    assert_eq!(
        answers.get("RateLimited"),
        Some(&(20 - burst as i32)),
        "{answers:?}"
    );
    // The guesser's joins share that budget; someone else's lookups do not.
    let joined = gclient.join(&live, &some_pake(&live)).await;
    assert!(
        matches!(
            joined,
            Err(ClientError::Refused {
                code: ErrorCode::RateLimited,
                ..
            })
        ),
        "{joined:?}"
    );
    let other = node_on(lo(93), false);
    let oclient = connect(&other, rv.addr).await;
    let taken = oclient.open(Some(&live), Duration::from_secs(60)).await;
    assert!(
        matches!(
            taken,
            Err(ClientError::Refused {
                code: ErrorCode::Taken,
                ..
            })
        ),
        "{taken:?}"
    );
}

/// (f) A stranger who floods a waiting receiver with probes (from before the pairing, so
/// they wait in line as triggered checks) and answers every probe it gets with a reply
/// carrying the right txid: in version 1 an unauthenticated probe made its source a
/// preferred candidate and any reply with a known txid chose the path. Now, with probes
/// keyed by the PAKE, the receiver never probes the stranger at all, and the path is the
/// sender's.
#[tokio::test]
async fn unauthenticated_probes_and_replies_do_not_steer_the_path() {
    let rv = serve(RendezvousConfig::default());
    let pair = Pair::new(lo(85), lo(86));
    let target = pair.rnode.local_addr().unwrap();
    let stranger = Arc::new(
        tokio::net::UdpSocket::bind(SocketAddr::new(lo(84), 0))
            .await
            .unwrap(),
    );
    let probed_back = Arc::new(AtomicUsize::new(0));
    let flooding = {
        let stranger = stranger.clone();
        tokio::spawn(async move {
            loop {
                let probe = qpunch::wire::Message::Probe {
                    txid: rand::random(),
                };
                let _ = stranger.send_to(&probe.to_vec(), target).await;
                // The authenticated type with a tag it cannot compute.
                let mut forged = probe.to_vec();
                forged[0] = 0x11;
                forged.extend_from_slice(&[0xee; 16]);
                let _ = stranger.send_to(&forged, target).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let answering = {
        let (stranger, probed_back) = (stranger.clone(), probed_back.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = stranger.recv_from(&mut buf).await {
                // A probe (plain 0x01 or authenticated 0x11): its txid is in the clear.
                if n >= 18 && (buf[0] == 0x01 || buf[0] == 0x11) {
                    probed_back.fetch_add(1, Ordering::SeqCst);
                    let txid: [u8; 12] = buf[6..18].try_into().unwrap();
                    let reply = qpunch::wire::Message::Reply {
                        txid,
                        observed: from,
                    };
                    let _ = stranger.send_to(&reply.to_vec(), from).await;
                }
            }
        })
    };
    // The receiver waits on its code while the flood queues up; then the sender joins.
    let code = fresh_code(13);
    let rclient = connect(&pair.rnode, rv.addr).await;
    let (welcoming, _) = welcome(
        pair.rnode.clone(),
        pair.receiver.clone(),
        rclient,
        Some(code.clone()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sclient = connect(&pair.snode, rv.addr).await;
    let sending = send_by_code(pair.snode.clone(), sclient, code, pair.file.clone());
    let welcomed = welcoming
        .await
        .unwrap()
        .expect("the receiver met the sender");
    let sent = sending.await.unwrap();
    flooding.abort();
    answering.abort();
    let sent = sent
        .expect("the sender met the receiver")
        .expect("the file was sent");
    assert!(sent[0].is_verified(), "{sent:?}");
    assert_eq!(
        welcomed.path.as_ref().unwrap().peer,
        pair.snode.local_addr().unwrap()
    );
    assert_eq!(
        probed_back.load(Ordering::SeqCst),
        0,
        "the receiver probed the stranger back"
    );
}

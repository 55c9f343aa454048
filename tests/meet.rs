//! Meeting by code over loopback: a real rendezvous, real QUIC and TLS, real PAKE, two
//! nodes that find each other by a one-time code, then a verified file transfer. Plus the
//! refusals: a wrong code, a rendezvous that lies.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qpunch::identity::Identity;
use qpunch::meet::code::Code;
use qpunch::meet::{self, MeetConfig, MeetError, Meeting, Silent};
use qpunch::natcheck::Mapping;
use qpunch::node::{Node, NodeConfig};
use qpunch::rendezvous::{self, Rendezvous, RendezvousClient, RendezvousConfig};
use qpunch::server::{Limits, Server};
use qpunch::transfer::{self, Outgoing, Policy, Quiet, ReceiveOptions, Receiver};

/// A rendezvous on 127.0.0.1 serving until the returned sender is dropped.
async fn rendezvous() -> (
    SocketAddr,
    Arc<Rendezvous>,
    tokio::sync::oneshot::Sender<()>,
) {
    let bound = Rendezvous::bind(
        "127.0.0.1:0".parse().unwrap(),
        Identity::generate().unwrap(),
        RendezvousConfig::default(),
        Arc::new(rendezvous::NoEvents),
    )
    .unwrap();
    let addr = bound.node.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rv = bound.rendezvous.clone();
    tokio::spawn(async move {
        bound
            .server
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, rv, stop)
}

fn node(accept: bool) -> Arc<Node> {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Arc::new(
        Node::new(
            socket,
            NodeConfig::new(Identity::generate().unwrap(), transfer::ALPN, accept),
        )
        .unwrap(),
    )
}

/// Both sides here are behind no NAT at all (loopback): an easy mapping.
fn meeting<'a>(
    node: &'a Arc<Node>,
    rendezvous: &'a RendezvousClient,
    events: &'a dyn meet::MeetEvents,
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

/// Passes the first code it is told about on a channel.
struct Announce(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Code>>>);

impl meet::MeetEvents for Announce {
    fn code(&self, code: &Code, _: Duration) {
        if let Some(tx) = self.0.lock().unwrap().take() {
            let _ = tx.send(code.clone());
        }
    }
}

/// Start welcoming a sender on `rnode` through the rendezvous at `rv_addr`, admitting it
/// into `receiver`; returns the running welcome and its code.
async fn welcome(
    rnode: &Arc<Node>,
    receiver: &Arc<Receiver>,
    rv_addr: SocketAddr,
) -> (
    tokio::task::JoinHandle<Result<meet::Welcomed, MeetError>>,
    Code,
) {
    let rclient = RendezvousClient::connect(rnode, rv_addr).await.unwrap();
    let (code_tx, code_rx) = tokio::sync::oneshot::channel();
    let (rnode, receiver) = (rnode.clone(), receiver.clone());
    let welcoming = tokio::spawn(async move {
        let admit = |fp, ttl| receiver.admit(fp, ttl);
        let events = Announce(std::sync::Mutex::new(Some(code_tx)));
        meeting(&rnode, &rclient, &events)
            .welcome(None, Duration::from_secs(60), &admit)
            .await
    });
    (welcoming, code_rx.await.unwrap())
}

/// A receiving node with a server that only admits senders holding a ticket.
fn receiving(out: &std::path::Path) -> (Arc<Node>, Arc<Receiver>) {
    let node = node(true);
    // An empty allow list: nobody gets in without a ticket from a code.
    let receiver = Receiver::new(ReceiveOptions::new(out, Policy::Allow(Vec::new()))).unwrap();
    let server = Server::new(node.clone(), receiver.clone(), Limits::default());
    tokio::spawn(server.run(std::future::pending::<()>()));
    (node, receiver)
}

#[tokio::test]
async fn two_peers_meet_by_code_and_a_file_arrives_verified() {
    let (rv_addr, rv, _stop) = rendezvous().await;
    let out = common::tempdir();
    let (rnode, receiver) = receiving(out.path());
    let (welcoming, code) = welcome(&rnode, &receiver, rv_addr).await;
    assert_eq!(rv.waiting(), 1);

    let snode = node(false);
    let sclient = RendezvousClient::connect(&snode, rv_addr).await.unwrap();
    let code_text = code.to_string();
    let typed: Code = code_text.to_uppercase().parse().unwrap();
    let met = meeting(&snode, &sclient, &Silent)
        .dial(&typed)
        .await
        .expect("met");
    assert_eq!(
        met.peer.fingerprint,
        rnode.fingerprint(),
        "pinned to the receiver"
    );
    assert_eq!(
        met.method,
        qpunch::path::PathKind::Lan,
        "loopback is our own network"
    );
    let welcomed = welcoming.await.unwrap().expect("welcomed");
    assert_eq!(welcomed.sender, snode.fingerprint());
    assert_eq!(rv.waiting(), 0, "the nameplate is used up");
    assert_eq!(rv.stats().paired, 1);

    let src = common::tempdir();
    let path = src.path().join("by-code.bin");
    common::random_file(&path, 300_000, 7);
    let reports = transfer::send_files(
        &met.peer.connection,
        vec![Outgoing::from_path(&path).unwrap()],
        Arc::new(Quiet),
    )
    .await
    .unwrap();
    assert!(reports[0].is_verified(), "{reports:?}");
    assert_eq!(
        common::blake3_file(&out.path().join("by-code.bin")),
        common::blake3_file(&path)
    );
    // The ticket was one batch: the same sender cannot come back uninvited. (It dials the
    // receiver's real address from the same socket: while the meeting's paths live, that
    // address belongs to the mapped peer, so they go first.)
    drop(met);
    common::assert_sender_refused(&snode, &rnode, &path).await;
    drop(receiver);
}

#[tokio::test]
async fn a_wrong_code_fails_on_both_sides_and_burns_the_nameplate() {
    let (rv_addr, rv, _stop) = rendezvous().await;
    let out = common::tempdir();
    let (rnode, receiver) = receiving(out.path());
    let (welcoming, code) = welcome(&rnode, &receiver, rv_addr).await;
    // Same nameplate, one word off.
    let wrong = common::wrong_code(&code);
    let snode = node(false);
    let sclient = RendezvousClient::connect(&snode, rv_addr).await.unwrap();
    let dialed = meeting(&snode, &sclient, &Silent).dial(&wrong).await;
    let welcomed = welcoming.await.unwrap();
    // Each side checks the other's sealed hello itself: both find the code wrong.
    assert!(matches!(dialed, Err(MeetError::WrongCode)), "{dialed:?}");
    assert!(
        matches!(welcomed, Err(MeetError::WrongCode)),
        "{welcomed:?}"
    );
    // The guess cost the guesser its try: the nameplate is gone, a retry is unknown.
    assert_eq!(rv.waiting(), 0);
    let retry = meeting(&snode, &sclient, &Silent).dial(&code).await;
    assert!(
        matches!(
            retry,
            Err(MeetError::Rendezvous(rendezvous::ClientError::Refused {
                code: rendezvous::ErrorCode::UnknownNameplate,
                ..
            }))
        ),
        "{retry:?}"
    );
    assert!(common::list_dir(out.path()).is_empty());
}

// ---------------------------------------------------------------------------------------
// Meeting on the LAN (no rendezvous): the exchange over the direct connection, on loopback.
// Finding each other by mDNS needs a network to multicast on: see tests/meet_lab.rs.
// ---------------------------------------------------------------------------------------

use qpunch::meet::lan::{self, Desk, Door, LanError, Outcome};

/// A receiver as `qpunch receive` runs one with LAN codes: a node offering the files and
/// meet ALPNs, a Receiver that admits nobody without a ticket, behind a [`Door`].
fn lan_receiving(out: &std::path::Path) -> (Arc<Node>, Arc<Receiver>, Arc<Desk>) {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = NodeConfig::new(Identity::generate().unwrap(), transfer::ALPN, true);
    config.alpn.push(lan::ALPN.to_vec());
    let node = Arc::new(Node::new(socket, config).unwrap());
    let receiver = Receiver::new(ReceiveOptions::new(out, Policy::Allow(Vec::new()))).unwrap();
    let desk = Desk::new();
    let door = Door::for_receiver(receiver.clone(), desk.clone(), node.fingerprint());
    let server = Server::new(node.clone(), door, Limits::default());
    tokio::spawn(server.run(std::future::pending::<()>()));
    (node, receiver, desk)
}

fn lan_code() -> Code {
    Code::generate(lan::random_nameplate(), &mut rand::rng())
}

async fn send_one(conn: &quinn::Connection, path: &std::path::Path) -> transfer::FileReport {
    let reports = transfer::send_files(
        conn,
        vec![Outgoing::from_path(path).unwrap()],
        Arc::new(Quiet),
    )
    .await
    .unwrap();
    reports.into_iter().next().unwrap()
}

#[tokio::test]
async fn lan_exchange_proves_the_code_and_the_same_connection_carries_the_files() {
    let out = common::tempdir();
    let (rnode, _receiver, desk) = lan_receiving(out.path());
    let code = lan_code();
    let mut opened = desk.open(code.clone());
    let snode = node(false);
    let raddr = rnode.local_addr().unwrap();
    let peer = lan::meet_at(&snode, &[raddr], &code).await.expect("met");
    assert_eq!(
        peer.fingerprint,
        rnode.fingerprint(),
        "the code confirmed the receiver"
    );
    assert_eq!(
        opened.outcome().await,
        Some(Outcome::Used {
            sender: snode.fingerprint(),
            remote: snode.local_addr().unwrap()
        })
    );
    assert!(!desk.is_open(), "a code is used once");

    let src = common::tempdir();
    let path = src.path().join("lan.bin");
    common::random_file(&path, 300_000, 11);
    let report = send_one(&peer.connection, &path).await;
    assert!(report.is_verified(), "{report:?}");
    assert_eq!(
        common::blake3_file(&out.path().join("lan.bin")),
        common::blake3_file(&path)
    );
    // The ticket was for that batch: the code again, or a plain files connection, gets
    // nowhere.
    let again = lan::meet_at(&snode, &[raddr], &code).await;
    assert!(matches!(again, Err(LanError::NoCode)), "{again:?}");
    common::assert_sender_refused(&snode, &rnode, &path).await;
    let stats = desk.stats();
    assert_eq!(
        (stats.codes_used, stats.wrong_codes, stats.meet_refused),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn lan_wrong_code_is_refused_by_both_and_burns_the_code() {
    let out = common::tempdir();
    let (rnode, _receiver, desk) = lan_receiving(out.path());
    let code = lan_code();
    let mut opened = desk.open(code.clone());
    let snode = node(false);
    let raddr = rnode.local_addr().unwrap();
    let guessed = lan::meet_at(&snode, &[raddr], &common::wrong_code(&code)).await;
    assert!(matches!(guessed, Err(LanError::WrongCode)), "{guessed:?}");
    assert_eq!(
        opened.outcome().await,
        Some(Outcome::Burned {
            remote: snode.local_addr().unwrap()
        })
    );
    // The guess cost the code: the right one is refused now, unchecked.
    let right = lan::meet_at(&snode, &[raddr], &code).await;
    assert!(matches!(right, Err(LanError::NoCode)), "{right:?}");
    let stats = desk.stats();
    assert_eq!(
        (stats.codes_used, stats.wrong_codes, stats.meet_refused),
        (0, 1, 1)
    );
    assert!(common::list_dir(out.path()).is_empty());
}

/// A guesser that stalls after the PAKE messages (it has nothing to test its guess
/// against yet) does not hold the code: the sender who has it gets through meanwhile, and
/// the guesser's late tag is refused unchecked. Malformed messages are counted and dropped
/// without touching the code.
#[tokio::test]
async fn lan_stalling_and_malformed_peers_do_not_use_up_the_code() {
    use qpunch::meet::pake::{BIND_TAG_LEN, PAKE_MSG_LEN, Pake, Role};
    let out = common::tempdir();
    let (rnode, _receiver, desk) = lan_receiving(out.path());
    let code = lan_code();
    let mut opened = desk.open(code.clone());
    let raddr = rnode.local_addr().unwrap();
    let alpn = [lan::ALPN.to_vec()];

    // Garbage and another version: refused, counted, the code untouched.
    for junk in [[1u8; PAKE_MSG_LEN], [9u8; PAKE_MSG_LEN]] {
        let stranger = node(false);
        let conn = stranger
            .connect_with_alpn(raddr, None, &alpn)
            .await
            .unwrap();
        let (mut send, _recv) = conn.connection.open_bi().await.unwrap();
        send.write_all(&junk).await.unwrap();
        let closed = conn.connection.closed().await;
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == lan::codes::PROTOCOL.into()),
            "{closed:?}"
        );
    }
    assert!(desk.is_open());

    // The guesser: its PAKE message, the receiver's answer, then silence.
    let guesser = node(false);
    let conn = guesser.connect_with_alpn(raddr, None, &alpn).await.unwrap();
    let (pake, msg) = Pake::start(&common::wrong_code(&code), Role::Sender, &mut rand::rng());
    let (mut gsend, mut grecv) = conn.connection.open_bi().await.unwrap();
    gsend.write_all(&msg).await.unwrap();
    let mut answer = [0u8; PAKE_MSG_LEN];
    grecv.read_exact(&mut answer).await.unwrap();
    let keys = pake.finish(&answer).unwrap();

    // Meanwhile the holder of the code gets through.
    let snode = node(false);
    let peer = lan::meet_at(&snode, &[raddr], &code)
        .await
        .expect("met despite the staller");
    assert_eq!(peer.fingerprint, rnode.fingerprint());
    assert!(matches!(opened.outcome().await, Some(Outcome::Used { .. })));

    // The guesser's tag comes too late: refused without being checked.
    let tag = keys.bind(&guesser.fingerprint(), &conn.fingerprint);
    assert_eq!(tag.len(), BIND_TAG_LEN);
    gsend.write_all(&tag).await.unwrap();
    let closed = conn.connection.closed().await;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == lan::codes::NO_CODE.into()),
        "{closed:?}"
    );
    let stats = desk.stats();
    assert_eq!(
        (
            stats.codes_used,
            stats.wrong_codes,
            stats.meet_refused,
            stats.meet_malformed
        ),
        (1, 0, 1, 2)
    );
}

/// Someone in the middle terminates TLS toward each side and relays the exchange unchanged:
/// the PAKE alone would agree, but the tags cover the fingerprints each side sees, so the
/// receiver refuses (burning the code) and the sender gets nothing through.
#[tokio::test]
async fn lan_spliced_connection_is_detected() {
    let out = common::tempdir();
    let (rnode, _receiver, desk) = lan_receiving(out.path());
    let code = lan_code();
    let mut opened = desk.open(code.clone());
    let raddr = rnode.local_addr().unwrap();

    // The splicer: accepts the sender with its own key, dials the receiver with another.
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let middle = Arc::new(
        Node::new(
            socket,
            NodeConfig::new(Identity::generate().unwrap(), lan::ALPN, true),
        )
        .unwrap(),
    );
    let maddr = middle.local_addr().unwrap();
    let relay = {
        let middle = middle.clone();
        tokio::spawn(async move {
            let from_sender = middle.accept().await.unwrap().unwrap();
            let to_receiver = middle
                .connect_with_alpn(raddr, None, &[lan::ALPN.to_vec()])
                .await
                .unwrap();
            let (mut s_send, mut s_recv) = from_sender.connection.accept_bi().await.unwrap();
            let (mut r_send, mut r_recv) = to_receiver.connection.open_bi().await.unwrap();
            let up = async { tokio::io::copy(&mut s_recv, &mut r_send).await };
            let down = async { tokio::io::copy(&mut r_recv, &mut s_send).await };
            // Whichever direction ends first ends the relay.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
            // Pass the receiver's verdict on, as a relay would.
            if let quinn::ConnectionError::ApplicationClosed(close) =
                to_receiver.connection.closed().await
            {
                from_sender
                    .connection
                    .close(close.error_code, &close.reason);
            }
        })
    };
    let snode = node(false);
    let spliced = lan::meet_at(&snode, &[maddr], &code).await;
    assert!(matches!(spliced, Err(LanError::WrongCode)), "{spliced:?}");
    assert!(
        matches!(opened.outcome().await, Some(Outcome::Burned { .. })),
        "the receiver burned the code"
    );
    assert_eq!(desk.stats().wrong_codes, 1);
    relay.await.unwrap();
    assert!(common::list_dir(out.path()).is_empty());
}

/// Two machines answer for one nameplate (two receivers, or an impostor): the sender
/// refuses before any PAKE, so nobody got a guess and both codes stay open.
#[tokio::test]
async fn lan_two_identities_for_one_nameplate_make_the_sender_refuse_unguessed() {
    let (out1, out2) = (common::tempdir(), common::tempdir());
    let (r1, _rx1, desk1) = lan_receiving(out1.path());
    let (r2, _rx2, desk2) = lan_receiving(out2.path());
    let code = lan_code();
    let _o1 = desk1.open(code.clone());
    let _o2 = desk2.open(common::wrong_code(&code));
    let snode = node(false);
    let addrs = [r1.local_addr().unwrap(), r2.local_addr().unwrap()];
    let met = lan::meet_at(&snode, &addrs, &code).await;
    assert!(
        matches!(met, Err(LanError::Ambiguous { identities: 2, .. })),
        "{met:?}"
    );
    for desk in [&desk1, &desk2] {
        assert!(desk.is_open());
        assert_eq!(desk.stats(), lan::LanStats::default());
    }
    // One address that does not answer, one that does: no ambiguity, just the receiver.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = silent.local_addr().unwrap();
    let started = std::time::Instant::now();
    let peer = lan::meet_at(&snode, &[dead, addrs[0]], &code)
        .await
        .expect("met");
    assert_eq!(peer.fingerprint, r1.fingerprint());
    assert!(
        started.elapsed() < lan::CONNECT_TIMEOUT,
        "a silent address delays the meeting by the settling time only: {:?}",
        started.elapsed()
    );
    drop(silent);
}

/// A code holder may connect before its sealed hello has reached the receiver (it travels
/// through the rendezvous, the connection does not). While the receiver expects tickets,
/// such a sender waits for its ticket instead of being refused; a stranger is refused once
/// nobody expects tickets any more.
#[tokio::test]
async fn a_sender_arriving_before_its_ticket_waits_for_it() {
    let out = common::tempdir();
    let (rnode, receiver) = receiving(out.path());
    let src = common::tempdir();
    let path = src.path().join("early.bin");
    common::random_file(&path, 50_000, 3);
    let send = |node: Arc<Node>| {
        let (target, expected, path) = (
            rnode.local_addr().unwrap(),
            rnode.fingerprint(),
            path.clone(),
        );
        tokio::spawn(async move {
            let peer = node.connect(target, Some(expected)).await.unwrap();
            transfer::send_files(
                &peer.connection,
                vec![Outgoing::from_path(&path).unwrap()],
                Arc::new(Quiet),
            )
            .await
        })
    };

    let expecting = receiver.expect_tickets();
    let early = node(false);
    let sending = send(early.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished(), "the early sender waits");
    receiver.admit(early.fingerprint(), Duration::from_secs(60));
    let reports = sending.await.unwrap().expect("admitted while waiting");
    assert!(reports[0].is_verified(), "{reports:?}");

    // A stranger waits too, until nobody expects tickets: then it is refused.
    let stranger = send(node(false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stranger.is_finished(),
        "the stranger waits while tickets are expected"
    );
    drop(expecting);
    let refused = tokio::time::timeout(Duration::from_secs(2), stranger)
        .await
        .expect("refused promptly once nobody expects tickets")
        .unwrap();
    assert!(
        matches!(refused, Err(transfer::TransferError::NotAllowed(_))),
        "{refused:?}"
    );
    assert_eq!(common::list_dir(out.path()), common::names(&["early.bin"]));
}

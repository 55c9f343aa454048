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
    }
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
    let rclient = RendezvousClient::connect(&rnode, rv_addr).await.unwrap();
    let (code_tx, code_rx) = tokio::sync::oneshot::channel();
    struct Announce(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Code>>>);
    impl meet::MeetEvents for Announce {
        fn code(&self, code: &Code, _: Duration) {
            if let Some(tx) = self.0.lock().unwrap().take() {
                let _ = tx.send(code.clone());
            }
        }
    }
    let welcoming = {
        let (rnode, receiver) = (rnode.clone(), receiver.clone());
        tokio::spawn(async move {
            let admit = |fp, ttl| receiver.admit(fp, ttl);
            let events = Announce(std::sync::Mutex::new(Some(code_tx)));
            meeting(&rnode, &rclient, &events)
                .welcome(None, Duration::from_secs(60), &admit)
                .await
        })
    };
    let code = code_rx.await.unwrap();
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
    assert_eq!(met.method, "lan", "loopback is our own network");
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
    // The ticket was one batch: the same sender cannot come back uninvited.
    let again = snode
        .connect(rnode.local_addr().unwrap(), Some(rnode.fingerprint()))
        .await
        .unwrap();
    let refused = transfer::send_files(
        &again.connection,
        vec![Outgoing::from_path(&path).unwrap()],
        Arc::new(Quiet),
    )
    .await;
    assert!(
        matches!(refused, Err(transfer::TransferError::NotAllowed(_))),
        "{refused:?}"
    );
    drop(receiver);
}

#[tokio::test]
async fn a_wrong_code_fails_on_both_sides_and_burns_the_nameplate() {
    let (rv_addr, rv, _stop) = rendezvous().await;
    let out = common::tempdir();
    let (rnode, receiver) = receiving(out.path());
    let rclient = RendezvousClient::connect(&rnode, rv_addr).await.unwrap();
    let (code_tx, code_rx) = tokio::sync::oneshot::channel();
    struct Announce(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Code>>>);
    impl meet::MeetEvents for Announce {
        fn code(&self, code: &Code, _: Duration) {
            if let Some(tx) = self.0.lock().unwrap().take() {
                let _ = tx.send(code.clone());
            }
        }
    }
    let welcoming = {
        let (rnode, receiver) = (rnode.clone(), receiver.clone());
        tokio::spawn(async move {
            let admit = |fp, ttl| receiver.admit(fp, ttl);
            let events = Announce(std::sync::Mutex::new(Some(code_tx)));
            meeting(&rnode, &rclient, &events)
                .welcome(None, Duration::from_secs(60), &admit)
                .await
        })
    };
    let code = code_rx.await.unwrap();
    // Same nameplate, one word off.
    let [first, _] = code.words();
    let wrong: Code = format!(
        "{}-{first}-{}",
        code.nameplate(),
        other_word(code.words()[1])
    )
    .parse()
    .unwrap();
    let snode = node(false);
    let sclient = RendezvousClient::connect(&snode, rv_addr).await.unwrap();
    let dialed = meeting(&snode, &sclient, &Silent).dial(&wrong).await;
    assert!(
        matches!(dialed, Err(MeetError::WrongCode | MeetError::PeerFailed(_))),
        "{dialed:?}"
    );
    let welcomed = welcoming.await.unwrap();
    assert!(
        matches!(
            welcomed,
            Err(MeetError::WrongCode | MeetError::PeerFailed(_))
        ),
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

/// Another word from the same list position as `word`.
fn other_word(word: &str) -> &'static str {
    use qpunch::meet::code::{EVEN_WORDS, ODD_WORDS};
    let list = if EVEN_WORDS.contains(&word) {
        &EVEN_WORDS
    } else {
        &ODD_WORDS
    };
    list.iter().copied().find(|w| *w != word).unwrap()
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

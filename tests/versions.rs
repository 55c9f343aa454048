//! Peers of other files-protocol versions, built from the library with another ALPN, meet
//! the real `qpunch` binary: both sides must name both versions and the side to upgrade,
//! instead of ending in a bare TLS alert.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::thread;

use common::*;
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig, QUICK_LINGER};
use qpunch::transfer::{self, codes};

const OLD: &[u8] = b"qpunch-files/2";

fn ours() -> &'static str {
    std::str::from_utf8(transfer::ALPN).unwrap()
}

/// How a library receiver's one connection ended: the application close code and reason
/// (from either side), or why there was none.
type Ending = Result<(u32, String), String>;

/// Like [`Ending`], from a connection's close.
fn ending(error: quinn::ConnectionError) -> Ending {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Ok((
            close.error_code.into_inner() as u32,
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        quinn::ConnectionError::LocallyClosed => Ok((u32::MAX, "closed by us".into())),
        other => Err(other.to_string()),
    }
}

/// A library receiver speaking only `alpn` on a loopback port (it answers probes like any
/// node): it accepts one connection, runs `then` on it, and reports how it ended. Returns
/// its port, its fingerprint and the thread to join.
fn library_receiver(
    alpn: &'static [u8],
    then: impl FnOnce(&quinn::Connection) + Send + 'static,
) -> (u16, String, thread::JoinHandle<Ending>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let identity = Identity::generate().unwrap();
    let fingerprint = identity.fingerprint().to_string();
    let handle = thread::spawn(move || {
        let runtime = peer::runtime();
        runtime.block_on(async move {
            let node = Node::new(socket, NodeConfig::new(identity, alpn, true)).unwrap();
            let accepted = tokio::time::timeout(SHORT, node.accept()).await;
            let result = match accepted {
                Ok(Some(Ok(peer))) => {
                    then(&peer.connection);
                    ending(peer.connection.closed().await)
                }
                Ok(Some(Err(e))) => Err(format!("handshake: {e}")),
                Ok(None) => Err("endpoint closed".into()),
                Err(_) => Err("nobody connected".into()),
            };
            node.close(QUICK_LINGER).await;
            result
        })
    });
    (port, fingerprint, handle)
}

/// `qpunch send` of one small file to 127.0.0.1:`port`, pinning `fingerprint`.
fn send_one(port: u16, fingerprint: &str) -> Finished {
    let (home, src) = (Home::new(), tempdir());
    let file = src.path().join("f.bin");
    random_file(&file, 1000, 1);
    send(home.path(), &[&file], port, &["--peer", fingerprint], SHORT)
}

/// A sender that speaks only `qpunch-files/2` reaches a current `qpunch receive`: the
/// receiver closes with the version code, and both sides read both versions and "upgrade
/// the sender".
#[test]
fn an_older_sender_is_told_to_upgrade() {
    let (home, out) = (Home::new(), tempdir());
    let mut receiver = Receiver::start(home.path(), out.path(), 0, &["--yes"]);
    let target: SocketAddr = receiver.addr().parse().unwrap();
    let fingerprint = receiver.fingerprint.parse().unwrap();
    let runtime = peer::runtime();
    let ended = runtime.block_on(async move {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = NodeConfig::new(Identity::generate().unwrap(), OLD, false);
        let node = Node::new(socket, config).unwrap();
        // The handshake succeeds on the old ALPN, which the receiver lists only to name it.
        let peer = node
            .connect(target, Some(fingerprint))
            .await
            .expect("connect");
        let ended = tokio::time::timeout(SHORT, peer.connection.closed()).await;
        node.close(QUICK_LINGER).await;
        ending(ended.expect("the receiver closes at once"))
    });
    let (code, reason) = ended.expect("an application close");
    assert_eq!(code, codes::VERSION, "{reason}");
    let expected = format!(
        "the sender speaks qpunch-files/2 and the receiver {}: upgrade the sender",
        ours()
    );
    assert!(reason.contains(&expected), "{reason}");

    let error = receiver.proc.wait_event("error", SHORT);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(&expected), "{message}");
    assert!(list_dir(out.path()).is_empty(), "nothing stored");
}

/// A current `qpunch send` reaches a receiver that speaks only `qpunch-files/2`: the
/// sender closes with the version code, and both read "upgrade the receiver".
#[test]
fn an_older_receiver_is_told_to_upgrade() {
    let (port, fingerprint, old) = library_receiver(OLD, |_| {});
    let sender = send_one(port, &fingerprint);
    let (code, reason) = old.join().unwrap().expect("an application close");
    sender.assert_failure();
    let expected = format!(
        "the receiver speaks qpunch-files/2 and the sender {}: upgrade the receiver",
        ours()
    );
    assert_eq!(code, codes::VERSION, "{reason}");
    assert!(reason.contains(&expected), "{reason}");
    let messages = sender.messages();
    assert!(messages.contains(&expected), "{messages}");
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
}

/// A newer receiver that no longer speaks our files protocol refuses the handshake (a
/// bare TLS alert): the sender names its own version and says how to find out more.
#[test]
fn a_receiver_without_our_version_is_named() {
    let (port, fingerprint, newer) = library_receiver(b"qpunch-files/99", |_| {});
    let sender = send_one(port, &fingerprint);
    sender.assert_failure();
    let messages = sender.messages();
    let expected = format!("the peer does not speak {} (ours)", ours());
    assert!(messages.contains(&expected), "{messages}");
    assert!(messages.contains("qpunch --version"), "{messages}");
    assert!(
        newer.join().unwrap().is_err(),
        "no connection was established"
    );
}

/// A newer receiver that still lists our version, only to refuse it, closes with the
/// version code: the sender shows its reason, escaped.
#[test]
fn a_newer_receivers_refusal_is_shown_escaped() {
    let refusal = "the sender speaks qpunch-files/3 and the receiver qpunch-files/4: \
                   upgrade the sender\u{1b}[2J";
    let (port, fingerprint, newer) = library_receiver(transfer::ALPN, move |connection| {
        connection.close(codes::VERSION.into(), refusal.as_bytes());
    });
    let sender = send_one(port, &fingerprint);
    newer.join().unwrap().expect("closed");
    sender.assert_failure();
    let messages = sender.messages();
    assert!(
        messages.contains("the peer refused our version: the sender speaks qpunch-files/3"),
        "{messages}"
    );
    assert!(
        messages.contains("qpunch-files/4: upgrade the sender"),
        "{messages}"
    );
    assert!(!messages.contains('\u{1b}'), "escaped: {messages}");
}

/// A rendezvous that no longer speaks our rendezvous protocol refuses the handshake: the
/// client names its own version instead of a bare TLS alert, and does not go on to try
/// TCP (UDP got an answer).
#[test]
fn a_rendezvous_without_our_version_is_named() {
    use qpunch::rendezvous::{ClientError, ConnectOptions, RendezvousClient, TcpMode};
    let runtime = peer::runtime();
    let error = runtime.block_on(async {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let identity = Identity::generate().unwrap();
        let newer = Node::new(
            socket,
            NodeConfig::new(identity, b"qpunch-rendezvous/99", true),
        )
        .unwrap();
        let addr = newer.local_addr().unwrap();
        tokio::spawn(async move { while let Some(_refused) = newer.accept().await {} });
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = NodeConfig::new(Identity::generate().unwrap(), b"unused/1", false);
        let client = Node::new(socket, config).unwrap();
        let options = ConnectOptions {
            tcp: TcpMode::Auto,
            tcp_port: None,
        };
        let result = RendezvousClient::connect_with(&client, addr, options).await;
        client.close(QUICK_LINGER).await;
        result.expect_err("refused")
    });
    assert!(matches!(error, ClientError::Version { .. }), "{error:?}");
    let ours = std::str::from_utf8(qpunch::rendezvous::ALPN).unwrap();
    let message = error.to_string();
    assert!(
        message.contains(&format!("does not speak {ours} (ours)")),
        "{message}"
    );
}

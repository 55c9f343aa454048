//! STUN on the shared socket (loopback, no root): a Binding answer reaches its
//! transaction; an answer from an address we did not ask, with a wrong transaction id, or
//! with an absurd XOR-MAPPED-ADDRESS is ignored and counted; and none of it disturbs a QUIC
//! connection on the same socket or moves it to another address.

use std::net::SocketAddr;
use std::time::Duration;

use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::stun::{self, Change, StunError};
use stun_types::attribute::XorMappedAddress;
use stun_types::message::{
    BINDING, Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteVec,
    TransactionId,
};
use tokio::net::UdpSocket;

const ALPN: &[u8] = b"qpunch-test/1";

fn node(accept: bool) -> Node {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Node::new(
        socket,
        NodeConfig::new(Identity::generate().unwrap(), ALPN, accept),
    )
    .unwrap()
}

/// A Binding success response to the request `request`, naming `mapped`.
fn answer(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
    answer_to(
        Message::from_bytes(request).unwrap().transaction_id(),
        mapped,
    )
}

/// A Binding success response to transaction `id`, naming `mapped`.
fn answer_to(id: TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut out = Message::builder(
        MessageType::from_class_method(MessageClass::Success, BINDING),
        id,
        MessageWriteVec::new(),
    );
    out.add_attribute(&XorMappedAddress::new(mapped, id))
        .unwrap();
    out.finish()
}

/// The same answer to another transaction.
fn wrong_txid(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
    let id = u128::from(Message::from_bytes(request).unwrap().transaction_id());
    answer_to(TransactionId::from(id ^ 1), mapped)
}

#[tokio::test]
async fn forged_stun_answers_are_ignored_and_counted() {
    let server = node(true);
    let client = node(false);
    let (c, s) = tokio::join!(
        client.connect(server.local_addr().unwrap(), Some(server.fingerprint())),
        server.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap().unwrap());
    let path_before = c.connection.remote_address();

    // A STUN server of our own on loopback, and an attacker beside it.
    let stun_server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = client.local_addr().unwrap();
    let real: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let lie: SocketAddr = "198.51.100.66:1234".parse().unwrap();

    let socket = client.socket().clone();
    let server_addr = stun_server.local_addr().unwrap();
    let asking = tokio::spawn(async move {
        qpunch::stun_client::binding(&socket, server_addr, Change::default(), &[]).await
    });
    let mut buf = [0u8; 1500];
    let (n, from) = stun_server.recv_from(&mut buf).await.unwrap();
    assert_eq!(from, target);
    let request = buf[..n].to_vec();
    assert!(stun::is_stun(&request));

    // Before the real answer: the right transaction from the wrong address, the wrong
    // transaction from the right address, and an absurd address from the right one.
    attacker
        .send_to(&answer(&request, lie), target)
        .await
        .unwrap();
    stun_server
        .send_to(&wrong_txid(&request, lie), target)
        .await
        .unwrap();
    let loopback: SocketAddr = "127.0.0.1:9".parse().unwrap();
    stun_server
        .send_to(&answer(&request, loopback), target)
        .await
        .unwrap();
    // Let those arrive first (loopback keeps order per socket pair, not across senders).
    tokio::time::sleep(Duration::from_millis(100)).await;
    stun_server
        .send_to(&answer(&request, real), target)
        .await
        .unwrap();

    let binding = asking.await.unwrap().unwrap();
    assert_eq!(
        binding.mapped, real,
        "only the vetted answer from the server counts"
    );
    let stats = client.socket_stats();
    assert_eq!(stats.stun_dropped, 2, "{stats:?}");
    assert_eq!(stats.stun_rejected, 1, "{stats:?}");
    assert_eq!(stats.stun_routed, 2, "{stats:?}");

    // A late answer (its transaction is over) and a STUN request to us: dropped.
    stun_server
        .send_to(&answer(&request, lie), target)
        .await
        .unwrap();
    attacker
        .send_to(&stun::binding_request([3; 12], Change::default()), target)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.socket_stats().stun_dropped, 4);

    // Only absurd answers: the transaction times out rather than take one.
    let socket = client.socket().clone();
    let asking = tokio::spawn(async move {
        qpunch::stun_client::binding(&socket, server_addr, Change::default(), &[]).await
    });
    let (n, _) = stun_server.recv_from(&mut buf).await.unwrap();
    stun_server
        .send_to(&answer(&buf[..n], "0.0.0.0:4000".parse().unwrap()), target)
        .await
        .unwrap();
    assert_eq!(asking.await.unwrap(), Err(StunError::Timeout(server_addr)));
    assert!(client.socket_stats().stun_rejected >= 2);

    // QUIC on the same socket never saw any of it, and its path did not move.
    assert_eq!(c.connection.remote_address(), path_before);
    let (mut send, mut recv) = c.connection.open_bi().await.unwrap();
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    let (mut s_send, mut s_recv) = s.connection.accept_bi().await.unwrap();
    let got = s_recv.read_to_end(1 << 10).await.unwrap();
    s_send.write_all(&got).await.unwrap();
    s_send.finish().unwrap();
    assert_eq!(recv.read_to_end(1 << 10).await.unwrap(), b"still here");
    assert_eq!(c.connection.remote_address(), path_before);
    assert_eq!(client.socket_stats().malformed_dropped, 0);
}

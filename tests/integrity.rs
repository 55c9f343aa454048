//! A partial or corrupted file is never passed off as complete: a peer speaking the
//! protocol by hand offers one hash and sends other bytes, or fewer bytes than offered.
//! The receiver must report the failure, leave no file and no `.part`, and free the
//! name for the next sender.

mod common;

use std::sync::Arc;
use std::time::Duration;

use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::transfer::{
    self, Decision, Decisions, FileHeader, FileOffer, FileResult, Manifest, Outgoing, Policy,
    Quiet, ReceiveOptions, Receiver,
};

fn node(accept: bool) -> Node {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let id = Identity::generate().unwrap();
    Node::new(socket, NodeConfig::new(id, transfer::ALPN, accept)).unwrap()
}

async fn write_frame<T: serde::Serialize>(send: &mut quinn::SendStream, value: &T) {
    qpunch::frame::write(send, value).await.unwrap();
}

async fn read_frame<T: serde::de::DeserializeOwned>(recv: &mut quinn::RecvStream) -> T {
    qpunch::frame::read(recv, 64 << 20)
        .await
        .unwrap()
        .expect("a frame before the stream ends")
}

/// Offer one file (id 0) by hand and check it is accepted. The control stream is
/// returned so it stays open while the caller goes on.
async fn offer_one(
    conn: &quinn::Connection,
    name: &str,
    size: u64,
    blake3: String,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut control, mut answers) = conn.open_bi().await.unwrap();
    let offer = FileOffer {
        id: 0,
        name: name.into(),
        size,
        blake3,
        ..FileOffer::default()
    };
    write_frame(
        &mut control,
        &Manifest {
            files: vec![offer],
            ..Manifest::default()
        },
    )
    .await;
    let Decisions { decisions } = read_frame(&mut answers).await;
    assert_eq!(decisions, vec![Decision::Accept { id: 0, offset: 0 }]);
    (control, answers)
}

/// Offer `offered_size` bytes hashing to `offered_hash`, then send `payload`; return
/// the receiver's verdict.
async fn lying_send(
    peer: &PeerConnection,
    offered_size: u64,
    offered_hash: String,
    payload: &[u8],
) -> FileResult {
    let conn = &peer.connection;
    let _control = offer_one(conn, "data.bin", offered_size, offered_hash).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &FileHeader { id: 0, offset: 0 }).await;
    send.write_all(payload).await.unwrap();
    send.finish().unwrap();
    read_frame(&mut recv).await
}

/// The receiver refused the file, saved nothing, and said why.
fn assert_refused(verdict: &FileResult, why: &str) {
    assert!(!verdict.verified, "{verdict:?}");
    assert!(verdict.saved_as.is_none(), "{verdict:?}");
    let error = verdict.error.as_deref().unwrap_or("");
    assert!(error.contains(why), "expected {why:?} in {verdict:?}");
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    common::list_dir(dir).into_iter().collect()
}

#[tokio::test]
async fn corrupted_and_truncated_files_are_never_kept() {
    tokio::time::timeout(Duration::from_secs(60), run())
        .await
        .expect("in time");
}

async fn run() {
    let out = tempfile::tempdir().unwrap();
    let receiver = Receiver::new(ReceiveOptions {
        stall_timeout: Duration::from_secs(1),
        ..ReceiveOptions::new(out.path(), Policy::AcceptAll)
    })
    .unwrap();
    let server = Arc::new(node(true));
    let target = server.local_addr().unwrap();
    let fp = server.fingerprint();
    let serving = {
        let (server, receiver) = (server.clone(), receiver.clone());
        tokio::spawn(async move {
            let mut batches = Vec::new();
            for _ in 0..5 {
                let peer = server.accept().await.unwrap().unwrap();
                batches.push(receiver.handle(&peer, Arc::new(Quiet)).await);
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), peer.connection.closed()).await;
            }
            batches
        })
    };

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let real_hash = blake3::hash(&payload).to_hex().to_string();
    let wrong_hash = blake3::hash(b"something else").to_hex().to_string();

    // 1. The right size, the wrong hash.
    let client = node(false);
    let peer = client.connect(target, Some(fp)).await.unwrap();
    let verdict = lying_send(&peer, payload.len() as u64, wrong_hash, &payload).await;
    assert_refused(&verdict, "mismatch");
    assert_eq!(
        verdict.blake3, real_hash,
        "receiver reports what it actually got"
    );
    peer.connection.close(0u32.into(), b"");
    assert_eq!(
        entries(out.path()),
        Vec::<String>::new(),
        "no file, no .part"
    );

    // 2. The right hash, but the stream ends early.
    let peer = client.connect(target, Some(fp)).await.unwrap();
    let verdict = lying_send(
        &peer,
        payload.len() as u64,
        real_hash.clone(),
        &payload[..40_000],
    )
    .await;
    assert_refused(&verdict, "40000 of 100000");
    peer.connection.close(0u32.into(), b"");
    assert_eq!(
        entries(out.path()),
        Vec::<String>::new(),
        "no file, no .part"
    );

    // 3. An honest sender gets the name the failed attempts had reserved.
    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("data.bin");
    std::fs::write(&path, &payload).unwrap();
    let peer = client.connect(target, Some(fp)).await.unwrap();
    let reports = transfer::send_files(
        &peer.connection,
        vec![Outgoing::from_path(&path).unwrap()],
        Arc::new(Quiet),
    )
    .await
    .unwrap();
    peer.connection.close(0u32.into(), b"");
    assert!(reports[0].is_verified(), "{reports:?}");
    assert_eq!(reports[0].saved_as.as_deref(), Some("data.bin"));
    assert_eq!(entries(out.path()), vec!["data.bin".to_string()]);
    assert_eq!(std::fs::read(out.path().join("data.bin")).unwrap(), payload);

    // 4. A sender that stalls mid-file: the receiver gives up after its stall timeout
    //    (1 s here) instead of waiting on a connection kept alive by keep-alives.
    let peer = client.connect(target, Some(fp)).await.unwrap();
    let _control = offer_one(
        &peer.connection,
        "slow.bin",
        payload.len() as u64,
        real_hash.clone(),
    )
    .await;
    let (mut send, mut recv) = peer.connection.open_bi().await.unwrap();
    write_frame(&mut send, &FileHeader { id: 0, offset: 0 }).await;
    send.write_all(&payload[..10]).await.unwrap();
    let started = std::time::Instant::now();
    let verdict: FileResult = read_frame(&mut recv).await;
    assert_refused(&verdict, "sent nothing");
    assert!(started.elapsed() >= Duration::from_millis(900));
    peer.connection.close(0u32.into(), b"");
    assert_eq!(
        entries(out.path()),
        vec!["data.bin".to_string()],
        "no slow.bin, no .part"
    );

    // 5. A sender whose files are accepted but who never opens a file stream.
    let peer2 = client.connect(target, Some(fp)).await.unwrap();
    let _control2 = offer_one(&peer2.connection, "never.bin", 5, real_hash.clone()).await;

    let batches = serving.await.unwrap();
    drop(peer2);
    let outcomes: Vec<bool> = batches[..4]
        .iter()
        .map(|b| b.as_ref().unwrap()[0].is_verified())
        .collect();
    assert_eq!(outcomes, vec![false, false, true, false]);
    let err = batches[4].as_ref().unwrap_err();
    assert!(err.to_string().contains("sent nothing"), "{err}");
    assert_eq!(entries(out.path()), vec!["data.bin".to_string()]);
}

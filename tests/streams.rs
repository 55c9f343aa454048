//! Sending before the hash is known, over real loopback QUIC: a first send of a file is
//! hashed as it goes and its hash follows its bytes; a stream of unknown length (a pipe)
//! arrives verified whatever its size; a stream cut halfway names nothing; and a peer
//! speaking the protocol by hand cannot get a forged trailer, a wrong size or a missing
//! hash past the receiver.

mod common;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::peer::{read_frame, write_frame};
use common::{list_dir, tempdir};
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::transfer::tree::GROUP;
use qpunch::transfer::{
    self, Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult, Manifest, Outcome,
    Outgoing, PARTIAL_DIR, Policy, Quiet, ReceiveOptions, Receiver, Trailer,
};

const MIB: usize = 1 << 20;

fn node(accept: bool) -> Arc<Node> {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let id = Identity::generate().unwrap();
    Arc::new(Node::new(socket, NodeConfig::new(id, transfer::ALPN, accept)).unwrap())
}

/// A receiver storing into `out`, serving every connection; its reports come back on the
/// channel, one batch per connection.
fn serve(
    out: &Path,
) -> (
    Arc<Node>,
    tokio::sync::mpsc::UnboundedReceiver<Vec<FileReport>>,
) {
    let receiver = Receiver::new(ReceiveOptions {
        stall_timeout: Duration::from_secs(2),
        ..ReceiveOptions::new(out, Policy::AcceptAll)
    })
    .unwrap();
    let server = node(true);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(Ok(peer)) = accepting.accept().await {
            let (receiver, tx) = (receiver.clone(), tx.clone());
            tokio::spawn(async move {
                let reports = receiver.handle(&peer, Arc::new(Quiet)).await;
                let _ = tx.send(reports.unwrap_or_default());
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), peer.connection.closed()).await;
            });
        }
    });
    (server, rx)
}

/// `sender`'s connection to `server`, pinned to its key.
async fn connect(sender: &Node, server: &Node) -> PeerConnection {
    let to = server.local_addr().unwrap();
    sender
        .connect(to, Some(server.fingerprint()))
        .await
        .unwrap()
}

/// Connect to `server` and send `files`; the sender's reports.
async fn send(server: &Node, files: Vec<Outgoing>) -> Vec<FileReport> {
    let sender = node(false);
    let peer = connect(&sender, server).await;
    let reports = transfer::send_files(&peer.connection, files, Arc::new(Quiet))
        .await
        .unwrap();
    sender.close(Duration::from_millis(100)).await;
    reports
}

/// Bytes that differ at every position (so a misplaced chunk cannot go unnoticed).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Partial files left in `out`.
fn partials(out: &Path) -> Vec<String> {
    list_dir(&out.join(PARTIAL_DIR)).into_iter().collect()
}

/// A reader that hands out at most `step` bytes per read, as a pipe does.
struct Dribble {
    data: std::io::Cursor<Vec<u8>>,
    step: usize,
}

impl Read for Dribble {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step);
        self.data.read(&mut buf[..n])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_unknown_length_arrive_verified_at_any_size() {
    let out = tempdir();
    let (server, mut batches) = serve(out.path());
    let group = GROUP as usize;
    // Empty, one byte, exactly one group, exactly one sender chunk (1 MiB), a chunk and a
    // bit, and several chunks that end mid-group.
    let sizes = [0, 1, group, MIB, MIB + 1, 3 * MIB + 17];
    for (i, &size) in sizes.iter().enumerate() {
        let data = pattern(size, i as u8);
        let name = format!("stream-{size}.bin");
        let source = Dribble {
            data: std::io::Cursor::new(data.clone()),
            step: 64 << 10,
        };
        let reports = send(&server, vec![Outgoing::from_reader(&name, source)]).await;
        let report = &reports[0];
        assert!(report.is_verified(), "{size} bytes: {report:?}");
        assert_eq!(report.size, size as u64, "the sender counts what it sent");
        assert_eq!(report.blake3, blake3::hash(&data).to_hex().as_str());
        let got = std::fs::read(out.path().join(&name)).unwrap();
        assert!(got == data, "{size} bytes arrive intact");
        let received = batches.recv().await.unwrap();
        assert_eq!(received[0].size, size as u64, "the receiver too");
        assert_eq!(received[0].blake3, report.blake3);
    }
    assert_eq!(partials(out.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_send_is_hashed_while_it_moves() {
    let (src, out) = (tempdir(), tempdir());
    let (server, _batches) = serve(out.path());
    let group = GROUP;
    let mut files = Vec::new();
    for (i, size) in [0, 4096, group, group + 1, 5 * MIB as u64]
        .into_iter()
        .enumerate()
    {
        let path = src.path().join(format!("f{i}.bin"));
        std::fs::write(&path, pattern(size as usize, i as u8)).unwrap();
        files.push(path);
    }
    let outgoing = files
        .iter()
        .map(|f| Outgoing::from_path(f).unwrap())
        .collect();
    let reports = send(&server, outgoing).await;
    for (report, path) in reports.iter().zip(&files) {
        assert!(report.is_verified(), "{report:?}");
        assert_eq!(report.blake3, common::blake3_file(path), "{report:?}");
        let saved = out.path().join(report.saved_as.as_deref().unwrap());
        assert_eq!(std::fs::read(saved).unwrap(), std::fs::read(path).unwrap());
    }
}

/// A stream source that gives `good` bytes, then fails like a dying disk or pipe.
struct Failing {
    left: usize,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("the producer died"));
        }
        let n = buf.len().min(self.left).min(64 << 10);
        buf[..n].fill(7);
        self.left -= n;
        Ok(n)
    }
}

/// A stream source that gives `good` bytes, then never another (a stalled producer).
struct Stalling {
    left: usize,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            std::thread::sleep(Duration::from_secs(3));
            return Ok(0);
        }
        let n = buf.len().min(self.left).min(64 << 10);
        buf[..n].fill(9);
        self.left -= n;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_halfway_names_nothing_and_keeps_nothing() {
    let out = tempdir();
    let (server, mut batches) = serve(out.path());

    // 1. The producer fails after 2 MiB: both sides say so, nothing is named.
    let source = Failing { left: 2 * MIB };
    let reports = send(&server, vec![Outgoing::from_reader("cut.bin", source)]).await;
    match &reports[0].outcome {
        Outcome::Failed(why) => assert!(why.contains("the producer died"), "{why}"),
        other => panic!("a failed stream is not {other:?}"),
    }
    let received = batches.recv().await.unwrap();
    match &received[0].outcome {
        Outcome::Failed(why) => assert!(why.contains("could not read its input"), "{why}"),
        other => panic!("the receiver must not call it {other:?}"),
    }

    // 2. The connection goes away mid-stream (the sender was killed).
    let sender = node(false);
    let peer = connect(&sender, &server).await;
    let connection = peer.connection.clone();
    let sending = tokio::spawn(async move {
        let source = Stalling { left: 3 * MIB };
        let files = vec![Outgoing::from_reader("vanished.bin", source)];
        transfer::send_files(&connection, files, Arc::new(Quiet)).await
    });
    // Wait until the receiver holds bytes of it, then cut.
    let held = async {
        loop {
            let dir = out.path().join(PARTIAL_DIR);
            let bytes: u64 = std::fs::read_dir(&dir)
                .map(|d| {
                    d.filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            if bytes > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the stream reached the receiver's disk");
    peer.connection
        .close(transfer::codes::CANCELLED.into(), b"killed");
    assert!(sending.await.unwrap().is_err(), "the sender saw its cut");
    let received = tokio::time::timeout(Duration::from_secs(20), batches.recv())
        .await
        .expect("the receiver noticed")
        .unwrap();
    // The cut ends the batch: the receiver reports it as the batch's error, or per file.
    for report in &received {
        assert!(!report.is_verified(), "{report:?}");
    }

    // Nothing took a name, and no partial is kept: a stream cannot be resumed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let names: Vec<String> = list_dir(out.path())
        .into_iter()
        .filter(|n| !n.starts_with(PARTIAL_DIR))
        .collect();
    assert_eq!(names, Vec::<String>::new());
    assert_eq!(partials(out.path()), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// A sender speaking the protocol by hand
// ---------------------------------------------------------------------------------------

/// What a hand-made entry ends with.
enum Ending {
    /// A trailer saying this size and hash.
    Trailer(u64, String),
    /// Nothing: the stream is finished right after the bytes.
    Nothing,
}

/// Offer one file without a hash (a stream when `stream`), send `payload` (framed as a
/// stream's chunks when `stream`) and `ending`; the receiver's verdict.
async fn hand_send(
    peer: &PeerConnection,
    stream: bool,
    payload: &[u8],
    ending: Ending,
) -> FileResult {
    let conn = &peer.connection;
    let (mut control, mut answers) = conn.open_bi().await.unwrap();
    let offer = FileOffer {
        id: 0,
        name: "forged.bin".into(),
        size: if stream { 0 } else { payload.len() as u64 },
        stream,
        ..FileOffer::default()
    };
    let manifest = Manifest {
        files: vec![offer],
        ..Manifest::default()
    };
    write_frame(&mut control, &manifest).await.unwrap();
    let Decisions { decisions } = read_frame(&mut answers).await.unwrap();
    assert_eq!(decisions, vec![Decision::Accept { id: 0, offset: 0 }]);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &FileHeader { id: 0, offset: 0 })
        .await
        .unwrap();
    if stream {
        for chunk in payload.chunks(100_000) {
            send.write_all(&(chunk.len() as u32).to_be_bytes())
                .await
                .unwrap();
            send.write_all(chunk).await.unwrap();
        }
        if !matches!(ending, Ending::Nothing) {
            send.write_all(&0u32.to_be_bytes()).await.unwrap();
        }
    } else {
        send.write_all(payload).await.unwrap();
    }
    if let Ending::Trailer(size, blake3) = ending {
        let trailer = Trailer {
            id: 0,
            size,
            blake3,
        };
        write_frame(&mut send, &trailer).await.unwrap();
    }
    send.finish().unwrap();
    let verdict = read_frame(&mut recv).await.unwrap();
    drop(control);
    verdict
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_trailers_wrong_sizes_and_missing_hashes_are_refused() {
    let out = tempdir();
    let (server, _batches) = serve(out.path());
    let payload = pattern(700_000, 3);
    let real = blake3::hash(&payload).to_hex().to_string();
    let forged = blake3::hash(b"what the sender claims").to_hex().to_string();
    let len = payload.len() as u64;
    let cases = [
        (
            "file, forged hash",
            false,
            Ending::Trailer(len, forged.clone()),
            "mismatch",
        ),
        (
            "file, wrong size",
            false,
            Ending::Trailer(len + 1, real.clone()),
            "trailer",
        ),
        (
            "file, malformed hash",
            false,
            Ending::Trailer(len, "zz".into()),
            "trailer",
        ),
        ("file, no trailer", false, Ending::Nothing, "did not say"),
        (
            "stream, forged hash",
            true,
            Ending::Trailer(len, forged.clone()),
            "mismatch",
        ),
        (
            "stream, short size",
            true,
            Ending::Trailer(len - 1, real.clone()),
            "trailer",
        ),
        ("stream, no end mark", true, Ending::Nothing, "end mark"),
    ];
    let sender = node(false);
    for (what, stream, ending, why) in cases {
        let peer = connect(&sender, &server).await;
        let verdict = hand_send(&peer, stream, &payload, ending).await;
        assert!(!verdict.verified, "{what}: {verdict:?}");
        assert!(verdict.saved_as.is_none(), "{what}: {verdict:?}");
        let error = verdict.error.as_deref().unwrap_or_default();
        assert!(
            error.contains(why),
            "{what}: expected {why:?} in {verdict:?}"
        );
        peer.connection.close(0u32.into(), b"");
        let names: Vec<String> = list_dir(out.path())
            .into_iter()
            .filter(|n| !n.starts_with(PARTIAL_DIR))
            .collect();
        assert_eq!(names, Vec::<String>::new(), "{what}: nothing is named");
    }
    // The honest trailer is accepted, so the refusals above are the lies'.
    let peer = connect(&sender, &server).await;
    let verdict = hand_send(&peer, true, &payload, Ending::Trailer(len, real.clone())).await;
    assert!(verdict.verified, "{verdict:?}");
    assert_eq!(verdict.blake3, real);
    assert_eq!(
        std::fs::read(out.path().join("forged.bin")).unwrap(),
        payload
    );
}

/// Write `bytes` in pieces of `step`, each in its own packet (a pause after each), so the
/// receiver sees frames and files split at every boundary.
async fn dribble(send: &mut quinn::SendStream, bytes: &[u8], step: usize) {
    for piece in bytes.chunks(step) {
        send.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One length-prefixed JSON frame, as the protocol writes it.
fn frame(value: &impl serde::Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(value).unwrap();
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&body);
    framed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_split_anywhere_arrives_and_carries_no_large_file() {
    let out = tempdir();
    let (server, mut batches) = serve(out.path());
    let sender = node(false);
    let peer = connect(&sender, &server).await;
    let conn = &peer.connection;
    let (small, large) = (pattern(10, 1), pattern(GROUP as usize + 1, 2));
    let offer = |id: u32, name: &str, size: usize| FileOffer {
        id,
        name: name.into(),
        size: size as u64,
        ..FileOffer::default()
    };
    let manifest = Manifest {
        files: vec![
            offer(0, "a.bin", small.len()),
            offer(1, "empty.bin", 0),
            offer(2, "large.bin", large.len()),
        ],
        ..Manifest::default()
    };
    let (mut control, mut answers) = conn.open_bi().await.unwrap();
    write_frame(&mut control, &manifest).await.unwrap();
    let Decisions { decisions } = read_frame(&mut answers).await.unwrap();
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    // One stream: two small entries, byte by byte and in threes, then a large file's
    // header where only small files belong.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut entries = frame(&FileHeader { id: 0, offset: 0 });
    entries.extend_from_slice(&small);
    entries.extend(frame(&Trailer {
        id: 0,
        size: small.len() as u64,
        blake3: blake3::hash(&small).to_hex().to_string(),
    }));
    dribble(&mut send, &entries, 1).await;
    let mut entries = frame(&FileHeader { id: 1, offset: 0 });
    entries.extend(frame(&Trailer {
        id: 1,
        size: 0,
        blake3: blake3::hash(b"").to_hex().to_string(),
    }));
    entries.extend(frame(&FileHeader { id: 2, offset: 0 }));
    dribble(&mut send, &entries, 3).await;
    let _ = send.write_all(&large).await;
    for id in [0, 1] {
        let verdict: FileResult = read_frame(&mut recv).await.unwrap();
        assert_eq!(verdict.id, id, "{verdict:?}");
        assert!(verdict.verified, "{verdict:?}");
    }
    let stopped = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    assert!(
        matches!(stopped, Ok(Ok(Some(code))) if code == 3u32.into()),
        "the bundle stream is stopped at the large file: {stopped:?}"
    );
    assert!(!out.path().join("large.bin").exists(), "nothing named yet");
    // The large file is still expected, on a stream of its own.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame(&FileHeader { id: 2, offset: 0 }))
        .await
        .unwrap();
    send.write_all(&large).await.unwrap();
    write_frame(
        &mut send,
        &Trailer {
            id: 2,
            size: large.len() as u64,
            blake3: blake3::hash(&large).to_hex().to_string(),
        },
    )
    .await
    .unwrap();
    send.finish().unwrap();
    let verdict: FileResult = read_frame(&mut recv).await.unwrap();
    assert!(verdict.verified, "{verdict:?}");
    control.finish().unwrap();
    let reports = tokio::time::timeout(Duration::from_secs(10), batches.recv())
        .await
        .expect("the receiver ends the batch")
        .unwrap();
    assert_eq!(reports.len(), 3, "{reports:?}");
    assert!(
        reports
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Verified)),
        "{reports:?}"
    );
    assert_eq!(std::fs::read(out.path().join("a.bin")).unwrap(), small);
    assert_eq!(std::fs::read(out.path().join("empty.bin")).unwrap(), b"");
    assert_eq!(std::fs::read(out.path().join("large.bin")).unwrap(), large);
}

/// Split a bundle stream's bytes (files of 1 byte each, sent without a hash) into
/// `(id, trailer hash)` per entry.
fn entries_of(mut bytes: &[u8]) -> Vec<(u32, String)> {
    fn take_frame<T: serde::de::DeserializeOwned>(bytes: &mut &[u8]) -> T {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        let value = serde_json::from_slice(&bytes[4..4 + len]).unwrap();
        *bytes = &bytes[4 + len..];
        value
    }
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let header: FileHeader = take_frame(&mut bytes);
        bytes = &bytes[1..];
        let trailer: Trailer = take_frame(&mut bytes);
        assert_eq!(trailer.id, header.id);
        entries.push((header.id, trailer.blake3));
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_sends_the_next_bundles_while_verdicts_are_pending() {
    // More bundles than a sender sends at once (8; the first ones are smaller still): a
    // receiver that answers only once it has them all is answered only if a sender does
    // not wait for verdicts first.
    const BUNDLES: usize = 10;
    let files = BUNDLES * transfer::BUNDLE_FILES;
    let dir = tempdir();
    let outgoing: Vec<Outgoing> = (0..files)
        .map(|n| {
            let path = dir.path().join(format!("f{n}"));
            std::fs::write(&path, [n as u8]).unwrap();
            Outgoing::from_path(&path).unwrap()
        })
        .collect();
    let server = node(true);
    let accepting = server.clone();
    let receiver = tokio::spawn(async move {
        let peer = accepting.accept().await.unwrap().unwrap();
        // As a receiver does for a sender it accepts (FILE_STREAMS streams).
        peer.open_windows_to(64 << 20, transfer::FILE_STREAMS + 1);
        let conn = peer.connection.clone();
        let (mut control, mut offers) = conn.accept_bi().await.unwrap();
        let Manifest { files, .. } = read_frame(&mut offers).await.unwrap();
        let decisions = files
            .iter()
            .map(|f| Decision::Accept {
                id: f.id,
                offset: 0,
            })
            .collect();
        write_frame(&mut control, &Decisions { decisions })
            .await
            .unwrap();
        let mut bundles = Vec::new();
        let mut received = 0;
        while received < files.len() {
            let (send, mut recv) = conn.accept_bi().await.unwrap();
            let bytes = recv.read_to_end(1 << 20).await.unwrap();
            let entries = entries_of(&bytes);
            received += entries.len();
            bundles.push((send, entries));
        }
        assert!(bundles.len() >= BUNDLES, "{} bundles", bundles.len());
        for (mut send, entries) in bundles {
            for (id, blake3) in entries {
                let verdict = FileResult {
                    id,
                    verified: true,
                    blake3,
                    saved_as: None,
                    error: None,
                };
                write_frame(&mut send, &verdict).await.unwrap();
            }
            send.finish().unwrap();
        }
        let _ = offers.read_to_end(0).await;
        (conn, peer)
    });
    let sender = node(false);
    let peer = connect(&sender, &server).await;
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        transfer::send_files(&peer.connection, outgoing, Arc::new(Quiet)),
    )
    .await
    .expect("every bundle is sent before any verdict comes")
    .unwrap();
    assert_eq!(sent.len(), files);
    assert!(sent.iter().all(|r| matches!(r.outcome, Outcome::Verified)));
    drop(receiver);
}

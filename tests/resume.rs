//! Resume from a verified prefix, over real loopback QUIC with real files: a transfer cut
//! anywhere continues where the receiver's partial is proven good, a forged or corrupted
//! partial is never trusted, two transfers of one content never share a partial, and a
//! sender that comes back takes its partial over from its own dead connection at once.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{blake3_file, list_dir, names, random_file, tempdir};
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::transfer::tree::{GROUP, TreeCache};
use qpunch::transfer::{
    self, FileOffer, FileReport, Observer, Outgoing, PARTIAL_DIR, Policy, Quiet, ReceiveOptions,
    Receiver, SendOptions, codes,
};

const MIB: u64 = 1 << 20;

fn node(identity: Identity, accept: bool) -> Arc<Node> {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Arc::new(Node::new(socket, NodeConfig::new(identity, transfer::ALPN, accept)).unwrap())
}

/// A receiver serving every connection concurrently, storing into `out`.
fn serve(out: &Path, stall: Duration) -> (Arc<Node>, tokio::task::JoinHandle<()>) {
    serve_cutting(out, stall, None)
}

/// [`serve`], cutting the first connection once `cut` bytes of it reached the disk.
fn serve_cutting(
    out: &Path,
    stall: Duration,
    cut: Option<u64>,
) -> (Arc<Node>, tokio::task::JoinHandle<()>) {
    let receiver = Receiver::new(ReceiveOptions {
        stall_timeout: stall,
        ..ReceiveOptions::new(out, Policy::AcceptAll)
    })
    .unwrap();
    let server = node(Identity::generate().unwrap(), true);
    let accepting = server.clone();
    let serving = tokio::spawn(async move {
        let mut cut = cut;
        while let Some(Ok(peer)) = accepting.accept().await {
            let receiver = receiver.clone();
            let observer: Arc<dyn Observer> = match cut.take() {
                Some(at) => Arc::new(Count {
                    cut_at: Some(at),
                    connection: Mutex::new(Some(peer.connection.clone())),
                    ..Count::default()
                }),
                None => Arc::new(Quiet),
            };
            tokio::spawn(async move {
                let _ = receiver.handle(&peer, observer).await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), peer.connection.closed()).await;
            });
        }
    });
    (server, serving)
}

/// Counts what a send moved, and cuts its connection once `cut_at` bytes went out.
#[derive(Default)]
struct Count {
    moved: AtomicU64,
    skipped: AtomicU64,
    cut_at: Option<u64>,
    connection: Mutex<Option<quinn::Connection>>,
}

impl Observer for Count {
    fn progress(&self, _id: u32, bytes: u64) {
        let moved = self.moved.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if let Some(cut) = self.cut_at
            && moved >= cut
            && let Some(conn) = self.connection.lock().unwrap().take()
        {
            conn.close(codes::CANCELLED.into(), b"cut");
        }
    }

    fn skipped(&self, _id: u32, bytes: u64) {
        self.skipped.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// Send `files` from `sender` to `to` with `count` observing; returns the reports (or the
/// connection error) and the connection's UDP bytes sent.
async fn send(
    sender: &Node,
    to: SocketAddr,
    server: &Node,
    files: &[&Path],
    count: Arc<Count>,
) -> (Result<Vec<FileReport>, transfer::TransferError>, u64) {
    send_with(sender, to, server, files, count, None).await
}

/// [`send`], offering the hashes `cache` knows (a repeat send) rather than hashing as it
/// goes (a first send).
async fn send_with(
    sender: &Node,
    to: SocketAddr,
    server: &Node,
    files: &[&Path],
    count: Arc<Count>,
    cache: Option<Arc<TreeCache>>,
) -> (Result<Vec<FileReport>, transfer::TransferError>, u64) {
    let peer = sender
        .connect(to, Some(server.fingerprint()))
        .await
        .unwrap();
    *count.connection.lock().unwrap() = Some(peer.connection.clone());
    let outgoing = files
        .iter()
        .map(|f| Outgoing::from_path(f).unwrap())
        .collect();
    let options = SendOptions {
        cache,
        ..SendOptions::default()
    };
    let result = transfer::send_files_with(&peer.connection, outgoing, count, options).await;
    let udp = peer.connection.stats().udp_tx.bytes;
    peer.connection.close(0u32.into(), b"done");
    (result, udp)
}

/// The partial a first send of a file named `name` of `size` bytes resumes: keyed by its
/// path and size, since its hash is not known yet.
fn first_send_part(out: &Path, name: &str, size: u64) -> PathBuf {
    let offer = FileOffer {
        name: name.into(),
        size,
        ..FileOffer::default()
    };
    let key = offer.part_keys().pop().unwrap();
    out.join(PARTIAL_DIR).join(format!("{key}.part"))
}

/// A cache in `dir` that already knows `files`' trees: their sends offer their hashes.
fn warm_cache(dir: &Path, files: &[&Path]) -> Arc<TreeCache> {
    let cache = TreeCache::open(dir).unwrap();
    for file in files {
        cache.tree(file).unwrap();
    }
    Arc::new(cache)
}

fn partials(out: &Path) -> Vec<PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(out.join(PARTIAL_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    found.sort();
    found
}

/// Whether no transfer writes `path` any more: a receiver holds a lock on every partial
/// it writes (see `transfer::store`), until the last byte is on disk.
fn unlocked(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|file| file.try_lock().is_ok())
}

/// Wait until `out` holds no partial in use: `check` passes on it, or time runs out.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_cut_at_half_resumes_with_only_the_missing_half() {
    // Larger than the cut plus a stream window (16 MiB): the receiver cannot have the
    // whole file before the cut bites (with 16 MiB it sometimes did, and kept none).
    const SIZE: u64 = 48 * MIB;
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("big.bin");
    random_file(&file, SIZE, 1);
    // The connection is cut once half the file reached the receiver's disk.
    let (server, _serving) = serve_cutting(out.path(), Duration::from_secs(10), Some(SIZE / 2));
    let to = server.local_addr().unwrap();
    let sender = node(Identity::generate().unwrap(), false);

    let first = Arc::new(Count::default());
    let (result, _) = send(&sender, to, &server, &[&file], first.clone()).await;
    assert!(
        result.is_err(),
        "a cut transfer is not a success: {result:?}"
    );
    // The receiver keeps the partial, never the final name.
    eventually("the partial to be kept", || partials(out.path()).len() == 1).await;
    // Its size is final once the cut transfer has let go of it (no writer holds its lock).
    let partial = partials(out.path()).remove(0);
    eventually("the cut transfer to let go of its partial", || {
        unlocked(&partial)
    })
    .await;
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(!out.path().join("big.bin").exists());
    assert!((GROUP..=SIZE).contains(&kept), "kept {kept} bytes");

    // Second attempt, a new connection: only the missing part travels.
    let second = Arc::new(Count::default());
    let (result, udp) = send(&sender, to, &server, &[&file], second.clone()).await;
    let reports = result.unwrap();
    assert!(reports[0].is_verified(), "{reports:?}");
    assert_eq!(blake3_file(&out.path().join("big.bin")), blake3_file(&file));
    let (moved, skipped) = (
        second.moved.load(Ordering::SeqCst),
        second.skipped.load(Ordering::SeqCst),
    );
    eprintln!(
        "cut after {} MiB sent: partial kept {kept} bytes; resume moved {moved} bytes \
         ({:.1}% of the file), skipped {skipped}, {udp} UDP bytes on the wire",
        first.moved.load(Ordering::SeqCst) / MIB,
        moved as f64 * 100.0 / SIZE as f64
    );
    assert_eq!(moved + skipped, SIZE);
    assert_eq!(
        skipped,
        kept / GROUP * GROUP,
        "the whole verified prefix is kept"
    );
    assert!(kept >= SIZE / 2, "kept {kept}");
    assert!(moved <= SIZE / 2, "moved {moved} of {SIZE}");
    assert!(udp < SIZE - skipped + 2 * MIB, "{udp} bytes on the wire");
    assert_eq!(list_dir(out.path()), names(&["big.bin"]), "no partial left");
}

#[tokio::test]
async fn forged_and_corrupted_partials_are_never_trusted() {
    const SIZE: u64 = 4 * MIB + 12_345;
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("f.bin");
    random_file(&file, SIZE, 2);
    let data = std::fs::read(&file).unwrap();
    let root = blake3_file(&file);
    let (server, _serving) = serve(out.path(), Duration::from_secs(10));
    let to = server.local_addr().unwrap();
    let sender = node(Identity::generate().unwrap(), false);
    let partial_dir = out.path().join(PARTIAL_DIR);
    let victim = src.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    // (partial planted, bytes expected to be kept)
    let mut corrupted = data[..3 * MIB as usize].to_vec();
    corrupted[(GROUP * 5 + 17) as usize] ^= 0x40;
    let forged: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
    let cases: Vec<(&str, Option<Vec<u8>>, u64)> = vec![
        (
            "a corrupted group cuts the prefix there",
            Some(corrupted),
            5 * GROUP,
        ),
        (
            "a forged partial of the right size keeps nothing",
            Some(forged),
            0,
        ),
        ("a symlink is not followed", None, 0),
    ];
    // A first send finds its partial by path and size and proves it with the tree it
    // computes then; a repeat send offers its cached hash and finds it by content.
    let cache = warm_cache(&src.path().join("cache"), &[&file]);
    let keyings = [
        (first_send_part(out.path(), "f.bin", SIZE), None),
        (partial_dir.join(format!("{root}.part")), Some(cache)),
    ];
    for (part, cache) in keyings {
        for (i, (what, planted, keep)) in cases.iter().enumerate() {
            match planted {
                Some(bytes) => std::fs::write(&part, bytes).unwrap(),
                None => std::os::unix::fs::symlink(&victim, &part).unwrap(),
            }
            let count = Arc::new(Count::default());
            let files = [file.as_path()];
            let (result, _) =
                send_with(&sender, to, &server, &files, count.clone(), cache.clone()).await;
            let what = format!("{what} (hash offered: {})", cache.is_some());
            let reports = result.unwrap();
            assert!(reports[0].is_verified(), "{what}: {reports:?}");
            assert_eq!(reports[0].blake3, root, "{what}");
            let saved = out.path().join(reports[0].saved_as.as_deref().unwrap());
            assert_eq!(std::fs::read(&saved).unwrap(), data, "{what}");
            assert_eq!(count.skipped.load(Ordering::SeqCst), *keep, "{what}");
            assert_eq!(count.moved.load(Ordering::SeqCst), SIZE - keep, "{what}");
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{what}");
            std::fs::remove_file(&saved).unwrap();
            let _ = std::fs::remove_file(&part);
            assert!(partials(out.path()).is_empty(), "{what}: {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transfers_of_one_content_never_share_a_partial() {
    const SIZE: u64 = 8 * MIB;
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("same.bin");
    random_file(&file, SIZE, 3);
    let root = blake3_file(&file);
    let (server, _serving) = serve(out.path(), Duration::from_secs(10));
    let to = server.local_addr().unwrap();
    // A partial both will be offered to resume (first sends: found by path and size).
    let data = std::fs::read(&file).unwrap();
    let part = first_send_part(out.path(), "same.bin", SIZE);
    std::fs::write(&part, &data[..2 * MIB as usize]).unwrap();

    let senders = [
        node(Identity::generate().unwrap(), false),
        node(Identity::generate().unwrap(), false),
    ];
    let counts = [Arc::new(Count::default()), Arc::new(Count::default())];
    let files = [file.as_path()];
    let (a, b) = tokio::join!(
        send(&senders[0], to, &server, &files, counts[0].clone()),
        send(&senders[1], to, &server, &files, counts[1].clone()),
    );
    for (result, _) in [a, b] {
        let reports = result.unwrap();
        assert!(reports[0].is_verified(), "{reports:?}");
        assert_eq!(reports[0].blake3, root, "hashed as it was sent");
    }
    assert_eq!(list_dir(out.path()), names(&["same.bin", "same (1).bin"]));
    for name in ["same.bin", "same (1).bin"] {
        assert_eq!(
            std::fs::read(out.path().join(name)).unwrap(),
            data,
            "{name}"
        );
    }
    // Exactly one of them resumed the partial; the other wrote its own from scratch.
    let skipped: Vec<u64> = counts
        .iter()
        .map(|c| c.skipped.load(Ordering::SeqCst))
        .collect();
    assert!(
        skipped.contains(&(2 * MIB)) && skipped.contains(&0),
        "{skipped:?}"
    );
}

/// A UDP relay between a client and `server` that can go dark, like a network that
/// drops: the sender's connection then hangs instead of closing.
struct Relay {
    addr: SocketAddr,
    dark: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let outside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let inside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = outside.local_addr().unwrap();
        let dark = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        {
            let (outside, inside, dark, client) = (
                outside.clone(),
                inside.clone(),
                dark.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = outside.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if !dark.load(Ordering::SeqCst) {
                        let _ = inside.send_to(&buf[..n], server).await;
                        // A slow link (a few MB/s), so the test can cut it mid-file.
                        tokio::time::sleep(Duration::from_micros(300)).await;
                    }
                }
            });
        }
        {
            let dark = dark.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = inside.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let (Some(to), false) = (to, dark.load(Ordering::SeqCst)) {
                        let _ = outside.send_to(&buf[..n], to).await;
                    }
                }
            });
        }
        Relay { addr, dark }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_comes_back_takes_over_its_partial_at_once() {
    const SIZE: u64 = 16 * MIB;
    let (src, out, home) = (tempdir(), tempdir(), tempdir());
    let file = src.path().join("f.bin");
    random_file(&file, SIZE, 4);
    // The receiver would wait 30 s before giving up on the silent connection.
    let (server, _serving) = serve(out.path(), Duration::from_secs(30));
    let to = server.local_addr().unwrap();
    let relay = Relay::start(to).await;
    // The same identity both times (a re-run of the same `qpunch send`).
    let first = node(Identity::load_or_create(home.path()).unwrap(), false);

    let peer = first
        .connect(relay.addr, Some(server.fingerprint()))
        .await
        .unwrap();
    let cut = tokio::spawn(async move {
        let outgoing = vec![Outgoing::from_path(&file).unwrap()];
        let result = transfer::send_files(&peer.connection, outgoing, Arc::new(Quiet)).await;
        (result, file)
    });
    // The network goes away with 2 MiB at the receiver, which holds the partial for the
    // silent connection.
    let held = || {
        partials(out.path())
            .first()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    };
    eventually("2 MiB in the partial", || held() >= 2 * MIB).await;
    relay.dark.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cut.abort();
    let file = src.path().join("f.bin");

    let started = Instant::now();
    let again = node(Identity::load_or_create(home.path()).unwrap(), false);
    let count = Arc::new(Count::default());
    let (result, _) = send(&again, to, &server, &[&file], count.clone()).await;
    let took = started.elapsed();
    let reports = result.unwrap();
    assert!(reports[0].is_verified(), "{reports:?}");
    assert_eq!(blake3_file(&out.path().join("f.bin")), blake3_file(&file));
    let skipped = count.skipped.load(Ordering::SeqCst);
    eprintln!("took over after {took:?}, skipping {skipped} bytes");
    assert!(
        skipped >= 2 * MIB - GROUP,
        "the partial was resumed, not restarted"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[tokio::test]
async fn one_send_offering_a_content_twice_does_not_fight_over_its_partial() {
    const SIZE: u64 = 4 * MIB;
    let (src, out) = (tempdir(), tempdir());
    let (a, b) = (src.path().join("a.bin"), src.path().join("b.bin"));
    random_file(&a, SIZE, 5);
    std::fs::copy(&a, &b).unwrap();
    let root = blake3_file(&a);
    let data = std::fs::read(&a).unwrap();
    let part = out.path().join(PARTIAL_DIR).join(format!("{root}.part"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &data[..MIB as usize]).unwrap();
    let (server, _serving) = serve(out.path(), Duration::from_secs(10));
    let to = server.local_addr().unwrap();
    let sender = node(Identity::generate().unwrap(), false);
    let count = Arc::new(Count::default());
    // Repeat sends: both offer the content's hash, and so both point at its partial.
    let cache = warm_cache(&src.path().join("cache"), &[&a, &b]);
    let (result, _) = send_with(&sender, to, &server, &[&a, &b], count.clone(), Some(cache)).await;
    let reports = result.unwrap();
    assert!(reports.iter().all(FileReport::is_verified), "{reports:?}");
    assert_eq!(list_dir(out.path()), names(&["a.bin", "b.bin"]));
    for name in ["a.bin", "b.bin"] {
        assert_eq!(std::fs::read(out.path().join(name)).unwrap(), data);
    }
    // One of them resumed the partial; the other did not take it away.
    assert_eq!(count.skipped.load(Ordering::SeqCst), MIB);
    assert_eq!(count.moved.load(Ordering::SeqCst), 2 * SIZE - MIB);
}

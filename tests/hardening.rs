//! Hardening `qpunch receive` against hostile peers, played by the attacker.
//!
//! Each test drives the real `qpunch` binary over loopback and attacks it with peers built
//! from the library (real quinn, real TLS, frames written by hand), then checks what the
//! contract promises: limits on connections, handshakes, memory, threads and
//! probe replies; a stats event on SIGINT/SIGTERM; no leaked name reservations; no writes
//! through links; no raw terminal controls from peers; no dotfiles by default; and a
//! consent step that checks free space first. Distinct source addresses come from
//! 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback on Linux).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pty::{PROMPT, PtyProc};
use common::*;
use peer::{
    connect_from, lo, offer, offer_files, offer_of, read_frame, write_frame, write_raw_frame,
};
use qpunch::identity::{Fingerprint, Identity};
use qpunch::node::{Node, NodeConfig};
use qpunch::transfer::{self, Decision, Decisions, FileHeader, FileResult, Manifest};
use qpunch::wire::Message;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// The receiver's key, parsed.
fn fingerprint(receiver: &Receiver) -> Fingerprint {
    receiver.fingerprint.parse().expect("fingerprint")
}

fn target(port: u16) -> SocketAddr {
    SocketAddr::new(lo(1), port)
}

/// Send `signal` to a running receiver and collect everything it printed until it exits.
fn stop(receiver: Receiver, signal: i32) -> Finished {
    receiver.proc.signal(signal);
    receiver.proc.finish(SHORT)
}

/// A counter from the receiver's `stats` event.
fn stat(finished: &Finished, field: &str) -> u64 {
    let stats = finished.one("stats");
    stats[field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats event has no counter {field:?}: {stats}"))
}

/// A probe with a fresh random transaction id.
fn probe() -> (Message, Vec<u8>) {
    let message = Message::Probe {
        txid: rand::random(),
    };
    let bytes = message.to_vec();
    (message, bytes)
}

/// Whether `datagram` is a reply to one of `txids`.
fn is_reply_to(datagram: &[u8], txids: &BTreeSet<[u8; 12]>) -> bool {
    matches!(Message::decode(datagram), Ok(Message::Reply { txid, .. }) if txids.contains(&txid))
}

/// Samples a value of a process every 50 ms on a thread; keeps the maximum.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<f64>>,
    max: Arc<Mutex<f64>>,
}

impl Sampler {
    /// Sample `read` (None once the process is gone); `over` runs once if a sample
    /// exceeds `limit` (to stop an attack before it hurts the machine).
    fn start(
        read: impl Fn() -> Option<f64> + Send + 'static,
        limit: f64,
        over: impl FnOnce() + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(0.0f64));
        let handle = {
            let (stop, max) = (stop.clone(), max.clone());
            thread::spawn(move || {
                let mut over = Some(over);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(v) = read() {
                        let mut m = max.lock().unwrap();
                        *m = m.max(v);
                        if *m > limit
                            && let Some(over) = over.take()
                        {
                            over();
                        }
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                *max.lock().unwrap()
            })
        };
        Sampler {
            stop,
            handle: Some(handle),
            max,
        }
    }

    /// The maximum so far.
    fn max(&self) -> f64 {
        *self.max.lock().unwrap()
    }

    /// Stop sampling and return the maximum.
    fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("sampler")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A small honest file in a fresh source directory.
fn small_file(name: &str, contents: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = tempdir();
    let path = src.path().join(name);
    fs::write(&path, contents).unwrap();
    (src, path)
}

/// The sender exited 0, and its `sent` event for `name` matches the file on disk.
fn assert_delivered(sender: &Finished, name: &str, source: &Path, out: &Path) {
    sender.assert_success();
    let sent = sender
        .all("sent")
        .into_iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no sent event for {name}\n{sender:#?}"));
    let saved_as = sent["saved_as"].as_str().expect("saved_as");
    assert_eq!(sent["blake3"], blake3_file(source), "{sent}");
    assert_eq!(
        fs::read(out.join(saved_as)).unwrap(),
        fs::read(source).unwrap(),
        "stored bytes of {name}"
    );
}

// ---------------------------------------------------------------------------------------
// Stalled handshakes
// ---------------------------------------------------------------------------------------

/// Three sources each send one real QUIC Initial and never continue. An honest sender
/// started right after must still get through within 10 s; once the stalled handshakes
/// have had their 5 s, SIGTERM yields a `stats` event counting them as failed.
#[test]
fn stalled_handshakes_do_not_delay_an_honest_sender() {
    let rt = peer::runtime();
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let (_src, file) = small_file("honest.txt", b"hello\n");
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let to = target(receiver.port);

    let initials = rt.block_on(peer::capture_initials(3));
    let stalled_at = Instant::now();
    let _stallers: Vec<UdpSocket> = initials
        .iter()
        .enumerate()
        .map(|(i, initial)| {
            let socket = UdpSocket::bind((lo(2 + i as u8), 0)).expect("bind staller");
            socket.send_to(initial, to).expect("send Initial");
            socket
        })
        .collect();
    thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        Duration::from_secs(10),
    );
    let took = started.elapsed();
    assert_delivered(&sender, "honest.txt", &file, out.path());
    assert!(took <= Duration::from_secs(10), "honest send took {took:?}");
    eprintln!("honest send behind 3 stalled handshakes: {took:?}");

    // The default handshake timeout is 5 s: by now the three have failed.
    thread::sleep(Duration::from_secs(6).saturating_sub(stalled_at.elapsed()));
    let finished = stop(receiver, libc::SIGTERM);
    let failed = stat(&finished, "handshakes_failed");
    assert!(
        failed >= 3,
        "3 stalled handshakes timed out, stats say {failed}\n{finished:#?}"
    );
}

/// 100 Initials from 100 source ports, none continuing: beyond 16 half-open handshakes
/// the receiver must validate addresses with a Retry instead of doing TLS work.
#[test]
fn half_open_handshakes_beyond_16_get_a_retry() {
    const SOURCES: usize = 100;
    let rt = peer::runtime();
    let (rhome, out) = (Home::new(), tempdir());
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let to = target(receiver.port);

    let initials = rt.block_on(peer::capture_initials(SOURCES));
    let sockets: Vec<UdpSocket> = initials
        .iter()
        .map(|initial| {
            let socket = UdpSocket::bind((lo(2), 0)).expect("bind source");
            socket.set_nonblocking(true).unwrap();
            socket.send_to(initial, to).expect("send Initial");
            socket
        })
        .collect();

    // The first packet type of the first datagram each source got back.
    let mut answers: Vec<Option<u8>> = vec![None; SOURCES];
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && answers.iter().any(Option::is_none) {
        for (socket, answer) in sockets.iter().zip(answers.iter_mut()) {
            if answer.is_none()
                && let Ok((n, _)) = socket.recv_from(&mut buf)
            {
                *answer = Some(peer::long_header_type(&buf[..n]).unwrap_or(0xff));
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let retried = answers.iter().filter(|a| **a == Some(3)).count();
    let summary: Vec<String> = answers
        .iter()
        .map(|a| match a {
            None => "-".to_string(),
            Some(3) => "R".to_string(),
            Some(t) => t.to_string(),
        })
        .collect();
    eprintln!(
        "answers by source (R = Retry, 0 = Initial, - = none): {}",
        summary.join("")
    );
    // 16 may be served directly; all later ones must be retried (4 of slack for
    // handshakes that ended meanwhile).
    assert!(
        retried >= SOURCES - 16 - 4,
        "only {retried} of {SOURCES} stalled Initials were answered with a Retry: {}",
        summary.join("")
    );
}

// ---------------------------------------------------------------------------------------
// Connection budget
// ---------------------------------------------------------------------------------------

static JUNK: [u8; 64 << 10] = [0x5a; 64 << 10];

/// Write junk until `budget` bytes are out or the stream fails (flow control makes this
/// wait, not the sender).
async fn flood(send: &mut quinn::SendStream, budget: usize) {
    let mut left = budget;
    while left > 0 {
        let n = left.min(JUNK.len());
        if send
            .write_chunk(Bytes::from_static(&JUNK[..n]))
            .await
            .is_err()
        {
            return;
        }
        left -= n;
    }
}

/// One hostile connection's attack, until the connection closes: a control stream with
/// a 4 MiB length prefix (and a frame never completed, or with `big_frame` 4 MiB of junk
/// completing it), 3 more bidi streams and a uni stream written as fast as flow control
/// allows (64 MiB in all), and datagrams. Nothing is ever read.
async fn attack(conn: quinn::Connection, big_frame: bool) {
    const MIB: usize = 1 << 20;
    let mut tasks = tokio::task::JoinSet::new();
    let c = conn.clone();
    tasks.spawn(async move {
        let Ok((mut send, _recv)) = c.open_bi().await else {
            return;
        };
        if send.write_all(&(4u32 << 20).to_be_bytes()).await.is_err() {
            return;
        }
        flood(&mut send, if big_frame { 4 * MIB } else { 4 * MIB - 1024 }).await;
        std::future::pending::<()>().await;
    });
    for _ in 0..3 {
        let c = conn.clone();
        tasks.spawn(async move {
            let Ok((mut send, _recv)) = c.open_bi().await else {
                return;
            };
            flood(&mut send, 16 * MIB).await;
            std::future::pending::<()>().await;
        });
    }
    let c = conn.clone();
    tasks.spawn(async move {
        let Ok(mut send) = c.open_uni().await else {
            return;
        };
        flood(&mut send, 12 * MIB).await;
        std::future::pending::<()>().await;
    });
    let c = conn.clone();
    tasks.spawn(async move {
        for _ in 0..40 {
            for _ in 0..50 {
                if c.send_datagram(Bytes::from_static(&JUNK[..1000])).is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    conn.closed().await;
}

/// `n` authenticated strangers from `n` addresses (127.0.0.2, ...), each running
/// [`attack`]; and a sampler of the receiver's peak RSS that stops the attack at once when
/// it crosses `limit` (the test has failed then, and the machine should not pay for more).
fn flood_from_strangers(
    rt: &tokio::runtime::Runtime,
    n: u8,
    to: SocketAddr,
    fp: Fingerprint,
    pid: u32,
    limit: f64,
) -> (Vec<peer::Peer>, Vec<quinn::Connection>, Sampler) {
    let peers: Vec<peer::Peer> = rt
        .block_on(futures_util::future::join_all(
            (0..n).map(|i| connect_from(lo(2 + i), to, fp)),
        ))
        .into_iter()
        .map(|p| p.expect("a stranger within the receiver's connection limits"))
        .collect();
    let conns: Vec<quinn::Connection> = peers.iter().map(|p| p.conn.clone()).collect();
    let sampler = {
        let conns = conns.clone();
        Sampler::start(
            move || sys::peak_rss_mib(pid),
            limit,
            move || {
                for c in &conns {
                    c.close(0u32.into(), b"over budget");
                }
            },
        )
    };
    for (i, c) in conns.iter().enumerate() {
        rt.spawn(attack(c.clone(), i % 4 == 3));
    }
    (peers, conns, sampler)
}

/// 254 authenticated strangers from 254 addresses (with the honest sender, the whole
/// default budget of 256 connections but one) flood everything flow control allows and
/// hold it for ~10 s; an honest 1 MiB send still completes, and the receiver's peak RSS
/// stays below the README's bound against strangers, ~120 MiB.
#[test]
fn flooding_connections_do_not_blow_up_memory() {
    const HOSTILE: u8 = 254;
    const RSS_LIMIT_MIB: f64 = 120.0;
    const HOLD: Duration = Duration::from_secs(10);
    let rt = peer::runtime();
    let (rhome, shome, out, src) = (Home::new(), Home::new(), tempdir(), tempdir());
    let file = src.path().join("honest.bin");
    random_file(&file, MIB, 21);
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));
    let pid = receiver.proc.id();

    let (_peers, conns, sampler) = flood_from_strangers(&rt, HOSTILE, to, fp, pid, RSS_LIMIT_MIB);
    let flooding = Instant::now();

    thread::sleep(Duration::from_secs(1));
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        Duration::from_secs(20),
    );
    thread::sleep(HOLD.saturating_sub(flooding.elapsed()));
    let peak = sampler
        .finish()
        .max(sys::peak_rss_mib(pid).unwrap_or_default());
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    eprintln!("receiver peak RSS under {HOSTILE} flooding connections: {peak:.1} MiB");
    assert!(
        peak < RSS_LIMIT_MIB,
        "receiver peak RSS {peak:.1} MiB >= {RSS_LIMIT_MIB} MiB under {} flooding connections",
        conns.len()
    );
    assert_delivered(&sender, "honest.bin", &file, out.path());
}

/// With `--max-per-ip 4`, a 5th concurrent connection from one address is refused
/// (CONNECTION_REFUSED, or closed before any stream), while another address still gets
/// through; the refusal is counted in `stats`.
#[test]
fn fifth_connection_from_one_address_is_refused() {
    let rt = peer::runtime();
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let (_src, file) = small_file("other-ip.txt", b"from 127.0.0.1\n");
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--max-per-ip", "4"]);
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));

    // Four connections from 127.0.0.2, each sitting in the middle of its manifest.
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..4 {
            let peer = connect_from(lo(2), to, fp)
                .await
                .expect("connection within the limit");
            let (mut send, recv) = peer.conn.open_bi().await.unwrap();
            send.write_all(&100u32.to_be_bytes()).await.unwrap();
            held.push((peer, send, recv));
        }
        held
    });
    let fifth = rt.block_on(async {
        match connect_from(lo(2), to, fp).await {
            Err(e) => Ok(format!("handshake refused: {e}")),
            Ok(peer) => {
                match tokio::time::timeout(Duration::from_secs(5), peer.conn.closed()).await {
                    Ok(reason) => Ok(format!("closed after the handshake: {reason}")),
                    Err(_) => Err("the 5th connection from 127.0.0.2 is still open after 5 s"),
                }
            }
        }
    });
    let open = held
        .iter()
        .filter(|(p, _, _)| p.conn.close_reason().is_none())
        .count();
    // Another address (the CLI sends from 127.0.0.1) is not affected.
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    drop(held);
    let finished = stop(receiver, libc::SIGINT);
    let fifth = fifth.unwrap_or_else(|e| panic!("{e}\n{finished:#?}"));
    eprintln!("5th connection: {fifth}");
    assert_eq!(open, 4, "the 4 connections within the limit stay open");
    assert_delivered(&sender, "other-ip.txt", &file, out.path());
    assert!(stat(&finished, "connections_refused") >= 1, "{finished:#?}");
}

// ---------------------------------------------------------------------------------------
// Disk threads and slow drip
// ---------------------------------------------------------------------------------------

/// Connect from `ip`, offer `files` files of `size` bytes, open a stream for each
/// accepted one (as many as the receiver lets us), write the header and one byte, then
/// drip one byte per stream every `every`. Reports the number of streams opened on
/// `opened`, then drips until the task is dropped.
async fn drip(
    ip: std::net::IpAddr,
    to: SocketAddr,
    fp: Fingerprint,
    files: u32,
    size: u64,
    every: Duration,
    opened: mpsc::Sender<usize>,
) {
    let Ok(peer) = connect_from(ip, to, fp).await else {
        let _ = opened.send(0);
        return;
    };
    let conn = &peer.conn;
    let offers = (0..files)
        .map(|i| offer(i, &format!("drip-{ip}-{i}.bin"), size))
        .collect();
    let Ok(mut control) = offer_files(conn, offers).await else {
        let _ = opened.send(0);
        return;
    };
    let accepted: Vec<u32> = match control.decisions(Duration::from_secs(10)).await {
        Ok(decisions) => decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Accept { id, .. } => Some(*id),
                Decision::Resume { .. } | Decision::Decline { .. } => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut streams = Vec::new();
    for id in accepted {
        let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await
        else {
            break;
        };
        let _ = write_frame(&mut send, &FileHeader { id, offset: 0 }).await;
        let _ = send.write_all(&[0]).await;
        streams.push((send, recv));
    }
    let _ = opened.send(streams.len());
    loop {
        tokio::time::sleep(every).await;
        for (send, _) in &mut streams {
            let _ = send.write_all(&[0]).await;
        }
    }
}

/// 9 connections x 63 file streams, each dripping a byte every 2 s: the receiver must
/// not spend a thread per stream (at most 48 in all), and an honest 6-byte send must
/// complete within 10 s.
#[test]
fn dripping_streams_do_not_exhaust_threads() {
    const CONNECTIONS: u8 = 9;
    const MAX_THREADS: f64 = 48.0;
    let rt = peer::runtime();
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let (_src, file) = small_file("six.txt", b"hello\n");
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));
    let pid = receiver.proc.id();
    let sampler = Sampler::start(move || sys::threads(pid).map(|t| t as f64), f64::MAX, || {});

    let (opened_tx, opened) = mpsc::channel();
    let drips: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            rt.spawn(drip(
                lo(2 + i),
                to,
                fp,
                63,
                1000,
                Duration::from_secs(2),
                opened_tx.clone(),
            ))
        })
        .collect();
    let streams: usize = (0..CONNECTIONS)
        .map(|_| opened.recv_timeout(SHORT).expect("drip set up"))
        .sum();
    eprintln!("{streams} dripping file streams open");
    // The file sender itself streams 8 files at once: a receiver must allow that much.
    assert!(
        streams >= CONNECTIONS as usize * 8,
        "only {streams} file streams could be opened"
    );
    // Let the receiver settle on them.
    thread::sleep(Duration::from_secs(3));
    let threads = sampler.max();
    assert!(
        threads <= MAX_THREADS,
        "receiver ran {threads} threads for {streams} dripping streams"
    );

    let started = Instant::now();
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        Duration::from_secs(10),
    );
    let took = started.elapsed();
    let threads = sampler.finish();
    for d in drips {
        d.abort();
    }
    eprintln!("honest send beside {streams} drips: {took:?}; receiver threads peaked at {threads}");
    assert_delivered(&sender, "six.txt", &file, out.path());
    assert!(took <= Duration::from_secs(10), "honest send took {took:?}");
    assert!(threads <= MAX_THREADS, "receiver ran {threads} threads");
}

/// With `--stall-timeout 3s --min-rate 64KiB`, a file dripping one byte every 2 s
/// (never silent for 3 s, but far below the minimum rate) is aborted within ~15 s with
/// exactly one `error` line, which gives the minimum-rate reason, and nothing is left:
/// no file under its name, no partial.
#[test]
fn slow_drip_is_aborted_by_min_rate() {
    let rt = peer::runtime();
    let (rhome, out) = (Home::new(), tempdir());
    let mut receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--stall-timeout", "3s", "--min-rate", "64KiB"],
    );
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));

    let (peer, control, mut file_send, mut file_recv) = rt.block_on(async {
        let peer = connect_from(lo(2), to, fp).await.expect("connect");
        let files = vec![offer(0, "drip.bin", MIB)];
        let mut control = offer_files(&peer.conn, files).await.expect("offer");
        let decisions = control.decisions(SHORT).await.expect("decisions");
        assert!(
            matches!(decisions[..], [Decision::Accept { id: 0, offset: 0 }]),
            "{decisions:?}"
        );
        let (mut send, recv) = peer.conn.open_bi().await.unwrap();
        write_frame(&mut send, &FileHeader { id: 0, offset: 0 })
            .await
            .unwrap();
        send.write_all(&[0]).await.unwrap();
        (peer, control, send, recv)
    });
    let dripping = Instant::now();
    // The verdict (or the stream/connection failing) on the hostile side.
    let verdict = rt.spawn(async move { read_frame::<FileResult>(&mut file_recv).await });
    let dripper = rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if file_send.write_all(&[0]).await.is_err() {
                return;
            }
        }
    });

    let error = receiver.proc.wait_event("error", Duration::from_secs(17));
    let took = dripping.elapsed();
    let verdict = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(3), verdict).await })
        .map(|joined| joined.expect("verdict task"));
    dripper.abort();
    eprintln!("drip aborted after {took:?}: {error}; hostile side saw {verdict:?}");
    assert!(took <= Duration::from_secs(16), "abort took {took:?}");
    match verdict {
        Ok(Ok(result)) => assert!(!result.verified, "{result:?}"),
        Ok(Err(_)) => {} // stream stopped/reset or connection closed
        Err(_) => panic!("the hostile side still waits for a verdict after the error"),
    }
    drop((peer, control));
    // Everything the receiver printed about this sender, once it has stopped.
    let finished = stop(receiver, libc::SIGTERM);
    let errors = finished.error_messages();
    assert!(
        matches!(errors[..], [one] if one.contains("less than the minimum")),
        "one error line, with the minimum-rate reason: {errors:?}"
    );
    let names = list_dir(out.path());
    assert!(names.is_empty(), "left behind: {names:?}");
}

/// A sender whose two files are accepted but who never opens a stream for them is cut off
/// after `--stall-timeout`, with exactly one `error` line saying it sent nothing (not one
/// more per file it never sent).
#[test]
fn a_silent_sender_is_cut_off_with_one_error() {
    let rt = peer::runtime();
    let (rhome, out) = (Home::new(), tempdir());
    let mut receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--stall-timeout", "2s"],
    );
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));
    let (peer, control) = rt.block_on(async {
        let peer = connect_from(lo(2), to, fp).await.expect("connect");
        let files = vec![offer(0, "one.bin", MIB), offer(1, "two.bin", 1000)];
        let mut control = offer_files(&peer.conn, files).await.expect("offer");
        let decisions = control.decisions(SHORT).await.expect("decisions");
        assert_eq!(decisions.len(), 2, "{decisions:?}");
        (peer, control)
    });
    let error = receiver.proc.wait_event("error", SHORT);
    eprintln!("silent sender: {error}");
    drop((control, peer));
    let finished = stop(receiver, libc::SIGTERM);
    let errors = finished.error_messages();
    assert!(
        matches!(errors[..], [one] if one.contains("sent nothing for 2 s")),
        "one error line, saying the sender sent nothing: {errors:?}"
    );
    assert!(list_dir(out.path()).is_empty());
}

// ---------------------------------------------------------------------------------------
// One huge manifest must not freeze the receiver
// ---------------------------------------------------------------------------------------

/// Send a probe every 100 ms from `ip` to `to` until `stop`; returns when replies came.
fn probe_every_100ms(
    ip: std::net::IpAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Instant>> {
    thread::spawn(move || {
        let socket = UdpSocket::bind((ip, 0)).expect("bind prober");
        socket
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut txids = BTreeSet::new();
        let mut replies = Vec::new();
        let mut next = Instant::now();
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let (message, bytes) = probe();
                txids.insert(message.txid());
                let _ = socket.send_to(&bytes, to);
                next += Duration::from_millis(100);
            }
            if let Ok((n, _)) = socket.recv_from(&mut buf)
                && is_reply_to(&buf[..n], &txids)
            {
                replies.push(Instant::now());
            }
        }
        replies
    })
}

/// 10,000 offers all named `a`: while the receiver decides, probes every 100 ms keep
/// being answered (no gap over 1 s), and the decisions arrive within 10 s.
#[test]
fn ten_thousand_same_name_offers_do_not_freeze_the_receiver() {
    const FILES: u32 = 10_000;
    let rt = peer::runtime();
    let (rhome, out) = (Home::new(), tempdir());
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));
    let files: Vec<_> = (0..FILES).map(|id| offer(id, "a", 1)).collect();

    let peer = rt.block_on(connect_from(lo(2), to, fp)).expect("connect");
    let stop_probing = Arc::new(AtomicBool::new(false));
    let probing_from = Instant::now();
    let prober = probe_every_100ms(lo(3), to, stop_probing.clone());
    thread::sleep(Duration::from_millis(500));

    let (offered_at, decisions) = rt.block_on(async {
        let mut control = offer_files(&peer.conn, files).await.unwrap();
        let offered_at = Instant::now();
        let decisions = control.decisions(Duration::from_secs(10)).await;
        (offered_at, decisions.map(|d| (d, Instant::now())))
    });
    thread::sleep(Duration::from_secs(1));
    stop_probing.store(true, Ordering::Relaxed);
    let probing_until = Instant::now();
    let replies = prober.join().expect("prober");

    let mut marks = vec![probing_from];
    marks.extend(&replies);
    marks.push(probing_until);
    let gap = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    let decided = match &decisions {
        Ok((d, at)) => format!("{} decisions after {:?}", d.len(), *at - offered_at),
        Err(e) => format!("no decisions: {e}"),
    };
    eprintln!(
        "{} probe replies, longest gap {gap:?}; {decided}",
        replies.len()
    );
    assert!(
        gap <= Duration::from_secs(1),
        "probes went unanswered for {gap:?} while the receiver decided ({decided})"
    );
    let Ok((decisions, _)) = decisions else {
        panic!("{decided}");
    };
    assert_eq!(decisions.len(), FILES as usize);
}

// ---------------------------------------------------------------------------------------
// Probe flood
// ---------------------------------------------------------------------------------------

/// Send probes from `socket` to `to` every 50 ms until one is answered; whether one was
/// within `timeout`.
fn answered(socket: &UdpSocket, to: SocketAddr, timeout: Duration) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    let mut txids = BTreeSet::new();
    while Instant::now() < deadline {
        let (message, bytes) = probe();
        txids.insert(message.txid());
        let _ = socket.send_to(&bytes, to);
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && is_reply_to(&buf[..n], &txids)
        {
            return true;
        }
    }
    false
}

/// 3,000 valid probes from one socket as fast as possible: that source gets no more
/// replies than its budget allows for the time the flood took (a burst of 32, then 16 a
/// second), another source is still answered during and after the flood, and `stats`
/// counts the limiting.
#[test]
fn probe_flood_from_one_source_is_rate_limited() {
    const FLOOD: usize = 3_000;
    // The budget the README states: a burst of 32 replies per source, then 16 a second.
    const BURST: usize = 32;
    const RATE: f64 = 16.0;
    let (rhome, out) = (Home::new(), tempdir());
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let to = target(receiver.port);

    let flooder = UdpSocket::bind((lo(2), 0)).expect("bind flooder");
    let probes: Vec<(Message, Vec<u8>)> = (0..FLOOD).map(|_| probe()).collect();
    let txids: BTreeSet<[u8; 12]> = probes.iter().map(|(m, _)| m.txid()).collect();
    // Another source, probing during the flood.
    let during = thread::spawn(move || {
        let socket = UdpSocket::bind((lo(3), 0)).expect("bind bystander");
        answered(&socket, to, Duration::from_secs(5))
    });

    let started = Instant::now();
    for (_, bytes) in &probes {
        let _ = flooder.send_to(bytes, to);
    }
    let flood_took = started.elapsed();
    // And after it. The receiver reads datagrams in the order they came, so once this is
    // answered it has handled (answered or limited) every probe of the flood, and on
    // loopback its replies already wait in the flooder's socket: no time to guess.
    let after = UdpSocket::bind((lo(4), 0)).expect("bind second bystander");
    let answered_after = answered(&after, to, SHORT);
    let window = started.elapsed();
    flooder.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let mut replies = 0;
    while let Ok((n, _)) = flooder.recv_from(&mut buf) {
        if is_reply_to(&buf[..n], &txids) {
            replies += 1;
        }
    }
    let answered_during = during.join().expect("bystander");
    let finished = stop(receiver, libc::SIGINT);
    let allowed = BURST + (RATE * window.as_secs_f64()).ceil() as usize;
    eprintln!(
        "flood of {FLOOD} probes in {flood_took:?}, all handled within {window:?}: \
         {replies} replies (budget {allowed})"
    );
    assert!(
        replies <= allowed,
        "one source flooding {FLOOD} probes got {replies} replies in {window:?}"
    );
    assert!(
        answered_during,
        "another source was not answered during the flood"
    );
    assert!(
        answered_after,
        "another source was not answered after the flood"
    );
    let limited = stat(&finished, "probes_limited");
    assert!(limited > 0, "stats: {}", finished.one("stats"));
}

// ---------------------------------------------------------------------------------------
// Cancel safety of the accept loop
// ---------------------------------------------------------------------------------------

/// 5 rounds of 20 concurrent senders (64 KiB each) to one `receive --yes`, while a
/// stranger connects (full handshake) and closes at once in a tight loop: every send
/// exits 0 and every file arrives verified.
#[test]
fn concurrent_senders_survive_a_connect_and_close_loop() {
    const ROUNDS: usize = 5;
    const SENDERS: usize = 20;
    let rt = peer::runtime();
    let (rhome, out, src) = (Home::new(), tempdir(), tempdir());
    let homes: Vec<Home> = (0..SENDERS).map(|_| Home::new()).collect();
    for home in &homes {
        qpunch_id(home.path()); // create identities up front, one process at a time
    }
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));

    let stop_stranger = Arc::new(AtomicBool::new(false));
    let stranger = {
        let stop = stop_stranger.clone();
        rt.spawn(async move {
            let identity = Identity::generate().unwrap();
            let endpoint = peer::client_endpoint(lo(2));
            let mut handshakes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let connecting = endpoint
                    .connect_with(
                        peer::client_config(&identity, Some(fp)),
                        to,
                        qpunch::tls::SERVER_NAME,
                    )
                    .unwrap();
                match connecting.await {
                    Ok(conn) => {
                        conn.close(0u32.into(), b"");
                        handshakes += 1;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            handshakes
        })
    };

    let mut failures = Vec::new();
    let mut expected = BTreeSet::new();
    for round in 0..ROUNDS {
        let files: Vec<_> = (0..SENDERS)
            .map(|i| {
                let path = src.path().join(format!("r{round}-s{i}.bin"));
                random_file(&path, 64 << 10, (round * SENDERS + i) as u64);
                expected.insert(format!("r{round}-s{i}.bin"));
                path
            })
            .collect();
        let senders: Vec<Proc> = files
            .iter()
            .zip(&homes)
            .map(|(f, h)| {
                spawn_send(
                    h.path(),
                    &[f],
                    receiver.port,
                    &["--peer", &receiver.fingerprint],
                )
            })
            .collect();
        for (i, sender) in senders.into_iter().enumerate() {
            let finished = sender.finish(SHORT);
            if !finished.status.success() {
                failures.push(format!(
                    "round {round} sender {i}: {}: {}",
                    finished.status,
                    finished.messages().trim()
                ));
            }
        }
    }
    stop_stranger.store(true, Ordering::Relaxed);
    let handshakes = rt.block_on(stranger).expect("stranger task");
    eprintln!(
        "{} sends, {} failed; the stranger completed {handshakes} handshakes meanwhile",
        ROUNDS * SENDERS,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} sends failed:\n{}",
        failures.len(),
        ROUNDS * SENDERS,
        failures.join("\n")
    );
    assert!(handshakes >= 10, "the stranger barely ran: {handshakes}");
    assert_eq!(list_dir(out.path()), expected);
    for name in &expected {
        assert_eq!(
            blake3_file(&out.path().join(name)),
            blake3_file(&src.path().join(name)),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// --once with an allow list
// ---------------------------------------------------------------------------------------

/// `receive --once --allow FP`: a stranger offering a file first is refused and does not
/// count as "the one" transfer; the allowed sender then gets through and the receiver
/// exits 0 with the file stored.
#[test]
fn once_with_allow_list_outlasts_a_refused_stranger() {
    let (rhome, stranger_home, allowed_home, out) =
        (Home::new(), Home::new(), Home::new(), tempdir());
    let (_s, strangers) = small_file("unwanted.txt", b"from a stranger\n");
    let (_a, wanted) = small_file("wanted.txt", b"from a friend\n");
    let allowed = qpunch_id(allowed_home.path());
    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--once", "--allow", &allowed],
    );

    let stranger = send(
        stranger_home.path(),
        &[&strangers],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    stranger.assert_failure();
    let friend = send(
        allowed_home.path(),
        &[&wanted],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    let received = receiver.proc.finish(SHORT);
    assert_delivered(&friend, "wanted.txt", &wanted, out.path());
    received.assert_success();
    assert_eq!(list_dir(out.path()), names(&["wanted.txt"]));
}

// ---------------------------------------------------------------------------------------
// Name reservations of abandoned offers
// ---------------------------------------------------------------------------------------

/// `qpunch receive --json` on a pty (so it asks), bound to 127.0.0.1.
fn pty_receiver(home: &Path, out: &Path, extra: &[&str]) -> (PtyProc, u16, Fingerprint) {
    let mut flags = vec!["--json"];
    flags.extend_from_slice(extra);
    let receiver = PtyProc::spawn(home, &receive_args(0, Some(out), &flags));
    let listening = receiver.wait_events("listening", 1, SHORT).remove(0);
    let port = listening["port"].as_u64().expect("port") as u16;
    let fp = listening["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .parse()
        .expect("fingerprint");
    (receiver, port, fp)
}

/// Three hostile senders offer `f.txt` and vanish while the consent prompt waits; the
/// user answers `y` each time. An honest `f.txt` afterwards must get its own name, not
/// `f (3).txt`: abandoned offers must not keep names reserved.
#[test]
fn abandoned_offers_do_not_keep_names_reserved() {
    let rt = peer::runtime();
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let data = b"hello\n";
    let (_src, file) = small_file("f.txt", data);
    let (mut receiver, port, fp) = pty_receiver(rhome.path(), out.path(), &[]);

    for round in 1..=3 {
        let (peer, control) = rt.block_on(async {
            let peer = connect_from(lo(2), target(port), fp)
                .await
                .expect("connect");
            let files = vec![offer_of(0, "f.txt", data)];
            let control = offer_files(&peer.conn, files).await.unwrap();
            (peer, control)
        });
        receiver.wait_for(PROMPT, round, SHORT);
        // The sender vanishes while the prompt waits (its close is out before the answer).
        peer.conn.close(0u32.into(), b"gone");
        rt.block_on(peer.endpoint.wait_idle());
        drop((control, peer));
        receiver.type_text("y\n");
        // The receiver finds the sender gone once it has its answer, and says so.
        receiver.wait_events("error", round, SHORT);
    }

    let sender = spawn_send(shome.path(), &[&file], port, &["--peer", &fp.to_string()]);
    receiver.wait_for(PROMPT, 4, SHORT);
    receiver.type_text("y\n");
    let sender = sender.finish(SHORT);
    assert_delivered(&sender, "f.txt", &file, out.path());
    assert_eq!(
        sender.one("sent")["saved_as"],
        "f.txt",
        "abandoned offers kept their names reserved\n{}",
        receiver.transcript()
    );
    assert_eq!(list_dir(out.path()), names(&["f.txt"]));
}

// ---------------------------------------------------------------------------------------
// Links planted where partials live
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Link {
    Symbolic,
    Hard,
}

/// Make `at` a link of kind `link` to `victim`.
fn plant(link: Link, victim: &Path, at: &Path) {
    match link {
        Link::Symbolic => std::os::unix::fs::symlink(victim, at).unwrap(),
        Link::Hard => fs::hard_link(victim, at).unwrap(),
    }
}

/// A small file (stored from memory, written to a fresh partial) and a large one (offered
/// a resume, because a partial with its hash seems to exist) arrive while the partial
/// directory holds, under the very names the receiver uses for them (`HASH.part`), links
/// to the user's own files outside `out/`. The receiver must neither write through nor
/// resume through them: the victims keep their bytes and the files are stored as sent.
/// With `--overwrite`, the destination names are planted links too, and must be replaced.
fn links_where_partials_live_are_not_written_through(link: Link, overwrite: bool) {
    let (rhome, shome, root, src) = (Home::new(), Home::new(), tempdir(), tempdir());
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    let small = src.path().join("small.txt");
    random_file(&small, 10_000, 9);
    let large = src.path().join("large.bin");
    random_file(&large, 2 * transfer::SMALL_FILE, 10);
    let mut extra = vec!["--yes", "--once"];
    if overwrite {
        extra.push("--overwrite");
    }
    // The receiver makes its partial directory (and cleans it) as it starts: plant after.
    let receiver = Receiver::start(rhome.path(), &out, 0, &extra);
    let partials = out.join(transfer::PARTIAL_DIR);
    assert!(partials.is_dir(), "no {partials:?}");
    let precious = b"the user's own file, outside the download directory\n";
    let mut victims = Vec::new();
    for (file, name) in [(&small, "small.txt"), (&large, "large.bin")] {
        let victim = root.path().join(format!("victim-part-{name}"));
        fs::write(&victim, precious).unwrap();
        plant(
            link,
            &victim,
            &partials.join(format!("{}.part", blake3_file(file))),
        );
        victims.push(victim);
        if overwrite {
            let victim = root.path().join(format!("victim-dest-{name}"));
            fs::write(&victim, precious).unwrap();
            plant(link, &victim, &out.join(name));
            victims.push(victim);
        }
    }

    let sender = send(
        shome.path(),
        &[&small, &large],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    let received = receiver.proc.finish(SHORT);
    for victim in &victims {
        let now = fs::read(victim).unwrap();
        assert!(
            now == precious,
            "{victim:?} ({link:?} link, overwrite {overwrite}) was written through: it now \
             holds {} bytes",
            now.len()
        );
    }
    sender.assert_success();
    received.assert_success();
    for (file, name) in [(&small, "small.txt"), (&large, "large.bin")] {
        let sent = sender
            .all("sent")
            .into_iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no sent event for {name}\n{sender:#?}"));
        let saved_as = sent["saved_as"].as_str().expect("saved_as");
        if overwrite {
            assert_eq!(saved_as, name, "--overwrite takes the name: {sent}");
        }
        let stored = out.join(saved_as);
        let meta = fs::symlink_metadata(&stored).expect("stored file");
        assert!(meta.file_type().is_file(), "{stored:?} is {meta:?}");
        assert_eq!(
            fs::read(&stored).unwrap(),
            fs::read(file).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn a_symlink_where_a_partial_goes_is_not_followed() {
    links_where_partials_live_are_not_written_through(Link::Symbolic, false);
}

#[test]
fn a_hard_link_where_a_partial_goes_is_not_written_through() {
    links_where_partials_live_are_not_written_through(Link::Hard, false);
}

#[test]
fn overwrite_does_not_follow_symlinks_at_the_partial_or_the_destination() {
    links_where_partials_live_are_not_written_through(Link::Symbolic, true);
}

#[test]
fn overwrite_does_not_write_through_hard_links_at_the_partial_or_the_destination() {
    links_where_partials_live_are_not_written_through(Link::Hard, true);
}

// ---------------------------------------------------------------------------------------
// Terminal escapes from peers
// ---------------------------------------------------------------------------------------

/// Peer-controlled text that would retitle and recolour the terminal, use a C1 CSI,
/// reverse the text direction and forge a log line if printed raw.
const EVIL: &str =
    "\u{1b}]0;pwned\u{7}\u{1b}[31mred\u{9b}31m\u{202e}txt.exe\nforged line: all files verified";

/// [`EVIL`] as it must be shown: every control escaped in Rust's `\u{..}` notation, the
/// rest as sent. Clean output that does not show it would hide what the peer said.
const EVIL_SHOWN: &str = "\\u{1b}]0;pwned\\u{7}\\u{1b}[31mred\\u{9b}31m\\u{202e}txt.exe\\u{a}\
     forged line: all files verified";

/// Whether `text` shows peer-controlled terminal controls raw: an ESC, a C1 CSI, an
/// RLO, or a line starting with "forged line".
fn leaks(text: &str) -> bool {
    let forged = text
        .lines()
        .any(|l| l.trim_start_matches('\r').starts_with("forged line"));
    text.contains('\u{1b}') || text.contains('\u{9b}') || text.contains('\u{202e}') || forged
}

/// Panic listing every `(what, text)` that [`leaks`].
fn assert_clean(outputs: &[(String, String)]) {
    let leaked: Vec<String> = outputs
        .iter()
        .filter(|(_, text)| leaks(text))
        .map(|(what, text)| format!("{what}:\n{text:?}"))
        .collect();
    assert!(
        leaked.is_empty(),
        "peer-controlled terminal controls printed raw:\n{}",
        leaked.join("\n\n")
    );
}

/// The next connection straight from the endpoint, handshake completed.
async fn accept_raw(node: &Node) -> quinn::Connection {
    let incoming = node.endpoint().accept().await.expect("endpoint open");
    incoming.await.expect("handshake")
}

/// A hostile receiver answers `qpunch send` (human output) with a decline reason, a
/// verdict error and connection close reasons full of terminal controls: the sender's
/// output stays clean.
#[test]
fn sender_output_escapes_what_the_receiver_says() {
    let rt = peer::runtime();
    let (shome, src) = (Home::new(), tempdir());
    let (a, b) = (src.path().join("a.txt"), src.path().join("b.txt"));
    fs::write(&a, b"first\n").unwrap();
    fs::write(&b, b"second\n").unwrap();
    let node = {
        let _runtime = rt.enter();
        let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let identity = Identity::generate().unwrap();
        Arc::new(Node::new(socket, NodeConfig::new(identity, transfer::ALPN, true)).unwrap())
    };
    let port = node.local_addr().unwrap().port();
    let fp = node.fingerprint().to_string();

    let hostile = {
        let node = node.clone();
        rt.spawn(async move {
            // 1. Decline one file with EVIL, fail the other with EVIL.
            let conn = accept_raw(&node).await;
            let (mut control, mut answers) = conn.accept_bi().await.unwrap();
            let Manifest { files, .. } = read_frame(&mut answers).await.unwrap();
            let decisions = vec![
                Decision::Decline {
                    id: files[0].id,
                    reason: EVIL.into(),
                },
                Decision::Accept {
                    id: files[1].id,
                    offset: 0,
                },
            ];
            write_frame(&mut control, &Decisions { decisions })
                .await
                .unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let header: FileHeader = read_frame(&mut recv).await.unwrap();
            let _ = recv.read_to_end(1 << 20).await;
            let result = FileResult {
                id: header.id,
                verified: false,
                blake3: peer::random_hash(),
                saved_as: None,
                error: Some(EVIL.into()),
            };
            write_frame(&mut send, &result).await.unwrap();
            let _ = send.finish();
            conn.closed().await;
            // 2. Close with EVIL while the sender waits for decisions.
            let conn = accept_raw(&node).await;
            let (_control, mut answers) = conn.accept_bi().await.unwrap();
            let _: Manifest = read_frame(&mut answers).await.unwrap();
            conn.close(transfer::codes::PROTOCOL.into(), EVIL.as_bytes());
            // 3. Refuse the sender with EVIL right after the handshake.
            let conn = accept_raw(&node).await;
            conn.close(transfer::codes::NOT_ALLOWED.into(), EVIL.as_bytes());
            tokio::time::sleep(Duration::from_millis(500)).await;
        })
    };

    let to = format!("127.0.0.1:{port}");
    let send_human = |files: &[&Path]| {
        let mut args = vec!["send"];
        args.extend(files.iter().map(|f| s(f)));
        args.extend_from_slice(&["--to", &to, "--peer", &fp, "--punch-timeout", "3s"]);
        Proc::spawn("sender", shome.path(), &args).finish(SHORT)
    };
    let runs = [
        ("decline and verdict", send_human(&[&a, &b])),
        ("close while offering", send_human(&[&a])),
        ("refusal", send_human(&[&a])),
    ];
    rt.block_on(hostile).expect("hostile receiver");
    let mut outputs = Vec::new();
    // The decline reason and the verdict error in the first run, a close reason in each of
    // the others: all shown, escaped.
    for ((what, run), shown) in runs.iter().zip([2, 1, 1]) {
        assert!(!run.status.success(), "{what}: {run:#?}");
        assert_eq!(
            run.stderr.matches(EVIL_SHOWN).count(),
            shown,
            "sender ({what}) shows what the receiver said, escaped:\n{}",
            run.stderr
        );
        outputs.push((format!("sender ({what}), stderr"), run.stderr.clone()));
        outputs.push((format!("sender ({what}), stdout"), run.text.join("\n")));
    }
    assert_clean(&outputs);
}

/// A hostile sender closes with terminal controls as the reason (right after the
/// handshake, after a bad offer, mid-file) and offers names and frames full of them:
/// `qpunch receive --yes` (human output) stays clean.
#[test]
fn receiver_output_escapes_what_the_sender_says() {
    let rt = peer::runtime();
    let (rhome, out) = (Home::new(), tempdir());
    let args = receive_args(0, Some(out.path()), &["--yes"]);
    let mut receiver = Proc::spawn("receiver", rhome.path(), &args);
    let banner = receiver.wait_text(|l| l.starts_with("qpunch is receiving on UDP port"), SHORT);
    let port: u16 = banner.rsplit(' ').next().unwrap().parse().expect("port");
    let identity = receiver.wait_text(|l| l.trim_start().starts_with("identity:"), SHORT);
    let fp: Fingerprint = identity.rsplit(' ').next().unwrap().parse().expect("fp");
    let to = target(port);
    // Each attack in turn, once the receiver has said what it made of the one before.
    let said = |wanted: &str| {
        let line = receiver.wait_stderr(|l| l.contains(wanted), SHORT);
        eprintln!("receiver: {line}");
        line
    };

    rt.block_on(async {
        // 1. Close with EVIL right after the handshake.
        let peer = connect_from(lo(2), to, fp).await.expect("connect");
        peer.conn
            .close(transfer::codes::PROTOCOL.into(), EVIL.as_bytes());
        peer.endpoint.wait_idle().await;
    });
    said(&format!("closed by peer: {EVIL_SHOWN}"));
    rt.block_on(async {
        // 2. Names and hashes full of EVIL (declined), then close with EVIL.
        let peer = connect_from(lo(3), to, fp).await.expect("connect");
        let mut bad_hash = offer(1, "ok.txt", 1);
        bad_hash.blake3 = EVIL.into();
        let files = vec![offer(0, &format!("{EVIL}.txt"), 1), bad_hash];
        let mut control = offer_files(&peer.conn, files).await.unwrap();
        let _ = control.decisions(SHORT).await;
        peer.conn
            .close(transfer::codes::PROTOCOL.into(), EVIL.as_bytes());
        peer.endpoint.wait_idle().await;
    });
    said(&format!("declined {EVIL_SHOWN}"));
    rt.block_on(async {
        // 3. A frame that is not a manifest, with EVIL where a number belongs.
        let peer = connect_from(lo(4), to, fp).await.expect("connect");
        let (mut send, _recv) = peer.conn.open_bi().await.unwrap();
        let body = serde_json::json!({
            "files": [{ "id": EVIL, "name": EVIL, "size": 1, "blake3": peer::random_hash() }]
        });
        write_raw_frame(&mut send, body.to_string().as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        peer.conn
            .close(transfer::codes::PROTOCOL.into(), EVIL.as_bytes());
        peer.endpoint.wait_idle().await;
    });
    said("bad frame");
    rt.block_on(async {
        // 4. A real file, cut off mid-stream with EVIL.
        let peer = connect_from(lo(5), to, fp).await.expect("connect");
        let data = vec![7u8; 200_000];
        let files = vec![offer_of(0, "cut.bin", &data)];
        let mut control = offer_files(&peer.conn, files).await.unwrap();
        let _ = control.decisions(SHORT).await;
        let (mut file, _verdict) = peer.conn.open_bi().await.unwrap();
        write_frame(&mut file, &FileHeader { id: 0, offset: 0 })
            .await
            .unwrap();
        file.write_all(&data[..100_000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        peer.conn
            .close(transfer::codes::PROTOCOL.into(), EVIL.as_bytes());
        peer.endpoint.wait_idle().await;
    });
    said("cut.bin: ");
    receiver.signal(libc::SIGINT);
    let finished = receiver.finish(SHORT);
    assert_clean(&[
        ("receiver stderr".into(), finished.stderr.clone()),
        ("receiver stdout".into(), finished.text.join("\n")),
    ]);
    // The close reason once, the offered name twice (declined, and why).
    assert_eq!(
        finished.stderr.matches(EVIL_SHOWN).count(),
        3,
        "the receiver shows what the sender said, escaped:\n{}",
        finished.stderr
    );
    assert!(!out.path().join("cut.bin").exists());
}

// ---------------------------------------------------------------------------------------
// Dotfiles and the default directory
// ---------------------------------------------------------------------------------------

/// Send `src/.bash_aliases` to a `receive --yes --once EXTRA...`: the send must succeed.
/// Returns the out dir's listing, the out dir, and the bytes sent.
fn send_dotfile(extra: &[&str]) -> (BTreeSet<String>, tempfile::TempDir, Vec<u8>) {
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let contents = b"alias ls='rm -rf ~'\n".to_vec();
    let (_src, file) = small_file(".bash_aliases", &contents);
    let mut args = vec!["--yes", "--once"];
    args.extend_from_slice(extra);
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &args);
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();
    (list_dir(out.path()), out, contents)
}

/// By default an offered `.bash_aliases` is stored, but never as a dotfile: as
/// `_bash_aliases`.
#[test]
fn dotfiles_are_not_stored_as_dotfiles_by_default() {
    let (listing, out, contents) = send_dotfile(&[]);
    assert_eq!(listing, names(&["_bash_aliases"]));
    assert_eq!(
        fs::read(out.path().join("_bash_aliases")).unwrap(),
        contents
    );
}

/// With `--allow-dotfiles`, `.bash_aliases` is stored under its own name.
#[test]
fn allow_dotfiles_stores_them_as_named() {
    let (listing, out, contents) = send_dotfile(&["--allow-dotfiles"]);
    assert_eq!(listing, names(&[".bash_aliases"]));
    assert_eq!(
        fs::read(out.path().join(".bash_aliases")).unwrap(),
        contents
    );
}

/// Without `--out`, with HOME set and XDG_DOWNLOAD_DIR unset, files go to
/// `$HOME/Downloads/qpunch/` (created if missing), not the working directory.
#[test]
fn default_out_dir_is_downloads_qpunch() {
    let (rhome, shome, home, cwd) = (Home::new(), Home::new(), tempdir(), tempdir());
    let (_src, file) = small_file("hello.txt", b"hello\n");
    // No --out: the default folder.
    let args = receive_args(0, None, &["--json", "--yes", "--once"]);
    let mut proc = Proc::spawn_with("receiver", rhome.path(), &args, |cmd| {
        cmd.env("HOME", home.path())
            .env_remove("XDG_DOWNLOAD_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .current_dir(cwd.path());
    });
    let port = proc.wait_event("listening", SHORT)["port"]
        .as_u64()
        .expect("port") as u16;
    let sender = send(shome.path(), &[&file], port, &[], SHORT);
    let received = proc.finish(SHORT);
    let downloads = home.path().join("Downloads").join("qpunch");
    assert!(
        downloads.join("hello.txt").is_file(),
        "nothing in {downloads:?}; working directory holds {:?}\n{received:#?}",
        list_dir(cwd.path())
    );
    assert_delivered(&sender, "hello.txt", &file, &downloads);
    received.assert_success();
    assert!(list_dir(cwd.path()).is_empty());
}

// ---------------------------------------------------------------------------------------
// Consent and free space
// ---------------------------------------------------------------------------------------

/// Offer `files` from a hostile sender and wait up to 10 s for the decisions.
fn offer_and_decide(
    rt: &tokio::runtime::Runtime,
    port: u16,
    fp: Fingerprint,
    files: Vec<transfer::FileOffer>,
) -> Result<Vec<Decision>, String> {
    rt.block_on(async {
        let peer = connect_from(lo(2), target(port), fp)
            .await
            .map_err(|e| e.to_string())?;
        let mut control = offer_files(&peer.conn, files).await?;
        let decided = control.decisions(Duration::from_secs(10)).await;
        peer.conn.close(0u32.into(), b"");
        decided
    })
}

/// Every decision is a decline whose reason mentions (free) space.
fn assert_declined_for_space(decisions: &[Decision], transcript: &str) {
    for d in decisions {
        match d {
            Decision::Decline { reason, .. } if reason.to_lowercase().contains("space") => {}
            other => panic!("expected a decline for lack of space, got {other:?}\n{transcript}"),
        }
    }
}

/// Two offers of 2^63 bytes each on a terminal: no panic (the total overflows u64),
/// declined for lack of free space without asking; the receiver keeps working.
#[test]
fn offers_beyond_u64_are_declined_without_a_crash() {
    let rt = peer::runtime();
    let (rhome, shome, out) = (Home::new(), Home::new(), tempdir());
    let (mut receiver, port, fp) = pty_receiver(rhome.path(), out.path(), &[]);
    let files = vec![
        offer(0, "huge-1.bin", 1 << 63),
        offer(1, "huge-2.bin", 1 << 63),
    ];

    let decided = offer_and_decide(&rt, port, fp, files);
    let transcript = receiver.transcript();
    assert!(!transcript.contains("panicked"), "{transcript}");
    let decisions = decided.unwrap_or_else(|e| panic!("{e}\n{transcript}"));
    assert_eq!(decisions.len(), 2);
    assert_declined_for_space(&decisions, &transcript);
    assert_eq!(receiver.count(PROMPT), 0, "asked anyway:\n{transcript}");
    assert!(receiver.running(), "{transcript}");

    // Still serving: an honest small file is asked about and stored.
    let (_src, file) = small_file("small.txt", b"hello\n");
    let sender = spawn_send(shome.path(), &[&file], port, &["--peer", &fp.to_string()]);
    receiver.wait_for(PROMPT, 1, SHORT);
    receiver.type_text("y\n");
    let sender = sender.finish(SHORT);
    assert_delivered(&sender, "small.txt", &file, out.path());
    assert!(!receiver.transcript().contains("panicked"));
}

/// An offer larger than the free space of `--out` (a 1 MiB tmpfs) is declined before
/// any prompt, and nothing is written.
#[test]
fn offers_beyond_free_space_are_declined_before_asking() {
    const TEST: &str = "offers_beyond_free_space_are_declined_before_asking";
    if !sys::require_root(TEST, "mounting a tmpfs") {
        return;
    }
    let root = tempdir();
    let mnt = root.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let tmpfs = match sys::Tmpfs::mount(&mnt, "1m") {
        Ok(t) => t,
        Err(e) => {
            sys::skip(TEST, &e);
            return;
        }
    };
    let rt = peer::runtime();
    let rhome = Home::new();
    let (receiver, port, fp) = pty_receiver(rhome.path(), tmpfs.path(), &[]);

    let decided = offer_and_decide(&rt, port, fp, vec![offer(0, "big.bin", 2 * MIB)]);
    let transcript = receiver.transcript();
    let decisions = decided.unwrap_or_else(|e| panic!("{e}\n{transcript}"));
    assert_declined_for_space(&decisions, &transcript);
    assert_eq!(receiver.count(PROMPT), 0, "asked anyway:\n{transcript}");
    assert_eq!(list_dir(tmpfs.path()), BTreeSet::new());
    drop(receiver); // before the tmpfs is unmounted
}

// ---------------------------------------------------------------------------------------
// Proof under load: honest senders among strangers
// ---------------------------------------------------------------------------------------

/// A load test, bounded in count and time, on loopback: 200 authenticated
/// strangers from 200 addresses flood everything flow control allows (see [`attack`]),
/// a probe flood runs from 4 more, and meanwhile 50 honest senders start at once. Every
/// honest file arrives verified, the receiver's peak RSS stays under the README's bound
/// against strangers, ~120 MiB (the honest files are small), and no partial file is left
/// behind.
///
/// The honest senders all come from 127.0.0.1 (`qpunch send` has no `--bind`), so the
/// receiver allows 64 connections per address instead of 32; the strangers each have an
/// address of their own.
#[test]
fn fifty_honest_senders_among_two_hundred_strangers_and_a_probe_flood() {
    const HOSTILE: u8 = 200;
    const HONEST: usize = 50;
    const RSS_LIMIT_MIB: f64 = 120.0;
    let rt = peer::runtime();
    let (rhome, out, src) = (Home::new(), tempdir(), tempdir());
    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--max-per-ip", "64"],
    );
    let (to, fp) = (target(receiver.port), fingerprint(&receiver));
    let pid = receiver.proc.id();

    let (_strangers, conns, sampler) =
        flood_from_strangers(&rt, HOSTILE, to, fp, pid, RSS_LIMIT_MIB);
    let flooding = Arc::new(AtomicBool::new(true));
    let flooders: Vec<_> = (0..4u8)
        .map(|i| {
            let flooding = flooding.clone();
            thread::spawn(move || {
                let socket = UdpSocket::bind((lo(HOSTILE + 2 + i), 0)).expect("bind flooder");
                while flooding.load(Ordering::Relaxed) {
                    for _ in 0..100 {
                        let _ = socket.send_to(&probe().1, to);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));

    let homes: Vec<Home> = (0..HONEST).map(|_| Home::new()).collect();
    let files: Vec<std::path::PathBuf> = (0..HONEST)
        .map(|i| {
            let path = src.path().join(format!("honest-{i}.bin"));
            random_file(&path, 64 << 10, 1000 + i as u64);
            path
        })
        .collect();
    let started = Instant::now();
    let senders: Vec<Proc> = homes
        .iter()
        .zip(&files)
        .map(|(home, file)| {
            spawn_send(
                home.path(),
                &[file],
                receiver.port,
                &["--peer", &receiver.fingerprint],
            )
        })
        .collect();
    let finished: Vec<Finished> = senders
        .into_iter()
        .map(|s| s.finish(Duration::from_secs(90)))
        .collect();
    let took = started.elapsed();
    flooding.store(false, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("flooder");
    }
    let peak = sampler
        .finish()
        .max(sys::peak_rss_mib(pid).unwrap_or_default());
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    let stats = stop(receiver, libc::SIGTERM);
    eprintln!(
        "{HONEST} honest senders among {HOSTILE} flooding strangers and a probe flood: all done \
         in {took:.1?}, receiver peak RSS {peak:.1} MiB, probes limited: {}",
        stat(&stats, "probes_limited")
    );
    for (sender, file) in finished.iter().zip(&files) {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_delivered(sender, name, file, out.path());
    }
    assert!(
        peak < RSS_LIMIT_MIB,
        "receiver peak RSS {peak:.1} MiB >= {RSS_LIMIT_MIB} MiB"
    );
    let expected: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        list_dir(out.path()),
        expected,
        "exactly the honest files, no partials"
    );
}

//! Many at once, small versions of `cargo bench --bench engine`: several senders to one
//! receiver (all complete, none starves, the receiver's memory stays bounded), and one
//! send of thousands of small files (bundled streams, batched syncs).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// When the receiver first saw each file in flight (bytes in its partial) and stored.
#[derive(Default, Clone, Copy, Debug)]
struct Seen {
    started: Option<Instant>,
    stored: Option<Instant>,
}

/// Six senders of 32 MiB each start together: every file arrives verified, none starves
/// (every file was in flight at the receiver before any was stored), and the receiver's
/// peak RSS stays bounded. The files are large enough that the first is not stored before
/// the last sender has even connected: on two cores the senders' start-ups spread over
/// ~0.1 s, and a debug receiver stores 8 MiB in ~60 ms.
#[test]
fn six_senders_at_once_all_complete() {
    const SENDERS: usize = 6;
    const SIZE: u64 = 32 * MIB;
    let (rhome, src, out) = (Home::new(), tempdir(), tempdir());
    let mut receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let pid = receiver.proc.id();
    let files: Vec<_> = (0..SENDERS)
        .map(|i| {
            let file = src.path().join(format!("from-{i}.bin"));
            random_file(&file, SIZE, 100 + i as u64);
            file
        })
        .collect();
    let homes: Vec<Home> = (0..SENDERS).map(|_| Home::new()).collect();
    // What the receiver's folder shows, every millisecond: a file is in flight once its
    // partial holds bytes, stored once its name exists.
    // A first send names its partial by the file's path and size (its hash is not known
    // yet); a repeat by its hash.
    let watched: Vec<(std::path::PathBuf, Vec<String>)> = files
        .iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let offer = qpunch::transfer::FileOffer {
                name: name.clone(),
                size: std::fs::metadata(f).unwrap().len(),
                ..Default::default()
            };
            let mut keys = offer.part_keys();
            keys.push(blake3_file(f));
            (out.path().join(name), keys)
        })
        .collect();
    let partials = out.path().join(qpunch::transfer::PARTIAL_DIR);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        thread::spawn(move || {
            let mut peak = 0.0f64;
            let mut seen = [Seen::default(); SENDERS];
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(sys::peak_rss_mib(pid).unwrap_or(0.0));
                let in_flight: Vec<String> = std::fs::read_dir(&partials)
                    .map(|entries| {
                        entries
                            .filter_map(|e| e.ok())
                            .filter(|e| e.metadata().is_ok_and(|m| m.len() > 0))
                            .filter_map(|e| e.file_name().into_string().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let now = Instant::now();
                for ((stored_as, keys), seen) in watched.iter().zip(&mut seen) {
                    let stored = stored_as.exists();
                    let partial = |name: &String| keys.iter().any(|k| name.starts_with(k.as_str()));
                    if stored || in_flight.iter().any(partial) {
                        seen.started.get_or_insert(now);
                    }
                    if stored {
                        seen.stored.get_or_insert(now);
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            (peak, seen)
        })
    };
    // Every sender is held (stopped) as soon as it is spawned, and all are let go at once:
    // none has a head start from being spawned first.
    let senders: Vec<_> = files
        .iter()
        .zip(&homes)
        .map(|(file, home)| {
            let sender = spawn_send(
                home.path(),
                &[file.as_path()],
                receiver.port,
                &["--peer", &receiver.fingerprint],
            );
            sender.signal(libc::SIGSTOP);
            sender
        })
        .collect();
    for sender in &senders {
        sender.signal(libc::SIGCONT);
    }
    for sender in senders {
        sender.finish(LONG).assert_success();
    }
    for _ in 0..SENDERS {
        receiver.proc.wait_event("received", LONG);
    }
    sampling.store(false, Ordering::SeqCst);
    let (peak, seen) = sampler.join().unwrap();
    receiver.proc.interrupt(SHORT);
    for file in &files {
        let name = file.file_name().unwrap();
        assert_eq!(blake3_file(&out.path().join(name)), blake3_file(file));
    }
    let first_stored = seen.iter().filter_map(|s| s.stored).min().expect("stored");
    let spread: Vec<String> = seen
        .iter()
        .map(|s| {
            // Seconds relative to the first file stored (negative: before it).
            let at = |t: Option<Instant>| match t {
                Some(t) if t >= first_stored => {
                    format!("{:+.3} s", (t - first_stored).as_secs_f64())
                }
                Some(t) => format!("-{:.3} s", (first_stored - t).as_secs_f64()),
                None => "never".into(),
            };
            format!("in flight {} stored {}", at(s.started), at(s.stored))
        })
        .collect();
    eprintln!(
        "{SENDERS} senders x {} MiB, relative to the first file stored: {spread:#?}; \
         receiver peak RSS {peak:.0} MiB",
        SIZE >> 20
    );
    assert!(peak < 300.0, "receiver peak RSS {peak} MiB");
    // None starves: every file was in flight before the first was stored.
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.started.is_some_and(|t| t < first_stored),
            "from-{i}.bin was not in flight before the first file was stored: {spread:#?}"
        );
    }
}

/// Two thousand 1 KiB files in one folder arrive, each verified and under its name,
/// quickly (bundled streams and a shared syncfs, not a stream and an fsync each).
#[test]
fn two_thousand_small_files_arrive() {
    const FILES: usize = 2000;
    let (rhome, shome, src, out) = (Home::new(), Home::new(), tempdir(), tempdir());
    let tree = src.path().join("many");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..FILES {
        random_file(
            &tree.join(format!("f{i:04}.txt")),
            1024 + i as u64 % 7,
            i as u64,
        );
    }
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let started = Instant::now();
    let sent = send(shome.path(), &[&tree], receiver.port, &[], LONG);
    let received = receiver.proc.finish(LONG);
    let took = started.elapsed();
    sent.assert_success();
    received.assert_success();
    assert_eq!(sent.all("sent").len(), FILES);
    assert_eq!(received.all("received").len(), FILES);
    let stored = out.path().join("many");
    assert_eq!(list_dir(&stored).len(), FILES);
    for i in (0..FILES).step_by(97) {
        let name = format!("f{i:04}.txt");
        assert_eq!(
            blake3_file(&stored.join(&name)),
            blake3_file(&tree.join(&name))
        );
    }
    eprintln!("{FILES} small files in {took:?}");
}

//! Many at once, small versions of `cargo bench --bench engine`: several senders to one
//! receiver (all complete, none starves, the receiver's memory stays bounded), and one
//! send of thousands of small files (bundled streams, batched syncs).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Six senders of 8 MiB each start together: every file arrives verified, the last one
/// finishes within a few times the first, and the receiver's peak RSS stays bounded.
#[test]
fn six_senders_at_once_all_complete() {
    const SENDERS: usize = 6;
    const SIZE: u64 = 8 * MIB;
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
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        thread::spawn(move || {
            let mut peak = 0.0f64;
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(sys::peak_rss_mib(pid).unwrap_or(0.0));
                thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let start = Instant::now();
    let senders: Vec<_> = files
        .iter()
        .zip(&homes)
        .map(|(file, home)| {
            spawn_send(
                home.path(),
                &[file.as_path()],
                receiver.port,
                &["--peer", &receiver.fingerprint],
            )
        })
        .collect();
    // Each sender is waited for on its own thread, so its finish time is its own.
    let waiting: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            thread::spawn(move || {
                let finished = sender.finish(LONG);
                (finished, start.elapsed())
            })
        })
        .collect();
    let mut times = Vec::new();
    for (i, waiter) in waiting.into_iter().enumerate() {
        let (finished, took) = waiter.join().unwrap();
        finished.assert_success();
        times.push((i, took));
    }
    for _ in 0..SENDERS {
        receiver.proc.wait_event("received", LONG);
    }
    sampling.store(false, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    receiver.proc.interrupt(SHORT);
    for file in &files {
        let name = file.file_name().unwrap();
        assert_eq!(blake3_file(&out.path().join(name)), blake3_file(file));
    }
    let secs: Vec<f64> = times.iter().map(|(_, t)| t.as_secs_f64()).collect();
    let (first, last) = (
        secs.iter().cloned().fold(f64::MAX, f64::min),
        secs.iter().cloned().fold(0.0, f64::max),
    );
    eprintln!(
        "{SENDERS} senders x {} MiB: finished between {first:.2} s and {last:.2} s; receiver peak RSS {peak:.0} MiB",
        SIZE >> 20
    );
    assert!(peak < 300.0, "receiver peak RSS {peak} MiB");
    // None starves: the last finishes within a few times the first (plus start-up).
    assert!(last <= 3.0 * first + 2.0, "{secs:?}");
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

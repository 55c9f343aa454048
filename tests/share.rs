//! The high-level API, `qpunch::share`: in-process (typed events as a stream, the consent
//! callback) and through `examples/share.rs`, the file-sharing app written over it, whose
//! receiver and sender run as processes. Both over loopback and real QUIC, checking the
//! bytes that arrive.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The example's binary, next to the test binaries' `qpunch`, built (or found up to date)
/// by cargo. Cargo's variables for this test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...)
/// are not passed on: build scripts watch some of them (ring's does), and seeing them
/// change would rebuild half the dependencies, here and again in the next `cargo test`.
fn example() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_qpunch"));
    let path = bin.with_file_name("examples").join("share");
    let mut cargo = Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name.as_ref());
        if (name.starts_with("CARGO_") && !keep) || name == "OUT_DIR" {
            cargo.env_remove(name.as_ref());
        }
    }
    cargo.args(["build", "--quiet", "--example", "share"]);
    if bin.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        cargo.arg("--release");
    }
    let status = cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --example share failed");
    assert!(path.exists(), "no example binary at {}", path.display());
    path
}

/// Stdout lines of `child`, read on a thread so that a hung process fails by timeout.
/// The consent question ends without a newline: it counts as a line of its own.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    std::thread::spawn(move || {
        let mut line = Vec::new();
        for byte in stdout.bytes() {
            let Ok(byte) = byte else { return };
            line.push(byte);
            if byte == b'\n' || line.ends_with(b"[y/N] ") {
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                if tx.send(text).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Kills the process when the test ends early, so no example outlives a failure.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(rx: &mpsc::Receiver<String>, wanted: &str) -> String {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(wanted) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {wanted:?}: {e}"),
        }
    }
}

#[test]
fn the_share_example_sends_a_file_over_loopback_and_asks_first() {
    let example = example();
    let dir = tempfile::tempdir().unwrap();
    let (inbox, home) = (dir.path().join("inbox"), dir.path().join("home"));
    std::fs::create_dir_all(&inbox).unwrap();
    let source = dir.path().join("hello.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect();
    std::fs::write(&source, &data).unwrap();

    let mut receiver = Command::new(&example)
        .args(["receive", inbox.to_str().unwrap(), "127.0.0.1:0"])
        .env("QPUNCH_HOME", &home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map(Running)
        .unwrap();
    let received = lines(&mut receiver.0);
    let listening = wait_for(&received, "listening on ");
    // "listening on 127.0.0.1:PORT as FINGERPRINT"
    let words: Vec<&str> = listening.split_whitespace().collect();
    let (addr, fingerprint) = (words[2].to_string(), words[4].to_string());

    let mut sender = Command::new(&example)
        .args(["send", source.to_str().unwrap(), &addr, &fingerprint])
        .env("QPUNCH_HOME", &home)
        .stdout(Stdio::piped())
        .spawn()
        .map(Running)
        .unwrap();
    let question = wait_for(&received, "Take? [y/N]");
    assert!(question.contains("1 file(s), 3000000 bytes"), "{question}");
    receiver.0.stdin.take().unwrap().write_all(b"y\n").unwrap();
    wait_for(&received, "verified hello.bin (3000000 bytes)");

    let sent = sender.0.wait().unwrap();
    let mut said = String::new();
    sender
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(sent.success(), "sender failed: {said}");
    assert!(said.contains("verified hello.bin"), "{said}");
    assert!(receiver.0.wait().unwrap().success(), "receiver failed");
    assert_eq!(std::fs::read(inbox.join("hello.bin")).unwrap(), data);
}

#[tokio::test]
async fn the_api_asks_first_and_streams_typed_events() {
    use qpunch::identity::Identity;
    use qpunch::share::{Event, FileEvent, ReceiveConfig, SendConfig, Share, Target};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let source = dir.path().join("notes.txt");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&source, &data).unwrap();

    // The receiver: its events as a stream, and a consent callback that records the offer.
    let (events, mut stream) = tokio::sync::mpsc::unbounded_channel();
    let receiver = Share::new(Identity::generate().unwrap(), events);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let mut config = ReceiveConfig::new(&inbox);
    config.bind = Some("127.0.0.1:0".parse().unwrap());
    config.once = true;
    let offers = asked.clone();
    config.accept = config.accept.ask_with(move |sender, files| {
        offers.lock().unwrap().push((sender, files.len()));
        vec![true; files.len()]
    });
    let receiving =
        tokio::spawn(async move { receiver.receive(config, std::future::pending()).await });
    let (addr, receiver_fp) = loop {
        match stream.recv().await.expect("events until listening") {
            Event::Listening {
                local, fingerprint, ..
            } => break (local, fingerprint),
            _ => continue,
        }
    };

    let sender = Share::new(Identity::generate().unwrap(), |_: Event| {});
    let config = SendConfig {
        peer: Some(receiver_fp),
        known_peers: Some(dir.path().join("known_peers")),
        cache_dir: Some(dir.path().join("cache")),
        ..SendConfig::default()
    };
    let files = qpunch::transfer::select(std::slice::from_ref(&source)).unwrap();
    let to = Target::parse(&addr.to_string()).unwrap();
    let sent = sender
        .send(&to, files, &config, std::future::pending())
        .await
        .unwrap();
    assert_eq!(sent.to, addr);
    assert!(
        sent.reports.iter().all(|r| r.is_verified()),
        "{:?}",
        sent.reports
    );
    assert!(
        receiving.await.unwrap().unwrap(),
        "the one transfer verified"
    );

    assert_eq!(*asked.lock().unwrap(), [(sender.fingerprint(), 1)]);
    let mut seen = Vec::new();
    while let Ok(event) = stream.try_recv() {
        seen.push(event);
    }
    let connected = seen.iter().position(|e| {
        matches!(e, Event::Connected { fingerprint, .. } if *fingerprint == sender.fingerprint())
    });
    let verified = seen.iter().position(
        |e| matches!(e, Event::File { event: FileEvent::Finished(r), .. } if r.is_verified()),
    );
    let finished = seen.iter().position(
        |e| matches!(e, Event::Finished { result: Ok(reports), .. } if reports.len() == 1),
    );
    assert!(
        connected < verified && verified < finished && connected.is_some(),
        "{seen:#?}"
    );
    assert!(
        matches!(seen.last(), Some(Event::Stats { .. })),
        "{seen:#?}"
    );
    assert_eq!(std::fs::read(inbox.join("notes.txt")).unwrap(), data);
}

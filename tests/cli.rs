//! End-to-end tests of the `qpunch` binary over real loopback UDP, QUIC and TLS.
//!
//! Each process role gets its own `QPUNCH_HOME`; receivers bind 127.0.0.1 on a port
//! chosen by the kernel and announce it in their `listening` event.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::UdpSocket;
use std::path::Path;
use std::thread;

use common::*;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::Value;

/// The port of a `host:port` string from an event.
fn port_of(addr: &Value) -> u16 {
    let addr = addr.as_str().expect("address string");
    let (_, port) = addr.rsplit_once(':').expect("host:port");
    port.parse().expect("port number")
}

/// Check that the sender's `sent` and the receiver's `received` event for `name` agree
/// with the file on disk, and return the receiver's `saved_as`.
fn check_delivery(
    sender: &Finished,
    receiver: &Finished,
    name: &str,
    source: &Path,
    out: &Path,
    sender_fp: &str,
) -> String {
    let source_hash = blake3_file(source);
    let size = fs::metadata(source).unwrap().len();
    let sent: Vec<_> = sender
        .all("sent")
        .into_iter()
        .filter(|e| e["name"] == name)
        .collect();
    let received: Vec<_> = receiver
        .all("received")
        .into_iter()
        .filter(|e| e["name"] == name)
        .collect();
    assert_eq!(sent.len(), 1, "one sent event for {name}\n{sender:#?}");
    assert_eq!(
        received.len(),
        1,
        "one received event for {name}\n{receiver:#?}"
    );
    let (sent, received) = (sent[0], received[0]);
    let saved_as = received["saved_as"].as_str().expect("saved_as").to_string();
    assert_eq!(
        sent["saved_as"], received["saved_as"],
        "{sent} vs {received}"
    );
    assert_eq!(sent["bytes"], size, "{sent}");
    assert_eq!(received["bytes"], size, "{received}");
    assert_eq!(sent["blake3"], source_hash.as_str(), "{sent}");
    assert_eq!(received["blake3"], source_hash.as_str(), "{received}");
    assert_eq!(received["from"], sender_fp, "{received}");
    let stored = out.join(&saved_as);
    assert_eq!(fs::metadata(&stored).unwrap().len(), size, "{stored:?}");
    assert_eq!(blake3_file(&stored), source_hash, "{stored:?} on disk");
    saved_as
}

/// Files of 0 B, 1 B and 64 MiB in one send arrive verified under their own names.
#[test]
fn three_sizes_in_one_send_arrive_verified() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let empty = src.path().join("empty.bin");
    let one = src.path().join("one.bin");
    let big = src.path().join("big.bin");
    random_file(&empty, 0, 1);
    random_file(&one, 1, 2);
    random_file(&big, 64 * MIB, 3);
    let sender_fp = qpunch_id(shome.path());

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(
        shome.path(),
        &[&empty, &one, &big],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        LONG,
    );
    let received = receiver.proc.finish(LONG);
    sender.assert_success();
    received.assert_success();

    for (name, path) in [("empty.bin", &empty), ("one.bin", &one), ("big.bin", &big)] {
        let saved_as = check_delivery(&sender, &received, name, path, out.path(), &sender_fp);
        assert_eq!(saved_as, name);
    }
    assert_eq!(sender.all("sent").len(), 3, "{sender:#?}");
    assert_eq!(received.all("received").len(), 3, "{received:#?}");
    assert!(sender.all("declined").is_empty() && sender.all("error").is_empty());
    // Exactly the three files: no `.part` left behind, nothing else written.
    assert_eq!(
        list_dir(out.path()),
        names(&["empty.bin", "one.bin", "big.bin"])
    );
    // Both sides saw each other's keys.
    assert_eq!(sender.one("connected")["fingerprint"], receiver.fingerprint);
    assert_eq!(received.one("connected")["fingerprint"], sender_fp);
}

/// The socket that punched is the socket QUIC uses: same local port.
#[test]
fn punched_port_survives_hand_over_to_quic() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("f.bin");
    random_file(&file, 4096, 4);

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(shome.path(), &[&file], receiver.port, &[], SHORT);
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();

    let punched = sender.one("punched");
    let connected = sender.one("connected");
    let punched_port = port_of(&punched["local_addr"]);
    assert_ne!(punched_port, 0, "{punched}");
    assert_eq!(
        punched_port,
        port_of(&connected["local_addr"]),
        "{punched} vs {connected}"
    );
    assert_eq!(connected["path"], "direct", "{connected}");
    assert_eq!(punched["peer"], format!("127.0.0.1:{}", receiver.port));
    // The receiver saw probes and QUIC from that same port, and reported it back.
    assert_eq!(
        punched["reflexive_addr"],
        format!("127.0.0.1:{punched_port}")
    );
    assert_eq!(
        received.one("connected")["peer"],
        format!("127.0.0.1:{punched_port}")
    );
    assert!(punched["rtt_ms"].as_f64().expect("rtt_ms") >= 0.0);
    assert!(received.one("stats")["probes_answered"].as_u64().unwrap() >= 1);
}

/// `--peer` naming another identity: the handshake is refused and nothing is sent.
#[test]
fn wrong_peer_fingerprint_is_refused() {
    let (rhome, shome, other) = (Home::new(), Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("secret.txt");
    random_file(&file, 1000, 5);
    let wrong = qpunch_id(other.path());

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    assert_ne!(wrong, receiver.fingerprint);
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &wrong],
        SHORT,
    );
    let received = receiver.proc.kill();
    sender.assert_failure();

    let message = sender.messages();
    assert!(
        message.contains(&wrong),
        "names the expected key: {message}"
    );
    assert!(
        message.contains(&receiver.fingerprint),
        "names the presented key: {message}"
    );
    assert!(message.contains("--peer"), "{message}");
    assert!(message.contains("refusing"), "{message}");
    assert!(sender.all("connected").is_empty(), "{sender:#?}");
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
    assert!(received.all("received").is_empty(), "{received:#?}");
    assert_eq!(list_dir(out.path()), BTreeSet::new());
}

/// A receiver with `--allow` for someone else refuses this sender, says whom it refused,
/// and with `--once` still takes the allowed sender's files afterwards.
#[test]
fn sender_not_on_allow_list_is_refused() {
    let (rhome, shome, other) = (Home::new(), Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("unwanted.txt");
    random_file(&file, 1000, 6);
    let sender_fp = qpunch_id(shome.path());
    let allowed = qpunch_id(other.path());
    assert_ne!(sender_fp, allowed);

    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--allow", &allowed, "--once"],
    );
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    sender.assert_failure();
    // A refused stranger is not "the one" transfer: `--once` still waits, and takes the
    // allowed sender's.
    let wanted = src.path().join("wanted.txt");
    random_file(&wanted, 1000, 7);
    let allowed_sender = send(
        other.path(),
        &[&wanted],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        SHORT,
    );
    allowed_sender.assert_success();
    let received = receiver.proc.finish(SHORT);
    received.assert_success();

    let message = sender.messages().to_lowercase();
    assert!(
        message.contains("does not accept") || message.contains("not allowed"),
        "{message}"
    );
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
    assert_eq!(received.one("received")["name"], "wanted.txt");
    assert!(
        received.messages().contains(&sender_fp),
        "the receiver says whom it refused\n{received:#?}"
    );
    assert_eq!(list_dir(out.path()), names(&["wanted.txt"]));
}

/// No terminal and neither `--yes` nor `--allow`: refuse to start at all.
#[test]
fn receiver_without_tty_or_policy_refuses_to_start() {
    let home = Home::new();
    let out = tempdir();
    for json in [true, false] {
        let flags: &[&str] = if json {
            &["--once", "--json"]
        } else {
            &["--once"]
        };
        let args = receive_args(0, Some(out.path()), flags);
        let finished = Proc::spawn("receiver", home.path(), &args).finish(SHORT);
        assert!(!finished.status.success(), "{finished:#?}");
        assert!(finished.all("listening").is_empty(), "{finished:#?}");
        let message = finished.messages();
        assert!(message.contains("--yes"), "{message}");
        assert!(message.contains("--allow"), "{message}");
        if json {
            finished.assert_json_only();
            assert_eq!(finished.all("error").len(), 1, "{finished:#?}");
        } else {
            assert!(finished.stderr.contains("--yes"), "{finished:#?}");
        }
    }
    assert_eq!(list_dir(out.path()), BTreeSet::new());
}

/// Trust on first use, then a changed identity on the same address is refused.
#[test]
fn changed_receiver_identity_is_refused_after_first_use() {
    let (first_home, second_home, shome) = (Home::new(), Home::new(), Home::new());
    let (src, out1, out2) = (tempdir(), tempdir(), tempdir());
    let file = src.path().join("hello.txt");
    random_file(&file, 2000, 7);
    let known_peers = shome.path().join("known_peers");

    // First contact, no --peer: accepted and remembered.
    let first = Receiver::start(first_home.path(), out1.path(), 0, &["--yes", "--once"]);
    let (port, first_fp) = (first.port, first.fingerprint.clone());
    let sender = send(shome.path(), &[&file], port, &[], SHORT);
    first.proc.finish(SHORT).assert_success();
    sender.assert_success();
    assert_eq!(list_dir(out1.path()), names(&["hello.txt"]));
    let remembered = fs::read_to_string(&known_peers).expect("known_peers written");
    assert!(
        remembered
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [format!("127.0.0.1:{port}").as_str(), first_fp.as_str()]),
        "known_peers: {remembered:?}"
    );

    // Same address, new identity.
    let second = Receiver::start(second_home.path(), out2.path(), port, &["--yes", "--once"]);
    assert_ne!(second.fingerprint, first_fp);
    let sender = send(shome.path(), &[&file], port, &[], SHORT);
    let received = second.proc.kill();
    sender.assert_failure();
    let message = sender.messages();
    assert!(
        message.contains("REMOTE PEER IDENTIFICATION HAS CHANGED"),
        "{message}"
    );
    assert!(message.contains(&first_fp), "{message}");
    assert!(message.contains(&second.fingerprint), "{message}");
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
    assert!(received.all("received").is_empty(), "{received:#?}");
    assert_eq!(list_dir(out2.path()), BTreeSet::new());
    // The pin is unchanged: the new key was not remembered.
    assert_eq!(
        fs::read_to_string(&known_peers).unwrap(),
        remembered,
        "known_peers must not change"
    );
}

/// Spray datagrams at `port` from a separate socket: random junk of random length, and
/// some that look like probes/replies (type byte, magic) but are corrupted. Returns how
/// many of the datagrams sent were not QUIC-classed (empty, or fixed bit 0x40 clear).
fn spray(port: u16, count: usize, seed: u64) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind spray socket");
    let target = format!("127.0.0.1:{port}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut non_quic = 0;
    for i in 0..count {
        let datagram: Vec<u8> = if i.is_multiple_of(5) {
            corrupted_probe(&mut rng, i / 5)
        } else {
            let len = rng.random_range(0..1500);
            let mut d = vec![0u8; len];
            rng.fill_bytes(&mut d);
            d
        };
        // Empty datagrams are nobody's either: the receiver counts them as dropped too.
        if datagram.first().is_none_or(|b| b & 0x40 == 0) {
            non_quic += 1;
        }
        // Loopback may drop some under load; that is fine, UDP is allowed to.
        let _ = socket.send_to(&datagram, &target);
    }
    non_quic
}

/// A datagram that starts like a probe (0x01) or reply (0x02) with the magic `qpch`,
/// then breaks one rule of the format.
fn corrupted_probe(rng: &mut impl Rng, variant: usize) -> Vec<u8> {
    let kind = if rng.random_bool(0.5) { 0x01 } else { 0x02 };
    let mut d = vec![kind];
    d.extend_from_slice(b"qpch");
    let mut txid = [0u8; 12];
    rng.fill_bytes(&mut txid);
    match variant % 6 {
        // Unsupported version.
        0 => {
            d.push(0xEE);
            d.extend_from_slice(&txid);
            d.push(0);
        }
        // Truncated inside the txid.
        1 => {
            d.push(1);
            d.extend_from_slice(&txid[..5]);
        }
        // A greeting length pointing past the end.
        2 => {
            d.push(1);
            d.extend_from_slice(&txid);
            if kind == 0x02 {
                d.extend_from_slice(&[4, 0, 0, 1, 2, 3, 4]);
            }
            d.push(200);
            d.extend_from_slice(b"short");
        }
        // Invalid UTF-8 greeting.
        3 => {
            d.push(1);
            d.extend_from_slice(&txid);
            if kind == 0x02 {
                d.extend_from_slice(&[4, 0, 0, 1, 2, 3, 4]);
            }
            d.extend_from_slice(&[2, 0xFF, 0xFE]);
        }
        // Trailing bytes after an empty greeting.
        4 => {
            d.push(1);
            d.extend_from_slice(&txid);
            if kind == 0x02 {
                d.extend_from_slice(&[4, 0, 0, 1, 2, 3, 4]);
            }
            d.push(0);
            d.extend_from_slice(b"trailing junk");
        }
        // Over the size limit.
        _ => {
            d.push(1);
            d.extend_from_slice(&txid);
            d.push(0);
            d.resize(300 + rng.random_range(0..1000), 0xAA);
        }
    }
    // Sometimes also flip the magic itself.
    if variant.is_multiple_of(7) {
        d[1 + rng.random_range(0..4usize)] ^= 0x20;
    }
    d
}

/// Junk datagrams at the receiver's port during a 64 MiB transfer are dropped and
/// counted; the transfer still completes verified.
#[test]
fn spray_of_junk_datagrams_does_not_disturb_transfer() {
    const SPRAY: usize = 10_000;
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let big = src.path().join("big.bin");
    random_file(&big, 64 * MIB, 8);
    let sender_fp = qpunch_id(shome.path());

    // Not --once: the receiver must still be there for the whole spray, however fast the
    // transfer is; it is stopped (like Ctrl-C) once both are done.
    let mut receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes"]);
    let port = receiver.port;
    let sender = spawn_send(
        shome.path(),
        &[&big],
        port,
        &["--peer", &receiver.fingerprint],
    );
    // Start spraying once the QUIC connection is up, i.e. while the file is moving.
    receiver.proc.wait_event("connected", SHORT);
    let sprayer = thread::spawn(move || spray(port, SPRAY, 9));
    let non_quic = sprayer.join().expect("spray thread");
    let sender = sender.finish(LONG);
    receiver.proc.wait_event("received", LONG);
    let received = receiver.proc.interrupt(LONG);
    sender.assert_success();
    received.assert_success();

    let saved_as = check_delivery(&sender, &received, "big.bin", &big, out.path(), &sender_fp);
    assert_eq!(saved_as, "big.bin");
    assert_eq!(list_dir(out.path()), names(&["big.bin"]));
    let stats = received.one("stats");
    let dropped = stats["malformed_dropped"]
        .as_u64()
        .expect("malformed_dropped");
    eprintln!("spray: {SPRAY} datagrams, {non_quic} non-QUIC, {dropped} counted as malformed");
    assert!(dropped > 0, "junk was seen and dropped: {stats}");
    assert!(
        dropped <= non_quic,
        "cannot drop more non-QUIC datagrams ({dropped}) than were sent ({non_quic})"
    );
}

/// An existing file is kept (the new one gets ` (1)`), unless `--overwrite`.
#[test]
fn existing_file_is_not_overwritten_unless_asked() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("a.txt");
    let original = b"the user's own a.txt, not to be touched\n";
    fs::write(out.path().join("a.txt"), original).unwrap();
    let sender_fp = qpunch_id(shome.path());

    // Without --overwrite: saved as "a (1).txt".
    random_file(&file, 10_000, 10);
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(shome.path(), &[&file], receiver.port, &[], SHORT);
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();
    let saved_as = check_delivery(&sender, &received, "a.txt", &file, out.path(), &sender_fp);
    assert_eq!(saved_as, "a (1).txt");
    assert_eq!(fs::read(out.path().join("a.txt")).unwrap(), original);
    assert_eq!(list_dir(out.path()), names(&["a.txt", "a (1).txt"]));
    let first_copy = fs::read(out.path().join("a (1).txt")).unwrap();

    // With --overwrite: a.txt itself is replaced, the numbered copy left alone.
    random_file(&file, 20_000, 11);
    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--once", "--overwrite"],
    );
    let sender = send(shome.path(), &[&file], receiver.port, &[], SHORT);
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();
    let saved_as = check_delivery(&sender, &received, "a.txt", &file, out.path(), &sender_fp);
    assert_eq!(saved_as, "a.txt");
    assert_eq!(
        fs::read(out.path().join("a.txt")).unwrap(),
        fs::read(&file).unwrap()
    );
    assert_eq!(fs::read(out.path().join("a (1).txt")).unwrap(), first_copy);
    assert_eq!(list_dir(out.path()), names(&["a.txt", "a (1).txt"]));
}

/// `qpunch id` is stable, distinct per home, and the key file is private.
#[test]
fn id_is_stable_and_key_is_private() {
    let (home, other) = (Home::new(), Home::new());
    let first = qpunch_id(home.path());
    let second = qpunch_id(home.path());
    assert_eq!(first, second);
    assert_ne!(
        first,
        qpunch_id(other.path()),
        "a new home is a new identity"
    );
    assert!(home.path().join("identity.crt").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = home.path().join("identity.key");
        let mode = fs::metadata(&key)
            .expect("identity.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key:?} mode {mode:o}");
        let dir_mode = fs::metadata(home.path()).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o077, 0, "config dir mode {dir_mode:o}");
    }
    // A receiver announces the same identity.
    let out = tempdir();
    let receiver = Receiver::start(home.path(), out.path(), 0, &["--yes"]);
    assert_eq!(receiver.fingerprint, first);
}

/// `--cc` picks each side's congestion controller: a NewReno receiver takes a file from a
/// CUBIC sender, and an unknown name is refused before anything happens, listing the
/// names that exist. (Which controller runs is checked in `node`'s unit tests; the path
/// benchmark measures what each is worth.)
#[test]
fn congestion_controller_is_chosen_per_side() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("paced.bin");
    random_file(&file, MIB, 11);
    let sender_fp = qpunch_id(shome.path());

    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--once", "--cc", "newreno"],
    );
    let sender = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--peer", &receiver.fingerprint, "--cc", "cubic"],
        SHORT,
    );
    let received = receiver.proc.finish(SHORT);
    sender.assert_success();
    received.assert_success();
    check_delivery(
        &sender,
        &received,
        "paced.bin",
        &file,
        out.path(),
        &sender_fp,
    );

    let refused = send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--cc", "vegas"],
        SHORT,
    );
    assert!(!refused.status.success(), "{refused:#?}");
    assert!(refused.events.is_empty(), "{refused:#?}");
    let message = refused.messages();
    for name in ["vegas", "bbr", "cubic", "newreno"] {
        assert!(message.contains(name), "{name} in {message}");
    }
}

/// One unreadable line in known_peers does not stop a send: it is reported (file
/// and line) and kept as it was, and the new peer is remembered after it.
#[test]
fn bad_known_peers_line_is_reported_and_kept() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("f.txt");
    random_file(&file, 100, 11);
    qpunch_id(shome.path());
    let known_peers = shome.path().join("known_peers");
    let other = qpunch_id(Home::new().path());
    let original = format!("# mine\nbroken line here\n198.51.100.9:9199 {other}\n");
    fs::write(&known_peers, &original).unwrap();

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(shome.path(), &[&file], receiver.port, &[], SHORT);
    sender.assert_success();
    receiver.proc.finish(SHORT).assert_success();
    let warning = sender.one("warning")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(warning.contains(s(&known_peers)), "{warning}");
    assert!(warning.contains("line 2 "), "{warning}");

    let now = fs::read_to_string(&known_peers).unwrap();
    let added = format!("127.0.0.1:{} {}\n", receiver.port, receiver.fingerprint);
    assert_eq!(now, format!("{original}{added}"));
}

/// Like ssh, an identity key that others may read is refused (with the `chmod`
/// that fixes it), and a qpunch home that others may write to is warned about.
#[cfg(unix)]
#[test]
fn exposed_key_is_refused_and_open_home_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new();
    let fp = qpunch_id(home.path());
    let chmod = |path: &Path, mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    let id = || Proc::spawn("id", home.path(), &["id"]).finish(SHORT);

    chmod(home.path(), 0o777);
    let open_home = id();
    assert!(open_home.status.success(), "{open_home:#?}");
    assert_eq!(
        open_home.text,
        std::slice::from_ref(&fp),
        "stdout is the fingerprint alone"
    );
    assert!(
        open_home.stderr.contains("writable by group or others")
            && open_home.stderr.contains("chmod 700"),
        "{open_home:#?}"
    );
    chmod(home.path(), 0o700);

    let key = home.path().join("identity.key");
    chmod(&key, 0o644);
    let exposed = id();
    assert!(!exposed.status.success(), "{exposed:#?}");
    assert!(exposed.text.is_empty(), "{exposed:#?}");
    assert!(
        exposed
            .stderr
            .contains(&format!("chmod 600 {}", key.display())),
        "{exposed:#?}"
    );
    chmod(&key, 0o600);
    assert_eq!(qpunch_id(home.path()), fp);
}

/// Two sockets standing in for a receiver and an impostor: `probed` on 127.0.0.1, where
/// the sender is told to go, and `elsewhere` on 127.0.0.2.
fn probed_and_elsewhere() -> (UdpSocket, UdpSocket) {
    let probed = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let elsewhere = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    probed.set_read_timeout(Some(SHORT)).unwrap();
    (probed, elsewhere)
}

/// Wait for a probe on `probed` and answer it from `elsewhere`, echoing its txid: what
/// anyone who sees the probe can do. Returns the sender's address.
fn answer_from_elsewhere(probed: &UdpSocket, elsewhere: &UdpSocket) -> std::net::SocketAddr {
    use qpunch::wire::Message;
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = probed.recv_from(&mut buf).expect("a probe arrives");
        if let Ok(Message::Probe { txid }) = Message::decode(&buf[..n]) {
            let reply = qpunch::punch::reply_to(from, txid);
            elsewhere.send_to(&reply.contents, from).unwrap();
            return from;
        }
    }
}

/// A probe reply from an address other than the probed one is not trusted on
/// first use: without `--peer` the sender refuses before any QUIC (nothing reaches the
/// other address, nothing is remembered); with `--peer` the address does not matter and
/// TLS pinning decides (here: refuses the impostor's key).
#[test]
fn reply_from_elsewhere_is_not_trusted_on_first_use() {
    let shome = Home::new();
    let src = tempdir();
    let file = src.path().join("secret.txt");
    random_file(&file, 1000, 13);
    let known_peers = shome.path().join("known_peers");

    // Without --peer: refused.
    let (probed, elsewhere) = probed_and_elsewhere();
    let (port, impostor) = (
        probed.local_addr().unwrap().port(),
        elsewhere.local_addr().unwrap(),
    );
    let answering = thread::spawn(move || {
        answer_from_elsewhere(&probed, &elsewhere);
        // The sender must not dial the address that answered.
        elsewhere
            .set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 1500];
        elsewhere.recv_from(&mut buf).map(|(n, _)| n)
    });
    let sender = send(shome.path(), &[&file], port, &[], SHORT);
    let dialled = answering.join().unwrap();
    sender.assert_failure();
    assert!(
        dialled.is_err(),
        "the sender sent {dialled:?} bytes to {impostor}"
    );
    let message = sender.messages();
    assert!(message.contains(&impostor.to_string()), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("--peer"), "{message}");
    assert_eq!(sender.all("punched").len(), 1, "{sender:#?}");
    assert!(sender.all("connected").is_empty(), "{sender:#?}");
    assert!(!known_peers.exists(), "nothing may be remembered");

    // With --peer: on to the TLS pin, which the impostor's key fails.
    let expected = qpunch_id(Home::new().path());
    let (probed, elsewhere) = probed_and_elsewhere();
    let port = probed.local_addr().unwrap().port();
    let impostor = qpunch::identity::Identity::generate().unwrap();
    let impostor_fp = impostor.fingerprint().to_string();
    let answering = thread::spawn(move || {
        answer_from_elsewhere(&probed, &elsewhere);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            use qpunch::node::{Node, NodeConfig, QUICK_LINGER};
            let config = NodeConfig::new(impostor, qpunch::transfer::ALPN, true);
            let node = Node::new(elsewhere, config).unwrap();
            let accepted = tokio::time::timeout(SHORT, node.accept()).await;
            node.close(QUICK_LINGER).await;
            accepted.is_ok()
        })
    });
    let sender = send(shome.path(), &[&file], port, &["--peer", &expected], SHORT);
    assert!(answering.join().unwrap(), "the sender never dialled");
    sender.assert_failure();
    let message = sender.messages();
    assert!(message.contains(&impostor_fp), "{message}");
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains("refusing"), "{message}");
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
    assert!(!known_peers.exists(), "nothing may be remembered");
}

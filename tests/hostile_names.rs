//! Hostile file names, driven through the library over real loopback QUIC: a sender
//! offering names crafted to escape the download directory, drive the terminal or hit
//! Windows devices must see them declined, and nothing may land outside the directory.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;
use std::time::Duration;

use common::{blake3_file, list_dir, names, random_file, tempdir};
use qpunch::identity::Identity;
use qpunch::node::{self, Node, NodeConfig};
use qpunch::punch::PunchConfig;
use qpunch::transfer::{self, Outcome, Outgoing, Policy, Quiet, ReceiveOptions, Receiver};

/// Names that must be declined, and a fragment the decline reason must contain.
const UNSAFE: &[(&str, &str)] = &[
    ("../../escape.txt", "\"..\" path components are not allowed"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("..\\..\\win.ini", "\"..\" path components are not allowed"),
    ("a/../../b", "\"..\" path components are not allowed"),
    ("evil\u{1b}[31m.txt", "control character"),
    ("\u{202E}gpj.exe", "control character"),
    ("CON", "reserved or invalid on Windows"),
    ("nul.txt", "reserved or invalid on Windows"),
    ("", "file name is empty"),
    (".", "must not be \".\" or \"..\""),
];

/// Names that must be accepted, and the name they are stored under.
const SAFE: &[(&str, &str)] = &[("sub/dir/ok.txt", "ok.txt"), ("normal.txt", "normal.txt")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_declined_and_nothing_escapes() {
    tokio::time::timeout(Duration::from_secs(60), run())
        .await
        .expect("transfer finished in time");
}

async fn run() {
    // root/mid/out: "../x" from out lands in mid, "../../x" in root; both are checked.
    let root = tempdir();
    let mid = root.path().join("mid");
    let out = mid.join("out");
    fs::create_dir_all(&out).unwrap();
    let src = tempdir();

    // One distinct source file per offered name, so a stored file can be traced back.
    let all: Vec<&str> = UNSAFE
        .iter()
        .map(|(n, _)| *n)
        .chain(SAFE.iter().map(|(n, _)| *n))
        .collect();
    let mut outgoing = Vec::new();
    for (i, name) in all.iter().enumerate() {
        let path = src.path().join(format!("source-{i}.bin"));
        random_file(&path, 1000 + i as u64, 100 + i as u64);
        outgoing.push(Outgoing {
            name: name.to_string(),
            path,
            ..Outgoing::default()
        });
    }

    // Receiver: a node on 127.0.0.1 accepting one connection, storing into `out`.
    let receiver_id = Identity::generate().unwrap();
    let receiver_fp = receiver_id.fingerprint();
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let receiving = Node::new(socket, NodeConfig::new(receiver_id, transfer::ALPN, true)).unwrap();
    let target = receiving.local_addr().unwrap();
    assert!(target.ip().is_loopback() && target.port() != 0, "{target}");
    let receiver = Receiver::new(ReceiveOptions::new(&out, Policy::AcceptAll)).unwrap();
    let sender_id = Identity::generate().unwrap();
    let sender_fp = sender_id.fingerprint();
    let receiving_task = tokio::spawn(async move {
        let peer = receiving
            .accept()
            .await
            .expect("endpoint open")
            .expect("handshake");
        assert_eq!(peer.fingerprint, sender_fp);
        let reports = receiver.handle(&peer, Arc::new(Quiet)).await;
        // Let the sender read the verdicts and close first.
        let _ = tokio::time::timeout(Duration::from_secs(10), peer.connection.closed()).await;
        receiving.close(node::CLOSE_LINGER).await;
        reports
    });

    // Sender: punch, hand the same socket to QUIC, pin the receiver's key.
    let config = NodeConfig::new(sender_id, transfer::ALPN, false);
    let node::HandOver {
        node: sending,
        punched,
        punched_from,
    } = node::punch_and_hand_over(target, config, PunchConfig::default())
        .await
        .expect("punch");
    assert_eq!(punched.peer, target);
    let reflexive = punched
        .reflexive
        .expect("a qpunch reply carries the reflexive address");
    assert_eq!(punched_from.port(), reflexive.port());
    assert_eq!(
        sending.local_addr().unwrap().port(),
        punched_from.port(),
        "the punched socket is the QUIC socket"
    );
    let conn = sending
        .connect(punched.peer, Some(receiver_fp))
        .await
        .expect("connect");
    assert_eq!(conn.fingerprint, receiver_fp);
    let reports = transfer::send_files(&conn.connection, outgoing.clone(), Arc::new(Quiet))
        .await
        .expect("send_files");
    conn.connection.close(transfer::codes::DONE.into(), b"done");
    sending.close(node::CLOSE_LINGER).await;
    let received = receiving_task
        .await
        .expect("receiver task")
        .expect("receiver handled the batch");

    // Sender's view: one report per offered file, in order.
    assert_eq!(reports.len(), all.len(), "{reports:#?}");
    assert_eq!(received.len(), all.len(), "{received:#?}");
    for (i, (report, name)) in reports.iter().zip(&all).enumerate() {
        assert_eq!(report.id, i as u32);
        assert_eq!(report.name, *name, "sender reports the offered name");
        // Declined files are never read (a first send hashes what it sends): no hash.
        if report.is_verified() {
            assert_eq!(report.blake3, blake3_file(&outgoing[i].path));
        } else {
            assert_eq!(report.blake3, "", "{report:?}");
        }
    }
    for (report, (name, why)) in reports.iter().zip(UNSAFE) {
        let Outcome::Declined(reason) = &report.outcome else {
            panic!("{name:?} must be declined: {report:#?}");
        };
        assert!(reason.contains("unsafe file name"), "{name:?}: {reason}");
        assert!(reason.contains(why), "{name:?}: {reason}");
        // The reason is shown to users: it must not carry raw control/bidi characters.
        assert!(
            !reason
                .chars()
                .any(|c| c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c)),
            "{name:?}: reason {reason:?} echoes raw control characters"
        );
        assert_eq!(report.saved_as, None, "{name:?}");
    }
    let mut expected = BTreeMap::new();
    for (i, (name, stored)) in SAFE.iter().enumerate() {
        let i = UNSAFE.len() + i;
        let report = &reports[i];
        assert_eq!(report.outcome, Outcome::Verified, "{name:?}: {report:#?}");
        assert_eq!(report.saved_as.as_deref(), Some(*stored), "{name:?}");
        expected.insert(stored.to_string(), blake3_file(&outgoing[i].path));
    }
    // The receiver's reports agree.
    for (sent, got) in reports.iter().zip(&received) {
        assert_eq!(sent.id, got.id);
        assert_eq!(sent.saved_as, got.saved_as, "{sent:#?} vs {got:#?}");
        assert_eq!(
            sent.is_verified(),
            got.is_verified(),
            "{sent:#?} vs {got:#?}"
        );
    }

    // Nothing escaped: root holds only mid, mid only out, out only the safe files.
    assert_eq!(list_dir(root.path()), names(&["mid"]));
    assert_eq!(list_dir(&mid), names(&["out"]));
    assert_eq!(
        list_dir(&out),
        expected.keys().map(|k| k.to_string()).collect()
    );
    for (stored, hash) in &expected {
        assert_eq!(&blake3_file(&out.join(stored)), hash, "{stored}");
    }
    assert!(!std::path::Path::new("/etc/passwd.part").exists());
}

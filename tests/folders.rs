//! `qpunch send DIR...` end to end over loopback: trees rebuilt under `--out`, empty
//! folders and the executable bit kept, symlinks never followed, hostile folder names
//! refused component by component, progress and summary events.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::transfer::{self, Decision, FileOffer, Manifest, Policy, Quiet, ReceiveOptions};

#[test]
fn a_folder_arrives_as_a_tree() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out, elsewhere) = (tempdir(), tempdir(), tempdir());
    let top = src.path().join("project");
    fs::create_dir_all(top.join("src/deep")).unwrap();
    fs::create_dir_all(top.join("empty/also-empty")).unwrap();
    fs::create_dir_all(top.join(".config")).unwrap();
    random_file(&top.join("README"), 3000, 1);
    random_file(&top.join("src/main.rs"), 700_000, 2);
    random_file(&top.join("src/deep/data.bin"), 5 * MIB, 3);
    random_file(&top.join(".config/settings"), 10, 4);
    random_file(&top.join("run.sh"), 100, 5);
    fs::set_permissions(top.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    // A link out of the tree, and one to a file inside it: neither is followed.
    fs::write(elsewhere.path().join("secret"), b"not for sending").unwrap();
    std::os::unix::fs::symlink(elsewhere.path().join("secret"), top.join("src/leak")).unwrap();
    std::os::unix::fs::symlink(top.join("README"), top.join("readme-link")).unwrap();
    // A plain file beside the folder, in the same send.
    let loose = src.path().join("loose.txt");
    random_file(&loose, 42, 6);

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(
        shome.path(),
        &[&top, &loose],
        receiver.port,
        &["--peer", &receiver.fingerprint],
        LONG,
    );
    let received = receiver.proc.finish(LONG);
    sender.assert_success();
    received.assert_success();

    let stored = out.path().join("project");
    for (path, source) in [
        ("README", top.join("README")),
        ("src/main.rs", top.join("src/main.rs")),
        ("src/deep/data.bin", top.join("src/deep/data.bin")),
        // Dotfile policy per component: the folder `.config` is stored as `_config`.
        ("_config/settings", top.join(".config/settings")),
        ("run.sh", top.join("run.sh")),
    ] {
        assert_eq!(
            blake3_file(&stored.join(path)),
            blake3_file(&source),
            "{path}"
        );
    }
    assert_eq!(
        blake3_file(&out.path().join("loose.txt")),
        blake3_file(&loose)
    );
    assert!(
        stored.join("empty/also-empty").is_dir(),
        "empty folders kept"
    );
    let mode = |p: &str| fs::metadata(stored.join(p)).unwrap().permissions().mode();
    assert_ne!(mode("run.sh") & 0o100, 0, "the executable bit is kept");
    assert_eq!(mode("README") & 0o111, 0, "and not invented");
    // Finished files get the usual mode for new files (the receiver runs with our umask),
    // not the partials' private 0600.
    let umask = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    assert_eq!(mode("README") & 0o777, 0o666 & !umask, "README");
    assert_eq!(mode("run.sh") & 0o777, 0o777 & !umask, "run.sh");
    assert!(!stored.join("src/leak").exists() && !stored.join("readme-link").exists());
    // Every file's saved_as is its path relative to --out.
    let saved: std::collections::BTreeSet<String> = sender
        .all("sent")
        .iter()
        .map(|e| e["saved_as"].as_str().unwrap().to_string())
        .collect();
    assert!(saved.contains("project/src/deep/data.bin"), "{saved:?}");
    assert_eq!(saved.len(), 6, "{saved:?}");
    // The skipped links were said so, as warnings.
    let warnings: Vec<String> = sender
        .all("warning")
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().all(|w| w.contains("symbolic link")),
        "{warnings:?}"
    );
    // Progress events with a final one at 100%, and a summary on both sides.
    let last = sender
        .all("progress")
        .last()
        .cloned()
        .cloned()
        .expect("progress events");
    assert_eq!(last["files_done"], 6, "{last}");
    assert_eq!(last["bytes_done"], last["bytes"], "{last}");
    for finished in [&sender, &received] {
        let summary = finished.one("summary");
        assert_eq!(summary["files"], 6, "{summary}");
        assert_eq!(summary["verified"], 6, "{summary}");
        assert!(summary["seconds"].as_f64().unwrap() > 0.0, "{summary}");
    }
    assert_eq!(received.one("summary")["path"], s(out.path()));
    assert_eq!(
        list_dir(&out.path().join(transfer::PARTIAL_DIR)),
        names(&[])
    );
}

#[test]
fn a_second_copy_of_a_folder_merges_without_overwriting() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let top = src.path().join("photos");
    fs::create_dir(&top).unwrap();
    random_file(&top.join("a.jpg"), 1000, 7);
    for _ in 0..2 {
        let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
        let sender = send(shome.path(), &[&top], receiver.port, &[], SHORT);
        receiver.proc.finish(SHORT).assert_success();
        sender.assert_success();
    }
    let stored = out.path().join("photos");
    assert_eq!(list_dir(&stored), names(&["a.jpg", "a (1).jpg"]));
}

/// A folder that cannot be made (a file of its name is in the way) fails its own files,
/// small and large, saying why, and nothing of them is written; the other files of the
/// send, bundled with them, arrive. Destinations are reserved after the decisions are
/// sent, so such a file was accepted: it fails when it arrives, and its bundle goes on.
#[test]
fn a_file_in_the_way_of_a_folder_fails_only_that_folders_files() {
    let (rhome, shome) = (Home::new(), Home::new());
    let (src, out) = (tempdir(), tempdir());
    let top = src.path().join("top");
    for dir in ["blocked", "fine"] {
        fs::create_dir_all(top.join(dir)).unwrap();
        for i in 0..5 {
            random_file(&top.join(format!("{dir}/s{i}")), 1000, i);
        }
        random_file(&top.join(format!("{dir}/large")), 3 * MIB, 9);
    }
    fs::create_dir(out.path().join("top")).unwrap();
    let in_the_way = out.path().join("top/blocked");
    fs::write(&in_the_way, b"in the way").unwrap();
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = send(shome.path(), &[&top], receiver.port, &[], SHORT);
    let received = receiver.proc.finish(SHORT);
    assert!(!sender.status.success(), "{sender:#?}");
    let mut sent: Vec<&str> = sender
        .all("sent")
        .iter()
        .map(|e| e["saved_as"].as_str().unwrap())
        .collect();
    sent.sort();
    let fine = ["large", "s0", "s1", "s2", "s3", "s4"].map(|f| format!("top/fine/{f}"));
    assert_eq!(sent, fine, "{sender:#?}");
    let errors = received.all("error");
    assert_eq!(errors.len(), 6, "{received:#?}");
    for error in errors {
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("cannot store it"), "{message}");
        assert!(message.contains("not a folder"), "{message}");
    }
    assert!(sender.all("declined").is_empty(), "{sender:#?}");
    assert_eq!(fs::read(&in_the_way).unwrap(), b"in the way");
    assert_eq!(list_dir(&out.path().join("top/fine")).len(), 6);
    // Nothing of the large file was written, not even a partial.
    let partials = out.path().join(".qpunch-partial");
    if partials.exists() {
        assert_eq!(list_dir(&partials), names(&[]));
    }
}

fn node(accept: bool) -> Node {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let id = Identity::generate().unwrap();
    Node::new(socket, NodeConfig::new(id, transfer::ALPN, accept)).unwrap()
}

/// Folder components a sender controls are refused one by one, like file names: nothing
/// is created outside `--out`, and the refusal names the component.
#[tokio::test]
async fn hostile_folder_names_are_declined() {
    let root = tempdir();
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    let receiver =
        qpunch::transfer::Receiver::new(ReceiveOptions::new(&out, Policy::AcceptAll)).unwrap();
    let server = Arc::new(node(true));
    let (to, fp) = (server.local_addr().unwrap(), server.fingerprint());
    let serving = {
        let server = server.clone();
        tokio::spawn(async move {
            let peer = server.accept().await.unwrap().unwrap();
            let reports = receiver.handle(&peer, Arc::new(Quiet)).await;
            // Let the sender read the decisions before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(5), peer.connection.closed()).await;
            reports
        })
    };
    let cases: &[(&[&str], &str)] = &[
        (&[".."], "\"..\""),
        (&["a/b"], "single name"),
        (&["ok", "..", "x"], "\"..\""),
        (&["/etc"], "absolute"),
        (&["a\\b"], "single name"),
        (&["evil\u{1b}[2J"], "control character"),
        (&["CON"], "reserved"),
        (&[""], "empty"),
    ];
    let data = b"payload";
    let hash = blake3::hash(data).to_hex().to_string();
    let mut files: Vec<FileOffer> = cases
        .iter()
        .enumerate()
        .map(|(i, (dir, _))| FileOffer {
            id: i as u32,
            name: "f.txt".into(),
            size: data.len() as u64,
            blake3: hash.clone(),
            dir: dir.iter().map(|d| d.to_string()).collect(),
            ..FileOffer::default()
        })
        .collect();
    let deep = vec!["d".to_string(); transfer::MAX_DEPTH + 1];
    files.push(FileOffer {
        id: 99,
        dir: deep,
        ..files[0].clone()
    });
    // One acceptable file, so that the manifest's empty folders are made.
    files.push(FileOffer {
        id: 100,
        dir: vec!["ok".into()],
        ..files[0].clone()
    });
    let client = node(false);
    let peer = client.connect(to, Some(fp)).await.unwrap();
    let manifest = Manifest {
        files,
        dirs: vec![vec!["..".into(), "escaped".into()], vec!["fine".into()]],
    };
    let mut control = common::peer::send_manifest(&peer.connection, &manifest)
        .await
        .unwrap();
    let decisions = control.decisions(SHORT).await.unwrap();
    for (i, (dir, why)) in cases.iter().enumerate() {
        match &decisions[i] {
            Decision::Decline { reason, .. } => {
                assert!(reason.contains(why), "{dir:?}: {reason}");
                assert!(!reason.contains('\u{1b}'), "{reason:?}");
            }
            other => panic!("{dir:?} must be declined: {other:?}"),
        }
    }
    assert!(
        matches!(&decisions[cases.len()], Decision::Decline { reason, .. } if reason.contains("deeper")),
        "{decisions:?}"
    );
    assert_eq!(
        decisions[cases.len() + 1],
        Decision::Accept { id: 100, offset: 0 }
    );
    peer.connection.close(0u32.into(), b"");
    // The accepted file never came: the batch ends with the connection.
    let ended = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    // Only the safe folders were made; nothing escaped `out`.
    assert_eq!(list_dir(root.path()), names(&["out"]));
    assert_eq!(list_dir(&out), names(&["fine", "ok"]));
}

/// The consent prompt sums a tree up: file count, total size, and the top-level names
/// (a folder once, with what it holds), not thousands of lines.
#[test]
fn the_consent_prompt_shows_counts_size_and_top_level_names() {
    let (rhome, shome, src, out) = (Home::new(), Home::new(), tempdir(), tempdir());
    let album = src.path().join("album");
    fs::create_dir_all(album.join("disc 2")).unwrap();
    for i in 0..40 {
        random_file(&album.join(format!("track{i:02}.flac")), 1000, i);
    }
    random_file(&album.join("disc 2/bonus.flac"), 5000, 99);
    let loose = src.path().join("notes.txt");
    random_file(&loose, 123, 100);
    let args = receive_args(0, Some(out.path()), &["--json", "--once"]);
    let mut receiver = pty::PtyProc::spawn(rhome.path(), &args);
    let listening = receiver.wait_events("listening", 1, SHORT).remove(0);
    let port = listening["port"].as_u64().unwrap() as u16;
    let sender = spawn_send(shome.path(), &[&album, &loose], port, &[]);
    receiver.wait_for(pty::PROMPT, 1, SHORT);
    let prompt = receiver.transcript();
    assert!(
        prompt.contains("wants to send you 42 file(s), 44.07 KiB in all"),
        "{prompt}"
    );
    assert!(
        prompt.contains("album/  (41 file(s), 43.95 KiB)"),
        "{prompt}"
    );
    assert!(prompt.contains("notes.txt  (123 B)"), "{prompt}");
    assert!(
        !prompt.contains("track07"),
        "files inside folders are not listed: {prompt}"
    );
    receiver.type_text("y\n");
    let sent = sender.finish(LONG);
    sent.assert_success();
    assert_eq!(list_dir(&out.path().join("album")).len(), 41);
}

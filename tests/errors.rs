//! Failures end to end, with the real binary over loopback: a receiver or sender that
//! vanishes or is interrupted, a file that changes while it is being sent, a full disk, a
//! permission denied. Each must give a one-line clear error on both sides (an `error`
//! event with `--json`), keep the partial for a resume, exit non-zero, and report nothing
//! as delivered.
//!
//! To catch a transfer in flight without making it slow for everyone, the sender is
//! throttled by stopping and continuing it (SIGSTOP/SIGCONT) and the test watches the
//! receiver's partial file grow.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Bytes in the receiver's partial files.
fn partial_bytes(out: &Path) -> u64 {
    std::fs::read_dir(out.join(qpunch::transfer::PARTIAL_DIR))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Wait until the receiver's partials hold at least `bytes`.
fn wait_partial(out: &Path, bytes: u64, sender: &Proc) {
    let deadline = Instant::now() + LONG;
    while partial_bytes(out) < bytes {
        assert!(
            Instant::now() < deadline && sender.running(),
            "the partial never reached {bytes} bytes ({} now)\n{}",
            partial_bytes(out),
            sender.diagnostics()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Keeps a process stopped most of the time (running 4 ms of every 20), so that a
/// transfer can be caught in flight; lets it run freely once dropped.
///
/// It borrows the [`Proc`]: the process cannot be reaped (by `finish`, `kill` or drop)
/// while the throttle still signals its pid, and [`Proc::running`] does not reap it, so a
/// signal never reaches another process that reused the pid.
struct Throttle<'a> {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    proc: &'a Proc,
}

impl<'a> Throttle<'a> {
    fn start(proc: &'a Proc) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = proc.id() as i32;
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: signals to a child the test owns and has not reaped (see
                    // above: the throttle is joined before the Proc can be reaped).
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    thread::sleep(Duration::from_millis(16));
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                    thread::sleep(Duration::from_millis(4));
                }
            })
        };
        Throttle {
            stop,
            thread: Some(thread),
            proc,
        }
    }
}

impl Drop for Throttle<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.proc.signal(libc::SIGCONT);
    }
}

/// The one `error` event of a finished process (the README promises one line per side),
/// which must contain `what`.
fn one_error(finished: &Finished, what: &str) -> String {
    let errors = finished.error_messages();
    let [error] = &errors[..] else {
        panic!(
            "{} printed {} error events, not one: {errors:?}\n{finished:#?}",
            finished.name,
            errors.len()
        );
    };
    assert!(
        error.contains(what),
        "{} says {error:?}, nothing about {what:?}\n{finished:#?}",
        finished.name
    );
    assert!(!error.contains('\n'), "one line: {error:?}");
    eprintln!("{}: {error}", finished.name);
    error.to_string()
}

/// Nothing was delivered: no `sent`/`received` event, and nothing in `out` (the
/// receiver's `--out`) but partial files and empty folders (one made before the test).
fn nothing_delivered(sender: &Finished, receiver: &Finished, out: &Path) {
    assert!(sender.all("sent").is_empty(), "{sender:#?}");
    assert!(receiver.all("received").is_empty(), "{receiver:#?}");
    let delivered: Vec<String> = list_dir(out)
        .into_iter()
        .filter(|name| {
            let path = out.join(name);
            let empty_folder = path.is_dir() && list_dir(&path).is_empty();
            !name.starts_with(".qpunch-partial/") && !empty_folder
        })
        .collect();
    assert!(delivered.is_empty(), "delivered to {out:?}: {delivered:?}");
}

/// The receiver vanishes (SIGKILL) mid-transfer: the sender gives up after its stall
/// timeout with one clear error; a new receiver on the same folder resumes, and only the
/// missing part travels.
#[test]
fn a_vanished_receiver_is_an_error_and_the_partial_resumes() {
    const SIZE: u64 = 48 * MIB;
    let (rhome, shome, src, out) = (Home::new(), Home::new(), tempdir(), tempdir());
    let file = src.path().join("big.bin");
    random_file(&file, SIZE, 1);

    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = spawn_send(
        shome.path(),
        &[&file],
        receiver.port,
        &["--stall-timeout", "2s"],
    );
    let throttle = Throttle::start(&sender);
    wait_partial(out.path(), 8 * MIB, &sender);
    let received = receiver.proc.kill();
    drop(throttle);
    let kept = partial_bytes(out.path());
    let started = Instant::now();
    let sent = sender.finish(SHORT);
    sent.assert_failure();
    assert!(started.elapsed() < Duration::from_secs(15));
    one_error(&sent, "timed out");
    nothing_delivered(&sent, &received, out.path());

    // A first send hashes as it goes: nothing was hashed before the bytes moved, so
    // there is no tree to remember yet.
    let cached = || {
        std::fs::read_dir(shome.path().join("cache"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    assert_eq!(cached(), 0, "nothing hashed up front");

    // The same receiver (home, folder) again: the sender resumes.
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sent = send(shome.path(), &[&file], receiver.port, &[], LONG);
    let received = receiver.proc.finish(LONG);
    sent.assert_success();
    received.assert_success();
    assert_eq!(blake3_file(&out.path().join("big.bin")), blake3_file(&file));
    let summary = sent.one("summary");
    let moved = summary["moved"].as_u64().unwrap();
    eprintln!(
        "receiver killed with {kept} bytes of {SIZE} in its partial; the resume moved {moved}"
    );
    assert!(moved <= SIZE - kept + 256 * 1024, "{summary}");
    assert_eq!(list_dir(out.path()), names(&["big.bin"]));
    // The resume needed the file's tree: it is remembered for the next one.
    assert_eq!(cached(), 1, "one tree in the sender's cache");
}

/// The sender vanishes (SIGKILL): the receiver gives up after its stall timeout with one
/// clear error, exits non-zero (`--once`), and keeps the partial.
#[test]
fn a_vanished_sender_is_an_error_and_the_partial_is_kept() {
    const SIZE: u64 = 32 * MIB;
    let (rhome, shome, src, out) = (Home::new(), Home::new(), tempdir(), tempdir());
    let file = src.path().join("big.bin");
    random_file(&file, SIZE, 2);
    let receiver = Receiver::start(
        rhome.path(),
        out.path(),
        0,
        &["--yes", "--once", "--stall-timeout", "2s"],
    );
    let sender = spawn_send(shome.path(), &[&file], receiver.port, &[]);
    let throttle = Throttle::start(&sender);
    wait_partial(out.path(), 4 * MIB, &sender);
    drop(throttle);
    let sent = sender.kill();
    let received = receiver.proc.finish(SHORT);
    received.assert_failure();
    one_error(&received, "sent nothing for 2 s");
    nothing_delivered(&sent, &received, out.path());
    assert!(partial_bytes(out.path()) >= 4 * MIB, "the partial is kept");
}

/// Ctrl-C on the sender: it says how to resume; the receiver names the interruption at
/// once (not after a timeout) and keeps the partial. Ctrl-C on the receiver: the sender
/// is told it is shutting down, and the partial is kept too.
#[test]
fn ctrl_c_on_either_side_keeps_the_partial() {
    const SIZE: u64 = 32 * MIB;
    let (rhome, shome, src) = (Home::new(), Home::new(), tempdir());
    let file = src.path().join("big.bin");
    random_file(&file, SIZE, 3);

    // The sender is interrupted.
    let out = tempdir();
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = spawn_send(shome.path(), &[&file], receiver.port, &[]);
    let throttle = Throttle::start(&sender);
    wait_partial(out.path(), 4 * MIB, &sender);
    drop(throttle);
    let started = Instant::now();
    let sent = sender.interrupt(SHORT);
    let received = receiver.proc.finish(SHORT);
    assert!(started.elapsed() < Duration::from_secs(10));
    sent.assert_failure();
    received.assert_failure();
    one_error(&sent, "run the same command again to resume");
    one_error(&received, "the sender was interrupted");
    nothing_delivered(&sent, &received, out.path());
    assert!(partial_bytes(out.path()) >= 4 * MIB);

    // The receiver is interrupted.
    let out = tempdir();
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = spawn_send(shome.path(), &[&file], receiver.port, &[]);
    let throttle = Throttle::start(&sender);
    wait_partial(out.path(), 4 * MIB, &sender);
    let received = receiver.proc.interrupt(SHORT);
    drop(throttle);
    let sent = sender.finish(SHORT);
    sent.assert_failure();
    received.assert_failure();
    one_error(&sent, "receiver shutting down");
    nothing_delivered(&sent, &received, out.path());
    assert!(partial_bytes(out.path()) >= 4 * MIB);
}

/// The file grows while it is being sent: the sender notices, resets the stream, and
/// both sides say the file changed.
#[test]
fn a_file_that_changes_while_sent_is_refused_on_both_sides() {
    const SIZE: u64 = 48 * MIB;
    let (rhome, shome, src, out) = (Home::new(), Home::new(), tempdir(), tempdir());
    let file = src.path().join("growing.log");
    random_file(&file, SIZE, 4);
    let receiver = Receiver::start(rhome.path(), out.path(), 0, &["--yes", "--once"]);
    let sender = spawn_send(shome.path(), &[&file], receiver.port, &[]);
    let throttle = Throttle::start(&sender);
    wait_partial(out.path(), 2 * MIB, &sender);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"one more line\n").unwrap();
    }
    drop(throttle);
    let sent = sender.finish(LONG);
    let received = receiver.proc.finish(LONG);
    sent.assert_failure();
    received.assert_failure();
    one_error(&sent, "changed while it was being sent");
    one_error(&received, "changed while it was being sent");
    nothing_delivered(&sent, &received, out.path());
}

/// The receiver's disk fills up mid-transfer (a tmpfs, as root): both sides say the disk
/// is full, and what arrived is kept.
#[test]
fn a_full_disk_is_a_clear_error_on_both_sides() {
    if !sys::require_root(
        "a_full_disk_is_a_clear_error_on_both_sides",
        "mounts a tmpfs",
    ) {
        return;
    }
    const SIZE: u64 = 24 * MIB;
    let (rhome, shome, src, mnt) = (Home::new(), Home::new(), tempdir(), tempdir());
    let _tmpfs = sys::Tmpfs::mount(mnt.path(), "32m").expect("tmpfs");
    let out = mnt.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let file = src.path().join("big.bin");
    random_file(&file, SIZE, 5);
    let receiver = Receiver::start(rhome.path(), &out, 0, &["--yes", "--once"]);
    let sender = spawn_send(shome.path(), &[&file], receiver.port, &[]);
    let throttle = Throttle::start(&sender);
    wait_partial(&out, 2 * MIB, &sender);
    // Someone else fills the disk meanwhile.
    let filler = mnt.path().join("filler");
    let _ = std::fs::write(&filler, vec![7u8; 32 * MIB as usize]);
    drop(throttle);
    let sent = sender.finish(LONG);
    let received = receiver.proc.finish(LONG);
    sent.assert_failure();
    received.assert_failure();
    one_error(&received, "the disk is full");
    one_error(&sent, "the disk is full");
    nothing_delivered(&sent, &received, &out);
    assert!(partial_bytes(&out) >= 2 * MIB, "what arrived is kept");
}

/// A stream (`send -`) fills the receiver's disk: both sides say so, and nothing of it is
/// kept, since a stream cannot be resumed.
#[test]
fn a_stream_that_fills_the_disk_keeps_nothing() {
    if !sys::require_root(
        "a_stream_that_fills_the_disk_keeps_nothing",
        "mounts a tmpfs",
    ) {
        return;
    }
    let (rhome, shome, src, mnt) = (Home::new(), Home::new(), tempdir(), tempdir());
    let _tmpfs = sys::Tmpfs::mount(mnt.path(), "8m").expect("tmpfs");
    let out = mnt.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let file = src.path().join("stream.bin");
    random_file(&file, 20 * MIB, 6);
    let receiver = Receiver::start(rhome.path(), &out, 0, &["--yes", "--once"]);
    let output = std::process::Command::new(BIN)
        .args(["send", "-", "--name", "big.tar", "--to", &receiver.addr()])
        .args(["--peer", &receiver.fingerprint, "--json"])
        .env("QPUNCH_HOME", shome.path())
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("the disk is full"), "{said}");
    let received = receiver.proc.finish(LONG);
    received.assert_failure();
    let why = one_error(&received, "the disk is full");
    assert!(why.contains("nothing is kept"), "{why}");
    assert_eq!(partial_bytes(&out), 0, "a stream is never kept");
    assert!(!out.join("big.tar").exists());
}

/// `chown -R` to nobody (the unprivileged user of the next test), and make the temp
/// directories above traversable.
fn give_to_nobody(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn traversable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Permission denied on each side, with the processes running as `nobody`: the receiver
/// cannot write into a folder it does not own; the sender cannot read a file it does not
/// own. One clear error each, non-zero exits, nothing delivered anywhere in `--out`.
#[test]
fn permission_denied_is_a_clear_error_on_both_sides() {
    let test = "permission_denied_is_a_clear_error_on_both_sides";
    if !sys::require_root(test, "runs qpunch as nobody") {
        return;
    }
    let as_nobody = |command: &mut std::process::Command| {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534);
    };
    let (rhome, shome, src, out) = (tempdir(), tempdir(), tempdir(), tempdir());
    for dir in [&rhome, &shome, &src, &out] {
        traversable(dir.path());
        give_to_nobody(dir.path());
    }
    let spawn_receiver = |out: &Path| {
        let args = receive_args(0, Some(out), &["--json", "--yes", "--once"]);
        let mut proc = Proc::spawn_with("receiver", rhome.path(), &args, as_nobody);
        let port = proc.wait_event("listening", SHORT)["port"]
            .as_u64()
            .unwrap() as u16;
        (proc, port)
    };
    let spawn_sender = |files: &[&Path], port: u16| {
        let to = format!("127.0.0.1:{port}");
        let mut args = vec!["send"];
        args.extend(files.iter().map(|f| s(f)));
        args.extend(["--to", &to, "--punch-timeout", "3s", "--json"]);
        Proc::spawn_with("sender", shome.path(), &args, as_nobody)
    };

    // The receiver: `photos/` already exists and belongs to root.
    let photos = src.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    random_file(&photos.join("a.bin"), 2 * MIB, 6);
    give_to_nobody(&photos);
    std::fs::create_dir(out.path().join("photos")).unwrap();
    let (receiver, port) = spawn_receiver(out.path());
    let sent = spawn_sender(&[&photos], port).finish(LONG);
    let received = receiver.finish(LONG);
    sent.assert_failure();
    received.assert_failure();
    one_error(&received, "Permission denied");
    one_error(&sent, "Permission denied");
    nothing_delivered(&sent, &received, out.path());
    assert!(partial_bytes(out.path()) >= MIB, "what arrived is kept");

    // The sender: a file only root may read.
    let secret = src.path().join("secret.bin");
    random_file(&secret, 1000, 7);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
    }
    let (mut receiver, port) = spawn_receiver(out.path());
    let sent = spawn_sender(&[&secret], port).finish(SHORT);
    sent.assert_failure();
    one_error(&sent, "Permission denied");
    let error = receiver.wait_event("error", SHORT);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("could not read its files"),
        "{error}"
    );
    let received = receiver.kill();
    nothing_delivered(&sent, &received, out.path());
}

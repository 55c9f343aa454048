//! Pipes and texts as a user runs them, over loopback: `send -` reads standard input to
//! its end, `receive --stdout` writes the one file it takes to standard output (and
//! declines an offer of two), and `send --text` is shown by the receiver, escaped unless
//! printed raw, directly and when met by code through a rendezvous.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A free UDP port on loopback (bound, then let go).
fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// `qpunch send ARGS --to 127.0.0.1:PORT --peer FP --json` with `stdin` as its standard
/// input, run to its end.
fn send_with_stdin(
    home: &Home,
    args: &[&str],
    port: u16,
    fingerprint: &str,
    stdin: Stdio,
) -> (std::process::ExitStatus, Vec<serde_json::Value>, String) {
    let to = format!("127.0.0.1:{port}");
    let mut command = Command::new(BIN);
    command
        .arg("send")
        .args(args)
        .args(["--to", &to, "--peer", fingerprint, "--json"])
        .env("QPUNCH_HOME", home.path())
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = command.spawn().unwrap().wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status, events, stderr)
}

#[test]
fn send_dash_sends_standard_input_to_its_end() {
    let (src, out) = (tempdir(), tempdir());
    let (rx_home, tx_home) = (Home::new(), Home::new());
    // Several sender chunks, not a multiple of any of them.
    let file = src.path().join("source.tar");
    random_file(&file, (3 << 20) + 4321, 11);
    let mut receiver = Receiver::start(rx_home.path(), out.path(), 0, &["--yes"]);
    let stdin = Stdio::from(std::fs::File::open(&file).unwrap());
    let args = ["-", "--name", "piped.tar"];
    let (status, events, stderr) =
        send_with_stdin(&tx_home, &args, receiver.port, &receiver.fingerprint, stdin);
    assert!(status.success(), "{events:?}\n{stderr}");
    let sent = events.iter().find(|e| e["event"] == "sent").expect("sent");
    assert_eq!(sent["bytes"], (3 << 20) + 4321, "{sent}");
    assert_eq!(sent["blake3"], blake3_file(&file).as_str());
    let received = receiver.proc.wait_event("received", SHORT);
    assert_eq!(received["saved_as"], "piped.tar", "{received}");
    assert_eq!(
        blake3_file(&out.path().join("piped.tar")),
        blake3_file(&file)
    );
    // `-` goes alone.
    let other = src.path().join("other");
    std::fs::write(&other, b"x").unwrap();
    let args = ["-", common::s(&other)];
    let (status, events, stderr) = send_with_stdin(
        &tx_home,
        &args,
        receiver.port,
        &receiver.fingerprint,
        Stdio::null(),
    );
    assert!(!status.success());
    let said = format!("{:?} {stderr}", events_of(&events));
    assert!(said.contains("sent alone"), "{said}");
    receiver.proc.interrupt(SHORT);
}

/// A receiver whose stdout is read as it comes (a pipe that is never drained would
/// stall it).
struct Draining {
    child: std::process::Child,
    reading: std::thread::JoinHandle<Vec<u8>>,
}

/// `qpunch receive FLAGS` on `port`, its stdout drained.
fn receive_draining(home: &Home, out: &std::path::Path, port: u16, flags: &[&str]) -> Draining {
    let mut child = Command::new(BIN)
        .args(receive_args(port, Some(out), flags))
        .env("QPUNCH_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).unwrap();
        all
    });
    Draining { child, reading }
}

/// `qpunch receive --stdout --yes` on `port`: its stdout is the payload.
fn receive_to_stdout(home: &Home, out: &std::path::Path, port: u16) -> Draining {
    receive_draining(home, out, port, &["--yes", "--stdout"])
}

/// Wait for the receiver to exit within `timeout` (else kill it); whether it succeeded,
/// its stdout bytes and its stderr text.
fn finish(receiver: Draining, timeout: Duration) -> (bool, Vec<u8>, String) {
    let Draining { mut child, reading } = receiver;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.success(), reading.join().unwrap(), stderr)
}

#[test]
fn receive_stdout_writes_the_one_file_and_declines_two() {
    let (src, out) = (tempdir(), tempdir());
    let (rx_home, tx_home) = (Home::new(), Home::new());
    let fingerprint = qpunch_id(rx_home.path());
    let file = src.path().join("one.bin");
    random_file(&file, (2 << 20) + 99, 12);

    // One file: its bytes, and only them, on stdout; the banner and messages on stderr.
    let port = free_port();
    let receiver = receive_to_stdout(&rx_home, out.path(), port);
    let sent = send(
        tx_home.path(),
        &[&file],
        port,
        &["--peer", &fingerprint],
        LONG,
    );
    sent.assert_success();
    let (ok, stdout, stderr) = finish(receiver, LONG);
    assert!(ok, "{stderr}");
    assert!(
        stdout == std::fs::read(&file).unwrap(),
        "stdout is the file"
    );
    assert!(stderr.contains("received one.bin"), "{stderr}");
    let stored: Vec<String> = list_dir(out.path())
        .into_iter()
        .filter(|n| n != qpunch::transfer::PARTIAL_DIR)
        .collect();
    assert_eq!(stored, Vec::<String>::new(), "nothing stored in the folder");

    // Two files: declined, both, saying why; nothing written to stdout.
    let port = free_port();
    let receiver = receive_to_stdout(&rx_home, out.path(), port);
    let two = src.path().join("two.bin");
    std::fs::write(&two, b"second").unwrap();
    let sent = send(
        tx_home.path(),
        &[&file, &two],
        port,
        &["--peer", &fingerprint],
        LONG,
    );
    sent.assert_failure();
    let declined = sent.all("declined");
    assert_eq!(declined.len(), 2, "{sent:#?}");
    for d in declined {
        let reason = d["reason"].as_str().unwrap();
        assert!(reason.contains("one file"), "{reason}");
    }
    let (_, stdout, _) = finish(receiver, Duration::from_millis(500));
    assert!(stdout.is_empty(), "{} bytes on stdout", stdout.len());
}

/// A text with a terminal escape, a bidi override, a line break and non-ASCII letters.
const HOSTILE: &str = "héllo \u{1b}[2J\u{202e}evil\nsecond line";

#[test]
fn a_text_is_shown_escaped_printed_raw_on_request_and_a_json_event() {
    let out = tempdir();
    let (rx_home, tx_home) = (Home::new(), Home::new());
    let fingerprint = qpunch_id(rx_home.path());

    // --json: the text event carries it as sent.
    let mut receiver = Receiver::start(rx_home.path(), out.path(), 0, &["--yes"]);
    let sent = Proc::spawn(
        "sender",
        tx_home.path(),
        &[
            "send",
            "--text",
            HOSTILE,
            "--to",
            &receiver.addr(),
            "--peer",
            &receiver.fingerprint,
            "--json",
        ],
    )
    .finish(LONG);
    sent.assert_success();
    assert_eq!(sent.one("sent")["bytes"], HOSTILE.len());
    let text = receiver.proc.wait_event("text", SHORT);
    assert_eq!(text["text"], HOSTILE, "{text}");
    receiver.proc.interrupt(SHORT);
    let stored: Vec<String> = list_dir(out.path())
        .into_iter()
        .filter(|n| n != qpunch::transfer::PARTIAL_DIR)
        .collect();
    assert_eq!(stored, Vec::<String>::new(), "a text is not stored");

    // Human output: on stdout, every control character escaped, line breaks kept.
    for (flags, expected) in [
        (
            vec!["--yes", "--once"],
            "héllo \\u{1b}[2J\\u{202e}evil\nsecond line\n".to_string(),
        ),
        (vec!["--yes", "--stdout"], HOSTILE.to_string()),
    ] {
        let port = free_port();
        let receiver = receive_draining(&rx_home, out.path(), port, &flags);
        // The text comes from standard input this time.
        let (status, events, stderr) = send_with_stdin(
            &tx_home,
            &["--text", "-"],
            port,
            &fingerprint,
            Stdio::from(text_file(HOSTILE)),
        );
        assert!(status.success(), "{events:?} {stderr}");
        let (ok, stdout, stderr) = finish(receiver, LONG);
        assert!(ok, "{stderr}");
        let stdout = String::from_utf8(stdout).unwrap();
        assert!(stdout.ends_with(&expected), "{flags:?}: {stdout:?}");
    }

    // Longer than a text may be: refused before anything is sent.
    let long = "x".repeat(qpunch::transfer::MAX_TEXT as usize + 1);
    let (status, events, stderr) = send_with_stdin(
        &tx_home,
        &["--text", "-"],
        free_port(),
        &fingerprint,
        Stdio::from(text_file(&long)),
    );
    assert!(!status.success());
    let said = format!("{:?} {stderr}", events_of(&events));
    assert!(said.contains("send it as a file"), "{said}");
}

/// The messages of a run's `error` events.
fn events_of(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "error")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A file holding `text`, opened for reading (a stand-in for a pipe).
fn text_file(text: &str) -> std::fs::File {
    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    std::io::Seek::rewind(&mut file).unwrap();
    file
}

#[test]
fn a_text_and_a_pipe_met_by_code_through_a_rendezvous() {
    let (rv_home, rx_home, tx_home) = (Home::new(), Home::new(), Home::new());
    let out = tempdir();
    let (rendezvous, _, via) = rendezvous_anywhere(&rv_home);
    let (mut receiver, code) = receive_by_code(&rx_home, out.path(), &via, &[]);
    let sent = Proc::spawn(
        "sender",
        tx_home.path(),
        &[
            "send", "--text", HOSTILE, "--to", &code, "--via", &via, "--json",
        ],
    )
    .finish(LONG);
    sent.assert_success();
    let text = receiver.wait_event("text", SHORT);
    assert_eq!(text["text"], HOSTILE);

    receiver.interrupt(SHORT);

    // A pipe, met by another code.
    let (mut receiver, code) = receive_by_code(&rx_home, out.path(), &via, &[]);
    let data: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i % 251) as u8).collect();
    let mut source = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut source, &data).unwrap();
    std::io::Seek::rewind(&mut source).unwrap();
    let output = Command::new(BIN)
        .args([
            "send",
            "-",
            "--name",
            "piped.bin",
            "--to",
            &code,
            "--via",
            &via,
        ])
        .arg("--json")
        .env("QPUNCH_HOME", tx_home.path())
        .stdin(Stdio::from(source))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let received = receiver.wait_event("received", LONG);
    assert_eq!(received["saved_as"], "piped.bin");
    assert!(std::fs::read(out.path().join("piped.bin")).unwrap() == data);
    receiver.interrupt(SHORT);
    rendezvous.interrupt(SHORT);
}

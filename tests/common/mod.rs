//! Helpers shared by the integration tests: temporary homes, `qpunch` child processes
//! whose `--json` stdout is read line by line on a thread (so every wait has a deadline),
//! and file utilities (seeded random files, BLAKE3 of files on disk, directory listings).
//!
//! Every child process is owned by a [`Proc`], which kills and reaps it when dropped, so
//! a failing (panicking) test never leaves a receiver running.
//!
//! Submodules: [`peer`] (hostile peers speaking the transfer protocol by hand), [`pty`]
//! (a `qpunch` on a pseudo-terminal, to answer its prompts), [`seed`] (the seed's Go
//! program), [`sys`] (what the kernel says about a process; root-only set-up; skipping).
//!
//! Every test file is its own crate and compiles this whole tree with `mod common;`, but
//! each uses a different part of it: `dead_code` is allowed here, once for the tree,
//! rather than on every item some test file does not use.
#![allow(dead_code)]

pub mod peer;
pub mod pty;
pub mod rendezvous;
pub mod seed;
pub mod sys;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_qpunch");
/// Bound for steps that move little data (start-up, handshakes, small files).
pub const SHORT: Duration = Duration::from_secs(30);
/// Bound for steps that move 64 MiB (debug build of qpunch, parallel tests).
pub const LONG: Duration = Duration::from_secs(180);
/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qpunch-test-")
        .tempdir()
        .expect("create temp dir")
}

/// A `QPUNCH_HOME` for one process role. The directory itself does not exist yet:
/// qpunch creates it (mode 0700) on first use.
pub struct Home {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Home {
    pub fn new() -> Self {
        let dir = tempdir();
        let path = dir.path().join("qpunch-home");
        Home { _dir: dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A path as `&str` (temp paths are UTF-8), for building argument lists.
pub fn s(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// One line of a child's stdout.
enum Line {
    Json(Value),
    Text(String),
}

/// A running `qpunch` process: stdout parsed into JSON events on a reader thread,
/// stderr collected on another. Killed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Line>,
    /// Every JSON event read so far, in order.
    pub events: Vec<Value>,
    /// Every stdout line that was not JSON.
    pub text: Vec<String>,
    stderr: Arc<Mutex<String>>,
    /// Disconnects when the stderr reader has read everything (the pipe closed).
    stderr_done: mpsc::Receiver<()>,
}

impl Proc {
    /// Start `qpunch ARGS...` with `QPUNCH_HOME=home`, stdin from /dev/null (not a TTY).
    pub fn spawn(name: &str, home: &Path, args: &[impl AsRef<OsStr>]) -> Self {
        Self::spawn_with(name, home, args, |_| {})
    }

    /// Like [`Proc::spawn`], with `configure` adjusting the command first (environment,
    /// working directory).
    pub fn spawn_with(
        name: &str,
        home: &Path,
        args: &[impl AsRef<OsStr>],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("QPUNCH_HOME", home)
            .env_remove("RUST_LOG");
        configure(&mut command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => Line::Json(v),
                    _ => Line::Text(line),
                };
                if tx.send(parsed).is_err() {
                    break;
                }
            }
            // Dropping `tx` tells the reader that stdout is closed.
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (done, stderr_done) = mpsc::channel::<()>();
        {
            let stderr = stderr.clone();
            thread::spawn(move || {
                let _done = done;
                for line in BufReader::new(stderr_pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut all = stderr.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            lines,
            events: Vec::new(),
            text: Vec::new(),
            stderr,
            stderr_done,
        }
    }

    /// The process id (for messages).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything known so far, for assertion messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "[{}] events: {:#?}\nnon-JSON stdout: {:?}\nstderr:\n{}",
            self.name,
            self.events,
            self.text,
            self.stderr.lock().unwrap()
        )
    }

    /// The next JSON event, `None` once stdout is closed. Panics at `deadline`.
    fn next_event(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Json(v)) => {
                    self.events.push(v.clone());
                    return Some(v);
                }
                Ok(Line::Text(t)) => self.text.push(t),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out waiting for output\n{}", self.diagnostics())
                }
            }
        }
    }

    /// Wait for the next event of kind `kind` (other events are recorded and skipped).
    pub fn wait_event(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_event(deadline) {
                Some(v) if v["event"] == kind => return v,
                Some(_) => {}
                None => panic!(
                    "stdout closed before a {kind:?} event\n{}",
                    self.diagnostics()
                ),
            }
        }
    }

    /// Wait for a non-JSON stdout line satisfying `wanted` (lines read before are also
    /// searched) and return it. Panics at `timeout`.
    pub fn wait_text(&mut self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> String {
        if let Some(line) = self.text.iter().find(|l| wanted(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Json(v)) => self.events.push(v),
                Ok(Line::Text(t)) => {
                    self.text.push(t.clone());
                    if wanted(&t) {
                        return t;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "stdout closed before the expected line\n{}",
                        self.diagnostics()
                    )
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out waiting for a line\n{}", self.diagnostics())
                }
            }
        }
    }

    /// Wait until stderr holds a line satisfying `wanted` (lines read before count too) and
    /// return it. Panics at `timeout`.
    pub fn wait_stderr(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stderr.lock().unwrap().lines().find(|l| wanted(l)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a line on stderr\n{}",
                self.diagnostics()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send signal `signal` (e.g. `libc::SIGINT`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped yet (it is
        // reaped only by `finish`, `kill` or `Drop`, which take or drop `self`).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Whether an event of kind `kind` was already read.
    pub fn seen(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e["event"] == kind)
    }

    /// Read stdout to its end and wait for the exit status, all within `timeout`
    /// (the process is killed by `Drop` if that fails).
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        while self.next_event(deadline).is_some() {}
        // stdout is closed, so the process is exiting: wait for its status.
        let status = loop {
            match self.child.try_wait().expect("try_wait") {
                Some(status) => break status,
                None if Instant::now() >= deadline => panic!(
                    "closed stdout but did not exit in time\n{}",
                    self.diagnostics()
                ),
                None => thread::sleep(Duration::from_millis(5)),
            }
        };
        self.into_finished(status)
    }

    /// Whether the process is still running. It does not reap the process (`WNOWAIT`): its
    /// pid stays ours until [`Proc::finish`], [`Proc::kill`] or drop, so signals sent to it
    /// in the meantime (see [`Proc::signal`]) cannot reach a process that reused the pid.
    pub fn running(&self) -> bool {
        // SAFETY: waitid(2) on our own child with a zeroed siginfo it fills in; WNOWAIT
        // leaves the child waitable, so `Child` still reaps it later.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        assert_eq!(rc, 0, "waitid({})", self.child.id());
        // With WNOHANG, si_pid stays 0 while the child has not exited.
        // SAFETY: siginfo_t filled in (or left zeroed) by waitid.
        unsafe { info.si_pid() == 0 }
    }

    /// Send SIGINT (as Ctrl-C would), then collect what it printed until it exits.
    pub fn interrupt(self, timeout: Duration) -> Finished {
        // SAFETY: a plain syscall on a child we own and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        self.finish(timeout)
    }

    /// Kill the process (if still running) and collect what it printed.
    pub fn kill(mut self) -> Finished {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait after kill");
        let deadline = Instant::now() + SHORT;
        while self.next_event(deadline).is_some() {}
        self.into_finished(status)
    }

    fn into_finished(mut self, status: ExitStatus) -> Finished {
        // The process has exited, so its stderr pipe closes: wait for the reader to
        // take everything (bounded, in case something else still holds the pipe).
        let _ = self.stderr_done.recv_timeout(SHORT);
        let stderr = std::mem::take(&mut *self.stderr.lock().unwrap());
        Finished {
            name: self.name.clone(),
            status,
            events: std::mem::take(&mut self.events),
            text: std::mem::take(&mut self.text),
            stderr,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What a finished process printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub name: String,
    pub status: ExitStatus,
    pub events: Vec<Value>,
    pub text: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Every event of kind `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }

    /// The single event of kind `kind` (panics if there is not exactly one).
    pub fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "exactly one {kind:?} event\n{self:#?}");
        found[0]
    }

    /// All `error` messages plus stderr: where a refusal is explained.
    pub fn messages(&self) -> String {
        let mut out: Vec<&str> = self.error_messages();
        out.push(&self.stderr);
        out.join("\n")
    }

    /// The message of every `error` event, in order.
    pub fn error_messages(&self) -> Vec<&str> {
        self.all("error")
            .iter()
            .map(|e| e["message"].as_str().unwrap_or_default())
            .collect()
    }

    /// Exit 0, and stdout held nothing but JSON lines.
    pub fn assert_success(&self) {
        assert!(self.status.success(), "expected success\n{self:#?}");
        self.assert_json_only();
    }

    /// Non-zero exit, and stdout held nothing but JSON lines.
    pub fn assert_failure(&self) {
        assert!(!self.status.success(), "expected failure\n{self:#?}");
        self.assert_json_only();
    }

    pub fn assert_json_only(&self) {
        assert!(
            self.text.is_empty(),
            "non-JSON lines on stdout in --json mode\n{self:#?}"
        );
    }
}

/// A running `qpunch receive --json` that has announced itself.
pub struct Receiver {
    pub proc: Proc,
    pub port: u16,
    pub fingerprint: String,
}

impl Receiver {
    /// `qpunch receive --bind 127.0.0.1 --port PORT --out OUT --json EXTRA...`, waiting
    /// for its `listening` event. `port` 0 picks a free port.
    pub fn start(home: &Path, out: &Path, port: u16, extra: &[&str]) -> Self {
        let mut json = vec!["--json"];
        json.extend_from_slice(extra);
        let mut proc = Proc::spawn("receiver", home, &receive_args(port, Some(out), &json));
        let listening = proc.wait_event("listening", SHORT);
        let bound = listening["port"].as_u64().expect("listening.port") as u16;
        assert_ne!(bound, 0, "{}", proc.diagnostics());
        if port != 0 {
            assert_eq!(bound, port, "{}", proc.diagnostics());
        }
        let addrs = listening["addrs"].as_array().expect("listening.addrs");
        assert!(
            addrs.contains(&Value::from(format!("127.0.0.1:{bound}"))),
            "listening.addrs names the bound address: {listening}"
        );
        let fingerprint = listening["fingerprint"]
            .as_str()
            .expect("listening.fingerprint")
            .to_string();
        assert_fingerprint(&fingerprint);
        Receiver {
            proc,
            port: bound,
            fingerprint,
        }
    }

    /// `127.0.0.1:PORT`, for `--to`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The arguments of every test receiver: `receive --bind 127.0.0.1 --port PORT`
/// (0: any free port), `--out OUT` unless `out` is `None` (the default folder), then
/// `extra` (`--json`, policy flags, ...).
pub fn receive_args(port: u16, out: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["receive", "--bind", "127.0.0.1", "--port"]
        .map(String::from)
        .into();
    args.push(port.to_string());
    if let Some(out) = out {
        args.extend(["--out".to_string(), s(out).to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// A free UDP port on 127.0.0.1 whose successor is free too (a rendezvous binds both).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        // The rendezvous also listens on TCP at the first port's number.
        if port < u16::MAX
            && std::net::UdpSocket::bind(("127.0.0.1", port + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free pair of UDP ports");
}

/// Start `qpunch send FILES... --to 127.0.0.1:PORT --punch-timeout 3s --json EXTRA...`.
pub fn spawn_send(home: &Path, files: &[&Path], port: u16, extra: &[&str]) -> Proc {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send"];
    args.extend(files.iter().map(|f| s(f)));
    args.extend_from_slice(&["--to", &to, "--punch-timeout", "3s", "--json"]);
    args.extend_from_slice(extra);
    Proc::spawn("sender", home, &args)
}

/// Run a sender to completion within `timeout`.
pub fn send(
    home: &Path,
    files: &[&Path],
    port: u16,
    extra: &[&str],
    timeout: Duration,
) -> Finished {
    spawn_send(home, files, port, extra).finish(timeout)
}

/// `qpunch id` with `QPUNCH_HOME=home`: the fingerprint printed alone on stdout.
pub fn qpunch_id(home: &Path) -> String {
    let finished = Proc::spawn("id", home, &["id"]).finish(SHORT);
    assert!(finished.status.success(), "{finished:#?}");
    assert!(finished.events.is_empty(), "{finished:#?}");
    assert_eq!(finished.text.len(), 1, "one line on stdout: {finished:#?}");
    let fp = finished.text[0].clone();
    assert_fingerprint(&fp);
    fp
}

/// 32 lowercase base32 characters.
pub fn assert_fingerprint(fp: &str) {
    assert_eq!(fp.len(), 32, "fingerprint {fp:?}");
    assert!(
        fp.bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)),
        "fingerprint {fp:?} is lowercase base32"
    );
}

/// Write `size` pseudo-random bytes derived from `seed` to `path`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::fs::File::create(path).expect("create random file");
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    file.sync_all().expect("sync random file");
}

/// BLAKE3 of a file on disk, lowercase hex.
pub fn blake3_file(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).expect("read for hashing");
    hasher.finalize().to_hex().to_string()
}

/// Names of the entries of a receiver's directory. The receiver's private partial
/// directory is not listed itself, but anything left inside it is, as
/// `.qpunch-partial/NAME`, so "nothing left behind" covers partial files too.
pub fn list_dir(dir: &Path) -> BTreeSet<String> {
    let read = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
            .map(|entry| {
                entry
                    .expect("dir entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8 name")
            })
            .collect()
    };
    let partial = qpunch::transfer::PARTIAL_DIR;
    let mut names = BTreeSet::new();
    for name in read(dir) {
        if name == partial {
            names.extend(
                read(&dir.join(partial))
                    .into_iter()
                    .map(|inner| format!("{partial}/{inner}")),
            );
        } else {
            names.insert(name);
        }
    }
    names
}

/// `code` with its second word replaced by another from the same list: the same nameplate,
/// the wrong secret (what a guesser, or a typo, tries).
pub fn wrong_code(code: &qpunch::meet::code::Code) -> qpunch::meet::code::Code {
    use qpunch::meet::code::{EVEN_WORDS, ODD_WORDS};
    let [first, second] = code.words();
    let list = if EVEN_WORDS.contains(&second) {
        &EVEN_WORDS
    } else {
        &ODD_WORDS
    };
    let other = list.iter().find(|w| **w != second).expect("another word");
    format!("{}-{first}-{other}", code.nameplate())
        .parse()
        .expect("a well-formed code")
}

/// A set of names, for comparing with [`list_dir`].
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

/// Connect from `node` to `receiver` (pinned) and offer `file`: the receiver must refuse
/// the sender as not allowed (no ticket, not on a list) and take nothing.
pub async fn assert_sender_refused(
    node: &qpunch::node::Node,
    receiver: &qpunch::node::Node,
    file: &Path,
) {
    let to = receiver.local_addr().expect("receiver address");
    let peer = node
        .connect(to, Some(receiver.fingerprint()))
        .await
        .expect("connect to the receiver");
    let refused = qpunch::transfer::send_files(
        &peer.connection,
        vec![qpunch::transfer::Outgoing::from_path(file).expect("file to offer")],
        Arc::new(qpunch::transfer::Quiet),
    )
    .await;
    assert!(
        matches!(refused, Err(qpunch::transfer::TransferError::NotAllowed(_))),
        "{refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Meeting by code through a rendezvous on loopback
// ---------------------------------------------------------------------------------------

/// A `qpunch rendezvous` on 127.0.0.1 (port `port`, and `port + 1` for NAT checks).
pub fn rendezvous(home: &Home, port: u16) -> Proc {
    let port = port.to_string();
    let mut proc = Proc::spawn(
        "rendezvous",
        home.path(),
        &[
            "rendezvous",
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--json",
        ],
    );
    proc.wait_event("rendezvous", SHORT);
    proc
}

/// A `qpunch rendezvous` on free ports of 127.0.0.1: it, its port, and its `--via`.
pub fn rendezvous_anywhere(home: &Home) -> (Proc, u16, String) {
    let port = free_port_pair();
    (rendezvous(home, port), port, format!("127.0.0.1:{port}"))
}

/// `receive --via` with `extra` flags; returns it and its first code.
pub fn receive_by_code(
    home: &Home,
    out: &std::path::Path,
    via: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut flags = vec!["--via", via, "--json"];
    flags.extend_from_slice(extra);
    let mut proc = Proc::spawn("receiver", home.path(), &receive_args(0, Some(out), &flags));
    let code = next_code(&mut proc);
    (proc, code)
}

/// The next `listening` event that carries a code.
pub fn next_code(proc: &mut Proc) -> String {
    loop {
        let listening = proc.wait_event("listening", SHORT);
        if let Some(code) = listening["code"].as_str() {
            return code.to_string();
        }
    }
}

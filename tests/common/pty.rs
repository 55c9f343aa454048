//! `qpunch` on a pseudo terminal, for the consent prompt: stdin, stdout and stderr are
//! the slave side, the test reads and types on the master side.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::BIN;

/// The consent prompt's question.
pub const PROMPT: &str = "Accept? [y/N]";

/// A `qpunch` process on a pseudo terminal. Killed and reaped on drop.
pub struct PtyProc {
    child: Child,
    master: File,
    output: Arc<Mutex<String>>,
}

fn cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

impl PtyProc {
    /// Start `qpunch ARGS...` with `QPUNCH_HOME=home` on a fresh pseudo terminal.
    pub fn spawn(home: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Self {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the provided ints; the name,
        // termios and window-size pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded, so both are open descriptors owned by nobody else.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // Other tests spawn children concurrently: they must not inherit our pty.
        cloexec(&master);
        cloexec(&slave);
        let child = Command::new(BIN)
            .args(args)
            .env("QPUNCH_HOME", home)
            .env_remove("RUST_LOG")
            .stdin(slave.try_clone().expect("dup slave"))
            .stdout(slave.try_clone().expect("dup slave"))
            .stderr(slave)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        // The Command (and with it our copies of the slave) is gone: once the child
        // exits, reading the master fails and the reader thread ends.
        let master = File::from(master);
        let output = Arc::new(Mutex::new(String::new()));
        {
            let mut reader = master.try_clone().expect("dup master");
            let output = output.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        PtyProc {
            child,
            master,
            output,
        }
    }

    /// Everything the terminal showed so far.
    pub fn transcript(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// How many times `needle` appeared on the terminal.
    pub fn count(&self, needle: &str) -> usize {
        self.transcript().matches(needle).count()
    }

    /// Wait until `needle` has appeared `times` times. Panics at `timeout`.
    pub fn wait_for(&self, needle: &str, times: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(needle) < times {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} x{times} on the terminal\n{}",
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Type `text` (e.g. `"y\n"`).
    pub fn type_text(&mut self, text: &str) {
        self.master
            .write_all(text.as_bytes())
            .expect("write to pty");
        self.master.flush().expect("flush pty");
    }

    /// The `--json` events shown so far (JSON lines among the terminal output).
    pub fn events(&self) -> Vec<Value> {
        self.transcript()
            .lines()
            .filter_map(|line| {
                let line = line.trim_matches(|c| c == '\r' || c == '\n');
                let start = line.find('{')?;
                serde_json::from_str::<Value>(&line[start..]).ok()
            })
            .filter(Value::is_object)
            .collect()
    }

    /// Wait for at least `n` events of kind `kind` and return them.
    pub fn wait_events(&self, kind: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self
                .events()
                .into_iter()
                .filter(|e| e["event"] == kind)
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} {kind:?} event(s) on the terminal\n{}",
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for PtyProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

//! The seed's own Go program (`tests/seed/main.go`), built for interop tests.
//!
//! It is built offline with the local toolchain only (stdlib, no module download, no
//! toolchain switch, no cgo), with its build cache in a temporary directory, so a test
//! run leaves nothing behind. Without `go` on PATH the tests that need it print a loud
//! SKIPPED, except under CI (the `CI` variable), where `.ci/run` installs Go and a
//! missing toolchain is an error.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A built copy of the Go program; the directory is removed on drop.
pub struct GoSeed {
    _dir: tempfile::TempDir,
    bin: PathBuf,
}

impl GoSeed {
    /// The executable: `seed [-port N]` serves, `seed [-port N] HOST` is the client.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Start the program with `args`; its stdout and stderr are collected on threads.
    pub fn spawn(&self, args: &[&str]) -> GoProc {
        self.spawn_with(Command::new(&self.bin).args(args))
    }

    /// Start a prepared command (e.g. wrapped in `ip netns exec`) that runs the program.
    pub fn spawn_with(&self, cmd: &mut Command) -> GoProc {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        let mut readers = Vec::new();
        for mut pipe in pipes {
            let output = output.clone();
            readers.push(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // Bytes, not lines: the Go server echoes whatever it receives, QUIC
                // packets included, and a read may end inside a UTF-8 character.
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        GoProc {
            shown,
            child,
            output,
            readers,
        }
    }
}

/// A running instance of the Go program. Killed and reaped on drop.
pub struct GoProc {
    shown: String,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl GoProc {
    /// Everything it printed so far (stdout and stderr, interleaved as they came).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Wait until the output contains `text`; panics with the output at `timeout`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        self.wait_for_any(&[text], timeout);
    }

    /// Wait until the output contains one of `texts`; returns the index of the first
    /// found. Panics with the output at `timeout`.
    pub fn wait_for_any(&mut self, texts: &[&str], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.output();
            if let Some(i) = texts.iter().position(|t| output.contains(t)) {
                return i;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: none of {texts:?} within {timeout:?}; exit: {:?}; output:\n{output}",
                    self.shown,
                    self.child.try_wait(),
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for it to exit; panics (and kills it, on drop) at `timeout`. Returns the
    /// status and all it printed.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: still running after {timeout:?}; output:\n{}",
                    self.shown,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The pipes close at exit: the readers finish with the last bytes.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        (status, self.output())
    }
}

impl Drop for GoProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `go` on PATH.
fn go_tool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("go"))
        .find(|p| p.is_file())
}

/// Build the Go program, or return `None` after a loud SKIPPED line when there is no
/// `go` (panics instead when `CI` is set).
pub fn build(test: &str) -> Option<GoSeed> {
    let Some(go) = go_tool() else {
        super::sys::skip(test, "needs the Go toolchain: `go` is not on PATH");
        return None;
    };
    let dir = tempfile::Builder::new()
        .prefix("qpunch-go-seed-")
        .tempdir()
        .expect("temp dir for the Go build");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/main.go");
    let bin = dir.path().join("seed");
    let out = Command::new(&go)
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&source)
        // Outside any module, with everything Go writes kept in the temp dir.
        .current_dir(dir.path())
        .env("GOCACHE", dir.path().join("cache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOENV", "off")
        .env("CGO_ENABLED", "0")
        .env_remove("GOFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", go.display()));
    assert!(
        out.status.success(),
        "go build {} failed ({}):\n{}{}",
        source.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(GoSeed { _dir: dir, bin })
}

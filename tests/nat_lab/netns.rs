//! Network namespaces for the lab: creating and deleting them, running `ip`/`nft`/`tc`
//! inside them, and running *this process's own code* inside them ([`in_netns`]).
//!
//! A network namespace is a property of a thread, not of a socket's owner: a thread that
//! entered a namespace (`setns` on an fd of `/run/netns/NAME`) creates its sockets and TAP
//! devices there, and they stay there when handed to any other thread. So a test binds its
//! std or tokio sockets (or runs a whole `qpunch` node) inside a namespace without
//! spawning a process, and drives them from its own threads afterwards.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Serializes namespace creation and deletion: the first `ip netns add` sets up the
/// shared /run/netns mount, which must not race.
static SETUP: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process (for namespace and probe names).
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Find a tool on PATH (and in the sbin directories, which a PATH may lack).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A tool's path; panics when it is missing (after [`require`] said it is there).
pub fn tool_path(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| panic!("{name} not found"))
}

/// Effective uid from /proc.
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Check that this test can build a lab: root, the tools, and namespaces actually work.
/// Returns `false` (after a loud message) when the test should be skipped; panics instead
/// when the `CI` environment variable is set, because CI must run these tests.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let reason = (|| {
        if euid() != Some(0) {
            return Some("not running as root".to_string());
        }
        let missing: Vec<&str> = ["ip", "nft"]
            .iter()
            .chain(tools)
            .copied()
            .filter(|t| tool(t).is_none())
            .collect();
        if !missing.is_empty() {
            return Some(format!("missing tools: {}", missing.join(", ")));
        }
        // Root in a container without CAP_NET_ADMIN/CAP_SYS_ADMIN cannot make namespaces.
        let probe = format!("qpk{}p{}", std::process::id(), next_id());
        let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new(tool_path("ip"))
            .args(["netns", "add", &probe])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let _ = Command::new(tool_path("ip"))
                    .args(["netns", "del", &probe])
                    .output();
                None
            }
            Ok(o) => Some(format!(
                "cannot create a network namespace: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run ip: {e}")),
        }
    })();
    let Some(reason) = reason else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: CI is set, so the NAT lab must run, but: {reason}");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and
    // a skip must be visible in a normal `cargo test` run.
    let stars = "*".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "\n{stars}\n{test}: SKIPPED (needs root + nftables/iproute2/conntrack): {reason}\n{stars}"
    );
    false
}

/// Run a command to completion; panic with its output when it fails.
pub fn run<I, S>(program: impl AsRef<OsStr>, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_stdin(program, args, None)
}

/// [`run`] with `stdin` written to the command's standard input.
pub fn run_stdin<I, S>(program: impl AsRef<OsStr>, args: I, stdin: Option<&str>) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program.as_ref());
    cmd.args(args);
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        panic!(
            "{shown} failed ({}):\n{}{}{}",
            out.status,
            stdin.map(|s| format!("stdin:\n{s}\n")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// `ip -n NS ARGS...` (arguments split on whitespace).
pub fn ip(ns: &str, args: &str) {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    run(tool_path("ip"), all);
}

/// Many `ip` commands in one process: `ip -n NS -batch -`, one command per line. Stops
/// (and panics) at the first failing line.
pub fn ip_batch(ns: &str, commands: &[String]) {
    if commands.is_empty() {
        return;
    }
    let script = commands.join("\n") + "\n";
    run_stdin(tool_path("ip"), ["-n", ns, "-batch", "-"], Some(&script));
}

/// Run a program inside a namespace and return its output (panics on failure).
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Output {
    let mut all = vec!["netns".to_string(), "exec".into(), ns.into()];
    all.push(tool(program).map_or(program.into(), |p| p.display().to_string()));
    all.extend(args.iter().map(|a| a.to_string()));
    run(tool_path("ip"), all)
}

/// Apply an nft script (one transaction) inside a namespace.
pub fn nft(ns: &str, script: &str) {
    let args = [
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        tool_path("nft").display().to_string(),
        "-f".into(),
        "-".into(),
    ];
    run_stdin(tool_path("ip"), args, Some(script));
}

/// Set sysctls (`net.ipv4.ip_forward` style keys) inside a namespace. `/proc/sys/net`
/// shows the namespace of the *thread* that opens it, so this needs no process.
pub fn sysctl(ns: &str, settings: &[(&str, &str)]) {
    in_netns(ns, || {
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("{ns}: sysctl {key}={value}: {e}"));
        }
    });
}

/// Read one sysctl inside a namespace.
pub fn sysctl_get(ns: &str, key: &str) -> String {
    in_netns(ns, || {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{ns}: {key}: {e}"));
        value.trim().to_string()
    })
}

/// Move the calling thread into namespace `ns` for good.
fn enter(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let handle = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a valid namespace descriptor; it changes only the calling thread,
    // which our callers own (a thread made for the purpose).
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Run `f` on a fresh thread that entered namespace `ns`, and return its result (a panic
/// in `f` resumes in the caller). Sockets, TAP devices and whole `qpunch` nodes created in
/// `f` live in `ns`; they can be returned and used from any thread. `f` may borrow.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns {ns}"))
            .spawn_scoped(scope, || {
                enter(ns);
                f()
            })
            .expect("spawn a thread");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// [`in_netns`] in the background: `f` runs on its own thread inside `ns` until it
/// returns (e.g. a server loop); join the handle for its result.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let name = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns {ns}"))
        .spawn(move || {
            enter(&name);
            f()
        })
        .expect("spawn a thread")
}

/// Run async code inside `ns`: a current-thread tokio runtime on a thread in the
/// namespace, so every socket the future creates (also deep inside library code such as
/// `node::punch_and_hand_over`) is bound there. Tasks it spawns run on that thread too.
pub fn block_on_in_netns<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
{
    in_netns(ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
}

/// Bind a UDP socket (tuned like qpunch's own, see `qpunch::socket::bind`) inside `ns`.
pub fn bind_udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    in_netns(ns, || qpunch::socket::bind(addr)).unwrap_or_else(|e| panic!("{ns}: {e}"))
}

/// A set of namespaces with unique names; dropping it kills whatever still runs inside
/// and deletes them (also when the test panics).
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Create `{prefix}-{role}` for every role.
    pub fn create(prefix: &str, roles: &[String]) -> Namespaces {
        let mut set = Namespaces { names: Vec::new() };
        let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        for role in roles {
            let ns = format!("{prefix}-{role}");
            // A leftover from a crashed run with the same pid would break `add`.
            let _ = Command::new(tool_path("ip"))
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            run(tool_path("ip"), ["netns", "add", &ns]);
            set.names.push(ns);
        }
        set
    }

    /// Every namespace, in creation order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let ip = tool_path("ip");
        let me = std::process::id().to_string();
        for ns in &self.names {
            // Whatever still runs in our namespaces was started by this test: end it.
            if let Ok(out) = Command::new(&ip).args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if pid != me {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
            }
        }
        for ns in self.names.iter().rev() {
            let ok = Command::new(&ip)
                .args(["netns", "del", ns])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("warning: could not delete namespace {ns}");
            }
        }
    }
}

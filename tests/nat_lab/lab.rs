//! A throw-away network of Linux namespaces with a netfilter NAT router, for end-to-end
//! tests of `qpunch` through real NATs.
//!
//! ```text
//!   {p}-pub  eth0 198.51.100.10/24 ──┐
//!                                    ├── br0 in {p}-inet ("the internet", 198.51.100.0/24)
//!   {p}-rtr  wan0 198.51.100.1/24 ───┘
//!            lan0 10.0.1.1/24 ──────── eth0 10.0.1.2/24 in {p}-cli (default route via .1)
//! ```
//!
//! The router masquerades on wan0, forwards lan→wan and only established/related wan→lan,
//! and drops new inbound connections addressed to itself (like a home router; otherwise an
//! unsolicited probe would create a conntrack entry that makes the router re-map the
//! client's flow to another port). Nothing here ever routes outside the lab's namespaces.
//!
//! Every namespace name carries a unique prefix (pid + counter), so tests can run in
//! parallel threads; [`Lab`]'s `Drop` kills what runs inside and deletes the namespaces,
//! also when the test panics. [`Proc`] kills its child on drop.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The public receiver host.
pub const PUBLIC_IP: &str = "198.51.100.10";
/// The router's WAN (the NAT's public address).
pub const ROUTER_WAN_IP: &str = "198.51.100.1";
/// The router's LAN side.
pub const ROUTER_LAN_IP: &str = "10.0.1.1";
/// The client behind the NAT.
pub const CLIENT_IP: &str = "10.0.1.2";

/// Serializes namespace creation and deletion: the first `ip netns add` sets up the
/// shared /run/netns mount, which must not race.
static SETUP: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Find a tool on PATH (and in the sbin directories, which a PATH may lack).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tool_path(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| panic!("{name} not found"))
}

/// Effective uid from /proc (no libc dependency).
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

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Run a command to completion; panic with its output when it fails.
pub fn run<I, S>(program: impl AsRef<OsStr>, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_stdin(program, args, None)
}

fn run_stdin<I, S>(program: impl AsRef<OsStr>, args: I, stdin: Option<&str>) -> Output
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

/// How the router maps ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Plain `masquerade`: keeps the source port, one mapping per local socket
    /// (endpoint-independent mapping), port-restricted filtering.
    Cone,
    /// `masquerade fully-random`: a new random port for every destination (symmetric).
    Symmetric,
}

impl Nat {
    fn rule(self) -> &'static str {
        match self {
            Nat::Cone => "oifname \"wan0\" masquerade",
            Nat::Symmetric => "oifname \"wan0\" masquerade fully-random",
        }
    }
}

/// The namespaces of one test. Dropping it tears everything down.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// Build the topology with a router of the given kind. `tag` (a few letters) makes
    /// names readable in `ip netns list` when a test is being debugged.
    pub fn new(tag: &str, nat: Nat) -> Lab {
        let prefix = format!("qp{}{}{}", std::process::id(), tag, next_id());
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
        };
        {
            let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
            for role in ["inet", "pub", "rtr", "cli"] {
                let ns = lab.name(role);
                // A leftover from a crashed run with the same pid would break `add`.
                let _ = Command::new(tool_path("ip"))
                    .args(["netns", "del", &ns])
                    .stderr(Stdio::null())
                    .status();
                run(tool_path("ip"), ["netns", "add", &ns]);
                lab.namespaces.push(ns);
            }
        }
        lab.build(nat);
        lab
    }

    fn name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn inet(&self) -> String {
        self.name("inet")
    }
    pub fn public(&self) -> String {
        self.name("pub")
    }
    pub fn router(&self) -> String {
        self.name("rtr")
    }
    pub fn client(&self) -> String {
        self.name("cli")
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, ns: &str, args: &str) {
        let mut all = vec!["-n", ns];
        all.extend(args.split_whitespace());
        run(tool_path("ip"), all);
    }

    /// Run a program inside a namespace and return its output (panics on failure).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns".to_string(), "exec".into(), ns.into()];
        all.push(tool(program).map_or(program.into(), |p| p.display().to_string()));
        all.extend(args.iter().map(|a| a.to_string()));
        run(tool_path("ip"), all)
    }

    /// Apply an nft script (one transaction) inside a namespace.
    pub fn nft(&self, ns: &str, script: &str) {
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

    fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.exec(ns, "sh", &["-c", &format!("echo {value} > {path}")]);
    }

    fn build(&self, nat: Nat) {
        let (inet, public, router, client) =
            (self.inet(), self.public(), self.router(), self.client());
        for ns in &self.namespaces {
            self.ip(ns, "link set lo up");
        }
        // The internet: one bridge, the public host and the router's WAN port on it.
        self.ip(&inet, "link add br0 type bridge");
        self.ip(&inet, "link set br0 up");
        self.ip(
            &inet,
            &format!("link add pub type veth peer name eth0 netns {public}"),
        );
        self.ip(
            &inet,
            &format!("link add rtr type veth peer name wan0 netns {router}"),
        );
        for port in ["pub", "rtr"] {
            self.ip(&inet, &format!("link set {port} master br0"));
            self.ip(&inet, &format!("link set {port} up"));
        }
        self.ip(&public, &format!("addr add {PUBLIC_IP}/24 dev eth0"));
        self.ip(&public, "link set eth0 up");

        // The router: WAN on the bridge, LAN to the client.
        self.ip(&router, &format!("addr add {ROUTER_WAN_IP}/24 dev wan0"));
        self.ip(&router, "link set wan0 up");
        self.ip(
            &router,
            &format!("link add lan0 type veth peer name eth0 netns {client}"),
        );
        self.ip(&router, &format!("addr add {ROUTER_LAN_IP}/24 dev lan0"));
        self.ip(&router, "link set lan0 up");
        self.sysctl(&router, "net.ipv4.ip_forward", "1");

        self.ip(&client, &format!("addr add {CLIENT_IP}/24 dev eth0"));
        self.ip(&client, "link set eth0 up");
        self.ip(&client, &format!("route add default via {ROUTER_LAN_IP}"));

        self.nft(
            &router,
            &format!(
                r#"
table ip natlab {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {rule}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" oifname "lan0" ct state established,related accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new drop
    }}
}}
"#,
                rule = nat.rule()
            ),
        );
    }

    /// Replace the router's masquerade rule (atomically).
    pub fn set_nat(&self, nat: Nat) {
        self.nft(
            &self.router(),
            &format!(
                "flush chain ip natlab postrouting\nadd rule ip natlab postrouting {}\n",
                nat.rule()
            ),
        );
    }

    /// Drop `percent` % of the packets crossing the router's WAN side, each direction.
    /// Table `ip natloss` counts, in order: packets in, packets out, dropped in, dropped
    /// out (see [`Lab::loss_counters`]).
    pub fn add_loss(&self, percent: u32) {
        self.nft(
            &self.router(),
            &format!(
                r#"
table ip natloss {{
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "wan0" counter
        oifname "wan0" counter
        iifname "wan0" numgen random mod 100 < {percent} counter drop
        oifname "wan0" numgen random mod 100 < {percent} counter drop
    }}
}}
"#
            ),
        );
    }

    /// The `counter packets N` values of table `ip natloss`, in rule order.
    pub fn loss_counters(&self) -> Vec<u64> {
        let out = self.exec(&self.router(), "nft", &["list", "table", "ip", "natloss"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(3)
            .filter(|w| w[0] == "counter" && w[1] == "packets")
            .map(|w| w[2].parse::<u64>().unwrap())
            .collect()
    }

    /// Limit the router's upload (wan0 egress) with a token bucket, e.g. "50mbit".
    pub fn limit_upload(&self, rate: &str) {
        self.exec(
            &self.router(),
            "tc",
            &[
                "qdisc", "add", "dev", "wan0", "root", "tbf", "rate", rate, "burst", "64kb",
                "latency", "50ms",
            ],
        );
    }

    /// Make the router forget every connection (and so every NAT mapping).
    pub fn flush_conntrack(&self) {
        self.exec(&self.router(), "conntrack", &["-F"]);
    }

    /// The router's conntrack entries as text (`conntrack -L`).
    pub fn conntrack_list(&self) -> String {
        let out = self.exec(&self.router(), "conntrack", &["-L", "-p", "udp"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawn a program inside a namespace. `ip netns exec` execs it directly, so the
    /// child's pid is the program's own.
    pub fn spawn(&self, ns: &str, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
        let mut cmd = Command::new(tool_path("ip"));
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(
            cmd,
            format!("{ns}: {} {}", program.display(), args.join(" ")),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let ip = tool_path("ip");
        for ns in &self.namespaces {
            // Whatever still runs in our namespaces was started by this test: end it.
            if let Ok(out) = Command::new(&ip).args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
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

/// A child process whose stdout is JSON lines (non-JSON lines are kept as strings).
/// Killed on drop.
pub struct Proc {
    pub what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Every line seen so far, in order.
    pub seen: Vec<Value>,
    /// Lines received but not yet consumed by `next_event`/`wait_for`.
    pending: VecDeque<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command, what: String) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        Proc {
            what,
            child,
            stdin,
            lines,
            seen: Vec::new(),
            pending: VecDeque::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Write one line to the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// A description for failure messages: command, stdout lines, stderr.
    pub fn describe(&self) -> String {
        let mut text = format!("--- {} ---\nstdout:\n", self.what);
        for v in &self.seen {
            text.push_str(&format!("  {v}\n"));
        }
        text.push_str(&format!("stderr:\n{}", self.stderr()));
        text
    }

    /// The next stdout line, or `None` after `timeout` or when the child closed stdout.
    pub fn next_line(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(v) = self.pending.pop_front() {
            return Some(v);
        }
        self.recv_raw(timeout)
    }

    /// A line straight from the reader thread (recorded in `seen`).
    fn recv_raw(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(v) => {
                self.seen.push(v.clone());
                Some(v)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Wait for the next JSON line with `"event": kind`, skipping others; panic after
    /// `timeout` or if the child ends first. An `error` event fails immediately.
    pub fn wait_for(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(v) if v["event"] == kind => return v,
                Some(v) if v["event"] == "error" => {
                    panic!(
                        "error event while waiting for {kind:?}: {v}\n{}",
                        self.describe()
                    )
                }
                Some(_) => {}
                None => panic!(
                    "no {kind:?} event within {timeout:?} (or the process ended)\n{}",
                    self.describe()
                ),
            }
        }
    }

    /// Non-blocking: has the child exited?
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Wait for the child to exit, collecting every stdout line; kill it and panic after
    /// `timeout`. Returns the exit status and the lines not consumed before.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Drain what the reader thread still holds (it ends at EOF).
                let mut rest: Vec<Value> = self.pending.drain(..).collect();
                while let Some(v) = self.recv_raw(Duration::from_secs(2)) {
                    rest.push(v);
                }
                return (status, rest);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "did not exit within {timeout:?}: killed\n{}",
                    self.describe()
                );
            }
            // Keep consuming lines so that `seen` is complete in failure messages.
            if let Some(v) = self.recv_raw(Duration::from_millis(50)) {
                self.pending.push_back(v);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

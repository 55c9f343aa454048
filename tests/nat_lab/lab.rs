//! The NAT lab: throw-away networks of Linux namespaces with netfilter NAT routers, for
//! end-to-end tests of `qpunch` through real NATs and firewalls.
//!
//! - [`topology`]: the builder. A public host and any number of sites (router + LAN
//!   of clients), each with its own NAT behaviour, IPv6 prefix and firewall, and link
//!   impairments (delay, rate, loss). Its docs draw the network and list every address.
//! - [`delay`]: the user-space delay element (TAP devices + forwarder threads).
//! - [`netns`]: namespace plumbing, [`require`], and [`in_netns`] to run this process's
//!   own code (sockets, tokio, whole `qpunch` nodes) inside a namespace.
//! - [`Lab`]: the original one-site lab (public host, one router, one client) as a thin
//!   wrapper over a one-site [`Topology`], and [`Proc`], a child process speaking JSON
//!   lines.
//!
//! Every namespace name carries a unique prefix (pid + counter), so tests can run in
//! parallel threads; dropping a [`Topology`] (or [`Lab`]) stops its delay elements, kills
//! what runs inside and deletes the namespaces, also when the test panics. [`Proc`] kills
//! its child on drop. Nothing here ever routes outside the lab's namespaces.
//!
//! Three test files and two benches (`benches/path.rs`, `benches/nat_lab_delay.rs`) include
//! this file with `#[path]` (a bench cannot reach `tests/common/`), and each uses a
//! different part of it: `dead_code` and unused re-exports are allowed here, once, rather
//! than on every item. The submodules are named by `#[path]` so that the includes resolve
//! the same way from `tests/` and from `benches/`.

#![allow(dead_code)]

#[path = "coturn.rs"]
pub mod coturn;
#[path = "delay.rs"]
pub mod delay;
#[path = "gateway.rs"]
pub mod gateway;
#[path = "netns.rs"]
pub mod netns;
#[path = "topology.rs"]
pub mod topology;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)] // each test file uses a subset
pub use delay::{DelayLink, DelayStats, DirectionStats};
#[allow(unused_imports)]
pub use netns::{
    bind_udp_in, block_on_in_netns, in_netns, require, run, spawn_in_netns, tool, tool_path,
};
#[allow(unused_imports)]
pub use topology::{
    Host, LossCounters, MAX_SITES, Nat, PUBLIC_V4, PUBLIC_V4_ALT, PUBLIC_V6, RV_PORT, Rate, Site,
    SiteSpec, Topology,
};

/// A file of `size` incompressible bytes named `name` in `dir` (its content derived from
/// the name); its path and BLAKE3.
pub fn make_file(dir: &Path, name: &str, size: usize) -> (std::path::PathBuf, String) {
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut data);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, blake3::hash(&data).to_hex().to_string())
}

/// The public receiver host.
pub const PUBLIC_IP: &str = "198.51.100.10";
/// [`Lab`]'s router WAN (the NAT's public address): site A's.
pub const ROUTER_WAN_IP: &str = "198.51.100.1";
/// [`Lab`]'s router LAN side.
pub const ROUTER_LAN_IP: &str = "10.0.1.1";
/// [`Lab`]'s client behind the NAT.
pub const CLIENT_IP: &str = "10.0.1.2";

/// The original lab: one site (router + one client) and the public host.
///
/// ```text
///   {p}-pub  eth0 198.51.100.10/24 (and .11) ─┐
///                                              ├── br0 in {p}-inet ("the internet")
///   {p}-ra   wan0 198.51.100.1/24 ────────────┘
///            lan0 10.0.1.1/24 ──────── eth0 10.0.1.2/24 in {p}-a0 (default route via .1)
/// ```
///
/// The router masquerades on wan0, forwards lan→wan and only established/related
/// wan→lan, and drops new inbound connections addressed to itself (like a home router;
/// otherwise an unsolicited probe would create a conntrack entry that makes the router
/// re-map the client's flow to another port).
pub struct Lab {
    /// `qp{pid}{tag}{n}`: every namespace is `{prefix}-{role}`.
    pub prefix: String,
    topology: Topology,
}

impl Lab {
    /// Build the topology with a router of the given kind. `tag` (a few letters) makes
    /// names readable in `ip netns list` when a test is being debugged.
    pub fn new(tag: &str, nat: Nat) -> Lab {
        let topology = Topology::new(tag, &[SiteSpec::new(nat)]);
        Lab {
            prefix: topology.prefix.clone(),
            topology,
        }
    }

    /// The full topology underneath (one site).
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    fn site(&self) -> &Site {
        self.topology.site(0)
    }

    /// The "internet" namespace.
    pub fn inet(&self) -> String {
        self.topology.inet().to_string()
    }
    /// The public host's namespace.
    pub fn public(&self) -> String {
        self.topology.public().ns.clone()
    }
    /// The router's namespace.
    pub fn router(&self) -> String {
        self.site().router.clone()
    }
    /// The client's namespace.
    pub fn client(&self) -> String {
        self.site().client(0).ns.clone()
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, ns: &str, args: &str) {
        netns::ip(ns, args)
    }

    /// Run a program inside a namespace and return its output (panics on failure).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        netns::exec(ns, program, args)
    }

    /// Apply an nft script (one transaction) inside a namespace.
    pub fn nft(&self, ns: &str, script: &str) {
        netns::nft(ns, script)
    }

    /// Replace the router's NAT behaviour (atomically).
    pub fn set_nat(&self, nat: Nat) {
        self.site().set_nat(nat)
    }

    /// Drop `percent` % of the packets crossing the router's WAN side, each direction.
    /// [`Lab::loss_counters`] returns, in order: packets in, packets out, dropped in,
    /// dropped out.
    pub fn add_loss(&self, percent: u32) {
        self.site().set_loss(percent.into())
    }

    /// The loss counts: packets in, packets out, dropped in, dropped out.
    pub fn loss_counters(&self) -> Vec<u64> {
        let c = self.site().loss_counters();
        vec![c.seen_in, c.seen_out, c.dropped_in, c.dropped_out]
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
        self.site().flush_conntrack()
    }

    /// The router's conntrack entries as text (`conntrack -L`).
    pub fn conntrack_list(&self) -> String {
        self.site().conntrack_list()
    }

    /// Spawn a program inside a namespace (see [`spawn`]).
    pub fn spawn(&self, ns: &str, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
        spawn(ns, program, args, env)
    }
}

/// Spawn a program inside a namespace. `ip netns exec` execs it directly, so the child's
/// pid is the program's own.
pub fn spawn(ns: &str, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
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

/// A child process whose stdout is JSON lines (non-JSON lines are kept as strings).
/// Killed on drop.
pub struct Proc {
    pub what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Instant, Value)>,
    /// Every line seen so far, in order.
    pub seen: Vec<Value>,
    /// When each line of `seen` was read from the child (for timing what it reports).
    pub seen_at: Vec<Instant>,
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
                if tx.send((Instant::now(), value)).is_err() {
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
            seen_at: Vec::new(),
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

    /// When the first line with `"event": kind` was read, if one was.
    pub fn when(&self, kind: &str) -> Option<Instant> {
        let i = self.seen.iter().position(|v| v["event"] == kind)?;
        self.seen_at.get(i).copied()
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
            Ok((at, v)) => {
                self.seen.push(v.clone());
                self.seen_at.push(at);
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

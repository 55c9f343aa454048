//! Meeting by code through real NATs: a rendezvous on the lab's public host, a receiver and
//! a sender each behind its own router (see `nat_lab/topology.rs`), the real `qpunch`
//! binary on both ends. The 3x3 matrix of open / cone / symmetric NATs, the LAN path for
//! peers behind one router, IPv6 through stateful firewalls, loss during the meeting, and a
//! NAT rebinding on a rendezvous-made connection.
//!
//! Needs root and the lab's tools; without them each test says SKIPPED (and fails when
//! `CI` is set). Long campaigns (birthday success rates, time to connect) are `#[ignore]`d:
//! `cargo test --test meet_lab -- --ignored --nocapture`.

#[path = "nat_lab/lab.rs"]
mod lab;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lab::{Host, Nat, PUBLIC_V4, Proc, SiteSpec, Topology};
use serde_json::Value;

const RV_PORT: u16 = 9200;

fn qpunch() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qpunch"))
}

fn rendezvous_addr() -> String {
    format!("{PUBLIC_V4}:{RV_PORT}")
}

/// A file of `size` incompressible bytes; returns its path and BLAKE3.
fn make_file(dir: &Path, name: &str, size: usize) -> (PathBuf, String) {
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut data);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, blake3::hash(&data).to_hex().to_string())
}

/// One role's qpunch home.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Self {
        Home(tempfile::tempdir().unwrap())
    }

    fn env(&self) -> [(&'static str, &Path); 1] {
        [("QPUNCH_HOME", self.0.path())]
    }
}

/// A rendezvous on the public host, bound to the wildcard so it answers on both of the
/// host's addresses (the NAT check needs a second one).
struct Rendezvous {
    proc: Proc,
    _home: Home,
}

impl Rendezvous {
    fn start(topo: &Topology) -> Rendezvous {
        let home = Home::new();
        let port = RV_PORT.to_string();
        let mut proc = topo.public().spawn(
            &qpunch(),
            &["rendezvous", "--bind", "0.0.0.0", "--port", &port, "--json"],
            &home.env(),
        );
        proc.wait_for("rendezvous", Duration::from_secs(20));
        Rendezvous { proc, _home: home }
    }
}

/// `qpunch receive --via` on `host`, waiting for its first code.
struct Receiving {
    proc: Proc,
    code: String,
    out: tempfile::TempDir,
    _home: Home,
}

impl Receiving {
    fn start(host: &Host, extra: &[&str]) -> Receiving {
        let home = Home::new();
        let out = tempfile::tempdir().unwrap();
        let via = rendezvous_addr();
        let mut args = vec![
            "receive",
            "--via",
            &via,
            "--out",
            out.path().to_str().unwrap(),
            "--yes",
            "--once",
            "--json",
        ];
        args.extend_from_slice(extra);
        let mut proc = host.spawn(&qpunch(), &args, &home.env());
        let code = loop {
            let listening = proc.wait_for("listening", Duration::from_secs(30));
            if let Some(code) = listening["code"].as_str() {
                break code.to_string();
            }
        };
        Receiving {
            proc,
            code,
            out,
            _home: home,
        }
    }

    /// The receiver's `received` event for `hash`, its exit, and the file on disk.
    fn finish(&mut self, name: &str, hash: &str) {
        let received = self.proc.wait_for("received", Duration::from_secs(60));
        assert_eq!(received["name"], name, "{received}");
        assert_eq!(received["blake3"], hash, "{received}");
        let saved = self.out.path().join(received["saved_as"].as_str().unwrap());
        let on_disk = blake3::hash(&std::fs::read(&saved).unwrap());
        assert_eq!(on_disk.to_hex().as_str(), hash);
        let (status, _) = self.proc.wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "receiver: {status}\n{}",
            self.proc.describe()
        );
    }
}

/// `qpunch send FILE --to CODE --via` on `host`.
fn send(host: &Host, file: &Path, code: &str) -> (Proc, Home) {
    let home = Home::new();
    let via = rendezvous_addr();
    let proc = host.spawn(
        &qpunch(),
        &[
            "send",
            file.to_str().unwrap(),
            "--to",
            code,
            "--via",
            &via,
            "--json",
        ],
        &home.env(),
    );
    (proc, home)
}

/// Every event of `kind` among `events`.
fn events<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// A sender's successful run: `(punched, connected)` events.
fn sent(tx: &mut Proc, name: &str, hash: &str, timeout: Duration) -> (Value, Value) {
    let (status, rest) = tx.wait_exit(timeout);
    let all: Vec<Value> = tx.seen.clone();
    assert!(status.success(), "sender: {status}\n{}", tx.describe());
    let sent = events(&all, "sent");
    assert_eq!(sent.len(), 1, "{}", tx.describe());
    assert_eq!(sent[0]["name"], name);
    assert_eq!(sent[0]["blake3"], hash);
    let _ = rest;
    let punched = events(&all, "punched").last().copied().cloned().unwrap();
    let connected = events(&all, "connected").last().copied().cloned().unwrap();
    (punched, connected)
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str().unwrap().parse().unwrap()
}

/// One cell of the matrix: the receiver behind `rx`, the sender behind `tx`, no IPv6 (so
/// the IPv4 NATs decide). Returns the sender's `punched` event on success.
fn cell(tag: &str, rx: Nat, tx: Nat) -> Option<Value> {
    if !lab::require(tag, &["tc"]) {
        return None;
    }
    let topo = Topology::new(
        tag,
        &[SiteSpec::new(rx).ipv6(false), SiteSpec::new(tx).ipv6(false)],
    );
    let mut rv = Rendezvous::start(&topo);
    let mut receiving = Receiving::start(topo.site(0).client(0), &[]);
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = make_file(dir.path(), "matrix.bin", 200_000);
    let (mut sender, _home) = send(topo.site(1).client(0), &file, &receiving.code);
    let (punched, connected) = sent(&mut sender, "matrix.bin", &hash, Duration::from_secs(60));
    receiving.finish("matrix.bin", &hash);
    // The rendezvous logged the pairing: the nameplate and both public addresses.
    let pairing = rv.proc.wait_for("pairing", Duration::from_secs(5));
    let nameplate = receiving.code.split('-').next().unwrap();
    assert_eq!(pairing["nameplate"], nameplate, "{pairing}");
    assert_eq!(
        addr(&pairing["sender"]).ip(),
        std::net::IpAddr::from(topo.site(1).wan_v4)
    );
    // The path is direct: the sender talks to the receiver's router, never the rendezvous.
    let peer = addr(&connected["peer"]);
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from(topo.site(0).wan_v4),
        "{connected}"
    );
    assert_eq!(connected["path"], "direct");
    Some(punched)
}

macro_rules! matrix {
    ($($name:ident: $rx:ident x $tx:ident => $method:expr;)*) => {$(
        #[test]
        fn $name() {
            if let Some(punched) = cell(stringify!($name), Nat::$rx, Nat::$tx) {
                let expected: Option<&str> = $method;
                if let Some(method) = expected {
                    assert_eq!(punched["method"], method, "{punched}");
                }
            }
        }
    )*};
}

// Receiver's NAT x sender's NAT. Where ordinary punching cannot work (a cone facing a
// symmetric NAT) the birthday technique must be what found the path.
matrix! {
    open_x_open: Open x Open => Some("direct");
    open_x_cone: Open x Cone => Some("direct");
    open_x_symmetric: Open x Symmetric => None;
    cone_x_open: Cone x Open => Some("direct");
    cone_x_cone: Cone x Cone => Some("direct");
    cone_x_symmetric: Cone x Symmetric => Some("birthday");
    symmetric_x_open: Symmetric x Open => None;
    symmetric_x_cone: Symmetric x Cone => Some("birthday");
}

/// Two symmetric NATs: no direct path exists. The sender gives up within 15 s with an error
/// that names both mapping behaviours and says a relay is needed.
#[test]
fn symmetric_x_symmetric_fails_fast_and_explains() {
    const TEST: &str = "symmetric_x_symmetric_fails_fast_and_explains";
    if !lab::require(TEST, &["tc"]) {
        return;
    }
    let topo = Topology::new(
        "sxs",
        &[
            SiteSpec::new(Nat::Symmetric).ipv6(false),
            SiteSpec::new(Nat::Symmetric).ipv6(false),
        ],
    );
    let _rv = Rendezvous::start(&topo);
    let receiving = Receiving::start(topo.site(0).client(0), &[]);
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = make_file(dir.path(), "nope.bin", 1000);
    let started = Instant::now();
    let (mut sender, _home) = send(topo.site(1).client(0), &file, &receiving.code);
    let (status, _) = sender.wait_exit(Duration::from_secs(30));
    let took = started.elapsed();
    assert!(!status.success(), "{}", sender.describe());
    assert!(took <= Duration::from_secs(15), "gave up after {took:?}");
    let errors: Vec<String> = events(&sender.seen, "error")
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    let message = errors.join("\n");
    assert!(
        message.matches("address-and-port-dependent").count() >= 2,
        "both behaviours named: {message}"
    );
    assert!(message.contains("relay"), "{message}");
    assert!(
        std::fs::read_dir(receiving.out.path())
            .unwrap()
            .all(|e| e.unwrap().file_name() == ".qpunch-partial"),
        "nothing written"
    );
    eprintln!("{TEST}: gave up after {took:?}: {message}");
}

/// Two peers behind one router meet over their LAN (no hairpinning needed).
#[test]
fn peers_behind_one_router_use_the_lan() {
    const TEST: &str = "peers_behind_one_router_use_the_lan";
    if !lab::require(TEST, &["tc"]) {
        return;
    }
    let topo = Topology::new("lan", &[SiteSpec::new(Nat::Cone).clients(2).ipv6(false)]);
    let _rv = Rendezvous::start(&topo);
    let site = topo.site(0);
    let mut receiving = Receiving::start(site.client(0), &[]);
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = make_file(dir.path(), "lan.bin", 300_000);
    let (mut sender, _home) = send(site.client(1), &file, &receiving.code);
    let (punched, connected) = sent(&mut sender, "lan.bin", &hash, Duration::from_secs(60));
    receiving.finish("lan.bin", &hash);
    assert_eq!(connected["path"], "lan", "{connected}");
    assert_eq!(punched["method"], "lan", "{punched}");
    let peer = addr(&connected["peer"]);
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from(site.client(0).v4),
        "{connected}"
    );
}

/// IPv6 through two stateful firewalls (no NAT): the IPv4 NATs are symmetric, so only the
/// IPv6 path can work, and it does, punched by both sides at once.
#[test]
fn ipv6_punches_through_stateful_firewalls() {
    const TEST: &str = "ipv6_punches_through_stateful_firewalls";
    if !lab::require(TEST, &["tc"]) {
        return;
    }
    let topo = Topology::new(
        "six",
        &[SiteSpec::new(Nat::Symmetric), SiteSpec::new(Nat::Symmetric)],
    );
    let _rv = Rendezvous::start(&topo);
    let mut receiving = Receiving::start(topo.site(0).client(0), &[]);
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = make_file(dir.path(), "six.bin", 200_000);
    let (mut sender, _home) = send(topo.site(1).client(0), &file, &receiving.code);
    let (_, connected) = sent(&mut sender, "six.bin", &hash, Duration::from_secs(60));
    receiving.finish("six.bin", &hash);
    let peer = addr(&connected["peer"]);
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from(topo.site(0).client(0).v6.unwrap()),
        "{connected}"
    );
}

/// 10 % loss each way on both routers, during the meeting and the punch: still connects.
#[test]
fn meeting_survives_ten_percent_loss() {
    const TEST: &str = "meeting_survives_ten_percent_loss";
    if !lab::require(TEST, &["tc"]) {
        return;
    }
    let topo = Topology::new(
        "loss",
        &[
            SiteSpec::new(Nat::Cone).ipv6(false).loss_percent(10.0),
            SiteSpec::new(Nat::Cone).ipv6(false).loss_percent(10.0),
        ],
    );
    let _rv = Rendezvous::start(&topo);
    let mut receiving = Receiving::start(topo.site(0).client(0), &[]);
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = make_file(dir.path(), "lossy.bin", 500_000);
    let (mut sender, _home) = send(topo.site(1).client(0), &file, &receiving.code);
    sent(&mut sender, "lossy.bin", &hash, Duration::from_secs(90));
    receiving.finish("lossy.bin", &hash);
    let dropped = topo.site(0).loss_counters();
    assert!(
        dropped.dropped_in + dropped.dropped_out > 0,
        "the loss rules dropped nothing: {dropped:?}"
    );
}

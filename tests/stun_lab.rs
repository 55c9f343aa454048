//! STUN against a real server we did not write (needs root; skipped loudly without):
//! Debian's coturn on the lab's public host, with two addresses for RFC 5780
//! (`tests/nat_lab/coturn.rs`). The `qpunch` binary runs on each site.
//!
//! - `nat-check --stun` gives the same verdicts (UDP, mapping, filtering, public address)
//!   as `nat-check --via` against our own rendezvous, for every router mode.
//! - A receiver with `stun = [...]` in its config.toml offers what coturn saw of it as
//!   one more candidate in its sealed hello (behind a symmetric NAT, another port than the
//!   rendezvous saw), before the rendezvous's; without the list it offers none, and the
//!   file arrives either way.
//! - The public default STUN servers are asked only with no rendezvous and no list.
//! - A lying STUN server (ours, answering every request with another host's address) gets
//!   that address into the receiver's hello, and no further: the connection runs to the
//!   real peer, direct, and the file arrives.

#[path = "nat_lab/lab.rs"]
mod lab;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lab::coturn::{Coturn, CoturnConfig};
use lab::{Nat, PUBLIC_V4, PUBLIC_V4_ALT, Proc, RV_PORT, SiteSpec, Topology};
use serde_json::Value;

fn qpunch() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qpunch"))
}

fn env(home: &tempfile::TempDir) -> [(&'static str, &Path); 1] {
    [("QPUNCH_HOME", home.path())]
}

/// The last event of `kind` a finished process printed.
fn last(proc: &Proc, kind: &str) -> Value {
    proc.seen
        .iter()
        .rev()
        .find(|e| e["event"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} event\n{}", proc.describe()))
}

/// Run `nat-check` with `args` on every site at once; their finished processes.
fn nat_checks(topo: &Topology, sites: usize, args: &[&str]) -> Vec<Proc> {
    let homes: Vec<_> = (0..sites).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut procs: Vec<Proc> = (0..sites)
        .map(|i| {
            topo.site(i)
                .client(0)
                .spawn(&qpunch(), args, &env(&homes[i]))
        })
        .collect();
    for proc in &mut procs {
        proc.wait_exit(Duration::from_secs(40));
    }
    procs
}

/// `nat-check --stun` against coturn says what `nat-check --via` against our rendezvous
/// says, per router mode (RFC 4787 terms; RFC 5780 tests against coturn's two addresses).
#[test]
fn stun_check_agrees_with_the_rendezvous_per_router_mode() {
    const TEST: &str = "stun_check_agrees_with_the_rendezvous_per_router_mode";
    if !lab::require(TEST, &["turnserver"]) {
        return;
    }
    let modes = [Nat::Open, Nat::Cone, Nat::Symmetric, Nat::UdpBlocked];
    let specs: Vec<SiteSpec> = modes
        .iter()
        .map(|&m| SiteSpec::new(m).ipv6(false))
        .collect();
    let topo = Topology::new("stn", &specs);
    let rv_home = tempfile::tempdir().unwrap();
    let _rv = topo.start_rendezvous(rv_home.path(), &[]);
    let coturn = Coturn::start(
        topo.public(),
        CoturnConfig::new(&[PUBLIC_V4.into(), PUBLIC_V4_ALT.into()], None),
    );
    let stun = coturn.addr().to_string();
    let via = format!("{PUBLIC_V4}:{RV_PORT}");

    let quiet = ["--json", "--no-port-mapping"];
    let by_rv = nat_checks(
        &topo,
        modes.len(),
        &[&["nat-check", "--via", &via], &quiet[..]].concat(),
    );
    let by_stun = nat_checks(
        &topo,
        modes.len(),
        &[&["nat-check", "--stun", &stun], &quiet[..]].concat(),
    );
    let expected = [
        (true, "endpoint-independent", "endpoint-independent"),
        (true, "endpoint-independent", "address-and-port-dependent"),
        (
            true,
            "address-and-port-dependent",
            "address-and-port-dependent",
        ),
        (false, "unknown", "unknown"),
    ];
    for (i, (mode, (udp, mapping, filtering))) in modes.iter().zip(expected).enumerate() {
        let theirs = last(&by_rv[i], "nat");
        let ours = last(&by_stun[i], "stun_nat");
        assert!(
            events_of(&by_rv[i], "stun_nat").is_empty(),
            "--via alone asks no STUN server: {}",
            by_rv[i].describe()
        );
        assert_eq!(ours["server"], stun.as_str(), "{ours}");
        for key in ["udp", "mapping", "filtering", "port_preserved"] {
            assert_eq!(
                ours[key],
                theirs[key],
                "{mode:?}: {key} differs\nSTUN: {ours}\nrendezvous: {theirs}\n{}",
                coturn.log()
            );
        }
        assert_eq!(ours["udp"], udp, "{mode:?}: {ours}");
        assert_eq!(ours["mapping"], mapping, "{mode:?}: {ours}");
        assert_eq!(ours["filtering"], filtering, "{mode:?}: {ours}");
        if udp {
            // Same public IP; the port too where the NAT maps endpoint-independently.
            let public: SocketAddr = ours["public"].as_str().unwrap().parse().unwrap();
            let site = topo.sites().iter().find(|s| s.spec.nat == *mode).unwrap();
            assert_eq!(public.ip(), std::net::IpAddr::from(site.wan_v4), "{ours}");
            // The RFC 5780 tests ran: three targets, coturn's other address among them.
            let targets = ours["observations"].as_array().unwrap();
            assert_eq!(targets.len(), 3, "{ours}");
            assert!(
                ours.to_string().contains(&PUBLIC_V4_ALT.to_string()),
                "{ours}"
            );
        }
    }
}

fn events_of<'a>(proc: &'a Proc, kind: &str) -> Vec<&'a Value> {
    proc.seen.iter().filter(|e| e["event"] == kind).collect()
}

/// A receiver behind a symmetric NAT meets a sender by code; returns the receiver's
/// candidates as the sender saw them (its `paired` event), after the file arrived.
fn meet(topo: &Topology, stun: Option<&str>) -> Vec<SocketAddr> {
    let (candidates, _) = meet_on(topo, stun);
    candidates
}

/// [`meet`], also returning every event the sender printed.
fn meet_on(topo: &Topology, stun: Option<&str>) -> (Vec<SocketAddr>, Vec<Value>) {
    let via = format!("{PUBLIC_V4}:{RV_PORT}");
    let rx_home = tempfile::tempdir().unwrap();
    if let Some(stun) = stun {
        std::fs::write(
            rx_home.path().join("config.toml"),
            format!("stun = [\"{stun}\"]\n"),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let args = [
        "receive",
        "--out",
        out.path().to_str().unwrap(),
        "--yes",
        "--once",
        "--json",
        "--no-port-mapping",
        "--via",
        &via,
    ];
    let mut rx = topo
        .site(1)
        .client(0)
        .spawn(&qpunch(), &args, &env(&rx_home));
    let code = loop {
        let listening = rx.wait_for("listening", Duration::from_secs(30));
        if let Some(code) = listening["code"].as_str() {
            break code.to_string();
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stun.bin");
    std::fs::write(&file, vec![7u8; 64 << 10]).unwrap();
    let tx_home = tempfile::tempdir().unwrap();
    let args = [
        "send",
        file.to_str().unwrap(),
        "--to",
        &code,
        "--via",
        &via,
        "--json",
        "--no-port-mapping",
    ];
    let mut tx = topo
        .site(0)
        .client(0)
        .spawn(&qpunch(), &args, &env(&tx_home));
    let (status, _) = tx.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "sender: {}", tx.describe());
    rx.wait_for("received", Duration::from_secs(30));
    let paired = last(&tx, "paired");
    let candidates = paired["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().parse().unwrap())
        .collect();
    (candidates, tx.seen.clone())
}

/// What coturn saw of a receiver becomes a candidate in its hello, before the
/// rendezvous's observed address (still last); nothing is added without a `stun` list.
#[test]
fn stun_reflexive_address_becomes_a_candidate() {
    const TEST: &str = "stun_reflexive_address_becomes_a_candidate";
    if !lab::require(TEST, &["turnserver"]) {
        return;
    }
    let specs = [
        SiteSpec::new(Nat::Open).ipv6(false),
        SiteSpec::new(Nat::Symmetric).ipv6(false),
    ];
    let topo = Topology::new("stc", &specs);
    let rv_home = tempfile::tempdir().unwrap();
    let _rv = topo.start_rendezvous(rv_home.path(), &[]);
    let coturn = Coturn::start(
        topo.public(),
        CoturnConfig::new(&[PUBLIC_V4.into(), PUBLIC_V4_ALT.into()], None),
    );
    let wan = std::net::IpAddr::from(topo.site(1).wan_v4);
    let public = |candidates: &[SocketAddr]| -> Vec<SocketAddr> {
        candidates
            .iter()
            .copied()
            .filter(|c| c.ip() == wan)
            .collect()
    };

    let without = meet(&topo, None);
    assert_eq!(
        public(&without).len(),
        1,
        "only the rendezvous's view: {without:?}"
    );

    let with = meet(&topo, Some(&coturn.addr().to_string()));
    let seen = public(&with);
    assert_eq!(
        seen.len(),
        2,
        "coturn's view and the rendezvous's: {with:?}"
    );
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "a symmetric NAT maps each server apart"
    );
    assert_eq!(
        with.last(),
        Some(&seen[1]),
        "the rendezvous's view stays last: {with:?}"
    );
}

/// `nat-check` names the public default STUN servers (and would ask them) only with no
/// rendezvous and no `stun` list: a configured rendezvous or list means nobody else.
#[test]
fn default_stun_servers_only_without_rendezvous_or_list() {
    const TEST: &str = "default_stun_servers_only_without_rendezvous_or_list";
    if !lab::require(TEST, &["turnserver"]) {
        return;
    }
    let topo = Topology::new("std", &[SiteSpec::new(Nat::Cone).ipv6(false)]);
    let rv_home = tempfile::tempdir().unwrap();
    let _rv = topo.start_rendezvous(rv_home.path(), &[]);
    let coturn = Coturn::start(
        topo.public(),
        CoturnConfig::new(&[PUBLIC_V4.into(), PUBLIC_V4_ALT.into()], None),
    );
    let stun = coturn.addr().to_string();
    let configs = [
        String::new(),
        format!("rendezvous = \"{PUBLIC_V4}:{RV_PORT}\"\n"),
        format!("stun = [\"{stun}\"]\n"),
    ];
    let mut runs = Vec::new();
    for config in &configs {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), config).unwrap();
        let args = ["nat-check", "--json", "--no-port-mapping"];
        let mut proc = topo.site(0).client(0).spawn(&qpunch(), &args, &env(&home));
        // The lab has no DNS: the defaults fail to resolve, each within its bound.
        proc.wait_exit(Duration::from_secs(20));
        runs.push(proc);
    }
    let defaults = events_of(&runs[0], "stun_defaults");
    assert_eq!(defaults.len(), 1, "{}", runs[0].describe());
    let named: Vec<&str> = defaults[0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(named.contains(&"stun.l.google.com:19302"), "{named:?}");
    assert!(
        events_of(&runs[0], "nat").is_empty(),
        "{}",
        runs[0].describe()
    );
    // A configured rendezvous: only it.
    assert!(
        events_of(&runs[1], "stun_defaults").is_empty(),
        "{}",
        runs[1].describe()
    );
    assert!(
        events_of(&runs[1], "stun_nat").is_empty(),
        "{}",
        runs[1].describe()
    );
    assert_eq!(last(&runs[1], "nat")["udp"], true, "{}", runs[1].describe());
    // A configured list: only its servers.
    assert!(
        events_of(&runs[2], "stun_defaults").is_empty(),
        "{}",
        runs[2].describe()
    );
    let checked = events_of(&runs[2], "stun_nat");
    assert_eq!(checked.len(), 1, "{}", runs[2].describe());
    assert_eq!(checked[0]["server"], stun.as_str());
    assert_eq!(
        checked[0]["mapping"], "endpoint-independent",
        "{}",
        checked[0]
    );
}

/// A STUN server of our own on the public host that answers every Binding request with
/// `lie` as the mapped address, until dropped.
struct LyingStun {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl LyingStun {
    fn start(topo: &Topology, lie: SocketAddr) -> LyingStun {
        use stun_types::attribute::XorMappedAddress;
        use stun_types::message::{
            BINDING, Message, MessageClass, MessageType, MessageWrite, MessageWriteExt,
            MessageWriteVec,
        };
        let addr = SocketAddr::from((PUBLIC_V4, 3490));
        let socket = lab::bind_udp_in(&topo.public().ns, addr);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            let mut buf = [0u8; 1500];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(request) = Message::from_bytes(&buf[..n]) else {
                    continue;
                };
                let id = request.transaction_id();
                let mut out = Message::builder(
                    MessageType::from_class_method(MessageClass::Success, BINDING),
                    id,
                    MessageWriteVec::new(),
                );
                out.add_attribute(&XorMappedAddress::new(lie, id)).unwrap();
                let _ = socket.send_to(&out.finish(), from);
                answered += 1;
            }
            answered
        });
        LyingStun {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; how many requests it answered.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for LyingStun {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A STUN server that names another host as our address only adds a useless candidate
/// to our own hello: the peer's connection still goes to us, direct, and the file arrives.
#[test]
fn a_lying_stun_server_cannot_steer_the_path() {
    const TEST: &str = "a_lying_stun_server_cannot_steer_the_path";
    if !lab::require(TEST, &[]) {
        return;
    }
    let specs = [
        SiteSpec::new(Nat::Open).ipv6(false),
        SiteSpec::new(Nat::Cone).ipv6(false),
    ];
    let topo = Topology::new("stl", &specs);
    let rv_home = tempfile::tempdir().unwrap();
    let _rv = topo.start_rendezvous(rv_home.path(), &[]);
    let victim: SocketAddr = "198.51.100.99:5555".parse().unwrap();
    let liar = LyingStun::start(&topo, victim);

    let (candidates, events) = meet_on(&topo, Some(&liar.addr.to_string()));
    assert!(liar.stop() >= 1, "the receiver asked the STUN server");
    assert!(
        candidates.contains(&victim),
        "the lie is offered: {candidates:?}"
    );
    assert_ne!(
        candidates.last(),
        Some(&victim),
        "never as the public address"
    );
    let receiver_wan = std::net::IpAddr::from(topo.site(1).wan_v4);
    for event in events
        .iter()
        .filter(|e| ["punched", "connected", "path"].contains(&e["event"].as_str().unwrap_or("")))
    {
        assert!(
            !event.to_string().contains(&victim.to_string()),
            "the path never goes to the address the STUN server named: {event}"
        );
    }
    let connected = events
        .iter()
        .rev()
        .find(|e| e["event"] == "connected")
        .unwrap();
    assert_eq!(connected["path"], "direct", "{connected}");
    let peer: SocketAddr = connected["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), receiver_wan, "{connected}");
}

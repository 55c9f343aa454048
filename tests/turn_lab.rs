//! TURN through a server we did not write: Debian's coturn on the lab's public host, the real
//! `qpunch` binary behind real NATs on both ends (see `nat_lab/topology.rs` and
//! `nat_lab/coturn.rs`).
//!
//! Two symmetric NATs and a rendezvous that does not relay: no direct path exists, so a
//! transfer that completes went through coturn. Credentials are coturn's TURN REST API
//! scheme (`use-auth-secret`), here minted by the test and given to each side as the static
//! `[turn]` of its config.toml; forged and expired ones must be refused by coturn and said
//! so.
//!
//! Needs root, the lab's tools and `turnserver`; without them each test says SKIPPED (and
//! fails when `CI` is set).

#[path = "nat_lab/lab.rs"]
mod lab;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lab::coturn::{Coturn, CoturnConfig};
use lab::{Host, Nat, PUBLIC_V4, Proc, RV_PORT, SiteSpec, Topology};
use serde_json::Value;

const SECRET: &str = "lab-turn-secret";

fn qpunch() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qpunch"))
}

fn rendezvous_addr() -> String {
    format!("{PUBLIC_V4}:{RV_PORT}")
}

fn turn_url() -> String {
    format!("turn:{PUBLIC_V4}:3478")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One role's qpunch home, with a `[turn]` in its config.toml.
struct Home(tempfile::TempDir);

impl Home {
    fn with_turn(username: &str, password: &str) -> Home {
        Home::with_turn_at(&turn_url(), username, password)
    }

    fn with_turn_at(url: &str, username: &str, password: &str) -> Home {
        let home = Home(tempfile::tempdir().unwrap());
        let config = format!(
            "[turn]\nurl = \"{url}\"\nusername = \"{username}\"\npassword = \"{password}\"\n"
        );
        std::fs::write(home.0.path().join("config.toml"), config).unwrap();
        home
    }

    /// Credentials coturn accepts for ten minutes.
    fn minted(tag: &str) -> Home {
        let (user, password) = qpunch::turn::mint(SECRET.as_bytes(), tag, unix_now() + 600);
        Home::with_turn(&user, &password)
    }

    fn env(&self) -> [(&'static str, &Path); 1] {
        [("QPUNCH_HOME", self.0.path())]
    }
}

/// Two symmetric NATs, coturn and a rendezvous that does not relay on the public host.
struct Lab {
    topo: Topology,
    coturn: Coturn,
    _rv: Proc,
    _rv_home: tempfile::TempDir,
}

impl Lab {
    /// The rendezvous with `--no-relay` and `extra` flags; `{secret}` in them is the path of
    /// a file holding coturn's secret.
    fn start(tag: &str, extra: &[&str]) -> Option<Lab> {
        Lab::start_with(tag, Nat::Symmetric, extra)
    }

    /// A symmetric NAT for the receiver, `sender` for the sender.
    fn start_with(tag: &str, sender: Nat, extra: &[&str]) -> Option<Lab> {
        Lab::start_coturn(tag, sender, extra, |config| config)
    }

    /// With coturn's configuration changed by `coturn`.
    fn start_coturn(
        tag: &str,
        sender: Nat,
        extra: &[&str],
        coturn: impl FnOnce(CoturnConfig) -> CoturnConfig,
    ) -> Option<Lab> {
        if !lab::require(tag, &["tc", "turnserver"]) {
            return None;
        }
        let topo = Topology::new(
            tag,
            &[
                SiteSpec::new(Nat::Symmetric).ipv6(false),
                SiteSpec::new(sender).ipv6(false),
            ],
        );
        let coturn = Coturn::start(
            topo.public(),
            coturn(CoturnConfig::new(&[PUBLIC_V4.into()], Some(SECRET))),
        );
        let home = tempfile::tempdir().unwrap();
        let secret = home.path().join("turn-secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let secret = secret.to_str().unwrap().to_string();
        let mut args = vec!["--no-relay".to_string()];
        args.extend(extra.iter().map(|a| a.replace("{secret}", &secret)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rv = topo.start_rendezvous(home.path(), &args);
        Some(Lab {
            topo,
            coturn,
            _rv: rv,
            _rv_home: home,
        })
    }
}

/// `qpunch receive --via` on `host`, and its first code.
fn receive(host: &Host, home: &Home, out: &Path) -> (Proc, String) {
    let via = rendezvous_addr();
    let args = [
        "receive",
        "--out",
        out.to_str().unwrap(),
        "--yes",
        "--once",
        "--json",
        "-v",
        "--via",
        &via,
    ];
    let mut proc = host.spawn(&qpunch(), &args, &home.env());
    let code = loop {
        let listening = proc.wait_for("listening", Duration::from_secs(30));
        if let Some(code) = listening["code"].as_str() {
            break code.to_string();
        }
    };
    (proc, code)
}

/// `qpunch send FILE --to CODE --via` on `host`.
fn send(host: &Host, home: &Home, file: &Path, code: &str) -> Proc {
    let via = rendezvous_addr();
    let args = [
        "send",
        file.to_str().unwrap(),
        "--to",
        code,
        "--via",
        &via,
        "--json",
        "-v",
    ];
    host.spawn(&qpunch(), &args, &home.env())
}

fn events<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

fn messages(events_seen: &[Value], kind: &str) -> String {
    events(events_seen, kind)
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sender's and receiver's homes without a `[turn]`.
fn plain_home() -> Home {
    Home(tempfile::tempdir().unwrap())
}

/// Two symmetric NATs cannot punch, and the rendezvous does not relay: the transfer goes
/// through coturn over UDP, intact, and the sender says so (`turn`). Credentials: each
/// side's own, static in its config.toml.
#[test]
fn symmetric_x_symmetric_relays_through_coturn_over_udp() {
    const TEST: &str = "symmetric_x_symmetric_relays_through_coturn_over_udp";
    let Some(lab) = Lab::start(TEST, &[]) else {
        return;
    };
    let (rx_home, tx_home) = (Home::minted("receiver"), Home::minted("sender"));
    relays_through_coturn(&lab, &rx_home, &tx_home);
}

/// The same with no `[turn]` anywhere: the rendezvous mints credentials for each side of
/// the pairing (`--turn`, `--turn-secret`), and coturn takes them. Their usernames carry a
/// random tag, nothing of the code, and expire when `--turn-lifetime` says.
#[test]
fn rendezvous_minted_credentials_relay_through_coturn() {
    const TEST: &str = "rendezvous_minted_credentials_relay_through_coturn";
    let url = turn_url();
    let Some(lab) = Lab::start(
        TEST,
        &[
            "--turn",
            &url,
            "--turn-secret",
            "{secret}",
            "--turn-lifetime",
            "10m",
        ],
    ) else {
        return;
    };
    let code = relays_through_coturn(&lab, &plain_home(), &plain_home());
    let log = lab.coturn.log();
    let users: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ALLOCATE processed, success"))
        .filter_map(|l| l.split("user <").nth(1)?.split('>').next())
        .collect();
    assert_eq!(users.len(), 2, "coturn:\n{log}");
    assert_ne!(users[0], users[1]);
    for user in users {
        let (expiry, tag) = user.split_once(':').unwrap();
        let expiry: u64 = expiry.parse().unwrap();
        assert!(
            expiry > unix_now() + 500 && expiry <= unix_now() + 600,
            "{user}"
        );
        // 64 random bits in hex: nothing of the code (its words are letters).
        assert!(
            tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()),
            "{user}"
        );
        for word in code.split('-').skip(1) {
            assert!(!user.contains(word), "{user} names {word}");
        }
    }
}

/// With UDP blocked at the sender's router, the sender reaches the rendezvous over TCP and
/// coturn over TCP (`?transport=tcp`), the receiver coturn over UDP: the transfer relays
/// through both allocations and the sender's path is `turn-tcp`.
#[test]
fn udp_blocked_at_one_router_relays_through_coturn_over_tcp() {
    const TEST: &str = "udp_blocked_at_one_router_relays_through_coturn_over_tcp";
    let Some(lab) = Lab::start_with(TEST, Nat::UdpBlocked, &[]) else {
        return;
    };
    let rx_home = Home::minted("receiver");
    let (user, password) = qpunch::turn::mint(SECRET.as_bytes(), "sender", unix_now() + 600);
    let tx_home = Home::with_turn_at(&format!("{}?transport=tcp", turn_url()), &user, &password);
    relays_through_coturn_as(&lab, &rx_home, &tx_home, "turn-tcp");
}

/// The same through TLS on port 443 (`turns:`), what a network that lets only HTTPS out
/// allows: coturn with the repo's test-only certificate.
#[test]
fn udp_blocked_at_one_router_relays_through_coturn_over_tls_on_443() {
    const TEST: &str = "udp_blocked_at_one_router_relays_through_coturn_over_tls_on_443";
    let Some(lab) = Lab::start_coturn(TEST, Nat::UdpBlocked, &[], |config| {
        let mut config = config.with_test_tls();
        config.tls_port = 443;
        config
    }) else {
        return;
    };
    let rx_home = Home::minted("receiver");
    let (user, password) = qpunch::turn::mint(SECRET.as_bytes(), "sender", unix_now() + 600);
    let tx_home = Home::with_turn_at(&format!("turns:{PUBLIC_V4}:443"), &user, &password);
    relays_through_coturn_as(&lab, &rx_home, &tx_home, "turn-tcp");
    // The sender's router reached port 443, where coturn speaks only TLS (a plain TURN
    // message there fails its handshake).
    let log = lab.coturn.log();
    let wan = lab.topo.site(1).wan_v4;
    assert!(
        log.contains(&format!("tcp or tls connected to: {wan}")),
        "coturn:\n{log}"
    );
}

/// Send 2 MB from a symmetric NAT to a symmetric NAT and check that it went through
/// coturn; returns the code.
fn relays_through_coturn(lab: &Lab, rx_home: &Home, tx_home: &Home) -> String {
    relays_through_coturn_as(lab, rx_home, tx_home, "turn")
}

/// The same, the sender's path being `kind`.
fn relays_through_coturn_as(lab: &Lab, rx_home: &Home, tx_home: &Home, kind: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let (mut receiver, code) = receive(lab.topo.site(0).client(0), rx_home, out.path());
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = lab::make_file(dir.path(), "turned.bin", 2_000_000);
    let mut sender = send(lab.topo.site(1).client(0), tx_home, &file, &code);
    let (status, _) = sender.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "sender failed\n{}\n{}\ncoturn:\n{}",
        sender.describe(),
        receiver.describe(),
        lab.coturn.log()
    );
    let sent = events(&sender.seen, "sent");
    assert_eq!(sent.len(), 1, "{}", sender.describe());
    assert_eq!(sent[0]["blake3"], hash.as_str());
    let connected = events(&sender.seen, "connected");
    assert_eq!(
        connected.last().unwrap()["path"],
        kind,
        "{}",
        sender.describe()
    );
    // Never another path: none exists.
    for moved in events(&sender.seen, "path") {
        assert_eq!(moved["path"], kind, "{moved}");
    }
    let received = receiver.wait_for("received", Duration::from_secs(30));
    assert_eq!(received["blake3"], hash.as_str(), "{received}");
    let saved = out.path().join(received["saved_as"].as_str().unwrap());
    assert_eq!(
        blake3::hash(&std::fs::read(saved).unwrap())
            .to_hex()
            .as_str(),
        hash
    );
    // coturn did the relaying: both allocations, and both sides' ChannelBinds.
    let log = lab.coturn.log();
    assert!(
        log.matches("ALLOCATE processed, success").count() >= 2,
        "coturn:\n{log}"
    );
    assert!(
        log.contains("CHANNEL_BIND processed, success"),
        "coturn:\n{log}"
    );
    // Deallocation on exit: each side's Refresh with lifetime 0, and coturn deletes both.
    let (status, _) = receiver.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", receiver.describe());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let deleted = |log: &str| log.matches(": delete: realm=").count();
    while deleted(&lab.coturn.log()) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.coturn.log();
    assert_eq!(deleted(&log), 2, "coturn:\n{log}");
    assert!(
        log.matches("REFRESH processed, success").count() >= 2,
        "coturn:\n{log}"
    );
    code
}

/// A forged password (the sender's) and an expired minted credential (the receiver's):
/// coturn refuses both, each side says which server refused whose credentials, and the
/// meeting fails as two symmetric NATs without a relay do.
#[test]
fn forged_and_expired_turn_credentials_are_refused_and_said_so() {
    const TEST: &str = "forged_and_expired_turn_credentials_are_refused_and_said_so";
    let Some(lab) = Lab::start(TEST, &[]) else {
        return;
    };
    let (expired_user, expired_password) =
        qpunch::turn::mint(SECRET.as_bytes(), "receiver", unix_now() - 60);
    let rx_home = Home::with_turn(&expired_user, &expired_password);
    let (forged_user, _) = qpunch::turn::mint(SECRET.as_bytes(), "sender", unix_now() + 600);
    let (_, forged_password) = qpunch::turn::mint(b"not the secret", "sender", unix_now() + 600);
    let tx_home = Home::with_turn(&forged_user, &forged_password);
    let out = tempfile::tempdir().unwrap();
    let (mut receiver, code) = receive(lab.topo.site(0).client(0), &rx_home, out.path());
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = lab::make_file(dir.path(), "refused.bin", 1000);
    let mut sender = send(lab.topo.site(1).client(0), &tx_home, &file, &code);
    let (status, _) = sender.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{}", sender.describe());
    let warned = messages(&sender.seen, "warning");
    let url = turn_url();
    assert!(
        warned.contains(&format!(
            "TURN server {url} refused the credentials of user {forged_user} (401"
        )),
        "sender's warnings:\n{warned}\n{}",
        sender.describe()
    );
    let failed = messages(&sender.seen, "error");
    assert!(failed.contains("no direct path"), "{failed}");
    // The receiver's meeting fails too; its warning came first.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline
        && !messages(&receiver.seen, "warning").contains("refused")
    {
        if receiver.next_line(Duration::from_millis(500)).is_none() && receiver.try_exit().is_some()
        {
            break;
        }
    }
    let warned = messages(&receiver.seen, "warning");
    assert!(
        warned.contains(&format!(
            "TURN server {url} refused the credentials of user {expired_user} (401"
        )),
        "receiver's warnings:\n{warned}\n{}",
        receiver.describe()
    );
}

/// Two cone sites whose links carry `mbit`, coturn and a rendezvous that does not relay
/// on the public host (fields drop in order: the rendezvous before the namespaces).
struct ConePair {
    _rv: Proc,
    _rv_home: tempfile::TempDir,
    coturn: Coturn,
    topo: Topology,
}

impl ConePair {
    fn start(tag: &str, mbit: f64) -> ConePair {
        let rate = lab::Rate::mbit(mbit);
        let site = || SiteSpec::new(Nat::Cone).ipv6(false).rate(rate);
        let topo = Topology::new(tag, &[site(), site()]);
        let coturn = Coturn::start(
            topo.public(),
            CoturnConfig::new(&[PUBLIC_V4.into()], Some(SECRET)),
        );
        let rv_home = tempfile::tempdir().unwrap();
        let rv = topo.start_rendezvous(rv_home.path(), &["--no-relay"]);
        ConePair {
            _rv: rv,
            _rv_home: rv_home,
            coturn,
            topo,
        }
    }
}

/// Campaign: goodput relayed through coturn (UDP) against direct goodput on the same
/// 100 Mbit/s links, one pair, 48 MiB, two rounds each, interleaved (coturn must keep at
/// least 0.8x). Timed, so not in the default run:
/// `cargo test --test turn_lab -- --ignored --nocapture turn_goodput`.
#[test]
#[ignore = "campaign: cargo test --test turn_lab -- --ignored --nocapture turn_goodput"]
fn turn_goodput_against_direct() {
    const TEST: &str = "turn_goodput_against_direct";
    if !lab::require(TEST, &["tc", "turnserver"]) {
        return;
    }
    let pair = ConePair::start("tgput", 100.0);
    let (topo, coturn) = (&pair.topo, &pair.coturn);
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (round, turned) in [(0, false), (1, true), (2, false), (3, true)] {
        topo.block_direct(0, 1, turned);
        let (rx_home, tx_home) = (Home::minted("receiver"), Home::minted("sender"));
        let out = tempfile::tempdir().unwrap();
        let (mut receiver, code) = receive(topo.site(0).client(0), &rx_home, out.path());
        let name = format!("goodput{round}.bin");
        let (file, hash) = lab::make_file(dir.path(), &name, 48 << 20);
        let mut sender = send(topo.site(1).client(0), &tx_home, &file, &code);
        let (status, _) = sender.wait_exit(Duration::from_secs(120));
        assert!(
            status.success(),
            "{}\n{}\ncoturn:\n{}",
            sender.describe(),
            receiver.describe(),
            coturn.log()
        );
        let received = receiver.wait_for("received", Duration::from_secs(30));
        assert_eq!(received["blake3"], hash.as_str());
        let moved = events(&sender.seen, "path")
            .last()
            .map(|e| e["path"].clone());
        let connected = events(&sender.seen, "connected")
            .last()
            .map(|e| e["path"].clone());
        let path = moved.or(connected).unwrap();
        assert_eq!(
            path,
            if turned { "turn" } else { "direct" },
            "{}",
            sender.describe()
        );
        let summary = events(&sender.seen, "summary")
            .last()
            .copied()
            .cloned()
            .unwrap();
        results.push((turned, summary["mb_per_sec"].as_f64().unwrap()));
    }
    let mean = |turned: bool| {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == turned)
            .map(|r| r.1)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (direct, turned) = (mean(false), mean(true));
    eprintln!(
        "{TEST}: direct {direct:.2} MB/s, through coturn {turned:.2} MB/s ({:.2}x); rounds {results:?}",
        turned / direct
    );
    assert!(
        turned >= 0.8 * direct,
        "through coturn {turned:.2} MB/s, direct {direct:.2} MB/s"
    );
}

/// The moves between paths hold for TURN as for our own relay: with the direct path
/// between two cone routers blocked, the transfer starts through coturn; once the block
/// lifts, the same connection moves to the direct path (a `path` event) and completes
/// there, intact.
#[test]
fn a_turn_relayed_transfer_moves_to_direct_when_the_block_lifts() {
    const TEST: &str = "a_turn_relayed_transfer_moves_to_direct_when_the_block_lifts";
    if !lab::require(TEST, &["tc", "turnserver"]) {
        return;
    }
    let pair = ConePair::start("tmove", 40.0);
    let (topo, coturn) = (&pair.topo, &pair.coturn);
    topo.block_direct(0, 1, true);
    let (rx_home, tx_home) = (Home::minted("receiver"), Home::minted("sender"));
    let out = tempfile::tempdir().unwrap();
    let (mut receiver, code) = receive(topo.site(0).client(0), &rx_home, out.path());
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = lab::make_file(dir.path(), "moving.bin", 40 << 20);
    let mut sender = send(topo.site(1).client(0), &tx_home, &file, &code);
    let connected = sender.wait_for("connected", Duration::from_secs(30));
    assert_eq!(connected["path"], "turn", "{connected}\n{}", coturn.log());
    std::thread::sleep(Duration::from_secs(2));
    assert!(sender.try_exit().is_none(), "finished too soon");
    topo.block_direct(0, 1, false);
    let moved = sender.wait_for("path", Duration::from_secs(15));
    assert_eq!(moved["path"], "direct", "{moved}");
    assert_eq!(moved["from"], "turn", "{moved}");
    let (status, _) = sender.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{}", sender.describe());
    let sent = events(&sender.seen, "sent");
    assert_eq!(sent[0]["blake3"], hash.as_str());
    let connections = events(&sender.seen, "connected");
    assert_eq!(connections.len(), 1, "one connection");
    let received = receiver.wait_for("received", Duration::from_secs(30));
    assert_eq!(received["blake3"], hash.as_str());
}

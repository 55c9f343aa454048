//! `qpunch send FILE... --to HOST[:PORT]`: punch, hand over, pin, stream, verify.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::known_peers::KnownPeers;
use qpunch::node::{self, Congestion, Node, NodeConfig, NodeError, PeerConnection};
use qpunch::punch::{Method, PunchConfig, Punched};
use qpunch::transfer::{self, Outgoing};

use super::ui::{Event, FileProgress, Side, Ui};
use super::{
    DEFAULT_PORT, congestion_parser, known_peers_path, load_identity, parse_duration,
    parse_fingerprint,
};

/// How long to wait for a QUIC handshake with a peer that answered like the Go demo. Such
/// a peer has already shown it is not qpunch (a qpunch receiver answers probes with
/// qpunch replies), and quinn would otherwise wait out the whole idle timeout.
const LEGACY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Files to send (in parallel, over one connection).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The receiver: HOST or HOST:PORT (port 9199 when omitted).
    #[arg(long)]
    to: String,
    /// The receiver's fingerprint (from its `qpunch receive` banner). Without it, the
    /// first fingerprint seen is trusted and remembered in known_peers.
    #[arg(long, value_parser = parse_fingerprint)]
    peer: Option<Fingerprint>,
    /// Give up punching after this long (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    punch_timeout: Duration,
    /// Congestion controller: the sender's decides how fast files move (see README,
    /// "Speed on real links").
    #[arg(long = "cc", default_value_t = Congestion::default(), value_parser = congestion_parser())]
    congestion: Congestion,
}

pub async fn run(args: SendArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let outgoing = args
        .files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if !meta.is_file() {
                bail!(
                    "{} is not a regular file (directories are not supported yet)",
                    path.display()
                );
            }
            Ok(Outgoing::from_path(path)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let identity = load_identity()?;
    let (key, target) = resolve(&args.to).await?;

    // Whose key do we expect? An explicit --peer wins; else what we saw here before.
    let mut known = KnownPeers::load(known_peers_path()?)?;
    let remembered = known.get(&key);
    let expected = args.peer.or(remembered);

    ui.say(&format!("punching to {target} ..."));
    let punch = PunchConfig {
        timeout: args.punch_timeout,
        ..PunchConfig::default()
    };
    let config = NodeConfig {
        congestion: args.congestion,
        ..NodeConfig::new(identity, transfer::ALPN, false)
    };
    let node::HandOver {
        node,
        punched,
        punched_from,
    } = node::punch_and_hand_over(target, config, punch)
        .await
        .with_context(|| {
            format!("no answer from {target}: is `qpunch receive` running there, and UDP open?")
        })?;
    report_punched(&ui, &punched, punched_from);

    // A legacy punch proved the path, not the peer: TLS pinning below decides as always.
    let legacy = punched.method == Method::Legacy;
    let connecting = node.connect(punched.peer, expected);
    let connected = if legacy {
        match tokio::time::timeout(LEGACY_HANDSHAKE_TIMEOUT, connecting).await {
            Ok(connected) => connected,
            Err(_) => {
                node.close(node::QUICK_LINGER).await;
                let why = format!("no QUIC handshake within {LEGACY_HANDSHAKE_TIMEOUT:?}");
                bail!(not_qpunch(punched.peer, &why));
            }
        }
    } else {
        connecting.await
    };
    let peer = match connected {
        Ok(peer) => peer,
        Err(NodeError::PeerMismatch { expected, actual }) => {
            node.close(node::QUICK_LINGER).await;
            if args.peer.is_some() {
                bail!(
                    "the receiver at {key} presented identity {actual}, not the --peer {expected} you asked for; refusing to send"
                );
            }
            bail!(changed_identity_warning(
                &key,
                expected,
                actual,
                known.path()
            ));
        }
        Err(e) if legacy => bail!(not_qpunch(punched.peer, &e)),
        Err(e) => return Err(e).context(format!("QUIC connection to {} failed", punched.peer)),
    };
    if remembered.is_none() {
        known.remember(&key, peer.fingerprint)?;
        if args.peer.is_none() {
            ui.say(&format!(
                "trusting {key} as {} on first use (remembered in {})",
                peer.fingerprint,
                known.path().display()
            ));
        }
    }
    report_connected(&ui, &node, &peer)?;

    let progress = FileProgress::new(ui.clone(), Side::Sending);
    let result = transfer::send_files(&peer.connection, outgoing, progress).await;
    tracing::debug!(stats = ?peer.connection.stats(), "connection statistics");
    peer.connection.close(transfer::codes::DONE.into(), b"done");
    node.close(node::QUICK_LINGER).await;
    let reports = result?;
    let verified = reports.iter().filter(|r| r.is_verified()).count();
    if verified == reports.len() {
        ui.say(&format!("all {verified} file(s) delivered and verified"));
    } else {
        ui.say(&format!(
            "{verified} of {} file(s) delivered and verified",
            reports.len()
        ));
    }
    Ok(verified == reports.len())
}

/// The `punched` event. `from` is the socket's address while punching, read before
/// hand-over: `connected` shows the QUIC socket's, and the two ports must agree.
pub fn report_punched(ui: &Ui, punched: &Punched, from: SocketAddr) {
    let rtt_ms = punched.rtt.as_secs_f64() * 1000.0;
    let reflexive = punched.reflexive.map(canonical);
    let (probe, reply) = (qpunch::wire::PROBE_GREETING, qpunch::wire::REPLY_GREETING);
    let peer = punched.peer;
    let answer = match reflexive {
        Some(reflexive) => format!(
            "\"{probe}\" answered with \"{reply}\" by {peer} in {rtt_ms:.2} ms; it sees us as \
             {reflexive}"
        ),
        // Only a legacy reply leaves it unknown.
        None => format!(
            "{peer} answered \"{probe}\" with a plain \"{reply}\" in {rtt_ms:.2} ms, like the Go \
             hole-punching demo (it does not say how it sees us)"
        ),
    };
    ui.event(
        Event::Punched {
            peer: peer.to_string(),
            method: punched.method.as_str(),
            local_addr: from.to_string(),
            reflexive_addr: reflexive.map(|r| r.to_string()),
            rtt_ms,
        },
        Some(format!(
            "hole punched ({}): {answer}; socket {from} handed to QUIC",
            punched.method.as_str()
        )),
    );
}

/// Why a peer that punched like the Go demo cannot take files; `why` is what QUIC saw.
fn not_qpunch(peer: SocketAddr, why: &dyn std::fmt::Display) -> String {
    format!(
        "{peer} answered like the Go hole-punching demo (a plain \"{}\") but does not speak \
         QUIC/qpunch ({why}). The UDP path is open, yet nothing there can receive files: \
         run `qpunch receive` on that machine",
        qpunch::wire::REPLY_GREETING
    )
}

pub fn report_connected(ui: &Ui, node: &Node, peer: &PeerConnection) -> anyhow::Result<()> {
    let remote = canonical(peer.connection.remote_address());
    ui.event(
        Event::Connected {
            peer: remote.to_string(),
            fingerprint: peer.fingerprint,
            path: "direct",
            local_addr: node.local_addr()?.to_string(),
        },
        Some(format!(
            "connected to {remote} (identity {}), encrypted with TLS 1.3 over QUIC",
            peer.fingerprint
        )),
    );
    Ok(())
}

/// ssh-style refusal when a remembered peer shows a different key.
fn changed_identity_warning(
    key: &str,
    expected: Fingerprint,
    actual: Fingerprint,
    path: &std::path::Path,
) -> String {
    format!(
        "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         @    WARNING: REMOTE PEER IDENTIFICATION HAS CHANGED!     @\n\
         @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
         The receiver at {key} presented identity\n    {actual}\n\
         but {path} remembers it as\n    {expected}\n\
         Nothing was sent. If the receiver really has a new identity, check it with its owner,\n\
         then remove the line for {key} from {path} (or pass --peer {actual}).",
        path = path.display()
    )
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) shown as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Resolve `--to` into the name remembered in known_peers and a socket address.
async fn resolve(to: &str) -> anyhow::Result<(String, SocketAddr)> {
    if let Ok(addr) = to.parse::<SocketAddr>() {
        return Ok((addr.to_string(), addr));
    }
    let bare = to.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, DEFAULT_PORT);
        return Ok((addr.to_string(), addr));
    }
    let name = match to.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => to.to_string(),
        _ => format!("{to}:{DEFAULT_PORT}"),
    };
    let addr = tokio::net::lookup_host(&name)
        .await
        .with_context(|| format!("cannot resolve {name}"))?
        .next()
        .with_context(|| format!("{name} has no address"))?;
    Ok((name, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn to_accepts_addresses_with_and_without_port() {
        let cases = [
            ("127.0.0.1:4000", "127.0.0.1:4000"),
            ("127.0.0.1", "127.0.0.1:9199"),
            ("[::1]:4000", "[::1]:4000"),
            ("[::1]", "[::1]:9199"),
            ("::1", "[::1]:9199"),
        ];
        for (to, want) in cases {
            let (key, addr) = resolve(to).await.unwrap();
            assert_eq!(addr.to_string(), want, "{to}");
            assert_eq!(key, want, "known_peers key for {to}");
        }
        // Names keep the form the user typed (plus the default port) as their key.
        let (key, addr) = resolve("localhost").await.unwrap();
        assert_eq!(key, "localhost:9199");
        assert_eq!(addr.port(), 9199);
        assert!(addr.ip().is_loopback());
    }

    #[test]
    fn reflexive_addresses_print_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:5000".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "198.51.100.1:5000");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}

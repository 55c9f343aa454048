//! `qpunch send FILE... --to HOST[:PORT]`: punch, hand over, pin, stream, verify.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::known_peers::KnownPeers;
use qpunch::node::{self, Congestion, Node, NodeConfig, NodeError, PeerConnection};
use qpunch::punch::{Method, PunchConfig, Punched};
use qpunch::transfer::tree::TreeCache;
use qpunch::transfer::{self, Selection, SendOptions, TransferError};
use qpunch::trust::{Trust, TrustDecision, TrustError};

use super::common::{canonical, report_connected, report_punched};
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
    /// Files and folders to send (in parallel, over one connection). Folders are sent
    /// whole; symbolic links inside them are skipped.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The receiver: its one-time code (NAMEPLATE-WORD-WORD: met through a rendezvous,
    /// or, with none configured, found on the local network), or HOST / HOST:PORT (port
    /// 9199 when omitted).
    #[arg(long)]
    to: String,
    /// The rendezvous to meet the receiver through, for a code: HOST[:PORT] (port 9200);
    /// default $QPUNCH_RENDEZVOUS, or `rendezvous = "..."` in the qpunch home's config.toml.
    #[arg(long)]
    via: Option<String>,
    /// The receiver's fingerprint (from its `qpunch receive` banner). Without it, the
    /// first fingerprint seen is trusted and remembered in known_peers.
    #[arg(long, value_parser = parse_fingerprint)]
    peer: Option<Fingerprint>,
    /// Give up when the receiver takes no data for this long (it vanished).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Give up punching after this long (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    punch_timeout: Duration,
    /// Congestion controller: the sender's decides how fast files move (see README,
    /// "Speed on real links").
    #[arg(long = "cc", default_value_t = Congestion::default(), value_parser = congestion_parser())]
    congestion: Congestion,
}

pub async fn run(args: SendArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    // Transfer errors carry their cause in their message: no chain to print twice.
    let selection = transfer::select(&args.files).map_err(|e| anyhow::anyhow!("{e}"))?;
    for skipped in &selection.skipped {
        ui.warn(&format!("skipped {skipped}"));
    }
    let identity = load_identity(&ui)?;
    if let Some(code) = super::meet::as_code(&args.to) {
        return send_by_code(&args, code?, identity, selection, ui).await;
    }
    let (key, target) = resolve(&args.to).await?;

    // Whose key do we expect? An explicit --peer wins; else what we saw here before.
    let known = KnownPeers::load(known_peers_path()?)?;
    if let Some(warning) = skipped_lines_warning(&known) {
        ui.warn(&warning);
    }
    let mut trust = Trust::new(known, key.clone(), args.peer);
    let expected = trust.expected();

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
    if let Err(refused) = trust.check_reply(target, punched.peer) {
        node.close(node::QUICK_LINGER).await;
        bail!(refusal(&refused));
    }

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
            bail!(refusal(&trust.mismatch(expected, actual)));
        }
        Err(e) if legacy => bail!(not_qpunch(punched.peer, &e)),
        Err(e) => return Err(e).context(format!("QUIC connection to {} failed", punched.peer)),
    };
    match trust.accept(peer.fingerprint) {
        Ok(TrustDecision::FirstUse { file }) => {
            // The address actually dialled, which `check_reply` tied to `--to`.
            ui.say(&format!(
                "trusting {key} as {} on first use: the receiver that answered at {} \
                 (remembered in {})",
                peer.fingerprint,
                canonical(peer.connection.remote_address()),
                file.display()
            ));
        }
        Ok(TrustDecision::Pinned) => {}
        Err(TrustError::KnownPeers(e)) => return Err(e.into()),
        Err(refused) => bail!(refusal(&refused)),
    }
    report_connected(&ui, &node, &peer, "direct")?;
    let to = peer_addr(&punched);
    deliver(&ui, &node, &peer, selection, args.stall_timeout, &to).await
}

/// Meet the receiver behind `code` through the rendezvous, then deliver. Nothing is
/// remembered in known_peers: the code pinned the receiver, once.
async fn send_by_code(
    args: &SendArgs,
    code: qpunch::meet::code::Code,
    identity: qpunch::identity::Identity,
    selection: Selection,
    ui: Arc<Ui>,
) -> anyhow::Result<bool> {
    let Some(rendezvous) = super::meet::rendezvous_name(args.via.as_deref())? else {
        return send_on_lan(
            code,
            identity,
            selection,
            args.stall_timeout,
            args.congestion,
            ui,
        )
        .await;
    };
    let socket = super::bind_dual_stack(0)?;
    let node = Arc::new(Node::new(
        socket,
        NodeConfig {
            congestion: args.congestion,
            ..NodeConfig::new(identity, transfer::ALPN, false)
        },
    )?);
    let (client, report) = super::meet::connect(&ui, &node, &rendezvous).await?;
    let events = super::meet::CliEvents::new(ui.clone(), None);
    let meeting = qpunch::meet::Meeting {
        node: &node,
        rendezvous: &client,
        nat: report.mapping,
        config: qpunch::meet::MeetConfig::default(),
        events: &events,
    };
    ui.say(&format!("meeting {code} through {rendezvous} ..."));
    let met = meeting
        .dial(&code)
        .await
        .with_context(|| format!("could not meet the receiver of {code}"))?;
    // The rendezvous connection ends by itself once our last message there is delivered.
    drop(client);
    let sending = met.node.clone().unwrap_or_else(|| node.clone());
    let path = if met.method == "lan" { "lan" } else { "direct" };
    report_connected(&ui, &sending, &met.peer, path)?;
    let to = canonical(met.peer.connection.remote_address()).to_string();
    let delivered = deliver(&ui, &sending, &met.peer, selection, args.stall_timeout, &to).await;
    node.close(node::QUICK_LINGER).await;
    delivered
}

/// With no rendezvous: find the receiver of `code` on the local network (mDNS), prove the
/// code over the direct connection, then deliver on it. Nothing is remembered in
/// known_peers: the code confirmed the receiver, once.
async fn send_on_lan(
    code: qpunch::meet::code::Code,
    identity: qpunch::identity::Identity,
    selection: Selection,
    stall_timeout: Duration,
    congestion: Congestion,
    ui: Arc<Ui>,
) -> anyhow::Result<bool> {
    use qpunch::meet::lan::{self, Lan};
    let node = Node::new(
        super::bind_dual_stack(0)?,
        NodeConfig {
            congestion,
            ..NodeConfig::new(identity, transfer::ALPN, false)
        },
    )?;
    let lan = Lan::start().context("cannot look for the receiver on the local network")?;
    ui.say(&format!(
        "looking for the receiver of {code} on this network (no rendezvous configured) ..."
    ));
    let dialed = lan::dial(&node, &lan, &code, lan::FIND_TIMEOUT).await;
    lan.shutdown().await;
    let dialed = match dialed {
        Ok(dialed) => dialed,
        Err(e) => {
            node.close(node::QUICK_LINGER).await;
            return Err(e).with_context(|| format!("could not meet the receiver of {code}"));
        }
    };
    let addrs: Vec<String> = dialed
        .sightings
        .addrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    ui.event(
        Event::Found {
            nameplate: code.nameplate().to_string(),
            addrs: addrs.clone(),
        },
        Some(format!(
            "found nameplate {} on this network at {}; the code matched",
            code.nameplate(),
            addrs.join(", ")
        )),
    );
    report_connected(&ui, &node, &dialed.peer, "lan")?;
    let to = canonical(dialed.peer.connection.remote_address()).to_string();
    deliver(&ui, &node, &dialed.peer, selection, stall_timeout, &to).await
}

/// Send the selection on an authenticated connection (to `to`, for the summary), report,
/// and close.
async fn deliver(
    ui: &Arc<Ui>,
    node: &Node,
    peer: &PeerConnection,
    selection: Selection,
    stall_timeout: Duration,
    to: &str,
) -> anyhow::Result<bool> {
    let progress = FileProgress::new(ui.clone(), Side::Sending);
    let options = SendOptions {
        cache: tree_cache(),
        empty_dirs: selection.empty_dirs,
        stall_timeout,
    };
    let started = std::time::Instant::now();
    let sending =
        transfer::send_files_with(&peer.connection, selection.files, progress.clone(), options);
    // Cancel-safe: on Ctrl-C the transfer future is dropped; the receiver is told at once
    // (it keeps what arrived for a resume) instead of waiting for a timeout.
    let result = tokio::select! {
        result = sending => result,
        _ = tokio::signal::ctrl_c() => {
            peer.close(transfer::codes::CANCELLED, b"sender interrupted");
            node.close(node::QUICK_LINGER).await;
            progress.clear();
            bail!("interrupted: run the same command again to resume");
        }
    };
    tracing::debug!(stats = ?peer.connection.stats(), "connection statistics");
    // A file we could not read ends the send before anything is offered: say so.
    let (code, reason): (u32, &[u8]) = match &result {
        Err(TransferError::File { .. }) => (
            transfer::codes::READ_FAILED,
            b"the sender could not read its files",
        ),
        _ => (transfer::codes::DONE, b"done"),
    };
    peer.close(code, reason);
    node.close(node::QUICK_LINGER).await;
    let reports = result.map_err(|e| anyhow::anyhow!("{e}"))?;
    let verified = reports.iter().filter(|r| r.is_verified()).count();
    progress.summary(&reports, started.elapsed(), to);
    Ok(verified == reports.len())
}

/// Where the sender remembers the trees of files it hashed (`<qpunch home>/cache`); a
/// cache that cannot be opened only costs hashing again.
fn tree_cache() -> Option<Arc<TreeCache>> {
    let dir = qpunch::identity::config_dir().ok()?.join("cache");
    match TreeCache::open(&dir) {
        Ok(cache) => Some(Arc::new(cache)),
        Err(e) => {
            tracing::warn!("no tree cache in {}: {e}", dir.display());
            None
        }
    }
}

fn peer_addr(punched: &Punched) -> String {
    canonical(punched.peer).to_string()
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

/// What to tell the user about lines of known_peers that were not understood, if any.
fn skipped_lines_warning(known: &KnownPeers) -> Option<String> {
    let skipped = known.skipped();
    if skipped.is_empty() {
        return None;
    }
    let lines: Vec<String> = skipped.iter().map(|n| n.to_string()).collect();
    let (noun, them) = if skipped.len() == 1 {
        ("line", "it")
    } else {
        ("lines", "them")
    };
    Some(format!(
        "{}: ignoring {noun} {} (not `host:port fingerprint`); fix or delete {them}",
        known.path().display(),
        lines.join(", ")
    ))
}

/// What the user reads when the trust policy refuses a peer.
fn refusal(refused: &TrustError) -> String {
    match refused {
        TrustError::ReplyFromElsewhere { target, answered } => format!(
            "the probe reply came from {answered}, not from {target} where the probe went. Anyone who \
             saw the probe can answer from elsewhere, and without --peer the key that answers \
             would be trusted on first use: nothing was sent or remembered. If that is the \
             receiver (behind a NAT that changes ports), check its fingerprint with its owner \
             and pass --peer FINGERPRINT"
        ),
        TrustError::NotTheGivenKey {
            key,
            expected,
            actual,
        } => format!(
            "the receiver at {key} presented identity {actual}, not the --peer {expected} you asked for; refusing to send"
        ),
        TrustError::Changed {
            key,
            expected,
            actual,
            known_peers,
        } => changed_identity_warning(key, *expected, *actual, known_peers),
        other => other.to_string(),
    }
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

/// Resolve `--to` into the name remembered in known_peers and a socket address.
async fn resolve(to: &str) -> anyhow::Result<(String, SocketAddr)> {
    super::resolve_host(to, DEFAULT_PORT).await
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
}

//! `qpunch receive`: answer probes, accept QUIC, ask or check, store verified files.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::node::{Congestion, Node, NodeConfig, NodeError, PeerConnection};
use qpunch::server::{Limits, Server};
use qpunch::transfer::{
    self, FileReport, Observer, Policy, ReceiveEvents, ReceiveOptions, Receiver, TransferError,
};

use super::send::report_connected;
use super::ui::{Event, FileProgress, Side, TerminalConsent, Ui};
use super::{
    DEFAULT_PORT, congestion_parser, load_identity, parse_duration, parse_fingerprint, parse_size,
};

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// UDP port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address to bind: an IP (e.g. 0.0.0.0, or [::] for IPv6 and IPv4) or IP:PORT.
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// Directory to store files in [default: your Downloads folder's "qpunch" subfolder].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Accept every file from every sender without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Accept files only from this sender fingerprint, without asking (repeatable).
    #[arg(long, value_parser = parse_fingerprint)]
    allow: Vec<Fingerprint>,
    /// Serve exactly one accepted transfer, then exit (status 0 only if every file verified).
    #[arg(long)]
    once: bool,
    /// Replace existing files instead of saving as "name (1).ext".
    #[arg(long)]
    overwrite: bool,
    /// Keep file names that start with "." (by default ".x" is saved as "_x").
    #[arg(long)]
    allow_dotfiles: bool,
    /// Most connections served at once, handshakes included.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Most connections at once from one IP address (or IPv6 /64).
    #[arg(long, default_value_t = Limits::default().max_per_ip)]
    max_per_ip: usize,
    /// Abandon a QUIC handshake that takes longer than this.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Give up on a sender that moves no data for this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Cut off a sender slower than this many bytes per second (averaged over windows of
    /// twice --stall-timeout), e.g. 4KiB.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    min_rate: u64,
    /// Congestion controller of the receiver's connections. It only paces what the
    /// receiver sends (acknowledgements, verdicts): the sender's `--cc` sets the speed.
    #[arg(long = "cc", default_value_t = Congestion::default(), value_parser = congestion_parser())]
    congestion: Congestion,
}

pub async fn run(args: ReceiveArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let policy = if !args.allow.is_empty() {
        Policy::Allow(args.allow.clone())
    } else if args.yes {
        Policy::AcceptAll
    } else if TerminalConsent::available() {
        Policy::Ask(Arc::new(TerminalConsent { ui: ui.clone() }))
    } else {
        bail!(
            "refusing to receive: there is no terminal to ask for consent. \
             Pass --yes to accept files from anyone, or --allow FINGERPRINT to accept a known sender"
        );
    };
    let out = match args.out.clone() {
        Some(out) => out,
        None => {
            let out = default_out_dir()?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            out
        }
    };
    let bind = bind_addr(&args.bind, args.port)?;
    let identity = load_identity()?;
    let socket = qpunch::socket::bind(bind)?;
    let node = Arc::new(Node::new(
        socket,
        NodeConfig {
            congestion: args.congestion,
            ..NodeConfig::new(identity, transfer::ALPN, true)
        },
    )?);
    let events = Arc::new(Events {
        ui: ui.clone(),
        node: node.clone(),
    });
    let receiver = Receiver::with_events(
        ReceiveOptions {
            overwrite: args.overwrite,
            stall_timeout: args.stall_timeout,
            min_rate: args.min_rate,
            allow_dotfiles: args.allow_dotfiles,
            once: args.once,
            ..ReceiveOptions::new(&out, policy)
        },
        events,
    )?;
    announce(&ui, &node, &out)?;

    let limits = Limits {
        max_connections: args.max_connections,
        max_per_ip: args.max_per_ip,
        handshake_timeout: args.handshake_timeout,
        ..Limits::default()
    };
    let server = Server::new(node.clone(), receiver.clone(), limits);
    let server_stats = server.stats();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let once = args.once;
    let stop = async {
        // Cancel-safe: every branch only waits for a signal or a value.
        tokio::select! {
            ok = receiver.finished_once(), if once => ok,
            _ = tokio::signal::ctrl_c() => {
                ui.say("interrupted");
                false
            }
            _ = terminate.recv() => {
                ui.say("terminated");
                false
            }
        }
    };
    // The server stops accepting when `stop` completes, then waits for its handlers: a
    // transfer interrupted by a signal is cut short (its partial files removed).
    let (tx, rx) = tokio::sync::oneshot::channel();
    server
        .run(async {
            let _ = tx.send(stop.await);
        })
        .await;
    let ok = rx.await.unwrap_or(false);
    node.close(qpunch::node::QUICK_LINGER).await;
    ui.event(
        Event::Stats {
            socket: node.socket_stats(),
            server: Some(server_stats.get()),
        },
        None,
    );
    // Without --once a receiver runs until told to stop: that is success.
    Ok(!once || ok)
}

/// The receiver's events, rendered.
struct Events {
    ui: Arc<Ui>,
    node: Arc<Node>,
}

impl ReceiveEvents for Events {
    fn connected(&self, peer: &PeerConnection) -> Arc<dyn Observer> {
        let _ = report_connected(&self.ui, &self.node, peer);
        FileProgress::new(self.ui.clone(), Side::Receiving(peer.fingerprint))
    }

    fn finished(&self, peer: &PeerConnection, outcome: &Result<Vec<FileReport>, TransferError>) {
        if let Err(e) = outcome {
            self.ui
                .error(&format!("transfer from {} failed: {e}", peer.fingerprint));
        }
        tracing::debug!(stats = ?self.node.socket_stats(), "socket counters");
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        // Scanners and strangers are counted in `stats`, not printed one by one.
        tracing::info!(%remote, "incoming connection failed: {error}");
    }
}

/// `$XDG_DOWNLOAD_DIR` (or the platform's Downloads folder) + `/qpunch`: a folder of its
/// own, so that a sender can never drop files into the directory `receive` happens to be
/// started from (a home directory, a project).
fn default_out_dir() -> anyhow::Result<PathBuf> {
    let downloads = std::env::var_os("XDG_DOWNLOAD_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(dirs::download_dir)
        .or_else(|| dirs::home_dir().map(|home| home.join("Downloads")))
        .context("cannot find a Downloads folder: pass --out DIR")?;
    Ok(downloads.join("qpunch"))
}

/// Print how to reach this receiver.
fn announce(ui: &Ui, node: &Node, out: &std::path::Path) -> anyhow::Result<()> {
    let local = node.local_addr()?;
    let addrs = reachable_addrs(local);
    let fp = node.fingerprint();
    let mut text = format!(
        "qpunch is receiving on UDP port {}\n  saving to: {}\n  identity: {fp}\n",
        local.port(),
        out.display()
    );
    for addr in &addrs {
        text.push_str(&format!("  address:  {addr}\n"));
    }
    let example = addrs
        .first()
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("HOST:{}", local.port()));
    text.push_str(&format!(
        "On the sending machine, run:\n  qpunch send FILE --to {example} --peer {fp}"
    ));
    ui.event(
        Event::Listening {
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            port: local.port(),
            fingerprint: fp,
        },
        None,
    );
    ui.output(&text);
    Ok(())
}

/// Addresses a sender could use: the bound one, or every interface's for a wildcard
/// bind (non-loopback first). Behind a NAT the public address differs; the sender
/// learns its own from the probe reply, and rendezvous will exchange them later.
fn reachable_addrs(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let dual = local.is_ipv6();
    let mut addrs: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| dual || ip.is_ipv4())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect();
    addrs.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6()));
    if addrs.is_empty() {
        addrs.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port()));
    }
    addrs
}

fn bind_addr(bind: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = bind.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = bind.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare
        .parse()
        .with_context(|| format!("--bind {bind:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_takes_an_ip_or_a_full_address() {
        assert_eq!(
            bind_addr("0.0.0.0", 9199).unwrap().to_string(),
            "0.0.0.0:9199"
        );
        assert_eq!(bind_addr("[::]", 9199).unwrap().to_string(), "[::]:9199");
        assert_eq!(bind_addr("::", 7).unwrap().to_string(), "[::]:7");
        assert_eq!(
            bind_addr("127.0.0.1:5000", 9199).unwrap().to_string(),
            "127.0.0.1:5000"
        );
        assert!(bind_addr("example.com", 9199).is_err());
    }

    #[test]
    fn announced_addresses_carry_the_port_and_put_loopback_last() {
        let specific: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(reachable_addrs(specific), vec![specific]);
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let addrs = reachable_addrs(any);
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 4000 && a.is_ipv4()));
        let first_loopback = addrs.iter().position(|a| a.ip().is_loopback());
        if let Some(i) = first_loopback {
            assert!(addrs[i..].iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        }
    }
}

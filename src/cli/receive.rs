//! `qpunch receive`: answer probes, accept QUIC, ask or check, store verified files.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::transfer::{self, Policy, ReceiveOptions, Receiver};

use super::send::report_connected;
use super::ui::{Event, FileProgress, Side, TerminalConsent, Ui};
use super::{DEFAULT_PORT, load_identity, parse_fingerprint};

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// UDP port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address to bind: an IP (e.g. 0.0.0.0, or [::] for IPv6 and IPv4) or IP:PORT.
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// Directory to store files in.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Accept every file from every sender without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Accept files only from this sender fingerprint, without asking (repeatable).
    #[arg(long, value_parser = parse_fingerprint)]
    allow: Vec<Fingerprint>,
    /// Serve exactly one sender, then exit (status 0 only if every file verified).
    #[arg(long)]
    once: bool,
    /// Replace existing files instead of saving as "name (1).ext".
    #[arg(long)]
    overwrite: bool,
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
    let receiver = Receiver::new(ReceiveOptions {
        out_dir: args.out.clone(),
        overwrite: args.overwrite,
        policy,
        stall_timeout: transfer::STALL_TIMEOUT,
    })?;
    let bind = bind_addr(&args.bind, args.port)?;
    let identity = load_identity()?;
    let socket = qpunch::socket::bind(bind)?;
    let node = Arc::new(Node::new(
        socket,
        NodeConfig::new(identity, transfer::ALPN, true),
    )?);
    announce(&ui, &node)?;

    let ok = if args.once {
        // Ctrl-C drops the transfer in flight, which removes its `.part` files.
        tokio::select! {
            ok = async {
                // A failed handshake (a scanner, a sender that refused our key) is not
                // "the one transfer": keep waiting for a sender that gets through.
                let peer = loop {
                    match node.accept().await.context("endpoint closed")? {
                        Ok(peer) => break peer,
                        Err(e) => ui.error(&format!("incoming connection failed: {e}")),
                    }
                };
                anyhow::Ok(serve(peer, &receiver, &ui, &node).await)
            } => ok?,
            _ = tokio::signal::ctrl_c() => {
                ui.say("interrupted");
                false
            }
        }
    } else {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = node.accept() => {
                    match incoming {
                        None => break,
                        Some(Ok(peer)) => {
                            let (receiver, ui, node) = (receiver.clone(), ui.clone(), node.clone());
                            tasks.spawn(async move { serve(peer, &receiver, &ui, &node).await });
                        }
                        Some(Err(e)) => ui.error(&format!("incoming connection failed: {e}")),
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::signal::ctrl_c() => {
                    ui.say("stopping");
                    break;
                }
            }
        }
        true
    };
    node.close(qpunch::node::QUICK_LINGER).await;
    let stats = node.socket_stats();
    ui.event(
        Event::Stats {
            probes_answered: stats.probes_answered,
            legacy_answered: stats.legacy_answered,
            malformed_dropped: stats.malformed_dropped,
        },
        None,
    );
    Ok(ok)
}

/// Serve one connection; true when every offered file arrived verified.
async fn serve(peer: PeerConnection, receiver: &Receiver, ui: &Arc<Ui>, node: &Node) -> bool {
    if report_connected(ui, node, &peer).is_err() {
        return false;
    }
    let progress = FileProgress::new(ui.clone(), Side::Receiving(peer.fingerprint));
    let ok = match receiver.handle(&peer, progress).await {
        Ok(reports) => reports.iter().all(|r| r.is_verified()),
        Err(e) => {
            ui.error(&format!("transfer from {} failed: {e}", peer.fingerprint));
            false
        }
    };
    // Let the sender read the verdicts and close first; don't wait forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), peer.connection.closed()).await;
    tracing::debug!(stats = ?node.socket_stats(), "socket counters");
    ok
}

/// Print how to reach this receiver.
fn announce(ui: &Ui, node: &Node) -> anyhow::Result<()> {
    let local = node.local_addr()?;
    let addrs = reachable_addrs(local);
    let fp = node.fingerprint();
    let mut text = format!(
        "qpunch is receiving on UDP port {}\n  identity: {fp}\n",
        local.port()
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

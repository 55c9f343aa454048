//! `qpunch rendezvous`: where peers behind NATs meet by one-time code.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use qpunch::addr::canonical;
use qpunch::rendezvous::{self, Rendezvous, RendezvousConfig, RendezvousEvents};

use super::load_identity;
use super::ui::{Event, Ui};

#[derive(Debug, Args)]
pub struct RendezvousArgs {
    /// Address to bind: an IP ([::] serves IPv6 and IPv4) or IP:PORT.
    #[arg(long, default_value = "[::]")]
    bind: String,
    /// UDP port (QUIC and probes); the next port answers probes only, for NAT checks.
    #[arg(long, default_value_t = rendezvous::DEFAULT_PORT)]
    port: u16,
    /// TCP port of the TLS listener for clients whose network blocks UDP [default: the
    /// UDP port's number]; 443 gets through the most firewalls.
    #[arg(long, value_name = "PORT", conflicts_with = "no_tcp")]
    tcp_port: Option<u16>,
    /// Serve UDP only: no TLS-over-TCP listener.
    #[arg(long)]
    no_tcp: bool,
}

pub async fn run(args: RendezvousArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let bind = super::common::bind_addr(&args.bind, args.port)?;
    let identity = load_identity(&ui)?;
    let events = Arc::new(Pairings { ui: ui.clone() });
    let serve = |addr| {
        Rendezvous::bind(
            addr,
            identity.clone(),
            RendezvousConfig {
                tcp: match (args.no_tcp, args.tcp_port) {
                    (true, _) => rendezvous::TcpPort::Off,
                    (false, Some(port)) => rendezvous::TcpPort::Port(port),
                    (false, None) => rendezvous::TcpPort::SameAsUdp,
                },
                ..RendezvousConfig::default()
            },
            events.clone(),
        )
    };
    let bound = serve(bind)
        .or_else(|e| {
            // A system without IPv6 cannot bind [::]: serve IPv4.
            if bind.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) {
                serve(SocketAddr::from((
                    std::net::Ipv4Addr::UNSPECIFIED,
                    args.port,
                )))
            } else {
                Err(e)
            }
        })
        .with_context(|| format!("cannot serve a rendezvous on {bind}"))?;
    let local = bound.node.local_addr()?;
    let fingerprint = bound.node.fingerprint();
    let addrs: Vec<String> = reachable(local);
    let tcp_port = bound.rendezvous.tcp_addr().map(|a| a.port());
    ui.event(
        Event::Rendezvous {
            addrs: addrs.clone(),
            port: local.port(),
            alt_port: local.port().wrapping_add(1),
            tcp_port,
            fingerprint,
        },
        None,
    );
    let tcp = match tcp_port {
        Some(port) => format!(", TCP port {port} (TLS, for networks that block UDP)"),
        None => String::new(),
    };
    ui.output(&format!(
        "qpunch rendezvous on UDP port {} (and {} for NAT checks){tcp}\n  identity:  {fingerprint}\n{}\
         Peers use it with:\n  export QPUNCH_RENDEZVOUS={}",
        local.port(),
        local.port().wrapping_add(1),
        addrs
            .iter()
            .map(|a| format!("  address:   {a}\n"))
            .collect::<String>(),
        addrs
            .first()
            .cloned()
            .unwrap_or_else(|| format!("HOST:{}", local.port())),
    ));
    let stats = bound.server.stats();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    bound
        .server
        .run(async {
            // Cancel-safe: both only wait for a signal.
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        })
        .await;
    bound.node.close(qpunch::node::QUICK_LINGER).await;
    let counters = bound.rendezvous.stats();
    ui.say(&format!(
        "stopped: {} pairing(s), {} code(s) opened, {} expired, {} failed",
        counters.paired, counters.opened, counters.expired, counters.failed
    ));
    ui.event(
        Event::Stats {
            socket: bound.node.socket_stats(),
            server: Some(stats.get()),
            lan: None,
        },
        None,
    );
    Ok(true)
}

/// One line per pairing.
struct Pairings {
    ui: Arc<Ui>,
}

impl RendezvousEvents for Pairings {
    fn paired(&self, nameplate: &str, receiver: SocketAddr, sender: SocketAddr) {
        let (receiver, sender) = (canonical(receiver), canonical(sender));
        self.ui.event(
            Event::Pairing {
                nameplate: nameplate.to_string(),
                receiver: receiver.to_string(),
                sender: sender.to_string(),
            },
            Some(format!("paired {nameplate}: {receiver} <-> {sender}")),
        );
    }
}

/// Addresses to tell peers (every interface's, for a wildcard bind).
fn reachable(local: SocketAddr) -> Vec<String> {
    qpunch::share::reachable_addrs(local)
        .into_iter()
        .map(|a| a.to_string())
        .collect()
}

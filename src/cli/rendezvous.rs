//! `qpunch rendezvous`: where peers behind NATs meet by one-time code.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use qpunch::addr::canonical;
use qpunch::rendezvous::{self, RelayLimits, Rendezvous, RendezvousConfig, RendezvousEvents};

use super::ui::HumanBytes;
use super::ui::{Event, Ui};
use super::{load_identity, parse_duration, parse_size};

#[derive(Debug, Args)]
pub struct RendezvousArgs {
    /// Address to bind: an IP ([::] serves IPv6 and IPv4) or IP:PORT.
    #[arg(long, default_value = "[::]")]
    bind: String,
    /// UDP port (QUIC and probes); the next port answers probes only, for NAT checks.
    #[arg(long, default_value_t = rendezvous::DEFAULT_PORT)]
    port: u16,
    /// Relay nothing: paired peers that cannot punch a direct path cannot meet.
    #[arg(long, conflicts_with_all = ["relay_quota", "relay_rate", "relay_lifetime", "relay_idle"])]
    no_relay: bool,
    /// Bytes one pair may relay, both directions together (e.g. 8G, 500M); then both
    /// peers are cut off.
    #[arg(long, default_value = "8G", value_parser = parse_size)]
    relay_quota: u64,
    /// Bytes per second one pair may relay, both directions together (e.g. 10M is
    /// 10 MiB/s, about 84 Mbit/s); faster datagrams are dropped. 0: no limit.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    relay_rate: u64,
    /// How long a pair may relay (seconds, or e.g. 6h, 90m); then both peers are cut off.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    relay_lifetime: std::time::Duration,
    /// A pair's relay through which nothing passed for this long ends (seconds, or e.g.
    /// 2m).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    relay_idle: std::time::Duration,
    /// TCP port of the TLS listener for clients whose network blocks UDP [default: the
    /// UDP port's number]; 443 gets through the most firewalls.
    #[arg(long, value_name = "PORT", conflicts_with = "no_tcp")]
    tcp_port: Option<u16>,
    /// Serve UDP only: no TLS-over-TCP listener.
    #[arg(long)]
    no_tcp: bool,
    /// A TURN server (turn:HOST:PORT, turns:HOST:PORT) whose REST API secret is in
    /// --turn-secret: each paired peer gets short-lived credentials of its own for it, and
    /// relays through it when no direct path is found (coturn: use-auth-secret).
    #[arg(long, value_name = "URL", requires = "turn_secret")]
    turn: Option<String>,
    /// The file holding the TURN server's shared secret (coturn's static-auth-secret);
    /// one line, surrounding whitespace ignored.
    #[arg(long, value_name = "FILE", requires = "turn")]
    turn_secret: Option<std::path::PathBuf>,
    /// How long minted TURN credentials live (seconds, or e.g. 1h): a pair can relay
    /// through TURN for about this long.
    #[arg(long, default_value = "1h", value_parser = parse_duration, requires = "turn")]
    turn_lifetime: std::time::Duration,
}

impl RendezvousArgs {
    fn config(&self) -> anyhow::Result<RendezvousConfig> {
        let relay = (!self.no_relay).then_some(RelayLimits {
            quota: self.relay_quota,
            rate: self.relay_rate,
            lifetime: self.relay_lifetime,
            idle: self.relay_idle,
        });
        Ok(RendezvousConfig {
            relay,
            tcp: match (self.no_tcp, self.tcp_port) {
                (true, _) => rendezvous::TcpPort::Off,
                (false, Some(port)) => rendezvous::TcpPort::Port(port),
                (false, None) => rendezvous::TcpPort::SameAsUdp,
            },
            turn: self.turn_mint()?,
            ..RendezvousConfig::default()
        })
    }

    /// `--turn` and `--turn-secret`, read and checked before anything is bound.
    fn turn_mint(&self) -> anyhow::Result<Option<rendezvous::TurnMint>> {
        let (Some(url), Some(file)) = (&self.turn, &self.turn_secret) else {
            return Ok(None);
        };
        let url: qpunch::turn::TurnUrl = url.parse()?;
        let secret = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the TURN secret {}", file.display()))?;
        let secret = secret.trim();
        anyhow::ensure!(
            !secret.is_empty(),
            "the TURN secret file {} is empty",
            file.display()
        );
        Ok(Some(rendezvous::TurnMint {
            url,
            secret: secret.as_bytes().to_vec(),
            lifetime: self.turn_lifetime,
        }))
    }
}

pub async fn run(args: RendezvousArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let bind = super::common::bind_addr(&args.bind, args.port)?;
    let identity = load_identity(&ui)?;
    let events = Arc::new(Pairings { ui: ui.clone() });
    let config = args.config()?;
    let serve = |addr| Rendezvous::bind(addr, identity.clone(), config.clone(), events.clone());
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
        "stopped: {} pairing(s), {} code(s) opened, {} expired, {} failed; relayed {} in {} \
         datagram(s), {} dropped, {} pair(s) cut at their quota",
        counters.paired,
        counters.opened,
        counters.expired,
        counters.failed,
        HumanBytes(counters.relayed_bytes),
        counters.relayed_packets,
        counters.relay_dropped,
        counters.relay_cut,
    ));
    ui.event(
        Event::Stats {
            socket: bound.node.socket_stats(),
            server: Some(stats.get()),
            lan: None,
            rendezvous: Some(counters),
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

    fn relay_ended(&self, nameplate: &str, bytes: u64, why: &str) {
        self.ui.event(
            Event::RelayEnded {
                nameplate: nameplate.to_string(),
                bytes,
                why: why.to_string(),
            },
            Some(format!(
                "relay {nameplate} ended ({why}): {} relayed",
                HumanBytes(bytes)
            )),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: RendezvousArgs,
    }

    fn config(args: &[&str]) -> Result<RendezvousConfig, clap::Error> {
        let argv = std::iter::once("rendezvous").chain(args.iter().copied());
        Ok(Cli::try_parse_from(argv)?.args.config().unwrap())
    }

    #[test]
    fn turn_flags_go_together_and_the_secret_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let secret = secret.to_str().unwrap();
        let turn = config(&["--turn", "turn:192.0.2.9:3478", "--turn-secret", secret])
            .unwrap()
            .turn
            .unwrap();
        assert_eq!(turn.secret, b"s3cret");
        assert_eq!(turn.url.to_string(), "turn:192.0.2.9:3478");
        assert_eq!(turn.lifetime, Duration::from_secs(3600));
        assert!(!format!("{turn:?}").contains("s3cret"));
        assert_eq!(config(&[]).unwrap().turn, None);
        // One without the other is refused by clap.
        assert!(config(&["--turn", "turn:192.0.2.9"]).is_err());
        assert!(config(&["--turn-secret", secret]).is_err());
        // A bad URL or an empty secret is refused before anything is bound.
        let parse = |args: &[&str]| {
            let argv = std::iter::once("rendezvous").chain(args.iter().copied());
            Cli::try_parse_from(argv).unwrap().args.config()
        };
        assert!(parse(&["--turn", "http://x", "--turn-secret", secret]).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let empty = empty.to_str().unwrap();
        let err = parse(&["--turn", "turn:x", "--turn-secret", empty]).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn relay_flags_reach_the_config() {
        assert_eq!(config(&[]).unwrap().relay, Some(RelayLimits::default()));
        assert_eq!(config(&["--no-relay"]).unwrap().relay, None);
        let set = config(&[
            "--relay-quota",
            "500M",
            "--relay-rate",
            "10M",
            "--relay-lifetime",
            "90",
            "--relay-idle",
            "30",
        ])
        .unwrap();
        assert_eq!(
            set.relay,
            Some(RelayLimits {
                quota: 500 << 20,
                rate: 10 << 20,
                lifetime: Duration::from_secs(90),
                idle: Duration::from_secs(30),
            })
        );
        let hours = config(&["--relay-lifetime", "2h"]).unwrap();
        assert_eq!(hours.relay.unwrap().lifetime, Duration::from_secs(7200));
        assert!(config(&["--no-relay", "--relay-quota", "1G"]).is_err());
        assert!(config(&["--relay-quota", "lots"]).is_err());
    }
}

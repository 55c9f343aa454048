//! `qpunch nat-check`: how this network's NAT behaves, like `tailscale netcheck`.

use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use qpunch::natcheck::NatReport;
use qpunch::node::{Node, NodeConfig};

use super::ui::Ui;

#[derive(Debug, Args)]
pub struct NatCheckArgs {
    /// The rendezvous to check against: HOST[:PORT]; default $QPUNCH_RENDEZVOUS, or
    /// `rendezvous = "..."` in the qpunch home's config.toml.
    #[arg(long)]
    via: Option<String>,
    #[command(flatten)]
    rendezvous_tcp: super::meet::RendezvousTcpArgs,
}

pub async fn run(args: NatCheckArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let Some(rendezvous) = super::meet::rendezvous_name(args.via.as_deref())? else {
        bail!(
            "nat-check needs a rendezvous to test against: pass --via HOST[:PORT] or set {}",
            super::meet::ENV
        );
    };
    let socket = qpunch::share::bind_dual_stack(0)?;
    let identity = qpunch::identity::Identity::generate()?;
    let node = Node::new(
        socket,
        NodeConfig::new(identity, qpunch::transfer::ALPN, false),
    )?;
    let (_, addrs) =
        qpunch::share::resolve_host_all(&rendezvous, qpunch::rendezvous::DEFAULT_PORT).await?;
    let addr = addrs[0];
    let options = args.rendezvous_tcp.options();
    let client =
        match qpunch::rendezvous::RendezvousClient::connect_with(&node, addr, options).await {
            Ok(client) => client,
            Err(e) => {
                ui.error(&e.to_string());
                super::meet::report_nat(&ui, &NatReport::unreachable(node.local_addr()?), true);
                return Ok(false);
            }
        };
    // Only addresses its name resolves to (or next to the one we reached) are probed as
    // the rendezvous's own: it is untrusted, and names the targets.
    if client.transport() == qpunch::rendezvous::Transport::Tcp {
        let tcp_port = options.tcp_port.unwrap_or(addr.port());
        ui.event(
            super::ui::Event::RendezvousOverTcp {
                via: rendezvous.clone(),
                tcp_port,
            },
            Some(format!(
                "reached the rendezvous {rendezvous} over TCP (port {tcp_port}) instead of UDP"
            )),
        );
    }
    let known: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
    let report = qpunch::natcheck::check_known(&node, &client, &known).await?;
    super::meet::report_nat(&ui, &report, true);
    node.close(qpunch::node::QUICK_LINGER).await;
    Ok(report.udp)
}

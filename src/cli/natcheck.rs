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
    /// Do not ask the router which port mapping protocols it speaks (PCP, NAT-PMP, UPnP
    /// IGD); also `port_mapping = false` in config.toml.
    #[arg(long)]
    no_port_mapping: bool,
}

pub async fn run(args: NatCheckArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let map_ports = super::meet::port_mapping(args.no_port_mapping)?;
    let Some(rendezvous) = super::meet::rendezvous_name(args.via.as_deref())? else {
        // The router can still be asked; the mapping check needs nobody else.
        if map_ports {
            let socket = qpunch::share::bind_dual_stack(0)?;
            let local = socket.local_addr()?;
            report_port_mapping(
                &ui,
                &qpunch::portmap::survey(local, Default::default()).await,
            );
        }
        bail!(
            "nat-check needs a rendezvous to test the NAT against: pass --via HOST[:PORT] or set {}",
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
    // After the NAT's own behaviour is measured: a mapping (and the SNAT rule a router may
    // add with it) would change what that measurement sees for this socket.
    if map_ports {
        let survey = qpunch::portmap::survey(node.local_addr()?, Default::default()).await;
        report_port_mapping(&ui, &survey);
    }
    node.close(qpunch::node::QUICK_LINGER).await;
    Ok(report.udp)
}

/// The `port_mapping` event: what the gateway answered to each protocol.
fn report_port_mapping(ui: &Ui, survey: &qpunch::portmap::Survey) {
    use qpunch::portmap::Spoken;
    use std::fmt::Write;
    let protocols = survey
        .protocols
        .iter()
        .map(|(protocol, spoken)| {
            let (result, external, why) = match spoken {
                Spoken::Silent => ("silent", None, None),
                Spoken::Refused(why) => ("refused", None, Some(why.clone())),
                Spoken::Mapped(external) => ("mapped", Some(external.to_string()), None),
            };
            super::ui::PortMappingProtocol {
                protocol: protocol.as_str(),
                result,
                external,
                why,
            }
        })
        .collect();
    let mut text = match survey.gateway {
        None => "port mapping: no IPv4 default gateway to ask".to_string(),
        Some(gateway) => format!("port mapping (asked the gateway {gateway}):"),
    };
    for (protocol, spoken) in &survey.protocols {
        let _ = match spoken {
            Spoken::Silent => write!(text, "\n  {protocol}: no answer"),
            Spoken::Refused(why) => write!(
                text,
                "\n  {protocol}: answered, but no mapping: {}",
                qpunch::text::peer(why)
            ),
            Spoken::Mapped(external) => {
                write!(text, "\n  {protocol}: mapped {external} (deleted again)")
            }
        };
    }
    ui.event(
        super::ui::Event::PortMapping {
            gateway: survey.gateway.map(|g| g.to_string()),
            protocols,
        },
        Some(text),
    );
}

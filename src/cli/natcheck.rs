//! `qpunch nat-check`: how this network's NAT behaves, like `tailscale netcheck`.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use qpunch::natcheck::NatReport;
use qpunch::node::{Node, NodeConfig};

use super::ui::{Event, Ui};

#[derive(Debug, Args)]
pub struct NatCheckArgs {
    /// The rendezvous to check against: HOST[:PORT]; default $QPUNCH_RENDEZVOUS, or
    /// `rendezvous = "..."` in the qpunch home's config.toml.
    #[arg(long)]
    via: Option<String>,
    /// A STUN server to check against (RFC 5780 where it offers OTHER-ADDRESS):
    /// HOST[:PORT], port 3478 by default; repeatable. Default: `stun = [...]` in
    /// config.toml. With neither this, a stun list nor a rendezvous, a few well-known
    /// public STUN servers are asked.
    #[arg(long, value_name = "HOST[:PORT]")]
    stun: Vec<String>,
    #[command(flatten)]
    rendezvous_tcp: super::meet::RendezvousTcpArgs,
    /// Do not ask the router which port mapping protocols it speaks (PCP, NAT-PMP, UPnP
    /// IGD); also `port_mapping = false` in config.toml.
    #[arg(long)]
    no_port_mapping: bool,
}

/// How long a STUN server's name may take to resolve: a default server is only worth a
/// short wait, and a machine without DNS must not hold the check up.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

pub async fn run(args: NatCheckArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let map_ports = super::meet::port_mapping(args.no_port_mapping)?;
    // `--stun` alone checks only the STUN servers named; otherwise the rendezvous (from
    // --via, the environment or config.toml) and config.toml's stun list both run.
    let (rendezvous, stun) = if !args.stun.is_empty() {
        (args.via.clone(), args.stun.clone())
    } else {
        let rendezvous = super::meet::rendezvous_name(args.via.as_deref())?;
        let configured = super::meet::stun_servers()?;
        if rendezvous.is_none() && configured.is_empty() {
            // The one case where qpunch asks a third party on its own (see the README).
            ui.event(
                Event::StunDefaults {
                    servers: qpunch::stun::DEFAULT_SERVERS.to_vec(),
                },
                Some(format!(
                    "no rendezvous and no STUN servers configured: asking the public STUN servers {}",
                    qpunch::stun::DEFAULT_SERVERS.join(", ")
                )),
            );
            let defaults = qpunch::stun::DEFAULT_SERVERS.iter();
            (None, defaults.map(|s| s.to_string()).collect())
        } else {
            (rendezvous, configured)
        }
    };
    let socket = qpunch::share::bind_dual_stack(0)?;
    let identity = qpunch::identity::Identity::generate()?;
    let node = Node::new(
        socket,
        NodeConfig::new(identity, qpunch::transfer::ALPN, false),
    )?;
    let mut udp = false;
    // A rendezvous on this machine checks only this machine: no router is in the way, and
    // none is asked.
    let mut on_this_machine = false;
    if let Some(rendezvous) = rendezvous {
        let (reached, addr) = check_rendezvous(&node, &rendezvous, &args, &ui).await?;
        udp |= reached;
        on_this_machine = addr.ip().to_canonical().is_loopback();
    }
    // Resolved all at once, each bounded: then checked one at a time, so that one
    // server's probes never open the filter another's test measures.
    let resolved = futures_util::future::join_all(stun.iter().map(|name| async move {
        let lookup = qpunch::share::resolve_host_all(name, qpunch::stun::DEFAULT_PORT);
        match tokio::time::timeout(RESOLVE_WAIT, lookup).await {
            Ok(Ok((_, addrs))) => Ok(addrs),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("resolving {name} took over {RESOLVE_WAIT:?}")),
        }
    }))
    .await;
    for (name, addrs) in stun.iter().zip(resolved) {
        let addrs = match addrs {
            Ok(addrs) => addrs,
            Err(e) => {
                ui.warn(&format!("STUN server {name}: {e}"));
                continue;
            }
        };
        let addr = addrs[0];
        let known: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
        let report =
            qpunch::natcheck::check_stun(node.socket(), node.local_addr()?, addr, &known).await;
        udp |= report.udp;
        let against = format!("the STUN server {name}");
        let text = super::meet::nat_text(&report, true, &against);
        ui.event(
            Event::StunNat {
                server: name.clone(),
                addr: addr.to_string(),
                report,
            },
            Some(format!("{name} ({addr}):\n{text}")),
        );
    }
    // After the NAT's own behaviour is measured: a mapping (and the SNAT rule a router may
    // add with it) would change what that measurement sees for this socket.
    if map_ports && !on_this_machine {
        let survey = qpunch::portmap::survey(node.local_addr()?, Default::default()).await;
        report_port_mapping(&ui, &survey);
    }
    node.close(qpunch::node::QUICK_LINGER).await;
    Ok(udp)
}

/// Check the NAT against the rendezvous `rendezvous`; whether UDP got through, and the
/// rendezvous's address.
async fn check_rendezvous(
    node: &Node,
    rendezvous: &str,
    args: &NatCheckArgs,
    ui: &Ui,
) -> anyhow::Result<(bool, std::net::SocketAddr)> {
    let (_, addrs) =
        qpunch::share::resolve_host_all(rendezvous, qpunch::rendezvous::DEFAULT_PORT).await?;
    let addr = addrs[0];
    let options = args.rendezvous_tcp.options();
    let client = match qpunch::rendezvous::RendezvousClient::connect_with(node, addr, options).await
    {
        Ok(client) => client,
        Err(e) => {
            ui.error(&e.to_string());
            super::meet::report_nat(ui, &NatReport::unreachable(node.local_addr()?), true);
            return Ok((false, addr));
        }
    };
    if client.transport() == qpunch::rendezvous::Transport::Tcp {
        let tcp_port = options.tcp_port.unwrap_or(addr.port());
        ui.event(
            Event::RendezvousOverTcp {
                via: rendezvous.to_string(),
                tcp_port,
            },
            Some(format!(
                "reached the rendezvous {rendezvous} over TCP (port {tcp_port}) instead of UDP"
            )),
        );
    }
    // Only addresses its name resolves to (or next to the one we reached) are probed as
    // the rendezvous's own: it is untrusted, and names the targets.
    let known: Vec<_> = addrs.iter().map(|a| a.ip()).collect();
    let report = qpunch::natcheck::check_known(node, &client, &known).await?;
    super::meet::report_nat(ui, &report, true);
    Ok((report.udp, addr))
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

//! What `receive`, `send` and `nat-check` share about rendezvous: which one to use, and
//! the NAT check's report.

use qpunch::natcheck::NatReport;

use super::ui::{Event, Ui};

/// How to reach the rendezvous: `--rendezvous-tcp` and `--rendezvous-tcp-port` (send,
/// receive, nat-check).
#[derive(Debug, Clone, clap::Args)]
pub struct RendezvousTcpArgs {
    /// Reach the rendezvous over TLS on TCP: `auto` (UDP first; TCP when UDP gets no
    /// answer within 1.5 s, as behind a firewall that blocks UDP), `never` or `only`.
    #[arg(long, default_value = "auto", value_name = "auto|never|only")]
    rendezvous_tcp: qpunch::rendezvous::TcpMode,
    /// The rendezvous's TCP port [default: the number of its UDP port].
    #[arg(long, value_name = "PORT")]
    rendezvous_tcp_port: Option<u16>,
}

impl RendezvousTcpArgs {
    pub fn options(&self) -> qpunch::rendezvous::ConnectOptions {
        qpunch::rendezvous::ConnectOptions {
            tcp: self.rendezvous_tcp,
            tcp_port: self.rendezvous_tcp_port,
        }
    }
}

/// The environment variable naming the default rendezvous.
pub const ENV: &str = "QPUNCH_RENDEZVOUS";

/// The rendezvous to use: `--via`, else `$QPUNCH_RENDEZVOUS`, else `rendezvous = "..."` in
/// the qpunch home's `config.toml`, else none.
pub fn rendezvous_name(via: Option<&str>) -> anyhow::Result<Option<String>> {
    if let Some(via) = via {
        return Ok(Some(via.to_string()));
    }
    if let Some(env) = std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        return Ok(Some(env.to_string_lossy().into_owned()));
    }
    let home = qpunch::home::dir()?;
    Ok(qpunch::home::Config::load(&home)?.rendezvous)
}

/// Whether to ask the router to forward our port: not with `--no-port-mapping`, nor when
/// the qpunch home's config.toml says `port_mapping = false`.
pub fn port_mapping(off: bool) -> anyhow::Result<bool> {
    if off {
        return Ok(false);
    }
    let home = qpunch::home::dir()?;
    Ok(qpunch::home::Config::load(&home)?
        .port_mapping
        .unwrap_or(true))
}

/// The TURN server of the qpunch home's config.toml (`[turn]`), if any: relays by code
/// when no direct path is found.
pub fn turn() -> anyhow::Result<Option<qpunch::turn::TurnServer>> {
    let home = qpunch::home::dir()?;
    let Some(turn) = qpunch::home::Config::load(&home)?.turn else {
        return Ok(None);
    };
    let server = qpunch::turn::TurnServer::from_config(&turn).map_err(|e| {
        anyhow::anyhow!(
            "{}: `turn.url`: {e}",
            home.join(qpunch::home::CONFIG_FILE).display()
        )
    })?;
    Ok(Some(server))
}

/// The `nat` event; the human line is short unless `detailed` (`qpunch nat-check`).
pub fn report_nat(ui: &Ui, report: &NatReport, detailed: bool) {
    ui.event(
        Event::Nat(report.clone()),
        Some(nat_text(report, detailed, "the rendezvous")),
    );
}

/// The human text of a NAT report checked against `against` ("the rendezvous", "the STUN
/// server ...").
pub fn nat_text(report: &NatReport, detailed: bool, against: &str) -> String {
    let mut text = if !report.udp {
        format!("UDP does not get through to {against}: a direct path is impossible from here")
    } else {
        // Without a second address of the rendezvous (same family) the change-address
        // test cannot run: "address-dependent" is then only what could be shown.
        let family = report.public.map(|p| p.is_ipv4());
        let targets: Vec<_> = (report.observations.iter())
            .map(|(target, _)| target.ip().to_canonical())
            .filter(|ip| Some(ip.is_ipv4()) == family)
            .collect();
        let one_address = targets.windows(2).all(|w| w[0] == w[1]);
        let filtering = match report.filtering {
            qpunch::natcheck::Filtering::Unknown => String::new(),
            qpunch::natcheck::Filtering::AddressDependent if one_address => format!(
                ", filtering {} or looser ({against} has one address)",
                report.filtering.as_str()
            ),
            f => format!(", filtering {}", f.as_str()),
        };
        format!(
            "NAT: mapping {}{filtering}; public address {}",
            report.mapping.as_str(),
            report.public.map_or("unknown".into(), |a| a.to_string()),
        )
    };
    if detailed && report.udp {
        text.push_str(&format!(
            "\n  local address:  {}\n  port preserved: {}\n  IPv6:           {}",
            report.local,
            match report.port_preserved {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            },
            report
                .ipv6
                .map_or(format!("not reachable (or {against} has no IPv6)"), |a| {
                    format!("reachable, public address {a}")
                }),
        ));
        for (target, seen) in &report.observations {
            text.push_str(&format!(
                "\n  {target} sees us as {}",
                seen.map_or("(no answer)".into(), |s| s.to_string())
            ));
        }
    }
    text
}

/// The STUN servers configured in the qpunch home's config.toml (`stun = [...]`).
pub fn stun_servers() -> anyhow::Result<Vec<String>> {
    let home = qpunch::home::dir()?;
    Ok(qpunch::home::Config::load(&home)?.stun)
}

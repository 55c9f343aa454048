//! What `receive`, `send` and `nat-check` share to meet by code: which rendezvous, the
//! connection to it with a NAT check, and the meeting's events on the terminal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use qpunch::meet::MeetEvents;
use qpunch::meet::code::{Code, Nameplate};
use qpunch::meet::pake::Hello;
use qpunch::natcheck::{self, NatReport};
use qpunch::node::Node;
use qpunch::rendezvous::{self, RendezvousClient};
use qpunch::traverse::Path;

use super::ui::{Event, Ui};

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
    let path = qpunch::identity::config_dir()?.join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let config: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    match config.get("rendezvous") {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => anyhow::bail!("{}: `rendezvous` must be a string", path.display()),
    }
}

/// Connect `node` to the rendezvous `name` (HOST or HOST:PORT) and check our NAT through
/// it; the `nat` event is emitted.
pub async fn connect(
    ui: &Ui,
    node: &Node,
    name: &str,
) -> anyhow::Result<(RendezvousClient, NatReport)> {
    let (_, addr) = super::resolve_host(name, rendezvous::DEFAULT_PORT).await?;
    let client = RendezvousClient::connect(node, addr)
        .await
        .with_context(|| format!("cannot use the rendezvous {name}"))?;
    // Only the mapping decides how to punch; the filtering test would cost a second.
    let report = natcheck::check_mapping(node, &client)
        .await
        .with_context(|| format!("NAT check against {name} failed"))?;
    report_nat(ui, &report, false);
    Ok((client, report))
}

/// The `nat` event; the human line is short unless `detailed` (`qpunch nat-check`).
pub fn report_nat(ui: &Ui, report: &NatReport, detailed: bool) {
    let mut text = if !report.udp {
        "UDP does not get through to the rendezvous: a direct path is impossible from here"
            .to_string()
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
                ", filtering {} or looser (the rendezvous has one address)",
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
            report.ipv6.map_or(
                "not reachable (or the rendezvous has no IPv6)".into(),
                |a| { format!("reachable, public address {a}") }
            ),
        ));
        for (target, seen) in &report.observations {
            text.push_str(&format!(
                "\n  {target} sees us as {}",
                seen.map_or("(no answer)".into(), |s| s.to_string())
            ));
        }
    }
    ui.event(Event::Nat(report.clone()), Some(text));
}

/// How a receiver announces each new code.
pub type Announce = Box<dyn Fn(&Code, Duration) + Send + Sync>;

/// A meeting's events, rendered.
pub struct CliEvents {
    pub ui: Arc<Ui>,
    /// Receiver: how to announce each new code (the `listening` event).
    pub listening: Option<Announce>,
    /// The pairing in progress, completed by the peer's hello into one `paired` event.
    pub pairing: std::sync::Mutex<Option<(String, SocketAddr)>>,
}

impl CliEvents {
    pub fn new(ui: Arc<Ui>, listening: Option<Announce>) -> Self {
        CliEvents {
            ui,
            listening,
            pairing: std::sync::Mutex::new(None),
        }
    }
}

impl MeetEvents for CliEvents {
    fn code(&self, code: &Code, expires: Duration) {
        if let Some(listening) = &self.listening {
            listening(code, expires);
        }
    }

    fn paired(&self, nameplate: &Nameplate) {
        // The peer's address arrives with its sealed hello (its last candidate).
        *self.pairing.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((nameplate.to_string(), SocketAddr::from(([0, 0, 0, 0], 0))));
        self.ui.say(&format!(
            "paired on {nameplate}; swapping sealed hellos ..."
        ));
    }

    fn hello(&self, hello: &Hello) {
        let (nameplate, peer) = self
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| (String::new(), SocketAddr::from(([0, 0, 0, 0], 0))));
        let peer = hello.candidates.last().map_or(peer, |&c| canonical(c));
        let nat = qpunch::natcheck::Mapping::from_token(&hello.nat);
        self.ui.event(
            Event::Paired {
                nameplate,
                peer: peer.to_string(),
                candidates: hello.candidates.iter().map(|c| c.to_string()).collect(),
                peer_nat: nat.token(),
            },
            Some(format!(
                "the code matched: the peer offers {} address(es), its NAT mapping is {}",
                hello.candidates.len(),
                nat.as_str()
            )),
        );
    }

    fn punched(&self, path: &Path, method: &'static str) {
        let rtt_ms = path.rtt.as_secs_f64() * 1000.0;
        self.ui.event(
            Event::Punched {
                peer: path.peer.to_string(),
                method,
                local_addr: String::new(),
                reflexive_addr: Some(path.reflexive.to_string()),
                rtt_ms,
            },
            Some(format!(
                "hole punched ({method}): {} answered in {rtt_ms:.1} ms; it sees us as {}",
                path.peer, path.reflexive
            )),
        );
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `to` looks like a one-time code rather than a host: no dot, no colon, and
/// three dash-separated parts. A mistyped word is reported as such, not looked up in DNS.
pub fn as_code(to: &str) -> Option<anyhow::Result<Code>> {
    let to = to.trim();
    if to.contains(['.', ':', '[']) || to.split(['-', ' ']).filter(|p| !p.is_empty()).count() != 3 {
        return None;
    }
    Some(
        to.parse::<Code>()
            .map_err(|e| anyhow::anyhow!("{to:?} is not a valid code: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_told_from_hosts() {
        assert!(as_code("example.com").is_none());
        assert!(as_code("192.0.2.1:9199").is_none());
        assert!(as_code("localhost").is_none());
        assert!(as_code("my-laptop").is_none());
        let code = as_code("7-crossover-clockwork").expect("looks like a code");
        assert_eq!(code.unwrap().nameplate().as_str(), "7");
        let typo = as_code("7-crossover-clokwork").expect("looks like a code");
        let message = typo.unwrap_err().to_string();
        assert!(message.contains("clockwork"), "{message}");
    }
}

//! The library's [`share::Event`]s of `send` and `receive`, rendered as the human lines
//! and `--json` events of the command line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qpunch::identity::Fingerprint;
use qpunch::meet::code::Code;
use qpunch::share::{self, FileEvent};
use qpunch::transfer::FileReport;

use super::common::{report_connected, report_punched};
use super::meet::report_nat;
use super::ui::{Event, FileProgress, Side, Ui};

/// Renders one command's events; keeps each connection's progress for its summary.
pub struct Render {
    ui: Arc<Ui>,
    /// Whether this is the sending side (its progress lines say "sent").
    sending: bool,
    /// Each connection's progress, and when it connected.
    progress: Mutex<HashMap<usize, (Arc<FileProgress>, Instant)>>,
    /// Where a receiver's files go, for its summaries.
    out: String,
}

impl Render {
    pub fn sending(ui: Arc<Ui>) -> Arc<Self> {
        Self::new(ui, true, String::new())
    }

    pub fn receiving(ui: Arc<Ui>, out: &Path) -> Arc<Self> {
        Self::new(ui, false, out.display().to_string())
    }

    fn new(ui: Arc<Ui>, sending: bool, out: String) -> Arc<Self> {
        Arc::new(Render {
            ui,
            sending,
            progress: Mutex::default(),
            out,
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<usize, (Arc<FileProgress>, Instant)>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sender's progress (it has one connection), taken for its summary.
    pub fn take_sent(&self) -> Option<Arc<FileProgress>> {
        let mut progress = self.progress();
        let conn = *progress.keys().next()?;
        progress.remove(&conn).map(|(progress, _)| progress)
    }

    fn connected(&self, conn: usize, fingerprint: Fingerprint, port_mapped: bool) {
        let side = if self.sending {
            Side::Sending
        } else {
            Side::Receiving(fingerprint)
        };
        let progress = FileProgress::new(self.ui.clone(), side);
        progress.set_port_mapped(port_mapped);
        self.progress().insert(conn, (progress, Instant::now()));
    }

    fn finished(
        &self,
        conn: usize,
        fingerprint: Fingerprint,
        result: Result<Vec<FileReport>, String>,
    ) {
        let progress = self.progress().remove(&conn);
        match (result, progress) {
            (Err(e), progress) => {
                if let Some((progress, _)) = progress {
                    progress.clear();
                }
                self.ui
                    .error(&format!("transfer from {fingerprint} failed: {e}"));
            }
            (Ok(reports), Some((progress, started))) if !reports.is_empty() => {
                progress.summary(&reports, started.elapsed(), &self.out, None);
            }
            _ => {}
        }
    }
}

impl share::Events for Render {
    fn event(&self, event: share::Event) {
        use share::Event as E;
        let ui = &self.ui;
        match event {
            E::Warning(message) => ui.warn(&message),
            E::Error(message) => ui.error(&message),
            E::Punching { target } => ui.say(&format!("punching to {target} ...")),
            E::Punched { punched, from } => report_punched(ui, &punched, from),
            E::TrustedOnFirstUse {
                key,
                fingerprint,
                addr,
                known_peers,
            } => ui.say(&format!(
                "trusting {key} as {fingerprint} on first use: the receiver that answered at \
                 {addr} (remembered in {})",
                known_peers.display()
            )),
            E::Nat(report) => report_nat(ui, &report, false),
            E::Meeting {
                code,
                via: Some(via),
            } => ui.say(&format!("meeting {code} through {via} ...")),
            E::Meeting { code, via: None } => ui.say(&format!(
                "looking for the receiver of {code} on this network (no rendezvous configured) ..."
            )),
            E::Found { nameplate, addrs } => {
                let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                let text = format!(
                    "found nameplate {nameplate} on this network at {}; the code matched",
                    addrs.join(", ")
                );
                ui.event(Event::Found { nameplate, addrs }, Some(text));
            }
            E::RendezvousOverTcp { via, tcp_port } => ui.event(
                Event::RendezvousOverTcp {
                    via: via.clone(),
                    tcp_port,
                },
                Some(format!(
                    "reached the rendezvous {via} over TCP (port {tcp_port}) instead of UDP"
                )),
            ),
            E::Pairing { nameplate } => ui.say(&format!(
                "paired on {nameplate}; swapping sealed hellos ..."
            )),
            E::Matched {
                nameplate,
                peer,
                candidates,
                peer_nat,
            } => ui.event(
                Event::Paired {
                    nameplate,
                    peer: peer.to_string(),
                    candidates: candidates.iter().map(|c| c.to_string()).collect(),
                    peer_nat: peer_nat.token(),
                },
                Some(format!(
                    "the code matched: the peer offers {} address(es), its NAT mapping is {}",
                    candidates.len(),
                    peer_nat.as_str()
                )),
            ),
            E::PathFound {
                peer,
                reflexive,
                rtt,
                method,
            } => {
                let rtt_ms = rtt.as_secs_f64() * 1000.0;
                ui.event(
                    Event::Punched {
                        peer: peer.to_string(),
                        method: method.as_str(),
                        local_addr: String::new(),
                        reflexive_addr: Some(reflexive.to_string()),
                        rtt_ms,
                    },
                    Some(format!(
                        "hole punched ({method}): {peer} answered in {rtt_ms:.1} ms; it sees us as {reflexive}"
                    )),
                );
            }
            E::PathChanged {
                path,
                from,
                reason,
                rtt,
            } => {
                let rtt_ms = rtt.map(|rtt| rtt.as_secs_f64() * 1000.0);
                let was = from.map_or(String::new(), |from| format!(" (was {from})"));
                let rtt_text = rtt_ms.map_or(String::new(), |ms| format!(", RTT {ms:.1} ms"));
                ui.event(
                    Event::Path {
                        path: path.as_str(),
                        from: from.map(|f| f.as_str()),
                        reason: reason.as_str(),
                        rtt_ms,
                    },
                    Some(format!(
                        "path: now {path}{was}: {}{rtt_text}",
                        reason.explain()
                    )),
                );
            }
            E::Connected {
                conn,
                peer,
                fingerprint,
                path,
                local,
                port_mapped,
            } => {
                report_connected(ui, peer, fingerprint, path.as_str(), local, port_mapped);
                self.connected(conn, fingerprint, port_mapped);
            }
            E::PortMapped(mapped) => ui.event(
                Event::PortMapped {
                    protocol: mapped.protocol.as_str(),
                    external: mapped.external.to_string(),
                    gateway: mapped.gateway.to_string(),
                    lifetime_secs: mapped.lifetime.as_secs(),
                },
                Some(format!(
                    "the router {} forwards {} to us ({}){}; the mapping is deleted when qpunch stops",
                    mapped.gateway,
                    mapped.external,
                    mapped.protocol,
                    if self.sending {
                        String::new()
                    } else {
                        format!(": senders outside can use --to {}", mapped.external)
                    }
                )),
            ),
            E::File { conn, event } => {
                let progress = self.progress().get(&conn).map(|(p, _)| p.clone());
                if let Some(progress) = progress {
                    FileEvent::replay(event, progress.as_ref());
                }
            }
            E::Finished {
                conn,
                fingerprint,
                result,
            } => self.finished(conn, fingerprint, result),
            E::Listening {
                local,
                addrs,
                fingerprint,
                out_dir,
            } => listening(ui, local, &addrs, fingerprint, &out_dir),
            E::Code {
                code,
                expires,
                via,
                local,
                addrs,
                fingerprint,
                out_dir,
            } => announce_code(
                ui,
                &code,
                expires,
                via.as_deref(),
                local,
                &addrs,
                fingerprint,
                &out_dir,
            ),
            E::CodesPaused {
                guesses,
                window,
                resume_in,
            } => ui.event(
                Event::CodesPaused {
                    guesses,
                    window_secs: window.as_secs(),
                    resume_in_secs: resume_in.as_secs(),
                },
                Some(format!(
                    "{guesses} senders paired on our codes in the last {} min without knowing \
                     them: no new code for {} min, so a guesser gets at most {guesses} tries \
                     an hour",
                    window.as_secs() / 60,
                    resume_in.as_secs().div_ceil(60)
                )),
            ),
            E::CodeExpired => ui.event(
                Event::CodeExpired,
                Some("the code expired unused; here is a new one".into()),
            ),
            E::CodeUsed {
                sender,
                remote,
                code,
            } => ui.say(&format!(
                "{sender} at {remote} proved the code {}",
                code.nameplate()
            )),
            E::CodeBurned {
                remote,
                code,
                wrong,
                max,
            } => {
                ui.error(&format!(
                    "meeting failed: the code did not match (the sender at {remote} mistyped it, \
                     or is guessing); {code} cannot be used again"
                ));
                if wrong >= max {
                    ui.error(&format!(
                        "{wrong} wrong codes: someone on this network may be guessing. \
                         No more codes until qpunch receive is restarted \
                         (senders with --peer can still connect)"
                    ));
                } else {
                    ui.say("here is a new code");
                }
            }
            E::MeetingFailed(e) => ui.error(&format!("meeting failed: {e}")),
            E::RendezvousLost {
                via,
                error,
                retry_in,
            } => {
                ui.error(&error);
                ui.say(&format!(
                    "retrying the rendezvous {via} in {} s",
                    retry_in.as_secs()
                ));
            }
            E::Stats {
                socket,
                server,
                lan,
            } => ui.event(
                Event::Stats {
                    socket,
                    server,
                    lan,
                    rendezvous: None,
                },
                None,
            ),
            _ => {}
        }
    }
}

/// The receiver's banner: how to reach it.
fn listening(ui: &Ui, local: SocketAddr, addrs: &[SocketAddr], fp: Fingerprint, out: &Path) {
    let mut text = format!(
        "qpunch is receiving on UDP port {}\n  saving to: {}\n  identity: {fp}\n",
        local.port(),
        out.display()
    );
    for addr in addrs {
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
            code: None,
            expires_secs: None,
        },
        None,
    );
    ui.output(&text);
}

/// A code, and how to use it: through the rendezvous `via`, or on the LAN.
#[allow(clippy::too_many_arguments)]
fn announce_code(
    ui: &Ui,
    code: &Code,
    expires: Duration,
    via: Option<&str>,
    local: SocketAddr,
    addrs: &[SocketAddr],
    fingerprint: Fingerprint,
    out: &Path,
) {
    let minutes = expires.as_secs().div_ceil(60);
    ui.event(
        Event::Listening {
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            port: local.port(),
            fingerprint,
            code: Some(code.to_string()),
            expires_secs: Some(expires.as_secs()),
        },
        None,
    );
    let how = match via {
        Some(via) => {
            format!("On the sending machine, run:\n  qpunch send FILE --to {code} --via {via}")
        }
        None => format!(
            "On the sending machine (on this network, no rendezvous needed), run:\n  \
             qpunch send FILE --to {code}"
        ),
    };
    ui.output(&format!(
        "code: {code}   (one sender, valid for {minutes} min; files go to {})\n{how}",
        out.display()
    ));
}

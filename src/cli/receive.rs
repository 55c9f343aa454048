//! `qpunch receive`: answer probes, accept QUIC, ask or check, store verified files.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::node::{Congestion, Node, NodeConfig, NodeError, PeerConnection};
use qpunch::server::{Limits, Server};
use qpunch::share::consent::Accept;
use qpunch::transfer::{
    self, Consent, FileReport, Observer, ReceiveEvents, ReceiveOptions, Receiver, TransferError,
};

use super::common::{bind_addr, canonical, reachable_addrs, report_connected};
use super::ui::{Event, FileProgress, Side, TerminalConsent, Ui};
use super::{
    DEFAULT_PORT, congestion_parser, load_identity, parse_duration, parse_fingerprint, parse_size,
};
use qpunch::meet::code::Code;
use qpunch::meet::lan::{self, Desk, Door, Lan, Outcome};
use qpunch::meet::{MeetConfig, MeetError, Meeting};
use qpunch::rendezvous::{ClientError, ErrorCode};

/// Parse a `--code` argument.
fn parse_code(s: &str) -> Result<Code, String> {
    s.parse()
        .map_err(|e: qpunch::meet::code::CodeError| e.to_string())
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// UDP port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address to bind: an IP (e.g. 0.0.0.0) or IP:PORT [default: [::], every IPv6 and
    /// IPv4 address, or 0.0.0.0 where there is no IPv6].
    #[arg(long)]
    bind: Option<String>,
    /// The rendezvous to meet senders through by one-time code: HOST[:PORT] (port 9200);
    /// default $QPUNCH_RENDEZVOUS, or `rendezvous = "..."` in the qpunch home's config.toml.
    #[arg(long)]
    via: Option<String>,
    /// The first one-time code to use (NAMEPLATE-WORD-WORD) instead of a generated one.
    /// Without a rendezvous, codes are announced on the local network (mDNS).
    #[arg(long, value_parser = parse_code)]
    code: Option<Code>,
    /// How long each code stays valid.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    code_ttl: Duration,
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
    /// Remove every partial file (kept from interrupted transfers for a resume) before
    /// receiving.
    #[arg(long)]
    clean: bool,
    /// Remove partial files untouched for this long when starting (e.g. 7d, 12h).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    keep_partials: Duration,
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
    let rendezvous = super::meet::rendezvous_name(args.via.as_deref())?;
    let bind = match &args.bind {
        Some(bind) => Some(bind_addr(bind, args.port)?),
        None => None,
    };
    // Without a rendezvous, codes are met on the LAN: announced by mDNS on the interfaces
    // this receiver listens on. Bound to loopback only, there is no LAN to announce on
    // (and the mDNS responder would still join the groups of every interface).
    let lan_codes = rendezvous.is_none() && !bind.is_some_and(|b| b.ip().is_loopback());
    if args.code.is_some() && rendezvous.is_none() && !lan_codes {
        bail!(
            "--code needs a network to meet on: a rendezvous (--via HOST[:PORT] or {}), or \
             a LAN address to listen on (not loopback)",
            super::meet::ENV
        );
    }
    let accept = Accept {
        everyone: args.yes,
        allow: args.allow.clone(),
        ask: TerminalConsent::available()
            .then(|| Arc::new(TerminalConsent { ui: ui.clone() }) as Arc<dyn Consent>),
    };
    let Ok(policy) = accept.policy(rendezvous.is_some() || lan_codes) else {
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
    let identity = load_identity(&ui)?;
    let socket = match bind {
        Some(bind) => qpunch::socket::bind(bind)?,
        None => super::bind_dual_stack(args.port)?,
    };
    let mut config = NodeConfig {
        congestion: args.congestion,
        ..NodeConfig::new(identity, transfer::ALPN, true)
    };
    if lan_codes {
        // Senders holding a LAN code ask for the meet protocol first (see `lan::ALPN`).
        config.alpn.push(lan::ALPN.to_vec());
    }
    let node = Arc::new(Node::new(socket, config)?);
    let events = Arc::new(Events {
        ui: ui.clone(),
        node: node.clone(),
        out: out.clone(),
        progress: Mutex::default(),
    });
    let receiver = Receiver::with_events(
        ReceiveOptions {
            overwrite: args.overwrite,
            stall_timeout: args.stall_timeout,
            min_rate: args.min_rate,
            allow_dotfiles: args.allow_dotfiles,
            once: args.once,
            partial_max_age: if args.clean {
                Duration::ZERO
            } else {
                args.keep_partials
            },
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
    // Connections that negotiated the meet protocol prove a LAN code at the door first;
    // the rest go straight to the receiver. (Without LAN codes the node does not offer
    // the meet protocol, and the desk stays empty.)
    let desk = Desk::new();
    let admitting = receiver.clone();
    let door = Door::new(
        receiver.clone(),
        desk.clone(),
        node.fingerprint(),
        move |sender, ttl| admitting.admit(sender, ttl),
    );
    let server = Server::new(node.clone(), door, limits);
    let server_stats = server.stats();
    // Nodes on other sockets that a birthday punch handed us: served like this one, and
    // stopped with it.
    let (stop_side, side_stopped) = tokio::sync::watch::channel(false);
    // Started here, owned here: the code loop is aborted at the end, then the responder
    // says goodbye for whatever is still announced.
    let lan = if lan_codes {
        let lan = Lan::start().context("cannot announce codes on the local network")?;
        Some(Arc::new(lan))
    } else {
        None
    };
    let lan_loop = lan.clone().map(|lan| {
        let serving = LanCodes {
            ui: ui.clone(),
            node: node.clone(),
            desk: desk.clone(),
            out: out.clone(),
            first: args.code.clone(),
            ttl: args.code_ttl,
            once: args.once,
        };
        tokio::spawn(serving.run(lan))
    });
    let codes = rendezvous.map(|name| {
        let serving = Codes {
            ui: ui.clone(),
            node: node.clone(),
            receiver: receiver.clone(),
            out: out.clone(),
            rendezvous: name,
            first: args.code.clone(),
            ttl: args.code_ttl,
            once: args.once,
            limits,
            side_stopped,
        };
        tokio::spawn(serving.run())
    });
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
    if let Some(codes) = codes {
        codes.abort();
    }
    if let Some(lan_loop) = lan_loop {
        lan_loop.abort();
    }
    if let Some(lan) = &lan {
        lan.shutdown().await;
    }
    let _ = stop_side.send(true);
    node.close(qpunch::node::QUICK_LINGER).await;
    ui.event(
        Event::Stats {
            socket: node.socket_stats(),
            server: Some(server_stats.get()),
            lan: lan.is_some().then(|| desk.stats()),
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
    out: PathBuf,
    /// Each connection's progress, for its summary line.
    progress: Mutex<HashMap<usize, (Arc<FileProgress>, Instant)>>,
}

impl ReceiveEvents for Events {
    fn connected(&self, peer: &PeerConnection) -> Arc<dyn Observer> {
        let remote = peer.connection.remote_address();
        let ifaces = qpunch::meet::candidates::interfaces();
        let path = match qpunch::meet::candidates::kind_of(remote, &ifaces) {
            qpunch::traverse::Kind::Lan => "lan",
            _ => "direct",
        };
        let _ = report_connected(&self.ui, &self.node, peer, path);
        let progress = FileProgress::new(self.ui.clone(), Side::Receiving(peer.fingerprint));
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer.connection.stable_id(),
                (progress.clone(), Instant::now()),
            );
        progress
    }

    fn finished(&self, peer: &PeerConnection, outcome: &Result<Vec<FileReport>, TransferError>) {
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer.connection.stable_id());
        match (outcome, progress) {
            (Err(e), progress) => {
                if let Some((progress, _)) = progress {
                    progress.clear();
                }
                self.ui
                    .error(&format!("transfer from {} failed: {e}", peer.fingerprint));
            }
            (Ok(reports), Some((progress, started))) if !reports.is_empty() => {
                progress.summary(reports, started.elapsed(), &self.out.display().to_string());
            }
            _ => {}
        }
        tracing::debug!(stats = ?self.node.socket_stats(), "socket counters");
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        // Scanners and strangers are counted in `stats`, not printed one by one.
        tracing::info!(%remote, "incoming connection failed: {error}");
    }
}

/// Meeting senders by one-time code: a code at a time, each announced, until stopped.
struct Codes {
    ui: Arc<Ui>,
    node: Arc<Node>,
    receiver: Arc<Receiver>,
    out: PathBuf,
    rendezvous: String,
    first: Option<Code>,
    ttl: Duration,
    once: bool,
    limits: Limits,
    side_stopped: tokio::sync::watch::Receiver<bool>,
}

impl Codes {
    async fn run(mut self) {
        let mut delay = Duration::from_secs(1);
        loop {
            match self.serve().await {
                Ok(()) => return,
                Err(e) => self.ui.error(&super::describe(&e)),
            }
            // The rendezvous went away (restarted, network change): try again, slower.
            self.ui.say(&format!(
                "retrying the rendezvous {} in {} s",
                self.rendezvous,
                delay.as_secs()
            ));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }

    /// Connect to the rendezvous and serve codes until a meeting ends `--once`.
    async fn serve(&mut self) -> anyhow::Result<()> {
        let (client, report) = super::meet::connect(&self.ui, &self.node, &self.rendezvous).await?;
        let (ui, node, out, via) = (
            self.ui.clone(),
            self.node.clone(),
            self.out.clone(),
            self.rendezvous.clone(),
        );
        let events = super::meet::CliEvents::new(
            self.ui.clone(),
            Some(Box::new(move |code, expires| {
                let _ = announce_code(&ui, &node, &out, Some(&via), code, expires);
            })),
        );
        let meeting = Meeting {
            node: &self.node,
            rendezvous: &client,
            nat: report.mapping,
            config: MeetConfig::default(),
            events: &events,
        };
        let receiver = self.receiver.clone();
        let admit = move |sender, ttl| receiver.admit(sender, ttl);
        // A code holder may connect before its hello has reached us: let it wait for its
        // ticket rather than be refused.
        let _expecting = self.receiver.expect_tickets();
        loop {
            let chosen = self.first.take();
            match meeting.welcome(chosen.as_ref(), self.ttl, &admit).await {
                Ok(welcomed) => {
                    if let Some(side) = welcomed.node {
                        self.serve_side_node(side);
                    }
                    if self.once {
                        return Ok(());
                    }
                }
                Err(MeetError::Rendezvous(ClientError::Refused {
                    code: ErrorCode::Expired,
                    ..
                })) => self.ui.event(
                    Event::CodeExpired,
                    Some("the code expired unused; here is a new one".into()),
                ),
                Err(MeetError::Rendezvous(e)) => return Err(e.into()),
                Err(e) => self.ui.error(&format!("meeting failed: {e}")),
            }
        }
    }

    /// Serve a node a birthday punch made (the sender connects there) until stopped.
    fn serve_side_node(&self, side: Arc<Node>) {
        let server = Server::new(side.clone(), self.receiver.clone(), self.limits);
        let mut stopped = self.side_stopped.clone();
        tokio::spawn(async move {
            // `wait_for` is cancel-safe: it only watches a value.
            server
                .run(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
            side.close(qpunch::node::QUICK_LINGER).await;
        });
    }
}

/// Meeting senders by one-time code on the LAN, with no rendezvous: a code at a time,
/// announced by mDNS until it is used, burned or expired.
struct LanCodes {
    ui: Arc<Ui>,
    node: Arc<Node>,
    desk: Arc<Desk>,
    out: PathBuf,
    first: Option<Code>,
    ttl: Duration,
    once: bool,
}

impl LanCodes {
    async fn run(mut self, lan: Arc<Lan>) {
        let local = match self.node.local_addr() {
            Ok(local) => local,
            Err(e) => return self.ui.error(&format!("no local address to announce: {e}")),
        };
        let mut wrong = 0;
        loop {
            let code = self
                .first
                .take()
                .unwrap_or_else(|| Code::generate(lan::random_nameplate(), &mut rand::rng()));
            // Open before announcing: a sender who finds the announcement finds the code.
            let mut opened = self.desk.open(code.clone());
            let announcement = match lan.announce(code.nameplate(), local) {
                Ok(announcement) => announcement,
                Err(e) => {
                    return self.ui.error(&format!(
                        "cannot announce the code on the local network: {e}"
                    ));
                }
            };
            let _ = announce_code(&self.ui, &self.node, &self.out, None, &code, self.ttl);
            // Cancel-safe: `outcome` waits on a oneshot receiver, the timer only waits.
            let ended = tokio::select! {
                outcome = opened.outcome() => outcome,
                () = tokio::time::sleep(self.ttl) => None,
            };
            // Withdrawn from the desk first, then from the network.
            drop(opened);
            announcement.withdraw().await;
            match ended {
                None => self.ui.event(
                    Event::CodeExpired,
                    Some("the code expired unused; here is a new one".into()),
                ),
                Some(Outcome::Used { sender, remote }) => {
                    self.ui.say(&format!(
                        "{sender} at {} proved the code {}",
                        canonical(remote),
                        code.nameplate()
                    ));
                    if self.once {
                        return;
                    }
                }
                Some(Outcome::Burned { remote }) => {
                    wrong += 1;
                    self.ui.error(&format!(
                        "meeting failed: the code did not match (the sender at {} mistyped it, \
                         or is guessing); {code} cannot be used again",
                        canonical(remote)
                    ));
                    if wrong >= lan::MAX_WRONG_CODES {
                        return self.ui.error(&format!(
                            "{wrong} wrong codes: someone on this network may be guessing. \
                             No more codes until qpunch receive is restarted \
                             (senders with --peer can still connect)"
                        ));
                    }
                    self.ui.say("here is a new code");
                }
            }
        }
    }
}

/// Print a code, and how to use it: through the rendezvous `via`, or on the LAN.
fn announce_code(
    ui: &Ui,
    node: &Node,
    out: &std::path::Path,
    via: Option<&str>,
    code: &Code,
    expires: Duration,
) -> anyhow::Result<()> {
    let local = node.local_addr()?;
    let minutes = expires.as_secs().div_ceil(60);
    ui.event(
        Event::Listening {
            addrs: reachable_addrs(local)
                .iter()
                .map(|a| a.to_string())
                .collect(),
            port: local.port(),
            fingerprint: node.fingerprint(),
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
    Ok(())
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
            code: None,
            expires_secs: None,
        },
        None,
    );
    ui.output(&text);
    Ok(())
}

//! `qpunch receive`: arguments in, [`Share::receive`] out, its events rendered (and the
//! consent prompt asked at the terminal).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::meet::code::Code;
use qpunch::node::Congestion;
use qpunch::server::Limits;
use qpunch::share::consent::{Accept, NobodyToAsk};
use qpunch::share::{DEFAULT_PORT, ReceiveConfig, Share, ShareError};
use qpunch::transfer::Consent;

use super::common::bind_addr;
use super::render::Render;
use super::ui::{TerminalConsent, Ui};
use super::{congestion_parser, load_identity, parse_duration, parse_fingerprint, parse_size};

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
    #[command(flatten)]
    rendezvous_tcp: super::meet::RendezvousTcpArgs,
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
    /// Write the one file of one transfer to standard output instead of a folder (texts
    /// print as sent); implies --once. Bytes are written as they arrive and the whole is
    /// checked against the sender's BLAKE3 at the end: the exit status is 0 only if it
    /// matched, and a cut or mismatch is reported on stderr. An offer of several files is
    /// declined.
    #[arg(long, conflicts_with = "overwrite")]
    stdout: bool,
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
    /// Do not ask the router to forward our port (PCP, NAT-PMP, UPnP IGD); also
    /// `port_mapping = false` in the qpunch home's config.toml.
    #[arg(long)]
    no_port_mapping: bool,
}

pub async fn run(args: ReceiveArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    if args.stdout && ui.is_json() {
        bail!("--stdout and --json both write to standard output: choose one");
    }
    let rendezvous = super::meet::rendezvous_name(args.via.as_deref())?;
    let bind = match &args.bind {
        Some(bind) => Some(bind_addr(bind, args.port)?),
        None => None,
    };
    let mut config = ReceiveConfig {
        bind,
        port: args.port,
        accept: Accept {
            everyone: args.yes,
            allow: args.allow.clone(),
            ask: TerminalConsent::available()
                .then(|| Arc::new(TerminalConsent { ui: ui.clone() }) as Arc<dyn Consent>),
        },
        rendezvous,
        rendezvous_connect: args.rendezvous_tcp.options(),
        code: args.code.clone(),
        code_ttl: args.code_ttl,
        once: args.once || args.stdout,
        overwrite: args.overwrite,
        partial_max_age: if args.clean {
            Duration::ZERO
        } else {
            args.keep_partials
        },
        allow_dotfiles: args.allow_dotfiles,
        limits: Limits {
            max_connections: args.max_connections,
            max_per_ip: args.max_per_ip,
            // One site's /56 and /48 get a few sources' worth, whatever --max-per-ip says.
            max_per_56: 2 * args.max_per_ip,
            max_per_48: 4 * args.max_per_ip,
            handshake_timeout: args.handshake_timeout,
            ..Limits::default()
        },
        stall_timeout: args.stall_timeout,
        min_rate: args.min_rate,
        congestion: args.congestion,
        port_mapping: super::meet::port_mapping(args.no_port_mapping)?,
        // config.toml's `stun = [...]`: asked only when meeting through a rendezvous.
        stun: super::meet::stun_servers()?,
        turn: super::meet::turn()?,
        sink: args.stdout.then(|| {
            ui.raw_text();
            qpunch::transfer::Sink::new(std::io::stdout())
        }),
        ..ReceiveConfig::new(PathBuf::new())
    };
    // Refused before anything is created or bound.
    match config.policy() {
        Ok(_) => {}
        Err(ShareError::CodeNeedsNetwork) => bail!(
            "--code needs a network to meet on: a rendezvous (--via HOST[:PORT] or {}), or \
             a LAN address to listen on (not loopback)",
            super::meet::ENV
        ),
        Err(ShareError::NobodyToAsk(NobodyToAsk)) => bail!(
            "refusing to receive: there is no terminal to ask for consent. \
             Pass --yes to accept files from anyone, or --allow FINGERPRINT to accept a known sender"
        ),
        Err(e) => return Err(e.into()),
    }
    config.out_dir = match args.out.clone() {
        Some(out) => out,
        None => {
            let out = default_out_dir()?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            out
        }
    };
    let identity = load_identity(&ui)?;
    let share = Share::with_events(identity, Render::receiving(ui.clone(), &config.out_dir));
    let stop = async {
        // Cancel-safe: every branch only waits for a signal.
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => Some(terminate),
            Err(e) => {
                ui.error(&format!("cannot watch for SIGTERM: {e}"));
                None
            }
        };
        let terminated = async {
            match &mut terminate {
                Some(terminate) => terminate.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => ui.say("interrupted"),
            _ = terminated => ui.say("terminated"),
        }
    };
    Ok(share.receive(config, stop).await?)
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

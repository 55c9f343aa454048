//! `qpunch send FILE... --to HOST[:PORT]|CODE`: arguments in, [`Share::send`] out, its
//! events rendered.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qpunch::identity::Fingerprint;
use qpunch::node::Congestion;
use qpunch::share::{SendConfig, Share, ShareError, Target};
use qpunch::transfer;
use qpunch::trust::TrustError;

use super::render::Render;
use super::ui::Ui;
use super::{congestion_parser, load_identity, parse_duration, parse_fingerprint};
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Files and folders to send (in parallel, over one connection). Folders are sent
    /// whole; symbolic links inside them are skipped. `-` alone sends standard input, read
    /// to its end (a pipe: `tar c dir | qpunch send - --to ...`).
    #[arg(required_unless_present = "text")]
    files: Vec<PathBuf>,
    /// The name the receiver stores standard input under (with `-`).
    #[arg(long, default_value = "stdin")]
    name: String,
    /// Send this text instead of files (`-` reads it from standard input, at most 64 KiB):
    /// the receiver shows it rather than storing it.
    #[arg(long, conflicts_with = "files")]
    text: Option<String>,
    /// The receiver: its one-time code (NAMEPLATE-WORD-WORD: met through a rendezvous,
    /// or, with none configured, found on the local network), or HOST / HOST:PORT (port
    /// 9199 when omitted).
    #[arg(long)]
    to: String,
    /// The rendezvous to meet the receiver through, for a code: HOST[:PORT] (port 9200);
    /// default $QPUNCH_RENDEZVOUS, or `rendezvous = "..."` in the qpunch home's config.toml.
    #[arg(long)]
    via: Option<String>,
    #[command(flatten)]
    rendezvous_tcp: super::meet::RendezvousTcpArgs,
    /// The receiver's fingerprint (from its `qpunch receive` banner). Without it, the
    /// first fingerprint seen is trusted and remembered in known_peers.
    #[arg(long, value_parser = parse_fingerprint)]
    peer: Option<Fingerprint>,
    /// Give up when the receiver takes no data for this long (it vanished).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stall_timeout: Duration,
    /// Give up punching after this long (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    punch_timeout: Duration,
    /// Congestion controller: the sender's decides how fast files move (see README,
    /// "Speed on real links").
    #[arg(long = "cc", default_value_t = Congestion::default(), value_parser = congestion_parser())]
    congestion: Congestion,
    /// Do not ask the router to forward our port (PCP, NAT-PMP, UPnP IGD); also
    /// `port_mapping = false` in the qpunch home's config.toml.
    #[arg(long)]
    no_port_mapping: bool,
}

pub async fn run(args: SendArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let selection = selection(&args)?;
    for skipped in &selection.skipped {
        ui.warn(&format!("skipped {skipped}"));
    }
    let identity = load_identity(&ui)?;
    let target = Target::parse(&args.to)
        .map_err(|e| anyhow::anyhow!("{:?} is not a valid code: {e}", args.to.trim()))?;
    let rendezvous = match target {
        Target::Code(_) => super::meet::rendezvous_name(args.via.as_deref())?,
        Target::Host(_) => None,
    };
    let config = SendConfig {
        rendezvous,
        rendezvous_connect: args.rendezvous_tcp.options(),
        peer: args.peer,
        stall_timeout: args.stall_timeout,
        punch_timeout: args.punch_timeout,
        congestion: args.congestion,
        port_mapping: super::meet::port_mapping(args.no_port_mapping)?,
        // config.toml's `stun = [...]`: asked only when meeting through a rendezvous.
        stun: super::meet::stun_servers()?,
        turn: super::meet::turn()?,
        ..SendConfig::default()
    };
    let render = Render::sending(ui.clone());
    let share = Share::with_events(identity, render.clone());
    let interrupted = async {
        // Cancel-safe: both only wait for a signal.
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    match share.send(&target, selection, &config, interrupted).await {
        Ok(sent) => {
            let verified = sent.reports.iter().filter(|r| r.is_verified()).count();
            if let Some(progress) = render.take_sent() {
                progress.summary(
                    &sent.reports,
                    sent.elapsed,
                    &sent.to.to_string(),
                    sent.paths,
                );
            }
            Ok(verified == sent.reports.len())
        }
        Err(ShareError::Interrupted) => {
            if let Some(progress) = render.take_sent() {
                progress.clear();
            }
            bail!("interrupted: run the same command again to resume");
        }
        Err(ShareError::Trust(refused)) => bail!(refusal(&refused)),
        Err(e) => Err(e.into()),
    }
}

/// What to offer: the files and folders named, standard input, or a text.
fn selection(args: &SendArgs) -> anyhow::Result<transfer::Selection> {
    use std::io::Read;
    let one = |file: transfer::Outgoing| transfer::Selection {
        files: vec![file],
        empty_dirs: Vec::new(),
        skipped: Vec::new(),
    };
    if let Some(text) = &args.text {
        let text = if text == "-" {
            let mut read = Vec::new();
            let limit = transfer::MAX_TEXT;
            std::io::stdin()
                .take(limit + 1)
                .read_to_end(&mut read)
                .context("cannot read the text from standard input")?;
            if read.len() as u64 > limit {
                bail!(
                    "the text on standard input is longer than {limit} bytes: send it as a file (`send -`)"
                );
            }
            String::from_utf8(read).context("the text on standard input is not UTF-8")?
        } else {
            text.clone()
        };
        if text.len() as u64 > transfer::MAX_TEXT {
            bail!(
                "the text has {} bytes, more than {}: send it as a file",
                text.len(),
                transfer::MAX_TEXT
            );
        }
        return Ok(one(transfer::Outgoing::text(text)));
    }
    if args.files.iter().any(|f| f.as_os_str() == "-") {
        if args.files.len() > 1 {
            bail!("`-` (standard input) is sent alone: send the other files in another run");
        }
        if args.name.is_empty() || args.name.contains('/') {
            bail!("--name {:?}: a file name, without folders", args.name);
        }
        let stdin = std::io::stdin();
        return Ok(one(transfer::Outgoing::from_reader(
            args.name.clone(),
            stdin,
        )));
    }
    // Transfer errors carry their cause in their message: no chain to print twice.
    transfer::select(&args.files).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the user reads when the trust policy refuses a peer.
fn refusal(refused: &TrustError) -> String {
    match refused {
        TrustError::ReplyFromElsewhere { target, answered } => format!(
            "the probe reply came from {answered}, not from {target} where the probe went. Anyone who \
             saw the probe can answer from elsewhere, and without --peer the key that answers \
             would be trusted on first use: nothing was sent or remembered. If that is the \
             receiver (behind a NAT that changes ports), check its fingerprint with its owner \
             and pass --peer FINGERPRINT"
        ),
        TrustError::NotTheGivenKey {
            key,
            expected,
            actual,
        } => format!(
            "the receiver at {key} presented identity {actual}, not the --peer {expected} you asked for; refusing to send"
        ),
        TrustError::Changed {
            key,
            expected,
            actual,
            known_peers,
        } => changed_identity_warning(key, *expected, *actual, known_peers),
        other => other.to_string(),
    }
}

/// ssh-style refusal when a remembered peer shows a different key.
fn changed_identity_warning(
    key: &str,
    expected: Fingerprint,
    actual: Fingerprint,
    path: &std::path::Path,
) -> String {
    format!(
        "\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         @    WARNING: REMOTE PEER IDENTIFICATION HAS CHANGED!     @\n\
         @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
         IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
         The receiver at {key} presented identity\n    {actual}\n\
         but {path} remembers it as\n    {expected}\n\
         Nothing was sent. If the receiver really has a new identity, check it with its owner,\n\
         then remove the line for {key} from {path} (or pass --peer {actual}).",
        path = path.display()
    )
}

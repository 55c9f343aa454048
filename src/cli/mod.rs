//! The `qpunch` command line: argument parsing and the glue between library and terminal.
//!
//! One room per command (`send`, `receive`, `demo`, `rendezvous`, `natcheck`, and
//! `completions` and `man`, which generate text from these very definitions); what they
//! share lives in `common` (events and addresses), `meet` (which rendezvous, the NAT
//! report), `render` (the library's share events) and `ui` (the terminal), so that no
//! command imports another. `send` and `receive` are argument parsing around
//! [`qpunch::share`].

mod common;
mod completions;
mod demo;
mod man;
mod meet;
mod natcheck;
mod receive;
mod render;
mod rendezvous;
mod send;
mod ui;

use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use qpunch::identity::{Fingerprint, Identity, config_dir};
use qpunch::node::Congestion;

/// Punch through NATs and send files directly, over QUIC.
#[derive(Debug, Parser)]
#[command(version = version(), long_version = long_version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    output: Output,
}

/// Output options shared by every command.
#[derive(Debug, Args, Clone, Copy)]
pub struct Output {
    /// One JSON object per line on stdout instead of text and progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars or messages, only errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// More logging on stderr (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Listen for senders and store the files they send.
    Receive(receive::ReceiveArgs),
    /// Punch a hole to a receiver and send it files.
    Send(send::SendArgs),
    /// Print this machine's identity fingerprint (alone, for scripts).
    Id,
    /// Send a generated file to yourself over loopback: the whole flow, with progress.
    Demo(demo::DemoArgs),
    /// Run a rendezvous: where peers behind NATs meet by one-time code (UDP 9200, 9201).
    Rendezvous(rendezvous::RendezvousArgs),
    /// How does this network's NAT behave? (checked against a rendezvous)
    NatCheck(natcheck::NatCheckArgs),
    /// Print a shell's completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Print the manual page in roff, or write every page into a folder.
    Man(man::ManArgs),
}

/// `-V`: the package version and, so that two users can tell why their qpunches do not
/// talk, the protocol versions it speaks (taken from the library's constants).
fn version() -> &'static str {
    static VERSION: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{} (protocols: {})",
            env!("CARGO_PKG_VERSION"),
            qpunch::version::summary()
        )
    });
    &VERSION
}

/// `--version`: [`version`] on lines of its own, plus the exact ALPN strings.
fn long_version() -> &'static str {
    static LONG: LazyLock<String> = LazyLock::new(|| {
        format!(
            "{}\nprotocols: {}\nALPN: {}",
            env!("CARGO_PKG_VERSION"),
            qpunch::version::summary(),
            qpunch::version::alpns()
        )
    });
    &LONG
}

/// Parse arguments, run, and map the result to an exit status.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.output.verbose);
    // One thread for the QUIC and network work (quinn is fastest without cross-thread
    // hand-offs); disk and hashing run on tokio's blocking pool, i.e. on other cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ui = ui::Ui::new(cli.output.json, cli.output.quiet);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Receive(args) => receive::run(args, ui.clone()).await,
            Command::Send(args) => send::run(args, ui.clone()).await,
            Command::Demo(args) => demo::run(args, ui.clone()).await,
            Command::Rendezvous(args) => rendezvous::run(args, ui.clone()).await,
            Command::NatCheck(args) => natcheck::run(args, ui.clone()).await,
            Command::Completions(args) => completions::run(args),
            Command::Man(args) => man::run(args),
            Command::Id => {
                println!("{}", load_identity(&ui)?.fingerprint());
                Ok(true)
            }
        }
    });
    ui.flush();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            ui.error(&describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, like `{:#}`, but without repeating a cause that
/// an outer message already quotes (library errors often show their source inline too).
pub(crate) fn describe(e: &anyhow::Error) -> String {
    qpunch::share::describe(e.as_ref())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "qpunch=debug,info",
        _ => "qpunch=trace,debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// This machine's identity, created on first use; what is wrong but not fatal about
/// where it is kept (a directory others may write to) is said as a warning.
fn load_identity(ui: &ui::Ui) -> anyhow::Result<Identity> {
    let dir = config_dir()?;
    let (identity, warnings) = Identity::load_or_create_with_warnings(&dir)?;
    for warning in warnings {
        ui.warn(&warning.to_string());
    }
    Ok(identity)
}

/// Parse a duration like `10s`, `500ms` or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err("must be positive".into());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Parse `123`, `64k`, `4KiB`, `256M`, `1G`, `1T` (units are powers of 1024, whether
/// written `k`, `kb` or `kib`, in any case).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// `--cc`: the congestion controller, with the names listed in `--help`.
fn congestion_parser() -> impl clap::builder::TypedValueParser<Value = Congestion> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Congestion::ALL.map(Congestion::as_str))
        .map(|name| name.parse::<Congestion>().expect("a listed name"))
}

/// Parse a fingerprint argument.
fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    s.parse()
        .map_err(|e: qpunch::identity::IdentityError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_plain_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn describe_skips_causes_already_quoted() {
        let io = std::io::Error::other("cannot bind UDP 1.2.3.4:5: in use");
        let e = anyhow::Error::new(qpunch::node::NodeError::from(io))
            .context("cannot serve a rendezvous");
        assert_eq!(
            describe(&e),
            "cannot serve a rendezvous: socket: cannot bind UDP 1.2.3.4:5: in use"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&plain), "outer: inner");
    }
}

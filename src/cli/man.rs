//! `qpunch man`: manual pages in roff, generated from the same clap definitions that parse
//! the command line (so they say exactly what `--help` says).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_mangen::Man;

/// Arguments of `qpunch man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write qpunch.1 and one page per command (qpunch-send.1, ...) into this folder
    /// (created if missing) instead of printing qpunch.1 to stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Print the main page, or write every page into `args.out`.
pub fn run(args: ManArgs) -> anyhow::Result<bool> {
    // No page for clap's `help` command; built once, so that subcommands know their full
    // names (`qpunch-send`).
    let mut command = super::Cli::command().disable_help_subcommand(true);
    command.build();
    match args.out {
        None => {
            let mut stdout = std::io::stdout().lock();
            page(command)
                .render(&mut stdout)
                .context("cannot write the manual page")?;
        }
        Some(dir) => write_all(command, &dir)
            .with_context(|| format!("cannot write manual pages into {}", dir.display()))?,
    }
    Ok(true)
}

/// The page of `command`. Its source line names the package version alone: the version
/// string clap prints also lists the protocols, too long for a page footer.
fn page(command: clap::Command) -> Man {
    Man::new(command).source(format!("qpunch {}", env!("CARGO_PKG_VERSION")))
}

/// Write the page of `command` and of every visible subcommand below it into `dir`.
fn write_all(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_all(sub.clone(), dir)?;
    }
    page(command).generate_to(dir)?;
    Ok(())
}

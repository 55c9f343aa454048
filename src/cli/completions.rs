//! `qpunch completions SHELL`: the shell's completion script on stdout, generated from the
//! same clap definitions that parse the command line, so it cannot fall behind them.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

/// Arguments of `qpunch completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

/// Print the completion script of `args.shell` to stdout.
pub fn run(args: CompletionsArgs) -> anyhow::Result<bool> {
    let mut command = super::Cli::command();
    let name = command.get_name().to_string();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
    Ok(true)
}

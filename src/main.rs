//! `qpunch`: a thin command-line layer over the `qpunch` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}

//! `ferrotune`, the front binary: parses the command line, runs the commands that need no libtorch
//! itself, and hands the others to `ferrotune-worker` after checking that libtorch is present.

use clap::Parser;
use ferrotune::cli::Cli;
use ferrotune::{data_commands, front};
use std::process::ExitCode;

fn main() -> ExitCode {
    front::quiet_broken_pipe();
    let cli = Cli::parse();
    ferrotune::logging::init();
    let result = if cli.command.needs_torch() { front::exec_worker() } else { data_commands::run(cli.command) };
    front::report(result)
}

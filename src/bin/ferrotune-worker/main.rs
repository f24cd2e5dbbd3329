//! `ferrotune-worker`: the libtorch-linked half of ferrotune. Users run `ferrotune`, which starts this
//! binary with the same arguments for commands that run models; it can also be started directly.

use clap::Parser;
use ferrotune::cli::Cli;
use std::process::ExitCode;

mod alloc;
mod commands;

fn main() -> ExitCode {
    ferrotune::front::quiet_broken_pipe();
    let cli = Cli::parse();
    ferrotune::logging::init();
    ferrotune::front::report(commands::run(cli.command))
}

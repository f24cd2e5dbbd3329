//! `ferrotune`, the front binary: parses the command line, runs the commands that need no libtorch
//! itself, and hands the others to `ferrotune-worker` after checking that libtorch is present.

use clap::Parser;
use ferrotune::cli::Cli;
use ferrotune::front;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command so far runs models; data-only commands (check, prepare, launch) will run here.
    let result = match cli.command {
        ref c if c.needs_torch() => front::exec_worker(),
        _ => Ok(()),
    };
    front::report(result)
}

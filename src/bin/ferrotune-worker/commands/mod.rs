//! Subcommands that need libtorch; they run inside `ferrotune-worker`.

pub mod eval;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod probe;
pub mod train;

use ferrotune::cli::Command;

/// Runs a libtorch command.
pub fn run(command: Command) -> anyhow::Result<()> {
    // A typo in FERROTUNE_COMPOSITE stops here, before a run or a measurement quietly uses the fused kernels.
    ferrotune_trainer::kernels::composite_from_env().map_err(anyhow::Error::msg)?;
    match command {
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => eval::export(args),
        Command::Probe(command) => probe::run(command),
        other => ferrotune::data_commands::run(other),
    }
}

//! The `ferrotune` command line: parses flags into a plan and hands it to the library crates. It holds
//! no model, data or training logic of its own; each subcommand lives in its own module here.

mod generate;
mod inspect;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Fine-tune Llama-family models on multi-turn conversations (libtorch through tch).
#[derive(Parser)]
#[command(name = "ferrotune", version, about, long_about = None, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a Hugging Face model directory: architecture, parameter count, shards and dtypes.
    Inspect(inspect::Args),
    /// Answer chat questions with a model by greedy decoding, through the model's own chat template.
    Generate(generate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

//! The command-line interface of `ferrotune`: every subcommand and flag, shared by the front binary
//! (`ferrotune`, which needs no libtorch) and the worker binary (`ferrotune-worker`, linked to libtorch),
//! so both parse the same arguments and `--help` documents everything. No logic lives here.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Fine-tune Llama-family models on multi-turn conversations (libtorch through tch).
#[derive(Parser)]
#[command(name = "ferrotune", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Summarise a Hugging Face model directory: architecture, parameter count, shards and dtypes.
    Inspect(InspectArgs),
    /// Answer chat questions with a model by greedy decoding, through the model's own chat template.
    Generate(GenerateArgs),
}

impl Command {
    /// Whether the command runs models, and so runs in the libtorch-linked worker binary.
    pub fn needs_torch(&self) -> bool {
        matches!(self, Command::Inspect(_) | Command::Generate(_))
    }
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Hugging Face model directory (config.json + model.safetensors or an index with shards).
    pub model_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory with tokenizer.json and a chat template.
    #[arg(long)]
    pub model: PathBuf,
    /// A user message to answer; repeat the flag to answer several in one batch.
    #[arg(long, required = true)]
    pub chat: Vec<String>,
    /// Optional system message placed before each question.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Compute dtype: fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

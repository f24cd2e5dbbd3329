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
    /// Fine-tune a model as a TOML run config describes (see configs/).
    Train(TrainArgs),
    /// Predict one training rank's peak memory by part (weights, gradients, optimizer state,
    /// activations, loss chunk, buckets, allowance) from the config and the model's config.json alone,
    /// say whether it fits the device and, when not, which config change would.
    Plan(PlanArgs),
    /// Run `train` data-parallel: one worker per GPU (or CPU rank) on this node, with rendezvous,
    /// supervision and restarts (ferrotune's torchrun). Example: ferrotune launch --nproc-per-node 2 --
    /// train configs/run.toml
    Launch(LaunchArgs),
    /// Run a grid of training trials (e.g. masking strategy x learning rate) and write a report.
    Sweep(SweepArgs),
    /// Write the Markdown/CSV table and PNG figure of a sweep directory.
    Report(ReportArgs),
    /// Evaluate a model (optionally with a LoRA adapter): masked loss, or CoQA-style EM/F1 by generation.
    Eval(EvalArgs),
    /// Merge a LoRA adapter into its base model and write a full Hugging Face checkpoint.
    Export(ExportArgs),
    /// Validate a JSONL training file (line and message of every problem) and report token statistics.
    Check(CheckArgs),
    /// Show conversations with the tokens a masking strategy trains on marked.
    Preview(PreviewArgs),
    /// Tokenize, mask and pack a JSONL file into a token cache for training.
    Prepare(PrepareArgs),
    /// Convert a dataset into ferrotune's chat JSONL.
    #[command(subcommand)]
    Convert(ConvertCommand),
    /// Check this machine and its devices against references: what the hardware is and how fast its
    /// matrix units run, and single forward/step/generation runs in files a reference reads too
    /// (`scripts/gpu-check` drives these; see README "Checking a GPU host").
    #[command(subcommand)]
    Probe(ProbeCommand),
}

#[derive(Subcommand)]
pub enum ProbeCommand {
    /// The CPU (model, bf16 units), the CUDA devices and driver, the libtorch and NCCL loaded, and the
    /// measured matrix-product peak of a device in fp32 and bf16 (cached in $FERROTUNE_HOME/peaks.json).
    Env(ProbeEnvArgs),
    /// One forward (and backward, with labels) of a model on a safetensors batch: logits, loss, gradients.
    Forward(ProbeForwardArgs),
    /// One optimizer step (LoRA or full fine-tuning) on a safetensors batch: loss, clipped gradient norm
    /// and every trainable parameter after AdamW.
    Step(ProbeStepArgs),
    /// Greedy continuations of token-id prompts (a JSON list of lists), written as JSON.
    Generate(ProbeGenerateArgs),
    /// A 1-rank NCCL communicator on a GPU and an all-reduce of a known buffer.
    Allreduce(ProbeDeviceArgs),
    /// The first N packed rows a 1-rank `train` reads from a prepared cache, as a safetensors file for a
    /// reference loop (input_ids, position_ids, doc_ids, labels, labels_hf).
    Rows(ProbeRowsArgs),
    /// The run directory a train command's config resolves to (output.dir/output.run_name, after the
    /// environment and --set layers), printed alone on a line; `launch` keeps its logs there.
    RunDir(TrainArgs),
}

/// The device and dtype a probe computes in.
#[derive(clap::Args, Clone)]
pub struct ProbeDeviceArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
}

#[derive(clap::Args)]
pub struct ProbeEnvArgs {
    /// Device whose matrix-product peak is measured: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Measure the peak again instead of taking it from the cache.
    #[arg(long)]
    pub remeasure: bool,
}

/// The model a probe runs and the files it reads and writes.
#[derive(clap::Args)]
pub struct ProbeFiles {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// safetensors with input_ids (B, T) and labels (unshifted, -100 = ignored; optional for forward,
    /// which also reads position_ids).
    #[arg(long)]
    pub input: PathBuf,
    /// safetensors to write: forward writes logits (with labels also loss and grad.NAME); step writes
    /// loss, grad_norm, and grad.NAME (clipped, as the step used it) and param.NAME (after the step) of every
    /// trainable parameter.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct ProbeForwardArgs {
    #[command(flatten)]
    pub files: ProbeFiles,
    /// A parameter (Hugging Face name) whose gradient to write; repeatable.
    #[arg(long = "grad", value_name = "NAME")]
    pub grads: Vec<String>,
    #[command(flatten)]
    pub on: ProbeDeviceArgs,
}

#[derive(clap::Args)]
pub struct ProbeStepArgs {
    #[command(flatten)]
    pub files: ProbeFiles,
    /// AdamW learning rate of the step.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW weight decay (not applied to 1-D parameters).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// The global gradient norm is clipped to this before the step.
    #[arg(long, default_value_t = 0.5)]
    pub max_grad_norm: f64,
    /// LoRA rank; without it the step is full fine-tuning.
    #[arg(long)]
    pub lora_r: Option<i64>,
    /// LoRA alpha.
    #[arg(long, default_value_t = 8.0)]
    pub lora_alpha: f64,
    /// LoRA target modules, comma-separated (or all-linear).
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// Where the fresh adapters are written (peft layout) before the step, for the reference to load.
    #[arg(long)]
    pub adapter_out: Option<PathBuf>,
    /// Activation checkpointing of the layer-wise step: none or full.
    #[arg(long, default_value = "full")]
    pub checkpointing: String,
    /// Seed of the adapters' initialisation.
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
    #[command(flatten)]
    pub on: ProbeDeviceArgs,
}

#[derive(clap::Args)]
pub struct ProbeGenerateArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON list of token-id lists.
    #[arg(long)]
    pub prompts: PathBuf,
    /// JSON file to write: the generated ids of each prompt, cut before the first end-of-sequence id.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after this many new tokens per prompt.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub on: ProbeDeviceArgs,
}

#[derive(clap::Args)]
pub struct ProbeRowsArgs {
    /// A token cache made by `prepare` or by `train` (RUN_DIR/cache/train.ftcache).
    #[arg(long)]
    pub cache: PathBuf,
    /// The run's train.seed (the order rows are read in).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How many rows (one per optimizer step).
    #[arg(long)]
    pub rows: usize,
    /// safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum ConvertCommand {
    /// CoQA (official JSON, or the Hugging Face export as JSONL/JSON/Parquet) into conversations: the
    /// story in a system message, then question/answer turns.
    Coqa(CoqaArgs),
}

/// How the model's tokenizer and chat template are chosen (shared by data commands).
#[derive(clap::Args, Clone)]
pub struct TokenizerArgs {
    /// Model (or tokenizer) directory holding tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Chat template: `auto` (the model's own), `llama3`, `llama31` (tool calls) or `chatml` (built in,
    /// any case), or a .jinja file.
    #[arg(long, default_value = "auto")]
    pub template: String,
}

/// Masking options (shared by preview, prepare and train).
#[derive(clap::Args, Clone)]
pub struct MaskArgs {
    /// Which tokens are trained: all, assistant, boilerplate, last, or auto (by data format; per-message
    /// `weight`s decide when present).
    #[arg(long, default_value = "auto")]
    pub strategy: String,
    /// Do not train the end-of-turn token after assistant content (without it, `prepare` refuses data
    /// in which no end-of-turn token is ever trained, since the model would never learn to stop).
    #[arg(long)]
    pub no_train_eot: bool,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The file to check: JSONL (conversations, prompt/completion, text or pre-tokenized rows) or
    /// Parquet. Exit status: 0 clean (warnings allowed), 1 problems found, 2 the file cannot be read.
    pub file: PathBuf,
    /// Also require: first message system or user, system only first, no empty content, no two
    /// consecutive user (or assistant) messages (otherwise a warning).
    #[arg(long)]
    pub strict: bool,
    /// Model directory: adds token statistics (lengths, rows over --max-seq-len, trained fraction per
    /// masking strategy).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Chat template for the statistics: auto, llama3, llama31, chatml or a .jinja file.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Row length the statistics compare against.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Print a machine-readable JSON report instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show at most this many problems (the total is always counted).
    #[arg(long, default_value_t = 50)]
    pub max_problems: usize,
}

#[derive(clap::Args)]
pub struct PreviewArgs {
    /// The JSONL file.
    pub file: PathBuf,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    #[command(flatten)]
    pub mask: MaskArgs,
    /// How many rows to show.
    #[arg(long, default_value_t = 2)]
    pub rows: usize,
    /// Skip this many rows first.
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// One JSON object per row with `ids`, `labels` (shifted, -100 = not trained) and `tokens`.
    #[arg(long)]
    pub json: bool,
    /// Colour trained text: auto (on a terminal), always, never (then ⟦ ⟧ mark it).
    #[arg(long, default_value = "auto")]
    pub color: String,
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The JSONL file.
    pub data: PathBuf,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    #[command(flatten)]
    pub mask: MaskArgs,
    /// Row length in tokens; whole conversations are packed into rows of this length.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Conversations longer than a row: truncate or drop.
    #[arg(long, default_value = "truncate")]
    pub overlong: String,
    /// Output cache file (default: next to the data, DATA.STRATEGY.LEN.ftcache).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(clap::Args)]
pub struct CoqaArgs {
    /// CoQA input: official JSON, or Hugging Face rows as .jsonl, .json or .parquet.
    pub input: PathBuf,
    /// Output conversations JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// System message; `{story}` is replaced by the story.
    #[arg(long, default_value = ferrotune_data::coqa::DEFAULT_SYSTEM)]
    pub system: String,
}

impl Command {
    /// Whether the command runs models, and so runs in the libtorch-linked worker binary.
    pub fn needs_torch(&self) -> bool {
        matches!(
            self,
            Command::Inspect(_)
                | Command::Generate(_)
                | Command::Train(_)
                | Command::Plan(_)
                | Command::Eval(_)
                | Command::Export(_)
                | Command::Probe(_)
        )
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Inspect(_) => "inspect",
            Command::Generate(_) => "generate",
            Command::Train(_) => "train",
            Command::Plan(_) => "plan",
            Command::Launch(_) => "launch",
            Command::Sweep(_) => "sweep",
            Command::Report(_) => "report",
            Command::Eval(_) => "eval",
            Command::Export(_) => "export",
            Command::Check(_) => "check",
            Command::Preview(_) => "preview",
            Command::Prepare(_) => "prepare",
            Command::Convert(_) => "convert",
            Command::Probe(_) => "probe",
        }
    }
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Run configuration (TOML), as given to `train`; only model.path's config.json is read.
    pub config: PathBuf,
    /// Ranks the run will have (divides the batch; with more than one, gradient buckets are counted).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub world: usize,
    /// Memory of one device, e.g. 80GB, 141GiB or 24e9 (default: the GPU's total memory on CUDA, the
    /// host's MemTotal on CPU).
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<String>,
    /// Override a config key, as for `train` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the prediction as JSON.
    #[arg(long)]
    pub json: bool,
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
    /// Chat template: `auto` (the model's own), `llama3`, `llama31`, `chatml`, or a .jinja file.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Optional system message placed before each question.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Compute dtype: auto (bf16 where the device has bf16 matrix units: AMX-BF16 or AVX-512 BF16 CPUs, GPUs of compute capability 8.0+; else fp32), fp32 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run configuration (TOML); see configs/ for documented examples.
    pub config: PathBuf,
    /// Override a config key, e.g. --set train.lr=3e-4 (repeatable; wins over the file and the
    /// FERROTUNE__SECTION__KEY environment variables).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run from its newest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop (after writing a checkpoint) once this many optimizer steps have run in this invocation.
    #[arg(long, value_name = "N")]
    pub stop_after_steps: Option<u64>,
}

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Workers on this node: one per GPU, or CPU ranks sharing its cores.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc_per_node: usize,
    /// Nodes in the job; start one `ferrotune launch` per node.
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// This node's index (0 serves the rendezvous store).
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub master_addr: String,
    /// Port of the rendezvous store on node 0.
    #[arg(long, default_value_t = 29500, value_name = "P")]
    pub master_port: u16,
    /// Restart every worker (from the newest complete checkpoint) up to K times after a failure.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub max_restarts: usize,
    /// Job identifier every node must share; a process of another job on the same port is refused.
    #[arg(long, default_value = "ferrotune", value_name = "ID")]
    pub run_id: String,
    /// Directory for the per-rank log files, one folder per attempt (attempt-K/rank-N.log, K counting
    /// on across launches and restarts, so nothing is overwritten). Default: `logs/` in the run
    /// directory the train config resolves to (output.dir/output.run_name).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Seconds nodes and ranks wait for each other before failing with the names of the missing.
    #[arg(long, default_value_t = 1800, value_name = "S")]
    pub timeout: u64,
    /// The worker command after `--`: `train CONFIG [--set ...] [--resume]`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
pub struct SweepArgs {
    /// Sweep file (TOML): `base` run config, `name`, optional `dir`, `set`, `nproc_per_node`, and a
    /// `[grid]` of config keys to lists of values; see configs/sweep-*.toml.
    pub sweep: PathBuf,
    /// Run this many trials at a time, each with its share of the GPUs (or of the CPU cores).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub parallel: usize,
    /// List the trials and what each changes, and whether it is new, finished, resumes from its
    /// checkpoint or starts again; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a config key in every trial (after the sweep file's `set`, before the grid's values).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// A sweep directory (holding sweep.json and trials/).
    pub dir: PathBuf,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Base model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter directory (peft layout) to apply on the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Conversations JSONL to evaluate on.
    #[arg(long)]
    pub data: PathBuf,
    /// `loss` (masked mean token loss) or `coqa` (answer every question with the gold history; EM/F1).
    #[arg(long, default_value = "loss")]
    pub metric: String,
    /// Chat template: auto, llama3, llama31, chatml or a .jinja file.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Masking strategy for `loss`.
    #[arg(long, default_value = "auto")]
    pub strategy: String,
    /// Row length for `loss`.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Longest answer for `coqa`, in tokens.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Questions (coqa) or rows (loss) per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Where `coqa` writes one JSON line per question (default: DATA.predictions.jsonl).
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Compute dtype: auto (bf16 where the device has bf16 matrix units: AMX-BF16 or AVX-512 BF16 CPUs, GPUs of compute capability 8.0+; else fp32), fp32 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter directory (peft layout).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Merge the adapter into the weights (the only export so far; required for clarity).
    #[arg(long, required = true)]
    pub merge: bool,
    /// Storage dtype of the written checkpoint: fp32 or bf16 (default: the base model's).
    #[arg(long)]
    pub dtype: Option<String>,
}

//! A training run's configuration and the plan resolved from it. TOML sections deserialize into
//! documented structs that refuse unknown keys; layers apply in the order defaults < file <
//! `FERROTUNE__SECTION__KEY` environment variables < `--set section.key=value`. `resolve` then derives
//! everything else (accumulation steps, steps per epoch, warmup, checkpoint and evaluation steps) and
//! fails with the arithmetic in the message. Nothing here touches a model or a file of data.

use crate::dist::buckets::Shard;
use crate::error::{Error, Result};
use crate::layerwise::Checkpointing;
use crate::lora::LoraConfig;
use crate::schedule::{Schedule, Scheduler};
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub lora: LoraSection,
    pub eval: EvalSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Hugging Face model directory.
    pub path: PathBuf,
    /// Compute dtype: auto (bf16 where the device has bf16 matrix units, else fp32), fp32 or bf16
    /// (bf16 keeps fp32 master weights and optimizer state unless `train.optimizer_dtype = "bf16"`).
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Chat template: auto (the model's own), llama3, chatml or a .jinja path.
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training JSONL.
    pub train: PathBuf,
    /// Validation JSONL (optional: "" for none).
    pub validation: PathBuf,
    /// Masking strategy: all, assistant, boilerplate, last, auto.
    pub strategy: String,
    /// Hosted-API spelling of the strategy: true = all, false = assistant, "auto" = auto (leave unset
    /// to use `strategy`).
    pub train_on_inputs: Option<TrainOnInputs>,
    /// Train end-of-turn tokens after assistant content.
    pub train_eot: bool,
    /// Row length in tokens.
    pub max_seq_len: usize,
    /// Conversations longer than a row: truncate or drop.
    pub overlong: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: f64,
    /// Stop after this many optimizer steps (0: epochs decide).
    pub max_steps: u64,
    /// Rows per forward/backward on each rank.
    pub micro_batch_size: usize,
    /// Rows per optimizer step over all ranks (a multiple of micro_batch_size x world size).
    pub batch_size: usize,
    /// Alternative to batch_size: tokens per optimizer step (a multiple of max_seq_len); 0 = unused.
    pub tokens_per_step: usize,
    pub lr: f64,
    /// linear, cosine or constant.
    pub scheduler: String,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub cycles: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub seed: u64,
    /// Evenly spaced checkpoints (the final step is always saved).
    pub n_checkpoints: usize,
    /// Complete checkpoints kept on disk: the newest this many (0: all). The final step's is never
    /// deleted.
    pub keep_checkpoints: usize,
    /// Log every this many steps.
    pub log_every: u64,
    /// Peak FLOP/s of one rank the MFU is measured against (0: measured at start by a short
    /// matrix-product probe on the run's device and dtype, cached per machine in
    /// $FERROTUNE_HOME/peaks.json).
    pub peak_flops: f64,
    /// AdamW's state with a bf16 model: fp32 (fp32 moments and fp32 master weights, 12 B a trainable
    /// parameter) or bf16 (bf16 moments updating the bf16 weights directly, 4 B, as torch.optim.AdamW
    /// on a bf16 model; small updates are lost to bf16 rounding). An fp32 model always keeps fp32 state.
    pub optimizer_dtype: String,
    /// What backward keeps of each decoder layer: none (its whole graph), full (only its input; the
    /// layer runs again in backward: a third more compute for full fine-tuning, half for LoRA),
    /// selective (every `selective_every`-th layer as full, the others as none), or auto (full on
    /// CUDA, none on CPU).
    pub activation_checkpointing: String,
    /// With selective checkpointing: layers 0, k, 2k, ... are recomputed.
    pub selective_every: usize,
    /// Most trained positions projected through lm_head at once (0: fp32 logits near 256 MiB a chunk).
    pub loss_chunk_tokens: usize,
    /// Size of the fp32 gradient buckets summed over ranks while backward runs, in MiB (as DDP's
    /// bucket_cap_mb): smaller buckets start communicating sooner, larger ones send fewer messages.
    pub bucket_mb: f64,
    /// What is sliced over the ranks instead of kept whole on each: none; optimizer (ZeRO-1: AdamW's
    /// moments and fp32 masters, 1/W each); gradients (ZeRO-2: also the gradients, each bucket
    /// reduce-scattered and freed as soon as backward has made it final). Every rank keeps the whole
    /// model for forward and backward. With one rank there is nothing to slice.
    pub shard: String,
    /// Profile this optimizer step (1-based; 0: none) with libtorch's profiler: time per operator (and
    /// per CUDA kernel on a GPU) logged as a table and written to `<run>/profile/`, with a Chrome trace.
    /// The profiled step runs slower than the others (the profiler records every operator).
    pub profile_step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// false: full fine-tuning.
    pub enabled: bool,
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Validation-loss evaluations spread over the run (0: none).
    pub n_evals: usize,
    /// Also score CoQA EM/F1 on the validation conversations at each evaluation and at the end.
    pub coqa: bool,
    pub max_new_tokens: usize,
    /// Questions answered per generation batch.
    pub batch_size: usize,
    /// Stop the run (final checkpoint and export) after this many evaluations in a row without an
    /// improvement of `early_stopping_metric` (0: never).
    pub early_stopping_patience: usize,
    /// The smallest change that counts as an improvement.
    pub early_stopping_min_delta: f64,
    /// What early stopping watches: response_loss, loss (the strategy's own), em or f1.
    pub early_stopping_metric: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub run_name: String,
    /// The dtype of a full fine-tuning export (`model/`): "auto" writes the dtype the base checkpoint
    /// stores (a bf16 base stays bf16, whatever the compute dtype), or "fp32" / "bf16".
    pub save_dtype: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { path: PathBuf::new(), dtype: "auto".into(), device: "cpu".into(), template: "auto".into() }
    }
}
impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: PathBuf::new(),
            validation: PathBuf::new(),
            strategy: "auto".into(),
            train_on_inputs: None,
            train_eot: true,
            max_seq_len: 2048,
            overlong: "truncate".into(),
        }
    }
}
impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1.0,
            max_steps: 0,
            micro_batch_size: 1,
            batch_size: 8,
            tokens_per_step: 0,
            lr: 1e-4,
            scheduler: "cosine".into(),
            warmup_ratio: 0.03,
            min_lr_ratio: 0.0,
            cycles: 0.5,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 42,
            n_checkpoints: 1,
            keep_checkpoints: 3,
            log_every: 1,
            peak_flops: 0.0,
            optimizer_dtype: "fp32".into(),
            activation_checkpointing: "auto".into(),
            selective_every: 2,
            loss_chunk_tokens: 0,
            bucket_mb: 25.0,
            shard: "none".into(),
            profile_step: 0,
        }
    }
}
impl TrainSection {
    /// `bucket_mb` in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * (1 << 20) as f64) as usize
    }
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { enabled: true, r: 8, alpha: 16.0, dropout: 0.05, target_modules: vec!["all-linear".into()] }
    }
}
impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            n_evals: 0,
            coqa: false,
            max_new_tokens: 32,
            batch_size: 16,
            early_stopping_patience: 0,
            early_stopping_min_delta: 0.0,
            early_stopping_metric: "response_loss".into(),
        }
    }
}
impl Default for OutputSection {
    fn default() -> Self {
        OutputSection { dir: PathBuf::from("runs"), run_name: "run".into(), save_dtype: "auto".into() }
    }
}

impl RunConfig {
    /// Layers defaults < `file` < FERROTUNE__SECTION__KEY < `overrides` ("section.key=value", the value
    /// read as TOML, else as a string), with every value's type and range checked: `config_layers`.
    /// Relative paths in the file are taken relative to the file, those of `--set` and the environment
    /// relative to the current directory.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        crate::config_layers::load(file, overrides)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }
}

/// Everything derived from the config and the data, printed at start and saved with the run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub config: RunConfig,
    pub run_dir: PathBuf,
    pub world_size: usize,
    pub mask: MaskOptions,
    pub overlong: Overlong,
    pub lora: Option<LoraConfig>,
    pub rows: usize,
    pub grad_accum: usize,
    pub rows_per_step: usize,
    pub tokens_per_step: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub schedule: Schedule,
    pub checkpoint_steps: Vec<u64>,
    pub eval_steps: Vec<u64>,
    /// `train.activation_checkpointing` with `auto` resolved for the device.
    pub checkpointing: Checkpointing,
    /// `train.shard` (none whatever it says on one rank).
    pub shard: Shard,
}

/// `train.activation_checkpointing` for a run on `device` (cpu, cuda, cuda:N): auto is full on CUDA,
/// where activations are what does not fit, and none on CPU, where memory is plentiful and time is not.
pub fn checkpointing_for(value: &str, every: usize, device: &str) -> Result<Checkpointing> {
    let bad = |key: &str, msg: String| Error::Config { path: PathBuf::new(), key: key.into(), msg };
    match value {
        "auto" if device.starts_with("cuda") => Ok(Checkpointing::Full),
        "auto" => Ok(Checkpointing::None),
        "selective" if every == 0 => Err(bad("train.selective_every", "must be at least 1".into())),
        v => Checkpointing::parse(v, every).ok_or_else(|| {
            bad("train.activation_checkpointing", format!("`{v}` is not none, full, selective or auto"))
        }),
    }
}

/// `data.train_on_inputs` as the hosted API spells it: `true`, `false` or `"auto"` (inputs masked in
/// conversations and prompt/completion rows, trained in plain text; per-message weights decide where
/// given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOnInputs {
    Yes,
    No,
    Auto,
}

impl Serialize for TrainOnInputs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TrainOnInputs::Yes => s.serialize_bool(true),
            TrainOnInputs::No => s.serialize_bool(false),
            TrainOnInputs::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for TrainOnInputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TrainOnInputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> std::result::Result<TrainOnInputs, E> {
                Ok(if b { TrainOnInputs::Yes } else { TrainOnInputs::No })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<TrainOnInputs, E> {
                match s {
                    "auto" => Ok(TrainOnInputs::Auto),
                    "true" => Ok(TrainOnInputs::Yes),
                    "false" => Ok(TrainOnInputs::No),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The masking options and overlong policy a config asks for.
pub fn data_options(c: &DataSection) -> Result<(MaskOptions, Overlong)> {
    let bad = |key: &str, msg: String| Error::Config { path: PathBuf::new(), key: key.into(), msg };
    let strategy = match c.train_on_inputs {
        Some(TrainOnInputs::Yes) => Strategy::All,
        Some(TrainOnInputs::No) => Strategy::Assistant,
        Some(TrainOnInputs::Auto) => Strategy::Auto,
        None => Strategy::parse(&c.strategy).ok_or_else(|| {
            bad("data.strategy", format!("`{}` is not one of all, assistant, boilerplate, last, auto", c.strategy))
        })?,
    };
    if c.train_on_inputs.is_some() && c.strategy != "auto" {
        return Err(bad("data.train_on_inputs", "set either train_on_inputs or strategy, not both".into()));
    }
    let overlong = match c.overlong.as_str() {
        "truncate" => Overlong::Truncate,
        "drop" => Overlong::Drop,
        o => return Err(bad("data.overlong", format!("`{o}` is not truncate or drop"))),
    };
    Ok((MaskOptions { strategy, train_eot: c.train_eot }, overlong))
}

/// Steps at which n evenly spaced events happen in a run of `total` steps (1-based step counts).
pub fn evenly_spaced(total: u64, n: usize) -> Vec<u64> {
    let mut v: Vec<u64> = (1..=n as u64).map(|i| (total * i).div_ceil(n as u64)).filter(|&s| s > 0).collect();
    v.dedup();
    v
}

/// Resolves the plan for `rows` packed rows on `world_size` ranks.
pub fn resolve(config: RunConfig, rows: usize, world_size: usize) -> Result<Plan> {
    let bad = |key: &str, msg: String| Error::Config { path: PathBuf::new(), key: key.into(), msg };
    let t = &config.train;
    let (mask, overlong) = data_options(&config.data)?;
    let seq = config.data.max_seq_len;
    let rows_per_step = if t.tokens_per_step > 0 {
        if !t.tokens_per_step.is_multiple_of(seq) {
            return Err(bad(
                "train.tokens_per_step",
                format!("{} is not a multiple of data.max_seq_len = {seq}", t.tokens_per_step),
            ));
        }
        t.tokens_per_step / seq
    } else {
        t.batch_size
    };
    let per_micro = t.micro_batch_size * world_size;
    if t.micro_batch_size == 0 || rows_per_step == 0 || !rows_per_step.is_multiple_of(per_micro) {
        return Err(bad(
            "train.batch_size",
            format!(
                "{rows_per_step} rows per step is not a multiple of micro_batch_size ({}) x world size ({world_size}) = {per_micro}",
                t.micro_batch_size
            ),
        ));
    }
    if t.bucket_mb.is_nan() || t.bucket_mb <= 0.0 {
        return Err(bad("train.bucket_mb", format!("{} must be positive", t.bucket_mb)));
    }
    if t.log_every == 0 {
        return Err(bad("train.log_every", "must be at least 1".into()));
    }
    let grad_accum = rows_per_step / per_micro;
    let rows_per_rank = rows.div_ceil(world_size);
    let steps_per_epoch = rows_per_rank.div_ceil(t.micro_batch_size * grad_accum) as u64;
    let total_steps = if t.max_steps > 0 { t.max_steps } else { (t.epochs * steps_per_epoch as f64).ceil() as u64 };
    if total_steps == 0 {
        return Err(bad("train.epochs", format!("{} epochs of {steps_per_epoch} steps is no step at all", t.epochs)));
    }
    if t.profile_step > total_steps {
        let msg = format!("step {} is past the run's last, {total_steps}; hint: 0 profiles no step", t.profile_step);
        return Err(bad("train.profile_step", msg));
    }
    if t.profile_step > 0 && !crate::profile::AVAILABLE {
        let msg = "this build has no profiler (libtorch's headers lacked torch/csrc/autograd/profiler_kineto.h); hint: set it to 0".into();
        return Err(bad("train.profile_step", msg));
    }
    let kind = match t.scheduler.as_str() {
        "linear" => Scheduler::Linear,
        "cosine" => Scheduler::Cosine,
        "constant" => Scheduler::Constant,
        s => return Err(bad("train.scheduler", format!("`{s}` is not linear, cosine or constant"))),
    };
    let schedule = Schedule {
        kind,
        peak_lr: t.lr,
        warmup_steps: (t.warmup_ratio * total_steps as f64).ceil() as u64,
        total_steps,
        min_lr_ratio: t.min_lr_ratio,
        cycles: t.cycles,
    };
    let lora = config.lora.enabled.then(|| LoraConfig {
        r: config.lora.r,
        alpha: config.lora.alpha,
        dropout: config.lora.dropout,
        target_modules: config.lora.target_modules.clone(),
    });
    if let Some(l) = &lora {
        l.targets().map_err(|e| bad("lora.target_modules", e))?;
        if l.r <= 0 {
            return Err(bad("lora.r", format!("{} must be positive", l.r)));
        }
    }
    let mut checkpoint_steps = evenly_spaced(total_steps, config.train.n_checkpoints.max(1));
    if checkpoint_steps.last() != Some(&total_steps) {
        checkpoint_steps.push(total_steps);
    }
    let eval_steps = evenly_spaced(total_steps, config.eval.n_evals);
    let checkpointing = checkpointing_for(&t.activation_checkpointing, t.selective_every, &config.model.device)?;
    let shard = match Shard::parse(&t.shard).map_err(|e| bad("train.shard", e.to_string()))? {
        _ if world_size == 1 => Shard::None,
        s => s,
    };
    let run_dir = config.output.dir.join(&config.output.run_name);
    Ok(Plan {
        run_dir,
        world_size,
        mask,
        overlong,
        lora,
        rows,
        grad_accum,
        rows_per_step,
        tokens_per_step: rows_per_step * seq,
        steps_per_epoch,
        total_steps,
        schedule,
        checkpoint_steps,
        eval_steps,
        checkpointing,
        shard,
        config,
    })
}

/// The hyperparameters shown in TensorBoard's HParams dashboard: every key of the resolved config
/// (`section.key`; lists joined by commas; `output.*` left out, it names the run rather than
/// describing it), plus the derived rows per step, total steps and the resolved masking strategy.
/// Every swept key of a sweep is therefore a column there.
pub fn hparams_of(cfg: &RunConfig, plan: &Plan) -> std::collections::BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    let mut h = std::collections::BTreeMap::new();
    let table: toml::Table = toml::from_str(&cfg.to_toml()).expect("the resolved config is valid TOML");
    for (section, keys) in table.iter().filter(|(s, _)| s.as_str() != "output") {
        let Some(keys) = keys.as_table() else { continue };
        for (key, v) in keys {
            let value = match v {
                toml::Value::String(s) => json!(s),
                toml::Value::Integer(i) => json!(i),
                toml::Value::Float(f) => json!(f),
                toml::Value::Boolean(b) => json!(b),
                toml::Value::Array(a) => {
                    json!(a
                        .iter()
                        .map(|x| x.as_str().map_or(x.to_string(), String::from))
                        .collect::<Vec<_>>()
                        .join(","))
                }
                other => json!(other.to_string()),
            };
            h.insert(format!("{section}.{key}"), value);
        }
    }
    h.insert("data.strategy".into(), json!(plan.mask.strategy.as_str()));
    h.insert("train.rows_per_step".into(), json!(plan.rows_per_step));
    h.insert("train.total_steps".into(), json!(plan.total_steps));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.toml");
        std::fs::write(&f, "[train]\nlr = 3e-4\nbatch_size = 4\n[data]\nstrategy = \"last\"\n").unwrap();
        let c = RunConfig::load(Some(&f), &["train.batch_size=2".into(), "data.strategy=boilerplate".into()]).unwrap();
        assert_eq!((c.train.lr, c.train.batch_size, c.data.strategy.as_str()), (3e-4, 2, "boilerplate"));
        assert_eq!(c.train.seed, 42, "defaults fill the rest");
        std::fs::write(&f, "[train]\nlearning_rate = 1e-4\n").unwrap();
        let err = RunConfig::load(Some(&f), &[]).unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn plan_arithmetic_and_its_errors() {
        let mut c = RunConfig::default();
        c.train.batch_size = 8;
        c.train.micro_batch_size = 2;
        c.train.epochs = 2.0;
        c.train.n_checkpoints = 2;
        let p = resolve(c.clone(), 37, 2).unwrap();
        // 37 rows on 2 ranks: 19 each; 2 rows x 2 accumulation per rank-step: 5 steps per epoch.
        assert_eq!((p.grad_accum, p.steps_per_epoch, p.total_steps), (2, 5, 10));
        assert_eq!(p.checkpoint_steps, vec![5, 10]);
        c.train.batch_size = 6;
        let err = resolve(c, 37, 2).unwrap_err().to_string();
        assert!(
            err.contains("6 rows per step is not a multiple of micro_batch_size (2) x world size (2) = 4"),
            "{err}"
        );
        assert_eq!(evenly_spaced(10, 3), vec![4, 7, 10]);
        assert_eq!(checkpointing_for("auto", 2, "cuda:1").unwrap(), Checkpointing::Full);
        assert_eq!(checkpointing_for("auto", 2, "cpu").unwrap(), Checkpointing::None);
        assert_eq!(checkpointing_for("full", 2, "cpu").unwrap(), Checkpointing::Full);
        assert_eq!(checkpointing_for("selective", 3, "cpu").unwrap(), Checkpointing::Every(3));
        assert_eq!(Checkpointing::Every(3).recomputed(30), 10);
        let err = checkpointing_for("selective", 0, "cpu").unwrap_err().to_string();
        assert!(err.contains("train.selective_every"), "{err}");
        let err = checkpointing_for("some", 2, "cpu").unwrap_err().to_string();
        assert!(err.contains("train.activation_checkpointing") && err.contains("`some`"), "{err}");
    }

    #[test]
    fn every_bundled_run_config_loads_and_resolves() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let sweep = p.file_name().is_some_and(|f| f.to_string_lossy().starts_with("sweep-"));
            if p.extension().is_some_and(|x| x == "toml") && !sweep {
                let c = RunConfig::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let world = if p.to_string_lossy().contains("multigpu") { 8 } else { 1 };
                resolve(c, 1024, world).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2);
    }
}

//! The training loop, one for every run, on 1 or N ranks: fetch this rank's micro-batches, count the
//! trained tokens of the whole step (all ranks), forward/backward with the loss divided by that count,
//! all-reduce the gradients, clip, step, schedule, log, evaluate, checkpoint. With one rank the
//! collectives are identities (`dist::Single`). Rank 0 alone writes files, logs metrics and evaluates.
//! It reads top to bottom; the pieces it calls (model, loss, optimizer, schedule, data loader,
//! collectives, checkpoint) know nothing of each other.

use crate::checkpoint::{self, TrainState};
use crate::dist::{self, Collective};
use crate::error::{Error, Result};
use crate::lora::{self, LoraConfig};
use crate::metrics::{Logger, PeakMemory};
use crate::model::{Attend, Llama};
use crate::optim::{AdamW, AdamWConfig};
use crate::plan::{self, Plan, RunConfig};
use crate::{load_model, loss, parse_kind, weights};
use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use ferrotune_data::loader::{Batch, Loader};
use ferrotune_data::prepare::{open_or_prepare, PrepareOptions};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A model with its trainable parameters and optimizer.
pub struct Trainer {
    pub model: Llama,
    pub opt: AdamW,
    /// Trainable tensors under their checkpoint names (peft names for LoRA, Hugging Face names for
    /// full fine-tuning).
    pub trainable: Vec<(String, Tensor)>,
    pub lora: Option<LoraConfig>,
    training: Rc<Cell<bool>>,
}

/// Tensors of a batch on `device`, plus the trained positions computed on the host (no device sync).
pub struct BatchTensors {
    pub ids: Tensor,
    pub positions: Tensor,
    /// The rows' documents, found from the host's ids.
    pub attend: Attend,
    pub idx: Tensor,
    pub targets: Tensor,
    pub trained: usize,
}

pub fn to_tensors(b: &Batch, device: Device) -> BatchTensors {
    let shape = [b.rows as i64, b.seq as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(device);
    let (mut idx, mut targets) = (Vec::with_capacity(b.trained_tokens), Vec::with_capacity(b.trained_tokens));
    for (i, &l) in b.labels.iter().enumerate() {
        if l != -100 {
            idx.push(i as i64);
            targets.push(l);
        }
    }
    BatchTensors {
        ids: t(&b.ids),
        positions: t(&b.position_ids),
        attend: Attend::packed(&b.doc_ids, b.rows, device),
        idx: Tensor::from_slice(&idx).to_device(device),
        targets: Tensor::from_slice(&targets).to_device(device),
        trained: idx.len(),
    }
}

impl Trainer {
    /// Loads the model; with `lora`, freezes it and attaches fresh adapters (seeded by `seed`).
    pub fn new(
        model_dir: &Path,
        kind: Kind,
        device: Device,
        lora: Option<LoraConfig>,
        adamw: AdamWConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut model = load_model(model_dir, kind, device)?;
        let training = Rc::new(Cell::new(false));
        let trainable = match &lora {
            Some(cfg) => {
                model.set_requires_grad(false);
                tch::manual_seed(seed as i64);
                lora::attach(&mut model, cfg, training.clone()).map_err(Error::Invalid)?
            }
            None => {
                model.set_requires_grad(true);
                model.named_parameters()
            }
        };
        let opt = AdamW::new(trainable.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), adamw);
        Ok(Trainer { model, opt, trainable, lora, training })
    }

    /// Forward and backward of one micro-batch; the loss is divided by `denom`, the trained tokens of
    /// the whole optimizer step. Returns the (detached) sum of the micro-batch's token losses.
    pub fn micro_step(&self, b: &BatchTensors, denom: f64) -> Tensor {
        self.training.set(true);
        let hidden = self.model.forward_packed(&b.ids, &b.positions, &b.attend);
        let sum = loss::masked_ce_sum(&self.model, &hidden, &b.idx, &b.targets);
        (&sum / denom).backward();
        self.training.set(false);
        sum.detach()
    }

    /// Writes the adapter (peft layout) or the whole model (Hugging Face layout) to `dir`.
    pub fn export(&self, dir: &Path, base_model: &Path) -> Result<()> {
        match &self.lora {
            Some(cfg) => {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                checkpoint::save_named(&dir.join("adapter_model.safetensors"), &self.trainable)?;
                let c = lora::adapter_config(cfg, &base_model.display().to_string());
                let p = dir.join("adapter_config.json");
                std::fs::write(&p, serde_json::to_string_pretty(&c).expect("json")).map_err(Error::io(&p))
            }
            None => weights::save_pretrained(&self.model, dir, self.model.kind(), 2 << 30),
        }?;
        copy_tokenizer_files(base_model, dir)
    }
}

/// tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json (when present).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).map_err(Error::io(to.join(f)))?;
        }
    }
    Ok(())
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        o => match o.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::Cuda(n)),
            None => Err(Error::Invalid(format!("unknown device `{o}`; expected cpu, cuda or cuda:N"))),
        },
    }
}

/// Options of one invocation (not part of the run's config).
pub struct RunOptions {
    pub resume: bool,
    /// Stop after this many optimizer steps in this invocation (after checkpointing).
    pub stop_after: Option<u64>,
    /// Called with (bytes done, total) while a token cache is built.
    pub progress: Box<dyn Fn(u64, u64) + Sync>,
    /// Called after every optimizer step with (step, total steps, loss): drives a progress bar.
    pub on_step: Box<dyn Fn(u64, u64, f64)>,
}

impl RunOptions {
    /// Options with no progress reporting.
    pub fn new(resume: bool, stop_after: Option<u64>) -> Self {
        RunOptions { resume, stop_after, progress: Box::new(|_, _| {}), on_step: Box::new(|_, _, _| {}) }
    }
}

pub struct Outcome {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub final_loss: f64,
    pub final_val_loss: Option<f64>,
    /// Where the adapter or model was exported (None when stopped early).
    pub export_dir: Option<PathBuf>,
}

/// Encoder (tokenizer + template) for the model of a run config.
pub fn encoder_for(cfg: &RunConfig) -> Result<Encoder> {
    Encoder::from_model_dir(&cfg.model.path, &cfg.model.template).map_err(|e| Error::Invalid(e.to_string()))
}

fn cache_for(
    data: &Path,
    out: &Path,
    enc: &Encoder,
    cfg: &RunConfig,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<TokenCache> {
    let (mask, overlong) = plan::data_options(&cfg.data)?;
    let opts = PrepareOptions::new(mask, cfg.data.max_seq_len, overlong);
    open_or_prepare(data, enc, &opts, out, progress).map_err(|e| Error::Invalid(e.to_string()))
}

/// Approximate FLOPs of one step: 2 per weight per token forward (decoder matmuls on every token,
/// lm_head on trained tokens only), backward twice that for full fine-tuning and once (activation
/// gradients only) for LoRA. Attention scores are left out.
fn step_flops(m: &Llama, tokens: usize, trained: usize, lora: bool) -> f64 {
    let c = &m.config;
    let per_layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        + 3 * c.hidden_size * c.intermediate_size;
    let decoder = (per_layer * c.num_hidden_layers) as f64;
    let head = (c.vocab_size * c.hidden_size) as f64;
    let fwd = 2.0 * (decoder * tokens as f64 + head * trained as f64);
    fwd * if lora { 2.0 } else { 3.0 }
}

/// Trains on this process's rank of `coll`; every rank calls it with the same config.
pub fn train(cfg: RunConfig, opts: RunOptions, coll: &mut dyn Collective, logger: &mut dyn Logger) -> Result<Outcome> {
    let (rank, world) = (coll.rank(), coll.world());
    let lead = rank == 0;
    let kind = parse_kind(&cfg.model.dtype)?;
    let device = parse_device(&cfg.model.device)?;
    let run_dir = cfg.output.dir.join(&cfg.output.run_name);
    let existing = checkpoint::latest(&run_dir);
    if opts.resume && existing.is_none() {
        return Err(Error::Checkpoint {
            path: checkpoint::checkpoints_dir(&run_dir),
            msg: "no complete checkpoint to resume from; hint: drop --resume to start the run".into(),
        });
    }
    if !opts.resume && existing.is_some() {
        return Err(Error::Checkpoint {
            path: run_dir.clone(),
            msg: "this run already has checkpoints; hint: pass --resume to continue it, or set output.run_name".into(),
        });
    }
    std::fs::create_dir_all(run_dir.join("cache")).map_err(Error::io(&run_dir))?;

    // Data: token caches of the training and validation files, built by rank 0 on the first run
    // (the others wait, then open them).
    let enc = encoder_for(&cfg)?;
    let has_val = !cfg.data.validation.as_os_str().is_empty();
    let caches = || -> Result<(TokenCache, Option<TokenCache>)> {
        let train = cache_for(&cfg.data.train, &run_dir.join("cache/train.ftcache"), &enc, &cfg, &*opts.progress)?;
        let val = if has_val {
            Some(cache_for(
                &cfg.data.validation,
                &run_dir.join("cache/validation.ftcache"),
                &enc,
                &cfg,
                &*opts.progress,
            )?)
        } else {
            None
        };
        Ok((train, val))
    };
    let built = if lead { Some(caches()) } else { None };
    coll.barrier()?;
    let (train_cache, val_cache) = match built {
        Some(c) => c?,
        None => caches()?,
    };

    // Plan: everything derived, printed and saved with the run.
    let plan: Plan = plan::resolve(cfg.clone(), train_cache.rows(), world)?;
    if lead {
        let plan_path = run_dir.join("plan.json");
        std::fs::write(&plan_path, serde_json::to_string_pretty(&plan).expect("plan serializes"))
            .map_err(Error::io(&plan_path))?;
        let config_path = run_dir.join("config.toml");
        std::fs::write(&config_path, cfg.to_toml()).map_err(Error::io(&config_path))?;
    }
    tracing::debug!(rank, world, "joined");
    if lead {
        let method = match &plan.lora {
            Some(l) => format!("LoRA r={} alpha={} on {:?}", l.r, l.alpha, l.target_modules),
            None => "full fine-tuning".into(),
        };
        tracing::info!(
            "plan: {} rows of {} tokens, {} steps ({} per epoch), {} rows/step ({} micro-batches of {}), lr {:e} {:?} warmup {}, {method}",
            plan.rows,
            cfg.data.max_seq_len,
            plan.total_steps,
            plan.steps_per_epoch,
            plan.rows_per_step,
            plan.grad_accum,
            cfg.train.micro_batch_size,
            plan.schedule.peak_lr,
            plan.schedule.kind,
            plan.schedule.warmup_steps,
        );
    }
    // What an earlier attempt logged after this run's starting point (its checkpoint, or step 0 for a
    // fresh start in a run directory left by a crash before the first checkpoint) is dropped.
    logger.starts_after(existing.as_ref().map_or(0, |(s, _)| *s));
    logger.text("config", &format!("```toml\n{}```", cfg.to_toml()));

    let t = &cfg.train;
    let adamw = AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let mut trainer = Trainer::new(&cfg.model.path, kind, device, plan.lora.clone(), adamw, t.seed)?;
    let params: Vec<Tensor> = trainer.trainable.iter().map(|(_, p)| p.shallow_clone()).collect();
    let mut everything = trainer.model.named_parameters().into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    everything.extend(params.iter().map(Tensor::shallow_clone));
    dist::verify_same_weights(coll, &everything)?;
    drop(everything);
    let mut loader = Loader::new(&train_cache, rank, world, t.seed, t.micro_batch_size);
    let mut step = 0u64;
    let mut last_loss = f64::NAN;
    if let Some((s, dir)) = existing.filter(|_| opts.resume) {
        checkpoint::load_named(&dir.join("trainable.safetensors"), &trainer.trainable)?;
        trainer.opt.load(&dir)?;
        let state = checkpoint::read_state(&dir)?;
        loader.restore(state.loader);
        step = s;
        last_loss = state.last_loss;
        tracing::info!("resumed from {} (step {s}, loss {last_loss:.4})", dir.display());
    }

    let peak = if t.peak_flops > 0.0 {
        t.peak_flops
    } else if device.is_cuda() {
        989e12
    } else if kind == Kind::BFloat16 {
        740e9
    } else {
        170e9
    };
    let mut memory = PeakMemory::new(device);
    let mut final_val = None;
    let mut final_qa = None;
    let started_at = step;
    let mut window = (Instant::now(), 0usize, 0usize, 0.0f64); // (since, tokens, trained, flops)
    let mut busy = 0.0f64; // this rank's seconds outside collectives in the window (stragglers show here)
    while step < plan.total_steps {
        let step_start = Instant::now();
        let lr = plan.schedule.lr(step);
        let batches: Vec<BatchTensors> =
            (0..plan.grad_accum).map(|_| to_tensors(&loader.next_batch(), device)).collect();
        // The loss of the step is divided by its trained tokens over all ranks and micro-batches.
        let mut trained = [batches.iter().map(|b| b.trained).sum::<usize>() as f64];
        let waited = Instant::now(); // here the other ranks wait out rank 0's evaluations and checkpoints
        coll.all_reduce_f64(&mut trained)?;
        let waited = waited.elapsed();
        let trained = trained[0] as usize;
        let denom = trained.max(1) as f64;
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        for (m, b) in batches.iter().enumerate() {
            // RNG (LoRA dropout) is a function of (seed, step, global micro-batch index): a resumed run
            // draws the same numbers, and so do N ranks and one rank accumulating N micro-batches.
            let micro = (m * world + rank) as u64;
            let key = (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            tch::manual_seed((t.seed ^ key) as i64);
            loss_sum += trainer.micro_step(b, denom);
        }
        if let (Device::Cuda(ordinal), true) = (device, world > 1) {
            // Kernels run asynchronously: without waiting for them, the per-rank time would be launch
            // time and a slow GPU would not show. The step's loss read below waits for them anyway.
            tch::Cuda::synchronize(ordinal as i64);
        }
        busy += (step_start.elapsed() - waited).as_secs_f64();
        // Gradients are summed over ranks once per step, after the last micro-batch.
        dist::all_reduce_grads(coll, &params)?;
        // One host sync per step: the loss is checked before the update touches the weights.
        let mut loss = [loss_sum.double_value(&[])];
        coll.all_reduce_f64(&mut loss)?;
        let loss = loss[0] / denom;
        if !loss.is_finite() {
            let last =
                checkpoint::latest(&run_dir).map_or("none".into(), |(s, d)| format!("step {s} at {}", d.display()));
            return Err(Error::Invalid(format!(
                "loss is {loss} at step {} (lr {lr:e}); stopped before the update, the last good checkpoint is {last}; hint: lower train.lr or inspect the data with `ferrotune preview`",
                step + 1
            )));
        }
        let grad_norm = trainer.opt.clip_grad_norm(t.max_grad_norm);
        trainer.opt.step(lr);
        step += 1;
        last_loss = loss;
        (opts.on_step)(step, plan.total_steps, loss);
        let tokens = plan.tokens_per_step;
        window.1 += tokens;
        window.2 += trained;
        window.3 += step_flops(&trainer.model, tokens, trained, plan.lora.is_some());

        if step.is_multiple_of(t.log_every) || step == plan.total_steps {
            let secs = window.0.elapsed().as_secs_f64();
            let per_rank = coll.all_gather_f64(window.1 as f64 / world as f64 / busy.max(1e-9))?;
            let mem = memory.sample().map(|b| b as f64 / 1e9);
            let gn = grad_norm.double_value(&[]);
            let mut vals = vec![
                ("train/loss", loss),
                ("train/lr", lr),
                ("train/grad_norm", gn),
                ("train/tokens_per_s", window.1 as f64 / secs),
                ("train/trained_tokens_per_s", window.2 as f64 / secs),
                ("train/mfu", window.3 / secs / (peak * world as f64)),
                ("train/epoch", step as f64 / plan.steps_per_epoch as f64),
            ];
            vals.extend(mem.map(|gb| ("train/peak_mem_gb", gb)));
            logger.scalars(step, &vals);
            if world > 1 && lead {
                let named: Vec<(String, f64)> =
                    per_rank.iter().enumerate().map(|(r, v)| (format!("rank{r}/tokens_per_s"), *v)).collect();
                logger.scalars(step, &named.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>());
                tracing::info!(
                    "step {step}: tok/s per rank outside collectives {}",
                    per_rank.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" ")
                );
            }
            if lead {
                tracing::info!(
                    "step {step}/{} | loss {loss:.4} | lr {lr:.2e} | grad {gn:.3} | {:.0} tok/s ({:.0} trained/s) | mfu {:.1}% | mem {}",
                    plan.total_steps, vals[3].1, vals[4].1, 100.0 * vals[5].1,
                    mem.map_or("unknown".into(), |gb| format!("{gb:.2} GB"))
                );
            }
            window = (Instant::now(), 0, 0, 0.0);
            busy = 0.0;
        }
        // Evaluations and checkpoints are not training: the throughput window skips their time.
        let pause = Instant::now();
        if lead && (plan.eval_steps.contains(&step) || (step == plan.total_steps && cfg.eval.coqa)) {
            if let Some(vc) = &val_cache {
                let (v, _) = crate::eval::mean_loss(&trainer.model, vc, t.micro_batch_size);
                logger.scalars(step, &[("eval/loss", v)]);
                tracing::info!("step {step}: validation loss {v:.4}");
                final_val = Some(v);
                if cfg.eval.coqa {
                    let convs = ferrotune_data::coqa::read_conversations(&cfg.data.validation)
                        .map_err(|e| Error::Invalid(e.to_string()))?;
                    let s = crate::eval::coqa(
                        &trainer.model,
                        &enc,
                        &convs,
                        cfg.eval.max_new_tokens,
                        cfg.eval.batch_size,
                        &|_, _| {},
                    )
                    .map_err(Error::Invalid)?;
                    logger.scalars(step, &[("eval/em", s.em), ("eval/f1", s.f1)]);
                    tracing::info!("step {step}: CoQA EM {:.1} F1 {:.1} ({} questions)", s.em, s.f1, s.questions);
                    final_qa = Some((s.em, s.f1));
                }
            }
        }
        let stopping = opts.stop_after.is_some_and(|n| step - started_at >= n);
        if lead && (plan.checkpoint_steps.contains(&step) || stopping) {
            let state = TrainState { step, loader: loader.state(), last_loss };
            let dir = checkpoint::save(&run_dir, step, |d| {
                checkpoint::save_named(&d.join("trainable.safetensors"), &trainer.trainable)?;
                trainer.opt.save(d)?;
                checkpoint::write_state(d, &state)?;
                let c = d.join("config.toml");
                std::fs::write(&c, cfg.to_toml()).map_err(Error::io(&c))
            })?;
            tracing::info!("checkpoint {}", dir.display());
        }
        window.0 += pause.elapsed();
        logger.flush();
        if stopping && step < plan.total_steps {
            return Ok(Outcome {
                run_dir,
                steps: step,
                final_loss: last_loss,
                final_val_loss: final_val,
                export_dir: None,
            });
        }
    }
    let export_dir = run_dir.join(if plan.lora.is_some() { "adapter" } else { "model" });
    if !lead {
        return Ok(Outcome { run_dir, steps: step, final_loss: last_loss, final_val_loss: None, export_dir: None });
    }
    if export_dir.exists() {
        std::fs::remove_dir_all(&export_dir).map_err(Error::io(&export_dir))?;
    }
    trainer.export(&export_dir, &cfg.model.path)?;
    let mut metrics = vec![("hparams/train_loss", last_loss)];
    metrics.extend(final_val.map(|v| ("hparams/eval_loss", v)));
    if let Some((em, f1)) = final_qa {
        metrics.extend([("hparams/em", em), ("hparams/f1", f1)]);
    }
    logger.hparams(&hparams_of(&cfg, &plan), &metrics);
    Ok(Outcome { run_dir, steps: step, final_loss: last_loss, final_val_loss: final_val, export_dir: Some(export_dir) })
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

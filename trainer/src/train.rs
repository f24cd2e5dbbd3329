//! The training loop, one for every run, on 1 or N ranks: fetch this rank's micro-batches, count the
//! trained tokens of the whole step (all ranks), forward/backward stage by stage with the loss divided
//! by that count (the last micro-batch's gradients summed over ranks while its backward runs, or,
//! sharded, reduce-scattered into each rank's slice), clip, step, (sharded) gather the updated weights,
//! schedule, log, evaluate, checkpoint. With one rank the collectives are identities
//! (`dist::Single`). Every rank evaluates its share (`evaluation`); rank 0 alone logs metrics; every rank writes its optimizer slice
//! into a sharded checkpoint, rank 0 everything else. `train` reads top to bottom
//! as a list of phases; the pieces they call (model, layer-wise step, optimizer, schedule, data loader,
//! collectives, checkpoint) know nothing of each other. What it does before the first step (plan, MFU
//! peak, loading and resuming) is in `setup.rs`.

use crate::batch::{to_tensors, BatchTensors};
use crate::checkpoint::{self, TrainState};
use crate::dist::buckets::{GradBuckets, Shard};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::eval;
use crate::evaluation::{self, EarlyStop, Validation};
use crate::layerwise::StepOptions;
use crate::learner::Trainer;
use crate::metrics::{Logger, PeakMemory};
use crate::plan::{self, Plan, RunConfig};
use crate::setup::{load_and_resume, log_sharding, mfu_peak, resolve_plan};
use crate::{resume, run_data};
use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use ferrotune_data::loader::Loader;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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

/// `parse_device`, and the device checked to exist here: a CUDA ordinal libtorch does not see is an
/// error (not a panic inside the bindings later), with what it does see. On CUDA, attention then avoids
/// cuDNN's per-shape plans (`sdp::configure` says why).
pub fn usable_device(s: &str) -> Result<Device> {
    let device = parse_device(s)?;
    if let Device::Cuda(n) = device {
        let count = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
        if n as i64 >= count {
            let hint = if count == 0 { "use cpu".to_string() } else { format!("use cuda:0 to cuda:{}", count - 1) };
            return Err(Error::Invalid(format!(
                "device `{s}` is not available: libtorch sees {count} CUDA device(s); hint: {hint}"
            )));
        }
        if crate::sdp::configure(device).is_none() {
            tracing::warn!("this build cannot steer SDPA's backends (no csrc/sdp.cpp): cuDNN's attention, which plans every new document length, stays allowed");
        }
    }
    Ok(device)
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
    /// Stopped by Ctrl-C (SIGINT) after a checkpoint.
    pub interrupted: bool,
}

/// Encoder (tokenizer + template) for the model of a run config.
pub fn encoder_for(cfg: &RunConfig) -> Result<Encoder> {
    Encoder::from_model_dir(&cfg.model.path, &cfg.model.template).map_err(|e| Error::Invalid(e.to_string()))
}

/// Trains on this process's rank of `coll`; every rank calls it with the same config. The phases:
/// set-up (and resume), then per step: one step, logging, evaluation, checkpoint; then the export.
pub fn train(cfg: RunConfig, opts: RunOptions, coll: &mut dyn Collective, logger: &mut dyn Logger) -> Result<Outcome> {
    let run_dir = cfg.output.dir.join(&cfg.output.run_name);
    if cfg.model.path.as_os_str().is_empty() || !cfg.model.path.is_dir() {
        let what = if cfg.model.path.as_os_str().is_empty() {
            "is not set".to_owned()
        } else if let Some(why) = ferrotune_data::paths::why_unusable(&cfg.model.path) {
            format!("`{}` {why}", cfg.model.path.display())
        } else {
            format!("`{}` is not a directory", cfg.model.path.display())
        };
        return Err(Error::Config {
            path: PathBuf::new(),
            key: "model.path".into(),
            msg: format!("{what}; hint: --set model.path=DIR, a Hugging Face model directory (config.json, safetensors, tokenizer)"),
        });
    }
    let existing = resume::check_start(&run_dir, opts.resume)?;
    if let Some((_, dir)) = existing.as_ref().filter(|_| opts.resume) {
        resume::check_resume(&cfg, dir)?;
    }
    let enc = encoder_for(&cfg)?;
    let (train_cache, val_caches) = run_data::open_caches(&cfg, &run_dir, &enc, &opts, coll)?;
    // A data file none of whose conversations made a row is refused before the model loads, saying why.
    let val_own = val_caches.as_ref().map(|v| &v.0);
    for (key, cache) in [("data.train", Some(&train_cache)), ("data.validation", val_own)] {
        if let Some(c) = cache.filter(|c| c.rows() == 0) {
            return Err(Error::Config { path: PathBuf::new(), key: key.into(), msg: c.why_empty() });
        }
    }
    let val = match val_caches {
        Some((own, response)) => {
            let qa = if cfg.eval.coqa {
                let convs = ferrotune_data::coqa::read_conversations(&cfg.data.validation)
                    .map_err(|e| Error::Invalid(e.to_string()))?;
                eval::qa_jobs(&enc, &convs).map_err(Error::Invalid)?
            } else {
                vec![]
            };
            Some(Validation { own, response, qa })
        }
        None => None,
    };
    let mut run = set_up(cfg, run_dir, &train_cache, val, existing, &opts, coll, logger)?;
    if run.step == 0 {
        // The base model, before any update: the first row of a sweep's report.
        if run.lead && run.val.is_some() {
            if let Some((tokens, response)) = run_data::data_counts(&run.cfg, &enc) {
                let v = [("data/tokens", tokens as f64), ("data/response_tokens", response as f64)];
                logger.scalars(0, &v);
            }
        }
        evaluate(&mut run, &enc, coll, logger)?;
    }
    while run.step < run.plan.total_steps && run.early.stopped_at.is_none() {
        let profiling = run.cfg.train.profile_step == run.step + 1;
        let session = profiling.then(|| crate::profile::start(run.device.is_cuda())).transpose()?;
        let done = one_step(&mut run, coll)?;
        if let Some(session) = session {
            let pause = Instant::now(); // writing the profile is not training
            crate::profile::finish_step(session, &run.run_dir, run.step, run.rank, run.device)?;
            run.window.since += pause.elapsed();
        }
        log_step(&mut run, &done, coll, logger)?;
        // Evaluations and checkpoints are not training: the throughput window skips their time.
        let pause = Instant::now();
        let stop_early = evaluate(&mut run, &enc, coll, logger)?;
        let stopping = opts.stop_after.is_some_and(|n| run.step - run.started_at >= n) || run.interrupted;
        checkpoint_if_due(&run, stopping || stop_early, coll)?;
        run.window.since += pause.elapsed();
        logger.flush();
        if stopping && !stop_early && run.step < run.plan.total_steps {
            return Ok(run.outcome(None));
        }
    }
    if let Some(at) = run.early.stopped_at.filter(|_| run.lead) {
        tracing::info!("stopped early at step {at} of {}", run.plan.total_steps);
    }
    finish(run, &enc, logger)
}

/// What a run carries from step to step.
struct Run<'a> {
    cfg: RunConfig,
    plan: Plan,
    run_dir: PathBuf,
    lead: bool,
    world: usize,
    rank: usize,
    device: Device,
    trainer: Trainer,
    loader: Loader<'a>,
    val: Option<Validation>,
    /// Early stopping's count (restored on resume).
    early: EarlyStop,
    /// Some rank was asked to stop (Ctrl-C), as of the last step's all-reduce.
    interrupted: bool,
    /// SHA-256 of the training data file (from its cache), saved in checkpoints.
    loader_source_sha: String,
    step: u64,
    last_loss: f64,
    started_at: u64,
    step_opts: StepOptions,
    buckets: GradBuckets,
    /// Peak FLOP/s of one rank, the MFU's denominator.
    peak: f64,
    memory: PeakMemory,
    /// The planner's peak for this run (rank 0), logged beside the measured one.
    predicted: Option<f64>,
    window: Window,
    final_val: Option<f64>,
    final_response: Option<f64>,
    final_qa: Option<(f64, f64)>,
}

/// The throughput window since the last log line.
struct Window {
    since: Instant,
    tokens: usize,
    trained: usize,
    flops: f64,
    /// This rank's seconds outside collectives (stragglers show here).
    busy: f64,
}

impl Window {
    fn new() -> Self {
        Window { since: Instant::now(), tokens: 0, trained: 0, flops: 0.0, busy: 0.0 }
    }
}

/// What one step leaves for the log.
struct StepDone {
    loss: f64,
    lr: f64,
    grad_norm: Tensor,
}

impl Run<'_> {
    fn outcome(self, export_dir: Option<PathBuf>) -> Outcome {
        let final_val_loss = if self.lead { self.final_val } else { None };
        let interrupted = self.interrupted;
        Outcome {
            run_dir: self.run_dir,
            steps: self.step,
            final_loss: self.last_loss,
            final_val_loss,
            export_dir,
            interrupted,
        }
    }
}

/// Plan (printed and saved), model and optimizer, loader, and the state of the checkpoint resumed from.
#[allow(clippy::too_many_arguments)]
fn set_up<'a>(
    cfg: RunConfig,
    run_dir: PathBuf,
    train_cache: &'a TokenCache,
    val: Option<Validation>,
    existing: Option<(u64, PathBuf)>,
    opts: &RunOptions,
    coll: &mut dyn Collective,
    logger: &mut dyn Logger,
) -> Result<Run<'a>> {
    let (rank, world) = (coll.rank(), coll.world());
    let (plan, step_opts, predicted) = resolve_plan(&cfg, &run_dir, train_cache, world, rank == 0)?;
    tracing::debug!(rank, world, "joined");
    // What an earlier attempt logged after this run's starting point (its checkpoint, or step 0 for a
    // fresh start in a run directory left by a crash before the first checkpoint) is dropped.
    logger.starts_after(existing.as_ref().map_or(0, |(s, _)| *s));
    logger.text("config", &format!("```toml\n{}```", cfg.to_toml()));
    let (trainer, loader, step, last_loss, early) = load_and_resume(&cfg, &plan, train_cache, existing, opts, coll)?;
    let (kind, device) = (trainer.model.kind(), trainer.model.device());
    let t = &cfg.train;
    let peak = mfu_peak(t.peak_flops, device, kind, coll)?;
    let (layers, tied) = (trainer.model.layers.len(), trainer.model.config.tie_word_embeddings);
    let buckets = GradBuckets::new(&trainer.opt, layers, t.bucket_bytes(), plan.shard, tied);
    log_sharding(&plan, &trainer.opt, buckets.len(), coll)?;
    crate::disk::check(crate::disk::Need::of(&cfg, &plan, &trainer, rank), &run_dir, coll)?;
    if rank == 0 && (1..=step).contains(&cfg.train.profile_step) {
        tracing::warn!(
            "train.profile_step = {} is not after this resume's step {step}: no step is profiled",
            cfg.train.profile_step
        );
    }
    // From here the memory figure is the training's: loading's transient peak (mapped checkpoint files
    // beside the weights) is not what the planner predicts.
    crate::metrics::reset_peak_rss();
    if let Device::Cuda(n) = device {
        crate::metrics::reset_cuda_peak(n);
    }
    Ok(Run {
        plan,
        run_dir,
        lead: rank == 0,
        world,
        rank,
        device,
        trainer,
        loader,
        val,
        early,
        interrupted: false,
        loader_source_sha: train_cache.header.key.source_sha256.clone(),
        step,
        last_loss,
        started_at: step,
        step_opts,
        buckets,
        peak,
        memory: PeakMemory::new(device),
        predicted,
        window: Window::new(),
        final_val: None,
        final_response: None,
        final_qa: None,
        cfg,
    })
}

/// One optimizer step: this rank's micro-batches forward and backward stage by stage, the last one's
/// gradients summed over ranks while its backward runs; then clip, update, schedule.
fn one_step(run: &mut Run, coll: &mut dyn Collective) -> Result<StepDone> {
    let step_start = Instant::now();
    let (plan, t) = (&run.plan, &run.cfg.train);
    let lr = plan.schedule.lr(run.step);
    let batches: Vec<BatchTensors> =
        (0..plan.grad_accum).map(|_| to_tensors(&run.loader.next_batch(), run.device)).collect();
    // The loss of the step is divided by its trained tokens over all ranks and micro-batches.
    // With it, whether any rank was interrupted: all ranks stop after the same step.
    // And the attended (query, key) pairs and the positions computed (`batch::trimmed`), for the step's
    // FLOPs.
    let pairs: f64 = batches.iter().map(|b| b.attend.pairs(b.ids.size()[0] as usize, b.ids.size()[1] as usize)).sum();
    let mut trained = [
        batches.iter().map(|b| b.trained).sum::<usize>() as f64,
        f64::from(u8::from(crate::interrupt::requested())),
        pairs,
        batches.iter().map(|b| b.ids.numel()).sum::<usize>() as f64,
    ];
    let waited = Instant::now(); // here the other ranks wait out rank 0's checkpoints
    coll.all_reduce_f64(&mut trained)?;
    let waited = waited.elapsed();
    run.interrupted = trained[1] > 0.0;
    let (trained, pairs, computed) = (trained[0] as usize, trained[2], trained[3] as usize);
    let denom = trained.max(1) as f64;
    let mut loss_sum = Tensor::zeros([], (Kind::Float, run.device));
    let last = batches.len() - 1;
    let mut in_collectives = waited; // also the time starting (or, at the in-flight limit, waiting for) buckets
    for (m, b) in batches.iter().enumerate() {
        // RNG (LoRA dropout) is a function of (seed, step, global micro-batch index): a resumed run
        // draws the same numbers, and so do N ranks and one rank accumulating N micro-batches.
        let micro = (m * run.world + run.rank) as u64;
        let key = (run.step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        run.trainer.set_dropout_key(t.seed ^ key);
        let buckets = &mut run.buckets;
        // Accumulation steps do not communicate, unless ZeRO-2 frees every micro-batch's gradients.
        let reduce = (m == last || buckets.reduces_every_micro_batch()) && run.world > 1;
        if reduce {
            buckets.begin();
        }
        let mut on_done = |stage| {
            if !reduce {
                return Ok(());
            }
            let at = Instant::now();
            let r = buckets.stage_done(coll, stage);
            in_collectives += at.elapsed();
            r
        };
        loss_sum += run.trainer.micro_step_layerwise(b, denom, &run.step_opts, &mut on_done)?;
        if reduce && m != last {
            let at = Instant::now();
            run.buckets.finish(coll)?;
            in_collectives += at.elapsed();
        }
    }
    if let (Device::Cuda(ordinal), true) = (run.device, run.world > 1) {
        // Kernels run asynchronously: without waiting for them, the per-rank time would be launch
        // time and a slow GPU would not show. The step's loss read below waits for them anyway.
        tch::Cuda::synchronize(ordinal as i64);
    }
    run.window.busy += step_start.elapsed().saturating_sub(in_collectives).as_secs_f64();
    if run.world > 1 {
        run.buckets.finish(coll)?;
    }
    // One host sync per step: the loss is checked before the update touches the weights.
    let mut loss = [loss_sum.double_value(&[])];
    coll.all_reduce_f64(&mut loss)?;
    let loss = loss[0] / denom;
    if !loss.is_finite() {
        let last =
            checkpoint::latest(&run.run_dir).map_or("none".into(), |(s, d)| format!("step {s} at {}", d.display()));
        return Err(Error::Invalid(format!(
            "loss is {loss} at step {} (lr {lr:e}); stopped before the update, the last good checkpoint is {last}; hint: lower train.lr or inspect the data with `ferrotune preview`",
            run.step + 1
        )));
    }
    let grad_norm = run.trainer.opt.clip_grad_norm(t.max_grad_norm, coll)?;
    run.trainer.opt.step(lr);
    run.buckets.gather_weights(coll)?;
    run.step += 1;
    run.last_loss = loss;
    let w = &mut run.window;
    w.tokens += plan.tokens_per_step;
    w.trained += trained;
    let adapters = plan.lora.is_some().then(|| run.trainer.trainable.iter().map(|(_, t)| t.numel()).sum());
    w.flops += crate::flops::step_flops(&run.trainer.model.config, computed, trained, pairs, adapters);
    Ok(StepDone { loss, lr, grad_norm })
}

/// Every `log_every` steps and at the last: loss, learning rate, gradient norm, throughput, MFU and
/// peak memory, to the logger and the log line; per-rank throughput with several ranks.
fn log_step(run: &mut Run, s: &StepDone, coll: &mut dyn Collective, logger: &mut dyn Logger) -> Result<()> {
    let (step, total) = (run.step, run.plan.total_steps);
    if !(step.is_multiple_of(run.cfg.train.log_every) || step == total) {
        return Ok(());
    }
    let w = &run.window;
    let secs = w.since.elapsed().as_secs_f64();
    let per_rank = coll.all_gather_f64(w.tokens as f64 / run.world as f64 / w.busy.max(1e-9))?;
    let mem = run.memory.sample().map(|b| b as f64 / 1e9);
    let gn = s.grad_norm.double_value(&[]);
    let mut vals = vec![
        ("train/loss", s.loss),
        ("train/lr", s.lr),
        ("train/grad_norm", gn),
        ("train/tokens_per_s", w.tokens as f64 / secs),
        ("train/trained_tokens_per_s", w.trained as f64 / secs),
        ("train/mfu", w.flops / secs / (run.peak * run.world as f64)),
        ("train/epoch", step as f64 / run.plan.steps_per_epoch as f64),
    ];
    vals.extend(mem.map(|gb| ("train/peak_mem_gb", gb)));
    vals.extend(run.memory.allocator().map(|m| ("train/peak_allocated_gb", m.peak_allocated as f64 / 1e9)));
    vals.extend(run.predicted.map(|b| ("train/predicted_mem_gb", b / 1e9)));
    logger.scalars(step, &vals);
    if run.world > 1 && run.lead {
        let named: Vec<(String, f64)> =
            per_rank.iter().enumerate().map(|(r, v)| (format!("rank{r}/tokens_per_s"), *v)).collect();
        logger.scalars(step, &named.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>());
        tracing::info!(
            "step {step}: tok/s per rank outside collectives {}",
            per_rank.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" ")
        );
    }
    if run.lead {
        tracing::info!(
            "step {step}/{total} | loss {:.4} | lr {:.2e} | grad {gn:.3} | {:.0} tok/s ({:.0} trained/s) | mfu {:.1}% | mem {}",
            s.loss, s.lr, vals[3].1, vals[4].1, 100.0 * vals[5].1,
            mem.map_or("unknown".into(), |gb| format!("{gb:.2} GB"))
        );
    }
    run.window = Window::new();
    Ok(())
}

/// At step 0 (the base model), at the planned steps, and at the end when CoQA is scored (every rank,
/// each on its share): the validation loss under the run's mask, the response loss, CoQA EM/F1. Rank 0
/// logs them. Returns whether early stopping ends the run here.
fn evaluate(run: &mut Run, enc: &Encoder, coll: &mut dyn Collective, logger: &mut dyn Logger) -> Result<bool> {
    let (step, cfg) = (run.step, &run.cfg);
    let base = step == 0 && (cfg.eval.n_evals > 0 || cfg.eval.coqa);
    let due = base || run.plan.eval_steps.contains(&step) || (step == run.plan.total_steps && cfg.eval.coqa);
    let Some(val) = run.val.as_ref().filter(|_| due) else { return Ok(false) };
    let qa = cfg.eval.coqa.then_some((cfg.eval.max_new_tokens, cfg.eval.batch_size));
    let s = evaluation::evaluate(&run.trainer.model, enc, val, cfg.train.micro_batch_size, qa, coll)?;
    logger.scalars(step, &s.scalars());
    if run.lead {
        let qa = s.qa.map_or(String::new(), |(em, f1, n)| format!(", CoQA EM {em:.1} F1 {f1:.1} ({n} questions)"));
        let what = if base { "base model" } else { "validation" };
        tracing::info!(
            "step {step}: {what} loss {:.4}, response loss {:.4}{qa} ({:.1}s on {} ranks)",
            s.loss,
            s.response_loss,
            s.seconds,
            run.world
        );
    }
    (run.final_val, run.final_response) = (Some(s.loss), Some(s.response_loss));
    run.final_qa = s.qa.map(|(em, f1, _)| (em, f1));
    let e = &cfg.eval;
    let (value, lower) = s.metric(&e.early_stopping_metric).unwrap_or((s.response_loss, true));
    let stop = run.early.update(value, lower, e.early_stopping_patience, e.early_stopping_min_delta);
    if stop && step < run.plan.total_steps {
        run.early.stopped_at = Some(step);
        logger.scalars(step, &[("train/early_stop", step as f64)]);
        if run.lead {
            tracing::info!(
                "early stopping: {} did not improve by more than {} in {} evaluations (best {:.4})",
                e.early_stopping_metric,
                e.early_stopping_min_delta,
                run.early.bad,
                run.early.best.unwrap_or(f64::NAN)
            );
        }
        return Ok(true);
    }
    Ok(false)
}

/// At the planned steps and when stopping early (every rank): an atomic checkpoint. Rank 0 writes the
/// trainable weights, the data position, the config and the optimizer state's index; the optimizer
/// state is rank 0's alone unsharded, one slice per rank sharded.
fn checkpoint_if_due(run: &Run, stopping: bool, coll: &mut dyn Collective) -> Result<()> {
    if !(run.plan.checkpoint_steps.contains(&run.step) || stopping) {
        return Ok(());
    }
    let state = TrainState {
        step: run.step,
        loader: run.loader.state(),
        last_loss: run.last_loss,
        world: run.world,
        early: run.early,
        train_data_sha256: Some(run.loader_source_sha.clone()),
        compute_dtype: Some(crate::kind_name(run.trainer.model.kind()).into()),
    };
    let (trainer, lead, sharded) = (&run.trainer, run.lead, run.plan.shard != Shard::None);
    let write = |d: &Path| -> Result<()> {
        if sharded || lead {
            let slice = crate::optim_state::slice_file(d, trainer.opt.shard().rank);
            checkpoint::failpoint_shard_write(run.rank, run.step, &slice);
            trainer.opt.save_slice(d)?;
        }
        if !lead {
            return Ok(());
        }
        checkpoint::save_named(&d.join("trainable.safetensors"), &trainer.trainable)?;
        trainer.opt.save_index(d)?;
        checkpoint::write_state(d, &state)?;
        let c = d.join("config.toml");
        std::fs::write(&c, run.cfg.to_toml()).map_err(Error::io(&c))
    };
    let expected = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut files = crate::optim_state::expected_files(d)?;
        files.extend(["trainable.safetensors", "state.json", "config.toml"].map(|f| d.join(f)));
        Ok(files)
    };
    let dir = checkpoint::save_all(&run.run_dir, run.step, coll, write, expected)?;
    if run.lead {
        tracing::info!("checkpoint {}", dir.display());
        checkpoint::prune(&run.run_dir, run.cfg.train.keep_checkpoints, run.plan.total_steps);
    }
    Ok(())
}

/// The export of the adapter or model and the run's hyperparameters with its final metrics (rank 0).
fn finish(run: Run, enc: &Encoder, logger: &mut dyn Logger) -> Result<Outcome> {
    if !run.lead {
        return Ok(run.outcome(None));
    }
    let export_dir = run.run_dir.join(if run.plan.lora.is_some() { "adapter" } else { "model" });
    let full_kind = crate::learner::export_kind(&run.cfg, run.plan.lora.is_some(), run.trainer.model.kind())?;
    checkpoint::publish_dir(&export_dir, |dir| {
        run.trainer.export(dir, &run.cfg.model.path, full_kind)?;
        // The chat template the run trained with, beside the weights: `generate` and transformers
        // (which reads chat_template.jinja first) then format prompts as training did.
        if let Some(t) = &enc.template {
            let p = dir.join("chat_template.jinja");
            std::fs::write(&p, &t.source).map_err(Error::io(&p))?;
        }
        Ok(())
    })?;
    let mut metrics = vec![("hparams/train_loss", run.last_loss)];
    metrics.extend(run.final_val.map(|v| ("hparams/eval_loss", v)));
    metrics.extend(run.final_response.map(|v| ("hparams/response_loss", v)));
    if let Some((em, f1)) = run.final_qa {
        metrics.extend([("hparams/em", em), ("hparams/f1", f1)]);
    }
    logger.hparams(&plan::hparams_of(&run.cfg, &run.plan), &metrics);
    Ok(run.outcome(Some(export_dir)))
}

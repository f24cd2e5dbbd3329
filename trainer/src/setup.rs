//! What a run does before its first step, apart from building its state (`train::set_up`): the plan
//! and the step's options (saved with the run, printed with the predicted peak memory and the share of
//! positions the steps compute), the MFU's peak, the model and optimizer with what a resume restores,
//! and how the work is split over the ranks. It does not run steps, log metrics or checkpoint.

use crate::checkpoint;
use crate::dist::buckets::Shard;
use crate::dist::{self, Collective};
use crate::error::{Error, Result};
use crate::evaluation::EarlyStop;
use crate::layerwise::{self, StepOptions};
use crate::learner::Trainer;
use crate::optim::{AdamWConfig, ShardOf};
use crate::plan::{self, Plan, RunConfig};
use crate::train::{parse_device, usable_device, RunOptions};
use crate::{memory, resolve_dtype};
use ferrotune_data::cache::TokenCache;
use ferrotune_data::loader::Loader;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// The MFU's denominator, one rank's peak FLOP/s: `train.peak_flops` when set, else the matrix-product
/// rate measured on rank 0's device in the compute dtype (cached per machine, `hardware::peak`) and
/// shared with the other ranks. Rank 0 logs it with where it came from.
pub(crate) fn mfu_peak(configured: f64, device: Device, kind: Kind, coll: &mut dyn Collective) -> Result<f64> {
    if configured > 0.0 {
        if coll.rank() == 0 {
            tracing::info!("MFU peak: {:.3} TFLOP/s per rank (train.peak_flops)", configured / 1e12);
        }
        return Ok(configured);
    }
    let mut peak = [0.0];
    if coll.rank() == 0 {
        let cache = crate::hardware::peak_cache();
        let p = crate::hardware::peak(device, kind, &cache)?;
        let how = p.origin(&cache);
        tracing::info!(
            "MFU peak: {:.3} TFLOP/s per rank, {} matrix products on {device:?} ({how}); set train.peak_flops to use a datasheet figure",
            p.flops / 1e12,
            crate::kind_name(kind)
        );
        peak[0] = p.flops;
    }
    coll.all_reduce_f64(&mut peak)?;
    Ok(peak[0])
}

/// The plan and the step's options; rank 0 saves the plan and config with the run and prints them
/// with the predicted peak memory (returned), warning when it exceeds the device.
pub(crate) fn resolve_plan(
    cfg: &RunConfig,
    run_dir: &Path,
    train_cache: &TokenCache,
    world: usize,
    lead: bool,
) -> Result<(Plan, StepOptions, Option<f64>)> {
    let device = parse_device(&cfg.model.device)?;
    let (kind, why) = resolve_dtype(&cfg.model.dtype, device)?;
    let plan: Plan = plan::resolve(cfg.clone(), train_cache.rows(), world)?;
    let arch = crate::LlamaConfig::from_dir(&cfg.model.path)?;
    let step_opts = StepOptions {
        checkpointing: plan.checkpointing,
        loss_chunk: layerwise::loss_chunk_for(cfg.train.loss_chunk_tokens, arch.vocab_size),
    };
    if !lead {
        return Ok((plan, step_opts, None));
    }
    let plan_path = run_dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_string_pretty(&plan).expect("plan serializes"))
        .map_err(Error::io(&plan_path))?;
    let config_path = run_dir.join("config.toml");
    std::fs::write(&config_path, cfg.to_toml()).map_err(Error::io(&config_path))?;
    let mut inputs = memory::inputs_for(&plan, &arch, kind, device, step_opts.loss_chunk);
    // One pass over the labels: the most trained positions of a row, and the positions that can reach
    // the loss (`batch::trimmed` computes only those), of all the rows' positions.
    let (mut most, mut kept, mut all) = (None, 0, 0);
    for r in 0..train_cache.rows() {
        let labels = train_cache.labels(r);
        most = most.max(Some(labels.iter().filter(|&&l| l != -100).count()));
        kept += crate::batch::reaching(train_cache.doc_lens(r), labels);
        all += labels.len();
    }
    inputs.trained = most.map(|n| n * cfg.train.micro_batch_size);
    if inputs.fused.attention {
        let rows: Vec<(usize, usize)> =
            (0..train_cache.rows()).map(|r| memory::short_pairs(train_cache.doc_lens(r), inputs.seq)).collect();
        let (pairs, short) = (rows.iter().map(|r| r.0).max(), rows.iter().map(|r| r.1).min());
        let n = cfg.train.micro_batch_size;
        inputs.short_pairs = pairs.zip(short).map(|(p, s)| (p * n, s * n));
    }
    let predicted = memory::predict(&inputs);
    log_plan(&plan, cfg, &step_opts, &predicted);
    if crate::kernels::enabled(crate::kernels::Kernel::Trim) {
        tracing::info!(
            "the steps compute the positions that can reach the loss, {kept} of the rows' {all} ({:.1}%): padding and tokens after a document's last trained one are left out (tok/s counts every position, MFU the computed ones)",
            100.0 * kept as f64 / all.max(1) as f64
        );
    }
    tracing::info!("compute dtype {} ({why})", crate::kind_name(kind));
    if let Some(total) = crate::metrics::device_total_bytes(device).map(|b| b as f64).filter(|&t| predicted.total > t) {
        let knobs: Vec<String> = memory::knobs_that_fit(&inputs, total).iter().map(|k| k.set.join(" ")).collect();
        tracing::warn!(
            "the predicted peak ({:.2} GB) exceeds {}'s {:.2} GB; hint: `ferrotune plan` lists what fits{}",
            predicted.total / 1e9,
            cfg.model.device,
            total / 1e9,
            if knobs.is_empty() { String::new() } else { format!(", e.g. --set {}", knobs[0]) }
        );
    }
    Ok((plan, step_opts, Some(predicted.total)))
}

/// The model and optimizer (the same weights on every rank, checked), this rank's loader, and, with
/// `--resume`, the trainable tensors, optimizer state and data position of the checkpoint.
pub(crate) fn load_and_resume<'a>(
    cfg: &RunConfig,
    plan: &Plan,
    train_cache: &'a TokenCache,
    existing: Option<(u64, PathBuf)>,
    opts: &RunOptions,
    coll: &mut dyn Collective,
) -> Result<(Trainer, Loader<'a>, u64, f64, EarlyStop)> {
    let t = &cfg.train;
    let device = usable_device(&cfg.model.device)?;
    let kind = resolve_dtype(&cfg.model.dtype, device)?.0;
    let adamw = AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let (rank, world) = (coll.rank(), coll.world());
    let shard = if plan.shard == Shard::None { ShardOf::ALL } else { ShardOf { rank, world } };
    let mut trainer = Trainer::new(&cfg.model.path, kind, device, plan.lora.clone(), adamw, t.seed, shard)?;
    if t.optimizer_dtype == "bf16" {
        if kind == Kind::BFloat16 {
            trainer.opt.use_bf16_state()?;
        } else if coll.rank() == 0 {
            tracing::warn!("train.optimizer_dtype = bf16 is ignored: model.dtype = auto chose fp32 on this machine, whose state is fp32");
        }
    }
    let mut everything = trainer.model.named_parameters().into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    everything.extend(trainer.trainable.iter().map(|(_, p)| p.shallow_clone()));
    dist::verify_same_weights(coll, &everything)?;
    drop(everything);
    let mut loader = Loader::new(train_cache, coll.rank(), coll.world(), t.seed, t.micro_batch_size)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let (mut step, mut last_loss, mut early) = (0u64, f64::NAN, EarlyStop::default());
    if let Some((s, dir)) = existing.filter(|_| opts.resume) {
        checkpoint::load_named(&dir.join("trainable.safetensors"), &trainer.trainable)?;
        trainer.opt.load(&dir)?;
        let state = checkpoint::read_state(&dir)?;
        loader.restore_from(state.loader, state.world).map_err(|msg| Error::Checkpoint {
            path: dir.join("state.json"),
            msg: format!("{msg}; hint: resume on {} ranks, as the checkpoint was written", state.world),
        })?;
        step = s;
        last_loss = state.last_loss;
        early = state.early;
        tracing::info!("resumed from {} (step {s}, loss {last_loss:.4})", dir.display());
    }
    Ok((trainer, loader, step, last_loss, early))
}

/// Logs (rank 0) how the work is split over the ranks: the gradient buckets, and the optimizer state's
/// bytes on each rank (measured: the sum of its state tensors' bytes) beside an unsharded rank's.
pub(crate) fn log_sharding(
    plan: &Plan,
    opt: &crate::optim::AdamW,
    buckets: usize,
    coll: &mut dyn Collective,
) -> Result<()> {
    let world = coll.world();
    let per_rank = coll.all_gather_f64(opt.state_bytes() as f64)?;
    if coll.rank() != 0 {
        return Ok(());
    }
    let t = &plan.config.train;
    if world > 1 {
        let how = if plan.shard == Shard::None { "summed" } else { "reduce-scattered" };
        tracing::info!(
            "gradients in {buckets} buckets of at most {} MiB, each {how} over {world} ranks as soon as backward has made it final",
            t.bucket_mb
        );
    }
    let whole = opt.unsharded_state_bytes();
    tracing::info!(
        "optimizer state per rank (train.shard = {}): {} bytes of {whole} unsharded ({:.2} MB on rank 0)",
        serde_json::to_string(&plan.shard).expect("shard serializes").trim_matches('"'),
        per_rank.iter().map(|&b| format!("{b:.0}")).collect::<Vec<_>>().join(", "),
        per_rank[0] / 1e6
    );
    Ok(())
}

pub(crate) fn log_plan(plan: &Plan, cfg: &RunConfig, step_opts: &StepOptions, predicted: &memory::MemoryPlan) {
    let method = match &plan.lora {
        Some(l) => format!("LoRA r={} alpha={} on {:?}", l.r, l.alpha, l.target_modules),
        None => "full fine-tuning".into(),
    };
    tracing::info!(
        "plan: {} rows of {} tokens, {} steps ({} per epoch), {} rows/step ({} micro-batches of {}), lr {:e} {:?} warmup {}, {method}, activation checkpointing {:?}, loss chunks of {} positions",
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
        plan.checkpointing,
        step_opts.loss_chunk,
    );
    tracing::info!("predicted peak memory of one rank:\n{}", predicted.table().trim_end());
}

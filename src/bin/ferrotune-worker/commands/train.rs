//! `ferrotune train CONFIG`: resolves the run config, joins the job when it has several ranks (from the
//! variables `ferrotune launch`, torchrun or Slurm set), sets up the metric sinks (rank 0) and runs the
//! training loop of the trainer crate, then says where the results are.

use anyhow::{Context, Result};
use ferrotune::cli::TrainArgs;
use ferrotune_trainer::checkpoint;
use ferrotune_trainer::dist::{self, JobEnv};
use ferrotune_trainer::metrics::{FanOut, Jsonl, Logger, Null};
use ferrotune_trainer::plan::RunConfig;
use ferrotune_trainer::tensorboard::TensorBoard;
use ferrotune_trainer::train::usable_device;
use ferrotune_trainer::train::{train, RunOptions};
use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::OnceLock;

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(Some(&args.config), &args.set)?;
    let run_dir = cfg.output.dir.join(&cfg.output.run_name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let job = JobEnv::from_env()?;
    share_cores(job.ranks.local_world_size);
    let device = usable_device(&cfg.model.device).context("config key `model.device`")?;
    let mut joined = dist::init(&job, device)?;
    let lead = joined.coll.rank() == 0;
    // Rank 0 holds the run directory until this process ends, taken before anything is written to it
    // (a second `train` or `--resume` of the same run is refused naming this one).
    let _lock = if lead { Some(ferrotune_trainer::run_lock::RunLock::acquire(&run_dir)?) } else { None };
    if job.ranks.world_size > 1 {
        tracing::info!(
            "rank {} of {} ({}, store {}:{}, attempt {})",
            job.ranks.rank,
            job.ranks.world_size,
            job.ranks.source,
            job.ranks.master_addr,
            job.ranks.master_port,
            job.generation
        );
    }
    // A restarted job continues from its newest complete checkpoint, if it got that far.
    let resume = args.resume || (job.generation > 0 && checkpoint::latest(&run_dir).is_some());
    let tb_dir = run_dir.join("tensorboard");
    let mut logger: Box<dyn Logger> = if lead {
        Box::new(FanOut(vec![
            Box::new(Jsonl::open(&run_dir.join("metrics.jsonl"))?),
            Box::new(TensorBoard::create(&tb_dir)?),
        ]))
    } else {
        Box::new(Null)
    };
    let tokenizing: OnceLock<indicatif::ProgressBar> = OnceLock::new();
    let progress = Box::new(move |done: u64, total: u64| {
        if !lead {
            return;
        }
        let bar = tokenizing.get_or_init(|| ferrotune::logging::bytes_bar("tokenizing"));
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    });
    // The steps bar is made at the first step, so that it counts only this invocation's rate.
    let steps: Rc<OnceCell<(indicatif::ProgressBar, u64)>> = Rc::default();
    let steps_in = steps.clone();
    let on_step = Box::new(move |step: u64, total: u64, loss: f64| {
        if !lead {
            return;
        }
        let (bar, first) = steps_in.get_or_init(|| {
            let b = ferrotune::logging::steps_bar(total);
            b.set_position(step);
            b.reset_eta();
            (b, step)
        });
        bar.set_position(step);
        if step > *first {
            let per_step = bar.elapsed().as_secs_f64() / (step - first) as f64;
            bar.set_message(format!("{per_step:.2} s/step | loss {loss:.4}"));
        } else {
            bar.set_message(format!("loss {loss:.4}"));
        }
    });
    let opts = RunOptions { resume, stop_after: args.stop_after_steps, progress, on_step };
    ferrotune_trainer::interrupt::install();
    let outcome = train(cfg, opts, &mut *joined.coll, &mut *logger);
    if let Some((bar, _)) = steps.get() {
        bar.finish_and_clear();
    }
    let outcome = outcome?;
    logger.flush();
    if outcome.interrupted {
        if lead {
            println!(
                "interrupted after step {} (loss {:.4}): checkpoint written; continue with --resume",
                outcome.steps, outcome.final_loss
            );
        }
        std::process::exit(130);
    }
    if !lead {
        println!("rank {} done: {} steps, final loss {:.4}", job.ranks.rank, outcome.steps, outcome.final_loss);
        return Ok(());
    }
    match &outcome.export_dir {
        Some(dir) => println!(
            "done: {} steps, final loss {:.4}; weights in {}",
            outcome.steps,
            outcome.final_loss,
            dir.display()
        ),
        None => {
            println!("stopped after step {} (loss {:.4}); continue with --resume", outcome.steps, outcome.final_loss)
        }
    }
    println!("metrics: {}", outcome.run_dir.join("metrics.jsonl").display());
    println!("view the run: tensorboard --logdir {}", tb_dir.display());
    Ok(())
}

/// Ranks on one machine share its cores: unless OMP_NUM_THREADS says otherwise, each gets
/// cores / local ranks intra-op threads (oversubscribed libtorch thread pools slow every rank down
/// many times over).
fn share_cores(local_ranks: usize) {
    if local_ranks > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / local_ranks).max(1);
        tch::set_num_threads(threads as i32);
        tracing::debug!("{threads} threads per rank ({cores} cores, {local_ranks} local ranks)");
    }
}

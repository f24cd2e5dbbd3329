//! `ferrotune train CONFIG`: resolves the run config, sets up the metric sinks and runs the training
//! loop of the trainer crate, then says where the results are.

use anyhow::{Context, Result};
use ferrotune::cli::TrainArgs;
use ferrotune_trainer::metrics::{FanOut, Jsonl, Logger};
use ferrotune_trainer::plan::RunConfig;
use ferrotune_trainer::tensorboard::TensorBoard;
use ferrotune_trainer::train::{train, RunOptions};

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(Some(&args.config), &args.set)?;
    let run_dir = cfg.output.dir.join(&cfg.output.run_name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let tb_dir = run_dir.join("tensorboard");
    let sinks: Vec<Box<dyn Logger>> =
        vec![Box::new(Jsonl::open(&run_dir.join("metrics.jsonl"))?), Box::new(TensorBoard::create(&tb_dir)?)];
    let mut logger = FanOut(sinks);
    let bar = ferrotune::data_commands::progress_bar("tokenizing");
    let progress = Box::new(move |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    });
    let outcome =
        train(cfg, RunOptions { resume: args.resume, stop_after: args.stop_after_steps, progress }, &mut logger)?;
    logger.flush();
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

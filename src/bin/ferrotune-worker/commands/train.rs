//! `ferrotune train CONFIG`: resolves the run config, sets up the metric sinks and runs the training
//! loop of the trainer crate, then says where the results are.

use anyhow::{Context, Result};
use ferrotune::cli::TrainArgs;
use ferrotune_trainer::metrics::{FanOut, Jsonl, Logger};
use ferrotune_trainer::plan::RunConfig;
use ferrotune_trainer::tensorboard::TensorBoard;
use ferrotune_trainer::train::{train, RunOptions};
use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::OnceLock;

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(Some(&args.config), &args.set)?;
    let run_dir = cfg.output.dir.join(&cfg.output.run_name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let tb_dir = run_dir.join("tensorboard");
    let sinks: Vec<Box<dyn Logger>> =
        vec![Box::new(Jsonl::open(&run_dir.join("metrics.jsonl"))?), Box::new(TensorBoard::create(&tb_dir)?)];
    let mut logger = FanOut(sinks);
    let tokenizing: OnceLock<indicatif::ProgressBar> = OnceLock::new();
    let progress = Box::new(move |done: u64, total: u64| {
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
    let opts = RunOptions { resume: args.resume, stop_after: args.stop_after_steps, progress, on_step };
    let outcome = train(cfg, opts, &mut logger);
    if let Some((bar, _)) = steps.get() {
        bar.finish_and_clear();
    }
    let outcome = outcome?;
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

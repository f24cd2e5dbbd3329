//! Exact resume: 10 steps, stop, resume, 10 more give the same loss at every step and bit-identical
//! weights as 20 steps straight (LoRA with dropout, so the RNG matters; and full fine-tuning in bf16 with
//! fp32 master weights), with and without activation checkpointing. A non-finite loss stops the run before the update and leaves the last good
//! checkpoint intact.

mod common;

use ferrotune_trainer::checkpoint;
use ferrotune_trainer::metrics::{Jsonl, Logger};
use ferrotune_trainer::plan::RunConfig;
use ferrotune_trainer::train::{train, RunOptions};
use std::path::Path;

/// libtorch's random generator is global to the process: every training step reseeds it and LoRA
/// dropout draws from it, so runs in parallel test threads would disturb each other. One process runs
/// one training in real use.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn data(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("train.jsonl");
    let lines: Vec<String> = (0..24)
        .map(|i| format!(r#"{{"messages": [{{"role": "user", "content": "What is {i} plus {i}?"}}, {{"role": "assistant", "content": "{} is the answer{}"}}]}}"#, 2 * i, "!".repeat(i % 5)))
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn config(tmp: &Path, name: &str, lora: bool, dtype: &str) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.path = common::fixture("tiny-llama");
    c.model.template = "llama3".into();
    c.model.dtype = dtype.into();
    c.data.train = data(tmp);
    c.data.max_seq_len = 64;
    c.train.max_steps = 20;
    c.train.batch_size = 2;
    c.train.micro_batch_size = 1;
    c.train.lr = 2e-3;
    c.train.weight_decay = 0.01;
    c.train.n_checkpoints = 1;
    c.lora.enabled = lora;
    c.lora.dropout = 0.1;
    c.output.dir = tmp.join("runs");
    c.output.run_name = name.into();
    c
}

fn run(c: &RunConfig, resume: bool, stop_after: Option<u64>) -> ferrotune_trainer::train::Outcome {
    let run_dir = c.output.dir.join(&c.output.run_name);
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut log = Jsonl::open(&run_dir.join("metrics.jsonl")).unwrap();
    let out =
        train(c.clone(), RunOptions::new(resume, stop_after), &mut ferrotune_trainer::dist::Single, &mut log).unwrap();
    log.flush();
    out
}

fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("train/loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["train/loss"].as_f64().unwrap()))
        .collect()
}

fn check_resume(lora: bool, dtype: &str, checkpointing: &str) {
    check_resume_with(lora, dtype, checkpointing, &|_| {});
}

fn check_resume_with(lora: bool, dtype: &str, checkpointing: &str, edit: &dyn Fn(&mut RunConfig)) -> tempfile::TempDir {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let with = |name: &str| {
        let mut c = config(tmp.path(), name, lora, dtype);
        c.train.activation_checkpointing = checkpointing.into();
        edit(&mut c);
        c
    };
    let straight = run(&with("straight"), false, None);
    let c = with("split");
    let first = run(&c, false, Some(10));
    assert_eq!((first.steps, first.export_dir.is_none()), (10, true));
    let second = run(&c, true, None);
    assert_eq!(second.steps, 20);
    let (a, b) = (losses(&straight.run_dir), losses(&second.run_dir));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "loss curves differ");
    assert!(a[19].1 < a[0].1, "training did not lower the loss: {a:?}");
    let file = if lora { "adapter/adapter_model.safetensors" } else { "model/model.safetensors" };
    let wa = std::fs::read(straight.run_dir.join(file)).unwrap();
    let wb = std::fs::read(second.run_dir.join(file)).unwrap();
    assert!(wa == wb, "final weights differ");
    drop(_rng);
    tmp
}

/// A run that dies at step 13 with its last checkpoint at step 10 (simulated by deleting the checkpoint
/// `--stop-after-steps` wrote at 13) logs steps 11-13 twice; on resume metrics.jsonl drops the first
/// copies, so the file equals an uninterrupted run's line for line. Likewise for a run that dies before
/// its first checkpoint and starts again.
#[test]
fn a_crash_after_the_last_checkpoint_leaves_no_repeated_steps() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path(), "straight", true, "fp32");
    c.train.n_checkpoints = 2; // steps 10 and 20
    let straight = run(&c, false, None);
    // (run, the step it dies at, the checkpoints lost with it, whether it restarts with --resume)
    for (name, dies_at, lost, resume) in
        [("crashed", 13, "checkpoints/step-13", true), ("early", 5, "checkpoints", false)]
    {
        c.output.run_name = name.into();
        let first = run(&c, false, Some(dies_at));
        std::fs::remove_dir_all(first.run_dir.join(lost)).unwrap();
        assert_eq!(losses(&first.run_dir).len(), dies_at as usize);
        let again = run(&c, resume, None);
        assert_eq!(losses(&again.run_dir), losses(&straight.run_dir), "{name}");
    }
    // On CPU the memory figure is this process's peak resident memory: libtorch alone takes > 100 MB.
    let metrics = std::fs::read_to_string(straight.run_dir.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let gb = last["train/peak_mem_gb"].as_f64().unwrap();
    assert!(gb > 0.1 && gb < 24.0, "{gb}");
}

/// bf16 optimizer state (`train.optimizer_dtype = "bf16"`: bf16 moments, no fp32 masters) is saved
/// in bf16 and resumes exactly; a resume in another compute dtype is refused, naming both, while
/// `auto` resumes where it resolves to the checkpoint's dtype on this machine.
#[test]
fn bf16_optimizer_state_resumes_exactly_and_the_dtype_cannot_change_on_resume() {
    let tmp = check_resume_with(false, "bf16", "none", &|c| c.train.optimizer_dtype = "bf16".into());
    let ckpt = tmp.path().join("runs/split/checkpoints/step-10");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("optimizer.json")).unwrap()).unwrap();
    assert_eq!(index["masters"], false);
    let slice = std::fs::read(ckpt.join("optimizer.rank0.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&slice).unwrap();
    assert_eq!(st.tensor("exp_avg").unwrap().dtype(), safetensors::Dtype::BF16);
    assert!(st.tensor("master").is_err());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["compute_dtype"], "bf16");

    // `auto` continues the bf16 run where it resolves to bf16 here, and is refused where it does not.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::remove_dir_all(tmp.path().join("runs/split/checkpoints/step-20")).unwrap();
    let mut c = config(tmp.path(), "split", false, "auto");
    c.train.optimizer_dtype = "bf16".into();
    let resumed = |c: &RunConfig| {
        let mut log = Jsonl::open(&c.output.dir.join(&c.output.run_name).join("metrics.jsonl")).unwrap();
        train(c.clone(), RunOptions::new(true, None), &mut ferrotune_trainer::dist::Single, &mut log).map(|o| o.steps)
    };
    match ferrotune_trainer::resolve_dtype("auto", tch::Device::Cpu).unwrap().0 {
        tch::Kind::BFloat16 => assert_eq!(resumed(&c).unwrap(), 20),
        _ => assert!(resumed(&c).unwrap_err().to_string().contains("computes in fp32 here")),
    }
    // A bf16 run (fp32 state) stopped at step 2 and resumed in fp32: refused, naming both dtypes.
    let mut c = config(tmp.path(), "in-bf16", false, "bf16");
    c.train.max_steps = 4;
    run(&c, false, Some(2));
    c.model.dtype = "fp32".into();
    let err = resumed(&c).unwrap_err().to_string();
    assert!(err.contains("trained in bf16") && err.contains("--set model.dtype=bf16"), "{err}");
}

#[test]
fn lora_ten_plus_ten_equals_twenty() {
    check_resume(true, "fp32", "none");
}

#[test]
fn full_bf16_ten_plus_ten_equals_twenty() {
    check_resume(false, "bf16", "none");
}

/// With activation checkpointing every layer runs twice per step (dropout masks replayed): resume is
/// still exact, and the run equals the one without checkpointing to 1e-6.
#[test]
fn checkpointed_ten_plus_ten_equals_twenty_and_equals_no_checkpointing() {
    check_resume(true, "fp32", "full");
    check_resume(false, "bf16", "full");
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let curves: Vec<Vec<(u64, f64)>> = ["none", "full"]
        .iter()
        .map(|mode| {
            let mut c = config(tmp.path(), mode, true, "fp32");
            c.train.activation_checkpointing = mode.to_string();
            losses(&run(&c, false, None).run_dir)
        })
        .collect();
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!((a.1 - b.1).abs() <= 1e-6 * a.1, "none {a:?} vs full {b:?}");
    }
}

#[test]
fn resume_needs_a_checkpoint_and_a_fresh_start_refuses_to_overwrite() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "r", true, "fp32");
    let err = train(
        c.clone(),
        RunOptions::new(true, None),
        &mut ferrotune_trainer::dist::Single,
        &mut ferrotune_trainer::metrics::Null,
    );
    assert!(err.err().unwrap().to_string().contains("no complete checkpoint to resume from"));
    run(&c, false, Some(2));
    let err = train(
        c,
        RunOptions::new(false, None),
        &mut ferrotune_trainer::dist::Single,
        &mut ferrotune_trainer::metrics::Null,
    );
    assert!(err.err().unwrap().to_string().contains("pass --resume"));
}

#[test]
fn non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path(), "nan", false, "fp32");
    c.train.lr = 1e6;
    c.train.scheduler = "constant".into();
    c.train.max_grad_norm = 0.0;
    c.train.n_checkpoints = 20;
    let err = train(
        c.clone(),
        RunOptions::new(false, None),
        &mut ferrotune_trainer::dist::Single,
        &mut ferrotune_trainer::metrics::Null,
    )
    .err()
    .expect("a learning rate of 1e6 must blow up");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("loss is") && msg.contains("stopped before the update") && msg.contains("hint:"), "{msg}");
    let run_dir = c.output.dir.join("nan");
    let (step, dir) = checkpoint::latest(&run_dir).expect("a checkpoint from before the blow-up");
    assert!(msg.contains(&format!("step {step}")), "{msg}");
    assert!(dir.join("trainable.safetensors").exists() && dir.join(checkpoint::DONE).exists());
}

/// tokens/s measures training alone: an evaluation (here 600 validation conversations, about a second
/// against steps of milliseconds) must not drag down the throughput logged for the step after it.
#[test]
fn throughput_leaves_out_evaluations() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(tmp.path(), "evals", true, "fp32");
    let val = tmp.path().join("validation.jsonl");
    std::fs::write(&val, std::fs::read_to_string(&c.data.train).unwrap().repeat(25)).unwrap();
    c.data.validation = val;
    c.eval.n_evals = 2; // the base model at step 0, then after steps 10 and 20
    let out = run(&c, false, None);
    let metrics = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<u64> =
        lines.iter().filter(|v| v.get("eval/loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, [0, 10, 20]);
    let tps: Vec<f64> = lines.iter().filter_map(|v| v["train/tokens_per_s"].as_f64()).collect();
    let mut sorted = tps.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    println!("tokens/s: median {median:.0}, step 11 (after the evaluation) {:.0}", tps[10]);
    assert!(tps[10] > 0.3 * median, "step 11 logged {} tokens/s against a median of {median}", tps[10]);
}

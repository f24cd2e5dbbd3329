//! Training throughput and peak memory, ferrotune against the transformers (+ peft) loop a user would
//! write (benches/train_reference.py), side by side in one invocation, on the same model
//! (SmolLM2-135M-Instruct), the same packed rows (the bundled CoQA sample under its own chat template,
//! `assistant` masking, rows of BENCH_SEQ = 1024 tokens), the same dtype (BENCH_DTYPE, fp32 by default:
//! this CPU has no bf16 matmul units) and the same step: forward, masked cross-entropy, backward,
//! clip_grad_norm(1.0), AdamW. One row per optimizer step; BENCH_STEPS steps (default 4), the first not
//! timed. Both LoRA (r=8, alpha=16, all-linear, dropout 0) and full fine-tuning. ferrotune runs the
//! training loop's own step: layer-wise, activation checkpointing BENCH_CHECKPOINTING (none by
//! default, as on CPU), the default loss chunk.
//!
//! Each side runs in its own child process so that peak resident memory (VmHWM / ru_maxrss) is its own.
//! Both sides must see the same tokens and trained tokens, or the bench fails. This is a measurement,
//! not a test: run `scripts/cargo bench --bench train`. Not covered: CUDA, multi-rank.

use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{prepare_to_file, PrepareOptions};
use ferrotune_data::{coqa, fixtures};
use ferrotune_trainer::layerwise::{default_loss_chunk, Checkpointing, StepOptions};
use ferrotune_trainer::learner::Trainer;
use ferrotune_trainer::lora::LoraConfig;
use ferrotune_trainer::metrics::peak_rss_bytes;
use ferrotune_trainer::optim::{AdamWConfig, ShardOf};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind};

const WARMUP: usize = 1;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn kind_of(dtype: &str) -> Kind {
    ferrotune_trainer::parse_kind(dtype).expect("BENCH_DTYPE is float32 or bfloat16")
}

/// One side of the comparison: ferrotune's training step over the rows file (run in a child).
fn ours(model: &Path, rows: &Path, mode: &str, dtype: &str) -> Value {
    let lora = (mode == "lora").then(|| LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
    });
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut trainer = Trainer::new(model, kind_of(dtype), Device::Cpu, lora, adamw, 0, ShardOf::ALL).unwrap();
    let checkpointing: String = env_or("BENCH_CHECKPOINTING", "none".to_string());
    let opts = StepOptions {
        checkpointing: Checkpointing::parse(&checkpointing, 2).expect("BENCH_CHECKPOINTING is none, full or selective"),
        loss_chunk: default_loss_chunk(trainer.model.config.vocab_size),
    };
    let batches = ferrotune_trainer::probe::read_rows(rows, Device::Cpu).unwrap();
    let (mut losses, mut tokens, mut trained, mut t0) = (vec![], 0, 0, Instant::now());
    for (i, b) in batches.iter().enumerate() {
        if i == WARMUP {
            t0 = Instant::now();
        }
        let (n, seq) = (b.trained, b.ids.size()[1] as usize);
        let sum = trainer.micro_step_layerwise(b, n as f64, &opts, &mut |_| Ok(())).unwrap();
        let _norm = trainer.opt.clip_grad_norm(1.0, &mut ferrotune_trainer::dist::Single).unwrap();
        trainer.opt.step(1e-4);
        losses.push(sum.double_value(&[]) / n as f64);
        if i >= WARMUP {
            tokens += seq;
            trained += n;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    json!({"tokens": tokens, "trained": trained, "secs": secs, "peak_rss": peak_rss_bytes().unwrap_or(0), "losses": losses})
}

/// Packs the bundled CoQA sample and writes the first `steps` rows for both sides.
fn write_rows(model: &Path, dir: &Path, seq: usize, steps: usize) -> std::path::PathBuf {
    let root = fixtures::repo_root();
    let data = dir.join("coqa.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
    for s in coqa::read(&root.join("data/samples/coqa/train.json")).unwrap() {
        writeln!(f, "{}", json!({"messages": s.to_messages(coqa::DEFAULT_SYSTEM)})).unwrap();
    }
    drop(f);
    let enc = Encoder::from_model_dir(model, "auto").unwrap();
    let opts =
        PrepareOptions::new(MaskOptions { strategy: Strategy::Assistant, train_eot: true }, seq, Overlong::Truncate);
    let cache_path = dir.join("train.ftcache");
    prepare_to_file(&data, &enc, &opts, &cache_path, &|_, _| {}).unwrap();
    let cache = TokenCache::open(&cache_path).unwrap();
    assert!(cache.rows() >= steps, "the sample packs into {} rows; set BENCH_STEPS <= that", cache.rows());
    let path = dir.join("rows.safetensors");
    ferrotune_trainer::probe::write_rows(&cache, 0, steps, &path).unwrap();
    path
}

fn run_child(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn main() {
    let dtype: String = env_or("BENCH_DTYPE", "float32".to_string());
    if let Ok(mode) = std::env::var("FERROTUNE_BENCH_CHILD") {
        let args: Vec<String> = std::env::args().collect();
        let v = ours(Path::new(&args[1]), Path::new(&args[2]), &mode, &dtype);
        println!("{v}");
        return;
    }
    let (seq, steps) = (env_or("BENCH_SEQ", 1024usize), env_or("BENCH_STEPS", 4usize));
    let model = fixtures::ensure("smollm2-135m-instruct");
    let tmp = tempfile::tempdir().unwrap();
    let rows = write_rows(&model, tmp.path(), seq, steps);
    let modes: Vec<String> = std::env::var("BENCH_MODES")
        .map(|m| m.split(',').map(String::from).collect())
        .unwrap_or_else(|_| vec!["lora".into(), "full".into()]);
    println!("training step, SmolLM2-135M-Instruct, {dtype}, 1 row x {seq} tokens per step, assistant masking, {steps} steps ({WARMUP} untimed), CPU");
    println!(
        "{:<6} {:<13} {:>9} {:>13} {:>13} {:>10}",
        "mode", "side", "tok/s", "trained tok/s", "peak RSS GB", "loss[0]"
    );
    for mode in &modes {
        let ours = run_child(
            Command::new(std::env::current_exe().unwrap())
                .arg(&model)
                .arg(&rows)
                .env("FERROTUNE_BENCH_CHILD", mode)
                .env("BENCH_DTYPE", &dtype)
                .env("BENCH_CHECKPOINTING", env_or("BENCH_CHECKPOINTING", "none".to_string())),
        );
        let reference = run_child(
            Command::new(fixtures::python())
                .arg(fixtures::repo_root().join("benches/train_reference.py"))
                .args([model.as_os_str(), rows.as_os_str()])
                .args([mode.as_str(), &dtype, &WARMUP.to_string()]),
        );
        assert_eq!(ours["tokens"], reference["tokens"], "the two sides trained on different tokens");
        assert_eq!(ours["trained"], reference["trained"], "the two sides trained different positions");
        let (l0, r0) = (ours["losses"][0].as_f64().unwrap(), reference["losses"][0].as_f64().unwrap());
        assert!((l0 - r0).abs() < 1e-3 * r0.abs().max(1.0), "first losses differ: {l0} vs {r0}");
        let rate = |v: &Value, k: &str| v[k].as_f64().unwrap() / v["secs"].as_f64().unwrap();
        for (side, v) in [("ferrotune", &ours), ("transformers", &reference)] {
            println!(
                "{mode:<6} {side:<13} {:>9.1} {:>13.1} {:>13.2} {:>10.4}",
                rate(v, "tokens"),
                rate(v, "trained"),
                v["peak_rss"].as_f64().unwrap() / 1e9,
                v["losses"][0].as_f64().unwrap()
            );
        }
        println!(
            "{mode:<6} ratio: ferrotune {:.2}x the reference's tokens/s, {:.2}x its peak memory",
            rate(&ours, "tokens") / rate(&reference, "tokens"),
            ours["peak_rss"].as_f64().unwrap() / reference["peak_rss"].as_f64().unwrap()
        );
    }
}

//! Peak memory and step time of real `ferrotune train` runs, side by side in one invocation, on
//! SmolLM2-135M-Instruct and the bundled CoQA sample (fp32, CPU, one row per step): activation
//! checkpointing none against full, LoRA and full fine-tuning, rows of 512 and 2,048 tokens, and `all`
//! masking with the chunked loss against one chunk of every position. Beside each measured peak (the
//! run's `train/peak_mem_gb`: resident memory from the first step on) stands the memory planner's
//! prediction as `train` makes it (`train/predicted_mem_gb`, knowing the most trained positions of a
//! micro-batch) and its error, and `ferrotune plan`'s (before any data is read: every position
//! trained).
//!
//! The activation part of a peak is measured as the peak minus the peak of the same run on rows of 64
//! tokens (with `all` masking: at 64 tokens the truncated CoQA conversations reach no answer), whose
//! activations are negligible and whose weights, gradients, optimizer state and runtime are the same.
//! Step time is the median seconds per step over the steps after the first (3 of 4).
//!
//! A measurement, not a test: `scripts/cargo bench --bench memory` (about 10 minutes on 2 cores).
//! Not covered: CUDA (the planner's CUDA allowance is unmeasured here), several ranks.

use ferrotune_data::fixtures;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const STEPS: usize = 4;

struct Case {
    name: &'static str,
    sets: Vec<String>,
}

fn case(name: &'static str, lora: bool, seq: usize, checkpointing: &str, strategy: &str, chunk: usize) -> Case {
    let sets = vec![
        format!("lora.enabled={lora}"),
        format!("data.max_seq_len={seq}"),
        format!("train.activation_checkpointing=\"{checkpointing}\""),
        format!("data.strategy=\"{strategy}\""),
        format!("train.loss_chunk_tokens={chunk}"),
    ];
    Case { name, sets }
}

fn ferrotune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.env("FERROTUNE_LOG", "warn").env("OMP_NUM_THREADS", "2");
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (measured peak GB, median s/step, train's predicted GB, plan's worst-case GB) of one case.
fn measure(config: &Path, base: &[String], c: &Case, out: &Path) -> (f64, f64, f64, f64) {
    let mut sets: Vec<String> = base.to_vec();
    sets.extend(c.sets.iter().cloned());
    sets.push(format!("output.run_name=\"{}\"", c.name));
    let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
    let plan: Value =
        serde_json::from_str(&run_ok(ferrotune().arg("plan").arg(config).args(&args).arg("--json"))).unwrap();
    run_ok(ferrotune().arg("train").arg(config).args(&args));
    let metrics = std::fs::read_to_string(out.join(c.name).join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let peak = lines.iter().filter_map(|v| v["train/peak_mem_gb"].as_f64()).fold(0.0, f64::max);
    let mut spt: Vec<f64> = lines
        .iter()
        .filter(|v| v["step"].as_u64().is_some_and(|s| s > 1))
        .filter_map(|v| v["train/tokens_per_s"].as_f64().map(|tps| 1.0 / tps))
        .collect();
    spt.sort_by(f64::total_cmp);
    let tokens = c.sets[1].trim_start_matches("data.max_seq_len=").parse::<f64>().unwrap();
    let predicted = lines.iter().find_map(|v| v["train/predicted_mem_gb"].as_f64()).unwrap();
    (peak, spt[spt.len() / 2] * tokens, predicted, plan["predicted_bytes"].as_f64().unwrap() / 1e9)
}

fn main() {
    let root = fixtures::repo_root();
    let model = fixtures::ensure("smollm2-135m-instruct");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("coqa.jsonl");
    run_ok(
        ferrotune().args(["convert", "coqa"]).arg(root.join("data/samples/coqa/train.json")).arg("--out").arg(&data),
    );
    let config: PathBuf = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndtype = \"fp32\"\n[train]\nmax_steps = {STEPS}\nbatch_size = 1\nmicro_batch_size = 1\nlr = 1e-4\nlog_every = 1\n[lora]\ndropout = 0.05\n"
        ),
    )
    .unwrap();
    let out = tmp.path().join("runs");
    let base = vec![
        format!("model.path=\"{}\"", model.display()),
        format!("data.train=\"{}\"", data.display()),
        format!("output.dir=\"{}\"", out.display()),
    ];
    let cases = [
        case("lora-64", true, 64, "none", "all", 0),
        case("lora-512-none", true, 512, "none", "assistant", 0),
        case("lora-512-full", true, 512, "full", "assistant", 0),
        case("lora-2048-none", true, 2048, "none", "assistant", 0),
        case("lora-2048-full", true, 2048, "full", "assistant", 0),
        case("lora-2048-selective", true, 2048, "selective", "assistant", 0),
        case("full-64", false, 64, "none", "all", 0),
        case("full-512-none", false, 512, "none", "assistant", 0),
        case("full-512-full", false, 512, "full", "assistant", 0),
        case("full-2048-none", false, 2048, "none", "assistant", 0),
        case("full-2048-full", false, 2048, "full", "assistant", 0),
        case("full-2048-selective", false, 2048, "selective", "assistant", 0),
        case("lora-2048-all-chunked", true, 2048, "none", "all", 0),
        case("lora-2048-all-one-chunk", true, 2048, "none", "all", 1 << 30),
    ];
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!("ferrotune train, SmolLM2-135M-Instruct, fp32, 1 row per step, {STEPS} steps, CPU: {cpu}");
    println!("| run | measured peak GB | planner GB | planner error | `plan`, every position trained, GB | activation part GB | s/step |");
    println!("|---|---|---|---|---|---|---|");
    let mut results = std::collections::HashMap::new();
    for c in &cases {
        let (peak, spt, predicted, worst) = measure(&config, &base, c, &out);
        let floor = if c.name.starts_with("lora") { results.get("lora-64") } else { results.get("full-64") };
        let act = floor.map(|&(f, _, _): &(f64, f64, f64)| peak - f);
        println!(
            "| {} | {peak:.3} | {predicted:.3} | {:+.1}% | {worst:.3} | {} | {spt:.2} |",
            c.name,
            100.0 * (predicted - peak) / peak,
            act.map_or("-".into(), |a| format!("{a:.3}"))
        );
        results.insert(c.name, (peak, spt, predicted));
    }
    let get = |n: &str| results[n];
    for (mode, floor) in [("lora", "lora-64"), ("full", "full-64")] {
        let none = get(&format!("{mode}-2048-none"));
        let f = get(floor).0;
        for ck in ["full", "selective"] {
            let with = get(&format!("{mode}-2048-{ck}"));
            println!(
                "{mode}, rows of 2048: {ck} checkpointing cuts the activation part {:.2}x ({:.3} -> {:.3} GB) for {:+.0}% step time",
                (none.0 - f) / (with.0 - f),
                none.0 - f,
                with.0 - f,
                100.0 * (with.1 / none.1 - 1.0)
            );
        }
    }
    let (chunked, one) = (get("lora-2048-all-chunked"), get("lora-2048-all-one-chunk"));
    println!(
        "all masking, rows of 2048: the default loss chunks (1365 positions) use {:.3} GB less at peak for {:+.1}% step time",
        one.0 - chunked.0,
        100.0 * (chunked.1 / one.1 - 1.0)
    );
}

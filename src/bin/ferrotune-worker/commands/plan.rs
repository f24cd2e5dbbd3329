//! `ferrotune plan CONFIG`: the memory planner's prediction for one rank of a run, printed before
//! anything is loaded (the model's config.json is the only file read), whether it fits the device, and
//! the config changes that would make it fit. It does not measure memory (`train` logs the measured
//! peak) or load weights.

use anyhow::{bail, Context, Result};
use ferrotune::cli::PlanArgs;
use ferrotune_trainer::layerwise::loss_chunk_for;
use ferrotune_trainer::memory;
use ferrotune_trainer::plan::{self, RunConfig};
use ferrotune_trainer::train::parse_device;
use ferrotune_trainer::{resolve_dtype, LlamaConfig};

pub fn run(args: PlanArgs) -> Result<()> {
    let cfg = RunConfig::load(Some(&args.config), &args.set)?;
    if cfg.model.path.as_os_str().is_empty() {
        bail!("config key `model.path` is not set; hint: --set model.path=DIR (a directory with the model's config.json; configs/models/ has Llama 3.1 8B's)");
    }
    let arch = LlamaConfig::from_dir(&cfg.model.path)
        .with_context(|| "reading the architecture named by config key `model.path`".to_string())?;
    let device = parse_device(&cfg.model.device)?;
    let (kind, why) = resolve_dtype(&cfg.model.dtype, device)?;
    // The data is not read: one step's worth of rows stands in for it (memory does not depend on it).
    let rows = cfg.train.batch_size.max(cfg.train.micro_batch_size * args.world).max(1);
    let p = plan::resolve(cfg.clone(), rows, args.world)?;
    let chunk = loss_chunk_for(cfg.train.loss_chunk_tokens, arch.vocab_size);
    let inputs = memory::inputs_for(&p, &arch, kind, device, chunk);
    let predicted = memory::predict(&inputs);
    let (budget, source) = match &args.device_memory {
        Some(s) => (parse_size(s)?, "--device-memory".to_string()),
        None => match ferrotune_trainer::metrics::device_total_bytes(device) {
            Some(b) => (b as f64, format!("{} total", cfg.model.device)),
            None => bail!("cannot read the memory of {}; hint: pass --device-memory, e.g. 80GB", cfg.model.device),
        },
    };
    let knobs = if predicted.total > budget { memory::knobs_that_fit(&inputs, budget) } else { vec![] };
    if args.json {
        let v = serde_json::json!({
            "dtype": ferrotune_trainer::kind_name(kind), "parts": predicted.parts, "predicted_bytes": predicted.total, "device_bytes": budget,
            "fits": predicted.total <= budget, "knobs": knobs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let method = match &p.lora {
        Some(l) => format!("LoRA r={} on {}", l.r, l.target_modules.join(",")),
        None => "full fine-tuning".into(),
    };
    println!(
        "{}: {:.3e} parameters, {method}, {} ({why}), {} row(s) of {} tokens per micro-batch, activation checkpointing {:?}, loss chunks of {chunk}, {} rank(s)",
        cfg.model.path.display(),
        arch.num_parameters() as f64,
        ferrotune_trainer::kind_name(kind),
        cfg.train.micro_batch_size,
        cfg.data.max_seq_len,
        p.checkpointing,
        args.world,
    );
    println!("predicted peak memory of one rank:");
    print!("{}", predicted.table());
    let gb = |b: f64| b / 1e9;
    if predicted.total <= budget {
        println!(
            "fits: {:.2} GB of {:.2} GB ({source}), {:.2} GB to spare",
            gb(predicted.total),
            gb(budget),
            gb(budget - predicted.total)
        );
        return Ok(());
    }
    println!("does not fit: {:.2} GB over {:.2} GB ({source})", gb(predicted.total - budget), gb(budget));
    if knobs.is_empty() {
        println!("no change tried here makes it fit (checkpointing, micro-batch 1, bf16, sharding optimizer state and gradients over the ranks when there are several, LoRA, rows down to 256 tokens, and all of them together)");
    } else {
        println!("each of these would fit:");
        for k in &knobs {
            let sets: Vec<String> = k.set.iter().map(|s| format!("--set {s}")).collect();
            println!("  {:<60} {:.2} GB", sets.join(" "), gb(k.predicted));
        }
    }
    Ok(())
}

/// `80GB`, `141GiB`, `512MB`, `24e9` (bytes) into bytes.
fn parse_size(s: &str) -> Result<f64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().with_context(|| format!("--device-memory `{s}`: not a number"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("--device-memory `{s}`: unknown unit `{u}`; expected B, MB, GB, GiB, ..."),
    };
    Ok(n * scale)
}

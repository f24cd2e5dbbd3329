//! `ferrotune eval` (masked loss or CoQA EM/F1 of a model, optionally with a LoRA adapter) and
//! `ferrotune export --merge` (adapter folded into a full Hugging Face checkpoint).

use anyhow::{bail, Context, Result};
use ferrotune::cli::{EvalArgs, ExportArgs};
use ferrotune::data_commands::encoder;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{prepare_to_file, PrepareOptions};
use ferrotune_trainer::train::usable_device;
use ferrotune_trainer::{eval, load_model, lora, parse_kind, resolve_dtype, weights, Llama};
use std::io::Write;
use std::path::Path;

fn model_with_adapter(dir: &Path, adapter: Option<&Path>, dtype: &str, device: &str) -> Result<Llama> {
    let mut model = {
        let device = usable_device(device).context("--device")?;
        load_model(dir, resolve_dtype(dtype, device).context("--dtype")?.0, device)
    }
    .context("loading the model")?;
    if let Some(a) = adapter {
        lora::load_adapter(&mut model, dir, a)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("loading the adapter {}", a.display()))?;
    }
    Ok(model)
}

pub fn run(a: EvalArgs) -> Result<()> {
    let model = model_with_adapter(&a.model, a.adapter.as_deref(), &a.dtype, &a.device)?;
    let enc = encoder(&a.model, &a.template)?;
    match a.metric.as_str() {
        "coqa" => {
            let conversations = ferrotune_data::coqa::read_conversations(&a.data)?;
            let t0 = std::time::Instant::now();
            let score = {
                let bar = ferrotune::logging::bar(0, "coqa [{bar:30}] {pos}/{len} questions eta {eta}", "");
                let progress = |done: usize, total: usize| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                };
                let s = eval::coqa(&model, &enc, &conversations, a.max_new_tokens, a.batch_size, &progress);
                bar.finish_and_clear();
                s.map_err(anyhow::Error::msg)?
            };
            let out = a.predictions.clone().unwrap_or_else(|| a.data.with_extension("predictions.jsonl"));
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
            );
            for p in &score.predictions {
                writeln!(f, "{}", serde_json::to_string(p)?)?;
            }
            f.flush()?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"em": score.em, "f1": score.f1, "questions": score.questions, "predictions": out})
                );
            } else {
                println!(
                    "CoQA: EM {:.1}  F1 {:.1}  over {} questions ({:.0}s); predictions in {}",
                    score.em,
                    score.f1,
                    score.questions,
                    t0.elapsed().as_secs_f64(),
                    out.display()
                );
            }
        }
        "loss" => {
            let Some(strategy) = Strategy::parse(&a.strategy) else {
                bail!("unknown masking strategy `{}`", a.strategy)
            };
            let opts =
                PrepareOptions::new(MaskOptions { strategy, train_eot: true }, a.max_seq_len, Overlong::Truncate);
            let tmp = tempfile::tempdir()?;
            let cache_path = tmp.path().join("eval.ftcache");
            prepare_to_file(&a.data, &enc, &opts, &cache_path, &|_, _| {})?;
            let cache = ferrotune_data::cache::TokenCache::open(&cache_path)?;
            let (mean, n) = eval::mean_loss(&model, &cache, a.batch_size)?;
            if a.json {
                println!("{}", serde_json::json!({"loss": mean, "tokens": n}));
            } else {
                println!("loss {mean:.4} over {n} trained tokens ({strategy})");
            }
        }
        other => bail!("unknown metric `{other}`; expected loss or coqa"),
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    anyhow::ensure!(a.merge, "only merged exports exist; pass --merge");
    let cfg = ferrotune_trainer::LlamaConfig::from_dir(&a.model)?;
    let storage = match &a.dtype {
        Some(d) => parse_kind(d)?,
        None if cfg.dtype.as_deref() == Some("bfloat16") => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    // Merge in fp32, whatever the storage dtype.
    let mut model = model_with_adapter(&a.model, Some(&a.adapter), "fp32", "cpu")?;
    lora::merge(&mut model);
    anyhow::ensure!(
        !a.out.exists(),
        "--out {} already exists; hint: choose a new output directory (export never overwrites one)",
        a.out.display()
    );
    ferrotune_trainer::checkpoint::publish_dir(&a.out, |dir| {
        weights::save_pretrained(&model, dir, storage, 2 << 30)?;
        ferrotune_trainer::learner::copy_tokenizer_files(&a.model, dir)
    })?;
    println!("merged {} into {} ({})", a.adapter.display(), a.out.display(), weights::dtype_name(storage));
    Ok(())
}

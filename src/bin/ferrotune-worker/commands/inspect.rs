//! `ferrotune inspect MODEL_DIR`: what a checkpoint is, read from its config and the safetensors headers
//! only (no weights are loaded, so it is instant on any size of model).

use anyhow::{Context, Result};
use ferrotune::cli::InspectArgs;
use ferrotune_trainer::{config::RopeScaling, weights, LlamaConfig};
use std::collections::BTreeMap;

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = &args.model_dir;
    let cfg = LlamaConfig::from_dir(dir)?;
    let files = weights::checkpoint_files(dir)?;
    println!("model        {}", dir.display());
    println!(
        "architecture Llama: {} layers, hidden {}, MLP {}, {} heads ({} KV heads, head_dim {}), vocab {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size
    );
    let rope = match &cfg.rope.scaling {
        RopeScaling::Default => "default".to_string(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Llama3 { factor, original_max_position_embeddings, .. } => {
            format!("llama3 x{factor} from {original_max_position_embeddings} positions")
        }
    };
    println!("rope         theta {}, {rope}; max positions {}", cfg.rope.theta, cfg.max_position_embeddings);
    println!(
        "options      tied embeddings {}, attention bias {}, MLP bias {}, rms_norm_eps {:e}",
        cfg.tie_word_embeddings, cfg.attention_bias, cfg.mlp_bias, cfg.rms_norm_eps
    );
    println!("tokens       bos {:?}, eos {:?}, pad {:?}", cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id);
    let mut params = 0u64;
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut shard_lines = vec![];
    for shard in &files.shards {
        let path = dir.join(shard);
        let file = std::fs::File::open(&path).with_context(|| format!("opening shard {}", path.display()))?;
        let size = file.metadata()?.len();
        // Safety: read-only mapping of a file that is not modified while we read its header.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let mut n = 0;
        for (name, info) in meta.tensors() {
            if files.weight_map.get(&name).map(String::as_str) != Some(shard.as_str()) {
                continue;
            }
            let numel: u64 = info.shape.iter().map(|&d| d as u64).product();
            params += numel;
            *dtypes.entry(format!("{:?}", info.dtype)).or_default() += numel;
            n += 1;
        }
        shard_lines.push(format!("  {shard}  {n} tensors, {:.1} MB", size as f64 / 1e6));
    }
    println!(
        "parameters   {} in the files ({:.1} M); config implies {}",
        params,
        params as f64 / 1e6,
        cfg.num_parameters()
    );
    let dt: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k} ({v} values)")).collect();
    println!("dtypes       {}", dt.join(", "));
    match &files.index {
        Some(index) => println!("shards       {} (index {})", files.shards.len(), index.display()),
        None => println!("shards       1 (single file)"),
    }
    for line in shard_lines {
        println!("{line}");
    }
    let template = ferrotune_data::ChatTemplate::from_dir(dir).map(|t| t.origin.display().to_string());
    println!("chat template {}", template.unwrap_or_else(|e| format!("none ({e})")));
    if !cfg.ignored_keys.is_empty() {
        println!("ignored keys {}", cfg.ignored_keys.join(", "));
    }
    Ok(())
}

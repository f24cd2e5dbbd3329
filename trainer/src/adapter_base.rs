//! Which base model a LoRA adapter belongs to. Training writes `base_model.json` beside the adapter:
//! the base's directory, its architecture (the config.json fields the adapter's shapes and meaning
//! depend on) and a few dozen of its weights sampled at fixed positions. Applying the adapter (`eval`
//! or `export --merge`) first checks the model against it, so an adapter trained on one model
//! is never silently applied to another of the same shape (a base and its instruct variant, say). Not
//! here: reading or attaching the adapter itself (`lora`).

use crate::model::Llama;
use serde_json::{json, Value};
use std::path::Path;
use tch::{Kind, Tensor};

pub const FILE: &str = "base_model.json";

/// Weights sampled from each of these tensors (the last layer's name is filled in per model).
const SAMPLED: [&str; 4] = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "LAST.mlp.down_proj.weight",
    "model.norm.weight",
];
const PER_TENSOR: i64 = 16;

/// Two samples agree when they differ by no more than bf16 rounding (2^-8 relative) allows, with room:
/// an adapter trained on a bf16 checkpoint applies to the same model stored in fp32, and back.
const SAME_REL: f64 = 1e-2;

fn architecture(m: &Llama) -> Value {
    let c = &m.config;
    json!({
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
    })
}

/// (tensor name, [(flat index, value)]) for every sampled tensor of `m`'s base weights.
fn samples(m: &Llama) -> Vec<(String, Vec<(i64, f64)>)> {
    let vars = m.vs.variables();
    let last = format!("model.layers.{}", m.config.num_hidden_layers - 1);
    let _g = tch::no_grad_guard();
    SAMPLED
        .iter()
        .filter_map(|name| {
            let name = name.replace("LAST", &last);
            let t = vars.get(&name)?;
            let n = t.numel() as i64;
            // Spread over the whole tensor, not on a regular grid (a multiplicative hash of i).
            let idx: Vec<i64> = (0..PER_TENSOR).map(|i| ((i as u64 * 2_654_435_761 + 7) % n as u64) as i64).collect();
            let flat = t.reshape([-1]).index_select(0, &Tensor::from_slice(&idx).to_device(t.device()));
            let v: Vec<f64> = Vec::try_from(flat.to_kind(Kind::Double)).unwrap_or_default();
            Some((name, idx.into_iter().zip(v).collect()))
        })
        .collect()
}

/// What `base_model.json` holds for the base `m` loaded from `dir`.
pub fn fingerprint(m: &Llama, dir: &Path) -> Value {
    let samples: serde_json::Map<String, Value> = samples(m)
        .into_iter()
        .map(|(name, s)| (name, json!(s.iter().map(|(i, v)| json!([i, v])).collect::<Vec<_>>())))
        .collect();
    json!({ "base_model": dir.display().to_string(), "architecture": architecture(m), "samples": samples })
}

/// Errors unless `m` (loaded from `model_dir`) is the base the adapter in `adapter_dir` was trained on.
/// An adapter without `base_model.json` (made elsewhere, e.g. by peft) is checked by its shapes only.
pub fn check(m: &Llama, model_dir: &Path, adapter_dir: &Path) -> Result<(), String> {
    let p = adapter_dir.join(FILE);
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
    let saved: Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", p.display()))?;
    let trained_on = saved["base_model"].as_str().unwrap_or("(unnamed)").to_owned();
    let hint = format!(
        "hint: pass the model it was trained on (--model {trained_on}); to apply it to another base on purpose, delete {}",
        p.display()
    );
    let here = architecture(m);
    let differ: Vec<String> = here
        .as_object()
        .expect("an object")
        .iter()
        .filter_map(|(k, v)| {
            let s = &saved["architecture"][k];
            (!s.is_null() && s != v).then(|| format!("{k} {v} here, {s} in {trained_on}"))
        })
        .collect();
    if !differ.is_empty() {
        return Err(format!(
            "the adapter {} was trained on another architecture than {}: {}; {hint}",
            adapter_dir.display(),
            model_dir.display(),
            differ.join(", ")
        ));
    }
    let (mut compared, mut mismatched) = (0, vec![]);
    for (name, ours) in samples(m) {
        let Some(theirs) = saved["samples"][&name].as_array() else { continue };
        for (pair, (i, v)) in theirs.iter().zip(&ours) {
            let (Some(j), Some(w)) = (pair[0].as_i64(), pair[1].as_f64()) else { continue };
            if j != *i {
                continue;
            }
            compared += 1;
            if (v - w).abs() > SAME_REL * v.abs().max(w.abs()) {
                mismatched.push(format!("{name}[{i}] = {v:.6} here, {w:.6} in {trained_on}"));
            }
        }
    }
    // Different models differ nearly everywhere; a few close calls are rounding.
    if compared > 0 && mismatched.len() * 2 > compared {
        return Err(format!(
            "the adapter {} was trained on {trained_on}, and {} has other weights ({} of {compared} sampled weights differ, e.g. {}); {hint}",
            adapter_dir.display(),
            model_dir.display(),
            mismatched.len(),
            mismatched[0]
        ));
    }
    Ok(())
}

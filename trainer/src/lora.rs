//! LoRA adapters on linear layers, compatible with peft: `delta(x) = dropout(x) A^T B^T * alpha / r`
//! (added into the base layer's output by one `addmm`, [`LoraLinear::add_to`]), with A (r, in)
//! initialised like peft (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so step 0 equals the base
//! model. Adapter tensors are named as in peft's `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight`). Dropout is active only while training, and each adapter
//! draws its mask from a generator seeded by (the trainer's key, its own index), so a mask does not
//! depend on what ran before it: recomputing a layer (activation checkpointing) replays it exactly.
//! This module does not freeze the base model or save files; the trainer and `export` do.

use crate::model::Llama;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// Module names LoRA can target.
pub const LINEAR_NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Short module names (`q_proj`, ...) or `all-linear` (every linear layer but `lm_head`).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// The short names targeted, `all-linear` expanded; unknown names are errors.
    pub fn targets(&self) -> Result<Vec<&'static str>, String> {
        let mut out = vec![];
        for t in &self.target_modules {
            if t == "all-linear" {
                out.extend(LINEAR_NAMES);
            } else if let Some(&n) = LINEAR_NAMES.iter().find(|n| **n == t.as_str()) {
                out.push(n);
            } else {
                return Err(format!(
                    "unknown LoRA target module `{t}`; expected all-linear or some of {}",
                    LINEAR_NAMES.join(", ")
                ));
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err("lora.target_modules is empty".into());
        }
        Ok(out)
    }
}

/// Shared by the adapters of one model and the trainer: whether dropout is active, and the key
/// (a function of seed, step and micro-batch, set by the trainer) that every dropout mask derives from.
#[derive(Default)]
pub struct Dropout {
    pub training: Cell<bool>,
    pub key: Cell<u64>,
}

/// The generator seed of adapter `index` under `key` (splitmix64 of both; 63 bits, so the same value
/// reaches `torch.manual_seed` in tests/oracle.py, which transcribes this function).
pub fn mask_seed(key: u64, index: u64) -> i64 {
    let mut z = key ^ (index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

pub struct LoraLinear {
    pub a: Tensor, // (r, in)
    pub b: Tensor, // (out, r)
    pub scale: f64,
    pub dropout: f64,
    /// Position of this adapter in module order (its mask's seed derives from it).
    pub index: u64,
    /// Shared with the trainer: dropout applies only while training.
    pub ctl: Rc<Dropout>,
}

impl LoraLinear {
    /// `y + delta(x)` for the base layer's output `y` (..., out) and its input `x` (..., in), with
    /// `delta(x) = dropout(x) A^T B^T * scale` as peft computes it, in two products shaped for speed:
    /// `h = dropout(x) A^T * scale` (N, r), scaled while it is small, then one `addmm(y, h, B^T)` that
    /// adds the product into `y` (no (N, out) delta, scale or sum of its own, forward or backward).
    /// B^T is passed as a row-major (r, out) copy: with B's own (out, r) layout, libtorch's backward
    /// multiplies through the transposed thin operand, 2-6x slower per product (benches/train.rs has
    /// the step's figures). Values equal peft's up to rounding: the scale applies before the second
    /// product (exact for a power of two, as alpha = 2r), backward accumulates in another order, and
    /// in bf16 the sum is rounded once where peft rounds the delta, its scaling and the sum.
    pub fn add_to(&self, y: &Tensor, x: &Tensor) -> Tensor {
        let x = if self.ctl.training.get() && self.dropout > 0.0 {
            // Reseeding the process's generator makes the mask a function of (key, index) alone.
            tch::manual_seed(mask_seed(self.ctl.key.get(), self.index));
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let (in_dim, out) = (self.a.size()[1], self.b.size()[0]);
        let h = x.reshape([-1, in_dim]).linear::<Tensor>(&self.a, None); // (N, r)
        let h = if self.scale == 1.0 { h } else { h * self.scale };
        let bt = self.b.tr().contiguous(); // (r, out), row-major
        y.reshape([-1, out]).addmm(&h, &bt).view(y.size().as_slice()) // (..., out)
    }
}

/// Attaches fresh adapters to the targeted layers of `model` (in the model's dtype, requiring
/// gradients) and returns them with their peft names, in module order. Draws A from libtorch's
/// generator: seed it first for reproducible adapters.
pub fn attach(model: &mut Llama, cfg: &LoraConfig, ctl: Rc<Dropout>) -> Result<Vec<(String, Tensor)>, String> {
    let targets = cfg.targets()?;
    let (kind, device) = (model.kind(), model.device());
    let mut named = vec![];
    for (path, short, lin) in model.linears_mut() {
        if !targets.contains(&short) {
            continue;
        }
        let (out_dim, in_dim) = (lin.weight.size()[0], lin.weight.size()[1]);
        let bound = 1.0 / (in_dim as f64).sqrt(); // kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) fan_in))
        let a = Tensor::empty([cfg.r, in_dim], (Kind::Float, device))
            .uniform_(-bound, bound)
            .to_kind(kind)
            .set_requires_grad(true);
        let b = Tensor::zeros([out_dim, cfg.r], (kind, device)).set_requires_grad(true);
        named.push((format!("base_model.model.{path}.lora_A.weight"), a.shallow_clone()));
        named.push((format!("base_model.model.{path}.lora_B.weight"), b.shallow_clone()));
        lin.lora = Some(LoraLinear {
            a,
            b,
            scale: cfg.alpha / cfg.r as f64,
            dropout: cfg.dropout,
            index: (named.len() / 2 - 1) as u64,
            ctl: ctl.clone(),
        });
    }
    Ok(named)
}

/// Folds every adapter into its base weight (W += B A * scale) and removes it, for a merged export.
pub fn merge(model: &mut Llama) {
    let _g = tch::no_grad_guard();
    for (_, _, lin) in model.linears_mut() {
        if let Some(l) = lin.lora.take() {
            let delta = l.b.to_kind(Kind::Float).matmul(&l.a.to_kind(Kind::Float)) * l.scale;
            let merged = lin.weight.to_kind(Kind::Float) + delta;
            lin.weight.shallow_clone().copy_(&merged);
        }
    }
}

/// peft's adapter_config.json for these adapters.
pub fn adapter_config(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    let targets: Vec<&str> = cfg.targets().unwrap_or_default();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    })
}

/// Reads peft's adapter_config.json (LoRA only; rsLoRA, DoRA and trained biases are refused).
pub fn read_adapter_config(dir: &std::path::Path) -> Result<LoraConfig, String> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", p.display()))?;
    let bad = |k: &str, m: &str| format!("{}: `{k}` {m}", p.display());
    if v.get("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        return Err(bad("peft_type", "is not LORA"));
    }
    for k in ["use_rslora", "use_dora"] {
        if v.get(k).and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad(k, "is not supported"));
        }
    }
    if v.get("bias").and_then(|x| x.as_str()).is_some_and(|b| b != "none") {
        return Err(bad("bias", "must be \"none\""));
    }
    let target_modules = match v.get("target_modules") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
        _ => return Err(bad("target_modules", "is missing")),
    };
    Ok(LoraConfig {
        r: v.get("r").and_then(|x| x.as_i64()).ok_or_else(|| bad("r", "is missing"))?,
        alpha: v.get("lora_alpha").and_then(|x| x.as_f64()).ok_or_else(|| bad("lora_alpha", "is missing"))?,
        dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0),
        target_modules,
    })
}

/// Attaches the adapter saved in `dir` (peft layout) to `model` (loaded from `model_dir`), for
/// inference or further training, after checking that `model` is the base it was trained on.
pub fn load_adapter(
    model: &mut Llama,
    model_dir: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(LoraConfig, Vec<(String, Tensor)>), String> {
    let cfg = read_adapter_config(dir)?;
    crate::adapter_base::check(model, model_dir, dir)?;
    let named = attach(model, &cfg, Rc::new(Dropout::default()))?;
    crate::checkpoint::load_named(&dir.join("adapter_model.safetensors"), &named).map_err(|e| e.to_string())?;
    Ok((cfg, named))
}

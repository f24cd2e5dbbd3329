//! A model with its trainable parameters and its optimizer: loading (full fine-tuning, or a frozen base
//! with fresh LoRA adapters), one micro-batch's forward and backward (whole-graph reference, or the
//! layer-wise step the training loop uses), and the export of what was trained. It does not loop over
//! steps, read data or talk to other ranks (`train`).

use crate::batch::BatchTensors;
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::layerwise::{self, Stage, StepOptions};
use crate::lora::{self, Dropout, LoraConfig};
use crate::model::Llama;
use crate::optim::{AdamW, AdamWConfig, ShardOf};
use crate::{load_model, loss, weights};
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// A model with its trainable parameters and optimizer.
pub struct Trainer {
    pub model: Llama,
    pub opt: AdamW,
    /// Trainable tensors under their checkpoint names (peft names for LoRA, Hugging Face names for
    /// full fine-tuning).
    pub trainable: Vec<(String, Tensor)>,
    pub lora: Option<LoraConfig>,
    /// Shared with the adapters: dropout on or off, and the key of its masks.
    dropout: Rc<Dropout>,
}

impl Trainer {
    /// Loads the model; with `lora`, freezes it and attaches fresh adapters (seeded by `seed`). The
    /// optimizer updates `shard`'s slice of the trainable tensors (`ShardOf::ALL`: all of them).
    pub fn new(
        model_dir: &Path,
        kind: Kind,
        device: Device,
        lora: Option<LoraConfig>,
        adamw: AdamWConfig,
        seed: u64,
        shard: ShardOf,
    ) -> Result<Self> {
        let mut model = load_model(model_dir, kind, device)?;
        let dropout = Rc::new(Dropout::default());
        let trainable = match &lora {
            Some(cfg) => {
                model.set_requires_grad(false);
                tch::manual_seed(seed as i64);
                model.stack_frozen_projections();
                lora::attach(&mut model, cfg, dropout.clone()).map_err(Error::Invalid)?
            }
            None => {
                model.set_requires_grad(true);
                model.named_parameters()
            }
        };
        let named = trainable.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let opt = AdamW::new(named, adamw, model.layers.len(), shard);
        Ok(Trainer { model, opt, trainable, lora, dropout })
    }

    /// Sets the key every LoRA dropout mask of the next forward passes derives from (the training
    /// loop makes it a function of seed, step and global micro-batch index).
    pub fn set_dropout_key(&self, key: u64) {
        self.dropout.key.set(key);
    }

    /// Forward and backward of one micro-batch through one whole autograd graph (the reference the
    /// layer-wise step is tested against); the loss is divided by `denom`, the trained tokens of the
    /// whole optimizer step. Returns the (detached) sum of the micro-batch's token losses.
    pub fn micro_step(&self, b: &BatchTensors, denom: f64) -> Tensor {
        self.dropout.training.set(true);
        let hidden = self.model.forward_packed(&b.ids, &b.positions, &b.attend);
        let sum = loss::masked_ce_sum(&self.model, &hidden, &b.idx, &b.targets);
        (&sum / denom).backward();
        self.dropout.training.set(false);
        sum.detach()
    }

    /// The same, stage by stage (`layerwise`): checkpointing and the loss chunk as `opts` says, and
    /// `on_done(stage)` after each stage's backward (where the caller starts gradient reductions).
    pub fn micro_step_layerwise(
        &self,
        b: &BatchTensors,
        denom: f64,
        opts: &StepOptions,
        on_done: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<Tensor> {
        self.dropout.training.set(true);
        let sum = layerwise::forward_backward(&self.model, b, denom, opts, on_done);
        self.dropout.training.set(false);
        sum
    }

    /// Writes the adapter (peft layout) or the whole model (Hugging Face layout, in `full_kind`) to `dir`.
    pub fn export(&self, dir: &Path, base_model: &Path, full_kind: Kind) -> Result<()> {
        match &self.lora {
            Some(cfg) => {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                checkpoint::save_named(&dir.join("adapter_model.safetensors"), &self.trainable)?;
                let c = lora::adapter_config(cfg, &base_model.display().to_string());
                let p = dir.join("adapter_config.json");
                std::fs::write(&p, serde_json::to_string_pretty(&c).expect("json")).map_err(Error::io(&p))?;
                // The base is frozen under LoRA: the model's weights are still the base's.
                let f = crate::adapter_base::fingerprint(&self.model, base_model);
                let p = dir.join(crate::adapter_base::FILE);
                std::fs::write(&p, serde_json::to_string_pretty(&f).expect("json")).map_err(Error::io(&p))
            }
            None => weights::save_pretrained(&self.model, dir, full_kind, 2 << 30),
        }?;
        copy_tokenizer_files(base_model, dir)
    }
}

/// The dtype a full fine-tuning's export is written in (`output.save_dtype`; auto: the base
/// checkpoint's). An adapter is written in its parameters' own dtype whatever this says.
pub fn export_kind(cfg: &crate::plan::RunConfig, lora: bool, model_kind: Kind) -> Result<Kind> {
    match cfg.output.save_dtype.as_str() {
        "auto" if !lora => crate::weights::stored_kind(&cfg.model.path),
        "auto" => Ok(model_kind),
        name => crate::parse_kind(name),
    }
}

/// The files an export copies from the base model beside its weights (when present).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Bytes of the `TOKENIZER_FILES` in `from` (what `copy_tokenizer_files` writes).
pub fn tokenizer_files_bytes(from: &Path) -> u64 {
    TOKENIZER_FILES.iter().filter_map(|f| std::fs::metadata(from.join(f)).ok()).map(|m| m.len()).sum()
}

/// Copies the `TOKENIZER_FILES` present in `from` to `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).map_err(Error::io(to.join(f)))?;
        }
    }
    Ok(())
}

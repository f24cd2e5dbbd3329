//! Numerical probes that compare ferrotune with a reference on any device, through files both sides
//! read and write (`ferrotune probe ...`, driven by `scripts/gpu-check`; the same file formats as
//! `tests/oracle.py`): one forward (logits, masked loss, named gradients), one optimizer step (loss,
//! clipped gradient norm, every trainable parameter after AdamW), greedy generation, and the packed rows
//! of a prepared cache in the order `train` reads them. It decides no tolerances (the caller does) and
//! is not on the training path.

use crate::batch::{to_tensors, BatchTensors};
use crate::error::{Error, Result};
use crate::layerwise::{Checkpointing, StepOptions};
use crate::learner::Trainer;
use crate::lora::LoraConfig;
use crate::model::Attend;
use crate::optim::{AdamWConfig, ShardOf};
use crate::{generate, load_model, loss};
use ferrotune_data::{cache::TokenCache, loader::Loader};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Reads a safetensors file of named tensors (onto the CPU).
fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?
        .into_iter()
        .collect())
}

fn write(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        named.iter().map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| Error::Invalid(format!("writing {}: {e}", path.display())))
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str, path: &Path) -> Result<&'a Tensor> {
    t.get(name).ok_or_else(|| Error::Invalid(format!("{} has no tensor `{name}`", path.display())))
}

/// (B, T) positions 0..T per row, unless the input file gives `position_ids`.
fn positions(t: &HashMap<String, Tensor>, ids: &Tensor) -> Tensor {
    t.get("position_ids").map(Tensor::shallow_clone).unwrap_or_else(|| {
        let (b, s) = (ids.size()[0], ids.size()[1]);
        Tensor::arange(s, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b, 1])
    })
}

/// Unshifted labels (B, T), -100 = ignored (transformers' convention) -> the same labels shifted within
/// each row, as the data pipeline makes them: position i is trained to predict label i + 1.
fn shift(labels: &Tensor) -> Tensor {
    let (b, t) = (labels.size()[0], labels.size()[1]);
    let pad = Tensor::full([b, 1], -100, (Kind::Int64, Device::Cpu));
    Tensor::cat(&[labels.narrow(1, 1, t - 1), pad], 1)
}

/// `oracle.py forward`'s counterpart: `input` holds input_ids (B, T) and optionally position_ids and
/// labels (unshifted); `out` gets logits (fp32) and, with labels, loss (the mean over trained tokens)
/// and grad.NAME for each of `grads` (Hugging Face names).
pub fn forward(model_dir: &Path, input: &Path, out: &Path, grads: &[String], kind: Kind, device: Device) -> Result<()> {
    let t = read(input)?;
    let model = load_model(model_dir, kind, device)?;
    let ids = get(&t, "input_ids", input)?;
    let pos = positions(&t, ids);
    let labels = t.get("labels");
    model.set_requires_grad(labels.is_some());
    let hidden = model.forward(&ids.to_device(device), &pos.to_device(device), None, None);
    let mut result = vec![("logits".to_string(), tch::no_grad(|| model.logits(&hidden)).to_kind(Kind::Float))];
    if let Some(labels) = labels {
        let (idx, targets) = loss::trained_positions(&shift(labels));
        let n = idx.size()[0];
        if n == 0 {
            return Err(Error::Invalid(format!("{}: no label is trained (all -100)", input.display())));
        }
        let mean = loss::masked_ce_sum(&model, &hidden, &idx.to_device(device), &targets.to_device(device)) / n as f64;
        mean.backward();
        result.push(("loss".into(), mean.detach().to_kind(Kind::Float).reshape([1])));
        let params: HashMap<String, Tensor> = model.named_parameters().into_iter().collect();
        for g in grads {
            let p = params.get(g).ok_or_else(|| Error::Invalid(format!("the model has no parameter `{g}`")))?;
            result.push((format!("grad.{g}"), p.grad().to_kind(Kind::Float)));
        }
    }
    write(out, &result)
}

/// One optimizer step's settings (`oracle.py train_step`'s arguments).
pub struct StepArgs {
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// LoRA adapters (fresh, B drawn at random so that A's gradient is not zero) and the directory the
    /// adapters are exported to before the step, for the reference to load; None: full fine-tuning.
    pub lora: Option<(LoraConfig, std::path::PathBuf)>,
    pub checkpointing: Checkpointing,
    pub seed: u64,
}

/// `oracle.py train_step`'s counterpart: the mean loss over `input`'s labels, backward (layer-wise, as
/// `train` runs it), clipping, one AdamW step (betas 0.9/0.999, eps 1e-8). `out` gets loss, grad_norm,
/// and for every trainable parameter (peft names for LoRA) grad.NAME, clipped as the step used it, and
/// param.NAME after the step.
pub fn step(model_dir: &Path, input: &Path, out: &Path, a: &StepArgs, kind: Kind, device: Device) -> Result<()> {
    let t = read(input)?;
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: a.weight_decay };
    let lora = a.lora.as_ref().map(|(c, _)| c.clone());
    let mut trainer = Trainer::new(model_dir, kind, device, lora, adamw, a.seed, ShardOf::ALL)?;
    if let Some((_, adapter_dir)) = &a.lora {
        tch::manual_seed(a.seed as i64 + 1);
        tch::no_grad(|| {
            for (name, p) in &trainer.trainable {
                if name.contains("lora_B") {
                    p.shallow_clone().copy_(&(Tensor::randn(p.size(), (Kind::Float, p.device())) * 0.05));
                }
            }
        });
        trainer.export(adapter_dir, model_dir, trainer.model.kind())?;
    }
    let ids = get(&t, "input_ids", input)?;
    let b = batch(ids, &shift(get(&t, "labels", input)?), &positions(&t, ids), device)?;
    let opts = StepOptions { checkpointing: a.checkpointing, loss_chunk: 1 << 20 };
    let sum = trainer.micro_step_layerwise(&b, b.trained as f64, &opts, &mut |_| Ok(()))?;
    let norm = trainer.opt.clip_grad_norm(a.max_grad_norm, &mut crate::dist::Single)?;
    // Copies (one, in fp32, whatever the dtype): the step zeroes the gradients.
    let grads: Vec<(String, Tensor)> = trainer
        .trainable
        .iter()
        .map(|(n, p)| (format!("grad.{n}"), p.grad().to_dtype(Kind::Float, false, true)))
        .collect();
    trainer.opt.step(a.lr);
    let mut result = vec![
        ("loss".to_string(), (sum / b.trained as f64).to_kind(Kind::Float).reshape([1])),
        ("grad_norm".to_string(), norm.to_kind(Kind::Float).reshape([1])),
    ];
    result.extend(grads);
    result.extend(trainer.trainable.iter().map(|(n, p)| (format!("param.{n}"), p.to_kind(Kind::Float))));
    write(out, &result)
}

/// One micro-batch of rows (B, T) with shifted labels, on `device`.
fn batch(ids: &Tensor, shifted: &Tensor, pos: &Tensor, device: Device) -> Result<BatchTensors> {
    let (idx, targets) = loss::trained_positions(shifted);
    let trained = idx.size()[0] as usize;
    if trained == 0 {
        return Err(Error::Invalid("no label is trained (all -100)".into()));
    }
    Ok(BatchTensors {
        ids: ids.to_device(device),
        positions: pos.to_device(device),
        attend: Attend::Causal,
        trained,
        idx: idx.to_device(device),
        targets: targets.to_device(device),
    })
}

/// `oracle.py generate`'s counterpart: greedy continuations of token-id prompts (a JSON list of lists),
/// batched, cut before the first end-of-sequence id; `out` gets the JSON list of generated ids.
pub fn generate(
    model_dir: &Path,
    prompts: &Path,
    out: &Path,
    max_new: usize,
    kind: Kind,
    device: Device,
) -> Result<()> {
    let text = std::fs::read_to_string(prompts).map_err(Error::io(prompts))?;
    let prompts: Vec<Vec<i64>> = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: expected a JSON list of token-id lists: {e}", prompts.display())))?;
    let model = load_model(model_dir, kind, device)?;
    let ids = generate::greedy(&model, &prompts, max_new, &model.config.eos_token_ids);
    std::fs::write(out, serde_json::to_string(&ids).expect("json")).map_err(Error::io(out))
}

/// The first `steps` micro-batches of rows the training loop of one rank reads from `cache` with this
/// `seed` (micro-batches of one row), written for a reference loop: input_ids, position_ids, doc_ids,
/// labels (shifted, ours) and labels_hf (unshifted: transformers shifts them itself), each (steps, T).
pub fn write_rows(cache: &TokenCache, seed: u64, steps: usize, out: &Path) -> Result<()> {
    if cache.rows() < steps {
        return Err(Error::Invalid(format!("the cache holds {} rows, fewer than the {steps} asked for", cache.rows())));
    }
    let mut loader = Loader::new(cache, 0, 1, seed, 1).map_err(|e| Error::Invalid(e.to_string()))?;
    let batches: Vec<_> = (0..steps).map(|_| loader.next_batch()).collect();
    let stack = |f: &dyn Fn(&ferrotune_data::loader::Batch) -> Vec<i64>| {
        Tensor::stack(&batches.iter().map(|b| Tensor::from_slice(&f(b))).collect::<Vec<_>>(), 0)
    };
    // transformers' label at i is the target of position i - 1.
    let unshifted = |b: &ferrotune_data::loader::Batch| {
        std::iter::once(-100).chain(b.labels[..b.seq - 1].iter().copied()).collect()
    };
    let named = vec![
        ("input_ids".to_string(), stack(&|b| b.ids.clone())),
        ("position_ids".to_string(), stack(&|b| b.position_ids.clone())),
        ("doc_ids".to_string(), stack(&|b| b.doc_ids.clone())),
        ("labels".to_string(), stack(&|b| b.labels.clone())),
        ("labels_hf".to_string(), stack(&unshifted)),
    ];
    write(out, &named)
}

/// The batches of a rows file (`write_rows`) as the training step takes them, one row each.
pub fn read_rows(path: &Path, device: Device) -> Result<Vec<BatchTensors>> {
    let t = read(path)?;
    let rows = get(&t, "input_ids", path)?.size()[0];
    let row = |name: &str, i: i64| -> Result<Vec<i64>> {
        Vec::<i64>::try_from(get(&t, name, path)?.get(i)).map_err(Error::Torch)
    };
    (0..rows)
        .map(|i| {
            let labels = row("labels", i)?;
            let b = ferrotune_data::loader::Batch {
                rows: 1,
                seq: labels.len(),
                ids: row("input_ids", i)?,
                position_ids: row("position_ids", i)?,
                doc_ids: row("doc_ids", i)?,
                trained_tokens: labels.iter().filter(|&&l| l != -100).count(),
                labels,
                row_indices: vec![i as usize],
                epoch: 0,
            };
            Ok(to_tensors(&b, device))
        })
        .collect()
}

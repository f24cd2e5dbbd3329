//! One training step against transformers (+ peft) as the oracle (`tests/oracle.py train_step`): the
//! masked mean loss, the clipped global gradient norm, every clipped gradient and every trainable
//! parameter after one AdamW step, for full fine-tuning and for LoRA (adapters exported in peft's layout
//! and loaded by peft, which also proves the export format). Tiny model, fp32; LoRA dropout 0 so both
//! sides are deterministic. Tolerances: gradients 1e-5 of each tensor's largest (the same libtorch
//! kernels, summed in another order where ferrotune shapes a product for speed); parameters, which move
//! by about lr = 1e-3, 1e-6 absolute beyond what the two gradients' own difference explains (the first
//! step moves a parameter by lr * g / (|g| + eps), which follows g's last bits where |g| is near eps,
//! so that part of the difference is taken off, per value, and every value stays checked). Observed differences
//! are printed. The layer-wise step (with and without activation checkpointing) is held to the same
//! numbers, with LoRA dropout 0.1 replayed on peft's side (the oracle reseeds each dropout module as
//! ferrotune's adapters do).

mod common;

use common::*;
use ferrotune_trainer::batch::BatchTensors;
use ferrotune_trainer::layerwise::{Checkpointing, StepOptions};
use ferrotune_trainer::learner::Trainer;
use ferrotune_trainer::lora::LoraConfig;
use ferrotune_trainer::optim::{AdamWConfig, ShardOf};
use tch::{Device, Kind, Tensor};

const LR: f64 = 1e-3;
const WD: f64 = 0.1;
const CLIP: f64 = 0.5;

fn batch(vocab: i64) -> (Tensor, Tensor, BatchTensors) {
    let (b, t) = (2i64, 16i64);
    let ids: Vec<i64> = common::ids((b * t) as usize, 0, vocab, 21);
    // Unshifted labels for transformers: train the second half of each row.
    let labels: Vec<i64> =
        ids.iter().enumerate().map(|(i, &x)| if (i as i64 % t) >= t / 2 { x } else { -100 }).collect();
    let input = Tensor::from_slice(&ids).reshape([b, t]);
    let hf_labels = Tensor::from_slice(&labels).reshape([b, t]);
    // Ours: shifted within each row.
    let mut idx = vec![];
    let mut targets = vec![];
    for r in 0..b {
        for c in 0..t - 1 {
            let l = labels[(r * t + c + 1) as usize];
            if l != -100 {
                idx.push(r * t + c);
                targets.push(l);
            }
        }
    }
    let bt = BatchTensors {
        ids: input.shallow_clone(),
        positions: Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b, 1]),
        attend: ferrotune_trainer::model::Attend::Causal,
        trained: idx.len(),
        idx: Tensor::from_slice(&idx),
        targets: Tensor::from_slice(&targets),
    };
    (input, hf_labels, bt)
}

fn step_and_compare(trainer: &mut Trainer, hf: &std::collections::HashMap<String, Tensor>, bt: &BatchTensors) {
    compare_step(trainer, hf, bt, &|t: &Trainer, b: &BatchTensors| t.micro_step(b, b.trained as f64));
}

type MicroStep<'a> = dyn Fn(&Trainer, &BatchTensors) -> Tensor + 'a;

fn compare_step(
    trainer: &mut Trainer,
    hf: &std::collections::HashMap<String, Tensor>,
    bt: &BatchTensors,
    micro_step: &MicroStep<'_>,
) {
    let sum = micro_step(trainer, bt);
    let loss = sum.double_value(&[]) / bt.trained as f64;
    let norm = trainer.opt.clip_grad_norm(CLIP, &mut ferrotune_trainer::dist::Single).unwrap().double_value(&[]);
    // The clipped gradients, as the step will use them.
    let grads: Vec<Tensor> = trainer.trainable.iter().map(|(_, t)| t.grad().copy()).collect();
    trainer.opt.step(LR);
    let (hl, hn) = (hf["loss"].double_value(&[0]), hf["grad_norm"].double_value(&[0]));
    println!("loss {loss:.7} vs {hl:.7}; grad norm {norm:.6} vs {hn:.6}");
    assert!((loss - hl).abs() < 1e-5 * hl, "loss {loss} vs {hl}");
    assert!((norm - hn).abs() < 1e-5 * hn, "grad norm {norm} vs {hn}");
    assert!(hn > CLIP, "the test should exercise clipping");
    let (mut worst_grad, mut worst, mut raw, mut explained) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for ((name, t), g) in trainer.trainable.iter().zip(&grads) {
        let get = |k: String| hf.get(&k).unwrap_or_else(|| panic!("oracle has no {k}"));
        let (theirs, their_g) = (get(format!("param.{name}")), get(format!("grad.{name}")));
        worst_grad = worst_grad.max(max_abs_diff(g, their_g) / max_abs(their_g).max(f64::MIN_POSITIVE));
        // AdamW's first step moves a parameter by lr * u(g), u(g) = g / (|g| + eps): where |g| is near
        // eps, the move follows g's last bits (checked above). What the two gradients' difference moves
        // is taken off; the bound holds for the rest, in every value.
        let u = |g: &Tensor| g / (g.abs() + adamw().eps);
        let moved = (u(g) - u(their_g)).abs() * LR;
        let diff = (t - theirs).abs();
        raw = raw.max(diff.max().double_value(&[]));
        explained = explained.max(moved.max().double_value(&[]));
        worst = worst.max((diff - moved).clamp_min(0.0).max().double_value(&[]));
    }
    println!(
        "max |grad - reference| / max |reference grad| over {} tensors: {worst_grad:.3e}",
        trainer.trainable.len()
    );
    println!(
        "max |param - reference| after one step: {raw:.3e}, {worst:.3e} beyond the up to {explained:.3e} the gradients' difference explains"
    );
    assert!(worst_grad < 1e-5, "{worst_grad}");
    assert!(worst < 1e-6, "{worst}");
    assert_eq!(hf.keys().filter(|k| k.starts_with("param.")).count(), trainer.trainable.len());
}

/// transformers' (+ peft's, with `adapter`) step on the batch.
fn hf_step(
    dir: &std::path::Path,
    input: &Tensor,
    labels: &Tensor,
    adapter: Option<&std::path::Path>,
    dropout_key: Option<u64>,
) -> std::collections::HashMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("in.safetensors"), tmp.path().join("out.safetensors"));
    Tensor::write_safetensors(&[("input_ids", input), ("labels", labels)], &inp).unwrap();
    let (lr, wd, clip) = (LR.to_string(), WD.to_string(), CLIP.to_string());
    let mut args =
        vec!["train_step", dir.to_str().unwrap(), inp.to_str().unwrap(), out.to_str().unwrap(), &lr, &wd, &clip];
    if let Some(a) = adapter {
        args.push(a.to_str().unwrap());
    }
    let key = dropout_key.map(|k| k.to_string());
    let env: Vec<(&str, &str)> = key.iter().map(|k| ("ORACLE_DROPOUT_KEY", k.as_str())).collect();
    oracle_with(&args, "float32", &env);
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

fn adamw() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: WD }
}

#[test]
fn full_fine_tuning_step_equals_transformers() {
    let dir = fixture("tiny-llama-bias");
    let mut trainer = Trainer::new(&dir, Kind::Float, Device::Cpu, None, adamw(), 0, ShardOf::ALL).unwrap();
    let (input, labels, bt) = batch(trainer.model.config.vocab_size);
    let hf = hf_step(&dir, &input, &labels, None, None);
    step_and_compare(&mut trainer, &hf, &bt);
}

#[test]
fn lora_step_equals_peft() {
    let dir = fixture("tiny-llama");
    // alpha / r = 1.5, not a power of two: ferrotune scales the (N, r) product, peft the (N, out) one.
    let cfg = LoraConfig {
        r: 4,
        alpha: 6.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let mut trainer = Trainer::new(&dir, Kind::Float, Device::Cpu, Some(cfg), adamw(), 3, ShardOf::ALL).unwrap();
    // B starts at zero (step 0 equals the base model); give it values so that A's gradient is non-zero too.
    randomize_lora_b(&trainer.trainable, 0.05);
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    trainer.export(&adapter, &dir, Kind::Float).unwrap();
    let (input, labels, bt) = batch(trainer.model.config.vocab_size);
    let hf = hf_step(&dir, &input, &labels, Some(&adapter), None);
    step_and_compare(&mut trainer, &hf, &bt);
}

/// LoRA with dropout 0.1 on every linear, through the layer-wise step: checkpointing none and full
/// (which recomputes each layer, masks included) both take peft's step. One loss chunk: AdamW's first
/// step moves a parameter by lr * g / (|g| + eps), so gradients near eps turn rounding differences
/// (chunked sums, tested against the whole graph in layerwise.rs) into 1e-5 of parameter; that part is
/// what `compare_step` takes off as explained by the gradients.
#[test]
fn layerwise_lora_step_with_dropout_equals_peft() {
    let dir = fixture("tiny-llama");
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, target_modules: vec!["all-linear".into()] };
    const KEY: u64 = 0x1234_5678_9abc_def0;
    for checkpointing in [Checkpointing::None, Checkpointing::Full] {
        let mut trainer =
            Trainer::new(&dir, Kind::Float, Device::Cpu, Some(cfg.clone()), adamw(), 3, ShardOf::ALL).unwrap();
        tch::manual_seed(11);
        randomize_lora_b(&trainer.trainable, 0.05);
        let tmp = tempfile::tempdir().unwrap();
        let adapter = tmp.path().join("adapter");
        trainer.export(&adapter, &dir, Kind::Float).unwrap();
        let (input, labels, bt) = batch(trainer.model.config.vocab_size);
        let hf = hf_step(&dir, &input, &labels, Some(&adapter), Some(KEY));
        trainer.set_dropout_key(KEY);
        let opts = StepOptions { checkpointing, loss_chunk: 1000 };
        println!("checkpointing {checkpointing:?}:");
        compare_step(&mut trainer, &hf, &bt, &|t: &Trainer, b: &BatchTensors| {
            t.micro_step_layerwise(b, b.trained as f64, &opts, &mut |_| Ok(())).unwrap()
        });
    }
}

/// The dropout really is on in that test: without the key the oracle's masks differ, and so does its loss.
#[test]
fn dropout_masks_change_the_loss() {
    let dir = fixture("tiny-llama");
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, target_modules: vec!["all-linear".into()] };
    let trainer = Trainer::new(&dir, Kind::Float, Device::Cpu, Some(cfg), adamw(), 3, ShardOf::ALL).unwrap();
    tch::manual_seed(11);
    randomize_lora_b(&trainer.trainable, 0.05);
    let (_, _, bt) = batch(trainer.model.config.vocab_size);
    let opts = StepOptions { checkpointing: Checkpointing::None, loss_chunk: 1000 };
    let loss = |key: u64| {
        trainer.set_dropout_key(key);
        trainer.micro_step_layerwise(&bt, 1.0, &opts, &mut |_| Ok(())).unwrap().double_value(&[])
    };
    let (a, b, c) = (loss(1), loss(2), loss(1));
    assert_eq!(a, c, "the same key draws the same masks");
    assert_ne!(a, b, "another key draws other masks");
}

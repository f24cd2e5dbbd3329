//! Helpers shared by the trainer's integration tests: fixtures, deterministic inputs, and calls to the
//! transformers oracle (`tests/oracle.py`).

#![allow(dead_code)]

use ferrotune_data::fixtures;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    fixtures::ensure(name)
}

/// Deterministic pseudo-random token ids in [lo, hi), from a 64-bit LCG (Knuth's MMIX constants).
pub fn ids(n: usize, lo: i64, hi: i64, seed: u64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + ((s >> 33) as i64).rem_euclid(hi - lo)
        })
        .collect()
}

/// Runs `python tests/oracle.py ARGS...` and panics with its output when it fails.
pub fn oracle(args: &[&str]) {
    oracle_in(args, "float32")
}

/// `oracle` with the model loaded in `dtype` ("float32" or "bfloat16").
pub fn oracle_in(args: &[&str], dtype: &str) {
    oracle_with(args, dtype, &[])
}

/// `oracle_in` with extra environment variables (e.g. ORACLE_DROPOUT_KEY).
pub fn oracle_with(args: &[&str], dtype: &str, env: &[(&str, &str)]) {
    let script = fixtures::repo_root().join("tests").join("oracle.py");
    let out = std::process::Command::new(fixtures::python())
        .arg(&script)
        .args(args)
        .envs(env.iter().copied())
        .env("ORACLE_DTYPE", dtype)
        .output()
        .expect("run oracle.py");
    assert!(out.status.success(), "oracle.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// transformers' forward on `inputs`, returning every tensor the oracle wrote.
pub fn hf_forward(model: &Path, inputs: &[(&str, &Tensor)], grads: &[&str]) -> HashMap<String, Tensor> {
    hf_forward_in(model, inputs, grads, "float32")
}

/// `hf_forward` with the model in `dtype`.
pub fn hf_forward_in(model: &Path, inputs: &[(&str, &Tensor)], grads: &[&str], dtype: &str) -> HashMap<String, Tensor> {
    hf_forward_env(model, inputs, grads, dtype, &[])
}

/// `hf_forward_in` with extra ORACLE_* settings (e.g. ORACLE_ATTENTION_FP32).
pub fn hf_forward_env(
    model: &Path,
    inputs: &[(&str, &Tensor)],
    grads: &[&str],
    dtype: &str,
    env: &[(&str, &str)],
) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    let out = dir.path().join("out.safetensors");
    Tensor::write_safetensors(inputs, &inp).unwrap();
    let mut args = vec!["forward", model.to_str().unwrap(), inp.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(grads);
    oracle_with(&args, dtype, env);
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

/// Max |a - b| over all elements, both taken as fp32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.to_kind(Kind::Float).abs().max().double_value(&[])
}

/// Gives every LoRA B (zero at start, so that step 0 equals the base model) random values, so that the
/// adapters change the output and A receives gradients.
pub fn randomize_lora_b(trainable: &[(String, Tensor)], scale: f64) {
    tch::no_grad(|| {
        for (name, t) in trainable {
            if name.contains("lora_B") {
                t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, t.device())) * scale));
            }
        }
    });
}

/// The step tests' LoRA trainer: r = 4, alpha = 8 on every linear of tiny-llama (untied head), `dropout`,
/// seed 3, AdamW without weight decay; its B randomized (seed 4, scale 0.05) so that A gets gradients.
pub fn tiny_lora_trainer(kind: Kind, dropout: f64) -> ferrotune_trainer::learner::Trainer {
    use ferrotune_trainer::{learner::Trainer, lora::LoraConfig, optim::ShardOf};
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout, target_modules: vec!["all-linear".into()] };
    let trainer =
        Trainer::new(&fixture("tiny-llama"), kind, tch::Device::Cpu, Some(cfg), no_decay(), 3, ShardOf::ALL).unwrap();
    tch::manual_seed(4);
    randomize_lora_b(&trainer.trainable, 0.05);
    trainer
}

/// The step tests' full fine-tuning trainer: tiny-llama-bias (biases, tied embeddings), AdamW without
/// weight decay.
pub fn tiny_full_trainer(kind: Kind) -> ferrotune_trainer::learner::Trainer {
    use ferrotune_trainer::{learner::Trainer, optim::ShardOf};
    Trainer::new(&fixture("tiny-llama-bias"), kind, tch::Device::Cpu, None, no_decay(), 0, ShardOf::ALL).unwrap()
}

/// AdamW with PyTorch's defaults and no weight decay.
pub fn no_decay() -> ferrotune_trainer::optim::AdamWConfig {
    ferrotune_trainer::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
}

/// ‖a - b‖ / ‖b‖, in fp64 over fp32 copies.
pub fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let norm = |t: &Tensor| t.to_kind(Kind::Double).norm().double_value(&[]);
    norm(&(a.to_kind(Kind::Float) - b.to_kind(Kind::Float))) / norm(b)
}

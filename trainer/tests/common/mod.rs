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

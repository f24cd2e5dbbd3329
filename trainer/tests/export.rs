//! Exports read by the reference libraries: our LoRA adapter loaded by peft on top of transformers, and
//! our merged checkpoint loaded by transformers alone, give the logits our model with the adapter gives.

mod common;

use common::*;
use ferrotune_trainer::learner::Trainer;
use ferrotune_trainer::lora::{self, LoraConfig};
use ferrotune_trainer::optim::{AdamWConfig, ShardOf};
use ferrotune_trainer::{load_model, weights};
use tch::{Device, Kind, Tensor};

#[test]
fn adapter_loads_in_peft_and_merged_export_in_transformers_with_our_logits() {
    let dir = fixture("tiny-llama-bias");
    let cfg = LoraConfig { r: 4, alpha: 16.0, dropout: 0.1, target_modules: vec!["all-linear".into()] };
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let trainer = Trainer::new(&dir, Kind::Float, Device::Cpu, Some(cfg), adamw, 5, ShardOf::ALL).unwrap();
    randomize_lora_b(&trainer.trainable, 0.1);
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    trainer.export(&adapter, &dir, Kind::Float).unwrap();
    let input = Tensor::from_slice(&ids(32, 0, trainer.model.config.vocab_size, 9)).reshape([2, 16]);
    let pos = Tensor::arange(16, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
    let ours = tch::no_grad(|| trainer.model.logits(&trainer.model.forward(&input, &pos, None, None)));
    let base = tch::no_grad(|| {
        let m = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        m.logits(&m.forward(&input, &pos, None, None))
    });
    assert!(max_abs_diff(&ours, &base) > 1e-2, "the adapter should change the logits");

    // peft on transformers, with our adapter files.
    std::env::set_var("ORACLE_ADAPTER", &adapter);
    let hf = hf_forward(&dir, &[("input_ids", &input)], &[]);
    std::env::remove_var("ORACLE_ADAPTER");
    let d = max_abs_diff(&ours, &hf["logits"]);
    println!("peft vs ours: {d:.3e}");
    assert!(d < 1e-4, "{d}");

    // Our adapter loaded back by us.
    let mut again = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    lora::load_adapter(&mut again, &dir, &adapter).unwrap();
    let reloaded = tch::no_grad(|| again.logits(&again.forward(&input, &pos, None, None)));
    assert_eq!(max_abs_diff(&ours, &reloaded), 0.0);
    base_model_is_checked(&dir, &adapter);

    // Merged into a plain checkpoint that transformers reads without peft.
    lora::merge(&mut again);
    let merged = tmp.path().join("merged");
    weights::save_pretrained(&again, &merged, Kind::Float, 1 << 30).unwrap();
    let hf = hf_forward(&merged, &[("input_ids", &input)], &[]);
    let d = max_abs_diff(&ours, &hf["logits"]);
    println!("merged (transformers) vs ours: {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

/// The adapter's base_model.json: the same base loaded in bf16 passes (rounding is not another model);
/// a model of another architecture, and one of the same shape with other weights, are refused naming
/// the base it was trained on, before anything is attached.
fn base_model_is_checked(dir: &std::path::Path, adapter: &std::path::Path) {
    let mut bf16 = load_model(dir, Kind::BFloat16, Device::Cpu).unwrap();
    lora::load_adapter(&mut bf16, dir, adapter).unwrap();

    let other = fixture("tiny-llama");
    let mut m = load_model(&other, Kind::Float, Device::Cpu).unwrap();
    let err = lora::load_adapter(&mut m, &other, adapter).unwrap_err();
    assert!(
        err.contains("was trained on another architecture") && err.contains("vocab_size 128256 here, 49152 in"),
        "{err}"
    );
    assert!(err.contains(&format!("--model {}", dir.display())), "{err}");

    let mut m = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (_, t) in m.vs.variables() {
            let _ = t.shallow_clone().g_mul_scalar_(1.5);
        }
    });
    let err = lora::load_adapter(&mut m, dir, adapter).unwrap_err();
    assert!(err.contains(&format!("was trained on {}", dir.display())) && err.contains("has other weights"), "{err}");
    assert!(m.layers.iter().all(|l| l.self_attn.q_proj.lora.is_none()), "nothing may be attached on refusal");
}

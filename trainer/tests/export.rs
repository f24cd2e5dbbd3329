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
    trainer.export(&adapter, &dir).unwrap();
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
    lora::load_adapter(&mut again, &adapter).unwrap();
    let reloaded = tch::no_grad(|| again.logits(&again.forward(&input, &pos, None, None)));
    assert_eq!(max_abs_diff(&ours, &reloaded), 0.0);

    // Merged into a plain checkpoint that transformers reads without peft.
    lora::merge(&mut again);
    let merged = tmp.path().join("merged");
    weights::save_pretrained(&again, &merged, Kind::Float, 1 << 30).unwrap();
    let hf = hf_forward(&merged, &[("input_ids", &input)], &[]);
    let d = max_abs_diff(&ours, &hf["logits"]);
    println!("merged (transformers) vs ours: {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

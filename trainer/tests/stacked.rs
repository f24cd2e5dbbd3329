//! Frozen projections stacked into one product (`Llama::stack_frozen_projections`, model.rs `Stacked`):
//! the same logits as the linears apart, the VarStore's named weights still the tensors the stack reads
//! (loading, `lora::merge` and export write through them), and nothing stacked where weights train.
//! LoRA training itself runs stacked in every LoRA test, pinned to peft in train_parity.rs and
//! hf_parity.rs.
//!
//! Tolerance: the stacked product is one BLAS call where there were three (or two), blocked differently,
//! so fp32 sums may round in another order: 1e-5 of the logits' largest (observed differences are printed).

mod common;

use common::*;
use ferrotune_trainer::load_model;
use ferrotune_trainer::model::Llama;
use tch::{Device, Kind, Tensor};

fn logits(model: &Llama, input: &Tensor) -> Tensor {
    let (b, t) = input.size2().unwrap();
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]);
    tch::no_grad(|| model.logits(&model.forward(input, &positions, None, None)))
}

/// The tiny model twice, frozen, as loaded (the caller stacks the second).
fn apart_and_stacked() -> (Llama, Llama) {
    let dir = fixture("tiny-llama");
    let apart = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let stacked = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    for m in [&apart, &stacked] {
        m.set_requires_grad(false);
    }
    (apart, stacked)
}

fn input(vocab: i64) -> Tensor {
    Tensor::from_slice(&ids(2 * 20, 0, vocab, 11)).reshape([2, 20])
}

#[test]
fn stacked_projections_compute_the_same_logits_and_keep_their_names() {
    let (apart, mut stacked) = apart_and_stacked();
    let ptr = |m: &Llama, name: &str| m.vs.variables()[name].data_ptr() as usize;
    let (q, k) = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight");
    stacked.stack_frozen_projections();
    // k's rows follow q's in one tensor: 4 heads of 16 by 64 inputs, fp32.
    assert_eq!(ptr(&stacked, k), ptr(&stacked, q) + 4 * 16 * 64 * 4, "k_proj's weight is not a view of the stack");
    let x = input(apart.config.vocab_size);
    let (a, s) = (logits(&apart, &x), logits(&stacked, &x));
    let diff = max_abs_diff(&a, &s) / max_abs(&a);
    println!("stacked vs apart: max |logits difference| = {diff:.2e} of the largest");
    assert!(diff < 1e-5, "{diff}");

    // A write through the VarStore's names (as loading, lora::merge and export do) reaches the stack.
    for m in [&apart, &stacked] {
        tch::no_grad(|| {
            for name in [k, "model.layers.0.mlp.up_proj.weight"] {
                let w = &m.vs.variables()[name];
                w.shallow_clone().copy_(&(w * 3.0 - 0.01));
            }
        });
    }
    let (a2, s2) = (logits(&apart, &x), logits(&stacked, &x));
    assert!(max_abs_diff(&a2, &a) > 1e-3, "the change must move the logits");
    let diff = max_abs_diff(&a2, &s2) / max_abs(&a2);
    assert!(diff < 1e-5, "a write through the names did not reach the stack: {diff}");
}

#[test]
fn trainable_weights_are_not_stacked() {
    let dir = fixture("tiny-llama");
    let mut model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    model.set_requires_grad(true);
    model.stack_frozen_projections();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let k = "model.layers.0.self_attn.k_proj.weight";
    let ptr = |name: &str| model.vs.variables()[name].data_ptr() as usize;
    assert_ne!(ptr(k), ptr(q) + 4 * 16 * 64 * 4, "trainable weights were moved into a stack");
    let x = input(model.config.vocab_size);
    let (b, t) = x.size2().unwrap();
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).repeat([b, 1]);
    model.logits(&model.forward(&x, &positions, None, None)).sum(Kind::Float).backward();
    for name in [q, k, "model.layers.0.mlp.gate_proj.weight"] {
        let g = model.vs.variables()[name].grad();
        assert!(g.defined() && max_abs(&g) > 0.0, "{name} got no gradient");
    }
}

#[test]
fn a_weight_given_new_storage_leaves_the_stack_instead_of_going_stale() {
    // What a dtype or device change through the VarStore does (tch's set_kind uses set_data): the
    // weight no longer views the stack's rows, and the forward must run the linears apart.
    let (apart, mut stacked) = apart_and_stacked();
    stacked.stack_frozen_projections();
    let name = "model.layers.2.mlp.gate_proj.weight";
    for m in [&apart, &stacked] {
        let mut w = m.vs.variables()[name].shallow_clone();
        let fresh = tch::no_grad(|| &w * 0.5 + 0.02);
        w.set_data(&fresh);
    }
    let x = input(apart.config.vocab_size);
    let (a, s) = (logits(&apart, &x), logits(&stacked, &x));
    let diff = max_abs_diff(&a, &s) / max_abs(&a);
    assert!(diff < 1e-5, "the stack computed with the weight it held before: {diff}");
}

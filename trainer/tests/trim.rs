//! A step over only the positions that can reach the loss (`batch::trimmed`: padding, untrained
//! documents and untrained tails left out, the rows laid end to end as one) against the same step over
//! every position of the rows (`batch::all_positions`, what the step computed before): the same loss and
//! gradients through the training loop's layer-wise step, for LoRA (tiny-llama, untied head) and full
//! fine-tuning (tiny-llama-bias: biases, tied embeddings, so the embedding's gradient sees every kept
//! position), fp32 and bf16, with and without activation checkpointing; and nothing trained at all.
//!
//! What is left out adds exact zeros, so only the order of sums differs: matrix products of another row
//! count (here 24 against 48) may run another BLAS blocking, and the weight gradients sum over fewer
//! rows. Tolerances as layerwise.rs states them for the same causes: fp32 2e-5 relative per gradient
//! tensor and 1e-6 on the loss; bf16 (8 significant bits) 1e-2 and 1e-3. LoRA dropout is 0 here: its
//! masks are drawn over the computed positions, so with dropout the two draw different masks.

mod common;

use common::*;
use ferrotune_data::loader::Batch;
use ferrotune_trainer::batch::{all_positions, trimmed, BatchTensors};
use ferrotune_trainer::layerwise::{Checkpointing, StepOptions};
use ferrotune_trainer::learner::Trainer;
use ferrotune_trainer::model::Attend;
use tch::{Device, Kind, Tensor};

/// Two rows of 24 tokens. Row 0: a document of 9 trained at offsets 2..=5 (an untrained tail of 3),
/// one of 6 trained nowhere, one of 6 trained at 1 and 4 (a tail of 1), padding of 3. Row 1: a document of 14
/// trained at 3..=12, then padding of 10. Labels are the document's next token.
fn host_batch(vocab: i64) -> Batch {
    let (rows, t) = (2usize, 24usize);
    let docs: [&[(usize, &[usize])]; 2] = [
        &[(9, &[2, 3, 4, 5]), (6, &[]), (6, &[1, 4]), (3, &[])],
        &[(14, &[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), (10, &[])],
    ];
    let ids = ids(rows * t, 0, vocab, 11);
    let (mut labels, mut position_ids, mut doc_ids) = (vec![], vec![], vec![]);
    for lens in docs {
        for (d, &(len, trained)) in lens.iter().enumerate() {
            for j in 0..len {
                let flat = labels.len();
                let next = if j + 1 < len { ids[flat + 1] } else { -100 };
                labels.push(if trained.contains(&j) { next } else { -100 });
                position_ids.push(j as i64);
                doc_ids.push(d as i64);
            }
        }
    }
    let trained_tokens = labels.iter().filter(|&&l| l != -100).count();
    Batch { rows, seq: t, ids, labels, position_ids, doc_ids, trained_tokens, row_indices: vec![0, 1], epoch: 0 }
}

/// The loss sum of one layer-wise micro-step and a copy of every trainable gradient, then zeroed.
fn step(trainer: &Trainer, b: &BatchTensors, denom: f64, checkpointing: Checkpointing) -> (f64, Vec<Tensor>) {
    let opts = StepOptions { checkpointing, loss_chunk: 5 };
    let sum = trainer.micro_step_layerwise(b, denom, &opts, &mut |_| Ok(())).unwrap();
    let grads = trainer.trainable.iter().map(|(_, p)| p.grad().detach().copy()).collect();
    for (_, p) in &trainer.trainable {
        let _ = p.grad().zero_();
    }
    (sum.double_value(&[]), grads)
}

fn compare(trainer: &Trainer, kind: Kind) {
    let host = host_batch(trainer.model.config.vocab_size);
    let (full, trim) = (all_positions(&host, Device::Cpu), all_positions(&trimmed(&host).unwrap(), Device::Cpu));
    assert_eq!(full.ids.size(), [2, 24]);
    // Row 0 keeps 6 + 5 (the untrained document, the tails and the padding go), row 1 keeps 13.
    assert_eq!(trim.ids.size(), [1, 6 + 5 + 13]);
    assert!(matches!(trim.attend, Attend::Spans(ref s) if s[0].len() == 3));
    assert_eq!((full.trained, trim.trained), (16, 16));
    let (loss_tol, grad_tol) = if kind == Kind::Float { (1e-6, 2e-5) } else { (1e-3, 1e-2) };
    for checkpointing in [Checkpointing::None, Checkpointing::Full] {
        let (ref_loss, ref_grads) = step(trainer, &full, 16.0, checkpointing);
        let (loss, grads) = step(trainer, &trim, 16.0, checkpointing);
        assert!(ref_grads.iter().all(|g| g.abs().max().double_value(&[]) > 0.0), "every tensor gets a gradient");
        let loss_diff = (loss - ref_loss).abs() / ref_loss.abs();
        let mut worst: f64 = 0.0;
        for ((name, _), (g, r)) in trainer.trainable.iter().zip(grads.iter().zip(&ref_grads)) {
            let d = relative_diff(g, r);
            assert!(d <= grad_tol, "{kind:?} {checkpointing:?}: {name} differs by {d:e} relative");
            worst = worst.max(d);
        }
        println!(
            "{kind:?} {checkpointing:?}: loss {loss:.7} vs {ref_loss:.7} ({loss_diff:.1e}), worst gradient {worst:.1e}"
        );
        assert!(loss_diff <= loss_tol, "{kind:?} {checkpointing:?}: loss {loss} vs {ref_loss}");
    }
}

#[test]
fn lora_trimmed_equals_every_position() {
    for kind in [Kind::Float, Kind::BFloat16] {
        compare(&tiny_lora_trainer(kind, 0.0), kind);
    }
}

#[test]
fn full_fine_tuning_trimmed_equals_every_position() {
    for kind in [Kind::Float, Kind::BFloat16] {
        compare(&tiny_full_trainer(kind), kind);
    }
}

/// Nothing trained: one position is computed, the loss is 0 and every gradient exists and is 0.
#[test]
fn nothing_trained_computes_one_position() {
    let trainer = tiny_full_trainer(Kind::Float);
    let mut host = host_batch(trainer.model.config.vocab_size);
    host.labels.iter_mut().for_each(|l| *l = -100);
    host.trained_tokens = 0;
    let b = all_positions(&trimmed(&host).unwrap(), Device::Cpu);
    assert_eq!((b.ids.size(), b.trained), (vec![1, 1], 0));
    let (loss, grads) = step(&trainer, &b, 1.0, Checkpointing::None);
    assert_eq!(loss, 0.0);
    for ((name, _), g) in trainer.trainable.iter().zip(&grads) {
        assert!(g.defined(), "{name} has no gradient");
        assert_eq!(g.abs().max().double_value(&[]), 0.0, "{name}");
    }
}

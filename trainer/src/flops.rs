//! The useful work of a training step, the numerator of MFU (model FLOPs utilization), counted the
//! way PaLM's appendix B and torchtitan count it, with attention's products included. Recomputation
//! (activation checkpointing) is not useful work and is not counted, nor are positions that cannot
//! reach the loss (padding, untrained tails: `batch::trimmed` leaves them out of the step, and a loop
//! that computes them, like the bench's transformers side, does work that this does not count). It measures nothing; the peak
//! that MFU divides by is `hardware::peak`.
//!
//! Per token of a step, with P_d the decoder's weight count, P_a the LoRA adapters' and C·V the head:
//! - matrix products of the decoder: 2·P_d forward; backward 4·P_d for full fine-tuning (gradients of
//!   activations and weights) and 2·P_d for LoRA (activations only, the base is frozen);
//! - LoRA adapters: 6·P_a (forward, and both gradients);
//! - lm_head, on trained positions only: 2·C·V forward, twice that backward for full fine-tuning, once
//!   for LoRA (tied embeddings included);
//! - attention: per layer 4·H·D FLOPs forward for every (query, key) pair a query may attend to, i.e.
//!   Σ over documents of n(n+1)/2 pairs (causal, within its own document); backward twice that, in
//!   both modes (gradients flow through attention to reach earlier layers).

use crate::config::LlamaConfig;
use crate::model::Attend;

/// FLOPs of one step: `tokens` positions computed (those of its rows that can reach the loss),
/// `trained` positions through the head, `pairs` attended (query, key) pairs (sum of [`Attend::pairs`]
/// over its micro-batches), `adapter_params` the LoRA parameters (None: full fine-tuning).
pub fn step_flops(c: &LlamaConfig, tokens: usize, trained: usize, pairs: f64, adapter_params: Option<usize>) -> f64 {
    let per_layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        + 3 * c.hidden_size * c.intermediate_size;
    let decoder = (per_layer * c.num_hidden_layers) as f64;
    let head = (c.vocab_size * c.hidden_size) as f64;
    let attention = 4.0 * (c.num_attention_heads * c.head_dim * c.num_hidden_layers) as f64 * pairs * 3.0;
    let (t, n) = (tokens as f64, trained as f64);
    match adapter_params {
        Some(a) => 4.0 * decoder * t + 6.0 * a as f64 * t + 4.0 * head * n + attention,
        None => 6.0 * decoder * t + 6.0 * head * n + attention,
    }
}

impl Attend {
    /// (query, key) pairs attended in `rows` rows of `t` tokens: n(n+1)/2 per document (per row when
    /// causal), or the allowed entries of an explicit mask.
    pub fn pairs(&self, rows: usize, t: usize) -> f64 {
        let tri = |n: f64| n * (n + 1.0) / 2.0;
        match self {
            Attend::Causal => rows as f64 * tri(t as f64),
            Attend::Spans(r) => r.iter().flatten().map(|&(_, n)| tri(n as f64)).sum(),
            Attend::Mask(m) => m.to_kind(tch::Kind::Float).sum(tch::Kind::Double).double_value(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Pairs by hand: a row of documents of 2, 3 and 1 tokens has 3 + 6 + 1 pairs; a causal row of 4,
    /// 10; the mask of documents 0 1 0 0 allows (0,0) (1,1) (2,0) (2,2) (3,0) (3,2) (3,3).
    #[test]
    fn attended_pairs_follow_the_documents() {
        let spans = Attend::packed(&[0, 0, 1, 1, 1, 2], 1, Device::Cpu);
        assert_eq!(spans.pairs(1, 6), 10.0);
        assert_eq!(Attend::Causal.pairs(2, 4), 20.0);
        assert_eq!(Attend::packed(&[0, 1, 0, 0], 1, Device::Cpu).pairs(1, 4), 7.0);
    }
}

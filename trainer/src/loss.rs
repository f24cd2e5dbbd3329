//! Masked next-token cross-entropy that projects only the trained positions through `lm_head`, never the
//! full (B, T, V) logits. Labels arrive already shifted (label at t is the token after t) and -100 where
//! nothing is trained. It returns the sum, so that the caller divides by the trained-token count of the
//! whole optimizer step; it does not know about accumulation or ranks.

use crate::model::Llama;
use tch::{Kind, Reduction, Tensor};

/// Flat indices (N,) into B*T of the labels that are trained (not -100), and the labels there (N,).
pub fn trained_positions(labels: &Tensor) -> (Tensor, Tensor) {
    let flat = labels.reshape([-1]);
    let idx = flat.ne(-100).nonzero().squeeze_dim(1); // (N,)
    let targets = flat.index_select(0, &idx);
    (idx, targets)
}

/// Sum over trained positions of -log p(label): hidden (B, T, C), idx and targets (N,).
pub fn masked_ce_sum(model: &Llama, hidden: &Tensor, idx: &Tensor, targets: &Tensor) -> Tensor {
    let c = hidden.size()[2];
    let picked = hidden.reshape([-1, c]).index_select(0, idx); // (N, C)
    let logits = model.logits(&picked).to_kind(Kind::Float); // (N, V)
    logits.cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, -100, 0.0)
}

//! Rotary position embeddings: the inverse frequencies for `default`, `linear` and `llama3` scaling,
//! computed in fp32 with the same operations, in the same order, as transformers'
//! `ROPE_INIT_FUNCTIONS`, the cos/sin tables for arbitrary (per-document) position ids, and the rotation
//! itself (on CPU ferrotune's fused kernel, `kernels::rope`; elsewhere transformers' composite). It does
//! not decide which positions a token gets; the data's packing does.

use crate::config::{RopeConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

/// Inverse frequencies, shape (D/2,), fp32.
pub fn inv_freq(rope: &RopeConfig, head_dim: i64, device: Device) -> Tensor {
    // 1 / theta^(arange(0, D, 2) / D), as transformers' `_compute_default_rope_parameters`.
    let exponent =
        Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / head_dim as f64;
    let inv = Tensor::pow_scalar(rope.theta, &exponent).reciprocal();
    match rope.scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv / factor,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            // transformers' `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short
            // ones kept, and the band between them interpolated.
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            // tch's `a.where_self(cond, b)` is torch.where(cond, a, b).
            let scaled = (&inv / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv);
            let smooth = (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium =
                wavelen.lt(high_freq_wavelen).logical_not().logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// cos and sin tables for `position_ids` (B, T): each (B, T, D) in `kind`, computed in fp32.
pub fn cos_sin(inv_freq: &Tensor, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * inv_freq; // (B, T, D/2)
    let emb = Tensor::cat(&[&freqs, &freqs], -1); // (B, T, D)
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// x * cos + rotate_half(x) * sin, for x (B, H, T, D) and cos/sin (B, T, D): the fused kernel where it
/// applies (bit for bit the composite's result), else [`composite`].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    crate::kernels::rope(x, cos, sin).unwrap_or_else(|| composite(x, cos, sin))
}

/// transformers' apply_rotary_pos_emb operation by operation, for x (B, H, T, D) and cos/sin (B, T, D).
pub fn composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    // Halves by one split, not two narrows: split's backward is one cat, where each narrow's backward
    // fills a zero tensor of x's size and copies its half in.
    let halves = x.chunk(2, 3);
    let (x1, x2) = (&halves[0], &halves[1]);
    let rotated = Tensor::cat(&[&x2.neg(), x1], 3);
    x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
}

//! Scaled dot-product attention of one call of the model's (a whole row, one document of a packed row,
//! or a masked batch), and which kernel computes it: libtorch's SDPA (flash attention and friends), or
//! on a CPU with bf16 matrix units, for a short document in bf16, `grouped`: the query heads that share
//! a key/value head stacked into one matrix product with it. Not the split of packed rows into
//! documents (`model::Attend`), rotary embeddings or caches.
//!
//! Why `grouped`: libtorch 2.13's CPU flash attention is slower in bf16 than in fp32 below a few
//! hundred queries (`CPU_BF16_ATTENTION_FROM`), so bf16 attention of short documents ran on fp32 copies,
//! which use the CPU's fp32 units. Two bf16 batched products (oneDNN's, on the bf16 units) with a
//! softmax between, each key/value head multiplied once by its group's queries stacked, compute the
//! causal square twice over (no causal skipping) and still took half the time. Measured on the AMD EPYC
//! (Zen 4, AVX-512 BF16), 2 threads, forward + backward of 9 query and 3 key/value heads of 64, the
//! same libtorch driven from Python: 6 documents of 170 tokens 8.1 ms against 18.0
//! for fp32 flash; lengths 60-400 10.6 against 21.9; 64-token documents 1.4x, 256 2.1x, 512 1.45x,
//! 1,024 1.3x, 2,048 0.75x. Its cost: autograd keeps the probabilities, e·H·n bytes a token of an
//! n-token document, where flash keeps its output and log-sum-exp, e·Q + 4·H (so only short documents,
//! and `memory.rs` counts them); its rounding is transformers' eager attention in bf16 (bf16 scores,
//! softmax in fp32 rounded to bf16), the oracle the parity test compares with (equal to the bit on its
//! model, D = 16, on the CPUs it ran on; where 1/√D is not a power of two, eager rounds the product and
//! then the scaled score, this once).

use crate::kernels::{applies, Kernel};
use tch::{Device, Kind, Tensor};

/// On CPU, bf16 attention over fewer queries than this is short: `grouped` where the CPU has bf16
/// units, else fp32 flash attention on fp32 copies (output cast back). libtorch 2.13's CPU flash kernel
/// is slower in bf16 than in fp32 for short sequences. Measured on a 2-core Xeon with AMX, forward and
/// backward, 9 query and 3 key/value heads of 64: 64 tokens 2.5 ms bf16 vs 0.6 ms fp32, 128: 4.9 vs
/// 1.5, 256: 7.2 vs 4.9, 512: 20.4 vs 20.9, 1024: 47 vs 61. Packed rows of conversations are mostly
/// short documents.
pub const CPU_BF16_ATTENTION_FROM: i64 = 512;

/// Which kernel attends `n` queries in `kind` on `device` (without a mask: with one, always SDPA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// libtorch's SDPA in the compute dtype.
    Sdpa,
    /// libtorch's SDPA on fp32 copies: short bf16 documents on a CPU without bf16 units (or with the
    /// grouped attention left out through `FERROTUNE_COMPOSITE=attention`).
    SdpaFp32,
    /// `grouped`.
    Grouped,
}

impl Path {
    pub fn of(n: i64, kind: Kind, device: Device) -> Path {
        if kind != Kind::BFloat16 || device != Device::Cpu || n >= CPU_BF16_ATTENTION_FROM {
            Path::Sdpa
        } else if applies(Kernel::Attention, device, kind) {
            Path::Grouped
        } else {
            Path::SdpaFp32
        }
    }
}

/// Attention of q (B, H, T, D) over key and value (B, K, S, D), K dividing H: causal (query i sees keys
/// up to i) without `mask`, else where the boolean `mask` (B or 1, 1, T, S) is true. -> (B, H, T, D).
pub fn attend(q: &Tensor, key: &Tensor, value: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
    let gqa = q.size()[1] != key.size()[1];
    let (n, s) = (q.size()[2], key.size()[2]);
    let path = if mask.is_some() { Path::Sdpa } else { Path::of(n, q.kind(), q.device()) };
    match path {
        // Grouped's causal square needs as many keys as queries (a cache attends through a mask).
        Path::Grouped if n == s => grouped(q, key, value, scale),
        Path::Grouped | Path::SdpaFp32 => {
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            Tensor::scaled_dot_product_attention(&f(q), &f(key), &f(value), None::<&Tensor>, 0.0, true, scale, gqa)
                .to_kind(q.kind())
        }
        Path::Sdpa => Tensor::scaled_dot_product_attention(q, key, value, mask, 0.0, mask.is_none(), scale, gqa),
    }
}

/// Causal attention of q (B, H, T, D) over key and value (B, K, T, D) as two batched products in the
/// inputs' dtype: query head h reads key/value head h / (H / K), as transformers' `repeat_kv` pairs
/// them, so each key/value head's g = H / K query heads stack into one (g·T, D) matrix. Scores are
/// scaled and masked in one `baddbmm`, softmax runs in fp32 inside libtorch's kernel and rounds to the
/// inputs' dtype. -> (B, H, T, D).
pub fn grouped(q: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Tensor {
    let (b, h, t, d) = q.size4().expect("q must be (B, H, T, D)");
    let k = key.size()[1];
    let g = h / k;
    let opts = (q.kind(), q.device());
    let q = q.reshape([b * k, g * t, d]); // (B·K, g·T, D), a copy for the usual transposed q
    let key = key.reshape([b * k, t, d]); // (B·K, T, D)
    let value = value.reshape([b * k, t, d]); // (B·K, T, D)

    // 0 where query i (of each stacked head) may see key j <= i, -inf above the diagonal. (g·T, T)
    let bias = Tensor::full([t, t], f64::NEG_INFINITY, opts).triu(1).repeat([g, 1]);
    let scores = bias.baddbmm(&q, &key.transpose(1, 2), 1.0, scale); // (B·K, g·T, T)
    let probs = scores.softmax(-1, q.kind());
    probs.bmm(&value).view([b, h, t, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouped products compute what libtorch's SDPA computes: in fp64, to rounding; and they
    /// pass gradients to q, k and v as it does.
    #[test]
    fn grouped_equals_sdpa_causal_with_grouped_heads() {
        tch::manual_seed(0);
        for (b, h, k, t) in [(1, 9, 3, 17), (2, 4, 4, 5), (1, 6, 1, 1), (2, 8, 2, 33)] {
            let opts = (Kind::Double, Device::Cpu);
            let q = Tensor::randn([b, h, t, 8], opts).set_requires_grad(true);
            let key = Tensor::randn([b, k, t, 8], opts).set_requires_grad(true);
            let value = Tensor::randn([b, k, t, 8], opts).set_requires_grad(true);
            let go = Tensor::randn([b, h, t, 8], opts);
            let run = |f: &dyn Fn() -> Tensor| {
                for x in [&q, &key, &value] {
                    let mut x = x.shallow_clone();
                    x.zero_grad();
                }
                let y = f();
                (&y * &go).sum(Kind::Double).backward();
                (y.detach(), [&q, &key, &value].map(|x| x.grad().copy()))
            };
            let (y1, g1) = run(&|| grouped(&q, &key, &value, 0.3));
            let (y2, g2) = run(&|| {
                Tensor::scaled_dot_product_attention(&q, &key, &value, None::<&Tensor>, 0.0, true, 0.3, h != k)
            });
            let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            assert!(diff(&y1, &y2) < 1e-12, "{b} {h} {k} {t}: output {}", diff(&y1, &y2));
            for (a, b2) in g1.iter().zip(&g2) {
                assert!(diff(a, b2) < 1e-12, "{b} {h} {k} {t}: gradient {}", diff(a, b2));
            }
        }
    }

    /// q laid out as the model's projections leave it ((B, T, H, D) seen as (B, H, T, D)) and a
    /// document cut from a longer row by `split`: the same as from contiguous copies.
    #[test]
    fn grouped_takes_strided_views() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let q = Tensor::randn([1, 12, 6, 4], opts).transpose(1, 2); // (1, 6, 12, 4) as (B, H, T, D)
        let kv = Tensor::randn([1, 12, 2, 4], opts).transpose(1, 2); // (1, 2, 12, 4)
        let (qs, ks) = (q.split_with_sizes([5, 7], 2), kv.split_with_sizes([5, 7], 2));
        let y = grouped(&qs[1], &ks[1], &ks[1], 0.5);
        let z = grouped(&qs[1].contiguous(), &ks[1].contiguous(), &ks[1].contiguous(), 0.5);
        assert!((y - z).abs().max().double_value(&[]) < 1e-6);
    }
}

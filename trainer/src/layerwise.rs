//! The training step's forward and backward, driven stage by stage from Rust (DESIGN.md §8): tch has
//! no autograd hooks, so the step itself is the hook. The model is a chain of stages
//!
//! ```text
//!   embed ─► layer 0 ─► … ─► layer L-1 ─► norm + chunked loss
//! ```
//!
//! each run on a *detached* input. Forward keeps per layer either its graph (`Checkpointing::None`) or
//! only its input (`Full`: run under `no_grad`, recomputed in backward; `Every(k)`: every k-th layer). Backward goes top down: the
//! loss stage leaves `x_L.grad`; for each layer below, the vector-Jacobian product
//! `(out * grad_out).sum().backward()` accumulates that layer's parameter gradients and leaves the
//! input's `.grad` for the layer below. After each stage's backward its gradients are final, and
//! `on_done(stage)` is called: that is where the trainer starts their all-reduce while the stages
//! below are still in backward.
//!
//! The loss stage projects the trained positions through `lm_head` in chunks of at most `loss_chunk`
//! positions, each chunk's backward run before the next chunk's logits exist, so the (N, V) logits
//! never exist at once. Everything here computes what `Trainer::micro_step` (one whole graph)
//! computes; tests/layerwise.rs holds the two to 1e-6. This file knows nothing of ranks, buckets or the
//! optimizer.
//!
//! Shapes: B rows, T tokens, C hidden, N trained positions, V vocabulary.

use crate::batch::BatchTensors;
use crate::error::Result;
use crate::loss;
use crate::model::Llama;
use tch::{Kind, Tensor};

/// What the forward pass keeps of each decoder layer for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// The layer's autograd graph (every saved activation).
    None,
    /// Only the layer's input (B, T, C); the layer runs again in backward.
    Full,
    /// Layers 0, k, 2k, … as `Full`, the others as `None` (torchtitan's selective per-layer mode):
    /// 1/k of the recompute for 1/k of the savings.
    Every(usize),
}

impl Checkpointing {
    /// `none`, `full`, or `selective` (with `every`, k >= 1).
    pub fn parse(s: &str, every: usize) -> Option<Self> {
        match s {
            "none" => Some(Checkpointing::None),
            "full" => Some(Checkpointing::Full),
            "selective" if every >= 1 => Some(Checkpointing::Every(every)),
            _ => None,
        }
    }

    /// Whether layer `i` is recomputed in backward.
    pub fn recomputes(self, i: usize) -> bool {
        match self {
            Checkpointing::None => false,
            Checkpointing::Full => true,
            Checkpointing::Every(k) => i.is_multiple_of(k),
        }
    }

    /// How many of `layers` layers are recomputed.
    pub fn recomputed(self, layers: usize) -> usize {
        (0..layers).filter(|&i| self.recomputes(i)).count()
    }
}

/// A stage of the chain, named for the parameters whose gradients it makes final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Final norm and `lm_head` (first in backward).
    Head,
    /// Decoder layer i.
    Layer(usize),
    /// Token embeddings (last in backward; with tied embeddings `lm_head`'s gradient lands here too).
    Embed,
}

impl Stage {
    /// The stage a parameter belongs to, from its Hugging Face (or peft) name.
    pub fn of(name: &str) -> Stage {
        if let Some(rest) = name.split("model.layers.").nth(1) {
            if let Some(i) = rest.split('.').next().and_then(|n| n.parse().ok()) {
                return Stage::Layer(i);
            }
        }
        if name.contains("embed_tokens") {
            Stage::Embed
        } else {
            Stage::Head
        }
    }

    /// Position in backward order: Head, Layer(L-1), …, Layer(0), Embed.
    pub fn backward_rank(self, layers: usize) -> usize {
        match self {
            Stage::Head => 0,
            Stage::Layer(i) => layers - i,
            Stage::Embed => layers + 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    pub checkpointing: Checkpointing,
    /// Most trained positions projected through `lm_head` at once (>= 1).
    pub loss_chunk: usize,
}

/// Default `loss_chunk`: fp32 logits of one chunk near 256 MiB (523 positions for Llama 3's 128,256
/// ids, 1,365 for SmolLM2's 49,152).
pub fn default_loss_chunk(vocab: i64) -> usize {
    ((256usize << 20) / (4 * vocab.max(1) as usize)).max(1)
}

/// `train.loss_chunk_tokens` resolved for a vocabulary of `vocab` ids (0: the default).
pub fn loss_chunk_for(configured: usize, vocab: i64) -> usize {
    match configured {
        0 => default_loss_chunk(vocab),
        n => n,
    }
}

/// One layer's output, kept for backward; with checkpointing only `input` survives the forward.
struct Kept {
    input: Tensor,
    output: Option<Tensor>,
}

/// Forward and backward of one micro-batch, the loss divided by `denom` (the trained tokens of the
/// whole optimizer step). Returns the detached sum of the micro-batch's token losses. `on_done(stage)`
/// runs after each stage's backward, top stage first.
pub fn forward_backward(
    model: &Llama,
    b: &BatchTensors,
    denom: f64,
    opts: &StepOptions,
    on_done: &mut dyn FnMut(Stage) -> Result<()>,
) -> Result<Tensor> {
    let n_layers = model.layers.len();
    let embed_trains = model.embed_tokens.requires_grad();
    let rope = tch::no_grad(|| model.rotary(&b.positions)); // (B, T, D) each, no parameters

    // Forward, bottom up.
    let embedded = model.embed(&b.ids); // (B, T, C); a graph only when embeddings train
    let mut x = embedded.detach();
    let mut kept: Vec<Kept> = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        // Layer 0's input needs a gradient only to reach trainable embeddings.
        let wants_grad = i > 0 || embed_trains;
        let out = match opts.checkpointing.recomputes(i) {
            false => {
                let input = if wants_grad { x.detach().set_requires_grad(true) } else { x.detach() };
                let out = model.layer(i, &input, &rope, &b.attend);
                kept.push(Kept { input, output: Some(out.shallow_clone()) });
                out
            }
            true => {
                let out = tch::no_grad(|| model.layer(i, &x, &rope, &b.attend));
                kept.push(Kept { input: x, output: None });
                out
            }
        };
        x = out.detach();
    }

    // Loss stage: final norm, then the trained positions in chunks.
    let top = x.set_requires_grad(true); // (B, T, C)
    let normed = model.norm.forward(&top);
    let picked_from = normed.detach().set_requires_grad(true); // (B, T, C)
    let mut loss_sum = Tensor::zeros([], (Kind::Float, top.device()));
    let chunk = opts.loss_chunk.max(1) as i64;
    let n = b.trained as i64;
    let mut at = 0;
    // At least one pass, even over no position: its zero loss still gives `lm_head` a (zero) gradient.
    loop {
        let len = chunk.min(n - at);
        let (idx, targets) = (b.idx.narrow(0, at, len), b.targets.narrow(0, at, len));
        let sum = loss::masked_ce_sum(model, &picked_from, &idx, &targets); // (len, V) logits inside
        (&sum / denom).backward();
        loss_sum += sum.detach();
        at += len;
        if at >= n {
            break;
        }
    }
    vjp(&normed, &grad_or_zeros(&picked_from));
    on_done(Stage::Head)?;

    // Backward, top down.
    let mut grad = grad_or_zeros(&top); // d loss / d x_L, (B, T, C)
    for i in (0..n_layers).rev() {
        let wants_grad = i > 0 || embed_trains;
        let Kept { input, output } = kept.pop().expect("one kept entry per layer");
        let (input, out) = match output {
            Some(out) => (input, out),
            None => {
                // Recompute: the same input, tables and documents, and LoRA dropout masks that are a
                // function of (key, adapter) alone, so the layer computes exactly what the forward did.
                let input = if wants_grad { input.set_requires_grad(true) } else { input };
                let out = model.layer(i, &input, &rope, &b.attend);
                (input, out)
            }
        };
        vjp(&out, &grad);
        drop(out); // frees this layer's graph before the next layer's recompute
        on_done(Stage::Layer(i))?;
        if wants_grad {
            grad = grad_or_zeros(&input);
        }
    }
    if embed_trains {
        vjp(&embedded, &grad);
    }
    on_done(Stage::Embed)?;
    Ok(loss_sum)
}

/// Backpropagates `grad` (same shape as `out`) through `out`'s graph: the vector-Jacobian product.
/// The gradient of `sum(out * g)` with respect to `out` is `g` exactly, in any dtype.
fn vjp(out: &Tensor, grad: &Tensor) {
    if out.requires_grad() {
        (out * grad).sum(out.kind()).backward();
    }
}

/// `t.grad`, or zeros when nothing flowed into `t` (a micro-batch without trained positions still
/// backpropagates, so that every parameter gets a gradient, zero, as the whole-graph path gives).
fn grad_or_zeros(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g.detach()
    } else {
        t.zeros_like()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_map_to_their_stages_in_backward_order() {
        assert_eq!(Stage::of("model.layers.12.mlp.up_proj.weight"), Stage::Layer(12));
        assert_eq!(Stage::of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), Stage::Layer(3));
        assert_eq!(Stage::of("model.embed_tokens.weight"), Stage::Embed);
        assert_eq!(Stage::of("model.norm.weight"), Stage::Head);
        assert_eq!(Stage::of("lm_head.weight"), Stage::Head);
        let order: Vec<usize> =
            [Stage::Head, Stage::Layer(2), Stage::Layer(0), Stage::Embed].iter().map(|s| s.backward_rank(3)).collect();
        assert_eq!(order, [0, 1, 3, 4]);
        assert_eq!(default_loss_chunk(128_256), 523);
        assert_eq!(default_loss_chunk(49_152), 1365);
    }
}

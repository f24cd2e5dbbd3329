//! The Llama decoder in tch, with Hugging Face parameter names verbatim (`model.layers.{i}.self_attn.q_proj.weight`
//! in the checkpoint is the same path here), so loading is a name lookup and needs no conversion script.
//! The forward pass takes packed rows (per-document position ids and document ids, attention
//! block-diagonal causal) and an optional KV cache, and returns hidden states; `logits` projects only
//! the positions a caller selects through `lm_head`. It knows nothing of ranks, data or optimizers.
//!
//! Shapes: B batch rows, T new tokens, S attended keys (cache + new), C hidden size, H attention heads,
//! K key/value heads, D head dim, F MLP width, V vocabulary, N selected positions.

// For tch tensors `a += b` is the in-place `add_`, which breaks autograd when `a` was saved for
// backward; `a = a + b` allocates a new tensor, which is what the math needs.
#![allow(clippy::assign_op_pattern)]

use crate::config::LlamaConfig;
use crate::rope;
use tch::nn::{Path, VarStore};
use tch::{Device, Kind, Tensor};

/// `weight` (out, in) and optional `bias` (out,), as `torch.nn.Linear`, with an optional LoRA adapter.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<crate::lora::LoraLinear>,
}

impl Linear {
    fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool, kind: Kind) -> Self {
        let weight = p.add("weight", Tensor::zeros([out_dim, in_dim], (kind, p.device())), false);
        let bias = bias.then(|| p.add("bias", Tensor::zeros([out_dim], (kind, p.device())), false));
        Linear { weight, bias, lora: None }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.adapt(&x.linear(&self.weight, self.bias.as_ref()), x)
    }

    /// The layer's output from its base product `y` = x W^T (+ b), computed elsewhere: y plus the
    /// adapter's delta of `x`, or y itself.
    fn adapt(&self, y: &Tensor, x: &Tensor) -> Tensor {
        match &self.lora {
            Some(lora) => lora.add_to(y, x),
            None => y.shallow_clone(),
        }
    }
}

/// Frozen linears that read one input, their weights rows of one (sum of outs, in) tensor so that one
/// product computes all their base outputs: a bigger matrix product runs nearer the machine's peak, and
/// backward sums their input gradients inside it. Fine-tuning with LoRA stacks q, k, v and gate, up
/// (`Llama::stack_frozen_projections`): on the Zen 4 EPYC in bf16, 1,024 tokens, fwd + input gradient
/// of q, k and v 7.8-8.9 ms apart against 5.7-6.1 stacked, gate and up 20.1-21.9 against 17.8-18.9.
/// Each linear's `weight` stays its own tensor (for names, export and merging) viewing its rows.
pub struct Stacked {
    weight: Tensor, // (sum of outs, in)
    outs: Vec<i64>,
}

impl Stacked {
    /// Stacks `parts` (moving their weights into the stack) if none has a bias or a weight requiring
    /// gradients, all of one input width, dtype and device; None (nothing moved) otherwise.
    fn of(parts: &mut [&mut Linear]) -> Option<Stacked> {
        let first = &parts.first()?.weight;
        let (kind, device, width) = (first.kind(), first.device(), first.size()[1]);
        let ok = |l: &&mut Linear| {
            l.bias.is_none()
                && !l.weight.requires_grad()
                && (l.weight.kind(), l.weight.device(), l.weight.size()[1]) == (kind, device, width)
        };
        if !parts.iter().all(ok) {
            return None;
        }
        let weight = Tensor::cat(&parts.iter().map(|l| l.weight.shallow_clone()).collect::<Vec<_>>(), 0);
        let outs: Vec<i64> = parts.iter().map(|l| l.weight.size()[0]).collect();
        let mut start = 0;
        for (l, &n) in parts.iter_mut().zip(&outs) {
            // set_data swaps the storage under the tensor the VarStore also holds (one TensorImpl).
            l.weight.set_data(&weight.narrow(0, start, n));
            start += n;
        }
        Some(Stacked { weight, outs })
    }

    /// The parts' outputs for x (..., in), each (..., out_i) with its adapter; None when a part's weight
    /// has come to require gradients since (the stack would not pass them on) or is no longer the
    /// stack's rows (something gave it new storage, e.g. a dtype or device change: the stack would
    /// compute with stale weights). Then the caller runs the linears apart.
    fn forward(&self, parts: &[&Linear], x: &Tensor) -> Option<Vec<Tensor>> {
        let row = self.weight.size()[1] * self.weight.kind().elt_size_in_bytes() as i64;
        let mut at = self.weight.data_ptr() as i64;
        for (l, &n) in parts.iter().zip(&self.outs) {
            if l.weight.requires_grad() || l.weight.data_ptr() as i64 != at || l.weight.kind() != self.weight.kind() {
                return None;
            }
            at += n * row;
        }
        // (..., out_i) each. A part without an adapter gets its own copy: a view would keep the whole
        // stacked output alive wherever autograd saves it (v for attention, up for SiLU's product), which
        // memory.rs does not count.
        let ys = x.linear::<Tensor>(&self.weight, None).split_with_sizes(&self.outs, -1);
        Some(
            parts.iter().zip(&ys).map(|(l, y)| if l.lora.is_some() { l.adapt(y, x) } else { y.contiguous() }).collect(),
        )
    }
}

/// Root-mean-square norm, computed in fp32 and cast back before the weight, as transformers does: on CPU
/// in fp32 and bf16 by ferrotune's fused kernel (`kernels::rms_norm`, the same roundings), elsewhere as
/// the composite of libtorch operations ([`RmsNorm::composite`]).
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm of width `dim` under `p`, weights of ones (loading fills them).
    pub fn new(p: &Path, dim: i64, eps: f64, kind: Kind) -> Self {
        RmsNorm { weight: p.add("weight", Tensor::ones([dim], (kind, p.device())), false), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::kernels::rms_norm(x, &self.weight, self.eps).unwrap_or_else(|| self.composite(x))
    }

    /// transformers' LlamaRMSNorm operation by operation: w * T(x32 * rsqrt(mean(x32^2) + eps)).
    pub fn composite(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let var = x32.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (x32 * (var + self.eps).rsqrt()).to_kind(kind)
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// q, k and v stacked, when frozen (`Llama::stack_frozen_projections`).
    qkv: Option<Stacked>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate and up stacked, when frozen.
    gate_up: Option<Stacked>,
}

pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

/// Keys and values of earlier tokens, per layer, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    /// Per layer: keys and values, each (B, K, S, D).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Document id of every cached key, (B, S).
    doc_ids: Option<Tensor>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.doc_ids.as_ref().map_or(0, |d| d.size()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Owns every parameter under its Hugging Face name.
    pub vs: VarStore,
    pub embed_tokens: Tensor, // (V, C)
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// (V, C); the same tensor as `embed_tokens` when embeddings are tied.
    pub lm_head: Tensor,
    inv_freq: Tensor, // (D/2,) fp32
    kind: Kind,
}

impl Llama {
    /// Allocates the architecture with placeholder values in `kind` on `device`; fill it with
    /// `weights::load` before use.
    pub fn new(config: LlamaConfig, kind: Kind, device: Device) -> Self {
        let vs = VarStore::new(device);
        let root = vs.root();
        let m = &root / "model";
        let c = &config;
        let embed_tokens =
            (&m / "embed_tokens").add("weight", Tensor::zeros([c.vocab_size, c.hidden_size], (kind, device)), false);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = &m / "layers" / i;
                let a = &p / "self_attn";
                let (h, k, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
                let ab = c.attention_bias;
                let mp = &p / "mlp";
                DecoderLayer {
                    self_attn: Attention {
                        q_proj: Linear::new(&(&a / "q_proj"), c.hidden_size, h * d, ab, kind),
                        k_proj: Linear::new(&(&a / "k_proj"), c.hidden_size, k * d, ab, kind),
                        v_proj: Linear::new(&(&a / "v_proj"), c.hidden_size, k * d, ab, kind),
                        o_proj: Linear::new(&(&a / "o_proj"), h * d, c.hidden_size, ab, kind),
                        qkv: None,
                        n_heads: h,
                        n_kv_heads: k,
                        head_dim: d,
                    },
                    mlp: Mlp {
                        gate_proj: Linear::new(
                            &(&mp / "gate_proj"),
                            c.hidden_size,
                            c.intermediate_size,
                            c.mlp_bias,
                            kind,
                        ),
                        up_proj: Linear::new(&(&mp / "up_proj"), c.hidden_size, c.intermediate_size, c.mlp_bias, kind),
                        down_proj: Linear::new(
                            &(&mp / "down_proj"),
                            c.intermediate_size,
                            c.hidden_size,
                            c.mlp_bias,
                            kind,
                        ),
                        gate_up: None,
                    },
                    input_layernorm: RmsNorm::new(&(&p / "input_layernorm"), c.hidden_size, c.rms_norm_eps, kind),
                    post_attention_layernorm: RmsNorm::new(
                        &(&p / "post_attention_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                        kind,
                    ),
                }
            })
            .collect();
        let norm = RmsNorm::new(&(&m / "norm"), c.hidden_size, c.rms_norm_eps, kind);
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            (&root / "lm_head").add("weight", Tensor::zeros([c.vocab_size, c.hidden_size], (kind, device)), false)
        };
        let inv_freq = rope::inv_freq(&c.rope, c.head_dim, device);
        Llama { config, vs, embed_tokens, layers, norm, lm_head, inv_freq, kind }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Every parameter with its Hugging Face name, in checkpoint order (embeddings, layers 0.., norm,
    /// lm_head). Tied `lm_head.weight` is not listed: it is `model.embed_tokens.weight`.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        all.sort_by_key(|(name, _)| checkpoint_order(name));
        all
    }

    /// Every linear layer with its Hugging Face module path (`model.layers.3.mlp.up_proj`) and short
    /// name (`up_proj`), for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &'static str, &mut Linear)> {
        let mut out = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), "q_proj", &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), "k_proj", &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), "v_proj", &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), "o_proj", &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), "gate_proj", &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), "up_proj", &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), "down_proj", &mut m.down_proj));
        }
        out
    }

    /// Stacks each layer's frozen q, k, v and its gate, up projections (`Stacked`), once their weights
    /// are loaded and frozen (LoRA fine-tuning); layers whose weights train or have biases stay apart,
    /// and all of them under `FERROTUNE_COMPOSITE=stack`.
    pub fn stack_frozen_projections(&mut self) {
        if !crate::kernels::enabled(crate::kernels::Kernel::Stack) {
            return;
        }
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            a.qkv = a.qkv.take().or_else(|| Stacked::of(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]));
            m.gate_up = m.gate_up.take().or_else(|| Stacked::of(&mut [&mut m.gate_proj, &mut m.up_proj]));
        }
    }

    /// Makes every parameter require gradients (full fine-tuning) or none (inference, frozen base).
    pub fn set_requires_grad(&self, on: bool) {
        for (_, t) in self.vs.variables() {
            let _ = t.set_requires_grad(on);
        }
    }

    /// Hidden states after the final norm, (B, T, C).
    ///
    /// `input_ids` and `position_ids` are (B, T) int64. `doc_ids` (B, T) marks which document each token
    /// belongs to in a packed row: a token attends only to earlier tokens of its own document. `None`
    /// means one document per row (plain causal attention). With `cache`, the new tokens also attend to
    /// the cached ones of their document, and are appended to it. Without a cache, `doc_ids` is read
    /// back to the host to find the documents; callers that hold the ids on the host (training,
    /// evaluation) build an [`Attend`] there and call [`Llama::forward_packed`] instead.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        doc_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids must be (B, T)");
        let Some(cache) = cache else {
            let attend = match doc_ids {
                None => Attend::Causal,
                Some(d) => {
                    let ids = Vec::<i64>::try_from(d.to_device(Device::Cpu).reshape([-1]))
                        .expect("doc_ids must be (B, T) int64");
                    Attend::packed(&ids, b as usize, d.device())
                }
            };
            return self.run(input_ids, position_ids, &attend, None);
        };
        let past = cache.len();
        let new_docs = match doc_ids {
            Some(d) => d.shallow_clone(),
            None => Tensor::zeros([b, t], (Kind::Int64, input_ids.device())),
        };
        let all_docs = match &cache.doc_ids {
            Some(prev) => Tensor::cat(&[prev, &new_docs], 1),
            None => new_docs.shallow_clone(),
        };
        let mask = block_causal_mask(&new_docs, &all_docs, past);
        cache.doc_ids = Some(all_docs);
        cache.layers.resize_with(self.layers.len(), || None);
        self.run(input_ids, position_ids, &Attend::Mask(mask), Some(cache))
    }

    /// Hidden states (B, T, C) of packed rows whose documents `attend` describes (no cache).
    pub fn forward_packed(&self, input_ids: &Tensor, position_ids: &Tensor, attend: &Attend) -> Tensor {
        self.run(input_ids, position_ids, attend, None)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attend: &Attend,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut x = self.embed(input_ids);
        let (cos, sin) = self.rotary(position_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &cos, &sin, attend, slot);
        }
        self.norm.forward(&x)
    }

    /// The first stage: token embeddings (B, T, C) of `input_ids` (B, T).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Rotary tables (cos, sin), each (B, T, D), for `position_ids` (B, T); every layer of a forward
    /// pass uses the same ones. They depend on no parameter.
    pub fn rotary(&self, position_ids: &Tensor) -> (Tensor, Tensor) {
        rope::cos_sin(&self.inv_freq, position_ids, self.kind)
    }

    /// Decoder layer `i` on its own (a stage of the layer-wise training step): x (B, T, C) -> (B, T, C),
    /// with the tables of [`Llama::rotary`].
    pub fn layer(&self, i: usize, x: &Tensor, rope: &(Tensor, Tensor), attend: &Attend) -> Tensor {
        self.layers[i].forward(x, &rope.0, &rope.1, attend, None)
    }

    /// Projects hidden states (..., C) through `lm_head` to logits (..., V). Callers pass only the
    /// positions they need (the trained ones, or the last one when generating).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.lm_head, None)
    }
}

impl DecoderLayer {
    /// x (B, T, C) -> (B, T, C): pre-norm attention and MLP, each added to the residual stream.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: &Attend,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, attend, cache);
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x));
        x + h
    }
}

impl Attention {
    /// x (B, T, C) -> (B, T, C).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: &Attend,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("x must be (B, T, C)");
        let (h, k, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let qkv = self.qkv.as_ref().and_then(|s| s.forward(&parts, x));
        let [q, key, value] =
            qkv.map_or_else(|| parts.map(|l| l.forward(x)), |v| [0, 1, 2].map(|i| v[i].shallow_clone()));
        let q = q.view([b, t, h, d]).transpose(1, 2); // (B, H, T, D)
        let key = key.view([b, t, k, d]).transpose(1, 2); // (B, K, T, D)
        let value = value.view([b, t, k, d]).transpose(1, 2); // (B, K, T, D)
        let q = rope::apply(&q, cos, sin);
        let key = rope::apply(&key, cos, sin);
        let (key, value) = match cache {
            Some(slot) => {
                let (key, value) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[pk, key], 2), Tensor::cat(&[pv, value], 2)), // (B, K, S, D)
                    None => (key, value),
                };
                *slot = Some((key.shallow_clone(), value.shallow_clone()));
                (key, value)
            }
            None => (key, value),
        };
        let scale = (d as f64).powf(-0.5);
        let sdpa =
            |q: &Tensor, key: &Tensor, value: &Tensor, mask| crate::attention::attend(q, key, value, mask, scale);
        let y = match attend {
            Attend::Causal => sdpa(&q, &key, &value, None), // (B, H, T, D)
            Attend::Mask(mask) => sdpa(&q, &key, &value, Some(mask)),
            Attend::Spans(rows) => {
                // Rows and documents by one split per tensor, not a narrow each: split's backward is
                // one cat, where each narrow's backward fills a zero tensor of the whole size.
                let (qs, ks, vs) = (q.split(1, 0), key.split(1, 0), value.split(1, 0)); // (1, ., T, D) each
                let rows: Vec<Tensor> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, spans)| {
                        let lens: Vec<i64> = spans.iter().map(|&(_, n)| n).collect(); // sum to T
                        let (q, key, value) = (
                            qs[i].split_with_sizes(&lens, 2),
                            ks[i].split_with_sizes(&lens, 2),
                            vs[i].split_with_sizes(&lens, 2),
                        );
                        let docs: Vec<Tensor> =
                            (0..lens.len()).map(|j| sdpa(&q[j], &key[j], &value[j], None)).collect(); // (1, H, n, D) each
                        Tensor::cat(&docs, 2)
                    })
                    .collect();
                Tensor::cat(&rows, 0)
            }
        };
        self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, h * d]))
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        // gate and up (B, T, F); silu(gate) * up: on CPU in fp32 one fused kernel that saves gate and up
        // only (kernels::swiglu).
        let parts = [&self.gate_proj, &self.up_proj];
        let (gate, up) = match self.gate_up.as_ref().and_then(|s| s.forward(&parts, x)) {
            Some(v) => (v[0].shallow_clone(), v[1].shallow_clone()),
            None => (self.gate_proj.forward(x), self.up_proj.forward(x)),
        };
        let h = crate::kernels::swiglu(&gate, &up).unwrap_or_else(|| gate.silu() * up);
        self.down_proj.forward(&h)
    }
}

pub use crate::attention::CPU_BF16_ATTENTION_FROM;

/// Which keys each query may attend to, decided once per forward pass for every layer.
pub enum Attend {
    /// One document per row: plain causal attention, which lets libtorch pick its fused kernels.
    Causal,
    /// Packed rows without a cache: each row's documents as (start, length) spans, each attended
    /// causally on its own. This computes exactly what the block-diagonal mask allows, without the
    /// (B, H, T, T) masked work: a 1024-token row of 3 documents takes a third of the time per layer.
    Spans(Vec<Vec<(i64, i64)>>),
    /// An explicit boolean mask (B, 1, T, S): generation over a cache, or document ids that are not
    /// contiguous runs.
    Mask(Tensor),
}

impl Attend {
    /// From the document id of every token of `rows` packed rows (row-major, on the host): the runs of
    /// equal ids as spans; plain causal when every row is one document; a block-diagonal mask on
    /// `device` when an id comes back after another (not a packed row).
    pub fn packed(doc_ids: &[i64], rows: usize, device: Device) -> Attend {
        let t = doc_ids.len() / rows.max(1);
        let mut spans = Vec::with_capacity(rows);
        for row in doc_ids.chunks(t.max(1)) {
            match doc_runs(row) {
                Some(runs) => spans.push(runs),
                None => {
                    let d = Tensor::from_slice(doc_ids).reshape([rows as i64, t as i64]).to_device(device);
                    return Attend::Mask(block_causal_mask(&d, &d, 0));
                }
            }
        }
        if spans.iter().all(|r| r.len() <= 1) {
            Attend::Causal
        } else {
            Attend::Spans(spans)
        }
    }
}

/// The documents of one packed row (a document id per token) as (start, length) runs of equal ids;
/// None when an id comes back after another (not a packed row).
pub fn doc_runs(row: &[i64]) -> Option<Vec<(i64, i64)>> {
    let mut runs: Vec<(i64, i64)> = vec![];
    let mut seen = std::collections::HashSet::new();
    for (j, &id) in row.iter().enumerate() {
        match runs.last_mut() {
            Some(last) if row[j - 1] == id => last.1 += 1,
            _ if seen.insert(id) => runs.push((j as i64, 1)),
            _ => return None,
        }
    }
    Some(runs)
}

/// Boolean mask (B, 1, T, S): query i (at absolute slot `past + i`) may attend key j when both belong
/// to the same document and j <= past + i. Every query sees at least itself, so no row is empty.
///
/// ```text
/// docs  0 0 0 1 1        q\k 0 1 2 3 4
///                          0 x . . . .
///                          1 x x . . .
///                          2 x x x . .
///                          3 . . . x .
///                          4 . . . x x
/// ```
pub fn block_causal_mask(q_docs: &Tensor, k_docs: &Tensor, past: i64) -> Tensor {
    let t = q_docs.size()[1];
    let s = k_docs.size()[1];
    let dev = q_docs.device();
    let q_slot = Tensor::arange_start(past, past + t, (Kind::Int64, dev)).unsqueeze(1); // (T, 1)
    let k_slot = Tensor::arange(s, (Kind::Int64, dev)).unsqueeze(0); // (1, S)
    let causal = k_slot.le_tensor(&q_slot); // (T, S)
    let same_doc = q_docs.unsqueeze(2).eq_tensor(&k_docs.unsqueeze(1)); // (B, T, S)
    same_doc.logical_and(&causal).unsqueeze(1)
}

/// Sort key giving Hugging Face's checkpoint order: embeddings, layers by number, final norm, head.
fn checkpoint_order(name: &str) -> (u8, i64, String) {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let (num, tail) = rest.split_once('.').unwrap_or((rest, ""));
        (1, num.parse().unwrap_or(i64::MAX), tail.to_owned())
    } else if name.starts_with("model.embed_tokens") {
        (0, 0, name.to_owned())
    } else if name.starts_with("model.") {
        (2, 0, name.to_owned())
    } else {
        (3, 0, name.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(a: &Attend) -> Option<&[Vec<(i64, i64)>]> {
        match a {
            Attend::Spans(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn packed_rows_become_spans_single_documents_causal_and_repeats_a_mask() {
        // Two rows of 6: documents 0 0 1 1 1 2 (2 is padding) and 5 5 5 5 5 5.
        let a = Attend::packed(&[0, 0, 1, 1, 1, 2, 5, 5, 5, 5, 5, 5], 2, Device::Cpu);
        assert_eq!(spans(&a).unwrap(), &[vec![(0, 2), (2, 3), (5, 1)], vec![(0, 6)]]);
        assert!(matches!(Attend::packed(&[3, 3, 3, 7, 7, 7], 2, Device::Cpu), Attend::Causal));
        // Document 0 comes back after document 1: only a mask says 0's tokens see each other.
        match Attend::packed(&[0, 1, 0, 0], 1, Device::Cpu) {
            Attend::Mask(m) => {
                assert_eq!(m.size(), [1, 1, 4, 4]);
                assert!(m.get(0).get(0).get(2).get(0).int64_value(&[]) == 1);
            }
            _ => panic!("expected a mask"),
        }
    }
}

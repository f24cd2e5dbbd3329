//! The memory planner: predicted peak memory of one training rank, by part, from the architecture and
//! the run's settings alone (nothing is loaded). One pure function, `predict`; `ferrotune plan` prints
//! it, `train` prints it at start beside the measured peak it later logs. The constants are derived
//! below from what libtorch's autograd saves for backward in `model.rs`'s layer; the CPU allowance was
//! measured (README: "Memory"). It does not measure anything or decide what to run.
//!
//! Symbols: e bytes of the compute dtype, C hidden, Q = H·D query width, G = K·D key/value width,
//! F MLP width, V vocabulary, L layers, r LoRA rank, T tokens of one micro-batch (rows × row length).

use crate::config::LlamaConfig;
use crate::dist::buckets::Shard;
use crate::layerwise::Checkpointing;
use serde::Serialize;

/// What the prediction depends on.
#[derive(Debug, Clone)]
pub struct MemoryInputs<'a> {
    pub arch: &'a LlamaConfig,
    /// 2 (bf16) or 4 (fp32).
    pub compute_bytes: usize,
    /// AdamW's state in bf16 (`train.optimizer_dtype = "bf16"` with a bf16 model): 4 B a trainable
    /// parameter instead of 12.
    pub bf16_state: bool,
    /// LoRA rank, adapted module names (`q_proj`, …) and whether dropout is on; None: full fine-tuning.
    pub lora: Option<(i64, Vec<&'static str>, bool)>,
    pub checkpointing: Checkpointing,
    /// Rows of one micro-batch and tokens of a row.
    pub rows: usize,
    pub seq: usize,
    /// Most positions projected through lm_head at once (`train.loss_chunk_tokens` resolved).
    pub loss_chunk: usize,
    /// Most trained positions in one micro-batch when the data is known (`train` counts them in the
    /// token cache); None assumes every position may be (`plan`, before any data is read).
    pub trained: Option<usize>,
    /// With the grouped attention (`fused.attention`), the most query-key pairs of short documents in
    /// one micro-batch (n² summed over its documents of n < `CPU_BF16_ATTENTION_FROM` tokens, padding
    /// included) and the fewest of its tokens in such documents, when the data is known (`train`);
    /// None assumes every token in a document of the longest short length the rows allow.
    pub short_pairs: Option<(usize, usize)>,
    pub world: usize,
    /// `train.shard`: what is sliced over the `world` ranks.
    pub shard: Shard,
    /// Bytes of one gradient bucket (`train.bucket_mb`).
    pub bucket_bytes: usize,
    pub cuda: bool,
    /// Which of ferrotune's fused kernels the layers run (they save less than the composites).
    pub fused: Fused,
}

/// Which of ferrotune's fused CPU kernels a model runs (`kernels::applies`), as far as they change what
/// autograd keeps: the norms, the MLP's silu(gate) * up and short documents' grouped bf16 attention.
/// (The fused rotary embedding saves what the composite saves, the cos and sin tables.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fused {
    pub norm: bool,
    pub swiglu: bool,
    pub attention: bool,
}

impl Fused {
    /// The composites throughout (CUDA, fp16, or `FERROTUNE_COMPOSITE=all`).
    pub const NONE: Fused = Fused { norm: false, swiglu: false, attention: false };

    /// What a model computing in `kind` on `device` runs.
    pub fn of(device: tch::Device, kind: tch::Kind) -> Fused {
        use crate::kernels::{applies, Kernel};
        Fused {
            norm: applies(Kernel::RmsNorm, device, kind),
            swiglu: applies(Kernel::Swiglu, device, kind),
            attention: applies(Kernel::Attention, device, kind),
        }
    }
}

/// One part of the prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: &'static str,
    pub bytes: f64,
    /// How it was counted, for the printed table.
    pub how: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub parts: Vec<Part>,
    pub total: f64,
}

/// Host memory of a CPU rank that is not tensors: libtorch and its OpenMP pools, the tokenizer, the
/// mapped token cache, the binary. Measured: 0.38-0.45 GB of peak resident memory for a run of the
/// tiny fixture whose tensors are a few MB (README: "Memory").
const CPU_RUNTIME: f64 = 0.42e9;
/// CUDA context, cuBLAS workspaces and NCCL buffers on a GPU: about 1 GB on recent drivers (torchtune
/// and torchtitan's tables start from a similar floor).
const CUDA_RUNTIME: f64 = 1.0e9;
/// The caching allocator rounds blocks up and fragments: 5% over the tensors on CPU (glibc arenas),
/// 10% on CUDA (its block rounding and split caches).
const FRAGMENTATION_CPU: f64 = 0.05;
const FRAGMENTATION_CUDA: f64 = 0.10;

/// Bytes autograd keeps per token for one decoder layer's backward (its graph), from model.rs's ops and
/// PyTorch's derivative formulas (a tensor is saved only when a gradient that needs it is computed):
/// - each RMSNorm: as libtorch's composite (CUDA), its fp32 input, squared (4C: a copy in bf16, the input
///   itself in fp32); as ferrotune's fused kernel (CPU, `fused.norm`), its input and one fp32 factor
///   (eC + 4: what `csrc/rms_norm.cpp` saves for backward); with trainable
///   weights (full fine-tuning) also the normalized value before the weight and the output, which the
///   projections after it keep as their input (2eC);
/// - attention: rotated q and k, v, SDPA's output and log-sum-exp (e(2Q + 2G) + 4H), or as the grouped
///   products (CPU, `fused.attention`) q's grouped copy, k and v (e(Q + 2G)) and the probabilities, which
///   depend on the document's length and are counted apart (`predict`); o_proj's input (eQ) when its
///   weight trains;
/// - MLP: gate and up outputs and SiLU's output (3eF), or gate and up alone as ferrotune's fused kernel
///   (CPU, `fused.swiglu`: 2eF, `csrc/swiglu.cpp` recomputes SiLU); down_proj's input (eF) when its
///   weight trains;
/// - LoRA, per adapted linear of input width i: with dropout its mask and dropped input (2ei), without
///   it the input, once per input the adapters share (ei); and the rank-r intermediate (er).
///
/// Checked against autograd itself: benches/saved_bytes.py runs the same ops in PyTorch and sums the
/// storages saved_tensors_hooks sees; on SmolLM2's shape (fp32, 2,048 tokens, three documents) that is
/// 46,733 B/token for full fine-tuning and 69,388 for LoRA r=8 with dropout on every linear, against
/// 46,884 and 69,380 here (the unit test below).
pub fn layer_bytes_per_token(
    a: &LlamaConfig,
    e: usize,
    lora: Option<&(i64, Vec<&'static str>, bool)>,
    fused: Fused,
) -> f64 {
    let e = e as f64;
    let (c, f, h) = (a.hidden_size as f64, a.intermediate_size as f64, a.num_attention_heads as f64);
    let q = (a.num_attention_heads * a.head_dim) as f64;
    let g = (a.num_key_value_heads * a.head_dim) as f64;
    let full = lora.is_none();
    let base_inputs = if full { 2.0 * 2.0 * e * c + e * q + e * f } else { 0.0 };
    let norms = 2.0 * if fused.norm { e * c + 4.0 } else { 4.0 * c };
    let attention = if fused.attention { e * (q + 2.0 * g) } else { e * (2.0 * q + 2.0 * g) + 4.0 * h };
    let mlp = if fused.swiglu { 2.0 } else { 3.0 } * e * f;
    let adapters = lora.map_or(0.0, |(r, targets, dropout)| {
        let width = |t: &str| match t {
            "o_proj" => q,
            "down_proj" => f,
            _ => c,
        };
        let ranks = targets.len() as f64 * e * *r as f64;
        if *dropout {
            ranks + targets.iter().map(|t| 2.0 * e * width(t)).sum::<f64>()
        } else {
            // q, k and v read one input, gate and up another.
            let mut groups: Vec<&str> = targets
                .iter()
                .map(|t| match *t {
                    "q_proj" | "k_proj" | "v_proj" => "qkv",
                    "gate_proj" | "up_proj" => "gate_up",
                    other => other,
                })
                .collect();
            groups.sort();
            groups.dedup();
            ranks
                + groups
                    .iter()
                    .map(|g| e * width(if *g == "qkv" || *g == "gate_up" { "q_proj" } else { g }))
                    .sum::<f64>()
        }
    });
    norms + attention + mlp + base_inputs + adapters
}

/// Bytes per token of the transient working set while one layer runs backward: the gradients of its
/// largest activations alive at once (the MLP's three F-wide ones and a few C-wide ones), in e.
fn backward_bytes_per_token(a: &LlamaConfig, e: usize) -> f64 {
    let e = e as f64;
    e * (3.0 * a.intermediate_size as f64 + 4.0 * a.hidden_size as f64)
}

/// Trainable parameters of the stage with the most (the head or embeddings, V x C, or one layer):
/// what ZeRO-2 holds in full while that stage runs backward.
fn largest_stage(a: &LlamaConfig, lora: Option<&(i64, Vec<&'static str>, bool)>) -> f64 {
    let layers = a.num_hidden_layers.max(1);
    match lora {
        Some((r, targets, _)) => (lora_parameters(a, *r, targets) / layers) as f64,
        None => {
            let table = (a.vocab_size * a.hidden_size) as f64;
            let layer =
                (a.num_parameters() as f64 - table * if a.tie_word_embeddings { 1.0 } else { 2.0 }) / layers as f64;
            table.max(layer)
        }
    }
}

/// Trainable parameters of the adapters.
pub fn lora_parameters(a: &LlamaConfig, r: i64, targets: &[&str]) -> i64 {
    let (c, f) = (a.hidden_size, a.intermediate_size);
    let (q, g) = (a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim);
    let per_layer: i64 = targets
        .iter()
        .map(|t| {
            let (i, o) = match *t {
                "q_proj" => (c, q),
                "k_proj" | "v_proj" => (c, g),
                "o_proj" => (q, c),
                "gate_proj" | "up_proj" => (c, f),
                "down_proj" => (f, c),
                _ => (0, 0),
            };
            r * (i + o)
        })
        .sum();
    per_layer * a.num_hidden_layers
}

/// The predicted peak of one rank.
pub fn predict(m: &MemoryInputs) -> MemoryPlan {
    let a = m.arch;
    let e = m.compute_bytes as f64;
    let gb = |x: f64| format!("{:.2} GB", x / 1e9);
    let p_model = a.num_parameters() as f64;
    let p_train = match &m.lora {
        Some((r, targets, _)) => lora_parameters(a, *r, targets) as f64,
        None => p_model,
    };
    let tokens = (m.rows * m.seq) as f64;
    let layers = a.num_hidden_layers as f64;
    let mut parts = vec![];
    let mut part = |name, bytes: f64, how: String| parts.push(Part { name, bytes, how });

    part(
        "weights",
        (p_model + if m.lora.is_some() { p_train } else { 0.0 }) * e,
        format!("{p_model:.3e} parameters x {e} B"),
    );
    // Sharded, a rank also keeps the summed gradient of its slice (1/W); ZeRO-2 frees the full ones
    // but those of the stage in backward (the buckets in flight are counted below).
    let w = if m.shard == Shard::None { 1.0 } else { m.world.max(1) as f64 };
    let (full_grads, how) = match m.shard {
        Shard::Gradients if m.world > 1 => {
            let stage = largest_stage(a, m.lora.as_ref()).min(p_train);
            (stage, format!("{stage:.3e} of the largest stage x {e} B + 1/{w} slice"))
        }
        Shard::None => (p_train, format!("{p_train:.3e} trainable x {e} B")),
        _ => (p_train, format!("{p_train:.3e} trainable x {e} B + 1/{w} slice")),
    };
    let slice = if w > 1.0 { p_train * e / w } else { 0.0 };
    part("gradients", full_grads * e + slice, how);
    // AdamW moments are fp32 (8 B a parameter) with fp32 masters when computing in bf16, or bf16
    // moments (4 B) without masters under `train.optimizer_dtype = "bf16"`.
    let moments = if m.bf16_state { 4.0 } else { 8.0 };
    let masters = if m.compute_bytes == 4 || m.bf16_state { 0.0 } else { 4.0 };
    part(
        "optimizer state",
        p_train * (moments + masters) / w,
        format!(
            "{p_train:.3e} x ({moments} B {} moments{}){}",
            if m.bf16_state { "bf16" } else { "fp32" },
            if masters > 0.0 { " + 4 B fp32 masters" } else { "" },
            if w > 1.0 { format!(" / {w} ranks") } else { String::new() }
        ),
    );
    let per_layer = layer_bytes_per_token(a, m.compute_bytes, m.lora.as_ref(), m.fused);
    // Kept graphs of the layers not recomputed, inputs of those recomputed, and one recomputed layer's
    // graph at a time during backward.
    let recomputed = m.checkpointing.recomputed(a.num_hidden_layers as usize) as f64;
    // The grouped attention keeps H probabilities per query-key pair of a short document: e·H·n² for an
    // n-token document, e·H·n bytes each of its tokens, at most e·H·511 (`per_layer` counts its other
    // tensors). Tokens of longer documents attend through SDPA, which keeps its output and log-sum-exp
    // besides (e·Q + 4H a token). Without data, every token in a short document of the longest length
    // the rows allow: no more than any mix (e·H·511 > e·Q + 4H for head sizes up to 509).
    let (h, q) = (a.num_attention_heads as f64, (a.num_attention_heads * a.head_dim) as f64);
    let longest = (m.seq as f64).min((crate::attention::CPU_BF16_ATTENTION_FROM - 1) as f64);
    let (pairs, probs) = if m.fused.attention {
        let (pairs, short) = m.short_pairs.map_or((tokens * longest, tokens), |(p, s)| (p as f64, s as f64));
        (pairs, e * h * pairs + (tokens - short).max(0.0) * (e * q + 4.0 * h))
    } else {
        (0.0, 0.0)
    };
    let graph = per_layer * tokens + probs;
    let graphs = (layers - recomputed) * graph;
    let inputs = recomputed * e * a.hidden_size as f64 * tokens;
    let one = if recomputed > 0.0 { graph } else { 0.0 };
    part(
        "activations",
        graphs + inputs + one,
        format!(
            "{} layer graphs x {per_layer:.0} B/token{}, {recomputed} layer inputs x {e}C B/token{}, {tokens} tokens",
            layers - recomputed,
            if probs > 0.0 {
                format!(" + attention probabilities {e}H B x {pairs:.0} query-key pairs (SDPA's output beyond)")
            } else {
                String::new()
            },
            if recomputed > 0.0 { " + one recomputed graph" } else { "" }
        ),
    );
    // The grouped attention's backward holds the gradients of one document's probabilities and scores
    // at once (2·e·H·n², the longest short document).
    let scores = if m.fused.attention { 2.0 * e * h * longest * longest } else { 0.0 };
    part(
        "backward working set",
        backward_bytes_per_token(a, m.compute_bytes) * tokens + scores,
        format!(
            "gradients of one layer's activations ({tokens} tokens){}",
            if scores > 0.0 {
                format!(", of one document's attention scores ({longest} tokens)")
            } else {
                String::new()
            }
        ),
    );
    // The loss chunk: logits in the compute dtype and in fp32, log-softmax kept for backward, and the
    // fp32 gradient of the logits (plus its compute-dtype copy in bf16); the final norm's output; and,
    // when lm_head trains, a chunk's gradient of it before it is added to the kept one (V x C x e).
    let (v, c) = (a.vocab_size as f64, a.hidden_size as f64);
    let positions = m.trained.unwrap_or(m.rows * m.seq).min(m.rows * m.seq);
    let n = m.loss_chunk.min(positions) as f64;
    let per_position = if m.compute_bytes == 4 { 12.0 } else { 16.0 };
    let head_grad = if m.lora.is_none() { v * c * e } else { 0.0 };
    part(
        "loss chunk",
        n * v * per_position + tokens * (4.0 + 2.0 * e) * c + head_grad,
        format!(
            "{n} positions x {v} ids x {per_position} B{}, the final norm{}",
            if m.trained.is_some() { " (most trained in a micro-batch)" } else { " (every position trained)" },
            if head_grad > 0.0 { ", one chunk's lm_head gradient" } else { "" }
        ),
    );
    let buckets = if m.world > 1 {
        (crate::dist::buckets::IN_FLIGHT as f64 * m.bucket_bytes as f64).min(4.0 * p_train)
    } else {
        0.0
    };
    part("gradient buckets", buckets, format!("at most {} fp32 buckets in flight", crate::dist::buckets::IN_FLIGHT));
    // The optimizer step runs after backward has freed the activations: its fp32 temporaries (the
    // gradient's fp32 copy and the denominator) of the largest trainable tensor count only where they
    // exceed the backward phase's transient parts.
    let largest = match &m.lora {
        Some((r, targets, _)) => {
            let (f, q) = (a.intermediate_size as f64, (a.num_attention_heads * a.head_dim) as f64);
            targets
                .iter()
                .map(|t| {
                    *r as f64 * if t.contains("gate") || t.contains("up") || t.contains("down") { f } else { c.max(q) }
                })
                .fold(0.0, f64::max)
        }
        None => v * c,
    };
    let step_ws = 2.0 * 4.0 * largest;
    let backward: f64 = parts.iter().skip(3).map(|p| p.bytes).sum();
    parts.push(Part {
        name: "optimizer step",
        bytes: (step_ws - backward).max(0.0),
        how: format!(
            "2 fp32 temporaries of the largest trainable tensor ({}), beyond the backward phase's parts",
            gb(step_ws)
        ),
    });
    let tensors: f64 = parts.iter().map(|p| p.bytes).sum();
    let (runtime, frag) = if m.cuda { (CUDA_RUNTIME, FRAGMENTATION_CUDA) } else { (CPU_RUNTIME, FRAGMENTATION_CPU) };
    parts.push(Part {
        name: "allowance",
        bytes: runtime + frag * tensors,
        how: format!("{} runtime + {:.0}% of the tensors for the allocator", gb(runtime), 100.0 * frag),
    });
    let total = parts.iter().map(|p| p.bytes).sum();
    MemoryPlan { parts, total }
}

/// Query-key pairs the grouped attention keeps probabilities for in one packed row of `seq` tokens whose
/// documents have `doc_lens` tokens (the padding after them attends as one more), and the tokens in those
/// documents: n² and n for each of fewer than `CPU_BF16_ATTENTION_FROM` tokens.
pub fn short_pairs(doc_lens: &[u32], seq: usize) -> (usize, usize) {
    let used: usize = doc_lens.iter().map(|&n| n as usize).sum();
    let from = crate::attention::CPU_BF16_ATTENTION_FROM as usize;
    let short = doc_lens.iter().map(|&n| n as usize).chain(Some(seq.saturating_sub(used))).filter(|&n| n < from);
    short.fold((0, 0), |(p, t), n| (p + n * n, t + n))
}

/// The planner's inputs for a resolved plan on `device` in `kind`.
pub fn inputs_for<'a>(
    plan: &crate::plan::Plan,
    arch: &'a LlamaConfig,
    kind: tch::Kind,
    device: tch::Device,
    loss_chunk: usize,
) -> MemoryInputs<'a> {
    let t = &plan.config.train;
    MemoryInputs {
        arch,
        compute_bytes: if kind == tch::Kind::BFloat16 { 2 } else { 4 },
        bf16_state: kind == tch::Kind::BFloat16 && t.optimizer_dtype == "bf16",
        lora: plan.lora.as_ref().map(|l| (l.r, l.targets().unwrap_or_default(), l.dropout > 0.0)),
        checkpointing: plan.checkpointing,
        rows: t.micro_batch_size,
        seq: plan.config.data.max_seq_len,
        loss_chunk,
        trained: None,
        short_pairs: None,
        world: plan.world_size,
        shard: plan.shard,
        bucket_bytes: t.bucket_bytes(),
        cuda: device.is_cuda(),
        fused: Fused::of(device, kind),
    }
}

/// A change of config (as `--set` arguments) and the peak predicted with it.
#[derive(Debug, Clone, Serialize)]
pub struct Knob {
    pub set: Vec<String>,
    pub predicted: f64,
}

/// A change of the run's settings, as `--set` arguments and as what it does to the inputs.
type Change = (&'static [&'static str], fn(&mut MemoryInputs));

/// The single changes that bring the prediction under `budget` bytes: activation checkpointing, a
/// micro-batch of one row, bf16, sharding over several ranks (ZeRO-1, then ZeRO-2), LoRA (r = 16 on
/// every linear), or rows halved until they fit (down to 256 tokens). When none does alone, all of them
/// together, with rows halved as far as that needs.
pub fn knobs_that_fit(m: &MemoryInputs, budget: f64) -> Vec<Knob> {
    let mut changes: Vec<Change> = vec![];
    if m.world > 1 && m.lora.is_none() {
        if m.shard == Shard::None {
            changes.push((&["train.shard=optimizer"], |i| i.shard = Shard::Optimizer));
        }
        if m.shard != Shard::Gradients {
            changes.push((&["train.shard=gradients"], |i| i.shard = Shard::Gradients));
        }
    }
    if m.checkpointing != Checkpointing::Full {
        changes.push((&["train.activation_checkpointing=full"], |i| i.checkpointing = Checkpointing::Full));
    }
    if m.rows > 1 {
        changes.push((&["train.micro_batch_size=1"], |i| i.rows = 1));
    }
    if m.compute_bytes == 4 {
        changes.push((&["model.dtype=bf16"], |i| i.compute_bytes = 2));
    }
    if m.lora.is_none() {
        changes.push((&["lora.enabled=true", "lora.r=16"], |i| {
            i.lora = Some((16, crate::lora::LINEAR_NAMES.to_vec(), true))
        }));
    }
    let mut fits: Vec<Knob> = changes
        .iter()
        .filter_map(|(set, apply)| {
            let mut i = m.clone();
            apply(&mut i);
            let predicted = predict(&i).total;
            (predicted <= budget).then(|| Knob { set: set.iter().map(|s| s.to_string()).collect(), predicted })
        })
        .collect();
    fits.extend(with_rows_that_fit(m, vec![], budget).filter(|k| !k.set.is_empty()));
    if fits.is_empty() && !changes.is_empty() {
        let mut all = m.clone();
        let mut set = vec![];
        // ZeRO-2 includes what ZeRO-1 saves.
        for (s, apply) in changes.iter().filter(|(s, _)| s[0] != "train.shard=optimizer") {
            apply(&mut all);
            set.extend(s.iter().map(|s| s.to_string()));
        }
        fits.extend(with_rows_that_fit(&all, set, budget));
    }
    fits
}

/// `m` with `set` as it is when it fits, else with its rows halved until it does (at least 256 tokens).
fn with_rows_that_fit(m: &MemoryInputs, set: Vec<String>, budget: f64) -> Option<Knob> {
    let mut seq = m.seq;
    while seq >= 256 {
        let predicted = predict(&MemoryInputs { seq, ..m.clone() }).total;
        if predicted <= budget {
            let mut set = set;
            if seq < m.seq {
                set.push(format!("data.max_seq_len={seq}"));
            }
            return Some(Knob { set, predicted });
        }
        seq /= 2;
    }
    None
}

impl MemoryPlan {
    /// The table `plan` and `train` print.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            s.push_str(&format!("  {:<22} {:>9.2} GB  {}\n", p.name, p.bytes / 1e9, p.how));
        }
        s.push_str(&format!("  {:<22} {:>9.2} GB\n", "predicted peak", self.total / 1e9));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31_8b() -> LlamaConfig {
        let v = serde_json::json!({
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": false
        });
        LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap()
    }

    /// Full fine-tuning in bf16 on CUDA, rows of 8,192, full checkpointing, unsharded, on `world` ranks.
    fn full_8b(a: &LlamaConfig, world: usize) -> MemoryInputs<'_> {
        MemoryInputs {
            arch: a,
            compute_bytes: 2,
            bf16_state: false,
            lora: None,
            checkpointing: Checkpointing::Full,
            rows: 1,
            seq: 8192,
            loss_chunk: 523,
            trained: None,
            short_pairs: None,
            world,
            shard: Shard::None,
            bucket_bytes: 25 << 20,
            cuda: true,
            fused: Fused::NONE,
        }
    }

    #[test]
    fn a_layer_keeps_what_autograd_saves() {
        let v = serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": true
        });
        let smol = LlamaConfig::from_json(&v, std::path::Path::new("config.json")).unwrap();
        let all = crate::lora::LINEAR_NAMES.to_vec();
        // benches/saved_bytes.py on this shape (fp32, 2,048 tokens): 46,733 and 69,388 B/token.
        let full = layer_bytes_per_token(&smol, 4, None, Fused::NONE);
        let lora = layer_bytes_per_token(&smol, 4, Some(&(8, all.clone(), true)), Fused::NONE);
        assert!((full - 46_733.0).abs() / 46_733.0 < 0.01, "{full}");
        assert!((lora - 69_388.0).abs() / 69_388.0 < 0.01, "{lora}");
        let no_dropout = layer_bytes_per_token(&smol, 4, Some(&(8, all, false)), Fused::NONE);
        assert!(no_dropout < lora);
        // The fused norm saves its input and a factor per token: in fp32 what the composite's fp32
        // input was (4 B a token more), in bf16 half of the composite's fp32 copy.
        let norm = Fused { norm: true, ..Fused::NONE };
        assert_eq!(layer_bytes_per_token(&smol, 4, None, norm) - full, 2.0 * 4.0);
        let bf16 = |fused| layer_bytes_per_token(&smol, 2, None, fused);
        assert_eq!(bf16(Fused::NONE) - bf16(norm), 2.0 * (4.0 * 576.0 - (2.0 * 576.0 + 4.0)));
        // The fused SwiGLU (fp32) keeps gate and up but not SiLU's output: one F-wide activation less.
        let fp32 = |fused| layer_bytes_per_token(&smol, 4, None, fused);
        assert_eq!(fp32(norm) - fp32(Fused { norm: true, swiglu: true, attention: false }), 4.0 * 1536.0);
        // The grouped attention keeps q's grouped copy, k and v, not SDPA's output and log-sum-exp
        // (its probabilities are counted per query-key pair in `predict`).
        let grouped = Fused { attention: true, ..norm };
        assert_eq!(bf16(norm) - bf16(grouped), 2.0 * 576.0 + 4.0 * 9.0);
    }

    #[test]
    fn llama_8b_parts_follow_the_byte_counts_of_design_8() {
        let a = llama31_8b();
        assert_eq!(a.num_parameters(), 8_030_261_248); // Llama 3.1 8B's published count
        let full = full_8b(&a, 1);
        let p = predict(&full);
        let get = |p: &MemoryPlan, n: &str| p.parts.iter().find(|x| x.name == n).unwrap().bytes;
        // bf16 weights 2P, bf16 gradients 2P, fp32 moments and masters 12P (DESIGN.md §8).
        assert_eq!(get(&p, "weights"), 2.0 * 8_030_261_248.0);
        assert_eq!(get(&p, "optimizer state"), 12.0 * 8_030_261_248.0);
        // Checkpointed: 32 layer inputs of 8192 x 4096 bf16 = 2.1 GB plus one layer's graph.
        let act = get(&p, "activations");
        assert!(act > 2.1e9 && act < 4.0e9, "{act}");
        let none = predict(&MemoryInputs { checkpointing: Checkpointing::None, ..full.clone() });
        assert!(get(&none, "activations") > 10.0 * act, "checkpointing must cut activations by far more than 3x");
        // LoRA r=16 on every linear: 42M adapter parameters.
        let targets = crate::lora::LINEAR_NAMES.to_vec();
        assert_eq!(lora_parameters(&a, 16, &targets), 41_943_040);
        let lora = predict(&MemoryInputs { lora: Some((16, targets, true)), ..full.clone() });
        assert!(lora.total < 0.3 * p.total);
        // On 80 GB only LoRA fits alone; on 22 GB nothing alone (LoRA needs 27 GB at 8,192), all together
        // only with shorter rows.
        let sets =
            |budget: f64| -> Vec<Vec<String>> { knobs_that_fit(&full, budget).into_iter().map(|k| k.set).collect() };
        assert_eq!(sets(80e9), [vec!["lora.enabled=true".to_string(), "lora.r=16".into()]]);
        let small = sets(22e9);
        assert_eq!(small.len(), 1, "{small:?}");
        assert!(
            small[0].contains(&"lora.enabled=true".to_string())
                && small[0].last().unwrap().starts_with("data.max_seq_len="),
            "{small:?}"
        );
        assert!(sets(1e9).is_empty(), "the weights alone exceed 1 GB");
    }

    /// Full fine-tuning of Llama 3.1 8B in bf16 on 8 ranks of 80 GB with checkpointing: 16 bytes a
    /// parameter unsharded (128 GB) does not fit; ZeRO-1 divides the 12 bytes of moments and masters by
    /// 8, ZeRO-2 also the 2 of gradients (but the largest stage's, the 128,256 x 4,096 embeddings).
    #[test]
    fn sharding_divides_the_optimizer_state_and_gradients_by_the_world_size() {
        let a = llama31_8b();
        let p = a.num_parameters() as f64;
        let base = full_8b(&a, 8);
        let get = |m: &MemoryInputs, n: &str| predict(m).parts.iter().find(|x| x.name == n).unwrap().bytes;
        let zero1 = MemoryInputs { shard: Shard::Optimizer, ..base.clone() };
        let zero2 = MemoryInputs { shard: Shard::Gradients, ..base.clone() };
        assert_eq!(get(&base, "optimizer state"), 12.0 * p);
        assert_eq!(get(&zero1, "optimizer state"), 12.0 * p / 8.0);
        assert_eq!(get(&zero2, "optimizer state"), 12.0 * p / 8.0);
        assert_eq!(get(&zero1, "gradients"), 2.0 * p + 2.0 * p / 8.0);
        assert_eq!(get(&zero2, "gradients"), 2.0 * 128_256.0 * 4096.0 + 2.0 * p / 8.0);
        let (none, one, two) = (predict(&base).total, predict(&zero1).total, predict(&zero2).total);
        assert!(none > 130e9 && one < 80e9 && two < one, "{none:e} {one:e} {two:e}");
        let sets: Vec<Vec<String>> = knobs_that_fit(&base, 80e9).into_iter().map(|k| k.set).collect();
        assert_eq!(sets[..2], [vec!["train.shard=optimizer".to_string()], vec!["train.shard=gradients".to_string()]]);
        // One rank has nothing to shard over.
        let alone = MemoryInputs { world: 1, ..base.clone() };
        assert!(knobs_that_fit(&alone, 80e9).iter().all(|k| !k.set.iter().any(|s| s.starts_with("train.shard"))));
    }

    #[test]
    fn grouped_attention_keeps_its_probabilities_per_query_key_pair() {
        let a = llama31_8b();
        let grouped = Fused { attention: true, ..Fused::NONE };
        let base = MemoryInputs {
            checkpointing: Checkpointing::None,
            rows: 1,
            seq: 2048,
            compute_bytes: 2,
            fused: grouped,
            ..full_8b(&a, 1)
        };
        let acts = |m: &MemoryInputs| predict(m).parts.iter().find(|p| p.name == "activations").unwrap().bytes;
        // Unknown data: every token in a document of 511 tokens (the longest short one); known: the
        // pairs counted, and the tokens of long documents keep SDPA's output and log-sum-exp (e·Q + 4H
        // a token). 32 layers x 2 B x 32 heads per pair.
        let all_short = MemoryInputs { short_pairs: Some((1000, 2048)), ..base.clone() };
        let per_pair = 32.0 * 2.0 * 32.0;
        assert!((acts(&base) - acts(&all_short) - per_pair * (2048.0 * 511.0 - 1000.0)).abs() < 1.0);
        let sdpa_token = 2.0 * 4096.0 + 4.0 * 32.0;
        let some_long = MemoryInputs { short_pairs: Some((1000, 48)), ..base.clone() };
        assert!((acts(&some_long) - acts(&all_short) - 32.0 * 2000.0 * sdpa_token).abs() < 1.0);
        // Without the grouped attention every token is SDPA's: the same count as all long.
        let sdpa = MemoryInputs { fused: Fused::NONE, ..base.clone() };
        let all_long = MemoryInputs { short_pairs: Some((0, 0)), ..base.clone() };
        assert!((acts(&sdpa) - acts(&all_long)).abs() < 1.0);
        assert_eq!(short_pairs(&[100, 600, 300], 1024), (100 * 100 + 300 * 300 + 24 * 24, 424));
    }
}

//! The Llama implementation against transformers (the oracle, `tests/oracle.py`), fp32 on CPU, on the
//! tiny fixtures (GQA, llama3 rope, untied, bf16 storage; and biases, tied, default rope) and on the real
//! SmolLM2-135M-Instruct: logits, masked cross-entropy and gradients, packing, save/reload.
//!
//! Tolerances: both sides run libtorch 2.13's fp32 CPU kernels, except where ferrotune runs its own fused
//! kernels on CPU (`trainer/csrc`): RMSNorm sums each row in another order, fp32 SwiGLU computes exp
//! with its own polynomial (the rotary kernel is bit for bit the composite). With libtorch's kernels on
//! both sides the results were bitwise equal on this project's CI machine; with the fused ones (every
//! test prints its difference) logits differ by about 2e-6 on the tiny models and 6e-5 on SmolLM2 (of
//! 36), gradients by under 1e-6 relative, and bf16 logits are still bitwise equal.
//! Another CPU or BLAS may order sums differently too, which moves fp32 results by about 1e-6 relative
//! per op, growing with depth; the bounds (1e-4 absolute on logits of magnitude ~4 for the tiny models, 1e-3 on
//! SmolLM2's ~35 after 30 layers, 1e-4 relative on gradients) leave room for that and stay 100x below
//! what a real bug does (a wrong rope band, mask or norm moves logits by 1e-1 or more).

mod common;

use common::*;
use ferrotune_trainer::{attention, load_model, loss, model::Llama, weights};
use tch::{Device, Kind, Tensor};

fn load(name: &str) -> (std::path::PathBuf, Llama) {
    let dir = fixture(name);
    let model = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    (dir, model)
}

fn batch(vocab: i64, b: usize, t: usize, seed: u64) -> Tensor {
    Tensor::from_slice(&ids(b * t, 0, vocab, seed)).reshape([b as i64, t as i64])
}

fn positions(b: usize, t: usize) -> Tensor {
    Tensor::arange(t as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b as i64, 1])
}

fn check_logits(name: &str, tol: f64) {
    let (dir, model) = load(name);
    let (b, t) = (2, 24);
    let input = batch(model.config.vocab_size, b, t, 7);
    let ours = tch::no_grad(|| model.logits(&model.forward(&input, &positions(b, t), None, None)));
    let hf = hf_forward(&dir, &[("input_ids", &input)], &[]);
    let diff = max_abs_diff(&ours, &hf["logits"]);
    println!("{name}: max |logits - transformers| = {diff:.3e} (max |logit| {:.2})", max_abs(&hf["logits"]));
    assert!(diff < tol, "{name}: logits differ from transformers by {diff}");
}

#[test]
fn tiny_llama_logits_equal_transformers() {
    check_logits("tiny-llama", 1e-4);
}

#[test]
fn tiny_llama_with_biases_logits_equal_transformers() {
    check_logits("tiny-llama-bias", 1e-4);
}

#[test]
fn smollm2_logits_equal_transformers() {
    check_logits("smollm2-135m-instruct", 1e-3);
}

/// Unshifted labels (-100 = ignored) -> labels shifted within each row, as the data pipeline does.
fn shift(labels: &Tensor) -> Tensor {
    let t = labels.size()[1];
    let pad = Tensor::full([labels.size()[0], 1], -100, (Kind::Int64, Device::Cpu));
    Tensor::cat(&[labels.narrow(1, 1, t - 1), pad], 1)
}

fn check_loss_and_grads(name: &str, grads: &[&str]) {
    let (dir, model) = load(name);
    model.set_requires_grad(true);
    let (b, t) = (2, 20);
    let input = batch(model.config.vocab_size, b, t, 11);
    // Train on the second half of row 0 and on a middle stretch of row 1.
    let mut lab: Vec<i64> = Vec::<i64>::try_from(input.reshape([-1])).unwrap();
    for (i, l) in lab.iter_mut().enumerate() {
        let (row, col) = (i / t, i % t);
        let trained = if row == 0 { col >= t / 2 } else { (4..14).contains(&col) };
        if !trained {
            *l = -100;
        }
    }
    let labels = Tensor::from_slice(&lab).reshape([b as i64, t as i64]);
    let hidden = model.forward(&input, &positions(b, t), None, None);
    let (idx, targets) = loss::trained_positions(&shift(&labels));
    let n = idx.size()[0];
    let ours = loss::masked_ce_sum(&model, &hidden, &idx, &targets) / n as f64;
    ours.backward();
    let hf = hf_forward(&dir, &[("input_ids", &input), ("labels", &labels)], grads);
    let (a, e) = (ours.double_value(&[]), hf["loss"].double_value(&[0]));
    println!("{name}: loss ours {a:.7} transformers {e:.7}");
    assert!((a - e).abs() < 1e-5 * e.abs().max(1.0), "{name}: loss {a} vs transformers {e}");
    let params: std::collections::HashMap<_, _> = model.named_parameters().into_iter().collect();
    for g in grads {
        let theirs = &hf[&format!("grad.{g}")];
        let ours = params[*g].grad();
        let diff = max_abs_diff(&ours, theirs);
        let scale = max_abs(theirs);
        println!("{name}: grad {g}: max diff {diff:.3e}, max |grad| {scale:.3e}");
        assert!(scale > 0.0, "{g}: transformers' gradient is zero; the test would prove nothing");
        assert!(diff <= 1e-4 * scale, "{name}: gradient of {g} differs: {diff} (scale {scale})");
    }
}

#[test]
fn tiny_llama_masked_loss_and_gradients_equal_transformers() {
    check_loss_and_grads(
        "tiny-llama",
        &[
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ],
    );
}

#[test]
fn tiny_llama_with_biases_gradients_equal_transformers() {
    check_loss_and_grads(
        "tiny-llama-bias",
        &[
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.v_proj.bias",
            "model.layers.1.mlp.up_proj.bias",
            "model.layers.2.input_layernorm.weight",
        ],
    );
}

#[test]
fn packed_row_equals_each_document_alone() {
    let (_, model) = load("tiny-llama");
    let vocab = model.config.vocab_size;
    let (la, lb) = (7usize, 9usize);
    let a = ids(la, 0, vocab, 1);
    let b = ids(lb, 0, vocab, 2);
    let packed: Vec<i64> = a.iter().chain(&b).copied().collect();
    let pos: Vec<i64> = (0..la as i64).chain(0..lb as i64).collect();
    let docs: Vec<i64> = std::iter::repeat_n(0, la).chain(std::iter::repeat_n(1, lb)).collect();
    let row = |v: &[i64]| Tensor::from_slice(v).unsqueeze(0);
    let _g = tch::no_grad_guard();
    let together = model.logits(&model.forward(&row(&packed), &row(&pos), Some(&row(&docs)), None));
    let alone_a = model.logits(&model.forward(&row(&a), &positions(1, la), None, None));
    let alone_b = model.logits(&model.forward(&row(&b), &positions(1, lb), None, None));
    let da = max_abs_diff(&together.narrow(1, 0, la as i64), &alone_a);
    let db = max_abs_diff(&together.narrow(1, la as i64, lb as i64), &alone_b);
    println!("packed vs alone: doc A {da:.3e}, doc B {db:.3e}");
    assert!(da < 1e-5 && db < 1e-5, "packing leaks attention across documents: {da} {db}");
    // Without document ids the second document would see the first: the test can tell the difference.
    let leaky = model.logits(&model.forward(&row(&packed), &row(&pos), None, None));
    assert!(max_abs_diff(&leaky.narrow(1, la as i64, lb as i64), &alone_b) > 1e-3);
}

/// Packed rows attend document by document (spans); a forward over an empty KV cache states the same
/// attention as a block-diagonal boolean mask instead. Both must give the same hidden states and
/// gradients, on rows with different documents and padding, and on ids that are not contiguous runs
/// (where the spans path falls back to the mask).
#[test]
fn document_spans_equal_the_block_diagonal_mask() {
    let (_, model) = load("tiny-llama");
    model.set_requires_grad(true);
    let t = 20;
    let input = batch(model.config.vocab_size, 3, t, 11);
    for docs in [
        [vec![0; 6], vec![1; 9], vec![2; 5]].concat(), // two documents and padding
        [vec![0; 13], vec![1; 7]].concat(),
        [vec![0; 4], vec![1; 4], vec![0; 12]].concat(), // not contiguous runs: the mask path
    ] {
        let pos: Vec<i64> = docs
            .iter()
            .scan((-1i64, 0i64), |(prev, p), &d| {
                *p = if d == *prev { *p + 1 } else { 0 };
                *prev = d;
                Some(*p)
            })
            .collect();
        let docs = Tensor::from_slice(&docs).unsqueeze(0).repeat([3, 1]);
        // Row 1 is a single document and row 2 two, so the rows differ.
        let docs = Tensor::cat(
            &[
                docs.narrow(0, 0, 1),
                docs.narrow(0, 1, 1).zeros_like(),
                docs.narrow(0, 2, 1).ge(10).to_kind(Kind::Int64),
            ],
            0,
        );
        let pos = Tensor::from_slice(&pos).unsqueeze(0).repeat([3, 1]);
        let run = |cache: bool| {
            let mut kv = ferrotune_trainer::model::KvCache::default();
            let h = model.forward(&input, &pos, Some(&docs), cache.then_some(&mut kv));
            let w = &model.vs.variables()["model.layers.0.self_attn.q_proj.weight"];
            let loss = (&h * 0.5).square().sum(Kind::Float);
            let grad = Tensor::run_backward(&[loss], &[w], false, false).remove(0);
            (h.detach(), grad)
        };
        let ((h_spans, g_spans), (h_mask, g_mask)) = (run(false), run(true));
        let (dh, dg) = (max_abs_diff(&h_spans, &h_mask), max_abs_diff(&g_spans, &g_mask));
        println!("spans vs mask: hidden {dh:.3e}, grad {dg:.3e} (max |grad| {:.3e})", max_abs(&g_mask));
        assert!(dh < 1e-5 && dg < 1e-4 * max_abs(&g_mask), "{dh} {dg}");
    }
}

#[test]
fn saved_checkpoint_loads_in_transformers_with_same_logits() {
    for name in ["tiny-llama", "tiny-llama-bias"] {
        let (_, model) = load(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        // Small shards so that the index path is exercised; bf16 is lossless for tiny-llama (stored bf16).
        let kind = if name == "tiny-llama" { Kind::BFloat16 } else { Kind::Float };
        weights::save_pretrained(&model, &out, kind, 4 << 20).unwrap();
        assert!(out.join(weights::INDEX).exists());
        let reloaded = load_model(&out, Kind::Float, Device::Cpu).unwrap();
        let (b, t) = (1, 16);
        let input = batch(model.config.vocab_size, b, t, 5);
        let ours = tch::no_grad(|| reloaded.logits(&reloaded.forward(&input, &positions(b, t), None, None)));
        let orig = tch::no_grad(|| model.logits(&model.forward(&input, &positions(b, t), None, None)));
        assert_eq!(max_abs_diff(&ours, &orig), 0.0, "{name}: save/load changed the weights");
        let hf = hf_forward(&out, &[("input_ids", &input)], &[]);
        let diff = max_abs_diff(&ours, &hf["logits"]);
        println!("{name}: saved -> transformers: max diff {diff:.3e}");
        assert!(diff < 1e-4, "{name}: transformers reads our checkpoint differently: {diff}");
    }
}

#[test]
fn batched_greedy_generation_equals_transformers_on_smollm2() {
    let (dir, model) = load("smollm2-135m-instruct");
    let template = ferrotune_data::ChatTemplate::from_dir(&dir).unwrap();
    let tokenizer = ferrotune_data::Tokenizer::from_dir(&dir).unwrap();
    let questions = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rust."];
    let prompts: Vec<Vec<i64>> = questions
        .iter()
        .map(|q| {
            let text = template.render(&[ferrotune_data::Message::new("user", q)], true).unwrap();
            tokenizer.encode(&text).unwrap().into_iter().map(i64::from).collect()
        })
        .collect();
    let max_new = 24;
    let ours = ferrotune_trainer::generate::greedy(&model, &prompts, max_new, &model.config.eos_token_ids);
    let tmp = tempfile::tempdir().unwrap();
    let (p, o) = (tmp.path().join("prompts.json"), tmp.path().join("out.json"));
    std::fs::write(&p, serde_json::to_string(&prompts).unwrap()).unwrap();
    oracle(&["generate", dir.to_str().unwrap(), p.to_str().unwrap(), o.to_str().unwrap(), &max_new.to_string()]);
    let theirs: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(&o).unwrap()).unwrap();
    for (i, q) in questions.iter().enumerate() {
        let text = tokenizer.decode(&ours[i].iter().map(|&t| t as u32).collect::<Vec<_>>()).unwrap();
        println!("{q} -> {text:?}");
    }
    assert_eq!(ours, theirs, "greedy tokens differ from transformers");
    assert!(ours.iter().all(|o| !o.is_empty()));
    let first = tokenizer.decode(&ours[0].iter().map(|&t| t as u32).collect::<Vec<_>>()).unwrap();
    assert!(first.contains("Paris"), "{first}");
}

#[test]
fn bf16_compute_equals_transformers_bf16() {
    // Both sides compute in bf16 (norms and rope tables in fp32, as transformers does), and attention
    // of these 24-token rows (shorter than CPU_BF16_ATTENTION_FROM) as ferrotune runs it on this CPU:
    // with bf16 units as grouped bf16 products with the softmax in fp32 (attention.rs), which is
    // transformers' eager attention in bf16 (ORACLE_ATTENTION_EAGER); without them on fp32 copies, which
    // the oracle matches through transformers' own sdpa attention on fp32 copies
    // (ORACLE_ATTENTION_FP32). A dtype bug (a norm without the fp32 upcast, bf16 rope tables) moves
    // logits by 1e-1 or more; the fp32 model itself is 4e-2 away, and so is the other attention's
    // rounding (4.6e-2 measured on an AVX-512 BF16 EPYC), so the bound sits below that. Plain
    // transformers bf16 (its sdpa attention in bf16) is printed for comparison.
    let dir = fixture("tiny-llama");
    let model = load_model(&dir, Kind::BFloat16, Device::Cpu).unwrap();
    assert_eq!(model.embed_tokens.kind(), Kind::BFloat16);
    let input = batch(model.config.vocab_size, 2, 24, 3);
    let ours = tch::no_grad(|| model.logits(&model.forward(&input, &positions(2, 24), None, None)));
    assert_eq!(ours.kind(), Kind::BFloat16);
    const { assert!(24 < ferrotune_trainer::model::CPU_BF16_ATTENTION_FROM) };
    let env = match attention::Path::of(24, Kind::BFloat16, Device::Cpu) {
        attention::Path::Grouped => [("ORACLE_ATTENTION_EAGER", "1")],
        attention::Path::SdpaFp32 => [("ORACLE_ATTENTION_FP32", "1")],
        attention::Path::Sdpa => unreachable!("24 bf16 tokens on CPU are short"),
    };
    let hf = hf_forward_env(&dir, &[("input_ids", &input)], &[], "bfloat16", &env);
    let diff = max_abs_diff(&ours, &hf["logits"]);
    let plain = max_abs_diff(&ours, &hf_forward_in(&dir, &[("input_ids", &input)], &[], "bfloat16")["logits"]);
    println!("bf16: max |logits - transformers bf16, attention as {}| = {diff:.3e} (sdpa bf16: {plain:.3e})", env[0].0);
    assert!(diff < 1e-2, "{diff}");
}

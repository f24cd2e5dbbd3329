//! Greedy decoding with a KV cache, batched over prompts of different lengths (left-padded, the pads in
//! a document of their own so no real token attends to them). It stops each row at its first stop id.
//! It is not a sampler: no temperature, top-k or beam search.

// For tch tensors `a += b` is the in-place `add_`, which breaks autograd when `a` was saved for
// backward; `a = a + b` allocates a new tensor, which is what the math needs.
#![allow(clippy::assign_op_pattern)]

use crate::model::{KvCache, Llama};
use tch::{Kind, Tensor};

/// Generates up to `max_new_tokens` per prompt; each output excludes the prompt and the stop id.
pub fn greedy(model: &Llama, prompts: &[Vec<i64>], max_new_tokens: usize, stop_ids: &[i64]) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    assert!(prompts.iter().all(|p| !p.is_empty()), "every prompt needs at least one token");
    let mut ids = Vec::with_capacity(b * longest);
    let mut pos = Vec::with_capacity(b * longest);
    let mut docs = Vec::with_capacity(b * longest);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        pos.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as i64));
        docs.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let shape = [b as i64, longest as i64];
    let t = |v: Vec<i64>| Tensor::from_slice(&v).reshape(shape).to_device(dev);
    let (ids, mut pos, docs) = (t(ids), t(pos), t(docs));
    let mut cache = KvCache::default();
    let mut hidden = model.forward(&ids, &pos, Some(&docs), Some(&mut cache)); // (B, T, C)
    let one_doc = Tensor::ones([b as i64, 1], (Kind::Int64, dev));
    pos = pos.narrow(1, longest as i64 - 1, 1); // (B, 1)
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for _ in 0..max_new_tokens {
        let last = hidden.narrow(1, hidden.size()[1] - 1, 1); // (B, 1, C)
        let next = model.logits(&last).argmax(-1, false); // (B, 1)
                                                          // Host sync once per step: stopping is decided on the host.
        let host: Vec<i64> = Vec::<i64>::try_from(next.reshape([-1])).expect("int64 tokens");
        for (row, &tok) in host.iter().enumerate() {
            if done[row] {
                continue;
            }
            if stop_ids.contains(&tok) {
                done[row] = true;
            } else {
                out[row].push(tok);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        pos = pos + 1;
        hidden = model.forward(&next, &pos, Some(&one_doc), Some(&mut cache));
    }
    out
}

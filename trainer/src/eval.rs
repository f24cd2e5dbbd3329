//! Evaluation: SQuAD-style exact match and F1 (the normalisation and token F1 of SQuAD v1.1's official
//! `evaluate-v1.1.py`), and CoQA-style conversational QA: every question of every conversation is
//! answered by greedy generation (batched, KV cache) with the gold earlier answers as history, then
//! scored. Also the masked mean loss over a token cache (validation during training, `eval --metric loss`),
//! and the response loss's token set. Every function can work on one rank's share: batches are formed
//! the same way for any number of ranks (CoQA questions sorted by prompt length, then cut into batches)
//! and batch k goes to rank k mod world, so the combined sums equal a 1-rank evaluation.

use crate::batch::to_tensors;
use crate::model::Llama;
use crate::{generate, loss};
use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use ferrotune_data::loader::Loader;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::record::{ChatMessage, Role};
use ferrotune_data::template::Message;
use serde::Serialize;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// The tokens the response loss is measured on, whatever a run trains: assistant content and its
/// end-of-turn token (the `assistant` strategy with end-of-turn training). One definition for every
/// strategy, so response losses compare across trials and with the base model.
pub fn response_mask() -> MaskOptions {
    MaskOptions { strategy: Strategy::Assistant, train_eot: true }
}

/// Mean token loss over every row of `cache`, `batch` rows at a time, and the trained-token count.
pub fn mean_loss(model: &Llama, cache: &TokenCache, batch: usize) -> crate::Result<(f64, usize)> {
    let (sum, n) = loss_sums(model, cache, batch, 0, 1)?;
    Ok((sum / n.max(1) as f64, n))
}

/// Sum of token losses and trained tokens over rank `rank`'s share of `cache` (batches of `batch`
/// rows; batch k to rank k mod world). The sum stays on the device until the end: one host sync.
pub fn loss_sums(
    model: &Llama,
    cache: &TokenCache,
    batch: usize,
    rank: usize,
    world: usize,
) -> crate::Result<(f64, usize)> {
    let _g = tch::no_grad_guard();
    let loader = Loader::new(cache, 0, 1, 0, batch.max(1)).map_err(|e| crate::Error::Invalid(e.to_string()))?;
    let rows: Vec<usize> = (0..cache.rows()).collect();
    let mut sum = Tensor::zeros([], (Kind::Float, model.device()));
    let mut n = 0usize;
    for chunk in rows.chunks(batch.max(1)).skip(rank).step_by(world.max(1)) {
        let b = to_tensors(&loader.batch_of(chunk, 0), model.device());
        if b.trained == 0 {
            continue;
        }
        let hidden = model.forward_packed(&b.ids, &b.positions, &b.attend);
        sum += loss::masked_ce_sum(model, &hidden, &b.idx, &b.targets);
        n += b.trained;
    }
    Ok((sum.double_value(&[]), n))
}

/// SQuAD's `normalize_answer`: lower-case, drop ASCII punctuation, drop the words a/an/the, collapse
/// whitespace.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // re.sub(r"\b(a|an|the)\b", " ", text): remove maximal word-character runs equal to an article.
    let mut out = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn exact_match(prediction: &str, gold: &str) -> f64 {
    f64::from(u8::from(normalize_answer(prediction) == normalize_answer(gold)))
}

pub fn f1(prediction: &str, gold: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(gold);
    let (pt, gt): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), g.split_whitespace().collect());
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub conversation: usize,
    pub turn: usize,
    pub question: String,
    pub gold: String,
    pub prediction: String,
    pub em: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QaScore {
    /// Mean exact match and F1, in percent.
    pub em: f64,
    pub f1: f64,
    pub questions: usize,
    pub predictions: Vec<Prediction>,
}

/// One question to answer: its place, its prompt (the gold history through the chat template), the
/// question and the gold answer.
#[derive(Debug, Clone)]
pub struct QaJob {
    pub conversation: usize,
    pub turn: usize,
    pub ids: Vec<i64>,
    pub question: String,
    pub gold: String,
}

/// Every assistant turn of `conversations` (system + alternating user/assistant) as a question, sorted
/// by prompt length (then place) so that a batch wastes little padding.
pub fn qa_jobs(enc: &Encoder, conversations: &[Vec<ChatMessage>]) -> Result<Vec<QaJob>, String> {
    let template = enc.template.as_ref().ok_or("CoQA evaluation needs a chat template")?;
    let mut jobs = vec![];
    for (c, conv) in conversations.iter().enumerate() {
        let mut turn = 0;
        for (i, m) in conv.iter().enumerate() {
            if m.role != Role::Assistant || i == 0 {
                continue;
            }
            let history: Vec<Message> = conv[..i].iter().map(|m| Message::new(m.role.as_str(), &m.content)).collect();
            let text = template.render(&history, true).map_err(|e| e.to_string())?;
            let ids: Vec<i64> =
                enc.tokenizer.encode(&text).map_err(|e| e.to_string())?.into_iter().map(i64::from).collect();
            let (question, gold) = (conv[i - 1].content.clone(), m.content.clone());
            jobs.push(QaJob { conversation: c, turn, ids, question, gold });
            turn += 1;
        }
    }
    jobs.sort_by_key(|j| (j.ids.len(), j.conversation, j.turn));
    Ok(jobs)
}

/// Answers rank `rank`'s share of `jobs` (batches of `batch` in order; batch k to rank k mod world)
/// by greedy generation and scores them; `progress(done, of)` counts this rank's questions.
#[allow(clippy::too_many_arguments)]
pub fn answer_share(
    model: &Llama,
    enc: &Encoder,
    jobs: &[QaJob],
    max_new_tokens: usize,
    batch: usize,
    rank: usize,
    world: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Prediction>, String> {
    let template = enc.template.as_ref().ok_or("CoQA evaluation needs a chat template")?;
    let mut stop = model.config.eos_token_ids.clone();
    if let Some(id) = enc.tokenizer.token_id(&template.eos_token) {
        stop.push(i64::from(id));
    }
    let mine: Vec<&[QaJob]> = jobs.chunks(batch.max(1)).skip(rank).step_by(world.max(1)).collect();
    let total: usize = mine.iter().map(|c| c.len()).sum();
    let mut predictions = Vec::with_capacity(total);
    for chunk in mine {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|j| j.ids.clone()).collect();
        let outs = generate::greedy(model, &prompts, max_new_tokens, &stop);
        for (j, out) in chunk.iter().zip(outs) {
            let ids: Vec<u32> = out.iter().map(|&t| t as u32).collect();
            let text = enc.tokenizer.decode(&ids).map_err(|e| e.to_string())?.trim().to_owned();
            predictions.push(Prediction {
                conversation: j.conversation,
                turn: j.turn,
                question: j.question.clone(),
                gold: j.gold.clone(),
                em: exact_match(&text, &j.gold),
                f1: f1(&text, &j.gold),
                prediction: text,
            });
        }
        progress(predictions.len(), total);
    }
    Ok(predictions)
}

/// Answers every assistant turn of `conversations` given the gold history before it, `batch` questions
/// at a time, and scores the answers (one process; predictions in conversation order).
pub fn coqa(
    model: &Llama,
    enc: &Encoder,
    conversations: &[Vec<ChatMessage>],
    max_new_tokens: usize,
    batch: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<QaScore, String> {
    let jobs = qa_jobs(enc, conversations)?;
    let mut predictions = answer_share(model, enc, &jobs, max_new_tokens, batch, 0, 1, progress)?;
    predictions.sort_by_key(|p| (p.conversation, p.turn));
    let n = predictions.len().max(1) as f64;
    Ok(QaScore {
        em: 100.0 * predictions.iter().map(|p| p.em).sum::<f64>() / n,
        f1: 100.0 * predictions.iter().map(|p| p.f1).sum::<f64>() / n,
        questions: predictions.len(),
        predictions,
    })
}

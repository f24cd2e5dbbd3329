//! Evaluation during training, on every rank: the strategy's own validation loss, the response loss
//! (assistant content and end-of-turn tokens, the same for every strategy: `eval::response_mask`) and
//! CoQA EM/F1, each rank taking its share of the validation rows and questions, combined exactly (sums
//! and counts all-reduced in f64, never averages of averages). Also early stopping: evaluations without
//! an improvement of the chosen metric by more than `eval.early_stopping_min_delta`, counted across
//! resumes (the state is saved in every checkpoint). The training loop calls it; it does not train.

use crate::dist::Collective;
use crate::eval::{self, QaJob};
use crate::model::Llama;
use crate::{Error, Result};
use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The metrics early stopping can watch.
pub const METRICS: [&str; 4] = ["response_loss", "loss", "em", "f1"];

/// What one evaluation measured (identical on every rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Mean loss over the tokens the run's own strategy trains.
    pub loss: f64,
    /// Mean loss over assistant content and end-of-turn tokens.
    pub response_loss: f64,
    pub response_tokens: usize,
    /// CoQA EM and F1 in percent, and the questions answered.
    pub qa: Option<(f64, f64, usize)>,
    /// Wall time of the evaluation.
    pub seconds: f64,
}

impl Scores {
    /// The value of `metric` (one of METRICS) and whether lower is better.
    pub fn metric(&self, metric: &str) -> Option<(f64, bool)> {
        match metric {
            "response_loss" => Some((self.response_loss, true)),
            "loss" => Some((self.loss, true)),
            "em" => self.qa.map(|q| (q.0, false)),
            "f1" => self.qa.map(|q| (q.1, false)),
            _ => None,
        }
    }

    /// The scalars to log, named as in metrics.jsonl and TensorBoard.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v =
            vec![("eval/loss", self.loss), ("eval/response_loss", self.response_loss), ("eval/seconds", self.seconds)];
        if let Some((em, f1, _)) = self.qa {
            v.extend([("eval/em", em), ("eval/f1", f1)]);
        }
        v
    }
}

/// The validation data an evaluation reads.
pub struct Validation {
    pub own: TokenCache,
    /// The same file prepared with the response mask (a second cache unless the run's mask is it).
    pub response: Option<TokenCache>,
    /// CoQA questions, sorted by prompt length, when `eval.coqa`.
    pub qa: Vec<QaJob>,
}

/// Evaluates `model` on this rank's share of `val` and combines the shares over `coll`.
pub fn evaluate(
    model: &Llama,
    enc: &Encoder,
    val: &Validation,
    batch: usize,
    qa: Option<(usize, usize)>,
    coll: &mut dyn Collective,
) -> Result<Scores> {
    let t0 = Instant::now();
    let (rank, world) = (coll.rank(), coll.world());
    let (own_sum, own_n) = eval::loss_sums(model, &val.own, batch, rank, world)?;
    let (resp_sum, resp_n) = match &val.response {
        Some(c) => eval::loss_sums(model, c, batch, rank, world)?,
        None => (own_sum, own_n),
    };
    let mut qa_sums = [0.0; 3];
    if let Some((max_new_tokens, qa_batch)) = qa {
        let p = eval::answer_share(model, enc, &val.qa, max_new_tokens, qa_batch, rank, world, &|_, _| {})
            .map_err(Error::Invalid)?;
        qa_sums = [p.iter().map(|p| p.em).sum(), p.iter().map(|p| p.f1).sum(), p.len() as f64];
    }
    let mut sums = [own_sum, own_n as f64, resp_sum, resp_n as f64, qa_sums[0], qa_sums[1], qa_sums[2]];
    coll.all_reduce_f64(&mut sums)?;
    let mean = |s: f64, n: f64| s / n.max(1.0);
    let questions = sums[6] as usize;
    Ok(Scores {
        loss: mean(sums[0], sums[1]),
        response_loss: mean(sums[2], sums[3]),
        response_tokens: sums[3] as usize,
        qa: qa.map(|_| (100.0 * mean(sums[4], sums[6]), 100.0 * mean(sums[5], sums[6]), questions)),
        // The slowest rank's time is the evaluation's.
        seconds: coll.all_gather_f64(t0.elapsed().as_secs_f64())?.into_iter().fold(0.0, f64::max),
    })
}

/// Early stopping's state, saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct EarlyStop {
    /// The best value of the watched metric so far.
    pub best: Option<f64>,
    /// Evaluations since the last improvement.
    pub bad: usize,
    /// The step at which the run stopped early, once it has.
    pub stopped_at: Option<u64>,
}

impl EarlyStop {
    /// Takes an evaluation's value (`lower`: lower is better) and says whether to stop: `patience`
    /// evaluations in a row without an improvement of more than `min_delta` (patience 0: never).
    pub fn update(&mut self, value: f64, lower: bool, patience: usize, min_delta: f64) -> bool {
        let better = match self.best {
            None => true,
            Some(b) if lower => b - value > min_delta,
            Some(b) => value - b > min_delta,
        };
        if better {
            self.best = Some(value);
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        patience > 0 && self.bad >= patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stop_counts_evaluations_without_a_large_enough_improvement() {
        let mut e = EarlyStop::default();
        // Lower is better; min_delta 0.01: 2.0 (best), 1.995 (not enough), 1.98 (better), then flat.
        let stops: Vec<bool> = [2.0, 1.995, 1.98, 1.98, 1.985].iter().map(|&v| e.update(v, true, 2, 0.01)).collect();
        assert_eq!(stops, [false, false, false, false, true]);
        assert_eq!((e.best, e.bad), (Some(1.98), 2));
        // Higher is better (EM): a rise resets the count.
        let mut e = EarlyStop::default();
        let stops: Vec<bool> = [10.0, 10.0, 12.0, 11.0, 12.0].iter().map(|&v| e.update(v, false, 2, 0.0)).collect();
        assert_eq!(stops, [false, false, false, false, true]);
        // Patience 0 never stops.
        let mut e = EarlyStop::default();
        assert!(![1.0, 1.0, 1.0].iter().any(|&v| e.update(v, true, 0, 0.0)));
    }
}

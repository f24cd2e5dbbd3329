//! Learning-rate schedules as pure functions of the optimizer step, matching transformers'
//! `get_scheduler` (linear, cosine with cycles and a floor, constant; all with linear warmup). As in
//! transformers, step 0 (the first update) uses factor(0), which is 0 when there is warmup.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: Scheduler,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Floor as a fraction of the peak (cosine and linear).
    pub min_lr_ratio: f64,
    /// Cosine cycles (0.5 = one half-wave from peak to floor, transformers' default).
    pub cycles: f64,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let factor = if step < self.warmup_steps {
            s / w.max(1.0)
        } else {
            let progress = (s - w) / (t - w).max(1.0);
            let decay = match self.kind {
                Scheduler::Constant => return self.peak_lr,
                Scheduler::Linear => (1.0 - progress).max(0.0),
                Scheduler::Cosine => {
                    (0.5 * (1.0 + (std::f64::consts::PI * self.cycles * 2.0 * progress).cos())).max(0.0)
                }
            };
            decay * (1.0 - self.min_lr_ratio) + self.min_lr_ratio
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_schedulers() {
        // python: from transformers import get_scheduler; opt = torch.optim.SGD([p], lr=1e-3)
        //   s = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
        //   [opt.param_groups[0]["lr"] then s.step() for 10 steps]
        let lin = Schedule {
            kind: Scheduler::Linear,
            peak_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            min_lr_ratio: 0.0,
            cycles: 0.5,
        };
        let want = [0.0, 5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4];
        for (i, w) in want.iter().enumerate() {
            assert!((lin.lr(i as u64) - w).abs() < 1e-12, "linear step {i}: {} vs {w}", lin.lr(i as u64));
        }
        // "cosine", warmup 1, 5 steps: [0, 1e-3, 8.5355e-4, 5e-4, 1.4645e-4]
        let cos = Schedule { kind: Scheduler::Cosine, total_steps: 5, warmup_steps: 1, ..lin };
        let want = [0.0, 1e-3, 8.535533905932737e-4, 5e-4, 1.4644660940672628e-4];
        for (i, w) in want.iter().enumerate() {
            assert!((cos.lr(i as u64) - w).abs() < 1e-12, "cosine step {i}: {}", cos.lr(i as u64));
        }
        // "cosine_with_min_lr" with min_lr_rate=0.1: floor at 1e-4.
        let floor = Schedule { min_lr_ratio: 0.1, ..cos };
        assert!((floor.lr(4) - (1.4644660940672628e-4 * 0.9 + 1e-4)).abs() < 1e-12);
    }
}

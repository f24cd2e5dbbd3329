//! AdamW in Rust with PyTorch's exact update order (`torch.optim.AdamW`, single-tensor path): decoupled
//! weight decay, fp32 moments, and fp32 master weights when the model computes in bf16, so the state can
//! be saved and a resumed run continues bit for bit. Parameters of fewer than 2 dimensions (norms,
//! biases) get no weight decay. Also global-norm gradient clipping. It does not schedule the learning
//! rate or all-reduce gradients.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Param {
    pub name: String,
    /// The model's tensor (compute dtype), which gets `.grad()`.
    pub tensor: Tensor,
    /// fp32 copy that the update is applied to when the model is not fp32.
    pub master: Option<Tensor>,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    pub fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let _g = tch::no_grad_guard();
        let params = named
            .into_iter()
            .map(|(name, tensor)| {
                let master = (tensor.kind() != Kind::Float).then(|| tensor.detach().to_kind(Kind::Float));
                let zeros = || Tensor::zeros_like(&tensor).to_kind(Kind::Float);
                Param { decay: tensor.dim() >= 2, exp_avg: zeros(), exp_avg_sq: zeros(), master, name, tensor }
            })
            .collect();
        AdamW { params, cfg, step: 0 }
    }

    /// Global L2 norm of all gradients (fp32, on device, no host sync), and scales the gradients down
    /// to `max_norm` when above it (torch's clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))).
    /// `max_norm <= 0` only measures.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Tensor {
        let _g = tch::no_grad_guard();
        let norms: Vec<Tensor> = self.params.iter().map(|p| p.tensor.grad().to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        if max_norm > 0.0 {
            let coef = (Tensor::full([], max_norm, (Kind::Float, total.device())) / (&total + 1e-6)).clamp_max(1.0);
            for p in &self.params {
                let _ = p.tensor.grad().g_mul_(&coef.to_kind(p.tensor.kind()));
            }
        }
        total
    }

    /// One update with learning rate `lr`, then zeroes the gradients.
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for p in &mut self.params {
            let grad = p.tensor.grad().to_kind(Kind::Float);
            let mut w = p.master.as_ref().map_or_else(|| p.tensor.shallow_clone(), Tensor::shallow_clone);
            if p.decay && weight_decay != 0.0 {
                let _ = w.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let _ = p.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
            let _ = p.exp_avg_sq.g_add_(&(&grad * (1.0 - beta2) * &grad));
            let denom = p.exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
            let _ = w.g_add_(&((&p.exp_avg / &denom) * (-step_size)));
            if p.master.is_some() {
                p.tensor.shallow_clone().copy_(&w);
            }
            let _ = p.tensor.grad().zero_();
        }
    }

    /// Saves moments and masters as `optimizer.safetensors` in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut named = vec![];
        for p in &self.params {
            named.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            named.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
            if let Some(m) = &p.master {
                named.push((format!("{}.master", p.name), m.shallow_clone()));
            }
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        crate::checkpoint::save_named(&dir.join("optimizer.safetensors"), &named)
    }

    /// Restores what `save` wrote; every parameter must be there with its shape.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("optimizer.safetensors");
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .map_err(|e| Error::Checkpoint { path: path.clone(), msg: format!("cannot read optimizer state: {e}") })?
            .into_iter()
            .collect();
        let get = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::Tensor {
                path: path.clone(),
                tensor: name.into(),
                msg: "missing from the optimizer state; hint: was the checkpoint written by another configuration?"
                    .into(),
            })?;
            if t.size() != like.size() {
                return Err(Error::Tensor {
                    path: path.clone(),
                    tensor: name.into(),
                    msg: format!("shape {:?}, expected {:?}", t.size(), like.size()),
                });
            }
            Ok(t.to_device(like.device()))
        };
        let _g = tch::no_grad_guard();
        for p in &mut self.params {
            p.exp_avg = get(&format!("{}.exp_avg", p.name), &p.exp_avg)?;
            p.exp_avg_sq = get(&format!("{}.exp_avg_sq", p.name), &p.exp_avg_sq)?;
            if let Some(m) = &p.master {
                p.master = Some(get(&format!("{}.master", p.name), m)?);
            }
        }
        let step =
            tensors.get("step").ok_or_else(|| Error::Checkpoint { path: path.clone(), msg: "no `step`".into() })?;
        self.step = step.int64_value(&[0]) as u64;
        Ok(())
    }
}

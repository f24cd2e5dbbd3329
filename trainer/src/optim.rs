//! AdamW in Rust with PyTorch's exact update order (`torch.optim.AdamW`, single-tensor path): decoupled
//! weight decay, fp32 moments, and fp32 master weights when the model computes in bf16, so the state can
//! be saved and a resumed run continues bit for bit. Parameters of fewer than 2 dimensions (norms,
//! biases) get no weight decay. Also global-norm gradient clipping.
//!
//! The state is flat: one fp32 vector each of first moments, second moments (and masters) over the
//! slice of the flat parameter space (`dist::flat`) this rank updates, which is all of it unsharded,
//! and 1/W of it with `train.shard = "optimizer" | "gradients"` (ZeRO stages 1 and 2). Every update is
//! elementwise, so a slice computes exactly what the whole would. Sharded, the gradient of the slice
//! is the optimizer's own buffer (`shard_grad`, filled by the gradient buckets' reduce-scatter);
//! unsharded it is each parameter's `.grad`. It does not schedule the learning rate, reduce gradients
//! or gather the updated weights (`dist::buckets`); saving and re-slicing the state is `optim_state`.

use crate::dist::flat::{Layout, Segment};
use crate::dist::Collective;
use crate::error::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Which slice of the flat parameter space an optimizer updates: rank `rank` of `world` (world 1: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOf {
    pub rank: usize,
    pub world: usize,
}

impl ShardOf {
    pub const ALL: ShardOf = ShardOf { rank: 0, world: 1 };
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// The trainable tensors (compute dtype), which get `.grad()`, under their checkpoint names.
    pub(crate) params: Vec<(String, Tensor)>,
    pub(crate) layout: Layout,
    pub(crate) shard: ShardOf,
    /// This rank's pieces of the trainable tensors, in flat order.
    pub(crate) segments: Vec<Segment>,
    /// Per trainable tensor: whether weight decay applies (2 or more dimensions).
    decay: Vec<bool>,
    /// (n,) fp32 over this rank's slice of n elements.
    pub(crate) exp_avg: Tensor,
    pub(crate) exp_avg_sq: Tensor,
    /// (n,) fp32 copy of the slice's weights that the update is applied to when the model is not fp32.
    pub(crate) master: Option<Tensor>,
    /// Sharded: (n,) the slice's summed gradient, in the parameters' dtype. None: each `.grad`.
    shard_grad: Option<Tensor>,
}

impl AdamW {
    /// The optimizer of `named` (trainable tensors of one dtype, of a model with `layers` decoder
    /// layers) for `shard`'s slice of them.
    pub fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig, layers: usize, shard: ShardOf) -> Self {
        let _g = tch::no_grad_guard();
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        let numels: Vec<usize> = named.iter().map(|(_, t)| t.numel()).collect();
        let layout = Layout::new(&names, &numels, layers, shard.world);
        let segments = layout.segments(shard.rank);
        let (lo, hi) = layout.range(shard.rank);
        let n = (hi - lo) as i64;
        let (kind, device) = named.first().map_or((Kind::Float, tch::Device::Cpu), |(_, t)| (t.kind(), t.device()));
        let zeros = || Tensor::zeros([n], (Kind::Float, device));
        let master = (kind != Kind::Float).then(|| {
            let m = zeros();
            for s in &segments {
                m.narrow(0, s.at as i64, s.len as i64).copy_(&piece(&named[s.param].1, s));
            }
            m
        });
        let shard_grad = (shard.world > 1).then(|| Tensor::zeros([n], (kind, device)));
        let decay = named.iter().map(|(_, t)| t.dim() >= 2).collect();
        AdamW {
            cfg,
            step: 0,
            params: named,
            layout,
            shard,
            segments,
            decay,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            master,
            shard_grad,
        }
    }

    /// The flat layout and this rank's slice (what the gradient buckets reduce-scatter into).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn shard(&self) -> ShardOf {
        self.shard
    }

    /// Sharded: the (n,) gradient buffer of this rank's slice, which the buckets add into.
    pub fn shard_grad(&self) -> Option<Tensor> {
        self.shard_grad.as_ref().map(Tensor::shallow_clone)
    }

    /// Bytes of the optimizer's state tensors on this rank (moments and masters).
    pub fn state_bytes(&self) -> usize {
        let n = self.exp_avg.numel();
        4 * (2 * n + self.master.as_ref().map_or(0, |m| m.numel()))
    }

    /// What `state_bytes` would be unsharded: 8 bytes a trainable element, 12 with masters.
    pub fn unsharded_state_bytes(&self) -> usize {
        self.layout.total * if self.master.is_some() { 12 } else { 8 }
    }

    /// The gradient of segment `s`, (len,) in the parameters' dtype: a view, so scaling it in place
    /// scales what the update reads.
    fn grad_of(&self, s: &Segment) -> Tensor {
        match &self.shard_grad {
            Some(g) => g.narrow(0, s.at as i64, s.len as i64),
            None => piece(&self.params[s.param].1.grad(), s),
        }
    }

    /// Global L2 norm of all gradients (fp32, on device, no host sync), and scales the gradients down
    /// to `max_norm` when above it (torch's clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6))).
    /// Sharded, the norm is the square root of the squared slice norms summed over `coll`'s ranks.
    /// `max_norm <= 0` only measures.
    pub fn clip_grad_norm(&self, max_norm: f64, coll: &mut dyn Collective) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let device = self.exp_avg.device();
        let norms: Vec<Tensor> = self.segments.iter().map(|s| self.grad_of(s).to_kind(Kind::Float).norm()).collect();
        let local =
            if norms.is_empty() { Tensor::zeros([], (Kind::Float, device)) } else { Tensor::stack(&norms, 0).norm() };
        let total = if self.shard.world > 1 {
            let sq = local.square().reshape([1]);
            coll.all_reduce_sum(&sq)?;
            sq.sqrt().reshape([])
        } else {
            local
        };
        if max_norm > 0.0 {
            let coef = (Tensor::full([], max_norm, (Kind::Float, device)) / (&total + 1e-6)).clamp_max(1.0);
            for s in &self.segments {
                let mut g = self.grad_of(s);
                let _ = g.g_mul_(&coef.to_kind(g.kind()));
            }
        }
        Ok(total)
    }

    /// One update of this rank's slice with learning rate `lr`, then zeroes the gradients.
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for s in &self.segments {
            let (at, len) = (s.at as i64, s.len as i64);
            let grad = self.grad_of(s).to_kind(Kind::Float);
            let weights = piece(&self.params[s.param].1, s);
            let mut w = self.master.as_ref().map_or_else(|| weights.shallow_clone(), |m| m.narrow(0, at, len));
            if self.decay[s.param] && weight_decay != 0.0 {
                let _ = w.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let mut exp_avg = self.exp_avg.narrow(0, at, len);
            let mut exp_avg_sq = self.exp_avg_sq.narrow(0, at, len);
            let _ = exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = exp_avg_sq.g_mul_scalar_(beta2);
            let _ = exp_avg_sq.g_add_(&(&grad * (1.0 - beta2) * &grad));
            let denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
            let _ = w.g_add_(&((&exp_avg / &denom) * (-step_size)));
            if self.master.is_some() {
                weights.shallow_clone().copy_(&w);
            }
        }
        self.zero_grad();
    }

    /// Zeroes the parameters' gradients (those that hold one) and the slice's gradient buffer.
    pub fn zero_grad(&mut self) {
        let _g = tch::no_grad_guard();
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() && g.numel() > 0 {
                let _ = g.zero_();
            }
        }
        if let Some(g) = &mut self.shard_grad {
            let _ = g.zero_();
        }
    }
}

/// Segment `s` of tensor `t` (flattened): a (len,) view.
fn piece(t: &Tensor, s: &Segment) -> Tensor {
    t.view([-1]).narrow(0, s.start as i64, s.len as i64)
}

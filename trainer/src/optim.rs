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

    /// Keeps the moments in bf16 and applies the update to the bf16 weights themselves, without fp32
    /// masters: what `torch.optim.AdamW` does on a bf16 model (transformers' pure-bf16 loop). The state
    /// takes 4 bytes a trainable element instead of 12; updates smaller than a bf16 weight's spacing
    /// (2^-8 of it) are lost, which is the price. Only for bf16 parameters, before the first step.
    pub fn use_bf16_state(&mut self) -> Result<()> {
        let kind = self.params.first().map_or(Kind::Float, |(_, t)| t.kind());
        if kind != Kind::BFloat16 || self.step > 0 {
            return Err(crate::error::Error::Invalid(format!(
                "bf16 optimizer state needs bf16 parameters and a fresh optimizer (parameters are {kind:?}, step {})",
                self.step
            )));
        }
        let _g = tch::no_grad_guard();
        self.master = None;
        self.exp_avg = self.exp_avg.to_kind(Kind::BFloat16);
        self.exp_avg_sq = self.exp_avg_sq.to_kind(Kind::BFloat16);
        Ok(())
    }

    /// The dtype of the moments (fp32, or bf16 after `use_bf16_state`).
    pub fn state_kind(&self) -> Kind {
        self.exp_avg.kind()
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
        let moment = if self.state_kind() == Kind::BFloat16 { 2 } else { 4 };
        moment * 2 * self.exp_avg.numel() + 4 * self.master.as_ref().map_or(0, |m| m.numel())
    }

    /// What `state_bytes` would be unsharded: 8 bytes a trainable element, 12 with masters, 4 in bf16.
    pub fn unsharded_state_bytes(&self) -> usize {
        self.layout.total
            * if self.state_kind() == Kind::BFloat16 {
                4
            } else if self.master.is_some() {
                12
            } else {
                8
            }
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

    /// One update of this rank's slice with learning rate `lr`, then zeroes the gradients: through
    /// libtorch's fused AdamW kernel where this build has it (`fused_step`), else operation by operation
    /// (`unfused_step`). Both compute torch.optim.AdamW's update; tests/train_parity.rs holds either to it.
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        if FUSED && std::env::var_os("FERROTUNE_UNFUSED_ADAMW").is_none() {
            self.fused_step(lr);
        } else {
            self.unfused_step(lr);
        }
        self.zero_grad();
    }

    /// The update in one pass per tensor (aten::_fused_adamw_), one segment at a time, so that the
    /// only temporary is the fp32 copy of one segment's bf16 gradient when updating fp32 masters.
    fn fused_step(&mut self, lr: f64) {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let step = Tensor::full([], self.step as f64, (Kind::Float, self.exp_avg.device()));
        for s in &self.segments {
            let (at, len) = (s.at as i64, s.len as i64);
            let weights = piece(&self.params[s.param].1, s);
            let (w, grad) = match &self.master {
                Some(m) => (m.narrow(0, at, len), self.grad_of(s).to_kind(Kind::Float)),
                None => (weights.shallow_clone(), self.grad_of(s)),
            };
            let wd = if self.decay[s.param] { weight_decay } else { 0.0 };
            let (m, v) = (self.exp_avg.narrow(0, at, len), self.exp_avg_sq.narrow(0, at, len));
            fused_adamw(&w, &grad, &m, &v, &step, lr, beta1, beta2, wd, eps);
            if self.master.is_some() {
                weights.shallow_clone().copy_(&w);
            }
        }
    }

    /// The update operation by operation, in torch.optim.AdamW's single-tensor order.
    fn unfused_step(&mut self, lr: f64) {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for s in &self.segments {
            let (at, len) = (s.at as i64, s.len as i64);
            // In the state's dtype: fp32, or bf16 throughout as torch.optim.AdamW on bf16 tensors.
            let grad = self.grad_of(s).to_kind(self.exp_avg.kind());
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

/// Whether this build has libtorch's fused AdamW kernel (trainer/csrc/fused_adamw.cpp).
pub const FUSED: bool = cfg!(ferrotune_fused_adamw);

#[cfg(ferrotune_fused_adamw)]
unsafe extern "C" {
    fn ferrotune_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        n: i64,
        step: *mut torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> i32;
    fn ferrotune_fused_adamw_error() -> *const std::ffi::c_char;
}

/// One fused AdamW update of `w` in place (all four tensors of one dtype and device).
#[allow(clippy::too_many_arguments)]
fn fused_adamw(
    w: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &Tensor,
    lr: f64,
    b1: f64,
    b2: f64,
    wd: f64,
    eps: f64,
) {
    #[cfg(ferrotune_fused_adamw)]
    {
        let ptr = |t: &Tensor| [t.as_ptr() as *mut torch_sys::C_tensor];
        let (pw, pg, pm, pv) = (ptr(w), ptr(grad), ptr(m), ptr(v));
        // SAFETY: each handle is a live at::Tensor owned by the caller for the whole call.
        let rc = unsafe {
            ferrotune_fused_adamw(
                pw.as_ptr(),
                pg.as_ptr(),
                pm.as_ptr(),
                pv.as_ptr(),
                1,
                step.as_ptr() as *mut torch_sys::C_tensor,
                lr,
                b1,
                b2,
                wd,
                eps,
            )
        };
        if rc != 0 {
            // SAFETY: the shim's own NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr(ferrotune_fused_adamw_error()) };
            panic!("aten::_fused_adamw_ failed on {:?} {:?}: {}", w.kind(), w.device(), msg.to_string_lossy());
        }
    }
    #[cfg(not(ferrotune_fused_adamw))]
    {
        let _ = (w, grad, m, v, step, lr, b1, b2, wd, eps);
        unreachable!("fused_step runs only where FUSED is true")
    }
}

/// Segment `s` of tensor `t` (flattened): a (len,) view.
fn piece(t: &Tensor, s: &Segment) -> Tensor {
    t.view([-1]).narrow(0, s.start as i64, s.len as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both updates (fused kernel, operation by operation) of fp32 weights, bf16 weights with fp32
    /// masters, and bf16 state follow an fp32 reference trajectory (the unfused update of fp32 copies
    /// of the same starting weights and gradients) over 3 steps of lr 0.1 with weight decay on the
    /// matrix only. fp32 agrees to roundoff (1e-5); bf16 weights to a few bf16 steps of weights of
    /// magnitude up to 4 (0.05), while a wrong sign, moment or bias correction moves a weight by the
    /// whole update (0.1 a step).
    #[test]
    fn fused_and_unfused_updates_follow_the_fp32_reference() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let cpu = tch::Device::Cpu;
        let rounded =
            |shape: &[i64]| Tensor::randn(shape, (Kind::Float, cpu)).to_kind(Kind::BFloat16).to_kind(Kind::Float);
        tch::manual_seed(7);
        let init = [rounded(&[16, 8]), rounded(&[8])];
        let grads: Vec<[Tensor; 2]> = (0..3).map(|_| [rounded(&[16, 8]), rounded(&[8])]).collect();
        let make = |kind: Kind, bf16_state: bool| {
            let named = ["w", "b"]
                .iter()
                .zip(&init)
                .map(|(n, t)| (n.to_string(), t.to_kind(kind).copy().set_requires_grad(true)));
            let mut opt = AdamW::new(named.collect(), cfg, 1, ShardOf::ALL);
            if bf16_state {
                opt.use_bf16_state().unwrap();
            }
            opt
        };
        let run = |opt: &mut AdamW, fused: bool| {
            for g in &grads {
                let loss = opt.params.iter().zip(g).map(|((_, p), g)| (p.to_kind(Kind::Float) * g).sum(Kind::Float));
                loss.fold(Tensor::zeros([], (Kind::Float, cpu)), |a, b| a + b).backward();
                let _g = tch::no_grad_guard();
                opt.step += 1;
                if fused {
                    opt.fused_step(0.1);
                } else {
                    opt.unfused_step(0.1);
                }
                opt.zero_grad();
            }
        };
        let mut reference = make(Kind::Float, false);
        run(&mut reference, false);
        let fused_modes: &[bool] = if FUSED { &[false, true] } else { &[false] };
        for (kind, bf16_state, tol) in
            [(Kind::Float, false, 1e-5), (Kind::BFloat16, false, 0.05), (Kind::BFloat16, true, 0.05)]
        {
            for &fused in fused_modes {
                let mut opt = make(kind, bf16_state);
                run(&mut opt, fused);
                for ((n, a), (_, b)) in opt.params.iter().zip(&reference.params) {
                    let moved = (b - &init[usize::from(n == "b")]).abs().max().double_value(&[]);
                    let diff = (a.to_kind(Kind::Float) - b).abs().max().double_value(&[]);
                    assert!(moved > 0.2, "the reference barely moved `{n}` ({moved})");
                    assert!(
                        diff <= tol,
                        "{kind:?}, bf16 state {bf16_state}, fused {fused}: `{n}` is {diff} from the reference"
                    );
                }
                assert_eq!(opt.state_kind(), if bf16_state { Kind::BFloat16 } else { Kind::Float });
            }
        }
    }
}

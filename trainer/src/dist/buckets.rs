//! Gradients reduced over ranks while backward still runs, as PyTorch DDP does from its autograd hooks,
//! and, sharded, the updated weights gathered after the step. The trainable tensors lie end to end in
//! the flat parameter space (`flat`, backward order: head, layer L-1, …, layer 0, embeddings), cut into
//! contiguous buckets of about `train.bucket_mb` (25 MiB, DESIGN.md §4). When the layer-wise step
//! reports a stage done, every bucket whose tensors all belong to stages done by then is flattened
//! into an fp32 buffer and its reduction started (on the ring's communication thread, or NCCL's side
//! stream); at most `IN_FLIGHT` are in flight, and `finish` waits for the rest. What a reduction is
//! depends on `train.shard`:
//! - `none`: an all-reduce, whose sums are written back into each parameter's `.grad`;
//! - `optimizer` (ZeRO-1): a reduce-scatter, each rank adding its slice of the sums into the
//!   optimizer's slice gradient; the `.grad`s stay whole (and are zeroed by the step);
//! - `gradients` (ZeRO-2): the same, and each bucket's `.grad`s are freed as soon as it is flattened
//!   (and made again, zeroed, just before the next stage's backward), so a rank holds full gradients of
//!   the buckets in flight and the stage in backward only. Every micro-batch reduces.
//!
//! Otherwise only the last micro-batch of a step reduces. After a sharded step, `gather_weights`
//! all-gathers every bucket's updated weights, one bucket at a time. This file does not run backward
//! (`layerwise`) or update weights (`optim`).

use super::flat::bounds_within;
use super::Collective;
use crate::error::{Error, Result};
use crate::layerwise::Stage;
use crate::optim::AdamW;
use tch::{Kind, Tensor};

/// Started buckets whose results have not been written back, at most; past it the oldest are waited
/// for and written back, so the flat copies in flight stay near `IN_FLIGHT` buckets (100 MiB by
/// default) rather than a second copy of every gradient.
pub const IN_FLIGHT: usize = 4;

/// `train.shard`: what the optimizer's state and the gradients are sliced over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shard {
    None,
    /// ZeRO-1: optimizer state (moments, fp32 masters).
    Optimizer,
    /// ZeRO-2: optimizer state and gradients.
    Gradients,
}

impl Shard {
    /// A `train.shard` value, or an error saying what it may be.
    pub fn parse(s: &str) -> Result<Shard> {
        match s {
            "none" => Ok(Shard::None),
            "optimizer" => Ok(Shard::Optimizer),
            "gradients" => Ok(Shard::Gradients),
            v => Err(Error::Invalid(format!("`{v}` is not none, optimizer (ZeRO-1) or gradients (ZeRO-2)"))),
        }
    }
}

struct Bucket {
    /// Indices into `GradBuckets::params`, in flat order.
    members: Vec<usize>,
    /// The bucket's range of the flat space.
    lo: usize,
    hi: usize,
    /// Backward rank of the last stage its members belong to: the bucket is final after it.
    ready_after: usize,
    /// The flat fp32 gradients while their reduction runs (hi - lo elements, on the collective's device).
    flat: Option<Tensor>,
}

pub struct GradBuckets {
    params: Vec<Tensor>,
    /// Indices into `params` of each stage's tensors, by backward rank (what ZeRO-2 makes again).
    by_stage: Vec<Vec<usize>>,
    buckets: Vec<Bucket>,
    /// First bucket not yet started.
    next: usize,
    /// First bucket not yet written back.
    written: usize,
    layers: usize,
    shard: Shard,
    /// Rank r's slice of the flat space is `bounds[r]..bounds[r + 1]` (sharded).
    bounds: Vec<usize>,
    rank: usize,
    /// Sharded: the optimizer's gradient of this rank's slice, which reductions add into.
    shard_grad: Option<Tensor>,
    /// With tied embeddings the head's backward adds into the embeddings' gradient.
    tied: bool,
}

impl GradBuckets {
    /// Buckets of about `bucket_bytes` over the tensors `opt` trains, in its flat layout, for a model
    /// with `layers` decoder layers (`tied`: embeddings shared with `lm_head`). Sharded, reductions add
    /// this rank's part into `opt`'s slice gradient.
    pub fn new(opt: &AdamW, layers: usize, bucket_bytes: usize, shard: Shard, tied: bool) -> Self {
        let (layout, params) = (opt.layout(), &opt.params);
        let mut buckets: Vec<Bucket> = vec![];
        let mut by_stage = vec![vec![]; layers + 2];
        let mut bytes = 0;
        for &i in &layout.order {
            let (name, t) = &params[i];
            let size = t.numel() * 4;
            let (lo, hi) = (layout.offset[i], layout.offset[i] + t.numel());
            let ready = Stage::of(name).backward_rank(layers);
            by_stage[ready].push(i);
            match buckets.last_mut() {
                Some(b) if bytes + size <= bucket_bytes => {
                    b.members.push(i);
                    b.hi = hi;
                    b.ready_after = ready;
                    bytes += size;
                }
                _ => {
                    buckets.push(Bucket { members: vec![i], lo, hi, ready_after: ready, flat: None });
                    bytes = size;
                }
            }
        }
        GradBuckets {
            params: params.iter().map(|(_, t)| t.shallow_clone()).collect(),
            by_stage,
            buckets,
            next: 0,
            written: 0,
            layers,
            shard,
            bounds: layout.bounds.clone(),
            rank: opt.shard().rank,
            shard_grad: opt.shard_grad(),
            tied,
        }
    }

    /// Number of buckets (for logs and tests).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether every micro-batch (not only a step's last) reduces: ZeRO-2 frees the gradients.
    pub fn reduces_every_micro_batch(&self) -> bool {
        self.shard == Shard::Gradients
    }

    /// Before a micro-batch's backward (ZeRO-2): the head's gradients (and the tied embeddings') exist.
    pub fn begin(&mut self) {
        if self.shard == Shard::Gradients {
            self.materialize(Stage::Head.backward_rank(self.layers));
            if self.tied {
                self.materialize(Stage::Embed.backward_rank(self.layers));
            }
        }
    }

    /// `stage`'s gradients are final: starts the reduction of every bucket that is now complete, and
    /// (ZeRO-2) makes the next stage's gradients again.
    pub fn stage_done(&mut self, coll: &mut dyn Collective, stage: Stage) -> Result<()> {
        let done = stage.backward_rank(self.layers);
        self.start_through(coll, done)?;
        if self.shard == Shard::Gradients {
            self.materialize(done + 1);
        }
        Ok(())
    }

    /// Zeroed gradients for the freed `.grad`s of the stage of backward rank `stage`: autograd adds
    /// into a `.grad` that exists, so a freed one (0 elements) must have its shape back first.
    fn materialize(&mut self, stage: usize) {
        let _guard = tch::no_grad_guard();
        for &i in self.by_stage.get(stage).into_iter().flatten() {
            let p = &self.params[i];
            let mut g = p.grad();
            if g.defined() && g.numel() == 0 && p.numel() > 0 {
                g.set_data(&p.zeros_like());
            }
        }
    }

    fn start_through(&mut self, coll: &mut dyn Collective, done: usize) -> Result<()> {
        let _guard = tch::no_grad_guard();
        while self.next < self.buckets.len() && self.buckets[self.next].ready_after <= done {
            let b = &mut self.buckets[self.next];
            let flat = Tensor::cat(
                &b.members
                    .iter()
                    .map(|&i| {
                        let p = &self.params[i];
                        let g = p.grad();
                        let g = if g.defined() && g.numel() == p.numel() { g } else { p.zeros_like() };
                        g.to_kind(Kind::Float).reshape([-1]).to_device(coll.device())
                    })
                    .collect::<Vec<_>>(),
                0,
            ); // (hi - lo,)
            match self.shard {
                Shard::None => coll.start_all_reduce_sum(&flat)?,
                _ => coll.start_reduce_scatter_sum(&flat, &bounds_within(&self.bounds, b.lo, b.hi))?,
            }
            if self.shard == Shard::Gradients {
                // The flat copy holds them now: free the full gradients (the shape comes back zeroed
                // before the stage that adds into them next).
                let empty = Tensor::zeros([0], (self.params[b.members[0]].kind(), self.params[b.members[0]].device()));
                for &i in &b.members {
                    let mut g = self.params[i].grad();
                    if g.defined() {
                        g.set_data(&empty);
                    }
                }
            }
            b.flat = Some(flat);
            self.next += 1;
            if self.next - self.written > IN_FLIGHT {
                coll.wait_started()?;
                self.write_back();
            }
        }
        Ok(())
    }

    /// Writes the results of every started bucket (sums into the gradients, or this rank's slice of
    /// them into the optimizer's slice gradient) and frees their flat copies.
    fn write_back(&mut self) {
        let _guard = tch::no_grad_guard();
        let (lo_r, hi_r) =
            (self.bounds.get(self.rank).copied().unwrap_or(0), self.bounds.get(self.rank + 1).copied().unwrap_or(0));
        for b in &mut self.buckets[self.written..self.next] {
            let flat = b.flat.take().expect("a started bucket holds its flat copy");
            if let Some(sg) = &self.shard_grad {
                let (s, e) = (b.lo.max(lo_r), b.hi.min(hi_r));
                if s < e {
                    let mine = flat.narrow(0, (s - b.lo) as i64, (e - s) as i64);
                    let mut into = sg.narrow(0, (s - lo_r) as i64, (e - s) as i64);
                    // Rounded to the parameters' dtype as the unsharded write-back is.
                    let _ = into.g_add_(&mine.to_device(sg.device()).to_kind(sg.kind()));
                }
                continue;
            }
            let mut off = 0;
            for &i in &b.members {
                let p = &self.params[i];
                let n = p.numel() as i64;
                let summed = flat.narrow(0, off, n).view(p.size().as_slice()).to_device(p.device()).to_kind(p.kind());
                // Every trainable parameter takes part in every forward, so each has a gradient here.
                let mut g = p.grad();
                if g.defined() {
                    g.copy_(&summed);
                }
                off += n;
            }
        }
        self.written = self.next;
    }

    /// Starts whatever has not started, waits for every reduction, and writes the results back. Then
    /// the buckets are ready for the next micro-batch.
    pub fn finish(&mut self, coll: &mut dyn Collective) -> Result<()> {
        self.start_through(coll, usize::MAX)?;
        coll.wait_started()?;
        self.write_back();
        self.next = 0;
        self.written = 0;
        Ok(())
    }

    /// After a sharded step: every rank's updated slice of the weights to every rank, a bucket at a
    /// time (one fp32 bucket of memory beyond the model). Unsharded, nothing to do.
    pub fn gather_weights(&mut self, coll: &mut dyn Collective) -> Result<()> {
        if self.shard == Shard::None || coll.world() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for b in &self.buckets {
            let flat = Tensor::cat(
                &b.members
                    .iter()
                    .map(|&i| self.params[i].detach().to_kind(Kind::Float).reshape([-1]).to_device(coll.device()))
                    .collect::<Vec<_>>(),
                0,
            );
            coll.all_gather(&flat, &bounds_within(&self.bounds, b.lo, b.hi))?;
            let mut off = 0;
            for &i in &b.members {
                let p = &self.params[i];
                let n = p.numel() as i64;
                p.shallow_clone().copy_(&flat.narrow(0, off, n).view(p.size().as_slice()).to_device(p.device()));
                off += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_backward_order_and_become_ready_with_their_last_stage() {
        let p = |name: &str, n: i64| (name.to_owned(), Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)));
        // Checkpoint order; 10 fp32 elements = 40 bytes, buckets of 80 bytes.
        let params = [
            p("model.embed_tokens.weight", 10),
            p("model.layers.0.mlp.up_proj.weight", 10),
            p("model.layers.1.mlp.up_proj.weight", 10),
            p("model.layers.1.mlp.down_proj.weight", 10),
            p("model.norm.weight", 10),
        ];
        let cfg = crate::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let opt = AdamW::new(params.into(), cfg, 2, crate::optim::ShardOf::ALL);
        let b = GradBuckets::new(&opt, 2, 80, Shard::None, false);
        let members: Vec<Vec<usize>> = b.buckets.iter().map(|b| b.members.clone()).collect();
        assert_eq!(members, [vec![4, 2], vec![3, 1], vec![0]]);
        let ranges: Vec<(usize, usize)> = b.buckets.iter().map(|b| (b.lo, b.hi)).collect();
        assert_eq!(ranges, [(0, 20), (20, 40), (40, 50)]);
        let ready: Vec<usize> = b.buckets.iter().map(|b| b.ready_after).collect();
        assert_eq!(ready, [1, 2, 3]); // after layer 1, after layer 0, after the embeddings
        assert_eq!(b.by_stage, [vec![4], vec![2, 3], vec![1], vec![0]]);
    }

    /// ZeRO-2's freeing: a `.grad` replaced by 0 elements, then given its shape back zeroed, takes the
    /// next backward's gradient as if it had never been freed.
    #[test]
    fn a_freed_gradient_made_again_accumulates_the_next_backward() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        (&w * &w).sum(Kind::Float).backward();
        let mut g = w.grad();
        g.set_data(&Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)));
        assert_eq!(w.grad().numel(), 0);
        w.grad().set_data(&w.zeros_like());
        (&w * 3.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [3.0, 3.0, 3.0]);
    }
}

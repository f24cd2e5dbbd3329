//! Gradients summed over ranks while backward still runs, as PyTorch DDP does from its autograd hooks.
//! The trainable parameters are grouped, in backward order (head, layer L-1, …, layer 0, embeddings),
//! into flat fp32 buckets of about `train.bucket_mb` (25 MiB, DESIGN.md §4). When the layer-wise step reports a stage done, every
//! bucket whose parameters all belong to stages done by then is flattened and its reduction started
//! (on the ring's communication thread, or NCCL's side stream); `finish` waits for all of them and
//! writes the sums back into each parameter's `.grad` (as does the start of a bucket that would put
//! more than `IN_FLIGHT` in flight). Only the last micro-batch of a step reports
//! stages: accumulation steps do not communicate. This file does not run backward (`layerwise`).

use super::Collective;
use crate::error::Result;
use crate::layerwise::Stage;
use tch::{Kind, Tensor};

/// Started buckets whose sums have not been written back, at most; past it the oldest are waited for
/// and written back, so the flat copies in flight stay near `IN_FLIGHT` buckets (100 MiB by default) rather
/// than a second copy of every gradient.
pub const IN_FLIGHT: usize = 4;

struct Bucket {
    /// Indices into `GradBuckets::params`.
    members: Vec<usize>,
    /// Backward rank of the last stage its members belong to: the bucket is final after it.
    ready_after: usize,
    /// The flat fp32 gradients while their reduction runs (B elements, on the collective's device).
    flat: Option<Tensor>,
}

pub struct GradBuckets {
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    /// First bucket not yet started.
    next: usize,
    /// First bucket not yet written back.
    written: usize,
    layers: usize,
}

impl GradBuckets {
    /// Buckets over `params` (names decide each one's stage) of a model with `layers` decoder layers.
    pub fn new(params: &[(String, Tensor)], layers: usize, bucket_bytes: usize) -> Self {
        let mut order: Vec<(usize, usize)> =
            params.iter().enumerate().map(|(i, (name, _))| (Stage::of(name).backward_rank(layers), i)).collect();
        order.sort();
        let mut buckets: Vec<Bucket> = vec![];
        let mut bytes = 0;
        for (rank, i) in order {
            let size = params[i].1.numel() * 4;
            match buckets.last_mut() {
                Some(b) if bytes + size <= bucket_bytes => {
                    b.members.push(i);
                    b.ready_after = rank;
                    bytes += size;
                }
                _ => {
                    buckets.push(Bucket { members: vec![i], ready_after: rank, flat: None });
                    bytes = size;
                }
            }
        }
        GradBuckets {
            params: params.iter().map(|(_, t)| t.shallow_clone()).collect(),
            buckets,
            next: 0,
            written: 0,
            layers,
        }
    }

    /// Number of buckets (for logs and tests).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// `stage`'s gradients are final: starts the reduction of every bucket that is now complete.
    pub fn stage_done(&mut self, coll: &mut dyn Collective, stage: Stage) -> Result<()> {
        let done = stage.backward_rank(self.layers);
        self.start_through(coll, done)
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
                        let g = if g.defined() { g } else { p.zeros_like() };
                        g.to_kind(Kind::Float).reshape([-1]).to_device(coll.device())
                    })
                    .collect::<Vec<_>>(),
                0,
            ); // (B,)
            coll.start_all_reduce_sum(&flat)?;
            b.flat = Some(flat);
            self.next += 1;
            if self.next - self.written > IN_FLIGHT {
                coll.wait_started()?;
                self.write_back();
            }
        }
        Ok(())
    }

    /// Copies the sums of every started bucket into the gradients and frees their flat copies.
    fn write_back(&mut self) {
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets[self.written..self.next] {
            let flat = b.flat.take().expect("a started bucket holds its flat copy");
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

    /// Starts whatever has not started, waits for every reduction, and writes the sums back into the
    /// gradients (in each parameter's dtype). Then the buckets are ready for the next step.
    pub fn finish(&mut self, coll: &mut dyn Collective) -> Result<()> {
        self.start_through(coll, usize::MAX)?;
        coll.wait_started()?;
        self.write_back();
        self.next = 0;
        self.written = 0;
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
        let b = GradBuckets::new(&params, 2, 80);
        let members: Vec<Vec<usize>> = b.buckets.iter().map(|b| b.members.clone()).collect();
        assert_eq!(members, [vec![4, 2], vec![3, 1], vec![0]]);
        let ready: Vec<usize> = b.buckets.iter().map(|b| b.ready_after).collect();
        assert_eq!(ready, [1, 2, 3]); // after layer 1, after layer 0, after the embeddings
    }
}

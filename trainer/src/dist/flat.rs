//! The flat parameter space that sharding (ZeRO stages 1 and 2, `train.shard`) slices: the trainable
//! tensors laid end to end in backward order (head, layer L-1, …, layer 0, embeddings: the order
//! gradients become final, so every gradient bucket is one contiguous range), and each rank's
//! contiguous slice of it. Slices have ceil(P / W) elements, the last ones shorter (or empty when W
//! does not divide P). Pure arithmetic on names and element counts: it holds no tensor and does no
//! communication.

use crate::layerwise::Stage;

/// Where each trainable tensor lies in the flat space, and which slice each rank owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Indices into the trainable list, in flat (backward) order.
    pub order: Vec<usize>,
    /// Flat offset of each trainable tensor, by its index in the trainable list.
    pub offset: Vec<usize>,
    /// Elements of each trainable tensor, by index.
    pub numel: Vec<usize>,
    /// P, the elements of all trainable tensors.
    pub total: usize,
    /// W + 1 boundaries: rank r owns `bounds[r]..bounds[r + 1]`.
    pub bounds: Vec<usize>,
}

/// A piece of one trainable tensor inside a rank's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index into the trainable list.
    pub param: usize,
    /// First element of the piece within the tensor (flattened).
    pub start: usize,
    pub len: usize,
    /// Where the piece starts within the rank's slice.
    pub at: usize,
}

/// W + 1 boundaries of `total` elements over `world` ranks: slices of ceil(total / world).
pub fn shard_bounds(total: usize, world: usize) -> Vec<usize> {
    let per = total.div_ceil(world.max(1));
    (0..=world).map(|r| (r * per).min(total)).collect()
}

/// `bounds` restricted to `lo..hi` and made relative to `lo`: rank r's part of that range.
pub fn bounds_within(bounds: &[usize], lo: usize, hi: usize) -> Vec<usize> {
    bounds.iter().map(|&b| b.clamp(lo, hi) - lo).collect()
}

impl Layout {
    /// The layout of trainable tensors (`names` and element counts, in trainable order) of a model
    /// with `layers` decoder layers, sliced over `world` ranks.
    pub fn new(names: &[&str], numels: &[usize], layers: usize, world: usize) -> Self {
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by_key(|&i| (Stage::of(names[i]).backward_rank(layers), i));
        let mut offset = vec![0; names.len()];
        let mut at = 0;
        for &i in &order {
            offset[i] = at;
            at += numels[i];
        }
        Layout { order, offset, numel: numels.to_vec(), total: at, bounds: shard_bounds(at, world) }
    }

    /// Rank `rank`'s slice of the flat space.
    pub fn range(&self, rank: usize) -> (usize, usize) {
        (self.bounds[rank], self.bounds[rank + 1])
    }

    /// The pieces of trainable tensors in rank `rank`'s slice, in flat order.
    pub fn segments(&self, rank: usize) -> Vec<Segment> {
        let (lo, hi) = self.range(rank);
        let mut out = vec![];
        for &param in &self.order {
            let (a, b) = (self.offset[param], self.offset[param] + self.numel[param]);
            let (s, e) = (a.max(lo), b.min(hi));
            if s < e {
                out.push(Segment { param, start: s - a, len: e - s, at: s - lo });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_flat_space_once_whatever_the_world_size() {
        assert_eq!(shard_bounds(10, 3), [0, 4, 8, 10]);
        assert_eq!(shard_bounds(10, 1), [0, 10]);
        // More ranks than elements: the last slices are empty.
        assert_eq!(shard_bounds(2, 3), [0, 1, 2, 2]);
        assert_eq!(bounds_within(&[0, 4, 8, 10], 3, 9), [0, 1, 5, 6]);
        let names = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w", "model.norm.weight"];
        let l = Layout::new(&names, &[5, 3, 3, 2], 2, 3);
        // Backward order: norm (head), layer 1, layer 0, embeddings.
        assert_eq!(l.order, [3, 2, 1, 0]);
        assert_eq!(l.offset, [8, 5, 2, 0]);
        assert_eq!((l.total, l.bounds.clone()), (13, vec![0, 5, 10, 13]));
        let s = l.segments(1);
        assert_eq!(s, [Segment { param: 1, start: 0, len: 3, at: 0 }, Segment { param: 0, start: 0, len: 2, at: 3 }]);
        // Every element is in exactly one rank's segments, for several world sizes.
        for w in 1..=5 {
            let l = Layout::new(&names, &[5, 3, 3, 2], 2, w);
            let mut seen = vec![0; 13];
            for r in 0..w {
                for seg in l.segments(r) {
                    for k in 0..seg.len {
                        seen[l.offset[seg.param] + seg.start + k] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "world {w}: {seen:?}");
        }
    }
}

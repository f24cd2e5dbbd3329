//! Hands packed rows from a token cache to training: each of `world_size` ranks gets a disjoint,
//! equally long share of every epoch, in an order fixed by (seed, epoch), `micro_batch` rows at a time,
//! with position ids and document ids derived from each row's document lengths. Its position
//! (epoch, cursor) can be saved and restored exactly. It produces plain vectors, not tensors.
//!
//! Sharding follows torch's DistributedSampler: the shuffled epoch is padded by wrapping around to a
//! multiple of `world_size` and rank r takes every world_size-th row from r, so all ranks run the
//! same number of steps.

use crate::cache::TokenCache;
use serde::{Deserialize, Serialize};

/// SplitMix64: a tiny, well-mixed generator, enough for shuffling rows reproducibly.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) (Lemire's multiply-shift; the bias is below 2^-32 for any n of row counts).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// Row order of one epoch: a Fisher-Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..rows).collect();
    for i in (1..rows).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The rows rank `rank` of `world` reads in one epoch.
pub fn rank_share(order: &[usize], rank: usize, world: usize) -> Vec<usize> {
    let per_rank = order.len().div_ceil(world);
    (0..per_rank).map(|k| order[(k * world + rank) % order.len()]).collect()
}

/// Where a loader is; saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub epoch: u64,
    /// Rows of this epoch's share already handed out.
    pub cursor: usize,
}

/// `rows` x `seq` values each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq: usize,
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// Document index within the row; padding gets a document of its own.
    pub doc_ids: Vec<i64>,
    /// Labels != -100.
    pub trained_tokens: usize,
    /// Rows of the cache in this batch (for logging and tests).
    pub row_indices: Vec<usize>,
    /// The epoch these rows belong to.
    pub epoch: u64,
}

pub struct Loader<'a> {
    cache: &'a TokenCache,
    rank: usize,
    world: usize,
    seed: u64,
    pub micro_batch: usize,
    state: LoaderState,
    share: Vec<usize>,
}

impl<'a> Loader<'a> {
    /// A loader of rank `rank` of `world` over `cache`. An error (never a panic) for a cache with no row,
    /// saying why its conversations were dropped, and for a micro-batch of 0 or a rank outside the world.
    pub fn new(cache: &'a TokenCache, rank: usize, world: usize, seed: u64, micro_batch: usize) -> crate::Result<Self> {
        let err = |msg: String| crate::DataError::At { path: cache.path.clone(), msg };
        if cache.rows() == 0 {
            return Err(err(cache.why_empty()));
        }
        if micro_batch == 0 || rank >= world {
            return Err(err(format!("cannot read rank {rank} of {world} in micro-batches of {micro_batch}")));
        }
        let mut l = Loader { cache, rank, world, seed, micro_batch, state: LoaderState::default(), share: vec![] };
        l.share = l.share_of(0);
        Ok(l)
    }

    fn share_of(&self, epoch: u64) -> Vec<usize> {
        rank_share(&epoch_order(self.cache.rows(), self.seed, epoch), self.rank, self.world)
    }

    /// Rows each rank reads per epoch (equal on all ranks).
    pub fn rows_per_rank(&self) -> usize {
        self.cache.rows().div_ceil(self.world)
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn restore(&mut self, state: LoaderState) {
        self.state = state;
        self.share = self.share_of(state.epoch);
    }

    /// Restores a position saved by a run of `saved_world` ranks: the rows handed out of the epoch
    /// over all ranks (cursor x saved_world) are the same rows on this world size, so a step
    /// boundary, where every rank has read whole steps, converts exactly. An error when it does not
    /// (the position is not a multiple of this world size).
    pub fn restore_from(&mut self, state: LoaderState, saved_world: usize) -> Result<(), String> {
        let global = state.cursor * saved_world.max(1);
        if !global.is_multiple_of(self.world) {
            return Err(format!(
                "the checkpoint's data position ({global} rows of epoch {} over {saved_world} ranks) is not a whole number of rows for each of {} ranks",
                state.epoch, self.world
            ));
        }
        self.restore(state);
        self.state.cursor = (global / self.world).min(self.share.len());
        Ok(())
    }

    /// The next `micro_batch` rows, moving into the next epoch when this one runs out.
    pub fn next_batch(&mut self) -> Batch {
        let epoch = self.state.epoch;
        let mut picked = Vec::with_capacity(self.micro_batch);
        while picked.len() < self.micro_batch {
            if self.state.cursor == self.share.len() {
                self.state = LoaderState { epoch: self.state.epoch + 1, cursor: 0 };
                self.share = self.share_of(self.state.epoch);
            }
            picked.push(self.share[self.state.cursor]);
            self.state.cursor += 1;
        }
        self.batch_of(&picked, epoch)
    }

    /// Assembles rows into a batch.
    pub fn batch_of(&self, rows: &[usize], epoch: u64) -> Batch {
        let seq = self.cache.max_seq_len();
        let n = rows.len() * seq;
        let mut b = Batch {
            rows: rows.len(),
            seq,
            ids: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            doc_ids: Vec::with_capacity(n),
            trained_tokens: 0,
            row_indices: rows.to_vec(),
            epoch,
        };
        for &r in rows {
            b.ids.extend(self.cache.ids(r).iter().map(|&x| x as i64));
            let labels = self.cache.labels(r);
            b.trained_tokens += labels.iter().filter(|&&l| l != -100).count();
            b.labels.extend(labels.iter().map(|&x| x as i64));
            let mut used = 0usize;
            for (d, &len) in self.cache.doc_lens(r).iter().enumerate() {
                b.position_ids.extend(0..len as i64);
                b.doc_ids.extend(std::iter::repeat_n(d as i64, len as usize));
                used += len as usize;
            }
            let pad = seq - used;
            b.position_ids.extend(0..pad as i64);
            b.doc_ids.extend(std::iter::repeat_n(self.cache.doc_lens(r).len() as i64, pad));
        }
        b
    }
}

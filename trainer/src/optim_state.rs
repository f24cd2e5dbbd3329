//! The optimizer's state in a checkpoint, as slices of the flat parameter space: `optimizer.json`
//! (written by rank 0: the world size the state was sliced over, the step, and the trainable tensors in
//! flat order with their sizes) and one `optimizer.rank{r}.safetensors` per slice with its first and
//! second moments (and fp32 masters). An unsharded run saves one slice of everything. Loading re-slices:
//! each rank reads, through a memory map, only the saved slices that overlap its own, so a checkpoint
//! written by 3 ranks resumes on 2 or on 1 (and back). It does not decide when to save (`train`).

use crate::dist::flat::shard_bounds;
use crate::error::{Error, Result};
use crate::optim::AdamW;
use crate::weights;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const INDEX: &str = "optimizer.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateIndex {
    /// Slices the state was saved in.
    pub world: usize,
    pub step: u64,
    pub masters: bool,
    /// Trainable tensors in flat order: name and elements.
    pub tensors: Vec<(String, usize)>,
}

/// The file of slice `rank`.
pub fn slice_file(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("optimizer.rank{rank}.safetensors"))
}

/// The files a complete checkpoint's optimizer state consists of, from its index.
pub fn expected_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = read_index(dir)?;
    let mut files = vec![dir.join(INDEX)];
    files.extend((0..index.world).map(|r| slice_file(dir, r)));
    Ok(files)
}

pub fn read_index(dir: &Path) -> Result<StateIndex> {
    let p = dir.join(INDEX);
    let text = std::fs::read_to_string(&p).map_err(Error::io(&p))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: p, source })
}

impl AdamW {
    /// The index describing this optimizer's state (any rank computes the same one).
    pub fn index(&self) -> StateIndex {
        StateIndex {
            world: self.shard.world,
            step: self.step,
            masters: self.master.is_some(),
            tensors: self.layout.order.iter().map(|&i| (self.params[i].0.clone(), self.layout.numel[i])).collect(),
        }
    }

    /// Writes `optimizer.json` into `dir` (rank 0's part of a checkpoint; the checkpoint's `DONE`, not
    /// this file, says it is complete).
    pub fn save_index(&self, dir: &Path) -> Result<()> {
        let p = dir.join(INDEX);
        std::fs::write(&p, serde_json::to_string_pretty(&self.index()).expect("index serializes"))
            .map_err(Error::io(&p))
    }

    /// Writes this rank's slice of the state into `dir` (complete or absent).
    pub fn save_slice(&self, dir: &Path) -> Result<PathBuf> {
        let mut named = vec![
            ("exp_avg".to_string(), self.exp_avg.shallow_clone()),
            ("exp_avg_sq".to_string(), self.exp_avg_sq.shallow_clone()),
        ];
        if let Some(m) = &self.master {
            named.push(("master".into(), m.shallow_clone()));
        }
        let path = slice_file(dir, self.shard.rank);
        crate::checkpoint::save_named(&path, &named)?;
        Ok(path)
    }

    /// Restores this rank's slice from the state saved in `dir`, whatever world size saved it. The
    /// trainable tensors must be the same, in the same order and sizes.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let index = read_index(dir)?;
        let index_path = dir.join(INDEX);
        let ours = self.index();
        if index.tensors.len() != ours.tensors.len() {
            return Err(Error::Checkpoint {
                path: index_path,
                msg: format!(
                    "the saved optimizer state is of {} trainable tensors, this run trains {}; hint: resume with the configuration the checkpoint was written with (lora.*, model.path)",
                    index.tensors.len(),
                    ours.tensors.len()
                ),
            });
        }
        for ((sn, sz), (n, z)) in index.tensors.iter().zip(&ours.tensors) {
            if sn != n || sz != z {
                return Err(Error::Tensor {
                    path: index_path,
                    tensor: n.clone(),
                    msg: format!(
                        "the saved optimizer state has `{sn}` of {sz} elements here, this run `{n}` of {z}; hint: resume with the configuration the checkpoint was written with"
                    ),
                });
            }
        }
        let (lo, hi) = self.layout.range(self.shard.rank);
        let saved = shard_bounds(self.layout.total, index.world);
        let _g = tch::no_grad_guard();
        for r in 0..index.world {
            let (a, b) = (saved[r].max(lo), saved[r + 1].min(hi));
            if a >= b {
                continue;
            }
            let path = slice_file(dir, r);
            let map = weights::map_file(&path)?;
            let st = weights::deserialize(&map, &path)?;
            let mut targets =
                vec![("exp_avg", self.exp_avg.shallow_clone()), ("exp_avg_sq", self.exp_avg_sq.shallow_clone())];
            // Masters exist only when computing in bf16; a run resumed in another dtype keeps the
            // masters it made from the weights.
            if let (Some(m), true) = (&self.master, index.masters) {
                targets.push(("master", m.shallow_clone()));
            }
            for (name, into) in targets {
                let view = st.tensor(name).map_err(|e| Error::Tensor {
                    path: path.clone(),
                    tensor: name.into(),
                    msg: format!("cannot read: {e}"),
                })?;
                let t = weights::tensor_of_view(&view, &path, name)?;
                let expected = saved[r + 1] - saved[r];
                // Moments are in the state's dtype (train.optimizer_dtype), masters always fp32.
                let kind = if name == "master" { Kind::Float } else { into.kind() };
                if t.size() != [expected as i64] || t.kind() != kind {
                    return Err(Error::Tensor {
                        path: path.clone(),
                        tensor: name.into(),
                        msg: format!("{:?} {:?}, expected [{expected}] {kind:?}", t.kind(), t.size()),
                    });
                }
                let part: Tensor = t.narrow(0, (a - saved[r]) as i64, (b - a) as i64);
                into.narrow(0, (a - lo) as i64, (b - a) as i64).copy_(&part.to_device(into.device()));
            }
        }
        self.step = index.step;
        Ok(())
    }
}

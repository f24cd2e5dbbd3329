//! Whether a run's first checkpoint and its export fit on the disk it writes them to, checked on every
//! rank before the first step: a run that cannot save would otherwise train until its first checkpoint
//! and fail there (an 8B-shape full fine-tuning on a host with a 64 GiB disk did, after its steps, for
//! want of room for the optimizer state). It counts each rank's own files (rank 0: the trainable
//! weights, its optimizer slice and the export; the others: their slices), so with several ranks on one
//! filesystem it is a lower bound. It does not reserve space or watch it during the run.

use crate::dist::buckets::Shard;
use crate::error::{Error, Result};
use crate::learner::Trainer;
use crate::plan::{Plan, RunConfig};
use std::path::Path;
use tch::{Kind, Tensor};

/// Bytes one rank writes: into each checkpoint (trainable weights, optimizer state) and at the end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    pub trainable: u64,
    pub state: u64,
    pub export: u64,
}

impl Need {
    /// What `rank` writes: rank 0 the trainable weights into each checkpoint and the export (in its
    /// dtype, with the tokenizer files it copies), every rank that saves optimizer state its slice.
    pub fn of(cfg: &RunConfig, plan: &Plan, trainer: &Trainer, rank: usize) -> Result<Need> {
        let state = if plan.shard != Shard::None || rank == 0 { trainer.opt.state_bytes() as u64 } else { 0 };
        if rank != 0 {
            return Ok(Need { trainable: 0, state, export: 0 });
        }
        let size = |t: &Tensor, k: Kind| (t.numel() * k.elt_size_in_bytes()) as u64;
        // An adapter is written in its own dtype; a full model in `output.save_dtype`'s.
        let export_kind = match plan.lora {
            Some(_) => None,
            None => Some(crate::learner::export_kind(cfg, false, trainer.model.kind())?),
        };
        Ok(Need {
            trainable: trainer.trainable.iter().map(|(_, t)| size(t, t.kind())).sum(),
            state,
            export: trainer.trainable.iter().map(|(_, t)| size(t, export_kind.unwrap_or(t.kind()))).sum::<u64>()
                + crate::learner::tokenizer_files_bytes(&cfg.model.path),
        })
    }

    pub fn total(&self) -> u64 {
        self.trainable + self.state + self.export
    }
}

/// Bytes free to an unprivileged writer on the filesystem holding `path` (its nearest existing
/// ancestor); None where the system cannot say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let at = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the struct's size; read only on success.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let s = unsafe { s.assume_init() };
    #[allow(clippy::unnecessary_cast)] // their types differ between libc targets
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// The error for a rank that needs `need` in `dir`, which has `free` bytes free; None when it fits.
pub fn shortfall(need: &Need, free: u64, dir: &Path, rank: usize) -> Option<String> {
    (need.total() > free).then(|| {
        format!(
            "rank {rank}: {} has {} free, and this run writes at least {} there: a checkpoint {} (trainable weights {}, optimizer state {}) and the export {}; \
             hint: free space, set output.dir to a larger disk, or keep less state (train.optimizer_dtype=\"bf16\" with a bf16 model, train.shard over several ranks, LoRA)",
            dir.display(),
            gb(free),
            gb(need.total()),
            gb(need.trainable + need.state),
            gb(need.trainable),
            gb(need.state),
            gb(need.export),
        )
    })
}

/// Checks `need` against `dir`'s free space on this rank, and stops every rank if any falls short or
/// could not size its files (one all-reduce, so that no rank waits for one that left).
pub fn check(need: Result<Need>, dir: &Path, coll: &mut dyn crate::dist::Collective) -> Result<()> {
    let mine = match need {
        Ok(need) => free_bytes(dir).and_then(|free| shortfall(&need, free, dir, coll.rank())).map(Error::Invalid),
        Err(e) => Some(e),
    };
    let mut short = [f64::from(u8::from(mine.is_some()))];
    coll.all_reduce_f64(&mut short)?;
    match mine {
        Some(e) => Err(e),
        None if short[0] > 0.0 => Err(Error::Invalid(
            "another rank has too little disk space for its checkpoint files (its error says how much)".into(),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic and the message: every figure the user needs to act, and the hint.
    #[test]
    fn a_run_that_cannot_save_is_refused_with_the_figures() {
        let need = Need { trainable: 16_000_000_000, state: 64_000_000_000, export: 16_000_000_000 };
        assert_eq!(need.total(), 96_000_000_000);
        assert_eq!(shortfall(&need, 96_000_000_000, Path::new("/d"), 0), None, "exactly enough fits");
        let msg = shortfall(&need, 50_000_000_000, Path::new("/d"), 0).unwrap();
        for part in [
            "/d has 50.00 GB free",
            "at least 96.00 GB",
            "a checkpoint 80.00 GB",
            "optimizer state 64.00 GB",
            "export 16.00 GB",
            "output.dir",
        ] {
            assert!(msg.contains(part), "{part} not in {msg}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let free = free_bytes(&tmp.path().join("not/yet/made")).expect("the nearest existing ancestor's filesystem");
        assert!(free > 0);
    }
}

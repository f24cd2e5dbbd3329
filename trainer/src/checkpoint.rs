//! Checkpoints that are complete or absent: each is written into `step-N.partial/`, finished with a
//! `DONE` marker, then renamed to `step-N/` in one atomic step; a directory without `DONE` is never
//! used. A checkpoint holds the trainable weights (the whole model, or the LoRA adapter in peft's
//! names), the optimizer state, the loader position and step (`state.json`; the RNG is reseeded from
//! (seed, step) every step, so no RNG state is needed) and the resolved config. It does not decide when
//! to save; the plan does.

use crate::error::{Error, Result};
use crate::weights;
use ferrotune_data::loader::LoaderState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const DONE: &str = "DONE";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub loader: LoaderState,
    /// Training loss of the last step (for the log after a resume).
    pub last_loss: f64,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            if e.path().join(DONE).exists() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    out
}

pub fn latest(run_dir: &Path) -> Option<(u64, PathBuf)> {
    list(run_dir).pop()
}

/// Writes checkpoint `step` with `write` filling the directory; `DONE` and the rename make it visible.
/// On any failure the partial directory is removed and earlier checkpoints are untouched.
pub fn save(run_dir: &Path, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let partial = dir.join(format!("step-{step}.partial"));
    let done = dir.join(format!("step-{step}"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(Error::io(&partial))?;
    }
    std::fs::create_dir(&partial).map_err(Error::io(&partial))?;
    let result = write(&partial).and_then(|()| {
        let marker = partial.join(DONE);
        std::fs::write(&marker, format!("{step}\n")).map_err(Error::io(&marker))?;
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(Error::io(&done))?;
        }
        std::fs::rename(&partial, &done).map_err(Error::io(&done))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    Ok(done)
}

/// Saves named tensors, each in its own dtype, as one safetensors file (complete or absent).
pub fn save_named(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let refs: Vec<&(String, Tensor)> = tensors.iter().collect();
    weights::write_file(path, &refs, None).map(|_| ())
}

/// Copies tensors saved by `save_named` into `into` (matched by name, shapes checked), under no_grad.
pub fn load_named(path: &Path, into: &[(String, Tensor)]) -> Result<()> {
    let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| Error::Checkpoint { path: path.to_owned(), msg: format!("cannot read: {e}") })?
        .into_iter()
        .collect();
    let _g = tch::no_grad_guard();
    for (name, t) in into {
        let s = saved.get(name).ok_or_else(|| Error::Tensor {
            path: path.to_owned(),
            tensor: name.clone(),
            msg: "missing; hint: resume with the configuration the checkpoint was written with".into(),
        })?;
        if s.size() != t.size() {
            return Err(Error::Tensor {
                path: path.to_owned(),
                tensor: name.clone(),
                msg: format!("shape {:?}, expected {:?}", s.size(), t.size()),
            });
        }
        t.shallow_clone().copy_(s);
    }
    Ok(())
}

pub fn write_state(dir: &Path, state: &TrainState) -> Result<()> {
    let p = dir.join("state.json");
    std::fs::write(&p, serde_json::to_string_pretty(state).expect("state serializes")).map_err(Error::io(&p))
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(Error::io(&p))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_and_no_partial() {
        let run = tempfile::tempdir().unwrap();
        save(run.path(), 10, |d| std::fs::write(d.join("w"), b"good").map_err(Error::io(d))).unwrap();
        let err = save(run.path(), 20, |d| {
            std::fs::write(d.join("w"), b"half").map_err(Error::io(d))?;
            Err(Error::Invalid("disk full (simulated)".into()))
        });
        assert!(err.is_err());
        assert_eq!(list(run.path()).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10]);
        assert!(!checkpoints_dir(run.path()).join("step-20.partial").exists());
        assert_eq!(std::fs::read(latest(run.path()).unwrap().1.join("w")).unwrap(), b"good");
        // A directory that lost its DONE marker (a crash between writes) is not a checkpoint.
        std::fs::create_dir_all(checkpoints_dir(run.path()).join("step-30")).unwrap();
        assert_eq!(latest(run.path()).unwrap().0, 10);
    }
}

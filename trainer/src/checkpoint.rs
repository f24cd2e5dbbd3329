//! Checkpoints that are complete or absent: each is written into `step-N.partial/`, finished with a
//! `DONE` marker, then renamed to `step-N/` in one atomic step; a directory without `DONE` is never
//! used. A checkpoint holds the trainable weights (the whole model, or the LoRA adapter in peft's
//! names), the optimizer state (`optim_state`: one slice per rank when sharded), the loader position,
//! step and world size (`state.json`; the RNG is reseeded from (seed, step) every step, so no RNG state
//! is needed) and the resolved config. With several ranks (`save_all`) every rank writes its files into
//! the partial directory, and rank 0 writes `DONE` only once every rank has reported success and every
//! file the checkpoint lists exists: a rank that fails or dies while writing leaves the previous
//! checkpoint the newest complete one. It does not decide when to save; the plan does.

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
    /// Ranks of the run that wrote it: `loader.cursor` counts one rank's rows.
    #[serde(default = "one")]
    pub world: usize,
    /// Early stopping's count, carried across resumes.
    #[serde(default)]
    pub early: crate::evaluation::EarlyStop,
    /// SHA-256 of the training data file: `--resume` refuses another.
    #[serde(default)]
    pub train_data_sha256: Option<String>,
    /// The compute dtype the run trained in (fp32 or bf16, `model.dtype = "auto"` resolved): `--resume`
    /// continues in it, whatever `auto` would pick on the machine that resumes.
    #[serde(default)]
    pub compute_dtype: Option<String>,
}

fn one() -> usize {
    1
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

/// The checkpoint steps retention deletes: all but the newest `keep` (0 keeps all), never `last` (the
/// run's final step). `steps` oldest first.
pub fn to_prune(steps: &[u64], keep: usize, last: u64) -> Vec<u64> {
    if keep == 0 || steps.len() <= keep {
        return vec![];
    }
    steps[..steps.len() - keep].iter().copied().filter(|&s| s != last).collect()
}

/// Deletes the checkpoints `to_prune` names (rank 0, after a new one is complete). A failure to delete
/// is a warning: training goes on.
pub fn prune(run_dir: &Path, keep: usize, last: u64) {
    let all = list(run_dir);
    let steps: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    for step in to_prune(&steps, keep, last) {
        let dir = checkpoints_dir(run_dir).join(format!("step-{step}"));
        // The DONE marker first, so a half-deleted directory is never taken for a complete checkpoint.
        let gone = std::fs::remove_file(dir.join(DONE)).and_then(|_| std::fs::remove_dir_all(&dir));
        match gone {
            Ok(()) => tracing::debug!("removed checkpoint {} (train.keep_checkpoints = {keep})", dir.display()),
            Err(e) => tracing::warn!("cannot remove old checkpoint {}: {e}", dir.display()),
        }
    }
}

/// Writes checkpoint `step` with `write` filling the directory; `DONE` and the rename make it visible.
/// On any failure the partial directory is removed and earlier checkpoints are untouched.
pub fn save(run_dir: &Path, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let partial = fresh_partial(run_dir, step)?;
    let result = write(&partial).and_then(|()| publish(run_dir, step));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// An empty `step-N.partial/` (what an earlier attempt left there is removed).
fn fresh_partial(run_dir: &Path, step: u64) -> Result<PathBuf> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let partial = dir.join(format!("step-{step}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(Error::io(&partial))?;
    }
    std::fs::create_dir(&partial).map_err(Error::io(&partial))?;
    Ok(partial)
}

/// Marks `step-N.partial/` done and renames it to `step-N/` (replacing one of the same step).
fn publish(run_dir: &Path, step: u64) -> Result<PathBuf> {
    let dir = checkpoints_dir(run_dir);
    let (partial, done) = (dir.join(format!("step-{step}.partial")), dir.join(format!("step-{step}")));
    let marker = partial.join(DONE);
    std::fs::write(&marker, format!("{step}\n")).map_err(Error::io(&marker))?;
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(Error::io(&done))?;
    }
    std::fs::rename(&partial, &done).map_err(Error::io(&done))?;
    Ok(done)
}

/// Writes checkpoint `step` with every rank of `coll`: rank 0 makes the partial directory, every rank
/// runs `write` into it (its own files), and once all have succeeded rank 0 checks that the files
/// `expected` lists exist, writes `DONE` and renames. A failure on any rank removes the partial
/// directory and is an error on every rank (naming the ranks); a rank that dies leaves no `DONE`, and
/// the others' next collective fails. With one rank this is `save`.
pub fn save_all(
    run_dir: &Path,
    step: u64,
    coll: &mut dyn crate::dist::Collective,
    write: impl FnOnce(&Path) -> Result<()>,
    expected: impl FnOnce(&Path) -> Result<Vec<PathBuf>>,
) -> Result<PathBuf> {
    let (rank, world) = (coll.rank(), coll.world());
    let partial = checkpoints_dir(run_dir).join(format!("step-{step}.partial"));
    // `agree` is an error on every rank when any rank's part failed (its own error in its message).
    let prepared = if rank == 0 { fresh_partial(run_dir, step).map(|_| ()) } else { Ok(()) };
    agree(coll, prepared.as_ref().err(), "making the checkpoint directory")?;
    let wrote = write(&partial);
    let finished = match (rank, agree(coll, wrote.as_ref().err(), "writing its part of the checkpoint")) {
        (0, Ok(())) => expected(&partial).and_then(|files| {
            if let Some(missing) = files.iter().find(|f| !f.exists()) {
                return Err(Error::Checkpoint {
                    path: missing.clone(),
                    msg: format!("missing after every one of {world} ranks reported it written"),
                });
            }
            publish(run_dir, step)
        }),
        (_, Ok(())) => Ok(checkpoints_dir(run_dir).join(format!("step-{step}"))),
        (_, Err(e)) => Err(e),
    };
    if rank == 0 && finished.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    // Nobody goes on (or exits) before rank 0 has made the checkpoint visible or given up.
    agree(coll, finished.as_ref().err().filter(|_| rank == 0), "finishing the checkpoint")?;
    finished
}

/// Every rank tells whether it failed at `what`; an error on every rank when any did, naming them.
fn agree(coll: &mut dyn crate::dist::Collective, failed: Option<&Error>, what: &str) -> Result<()> {
    let mut flags = vec![0.0; coll.world()];
    flags[coll.rank()] = if failed.is_some() { 1.0 } else { 0.0 };
    coll.all_reduce_f64(&mut flags)?;
    let bad: Vec<String> = flags.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(r, _)| r.to_string()).collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Dist {
        rank: coll.rank(),
        msg: format!(
            "rank(s) {} failed {what}{}; the previous complete checkpoint is kept",
            bad.join(", "),
            failed.map_or(String::new(), |e| format!(": {e}"))
        ),
    })
}

/// Writes a directory that is complete or absent, never half-written, like a checkpoint: `write` fills
/// `.NAME.partial` beside `dest`, which then replaces `dest` by renames (an old `dest` moves aside to
/// `.NAME.old` first and is removed after). A kill or a full disk at any moment leaves either the old
/// directory, the new one, or none under `dest`; readers never see a partial one. Used for the final
/// export of `train` and for `export --merge --out`. `FERROTUNE_FAILPOINT=export` (tests) aborts the
/// process after writing and before publishing.
pub fn publish_dir(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let (partial, old) = (parent.join(format!(".{name}.partial")), parent.join(format!(".{name}.old")));
    for leftover in [&partial, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).map_err(Error::io(leftover))?;
        }
    }
    std::fs::create_dir_all(&partial).map_err(Error::io(&partial))?;
    if let Err(e) = write(&partial) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if std::env::var("FERROTUNE_FAILPOINT").as_deref() == Ok("export") {
        eprintln!("FERROTUNE_FAILPOINT export: dies before publishing {}", dest.display());
        std::process::abort();
    }
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(Error::io(dest))?;
    }
    std::fs::rename(&partial, dest).map_err(Error::io(dest))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
    }
    Ok(())
}

/// Testing only: `FERROTUNE_FAILPOINT=shard-write:RANK:STEP` makes rank RANK die (abort) halfway
/// through writing its optimizer slice at checkpoint STEP, in the first attempt of a launch
/// (FERROTUNE_RESTART_GENERATION unset or 0), so tests can kill a rank at that exact moment.
pub fn failpoint_shard_write(rank: usize, step: u64, partial_file: &Path) {
    let Ok(spec) = std::env::var("FERROTUNE_FAILPOINT") else { return };
    let first_attempt = std::env::var("FERROTUNE_RESTART_GENERATION").map_or(true, |g| g.is_empty() || g == "0");
    if spec == format!("shard-write:{rank}:{step}") && first_attempt {
        let _ = std::fs::write(partial_file, b"half a shard");
        eprintln!("FERROTUNE_FAILPOINT {spec}: rank {rank} dies while writing {}", partial_file.display());
        std::process::abort();
    }
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
    fn retention_keeps_the_newest_and_the_final_step() {
        assert_eq!(to_prune(&[2, 4, 6, 8, 10], 3, 100), vec![2, 4]);
        assert_eq!(to_prune(&[2, 4, 6], 3, 100), Vec::<u64>::new());
        assert_eq!(to_prune(&[2, 4, 6, 8], 0, 100), Vec::<u64>::new(), "0 keeps all");
        // The final step's checkpoint stays even when newer ones exist (a resumed run extended).
        assert_eq!(to_prune(&[5, 10, 15, 20], 1, 10), vec![5, 15]);
    }

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

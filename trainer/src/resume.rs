//! What `train` checks before a run starts or resumes: that a fresh start finds no checkpoint and a
//! `--resume` finds one, and that a resume continues the same run: the checkpoint's config (but for
//! keys that do not change what is trained) and the training data it was trained on (its SHA-256). It
//! writes nothing and loads no model.

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::plan::RunConfig;
use std::path::{Path, PathBuf};

/// Config keys a resume may change: they do not change what is trained (evaluation, logging,
/// profiling, where it runs, and the memory knobs whose result is the same step: sharding, checkpointing, loss chunks,
/// buckets, micro-batch size at a fixed batch size). Any other difference from the checkpoint's config
/// is refused.
const RESUMABLE: [&str; 17] = [
    "eval.",
    "model.dtype", // checked as the dtype it resolves to, against the checkpoint's (below)
    "train.log_every",
    "train.peak_flops",
    "model.device",
    "data.validation",
    "data.train",
    "output.",
    "train.n_checkpoints",
    "train.keep_checkpoints",
    "train.shard",
    "train.bucket_mb",
    "train.activation_checkpointing",
    "train.selective_every",
    "train.loss_chunk_tokens",
    "train.micro_batch_size",
    "train.profile_step",
];

/// Before `--resume` writes anything: the config must be the checkpoint's (but for `RESUMABLE` keys)
/// and the training data the file it was trained on (its SHA-256, saved in the checkpoint).
pub(crate) fn check_resume(cfg: &RunConfig, dir: &Path) -> Result<()> {
    let path = dir.join("config.toml");
    let old: toml::Table = std::fs::read_to_string(&path)
        .map_err(Error::io(&path))
        .and_then(|t| toml::from_str(&t).map_err(|e| Error::Checkpoint { path: path.clone(), msg: e.to_string() }))?;
    let new: toml::Table = toml::from_str(&cfg.to_toml()).expect("configs serialize");
    let flat = |t: &toml::Table| -> Vec<(String, String)> {
        t.iter()
            .flat_map(|(s, keys)| {
                keys.as_table().into_iter().flatten().map(move |(k, v)| (format!("{s}.{k}"), v.to_string()))
            })
            .collect()
    };
    let defaults: toml::Table = toml::from_str(&RunConfig::default().to_toml()).expect("defaults serialize");
    let (old, new, defaults) = (flat(&old), flat(&new), flat(&defaults));
    let mut changed = vec![];
    for (k, v) in &new {
        if RESUMABLE.iter().any(|p| k.starts_with(p) || k == p) {
            continue;
        }
        // A key the checkpoint's ferrotune did not have yet had its default there.
        let find = |list: &[(String, String)]| list.iter().find(|(o, _)| o == k).map(|(_, v)| v.clone());
        let was = find(&old).or_else(|| find(&defaults));
        let was = was.as_deref();
        if was != Some(v.as_str()) {
            changed.push(format!("{k} = {} (was {})", v, was.unwrap_or("unset")));
        }
    }
    if !changed.is_empty() {
        return Err(Error::Checkpoint {
            path: path.clone(),
            msg: format!(
                "--resume with a changed config: {}; hint: resume with the checkpoint's values (--set KEY=VALUE), or start a new run (output.run_name)",
                changed.join(", ")
            ),
        });
    }
    let state = checkpoint::read_state(dir)?;
    let old_dtype = old.iter().find(|(k, _)| k == "model.dtype").map(|(_, v)| v.trim_matches('"').to_string());
    check_dtype(cfg, state.compute_dtype.as_deref(), old_dtype.as_deref(), dir)?;
    if let Some(want) = &state.train_data_sha256 {
        let got = ferrotune_data::cache::sha256_file(&cfg.data.train).map_err(|e| Error::Invalid(e.to_string()))?;
        if &got != want {
            return Err(Error::Checkpoint {
                path: dir.join("state.json"),
                msg: format!(
                    "--resume with other training data: {} is not the file this run was trained on (SHA-256 {} now, {} at the checkpoint); hint: restore that file, or start a new run (output.run_name)",
                    cfg.data.train.display(),
                    &got[..12],
                    &want[..12.min(want.len())]
                ),
            });
        }
    }
    Ok(())
}

/// A resume computes in the dtype the checkpoint was trained in: `model.dtype` may be spelled
/// differently (auto, bf16) as long as it resolves to that dtype here. A checkpoint from before the
/// dtype was recorded needs the same `model.dtype` as it was written with.
fn check_dtype(cfg: &RunConfig, trained: Option<&str>, old: Option<&str>, dir: &Path) -> Result<()> {
    let device = crate::train::parse_device(&cfg.model.device)?;
    let (kind, why) = crate::resolve_dtype(&cfg.model.dtype, device)?;
    let now = crate::kind_name(kind);
    let refuse = |was: &str| {
        Error::Checkpoint {
        path: dir.join("state.json"),
        msg: format!(
            "--resume in another dtype: the checkpoint was trained in {was}, and model.dtype = \"{}\" computes in {now} here ({why}); hint: --set model.dtype={was}",
            cfg.model.dtype
        ),
    }
    };
    match (trained, old) {
        (Some(was), _) if was != now => Err(refuse(was)),
        (None, Some(was)) if was != cfg.model.dtype => Err(refuse(was)),
        _ => Ok(()),
    }
}

/// The run's newest complete checkpoint, after checking that `--resume` (or its absence) fits it.
pub(crate) fn check_start(run_dir: &Path, resume: bool) -> Result<Option<(u64, PathBuf)>> {
    let existing = checkpoint::latest(run_dir);
    if resume && existing.is_none() {
        return Err(Error::Checkpoint {
            path: checkpoint::checkpoints_dir(run_dir),
            msg: "no complete checkpoint to resume from; hint: drop --resume to start the run".into(),
        });
    }
    if !resume && existing.is_some() {
        return Err(Error::Checkpoint {
            path: run_dir.to_owned(),
            msg: "this run already has checkpoints; hint: pass --resume to continue it, or set output.run_name".into(),
        });
    }
    std::fs::create_dir_all(run_dir.join("cache")).map_err(Error::io(run_dir))?;
    Ok(existing)
}

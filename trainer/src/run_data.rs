//! The token caches a run trains and evaluates on: the training file, the validation file under the
//! run's mask and under the response mask, built by rank 0 on the first run and opened by the others
//! (and on resume); and the training data's token counts for the sweep report. It does not train.

use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::eval;
use crate::plan::{self, RunConfig};
use crate::train::RunOptions;
use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::MaskOptions;
use ferrotune_data::prepare::{open_or_prepare, PrepareOptions};
use std::path::Path;

pub(crate) fn cache_for(
    data: &Path,
    out: &Path,
    enc: &Encoder,
    cfg: &RunConfig,
    mask: Option<MaskOptions>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<TokenCache> {
    let (own, overlong) = plan::data_options(&cfg.data)?;
    let opts = PrepareOptions::new(mask.unwrap_or(own), cfg.data.max_seq_len, overlong);
    open_or_prepare(data, enc, &opts, out, progress).map_err(|e| Error::Invalid(e.to_string()))
}

/// The validation file's caches: under the run's mask, and under the response mask (when different).
pub(crate) type ValCaches = (TokenCache, Option<TokenCache>);

/// Token caches of the training and validation files (the validation file twice: under the run's
/// mask, and under the response mask unless that is the run's), built by rank 0 on the first run (the
/// others wait, then open them).
pub(crate) fn open_caches(
    cfg: &RunConfig,
    run_dir: &Path,
    enc: &Encoder,
    opts: &RunOptions,
    coll: &mut dyn Collective,
) -> Result<(TokenCache, Option<ValCaches>)> {
    let has_val = !cfg.data.validation.as_os_str().is_empty();
    check_data_path("data.train", &cfg.data.train)?;
    if has_val {
        check_data_path("data.validation", &cfg.data.validation)?;
    }
    let (own, _) = plan::data_options(&cfg.data)?;
    let caches = || -> Result<(TokenCache, Option<ValCaches>)> {
        let p = &*opts.progress;
        let train = cache_for(&cfg.data.train, &run_dir.join("cache/train.ftcache"), enc, cfg, None, p)?;
        if !has_val {
            return Ok((train, None));
        }
        let val = cache_for(&cfg.data.validation, &run_dir.join("cache/validation.ftcache"), enc, cfg, None, p)?;
        let resp = if own == eval::response_mask() {
            None
        } else {
            let out = run_dir.join("cache/validation.response.ftcache");
            Some(cache_for(&cfg.data.validation, &out, enc, cfg, Some(eval::response_mask()), p)?)
        };
        Ok((train, Some((val, resp))))
    };
    let built = if coll.rank() == 0 { Some(caches()) } else { None };
    coll.barrier()?;
    match built {
        Some(c) => c,
        None => caches(),
    }
}

/// A data file the run cannot read is an error naming its key, before anything is built: unset (it
/// was ": No such file or directory"), missing, or not a file.
fn check_data_path(key: &str, path: &Path) -> Result<()> {
    let what = if path.as_os_str().is_empty() {
        "is not set".to_owned()
    } else if path.is_file() {
        return Ok(());
    } else if let Some(why) = ferrotune_data::paths::why_unusable(path) {
        format!("`{}` {why}", path.display())
    } else if path.exists() {
        format!("`{}` is not a file", path.display())
    } else {
        format!("`{}` does not exist", path.display())
    };
    let msg = format!(
        "{what}; hint: --set {key}=FILE, chat JSONL ({{\"messages\": [...]}}), prompt/completion JSONL, Parquet or plain text"
    );
    Err(Error::Config { path: std::path::PathBuf::new(), key: key.into(), msg })
}

/// The training data's tokens and response tokens (under the response mask, packed as the run packs),
/// for the instruction/response ratio of sweep reports; `None` where the data has no responses.
pub(crate) fn data_counts(cfg: &RunConfig, enc: &Encoder) -> Option<(usize, usize)> {
    let (_, overlong) = plan::data_options(&cfg.data).ok()?;
    let opts = PrepareOptions::new(eval::response_mask(), cfg.data.max_seq_len, overlong);
    match ferrotune_data::prepare::prepare(&cfg.data.train, enc, &opts, &|_, _| {}) {
        Ok((h, _)) => Some((h.stats.tokens, h.stats.trained_tokens)),
        Err(e) => {
            tracing::debug!("no response-token count of the training data: {e}");
            None
        }
    }
}

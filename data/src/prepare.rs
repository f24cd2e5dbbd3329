//! `prepare`: a JSONL (or Parquet) file -> records -> token ids and tags -> masks and shifted labels ->
//! packed rows -> token cache. Lines are read in chunks and encoded on several threads; progress is
//! reported through a callback (the CLI draws the bar). Refuses a dataset in which no end-of-turn token
//! is ever trained (the model would never learn to stop) unless end-of-turn training was turned off.
//! Also builds the cache key that training uses to refuse a stale cache. It does not know about models
//! or tensors.

use crate::cache::{self, CacheHeader, CacheKey, TokenCache};
use crate::encode::Encoder;
use crate::error::{DataError, Result};
use crate::mask::Strategy;
use crate::mask::{shifted_labels, trained, MaskOptions};
use crate::pack::{self, Overlong, PackStats, Row, Sample};
use crate::record::{parse_line, Format, Record};
use crate::source::Rows;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub mask: MaskOptions,
    pub max_seq_len: usize,
    pub overlong: Overlong,
    /// Encoding threads (at least 1).
    pub threads: usize,
}

impl PrepareOptions {
    /// Options with one encoding thread per core.
    pub fn new(mask: MaskOptions, max_seq_len: usize, overlong: Overlong) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        PrepareOptions { mask, max_seq_len, overlong, threads }
    }
}

/// What a record becomes: a sample, or nothing to train on.
pub fn sample_of(encoder: &Encoder, record: &Record, mask: MaskOptions) -> Result<Sample> {
    Ok(encode_sample(encoder, record, mask)?.0)
}

/// The sample and how many of its trained labels are end-of-turn (stop) tokens.
fn encode_sample(encoder: &Encoder, record: &Record, mask: MaskOptions) -> Result<(Sample, usize)> {
    let enc = encoder.encode(record)?;
    let generation = encoder.template.as_ref().is_some_and(|t| t.has_generation);
    let flags = trained(record, &enc, mask, generation);
    let labels = match record {
        // Pre-tokenized labels are used as given (unshifted, Hugging Face style: `labels[t]` is the
        // target of position t - 1), wherever they are trained.
        Record::Tokens(crate::record::Tokens { labels: Some(given), .. }) if mask.strategy != Strategy::All => {
            (0..enc.ids.len())
                .map(|t| if flags.get(t + 1) == Some(&true) { given[t + 1] as i32 } else { -100 })
                .collect()
        }
        _ => shifted_labels(&enc.ids, &flags),
    };
    let stops = labels.iter().filter(|&&l| l >= 0 && encoder.stop_ids.contains(&(l as u32))).count();
    Ok((Sample { ids: enc.ids, labels }, stops))
}

/// The key a cache of `data` prepared with `encoder` and `opts` has.
pub fn cache_key(data: &Path, encoder: &Encoder, opts: &PrepareOptions) -> Result<CacheKey> {
    Ok(CacheKey {
        source_sha256: cache::sha256_file(data)?,
        tokenizer_sha256: cache::sha256_file(&encoder.tokenizer.path)?,
        template_sha256: encoder.template.as_ref().map(|t| cache::sha256_str(&t.source)).unwrap_or_default(),
        mask: opts.mask,
        max_seq_len: opts.max_seq_len,
        overlong: opts.overlong,
    })
}

/// Encodes, masks and packs `data`. `progress(bytes_read, total_bytes)` is called as it goes.
pub fn prepare(
    data: &Path,
    encoder: &Encoder,
    opts: &PrepareOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(CacheHeader, Vec<Row>)> {
    let key = cache_key(data, encoder, opts)?;
    let mut rows = Rows::open(data)?;
    let (unit, total) = (rows.unit.as_str(), rows.total);
    let mut samples = vec![];
    let mut format: Option<Format> = None;
    let mut dropped_no_trained = 0usize;
    let mut trained_stops = 0usize;
    let mut buf = Vec::new();
    loop {
        // A chunk of lines: (line number, text).
        let mut chunk: Vec<(usize, String)> = Vec::with_capacity(4096);
        while chunk.len() < 4096 {
            let Some(line_no) = rows.next_into(&mut buf, data)? else { break };
            let text = String::from_utf8(std::mem::take(&mut buf)).map_err(|_| {
                DataError::at(data, format!("{unit} {line_no}: not valid UTF-8; hint: run `ferrotune check`"))
            })?;
            chunk.push((line_no, text));
        }
        if chunk.is_empty() {
            break;
        }
        let results = encode_chunk(&chunk, encoder, opts, data, unit)?;
        for (line, record_format, sample, stops) in results {
            match format {
                None => {
                    format = Some(record_format);
                    if record_format == Format::Tokens && !matches!(opts.mask.strategy, Strategy::Auto | Strategy::All)
                    {
                        return Err(DataError::at(
                            data,
                            format!(
                                "pre-tokenized rows carry their own mask (`labels`) and no turns, so strategy `{}` cannot apply; hint: use --strategy auto (the labels) or all",
                                opts.mask.strategy
                            ),
                        ));
                    }
                }
                Some(f) if f != record_format => {
                    return Err(DataError::at(
                        data,
                        format!("{unit} {line}: {record_format} row in a {f} file; hint: run `ferrotune check`"),
                    ))
                }
                _ => {}
            }
            trained_stops += stops;
            match sample {
                Some(s) => samples.push(s),
                None => dropped_no_trained += 1,
            }
        }
        progress(rows.position(), total);
    }
    let format = format.ok_or_else(|| DataError::at(data, "the file has no rows"))?;
    if samples.is_empty() {
        return Err(DataError::at(
            data,
            format!(
                "no row has a trained token under masking strategy `{}` ({dropped_no_trained} rows, all masked); hint: choose another --strategy",
                opts.mask.strategy
            ),
        ));
    }
    if trained_stops == 0 && opts.mask.train_eot && !encoder.stop_ids.is_empty() {
        let names: Vec<String> =
            encoder.stop_ids.iter().filter_map(|&id| encoder.tokenizer.inner.id_to_token(id)).collect();
        return Err(DataError::at(
            data,
            format!(
                "no end-of-turn token ({}) is trained anywhere in the data under strategy `{}`: a model trained on it never learns to stop generating; hint: check the template's {{% generation %}} blocks or the labels, or pass --no-train-eot if that is what you want",
                names.join(", "),
                opts.mask.strategy
            ),
        ));
    }
    let mut stats = PackStats::default();
    let samples = pack::fit(samples, opts.max_seq_len, opts.overlong, &mut stats);
    let pad_id = encoder.pad_id();
    let (d, t, o) = (stats.dropped_overlong, stats.truncated, stats.dropped_untrained);
    let rows = pack::pack(&samples, opts.max_seq_len, pad_id, &mut stats);
    (stats.dropped_overlong, stats.truncated, stats.dropped_untrained) = (d, t, o);
    let header = CacheHeader {
        key,
        source: data.to_owned(),
        format,
        rows: rows.len(),
        documents: rows.iter().map(|r| r.doc_lens.len()).sum(),
        pad_id,
        stats,
        dropped_no_trained,
        ferrotune_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((header, rows))
}

/// (line, format, the sample unless it trains nothing, trained end-of-turn tokens).
type Encoded = (usize, Format, Option<Sample>, usize);

/// Parses and encodes a chunk of lines on `opts.threads` threads, keeping line order.
fn encode_chunk(
    chunk: &[(usize, String)],
    encoder: &Encoder,
    opts: &PrepareOptions,
    data: &Path,
    unit: &str,
) -> Result<Vec<Encoded>> {
    let threads = opts.threads.max(1).min(chunk.len());
    let per = chunk.len().div_ceil(threads);
    let one = |(line, text): &(usize, String)| -> Result<Encoded> {
        let at = |msg: String| DataError::at(data, format!("{unit} {line}: {msg}"));
        let record =
            parse_line(text, false).map_err(|e| match crate::source::whole_document(data).filter(|_| *line == 1) {
                Some(why) => DataError::at(data, why),
                None => at(format!("{e}; hint: run `ferrotune check {}`", data.display())),
            })?;
        let (sample, stops) = encode_sample(encoder, &record, opts.mask).map_err(|e| at(e.to_string()))?;
        let keep = sample.trained() > 0;
        Ok((*line, record.format(), keep.then_some(sample), stops))
    };
    let parts: Vec<Result<Vec<Encoded>>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            chunk.chunks(per).map(|part| s.spawn(move || part.iter().map(one).collect::<Result<Vec<_>>>())).collect();
        handles.into_iter().map(|h| h.join().expect("encoding thread panicked")).collect()
    });
    let mut out = Vec::with_capacity(chunk.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Prepares `data` into the cache file `out`.
pub fn prepare_to_file(
    data: &Path,
    encoder: &Encoder,
    opts: &PrepareOptions,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CacheHeader> {
    let (header, rows) = prepare(data, encoder, opts, progress)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    cache::write(out, &header, &rows)?;
    Ok(header)
}

/// Opens the cache at `out` if it matches `data`, `encoder` and `opts`; builds it when missing.
/// A cache that exists but does not match is an error (never silently rebuilt over).
pub fn open_or_prepare(
    data: &Path,
    encoder: &Encoder,
    opts: &PrepareOptions,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<TokenCache> {
    if !out.exists() {
        prepare_to_file(data, encoder, opts, out, progress)?;
    }
    let cache = TokenCache::open(out)?;
    cache.check_key(&cache_key(data, encoder, opts)?)?;
    Ok(cache)
}

/// Default cache path for a data file: `DATA.STRATEGY.LEN.ftcache` next to it.
pub fn default_cache_path(data: &Path, opts: &PrepareOptions) -> PathBuf {
    let name = data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    data.with_file_name(format!("{name}.{}.{}.ftcache", opts.mask.strategy, opts.max_seq_len))
}

//! Where rows come from: a JSONL file, one JSON object per line, or a Parquet file, one row per record
//! (each row turned into the same JSON object its columns spell, so both go through one parser and one
//! set of rules; streamed, in constant memory). Files are told apart by their first bytes (`PAR1`), not their names. Rows are numbered
//! from 1; for Parquet the number is the row's. It reads; it does not validate.

use crate::error::{DataError, Result};
use std::io::{BufRead, Read};
use std::path::Path;

/// The longest line a JSONL file may have; a longer one (or a file with no line end, like /dev/zero)
/// is refused before it fills memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// What a row number counts in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Line,
    Row,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Line => "line",
            Unit::Row => "row",
        }
    }
}

/// Rows of a file, each as the bytes of one JSON object (a JSONL line without its line ending).
pub struct Rows {
    inner: Inner,
    pub unit: Unit,
    /// Bytes of the file, for progress.
    pub total: u64,
    number: usize,
}

enum Inner {
    Jsonl { reader: std::io::BufReader<std::fs::File>, read: u64 },
    Parquet { rows: parquet::record::reader::RowIter<'static>, done: usize, count: usize },
}

/// Up to the first 8 bytes of a file (its magic number, if it has one).
fn first_bytes(path: &Path) -> Result<Vec<u8>> {
    let mut magic = Vec::with_capacity(8);
    let f = std::fs::File::open(path).map_err(DataError::io(path))?;
    f.take(8).read_to_end(&mut magic).map_err(DataError::io(path))?;
    Ok(magic)
}

/// A token cache given where data is expected: named as such, with the file it was prepared from.
fn refuse_token_cache(path: &Path) -> DataError {
    let from = crate::cache::TokenCache::open(path)
        .map(|c| format!(" from {}", c.header.source.display()))
        .unwrap_or_default();
    DataError::at(
        path,
        format!("is a token cache made by `ferrotune prepare`{from}, not JSONL or Parquet data; hint: give the data file itself (train prepares and caches it in RUN_DIR/cache; a cache is for `ferrotune probe rows`)"),
    )
}

impl Rows {
    pub fn open(path: &Path) -> Result<Rows> {
        let file = std::fs::File::open(path).map_err(DataError::io(path))?;
        let total = file.metadata().map_err(DataError::io(path))?.len();
        let magic = first_bytes(path)?;
        if crate::cache::is_token_cache(&magic) {
            return Err(refuse_token_cache(path));
        }
        if magic.starts_with(b"PAR1") {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let reader = SerializedFileReader::new(file)
                .map_err(|e| DataError::at(path, format!("not a readable Parquet file: {e}")))?;
            let count = reader.metadata().file_metadata().num_rows().max(0) as usize;
            let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader));
            return Ok(Rows { inner: Inner::Parquet { rows, done: 0, count }, unit: Unit::Row, total, number: 0 });
        }
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        Ok(Rows { inner: Inner::Jsonl { reader, read: 0 }, unit: Unit::Line, total, number: 0 })
    }

    /// Bytes consumed so far (Parquet: the share of rows read, in bytes of the file).
    pub fn position(&self) -> u64 {
        match &self.inner {
            Inner::Jsonl { read, .. } => *read,
            Inner::Parquet { done, count, .. } => (self.total as f64 * *done as f64 / (*count).max(1) as f64) as u64,
        }
    }

    /// The next row: its number and its bytes (`buf` is reused). `None` at the end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>, path: &Path) -> Result<Option<usize>> {
        buf.clear();
        match &mut self.inner {
            Inner::Jsonl { reader, read } => {
                let n = (&mut *reader)
                    .take(MAX_LINE_BYTES as u64 + 1)
                    .read_until(b'\n', buf)
                    .map_err(DataError::io(path))?;
                if buf.len() > MAX_LINE_BYTES {
                    return Err(DataError::at(
                        path,
                        format!(
                            "line {} is longer than {} MiB, ferrotune's limit for one JSONL line (no line end?); hint: one conversation a line",
                            self.number + 1,
                            MAX_LINE_BYTES >> 20
                        ),
                    ));
                }
                if n == 0 {
                    return Ok(None);
                }
                *read += n as u64;
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
            }
            Inner::Parquet { rows, done, .. } => {
                let Some(row) = rows.next() else { return Ok(None) };
                let row = row.map_err(|e| {
                    DataError::at(
                        path,
                        format!("row {}: {e}; hint: only snappy, lz4 and gzip compression are supported", *done + 1),
                    )
                })?;
                *done += 1;
                // Parquet cannot tell a missing key from a null: pyarrow gives every struct the keys of
                // all rows, null where a row has none. Nulls are dropped, at every depth.
                let mut v = row.to_json_value();
                drop_nulls(&mut v);
                serde_json::to_writer(&mut *buf, &v).expect("JSON to memory");
            }
        }
        self.number += 1;
        Ok(Some(self.number))
    }
}

/// Removes every null-valued key of every object in `v`.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.retain(|_, x| !x.is_null());
            o.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// When `path` is one JSON document (pretty-printed, or a list of rows) rather than JSON Lines: what to
/// say. Checked only after its first line failed to parse, on files up to 256 MiB.
pub fn whole_document(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > 256 << 20 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let first = text.trim_start().chars().next()?;
    if first != '{' && first != '[' {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let what = match &v {
        serde_json::Value::Array(a) => format!("one JSON list of {} items spread over lines", a.len()),
        _ => "one pretty-printed JSON object spread over lines".to_owned(),
    };
    Some(format!(
        "the file is {what}, not JSON Lines (one object per line); hint: `ferrotune convert coqa` for CoQA files, or `jq -c '.[]' FILE` (a list) / `jq -c . FILE` (an object) to write one object per line"
    ))
}

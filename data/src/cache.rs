//! The token cache: packed rows in a self-describing, memory-mapped binary file, written by `prepare`
//! and read by training. The header records everything the rows depend on (hashes of the tokenizer,
//! chat template and source file, the masking options, the row length); a cache that no longer matches
//! is refused with a hint to re-run `ferrotune prepare`. It does not tokenize or pack.
//!
//! Layout (little-endian; every section starts at a multiple of 8 bytes):
//! ```text
//! magic "FTCACHE\0" | u32 version | u32 header bytes | header JSON (padded)
//! ids       u32 x rows x max_seq_len
//! labels    i32 x rows x max_seq_len   (shifted; -100 = not trained)
//! doc_index u64 x (rows + 1)           (row r's documents are doc_lens[doc_index[r]..doc_index[r+1]])
//! doc_lens  u32 x documents
//! ```

#[cfg(target_endian = "big")]
compile_error!("the token cache is little-endian");

use crate::error::{DataError, Result};
use crate::mask::MaskOptions;
use crate::pack::{Overlong, PackStats, Row};
use crate::record::Format;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FTCACHE\0";
pub const VERSION: u32 = 1;

/// What the rows depend on. Two caches with equal keys hold the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    pub source_sha256: String,
    pub tokenizer_sha256: String,
    /// Empty when no template was used (text and prompt/completion data).
    pub template_sha256: String,
    pub mask: MaskOptions,
    pub max_seq_len: usize,
    pub overlong: Overlong,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    pub key: CacheKey,
    pub source: PathBuf,
    pub format: Format,
    pub rows: usize,
    pub documents: usize,
    pub pad_id: u32,
    pub stats: PackStats,
    /// Samples that had no trained token under the strategy, left out before packing.
    pub dropped_no_trained: usize,
    pub ferrotune_version: String,
}

/// Hex SHA-256 of a file's bytes (streamed).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(DataError::io(path))?;
    Ok(hex(&h.finalize()))
}

pub fn sha256_str(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Writes the cache to `path` atomically (a temporary file renamed into place).
pub fn write(path: &Path, header: &CacheHeader, rows: &[Row]) -> Result<()> {
    let l = header.key.max_seq_len;
    assert!(rows.iter().all(|r| r.ids.len() == l && r.labels.len() == l));
    let tmp = path.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(DataError::io(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let json = serde_json::to_vec(header).expect("header serializes");
    let mut io = || -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        w.write_all(&vec![0u8; pad8(16 + json.len()) - 16 - json.len()])?;
        for r in rows {
            for &id in &r.ids {
                w.write_all(&id.to_le_bytes())?;
            }
        }
        for r in rows {
            for &lab in &r.labels {
                w.write_all(&lab.to_le_bytes())?;
            }
        }
        // ids and labels together are 8 x rows x L bytes, so doc_index starts 8-aligned.
        let mut start = 0u64;
        w.write_all(&start.to_le_bytes())?;
        for r in rows {
            start += r.doc_lens.len() as u64;
            w.write_all(&start.to_le_bytes())?;
        }
        for r in rows {
            for &d in &r.doc_lens {
                w.write_all(&d.to_le_bytes())?;
            }
        }
        w.flush()?;
        w.get_ref().sync_all()
    };
    io().map_err(DataError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}

/// A memory-mapped cache.
pub struct TokenCache {
    pub header: CacheHeader,
    pub path: PathBuf,
    map: memmap2::Mmap,
    ids_at: usize,
    labels_at: usize,
    index_at: usize,
    lens_at: usize,
}

/// Whether `bytes` (a file's first bytes) start a token cache.
pub fn is_token_cache(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

impl TokenCache {
    pub fn open(path: &Path) -> Result<Self> {
        let stale =
            |msg: String| DataError::at(path, format!("{msg}; hint: re-run `ferrotune prepare` to rebuild the cache"));
        let file = std::fs::File::open(path).map_err(DataError::io(path))?;
        // Safety: read-only mapping; the cache is written once, atomically, and not modified after.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(DataError::io(path))?;
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(stale("not a ferrotune token cache (bad magic)".into()));
        }
        let version = u32::from_le_bytes(map[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(stale(format!("cache format version {version}, this ferrotune reads version {VERSION}")));
        }
        let hlen = u32::from_le_bytes(map[12..16].try_into().expect("4 bytes")) as usize;
        let header: CacheHeader = map
            .get(16..16 + hlen)
            .and_then(|b| serde_json::from_slice(b).ok())
            .ok_or_else(|| stale("corrupt header".into()))?;
        let l = header.key.max_seq_len;
        let cells = header.rows * l;
        let ids_at = pad8(16 + hlen);
        let labels_at = ids_at + 4 * cells;
        let index_at = labels_at + 4 * cells;
        let lens_at = index_at + 8 * (header.rows + 1);
        let expected = lens_at + 4 * header.documents;
        if map.len() != expected {
            return Err(stale(format!(
                "file is {} bytes, its header implies {expected} (truncated or corrupt)",
                map.len()
            )));
        }
        Ok(TokenCache { header, path: path.to_owned(), map, ids_at, labels_at, index_at, lens_at })
    }

    pub fn rows(&self) -> usize {
        self.header.rows
    }

    /// Why a cache holds no row, from the counts prepare kept: how many conversations were read and
    /// where each went (no trained token under the strategy, overlong and dropped, or every trained
    /// token lost to truncation), with the command that shows their lengths.
    pub fn why_empty(&self) -> String {
        let (h, st) = (&self.header, &self.header.stats);
        let read = st.samples + h.dropped_no_trained + st.dropped_overlong + st.dropped_untrained;
        format!(
            "no row to read: of the {read} conversation(s) of {}, {} have no token to train under strategy `{}`, {} are longer than max_seq_len = {} and were dropped, and {} lost every trained token to truncation; hint: `ferrotune check {} --model MODEL --max-seq-len {}` shows the lengths and trained fractions",
            h.source.display(),
            h.dropped_no_trained,
            h.key.mask.strategy.as_str(),
            st.dropped_overlong,
            h.key.max_seq_len,
            st.dropped_untrained,
            h.source.display(),
            h.key.max_seq_len
        )
    }

    pub fn max_seq_len(&self) -> usize {
        self.header.key.max_seq_len
    }

    fn slice<T>(&self, at: usize, n: usize) -> &[T] {
        let bytes = &self.map[at..at + n * std::mem::size_of::<T>()];
        assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0, "section misaligned");
        // Safety: in bounds (checked against the file size at open), aligned (asserted), and u32/i32/u64
        // accept any bit pattern.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) }
    }

    pub fn ids(&self, row: usize) -> &[u32] {
        let l = self.max_seq_len();
        self.slice(self.ids_at + 4 * row * l, l)
    }

    pub fn labels(&self, row: usize) -> &[i32] {
        let l = self.max_seq_len();
        self.slice(self.labels_at + 4 * row * l, l)
    }

    pub fn doc_lens(&self, row: usize) -> &[u32] {
        let idx: &[u64] = self.slice(self.index_at + 8 * row, 2);
        self.slice(self.lens_at + 4 * idx[0] as usize, (idx[1] - idx[0]) as usize)
    }

    /// Refuses a cache built from other inputs or options than `expected`, naming what changed.
    pub fn check_key(&self, expected: &CacheKey) -> Result<()> {
        let have = &self.header.key;
        let mut diffs = vec![];
        if have.source_sha256 != expected.source_sha256 {
            diffs.push("the data file changed".to_string());
        }
        if have.tokenizer_sha256 != expected.tokenizer_sha256 {
            diffs.push("the tokenizer changed".into());
        }
        if have.template_sha256 != expected.template_sha256 {
            diffs.push("the chat template changed".into());
        }
        if have.mask != expected.mask {
            diffs.push(format!("masking {:?} -> {:?}", have.mask, expected.mask));
        }
        if have.max_seq_len != expected.max_seq_len {
            diffs.push(format!("max_seq_len {} -> {}", have.max_seq_len, expected.max_seq_len));
        }
        if have.overlong != expected.overlong {
            diffs.push(format!("overlong policy {:?} -> {:?}", have.overlong, expected.overlong));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(DataError::at(
                &self.path,
                format!(
                    "stale token cache: {}; hint: re-run `ferrotune prepare` (or delete the file)",
                    diffs.join(", ")
                ),
            ))
        }
    }
}

//! Best-fit-decreasing packing of whole samples into rows of `max_seq_len` tokens. A sample (one
//! conversation) is never split across rows; samples longer than a row are truncated or dropped by
//! policy. Labels arrive already shifted within each sample, so no label ever points across a document
//! boundary; the attention mask is built later from each row's document lengths.
//!
//! ```text
//! row:       [a0 a1 a2 a3 | b0 b1 b2 | pad pad]      max_seq_len = 9, doc_lens = [4, 3], pad = 2
//! labels:    [a1 a2 a3 -- | b1 b2 -- | --  -- ]      (-- = -100: the last token of a document predicts nothing)
//! positions: [0  1  2  3  | 0  1  2  | 0   1  ]
//! doc ids:   [0  0  0  0  | 1  1  1  | 2   2  ]      (padding is a document of its own)
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One tokenized, masked sample: ids and shifted labels of equal length.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != -100).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the first `max_seq_len` tokens.
    Truncate,
    /// Leave the sample out.
    Drop,
}

/// Counts of what packing did, reported to the user and stored in the cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PackStats {
    pub samples: usize,
    pub rows: usize,
    pub truncated: usize,
    pub dropped_overlong: usize,
    /// Samples left with no trained token after truncation.
    pub dropped_untrained: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// Real tokens / (rows x max_seq_len).
    pub efficiency: f64,
}

/// Applies the overlong policy: returns the samples that go into rows.
pub fn fit(samples: Vec<Sample>, max_seq_len: usize, policy: Overlong, stats: &mut PackStats) -> Vec<Sample> {
    let mut out = Vec::with_capacity(samples.len());
    for mut s in samples {
        if s.ids.len() > max_seq_len {
            match policy {
                Overlong::Drop => {
                    stats.dropped_overlong += 1;
                    continue;
                }
                Overlong::Truncate => {
                    s.ids.truncate(max_seq_len);
                    s.labels.truncate(max_seq_len);
                    // The last kept token's target was cut off.
                    *s.labels.last_mut().expect("max_seq_len > 0") = -100;
                    stats.truncated += 1;
                    if s.trained() == 0 {
                        stats.dropped_untrained += 1;
                        continue;
                    }
                }
            }
        }
        out.push(s);
    }
    out
}

/// Best-fit decreasing: sample indices per row. Longest first (ties by index), each into the row with
/// the least room that still fits it. Deterministic for a given list of lengths.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = vec![];
    // (room left, bin index): the smallest room >= len is the best fit.
    let mut room: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        assert!(len <= capacity && len > 0, "sample {i} of length {len} does not fit a row of {capacity}");
        match room.range((len, 0)..).next().copied() {
            Some((left, bin)) => {
                room.remove(&(left, bin));
                bins[bin].push(i);
                room.insert((left - len, bin));
            }
            None => {
                bins.push(vec![i]);
                room.insert((capacity - len, bins.len() - 1));
            }
        }
    }
    bins
}

/// A packed row: `max_seq_len` ids and labels, and the lengths of the documents in it (padding, if
/// any, is the remainder).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub doc_lens: Vec<u32>,
}

/// Packs samples into rows (padding with `pad_id`, label -100).
pub fn pack(samples: &[Sample], max_seq_len: usize, pad_id: u32, stats: &mut PackStats) -> Vec<Row> {
    let lengths: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    let bins = best_fit_decreasing(&lengths, max_seq_len);
    let rows: Vec<Row> = bins
        .iter()
        .map(|bin| {
            let mut row =
                Row { ids: Vec::with_capacity(max_seq_len), labels: Vec::with_capacity(max_seq_len), doc_lens: vec![] };
            for &i in bin {
                row.ids.extend_from_slice(&samples[i].ids);
                row.labels.extend_from_slice(&samples[i].labels);
                row.doc_lens.push(samples[i].ids.len() as u32);
            }
            row.ids.resize(max_seq_len, pad_id);
            row.labels.resize(max_seq_len, -100);
            row
        })
        .collect();
    stats.samples = samples.len();
    stats.rows = rows.len();
    stats.tokens = lengths.iter().sum();
    stats.trained_tokens = samples.iter().map(Sample::trained).sum();
    stats.efficiency = if rows.is_empty() { 0.0 } else { stats.tokens as f64 / (rows.len() * max_seq_len) as f64 };
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(doc: u32, len: usize) -> Sample {
        // ids encode (document, position) so that any mixing is visible.
        let ids: Vec<u32> = (0..len as u32).map(|p| doc * 1000 + p).collect();
        let trained: Vec<bool> = (0..len).map(|p| p > 0).collect();
        Sample { labels: crate::mask::shifted_labels(&ids, &trained), ids }
    }

    #[test]
    fn best_fit_decreasing_packs_tightly_and_deterministically() {
        let lengths = [5, 3, 7, 2, 4, 1, 6];
        let bins = best_fit_decreasing(&lengths, 8);
        // 7+1, 6+2, 5+3, 4 (worked by hand: longest first, each into the fullest row that fits).
        assert_eq!(bins, vec![vec![2, 5], vec![6, 3], vec![0, 1], vec![4]]);
        assert_eq!(best_fit_decreasing(&lengths, 8), bins);
    }

    #[test]
    fn packing_never_splits_and_labels_stay_inside_documents() {
        let samples: Vec<Sample> = (0..40).map(|d| sample(d, 1 + (d as usize * 7) % 23)).collect();
        let mut stats = PackStats::default();
        let rows = pack(&samples, 32, 0, &mut stats);
        let mut seen = vec![0usize; samples.len()];
        for row in &rows {
            assert_eq!(row.ids.len(), 32);
            let mut start = 0usize;
            for &len in &row.doc_lens {
                let len = len as usize;
                let doc = row.ids[start] / 1000;
                seen[doc as usize] += 1;
                assert_eq!(&row.ids[start..start + len], &samples[doc as usize].ids[..], "document split or mixed");
                for t in start..start + len {
                    let l = row.labels[t];
                    if l != -100 {
                        // The label is the next token of the same document.
                        assert!(t + 1 < start + len, "label crosses the document boundary");
                        assert_eq!(l as u32, row.ids[t + 1]);
                        assert_eq!(l as u32 / 1000, doc);
                    }
                }
                start += len;
            }
            assert!(row.labels[start..].iter().all(|&l| l == -100));
        }
        assert!(seen.iter().all(|&n| n == 1), "every sample exactly once");
        assert_eq!(stats.tokens, samples.iter().map(|s| s.ids.len()).sum::<usize>());
        assert!(stats.efficiency > 0.9, "{}", stats.efficiency);
    }

    #[test]
    fn overlong_samples_are_truncated_or_dropped_and_counted() {
        let samples = vec![sample(0, 10), sample(1, 4), sample(2, 12)];
        let mut stats = PackStats::default();
        let kept = fit(samples.clone(), 8, Overlong::Truncate, &mut stats);
        assert_eq!((kept.len(), stats.truncated), (3, 2));
        assert_eq!(kept[0].ids.len(), 8);
        assert_eq!(kept[0].labels[7], -100, "the cut-off target is not trained");
        assert_eq!(kept[0].labels[6], 7);
        let mut stats = PackStats::default();
        let kept = fit(samples, 8, Overlong::Drop, &mut stats);
        assert_eq!((kept.len(), stats.dropped_overlong), (1, 2));
    }
}

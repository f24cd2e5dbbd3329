//! One micro-batch as tensors on the training device: ids, per-document positions, the rows' documents
//! (found on the host, so no device read-back), and the trained positions with their targets; and the
//! rule that leaves out of the step every position whose output cannot reach the loss ([`trimmed`]).
//! It does not fetch batches (the data crate's loader) or run the model.

use crate::kernels::{enabled, Kernel};
use crate::model::{doc_runs, Attend};
use ferrotune_data::loader::Batch;
use tch::{Device, Tensor};

/// Tensors of a batch on `device`, plus the trained positions computed on the host (no device sync).
pub struct BatchTensors {
    pub ids: Tensor,
    pub positions: Tensor,
    /// The rows' documents, found from the host's ids.
    pub attend: Attend,
    pub idx: Tensor,
    pub targets: Tensor,
    pub trained: usize,
}

/// The tensors of `b` that a training or evaluation step computes: its positions that can reach the
/// loss ([`trimmed`]), or all of them under `FERROTUNE_COMPOSITE=trim`.
pub fn to_tensors(b: &Batch, device: Device) -> BatchTensors {
    match enabled(Kernel::Trim).then(|| trimmed(b)).flatten() {
        Some(t) => all_positions(&t, device),
        None => all_positions(b, device),
    }
}

/// Every position of `b`'s rows as tensors on `device`.
pub fn all_positions(b: &Batch, device: Device) -> BatchTensors {
    let shape = [b.rows as i64, b.seq as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(device);
    let (mut idx, mut targets) = (Vec::with_capacity(b.trained_tokens), Vec::with_capacity(b.trained_tokens));
    for (i, &l) in b.labels.iter().enumerate() {
        if l != -100 {
            idx.push(i as i64);
            targets.push(l);
        }
    }
    BatchTensors {
        ids: t(&b.ids),
        positions: t(&b.position_ids),
        attend: Attend::packed(&b.doc_ids, b.rows, device),
        idx: Tensor::from_slice(&idx).to_device(device),
        targets: Tensor::from_slice(&targets).to_device(device),
        trained: idx.len(),
    }
}

/// `b` with only the positions whose outputs can reach the loss, its rows laid end to end as one row;
/// None when that would leave nothing out, or when a row's document ids are not contiguous runs (then
/// the rows keep their own block-diagonal masks, which one long row would make `rows` times larger).
///
/// Attention is causal and never crosses documents, so the output at position p (and everything
/// computed from it) reaches only positions q >= p of its own document: p matters to the loss only if
/// its document trains some q >= p. Padding (a document of its own, never trained) and a document's
/// tokens after its last trained one (an untrained tail, a conversation without trained turns) are left
/// out; the loss and every gradient are those of the full rows up to the order of floating-point sums,
/// since what is left out adds exact zeros. The rows of a packed batch are only a container (documents
/// never attend across them), so the kept positions of all rows form one row; document ids are
/// renumbered so that no two rows' documents share one. Positions keep their per-document values.
/// Nothing trained at all keeps the first position, so the step still runs (its loss is 0).
pub fn trimmed(b: &Batch) -> Option<Batch> {
    let t = b.seq;
    let (mut keep, mut doc_ids) = (Vec::with_capacity(b.ids.len()), Vec::with_capacity(b.ids.len()));
    for r in 0..b.rows {
        let at = r * t;
        for (start, len) in doc_runs(&b.doc_ids[at..at + t])? {
            let start = at + start as usize;
            let n = reaching_in(&b.labels[start..start + len as usize]);
            if n > 0 {
                let id = doc_ids.last().map_or(0, |&d: &i64| d + 1);
                keep.extend(start..start + n);
                doc_ids.resize(keep.len(), id);
            }
        }
    }
    if keep.len() == b.ids.len() {
        return None;
    }
    if keep.is_empty() && !b.ids.is_empty() {
        (keep, doc_ids) = (vec![0], vec![0]);
    }
    let pick = |v: &[i64]| keep.iter().map(|&p| v[p]).collect::<Vec<_>>();
    Some(Batch {
        rows: 1,
        seq: keep.len(),
        ids: pick(&b.ids),
        labels: pick(&b.labels),
        position_ids: pick(&b.position_ids),
        doc_ids,
        trained_tokens: b.trained_tokens,
        row_indices: b.row_indices.clone(),
        epoch: b.epoch,
    })
}

/// How many leading positions of one document's `labels` can reach the loss: up to its last trained one.
fn reaching_in<L: Copy + Into<i64>>(labels: &[L]) -> usize {
    labels.iter().rposition(|&l| l.into() != -100).map_or(0, |last| last + 1)
}

/// How many positions of a packed row can reach the loss ([`trimmed`]'s rule), from its documents'
/// lengths in order (the token cache's; padding after them, if any, is never trained) and its labels.
pub fn reaching(doc_lens: &[u32], labels: &[i32]) -> usize {
    let mut start = 0;
    doc_lens
        .iter()
        .map(|&len| {
            let end = (start + len as usize).min(labels.len());
            let n = reaching_in(&labels[start..end]);
            start = end;
            n
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `seq` from (length, trained offsets within the document) per document.
    fn batch(seq: usize, rows: &[&[(usize, &[usize])]]) -> Batch {
        let (mut ids, mut labels, mut position_ids, mut doc_ids) = (vec![], vec![], vec![], vec![]);
        for docs in rows {
            for (d, &(len, trained)) in docs.iter().enumerate() {
                for j in 0..len {
                    ids.push(ids.len() as i64 + 1000);
                    labels.push(if trained.contains(&j) { 7 + j as i64 } else { -100 });
                    position_ids.push(j as i64);
                    doc_ids.push(d as i64);
                }
            }
            assert_eq!(ids.len() % seq, 0, "a row's documents fill it");
        }
        let trained_tokens = labels.iter().filter(|&&l| l != -100).count();
        Batch {
            rows: rows.len(),
            seq,
            ids,
            labels,
            position_ids,
            doc_ids,
            trained_tokens,
            row_indices: vec![],
            epoch: 0,
        }
    }

    #[test]
    fn keeps_each_document_up_to_its_last_trained_position() {
        // Row 0: a document trained at 2 and 4 of 6 (5 is its untrained tail), an untrained document
        // of 3, padding of 3. Row 1: a document trained at its last position, padding of 2.
        let b = batch(12, &[&[(6, &[2, 4]), (3, &[]), (3, &[])], &[(10, &[9]), (2, &[])]]);
        let t = trimmed(&b).unwrap();
        assert_eq!((t.rows, t.seq, t.trained_tokens), (1, 15, 3));
        let kept: Vec<i64> = (0..5).chain(12..22).map(|p| b.ids[p]).collect();
        assert_eq!(t.ids, kept);
        assert_eq!(t.position_ids, (0..5).chain(0..10).collect::<Vec<i64>>());
        assert_eq!(t.doc_ids, [vec![0; 5], vec![1; 10]].concat(), "row 1's document 0 is a new one");
        assert_eq!(t.labels.iter().filter(|&&l| l != -100).count(), 3);
        assert_eq!(t.labels[4], 11);
        // The token cache's view of the same rows (documents' lengths, padding not among them).
        let labels: Vec<i32> = b.labels.iter().map(|&l| l as i32).collect();
        let kept = reaching(&[6, 3], &labels[..12]) + reaching(&[10], &labels[12..]);
        assert_eq!(kept, t.seq);
        let bt = all_positions(&t, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&bt.idx).unwrap(), vec![2, 4, 14]);
        assert_eq!(bt.attend.pairs(1, 15), 15.0 + 55.0);
    }

    #[test]
    fn leaves_a_batch_alone_when_every_position_counts_or_ids_come_back() {
        // Every document trains its last position: nothing to leave out.
        assert!(trimmed(&batch(8, &[&[(5, &[4]), (3, &[0, 2])]])).is_none());
        // Document 0 comes back after document 1: not runs, so no single row.
        let mut b = batch(8, &[&[(4, &[1]), (4, &[])]]);
        b.doc_ids = vec![0, 0, 1, 1, 0, 0, 2, 2];
        assert!(trimmed(&b).is_none());
    }

    #[test]
    fn nothing_trained_keeps_one_position() {
        let t = trimmed(&batch(4, &[&[(4, &[])], &[(2, &[]), (2, &[])]])).unwrap();
        assert_eq!((t.seq, t.ids.clone(), t.trained_tokens), (1, vec![1000], 0));
        assert_eq!(all_positions(&t, Device::Cpu).trained, 0);
    }
}

//! One micro-batch as tensors on the training device: ids, per-document positions, the rows' documents
//! (found on the host, so no device read-back), and the trained positions with their targets. It does
//! not fetch batches (the data crate's loader) or run the model.

use crate::model::Attend;
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

pub fn to_tensors(b: &Batch, device: Device) -> BatchTensors {
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

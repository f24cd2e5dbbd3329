//! `preview`: a record shown with its trained tokens marked, so a person can see what the loss will
//! learn from. Consecutive tokens with the same trained flag are decoded together (special tokens kept)
//! and either coloured (terminal) or wrapped in ⟦ ⟧. Also the per-token JSON view (`ids`, `labels`,
//! `tokens`) that other tools can check masks with. It decides nothing; masks come from `mask`.

use crate::encode::{Encoder, Tag};
use crate::error::Result;
use crate::mask::{shifted_labels, trained, MaskOptions};
use crate::record::Record;
use serde::Serialize;

/// How trained spans are marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// ANSI colours: trained text green on a dark background, the rest dim.
    Color,
    /// ⟦trained⟧ brackets, for logs and golden tests.
    Brackets,
}

/// The record's text with trained spans marked.
pub fn marked(encoder: &Encoder, record: &Record, mask: MaskOptions, marking: Marking) -> Result<String> {
    let view = view(encoder, record, mask)?;
    let mut out = String::new();
    let mut start = 0;
    while start < view.ids.len() {
        let on = view.trained[start];
        let end = (start..view.ids.len()).find(|&i| view.trained[i] != on).unwrap_or(view.ids.len());
        let text = encoder.tokenizer.decode_raw(&view.ids[start..end])?;
        match (marking, on) {
            (Marking::Brackets, true) => out.push_str(&format!("⟦{text}⟧")),
            (Marking::Color, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
            (Marking::Color, false) => out.push_str(&format!("\x1b[2m{text}\x1b[0m")),
            (Marking::Brackets, false) => out.push_str(&text),
        }
        start = end;
    }
    Ok(out)
}

/// Per token: id, vocabulary piece, tag, whether it is trained, and the shifted label.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub ids: Vec<u32>,
    /// Shifted: `labels[t]` is the target predicted at position t (-100 = none).
    pub labels: Vec<i32>,
    pub tokens: Vec<String>,
    pub trained: Vec<bool>,
    pub tags: Vec<Tag>,
}

pub fn view(encoder: &Encoder, record: &Record, mask: MaskOptions) -> Result<View> {
    let enc = encoder.encode(record)?;
    let generation = encoder.template.as_ref().is_some_and(|t| t.has_generation);
    let flags = trained(record, &enc, mask, generation);
    let labels = shifted_labels(&enc.ids, &flags);
    let tokens = enc.ids.iter().map(|&id| encoder.tokenizer.inner.id_to_token(id).unwrap_or_default()).collect();
    Ok(View { labels, tokens, ids: enc.ids, trained: flags, tags: enc.tags })
}

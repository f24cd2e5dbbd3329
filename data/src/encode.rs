//! The one function that turns a record into token ids and a tag per token (kind, role, message index,
//! inside a `{% generation %}` block or not). Conversations are rendered through the chat template and
//! tokenized once, with byte offsets, without adding special tokens (the template writes them);
//! prompt/completion and text rows are tokenized as plain text with the tokenizer's own BOS and an EOS.
//! Masking strategies read the tags; nothing here decides what is trained.

use crate::error::{DataError, Result};
use crate::record::{ChatMessage, Record, Role};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// What part of the rendered text a token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The beginning-of-text token the template (or tokenizer) puts first.
    Bos,
    /// Template text before the first message's header that belongs to no message (e.g. a default
    /// system prompt the template injects).
    Preamble,
    /// Template text around a message: role headers and separators.
    Header,
    /// The message's own content.
    Content,
    /// The first special token after a message's content (e.g. `<|eot_id|>`, `<|im_end|>`, EOS).
    EndOfTurn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tag {
    pub kind: Kind,
    /// The message role the token belongs to (headers: the message they introduce).
    pub role: Option<Role>,
    /// Index of that message in `messages` (prompt = 0, completion = 1 for instruction rows).
    pub message: Option<u16>,
    /// Inside a `{% generation %}` block of the template.
    pub generation: bool,
}

impl Tag {
    fn new(kind: Kind, role: Option<Role>, message: Option<usize>) -> Tag {
        Tag { kind, role, message: message.map(|m| m as u16), generation: false }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub tags: Vec<Tag>,
}

/// Tokenizer + template, with what is learned once about them.
pub struct Encoder {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    special: HashSet<u32>,
    /// Role header text each role gets when it does not come first (learned from a probe render).
    headers: HashMap<Role, String>,
    /// Whether the template itself writes `bos_token` (then a leading BOS token is tagged `Bos`).
    template_bos: bool,
    /// What the tokenizer adds around plain text with add_special_tokens=true (e.g. Llama 3's BOS).
    text_prefix: Vec<u32>,
    eos_id: Option<u32>,
}

impl Encoder {
    /// The tokenizer of the model directory `dir` with the chat template `template` (`auto`: the
    /// model's own, if it ships one; see `ChatTemplate::find`).
    pub fn from_model_dir(dir: &std::path::Path, template: &str) -> Result<Self> {
        Self::new(Tokenizer::from_dir(dir)?, ChatTemplate::find(dir, template)?)
    }

    pub fn new(tokenizer: Tokenizer, template: Option<ChatTemplate>) -> Result<Self> {
        let special: HashSet<u32> =
            tokenizer.inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let with = tokenizer.encode_with_special("a")?;
        let without = tokenizer.encode("a")?;
        let text_prefix = match with.iter().position(|&id| Some(&id) == without.first()) {
            Some(p) => with[..p].to_vec(),
            None => vec![],
        };
        let eos_id = template.as_ref().and_then(|t| tokenizer.token_id(&t.eos_token)).or_else(|| tokenizer.eos_id());
        let template_bos = template.as_ref().is_some_and(|t| t.source.contains("bos_token") && !t.bos_token.is_empty());
        let mut enc =
            Encoder { tokenizer, template, special, headers: HashMap::new(), template_bos, text_prefix, eos_id };
        enc.headers = enc.learn_headers();
        Ok(enc)
    }

    /// Header text of user and assistant turns that are not first: the template text between the
    /// end-of-turn token of one message and the content of the next. Templates that refuse the probe
    /// conversation simply get no preamble detection.
    fn learn_headers(&self) -> HashMap<Role, String> {
        let mut out = HashMap::new();
        let Some(t) = &self.template else { return out };
        let probe: Vec<ChatMessage> = [Role::User, Role::Assistant, Role::User, Role::Assistant]
            .iter()
            .map(|&role| ChatMessage { role, content: "x".into(), weight: None })
            .collect();
        let Ok(r) = t.render_spans(&probe) else { return out };
        for (i, message) in probe.iter().enumerate().skip(1) {
            let seg = &r.text[r.content[i - 1].end..r.content[i].start];
            let Ok(enc) = self.tokenizer.encode_offsets(seg) else { continue };
            if let Some((id, (_, end))) = enc.first() {
                if self.special.contains(id) {
                    out.insert(message.role, seg[*end..].to_owned());
                }
            }
        }
        out
    }

    /// Padding id: the tokenizer's pad token if it has one, else EOS, else 0 (never trained or attended).
    pub fn pad_id(&self) -> u32 {
        self.tokenizer.pad_id().or(self.eos_id).unwrap_or(0)
    }

    /// Token ids and tags of one record.
    pub fn encode(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Messages(messages) => self.encode_messages(messages),
            Record::PromptCompletion { prompt, completion } => {
                self.encode_plain(&[(prompt.as_str(), Role::User), (completion.as_str(), Role::Assistant)])
            }
            Record::Text(text) => self.encode_plain(&[(text.as_str(), Role::Assistant)]),
        }
    }

    fn encode_messages(&self, messages: &[ChatMessage]) -> Result<Encoded> {
        let template = self.template.as_ref().ok_or_else(|| {
            DataError::at(
                &self.tokenizer.path,
                "conversations need a chat template and this tokenizer ships none; hint: choose one with --template llama3, --template chatml or a .jinja file (model.template in a run config)",
            )
        })?;
        let r = template.render_spans(messages)?;
        let toks = self.tokenizer.encode_offsets(&r.text)?;
        let n = messages.len();
        // Where the first message's header starts: after BOS and any preamble.
        let seg0 = &r.text[..r.content[0].start];
        let bos_len =
            if self.template_bos && seg0.starts_with(&template.bos_token) { template.bos_token.len() } else { 0 };
        let preamble_end = match self.headers.get(&messages[0].role) {
            Some(h) if seg0.len() >= bos_len + h.len() && seg0.ends_with(h.as_str()) => seg0.len() - h.len(),
            _ => bos_len,
        };
        let mut tags = Vec::with_capacity(toks.len());
        let mut seg = 0usize; // number of contents entirely before the current token
        let mut seen_in_seg = false;
        for (t, &(id, (start, end))) in toks.iter().enumerate() {
            while seg < n && r.content[seg].end <= start && !overlaps(&r.content[seg], start, end) {
                seg += 1;
                seen_in_seg = false;
            }
            let tag = if seg < n && overlaps(&r.content[seg], start, end) {
                Tag::new(Kind::Content, Some(messages[seg].role), Some(seg))
            } else if seg == 0 {
                if t == 0 && bos_len > 0 && end <= bos_len {
                    Tag::new(Kind::Bos, None, None)
                } else if end <= preamble_end {
                    Tag::new(Kind::Preamble, None, None)
                } else {
                    Tag::new(Kind::Header, Some(messages[0].role), Some(0))
                }
            } else if !seen_in_seg && self.special.contains(&id) {
                Tag::new(Kind::EndOfTurn, Some(messages[seg - 1].role), Some(seg - 1))
            } else if seg < n {
                Tag::new(Kind::Header, Some(messages[seg].role), Some(seg))
            } else {
                Tag::new(Kind::Header, None, None)
            };
            if tag.kind != Kind::Content {
                seen_in_seg = true;
            }
            let generation = r.generation.iter().any(|g| overlaps(g, start, end));
            tags.push(Tag { generation, ..tag });
        }
        Ok(Encoded { ids: toks.iter().map(|&(id, _)| id).collect(), tags })
    }

    /// Plain text pieces, each tokenized on its own (so no token straddles two pieces), with the
    /// tokenizer's own prefix (BOS) and an EOS closing the last piece.
    fn encode_plain(&self, pieces: &[(&str, Role)]) -> Result<Encoded> {
        let mut ids = self.text_prefix.clone();
        let mut tags = vec![Tag::new(Kind::Bos, None, None); ids.len()];
        for (i, (text, role)) in pieces.iter().enumerate() {
            let piece = self.tokenizer.encode(text)?;
            tags.extend(std::iter::repeat_n(Tag::new(Kind::Content, Some(*role), Some(i)), piece.len()));
            ids.extend(piece);
        }
        if let Some(eos) = self.eos_id {
            ids.push(eos);
            tags.push(Tag::new(Kind::EndOfTurn, Some(pieces.last().expect("one piece").1), Some(pieces.len() - 1)));
        }
        Ok(Encoded { ids, tags })
    }
}

fn overlaps(span: &std::ops::Range<usize>, start: usize, end: usize) -> bool {
    !span.is_empty() && start < span.end && end > span.start
}

//! The one function that turns a record into token ids and a tag per token (kind, role, message index,
//! inside a `{% generation %}` block or not). Conversations are rendered through the chat template and
//! tokenized once, with byte offsets, without adding special tokens (the template writes them);
//! prompt/completion and text rows are tokenized as plain text with the tokenizer's own BOS and an EOS.
//! Pre-tokenized rows keep their ids. A sequence with two BOS tokens is refused. Masking strategies read
//! the tags; nothing here decides what is trained.
//!
//! Conversations are tagged by walking the messages in order with the rendered text: each message's
//! header (the role header text learned from a probe render), then its body (text the template renders
//! from the message's other fields: reasoning, tool calls, tool definitions placed in the message),
//! its content (located by `render_spans`), more body, and its end-of-turn token (the first special
//! token after it). A message with no located content (tool calls only) is found by its header.

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
    /// The rest of a message's turn between its header and its end-of-turn token: what the template
    /// renders from the message's other fields (an assistant's reasoning and tool calls, a tool result's
    /// wrapping, tool definitions placed in a user or system message).
    Body,
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
    bos_id: Option<u32>,
    /// Tokens that end a turn and stop generation: EOS and the template's end-of-turn tokens.
    pub stop_ids: HashSet<u32>,
    /// Ids a row may hold: the tokenizer's vocabulary, or the model's embedding rows (config.json's
    /// `vocab_size`) when that is smaller.
    pub vocab_size: u32,
}

impl Encoder {
    /// The tokenizer of the model directory `dir` with the chat template `template` (`auto`: the
    /// model's own, if it ships one; see `ChatTemplate::find`).
    pub fn from_model_dir(dir: &std::path::Path, template: &str) -> Result<Self> {
        let mut enc = Self::new(Tokenizer::from_dir(dir)?, ChatTemplate::find(dir, template)?)?;
        let config = std::fs::read_to_string(dir.join("config.json")).ok();
        let model_vocab = config
            .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
            .and_then(|c| c.get("vocab_size").and_then(serde_json::Value::as_u64));
        if let Some(v) = model_vocab {
            enc.vocab_size = enc.vocab_size.min(v as u32);
        }
        Ok(enc)
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
        // BOS as the sequence opener: the template writes it, or the tokenizer puts it before text (a
        // tokenizer whose `bos_token` also opens every turn, like SmolLM2's <|im_start|>, has none).
        let bos_id = template
            .as_ref()
            .filter(|_| template_bos)
            .and_then(|t| tokenizer.token_id(&t.bos_token))
            .or_else(|| text_prefix.first().copied());
        let mut enc = Encoder {
            tokenizer,
            template,
            special,
            headers: HashMap::new(),
            template_bos,
            text_prefix,
            eos_id,
            bos_id,
            stop_ids: eos_id.into_iter().collect(),
            vocab_size: 0,
        };
        enc.vocab_size = enc.tokenizer.inner.get_vocab_size(true) as u32;
        enc.headers = enc.learn_headers();
        Ok(enc)
    }

    /// Header text of each role's turns when they are not first: the template text between the
    /// end-of-turn token of one message and the content of the next; and the end-of-turn tokens. Learned
    /// from a user/assistant probe and, for `tool`, from one with a tool result (templates that refuse a
    /// probe simply get no header for that role).
    fn learn_headers(&mut self) -> HashMap<Role, String> {
        let mut out = HashMap::new();
        let Some(t) = &self.template else { return out };
        use Role::{Assistant, Tool, User};
        for roles in [&[User, Assistant, User, Assistant][..], &[User, Assistant, Tool, Assistant]] {
            let probe: crate::record::Conversation =
                roles.iter().map(|&role| ChatMessage::new(role, "x")).collect::<Vec<_>>().into();
            let Ok(r) = t.render_spans(&probe) else { continue };
            for i in 1..probe.len() {
                let (Some(prev), Some(cur)) = (&r.content[i - 1], &r.content[i]) else { continue };
                let seg = &r.text[prev.end..cur.start];
                let Ok(enc) = self.tokenizer.encode_offsets(seg) else { continue };
                if let Some((id, (_, end))) = enc.first() {
                    if self.special.contains(id) {
                        out.entry(probe[i].role).or_insert_with(|| seg[*end..].to_owned());
                        self.stop_ids.insert(*id);
                    }
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
        let enc = match record {
            Record::Messages(messages) => self.encode_messages(messages),
            Record::PromptCompletion { prompt, completion } => {
                self.encode_plain(&[(prompt.as_str(), Role::User), (completion.as_str(), Role::Assistant)])
            }
            Record::Text(text) => self.encode_plain(&[(text.as_str(), Role::Assistant)]),
            Record::Tokens(t) => {
                let labels = t.labels.iter().flatten().filter(|&&l| l >= 0).map(|&l| l as u64);
                if let Some(id) =
                    t.input_ids.iter().map(|&i| u64::from(i)).chain(labels).find(|&i| i >= u64::from(self.vocab_size))
                {
                    return Err(DataError::at(
                        &self.tokenizer.path,
                        format!("token id {id} is outside the model's vocabulary of {}; hint: run `ferrotune check --model`", self.vocab_size),
                    ));
                }
                Ok(Encoded {
                    ids: t.input_ids.clone(),
                    tags: vec![Tag::new(Kind::Content, None, None); t.input_ids.len()],
                })
            }
        }?;
        // Two BOS tokens where one belongs: doubled at the start (the template or tokenizer writes one
        // and the text another), or one inside a message's text. Templates that open every turn with
        // BOS (Llama 2) write it outside the contents, which is fine.
        if let Some(bos) = self.bos_id {
            let doubled = enc.ids.len() > 1 && enc.ids[0] == bos && enc.ids[1] == bos;
            let in_text = enc
                .ids
                .iter()
                .zip(&enc.tags)
                .skip(1)
                .any(|(&id, t)| id == bos && t.kind == Kind::Content && !matches!(record, Record::Tokens(_)));
            if doubled || in_text {
                let name = self.tokenizer.inner.id_to_token(bos).unwrap_or_default();
                let n = enc.ids.iter().filter(|&&id| id == bos).count();
                return Err(DataError::at(
                    &self.tokenizer.path,
                    format!("the sequence has {n} BOS tokens ({name}), {}: the template (or the tokenizer) writes one and the text another; hint: remove {name} from the data", if doubled { "two at the start" } else { "one inside a message's text" }),
                ));
            }
        }
        Ok(enc)
    }

    fn encode_messages(&self, conv: &crate::record::Conversation) -> Result<Encoded> {
        let template = self.template.as_ref().ok_or_else(|| {
            DataError::at(
                &self.tokenizer.path,
                "conversations need a chat template and this tokenizer ships none; hint: choose one with --template llama3, --template chatml or a .jinja file (model.template in a run config)",
            )
        })?;
        let r = template.render_spans(conv)?;
        let toks = self.tokenizer.encode_offsets(&r.text)?;
        let regions = self.regions(template, conv, &r, &toks);
        let mut tags = Vec::with_capacity(toks.len());
        let mut c = 0usize; // first content span that may still overlap
        let spans: Vec<(usize, &std::ops::Range<usize>)> =
            r.content.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s))).collect();
        for &(_, (start, end)) in &toks {
            while c < spans.len() && spans[c].1.end <= start {
                c += 1;
            }
            let tag = match spans.get(c) {
                Some(&(i, span)) if overlaps(span, start, end) => Tag::new(Kind::Content, Some(conv[i].role), Some(i)),
                _ => {
                    let k = regions.partition_point(|(at, _)| *at <= start);
                    regions[k.saturating_sub(1)].1
                }
            };
            let generation = r.generation.iter().any(|g| overlaps(g, start, end));
            tags.push(Tag { generation, ..tag });
        }
        // A tool call the template does not render (or that we cannot place in its turn) would train an
        // empty turn: refuse it, naming the message.
        let calling: Vec<usize> = (0..conv.len()).filter(|&i| conv[i].calls_tools()).collect();
        let mut turns: HashMap<u16, String> = HashMap::new();
        if !calling.is_empty() {
            for ((_, (s, e)), t) in toks.iter().zip(&tags) {
                if let (Kind::Body, Some(m)) = (t.kind, t.message) {
                    turns.entry(m).or_default().push_str(&r.text[*s..*e]);
                }
            }
        }
        for &i in &calling {
            let m = &conv[i];
            let turn = turns.get(&(i as u16)).map_or("", String::as_str);
            let calls = m.extra.as_ref().map_or(&[][..], |e| e.tool_calls());
            let names = calls.iter().filter_map(|c| c.pointer("/function/name").and_then(serde_json::Value::as_str));
            if let Some(name) = names.clone().find(|n| !turn.contains(n)) {
                return Err(DataError::at(
                    &template.origin,
                    format!("messages[{i}] calls `{name}`, but the chat template renders no such call in that assistant turn, so it would train an empty turn; hint: use a tool-aware template (--template llama31, or the model's own if it supports tools)"),
                ));
            }
        }
        Ok(Encoded { ids: toks.iter().map(|&(id, _)| id).collect(), tags })
    }

    /// Where each message's parts start, as (byte offset, tag) in order; a token outside every content
    /// span takes the tag of the last region starting at or before it.
    fn regions(
        &self,
        template: &ChatTemplate,
        conv: &crate::record::Conversation,
        r: &crate::template::Rendered,
        toks: &[(u32, (usize, usize))],
    ) -> Vec<(usize, Tag)> {
        let n = conv.len();
        let text = &r.text;
        let role = |i: usize| Some(conv[i].role);
        let mut regions = vec![(0, Tag::new(Kind::Header, role(0), Some(0)))];
        // Message 0: BOS, then template text that belongs to no message, then its header.
        let first = r.content[0].as_ref().map_or(text.len(), |c| c.start);
        let seg0 = &text[..first];
        let bos_len =
            if self.template_bos && seg0.starts_with(&template.bos_token) { template.bos_token.len() } else { 0 };
        if bos_len > 0 && toks.first().is_some_and(|t| t.1 .1 <= bos_len) {
            regions[0] = (0, Tag::new(Kind::Bos, None, None));
            regions.push((toks[0].1 .1, Tag::new(Kind::Header, role(0), Some(0))));
        }
        let mut pos = regions.last().expect("one region").0;
        // The first message's header, found by its text: what comes before it is preamble (a default
        // system prompt the template injects), what comes after it and before the content is body (tool
        // definitions placed in the first user message).
        if let (Some(h), Some(c)) = (self.headers.get(&conv[0].role), &r.content[0]) {
            if let Some(at) = seg0[pos..].rfind(h.as_str()).map(|k| k + pos) {
                if at > pos {
                    regions.push((pos, Tag::new(Kind::Preamble, None, None)));
                    regions.push((at, Tag::new(Kind::Header, role(0), Some(0))));
                }
                if at + h.len() < c.start {
                    regions.push((at + h.len(), Tag::new(Kind::Body, role(0), Some(0))));
                }
            }
        }
        // Where the next located content after message i starts (linear: one backward pass).
        let mut next_starts = vec![text.len(); n];
        for i in (0..n.saturating_sub(1)).rev() {
            next_starts[i] = r.content[i + 1].as_ref().map_or(next_starts[i + 1], |c| c.start);
        }
        for i in 0..n {
            let next_content = next_starts[i];
            let header = self.headers.get(&conv[i].role);
            match &r.content[i] {
                Some(c) => {
                    if i > 0 {
                        regions.push((pos, Tag::new(Kind::Header, role(i), Some(i))));
                        if let Some(h) = header.filter(|h| text[pos..c.start].starts_with(h.as_str())) {
                            if pos + h.len() < c.start {
                                regions.push((pos + h.len(), Tag::new(Kind::Body, role(i), Some(i))));
                            }
                        }
                    }
                    pos = c.end;
                }
                None => {
                    // No content to anchor on: the message is found by its header, or not at all.
                    let Some(h) = header.filter(|h| text[pos..].starts_with(h.as_str())) else { continue };
                    regions.push((pos, Tag::new(Kind::Header, role(i), Some(i))));
                    pos += h.len();
                }
            }
            // The turn's tail: body text up to the first special token before the next content, which
            // ends the turn. When nothing closes it before the next content, the text goes to the next
            // header.
            let after = |t: &&(u32, (usize, usize))| t.1 .0 >= pos && t.1 .0 < next_content;
            let k = toks.partition_point(|t| t.1 .0 < pos);
            if let Some(&(_, (s, e))) = toks[k..].iter().take_while(|t| after(t)).find(|t| self.special.contains(&t.0))
            {
                if s > pos {
                    regions.push((pos, Tag::new(Kind::Body, role(i), Some(i))));
                }
                regions.push((s, Tag::new(Kind::EndOfTurn, role(i), Some(i))));
                pos = e;
            }
            let next = (i + 1 < n).then_some(i + 1);
            regions.push((pos, Tag::new(Kind::Header, next.map(|j| conv[j].role), next)));
        }
        regions
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

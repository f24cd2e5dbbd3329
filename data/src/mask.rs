//! Masking strategies: which tokens of an encoded record the loss trains on, as a pure rule over the
//! token tags and the per-message weights (DESIGN.md §5), and the one place where labels are shifted.
//!
//! | strategy      | trained tokens                                                                  |
//! |---------------|---------------------------------------------------------------------------------|
//! | `all`         | every token, template tokens included (BOS excluded)                             |
//! | `assistant`   | each assistant turn after its header: content, reasoning, tool calls, end-of-turn (the `{% generation %}` spans when the template has them) |
//! | `boilerplate` | content of system and user messages, plus whole assistant turns as above; headers, BOS, preambles, tool definitions and tool results masked |
//! | `last`        | the final assistant turn only                                                    |
//! | `auto`        | conversations and prompt/completion: `assistant`; text: `all`; any `weight`: weights decide; pre-tokenized: the row's labels |
//!
//! A `tool` message is input: never trained except under `all` (or by its own `weight`). A message's
//! explicit `weight` (0 or 1) overrides the strategy for that message. Pre-tokenized rows carry their
//! own mask (`labels`); only `auto` (the labels) and `all` apply to them.

use crate::encode::{Encoded, Kind};
use crate::record::{Format, Record, Role};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    All,
    Assistant,
    Boilerplate,
    Last,
    Auto,
}

impl Strategy {
    pub const ALL: [Strategy; 5] =
        [Strategy::All, Strategy::Assistant, Strategy::Boilerplate, Strategy::Last, Strategy::Auto];

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::All => "all",
            Strategy::Assistant => "assistant",
            Strategy::Boilerplate => "boilerplate",
            Strategy::Last => "last",
            Strategy::Auto => "auto",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How masks are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaskOptions {
    pub strategy: Strategy,
    /// Train the end-of-turn token after trained assistant content (default true), so the model learns
    /// to stop.
    pub train_eot: bool,
}

impl Default for MaskOptions {
    fn default() -> Self {
        MaskOptions { strategy: Strategy::Auto, train_eot: true }
    }
}

/// The rule `auto` resolves to for a record.
enum Rule {
    Strategy(Strategy),
    Weights,
}

/// Per token: is it trained (unshifted: `trained[t]` means the model learns to predict token t).
/// `generation_spans` says whether the template's `{% generation %}` blocks define the assistant spans.
pub fn trained(record: &Record, enc: &Encoded, opts: MaskOptions, generation_spans: bool) -> Vec<bool> {
    let rule = match opts.strategy {
        Strategy::Auto if record.has_weights() => Rule::Weights,
        Strategy::Auto => Rule::Strategy(match record.format() {
            Format::Messages | Format::PromptCompletion => Strategy::Assistant,
            Format::Text => Strategy::All,
            Format::Tokens => Strategy::All, // not reached: pre-tokenized rows returned above
        }),
        s => Rule::Strategy(s),
    };
    let weights: Vec<Option<u8>> = match record {
        Record::Messages(m) => m.iter().map(|m| m.weight).collect(),
        _ => vec![],
    };
    // The final assistant message of a conversation (one that only calls tools included); of the
    // other formats, the last piece with assistant content.
    let last_assistant = match record {
        Record::Messages(c) => c.iter().rposition(|m| m.role == Role::Assistant).map(|i| i as u16),
        _ => enc
            .tags
            .iter()
            .rev()
            .find(|t| t.kind == Kind::Content && t.role == Some(Role::Assistant))
            .and_then(|t| t.message),
    };
    if let Record::Tokens(t) = record {
        return (0..t.input_ids.len())
            .map(|i| i > 0 && (opts.strategy == Strategy::All || t.labels.as_ref().is_none_or(|l| l[i] != -100)))
            .collect();
    }
    let use_generation = generation_spans && record.format() == Format::Messages;
    enc.tags
        .iter()
        .enumerate()
        .map(|(t, tag)| {
            // The first token has no predecessor: no position predicts it, so it is never trained.
            if t == 0 {
                return false;
            }
            let eot = tag.kind == Kind::EndOfTurn && opts.train_eot;
            let body = matches!(tag.kind, Kind::Content | Kind::Body) || eot;
            let assistant = tag.role == Some(Role::Assistant);
            // A message's explicit weight wins over any strategy.
            if let Some(Some(w)) = tag.message.and_then(|m| weights.get(m as usize)) {
                if matches!(tag.kind, Kind::Content | Kind::Body | Kind::EndOfTurn) {
                    return body && *w == 1;
                }
            }
            match rule {
                Rule::Weights => {
                    // Messages without a weight: assistant ones are trained, the others are not.
                    body && assistant
                }
                Rule::Strategy(Strategy::All) => tag.kind != Kind::Bos,
                Rule::Strategy(Strategy::Assistant) if use_generation => tag.generation,
                Rule::Strategy(Strategy::Assistant) => body && assistant,
                Rule::Strategy(Strategy::Boilerplate) => {
                    (tag.kind == Kind::Content && tag.role != Some(Role::Tool)) || (assistant && body)
                }
                Rule::Strategy(Strategy::Last) => body && assistant && tag.message == last_assistant,
                Rule::Strategy(Strategy::Auto) => unreachable!("auto was resolved above"),
            }
        })
        .collect()
}

/// Next-token labels within one sample: `labels[t] = ids[t + 1]` where token t+1 is trained, else -100.
/// The only place labels are shifted.
pub fn shifted_labels(ids: &[u32], trained: &[bool]) -> Vec<i32> {
    assert_eq!(ids.len(), trained.len());
    (0..ids.len())
        .map(|t| match (ids.get(t + 1), trained.get(t + 1)) {
            (Some(&id), Some(true)) => id as i32,
            _ => -100,
        })
        .collect()
}

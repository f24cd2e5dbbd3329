//! One training example as read from a JSONL line, in one of the three formats ferrotune accepts:
//! conversational `{"messages": [{"role", "content", "weight"?}]}`, instruction
//! `{"prompt", "completion"}` and plain `{"text"}`. Parsing here is the single place that turns JSON
//! into records; `check` reports every rule violation of a line, `parse` returns the first.
//! It does not render templates or tokenize.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// 0 or 1 when the data says whether to train on this message; overrides the masking strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Messages,
    PromptCompletion,
    Text,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Messages => "conversational (messages)",
            Format::PromptCompletion => "instruction (prompt/completion)",
            Format::Text => "plain text (text)",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Messages(Vec<ChatMessage>),
    PromptCompletion { prompt: String, completion: String },
    Text(String),
}

impl Record {
    pub fn format(&self) -> Format {
        match self {
            Record::Messages(_) => Format::Messages,
            Record::PromptCompletion { .. } => Format::PromptCompletion,
            Record::Text(_) => Format::Text,
        }
    }

    /// Whether any message carries a `weight`.
    pub fn has_weights(&self) -> bool {
        matches!(self, Record::Messages(m) if m.iter().any(|m| m.weight.is_some()))
    }
}

/// A rule violation within a line: which message (if any) and what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    /// Index of the offending message in `messages`, when the problem is inside one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    /// Stable rule name, e.g. `consecutive_roles`.
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.message {
            Some(i) => write!(f, "messages[{i}]: {} [{}]", self.detail, self.rule),
            None => write!(f, "{} [{}]", self.detail, self.rule),
        }
    }
}

fn v(message: Option<usize>, rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation { message, rule, detail: detail.into() }
}

/// Which format a JSON object is in, from its keys.
pub fn detect(obj: &Map<String, Value>) -> Result<Format, Violation> {
    let has = |k: &str| obj.contains_key(k);
    let found: Vec<Format> = [
        has("messages").then_some(Format::Messages),
        (has("prompt") || has("completion")).then_some(Format::PromptCompletion),
        has("text").then_some(Format::Text),
    ]
    .into_iter()
    .flatten()
    .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(v(
            None,
            "unknown_format",
            format!(
                "no known format: expected a `messages`, `prompt`+`completion` or `text` key, found keys {:?}",
                obj.keys().collect::<Vec<_>>()
            ),
        )),
        _ => Err(v(
            None,
            "mixed_format",
            "keys of more than one format (messages / prompt+completion / text) in one row",
        )),
    }
}

/// Validates one parsed JSON value. Returns the record, or every violation found.
pub fn validate(value: &Value, strict: bool) -> Result<Record, Vec<Violation>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![v(None, "not_object", format!("each line must be a JSON object, found {}", kind_of(value)))]);
    };
    let format = detect(obj).map_err(|e| vec![e])?;
    let mut errs = vec![];
    let allowed: &[&str] = match format {
        Format::Messages => &["messages"],
        Format::PromptCompletion => &["prompt", "completion"],
        Format::Text => &["text"],
    };
    for k in obj.keys().filter(|k| !allowed.contains(&k.as_str())) {
        errs.push(v(None, "extra_key", format!("unexpected top-level key `{k}` for the {format} format")));
    }
    let record = match format {
        Format::Text => match &obj["text"] {
            Value::String(s) => {
                if strict && s.trim().is_empty() {
                    errs.push(v(None, "empty_content", "`text` is empty"));
                }
                Some(Record::Text(s.clone()))
            }
            other => {
                errs.push(v(None, "not_string", format!("`text` must be a string, found {}", kind_of(other))));
                None
            }
        },
        Format::PromptCompletion => {
            let mut get = |k: &str| match obj.get(k) {
                Some(Value::String(s)) => {
                    if strict && s.trim().is_empty() {
                        errs.push(v(None, "empty_content", format!("`{k}` is empty")));
                    }
                    Some(s.clone())
                }
                Some(other) => {
                    errs.push(v(None, "not_string", format!("`{k}` must be a string, found {}", kind_of(other))));
                    None
                }
                None => {
                    errs.push(v(None, "missing_key", format!("`{k}` is missing (prompt/completion rows need both)")));
                    None
                }
            };
            let (p, c) = (get("prompt"), get("completion"));
            p.zip(c).map(|(prompt, completion)| Record::PromptCompletion { prompt, completion })
        }
        Format::Messages => validate_messages(&obj["messages"], strict, &mut errs).map(Record::Messages),
    };
    match record {
        Some(r) if errs.is_empty() => Ok(r),
        _ => Err(errs),
    }
}

fn validate_messages(value: &Value, strict: bool, errs: &mut Vec<Violation>) -> Option<Vec<ChatMessage>> {
    let Value::Array(items) = value else {
        errs.push(v(None, "messages_not_list", format!("`messages` must be a list, found {}", kind_of(value))));
        return None;
    };
    if items.is_empty() {
        errs.push(v(None, "messages_empty", "`messages` is an empty list"));
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let Some(m) = item.as_object() else {
            errs.push(v(Some(i), "message_not_object", format!("must be an object, found {}", kind_of(item))));
            ok = false;
            continue;
        };
        for k in m.keys().filter(|k| !["role", "content", "weight"].contains(&k.as_str())) {
            errs.push(v(
                Some(i),
                "message_extra_key",
                format!("unexpected key `{k}` (allowed: role, content, weight)"),
            ));
            ok = false;
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => match Role::parse(r) {
                Some(role) => Some(role),
                None => {
                    errs.push(v(Some(i), "unknown_role", format!("role `{r}` is not one of system, user, assistant")));
                    None
                }
            },
            Some(other) => {
                errs.push(v(Some(i), "role_not_string", format!("`role` must be a string, found {}", kind_of(other))));
                None
            }
            None => {
                errs.push(v(Some(i), "missing_role", "`role` is missing"));
                None
            }
        };
        let content = match m.get("content") {
            Some(Value::String(c)) => Some(c.clone()),
            Some(other) => {
                errs.push(v(
                    Some(i),
                    "content_not_string",
                    format!("`content` must be a string, found {}", kind_of(other)),
                ));
                None
            }
            None => {
                errs.push(v(Some(i), "missing_content", "`content` is missing"));
                None
            }
        };
        let weight = match m.get("weight") {
            None => None,
            Some(w) => match w.as_u64() {
                Some(x @ (0 | 1)) if w.is_u64() => Some(x as u8),
                _ => {
                    errs.push(v(Some(i), "bad_weight", format!("`weight` must be the integer 0 or 1, found {w}")));
                    ok = false;
                    None
                }
            },
        };
        match (role, content) {
            (Some(role), Some(content)) => out.push(ChatMessage { role, content, weight }),
            _ => ok = false,
        }
    }
    if !ok {
        return None;
    }
    for (i, pair) in out.windows(2).enumerate() {
        if pair[0].role == pair[1].role {
            errs.push(v(
                Some(i + 1),
                "consecutive_roles",
                format!("two consecutive `{}` messages (messages[{i}] and messages[{}])", pair[1].role, i + 1),
            ));
        }
    }
    if !out.iter().any(|m| m.role == Role::Assistant) {
        errs.push(v(None, "no_assistant", "no assistant message: nothing to learn from this conversation"));
    }
    if strict {
        if out[0].role == Role::Assistant {
            errs.push(v(Some(0), "first_role", "the first message must be `system` or `user` (strict)"));
        }
        for (i, m) in out.iter().enumerate().skip(1) {
            if m.role == Role::System {
                errs.push(v(Some(i), "system_not_first", "a `system` message may only come first (strict)"));
            }
        }
        for (i, m) in out.iter().enumerate() {
            if m.content.trim().is_empty() {
                errs.push(v(Some(i), "empty_content", "`content` is empty (strict)"));
            }
        }
    }
    Some(out)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parses one JSONL line into a record (first violation as the error message).
pub fn parse_line(line: &str, strict: bool) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    validate(&value, strict).map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
}

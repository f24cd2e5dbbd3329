//! One training example as read from a JSONL line (or a Parquet row), in one of the four formats
//! ferrotune accepts: conversational `{"messages": [...], "tools"?: [...]}` (OpenAI/Together shape, with
//! tool calls, tool results, reasoning, text parts and names), instruction `{"prompt", "completion"}`,
//! plain `{"text"}`, and pre-tokenized `{"input_ids", "attention_mask"?, "labels"?}`. Parsing here is the
//! single place that turns JSON into records; the rules themselves live in `rules`. `check` reports
//! every violation of a line, `parse_line` returns the first error. It does not render templates or
//! tokenize.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering an assistant's call.
    Tool,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message's `content` was given, which templates can tell apart (`is none`, `is defined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentShape {
    /// A string, or a list of text parts (joined).
    #[default]
    Text,
    /// `"content": null`.
    Null,
    /// No `content` key (an assistant message that only calls tools).
    Absent,
}

/// What a message carries beyond role and text, as the chat template sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Extra {
    pub shape: ContentShape,
    /// The message object as given, in its key order, without `weight` and with text parts joined:
    /// what transformers would pass to the template.
    pub object: Map<String, Value>,
}

impl Extra {
    fn str(&self, key: &str) -> Option<&str> {
        self.object.get(key).and_then(Value::as_str)
    }

    pub fn name(&self) -> Option<&str> {
        self.str("name")
    }

    pub fn tool_call_id(&self) -> Option<&str> {
        self.str("tool_call_id")
    }

    /// The calls exactly as given (`{"id", "type", "function": {"name", "arguments"}}`).
    pub fn tool_calls(&self) -> &[Value] {
        self.object.get("tool_calls").and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }

    /// `reasoning_content`, else `reasoning`.
    pub fn reasoning(&self) -> Option<&str> {
        self.str("reasoning_content").or_else(|| self.str("reasoning"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// The text: the string given, or the text parts joined; "" when there is none.
    pub content: String,
    /// 0 or 1 when the data says whether to train on this message; overrides the masking strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Tool calls, tool ids, names, reasoning: `None` for a plain message.
    #[serde(skip)]
    pub extra: Option<Box<Extra>>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: content.into(), weight: None, extra: None }
    }

    pub fn shape(&self) -> ContentShape {
        self.extra.as_ref().map_or(ContentShape::Text, |e| e.shape)
    }

    /// Whether this is an assistant message that calls tools.
    pub fn calls_tools(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| !e.tool_calls().is_empty())
    }

    /// The message as a chat template sees it, as transformers 5 passes it: the object as given, with
    /// reasoning aliased as `apply_chat_template` does (`{"thinking": r, **message, "reasoning_content":
    /// r}`). `content` replaces the text when given (the sentinel probe).
    pub fn template_value(&self, content: Option<&str>) -> Value {
        let text = Value::String(content.unwrap_or(&self.content).to_owned());
        let Some(e) = &self.extra else {
            let mut m = Map::new();
            m.insert("role".into(), Value::String(self.role.as_str().into()));
            m.insert("content".into(), text);
            return Value::Object(m);
        };
        let mut m = Map::new();
        let reasoning = e.reasoning().map(str::to_owned);
        if let Some(r) = &reasoning {
            m.insert("thinking".into(), Value::String(r.clone()));
        }
        for (k, x) in &e.object {
            let x = if k == "content" && e.shape == ContentShape::Text { text.clone() } else { x.clone() };
            m.insert(k.clone(), x);
        }
        if let Some(r) = reasoning {
            m.insert("reasoning_content".into(), Value::String(r));
        }
        Value::Object(m)
    }
}

/// A conversation: its messages and the function schemas offered to it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    /// The top-level `tools` list, as given.
    pub tools: Option<Vec<Value>>,
}

impl From<Vec<ChatMessage>> for Conversation {
    fn from(messages: Vec<ChatMessage>) -> Self {
        Conversation { messages, tools: None }
    }
}

impl std::ops::Deref for Conversation {
    type Target = Vec<ChatMessage>;
    fn deref(&self) -> &Vec<ChatMessage> {
        &self.messages
    }
}

/// A pre-tokenized row: ids, and per position the label as Hugging Face writes it (unshifted: `labels[t]`
/// is what the model should produce at t; -100 = not trained). Padding (attention 0) is already removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub input_ids: Vec<u32>,
    pub labels: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Messages,
    PromptCompletion,
    Text,
    Tokens,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Messages => "conversational (messages)",
            Format::PromptCompletion => "instruction (prompt/completion)",
            Format::Text => "plain text (text)",
            Format::Tokens => "pre-tokenized (input_ids)",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Messages(Conversation),
    PromptCompletion { prompt: String, completion: String },
    Text(String),
    Tokens(Tokens),
}

impl Record {
    pub fn format(&self) -> Format {
        match self {
            Record::Messages(_) => Format::Messages,
            Record::PromptCompletion { .. } => Format::PromptCompletion,
            Record::Text(_) => Format::Text,
            Record::Tokens(_) => Format::Tokens,
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
    /// A warning does not make the row invalid (it is an error under `--strict` where the rule says so).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = if self.warning { "warning: " } else { "" };
        match self.message {
            Some(i) => write!(f, "messages[{i}]: {w}{} [{}]", self.detail, self.rule),
            None => write!(f, "{w}{} [{}]", self.detail, self.rule),
        }
    }
}

pub(crate) fn v(message: Option<usize>, rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation { message, rule, detail: detail.into(), warning: false }
}

/// Which format a JSON object is in, from its keys.
pub fn detect(obj: &Map<String, Value>) -> Result<Format, Violation> {
    let has = |k: &str| obj.contains_key(k);
    if has("preferred_output") || has("non_preferred_output") {
        return Err(v(
            None,
            "preference_data",
            "preference data (input/preferred_output/non_preferred_output) is for preference tuning, which ferrotune does not do yet",
        ));
    }
    let found: Vec<Format> = [
        has("messages").then_some(Format::Messages),
        (has("prompt") || has("completion")).then_some(Format::PromptCompletion),
        has("text").then_some(Format::Text),
        has("input_ids").then_some(Format::Tokens),
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
                "no known format: expected a `messages`, `prompt`+`completion`, `text` or `input_ids` key, found keys {:?}",
                obj.keys().collect::<Vec<_>>()
            ),
        )),
        _ => Err(v(
            None,
            "mixed_format",
            "keys of more than one format (messages / prompt+completion / text / input_ids) in one row",
        )),
    }
}

/// Validates one parsed JSON value: the record (when no violation is an error) and every violation
/// found, warnings included.
pub fn validate(value: &Value, strict: bool) -> (Option<Record>, Vec<Violation>) {
    let Some(obj) = value.as_object() else {
        let e = v(None, "not_object", format!("each line must be a JSON object, found {}", kind_of(value)));
        return (None, vec![e]);
    };
    let format = match detect(obj) {
        Ok(f) => f,
        Err(e) => return (None, vec![e]),
    };
    let mut errs = vec![];
    let allowed: &[&str] = match format {
        Format::Messages => &["messages", "tools", "parallel_tool_calls"],
        Format::PromptCompletion => &["prompt", "completion"],
        Format::Text => &["text"],
        Format::Tokens => &["input_ids", "attention_mask", "labels"],
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
        Format::Messages => {
            if let Some(p) = obj.get("parallel_tool_calls").filter(|p| !p.is_boolean()) {
                errs.push(v(None, "not_boolean", format!("`parallel_tool_calls` must be true or false, found {p}")));
            }
            crate::rules::conversation(obj, strict, &mut errs).map(Record::Messages)
        }
        Format::Tokens => crate::rules::tokens(obj, &mut errs).map(Record::Tokens),
    };
    let failed = errs.iter().any(|e| !e.warning);
    (record.filter(|_| !failed), errs)
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What is wrong with a line that is not valid JSON, in words that point at the cause: the column
/// (the line is already named by the caller), a byte-order mark, a lone surrogate escape.
pub fn json_error(line: &str, e: &serde_json::Error) -> String {
    if line.starts_with('\u{FEFF}') {
        return "starts with a UTF-8 byte-order mark (U+FEFF); hint: save the file as UTF-8 without BOM".into();
    }
    let msg = e.to_string();
    // serde_json appends " at line L column C"; the line is always 1 here.
    let what = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(w, _)| w);
    if let Some(col) = lone_surrogate(line) {
        return format!(
            "invalid JSON at column {col}: a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair) is not text; hint: fix the writer, or drop the escape"
        );
    }
    format!("invalid JSON at column {}: {what}", e.column())
}

/// The column (1-based, in characters) of the first `\\uD800`-`\\uDFFF` escape that is not half of a pair.
fn lone_surrogate(line: &str) -> Option<usize> {
    let chars: Vec<char> = line.chars().collect();
    let hex = |at: usize| -> Option<u32> {
        (chars.get(at) == Some(&'\\') && chars.get(at + 1) == Some(&'u'))
            .then(|| u32::from_str_radix(&chars.get(at + 2..at + 6)?.iter().collect::<String>(), 16).ok())?
    };
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' {
            match hex(i) {
                Some(0xD800..=0xDBFF) if hex(i + 6).is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) => i += 12,
                Some(0xD800..=0xDFFF) => return Some(i + 1),
                _ => i += 2, // an escape of one character (or `\\`): skip both
            }
            continue;
        }
        i += 1;
    }
    None
}

/// Parses one JSONL line into a record (the errors, joined, as the message; warnings are ignored).
pub fn parse_line(line: &str, strict: bool) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| json_error(line, &e))?;
    match validate(&value, strict) {
        (Some(r), _) => Ok(r),
        (None, errs) => Err(errs.iter().filter(|e| !e.warning).map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
    }
}

//! The rules a row must follow, per format, as the hosted fine-tuning API ferrotune follows applies them
//! (Together's validators, OpenAI's chat shape): message fields and roles, content as a string or text
//! parts, tool definitions, tool calls and the tool results that answer them, reasoning, names,
//! weights, and pre-tokenized rows. Each rule pushes a `Violation` naming its message (and call)
//! index; warnings do not invalidate the row. It does not tokenize or render.

use crate::record::{kind_of, v, ChatMessage, ContentShape, Conversation, Extra, Role, Tokens, Violation};
use serde_json::{Map, Value};
use std::collections::HashSet;

const MESSAGE_KEYS: [&str; 8] =
    ["role", "content", "weight", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content"];

/// A `messages` (+ `tools`) row.
pub fn conversation(obj: &Map<String, Value>, strict: bool, errs: &mut Vec<Violation>) -> Option<Conversation> {
    let tools = obj.get("tools").and_then(|t| tools(t, errs));
    let messages = messages(&obj["messages"], strict, errs)?;
    let defined: HashSet<&str> =
        tools.iter().flatten().filter_map(|t| t.pointer("/function/name").and_then(Value::as_str)).collect();
    if tools.is_some() {
        for (i, m) in messages.iter().enumerate() {
            for (j, call) in m.extra.iter().flat_map(|e| e.tool_calls()).enumerate() {
                let name = call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
                if !defined.contains(name) {
                    errs.push(Violation {
                        warning: true,
                        ..v(
                            Some(i),
                            "undefined_tool",
                            format!("tool_calls[{j}] calls `{name}`, which `tools` does not define"),
                        )
                    });
                }
            }
        }
    }
    Some(Conversation { messages, tools: obj.contains_key("tools").then(|| tools.unwrap_or_default()) })
}

/// The top-level `tools`: function schemas `{"type": "function", "function": {"name", "description"?,
/// "parameters"?}}`.
fn tools(value: &Value, errs: &mut Vec<Violation>) -> Option<Vec<Value>> {
    // Hugging Face datasets often store the list as its JSON text.
    let parsed;
    let value = match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(v) => {
                parsed = v;
                &parsed
            }
            Err(e) => {
                errs.push(v(None, "bad_tools", format!("`tools` is a string but not JSON ({e})")));
                return None;
            }
        },
        other => other,
    };
    let Value::Array(list) = value else {
        errs.push(v(
            None,
            "bad_tools",
            format!("`tools` must be a list of function schemas, found {}", kind_of(value)),
        ));
        return None;
    };
    let mut names = HashSet::new();
    for (k, t) in list.iter().enumerate() {
        let bad = |what: String| v(None, "bad_tools", format!("tools[{k}]: {what}"));
        let Some(t) = t.as_object() else {
            errs.push(bad(format!("must be an object, found {}", kind_of(t))));
            continue;
        };
        if let Some(ty) = t.get("type").filter(|ty| ty.as_str() != Some("function")) {
            errs.push(bad(format!("`type` must be \"function\", found {ty}")));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            errs.push(bad("`function` (an object with `name`) is missing".into()));
            continue;
        };
        match f.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {
                if !names.insert(n) {
                    errs.push(bad(format!("function `{n}` is defined twice")));
                }
            }
            _ => errs.push(bad("`function.name` must be a non-empty string".into())),
        }
        if f.get("description").is_some_and(|d| !d.is_string()) {
            errs.push(bad("`function.description` must be a string".into()));
        }
        if f.get("parameters").is_some_and(|p| !p.is_object()) {
            errs.push(bad("`function.parameters` must be a JSON schema object".into()));
        }
    }
    Some(list.clone())
}

/// The text of `content`: a string, or a list of `{"type": "text", "text"}` parts (joined with nothing
/// between them, as list-aware templates such as Llama 3.1's render them). `None` after an error.
fn content_text(c: &Value, i: usize, errs: &mut Vec<Violation>) -> Option<String> {
    match c {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            let mut ok = true;
            for (k, p) in parts.iter().enumerate() {
                let ty = p.get("type").and_then(Value::as_str);
                match (ty, p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    (Some("image_url" | "image" | "input_image"), _) => {
                        errs.push(v(
                            Some(i),
                            "image_content",
                            format!("content[{k}] is an image part; ferrotune trains text-only models, so remove images or describe them in text"),
                        ));
                        ok = false;
                    }
                    _ => {
                        errs.push(v(
                            Some(i),
                            "bad_content_part",
                            format!("content[{k}] must be {{\"type\": \"text\", \"text\": \"...\"}}, found {p}"),
                        ));
                        ok = false;
                    }
                }
            }
            ok.then_some(out)
        }
        other => {
            errs.push(v(
                Some(i),
                "content_not_string",
                format!("`content` must be a string or a list of text parts, found {}", kind_of(other)),
            ));
            None
        }
    }
}

/// Checks an assistant's `tool_calls`; returns the ids it defines.
fn tool_calls(value: &Value, i: usize, errs: &mut Vec<Violation>) -> Vec<String> {
    let Value::Array(calls) = value else {
        errs.push(v(Some(i), "bad_tool_call", format!("`tool_calls` must be a list, found {}", kind_of(value))));
        return vec![];
    };
    let mut ids = vec![];
    for (j, call) in calls.iter().enumerate() {
        let bad = |rule, what: String| v(Some(i), rule, format!("tool_calls[{j}]: {what}"));
        let Some(c) = call.as_object() else {
            errs.push(bad("bad_tool_call", format!("must be an object, found {}", kind_of(call))));
            continue;
        };
        match c.get("id") {
            None => {}
            Some(Value::String(id)) => ids.push(id.clone()),
            Some(other) => errs.push(bad("bad_tool_call", format!("`id` must be a string, found {}", kind_of(other)))),
        }
        if let Some(ty) = c.get("type").filter(|ty| ty.as_str() != Some("function")) {
            errs.push(bad("bad_tool_call", format!("`type` must be \"function\", found {ty}")));
        }
        let Some(f) = c.get("function").and_then(Value::as_object) else {
            errs.push(bad("bad_tool_call", "`function` (an object with `name` and `arguments`) is missing".into()));
            continue;
        };
        if f.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            errs.push(bad("bad_tool_call", "`function.name` must be a non-empty string".into()));
        }
        match f.get("arguments") {
            Some(Value::String(s)) => {
                if let Err(e) = serde_json::from_str::<Value>(s) {
                    errs.push(bad(
                        "bad_arguments",
                        format!(
                            "`function.arguments` is a string but not JSON ({e}); give a JSON object or its JSON text"
                        ),
                    ));
                }
            }
            Some(Value::Object(_)) => {}
            Some(other) => errs.push(bad(
                "bad_arguments",
                format!("`function.arguments` must be a JSON string or an object, found {}", kind_of(other)),
            )),
            None => errs.push(bad("bad_arguments", "`function.arguments` is missing".into())),
        }
    }
    ids
}

/// The value of `weight`: the integer 0 or 1 (`-0` is 0).
fn weight(w: &Value) -> Option<u8> {
    match (w.as_u64(), w.as_f64()) {
        (Some(x @ (0 | 1)), _) => Some(x as u8),
        (None, Some(x)) if x == 0.0 && x.is_sign_negative() && !w.is_i64() => Some(0),
        _ => None,
    }
}

fn messages(value: &Value, strict: bool, errs: &mut Vec<Violation>) -> Option<Vec<ChatMessage>> {
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
    let mut call_ids: HashSet<String> = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Some(m) = item.as_object() else {
            errs.push(v(Some(i), "message_not_object", format!("must be an object, found {}", kind_of(item))));
            ok = false;
            continue;
        };
        let before = errs.iter().filter(|e| !e.warning).count();
        for k in m.keys().filter(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
            errs.push(v(
                Some(i),
                "message_extra_key",
                format!("unexpected key `{k}` (allowed: {})", MESSAGE_KEYS.join(", ")),
            ));
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => Role::parse(r).or_else(|| {
                errs.push(v(
                    Some(i),
                    "unknown_role",
                    format!("role `{r}` is not one of system, user, assistant, tool"),
                ));
                None
            }),
            Some(other) => {
                errs.push(v(Some(i), "role_not_string", format!("`role` must be a string, found {}", kind_of(other))));
                None
            }
            None => {
                errs.push(v(Some(i), "missing_role", "`role` is missing"));
                None
            }
        };
        let calls = m.get("tool_calls");
        let (shape, content) = match m.get("content") {
            Some(Value::Null) => (ContentShape::Null, Some(String::new())),
            None => (ContentShape::Absent, Some(String::new())),
            Some(c) => (ContentShape::Text, content_text(c, i, errs)),
        };
        if shape != ContentShape::Text && !(role == Some(Role::Assistant) && calls.is_some()) {
            let what = if shape == ContentShape::Null { "null" } else { "missing" };
            errs.push(v(
                Some(i),
                "missing_content",
                format!("`content` is {what} (only an assistant message that calls tools may have none)"),
            ));
        }
        let weight = match m.get("weight") {
            None => None,
            Some(w) => weight(w).or_else(|| {
                errs.push(v(Some(i), "bad_weight", format!("`weight` must be the integer 0 or 1, found {w}")));
                None
            }),
        };
        for k in ["name", "tool_call_id", "reasoning", "reasoning_content"] {
            if let Some(x) = m.get(k).filter(|x| !x.is_string()) {
                errs.push(v(Some(i), "not_string", format!("`{k}` must be a string, found {}", kind_of(x))));
            }
        }
        if let (Some(a), Some(b)) = (m.get("reasoning"), m.get("reasoning_content")) {
            if a != b {
                errs.push(v(
                    Some(i),
                    "bad_reasoning",
                    "`reasoning` and `reasoning_content` are both given and differ; keep one",
                ));
            }
        }
        if let Some(r) = role {
            if r != Role::Assistant {
                for k in ["tool_calls", "reasoning", "reasoning_content"].into_iter().filter(|k| m.contains_key(*k)) {
                    errs.push(v(Some(i), "misplaced_field", format!("`{k}` belongs on assistant messages, not `{r}`")));
                }
            }
            if r != Role::Tool && m.contains_key("tool_call_id") {
                errs.push(v(Some(i), "misplaced_field", format!("`tool_call_id` belongs on tool messages, not `{r}`")));
            }
        }
        if let Some(c) = calls.filter(|_| role == Some(Role::Assistant)) {
            let mut here = HashSet::new();
            for id in tool_calls(c, i, errs) {
                if !here.insert(id.clone()) {
                    let detail = format!("tool call id `{id}` is used twice in this message");
                    errs.push(v(Some(i), "duplicate_call_id", detail));
                }
                call_ids.insert(id);
            }
            if c.as_array().is_some_and(Vec::is_empty) && shape != ContentShape::Text {
                errs.push(v(
                    Some(i),
                    "missing_content",
                    "`tool_calls` is empty and there is no `content`: an empty turn",
                ));
            }
        }
        if role == Some(Role::Tool) {
            if let Some(id) = m.get("tool_call_id").and_then(Value::as_str) {
                if !call_ids.contains(id) {
                    errs.push(v(
                        Some(i),
                        "unknown_tool_call_id",
                        format!("`tool_call_id` `{id}` answers no earlier tool call of this conversation"),
                    ));
                }
            }
        }
        if errs.iter().filter(|e| !e.warning).count() > before {
            ok = false;
            continue;
        }
        let (Some(role), Some(content)) = (role, content) else {
            ok = false;
            continue;
        };
        let plain = shape == ContentShape::Text
            && m.get("content").is_some_and(Value::is_string)
            && m.keys().all(|k| ["role", "content", "weight"].contains(&k.as_str()));
        let extra = (!plain).then(|| {
            let mut object: Map<String, Value> =
                m.iter().filter(|(k, _)| *k != "weight").map(|(k, x)| (k.clone(), x.clone())).collect();
            if shape == ContentShape::Text {
                object.insert("content".into(), Value::String(content.clone()));
            }
            Box::new(Extra { shape, object })
        });
        out.push(ChatMessage { role, content, weight, extra });
    }
    if !ok {
        return None;
    }
    order(&out, strict, errs);
    Some(out)
}

/// Rules on the order of messages: tool results follow calls, turns alternate, someone answers.
fn order(out: &[ChatMessage], strict: bool, errs: &mut Vec<Violation>) {
    for (i, m) in out.iter().enumerate() {
        if m.role == Role::Tool {
            let after_call = out[..i].iter().rev().find(|p| p.role != Role::Tool).is_some_and(ChatMessage::calls_tools);
            if !after_call {
                errs.push(v(
                    Some(i),
                    "orphan_tool",
                    "a `tool` message must follow an assistant message with `tool_calls` (or another `tool` message)",
                ));
            }
        }
    }
    for (i, pair) in out.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        // Consecutive tool results answer parallel calls; an assistant may call tools again after results.
        if a.role == b.role && a.role != Role::Tool {
            errs.push(Violation {
                warning: !strict,
                ..v(
                    Some(i + 1),
                    "consecutive_roles",
                    format!(
                        "two consecutive `{}` messages (messages[{i}] and messages[{}]); templates render them, but most models were trained on alternating turns{}",
                        b.role,
                        i + 1,
                        if strict { " (an error under --strict)" } else { "" }
                    ),
                )
            });
        }
    }
    if !out.iter().any(|m| m.role == Role::Assistant) {
        errs.push(v(None, "no_assistant", "no assistant message: nothing to learn from this conversation"));
    }
    if strict {
        if out[0].role == Role::Assistant || out[0].role == Role::Tool {
            errs.push(v(Some(0), "first_role", "the first message must be `system` or `user` (strict)"));
        }
        for (i, m) in out.iter().enumerate().skip(1) {
            if m.role == Role::System {
                errs.push(v(Some(i), "system_not_first", "a `system` message may only come first (strict)"));
            }
        }
        for (i, m) in out.iter().enumerate() {
            if m.content.trim().is_empty() && !m.calls_tools() {
                errs.push(v(Some(i), "empty_content", "`content` is empty (strict)"));
            }
        }
    }
}

fn int_list(obj: &Map<String, Value>, key: &str, errs: &mut Vec<Violation>) -> Option<Vec<i64>> {
    let value = obj.get(key)?;
    let Value::Array(items) = value else {
        errs.push(v(None, "bad_tokens", format!("`{key}` must be a list of integers, found {}", kind_of(value))));
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, x) in items.iter().enumerate() {
        match x.as_i64() {
            Some(n) => out.push(n),
            None => {
                errs.push(v(None, "bad_tokens", format!("`{key}`[{k}] must be an integer, found {x}")));
                return None;
            }
        }
    }
    Some(out)
}

/// A pre-tokenized row: equal lengths, ids non-negative, labels ids or -100, attention 0/1 with padding
/// only at the ends, at least one trained label.
pub fn tokens(obj: &Map<String, Value>, errs: &mut Vec<Violation>) -> Option<Tokens> {
    let before = errs.len();
    let ids = int_list(obj, "input_ids", errs);
    let mask = int_list(obj, "attention_mask", errs);
    let labels = int_list(obj, "labels", errs);
    if errs.len() > before {
        return None;
    }
    let ids = ids?;
    tokens_from(ids, mask, labels, errs)
}

/// The shared checks of JSONL and Parquet pre-tokenized rows.
pub fn tokens_from(
    ids: Vec<i64>,
    mask: Option<Vec<i64>>,
    labels: Option<Vec<i64>>,
    errs: &mut Vec<Violation>,
) -> Option<Tokens> {
    let bad = |what: String| v(None, "bad_tokens", what);
    let before = errs.len();
    if ids.is_empty() {
        errs.push(bad("`input_ids` is empty".into()));
    }
    for (name, other) in [("attention_mask", &mask), ("labels", &labels)] {
        if let Some(o) = other.as_ref().filter(|o| o.len() != ids.len()) {
            errs.push(bad(format!("`{name}` has {} values but `input_ids` has {}", o.len(), ids.len())));
        }
    }
    if let Some((k, x)) = ids.iter().enumerate().find(|(_, &x)| !(0..=u32::MAX as i64).contains(&x)) {
        errs.push(bad(format!("`input_ids`[{k}] = {x} is not a token id")));
    }
    if let Some((k, x)) =
        labels.iter().flatten().enumerate().find(|(_, &x)| x != -100 && !(0..=u32::MAX as i64).contains(&x))
    {
        errs.push(bad(format!("`labels`[{k}] = {x} is neither a token id nor -100")));
    }
    if errs.len() > before {
        return None;
    }
    let (mut start, mut end) = (0, ids.len());
    if let Some(m) = &mask {
        if let Some((k, x)) = m.iter().enumerate().find(|(_, &x)| x != 0 && x != 1) {
            errs.push(bad(format!("`attention_mask`[{k}] = {x} must be 0 or 1")));
            return None;
        }
        start = m.iter().position(|&x| x == 1).unwrap_or(ids.len());
        end = m.iter().rposition(|&x| x == 1).map_or(start, |p| p + 1);
        if m[start..end].contains(&0) {
            errs.push(bad(
                "`attention_mask` has zeros between ones; only padding at the start or end can be dropped".into()
            ));
            return None;
        }
    }
    let labels = labels.map(|l| l[start..end].to_vec());
    // Position 0 has no predecessor, so its label can never be learned.
    let trained = labels.as_ref().map_or(end - start, |l| l.iter().skip(1).filter(|&&x| x != -100).count());
    if start == end || trained == 0 {
        errs.push(bad("no position is trained (every label after the first is -100, or everything is padding)".into()));
        return None;
    }
    Some(Tokens { input_ids: ids[start..end].iter().map(|&x| x as u32).collect(), labels })
}

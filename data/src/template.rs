//! Chat templates: the model's own Jinja template (`chat_template` in tokenizer_config.json, or
//! `chat_template.jinja`) rendered with minijinja the way transformers' `apply_chat_template` renders it
//! (trim_blocks + lstrip_blocks, Python string methods, `raise_exception`, `strftime_now`, and a `tojson`
//! that prints like Python's `json.dumps`), with `tools` and every message field passed as transformers
//! passes them, plus the built-in templates of `builtin` for tokenizers that ship none. `render_spans`
//! also locates every message's content in the rendered text (one render with sentinel contents, one
//! real render, aligned; messages with no text, or whose text the template does not render, have no
//! span) and the `{% generation %}` spans that transformers uses for `return_assistant_tokens_mask` (the
//! tags are rewritten to marker characters, then stripped). It renders text only; tokenization and
//! token tags are in `encode`.

pub use crate::builtin::{CHATML, LLAMA3, LLAMA31};
use crate::error::{DataError, Result};
use crate::record::{ChatMessage, Conversation};
use crate::tokenizer::SpecialTokens;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Marker characters that `{% generation %}` / `{% endgeneration %}` are rewritten to (Unicode
/// noncharacters: never produced by a tokenizer's text, and rejected in message content).
const GEN_START: char = '\u{10FFFE}';
const GEN_END: char = '\u{10FFFF}';

/// Sentinel content of message `i` in the probe render: one character of Supplementary Private Use
/// Area-A, which no template transforms (trim, lower, ...) in a way that changes it.
fn sentinel(i: usize) -> String {
    char::from_u32(0xF0000 + i as u32).expect("at most MAX_MESSAGES messages").to_string()
}

/// The most messages one conversation may have: one sentinel character each.
pub const MAX_MESSAGES: usize = 65_534;

/// The most template instructions one render may run (minijinja's fuel): far above what a real template
/// spends on the longest conversation (a few hundred a message), so only a template that loops without
/// end, or nests loops over the input, runs out.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// Text rendered by a chat template, with where each message's content landed.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    /// Byte range of each message's content in `text` (as rendered: possibly trimmed by the template);
    /// `None` for a message with no text or whose text the template leaves out.
    pub content: Vec<Option<Range<usize>>>,
    /// Byte ranges inside `{% generation %}` blocks, when the template has them.
    pub generation: Vec<Range<usize>>,
}

/// One chat message as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    /// Where the template came from, for error messages.
    pub origin: PathBuf,
    pub bos_token: String,
    pub eos_token: String,
    /// Whether the template marks assistant output with `{% generation %}` blocks.
    pub has_generation: bool,
}

impl ChatTemplate {
    /// Picks the template: `auto` (the model's own), a built-in name (`llama3`, `llama31`, `chatml`, in
    /// any case), or a path to a `.jinja` file. Special-token strings come from `dir`'s tokenizer_config.json either way.
    pub fn load(dir: &Path, choice: &str) -> Result<Self> {
        Self::find(dir, choice)?.ok_or_else(|| {
            DataError::at(
                dir,
                "the tokenizer ships no chat template (no chat_template.jinja, no `chat_template` in tokenizer_config.json); hint: choose one with --template llama3, --template llama31 (tool calls), --template chatml or a .jinja file",
            )
        })
    }

    /// Like `load`, but `auto` on a tokenizer that ships no template is `None` rather than an error
    /// (plain-text and prompt/completion data need none).
    pub fn find(dir: &Path, choice: &str) -> Result<Option<Self>> {
        let (source, origin) = match choice {
            "auto" => match own_source(dir)? {
                Some(found) => found,
                None => return Ok(None),
            },
            name if crate::builtin::get(name).is_some() => {
                let (name, src) = crate::builtin::get(name).expect("checked");
                (src.to_owned(), PathBuf::from(format!("<built-in {name}>")))
            }
            path => {
                let p = PathBuf::from(path);
                (std::fs::read_to_string(&p).map_err(DataError::io(&p))?, p)
            }
        };
        let special = SpecialTokens::from_dir(dir)?;
        Self::new(source, origin, special.bos.unwrap_or_default(), special.eos.unwrap_or_default()).map(Some)
    }

    /// Loads the model's own template from the tokenizer directory `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::load(dir, "auto")
    }

    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: String, origin: PathBuf, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| DataError::at(&origin, e.to_string()))?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", py_trim);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        // `{{ x }}` prints Python's str(x) in transformers' Jinja2: None, True, False.
        env.set_formatter(|out, state, value| match value.kind() {
            minijinja::value::ValueKind::None => out.write_str("None").map_err(JinjaError::from),
            minijinja::value::ValueKind::Bool if value.is_true() => out.write_str("True").map_err(JinjaError::from),
            minijinja::value::ValueKind::Bool => out.write_str("False").map_err(JinjaError::from),
            _ => minijinja::escape_formatter(out, state, value),
        });
        let (rewritten, has_generation) = rewrite_generation(&source);
        env.add_template_owned("chat", rewritten)
            .map_err(|e| DataError::at(&origin, format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, source, origin, bos_token, eos_token, has_generation })
    }

    /// Renders `messages` as transformers does; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let values: Vec<serde_json::Value> =
            messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
        Ok(strip_generation(&self.render_raw(&values, None, add_generation_prompt)?).0)
    }

    /// Renders a conversation for training and locates every content and generation span.
    pub fn render_spans(&self, conv: &Conversation) -> Result<Rendered> {
        let messages = &conv.messages;
        // Every string the template sees, not only contents: reasoning, arguments, names, tools.
        let reserved = |s: &str| s.contains([GEN_START, GEN_END]);
        let in_extra = |m: &ChatMessage| {
            m.extra.as_ref().is_some_and(|e| any_string(&serde_json::Value::Object(e.object.clone()), &reserved))
        };
        let bad = messages.iter().position(|m| reserved(&m.content) || in_extra(m)).map(|i| format!("messages[{i}]"));
        let bad =
            bad.or_else(|| conv.tools.iter().flatten().any(|t| any_string(t, &reserved)).then(|| "tools".to_owned()));
        if let Some(what) = bad {
            return Err(DataError::at(
                &self.origin,
                format!("{what} contains the Unicode noncharacters U+10FFFE/U+10FFFF, which ferrotune reserves"),
            ));
        }
        if messages.len() > MAX_MESSAGES {
            return Err(DataError::at(
                &self.origin,
                format!("{} messages in one conversation; at most {MAX_MESSAGES} are supported", messages.len()),
            ));
        }
        let real: Vec<serde_json::Value> = messages.iter().map(|m| m.template_value(None)).collect();
        let tools = conv.tools.as_deref();
        let (text, generation) = strip_generation(&self.render_raw(&real, tools, false)?);
        // Messages with text get a sentinel; the others (tool calls only, empty text) render as they are.
        let probed: Vec<bool> = messages.iter().map(|m| !m.content.trim().is_empty()).collect();
        let probe: Vec<serde_json::Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| if probed[i] { m.template_value(Some(&sentinel(i))) } else { real[i].clone() })
            .collect();
        let (probe_text, _) = strip_generation(&self.render_raw(&probe, tools, false)?);
        let content = align(&text, &probe_text, messages, &probed).ok_or_else(|| {
            DataError::at(
                &self.origin,
                "cannot locate message contents in the rendered text: the template changes contents in more ways than trimming them, or renders some messages conditionally on their content; hint: use a built-in template (--template llama3|llama31|chatml)",
            )
        })?;
        Ok(Rendered { text, content, generation })
    }

    fn render_raw(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("template was added");
        // transformers passes `tools=None` and `documents=None` when there are none: defined, but none.
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| {
            let hint = if e.kind() == ErrorKind::OutOfFuel {
                format!(" (the template ran {TEMPLATE_FUEL} instructions on one conversation, ferrotune's limit: it loops without end, or over the input in nested loops)")
            } else {
                String::new()
            };
            DataError::at(&self.origin, format!("rendering the chat template failed: {e:#}{hint}"))
        })
    }
}

/// Jinja2's `trim(value, chars=None)`: Python's `str(value).strip(chars)` (so `none | trim` is "None").
fn py_trim(value: Value, chars: Option<String>) -> String {
    let text = match value.kind() {
        minijinja::value::ValueKind::None => "None".to_owned(),
        minijinja::value::ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_owned(),
        _ => value.as_str().map_or_else(|| value.to_string(), str::to_owned),
    };
    match chars {
        Some(c) => text.trim_matches(|ch| c.contains(ch)).to_owned(),
        None => text.trim().to_owned(),
    }
}

/// Whether any string in `v` (keys included) satisfies `pred`.
fn any_string(v: &serde_json::Value, pred: &dyn Fn(&str) -> bool) -> bool {
    match v {
        serde_json::Value::String(s) => pred(s),
        serde_json::Value::Array(a) => a.iter().any(|x| any_string(x, pred)),
        serde_json::Value::Object(o) => o.iter().any(|(k, x)| pred(k) || any_string(x, pred)),
        _ => false,
    }
}

/// Python `json.dumps(value, ensure_ascii=False, indent=indent)` as transformers' `tojson` filter.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json: serde_json::Value =
        serde_json::to_value(&value).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let (open_sep, item_sep, key_sep) = match indent {
        Some(_) => ("\n", ",\n", ": "),
        None => ("", ", ", ": "),
    };
    let pad = |d: usize, out: &mut String| {
        if let Some(n) = indent {
            out.extend(std::iter::repeat_n(' ', n * d));
        }
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            out.push_str(open_sep);
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                pad(depth + 1, out);
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(open_sep);
            pad(depth, out);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            out.push_str(open_sep);
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                pad(depth + 1, out);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(key_sep);
                write_py_json(x, indent, depth + 1, out);
            }
            out.push_str(open_sep);
            pad(depth, out);
            out.push('}');
        }
        // Python writes floats like 1.0 where serde_json also does; strings escape the same way
        // except that Python leaves non-ASCII alone (ensure_ascii=False), as serde_json does.
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

/// `strftime_now(format)` for the directives chat templates use (%d %b %B %Y %m %H %M %S %y %j %%).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    format_utc(secs, &format)
}

/// Formats UNIX time `secs` (UTC) with a strftime subset.
pub fn format_utc(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The template a tokenizer directory ships (`chat_template.jinja`, or `chat_template` in
/// tokenizer_config.json: a string, or a list of named templates of which "default" is used).
fn own_source(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some((std::fs::read_to_string(&jinja).map_err(DataError::io(&jinja))?, jinja)));
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = crate::tokenizer::read_config(dir)?;
    match cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(Some((s.clone(), cfg_path))),
        Some(serde_json::Value::Array(list)) => {
            let found = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
            let s = found.and_then(|t| t.get("template")).and_then(|t| t.as_str()).ok_or_else(|| {
                DataError::at(&cfg_path, "chat_template is a list without a template named \"default\"")
            })?;
            Ok(Some((s.to_owned(), cfg_path)))
        }
        _ => Ok(None),
    }
}

/// Rewrites `{%- generation -%}` / `{% endgeneration %}` (any whitespace control) into block tags that
/// print a marker, keeping the original whitespace control so trim_blocks/lstrip_blocks act the same.
fn rewrite_generation(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..close];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.trim_end().chars().last() {
            Some(c @ ('-' | '+')) => (&body.trim_end()[..body.trim_end().len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        let marker = match body.trim() {
            "generation" => Some(GEN_START),
            "endgeneration" => Some(GEN_END),
            _ => None,
        };
        match marker {
            Some(m) => {
                found = true;
                out.push_str(&format!("{{%{lead} if true %}}{{{{ '{m}' }}}}{{% endif {trail}%}}"));
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Removes generation markers, returning the clean text and the byte ranges they enclosed.
fn strip_generation(text: &str) -> (String, Vec<Range<usize>>) {
    if !text.contains([GEN_START, GEN_END]) {
        return (text.to_owned(), vec![]);
    }
    let mut out = String::with_capacity(text.len());
    let mut spans = vec![];
    let mut start = None;
    for c in text.chars() {
        match c {
            GEN_START => start = Some(out.len()),
            GEN_END => {
                if let Some(s) = start.take() {
                    if s < out.len() {
                        spans.push(s..out.len());
                    }
                }
            }
            c => out.push(c),
        }
    }
    (out, spans)
}

/// Aligns the real render with the sentinel render: the text between sentinels is template text and
/// must appear verbatim in the real render, with each probed message's content (or its trimmed form)
/// between. A sentinel the template does not render means it leaves that message's text out (no span).
fn align(text: &str, probe: &str, messages: &[ChatMessage], probed: &[bool]) -> Option<Vec<Option<Range<usize>>>> {
    // One pass over the probe: where each sentinel is (linear in the text, whatever the message count).
    let mut at: Vec<Option<usize>> = vec![None; messages.len()];
    for (b, c) in probe.char_indices() {
        let Some(i) = (c as usize).checked_sub(0xF0000).filter(|&i| i < messages.len() && probed[i]) else { continue };
        if at[i].replace(b).is_some() {
            return None; // rendered twice
        }
    }
    let mut segments = Vec::with_capacity(messages.len() + 1);
    let mut shown = vec![]; // the messages whose sentinel is in the probe, in order
    let mut pos = 0;
    for (i, b) in at.iter().enumerate() {
        let Some(b) = *b else { continue };
        if b < pos {
            return None; // out of order
        }
        segments.push(&probe[pos..b]);
        shown.push(i);
        pos = b + sentinel(i).len();
    }
    segments.push(&probe[pos..]);
    let mut cur = segments[0].len();
    if !text.starts_with(segments[0]) {
        return None;
    }
    let mut spans = vec![None; messages.len()];
    for (k, &i) in shown.iter().enumerate() {
        let next = segments[k + 1];
        let last = k + 1 == shown.len();
        let c = messages[i].content.as_str();
        // As given, trimmed, or written as a JSON string (a template that applies `tojson` to it).
        let escaped = serde_json::to_string(c).expect("a string");
        let escaped = &escaped[1..escaped.len() - 1];
        let found = [c, c.trim(), c.trim_start(), c.trim_end(), escaped].into_iter().find(|cand| {
            let rest = &text[cur..];
            rest.starts_with(cand)
                && rest[cand.len()..].starts_with(next)
                && (!last || rest.len() == cand.len() + next.len())
        })?;
        // Position of the rendered content inside the real text.
        spans[i] = Some(cur..cur + found.len());
        cur += found.len() + next.len();
    }
    (cur == text.len()).then_some(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_subset_matches_python() {
        // python3 -c "import time; print(time.strftime('%d %b %Y %H:%M:%S %j', time.gmtime(1795000000)))"
        assert_eq!(format_utc(1_795_000_000, "%d %b %Y %H:%M:%S %j"), "18 Nov 2026 11:06:40 322");
        assert_eq!(format_utc(951_782_400, "%Y-%m-%d %j"), "2000-02-29 060");
    }

    #[test]
    fn tojson_prints_like_python_json_dumps() {
        let t = ChatTemplate::new("".into(), "t".into(), "".into(), "".into()).unwrap();
        let x = Value::from(minijinja::value::Serde(serde_json::json!({"a": [1, "é"], "b": {}})));
        let render = |src: &str| t.env.render_str(src, minijinja::context! { x => x.clone() }).unwrap();
        // python3 -c "import json; print(json.dumps({'a': [1, 'é'], 'b': {}}, ensure_ascii=False))"
        assert_eq!(render("{{ x | tojson }}"), r#"{"a": [1, "é"], "b": {}}"#);
        // python3 -c "import json; print(json.dumps({'a': [1, 'é'], 'b': {}}, ensure_ascii=False, indent=2))"
        assert_eq!(render("{{ x | tojson(indent=2) }}"), "{\n  \"a\": [\n    1,\n    \"é\"\n  ],\n  \"b\": {}\n}");
    }
}

//! `convert coqa`: CoQA (conversational question answering over a story) into chat conversations: a
//! system message with the story, then alternating user question / assistant answer. Reads the
//! official CoQA JSON (`data[].story`, `questions[].input_text`, `answers[].input_text`) and the Hugging
//! Face datasets export (`story`, `questions` list, `answers.input_text` list) as JSONL, a JSON list or
//! Parquet. It does not evaluate; EM/F1 scoring lives with evaluation.

use crate::error::{DataError, Result};
use crate::record::{ChatMessage, Role};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;

/// The system message; `{story}` is replaced by the story.
pub const DEFAULT_SYSTEM: &str = "Read the story and extract answers for the questions.\nStory: {story}";

#[derive(Debug, Clone, PartialEq)]
pub struct Story {
    pub id: String,
    pub story: String,
    /// (question, answer) in turn order.
    pub turns: Vec<(String, String)>,
}

impl Story {
    pub fn to_messages(&self, system_template: &str) -> Vec<ChatMessage> {
        let mut m = vec![ChatMessage::new(Role::System, system_template.replace("{story}", &self.story))];
        for (q, a) in &self.turns {
            m.push(ChatMessage::new(Role::User, q.clone()));
            m.push(ChatMessage::new(Role::Assistant, a.clone()));
        }
        m
    }
}

/// Reads stories from any of the supported layouts (by extension and content).
pub fn read(path: &Path) -> Result<Vec<Story>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "parquet" {
        return read_parquet(path);
    }
    let text = std::fs::read_to_string(path).map_err(DataError::io(path))?;
    if ext == "jsonl" || (!text.trim_start().starts_with('{') && !text.trim_start().starts_with('[')) {
        let mut out = vec![];
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| DataError::at(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
            out.push(hf_row(&v).map_err(|e| DataError::at(path, format!("line {}: {e}", i + 1)))?);
        }
        return Ok(out);
    }
    // A JSONL file whose first line is an object also starts with '{': try whole-document JSON first.
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) if text.lines().count() > 1 => {
            let tmp: Vec<Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| DataError::at(path, format!("invalid JSON: {e}")))?;
            Value::Array(tmp)
        }
        Err(e) => return Err(DataError::at(path, format!("invalid JSON: {e}"))),
    };
    match &v {
        Value::Object(o) if o.contains_key("data") => {
            let data = o["data"].as_array().ok_or_else(|| DataError::at(path, "`data` is not a list"))?;
            data.iter()
                .enumerate()
                .map(|(i, s)| official(s).map_err(|e| DataError::at(path, format!("data[{i}]: {e}"))))
                .collect()
        }
        Value::Array(rows) => rows
            .iter()
            .enumerate()
            .map(|(i, r)| hf_row(r).map_err(|e| DataError::at(path, format!("row {i}: {e}"))))
            .collect(),
        _ => Err(DataError::at(
            path,
            "neither the official CoQA layout (an object with `data`) nor a list of Hugging Face rows",
        )),
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key).and_then(Value::as_str).ok_or_else(|| format!("`{key}` is missing or not a string"))
}

/// `{"id"?, "story", "questions": [{"input_text", "turn_id"}], "answers": [{"input_text", "turn_id"}]}`.
fn official(v: &Value) -> std::result::Result<Story, String> {
    let story = str_of(v, "story")?.to_owned();
    let list = |key: &str| -> std::result::Result<Vec<(i64, String)>, String> {
        let items = v.get(key).and_then(Value::as_array).ok_or_else(|| format!("`{key}` is missing or not a list"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let turn = q.get("turn_id").and_then(Value::as_i64).unwrap_or(i as i64 + 1);
                Ok((turn, str_of(q, "input_text").map_err(|e| format!("{key}[{i}]: {e}"))?.to_owned()))
            })
            .collect()
    };
    let (mut qs, mut ans) = (list("questions")?, list("answers")?);
    qs.sort_by_key(|x| x.0);
    ans.sort_by_key(|x| x.0);
    if qs.iter().map(|x| x.0).ne(ans.iter().map(|x| x.0)) {
        return Err("questions and answers do not have the same turn_ids".into());
    }
    let id = v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(Story { id, story, turns: qs.into_iter().zip(ans).map(|((_, q), (_, a))| (q, a)).collect() })
}

/// `{"source"?, "story", "questions": [str], "answers": {"input_text": [str], ...}}`.
fn hf_row(v: &Value) -> std::result::Result<Story, String> {
    let story = str_of(v, "story")?.to_owned();
    let strings = |x: Option<&Value>, what: &str| -> std::result::Result<Vec<String>, String> {
        x.and_then(Value::as_array)
            .ok_or_else(|| format!("`{what}` is missing or not a list"))?
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or_else(|| format!("`{what}` holds a non-string")))
            .collect()
    };
    let qs = strings(v.get("questions"), "questions")?;
    let ans = strings(v.get("answers").and_then(|a| a.get("input_text")), "answers.input_text")?;
    if qs.len() != ans.len() {
        return Err(format!("{} questions but {} answers", qs.len(), ans.len()));
    }
    let id = v.get("id").or(v.get("source")).and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(Story { id, story, turns: qs.into_iter().zip(ans).collect() })
}

fn read_parquet(path: &Path) -> Result<Vec<Story>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::at(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| DataError::at(path, format!("reading rows: {e}")))?;
    let mut out = vec![];
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| {
            DataError::at(path, format!("row {i}: {e}; hint: only snappy, lz4 and gzip compression are supported"))
        })?;
        out.push(hf_row(&row.to_json_value()).map_err(|e| DataError::at(path, format!("row {i}: {e}")))?);
    }
    Ok(out)
}

/// Converts `input` into a conversations JSONL at `output`; returns (stories, question turns).
pub fn convert(input: &Path, output: &Path, system_template: &str) -> Result<(usize, usize)> {
    let stories = read(input)?;
    let tmp = output.with_extension("partial");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(DataError::io(&tmp))?);
    let mut turns = 0;
    for s in &stories {
        turns += s.turns.len();
        let line = serde_json::json!({ "messages": s.to_messages(system_template) });
        writeln!(w, "{line}").map_err(DataError::io(&tmp))?;
    }
    w.flush().map_err(DataError::io(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, output).map_err(DataError::io(output))?;
    Ok((stories.len(), turns))
}

/// Reads conversations back from a converted JSONL (for evaluation): per line, the messages.
pub fn read_conversations(path: &Path) -> Result<Vec<Vec<ChatMessage>>> {
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut out = vec![];
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(DataError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        match crate::record::parse_line(&line, false)
            .map_err(|e| DataError::at(path, format!("line {}: {e}", i + 1)))?
        {
            crate::record::Record::Messages(m) => out.push(m.messages),
            _ => return Err(DataError::at(path, format!("line {}: not a conversation (`messages`)", i + 1))),
        }
    }
    Ok(out)
}

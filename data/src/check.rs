//! `check`: validates a training file (JSONL line by line, in constant memory, or Parquet row by row)
//! against the rules a hosted fine-tuning service applies (see `record::validate` and `rules`), and
//! optionally reports token statistics under a model's tokenizer and template: lengths, rows longer
//! than `max_seq_len`, ids outside the vocabulary, and the fraction of tokens each masking strategy
//! trains. Every problem carries its line (or row) number and message index; warnings are listed but
//! do not fail the file; the list is capped, with a count of the rest. It does not modify or prepare
//! the file.

use crate::encode::Encoder;
use crate::error::Result;
use crate::mask::{trained, MaskOptions, Strategy};
use crate::record::{json_error, validate, Format, Record};
use crate::source::{Rows, Unit};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// 1-based line (JSONL) or row (Parquet) number; none for a problem of the whole file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    pub rule: &'static str,
    pub detail: String,
    /// Listed, but does not fail the file.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    #[serde(skip)]
    pub unit: &'static str,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = if self.warning { "warning: " } else { "" };
        match (self.line, self.message) {
            (Some(l), Some(m)) => write!(f, "{} {l}, messages[{m}]: {w}{} [{}]", self.unit, self.detail, self.rule),
            (Some(l), None) => write!(f, "{} {l}: {w}{} [{}]", self.unit, self.detail, self.rule),
            (None, _) => write!(f, "{w}{} [{}]", self.detail, self.rule),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenStats {
    pub rows: usize,
    pub min: usize,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
    pub max_seq_len: usize,
    /// Rows longer than `max_seq_len`, and the first few of their line numbers.
    pub over_max_seq_len: usize,
    pub over_lines: Vec<usize>,
    /// Trained tokens / all tokens, per strategy.
    pub trained_fraction: BTreeMap<String, f64>,
    /// Rows with no trained token, per strategy (they would be dropped).
    pub untrained_rows: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    pub file: PathBuf,
    pub ok: bool,
    /// Lines (JSONL) or rows (Parquet) read.
    pub lines: usize,
    pub valid_rows: usize,
    pub format: Option<Format>,
    /// The first `max_problems` problems.
    pub problems: Vec<Problem>,
    pub problems_total: usize,
    /// Problems that are warnings, among `problems_total`.
    pub warnings_total: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenStats>,
    /// "line" or "row".
    pub unit: &'static str,
}

pub struct CheckOptions {
    pub strict: bool,
    pub max_problems: usize,
}

/// Token statistics accumulated in constant memory (a histogram of lengths).
struct Tally {
    lengths: BTreeMap<usize, usize>,
    sum: usize,
    over: usize,
    over_lines: Vec<usize>,
    tokens: usize,
    trained: BTreeMap<Strategy, usize>,
    untrained_rows: BTreeMap<Strategy, usize>,
}

const STRATEGIES: [Strategy; 5] = Strategy::ALL;

pub fn check_file(path: &Path, opts: &CheckOptions, model: Option<(&Encoder, usize)>) -> Result<CheckReport> {
    let mut rows = Rows::open(path)?;
    let unit = rows.unit.as_str();
    let mut report = CheckReport {
        file: path.to_owned(),
        ok: false,
        lines: 0,
        valid_rows: 0,
        format: None,
        problems: vec![],
        problems_total: 0,
        warnings_total: 0,
        tokens: None,
        unit,
    };
    let push = |report: &mut CheckReport, p: Problem| {
        report.problems_total += 1;
        report.warnings_total += usize::from(p.warning);
        if report.problems.len() < opts.max_problems {
            report.problems.push(p);
        }
    };
    let mut tally = Tally {
        lengths: BTreeMap::new(),
        sum: 0,
        over: 0,
        over_lines: vec![],
        tokens: 0,
        trained: BTreeMap::new(),
        untrained_rows: BTreeMap::new(),
    };
    let mut first_format: Option<(Format, usize)> = None;
    let mut buf = Vec::new();
    while let Some(line) = rows.next_into(&mut buf, path)? {
        report.lines = line;
        let problem =
            |rule, detail: String| Problem { line: Some(line), message: None, rule, detail, warning: false, unit };
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t,
            Err(e) => {
                let detail = format!(
                    "not valid UTF-8 (byte {} of the line); hint: re-save the file as UTF-8",
                    e.valid_up_to() + 1
                );
                push(&mut report, problem("not_utf8", detail));
                continue;
            }
        };
        if text.trim().is_empty() {
            push(&mut report, problem("blank_line", "blank line (every line must hold one JSON object)".into()));
            continue;
        }
        if rows.unit == Unit::Line && text.contains('\r') {
            let detail = "bare CR (\\r) line endings: the file's lines end with \\r alone, so it reads as one line; hint: convert the line endings to \\n (dos2unix -c mac, or tr '\\r' '\\n')";
            push(&mut report, problem("bare_cr", detail.into()));
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                if line == 1 && rows.unit == Unit::Line {
                    if let Some(why) = crate::source::whole_document(path) {
                        push(&mut report, problem("not_jsonl", why));
                        break;
                    }
                }
                let rule = if text.starts_with('\u{FEFF}') { "byte_order_mark" } else { "invalid_json" };
                push(&mut report, problem(rule, json_error(text, &e)));
                continue;
            }
        };
        let (record, violations) = validate(&value, opts.strict);
        for v in violations {
            let p = Problem {
                line: Some(line),
                message: v.message,
                rule: v.rule,
                detail: v.detail,
                warning: v.warning,
                unit,
            };
            push(&mut report, p);
        }
        let Some(record) = record else { continue };
        let format = record.format();
        match first_format {
            None => first_format = Some((format, line)),
            Some((f, first)) if f != format => {
                push(
                    &mut report,
                    problem(
                        "format_changed",
                        format!("{format} row, but {unit} {first} is {f}; use one format per file"),
                    ),
                );
                continue;
            }
            _ => {}
        }
        if let Some((encoder, max_seq_len)) = model {
            if let Err(p) = tally_tokens(&mut tally, encoder, &record, line, max_seq_len) {
                push(
                    &mut report,
                    Problem { line: Some(line), message: None, rule: p.0, detail: p.1, warning: false, unit },
                );
                continue;
            }
        }
        report.valid_rows += 1;
    }
    if report.lines == 0 {
        let detail = "the file is empty (no rows)".into();
        push(&mut report, Problem { line: None, message: None, rule: "empty_file", detail, warning: false, unit });
    }
    report.format = first_format.map(|(f, _)| f);
    report.ok = report.problems_total == report.warnings_total;
    if let Some((_, max_seq_len)) = model {
        report.tokens = (report.valid_rows > 0).then(|| stats(&tally, report.valid_rows, max_seq_len));
    }
    Ok(report)
}

/// Adds a row's token counts; a row the model cannot encode is a problem (rule, detail).
fn tally_tokens(
    t: &mut Tally,
    encoder: &Encoder,
    record: &Record,
    line: usize,
    max_seq_len: usize,
) -> std::result::Result<(), (&'static str, String)> {
    if let Record::Tokens(tokens) = record {
        let vocab = encoder.vocab_size;
        if let Some((k, &id)) = tokens.input_ids.iter().enumerate().find(|(_, &id)| id >= vocab) {
            return Err((
                "id_out_of_vocab",
                format!("`input_ids`[{k}] = {id} is outside the model's vocabulary of {vocab}"),
            ));
        }
        if let Some((k, &l)) = tokens.labels.iter().flatten().enumerate().find(|(_, &l)| l >= i64::from(vocab)) {
            return Err((
                "id_out_of_vocab",
                format!("`labels`[{k}] = {l} is outside the model's vocabulary of {vocab}"),
            ));
        }
    }
    let enc = encoder.encode(record).map_err(|e| ("encode_failed", e.to_string()))?;
    let n = enc.ids.len();
    *t.lengths.entry(n).or_default() += 1;
    t.sum += n;
    t.tokens += n;
    if n > max_seq_len {
        t.over += 1;
        if t.over_lines.len() < 10 {
            t.over_lines.push(line);
        }
    }
    let generation = encoder.template.as_ref().is_some_and(|t| t.has_generation);
    for s in STRATEGIES {
        let flags = trained(record, &enc, MaskOptions { strategy: s, train_eot: true }, generation);
        let k = flags.iter().filter(|&&f| f).count();
        *t.trained.entry(s).or_default() += k;
        if k == 0 {
            *t.untrained_rows.entry(s).or_default() += 1;
        }
    }
    Ok(())
}

fn stats(t: &Tally, rows: usize, max_seq_len: usize) -> TokenStats {
    let quantile = |q: f64| -> usize {
        let target = ((rows as f64) * q).ceil().max(1.0) as usize;
        let mut seen = 0;
        for (&len, &count) in &t.lengths {
            seen += count;
            if seen >= target {
                return len;
            }
        }
        0
    };
    TokenStats {
        rows,
        min: t.lengths.keys().next().copied().unwrap_or(0),
        mean: t.sum as f64 / rows as f64,
        p50: quantile(0.5),
        p95: quantile(0.95),
        max: t.lengths.keys().next_back().copied().unwrap_or(0),
        max_seq_len,
        over_max_seq_len: t.over,
        over_lines: t.over_lines.clone(),
        trained_fraction: STRATEGIES
            .iter()
            .map(|s| (s.to_string(), t.trained.get(s).copied().unwrap_or(0) as f64 / t.tokens.max(1) as f64))
            .collect(),
        untrained_rows: STRATEGIES
            .iter()
            .map(|s| (s.to_string(), t.untrained_rows.get(s).copied().unwrap_or(0)))
            .collect(),
    }
}

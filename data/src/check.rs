//! `check`: validates a JSONL training file line by line, in constant memory, against the rules a hosted
//! fine-tuning service applies (see `record::validate`), and optionally reports token statistics under a
//! model's tokenizer and template: lengths, rows longer than `max_seq_len`, and the fraction of tokens
//! each masking strategy trains. Every problem carries its line number and message index; the list is
//! capped, with a count of the rest. It does not modify or prepare the file.

use crate::encode::Encoder;
use crate::error::{DataError, Result};
use crate::mask::{trained, MaskOptions, Strategy};
use crate::record::{validate, Format, Record};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// 1-based line number.
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message {
            Some(m) => write!(f, "line {}, messages[{m}]: {} [{}]", self.line, self.detail, self.rule),
            None => write!(f, "line {}: {} [{}]", self.line, self.detail, self.rule),
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
    pub lines: usize,
    pub valid_rows: usize,
    pub format: Option<Format>,
    /// The first `max_problems` problems.
    pub problems: Vec<Problem>,
    pub problems_total: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenStats>,
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
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut report = CheckReport {
        file: path.to_owned(),
        ok: false,
        lines: 0,
        valid_rows: 0,
        format: None,
        problems: vec![],
        problems_total: 0,
        tokens: None,
    };
    let push = |report: &mut CheckReport, p: Problem| {
        report.problems_total += 1;
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
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(DataError::io(path))? == 0 {
            break;
        }
        report.lines += 1;
        let line = report.lines;
        let bytes = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let problem = |rule, detail: String| Problem { line, message: None, rule, detail };
        let Ok(text) = std::str::from_utf8(bytes) else {
            push(&mut report, problem("not_utf8", "not valid UTF-8".into()));
            continue;
        };
        if text.trim().is_empty() {
            push(&mut report, problem("blank_line", "blank line (every line must hold one JSON object)".into()));
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                push(&mut report, problem("invalid_json", format!("invalid JSON: {e}")));
                continue;
            }
        };
        let record = match validate(&value, opts.strict) {
            Ok(r) => r,
            Err(violations) => {
                for v in violations {
                    push(&mut report, Problem { line, message: v.message, rule: v.rule, detail: v.detail });
                }
                continue;
            }
        };
        let format = record.format();
        match first_format {
            None => first_format = Some((format, line)),
            Some((f, first)) if f != format => {
                push(
                    &mut report,
                    problem(
                        "format_changed",
                        format!("{format} row, but line {first} is {f}; use one format per file"),
                    ),
                );
                continue;
            }
            _ => {}
        }
        report.valid_rows += 1;
        if let Some((encoder, max_seq_len)) = model {
            tally_tokens(&mut tally, encoder, &record, line, max_seq_len)
                .map_err(|e| DataError::at(path, format!("line {line}: {e}")))?;
        }
    }
    if report.lines == 0 {
        push(&mut report, Problem { line: 0, message: None, rule: "empty_file", detail: "the file is empty".into() });
    }
    report.format = first_format.map(|(f, _)| f);
    report.ok = report.problems_total == 0;
    if let Some((_, max_seq_len)) = model {
        report.tokens = (report.valid_rows > 0).then(|| stats(&tally, report.valid_rows, max_seq_len));
    }
    Ok(report)
}

fn tally_tokens(t: &mut Tally, encoder: &Encoder, record: &Record, line: usize, max_seq_len: usize) -> Result<()> {
    let enc = encoder.encode(record)?;
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

//! Every `check` rule, each with a small failing file and the exact line (and message index) it must be
//! reported on; plus a clean file, the cap on listed problems, and token statistics against counts
//! worked out from the tokenizer.

use ferrotune_data::check::{check_file, CheckOptions, CheckReport};
use std::io::Write;

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

fn run(lines: &[&str], strict: bool) -> CheckReport {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    check_file(f.path(), &CheckOptions { strict, max_problems: 50 }, None).unwrap()
}

/// The bad line goes third, between good lines; the report must name line 3, the rule and the message.
fn expect(bad: &str, strict: bool, rule: &str, message: Option<usize>) {
    let report = run(&[GOOD, GOOD, bad, GOOD], strict);
    assert!(!report.ok, "{rule}: not reported for {bad}");
    let p = report
        .problems
        .iter()
        .find(|p| p.rule == rule)
        .unwrap_or_else(|| panic!("{rule} not among {:?}", report.problems));
    assert_eq!((p.line, p.message), (Some(3), message), "{rule}: wrong place: {p}");
    assert_eq!(report.valid_rows, 3, "{rule}");
}

#[test]
fn clean_file_passes() {
    let r = run(
        &[
            GOOD,
            r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 1}]}"#,
        ],
        true,
    );
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!((r.lines, r.valid_rows), (2, 2));
}

#[test]
fn each_rule_is_reported_on_its_line() {
    expect("not json at all", false, "invalid_json", None);
    expect("[1, 2]", false, "not_object", None);
    expect("", false, "blank_line", None);
    expect(r#"{"input": "x"}"#, false, "unknown_format", None);
    expect(r#"{"messages": [], "text": "x"}"#, false, "mixed_format", None);
    expect(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 7}"#,
        false,
        "extra_key",
        None,
    );
    expect(r#"{"text": "plain"}"#, false, "format_changed", None);
    expect(r#"{"messages": "hello"}"#, false, "messages_not_list", None);
    expect(r#"{"messages": []}"#, false, "messages_empty", None);
    expect(r#"{"messages": [{"role": "user", "content": "a"}, "b"]}"#, false, "message_not_object", Some(1));
    expect(
        r#"{"messages": [{"role": "user", "content": "a", "author": "x"}, {"role": "assistant", "content": "b"}]}"#,
        false,
        "message_extra_key",
        Some(0),
    );
    expect(
        r#"{"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        false,
        "missing_role",
        Some(0),
    );
    expect(
        r#"{"messages": [{"role": 3, "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        false,
        "role_not_string",
        Some(0),
    );
    expect(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#,
        false,
        "unknown_role",
        Some(1),
    );
    expect(
        r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}"#,
        false,
        "missing_content",
        Some(0),
    );
    expect(
        r#"{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]}"#,
        false,
        "content_not_string",
        Some(0),
    );
    expect(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]}"#,
        false,
        "bad_weight",
        Some(1),
    );
    expect(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}"#,
        false,
        "bad_weight",
        Some(1),
    );
    expect(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": true}]}"#,
        false,
        "bad_weight",
        Some(1),
    );
    expect(
        r#"{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}"#,
        false,
        "no_assistant",
        None,
    );
}

#[test]
fn strict_rules_are_reported_only_with_strict() {
    let cases = [
        (
            r#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            "first_role",
            Some(0),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            "system_not_first",
            Some(1),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "c"}]}"#,
            "empty_content",
            Some(0),
        ),
        // A warning without --strict (see tool_rules.rs), an error with it.
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            "consecutive_roles",
            Some(1),
        ),
    ];
    for (bad, rule, msg) in cases {
        assert!(run(&[GOOD, GOOD, bad, GOOD], false).ok, "{rule} reported without --strict");
        expect(bad, true, rule, msg);
    }
}

#[test]
fn other_formats_and_encoding_problems() {
    let pc = r#"{"prompt": "p", "completion": "c"}"#;
    let r = run(&[pc, r#"{"prompt": "p"}"#, r#"{"prompt": 1, "completion": "c"}"#], false);
    let rules: Vec<_> = r.problems.iter().map(|p| (p.line.unwrap(), p.rule)).collect();
    assert_eq!(rules, vec![(2, "missing_key"), (3, "not_string")]);
    let r = run(&[r#"{"text": "a"}"#, r#"{"text": null}"#], false);
    assert_eq!(r.problems.iter().map(|p| (p.line.unwrap(), p.rule)).collect::<Vec<_>>(), vec![(2, "not_string")]);
    // Invalid UTF-8 on line 2.
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(format!("{GOOD}\n").as_bytes()).unwrap();
    f.write_all(b"{\"text\": \"\xff\xfe\"}\n").unwrap();
    let r = check_file(f.path(), &CheckOptions { strict: false, max_problems: 50 }, None).unwrap();
    assert_eq!(r.problems.iter().map(|p| (p.line.unwrap(), p.rule)).collect::<Vec<_>>(), vec![(2, "not_utf8")]);
    // Empty file.
    let f = tempfile::NamedTempFile::new().unwrap();
    let r = check_file(f.path(), &CheckOptions { strict: false, max_problems: 50 }, None).unwrap();
    assert!(!r.ok && r.problems[0].rule == "empty_file");
    assert_eq!((r.problems.len(), r.problems[0].line), (1, None), "an empty file is one problem, on no line");
}

#[test]
fn problem_list_is_capped_and_the_rest_counted() {
    let lines: Vec<&str> = std::iter::repeat_n("nope", 120).collect();
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for l in &lines {
        writeln!(f, "{l}").unwrap();
    }
    let r = check_file(f.path(), &CheckOptions { strict: false, max_problems: 10 }, None).unwrap();
    assert_eq!((r.problems.len(), r.problems_total), (10, 120));
    assert_eq!(r.problems[9].line, Some(10));
}

#[test]
fn token_statistics_with_a_model() {
    let dir = ferrotune_data::fixtures::ensure("smollm2-135m-instruct");
    let enc = ferrotune_data::encode::Encoder::new(
        ferrotune_data::Tokenizer::from_dir(&dir).unwrap(),
        Some(ferrotune_data::ChatTemplate::from_dir(&dir).unwrap()),
    )
    .unwrap();
    let long = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "ok"}}]}}"#,
        "word ".repeat(100)
    );
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for l in [GOOD, long.as_str(), GOOD] {
        writeln!(f, "{l}").unwrap();
    }
    let r = check_file(f.path(), &CheckOptions { strict: false, max_problems: 50 }, Some((&enc, 64))).unwrap();
    let t = r.tokens.unwrap();
    // Token counts from transformers: len(tok.apply_chat_template(messages, tokenize=True)) is 34 for
    // GOOD (21 of them SmolLM2's injected system prompt) and 134 for the long row.
    assert_eq!((t.min, t.max, t.over_max_seq_len, t.over_lines.clone()), (34, 134, 1, vec![2]));
    // assistant: "Hello" + <|im_end|> = 2 tokens per GOOD row, "ok" + <|im_end|> = 2 in the long one.
    let total = (2 * 34 + 134) as f64;
    assert!((t.trained_fraction["assistant"] - 6.0 / total).abs() < 1e-12, "{:?}", t.trained_fraction);
    assert_eq!(t.trained_fraction["assistant"], t.trained_fraction["auto"]);
    assert_eq!(t.trained_fraction["last"], t.trained_fraction["assistant"]);
}

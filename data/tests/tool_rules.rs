//! `check` on tool-calling, reasoning, text-part, preference and pre-tokenized rows: each new rule with
//! a failing row placed on line 3 and the exact message index it must name; the shapes the hosted API
//! accepts (parallel calls answered by consecutive `tool` messages, `name` on any message, content as
//! text parts, a call with no result, reasoning) pass; consecutive user/assistant turns warn and fail
//! only under --strict; and the messages of the JSON layer name the column, a byte-order mark, bare-CR
//! line endings and a lone surrogate escape.

use ferrotune_data::check::{check_file, CheckOptions, CheckReport};
use std::io::Write;

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

fn run_bytes(bytes: &[u8], strict: bool) -> CheckReport {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    check_file(f.path(), &CheckOptions { strict, max_problems: 50 }, None).unwrap()
}

fn run(lines: &[&str], strict: bool) -> CheckReport {
    run_bytes(lines.iter().map(|l| format!("{l}\n")).collect::<String>().as_bytes(), strict)
}

/// A conversation with `tools` and these messages (JSON text of the list's items).
fn conv(messages: &[&str]) -> String {
    let tools = r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}, {"type": "function", "function": {"name": "search"}}]"#;
    format!(r#"{{"tools": {tools}, "messages": [{}]}}"#, messages.join(", "))
}

const USER: &str = r#"{"role": "user", "content": "Weather in Rome and Oslo?"}"#;
const ANSWER: &str = r#"{"role": "assistant", "content": "Sunny in both."}"#;

fn calls(ids: &[&str]) -> String {
    let items: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"id": "{id}", "type": "function", "function": {{"name": "get_weather", "arguments": "{{\"city\": \"Rome\"}}"}}}}"#))
        .collect();
    format!(r#"{{"role": "assistant", "content": null, "tool_calls": [{}]}}"#, items.join(", "))
}

fn result(id: &str) -> String {
    format!(r#"{{"role": "tool", "tool_call_id": "{id}", "name": "get_weather", "content": "20"}}"#)
}

/// The bad row goes on line 3 between good ones; the report must name line 3, the rule and the message.
fn expect(bad: &str, rule: &str, message: Option<usize>, detail: &str) {
    let report = run(&[GOOD, GOOD, bad, GOOD], false);
    assert!(!report.ok, "{rule}: not reported for {bad}");
    let p = report
        .problems
        .iter()
        .find(|p| p.rule == rule)
        .unwrap_or_else(|| panic!("{rule} not among {:?}", report.problems));
    assert_eq!((p.line, p.message), (Some(3), message), "{rule}: wrong place: {p}");
    assert!(p.detail.contains(detail), "{rule}: `{}` does not say `{detail}`", p.detail);
    assert_eq!(report.valid_rows, 3, "{rule}");
}

#[test]
fn accepted_shapes_pass() {
    let parallel = conv(&[USER, &calls(&["a", "b"]), &result("a"), &result("b"), ANSWER]);
    let no_result = conv(&[USER, &calls(&["a"])]);
    let absent = conv(&[
        USER,
        r#"{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}]}"#,
        r#"{"role": "tool", "content": "found"}"#,
        ANSWER,
    ]);
    let parts = r#"{"messages": [{"role": "system", "name": "ops", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}, {"role": "user", "name": "ann", "content": "Hi"}, {"role": "assistant", "name": "bot", "reasoning": "Greet back.", "content": "Hello"}]}"#;
    let reasoning = r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Add.", "content": "4", "weight": -0}]}"#;
    let r = run(&[&parallel, &no_result, &absent, parts, reasoning], true);
    assert!(r.ok && r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.valid_rows, 5);
}

#[test]
fn each_tool_rule_is_reported_on_its_line_and_message() {
    expect(
        &conv(&[USER, &calls(&["a"]), &result("zzz"), ANSWER]),
        "unknown_tool_call_id",
        Some(2),
        "`zzz` answers no earlier tool call",
    );
    // The answer comes before the call it names.
    expect(
        &conv(&[USER, &calls(&["x"]), &result("b"), &calls(&["b"]), &result("b"), ANSWER]),
        "unknown_tool_call_id",
        Some(2),
        "`b`",
    );
    expect(
        &conv(&[USER, &calls(&["a", "b", "a"]), &result("a"), &result("b"), ANSWER]),
        "duplicate_call_id",
        Some(1),
        "`a` is used twice in this message",
    );
    // Ids restarting each turn are fine (each result answers the latest call of that id).
    assert!(run(&[&conv(&[USER, &calls(&["a"]), &result("a"), &calls(&["a"]), &result("a"), ANSWER])], false).ok);
    expect(
        &conv(&[USER, r#"{"role": "assistant", "content": null, "tool_calls": []}"#]),
        "missing_content",
        Some(1),
        "an empty turn",
    );
    let bad_args = r#"{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "search", "arguments": "{}"}}, {"id": "b", "type": "function", "function": {"name": "search", "arguments": "{\"q\": "}}]}"#;
    expect(
        &conv(&[USER, bad_args, &result("a"), &result("b"), ANSWER]),
        "bad_arguments",
        Some(1),
        "tool_calls[1]: `function.arguments` is a string but not JSON",
    );
    let number_args = r#"{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "search", "arguments": 3}}]}"#;
    expect(&conv(&[USER, number_args]), "bad_arguments", Some(1), "tool_calls[0]");
    expect(
        &conv(&[USER, ANSWER, r#"{"role": "tool", "content": "20"}"#]),
        "orphan_tool",
        Some(2),
        "must follow an assistant message with `tool_calls`",
    );
    expect(&conv(&[r#"{"role": "tool", "content": "20"}"#, ANSWER]), "orphan_tool", Some(0), "must follow");
    let no_function = r#"{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function"}]}"#;
    expect(&conv(&[USER, no_function]), "bad_tool_call", Some(1), "tool_calls[0]: `function`");
    let user_calls = r#"{"role": "user", "content": "x", "tool_calls": []}"#;
    expect(&conv(&[user_calls, ANSWER]), "misplaced_field", Some(0), "`tool_calls` belongs on assistant messages");
    let user_null = r#"{"role": "user", "content": null}"#;
    expect(&conv(&[user_null, ANSWER]), "missing_content", Some(0), "`content` is null");
    let image = r#"{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}"#;
    expect(&conv(&[image, ANSWER]), "image_content", Some(0), "content[1] is an image part");
    let odd_part = r#"{"role": "user", "content": [{"type": "audio"}]}"#;
    expect(&conv(&[odd_part, ANSWER]), "bad_content_part", Some(0), "content[0]");
    let bad_tools = r#"{"tools": [{"type": "function", "function": {"description": "no name"}}], "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    expect(bad_tools, "bad_tools", None, "tools[0]: `function.name`");
    expect(
        r#"{"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}"#,
        "preference_data",
        None,
        "preference tuning, which ferrotune does not do yet",
    );
    let both = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "x", "reasoning_content": "y"}]}"#;
    expect(both, "bad_reasoning", Some(1), "both given and differ");
    expect(
        r#"{"input_ids": [1, 2, 3], "labels": [1, 2]}"#,
        "bad_tokens",
        None,
        "`labels` has 2 values but `input_ids` has 3",
    );
    expect(r#"{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}"#, "bad_tokens", None, "no position is trained");
    expect(r#"{"input_ids": [1, -2]}"#, "bad_tokens", None, "`input_ids`[1] = -2 is not a token id");
    expect(r#"{"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1]}"#, "bad_tokens", None, "zeros between ones");
}

#[test]
fn consecutive_turns_warn_and_fail_only_under_strict() {
    let two_users = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#;
    let r = run(&[GOOD, two_users], false);
    assert!(r.ok, "a warning must not fail the file: {:?}", r.problems);
    assert_eq!((r.problems_total, r.warnings_total, r.valid_rows), (1, 1, 2));
    let p = &r.problems[0];
    assert_eq!((p.line, p.message, p.rule, p.warning), (Some(2), Some(1), "consecutive_roles", true));
    assert!(p.to_string().starts_with("line 2, messages[1]: warning: two consecutive `user` messages"), "{p}");
    let r = run(&[GOOD, two_users], true);
    assert!(!r.ok && !r.problems[0].warning && r.valid_rows == 1);
    // A call to a function that `tools` does not define is a warning too.
    let r = run(
        &[&conv(&[
            USER,
            r#"{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "fly", "arguments": {}}}]}"#,
        ])],
        false,
    );
    assert!(r.ok && r.problems[0].rule == "undefined_tool" && r.problems[0].message == Some(1), "{:?}", r.problems);
}

#[test]
fn json_layer_messages_point_at_the_cause() {
    let r = run(&[GOOD, GOOD, r#"{"messages": [}"#], false);
    let p = &r.problems[0];
    assert_eq!((p.line, p.rule), (Some(3), "invalid_json"));
    assert!(p.detail.starts_with("invalid JSON at column 15:") && !p.detail.contains("line 1"), "{}", p.detail);
    let r = run_bytes(format!("\u{FEFF}{GOOD}\n{GOOD}\n").as_bytes(), false);
    assert_eq!(
        (r.problems.len(), r.problems[0].line, r.problems[0].rule),
        (1, Some(1), "byte_order_mark"),
        "{:?}",
        r.problems
    );
    assert!(r.problems[0].detail.contains("byte-order mark"));
    let r = run_bytes(format!("{GOOD}\r{GOOD}\r").as_bytes(), false);
    assert_eq!((r.lines, r.problems[0].rule), (1, "bare_cr"), "{:?}", r.problems);
    // CRLF is fine.
    assert!(run_bytes(format!("{GOOD}\r\n{GOOD}\r\n").as_bytes(), false).ok);
    let r = run(&[r#"{"text": "\ud800 alone"}"#], false);
    assert!(
        r.problems[0].detail.starts_with("invalid JSON at column 11: a lone UTF-16 surrogate"),
        "{}",
        r.problems[0].detail
    );
    // A proper pair is text.
    assert!(run(&[r#"{"text": "\ud83d\ude00 ok"}"#], false).ok);
    let r = run(
        &[r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": -0.5}]}"#],
        false,
    );
    assert_eq!(r.problems[0].rule, "bad_weight");
    // A pretty-printed file, or a JSON list: one problem saying so, not one per line.
    let pretty = serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(GOOD).unwrap()).unwrap();
    let r = run_bytes(pretty.as_bytes(), false);
    assert_eq!((r.problems_total, r.problems[0].rule), (1, "not_jsonl"), "{:?}", r.problems);
    assert!(r.problems[0].detail.contains("one pretty-printed JSON object") && r.problems[0].detail.contains("jq -c"));
    let r = run_bytes(format!("[\n{GOOD},\n{GOOD}\n]\n").as_bytes(), false);
    assert!(r.problems[0].detail.contains("one JSON list of 2 items"), "{:?}", r.problems);
}

//! The guards `prepare` applies to a whole dataset or row: no trained end-of-turn token anywhere is an
//! error (the model would never learn to stop) unless end-of-turn training was turned off; two BOS
//! tokens in one sequence is an error naming the line; pre-tokenized rows refuse strategies that need
//! turns, and their labels are used as given.

use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{prepare, PrepareOptions};
use ferrotune_data::{fixtures, ChatTemplate, Tokenizer};
use std::path::Path;

fn encoder(tokenizer: &str, template: &str) -> Encoder {
    let dir = fixtures::ensure(tokenizer);
    Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::load(&dir, template).unwrap())).unwrap()
}

fn opts(strategy: Strategy, train_eot: bool) -> PrepareOptions {
    PrepareOptions::new(MaskOptions { strategy, train_eot }, 256, Overlong::Truncate)
}

fn write(dir: &Path, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const CONV: &str =
    r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}"#;

#[test]
fn a_dataset_that_never_trains_end_of_turn_is_refused_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(tmp.path(), &[CONV.into(), CONV.into()]);
    // Its {% generation %} blocks hold the content only: <|im_end|> is never trained under `assistant`.
    let path = tmp.path().join("content_only_generation.jinja");
    std::fs::write(
        &path,
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>\\n' }}{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}",
    )
    .unwrap();
    let e = encoder("smollm2-135m-instruct", path.to_str().unwrap());
    let err = prepare(&data, &e, &opts(Strategy::Assistant, true), &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("no end-of-turn token (<|im_end|>) is trained anywhere"), "{err}");
    assert!(err.contains("--no-train-eot"), "{err}");
    assert!(prepare(&data, &e, &opts(Strategy::Assistant, false), &|_, _| {}).is_ok());
    // The same data under the model's own template trains <|im_end|>: no complaint.
    assert!(
        prepare(&data, &encoder("smollm2-135m-instruct", "auto"), &opts(Strategy::Assistant, true), &|_, _| {}).is_ok()
    );
}

#[test]
fn two_bos_tokens_in_a_sequence_are_an_error_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    // The llama3 template writes <|begin_of_text|>; the content carries another one.
    let bad = r#"{"messages": [{"role": "user", "content": "<|begin_of_text|>Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let data = write(tmp.path(), &[CONV.into(), bad.into()]);
    let e = encoder("llama3-tokenizer", "llama3");
    let err = prepare(&data, &e, &opts(Strategy::Assistant, true), &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("line 2: ") && err.contains("2 BOS tokens (<|begin_of_text|>)"), "{err}");
    // Text rows: the tokenizer adds one, the text another.
    let data = write(tmp.path(), &[r#"{"text": "<|begin_of_text|>once upon a time"}"#.into()]);
    let err = prepare(&data, &e, &opts(Strategy::Auto, true), &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("line 1: ") && err.contains("2 BOS tokens"), "{err}");
    // SmolLM2's bos_token (<|im_start|>) opens every turn: it is no sequence opener, so no error.
    assert!(prepare(
        &write(tmp.path(), &[CONV.into()]),
        &encoder("smollm2-135m-instruct", "auto"),
        &opts(Strategy::Assistant, true),
        &|_, _| {}
    )
    .is_ok());
}

#[test]
fn pretokenized_rows_keep_their_labels_and_refuse_turn_strategies() {
    let tmp = tempfile::tempdir().unwrap();
    let e = encoder("llama3-tokenizer", "llama3");
    let eot = e.tokenizer.token_id("<|eot_id|>").unwrap() as i64;
    // Labels as Hugging Face writes them (unshifted), a custom target at position 2, right padding.
    let row = format!(
        r#"{{"input_ids": [10, 11, 12, 13, {eot}, 0, 0], "attention_mask": [1, 1, 1, 1, 1, 0, 0], "labels": [-100, -100, 99, 13, {eot}, -100, -100]}}"#
    );
    let data = write(tmp.path(), &[row]);
    let (header, rows) = prepare(&data, &e, &opts(Strategy::Auto, true), &|_, _| {}).unwrap();
    assert_eq!(header.stats.tokens, 5, "padding is dropped");
    let r = &rows[0];
    // Shifted: position t predicts labels[t + 1].
    assert_eq!(&r.ids[..5], &[10, 11, 12, 13, eot as u32]);
    assert_eq!(&r.labels[..5], &[-100, 99, 13, eot as i32, -100]);
    // `all` trains every position on the ids themselves.
    let (_, rows) = prepare(&data, &e, &opts(Strategy::All, true), &|_, _| {}).unwrap();
    assert_eq!(&rows[0].labels[..5], &[11, 12, 13, eot as i32, -100]);
    let err = prepare(&data, &e, &opts(Strategy::Assistant, true), &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("pre-tokenized rows carry their own mask") && err.contains("--strategy auto"), "{err}");
}

#[test]
fn a_template_that_does_not_render_tool_calls_is_refused_naming_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let call = r#"{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}, {"role": "tool", "tool_call_id": "a", "content": "4"}, {"role": "assistant", "content": "4 degrees."}]}"#;
    let data = write(tmp.path(), &[CONV.into(), call.into()]);
    // ChatML knows nothing of tool calls: the call's turn would be empty.
    let err = prepare(&data, &encoder("smollm2-135m-instruct", "chatml"), &opts(Strategy::Assistant, true), &|_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("line 2: ")
            && err.contains("messages[1] calls `get_weather`, but the chat template renders no such call"),
        "{err}"
    );
    assert!(
        prepare(&data, &encoder("llama3-tokenizer", "llama31"), &opts(Strategy::Assistant, true), &|_, _| {}).is_ok()
    );
}

#[test]
fn limits_are_named_and_checked_before_the_work() {
    use ferrotune_data::record::{ChatMessage, Conversation, Record, Role};
    let tmp = tempfile::tempdir().unwrap();
    // A line with no end: refused at the limit, not after filling memory.
    let p = tmp.path().join("long.jsonl");
    std::fs::write(&p, vec![b'x'; ferrotune_data::source::MAX_LINE_BYTES + 10]).unwrap();
    let err = ferrotune_data::check::check_file(
        &p,
        &ferrotune_data::check::CheckOptions { strict: false, max_problems: 5 },
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("line 1 is longer than 64 MiB, ferrotune's limit"), "{err}");
    // A template that loops without end runs out of fuel, with the limit named.
    let dir = fixtures::ensure("smollm2-135m-instruct");
    let t = tmp.path().join("loops.jinja");
    std::fs::write(&t, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").unwrap();
    let enc =
        Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::load(&dir, t.to_str().unwrap()).unwrap()))
            .unwrap();
    let err = enc
        .encode(&Record::Messages(
            vec![ChatMessage::new(Role::User, "a"), ChatMessage::new(Role::Assistant, "b")].into(),
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("ferrotune's limit") && err.contains("loops without end"), "{err}");
    // Many messages: linear work (20,000 render and encode), and past the limit an error, not a panic.
    let enc = encoder("smollm2-135m-instruct", "auto");
    let conv = |n: usize| -> Conversation {
        (0..n)
            .map(|i| ChatMessage::new(if i % 2 == 0 { Role::User } else { Role::Assistant }, format!("m{i}")))
            .collect::<Vec<_>>()
            .into()
    };
    let t0 = std::time::Instant::now();
    let e = enc.encode(&Record::Messages(conv(20_000))).unwrap();
    println!("20,000 messages: {} tokens in {:.2}s", e.ids.len(), t0.elapsed().as_secs_f64());
    let err =
        enc.encode(&Record::Messages(conv(ferrotune_data::template::MAX_MESSAGES + 1))).err().unwrap().to_string();
    assert!(err.contains("at most 65534 are supported"), "{err}");
}

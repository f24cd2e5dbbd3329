//! `prepare` throughput, side by side in one run (DESIGN.md §7), on two corpora: the bundled CoQA
//! sample (repeated with varied stories; SmolLM2's tokenizer and a ChatML template with
//! {% generation %} blocks) and a tool-calling corpus (data/tests/fixtures/tool_conversations.json
//! repeated with varied cities: tools, calls, parallel calls, results, reasoning; Qwen2.5's template
//! tagged with {% generation %}). For each:
//!   1. ferrotune's prepare (render with sentinel alignment, tokenize with offsets, tag, mask, shift,
//!      pack) on 2 threads;
//!   2. the tokenizer alone: `encode_batch` over the already rendered texts (rayon, 2 threads), the
//!      ceiling for any pipeline that uses this tokenizer;
//!   3. the Python reference (benches/prepare_reference.py): transformers' apply_chat_template (with
//!      `tools=`) with return_assistant_tokens_mask=True and label shifting.
//!
//! The token and trained counts of 1 and 3 must agree, so both did the same work. Run:
//! `scripts/cargo bench --bench prepare` (BENCH_CONVERSATIONS sets the CoQA count, default 4000; the
//! tool corpus has twice as many, shorter, conversations).

use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{prepare, PrepareOptions};
use ferrotune_data::record::Record;
use ferrotune_data::{coqa, fixtures, ChatTemplate, Tokenizer};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn main() {
    std::env::set_var("RAYON_NUM_THREADS", "2");
    let conversations: usize = std::env::var("BENCH_CONVERSATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(4000);
    let root = fixtures::repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let coqa_data = tmp.path().join("coqa.jsonl");
    let mut stories = coqa::read(&root.join("data/samples/coqa/train.json")).unwrap();
    stories.extend(coqa::read(&root.join("data/samples/coqa/validation.json")).unwrap());
    write_lines(
        &coqa_data,
        (0..conversations).map(|i| {
            let mut s = stories[i % stories.len()].clone();
            s.story = format!("{} (Retold as version {i}.)", s.story);
            serde_json::json!({"messages": s.to_messages(coqa::DEFAULT_SYSTEM)}).to_string()
        }),
    );
    run("CoQA conversations", &coqa_data, &root.join("data/tests/fixtures/chatml_generation_exact.jinja"));

    let tool_data = tmp.path().join("tools.jsonl");
    let corpus = std::fs::read_to_string(root.join("data/tests/fixtures/tool_conversations.json")).unwrap();
    let corpus: Vec<serde_json::Value> = serde_json::from_str(&corpus).unwrap();
    write_lines(
        &tool_data,
        (0..2 * conversations).map(|i| {
            let row = corpus[i % corpus.len()].to_string();
            // Vary the text so no two rows are alike (the city names appear in content and arguments).
            row.replace("Paris", &format!("Paris {i}"))
                .replace("Rome", &format!("Rome {i}"))
                .replace("Lima", &format!("Lima {i}"))
        }),
    );
    run("tool-calling conversations", &tool_data, &root.join("data/tests/fixtures/qwen25_generation.jinja"));
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn run(label: &str, data: &Path, template: &Path) {
    let model = fixtures::ensure("smollm2-135m-instruct");
    let root = fixtures::repo_root();
    let conversations = std::fs::read_to_string(data).unwrap().lines().count();
    let encoder = Encoder::new(
        Tokenizer::from_dir(&model).unwrap(),
        Some(ChatTemplate::load(&model, template.to_str().unwrap()).unwrap()),
    )
    .unwrap();
    let opts = PrepareOptions {
        mask: MaskOptions { strategy: Strategy::Assistant, train_eot: true },
        max_seq_len: 4096,
        overlong: Overlong::Truncate,
        threads: 2,
    };

    // 1. ferrotune prepare.
    let t0 = Instant::now();
    let (header, _rows) = prepare(data, &encoder, &opts, &|_, _| {}).unwrap();
    let ours_s = t0.elapsed().as_secs_f64();
    let (tokens, trained) = (header.stats.tokens, header.stats.trained_tokens);

    // 2. The tokenizer alone on the rendered texts.
    let texts: Vec<String> = std::fs::read_to_string(data)
        .unwrap()
        .lines()
        .map(|l| match ferrotune_data::record::parse_line(l, false).unwrap() {
            Record::Messages(m) => encoder.template.as_ref().unwrap().render_spans(&m).unwrap().text,
            _ => unreachable!("the bench writes conversations"),
        })
        .collect();
    let t0 = Instant::now();
    let enc = encoder.tokenizer.inner.encode_batch(texts, false).unwrap();
    let tok_s = t0.elapsed().as_secs_f64();
    let tok_tokens: usize = enc.iter().map(|e| e.len()).sum();
    assert_eq!(tok_tokens, tokens, "tokenizer-only run saw other tokens");

    // 3. Python reference.
    let out = std::process::Command::new(fixtures::python())
        .arg(root.join("benches/prepare_reference.py"))
        .arg(&model)
        .arg(template)
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (py_tokens, py_trained, py_s) = (
        py["tokens"].as_u64().unwrap() as usize,
        py["trained"].as_u64().unwrap() as usize,
        py["seconds"].as_f64().unwrap(),
    );
    assert_eq!((py_tokens, py_trained), (tokens, trained), "the Python reference did different work");

    let rate = |n: usize, s: f64| n as f64 / s;
    println!(
        "{label}: prepare throughput, {conversations} conversations, {tokens} tokens ({trained} trained), 2 threads"
    );
    println!("  {:<44} {:>10} {:>14}", "", "seconds", "tokens/s");
    println!(
        "  {:<44} {:>10.2} {:>14.0}",
        "ferrotune prepare (render+tokenize+mask+pack)",
        ours_s,
        rate(tokens, ours_s)
    );
    println!("  {:<44} {:>10.2} {:>14.0}", "tokenizer encode_batch alone (Rust, rayon)", tok_s, rate(tokens, tok_s));
    println!("  {:<44} {:>10.2} {:>14.0}", "transformers reference (Python)", py_s, rate(tokens, py_s));
    println!("  ferrotune / transformers reference: {:.2}x", py_s / ours_s);
    println!("  ferrotune / tokenizer alone:        {:.0}% (target >= 80%)", 100.0 * tok_s / ours_s);
}

//! A seeded fuzzer over what `check`, `preview` and `prepare` do with a line: valid rows of every format
//! (conversations with tools, calls, results, reasoning, parts; prompt/completion; text; pre-tokenized)
//! mutated structurally (values swapped for other JSON types, huge or deeply nested ones, keys dropped
//! or added, messages duplicated, reordered or multiplied) and textually (bytes flipped, cut, escapes
//! and control characters inserted). Every line goes through `check_file`, and every line that
//! validates through encoding, every masking strategy and the preview view under two templates
//! (SmolLM2's own and the built-in tool-aware `llama31`), then one `prepare` of them all. Nothing may
//! panic, and the process's peak memory stays bounded. Seed and count: FUZZ_SEED, FUZZ_LINES.

use ferrotune_data::check::{check_file, CheckOptions};
use ferrotune_data::encode::Encoder;
use ferrotune_data::loader::SplitMix64;
use ferrotune_data::mask::{trained, MaskOptions, Strategy};
use ferrotune_data::record::{validate, Record};
use ferrotune_data::{fixtures, ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn seeds() -> Vec<Value> {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tool_conversations.json");
    let mut rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(corpus).unwrap()).unwrap();
    rows.extend([
        json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 1}]}),
        json!({"prompt": "2+2=", "completion": "4"}),
        json!({"text": "once upon a time"}),
        json!({"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 0], "labels": [-100, 2, 3, -100]}),
    ]);
    rows
}

fn random_value(rng: &mut SplitMix64, depth: usize) -> Value {
    match rng.below(if depth > 3 { 6 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next_u64() as i64),
        3 => json!(-0.0),
        4 => json!(
            [
                "",
                "user",
                "assistant",
                "tool",
                "system",
                "<|im_start|>",
                "<|begin_of_text|>",
                "\u{FEFF}",
                "\u{10FFFF}",
                "\u{F0001}"
            ][rng.below(10)]
        ),
        5 => json!("x".repeat(rng.below(3) * 5000)),
        6 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        7 => {
            let keys = [
                "role",
                "content",
                "type",
                "text",
                "function",
                "name",
                "arguments",
                "id",
                "tool_calls",
                "tool_call_id",
            ];
            Value::Object(
                (0..rng.below(4))
                    .map(|_| (keys[rng.below(keys.len())].to_string(), random_value(rng, depth + 1)))
                    .collect(),
            )
        }
        _ => {
            // Deep nesting, past serde_json's recursion limit now and then.
            let mut v = json!(1);
            for _ in 0..rng.below(200) {
                v = json!([v]);
            }
            v
        }
    }
}

/// One structural mutation somewhere in `v`.
fn mutate(v: &mut Value, rng: &mut SplitMix64) {
    match v {
        Value::Object(o) if !o.is_empty() && rng.below(3) > 0 => {
            let k = o.keys().nth(rng.below(o.len())).unwrap().clone();
            match rng.below(4) {
                0 => {
                    o.remove(&k);
                }
                1 => {
                    o.insert(k, random_value(rng, 0));
                }
                2 => {
                    o.insert(
                        ["weight", "tools", "reasoning", "extra", "name"][rng.below(5)].into(),
                        random_value(rng, 0),
                    );
                }
                _ => mutate(o.get_mut(&k).unwrap(), rng),
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(3) > 0 => {
            let i = rng.below(a.len());
            match rng.below(5) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                }
                2 => {
                    let j = rng.below(a.len());
                    a.swap(i, j)
                }
                3 => {
                    // Many messages: the linear path.
                    let x = a[i].clone();
                    for _ in 0..rng.below(400) {
                        a.push(x.clone());
                    }
                }
                _ => mutate(&mut a[i], rng),
            }
        }
        other => *other = random_value(rng, 0),
    }
}

/// A textual mutation of a line.
fn garble(line: &str, rng: &mut SplitMix64) -> Vec<u8> {
    let mut b = line.as_bytes().to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len().max(1));
        match rng.below(6) {
            0 => b.truncate(at),
            1 if !b.is_empty() => {
                let (i, bit) = (at.min(b.len() - 1), rng.below(8));
                b[i] ^= 1 << bit
            }
            2 => {
                let junk: [&[u8]; 6] = [b"\\ud800", b"\\udc00x", b"\r", b"\xef\xbb\xbf", b"\xff", b"\x00"];
                b.splice(at..at, junk[rng.below(6)].iter().copied()).for_each(drop)
            }
            3 => b.splice(at..at, b"{\"role\": \"tool\"}".iter().copied()).for_each(drop),
            _ => {}
        }
    }
    b.retain(|&c| c != b'\n');
    b
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

#[test]
fn fuzzed_lines_never_panic_and_memory_stays_bounded() {
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261202);
    let n: usize = std::env::var("FUZZ_LINES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let mut rng = SplitMix64(seed);
    let seeds = seeds();
    let mut lines: Vec<Vec<u8>> = vec![];
    for _ in 0..n {
        let mut v = seeds[rng.below(seeds.len())].clone();
        for _ in 0..rng.below(3) {
            mutate(&mut v, &mut rng);
        }
        let text = v.to_string();
        lines.push(if rng.below(4) == 0 { garble(&text, &mut rng) } else { text.into_bytes() });
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("fuzz.jsonl");
    std::fs::write(&file, lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect::<Vec<u8>>()).unwrap();
    let report = catch_unwind(|| check_file(&file, &CheckOptions { strict: true, max_problems: 10 }, None))
        .unwrap_or_else(|_| panic!("check panicked (FUZZ_SEED={seed})"))
        .unwrap();
    assert_eq!(report.lines, n);
    let encoders: Vec<Encoder> = [("smollm2-135m-instruct", "auto"), ("llama3-tokenizer", "llama31")]
        .iter()
        .map(|(t, c)| {
            let dir = fixtures::ensure(t);
            Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::load(&dir, c).unwrap())).unwrap()
        })
        .collect();
    let (mut valid, mut encoded, mut conversations) = (0, 0, vec![]);
    for (k, line) in lines.iter().enumerate() {
        let Ok(text) = std::str::from_utf8(line) else { continue };
        let Ok(v) = serde_json::from_str::<Value>(text) else { continue };
        let (Some(record), _) = validate(&v, false) else { continue };
        valid += 1;
        for enc in &encoders {
            let ok = catch_unwind(AssertUnwindSafe(|| {
                let Ok(e) = enc.encode(&record) else { return false };
                for s in Strategy::ALL {
                    let flags = trained(&record, &e, MaskOptions { strategy: s, train_eot: true }, false);
                    assert_eq!(flags.len(), e.ids.len());
                }
                ferrotune_data::preview::view(enc, &record, MaskOptions::default()).is_ok()
            }))
            .unwrap_or_else(|_| {
                panic!("line {} panicked in encode/mask/preview (FUZZ_SEED={seed}): {text:.300}", k + 1)
            });
            encoded += usize::from(ok);
        }
        if matches!(record, Record::Messages(_)) {
            conversations.push(text.to_owned());
        }
    }
    // And prepare over the conversations that validated (it may refuse one, but must not panic).
    let conv = tmp.path().join("conv.jsonl");
    std::fs::write(&conv, conversations.join("\n") + "\n").unwrap();
    let opts = ferrotune_data::prepare::PrepareOptions::new(
        MaskOptions::default(),
        512,
        ferrotune_data::pack::Overlong::Truncate,
    );
    let _ = catch_unwind(AssertUnwindSafe(|| ferrotune_data::prepare::prepare(&conv, &encoders[0], &opts, &|_, _| {})))
        .unwrap_or_else(|_| panic!("prepare panicked (FUZZ_SEED={seed})"));
    let peak = peak_rss_kb();
    println!(
        "{n} lines: {} problems, {valid} valid, {encoded} encodings, peak RSS {} MB",
        report.problems_total,
        peak / 1024
    );
    assert!(valid > n / 10 && report.problems_total > n / 10, "the fuzzer is not exercising both sides");
    assert!(peak < 3 << 20, "peak RSS {} MB", peak / 1024);
}

//! The new data formats through the real binaries: a pre-tokenized Parquet file written by pyarrow
//! trains to the same losses as the same rows given as JSONL (same ids, attention masks and labels),
//! `check` validates it (and, with a model, the vocabulary), a tool-calling file checks and prepares,
//! `train_on_inputs = "auto"` is accepted, and `check` exits 2 on a file it cannot read and 1 on a file
//! with problems, printing JSON in both cases under --json.

mod common;

use common::{job, ok};
use ferrotune_data::fixtures;
use std::process::Command;

fn ferrotune(args: &[&str]) -> std::process::Output {
    common::ferrotune().args(args).output().unwrap()
}

/// Writes `rows` (JSON objects of input_ids / attention_mask / labels) as Parquet with pyarrow.
fn write_parquet(rows_jsonl: &std::path::Path, out: &std::path::Path) {
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
rows = [json.loads(l) for l in open(sys.argv[1])]
table = pa.table({k: pa.array([r[k] for r in rows], type=pa.list_(pa.int64())) for k in ("input_ids", "attention_mask", "labels")})
pq.write_table(table, sys.argv[2], compression="snappy")
"#;
    let o = Command::new(fixtures::python()).args(["-c", script]).arg(rows_jsonl).arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn parquet_written_by_pyarrow_trains_like_the_same_rows_as_jsonl() {
    let j = job(&[]);
    let eot = 128009; // <|eot_id|> of the Llama 3 tokenizer
                      // 16 rows of varied length, right-padded to 24, labels -100 on a prompt part and on padding.
    let rows: Vec<String> = (0..16)
        .map(|i| {
            let n = 8 + i % 9;
            let ids: Vec<i64> = (0..n).map(|k| 100 + ((i * 37 + k * 11) % 900) as i64).chain([eot]).collect();
            let pad = 24 - ids.len();
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(k, &x)| if k < 3 { -100 } else { x })
                .chain(std::iter::repeat_n(-100, pad))
                .collect();
            let mask: Vec<i64> = std::iter::repeat_n(1, ids.len()).chain(std::iter::repeat_n(0, pad)).collect();
            let ids: Vec<i64> = ids.into_iter().chain(std::iter::repeat_n(0, pad)).collect();
            serde_json::json!({"input_ids": ids, "attention_mask": mask, "labels": labels}).to_string()
        })
        .collect();
    let jsonl = j.dir.path().join("tokens.jsonl");
    std::fs::write(&jsonl, rows.join("\n") + "\n").unwrap();
    let parquet = j.dir.path().join("tokens.parquet");
    write_parquet(&jsonl, &parquet);

    let o = ferrotune(&["check", parquet.to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(o.status.success(), "{report}");
    assert_eq!(
        (report["valid_rows"].as_u64(), report["format"].as_str(), report["unit"].as_str()),
        (Some(16), Some("tokens"), Some("row"))
    );

    let train = |data: &std::path::Path, out: &str| {
        let mut args = j.train_args(out);
        args.extend(["--set".into(), format!("data.train={}", data.display())]);
        ok(common::ferrotune().args(&args).output().unwrap());
        j.run_dir(out)
    };
    let a = train(&jsonl, "from-jsonl");
    let b = train(&parquet, "from-parquet");
    let la = common::losses(&a);
    assert!(la.iter().all(|l| l.is_finite() && *l > 0.0), "{la:?}");
    common::same_losses(&a, &b);

    // An id outside the vocabulary, found only when a model is given.
    let bad = j.dir.path().join("bad.jsonl");
    std::fs::write(&bad, r#"{"input_ids": [1, 2, 999999, 128009]}"#.to_owned() + "\n").unwrap();
    let bad_pq = j.dir.path().join("bad.parquet");
    let script = "import pyarrow as pa, pyarrow.parquet as pq, sys; pq.write_table(pa.table({'input_ids': [[1, 2, 999999, 128009]]}), sys.argv[1])";
    assert!(Command::new(fixtures::python()).args(["-c", script]).arg(&bad_pq).status().unwrap().success());
    assert!(ferrotune(&["check", bad_pq.to_str().unwrap()]).status.success());
    let model = fixtures::ensure("tiny-llama");
    let o = ferrotune(&["check", bad_pq.to_str().unwrap(), "--model", model.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("row 1: `input_ids`[2] = 999999 is outside the model's vocabulary of 128256"), "{out}");
}

#[test]
fn tool_calling_data_checks_prepares_and_trains_with_train_on_inputs_auto() {
    let j = job(&["data.train_on_inputs=auto", "model.template=llama31", "data.max_seq_len=1024"]);
    let corpus: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures::repo_root().join("data/tests/fixtures/tool_conversations.json")).unwrap(),
    )
    .unwrap();
    let data = j.dir.path().join("tools.jsonl");
    let lines: Vec<String> = corpus.iter().cycle().take(16).map(|r| r.to_string()).collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let data_s = data.to_str().unwrap();
    let o = ferrotune(&["check", data_s, "--strict"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}");
    assert!(out.contains("16 lines, 16 valid rows") && out.trim_end().ends_with("OK"), "{out}");
    let model = fixtures::ensure("tiny-llama");
    let o = ferrotune(&[
        "preview",
        data_s,
        "--model",
        model.to_str().unwrap(),
        "--template",
        "llama31",
        "--rows",
        "1",
        "--color",
        "never",
    ]);
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(shown.contains(r#"⟦{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>⟧"#), "{shown}");
    let mut args = j.train_args("out");
    args.extend(["--set".into(), format!("data.train={data_s}")]);
    ok(common::ferrotune().args(&args).output().unwrap());
    // The template it trained with is exported beside the adapter.
    let exported = std::fs::read_to_string(j.run_dir("out").join("adapter/chat_template.jinja")).unwrap();
    assert_eq!(exported, ferrotune_data::template::LLAMA31);
    let plan = std::fs::read_to_string(j.run_dir("out").join("config.toml")).unwrap();
    assert!(plan.contains("train_on_inputs = \"auto\""), "{plan}");
    // Anything else is named with what is allowed.
    let bad = job(&["data.train_on_inputs=sometimes"]);
    let o = common::ferrotune().args(bad.train_args("out")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train_on_inputs") && err.contains("true, false or \"auto\""), "{err}");
}

#[test]
fn check_exit_status_separates_unreadable_files_from_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.jsonl");
    let o = ferrotune(&["check", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = ferrotune(&["check", missing.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["error"].as_str().unwrap().contains("nope.jsonl"), "{j}");
    // So is a model directory that cannot be read.
    let bad_model = tmp.path().join("no-model");
    let o = ferrotune(&["check", missing.to_str().unwrap(), "--model", bad_model.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("no-model"));
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": 1}\n").unwrap();
    let o = ferrotune(&["check", bad.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("1 line, 0 valid rows") && out.contains("FAILED (1 problem)"), "{out}");
    let o = ferrotune(&["check", bad.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["problems_total"], 1);
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = String::from_utf8_lossy(&ferrotune(&["check", empty.to_str().unwrap()]).stdout).into_owned();
    assert!(out.contains("  the file is empty (no rows) [empty_file]") && !out.contains("line 0"), "{out}");
}

#[test]
fn the_readme_conversation_example_passes_check_strict() {
    let readme = std::fs::read_to_string(fixtures::repo_root().join("README.md")).unwrap();
    let data = &readme[readme.find("## Data").unwrap()..];
    let start = data.find("```json\n").unwrap() + 8;
    let block = &data[start..start + data[start..].find("```").unwrap()];
    let row: serde_json::Value = serde_json::from_str(block).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("example.jsonl");
    std::fs::write(&file, format!("{row}\n")).unwrap();
    let o = ferrotune(&["check", file.to_str().unwrap(), "--strict"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let model = fixtures::ensure("tiny-llama");
    let o = ferrotune(&[
        "preview",
        file.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--template",
        "llama31",
        "--color",
        "never",
    ]);
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(shown.contains(r#"⟦{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>⟧"#), "{shown}");
    assert!(shown.contains("⟦4 °C and snowing in Oslo.<|eot_id|>⟧"), "{shown}");
}

#[test]
fn tool_conversations_in_parquet_read_like_jsonl() {
    // pyarrow gives every message the keys of all messages (null where absent) and every tool schema
    // the properties of all tools; arguments all as JSON text (pyarrow needs one type per column), and
    // in a second file `tools` as a JSON string, as Hugging Face datasets often store it.
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
rows = json.load(open(sys.argv[1]))
rows = [r for r in rows if all(isinstance(m.get("content"), (str, type(None))) for m in r["messages"])]
for r in rows:
    r.setdefault("tools", [])
    for m in r["messages"]:
        for c in m.get("tool_calls", []):
            if not isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
pq.write_table(pa.Table.from_pylist(rows), sys.argv[3])
for r in rows:
    r["tools"] = json.dumps(r["tools"])
pq.write_table(pa.Table.from_pylist(rows), sys.argv[4])
"#;
    let corpus = fixtures::repo_root().join("data/tests/fixtures/tool_conversations.json");
    let (jsonl, pq, pq_text) = (tmp.path().join("t.jsonl"), tmp.path().join("t.parquet"), tmp.path().join("s.parquet"));
    let o = Command::new(fixtures::python())
        .args(["-c", script])
        .arg(&corpus)
        .args([&jsonl, &pq, &pq_text])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = fixtures::ensure("tiny-llama");
    let summary = |data: &std::path::Path| -> String {
        let o = ferrotune(&["check", data.to_str().unwrap(), "--strict"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let out = tmp.path().join(format!("{}.ftcache", data.file_name().unwrap().to_string_lossy()));
        let args = [
            "prepare",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--template",
            "llama31",
            "--max-seq-len",
            "2048",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = ferrotune(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // "N samples (...) in R rows of L\n  T tokens, K trained (...)": everything but the timing.
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.lines().skip(1).map(|l| l.split(", packing").next().unwrap().to_owned()).collect::<Vec<_>>().join("\n")
    };
    let want = summary(&jsonl);
    assert!(want.contains("7 samples"), "{want}");
    assert_eq!(summary(&pq), want);
    assert_eq!(summary(&pq_text), want);
}

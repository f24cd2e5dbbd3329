//! The data pipeline end to end on real tokenizers: golden renderings of what each masking strategy
//! trains (checked by eye once, then pinned), token kinds, weights, formats, prepare -> cache -> loader
//! (determinism, rank shares, resume, stale caches), and CoQA conversion from all its input layouts.

use ferrotune_data::cache::TokenCache;
use ferrotune_data::encode::{Encoder, Kind};
use ferrotune_data::fixtures;
use ferrotune_data::loader::{Loader, LoaderState};
use ferrotune_data::mask::{MaskOptions, Strategy};
use ferrotune_data::pack::Overlong;
use ferrotune_data::prepare::{open_or_prepare, prepare_to_file, PrepareOptions};
use ferrotune_data::preview::{marked, view, Marking};
use ferrotune_data::record::{parse_line, Record};
use ferrotune_data::{ChatTemplate, Tokenizer};
use std::path::{Path, PathBuf};

fn smollm2() -> Encoder {
    let dir = fixtures::ensure("smollm2-135m-instruct");
    Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::from_dir(&dir).unwrap())).unwrap()
}

fn llama3() -> Encoder {
    let dir = fixtures::ensure("llama3-tokenizer");
    Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::load(&dir, "llama3").unwrap())).unwrap()
}

const CONV: &str = r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}"#;

fn show(enc: &Encoder, line: &str, strategy: Strategy) -> String {
    let record = parse_line(line, false).unwrap();
    marked(enc, &record, MaskOptions { strategy, train_eot: true }, Marking::Brackets).unwrap()
}

#[test]
fn golden_trained_spans_per_strategy() {
    // SmolLM2's template injects its default system prompt (a preamble, never trained except by `all`).
    let sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    let e = smollm2();
    let goldens = [
        (Strategy::All, format!("<|im_start|>⟦{}<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n⟧", &sys[12..])),
        (Strategy::Assistant, format!("{sys}<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n⟦Blue.<|im_end|>⟧\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n⟦Red.<|im_end|>⟧\n")),
        (Strategy::Boilerplate, format!("{sys}<|im_start|>user\n⟦Name a colour.⟧<|im_end|>\n<|im_start|>assistant\n⟦Blue.<|im_end|>⟧\n<|im_start|>user\n⟦Another?⟧<|im_end|>\n<|im_start|>assistant\n⟦Red.<|im_end|>⟧\n")),
        (Strategy::Last, format!("{sys}<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n⟦Red.<|im_end|>⟧\n")),
    ];
    for (s, want) in &goldens {
        assert_eq!(&show(&e, CONV, *s), want, "smollm2 {s}");
    }
    assert_eq!(show(&e, CONV, Strategy::Auto), goldens[1].1, "auto = assistant for conversations");
    let l = llama3();
    let h = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
    let (u, a) = (h("user"), h("assistant"));
    let goldens = [
        (Strategy::All, format!("<|begin_of_text|>⟦{u}Name a colour.<|eot_id|>{a}Blue.<|eot_id|>{u}Another?<|eot_id|>{a}Red.<|eot_id|>⟧")),
        (Strategy::Assistant, format!("<|begin_of_text|>{u}Name a colour.<|eot_id|>{a}⟦Blue.<|eot_id|>⟧{u}Another?<|eot_id|>{a}⟦Red.<|eot_id|>⟧")),
        (Strategy::Boilerplate, format!("<|begin_of_text|>{u}⟦Name a colour.⟧<|eot_id|>{a}⟦Blue.<|eot_id|>⟧{u}⟦Another?⟧<|eot_id|>{a}⟦Red.<|eot_id|>⟧")),
        (Strategy::Last, format!("<|begin_of_text|>{u}Name a colour.<|eot_id|>{a}Blue.<|eot_id|>{u}Another?<|eot_id|>{a}⟦Red.<|eot_id|>⟧")),
    ];
    for (s, want) in &goldens {
        assert_eq!(&show(&l, CONV, *s), want, "llama3 {s}");
    }
}

#[test]
fn token_kinds_name_bos_preamble_headers_content_and_end_of_turn() {
    let e = smollm2();
    let v = view(&e, &parse_line(CONV, false).unwrap(), MaskOptions::default()).unwrap();
    let kinds: Vec<Kind> = v.tags.iter().map(|t| t.kind).collect();
    // The injected system prompt is 21 tokens (transformers' count, see check_rules); its closing "\n"
    // belongs to the next header, which is "\n<|im_start|>user\n" after every end-of-turn token.
    assert!(kinds[..20].iter().all(|&k| k == Kind::Preamble), "{kinds:?}");
    assert_eq!(&kinds[20..25], &[Kind::Header, Kind::Header, Kind::Header, Kind::Header, Kind::Content]);
    assert_eq!(v.tokens[v.tags.iter().position(|t| t.kind == Kind::EndOfTurn).unwrap()], "<|im_end|>");
    let l = llama3();
    let v = view(&l, &parse_line(CONV, false).unwrap(), MaskOptions::default()).unwrap();
    assert_eq!((v.tags[0].kind, v.tokens[0].as_str()), (Kind::Bos, "<|begin_of_text|>"));
    assert_eq!(v.tags[1].kind, Kind::Header);
    assert!(v.tags.iter().filter(|t| t.kind == Kind::EndOfTurn).count() == 4);
}

#[test]
fn weights_override_the_strategy_and_auto_follows_the_format() {
    let e = smollm2();
    let weighted = r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue.", "weight": 0}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}"#;
    let out = show(&e, weighted, Strategy::Auto);
    assert!(out.contains("assistant\nBlue.<|im_end|>") && out.contains("⟦Red.<|im_end|>⟧"), "{out}");
    let out = show(&e, weighted, Strategy::All);
    assert!(out.contains("⟧Blue.<|im_end|>⟦"), "weight 0 masks that message even under `all`: {out}");
    let user_weighted =
        r#"{"messages": [{"role": "user", "content": "Q", "weight": 1}, {"role": "assistant", "content": "A"}]}"#;
    assert!(show(&e, user_weighted, Strategy::Last).contains("⟦Q<|im_end|>⟧"));
    // Prompt/completion: auto trains the completion and EOS; text: auto trains all but BOS. The
    // Llama 3 base tokenizer's eos_token is <|end_of_text|> (its tokenizer_config.json).
    let l = llama3();
    assert_eq!(
        show(&l, r#"{"prompt": "2+2=", "completion": " 4"}"#, Strategy::Auto),
        "<|begin_of_text|>2+2=⟦ 4<|end_of_text|>⟧"
    );
    assert_eq!(show(&l, r#"{"text": "Hello world"}"#, Strategy::Auto), "<|begin_of_text|>⟦Hello world<|end_of_text|>⟧");
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn corpus(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let turns: Vec<String> = (0..1 + i % 4)
                .map(|t| format!(r#"{{"role": "user", "content": "Question {i}.{t}: {}"}}, {{"role": "assistant", "content": "Answer {i}.{t}"}}"#, "more ".repeat(i % 7)))
                .collect();
            format!(r#"{{"messages": [{}]}}"#, turns.join(", "))
        })
        .collect()
}

fn opts(strategy: Strategy, max_seq_len: usize) -> PrepareOptions {
    PrepareOptions {
        mask: MaskOptions { strategy, train_eot: true },
        max_seq_len,
        overlong: Overlong::Truncate,
        threads: 2,
    }
}

#[test]
fn prepare_is_deterministic_and_the_cache_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_lines(tmp.path(), "d.jsonl", &corpus(60));
    let e = smollm2();
    let (a, b) = (tmp.path().join("a.ftcache"), tmp.path().join("b.ftcache"));
    let ha = prepare_to_file(&data, &e, &opts(Strategy::Assistant, 256), &a, &|_, _| {}).unwrap();
    let mut one_thread = opts(Strategy::Assistant, 256);
    one_thread.threads = 1;
    prepare_to_file(&data, &e, &one_thread, &b, &|_, _| {}).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "thread count changed the cache");
    let cache = TokenCache::open(&a).unwrap();
    assert_eq!(cache.rows(), ha.rows);
    assert_eq!(ha.stats.samples, 60);
    let mut docs = 0;
    let mut trained = 0;
    for r in 0..cache.rows() {
        let lens = cache.doc_lens(r);
        docs += lens.len();
        assert!(lens.iter().sum::<u32>() as usize <= 256);
        trained += cache.labels(r).iter().filter(|&&l| l != -100).count();
        // Labels are next tokens within each document.
        let (ids, labels) = (cache.ids(r), cache.labels(r));
        let mut start = 0usize;
        for &len in lens {
            for t in start..start + len as usize {
                if labels[t] != -100 {
                    assert!(t + 1 < start + len as usize);
                    assert_eq!(labels[t] as u32, ids[t + 1]);
                }
            }
            start += len as usize;
        }
    }
    assert_eq!((docs, trained), (60, ha.stats.trained_tokens));
}

#[test]
fn stale_caches_are_refused_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_lines(tmp.path(), "d.jsonl", &corpus(10));
    let e = smollm2();
    let out = tmp.path().join("c.ftcache");
    open_or_prepare(&data, &e, &opts(Strategy::Assistant, 256), &out, &|_, _| {}).unwrap();
    let err = open_or_prepare(&data, &e, &opts(Strategy::Last, 256), &out, &|_, _| {}).err().unwrap().to_string();
    assert!(
        err.contains("stale token cache") && err.contains("masking") && err.contains("re-run `ferrotune prepare`"),
        "{err}"
    );
    let err = open_or_prepare(&data, &e, &opts(Strategy::Assistant, 128), &out, &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("max_seq_len 256 -> 128"), "{err}");
    write_lines(tmp.path(), "d.jsonl", &corpus(11));
    let err = open_or_prepare(&data, &e, &opts(Strategy::Assistant, 256), &out, &|_, _| {}).err().unwrap().to_string();
    assert!(err.contains("the data file changed"), "{err}");
    std::fs::write(&out, b"garbage").unwrap();
    assert!(TokenCache::open(&out).err().unwrap().to_string().contains("bad magic"));
}

#[test]
fn rows_without_trained_tokens_are_dropped_and_counted_and_none_at_all_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = corpus(5);
    lines.push(
        r#"{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0}]}"#
            .into(),
    );
    let data = write_lines(tmp.path(), "d.jsonl", &lines);
    let h =
        prepare_to_file(&data, &smollm2(), &opts(Strategy::Assistant, 256), &tmp.path().join("c"), &|_, _| {}).unwrap();
    assert_eq!((h.stats.samples, h.dropped_no_trained), (5, 1));
    let only = write_lines(tmp.path(), "none.jsonl", &[lines[5].clone()]);
    let err = prepare_to_file(&only, &smollm2(), &opts(Strategy::Assistant, 256), &tmp.path().join("n"), &|_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("no row has a trained token"), "{err}");
}

#[test]
fn loader_shares_are_disjoint_equal_deterministic_and_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_lines(tmp.path(), "d.jsonl", &corpus(90));
    let out = tmp.path().join("c.ftcache");
    prepare_to_file(&data, &smollm2(), &opts(Strategy::Assistant, 128), &out, &|_, _| {}).unwrap();
    let cache = TokenCache::open(&out).unwrap();
    let rows = cache.rows();
    assert!(rows > 6, "{rows}");
    let world = 3;
    let mut loaders: Vec<Loader> = (0..world).map(|r| Loader::new(&cache, r, world, 7, 1).unwrap()).collect();
    let per_rank = loaders[0].rows_per_rank();
    let mut seen = vec![];
    for l in loaders.iter_mut() {
        let share: Vec<usize> = (0..per_rank).map(|_| l.next_batch().row_indices[0]).collect();
        seen.push(share);
    }
    let all: std::collections::BTreeSet<usize> = seen.iter().flatten().copied().collect();
    assert_eq!(all.len(), rows, "every row is read in an epoch");
    // Equal shares; only the wrap-around padding (fewer than `world` rows) is read twice.
    assert!(seen.iter().all(|s| s.len() == per_rank));
    let total = seen.iter().map(Vec::len).sum::<usize>();
    assert!(total >= rows && total - rows < world, "shares overlap beyond the padding: {total} reads of {rows} rows");
    // Same seed, same order; another seed, another order.
    let mut again = Loader::new(&cache, 0, world, 7, 1).unwrap();
    assert_eq!((0..per_rank).map(|_| again.next_batch().row_indices[0]).collect::<Vec<_>>(), seen[0]);
    let mut other = Loader::new(&cache, 0, world, 8, 1).unwrap();
    assert_ne!((0..per_rank).map(|_| other.next_batch().row_indices[0]).collect::<Vec<_>>(), seen[0]);
    // Save mid-epoch-2, restore in a fresh loader: the same batches follow.
    let mut a = Loader::new(&cache, 1, world, 7, 2).unwrap();
    for _ in 0..per_rank {
        a.next_batch();
    }
    let state = a.state();
    assert!(state.epoch >= 1);
    let next: Vec<_> = (0..5).map(|_| a.next_batch()).collect();
    let mut b = Loader::new(&cache, 1, world, 7, 2).unwrap();
    b.restore(state);
    assert_eq!(b.state(), state);
    for n in next {
        assert_eq!(b.next_batch(), n);
    }
    assert_ne!(state, LoaderState::default());
    // Position and document ids restart per document; padding is a document of its own.
    let batch = Loader::new(&cache, 0, 1, 0, 1).unwrap().next_batch();
    let lens = cache.doc_lens(batch.row_indices[0]);
    assert_eq!(batch.position_ids[..lens[0] as usize].last().copied(), Some(lens[0] as i64 - 1));
    if lens.len() > 1 {
        assert_eq!((batch.position_ids[lens[0] as usize], batch.doc_ids[lens[0] as usize]), (0, 1));
    }
}

#[test]
fn coqa_official_jsonl_and_parquet_inputs_convert_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let official = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/coqa/validation.json");
    let stories = ferrotune_data::coqa::read(&official).unwrap();
    assert_eq!(stories.len(), 5);
    assert_eq!(
        stories[0].turns[0],
        ("Where did Hugo open a tea shop?".to_string(), "in an old railway station".to_string())
    );
    // The Hugging Face export layout, written by pyarrow and by json.
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
data = json.load(open(sys.argv[1]))["data"]
rows = [{"source": d["source"], "story": d["story"], "questions": [q["input_text"] for q in d["questions"]],
         "answers": {"input_text": [a["input_text"] for a in d["answers"]], "answer_start": [0] * len(d["answers"]),
                     "answer_end": [1] * len(d["answers"])}} for d in data]
pq.write_table(pa.Table.from_pylist(rows), sys.argv[2])
with open(sys.argv[3], "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
"#;
    let (pq, jl) = (tmp.path().join("v.parquet"), tmp.path().join("v.jsonl"));
    let o = std::process::Command::new(fixtures::python())
        .args(["-c", script])
        .arg(&official)
        .arg(&pq)
        .arg(&jl)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for p in [&pq, &jl] {
        let other = ferrotune_data::coqa::read(p).unwrap();
        assert_eq!(
            other.iter().map(|s| (&s.story, &s.turns)).collect::<Vec<_>>(),
            stories.iter().map(|s| (&s.story, &s.turns)).collect::<Vec<_>>(),
            "{}",
            p.display()
        );
    }
    let out = tmp.path().join("conv.jsonl");
    let (n, turns) = ferrotune_data::coqa::convert(&official, &out, ferrotune_data::coqa::DEFAULT_SYSTEM).unwrap();
    assert_eq!((n, turns), (5, 33));
    let first = std::fs::read_to_string(&out).unwrap().lines().next().unwrap().to_owned();
    let Record::Messages(m) = parse_line(&first, true).unwrap() else { panic!() };
    assert!(m[0].content.starts_with("Read the story and extract answers for the questions.\nStory: Hugo opened"));
    assert_eq!(
        (m.len(), m[1].content.as_str(), m[2].content.as_str()),
        (13, "Where did Hugo open a tea shop?", "in an old railway station")
    );
}

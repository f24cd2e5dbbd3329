//! Chat templates, tokens and assistant masks against transformers (`tests/oracle.py chat`): the rendered
//! text and token ids of `apply_chat_template(tokenize=True)` for the built-in Llama 3 template (with the
//! Llama 3 tokenizer) and for SmolLM2's own template, over a corpus with unicode, an empty system
//! prompt, many turns, no system message, padded contents and template-like text; and our `assistant`
//! mask against `return_assistant_tokens_mask=True` under templates with `{% generation %}` blocks,
//! both when our mask comes from those blocks and when it comes from our own tags on the equivalent
//! untagged template.

use ferrotune_data::encode::Encoder;
use ferrotune_data::mask::{trained, MaskOptions, Strategy};
use ferrotune_data::record::{ChatMessage, Conversation, Record};
use ferrotune_data::{fixtures, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn corpus_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conversations.json")
}

fn corpus() -> Vec<Conversation> {
    let plain: Vec<Vec<ChatMessage>> = serde_json::from_str(&std::fs::read_to_string(corpus_path()).unwrap()).unwrap();
    plain.into_iter().map(Conversation::from).collect()
}

fn fixture_template(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// transformers' renderings of the corpus.
fn reference(tokenizer_dir: &Path, template: &str) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.json");
    let o = std::process::Command::new(fixtures::python())
        .arg(fixtures::repo_root().join("tests/oracle.py"))
        .args([
            "chat",
            tokenizer_dir.to_str().unwrap(),
            template,
            corpus_path().to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Renders and encodes the corpus with `template` and compares text and ids with transformers.
fn check_text_and_ids(tokenizer_dir: &Path, choice: &str, oracle_template: &str) -> (Encoder, Vec<Value>) {
    let template = ChatTemplate::load(tokenizer_dir, choice).unwrap();
    let enc = Encoder::new(Tokenizer::from_dir(tokenizer_dir).unwrap(), Some(template)).unwrap();
    let refs = reference(tokenizer_dir, oracle_template);
    for (i, (conv, r)) in corpus().iter().zip(&refs).enumerate() {
        let rendered = enc.template.as_ref().unwrap().render_spans(conv).unwrap();
        assert_eq!(rendered.text, r["text"].as_str().unwrap(), "conversation {i}: text differs");
        let ours = enc.encode(&Record::Messages(conv.clone())).unwrap();
        assert_eq!(ours.ids, ids_of(&r["ids"]), "conversation {i}: ids differ");
    }
    (enc, refs)
}

fn write_template(src: &str) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.jinja");
    std::fs::write(&p, src).unwrap();
    let s = p.to_str().unwrap().to_owned();
    (tmp, s)
}

#[test]
fn llama3_builtin_template_equals_transformers() {
    let dir = fixtures::ensure("llama3-tokenizer");
    let (_t, path) = write_template(ferrotune_data::template::LLAMA3);
    check_text_and_ids(&dir, "llama3", &path);
}

#[test]
fn smollm2_own_template_equals_transformers() {
    let dir = fixtures::ensure("smollm2-135m-instruct");
    check_text_and_ids(&dir, "auto", "own");
}

/// Our assistant mask (unshifted trained flags) for every corpus conversation.
fn assistant_masks(enc: &Encoder) -> Vec<Vec<bool>> {
    let generation = enc.template.as_ref().unwrap().has_generation;
    let opts = MaskOptions { strategy: Strategy::Assistant, train_eot: true };
    corpus()
        .into_iter()
        .map(|conv| {
            let record = Record::Messages(conv);
            let e = enc.encode(&record).unwrap();
            trained(&record, &e, opts, generation)
        })
        .collect()
}

fn hf_masks(refs: &[Value]) -> Vec<Vec<bool>> {
    refs.iter()
        .map(|r| r["assistant_masks"].as_array().unwrap().iter().map(|x| x.as_u64() == Some(1)).collect())
        .collect()
}

#[test]
fn generation_blocks_give_transformers_assistant_masks() {
    let dir = fixtures::ensure("smollm2-135m-instruct");
    let path = fixture_template("chatml_generation.jinja");
    let (enc, refs) = check_text_and_ids(&dir, path.to_str().unwrap(), path.to_str().unwrap());
    assert!(enc.template.as_ref().unwrap().has_generation);
    let ours = assistant_masks(&enc);
    let theirs = hf_masks(&refs);
    assert!(theirs.iter().flatten().any(|&m| m) && theirs.iter().flatten().any(|&m| !m));
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "conversation {i}: assistant mask differs from transformers'");
    }
}

#[test]
fn tag_based_assistant_masks_equal_transformers_generation_masks() {
    // Our tags on the untagged built-in templates must train exactly what the equivalent templates with
    // {% generation %} blocks (content + end-of-turn token) make transformers mark.
    for (tok, builtin, tagged) in [
        ("smollm2-135m-instruct", "chatml", "chatml_generation_exact.jinja"),
        ("llama3-tokenizer", "llama3", "llama3_generation.jinja"),
    ] {
        let dir = fixtures::ensure(tok);
        let tagged = fixture_template(tagged);
        let (enc, refs) = check_text_and_ids(&dir, builtin, tagged.to_str().unwrap());
        assert!(!enc.template.as_ref().unwrap().has_generation);
        for (i, (a, b)) in assistant_masks(&enc).iter().zip(&hf_masks(&refs)).enumerate() {
            assert_eq!(a, b, "{builtin}: conversation {i}: tag-based assistant mask differs from transformers'");
        }
    }
}

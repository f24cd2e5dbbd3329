//! The real `ferrotune` binary, end to end, started the way a user starts it: no LD_LIBRARY_PATH (the
//! binary finds libtorch through its run path), on the fixtures that scripts/setup builds.

use ferrotune_data::fixtures;
use std::process::{Command, Output};

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run ferrotune")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn help_documents_every_subcommand() {
    let o = ferrotune(&["--help"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    for sub in ["inspect", "generate"] {
        assert!(out.contains(sub), "{out}");
    }
    let (out, _) = text(&ferrotune(&["generate", "--help"]));
    for flag in ["--model", "--chat", "--system", "--max-new-tokens", "--dtype", "--device"] {
        assert!(out.contains(flag), "generate --help lacks {flag}: {out}");
    }
}

#[test]
fn inspect_reports_shards_and_parameters() {
    let dir = fixtures::ensure("smollm2-135m-instruct");
    let o = ferrotune(&["inspect", dir.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // 134515008 is the sum of the tensor sizes in the converted checkpoint, which equals transformers'
    // `model.num_parameters()` for SmolLM2-135M (tied embeddings counted once).
    assert!(out.contains("parameters   134515008 in the files"), "{out}");
    assert!(out.contains("shards       3 (index"), "{out}");
    assert!(out.contains("30 layers, hidden 576"), "{out}");
}

#[test]
fn generate_answers_through_the_chat_template() {
    let dir = fixtures::ensure("smollm2-135m-instruct");
    let o = ferrotune(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("assistant: The capital of France is Paris."), "{out}");
}

#[test]
fn errors_name_the_problem_and_exit_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ferrotune(&["generate", "--model", tmp.path().to_str().unwrap(), "--chat", "hi"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("no config.json") && err.contains(tmp.path().to_str().unwrap()), "{err}");
    let o = ferrotune(&["generate", "--model", "x", "--chat", "hi", "--dtype", "fp8"]);
    assert!(text(&o).1.contains("unknown dtype `fp8`"));
}

#[test]
fn front_binary_links_no_libtorch_and_worker_finds_it_by_run_path() {
    let needed = |bin: &str| {
        let o = Command::new("readelf").args(["-d", bin]).output().expect("readelf (binutils) is installed");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let front = needed(env!("CARGO_BIN_EXE_ferrotune"));
    assert!(!front.contains("libtorch") && !front.contains("libc10"), "{front}");
    let worker = needed(env!("CARGO_BIN_EXE_ferrotune-worker"));
    assert!(
        worker.contains("libtorch_cpu.so") && worker.contains("RUNPATH") && worker.contains("torch/lib"),
        "{worker}"
    );
}

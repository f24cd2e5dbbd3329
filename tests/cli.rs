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
    for sub in [
        "inspect", "generate", "train", "plan", "launch", "sweep", "report", "eval", "export", "check", "preview",
        "prepare", "convert",
    ] {
        assert!(out.contains(sub), "{out}");
    }
    let (out, _) = text(&ferrotune(&["launch", "--help"]));
    for flag in [
        "--nproc-per-node",
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--max-restarts",
        "--run-id",
        "--log-dir",
    ] {
        assert!(out.contains(flag), "launch --help lacks {flag}: {out}");
    }
    let (out, _) = text(&ferrotune(&["sweep", "--help"]));
    for flag in ["--parallel", "--dry-run", "--set"] {
        assert!(out.contains(flag), "sweep --help lacks {flag}: {out}");
    }
    let (out, _) = text(&ferrotune(&["plan", "--help"]));
    for flag in ["--world", "--device-memory", "--set", "--json"] {
        assert!(out.contains(flag), "plan --help lacks {flag}: {out}");
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
    // A kernel switch that names no kernel stops the worker before it computes anything.
    let o = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["generate", "--model", tmp.path().to_str().unwrap(), "--chat", "hi"])
        .env("FERROTUNE_COMPOSITE", "rms_norm,silu")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("FERROTUNE_COMPOSITE=rms_norm,silu: no kernel `silu`"), "{err}");
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

fn sample(name: &str) -> String {
    fixtures::repo_root().join("data/samples/coqa").join(name).to_str().unwrap().to_owned()
}

#[test]
fn data_commands_convert_check_preview_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures::ensure("smollm2-135m-instruct");
    let model = model.to_str().unwrap();
    let conv = tmp.path().join("train.jsonl");
    let conv_s = conv.to_str().unwrap();
    let o = ferrotune(&["convert", "coqa", &sample("train.json"), "--out", conv_s]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(text(&o).1.contains("wrote 16 conversations (105 question/answer turns)"));
    // Log lines go through `tracing`: FERROTUNE_LOG filters them.
    let quiet = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["convert", "coqa", &sample("train.json"), "--out", conv_s])
        .env("FERROTUNE_LOG", "warn")
        .output()
        .unwrap();
    assert!(quiet.status.success() && text(&quiet).1.is_empty(), "{}", text(&quiet).1);

    let o = ferrotune(&["check", conv_s, "--strict", "--model", model, "--max-seq-len", "512", "--json"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let report: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!((report["ok"].as_bool(), report["valid_rows"].as_u64()), (Some(true), Some(16)));
    let frac = report["tokens"]["trained_fraction"]["assistant"].as_f64().unwrap();
    assert!(frac > 0.05 && frac < 0.3, "{frac}");

    // A broken file: exit status 1 and the line named.
    let bad = tmp.path().join("bad.jsonl");
    let first = std::fs::read_to_string(&conv).unwrap().lines().next().unwrap().to_owned();
    std::fs::write(&bad, format!("{first}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}]}}\n")).unwrap();
    let o = ferrotune(&["check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).0.contains("line 2: no assistant message"), "{}", text(&o).0);

    let o = ferrotune(&["preview", conv_s, "--model", model, "--rows", "1", "--json"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let row: serde_json::Value = serde_json::from_str(text(&o).0.lines().next().unwrap()).unwrap();
    let (ids, labels, tokens) =
        (row["ids"].as_array().unwrap(), row["labels"].as_array().unwrap(), row["tokens"].as_array().unwrap());
    assert!(ids.len() == labels.len() && ids.len() == tokens.len());
    // Every label is the next id.
    for t in 0..ids.len() - 1 {
        if labels[t].as_i64() != Some(-100) {
            assert_eq!(labels[t], ids[t + 1]);
        }
    }
    let o = ferrotune(&["preview", conv_s, "--model", model, "--rows", "1", "--color", "never", "--strategy", "last"]);
    assert!(text(&o).0.contains("⟦the old mayor's<|im_end|>⟧"), "{}", text(&o).0);

    let cache = tmp.path().join("train.ftcache");
    let o = ferrotune(&["prepare", conv_s, "--model", model, "--max-seq-len", "512", "--out", cache.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(text(&o).0.contains("16 samples") && cache.exists(), "{}", text(&o).0);
    let o = ferrotune(&["prepare", conv_s, "--model", model, "--strategy", "sometimes"]);
    assert!(text(&o).1.contains("unknown masking strategy `sometimes`"));
}

#[test]
fn train_eval_export_end_to_end_on_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures::ensure("tiny-llama");
    let model_s = model.to_str().unwrap();
    let data = tmp.path().join("train.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"messages": [{{"role": "user", "content": "Say {i}."}}, {{"role": "assistant", "content": "{i}"}}]}}"#))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "[model]\ntemplate = \"llama3\"\n[data]\nmax_seq_len = 64\n[train]\nmax_steps = 3\nbatch_size = 2\nlr = 1e-3\n[output]\nrun_name = \"t\"\n",
    )
    .unwrap();
    let runs = tmp.path().join("runs");
    let sets = [
        format!("model.path={model_s}"),
        format!("data.train={}", data.display()),
        format!("data.validation={}", data.display()),
        format!("output.dir={}", runs.display()),
        "eval.n_evals=1".to_string(),
        "train.profile_step=2".to_string(),
    ];
    let mut args = vec!["train", cfg.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = ferrotune(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("done: 3 steps") && err.contains("validation loss"), "{out}\n{err}");
    let run = runs.join("t");
    for f in [
        "metrics.jsonl",
        "config.toml",
        "plan.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "checkpoints/step-3/DONE",
        "profile/step-2.rank-0.json",
        "profile/step-2.rank-0.trace.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    // train.profile_step=2: step 2's operators, logged and written; the matrix products are among them.
    assert!(err.contains("step 2 profiled") && err.contains("aten::mm"), "{err}");
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("profile/step-2.rank-0.json")).unwrap()).unwrap();
    let mm = p["ops"].as_array().unwrap().iter().find(|o| o["name"] == "aten::mm").expect("aten::mm profiled");
    assert!(mm["calls"].as_u64().unwrap() > 0 && mm["self_ns"].as_u64().unwrap() > 0, "{mm}");
    let mut past = args.clone();
    past.extend(["--set", "train.profile_step=4", "--set", "output.run_name=t2"]);
    let o = ferrotune(&past);
    let err = text(&o).1;
    assert!(
        !o.status.success() && err.contains("train.profile_step") && err.contains("past the run's last, 3"),
        "{err}"
    );
    assert!(std::fs::read_dir(run.join("tensorboard")).unwrap().count() == 1);
    // Unknown config keys are errors naming the key.
    let o = ferrotune(&["train", cfg.to_str().unwrap(), "--set", "train.learning_rate=1"]);
    assert!(!o.status.success() && text(&o).1.contains("learning_rate"), "{}", text(&o).1);
    // Evaluate with the adapter, then merge it.
    let adapter = run.join("adapter");
    let o = ferrotune(&[
        "eval",
        "--model",
        model_s,
        "--template",
        "llama3",
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_str(text(&o).0.trim()).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite() && v["tokens"].as_u64().unwrap() == 16);
    let merged = tmp.path().join("merged");
    let o = ferrotune(&[
        "export",
        "--merge",
        "--model",
        model_s,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(merged.join("config.json").exists() && merged.join("tokenizer.json").exists());
}

//! Evaluation during training through the real binaries: the response loss is one definition for every
//! strategy (equal at the base model across `all`/`assistant`/`boilerplate`/`last` runs, and equal to
//! transformers' mean loss over `return_assistant_tokens_mask` tokens: `tests/oracle.py masked_loss`);
//! 2 CPU ranks evaluate (loss, response loss, CoQA EM/F1 by generation) exactly like 1 rank; early
//! stopping ends a run with a checkpoint and an export, and an interrupted run resumes to the same stop
//! and the same weights.

mod common;

use common::{job, launch, ok, Job};
use ferrotune_data::fixtures;
use std::path::Path;

/// The scalar `key` logged at `step`, from metrics.jsonl.
fn scalar(run: &Path, step: u64, key: &str) -> Option<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["step"].as_u64() == Some(step))
        .find_map(|v| v[key].as_f64())
}

fn train(j: &Job, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let mut args = j.train_args(out);
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(common::ferrotune().args(&args).output().unwrap());
    j.run_dir(out)
}

#[test]
fn response_loss_is_the_same_measure_for_every_strategy_and_matches_transformers() {
    let j = job(&["eval.n_evals=1", "train.max_steps=2"]);
    let data = j.dir.path().join("train.jsonl");
    let mut base = vec![];
    for strategy in ["all", "assistant", "boilerplate", "last"] {
        let run = train(
            &j,
            strategy,
            &["--set", &format!("data.strategy={strategy}"), "--set", &format!("data.validation={}", data.display())],
        );
        let (own, response) = (scalar(&run, 0, "eval/loss").unwrap(), scalar(&run, 0, "eval/response_loss").unwrap());
        assert!(scalar(&run, 2, "eval/response_loss").unwrap().is_finite());
        base.push((strategy, own, response));
    }
    let r0 = base[1].2;
    for (s, own, r) in &base {
        assert!((r - r0).abs() <= 1e-9 * r0, "{s}: base response loss {r} != {r0}");
        if *s == "assistant" {
            assert!((own - r).abs() <= 1e-9 * r, "assistant's own loss is the response loss");
        }
    }
    assert!((base[0].1 - r0).abs() > 1e-3, "`all` is measured on other tokens: {base:?}");
    // transformers on the same model and data, the llama3 template tagged with {% generation %}
    // around assistant content and <|eot_id|>.
    let out = j.dir.path().join("oracle.json");
    let o = std::process::Command::new(fixtures::python())
        .arg(fixtures::repo_root().join("tests/oracle.py"))
        .arg("masked_loss")
        .arg(fixtures::ensure("tiny-llama"))
        .arg(fixtures::repo_root().join("data/tests/fixtures/llama3_generation.jinja"))
        .arg(&data)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let hf = hf["loss"].as_f64().unwrap();
    assert!((hf - r0).abs() <= 1e-5 * hf, "response loss {r0} vs transformers {hf}");
}

/// A CoQA job on SmolLM2: the converted validation sample as both data files, in fp32: ranks answer
/// different batches of questions, and bf16 greedy decoding depends on a batch's padding.
fn coqa_job() -> Job {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("val.jsonl");
    let sample = fixtures::repo_root().join("data/samples/coqa/validation.json");
    ok(common::ferrotune().args(["convert", "coqa"]).arg(&sample).arg("--out").arg(&conv).output().unwrap());
    std::fs::write(
        dir.path().join("run.toml"),
        "[model]\ndtype = \"fp32\"\n[data]\nmax_seq_len = 1024\n[train]\nmax_steps = 1\nmicro_batch_size = 1\nlog_every = 1\n[eval]\ncoqa = true\nmax_new_tokens = 16\nbatch_size = 4\n[output]\nrun_name = \"t\"\n",
    )
    .unwrap();
    let sets = vec![
        format!("model.path={}", fixtures::ensure("smollm2-135m-instruct").display()),
        format!("data.train={}", conv.display()),
        format!("data.validation={}", conv.display()),
    ];
    Job { dir, sets }
}

#[test]
fn two_ranks_evaluate_exactly_like_one() {
    let j = coqa_job();
    let one = train(&j, "one", &[]);
    let port = common::free_port().to_string();
    ok(launch(&j, "two", &["--nproc-per-node".into(), "2".into(), "--master-port".into(), port]).output().unwrap());
    let two = j.run_dir("two");
    for key in ["eval/em", "eval/f1"] {
        assert_eq!(scalar(&one, 0, key), scalar(&two, 0, key), "{key}");
    }
    assert!(scalar(&one, 0, "eval/f1").unwrap() > 5.0, "SmolLM2 answers some questions");
    for key in ["eval/loss", "eval/response_loss"] {
        let (a, b) = (scalar(&one, 0, key).unwrap(), scalar(&two, 0, key).unwrap());
        assert!((a - b).abs() <= 1e-6 * a, "{key}: {a} vs {b}");
    }
    eprintln!(
        "base evaluation wall time: 1 rank {:.1}s, 2 ranks {:.1}s",
        scalar(&one, 0, "eval/seconds").unwrap(),
        scalar(&two, 0, "eval/seconds").unwrap()
    );
}

#[test]
fn early_stopping_ends_with_a_checkpoint_and_export_and_resumes_to_the_same_stop() {
    // A learning rate so small the validation loss cannot improve by 1e-3: the base model stays best,
    // evaluations at steps 2 and 4 do not improve, and patience 2 stops the run at step 4 of 12.
    let sets = [
        "train.max_steps=12",
        "train.lr=1e-9",
        "eval.n_evals=6",
        "eval.early_stopping_patience=2",
        "eval.early_stopping_min_delta=1e-3",
    ];
    let j = job(&sets);
    let data = j.dir.path().join("train.jsonl");
    let val = format!("data.validation={}", data.display());
    let whole = train(&j, "whole", &["--set", &val]);
    assert_eq!(scalar(&whole, 4, "train/early_stop"), Some(4.0));
    assert!(scalar(&whole, 5, "train/loss").is_none(), "trained past the stop");
    assert!(whole.join("checkpoints/step-4").is_dir(), "no checkpoint at the stop");
    let export = whole.join("adapter");
    assert!(export.join("adapter_model.safetensors").exists(), "no export");
    // Interrupted at step 3 (patience count 1 saved), resumed: stops at 4 with the same weights.
    train(&j, "parts", &["--set", &val, "--stop-after-steps", "3"]);
    let parts = j.run_dir("parts");
    assert!(!parts.join("adapter").exists());
    train(&j, "parts", &["--set", &val, "--resume"]);
    assert_eq!(scalar(&parts, 4, "train/early_stop"), Some(4.0));
    let (a, b) = (common::tensors(&export), common::tensors(&parts.join("adapter")));
    assert_eq!(common::max_diff(&a, &b), 0.0);
    // Resuming a run that stopped early trains no further and exports again.
    train(&j, "parts", &["--set", &val, "--resume"]);
    assert!(scalar(&parts, 5, "train/loss").is_none());
    // Watching EM without CoQA scoring is refused by name.
    let o = common::ferrotune()
        .args(j.train_args("bad"))
        .args(["--set", &val, "--set", "eval.early_stopping_metric=em"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`em` needs eval.coqa = true"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

//! Work a user must not lose or silently change, through the real binaries: Ctrl-C during `train`
//! writes a checkpoint after the step in flight and exits 130, and the run resumes from it; `--resume`
//! with a changed config or other training data is refused before anything is written, naming what
//! changed.

mod common;

use common::{job, ok};
use std::time::{Duration, Instant};

fn last_step(run: &std::path::Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("train/loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn ctrl_c_checkpoints_the_step_in_flight_and_the_run_resumes() {
    let j = job(&["train.max_steps=100000", "train.n_checkpoints=0"]);
    let child = common::ferrotune()
        .args(j.train_args("out"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = j.run_dir("out");
    let t0 = Instant::now();
    while last_step(&run) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the run did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(130), "{out}\n{err}");
    assert!(err.contains("interrupt: stopping after this step with a checkpoint"), "{err}");
    let step: u64 = out
        .split("interrupted after step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(step >= 3 && run.join(format!("checkpoints/step-{step}")).is_dir(), "{out}");
    let (out, _) = ok(common::ferrotune()
        .args(j.train_args("out"))
        .args(["--resume", "--stop-after-steps", "2"])
        .output()
        .unwrap());
    assert!(out.contains(&format!("stopped after step {}", step + 2)), "{out}");
}

#[test]
fn resume_with_a_changed_config_or_other_data_is_refused_before_writing() {
    let j = job(&[]);
    ok(common::ferrotune().args(j.train_args("out")).args(["--stop-after-steps", "2"]).output().unwrap());
    let run = j.run_dir("out");
    let (config, plan) =
        (std::fs::read(run.join("config.toml")).unwrap(), std::fs::read(run.join("plan.json")).unwrap());
    let o = common::ferrotune()
        .args(j.train_args("out"))
        .args(["--resume", "--set", "lora.r=16", "--set", "train.lr=0.01"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--resume with a changed config"), "{err}");
    assert!(err.contains("lora.r = 16 (was 8)") && err.contains("train.lr = 0.01 (was 0.001)"), "{err}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config, "config.toml was rewritten");
    assert_eq!(std::fs::read(run.join("plan.json")).unwrap(), plan, "plan.json was rewritten");
    // Evaluation and logging may change.
    ok(common::ferrotune()
        .args(j.train_args("out"))
        .args(["--resume", "--set", "train.log_every=2", "--stop-after-steps", "1"])
        .output()
        .unwrap());
    // Other data, even after deleting the stale cache as its hint says.
    let data = j.dir.path().join("train.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str(&text.lines().next().unwrap().replace("Say 0.", "Say zero."));
    text.push('\n');
    std::fs::write(&data, text).unwrap();
    let _ = std::fs::remove_file(run.join("cache/train.ftcache"));
    let o = common::ferrotune().args(j.train_args("out")).arg("--resume").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--resume with other training data"), "{err}");
    assert!(!run.join("cache/train.ftcache").exists(), "a cache of the other data was written");
}

#[test]
fn a_missing_model_path_names_the_key() {
    let j = job(&[]);
    for (set, why) in
        [("model.path=", "is not set"), ("model.path=/nonexistent/model", "`/nonexistent/model` is not a directory")]
    {
        let o = common::ferrotune().args(j.train_args("out")).args(["--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("model.path") && err.contains(why), "{err}");
    }
}

#[test]
fn only_the_newest_checkpoints_are_kept() {
    let j = job(&["train.max_steps=12", "train.n_checkpoints=6", "train.keep_checkpoints=2"]);
    ok(common::ferrotune().args(j.train_args("out")).output().unwrap());
    let mut kept: Vec<String> = std::fs::read_dir(j.run_dir("out").join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-10", "step-12"]);
}

/// The dtypes of every tensor in the safetensors files of `dir`.
fn stored_dtypes(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            for (_, t) in safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors() {
                out.insert(format!("{:?}", t.dtype()));
            }
        }
    }
    out
}

/// Full fine-tuning in fp32 of a checkpoint stored in bf16 (the tiny Llama fixture) exports bf16 by
/// default, as the checkpoint was, not twice its size in fp32; `output.save_dtype` asks for another.
#[test]
fn full_fine_tuning_exports_in_the_checkpoints_dtype_unless_asked() {
    let j = job(&["lora.enabled=false", "train.max_steps=2", "train.lr=1e-4"]);
    let base = ferrotune_data::fixtures::ensure("tiny-llama");
    assert_eq!(stored_dtypes(&base), ["BF16".to_string()].into());
    ok(common::ferrotune().args(j.train_args("auto")).output().unwrap());
    let model = j.run_dir("auto").join("model");
    assert_eq!(stored_dtypes(&model), ["BF16".to_string()].into());
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    assert!(config.contains("\"dtype\": \"bfloat16\""), "{config}");
    ok(common::ferrotune().args(j.train_args("fp32")).args(["--set", "output.save_dtype=fp32"]).output().unwrap());
    assert_eq!(stored_dtypes(&j.run_dir("fp32").join("model")), ["F32".to_string()].into());
    let o = common::ferrotune().args(j.train_args("bad")).args(["--set", "output.save_dtype=fp16"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("output.save_dtype") && err.contains("`fp16`"), "{err}");
}

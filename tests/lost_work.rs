//! Work a user must not lose or silently change, through the real binaries: Ctrl-C during `train`
//! writes a checkpoint after the step in flight and exits 130, and the run resumes from it; `--resume`
//! with a changed config or other training data is refused before anything is written, naming what
//! changed; a run whose checkpoint cannot fit on its disk is refused before its first step.

mod common;

use common::{ferrotune, job, ok};
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
fn a_missing_model_or_data_path_names_the_key() {
    let j = job(&[]);
    for (key, set, why) in [
        ("model.path", "model.path=", "is not set"),
        ("model.path", "model.path=/nonexistent/model", "`/nonexistent/model` is not a directory"),
        // An unset training file was ": No such file or directory (os error 2)", naming nothing.
        ("data.train", "data.train=", "is not set"),
        ("data.train", "data.train=/nonexistent/train.jsonl", "`/nonexistent/train.jsonl` does not exist"),
        ("data.validation", "data.validation=/", "`/` is not a file"),
    ] {
        let o = common::ferrotune().args(j.train_args("out")).args(["--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(key) && err.contains(why) && err.contains("hint"), "{err}");
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

/// A run whose checkpoint cannot fit on the disk it writes to is refused before its first step, with
/// the figures and what to do, instead of failing at its first checkpoint after the training (as an
/// 8B-shape full fine-tuning did on a GPU host's 64 GiB disk). On a 32 MB tmpfs: full fine-tuning of the
/// tiny model (about 100 MB a checkpoint) is refused; LoRA (kilobytes, and the 9 MB tokenizer its export
/// copies) trains. Mounting needs root; a
/// machine without it says so and skips.
#[test]
fn a_run_whose_checkpoint_cannot_fit_on_its_disk_is_refused_before_training() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(mnt.path())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path());
    let out = mnt.path().join("runs");
    let full = job(&["lora.enabled=false", "train.max_steps=2"]);
    let o = ferrotune().args(full.train_args(out.to_str().unwrap())).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "full fine-tuning on 32 MB must be refused:\n{err}");
    for part in ["free, and this run writes at least", "optimizer state", "hint: free space, set output.dir"] {
        assert!(err.contains(part), "`{part}` not in:\n{err}");
    }
    assert!(!err.contains("step 1/") && !err.contains("panicked"), "refused before the first step:\n{err}");
    let lora = job(&["train.max_steps=2"]);
    let o = ferrotune().args(lora.train_args(out.to_str().unwrap())).output().unwrap();
    assert!(o.status.success(), "LoRA fits in 32 MB:\n{}", String::from_utf8_lossy(&o.stderr));
}

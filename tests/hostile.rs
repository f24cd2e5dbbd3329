//! Inputs and environments that used to reach a Rust panic or a libtorch exception, each now one error
//! naming the key, flag or file and what to do (or, for a closed pipe, a quiet exit): a validation file
//! none of whose conversations keeps a trained token (the loader asserted), a CUDA device that is not
//! there (a panic inside the bindings in `train` and `eval`), `data.max_seq_len = 0` (a panic in
//! packing), and `inspect` writing into a pipe whose reader is gone (println! panicked on EPIPE).

mod common;

use common::*;
use ferrotune_data::fixtures;
use std::process::Stdio;

fn fails_cleanly(o: std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure:\n{err}");
    assert!(!err.contains("panicked"), "a panic, not an error:\n{err}");
    assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
}

#[test]
fn untrainable_validation_data_is_an_error_naming_the_key_and_why() {
    // Rows of 64 tokens: a 200-word question leaves no room for the answer, the only trained part.
    let job = job(&["eval.n_evals=1"]);
    let val = job.dir.path().join("val.jsonl");
    let long = "word ".repeat(200);
    let line = format!(
        r#"{{"messages": [{{"role": "user", "content": "{long}"}}, {{"role": "assistant", "content": "yes"}}]}}"#
    );
    std::fs::write(&val, format!("{line}\n{line}\n")).unwrap();
    let o = ferrotune()
        .args(job.train_args("out"))
        .args(["--set", &format!("data.validation={}", val.display())])
        .output()
        .unwrap();
    fails_cleanly(o, "config key `data.validation`: no row to read: of the 2 conversation(s)");
}

#[test]
fn a_missing_cuda_device_is_an_error_in_train_and_eval() {
    let job = job(&["model.device=cuda:7"]);
    fails_cleanly(ferrotune().args(job.train_args("out")).output().unwrap(), "device `cuda:7` is not available");
    let o = ferrotune()
        .args(["eval", "--model"])
        .arg(fixtures::ensure("tiny-llama"))
        .args(["--template", "llama3", "--metric", "loss", "--device", "cuda:7", "--data"])
        .arg(job.dir.path().join("train.jsonl"))
        .output()
        .unwrap();
    fails_cleanly(o, "--device");
}

#[test]
fn a_zero_or_huge_row_length_is_refused_by_name() {
    for (len, why) in [("0", "0 must be at least 2"), ("1000000000", "over the limit of 1048576")] {
        let job = job(&[&format!("data.max_seq_len={len}")]);
        fails_cleanly(ferrotune().args(job.train_args("out")).output().unwrap(), &format!("`data.max_seq_len`: {len}"));
        let o = ferrotune().args(job.train_args("out")).output().unwrap();
        assert!(String::from_utf8_lossy(&o.stderr).contains(why));
    }
}

#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    let mut child = ferrotune()
        .arg("inspect")
        .arg(fixtures::ensure("tiny-llama"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the first line is written
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && err.trim().is_empty(), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(o.status.success() || o.status.signal() == Some(libc_sigpipe()), "{:?}", o.status);
}

/// SIGPIPE's number on Linux.
fn libc_sigpipe() -> i32 {
    13
}

/// A kill while the final adapter is written leaves no `adapter/` at all (only `.adapter.partial`),
/// so nothing can load half an export; `--resume` from the final checkpoint then publishes it whole.
/// Every file the run saved has the user's umask (022 here: 0644), safetensors files included
/// (they were 0600).
#[test]
fn a_kill_during_export_leaves_no_half_export_and_files_follow_the_umask() {
    let job = job(&[]);
    let o = ferrotune().args(job.train_args("out")).env("FERROTUNE_FAILPOINT", "export").output().unwrap();
    assert!(!o.status.success(), "the failpoint should have killed the run");
    let run = job.run_dir("out");
    assert!(!run.join("adapter").exists(), "a half export was published");
    assert!(run.join(".adapter.partial").exists());
    let o = ferrotune().args(job.train_args("out")).arg("--resume").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run.join("adapter/adapter_model.safetensors").exists() && !run.join(".adapter.partial").exists());
    use std::os::unix::fs::PermissionsExt;
    // The umask this test (and so the run it started) has, as /proc/self/status gives it.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = u32::from_str_radix(status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap().trim(), 8).unwrap();
    let mut seen = 0;
    let mut dirs = vec![run.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o666 & !umask, "{} has mode {mode:o}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 10, "{seen} files");
}

/// An output that is the command's own input is refused before anything is written, also through a
/// symbolic link; the input is unchanged.
#[test]
fn an_output_that_is_an_input_is_refused() {
    let job = job(&[]);
    let data = job.dir.path().join("train.jsonl");
    let link = job.dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let before = std::fs::read(&data).unwrap();
    let model = fixtures::ensure("tiny-llama");
    for out in [&data, &link] {
        let o = ferrotune()
            .arg("prepare")
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .args(["--template", "llama3", "--out"])
            .arg(out)
            .output()
            .unwrap();
        fails_cleanly(o, "is the input");
        let o = ferrotune().args(["convert", "coqa"]).arg(&data).arg("--out").arg(out).output().unwrap();
        fails_cleanly(o, "is the input");
    }
    assert_eq!(std::fs::read(&data).unwrap(), before);
}

/// A symbolic link loop (as data, as model.path) and a token cache given where data is expected are
/// each named as what they are, not as an OS error number, "not a directory" or invalid JSON.
#[test]
fn link_loops_and_token_caches_given_as_data_are_named_as_such() {
    let job = job(&[]);
    let d = job.dir.path();
    std::os::unix::fs::symlink("loop-b", d.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", d.join("loop-b")).unwrap();
    let looped = d.join("loop-a");
    let data = format!("data.train={}", looped.display());
    fails_cleanly(
        ferrotune().args(job.train_args("out")).args(["--set", &data]).output().unwrap(),
        "is a symbolic link loop (",
    );
    fails_cleanly(ferrotune().arg("check").arg(&looped).output().unwrap(), "is a symbolic link loop (");
    let model = format!("model.path={}", looped.display());
    let o = ferrotune().args(job.train_args("out")).args(["--set", &model]).output().unwrap();
    fails_cleanly(o, "`model.path`");
    let o = ferrotune().args(job.train_args("out")).args(["--set", &model]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a symbolic link loop ("));

    let train = d.join("train.jsonl");
    let cache = d.join("train.ftcache");
    let o = ferrotune()
        .arg("prepare")
        .arg(&train)
        .arg("--model")
        .arg(fixtures::ensure("tiny-llama"))
        .args(["--template", "llama3", "--max-seq-len", "64", "--out"])
        .arg(&cache)
        .output()
        .unwrap();
    ok(o);
    let given = format!("data.train={}", cache.display());
    let from = format!("is a token cache made by `ferrotune prepare` from {}", train.display());
    fails_cleanly(ferrotune().args(job.train_args("out")).args(["--set", &given]).output().unwrap(), &from);
    fails_cleanly(ferrotune().arg("check").arg(&cache).output().unwrap(), &from);
}

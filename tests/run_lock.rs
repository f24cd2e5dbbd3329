//! One run directory, one run: while a `train` runs, a second `train` of the same run and a `--resume`
//! of it are refused before they write anything, naming the first run's pid; once the first is gone
//! (killed with SIGKILL here, the worst case) the directory is free again. Before the lock both ran,
//! `metrics.jsonl` interleaved and one run's weights replaced the other's.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_second_run_of_one_directory_is_refused_while_the_first_runs() {
    let job = job(&["train.max_steps=100000", "train.n_checkpoints=1000"]);
    let mut first = ferrotune().args(job.train_args("out")).spawn().unwrap();
    let run = job.run_dir("out");
    // Wait until the first run holds the lock and has written a complete checkpoint.
    let t0 = Instant::now();
    let checkpointed = || {
        std::fs::read_dir(run.join("checkpoints")).is_ok_and(|d| d.flatten().any(|e| e.path().join("DONE").exists()))
    };
    while !checkpointed() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the first run did not start");
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics_before = std::fs::metadata(run.join("metrics.jsonl")).unwrap().len();
    for extra in [vec![], vec!["--resume".to_string()]] {
        let o = ferrotune().args(job.train_args("out")).args(&extra).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "second run {extra:?} was not refused");
        assert!(err.contains(&format!("in use by pid {} on", first.id())), "{extra:?}: {err}");
    }
    let config = std::fs::read_to_string(run.join("config.toml")).ok();
    first.kill().unwrap();
    first.wait().unwrap();
    // The refused runs wrote nothing: the first run's log only grew (it kept running meanwhile).
    assert!(std::fs::metadata(run.join("metrics.jsonl")).unwrap().len() >= metrics_before);
    assert_eq!(std::fs::read_to_string(run.join("config.toml")).ok(), config);
    // The kernel dropped the killed holder's lock: resuming works.
    let o = ferrotune().args(job.train_args("out")).args(["--resume", "--stop-after-steps", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

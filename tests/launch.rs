//! Data-parallel training through the real binaries on CPU (TCP ring), on the tiny Llama fixture:
//! 2 ranks x batch b equal 1 rank x batch 2b (LoRA with dropout, and full fine-tuning), two launchers
//! (`--nnodes 2`) on loopback, Slurm-started workers, a killed worker stopping the job (and, with
//! `--max-restarts 1`, resuming to the same final loss), and the refusals (another run id, a port in
//! use). Expected values are the single-process runs of the same config in the same test.

use ferrotune_data::fixtures;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Job {
    dir: tempfile::TempDir,
    sets: Vec<String>,
}

/// 16 short conversations and a run config (llama3 template, rows of 64 tokens, micro-batch 1).
fn job(extra: &[&str]) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Say {i}."}}, {{"role": "assistant", "content": "{i} and {}"}}]}}"#,
                i * 7
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.path().join("run.toml"),
        "[model]\ntemplate = \"llama3\"\n[data]\nmax_seq_len = 64\n[train]\nmax_steps = 6\nmicro_batch_size = 1\nlr = 1e-3\nlog_every = 1\n[output]\nrun_name = \"t\"\n",
    )
    .unwrap();
    let mut sets = vec![
        format!("model.path={}", fixtures::ensure("tiny-llama").display()),
        format!("data.train={}", data.display()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Job { dir, sets }
}

impl Job {
    /// `train run.toml --set ...` arguments writing under `out`.
    fn train_args(&self, out: &str) -> Vec<String> {
        let mut a = vec!["train".to_string(), self.dir.path().join("run.toml").display().to_string()];
        for s in self.sets.iter().cloned().chain([format!("output.dir={}", self.dir.path().join(out).display())]) {
            a.extend(["--set".to_string(), s]);
        }
        a
    }
    fn run_dir(&self, out: &str) -> PathBuf {
        self.dir.path().join(out).join("t")
    }
}

fn ferrotune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.env_remove("LD_LIBRARY_PATH").env("FERROTUNE_LOG", "info");
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn launch(job: &Job, out: &str, launch_args: &[String]) -> Command {
    let mut c = ferrotune();
    c.arg("launch").args(launch_args).arg("--log-dir").arg(job.dir.path().join(format!("{out}-logs")));
    c.arg("--").args(job.train_args(out));
    c
}

fn ok(o: Output) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{out}\n{err}");
    (out, err)
}

/// train/loss per step from metrics.jsonl.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss"].as_f64())
        .collect()
}

/// The loss curves of two runs agree to 1e-6 relative.
fn same_losses(a: &Path, b: &Path) {
    let (one, two) = (losses(a), losses(b));
    assert_eq!(one.len(), 6);
    assert_eq!(one.len(), two.len());
    for (x, y) in one.iter().zip(&two) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses differ: {one:?} vs {two:?}");
    }
}

/// Every tensor of the safetensors files under `dir`, as f32.
fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut out = vec![];
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for n in names {
            let t = st.tensor(&n).unwrap();
            let v: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => {
                    t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::BF16 => t
                    .data()
                    .chunks(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                d => panic!("{n}: unexpected dtype {d:?}"),
            };
            out.push((n, v));
        }
    }
    out
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}

/// Two ranks with batch 1 each against one rank with batch 2 (2 micro-batches): same losses (1e-6
/// relative: the ring sums the two ranks' fp32 gradients where one rank accumulates them, and the
/// loss is summed in f64 instead of f32) and same final weights (1e-6 absolute).
/// The 2-rank side also checkpoints activations and uses buckets of 8 KiB, so that many buckets are
/// reduced while backward runs (and the in-flight limit is reached).
fn two_ranks_equal_one(extra: &[&str], weights_dir: &str) {
    let j = job(extra);
    ok(ferrotune().args(j.train_args("one")).args(["--set", "train.batch_size=2"]).output().unwrap());
    let port = free_port().to_string();
    let mut c = launch(&j, "two", &["--nproc-per-node".into(), "2".into(), "--master-port".into(), port]);
    c.args(["--set", "train.batch_size=2", "--set", "train.bucket_mb=0.0078125"]);
    c.args(["--set", "train.activation_checkpointing=full"]);
    let (out, err) = ok(c.output().unwrap());
    assert!(out.contains("[rank 1] rank 1 done: 6 steps") && out.contains("[rank 0] done: 6 steps"), "{out}");
    let buckets: usize = err
        .split("gradients in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bucket line in {err}"));
    assert!(buckets > 4, "{buckets} buckets");
    same_losses(&j.run_dir("one"), &j.run_dir("two"));
    let d = max_diff(&tensors(&j.run_dir("one").join(weights_dir)), &tensors(&j.run_dir("two").join(weights_dir)));
    println!("max weight difference 1 rank vs 2 ranks: {d:e}");
    assert!(d <= 1e-6, "final weights differ by {d}");
    // Per-rank logs were kept.
    for r in 0..2 {
        assert!(j.dir.path().join(format!("two-logs/rank-{r}.log")).exists());
    }
}

#[test]
fn lora_two_ranks_equal_one_rank_with_twice_the_batch() {
    two_ranks_equal_one(&["lora.dropout=0.1"], "adapter");
}

#[test]
fn full_fine_tuning_two_ranks_equal_one_rank_with_twice_the_batch() {
    two_ranks_equal_one(&["lora.enabled=false", "train.lr=1e-4"], "model");
}

#[test]
fn two_launchers_on_loopback_and_slurm_started_workers_train_together() {
    let j = job(&[]);
    ok(ferrotune().args(j.train_args("one")).args(["--set", "train.batch_size=2"]).output().unwrap());
    let port = free_port().to_string();
    let nodes: Vec<_> = (0..2)
        .map(|n| {
            let args: Vec<String> = ["--nnodes", "2", "--node-rank", &n.to_string(), "--master-port", &port]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut c = launch(&j, "nodes", &args);
            c.args(["--set", "train.batch_size=2"]).stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for n in nodes {
        ok(n.wait_with_output().unwrap());
    }
    same_losses(&j.run_dir("one"), &j.run_dir("nodes"));

    // `srun ferrotune train`: Slurm's variables alone, rank 0 serving the store itself.
    let port = free_port().to_string();
    let workers: Vec<_> = (0..2)
        .map(|r| {
            let mut c = ferrotune();
            c.args(j.train_args("slurm")).args(["--set", "train.batch_size=2"]);
            c.env("SLURM_PROCID", r.to_string())
                .env("SLURM_LOCALID", r.to_string())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_NNODES", "1")
                .env("SLURM_JOB_NODELIST", "localhost")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for w in workers {
        let (_, err) = ok(w.wait_with_output().unwrap());
        assert!(err.contains("(slurm, store localhost:"), "{err}");
    }
    same_losses(&j.run_dir("one"), &j.run_dir("slurm"));
}

/// Starts a 2-rank launch of `steps` steps with a checkpoint every 10, kills rank 1 once step 20's
/// checkpoint exists, and returns the launcher's output and how long it took to exit after the kill.
fn kill_rank_1(j: &Job, out: &str, restarts: &str) -> (Output, Duration) {
    let port = free_port().to_string();
    let args: Vec<String> = ["--nproc-per-node", "2", "--master-port", &port, "--max-restarts", restarts]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut c = launch(j, out, &args);
    c.args(["--set", "train.max_steps=200", "--set", "train.n_checkpoints=20", "--set", "train.log_every=20"]);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let marker = j.run_dir(out).join("checkpoints/step-20/DONE");
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint at step 20");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = String::from_utf8(
        Command::new("pgrep").args(["-f", &format!("ferrotune-worker train.*{out}")]).output().unwrap().stdout,
    )
    .unwrap();
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "expected 2 workers, found {pids:?}");
    // The worker with RANK=1 in its environment.
    let rank1 = pids
        .iter()
        .find(|p| std::fs::read(format!("/proc/{p}/environ")).unwrap().split(|&b| b == 0).any(|kv| kv == b"RANK=1"))
        .unwrap();
    assert!(Command::new("kill").args(["-9", rank1]).status().unwrap().success());
    let killed = Instant::now();
    let o = child.wait_with_output().unwrap();
    (o, killed.elapsed())
}

#[test]
fn a_killed_worker_stops_the_job_and_a_restart_resumes_to_the_same_loss() {
    let j = job(&["lora.dropout=0.0"]);
    let (o, after) = kill_rank_1(&j, "killed", "0");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("error: rank 1 was killed by signal 9 (SIGKILL)"), "{err}");
    assert!(after < Duration::from_secs(10), "the launcher took {after:?} to stop");
    let leftovers = Command::new("pgrep").args(["-f", "ferrotune-worker train.*killed"]).output().unwrap();
    assert!(leftovers.stdout.is_empty(), "orphaned workers: {}", String::from_utf8_lossy(&leftovers.stdout));

    let (o, _) = kill_rank_1(&j, "restarted", "1");
    let (out, err) = ok(o);
    assert!(err.contains("restarting every worker (attempt 1 of 1)"), "{err}");
    assert!(out.contains("resumed from") || err.contains("resumed from"), "{out}\n{err}");
    let port = free_port().to_string();
    let mut c = launch(&j, "whole", &["--nproc-per-node".into(), "2".into(), "--master-port".into(), port]);
    c.args(["--set", "train.max_steps=200", "--set", "train.n_checkpoints=20", "--set", "train.log_every=20"]);
    ok(c.output().unwrap());
    let (a, b) = (losses(&j.run_dir("restarted")), losses(&j.run_dir("whole")));
    assert_eq!(a.last(), b.last(), "final loss after a restart differs from an uninterrupted run");
}

#[test]
fn another_run_id_is_refused_and_a_port_in_use_is_a_clear_error() {
    let j = job(&[]);
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let o = launch(&j, "busy", &["--master-port".into(), port.clone()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("port {port} is in use")), "{err}");
    drop(held);

    // Job A waits for its second node; a node of job B on the same port is turned away.
    let port = free_port().to_string();
    let a_args: Vec<String> = ["--nnodes", "2", "--master-port", &port, "--run-id", "job-a", "--timeout", "30"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut a = launch(&j, "a", &a_args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let b_args: Vec<String> =
        ["--nnodes", "2", "--node-rank", "1", "--master-port", &port, "--run-id", "job-b", "--timeout", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let o = launch(&j, "b", &b_args).output().unwrap();
    let _ = a.kill();
    let _ = a.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("serves run id `job-a`") && err.contains("`job-b`"), "{err}");
}

#[test]
fn sigterm_to_the_launcher_stops_every_worker() {
    let j = job(&[]);
    let port = free_port().to_string();
    let mut c = launch(&j, "term", &["--nproc-per-node".into(), "2".into(), "--master-port".into(), port]);
    c.args(["--set", "train.max_steps=500", "--set", "train.n_checkpoints=50", "--set", "train.log_every=50"]);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let marker = j.run_dir("term").join("checkpoints/step-10/DONE");
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint at step 10");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let sent = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("interrupted by SIGTERM; stopped every worker"), "{err}");
    assert!(sent.elapsed() < Duration::from_secs(10), "took {:?}", sent.elapsed());
    let leftovers = Command::new("pgrep").args(["-f", "ferrotune-worker train.*term"]).output().unwrap();
    assert!(leftovers.stdout.is_empty(), "orphaned workers: {}", String::from_utf8_lossy(&leftovers.stdout));
}

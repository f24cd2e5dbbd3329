//! What the CLI tests of several ranks share: a job (conversations and a run config on the tiny Llama
//! fixture), launching it through the real binaries, and reading back its losses and weights.
#![allow(dead_code)] // each test file uses its own subset

use ferrotune_data::fixtures;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Job {
    pub dir: tempfile::TempDir,
    pub sets: Vec<String>,
}

/// 16 short conversations and a run config (llama3 template, rows of 64 tokens, micro-batch 1).
pub fn job(extra: &[&str]) -> Job {
    job_of(16, "Say {i}.", extra)
}

/// `n` conversations whose user turn is `user` with `{i}` replaced, and the run config of `job`.
pub fn job_of(n: usize, user: &str, extra: &[&str]) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "{i} and {}"}}]}}"#,
                user.replace("{i}", &i.to_string()),
                i * 7
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.path().join("run.toml"),
        "[model]\ntemplate = \"llama3\"\ndtype = \"fp32\"\n[data]\nmax_seq_len = 64\n[train]\nmax_steps = 6\nmicro_batch_size = 1\nlr = 1e-3\nlog_every = 1\n[output]\nrun_name = \"t\"\n",
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
    pub fn train_args(&self, out: &str) -> Vec<String> {
        let mut a = vec!["train".to_string(), self.dir.path().join("run.toml").display().to_string()];
        for s in self.sets.iter().cloned().chain([format!("output.dir={}", self.dir.path().join(out).display())]) {
            a.extend(["--set".to_string(), s]);
        }
        a
    }
    pub fn run_dir(&self, out: &str) -> PathBuf {
        self.dir.path().join(out).join("t")
    }
}

pub fn ferrotune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.env_remove("LD_LIBRARY_PATH").env("FERROTUNE_LOG", "info");
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn launch(job: &Job, out: &str, launch_args: &[String]) -> Command {
    let mut c = ferrotune();
    c.arg("launch").args(launch_args).arg("--log-dir").arg(job.dir.path().join(format!("{out}-logs")));
    c.arg("--").args(job.train_args(out));
    c
}

pub fn ok(o: Output) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{out}\n{err}");
    (out, err)
}

/// train/loss per step from metrics.jsonl.
pub fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss"].as_f64())
        .collect()
}

/// The loss curves of two runs of 6 steps agree to 1e-6 relative.
pub fn same_losses(a: &Path, b: &Path) {
    same_loss_curves(a, b, 6);
}

/// The loss curves of two runs of `steps` steps agree to 1e-6 relative.
pub fn same_loss_curves(a: &Path, b: &Path, steps: usize) {
    let (one, two) = (losses(a), losses(b));
    assert_eq!(one.len(), steps);
    assert_eq!(one.len(), two.len());
    for (x, y) in one.iter().zip(&two) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses differ: {one:?} vs {two:?}");
    }
}

/// Every tensor of the safetensors files under `dir`, as f32.
pub fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
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

pub fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
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

//! `ferrotune sweep` and `ferrotune report` through the real binary: the bundled CPU sweep over the four
//! masking strategies end to end (report table with EM/F1 per trial, a PNG that decodes and holds a
//! drawn plot, TensorBoard's own reader finding every trial's hparams and final metrics), and on the
//! tiny model: an interrupted sweep re-run finishes only what was left, a failing trial does not stop
//! the others, `--dry-run` runs nothing, and multi-process trials with `--parallel 2`.

use ferrotune_data::fixtures;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ferrotune(cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    c.current_dir(cwd).env_remove("LD_LIBRARY_PATH");
    c
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect()).collect()
}

/// Decodes a PNG: (width, height, distinct RGB colours).
fn png_stats(path: &Path) -> (u32, u32, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let mut colours = std::collections::HashSet::new();
    for px in buf[..info.buffer_size()].chunks(channels) {
        colours.insert((px[0], px[1], px[2]));
    }
    (info.width, info.height, colours.len())
}

const TB_READER: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from google.protobuf import json_format
out = {}
for d in sys.argv[1:]:
    ea = EventAccumulator(d, size_guidance={"scalars": 0})
    ea.Reload()
    start = {}
    for tag, content in ea.PluginTagToContent("hparams").items():
        msg = json_format.MessageToDict(plugin_data_pb2.HParamsPluginData.FromString(content))
        if "sessionStartInfo" in msg:
            start = msg["sessionStartInfo"]["hparams"]
    out[d] = {"hparams": start, "scalars": {t: ea.Scalars(t)[-1].value for t in ea.Tags()["scalars"]}}
print(json.dumps(out))
"#;

#[test]
fn the_bundled_cpu_sweep_runs_end_to_end_with_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fixtures::repo_root();
    let model = fixtures::ensure("smollm2-135m-instruct");
    for split in ["train", "validation"] {
        let o = ferrotune(tmp.path())
            .args(["convert", "coqa"])
            .arg(root.join(format!("data/samples/coqa/{split}.json")))
            .arg("--out")
            .arg(tmp.path().join(format!("{split}.jsonl")))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = ferrotune(tmp.path())
        .arg("sweep")
        .arg(root.join("configs/sweep-coqa-masking.toml"))
        .arg("--set")
        .arg(format!("model.path={}", model.display()))
        .arg("--set")
        .arg(format!("data.train={}", tmp.path().join("train.jsonl").display()))
        .arg("--set")
        .arg(format!("data.validation={}", tmp.path().join("validation.jsonl").display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let dir = tmp.path().join("runs/sweeps/coqa-masking");
    let mut rows = csv_rows(&dir.join("report.csv"));
    // First the base model, evaluated before any update: the same response loss every trial starts from.
    let base = rows.remove(0);
    assert_eq!(base["trial"], "base model (step 0)");
    let base_response = base["response_loss"].parse::<f64>().unwrap();
    assert!(base["em"].parse::<f64>().is_ok() && base["f1"].parse::<f64>().is_ok(), "{base:?}");
    let strategies: Vec<&str> = rows.iter().map(|r| r["data.strategy"].as_str()).collect();
    assert_eq!(strategies, ["all", "assistant", "boilerplate", "last"]);
    for r in &rows {
        assert_eq!(r["status"], "done");
        for k in [
            "response_loss",
            "Δ_response_loss",
            "em",
            "Δ_em",
            "f1",
            "Δ_f1",
            "best_own_val_loss",
            "final_train_loss",
            "trained_fraction",
            "instruction_per_response_token",
            "tokens_per_s",
            "wall_s",
        ] {
            assert!(r[k].parse::<f64>().is_ok(), "{k} missing in {r:?}");
        }
        let (resp, d) = (r["response_loss"].parse::<f64>().unwrap(), r["Δ_response_loss"].parse::<f64>().unwrap());
        assert!((resp - base_response - d).abs() < 1e-3, "{r:?}");
    }
    // The data's instruction/response ratio is the data's, the same for every strategy.
    assert!(rows.iter().all(|r| r["instruction_per_response_token"] == rows[0]["instruction_per_response_token"]));
    // `all` trains on more of each row than `assistant`, which trains on more than `last`.
    let frac = |i: usize| rows[i]["trained_fraction"].parse::<f64>().unwrap();
    assert!(frac(0) > frac(1) && frac(1) > frac(3), "{rows:?}");
    println!("{}", std::fs::read_to_string(dir.join("report.md")).unwrap());
    let (w, h, colours) = png_stats(&dir.join("report.png"));
    assert_eq!((w, h), (1400, 600));
    assert!(colours > 50, "the figure has only {colours} colours: nothing drawn?");

    // TensorBoard's own reader: every trial has its hparams (the swept key among them) and metrics.
    let trials: Vec<PathBuf> =
        ["00-strategy=all", "01-strategy=assistant", "02-strategy=boilerplate", "03-strategy=last"]
            .iter()
            .map(|t| dir.join("trials").join(t).join("tensorboard"))
            .collect();
    let o = Command::new(fixtures::python()).arg("-c").arg(TB_READER).args(&trials).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let tb: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (t, r) in trials.iter().zip(&rows) {
        let got = &tb[t.to_str().unwrap()];
        assert_eq!(got["hparams"]["data.strategy"], r["data.strategy"].as_str(), "{got}");
        let em = got["scalars"]["hparams/em"].as_f64().expect("hparams/em");
        assert!((em - r["em"].parse::<f64>().unwrap()).abs() < 0.051, "{em} vs {}", r["em"]);
        assert!(got["scalars"]["hparams/f1"].is_number() && got["scalars"]["hparams/eval_loss"].is_number());
    }
}

/// A sweep over three learning rates on the tiny model, 40 steps each with a checkpoint every 4.
fn tiny_sweep(tmp: &Path, extra: &str, grid: &str) -> PathBuf {
    let data = tmp.join("train.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| format!(r#"{{"messages": [{{"role": "user", "content": "Say {i}."}}, {{"role": "assistant", "content": "{i}"}}]}}"#))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    std::fs::write(
        tmp.join("run.toml"),
        "[model]\ntemplate = \"llama3\"\ndtype = \"fp32\"\n[data]\nmax_seq_len = 64\n[train]\nmax_steps = 40\nbatch_size = 2\nn_checkpoints = 10\nkeep_checkpoints = 0\nlog_every = 1\n[output]\nrun_name = \"x\"\n",
    )
    .unwrap();
    let sweep = tmp.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"run.toml\"\nname = \"s\"\ndir = \"{}\"\nset = [\"model.path={}\", \"data.train={}\"]\n{extra}\n[grid]\n{grid}\n",
            tmp.join("sweeps").display(),
            fixtures::ensure("tiny-llama").display(),
            data.display()
        ),
    )
    .unwrap();
    sweep
}

#[test]
fn an_interrupted_sweep_finishes_only_what_was_left() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tiny_sweep(tmp.path(), "", "\"train.lr\" = [1e-3, 5e-4, 2e-4]");
    let o = ferrotune(tmp.path()).arg("sweep").arg(&sweep).arg("--dry-run").output().unwrap();
    assert!(o.status.success() && text(&o).contains("01-lr=0.0005"), "{}", text(&o));
    assert!(!tmp.path().join("sweeps/s").exists(), "--dry-run ran something");

    // Interrupt (SIGKILL) the sweep once the second trial has a checkpoint.
    let mut child =
        ferrotune(tmp.path()).arg("sweep").arg(&sweep).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let trials = tmp.path().join("sweeps/s/trials");
    let t0 = Instant::now();
    while !trials.join("01-lr=0.0005/checkpoints/step-4/DONE").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "trial 1 never checkpointed");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the trial's worker dies with the sweep
    let first = std::fs::read(trials.join("00-lr=0.001/metrics.jsonl")).unwrap();
    assert!(!trials.join("02-lr=0.0002").exists());
    let o = ferrotune(tmp.path()).arg("sweep").arg(&sweep).arg("--dry-run").output().unwrap();
    let listed = text(&o);
    for (trial, state) in [
        ("00-lr=0.001", "[finished (skipped)]"),
        ("01-lr=0.0005", "[running, resumes from its checkpoint]"),
        ("02-lr=0.0002", "[new]"),
    ] {
        assert!(listed.lines().any(|l| l.contains(trial) && l.ends_with(state)), "{trial} {state}: {listed}");
    }

    let o = ferrotune(tmp.path()).arg("sweep").arg(&sweep).output().unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("trial 00-lr=0.001: finished before, skipped"), "{out}");
    assert!(out.contains("trial 01-lr=0.0005 resuming from its checkpoint"), "{out}");
    assert!(out.contains("trial 02-lr=0.0002 starting"), "{out}");
    assert_eq!(std::fs::read(trials.join("00-lr=0.001/metrics.jsonl")).unwrap(), first, "a finished trial ran again");
    let rows = csv_rows(&tmp.path().join("sweeps/s/report.csv"));
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["status"] == "done" && r["final_train_loss"].parse::<f64>().is_ok()), "{rows:?}");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trials.join("01-lr=0.0005/trial.json")).unwrap()).unwrap();
    assert_eq!(status["attempts"], 2);
    // The killed attempt's steps after its checkpoint were dropped on resume: each step once, in order.
    let steps: Vec<u64> = std::fs::read_to_string(trials.join("01-lr=0.0005/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());

    // Re-run with another setting: the finished trials are not this sweep's results any more.
    let o = ferrotune(tmp.path()).arg("sweep").arg(&sweep).args(["--set", "train.max_steps=30"]).output().unwrap();
    let out = text(&o);
    assert!(!o.status.success() && out.contains("ran with other settings than this sweep's"), "{out}");
    assert!(out.contains("00-lr=0.001 (+train.max_steps=30)"), "{out}");
    assert_eq!(std::fs::read(trials.join("00-lr=0.001/metrics.jsonl")).unwrap(), first, "a trial ran");
}

#[test]
fn a_failed_trial_does_not_stop_the_others_and_trials_can_be_multi_process() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sweep = tiny_sweep(
        tmp.path(),
        &format!("nproc_per_node = 2\nmaster_port = {port}"),
        "\"data.strategy\" = [\"all\", \"sometimes\", \"last\"]",
    );
    let o = ferrotune(tmp.path()).arg("sweep").arg(&sweep).args(["--parallel", "2"]).output().unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("1 of 3 trials failed: 01-strategy=sometimes"), "{out}");
    assert!(out.contains("`sometimes` is not one of all, assistant, boilerplate, last, auto"), "{out}");
    let rows = csv_rows(&tmp.path().join("sweeps/s/report.csv"));
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str()).collect();
    assert_eq!(status, ["done", "failed", "done"]);
    // Each good trial ran on two ranks.
    for t in ["00-strategy=all", "02-strategy=last"] {
        let log = std::fs::read_to_string(tmp.path().join("sweeps/s/trials").join(t).join("train.log")).unwrap();
        assert!(log.contains("[rank 1] rank 1 done: 40 steps"), "{log}");
    }
    let (w, _, colours) = png_stats(&tmp.path().join("sweeps/s/report.png"));
    assert!(w == 1400 && colours > 50);
}

//! Our event files read by TensorBoard's own `EventAccumulator` (from the `tensorboard` package):
//! scalars with their steps, the config as text, and the hparams plugin's experiment, session start
//! (hyperparameters) and session end; and a resumed run's steps shown once, in TensorBoard and in
//! metrics.jsonl.

use ferrotune_data::fixtures;
use ferrotune_trainer::metrics::{Jsonl, Logger};
use ferrotune_trainer::tensorboard::TensorBoard;
use serde_json::{json, Value};

const READER: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from google.protobuf import json_format
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()
out = {"scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]},
       "text": {t: [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)] for t in tags["tensors"]},
       "hparams": {}}
try:
    hparams = ea.PluginTagToContent("hparams").items()
except KeyError:  # a run without hparams
    hparams = []
for tag, content in hparams:
    out["hparams"][tag] = json_format.MessageToDict(plugin_data_pb2.HParamsPluginData.FromString(content))
print(json.dumps(out))
"#;

fn read(dir: &std::path::Path) -> Value {
    let o = std::process::Command::new(fixtures::python()).args(["-c", READER]).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn points(r: &Value, tag: &str) -> Vec<(u64, f64)> {
    r["scalars"][tag].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
}

#[test]
fn tensorboard_reads_our_scalars_text_and_hparams() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = TensorBoard::create(dir.path()).unwrap();
    for step in 1..=5u64 {
        tb.scalars(step, &[("train/loss", 2.0 / step as f64), ("train/lr", 1e-4)]);
    }
    tb.text("config", "[train]\nlr = 1e-4");
    let mut hp = std::collections::BTreeMap::new();
    hp.insert("data.strategy".to_string(), json!("assistant"));
    hp.insert("train.lr".to_string(), json!(1e-4));
    hp.insert("lora.enabled".to_string(), json!(true));
    tb.hparams(&hp, &[("hparams/train_loss", 0.4), ("hparams/em", 61.5)]);
    drop(tb);
    let r = read(dir.path());
    let loss = points(&r, "train/loss");
    assert_eq!(loss.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert!((loss[1].1 - 1.0).abs() < 1e-6 && (loss[4].1 - 0.4).abs() < 1e-6, "{loss:?}");
    assert_eq!(r["text"]["config"][0], "[train]\nlr = 1e-4");
    assert!((r["scalars"]["hparams/em"][0][1].as_f64().unwrap() - 61.5).abs() < 1e-4);
    let h = &r["hparams"];
    let start = &h["_hparams_/session_start_info"]["sessionStartInfo"]["hparams"];
    // MessageToDict renders google.protobuf.Value as the plain JSON value.
    assert_eq!(start["data.strategy"], "assistant");
    assert_eq!(start["lora.enabled"], true);
    assert!((start["train.lr"].as_f64().unwrap() - 1e-4).abs() < 1e-12);
    let metrics: Vec<&str> = h["_hparams_/experiment"]["experiment"]["metricInfos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"]["tag"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, vec!["hparams/train_loss", "hparams/em"]);
    assert_eq!(h["_hparams_/session_end_info"]["sessionEndInfo"]["status"], "STATUS_SUCCESS");
}

/// A run killed after step 7 with its last checkpoint at step 3 logs steps 4.. again when it resumes:
/// TensorBoard and metrics.jsonl must each show every step once, with the resumed run's values.
#[test]
fn a_resumed_run_shows_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("metrics.jsonl");
    let tb_dir = dir.path().join("tb");
    let log = |from: u64, to: u64, scale: f64, resumed: Option<u64>| {
        let mut tb = TensorBoard::create(&tb_dir).unwrap();
        let mut js = Jsonl::open(&jsonl).unwrap();
        if let Some(s) = resumed {
            tb.starts_after(s);
            js.starts_after(s);
        }
        for step in from..=to {
            tb.scalars(step, &[("train/loss", scale * step as f64)]);
            js.scalars(step, &[("train/loss", scale * step as f64)]);
        }
        if resumed.is_some() {
            tb.scalars(to, &[("eval/loss", 0.5)]);
        }
    };
    log(1, 7, 1.0, None);
    log(4, 9, 10.0, Some(3));
    let expected: Vec<(u64, f64)> = (1..=9).map(|s| (s, if s <= 3 { s as f64 } else { 10.0 * s as f64 })).collect();
    let r = read(&tb_dir);
    assert_eq!(std::fs::read_dir(&tb_dir).unwrap().count(), 2);
    assert_eq!(points(&r, "train/loss"), expected);
    assert_eq!(points(&r, "eval/loss"), vec![(9, 0.5)]);
    let lines: Vec<(u64, f64)> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["train/loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(lines, expected);
}

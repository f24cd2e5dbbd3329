//! Our event files read by TensorBoard's own `EventAccumulator` (from the `tensorboard` package):
//! scalars with their steps, the config as text, and the hparams plugin's experiment, session start
//! (hyperparameters) and session end.

use ferrotune_data::fixtures;
use ferrotune_trainer::metrics::Logger;
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
for tag, content in ea.PluginTagToContent("hparams").items():
    out["hparams"][tag] = json_format.MessageToDict(plugin_data_pb2.HParamsPluginData.FromString(content))
print(json.dumps(out))
"#;

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
    let o = std::process::Command::new(fixtures::python()).args(["-c", READER]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss: Vec<(u64, f64)> = r["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
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

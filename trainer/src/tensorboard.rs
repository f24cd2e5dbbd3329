//! TensorBoard event files written directly: TFRecord framing (length, masked CRC-32C, payload, masked
//! CRC-32C) around `Event` protobufs encoded with prost from the hand-written message subset below
//! (field numbers from tensorboard/compat/proto/{event,summary,tensor}.proto and
//! plugins/hparams/{api,plugin_data}.proto). Scalars, text (the text plugin's string tensor), hparams
//! (experiment, session start with the hyperparameters, session end) and a SessionLog START on resume.
//! Verified with TensorBoard's own `EventAccumulator` in tests. It does not read event files.

use crate::metrics::Logger;
use prost::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    session_log: Option<SessionLog>,
}

/// `SessionLog` with status START (1): readers drop earlier events at or after its step.
#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    /// DataType enum; DT_STRING = 7.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShape {}

// --- hparams plugin (plugins/hparams/plugin_data.proto, api.proto, google/protobuf/struct.proto) ---

#[derive(Clone, PartialEq, Message)]
struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    version: i32,
    #[prost(message, optional, tag = "2")]
    experiment: Option<Experiment>,
    #[prost(message, optional, tag = "3")]
    session_start_info: Option<SessionStartInfo>,
    #[prost(message, optional, tag = "4")]
    session_end_info: Option<SessionEndInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct Experiment {
    #[prost(message, repeated, tag = "4")]
    hparam_infos: Vec<HParamInfo>,
    #[prost(message, repeated, tag = "5")]
    metric_infos: Vec<MetricInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct HParamInfo {
    #[prost(string, tag = "1")]
    name: String,
    /// DataType: 1 string, 2 bool, 3 float64.
    #[prost(int32, tag = "4")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct MetricInfo {
    #[prost(message, optional, tag = "1")]
    name: Option<MetricName>,
}

#[derive(Clone, PartialEq, Message)]
struct MetricName {
    #[prost(string, tag = "1")]
    group: String,
    #[prost(string, tag = "2")]
    tag: String,
}

#[derive(Clone, PartialEq, Message)]
struct SessionStartInfo {
    #[prost(map = "string, message", tag = "1")]
    hparams: std::collections::HashMap<String, PbValue>,
    #[prost(string, tag = "4")]
    group_name: String,
    #[prost(double, tag = "5")]
    start_time_secs: f64,
}

#[derive(Clone, PartialEq, Message)]
struct SessionEndInfo {
    /// Status: STATUS_SUCCESS = 1.
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(double, tag = "2")]
    end_time_secs: f64,
}

/// google.protobuf.Value (the subset hparams use).
#[derive(Clone, PartialEq, Message)]
struct PbValue {
    #[prost(double, optional, tag = "2")]
    number_value: Option<f64>,
    #[prost(string, optional, tag = "3")]
    string_value: Option<String>,
    #[prost(bool, optional, tag = "4")]
    bool_value: Option<bool>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes one `events.out.tfevents.*` file in a log directory.
pub struct TensorBoard {
    file: std::io::BufWriter<std::fs::File>,
    pub path: PathBuf,
    failed: bool,
}

impl TensorBoard {
    /// Creates a new event file in `logdir` (a resumed run adds a file; TensorBoard reads them all).
    pub fn create(logdir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(logdir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
        let name = format!("events.out.tfevents.{}.{}.{}.ferrotune", now() as u64, host.trim(), std::process::id());
        // A second file in the same second of the same process (a resume in-process) gets a suffix,
        // which sorts after the first: readers load event files in name order.
        let mut path = logdir.join(&name);
        let mut n = 0;
        let file = loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 9 => {
                    n += 1;
                    path = logdir.join(format!("{name}.{n}"));
                }
                r => break std::io::BufWriter::new(r?),
            }
        };
        let mut tb = TensorBoard { file, path, failed: false };
        tb.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
            session_log: None,
        });
        Ok(tb)
    }

    fn write(&mut self, event: &Event) {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let res = (|| {
            self.file.write_all(&len)?;
            self.file.write_all(&masked_crc(&len).to_le_bytes())?;
            self.file.write_all(&data)?;
            self.file.write_all(&masked_crc(&data).to_le_bytes())
        })();
        if let Err(e) = res {
            if !self.failed {
                tracing::warn!("cannot write TensorBoard events to {} ({e}); training goes on", self.path.display());
                self.failed = true;
            }
        }
    }

    fn summary(&mut self, step: u64, value: Vec<SummaryValue>) {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
            session_log: None,
        });
    }

    fn hparams_value(tag: &str, data: HParamsPluginData) -> SummaryValue {
        SummaryValue {
            tag: tag.into(),
            simple_value: None,
            tensor: None,
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData { plugin_name: "hparams".into(), content: data.encode_to_vec() }),
            }),
        }
    }
}

impl Logger for TensorBoard {
    /// A SessionLog START at `step + 1`: TensorBoard drops what an earlier attempt logged after `step`
    /// (EventAccumulator's purge of orphaned data), so a restarted run's curve is shown once.
    fn starts_after(&mut self, step: u64) {
        self.write(&Event {
            wall_time: now(),
            step: step as i64 + 1,
            file_version: None,
            summary: None,
            session_log: Some(SessionLog { status: 1 }),
        });
    }

    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let v = values
            .iter()
            .map(|(tag, x)| SummaryValue {
                tag: (*tag).into(),
                simple_value: Some(*x as f32),
                tensor: None,
                metadata: None,
            })
            .collect();
        self.summary(step, v);
    }

    fn text(&mut self, tag: &str, text: &str) {
        let value = SummaryValue {
            tag: tag.into(),
            simple_value: None,
            tensor: Some(TensorProto {
                dtype: 7,
                tensor_shape: Some(TensorShape {}),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData { plugin_name: "text".into(), content: vec![] }),
            }),
        };
        self.summary(0, vec![value]);
    }

    fn hparams(&mut self, hparams: &BTreeMap<String, serde_json::Value>, metrics: &[(&str, f64)]) {
        let mut infos = vec![];
        let mut values = std::collections::HashMap::new();
        for (k, v) in hparams {
            let (ty, pb) = match v {
                serde_json::Value::Bool(b) => (2, PbValue { bool_value: Some(*b), ..Default::default() }),
                serde_json::Value::Number(n) => (3, PbValue { number_value: n.as_f64(), ..Default::default() }),
                serde_json::Value::String(s) => (1, PbValue { string_value: Some(s.clone()), ..Default::default() }),
                other => (1, PbValue { string_value: Some(other.to_string()), ..Default::default() }),
            };
            infos.push(HParamInfo { name: k.clone(), r#type: ty });
            values.insert(k.clone(), pb);
        }
        let metric_infos = metrics
            .iter()
            .map(|(tag, _)| MetricInfo { name: Some(MetricName { group: String::new(), tag: (*tag).into() }) })
            .collect();
        let exp = HParamsPluginData {
            version: 0,
            experiment: Some(Experiment { hparam_infos: infos, metric_infos }),
            ..Default::default()
        };
        let start = HParamsPluginData {
            version: 0,
            session_start_info: Some(SessionStartInfo {
                hparams: values,
                group_name: String::new(),
                start_time_secs: now(),
            }),
            ..Default::default()
        };
        let end = HParamsPluginData {
            version: 0,
            session_end_info: Some(SessionEndInfo { status: 1, end_time_secs: now() }),
            ..Default::default()
        };
        self.summary(0, vec![Self::hparams_value("_hparams_/experiment", exp)]);
        self.summary(0, vec![Self::hparams_value("_hparams_/session_start_info", start)]);
        // The metric values themselves are scalars under the metric tags.
        self.scalars(0, metrics);
        self.summary(0, vec![Self::hparams_value("_hparams_/session_end_info", end)]);
        self.flush();
    }

    fn flush(&mut self) {
        let _ = self.file.flush();
    }
}

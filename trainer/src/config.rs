//! The model's architecture, read from a Hugging Face `config.json` (Llama family: Llama 2/3/3.1/3.2,
//! SmolLM, TinyLlama and other `LlamaForCausalLM` checkpoints). It accepts both the older `rope_theta` +
//! `rope_scaling` keys and transformers 5's `rope_parameters`. Keys that would change the math but that
//! this implementation does not support are errors; harmless unknown keys are listed in `ignored_keys`.
//! It is not a general transformers config reader: other architectures are refused.

use crate::error::{read_json, Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// How rotary frequencies are scaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    /// Every id that ends generation (config and generation_config eos ids together).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// Storage dtype the checkpoint declares (`dtype` or the older `torch_dtype`), e.g. "bfloat16".
    pub dtype: Option<String>,
    /// Keys present in the file that this reader does not know and that do not affect the math.
    pub ignored_keys: Vec<String>,
    /// The file as read, so that saving writes back every key the user had.
    pub raw: Map<String, Value>,
}

/// Keys read here or known to be irrelevant to the forward pass.
const KNOWN_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "hidden_act",
    "model_type",
    "architectures",
    "attention_dropout",
    "initializer_range",
    "pretraining_tp",
    "use_cache",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "unk_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "tokenizer_class",
    "task_specific_params",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "max_length",
];

impl LlamaConfig {
    /// Reads `DIR/config.json` and, when present, the eos ids of `DIR/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.exists() {
            let msg = ferrotune_data::paths::why_unusable(dir)
                .unwrap_or_else(|| "no config.json: this is not a Hugging Face model directory".into());
            return Err(Error::Checkpoint { path: dir.to_owned(), msg });
        }
        let mut cfg = Self::from_json(&read_json(&path)?, &path)?;
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            if let Some(v) = read_json(&gen)?.get("eos_token_id") {
                for id in token_ids(v, &gen, "eos_token_id")? {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a config object; `path` is only used to name the file in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: path.to_owned(),
            key: "(top level)".into(),
            msg: "expected a JSON object".into(),
        })?;
        let r = Reader { obj, path: path.to_owned() };
        let model_type = r.str("model_type")?.unwrap_or_default();
        if model_type != "llama" {
            return Err(r.err(
                "model_type",
                format!("`{model_type}` is not supported; ferrotune implements the Llama family (`llama`)"),
            ));
        }
        if let Some(act) = r.str("hidden_act")? {
            if act != "silu" {
                return Err(r.err("hidden_act", format!("`{act}` is not supported (only `silu`)")));
            }
        }
        if r.f64("attention_dropout")?.unwrap_or(0.0) != 0.0 {
            return Err(r.err("attention_dropout", "must be 0: attention dropout is not implemented".into()));
        }
        for key in ["sliding_window", "quantization_config", "attn_logit_softcapping", "final_logit_softcapping"] {
            if obj.get(key).is_some_and(|v| !v.is_null()) {
                return Err(r.err(key, "is not supported by ferrotune's Llama; hint: dequantize or convert the checkpoint to a plain Llama first".into()));
            }
        }
        let hidden_size = r.req_i64("hidden_size")?;
        let num_attention_heads = r.req_i64("num_attention_heads")?;
        let num_key_value_heads = r.i64("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = r.i64("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            return Err(r.err("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head_dim")));
        }
        let eos_token_ids = match obj.get("eos_token_id") {
            Some(v) => token_ids(v, path, "eos_token_id")?,
            None => vec![],
        };
        let ignored_keys = obj.keys().filter(|k| !KNOWN_KEYS.contains(&k.as_str())).cloned().collect();
        Ok(LlamaConfig {
            vocab_size: r.req_i64("vocab_size")?,
            hidden_size,
            intermediate_size: r.req_i64("intermediate_size")?,
            num_hidden_layers: r.req_i64("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.f64("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings: r.i64("max_position_embeddings")?.unwrap_or(2048),
            rope: r.rope()?,
            tie_word_embeddings: r.bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.bool("attention_bias")?.unwrap_or(false),
            mlp_bias: r.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: r.i64("bos_token_id")?,
            eos_token_ids,
            pad_token_id: r.i64("pad_token_id")?,
            dtype: r.str("dtype")?.or(r.str("torch_dtype")?),
            ignored_keys,
            raw: obj.clone(),
        })
    }

    /// Parameter count of the architecture (embeddings counted once when tied).
    pub fn num_parameters(&self) -> i64 {
        let (c, f, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        let attn = c * h * d * 2 + c * kv * d * 2 + if self.attention_bias { h * d + 2 * kv * d + c } else { 0 };
        let mlp = 3 * c * f + if self.mlp_bias { 2 * f + c } else { 0 };
        let layer = attn + mlp + 2 * c;
        let emb = self.vocab_size * c;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + self.num_hidden_layers * layer + c
    }
}

fn token_ids(v: &Value, path: &Path, key: &str) -> Result<Vec<i64>> {
    let bad = || Error::Config {
        path: path.to_owned(),
        key: key.into(),
        msg: format!("expected an id or a list of ids, found {v}"),
    };
    match v {
        Value::Null => Ok(vec![]),
        Value::Number(n) => Ok(vec![n.as_i64().ok_or_else(bad)?]),
        Value::Array(a) => a.iter().map(|x| x.as_i64().ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    path: PathBuf,
}

impl Reader<'_> {
    fn err(&self, key: &str, msg: String) -> Error {
        Error::Config { path: self.path.clone(), key: key.into(), msg }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn i64(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| self.err(key, format!("expected an integer, found {v}"))))
            .transpose()
    }
    fn req_i64(&self, key: &str) -> Result<i64> {
        match self.i64(key)? {
            Some(v) if v > 0 => Ok(v),
            Some(v) => Err(self.err(key, format!("must be positive, found {v}"))),
            None => Err(self.err(key, "is missing".into())),
        }
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.err(key, format!("expected a number, found {v}"))))
            .transpose()
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))))
            .transpose()
    }
    fn str(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| self.err(key, format!("expected a string, found {v}")))
            })
            .transpose()
    }

    /// `rope_parameters` (transformers 5) wins over `rope_theta` + `rope_scaling` (older files).
    fn rope(&self) -> Result<RopeConfig> {
        let (key, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, Some(s)) => ("rope_scaling", Some(s)),
            (None, None) => ("rope_scaling", None),
        };
        let empty = Map::new();
        let p = match params {
            Some(v) => v.as_object().ok_or_else(|| self.err(key, format!("expected an object, found {v}")))?,
            None => &empty,
        };
        let sub = Reader { obj: p, path: self.path.clone() };
        let theta = sub.f64("rope_theta")?.or(self.f64("rope_theta")?).unwrap_or(10000.0);
        let kind = sub.str("rope_type")?.or(sub.str("type")?).unwrap_or_else(|| "default".into());
        let num = |name: &str| -> Result<f64> {
            sub.f64(name)?
                .ok_or_else(|| self.err(&format!("{key}.{name}"), format!("is required by rope type `{kind}`")))
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => {
                return Err(self.err(
                    &format!("{key}.rope_type"),
                    format!("`{other}` is not supported (supported: default, linear, llama3)"),
                ))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    }

    #[test]
    fn old_and_new_rope_keys_agree() {
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut new = base();
        new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = LlamaConfig::from_json(&old, Path::new("old.json")).unwrap();
        let b = LlamaConfig::from_json(&new, Path::new("new.json")).unwrap();
        assert_eq!(a.rope, b.rope);
        assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.rope.theta, 500000.0);
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn unsupported_things_are_errors_naming_the_key() {
        let cases = [
            ("model_type", json!("mistral"), "model_type"),
            ("rope_scaling", json!({"type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("sliding_window", json!(4096), "sliding_window"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
        ];
        for (key, value, named) in cases {
            let mut v = base();
            v[key] = value;
            let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
            assert!(err.contains(&format!("`{named}`")), "{err}");
            assert!(err.starts_with("c.json"), "{err}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert_eq!(err, "c.json: config key `vocab_size`: is missing");
    }

    #[test]
    fn parameter_count_matches_transformers() {
        // SmolLM2-135M's config; transformers' `model.num_parameters()` prints 134515008.
        let v = json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "tie_word_embeddings": true});
        assert_eq!(LlamaConfig::from_json(&v, Path::new("c")).unwrap().num_parameters(), 134_515_008);
    }
}

//! How a run config is read: its layers (defaults < the file < `FERROTUNE__SECTION__KEY` environment
//! variables < `--set section.key=value`) merged as TOML tables, every value checked against the type
//! of its default before anything is deserialized (so `epochs = true`, `seed = 1.7` or
//! `batch_size = "2"` are errors naming the key and the layer, never coerced), relative paths resolved
//! by the layer that set them (the file's against the file's directory, `--set` and environment values
//! against the current directory), and the ranges of numeric keys checked with the key named. It does
//! not derive the plan (`plan::resolve`).

use crate::error::{Error, Result};
use crate::plan::RunConfig;
use std::path::{Path, PathBuf};

/// The longest row `data.max_seq_len` may ask for (1 Mi tokens): far above any Llama context, and low
/// enough that a typo is refused before buffers of that size are made.
pub const MAX_SEQ_LEN: usize = 1 << 20;

/// Where a value came from, for messages.
#[derive(Clone)]
enum Layer {
    File(PathBuf),
    Env(String),
    Set,
}

impl Layer {
    fn describe(&self, key: &str) -> String {
        match self {
            Layer::File(p) => format!("{} sets `{key}`", p.display()),
            Layer::Env(var) => format!("environment variable {var}"),
            Layer::Set => format!("--set {key}"),
        }
    }
}

/// A value typed on the command line or in the environment: its TOML reading (`3e-4`, `true`, `"x"`,
/// `[1, 2]`), or the text itself as a string when it is no TOML value or when the key takes a string
/// (so `--set output.run_name=2024` names a run "2024"; the type check then guards every other key).
fn value_of(text: &str, default: Option<&toml::Value>) -> toml::Value {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v) if v.is_str() || !matches!(default, Some(toml::Value::String(_))) => v,
        _ => toml::Value::String(text.to_string()),
    }
}

fn default_of<'a>(defaults: &'a toml::Table, section: &str, key: &str) -> Option<&'a toml::Value> {
    defaults.get(section).and_then(toml::Value::as_table).and_then(|t| t.get(key))
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// `value` where `default` is: the same TOML type, except that an integer may stand for a number.
/// Keys without a default (optional ones) take any scalar; serde checks them.
fn same_type(default: Option<&toml::Value>, value: &toml::Value) -> bool {
    use toml::Value as V;
    match (default, value) {
        (None, _) => true,
        (Some(V::Float(_)), V::Integer(_)) => true,
        (Some(d), v) => std::mem::discriminant(d) == std::mem::discriminant(v),
    }
}

/// Loads the layers into one config. See the module documentation.
pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
    let err = |key: &str, msg: String| Error::Config { path: PathBuf::new(), key: key.into(), msg };
    let defaults: toml::Table = toml::from_str(&toml::to_string(&RunConfig::default()).expect("defaults serialize"))
        .expect("defaults are TOML");
    let mut merged = defaults.clone();
    let mut origin: Vec<(String, Layer)> = vec![];
    let mut set = |section: &str, key: &str, value: toml::Value, layer: Layer| -> Result<()> {
        let full = format!("{section}.{key}");
        let Some(table) = defaults.get(section).and_then(toml::Value::as_table) else {
            return Err(err(
                &full,
                format!(
                    "unknown section `[{section}]` ({}); hint: see configs/ for the documented keys",
                    layer.describe(&full)
                ),
            ));
        };
        if !table.contains_key(key) && !OPTIONAL.contains(&full.as_str()) {
            return Err(err(
                &full,
                format!("unknown key ({}); hint: see configs/ for the documented keys", layer.describe(&full)),
            ));
        }
        let default = table.get(key);
        if !same_type(default, &value) {
            let want = default.map_or("", type_name);
            return Err(err(
                &full,
                format!("expected {want}, found {} `{value}` ({})", type_name(&value), layer.describe(&full)),
            ));
        }
        merged.get_mut(section).and_then(toml::Value::as_table_mut).expect("section").insert(key.into(), value);
        origin.retain(|(k, _)| k != &full);
        origin.push((full, layer));
        Ok(())
    };
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(Error::io(f))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
            path: f.into(),
            key: "(file)".into(),
            msg: format!("not valid TOML: {e}"),
        })?;
        for (section, keys) in table {
            let Some(keys) = keys.as_table() else {
                return Err(Error::Config {
                    path: f.into(),
                    key: section.clone(),
                    msg: format!("expected a section `[{section}]`, found {}", type_name(&keys)),
                });
            };
            for (k, v) in keys {
                set(&section, k, v.clone(), Layer::File(f.into()))?;
            }
        }
    }
    let mut env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("FERROTUNE__")).collect();
    env.sort();
    for (var, text) in env {
        let rest = var["FERROTUNE__".len()..].to_lowercase();
        let (section, key) = rest
            .split_once("__")
            .ok_or_else(|| err(&rest, format!("environment variable {var}: expected FERROTUNE__SECTION__KEY")))?;
        set(section, key, value_of(&text, default_of(&defaults, section, key)), Layer::Env(var.clone()))?;
    }
    for o in overrides {
        let (key, text) = o.split_once('=').ok_or_else(|| err(o, "expected --set section.key=value".into()))?;
        let (section, name) = key.split_once('.').ok_or_else(|| err(key, "expected --set section.key=value".into()))?;
        let (section, name) = (section.trim(), name.trim());
        set(section, name, value_of(text.trim(), default_of(&defaults, section, name)), Layer::Set)?;
    }
    let mut cfg: RunConfig = toml::Value::Table(merged)
        .try_into()
        .map_err(|e| err("(config)", format!("{e}; hint: see configs/ for the documented keys")))?;
    let cwd = std::env::current_dir().map_err(Error::io("."))?;
    for (key, layer) in &origin {
        let p = match key.as_str() {
            "model.path" => &mut cfg.model.path,
            "data.train" => &mut cfg.data.train,
            "data.validation" => &mut cfg.data.validation,
            "output.dir" => &mut cfg.output.dir,
            _ => continue,
        };
        let base = match layer {
            Layer::File(f) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
            Layer::Env(_) | Layer::Set => cwd.clone(),
        };
        if !p.as_os_str().is_empty() && p.is_relative() {
            *p = base.join(&*p);
        }
    }
    // output.dir's default ("runs") is relative to the config file, as before.
    if !origin.iter().any(|(k, _)| k == "output.dir") {
        if let Some(dir) = file.and_then(Path::parent) {
            cfg.output.dir = dir.join(&cfg.output.dir);
        }
    }
    check_ranges(&cfg)?;
    Ok(cfg)
}

/// Keys without a default (absent from the serialized defaults) that a layer may still set.
const OPTIONAL: [&str; 1] = ["data.train_on_inputs"];

/// Every numeric key whose value cannot be right, named with its allowed range.
pub fn check_ranges(c: &RunConfig) -> Result<()> {
    let bad = |key: &str, msg: String| Err(Error::Config { path: PathBuf::new(), key: key.into(), msg });
    let t = &c.train;
    let checks: [(&str, f64, bool, &str); 12] = [
        ("train.lr", t.lr, t.lr > 0.0, "must be positive"),
        ("train.warmup_ratio", t.warmup_ratio, (0.0..=1.0).contains(&t.warmup_ratio), "must lie in [0, 1]"),
        ("train.min_lr_ratio", t.min_lr_ratio, (0.0..=1.0).contains(&t.min_lr_ratio), "must lie in [0, 1]"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0.0, "must be 0 (no clipping) or positive"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0.0, "must not be negative"),
        ("train.beta1", t.beta1, (0.0..1.0).contains(&t.beta1), "must lie in [0, 1)"),
        ("train.beta2", t.beta2, (0.0..1.0).contains(&t.beta2), "must lie in [0, 1)"),
        ("train.eps", t.eps, t.eps > 0.0, "must be positive"),
        (
            "train.epochs",
            t.epochs,
            t.epochs >= 0.0 && t.epochs.is_finite(),
            "must be a finite number of epochs, 0 or more",
        ),
        ("train.peak_flops", t.peak_flops, t.peak_flops >= 0.0, "must be 0 (measure it) or positive"),
        ("lora.alpha", c.lora.alpha, c.lora.alpha > 0.0, "must be positive"),
        ("lora.dropout", c.lora.dropout, (0.0..1.0).contains(&c.lora.dropout), "must lie in [0, 1)"),
    ];
    for (key, value, ok, rule) in checks {
        if !ok || value.is_nan() {
            return bad(key, format!("{value} {rule}"));
        }
    }
    let counts: [(&str, usize, usize); 3] = [
        ("data.max_seq_len", c.data.max_seq_len, 2),
        ("train.micro_batch_size", t.micro_batch_size, 1),
        ("eval.batch_size", c.eval.batch_size, 1),
    ];
    for (key, value, least) in counts {
        if value < least {
            return bad(key, format!("{value} must be at least {least}"));
        }
    }
    if c.data.max_seq_len > MAX_SEQ_LEN {
        return bad(
            "data.max_seq_len",
            format!("{} is over the limit of {MAX_SEQ_LEN} tokens a row", c.data.max_seq_len),
        );
    }
    if !["auto", "fp32", "bf16"].contains(&c.output.save_dtype.as_str()) {
        return bad("output.save_dtype", format!("`{}` is not auto, fp32 or bf16", c.output.save_dtype));
    }
    if !["fp32", "bf16"].contains(&t.optimizer_dtype.as_str()) {
        return bad("train.optimizer_dtype", format!("`{}` is not fp32 or bf16", t.optimizer_dtype));
    }
    if t.optimizer_dtype == "bf16" && ["fp32", "float32"].contains(&c.model.dtype.as_str()) {
        return bad(
            "train.optimizer_dtype",
            "bf16 state needs a bf16 model, and model.dtype is fp32; hint: model.dtype = \"bf16\" (or \"auto\" on bf16 hardware)".into(),
        );
    }
    if c.lora.enabled && c.lora.r <= 0 {
        return bad("lora.r", format!("{} must be positive", c.lora.r));
    }
    let e = &c.eval;
    if !(e.early_stopping_min_delta >= 0.0 && e.early_stopping_min_delta.is_finite()) {
        return bad("eval.early_stopping_min_delta", format!("{} must be 0 or positive", e.early_stopping_min_delta));
    }
    if !crate::evaluation::METRICS.contains(&e.early_stopping_metric.as_str()) {
        let msg = format!("`{}` is not one of {}", e.early_stopping_metric, crate::evaluation::METRICS.join(", "));
        return bad("eval.early_stopping_metric", msg);
    }
    if e.early_stopping_patience > 0 {
        if e.n_evals == 0 || c.data.validation.as_os_str().is_empty() {
            return bad(
                "eval.early_stopping_patience",
                "early stopping needs evaluations: set data.validation and eval.n_evals".into(),
            );
        }
        if matches!(e.early_stopping_metric.as_str(), "em" | "f1") && !e.coqa {
            return bad("eval.early_stopping_metric", format!("`{}` needs eval.coqa = true", e.early_stopping_metric));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, sets: &[&str]) -> (tempfile::TempDir, Result<RunConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.toml");
        std::fs::write(&f, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let r = load(Some(&f), &sets);
        (dir, r)
    }

    fn error(text: &str, sets: &[&str]) -> String {
        load_text(text, sets).1.unwrap_err().to_string()
    }

    /// Before this module the `config` crate coerced all three (true -> 1 epoch, 1.7 -> seed 1 or 2,
    /// "2" -> 2): each is now an error naming the key, what it expected and where the value came from.
    #[test]
    fn type_errors_are_errors_naming_key_and_layer() {
        let e = error("[train]\nepochs = true\n", &[]);
        assert!(
            e.contains("`train.epochs`")
                && e.contains("expected a number, found a boolean")
                && e.contains("run.toml sets"),
            "{e}"
        );
        let e = error("[train]\nseed = 1.7\n", &[]);
        assert!(e.contains("`train.seed`") && e.contains("expected an integer, found a number `1.7`"), "{e}");
        let e = error("[train]\nbatch_size = \"2\"\n", &[]);
        assert!(e.contains("`train.batch_size`") && e.contains("expected an integer, found a string"), "{e}");
        let e = error("", &["lora.enabled=yes"]);
        assert!(
            e.contains("`lora.enabled`") && e.contains("expected a boolean") && e.contains("--set lora.enabled"),
            "{e}"
        );
        let e = error("[train]\nlearning_rate = 1e-4\n", &[]);
        assert!(e.contains("`train.learning_rate`") && e.contains("unknown key"), "{e}");
        let e = error("train = 3\n", &[]);
        assert!(e.contains("expected a section `[train]`"), "{e}");
        // An integer stands for a number; a bare word or number for a string key is that text.
        let (_d, c) = load_text("[train]\nlr = 1\n", &["output.run_name=2024", "data.strategy=last"]);
        let c = c.unwrap();
        assert_eq!((c.train.lr, c.output.run_name.as_str(), c.data.strategy.as_str()), (1.0, "2024", "last"));
    }

    #[test]
    fn ranges_are_checked_with_the_key_named() {
        for (set, key) in [
            ("train.lr=0", "train.lr"),
            ("train.lr=-1e-4", "train.lr"),
            ("train.warmup_ratio=1.5", "train.warmup_ratio"),
            ("train.warmup_ratio=-0.1", "train.warmup_ratio"),
            ("train.max_grad_norm=-1", "train.max_grad_norm"),
            ("train.weight_decay=-0.1", "train.weight_decay"),
            ("train.beta1=1.0", "train.beta1"),
            ("train.beta2=-0.5", "train.beta2"),
            ("train.eps=0", "train.eps"),
            ("train.epochs=nan", "train.epochs"),
            ("lora.alpha=0", "lora.alpha"),
            ("lora.dropout=1.0", "lora.dropout"),
            ("lora.r=0", "lora.r"),
            ("train.micro_batch_size=0", "train.micro_batch_size"),
            ("data.max_seq_len=0", "data.max_seq_len"),
            ("data.max_seq_len=1000000000", "data.max_seq_len"),
        ] {
            let e = error("", &[set]);
            assert!(e.contains(&format!("config key `{key}`")), "{set}: {e}");
        }
        let e = error("", &["data.max_seq_len=1000000000"]);
        assert!(e.contains("over the limit of 1048576"), "{e}");
        load_text("", &["train.max_grad_norm=0", "train.warmup_ratio=1", "lora.dropout=0"]).1.unwrap();
    }

    /// The file's relative paths are the file's directory's; those given with --set (and in the
    /// environment) are the current directory's, as a shell user means them.
    #[test]
    fn relative_paths_resolve_by_the_layer_that_set_them() {
        let (dir, c) =
            load_text("[data]\ntrain = \"data/train.jsonl\"\n", &["data.validation=val.jsonl", "model.path=m"]);
        let c = c.unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.data.train, dir.path().join("data/train.jsonl"));
        assert_eq!(c.data.validation, cwd.join("val.jsonl"));
        assert_eq!(c.model.path, cwd.join("m"));
        assert_eq!(c.output.dir, dir.path().join("runs"), "the default output dir stays beside the file");
        let (_d, c) = load_text("", &["output.dir=out"]);
        assert_eq!(c.unwrap().output.dir, cwd.join("out"));
    }
}

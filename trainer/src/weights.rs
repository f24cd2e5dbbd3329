//! Reading and writing Hugging Face safetensors checkpoints: one `model.safetensors`, or an index
//! (`model.safetensors.index.json`) with shards. Shards are memory-mapped one at a time and each tensor
//! is copied (and converted to the model's dtype) straight into its variable, so the process never holds
//! two full copies of the weights. Every failure names the file and the tensor. It knows nothing of
//! LoRA adapters or optimizer state.

use crate::error::{read_json, Error, Result};
use crate::model::Llama;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE: &str = "model.safetensors";

/// Which file holds each tensor.
pub struct CheckpointFiles {
    /// Tensor name -> shard file name.
    pub weight_map: BTreeMap<String, String>,
    /// Shard file names, in the order they are read.
    pub shards: Vec<String>,
    /// The index file, when the checkpoint is sharded.
    pub index: Option<PathBuf>,
}

/// Finds the checkpoint files of `dir`; for a single file, the map comes from its header.
pub fn checkpoint_files(dir: &Path) -> Result<CheckpointFiles> {
    let index = dir.join(INDEX);
    if index.exists() {
        let v = read_json(&index)?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
            path: index.clone(),
            msg: "no `weight_map` object; hint: the index must map each tensor name to its shard file".into(),
        })?;
        let mut weight_map = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                msg: format!("weight_map[{name:?}] is not a file name"),
            })?;
            weight_map.insert(name.clone(), file.to_owned());
        }
        let mut shards: Vec<String> = weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        return Ok(CheckpointFiles { weight_map, shards, index: Some(index) });
    }
    let single = dir.join(SINGLE);
    if single.exists() {
        let mmap = map_file(&single)?;
        let st = deserialize(&mmap, &single)?;
        let weight_map = st.names().into_iter().map(|n| (n.to_owned(), SINGLE.to_owned())).collect();
        return Ok(CheckpointFiles { weight_map, shards: vec![SINGLE.into()], index: None });
    }
    let hint = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        "hint: this checkpoint is in PyTorch pickle format; re-save it with transformers' save_pretrained(..., safe_serialization=True)"
    } else {
        "hint: point --model at a Hugging Face model directory"
    };
    Err(Error::Checkpoint { path: dir.to_owned(), msg: format!("neither {SINGLE} nor {INDEX} found; {hint}") })
}

/// Tensors that some checkpoints carry but that are derived, not learned.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Fills every parameter of `model` from the checkpoint in `dir`.
pub fn load(model: &Llama, dir: &Path) -> Result<()> {
    let files = checkpoint_files(dir)?;
    let listing = files.index.clone().unwrap_or_else(|| dir.join(SINGLE));
    let vars = model.vs.variables();
    let tied = model.config.tie_word_embeddings;
    for name in vars.keys() {
        if !files.weight_map.contains_key(name) {
            return Err(Error::Tensor {
                path: listing,
                tensor: name.clone(),
                msg: "missing from the checkpoint; hint: is this a checkpoint of the architecture in config.json?"
                    .into(),
            });
        }
    }
    for name in files.weight_map.keys() {
        let expected = vars.contains_key(name) || ignorable(name) || (tied && name == "lm_head.weight");
        if !expected {
            return Err(Error::Tensor {
                path: listing,
                tensor: name.clone(),
                msg:
                    "is not a parameter of this Llama (unexpected tensor); hint: check config.json against the weights"
                        .into(),
            });
        }
    }
    let mut loaded: HashMap<&str, ()> = HashMap::new();
    let _guard = tch::no_grad_guard();
    for shard in &files.shards {
        let path = dir.join(shard);
        if !path.exists() {
            let example = files.weight_map.iter().find(|(_, f)| *f == shard).map(|(n, _)| n.as_str()).unwrap_or("");
            return Err(Error::Checkpoint {
                path,
                msg: format!(
                    "shard is missing (the index lists it for `{example}` and others); hint: re-download or re-save the checkpoint"
                ),
            });
        }
        let mmap = map_file(&path)?;
        let st = deserialize(&mmap, &path)?;
        // Sorted, so that the first problem reported is the same on every run.
        let mut names = st.names();
        names.sort();
        for name in names {
            let view = st.tensor(name).map_err(|e| Error::Tensor {
                path: path.clone(),
                tensor: name.into(),
                msg: e.to_string(),
            })?;
            // A tensor the index places in another shard is skipped here: the index is authoritative.
            if files.weight_map.get(name).map(String::as_str) != Some(shard.as_str()) {
                continue;
            }
            let Some((key, var)) = vars.get_key_value(name) else { continue };
            let want = var.size();
            let have: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if want != have {
                return Err(Error::Tensor {
                    path,
                    tensor: name.into(),
                    msg: format!("shape {have:?} in the file, but config.json implies {want:?}"),
                });
            }
            let src = tensor_of_view(&view, &path, name)?;
            var.shallow_clone().f_copy_(&src).map_err(|e| Error::Tensor {
                path: path.clone(),
                tensor: name.into(),
                msg: e.to_string(),
            })?;
            loaded.insert(key.as_str(), ());
        }
    }
    if let Some(name) = vars.keys().find(|n| !loaded.contains_key(n.as_str())) {
        let shard = &files.weight_map[name];
        return Err(Error::Tensor {
            path: dir.join(shard),
            tensor: name.clone(),
            msg: "the index places it in this shard, but the shard does not contain it".into(),
        });
    }
    Ok(())
}

pub fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    // Safety: the file is only read, and a checkpoint is not expected to change while it is loaded.
    unsafe { memmap2::Mmap::map(&file) }.map_err(Error::io(path))
}

pub fn deserialize<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
        path: path.to_owned(),
        msg: format!(
            "not a valid safetensors file ({e}); hint: the file is truncated or corrupt, re-download or re-save it"
        ),
    })
}

/// The dtype `dir`'s checkpoint stores its weights in (that of `model.embed_tokens.weight`, read from
/// its shard's header): what a full fine-tuning export is written in unless the run says otherwise.
pub fn stored_kind(dir: &Path) -> Result<Kind> {
    let files = checkpoint_files(dir)?;
    let name = "model.embed_tokens.weight";
    let shard = files.weight_map.get(name).ok_or_else(|| Error::Tensor {
        path: dir.to_owned(),
        tensor: name.into(),
        msg: "missing from the checkpoint".into(),
    })?;
    let path = dir.join(shard);
    let mmap = map_file(&path)?;
    let view = deserialize(&mmap, &path)?.tensor(name).map_err(|e| Error::Tensor {
        path: path.clone(),
        tensor: name.into(),
        msg: e.to_string(),
    })?;
    kind_of(view.dtype()).ok_or_else(|| Error::Tensor {
        path,
        tensor: name.into(),
        msg: format!("dtype {:?} is not a float dtype ferrotune writes", view.dtype()),
    })
}

pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        _ => return None,
    })
}

pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        _ => return None,
    })
}

/// A CPU tensor over the view's bytes: borrowed from the mapping when aligned, copied once otherwise.
/// The result must not outlive `view`.
pub fn tensor_of_view(view: &TensorView<'_>, path: &Path, name: &str) -> Result<Tensor> {
    let kind = kind_of(view.dtype()).ok_or_else(|| Error::Tensor {
        path: path.to_owned(),
        tensor: name.into(),
        msg: format!("dtype {:?} is not supported (expected F32, F16, BF16 or F64)", view.dtype()),
    })?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let data = view.data();
    let elt = kind.elt_size_in_bytes();
    if (data.as_ptr() as usize).is_multiple_of(elt) {
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        // Safety: `data` holds numel * elt bytes (checked by safetensors) and outlives the returned
        // tensor, which callers only read and drop before the mapping.
        Ok(unsafe { Tensor::from_blob(data.as_ptr(), &shape, &strides, kind, Device::Cpu) })
    } else {
        Ok(Tensor::from_slice(data).view_dtype(kind).reshape(&shape))
    }
}

/// Writes `tensors` to one safetensors file at `path`, each converted to `kind` or, with `None`, kept in
/// its own dtype. The file is written under a temporary name and renamed, so it is complete or absent.
pub fn write_file(path: &Path, tensors: &[&(String, Tensor)], kind: Option<Kind>) -> Result<usize> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).to_kind(kind.unwrap_or(t.kind())).contiguous();
        let dtype =
            dtype_of(t.kind()).ok_or_else(|| Error::Invalid(format!("cannot save `{name}` as {:?}", t.kind())))?;
        let numel = t.numel();
        let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut buf, numel)?;
        bufs.push((name.clone(), dtype, t.size().iter().map(|&d| d as usize).collect(), buf));
    }
    let bytes = bufs.iter().map(|b| b.3.len()).sum();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(name, dtype, shape, buf)| {
            (name.clone(), TensorView::new(*dtype, shape.clone(), buf).expect("shape matches buffer"))
        })
        .collect();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| Error::Checkpoint { path: path.to_owned(), msg: format!("cannot write: {e}") })?;
    // safetensors creates its file with mode 0600; give it the user's umask like every other file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666 & !umask())).map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))?;
    Ok(bytes)
}

/// The process's file-mode creation mask (from /proc/self/status; 022 where it cannot be read).
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0o022)
}

/// Writes `tensors` as safetensors shards of at most `max_shard_bytes` (plus an index when there is more
/// than one) into `dir`, which must exist. Tensors are converted to `kind` first.
pub fn save_tensors(dir: &Path, tensors: &[(String, Tensor)], kind: Kind, max_shard_bytes: usize) -> Result<()> {
    let elt = kind.elt_size_in_bytes();
    let mut groups: Vec<Vec<&(String, Tensor)>> = vec![vec![]];
    let mut size = 0usize;
    for t in tensors {
        let bytes = t.1.numel() * elt;
        if size > 0 && size + bytes > max_shard_bytes {
            groups.push(vec![]);
            size = 0;
        }
        size += bytes;
        groups.last_mut().expect("one group").push(t);
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, group) in groups.iter().enumerate() {
        let file = if n == 1 { SINGLE.to_owned() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        total += write_file(&dir.join(&file), group, Some(kind))?;
        for (name, _) in group {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX);
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json")).map_err(Error::io(&path))?;
    }
    Ok(())
}

/// Saves `model` as a Hugging Face checkpoint in `dir` (created if missing; must be empty): sharded
/// safetensors in `kind`, index and `config.json`. Callers that publish it make it appear complete or
/// not at all through `checkpoint::publish_dir`.
pub fn save_pretrained(model: &Llama, dir: &Path, kind: Kind, max_shard_bytes: usize) -> Result<()> {
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Checkpoint {
            path: dir.to_owned(),
            msg: "already exists and is not empty; hint: choose a new output directory".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    save_tensors(dir, &model.named_parameters(), kind, max_shard_bytes)?;
    let mut config = model.config.raw.clone();
    config.remove("torch_dtype");
    config.insert("dtype".into(), dtype_name(kind).into());
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json")).map_err(Error::io(&path))
}

/// The transformers name of a dtype ("float32", "bfloat16", ...).
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "unknown",
    }
}

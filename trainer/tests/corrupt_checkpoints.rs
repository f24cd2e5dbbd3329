//! Every way a checkpoint can be broken gives an error that names the file and the tensor, never a
//! panic: missing shard, tensor missing from the index or from its shard, unexpected tensor, shape
//! mismatch, truncated file, garbage header, no weights at all.

mod common;

use ferrotune_trainer::{load_model, weights};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// A private copy of tiny-llama-bias (2 shards + index) to break.
fn copy() -> (tempfile::TempDir, PathBuf) {
    let src = common::fixture("tiny-llama-bias");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn error(dir: &Path) -> String {
    match load_model(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading a broken checkpoint succeeded"),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

#[test]
fn intact_copy_loads() {
    let (_t, dir) = copy();
    load_model(&dir, Kind::Float, Device::Cpu).unwrap();
}

#[test]
fn missing_shard() {
    let (_t, dir) = copy();
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    let e = error(&dir);
    assert!(e.contains(SHARD2) && e.contains("shard is missing"), "{e}");
}

#[test]
fn tensor_missing_from_index() {
    let (_t, dir) = copy();
    edit_json(&dir.join(weights::INDEX), |v| {
        v["weight_map"].as_object_mut().unwrap().remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = error(&dir);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing") && e.contains(weights::INDEX),
        "{e}"
    );
}

#[test]
fn tensor_missing_from_its_shard() {
    let (_t, dir) = copy();
    // The index claims shard 2 holds a tensor that is really in shard 1.
    let mut moved = String::new();
    edit_json(&dir.join(weights::INDEX), |v| {
        let map = v["weight_map"].as_object_mut().unwrap();
        let (name, _) = map.iter().find(|(_, f)| f.as_str() == Some(SHARD1)).unwrap();
        moved = name.clone();
        map.insert(moved.clone(), SHARD2.into());
    });
    let e = error(&dir);
    assert!(e.contains(&moved) && e.contains(SHARD2) && e.contains("does not contain it"), "{e}");
}

#[test]
fn unexpected_tensor() {
    let (_t, dir) = copy();
    edit_json(&dir.join(weights::INDEX), |v| {
        v["weight_map"]["model.layers.7.self_attn.q_proj.weight"] = SHARD1.into();
    });
    let e = error(&dir);
    assert!(e.contains("model.layers.7.self_attn.q_proj.weight") && e.contains("unexpected"), "{e}");
}

#[test]
fn shape_mismatch() {
    let (_t, dir) = copy();
    edit_json(&dir.join("config.json"), |v| v["intermediate_size"] = 128.into());
    let e = error(&dir);
    // Sorted order makes the first offender the down projection of layer 0: [64, 160] on disk.
    assert!(
        e.contains("model.layers.0.mlp.down_proj") && e.contains("shape [") && e.contains("config.json implies"),
        "{e}"
    );
    assert!(e.contains("160") && e.contains("128") && e.contains(".safetensors"), "{e}");
}

#[test]
fn truncated_shard() {
    let (_t, dir) = copy();
    let path = dir.join(SHARD1);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    let e = error(&dir);
    assert!(e.contains(SHARD1) && e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn garbage_header() {
    let (_t, dir) = copy();
    let path = dir.join(SHARD2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"not json");
    std::fs::write(&path, bytes).unwrap();
    let e = error(&dir);
    assert!(e.contains(SHARD2) && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn no_weights_and_no_config() {
    let (_t, dir) = copy();
    for f in [SHARD1, SHARD2, weights::INDEX] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let e = error(&dir);
    assert!(e.contains("neither model.safetensors nor model.safetensors.index.json"), "{e}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = error(&dir);
    assert!(e.contains("no config.json"), "{e}");
}

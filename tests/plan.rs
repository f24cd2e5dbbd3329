//! `ferrotune plan` through the real binary, on the shipped Llama 3.1 8B architecture
//! (configs/models/Llama-3.1-8B/config.json, no weights): the parts and their sum, the fit against a
//! stated device, the changes that would make a run fit, the JSON form, and the errors. The numbers
//! themselves are pinned in trainer/src/memory.rs's unit test and, against measured runs, in README
//! (benches/memory.rs).

use ferrotune_data::fixtures;
use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    let root = fixtures::repo_root();
    let model = root.join("configs/models/Llama-3.1-8B");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"{}\"\ndtype = \"bf16\"\ndevice = \"cuda\"\n[data]\nmax_seq_len = 8192\n[train]\nmicro_batch_size = 1\nbatch_size = 8\n",
            model.display()
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("plan")
        .arg(&config)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn full_fine_tuning_of_8b_does_not_fit_one_80gb_gpu_and_lora_does() {
    let full = json(&plan(&["--set", "lora.enabled=false", "--device-memory", "80GB", "--json"]));
    let parts = full["parts"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "weights",
            "gradients",
            "optimizer state",
            "activations",
            "backward working set",
            "loss chunk",
            "gradient buckets",
            "optimizer step",
            "allowance"
        ]
    );
    let sum: f64 = parts.iter().map(|p| p["bytes"].as_f64().unwrap()).sum();
    assert!((sum - full["predicted_bytes"].as_f64().unwrap()).abs() < 1.0);
    // 16 B a parameter before activations: over 128 GB.
    assert!(full["predicted_bytes"].as_f64().unwrap() > 128e9);
    assert_eq!(full["fits"], false);
    let knobs: Vec<String> = full["knobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["set"].as_array().unwrap()[0].as_str().unwrap().to_owned())
        .collect();
    assert!(knobs.contains(&"lora.enabled=true".to_owned()), "{knobs:?}");

    let lora = json(&plan(&["--device-memory", "80GB", "--json"]));
    assert_eq!(lora["fits"], true);
    assert!(lora["predicted_bytes"].as_f64().unwrap() < 40e9);

    let o = plan(&["--set", "lora.enabled=false", "--device-memory", "80GB"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("does not fit") && out.contains("--set lora.enabled=true"), "{out}");
    let o = plan(&["--device-memory", "141GiB"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("fits:"));
}

/// On 8 ranks full fine-tuning fits 80 GB once the optimizer state is sharded: `plan` says so first,
/// and with `train.shard` set it divides the optimizer state by 8.
#[test]
fn on_8_ranks_plan_suggests_sharding_and_accounts_for_it() {
    let full = json(&plan(&["--set", "lora.enabled=false", "--device-memory", "80GB", "--world", "8", "--json"]));
    assert_eq!(full["fits"], false);
    let first: Vec<&str> =
        full["knobs"].as_array().unwrap()[..2].iter().map(|k| k["set"][0].as_str().unwrap()).collect();
    assert_eq!(first, ["train.shard=optimizer", "train.shard=gradients"]);
    let part = |v: &serde_json::Value, n: &str| {
        v["parts"].as_array().unwrap().iter().find(|p| p["name"] == n).unwrap()["bytes"].as_f64().unwrap()
    };
    for shard in ["optimizer", "gradients"] {
        let set = format!("train.shard={shard}");
        let v = json(&plan(&[
            "--set",
            "lora.enabled=false",
            "--set",
            &set,
            "--device-memory",
            "80GB",
            "--world",
            "8",
            "--json",
        ]));
        assert_eq!(v["fits"], true, "{shard}");
        assert!((part(&v, "optimizer state") - part(&full, "optimizer state") / 8.0).abs() < 1.0, "{shard}");
    }
}

#[test]
fn errors_name_the_key_or_the_flag() {
    let o = plan(&["--set", "model.path=\"\"", "--device-memory", "80GB"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("`model.path` is not set"), "{err}");
    let o = plan(&["--device-memory", "80 parsecs"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown unit"), "{err}");
    let o = plan(&["--set", "train.activation_checkpointing=\"sometimes\"", "--device-memory", "80GB"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train.activation_checkpointing"), "{err}");
}

//! `scripts/gpu-check --device cpu --quick`, the reduced form of the GPU host check, run as CI runs it so
//! that the script cannot rot: parts 1-3 (environment, parity with transformers, a full and a LoRA step
//! with peft, greedy generation) must pass on CPU with the script's own tolerances; part 4 (NCCL) is
//! GPU-only and must be reported skipped, not passed, though its launch rehearsal on the CPU ring must
//! succeed; part 5 (throughput) is skipped by --quick. The numbers it compares come from tests/oracle.py
//! (transformers + peft) run by the script itself.

use ferrotune_data::fixtures;
use serde_json::Value;
use std::process::Command;

/// `scripts/gpu-check --device cpu --quick` with `bin` as ferrotune, writing under `tmp`.
fn gpu_check(tmp: &std::path::Path, bin: &str) -> std::process::Output {
    Command::new(fixtures::python())
        .arg(fixtures::repo_root().join("scripts/gpu-check"))
        .args(["--device", "cpu", "--quick", "--out"])
        .arg(tmp.join("out"))
        .arg("--work")
        .arg(tmp.join("work"))
        .arg("--tokenizer")
        .arg(fixtures::ensure("llama3-tokenizer"))
        .env("FERROTUNE_BIN", bin)
        .env("FERROTUNE_HOME", tmp.join("home")) // its peak cache, not the user's
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap()
}

#[test]
fn gpu_check_quick_on_cpu_passes_and_skips_the_gpu_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = gpu_check(tmp.path(), env!("CARGO_BIN_EXE_ferrotune"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "gpu-check failed");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap()).unwrap();
    let parts = report["parts"].as_array().unwrap();
    let status: Vec<&str> = parts.iter().map(|p| p["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["pass", "pass", "pass", "skipped", "skipped"], "{report}");
    let checks = |n: usize| parts[n - 1]["checks"].as_array().unwrap().clone();
    // Every check of parts 2 and 3 ran and held; 3 has two steps of four checks (loss, clipped norm,
    // clipped gradients, parameters) and generation.
    assert!(checks(2).len() == 4 && checks(3).len() == 9, "{report}");
    assert!(checks(2).iter().chain(&checks(3)).all(|c| c["ok"] == true), "{report}");
    // The NCCL part ran its launch rehearsal (2 CPU ranks, then 1 rank with twice the micro-batch).
    assert_eq!(checks(4).len(), 2, "{report}");
    assert!(checks(4).iter().all(|c| c["ok"] == true), "{report}");
    assert!(parts[3]["reason"].as_str().unwrap().starts_with("GPU only"), "{report}");
    assert_eq!(parts[4]["reason"], "--quick");
    assert!(parts[0]["numbers"]["peak_bf16_tflops"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    assert!(md.contains("| 4 NCCL and launch | skipped |"), "{md}");
}

/// A broken ferrotune fails every part that runs it, each on its own: the run goes on to the end,
/// writes its report and exits 1; the GPU-only part's rehearsal fails too, so it is not "skipped".
#[test]
fn a_failing_part_is_reported_and_does_not_stop_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = gpu_check(tmp.path(), "/bin/false");
    println!("{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(o.status.code(), Some(1));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap()).unwrap();
    let status: Vec<&str> = report["parts"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["fail", "fail", "fail", "fail", "skipped"], "{report}");
    assert!(report["parts"][1]["reason"].as_str().unwrap().contains("exited 1"), "{report}");
}

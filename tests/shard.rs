//! Sharded data parallelism (`train.shard = "optimizer" | "gradients"`, ZeRO stages 1 and 2) through
//! the real binaries on CPU (TCP ring), on the tiny Llama fixture: 2 and 3 ranks equal 1 rank with the
//! same global batch (full fine-tuning in fp32 and bf16, and LoRA), each rank holds 1/W of the
//! optimizer state, sharded checkpoints resume exactly on the same and on other world sizes, and a
//! rank that dies while writing its slice never leaves a checkpoint that `--resume` takes. Expected
//! values are the unsharded or uninterrupted runs of the same config in the same test.

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

/// 24 conversations that pack two to a row of 64 tokens: 12 rows, which 1, 2, 3 and 6 ranks divide
/// (so no world size pads an epoch and every world size reads the same rows per step).
fn sharded_job(extra: &[&str]) -> Job {
    job_of(24, "Say {i}, then count a little further.", extra)
}

/// A launch of `n` ranks with `sets`, then `flags` for `train` (`--resume`, `--stop-after-steps N`),
/// asserting success; returns stderr.
fn run_ranks(j: &Job, out: &str, n: usize, sets: &[&str], flags: &[&str]) -> String {
    let args = [format!("--nproc-per-node={n}"), "--master-port".into(), free_port().to_string()];
    let mut c = launch(j, out, &args);
    for s in sets {
        c.args(["--set", s]);
    }
    ok(c.args(flags).output().unwrap()).1
}

/// The per-rank optimizer bytes and the unsharded bytes from the log line of `log_sharding`.
fn optimizer_bytes(err: &str) -> (Vec<f64>, f64) {
    let line = err.lines().find(|l| l.contains("optimizer state per rank")).expect("optimizer state line");
    let nums = line.split("): ").nth(1).unwrap();
    let (ranks, whole) = nums.split_once(" of ").unwrap();
    let bytes = |s: &str| s.split_whitespace().next().unwrap().parse::<f64>().unwrap();
    (ranks.split(", ").map(bytes).collect(), bytes(whole))
}

/// 1 rank (unsharded) against `cases` of (ranks, shard), all with the global batch `batch` and
/// buckets of 0.5 MiB (so several reduce-scatters of uneven parts run while backward does): the same
/// losses (1e-6 relative), final weights within `tol` of 1 rank's, and 1/W of the optimizer state on
/// every rank (to one element of state: slices of ceil(P/W) elements). A sharded case whose world
/// size also has a `none` case is held to 1e-6 of that one: sharding itself changes nothing.
fn sharded_equals_one_rank(extra: &[&str], batch: &str, cases: &[(usize, &str)], weights: &str, tol: f32) {
    let mut sets = vec![batch];
    sets.extend_from_slice(extra);
    let j = sharded_job(&sets);
    let err = run_ranks(&j, "one", 1, &[], &[]);
    let (one, whole) = optimizer_bytes(&err);
    assert_eq!(one, [whole]);
    let reference = tensors(&j.run_dir("one").join(weights));
    for &(n, shard) in cases {
        let out = format!("{n}-{shard}");
        let shard_set = format!("train.shard={shard}");
        let err = run_ranks(&j, &out, n, &[&shard_set, "train.bucket_mb=0.5"], &[]);
        same_losses(&j.run_dir("one"), &j.run_dir(&out));
        let mine = tensors(&j.run_dir(&out).join(weights));
        let d = max_diff(&reference, &mine);
        println!("{out}: max weight difference against 1 rank {d:e}");
        assert!(d <= tol, "{out}: final weights differ by {d}");
        let (per_rank, all) = optimizer_bytes(&err);
        assert_eq!((all, per_rank.len()), (whole, n));
        if shard == "none" {
            continue;
        }
        assert!(err.contains("reduce-scattered over"), "{err}");
        if cases.contains(&(n, "none")) {
            let d = max_diff(&tensors(&j.run_dir(&format!("{n}-none")).join(weights)), &mine);
            println!("{out}: max weight difference against {n} unsharded ranks {d:e}");
            assert!(d <= 1e-6, "{out}: final weights differ from {n} unsharded ranks' by {d}");
        }
        println!("{out}: optimizer bytes per rank {per_rank:?} of {whole}");
        // Moments (8 B) and, in bf16, masters (4 B) of one element at most apart from 1/W.
        for b in &per_rank {
            assert!((b - whole / n as f64).abs() <= 12.0, "{out}: {b} bytes, 1/{n} of {whole} expected");
        }
        assert_eq!(per_rank.iter().sum::<f64>(), whole);
    }
}

#[test]
fn full_fine_tuning_sharded_over_2_and_3_ranks_equals_one_rank() {
    let cases = [(2, "optimizer"), (2, "gradients"), (3, "optimizer"), (3, "gradients")];
    sharded_equals_one_rank(
        &["lora.enabled=false", "train.lr=1e-4", "output.save_dtype=fp32"],
        "train.batch_size=6",
        &cases,
        "model",
        1e-6,
    );
}

/// bf16 with fp32 masters, on 2 ranks against 1 rank with twice the batch: one rank adds its two
/// micro-batches' bf16 gradients (rounded once to bf16), two ranks sum the same two in fp32 and round
/// once, so the sums are the same numbers. (With 3 ranks they are not: one rank rounds after each of
/// two additions, the ring after both; that is bf16 accumulation, not sharding, and the fp32 test
/// covers 3 ranks.) The weights are compared in bf16, where 1e-6 means equal.
#[test]
fn bf16_full_fine_tuning_sharded_over_2_ranks_equals_one_rank() {
    let extra = ["lora.enabled=false", "train.lr=1e-4", "model.dtype=bf16"];
    sharded_equals_one_rank(&extra, "train.batch_size=2", &[(2, "optimizer"), (2, "gradients")], "model", 1e-6);
}

/// LoRA with dropout: 6 micro-batches summed in another order (2 or 3 ranks against 1) move the
/// adapters by up to 1.7e-6 here with or without sharding (Adam divides the near-zero first gradients
/// of the B matrices by their own size), so against 1 rank the weights are held to 5e-6, and against
/// unsharded training on the same ranks to 1e-6.
#[test]
fn lora_sharded_over_2_and_3_ranks_equals_one_rank() {
    let cases = [(2, "none"), (2, "gradients"), (3, "none"), (3, "optimizer")];
    sharded_equals_one_rank(&["lora.dropout=0.1"], "train.batch_size=6", &cases, "adapter", 5e-6);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    assert!(Command::new("cp").arg("-r").arg(from).arg(to).status().unwrap().success());
}

/// 10 + 10 steps on 2 sharded ranks equal 20 uninterrupted; a checkpoint written by 3 ranks
/// (ZeRO-2) resumes on 2 ranks (ZeRO-1) and on 1 rank (unsharded) to the same losses (1e-6): the
/// optimizer state is re-sliced on load and the data position converted.
#[test]
fn sharded_checkpoints_resume_exactly_on_the_same_and_on_other_world_sizes() {
    let j = sharded_job(&["lora.enabled=false", "train.lr=1e-4", "train.batch_size=6", "train.max_steps=20"]);
    let sets = ["train.shard=gradients", "train.n_checkpoints=2"];
    run_ranks(&j, "whole", 2, &sets, &[]);
    run_ranks(&j, "halves", 2, &sets, &["--stop-after-steps", "10"]);
    assert!(j.run_dir("halves").join("checkpoints/step-10/DONE").exists());
    let err = run_ranks(&j, "halves", 2, &sets, &["--resume"]);
    assert!(err.contains("checkpoints/step-10 (step 10"), "{err}");
    same_loss_curves(&j.run_dir("whole"), &j.run_dir("halves"), 20);

    // Written by 3 ranks, one slice each.
    run_ranks(&j, "three", 3, &sets, &["--stop-after-steps", "10"]);
    let ckpt = j.run_dir("three").join("checkpoints/step-10");
    for r in 0..3 {
        assert!(ckpt.join(format!("optimizer.rank{r}.safetensors")).exists());
    }
    for (n, shard) in [(2, "train.shard=optimizer"), (1, "train.shard=none")] {
        let out = format!("three-on-{n}");
        copy_dir(&j.run_dir("three"), &j.run_dir(&out));
        let err = run_ranks(&j, &out, n, &[shard, "train.n_checkpoints=2"], &["--resume"]);
        assert!(err.contains("checkpoints/step-10 (step 10"), "{err}");
        same_loss_curves(&j.run_dir("whole"), &j.run_dir(&out), 20);
    }
}

/// Rank 1 dies halfway through writing its optimizer slice of step 10's checkpoint (a fault injected
/// through FERROTUNE_FAILPOINT): the job fails, step 10 is not a complete checkpoint, `--resume` takes
/// step 5; with `--max-restarts 1` the restarted job resumes from step 5 and ends at the loss of an
/// uninterrupted run.
#[test]
fn a_rank_dying_while_writing_its_slice_never_leaves_a_checkpoint_resume_takes() {
    let j = sharded_job(&["lora.enabled=false", "train.lr=1e-4", "train.batch_size=6", "train.max_steps=20"]);
    let sets = ["train.shard=optimizer", "train.n_checkpoints=4"];
    run_ranks(&j, "whole", 2, &sets, &[]);
    let port = free_port().to_string();
    let mut c = launch(&j, "killed", &["--nproc-per-node".into(), "2".into(), "--master-port".into(), port]);
    c.env("FERROTUNE_FAILPOINT", "shard-write:1:10");
    for s in sets {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("rank 1 was killed by signal 6 (SIGABRT)"), "{err}");
    let ckpts = j.run_dir("killed").join("checkpoints");
    assert!(ckpts.join("step-5/DONE").exists());
    assert!(!ckpts.join("step-10/DONE").exists() && !ckpts.join("step-10.partial/DONE").exists());
    let err = run_ranks(&j, "killed", 2, &sets, &["--resume"]);
    assert!(err.contains("checkpoints/step-5 (step 5"), "{err}");
    assert_eq!(losses(&j.run_dir("killed")).last(), losses(&j.run_dir("whole")).last());

    let port = free_port().to_string();
    let args: Vec<String> = ["--nproc-per-node", "2", "--master-port", &port, "--max-restarts", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut c = launch(&j, "restarted", &args);
    c.env("FERROTUNE_FAILPOINT", "shard-write:1:10");
    for s in sets {
        c.args(["--set", s]);
    }
    let (_, err) = ok(c.output().unwrap());
    assert!(err.contains("restarting every worker (attempt 1 of 1)"), "{err}");
    assert!(err.contains("checkpoints/step-5 (step 5"), "{err}");
    let (a, b) = (losses(&j.run_dir("restarted")), losses(&j.run_dir("whole")));
    assert_eq!(a.last(), b.last(), "final loss after a restart differs from an uninterrupted run");
}

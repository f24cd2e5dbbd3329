//! `ferrotune launch`: checks the arguments, finds the worker binary and GPUs, and hands over to the
//! launcher crate's supervisor. Runs in the front binary (no libtorch). Not here: rendezvous,
//! spawning or supervision themselves (`ferrotune_launcher::supervise`).

use crate::cli::LaunchArgs;
use anyhow::{bail, Context, Result};
use ferrotune_launcher::supervise::{launch, visible_gpus, LaunchSpec};
use std::path::PathBuf;
use std::time::Duration;

pub fn run(a: LaunchArgs) -> Result<()> {
    if a.command.first().and_then(|c| c.to_str()) != Some("train") {
        bail!("launch runs `train` on every rank: ferrotune launch [OPTIONS] -- train CONFIG [--set ...]");
    }
    if a.nproc_per_node == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!(
            "--nproc-per-node and --nnodes must be at least 1 and --node-rank below --nnodes (got {}, {}, {})",
            a.nproc_per_node,
            a.nnodes,
            a.node_rank
        );
    }
    crate::front::check_libtorch(crate::front::LIBTORCH_LIB)?;
    let program = crate::front::worker_path()?;
    let log_dir = match a.log_dir {
        Some(dir) => dir,
        None => run_dir(&program, &a.command)?.join("logs"),
    };
    let gpus = visible_gpus();
    // One GPU per worker when the node has enough; otherwise workers see no GPU assignment.
    let gpus = if gpus.len() >= a.nproc_per_node { gpus } else { vec![] };
    let spec = LaunchSpec {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        max_restarts: a.max_restarts,
        run_id: a.run_id,
        program,
        args: a.command,
        log_dir,
        gpus,
        timeout: Duration::from_secs(a.timeout),
        grace: Duration::from_secs(5),
    };
    tracing::info!(
        "launching {} workers on node {} of {} (world size {}), logs in {}/attempt-N",
        spec.nproc_per_node,
        spec.node_rank,
        spec.nnodes,
        spec.nproc_per_node * spec.nnodes,
        spec.log_dir.display()
    );
    launch(&spec)?;
    Ok(())
}

/// The run directory of `train CONFIG [--set ...]`, as the worker resolves it (the config's layers are
/// the trainer's to read); a config the workers would refuse is refused here, before anything starts.
fn run_dir(worker: &std::path::Path, command: &[std::ffi::OsString]) -> Result<PathBuf> {
    let out = std::process::Command::new(worker)
        .args(["probe", "run-dir"])
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {}", worker.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{}", err.trim().trim_start_matches("error: "));
    }
    let text = String::from_utf8(out.stdout).context("the run directory is not UTF-8")?;
    Ok(PathBuf::from(text.trim_end_matches('\n')))
}

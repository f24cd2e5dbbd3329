//! `ferrotune sweep SWEEP.toml`: a base run config plus a grid over config keys (cartesian product),
//! each trial a `train` run (or a multi-process `launch` run) with its own run directory and
//! TensorBoard subdirectory under the sweep directory. Trials run one after another or K at a time
//! (each with its share of the cores or GPUs); re-running skips finished trials and resumes interrupted
//! ones from their checkpoints; a failed trial is reported and the others go on. The report
//! (`report.rs`) is written at the end. Runs in the front binary: trials are child processes. Not here:
//! training itself, or the report's contents.

use crate::cli::SweepArgs;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The sweep file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The base run config, relative to the sweep file.
    pub base: PathBuf,
    /// The sweep's directory name (under `dir`).
    pub name: String,
    /// Where sweeps go (default "runs/sweeps", relative to the working directory).
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// `section.key=value` overrides applied to every trial (before the grid's).
    #[serde(default)]
    pub set: Vec<String>,
    /// Workers per trial: above 1, each trial is a `ferrotune launch --nproc-per-node N` run.
    #[serde(default = "one")]
    pub nproc_per_node: usize,
    /// First rendezvous port of multi-process trials (trial i uses this + i).
    #[serde(default = "default_port")]
    pub master_port: u16,
    /// Config keys to the values each takes; trials are every combination, in file order.
    pub grid: toml::Table,
}

fn default_dir() -> PathBuf {
    PathBuf::from("runs/sweeps")
}
fn one() -> usize {
    1
}
fn default_port() -> u16 {
    29700
}

/// One trial: its directory name and the swept values.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Trial {
    pub name: String,
    pub values: Vec<(String, String)>,
}

/// `sweep.json` in the sweep directory: what the report needs to know about the sweep.
#[derive(Serialize, Deserialize, Debug)]
pub struct SweepIndex {
    pub name: String,
    pub keys: Vec<String>,
    pub trials: Vec<Trial>,
}

/// `trial.json` in each trial's run directory.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct TrialStatus {
    /// "running", "done" or "failed".
    pub status: String,
    /// Wall time summed over every invocation of the trial.
    pub wall_s: f64,
    pub attempts: usize,
    #[serde(default)]
    pub error: Option<String>,
    /// What the trial was run with: the base config's SHA-256 and every `--set` (output.* aside). A re-run
    /// with other settings is refused instead of reporting old results as this sweep's.
    #[serde(default)]
    pub base_sha256: Option<String>,
    #[serde(default)]
    pub settings: Option<Vec<String>>,
}

/// The settings of trial `t` as `TrialStatus` records them.
fn settings_of(p: &Plan, t: &Trial) -> Vec<String> {
    p.file.set.iter().chain(&p.extra).cloned().chain(t.values.iter().map(|(k, v)| format!("{k}={v}"))).collect()
}

/// How the settings a trial ran with differ from `now` (empty: the same, or not recorded).
fn changed(status: &TrialStatus, base_sha: &str, now: &[String]) -> Vec<String> {
    let mut out = vec![];
    if status.base_sha256.as_deref().is_some_and(|b| b != base_sha) {
        out.push("the base config file changed".to_string());
    }
    if let Some(before) = &status.settings {
        out.extend(now.iter().filter(|s| !before.contains(s)).map(|s| format!("+{s}")));
        out.extend(before.iter().filter(|s| !now.contains(s)).map(|s| format!("-{s}")));
    }
    out
}

fn value_text(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("grid values must be strings, numbers or booleans, not {other}"),
    })
}

/// `strategy=last` for `data.strategy` = "last": a swept value as trial names and legends show it.
pub fn short_label(key: &str, value: &str) -> String {
    format!("{}={value}", key.rsplit('.').next().unwrap_or(key))
}

/// The cartesian product of the grid, first key varying slowest.
pub fn trials(grid: &toml::Table) -> Result<Vec<Trial>> {
    let mut combos: Vec<Vec<(String, String)>> = vec![vec![]];
    for (key, values) in grid {
        let values = values.as_array().with_context(|| format!("grid.\"{key}\" must be a list of values"))?;
        if values.is_empty() {
            bail!("grid.\"{key}\" has no values");
        }
        let texts: Vec<String> = values.iter().map(value_text).collect::<Result<_>>()?;
        combos = combos
            .into_iter()
            .flat_map(|c| {
                texts.iter().map(move |t| {
                    let mut c = c.clone();
                    c.push((key.clone(), t.clone()));
                    c
                })
            })
            .collect();
    }
    let width = combos.len().to_string().len().max(2);
    Ok(combos
        .into_iter()
        .enumerate()
        .map(|(i, values)| {
            let label: Vec<String> = values.iter().map(|(k, v)| short_label(k, v)).collect();
            let safe: String = label
                .join(",")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || "._=,-".contains(c) { c } else { '_' })
                .collect();
            Trial { name: format!("{i:0width$}-{safe}"), values }
        })
        .collect())
}

pub fn read_status(run_dir: &Path) -> Option<TrialStatus> {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("trial.json")).ok()?).ok()
}

fn write_status(run_dir: &Path, s: &TrialStatus) -> Result<()> {
    std::fs::create_dir_all(run_dir)?;
    let tmp = run_dir.join("trial.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(s)?)?;
    std::fs::rename(&tmp, run_dir.join("trial.json"))?;
    Ok(())
}

struct Plan {
    file: SweepFile,
    base: PathBuf,
    dir: PathBuf,
    trials: Vec<Trial>,
    extra: Vec<String>,
}

fn plan(args: &SweepArgs) -> Result<Plan> {
    let text = std::fs::read_to_string(&args.sweep).with_context(|| format!("reading {}", args.sweep.display()))?;
    let file: SweepFile = toml::from_str(&text).with_context(|| format!("{}", args.sweep.display()))?;
    let base = args.sweep.parent().unwrap_or(Path::new(".")).join(&file.base);
    if !base.exists() {
        bail!(
            "{}: base config {} not found (paths are relative to the sweep file)",
            args.sweep.display(),
            base.display()
        );
    }
    let trials = trials(&file.grid).with_context(|| format!("{}", args.sweep.display()))?;
    // Absolute, because run configs resolve relative paths against their own directory.
    let dir = std::path::absolute(file.dir.join(&file.name))?;
    let base = std::path::absolute(base)?;
    Ok(Plan { base, dir, trials, extra: args.set.clone(), file })
}

/// `train` arguments of one trial.
fn train_args(p: &Plan, t: &Trial) -> Vec<String> {
    let mut a = vec!["train".to_string(), p.base.display().to_string()];
    let sets = p.file.set.iter().chain(&p.extra).cloned().chain(t.values.iter().map(|(k, v)| format!("{k}={v}")));
    for s in
        sets.chain([format!("output.dir={}", p.dir.join("trials").display()), format!("output.run_name={}", t.name)])
    {
        a.extend(["--set".to_string(), s]);
    }
    a
}

pub fn run(args: SweepArgs) -> Result<()> {
    let p = plan(&args)?;
    let keys: Vec<String> = p.file.grid.keys().cloned().collect();
    println!("sweep {}: {} trials in {}", p.file.name, p.trials.len(), p.dir.display());
    let base_sha = ferrotune_data::cache::sha256_file(&p.base)?;
    let mut stale = vec![];
    for t in &p.trials {
        let run_dir = p.dir.join("trials").join(&t.name);
        let diff = read_status(&run_dir).map(|s| changed(&s, &base_sha, &settings_of(&p, t))).unwrap_or_default();
        if !diff.is_empty() {
            stale.push(format!("{} ({})", t.name, diff.join(", ")));
        }
        let state = match read_status(&run_dir) {
            _ if !diff.is_empty() => format!("ran with other settings: {}", diff.join(", ")),
            Some(s) if s.status == "done" => "finished (skipped)".to_string(),
            Some(s) if has_checkpoint(&run_dir) => format!("{}, resumes from its checkpoint", s.status),
            Some(s) => format!("{}, starts again (no checkpoint)", s.status),
            None => "new".into(),
        };
        let diff: Vec<String> = t.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {:<40} {}  [{state}]", t.name, diff.join(" "));
    }
    if args.dry_run {
        return Ok(());
    }
    if !stale.is_empty() {
        bail!(
            "{} in {} ran with other settings than this sweep's: {}; hint: give the sweep another `name`, or delete those trial directories to run them again",
            if stale.len() == 1 { "1 trial" } else { "some trials" },
            p.dir.join("trials").display(),
            stale.join("; ")
        );
    }
    std::fs::create_dir_all(&p.dir).with_context(|| format!("creating {}", p.dir.display()))?;
    let index = SweepIndex { name: p.file.name.clone(), keys, trials: p.trials.clone() };
    std::fs::write(p.dir.join("sweep.json"), serde_json::to_string_pretty(&index)?)?;

    let k = args.parallel.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = ferrotune_launcher::supervise::visible_gpus();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(vec![]);
    let worker = crate::front::worker_path()?;
    let me = std::env::current_exe()?;
    std::thread::scope(|scope| {
        for slot in 0..k {
            let (p, next, failures, worker, me, gpus) = (&p, &next, &failures, &worker, &me, &gpus);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = p.trials.get(i) else { break };
                // This slot's share of the GPUs, or of the cores.
                let share: Vec<String> = gpus.iter().skip(slot).step_by(k).cloned().collect();
                match run_trial(p, i, t, worker, me, &share, (cores / k).max(1)) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        println!("trial {} FAILED: {e:#}", t.name);
                        failures.lock().unwrap().push(t.name.clone());
                    }
                }
            });
        }
    });
    let report = crate::report::write(&p.dir)?;
    println!("report: {}, {}, {}", report.markdown.display(), report.csv.display(), report.png.display());
    println!("compare the trials: tensorboard --logdir {}", p.dir.join("trials").display());
    let failed = failures.into_inner().unwrap();
    if !failed.is_empty() {
        bail!(
            "{} of {} trials failed: {}; re-run the sweep to retry them",
            failed.len(),
            p.trials.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs (or resumes, or skips) one trial; its output goes to `train.log` in its run directory.
fn run_trial(
    p: &Plan,
    index: usize,
    t: &Trial,
    worker: &Path,
    me: &Path,
    gpus: &[String],
    threads: usize,
) -> Result<String> {
    let run_dir = p.dir.join("trials").join(&t.name);
    let mut status = read_status(&run_dir).unwrap_or_default();
    if status.status == "done" {
        return Ok(format!("trial {}: finished before, skipped", t.name));
    }
    let resume = has_checkpoint(&run_dir);
    let mut args = train_args(p, t);
    if resume {
        args.push("--resume".into());
    }
    let mut cmd = if p.file.nproc_per_node > 1 {
        let mut c = Command::new(me);
        c.arg("launch")
            .args(["--nproc-per-node", &p.file.nproc_per_node.to_string()])
            .args(["--master-port", &(p.file.master_port as usize + index).to_string()])
            .args(["--run-id", &format!("sweep-{}-{}", p.file.name, t.name)])
            .arg("--log-dir")
            .arg(run_dir.join("logs"))
            .arg("--")
            .args(&args);
        c
    } else {
        let mut c = Command::new(worker);
        c.args(&args);
        c
    };
    // SAFETY: prctl is async-signal-safe; a trial dies with the sweep (no orphan keeps training).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    if gpus.is_empty() {
        cmd.env("OMP_NUM_THREADS", threads.to_string()).env("RAYON_NUM_THREADS", threads.to_string());
    } else {
        cmd.env("CUDA_VISIBLE_DEVICES", gpus.join(","));
    }
    std::fs::create_dir_all(&run_dir)?;
    let log_path = run_dir.join("train.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    status.status = "running".into();
    status.attempts += 1;
    status.error = None;
    status.base_sha256 = Some(ferrotune_data::cache::sha256_file(&p.base)?);
    status.settings = Some(settings_of(p, t));
    write_status(&run_dir, &status)?;
    println!("trial {} {}", t.name, if resume { "resuming from its checkpoint" } else { "starting" });
    let t0 = Instant::now();
    let exit = cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).status()?;
    status.wall_s += t0.elapsed().as_secs_f64();
    if exit.success() {
        status.status = "done".into();
        write_status(&run_dir, &status)?;
        Ok(format!("trial {}: done in {:.0} s", t.name, t0.elapsed().as_secs_f64()))
    } else {
        let tail: Vec<String> = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .map(String::from)
            .collect();
        let msg = format!(
            "{} ({}); last lines of {}:\n    {}",
            ferrotune_launcher::supervise::describe(exit),
            if resume { "resumed" } else { "started" },
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
        );
        status.status = "failed".into();
        status.error = Some(msg.clone());
        write_status(&run_dir, &status)?;
        bail!(msg)
    }
}

/// Whether the run has a complete checkpoint (`checkpoints/step-N/DONE`); read here without the
/// trainer crate, which would link libtorch into the front binary.
fn has_checkpoint(run_dir: &Path) -> bool {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.path().join("DONE").exists()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_a_cartesian_product_in_file_order() {
        let grid: toml::Table =
            toml::from_str("\"data.strategy\" = [\"all\", \"last\"]\n\"train.lr\" = [1e-3, 3e-4, 1e-4]\n").unwrap();
        let t = trials(&grid).unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0].name, "00-strategy=all,lr=0.001");
        assert_eq!(t[5].name, "05-strategy=last,lr=0.0001");
        assert_eq!(t[4].values, vec![("data.strategy".into(), "last".into()), ("train.lr".into(), "0.0003".into())]);
        let bad: toml::Table = toml::from_str("\"train.lr\" = 3\n").unwrap();
        assert!(trials(&bad).unwrap_err().to_string().contains("must be a list"));
    }

    #[test]
    fn every_bundled_sweep_parses_and_names_an_existing_base() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("sweep-") {
                let args = SweepArgs { sweep: p.clone(), parallel: 1, dry_run: true, set: vec![] };
                let plan = plan(&args).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                assert!(plan.trials.len() >= 4, "{}", p.display());
                n += 1;
            }
        }
        assert_eq!(n, 2);
    }
}

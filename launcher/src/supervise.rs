//! `ferrotune launch` on one node: serve the rendezvous store (node 0), spawn one worker per local rank
//! with the rank variables, prefix each worker's output with its rank and keep a log file per rank,
//! and supervise. When a worker fails (here or, through the store, on another node) every worker is
//! stopped (SIGTERM, then SIGKILL after a grace period) and the launch fails naming the rank and its
//! exit status, or, with restarts left, every node starts attempt g+1 (workers then resume from the
//! newest complete checkpoint). SIGINT/SIGTERM are passed to every worker; workers also die with the
//! launcher (PR_SET_PDEATHSIG), so none is orphaned. Not here: what workers do (the trainer).

use crate::store::{StoreClient, StoreError, StoreServer};
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub max_restarts: usize,
    pub run_id: String,
    /// The worker program and its arguments.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Per-rank log files go here, one folder per attempt (`attempt-K/rank-N.log`; K goes on from the
    /// folders a previous launch left, so no launch overwrites another's logs).
    pub log_dir: PathBuf,
    /// GPUs of this node to hand out, one per local rank (CUDA_VISIBLE_DEVICES); empty on CPU.
    pub gpus: Vec<String>,
    /// How long nodes wait for each other, and workers for the store.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping workers.
    pub grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Spawn(String),
    #[error("{failure}; stopped the other workers{restarts}")]
    WorkerFailed { failure: String, restarts: String },
    #[error("interrupted by {0}; stopped every worker")]
    Interrupted(&'static str),
}

/// The signal that interrupted the launch (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// "exited with status 3" / "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("was killed by signal {s}{name}")
        }
        _ => "ended".into(),
    }
}

struct Worker {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

/// Copies a worker's stream line by line to ours with a `[rank N]` prefix, and to its log file.
fn pump(
    rank: usize,
    from: impl std::io::Read + Send + 'static,
    to_stderr: bool,
    log: Arc<Mutex<std::fs::File>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(from);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            let _ = writeln!(log.lock().unwrap(), "{text}");
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {text}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {text}");
            }
            line.clear();
        }
    })
}

/// The first `attempt-K` folder of `log_dir` that holds no log of this node's first rank: where this
/// launch's attempt 0 writes. Nodes sharing one file system each find the same K, since each looks at
/// its own ranks' files.
fn first_free_log_folder(log_dir: &std::path::Path, first_rank: usize) -> usize {
    (0..).find(|k| !log_dir.join(format!("attempt-{k}/rank-{first_rank}.log")).exists()).expect("a free index")
}

fn spawn(spec: &LaunchSpec, attempt: usize, log_folder: usize) -> Result<Vec<Worker>, LaunchError> {
    let dir = spec.log_dir.join(format!("attempt-{log_folder}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| LaunchError::Spawn(format!("creating the log directory {}: {e}", dir.display())))?;
    let world = spec.nnodes * spec.nproc_per_node;
    let mut workers = vec![];
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let log_path = dir.join(format!("rank-{rank}.log"));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| LaunchError::Spawn(format!("{}: {e}", log_path.display())))?;
        let _ = writeln!(log, "=== rank {rank}, attempt {attempt} of this launch, node {} ===", spec.node_rank);
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", spec.master_port.to_string())
            .env("FERROTUNE_RUN_ID", &spec.run_id)
            .env("FERROTUNE_RESTART_GENERATION", attempt.to_string())
            .env("FERROTUNE_LAUNCHER", "1")
            .env("FERROTUNE_TIMEOUT_S", spec.timeout.as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(gpu) = spec.gpus.get(local) {
            cmd.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        // SAFETY: prctl is async-signal-safe; the worker dies with the launcher, so none is orphaned.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| LaunchError::Spawn(format!("cannot start {} for rank {rank}: {e}", spec.program.display())))?;
        let log = Arc::new(Mutex::new(log));
        let pumps = vec![
            pump(rank, child.stdout.take().expect("piped"), false, log.clone()),
            pump(rank, child.stderr.take().expect("piped"), true, log),
        ];
        workers.push(Worker { rank, child, status: None, pumps });
    }
    Ok(workers)
}

/// SIGTERM to every running worker, SIGKILL to those still running after `grace`; then reaps all.
fn stop_all(workers: &mut [Worker], grace: Duration) {
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && workers.iter_mut().any(|w| w.status.is_none() && w.child.try_wait().ok().flatten().is_none())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers.iter_mut() {
        if w.status.is_none() {
            let _ = w.child.kill();
            w.status = w.child.wait().ok();
        }
        for p in w.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

enum Outcome {
    Success,
    Failed(String),
    /// Another node's launcher is gone: no later attempt could gather every node, so no restart.
    Lost(String),
    Interrupted(&'static str),
}

/// Runs the job on this node; returns when every worker of every node has finished, or fails.
pub fn launch(spec: &LaunchSpec) -> Result<(), LaunchError> {
    install_signal_handlers();
    let _server =
        if spec.node_rank == 0 { Some(StoreServer::serve("0.0.0.0", spec.master_port, &spec.run_id)?) } else { None };
    let mut store = StoreClient::connect(&spec.master_addr, spec.master_port, &spec.run_id, 0, spec.timeout)?;
    let nodes: Vec<String> = (0..spec.nnodes).map(|n| format!("node {n}")).collect();
    let me = format!("node {}", spec.node_rank);
    // If this launcher dies, the store tells the others (see `lost_node`).
    store.on_disconnect(LOST, &me)?;
    let first_folder = first_free_log_folder(&spec.log_dir, spec.node_rank * spec.nproc_per_node);
    let mut attempt = 0;
    loop {
        // Every node starts each attempt together (a missing node is named after the timeout).
        store.barrier(&format!("attempt-{attempt}"), &me, &nodes, spec.timeout)?;
        let mut workers = spawn(spec, attempt, first_folder + attempt)?;
        let failed_key = format!("launcher/failed/{attempt}");
        let outcome = supervise(spec, &mut store, &mut workers, attempt, &failed_key, &nodes)?;
        stop_all(&mut workers, spec.grace);
        match outcome {
            Outcome::Success => return Ok(()),
            Outcome::Interrupted(sig) => return Err(LaunchError::Interrupted(sig)),
            Outcome::Lost(failure) => {
                let restarts = if attempt < spec.max_restarts {
                    " (no restart: every node must join the next attempt; start the lost node's launcher again \
                     with --resume)"
                        .to_owned()
                } else {
                    String::new()
                };
                return Err(LaunchError::WorkerFailed { failure, restarts });
            }
            Outcome::Failed(failure) if attempt < spec.max_restarts => {
                attempt += 1;
                let _ = writeln!(
                    std::io::stderr(),
                    "ferrotune launch: {failure}; restarting every worker (attempt {attempt} of {})",
                    spec.max_restarts
                );
            }
            Outcome::Failed(failure) => {
                let restarts = if spec.max_restarts > 0 {
                    format!(" (after {} restarts)", spec.max_restarts)
                } else {
                    String::new()
                };
                return Err(LaunchError::WorkerFailed { failure, restarts });
            }
        }
    }
}

fn supervise(
    spec: &LaunchSpec,
    store: &mut StoreClient,
    workers: &mut [Worker],
    attempt: usize,
    failed_key: &str,
    nodes: &[String],
) -> Result<Outcome, LaunchError> {
    let done_key = |n: usize| format!("launcher/done/{attempt}/node {n}");
    let mut reported_done = false;
    loop {
        match SIGNALLED.load(Ordering::SeqCst) {
            libc::SIGINT => return Ok(Outcome::Interrupted("SIGINT")),
            libc::SIGTERM => return Ok(Outcome::Interrupted("SIGTERM")),
            _ => {}
        }
        let mut failed: Vec<(usize, ExitStatus)> = vec![];
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            if let Some(status) = w.child.try_wait().ok().flatten() {
                w.status = Some(status);
                if !status.success() {
                    failed.push((w.rank, status));
                }
            }
        }
        // Of failures seen together, a worker killed by a signal is the likelier cause (the others
        // then lose their ring neighbour and exit with an error).
        failed.sort_by_key(|(rank, status)| (status.signal().is_none(), *rank));
        if let Some((rank, status)) = failed.first() {
            let own = format!("rank {rank} {} (node {})", describe(*status), spec.node_rank);
            // A worker that exits with an error (no signal) just after another node failed or was lost
            // has most likely lost its ring neighbour: give that cause a moment to reach the store.
            let remote = if nodes.len() > 1 && status.signal().is_none() {
                remote_cause(store, failed_key, attempt)
            } else {
                None
            };
            if let Some(Outcome::Lost(lost)) = remote {
                return Ok(Outcome::Lost(lost));
            }
            let failure = match remote {
                Some(Outcome::Failed(failure)) => failure,
                _ => own,
            };
            // Tell the other nodes (the first failure wins); if the store is gone, so are they.
            if matches!(store.get(failed_key), Ok(None)) {
                let _ = store.set(failed_key, failure.as_bytes());
            }
            return Ok(Outcome::Failed(failure));
        }
        let remote = match store.get(failed_key) {
            Ok(v) => v,
            // Node 0's launcher serves the store: losing it means that launcher has stopped.
            Err(e) => {
                return Ok(Outcome::Lost(format!(
                    "lost the rendezvous store ({e}): node 0's launcher has stopped or its host is unreachable"
                )))
            }
        };
        if let Some(remote) = remote {
            return Ok(Outcome::Failed(String::from_utf8_lossy(&remote).into_owned()));
        }
        if let Some(outcome) = departed(store, failed_key, attempt) {
            return Ok(outcome);
        }
        if workers.iter().all(|w| w.status.is_some()) {
            if !reported_done {
                store.set(&done_key(spec.node_rank), b"1")?;
                reported_done = true;
            }
            let mut all = true;
            for n in 0..nodes.len() {
                all &= store.get(&done_key(n))?.is_some();
            }
            if all {
                // Node 0 serves the store: it leaves only after every node has seen the success.
                let ack = |n: usize| format!("launcher/ack/{attempt}/node {n}");
                if spec.node_rank == 0 {
                    store.set(&ack(0), b"1")?;
                    let keys: Vec<String> = (0..nodes.len()).map(ack).collect();
                    store.wait(&keys, spec.timeout, "the other nodes to finish")?;
                } else {
                    // Node 0 leaves (taking the store) as soon as this lands, possibly before it answers.
                    let _ = store.set(&ack(spec.node_rank), b"1");
                }
                return Ok(Outcome::Success);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A failure another node reported, or a lost node, within 2 s; `None` when neither shows up.
fn remote_cause(store: &mut StoreClient, failed_key: &str, attempt: usize) -> Option<Outcome> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match store.get(failed_key) {
            Ok(Some(v)) => return Some(Outcome::Failed(String::from_utf8_lossy(&v).into_owned())),
            Ok(None) => {}
            Err(_) => return None,
        }
        if let Some(outcome) = departed(store, failed_key, attempt) {
            return Some(outcome);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// When a node's launcher has left the store before finishing this attempt: the failure it reported on
/// its way out if there is one, else that node lost. A node that fails sets `failed_key` before its
/// launcher leaves, but it may do both between a caller's read of the key and its read of the lost
/// list, so the key is read again after the list names a node: the failure, not "lost", is the cause.
fn departed(store: &mut StoreClient, failed_key: &str, attempt: usize) -> Option<Outcome> {
    let lost = lost_node(store, attempt)?;
    Some(match store.get(failed_key) {
        Ok(Some(v)) => Outcome::Failed(String::from_utf8_lossy(&v).into_owned()),
        _ => Outcome::Lost(lost),
    })
}

/// The store's list of nodes whose launcher's connection ended (`StoreClient::on_disconnect`).
const LOST: &str = "launcher/lost";

/// "lost node 1: ..." for the first node on the store's lost list that had not finished this attempt
/// (a node that finished and left is not lost); `None` also when the store does not answer (the
/// caller's next failure-key read names that).
fn lost_node(store: &mut StoreClient, attempt: usize) -> Option<String> {
    let list = store.get(LOST).ok()??;
    for node in String::from_utf8_lossy(&list).split(", ") {
        if let Ok(None) = store.get(&format!("launcher/done/{attempt}/{node}")) {
            return Some(format!(
                "lost {node}: its launcher's connection to the rendezvous store ended (the launcher was killed or \
                 interrupted, or its host went down or off the network)"
            ));
        }
    }
    None
}

/// GPUs visible to this node: CUDA_VISIBLE_DEVICES when set, else /dev/nvidiaN devices.
pub fn visible_gpus() -> Vec<String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    }
    let mut ids: Vec<usize> = std::fs::read_dir("/dev")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("nvidia")?.parse().ok()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids.into_iter().map(|i| i.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// The race behind a flaky "lost node 1" (tests/multinode.rs): node 1's worker was killed, its
    /// launcher set the failure key and left, both between node 0's read of the key and its read of the
    /// lost list. Whatever the order of the reads, a node that reported a failure before leaving is named
    /// by that failure; one that left without a word is lost.
    #[test]
    fn a_failure_reported_on_the_way_out_wins_over_lost() {
        let server = StoreServer::serve("127.0.0.1", 0, "job").unwrap();
        let mut node0 = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
        let key = "launcher/failed/0";
        // Node 1 fails and leaves: failure key first, then its connection ends.
        let mut node1 = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
        node1.on_disconnect(LOST, "node 1").unwrap();
        assert!(matches!(node0.get(key), Ok(None)), "node 0 reads the key before node 1 fails");
        node1.set(key, b"rank 1 was killed by signal 9 (SIGKILL) (node 1)").unwrap();
        drop(node1);
        let t0 = Instant::now();
        while node0.get(LOST).unwrap().is_none() {
            assert!(t0.elapsed() < T, "the store never listed node 1 as gone");
            std::thread::sleep(Duration::from_millis(5));
        }
        match departed(&mut node0, key, 0) {
            Some(Outcome::Failed(f)) => assert!(f.contains("rank 1 was killed"), "{f}"),
            _ => panic!("a failure reported before leaving must be named, not a lost node"),
        }
        // Node 2 leaves without reporting anything (its launcher was killed) in attempt 1: lost.
        let mut node2 = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
        node2.on_disconnect(LOST, "node 2").unwrap();
        drop(node2);
        while !String::from_utf8_lossy(&node0.get(LOST).unwrap().unwrap()).contains("node 2") {
            assert!(t0.elapsed() < T, "the store never listed node 2 as gone");
            std::thread::sleep(Duration::from_millis(5));
        }
        node0.set("launcher/done/1/node 1", b"1").unwrap();
        match departed(&mut node0, "launcher/failed/1", 1) {
            Some(Outcome::Lost(l)) => assert!(l.starts_with("lost node 2:"), "{l}"),
            _ => panic!("a launcher gone without a word is a lost node"),
        }
    }
}

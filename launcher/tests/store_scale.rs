//! The rendezvous store at the scale of a large job: 1,024 clients on loopback (threads here, standing
//! in for one worker process each) join, set, get and pass two barriers against a store served by a
//! separate process, so that the store's own threads and memory can be read from /proc; then a job in
//! which one rank never arrives, whose barrier must time out naming that rank. It prints the time, the
//! store's threads and its peak memory. Not a timing test: the only time bound is the one that keeps a
//! broken store from hanging CI.
//!
//! `harness = false`: the same binary is the store's process when started with `--serve` (it prints
//! the port, serves until its standard input closes, and then prints its thread count and peak RSS).

use ferrotune_launcher::store::{rank_names, StoreClient, StoreError, StoreServer};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENTS: usize = 1024;
/// Generous: the thread-per-connection store this test was written against took far longer (see the
/// README's Launch section); the event-loop store takes about a second here.
const LIMIT: Duration = Duration::from_secs(120);

fn main() {
    if std::env::args().any(|a| a == "--serve") {
        serve();
        return;
    }
    let t0 = Instant::now();
    all_clients_join_and_pass_two_barriers();
    a_rank_that_never_arrives_is_named();
    println!("store_scale: 2 passed, 0 failed ({:.1}s)", t0.elapsed().as_secs_f64());
}

/// The store's process: serve, report the port, wait for stdin to close, report threads and memory.
fn serve() {
    let server = StoreServer::serve("127.0.0.1", 0, "scale").expect("serve");
    println!("port {}", server.port);
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
        if line.trim() == "stats" {
            println!("{}", stats("self"));
            std::io::stdout().flush().unwrap();
        }
        line.clear();
    }
}

/// `threads N peak_rss_kb M rss_kb K` of /proc/<pid>/status.
fn stats(pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().trim_end_matches(" kB").to_owned())
    };
    format!(
        "threads {} peak_rss_kb {} rss_kb {}",
        field("Threads:").unwrap_or_default(),
        field("VmHWM:").unwrap_or_default(),
        field("VmRSS:").unwrap_or_default()
    )
}

struct StoreProcess {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    port: u16,
}

impl StoreProcess {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the store process");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").expect("the store prints its port").parse().unwrap();
        StoreProcess { child, out, port }
    }

    /// (threads, peak RSS in MiB) of the store's process now.
    fn stats(&mut self) -> (usize, f64) {
        writeln!(self.child.stdin.as_mut().unwrap(), "stats").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].parse().unwrap(), f[3].parse::<f64>().unwrap() / 1024.0)
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Runs `body(rank)` for every client on its own small-stacked thread; returns each one's result.
fn clients<T: Send + 'static>(
    n: usize,
    body: impl Fn(usize) -> Result<T, StoreError> + Send + Sync + 'static,
) -> Vec<Result<T, StoreError>> {
    let body = std::sync::Arc::new(body);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let body = body.clone();
            std::thread::Builder::new().stack_size(256 << 10).spawn(move || body(r)).expect("client thread")
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("client thread panicked")).collect()
}

fn all_clients_join_and_pass_two_barriers() {
    let mut store = StoreProcess::start();
    let (idle_threads, _) = store.stats();
    let port = store.port;
    let members = rank_names(CLIENTS);
    let t0 = Instant::now();
    let results = clients(CLIENTS, move |r| {
        let mut c = StoreClient::connect("127.0.0.1", port, "scale", 0, LIMIT)?;
        let me = format!("rank {r}");
        c.set(&format!("addr/{r}"), format!("host-{r}").as_bytes())?;
        c.barrier("joined", &me, &members, LIMIT)?;
        // Every address is there once the barrier is passed: read the neighbour's, as the ring does.
        let next = (r + 1) % CLIENTS;
        let addr = c.get(&format!("addr/{next}"))?;
        c.add("counted", 1)?;
        c.barrier("ready", &me, &members, LIMIT)?;
        Ok((addr, c))
    });
    let elapsed = t0.elapsed();
    let (threads, peak_mib) = store.stats();
    let mut connected = vec![];
    for (r, res) in results.into_iter().enumerate() {
        let (addr, c) = res.unwrap_or_else(|e| panic!("client {r}: {e}"));
        assert_eq!(addr.as_deref(), Some(format!("host-{}", (r + 1) % CLIENTS).as_bytes()), "client {r}");
        connected.push(c);
    }
    assert_eq!(connected[0].add("counted", 0).unwrap(), CLIENTS as i64);
    println!(
        "store_scale: {CLIENTS} clients joined, set, got and passed 2 barriers in {:.2}s; the store's process: \
         {threads} threads with all connected ({idle_threads} idle), peak RSS {peak_mib:.1} MiB",
        elapsed.as_secs_f64()
    );
    assert!(elapsed < LIMIT, "{elapsed:?}");
    // An event loop serves every connection from a fixed set of threads.
    assert!(threads <= idle_threads + 4, "the store runs {threads} threads for {CLIENTS} connections");
}

fn a_rank_that_never_arrives_is_named() {
    let store = StoreProcess::start();
    let port = store.port;
    let members = rank_names(CLIENTS);
    let t0 = Instant::now();
    // Rank 517 never comes.
    let results = clients(CLIENTS - 1, move |i| {
        let r = if i < 517 { i } else { i + 1 };
        let mut c = StoreClient::connect("127.0.0.1", port, "scale", 0, LIMIT)?;
        c.barrier("joined", &format!("rank {r}"), &members, Duration::from_secs(3))
    });
    for res in results {
        let err = res.expect_err("a barrier with a missing rank cannot pass");
        assert!(
            matches!(&err, StoreError::Timeout { missing, .. } if missing == "rank 517"),
            "the error must name rank 517 alone: {err}"
        );
    }
    println!(
        "store_scale: with rank 517 missing, all {} others timed out naming it ({:.1}s for a 3 s timeout)",
        CLIENTS - 1,
        t0.elapsed().as_secs_f64()
    );
}

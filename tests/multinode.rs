//! Two nodes off loopback: two network namespaces, each with its own network stack and addresses, one
//! `ferrotune launch` in each, `--master-addr` node 0's address in the other namespace, so the store,
//! the rendezvous and the CPU ring cross a link between two kernels' worth of TCP. A 2-node run equals
//! a 1-process run with the same global batch, over a veth pair and over an impaired link (20 ms ± 5
//! ms each way, 2% of packets lost); a node whose launcher is killed stops the other, naming the lost
//! node; a node whose worker is killed restarts with `--max-restarts` and resumes to the final loss of
//! an uninterrupted run.
//!
//! The impaired link is `Wire`: a TUN device in each namespace and threads of this test that carry
//! every IP packet from one to the other late or not at all, which is what `tc netem` does; netem is
//! not in every kernel (not in the one this was written on, which has only tbf and htb), the wire is.
//! Not here: more than one worker per node (tests/launch.rs covers that on loopback).
//!
//! The namespaces are made and removed by the test (root, `ip` and /dev/net/tun needed); where they
//! cannot be made, each test prints why and passes without running, as the README says under "Two
//! commands on a fresh machine".

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod common;
use common::*;

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// Two network namespaces joined by a veth pair (`addr`) and by a `Wire` (`wire_addr`); both removed
/// when dropped.
struct Link {
    ns: [String; 2],
    addr: [String; 2],
    wire_addr: [String; 2],
    wire: Option<Wire>,
}

impl Link {
    /// Its own /24s per test (`net`), so tests running at once do not collide.
    fn new(net: u8) -> Result<Link, String> {
        let id = format!("{}-{net}", std::process::id());
        // Made before any namespace exists, so that a failure half-way is cleaned up by Drop.
        let mut link = Link {
            ns: [format!("ft{id}a"), format!("ft{id}b")],
            addr: [format!("10.213.{net}.1"), format!("10.213.{net}.2")],
            wire_addr: [format!("10.214.{net}.1"), format!("10.214.{net}.2")],
            wire: None,
        };
        let dev = [format!("ftv{id}a"), format!("ftv{id}b")];
        let tun = [format!("ftw{id}a"), format!("ftw{id}b")];
        ip(&["netns", "add", &link.ns[0]])?;
        ip(&["netns", "add", &link.ns[1]])?;
        ip(&["link", "add", &dev[0], "type", "veth", "peer", "name", &dev[1]])?;
        for (i, dev) in dev.iter().enumerate() {
            ip(&["link", "set", dev, "netns", &link.ns[i]])?;
            ip(&["-n", &link.ns[i], "addr", "add", &format!("{}/24", link.addr[i]), "dev", dev])?;
            ip(&["-n", &link.ns[i], "link", "set", dev, "up"])?;
            ip(&["-n", &link.ns[i], "link", "set", "lo", "up"])?;
        }
        let files = [tun_in(&link.ns[0], &tun[0])?, tun_in(&link.ns[1], &tun[1])?];
        link.wire = Some(Wire::new(files));
        for (i, tun) in tun.iter().enumerate() {
            let (me, peer) = (&link.wire_addr[i], &link.wire_addr[1 - i]);
            ip(&["-n", &link.ns[i], "addr", "add", me, "peer", peer, "dev", tun])?;
            ip(&["-n", &link.ns[i], "link", "set", tun, "up"])?;
        }
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        drop(self.wire.take()); // closing the TUN files removes their devices
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A TUN device named `name` made inside namespace `ns` (by a thread that enters it), open for
/// reading and writing its IP packets.
fn tun_in(ns: &str, name: &str) -> Result<File, String> {
    let (ns, name) = (ns.to_owned(), name.to_owned());
    std::thread::spawn(move || -> Result<File, String> {
        let handle = File::open(format!("/var/run/netns/{ns}")).map_err(|e| format!("namespace {ns}: {e}"))?;
        // SAFETY: setns on a namespace file this thread holds open; it moves only this thread.
        if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
        let tun =
            File::options().read(true).write(true).open("/dev/net/tun").map_err(|e| format!("/dev/net/tun: {e}"))?;
        // struct ifreq: the name (16 bytes), then the flags (a short): IFF_TUN | IFF_NO_PI.
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        ifreq[16..18].copy_from_slice(&(0x0001i16 | 0x1000).to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF reads a struct ifreq of 40 bytes from a buffer that lives across the call.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) } != 0 {
            return Err(format!("TUNSETIFF {name}: {}", std::io::Error::last_os_error()));
        }
        Ok(tun)
    })
    .join()
    .unwrap()
}

/// How the wire treats packets; changed while it runs.
#[derive(Default)]
struct Impairment {
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    /// Packets dropped per million.
    loss_ppm: AtomicU64,
    carried: AtomicU64,
    dropped: AtomicU64,
}

/// Carries IP packets between two TUN devices, each way on its own reader and writer thread: each
/// packet is dropped with probability `loss_ppm` / 1e6 or delivered `delay` ± `jitter` after it was
/// read (never before an earlier packet of the same direction, as on a cable).
struct Wire {
    stop: Arc<AtomicBool>,
    how: Arc<Impairment>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Wire {
    fn new(tun: [File; 2]) -> Wire {
        let tun = tun.map(Arc::new);
        let (stop, how) = (Arc::new(AtomicBool::new(false)), Arc::new(Impairment::default()));
        let mut threads = vec![];
        for (from, to) in [(0, 1), (1, 0)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (src, s, h) = (tun[from].clone(), stop.clone(), how.clone());
            threads.push(std::thread::spawn(move || carry_in(&src, &s, &h, tx, 0x9e37_79b9_7f4a_7c15 ^ from as u64)));
            let (dst, s) = (tun[to].clone(), stop.clone());
            threads.push(std::thread::spawn(move || carry_out(&dst, &s, rx)));
        }
        Wire { stop, how, threads }
    }

    fn impair(&self, delay: Duration, jitter: Duration, loss: f64) {
        self.how.delay_us.store(delay.as_micros() as u64, Ordering::SeqCst);
        self.how.jitter_us.store(jitter.as_micros() as u64, Ordering::SeqCst);
        self.how.loss_ppm.store((loss * 1e6) as u64, Ordering::SeqCst);
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads packets from `src`, drops some, and hands the others to the writer with their delivery time.
fn carry_in(src: &File, stop: &AtomicBool, how: &Impairment, tx: mpsc::Sender<(Instant, Vec<u8>)>, seed: u64) {
    let mut rng = seed;
    let mut next = || {
        // xorshift64*: reproducible per direction, no dependency.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut last = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd { fd: src.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok(n) = (&*src).read(&mut buf) else { return };
        if next() % 1_000_000 < how.loss_ppm.load(Ordering::SeqCst) {
            how.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let (delay, jitter) = (how.delay_us.load(Ordering::SeqCst), how.jitter_us.load(Ordering::SeqCst));
        let late = if jitter == 0 { delay } else { (delay + next() % (2 * jitter + 1)).saturating_sub(jitter) };
        last = last.max(Instant::now() + Duration::from_micros(late));
        how.carried.fetch_add(1, Ordering::SeqCst);
        if tx.send((last, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes each packet to `dst` at its delivery time.
fn carry_out(dst: &File, stop: &AtomicBool, rx: mpsc::Receiver<(Instant, Vec<u8>)>) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((when, packet)) = rx.recv_timeout(Duration::from_millis(100)) else { continue };
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
        // A packet the kernel turns away (the device going down) is lost, as on a cable.
        let _ = (&*dst).write(&packet);
    }
}

/// The link, or `None` after printing why the test cannot run here.
fn link(net: u8) -> Option<Link> {
    match Link::new(net) {
        Ok(l) => Some(l),
        Err(why) => {
            println!("skipped: two network namespaces cannot be made here ({why}); needs root, iproute2, /dev/net/tun");
            None
        }
    }
}

/// `ferrotune launch` of node `n` (one worker) inside its namespace, `master` (node 0's address on
/// the link in use) as master address.
fn node(l: &Link, master: &str, j: &Job, out: &str, n: usize, port: u16, extra: &[&str]) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &l.ns[n], env!("CARGO_BIN_EXE_ferrotune"), "launch"])
        .args(["--nnodes", "2", "--node-rank", &n.to_string(), "--nproc-per-node", "1"])
        .args(["--master-addr", master, "--master-port", &port.to_string(), "--timeout", "60"])
        .args(extra)
        .arg("--log-dir")
        .arg(j.dir.path().join(format!("{out}-logs-{n}")))
        .arg("--")
        .args(j.train_args(out))
        .args(["--set", "train.batch_size=2"])
        .env_remove("LD_LIBRARY_PATH")
        .env("FERROTUNE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// Both nodes of run `out`, to the end: (node 0's output, node 1's).
fn both(l: &Link, master: &str, j: &Job, out: &str) -> (Output, Output) {
    let port = free_port();
    let (a, b) = (node(l, master, j, out, 0, port, &[]), node(l, master, j, out, 1, port, &[]));
    (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
}

#[test]
fn two_nodes_in_two_namespaces_equal_one_process_even_on_an_impaired_link() {
    let Some(l) = link(1) else { return };
    let j = job(&[]);
    ok(ferrotune().args(j.train_args("one")).args(["--set", "train.batch_size=2"]).output().unwrap());

    let t0 = Instant::now();
    let (a, b) = both(&l, &l.addr[0], &j, "veth");
    let clean = t0.elapsed();
    let (out, _) = ok(a);
    ok(b);
    assert!(out.contains("[rank 0] done: 6 steps"), "{out}");
    // Node 1's worker reached node 0's store across the link, and its ring listens on its own address.
    let log = std::fs::read_to_string(j.dir.path().join("veth-logs-1/attempt-0/rank-1.log")).unwrap();
    assert!(log.contains(&format!("store {}:", l.addr[0])), "{log}");
    same_losses(&j.run_dir("one"), &j.run_dir("veth"));

    let wire = l.wire.as_ref().unwrap();
    wire.impair(Duration::from_millis(20), Duration::from_millis(5), 0.02);
    let t0 = Instant::now();
    let (a, b) = both(&l, &l.wire_addr[0], &j, "impaired");
    let impaired = t0.elapsed();
    ok(a);
    ok(b);
    same_losses(&j.run_dir("one"), &j.run_dir("impaired"));
    let (carried, dropped) = (wire.how.carried.load(Ordering::SeqCst), wire.how.dropped.load(Ordering::SeqCst));
    assert!(dropped > 0 && carried > 100, "the wire carried {carried} packets and dropped {dropped}");
    println!(
        "2 nodes, 6 steps: {:.1} s over veth, {:.1} s over a wire of 20 ms ± 5 ms each way dropping 2% \
         ({carried} packets carried, {dropped} dropped)",
        clean.as_secs_f64(),
        impaired.as_secs_f64()
    );
}

/// The pid of the worker process of run `out` whose environment has `RANK=rank`.
fn worker_of(out: &str, rank: usize) -> String {
    let pids = Command::new("pgrep").args(["-f", &format!("ferrotune-worker train.*{out}")]).output().unwrap();
    let pids = String::from_utf8(pids.stdout).unwrap();
    let needle = format!("RANK={rank}");
    pids.split_whitespace()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|e| e.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no worker of rank {rank} among {pids:?}"))
        .to_owned()
}

fn wait_for(path: &std::path::Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_lost_node_is_named_and_a_restarted_attempt_resumes_to_the_same_loss() {
    let Some(l) = link(2) else { return };
    let master = l.addr[0].clone();
    let j = job(&["train.max_steps=40", "train.n_checkpoints=4", "train.log_every=10", "train.keep_checkpoints=0"]);

    // Node 1's worker is killed and no restart is allowed: node 1's launcher reports it and leaves, and
    // node 0 names that failure (read before the store's list of departed launchers), not a lost node.
    let port = free_port();
    let n0 = node(&l, &master, &j, "failed", 0, port, &[]);
    let n1 = node(&l, &master, &j, "failed", 1, port, &[]);
    wait_for(&j.run_dir("failed").join("checkpoints/step-10/DONE"));
    assert!(Command::new("kill").args(["-9", &worker_of("failed", 1)]).status().unwrap().success());
    let (a, b) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    assert!(!a.status.success() && !b.status.success());
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(
        err.contains("rank 1 was killed by signal 9 (SIGKILL) (node 1)") && !err.contains("lost node"),
        "node 0:\n{err}\nnode 1:\n{}",
        String::from_utf8_lossy(&b.stderr)
    );

    // Node 1's launcher is killed (its worker dies with it): node 0 stops its own worker and exits,
    // naming node 1, even though restarts are allowed (node 1 could not join them).
    let port = free_port();
    let mut n0 = node(&l, &master, &j, "lost", 0, port, &["--max-restarts", "1"]);
    let mut n1 = node(&l, &master, &j, "lost", 1, port, &["--max-restarts", "1"]);
    wait_for(&j.run_dir("lost").join("checkpoints/step-10/DONE"));
    n1.kill().unwrap();
    let killed = Instant::now();
    let _ = n1.wait();
    let status = loop {
        if let Some(s) = n0.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "node 0 did not stop after node 1 was lost");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&n0.wait_with_output().unwrap().stderr).into_owned();
    assert!(!status.success(), "{err}");
    assert!(err.contains("lost node 1: its launcher's connection to the rendezvous store ended"), "{err}");
    assert!(err.contains("no restart"), "{err}");
    assert!(!err.contains("restarting every worker"), "{err}");
    println!("node 0 stopped {:.1} s after node 1's launcher was killed", took.as_secs_f64());

    // Node 1's worker is killed at step 20 with a restart allowed: both nodes start attempt 1, which
    // resumes from the step-20 checkpoint and ends where an uninterrupted run ends.
    let (a, b) = both(&l, &master, &j, "whole");
    ok(a);
    ok(b);
    let port = free_port();
    let n0 = node(&l, &master, &j, "restarted", 0, port, &["--max-restarts", "1"]);
    let n1 = node(&l, &master, &j, "restarted", 1, port, &["--max-restarts", "1"]);
    wait_for(&j.run_dir("restarted").join("checkpoints/step-20/DONE"));
    assert!(Command::new("kill").args(["-9", &worker_of("restarted", 1)]).status().unwrap().success());
    let (_, err) = ok(n0.wait_with_output().unwrap());
    ok(n1.wait_with_output().unwrap());
    assert!(err.contains("rank 1 was killed by signal 9 (SIGKILL) (node 1)"), "{err}");
    assert!(err.contains("restarting every worker (attempt 1 of 1)"), "{err}");
    let (x, y) = (losses(&j.run_dir("restarted")), losses(&j.run_dir("whole")));
    assert_eq!(x.last(), y.last(), "final loss after a restart differs from an uninterrupted run");
}

#[test]
fn a_node_gone_off_the_network_is_named_by_the_other_within_half_a_minute() {
    let Some(l) = link(3) else { return };
    let j = job(&["train.max_steps=400", "train.n_checkpoints=40", "train.log_every=10"]);
    let port = free_port();
    let master = l.wire_addr[0].clone();
    let n0 = node(&l, &master, &j, "gone", 0, port, &[]);
    let n1 = node(&l, &master, &j, "gone", 1, port, &[]);
    wait_for(&j.run_dir("gone").join("checkpoints/step-10/DONE"));
    // The wire drops everything from now on: no FIN, no reset, as when a host loses power. Each side
    // learns it from TCP (keepalive or TCP_USER_TIMEOUT on the store's connections, about 25 s).
    l.wire.as_ref().unwrap().impair(Duration::ZERO, Duration::ZERO, 1.0);
    let cut = Instant::now();
    let (a, b) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    let took = cut.elapsed();
    let (err0, err1) = (String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr));
    assert!(!a.status.success() && !b.status.success(), "{err0}\n{err1}");
    assert!(err0.contains("lost node 1: its launcher's connection to the rendezvous store ended"), "{err0}");
    assert!(err1.contains("lost the rendezvous store"), "{err1}");
    assert!(took < Duration::from_secs(45), "the nodes took {took:?} to stop");
    println!("both nodes stopped {:.1} s after the link went dead, each naming the other", took.as_secs_f64());
}

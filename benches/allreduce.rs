//! CPU collective bandwidth: ferrotune's TCP ring against torch.distributed with the gloo backend
//! (benches/allreduce_reference.py), two processes on this machine over loopback, float32 buffers from
//! 1 MB to 256 MB (BENCH_SIZES_MB), side by side in one invocation, for the three collectives training
//! uses: all-reduce (unsharded gradients), reduce-scatter (sharded gradients) and all-gather (sharded
//! weights after the step). A buffer of S MB is the all-reduce's tensor, the reduce-scatter's input
//! and the all-gather's output (halves per rank). Both sides run one untimed call per size and
//! collective, then BENCH_ITERS (default 5) timed ones, and check the values. Reported: algorithm
//! bandwidth (buffer bytes / seconds per call) and the ratio. A measurement, not a test:
//! `scripts/cargo bench --bench allreduce`. Not covered: more than one machine, NCCL.

use ferrotune_data::fixtures;
use ferrotune_launcher::RankEnv;
use ferrotune_trainer::dist::{self, JobEnv};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One collective call on a tensor.
type CollectiveOp<'a> = dyn Fn(&mut dyn dist::Collective, &Tensor) + 'a;

/// One rank of ours (run in a child process); rank 0 prints {size_mb: seconds}.
fn ours(rank: usize, port: u16, sizes: &[usize], iters: usize) {
    let env = JobEnv {
        ranks: RankEnv {
            rank,
            local_rank: rank,
            world_size: 2,
            local_world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: "bench",
        },
        run_id: "allreduce-bench".into(),
        generation: 0,
        launcher_store: false,
        timeout: Duration::from_secs(60),
    };
    let mut joined = dist::init(&env, Device::Cpu).expect("join");
    let coll = &mut *joined.coll;
    let mut out: BTreeMap<&str, BTreeMap<String, f64>> = BTreeMap::new();
    for &mb in sizes {
        let n = (mb << 20) / 4;
        let bounds = dist::flat::shard_bounds(n, 2);
        let (lo, hi) = (bounds[rank] as i64, bounds[rank + 1] as i64);
        let ops: [(&str, &CollectiveOp); 3] = [
            ("all_reduce", &|c, t| c.all_reduce_sum(t).unwrap()),
            ("reduce_scatter", &|c, t| c.reduce_scatter_sum(t, &bounds).unwrap()),
            ("all_gather", &|c, t| c.all_gather(t, &bounds).unwrap()),
        ];
        for (name, op) in ops {
            let t = Tensor::full([n as i64], (rank + 1) as f64, (Kind::Float, Device::Cpu));
            op(coll, &t);
            // The untimed call is checked: sums of ranks' 1 and 2, or each part from its rank.
            let (first, last) = (t.double_value(&[0]), t.double_value(&[n as i64 - 1]));
            let ok = match name {
                "all_reduce" => first == 3.0 && last == 3.0,
                "reduce_scatter" => t.double_value(&[lo]) == 3.0 && t.double_value(&[hi - 1]) == 3.0,
                _ => first == 1.0 && last == 2.0,
            };
            assert!(ok, "{name} of {mb} MB on rank {rank}: {first} .. {last}");
            coll.barrier().unwrap();
            let t0 = Instant::now();
            for _ in 0..iters {
                op(coll, &t);
            }
            let secs = t0.elapsed().as_secs_f64() / iters as f64;
            out.entry(name).or_default().insert(mb.to_string(), secs);
        }
    }
    if rank == 0 {
        println!("{}", serde_json::to_string(&out).unwrap());
    }
}

/// Starts two ranks with `make(rank)` and returns rank 0's JSON.
fn pair(make: &dyn Fn(usize) -> Command) -> serde_json::Value {
    let children: Vec<_> =
        (0..2).map(|r| make(r).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn")).collect();
    let mut first = None;
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        first.get_or_insert(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    serde_json::from_str(first.unwrap().lines().last().unwrap()).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    let sizes: Vec<usize> =
        env_or("BENCH_SIZES_MB", "1,4,16,64,256").split(',').map(|s| s.trim().parse().expect("sizes in MB")).collect();
    let iters: usize = env_or("BENCH_ITERS", "5").parse().unwrap();
    if let Ok(rank) = std::env::var("FERROTUNE_BENCH_RANK") {
        let port = env_or("FERROTUNE_BENCH_PORT", "0").parse().unwrap();
        ours(rank.parse().unwrap(), port, &sizes, iters);
        return;
    }
    let sizes_arg = sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    let port = free_port();
    let mine = pair(&|r| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env("FERROTUNE_BENCH_RANK", r.to_string())
            .env("FERROTUNE_BENCH_PORT", port.to_string())
            .env("BENCH_SIZES_MB", &sizes_arg)
            .env("BENCH_ITERS", iters.to_string());
        c
    });
    let port = free_port();
    let gloo = pair(&|r| {
        let mut c = Command::new(fixtures::python());
        c.arg(fixtures::repo_root().join("benches/allreduce_reference.py"))
            .args([&sizes_arg, &iters.to_string()])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        c
    });
    println!("float32 buffers, 2 processes on loopback, {iters} timed iterations per size and collective");
    println!("{:>15} {:>8} {:>14} {:>14} {:>8}", "collective", "size MB", "ring GB/s", "gloo GB/s", "ratio");
    for op in ["all_reduce", "reduce_scatter", "all_gather"] {
        for mb in &sizes {
            let bw =
                |v: &serde_json::Value| (*mb as f64 * (1 << 20) as f64) / v[op][mb.to_string()].as_f64().unwrap() / 1e9;
            let (a, b) = (bw(&mine), bw(&gloo));
            println!("{op:>15} {mb:>8} {a:>14.2} {b:>14.2} {:>7.2}x", a / b);
        }
    }
}

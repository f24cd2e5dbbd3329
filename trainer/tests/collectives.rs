//! The CPU ring on 3 ranks (threads of this process, real TCP on loopback, rendezvous through the
//! store): all-reduce sum and average of buffers whose length is 0, smaller than the world, not a
//! multiple of it and large (several receive pieces), broadcast, all-gather and barrier; and reductions
//! started without waiting (as during backward), several in flight, then a blocking one behind them;
//! reduce-scatter and all-gather over uneven splits (empty parts, parts of one element, a part longer
//! than the rest, ceil(n/W) slices of a large buffer), blocking and started.
//! Values are small integers, so sums are exact and compared with ==.

use ferrotune_launcher::store::{StoreClient, StoreServer};
use ferrotune_trainer::dist::flat::shard_bounds;
use ferrotune_trainer::dist::ring::Ring;
use ferrotune_trainer::dist::Collective;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const WORLD: usize = 3;

#[test]
fn ring_collectives_on_three_ranks() {
    let server = StoreServer::serve("127.0.0.1", 0, "ring-test").unwrap();
    let port = server.port;
    let sizes = [0usize, 1, 2, 7, (1 << 20) * 3 + 5];
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            std::thread::spawn(move || {
                let t = Duration::from_secs(30);
                let mut store = StoreClient::connect("127.0.0.1", port, "ring-test", 0, t).unwrap();
                let mut ring = Ring::connect(&mut store, rank, WORLD, t).unwrap();
                for n in sizes {
                    // Rank r holds i + 10 r at index i: the sum is 3 i + 30.
                    let x = (Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) + 10.0 * rank as f64).contiguous();
                    ring.all_reduce_sum(&x).unwrap();
                    let expected = Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 3.0 + 30.0;
                    assert!(x.equal(&expected), "sum of {n} elements on rank {rank}");
                    let y = (Tensor::ones([n as i64], (Kind::Float, Device::Cpu)) * (rank + 1) as f64).contiguous();
                    ring.all_reduce_avg(&y).unwrap();
                    assert!(y.equal(&(Tensor::ones([n as i64], (Kind::Float, Device::Cpu)) * 2.0)), "avg of {n}");
                }
                let b = Tensor::from_slice(&[rank as f32 + 0.5, -1.25 * rank as f32]);
                ring.broadcast(&b, 1).unwrap();
                assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![1.5, -1.25]);
                assert_eq!(ring.all_gather_f64(rank as f64 * 1.5).unwrap(), vec![0.0, 1.5, 3.0]);
                let mut v = [rank as f64, 1.0];
                ring.all_reduce_f64(&mut v).unwrap();
                assert_eq!(v, [3.0, 3.0]);
                ring.barrier().unwrap();
                // Started reductions proceed on the ring's thread while this one goes on; a blocking
                // call issued after them waits its turn, and wait_started collects the rest.
                let started: Vec<Tensor> = sizes
                    .iter()
                    .map(|&n| {
                        let x = (Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * (rank + 1) as f64).contiguous();
                        ring.start_all_reduce_sum(&x).unwrap();
                        x
                    })
                    .collect();
                let mut v = [1.0, rank as f64];
                ring.all_reduce_f64(&mut v).unwrap();
                assert_eq!(v, [3.0, 3.0]);
                let late = Tensor::ones([5], (Kind::Float, Device::Cpu));
                ring.start_all_reduce_sum(&late).unwrap();
                ring.wait_started().unwrap();
                for (x, &n) in started.iter().zip(&sizes) {
                    let expected = Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 6.0;
                    assert!(x.equal(&expected), "started sum of {n} elements on rank {rank}");
                }
                assert!(late.equal(&(Tensor::ones([5], (Kind::Float, Device::Cpu)) * 3.0)));
                // Uneven splits: rank r's part of the sum, then every rank's part everywhere.
                let big = (1 << 20) * 3 + 5;
                let splits = [vec![0, 3, 3, 7], vec![0, 1, 2, 7], vec![0, 0, 0, 2], shard_bounds(big, WORLD)];
                let mut started = vec![];
                for (k, bounds) in splits.iter().enumerate() {
                    let n = *bounds.last().unwrap() as i64;
                    let mine = || (Tensor::arange(n, (Kind::Float, Device::Cpu)) + 10.0 * rank as f64).contiguous();
                    let sum = Tensor::arange(n, (Kind::Float, Device::Cpu)) * 3.0 + 30.0;
                    let (lo, hi) = (bounds[rank] as i64, bounds[rank + 1] as i64);
                    let x = mine();
                    ring.reduce_scatter_sum(&x, bounds).unwrap();
                    assert!(x.narrow(0, lo, hi - lo).equal(&sum.narrow(0, lo, hi - lo)), "split {k} on rank {rank}");
                    // Each rank's part holds that rank's id + 1; after the gather, every part does.
                    let g = Tensor::full([n], -1.0, (Kind::Float, Device::Cpu));
                    let _ = g.narrow(0, lo, hi - lo).fill_(rank as f64 + 1.0);
                    ring.all_gather(&g, bounds).unwrap();
                    let owner: Vec<f32> =
                        (0..n as usize).map(|i| (bounds.partition_point(|&b| b <= i) - 1) as f32 + 1.0).collect();
                    assert_eq!(Vec::<f32>::try_from(&g).unwrap(), owner, "gather of split {k} on rank {rank}");
                    let y = mine();
                    ring.start_reduce_scatter_sum(&y, bounds).unwrap();
                    started.push((y, sum, lo, hi));
                }
                ring.wait_started().unwrap();
                for (y, sum, lo, hi) in started {
                    assert!(y.narrow(0, lo, hi - lo).equal(&sum.narrow(0, lo, hi - lo)), "started split on {rank}");
                }
                let bad = ring.reduce_scatter_sum(&Tensor::zeros([4], (Kind::Float, Device::Cpu)), &[0, 2, 4]);
                assert!(bad.unwrap_err().to_string().contains("do not split"));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

//! Collectives for data parallelism: one interface (`Collective`) with a backend per device — a TCP ring
//! for CPU tensors (`ring`), NCCL for CUDA tensors (`nccl`) — and `Single` for a one-process run, so the
//! training loop has no special case for one rank. Also the pieces of data parallelism built on it:
//! `init` (rank environment → store → backend), bucketed gradient reductions started while backward
//! runs (`buckets`), the flat parameter space that sharding slices (`flat`), and the initial-weights
//! checksum. Not here: spawning processes or supervising them (the launcher crate).

pub mod buckets;
pub mod flat;
pub mod nccl;
pub mod ring;

use crate::error::{Error, Result};
use ferrotune_launcher::store::{StoreClient, StoreServer};
use ferrotune_launcher::RankEnv;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Where the tensors this backend reduces live.
    fn device(&self) -> Device;
    /// Sums a contiguous fp32 tensor on `device()` over all ranks, in place.
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<()>;
    /// Sums a few host numbers over all ranks, in place.
    fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()>;

    /// Starts summing `t` (contiguous fp32 on `device()`) over all ranks, in place; the sum is there
    /// once `wait_started` returns, and the caller keeps `t` alive and untouched until then. Every
    /// rank starts the same reductions in the same order. Backends that cannot overlap communication
    /// with computation reduce at once (this default).
    fn start_all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        self.all_reduce_sum(t)
    }

    /// Waits for every reduction `start_all_reduce_sum` started (on CUDA: makes later work on the
    /// default stream wait for them).
    fn wait_started(&mut self) -> Result<()> {
        Ok(())
    }

    /// Sums a contiguous fp32 tensor on `device()` over all ranks so that each rank r ends with its own
    /// part, `t[bounds[r]..bounds[r + 1]]`, summed; the other parts hold unspecified values after it.
    /// `bounds` has W + 1 non-decreasing entries ending at `t.numel()` (parts may be empty or uneven).
    /// This default sums everything.
    fn reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        check_bounds(self.rank(), self.world(), t, bounds)?;
        self.all_reduce_sum(t)
    }

    /// Starts `reduce_scatter_sum`, as `start_all_reduce_sum` starts an all-reduce; `wait_started`
    /// waits for both kinds.
    fn start_reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        self.reduce_scatter_sum(t, bounds)
    }

    /// Every rank's part r of `t` (contiguous fp32 on `device()`) becomes rank r's: each rank fills its
    /// own part, and after the call every rank holds all of them. This default zeroes the other parts
    /// and sums (exact: x + 0 = x).
    fn all_gather(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        check_bounds(self.rank(), self.world(), t, bounds)?;
        let _g = tch::no_grad_guard();
        let r = self.rank();
        let n = t.numel() as i64;
        let t0 = t.shallow_clone();
        let _ = t0.narrow(0, 0, bounds[r] as i64).zero_();
        let _ = t0.narrow(0, bounds[r + 1] as i64, n - bounds[r + 1] as i64).zero_();
        self.all_reduce_sum(t)
    }

    /// Averages a contiguous fp32 tensor on `device()` over all ranks, in place.
    fn all_reduce_avg(&mut self, t: &Tensor) -> Result<()> {
        self.all_reduce_sum(t)?;
        let _ = t.shallow_clone().g_div_scalar_(self.world() as f64);
        Ok(())
    }

    /// Every rank's `v`, in rank order.
    fn all_gather_f64(&mut self, v: f64) -> Result<Vec<f64>> {
        let mut all = vec![0.0; self.world()];
        all[self.rank()] = v;
        self.all_reduce_f64(&mut all)?;
        Ok(all)
    }

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_f64(&mut [0.0])
    }

    /// Copies `root`'s tensor (fp32, on `device()`) to every rank.
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<()> {
        if self.rank() != root {
            let _ = t.shallow_clone().zero_();
        }
        self.all_reduce_sum(t)
    }
}

/// Errors unless `bounds` splits the flat tensor `t` among `world` ranks (W + 1 entries,
/// non-decreasing, from 0 to `t.numel()`, `t` one-dimensional).
pub fn check_bounds(rank: usize, world: usize, t: &Tensor, bounds: &[usize]) -> Result<()> {
    let ok = t.dim() == 1
        && bounds.len() == world + 1
        && bounds.first() == Some(&0)
        && bounds.last() == Some(&t.numel())
        && bounds.windows(2).all(|w| w[0] <= w[1]);
    if ok {
        Ok(())
    } else {
        Err(Error::Dist {
            rank,
            msg: format!("bounds {bounds:?} do not split a flat buffer of {:?} over {world} ranks", t.size()),
        })
    }
}

/// The one-process job: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn all_reduce_sum(&mut self, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// How this process joins its job (from the environment, see `from_env`).
pub struct JobEnv {
    pub ranks: RankEnv,
    /// The run id every process of the job presents to the store.
    pub run_id: String,
    /// 0 for the first attempt, +1 per restart by the launcher.
    pub generation: u64,
    /// Whether a launcher serves the store; otherwise rank 0 serves it (torchrun- or Slurm-started).
    pub launcher_store: bool,
    pub timeout: Duration,
}

impl JobEnv {
    /// RankEnv's variables plus FERROTUNE_RUN_ID (default "ferrotune"), FERROTUNE_RESTART_GENERATION,
    /// FERROTUNE_LAUNCHER (set by `ferrotune launch`) and FERROTUNE_TIMEOUT_S (default 1800: set-up and
    /// every wait for another rank, which includes rank 0's evaluations).
    pub fn from_env() -> Result<Self> {
        let ranks = RankEnv::from_env().map_err(|e| Error::Invalid(e.to_string()))?;
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str, d: u64| -> Result<u64> {
            var(k).map_or(Ok(d), |v| v.parse().map_err(|_| Error::Invalid(format!("{k}={v:?} is not a whole number"))))
        };
        Ok(JobEnv {
            ranks,
            run_id: var("FERROTUNE_RUN_ID").unwrap_or_else(|| "ferrotune".into()),
            generation: num("FERROTUNE_RESTART_GENERATION", 0)?,
            launcher_store: var("FERROTUNE_LAUNCHER").is_some(),
            timeout: Duration::from_secs(num("FERROTUNE_TIMEOUT_S", 1800)?),
        })
    }
}

/// A joined job: the backend for `device`, and the store server when this process hosts it.
pub struct Joined {
    pub coll: Box<dyn Collective>,
    _server: Option<StoreServer>,
}

/// Joins the job: a one-rank job needs nothing; otherwise connect to the store (serving it first
/// when this is rank 0 and no launcher does), then build the backend for `device`.
pub fn init(env: &JobEnv, device: Device) -> Result<Joined> {
    let r = &env.ranks;
    if r.world_size == 1 {
        return Ok(Joined { coll: Box::new(Single), _server: None });
    }
    let server = if r.rank == 0 && !env.launcher_store {
        Some(StoreServer::serve("0.0.0.0", r.master_port, &env.run_id)?)
    } else {
        None
    };
    let mut store = StoreClient::connect(&r.master_addr, r.master_port, &env.run_id, env.generation, env.timeout)?;
    let coll: Box<dyn Collective> = match device {
        Device::Cpu => Box::new(ring::Ring::connect(&mut store, r.rank, r.world_size, env.timeout)?),
        Device::Cuda(_) => Box::new(nccl::Nccl::connect(&mut store, r.rank, r.world_size, device, env.timeout)?),
        other => return Err(Error::Invalid(format!("no collective backend for device {other:?}"))),
    };
    // Nobody starts before everyone is connected.
    store.barrier(
        "joined",
        &format!("rank {}", r.rank),
        &ferrotune_launcher::store::rank_names(r.world_size),
        env.timeout,
    )?;
    Ok(Joined { coll, _server: server })
}

/// A checksum of tensors (sum of |x| and of x weighted by position), to check that every rank starts
/// from the same weights; equal weights give bit-equal checksums.
pub fn checksum(tensors: &[Tensor]) -> f64 {
    let _guard = tch::no_grad_guard();
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = t.to_kind(Kind::Double);
            t.abs().sum(Kind::Double).double_value(&[]) + (i + 1) as f64 * t.sum(Kind::Double).double_value(&[])
        })
        .sum()
}

/// Errors unless every rank reports the same checksum of its initial weights.
pub fn verify_same_weights(coll: &mut dyn Collective, tensors: &[Tensor]) -> Result<()> {
    if coll.world() == 1 {
        return Ok(());
    }
    let all = coll.all_gather_f64(checksum(tensors))?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, &c)| c.to_bits() != all[0].to_bits())
        .map(|(r, c)| format!("rank {r} ({c:e})"))
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Dist {
            rank: coll.rank(),
            msg: format!(
                "initial weights differ from rank 0's (checksum {:e}): {}; hint: every node must read the same model files and config",
                all[0],
                differ.join(", ")
            ),
        })
    }
}

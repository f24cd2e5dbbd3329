//! The CUDA collective backend: NCCL through cudarc's raw bindings, loaded at run time. The torch wheel
//! ships `libnccl.so.2`, a name cudarc does not try, so the build script links `libnccl.so` to it in a
//! private directory on the worker's run path; dlopen then finds the very file libtorch_cuda already
//! loaded (one library, checked through /proc/self/maps). Rank 0 makes the NCCL unique id and hands it
//! out through the rendezvous store. Blocking collectives run on the legacy default stream, the one
//! libtorch uses, so they order after backward without a host sync. Reductions started during
//! backward (`start_all_reduce_sum`) run on a side stream of their own: an event orders each after the
//! kernels queued so far on the default stream, and `wait_started` makes the default stream (the
//! optimizer) wait for the last of them; the host never waits. Reduce-scatter and all-gather take
//! uneven parts, so they are grouped ncclReduce and ncclBroadcast calls, one per rank's part (as
//! torch.distributed does for uneven all-gathers), rather than ncclReduceScatter's equal counts. Tensors are only borrowed (their
//! `data_ptr`), never owned; the caller keeps a started tensor alive until `wait_started`.
//! Not here: CPU tensors (`ring`).

use super::Collective;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};
use ferrotune_launcher::store::StoreClient;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The NCCL library the process can load: its version and the file it was loaded from. An error (not
/// a panic) when it is missing.
pub fn library() -> std::result::Result<(i32, String), String> {
    // SAFETY: only tries to open the library; no NCCL call is made when it is absent.
    if !unsafe { sys::is_culib_present() } {
        return Err("NCCL is not available: libnccl.so was not found on the loader path; hint: ferrotune uses the libnccl.so.2 of the torch wheel, rebuild with scripts/setup so that the build links it, or use --device cpu".into());
    }
    let version = result::get_nccl_version().map_err(|e| format!("ncclGetVersion failed: {e:?}"))?;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut files: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with("libnccl")))
        .collect();
    files.sort_unstable();
    files.dedup();
    match files.as_slice() {
        [one] => Ok((version, (*one).to_owned())),
        more => Err(format!(
            "{} NCCL libraries are loaded ({}); libtorch's and ferrotune's must be the same file",
            more.len(),
            more.join(", ")
        )),
    }
}

pub struct Nccl {
    rank: usize,
    world: usize,
    device: Device,
    comm: sys::ncclComm_t,
    ctx: Arc<CudaContext>,
    /// The stream of reductions started during backward (made on first use).
    side: Option<Arc<CudaStream>>,
    /// Reductions on `side` the default stream has not yet been made to wait for.
    started: usize,
}

impl Nccl {
    pub fn connect(
        store: &mut StoreClient,
        rank: usize,
        world: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Nccl> {
        let err = |msg: String| Error::Dist { rank, msg };
        let (version, file) = library().map_err(err)?;
        tracing::debug!("NCCL {version} from {file}");
        let Device::Cuda(ordinal) = device else { return Err(err("NCCL reduces CUDA tensors only".into())) };
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| err(format!("cuda:{ordinal}: {e:?}")))?;
        ctx.bind_to_thread().map_err(|e| err(format!("cuda:{ordinal}: {e:?}")))?;
        let id = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.set("nccl/unique_id", &bytes)?;
            id
        } else {
            let bytes = store.wait_get("nccl/unique_id", timeout, "rank 0's NCCL id")?;
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            for (d, s) in id.internal.iter_mut().zip(bytes) {
                *d = s as _;
            }
            id
        };
        Nccl::init(id, rank, world, device, ctx)
    }

    /// A communicator of one rank on `device` with no rendezvous (what `scripts/gpu-check` tests first:
    /// the library loads, a communicator forms and a collective runs on this GPU).
    pub fn single(device: Device) -> Result<Nccl> {
        let err = |msg: String| Error::Dist { rank: 0, msg };
        library().map_err(err)?;
        let Device::Cuda(ordinal) = device else { return Err(err("NCCL reduces CUDA tensors only".into())) };
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| err(format!("cuda:{ordinal}: {e:?}")))?;
        ctx.bind_to_thread().map_err(|e| err(format!("cuda:{ordinal}: {e:?}")))?;
        let id = result::get_uniqueid().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
        Nccl::init(id, 0, 1, device, ctx)
    }

    fn init(id: sys::ncclUniqueId, rank: usize, world: usize, device: Device, ctx: Arc<CudaContext>) -> Result<Nccl> {
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every rank passes the same id and world size.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| Error::Dist { rank, msg: format!("ncclCommInitRank: {e:?}") })?;
        Ok(Nccl { rank, world, device, comm, ctx, side: None, started: 0 })
    }

    fn cuda_err(&self, what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Dist { rank: self.rank, msg: format!("{what}: {e:?}") }
    }

    /// `t` summed in place on `stream` (null: the legacy default stream).
    fn all_reduce_raw(&mut self, t: &Tensor, dtype: sys::ncclDataType_t, stream: sys::cudaStream_t) -> Result<()> {
        // SAFETY: `t` is a contiguous CUDA tensor on this communicator's device that outlives the call
        // (the legacy default stream orders the kernel before any later use of `t` by libtorch).
        unsafe {
            result::all_reduce(
                t.data_ptr(),
                t.data_ptr(),
                t.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream,
            )
        }
        .map(|_| ())
        .map_err(|e| Error::Dist {
            rank: self.rank,
            msg: format!("ncclAllReduce: {e:?}; hint: another rank has probably failed, see its log"),
        })
    }
}

impl Nccl {
    /// The reduction stream of `start_*` (made on first use), ordered after every kernel queued so far
    /// on the default stream.
    fn side_stream(&mut self) -> Result<sys::cudaStream_t> {
        let side = match &self.side {
            Some(s) => s.clone(),
            None => {
                let s = self.ctx.new_stream().map_err(|e| self.cuda_err("creating the reduction stream", e))?;
                self.side = Some(s.clone());
                s
            }
        };
        side.join(&self.ctx.default_stream()).map_err(|e| self.cuda_err("ordering the reduction", e))?;
        Ok(side.cu_stream() as sys::cudaStream_t)
    }

    /// Part r of `t` summed onto rank r (`gather` false: one ncclReduce per part, rooted at its rank),
    /// or copied from rank r to every rank (`gather` true: one ncclBroadcast per part), all in one
    /// NCCL group on `stream`. Empty parts are skipped (every rank has the same bounds).
    fn parts_raw(&mut self, t: &Tensor, bounds: &[usize], gather: bool, stream: sys::cudaStream_t) -> Result<()> {
        assert!(t.device() == self.device && t.is_contiguous() && t.kind() == Kind::Float);
        super::check_bounds(self.rank, self.world, t, bounds)?;
        let what = if gather { "all-gather (ncclBroadcast)" } else { "reduce-scatter (ncclReduce)" };
        let fail = |e: result::NcclError| Error::Dist {
            rank: self.rank,
            msg: format!("{what}: {e:?}; hint: another rank has probably failed, see its log"),
        };
        result::group_start().map_err(fail)?;
        let mut first = Ok(());
        for r in 0..self.world {
            let count = bounds[r + 1] - bounds[r];
            if count == 0 {
                continue;
            }
            // SAFETY: part r lies inside `t` (bounds checked above), a contiguous fp32 CUDA tensor on
            // this communicator's device that the caller keeps alive until the stream has run the call;
            // in place (send = receive buffer) is allowed for both calls.
            let ptr = unsafe { (t.data_ptr() as *mut f32).add(bounds[r]) }.cast::<std::ffi::c_void>();
            let done = unsafe {
                if gather {
                    result::broadcast(ptr, ptr, count, sys::ncclDataType_t::ncclFloat32, r as i32, self.comm, stream)
                } else {
                    result::reduce(
                        ptr,
                        ptr,
                        count,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        r as i32,
                        self.comm,
                        stream,
                    )
                }
            };
            if let (Err(e), true) = (done, first.is_ok()) {
                first = Err(fail(e));
            }
        }
        let ended = result::group_end().map_err(fail);
        first.and(ended.map(|_| ()))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank and is not used after this.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        self.device
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        assert!(t.device() == self.device && t.is_contiguous() && t.kind() == Kind::Float);
        self.all_reduce_raw(t, sys::ncclDataType_t::ncclFloat32, std::ptr::null_mut())
    }

    fn start_all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        assert!(t.device() == self.device && t.is_contiguous() && t.kind() == Kind::Float);
        // After every kernel queued so far on the default stream (this layer's backward).
        let stream = self.side_stream()?;
        self.all_reduce_raw(t, sys::ncclDataType_t::ncclFloat32, stream)?;
        self.started += 1;
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        self.parts_raw(t, bounds, false, std::ptr::null_mut())
    }

    fn start_reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        let stream = self.side_stream()?;
        self.parts_raw(t, bounds, false, stream)?;
        self.started += 1;
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        self.parts_raw(t, bounds, true, std::ptr::null_mut())
    }

    fn wait_started(&mut self) -> Result<()> {
        if let (Some(side), true) = (&self.side, self.started > 0) {
            self.ctx.default_stream().join(side).map_err(|e| self.cuda_err("waiting for the reductions", e))?;
        }
        self.started = 0;
        Ok(())
    }

    fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()> {
        let t = Tensor::from_slice(v).to_device(self.device);
        self.all_reduce_raw(&t, sys::ncclDataType_t::ncclFloat64, std::ptr::null_mut())?;
        v.copy_from_slice(&Vec::<f64>::try_from(t.to_device(Device::Cpu)).map_err(Error::Torch)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Runs without a GPU: the library and its version only need the wheel's files.
    #[test]
    fn the_wheels_nccl_is_found_and_is_the_one_libtorch_loaded() {
        let (version, file) = super::library().unwrap();
        println!("NCCL {version} from {file}");
        assert!(file.ends_with("nvidia/nccl/lib/libnccl.so.2"), "{file}");
        // The version is the wheel's (2.29.7 beside torch 2.13, 2.28.9 beside the GPU host's torch 2.11):
        // the one its pip metadata records, not a constant.
        let site = std::path::Path::new(&file).ancestors().nth(4).unwrap().to_owned();
        let wheel = std::fs::read_dir(&site)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find_map(|n| n.strip_prefix("nvidia_nccl_").and_then(|n| n.strip_suffix(".dist-info")).map(String::from))
            .unwrap_or_else(|| panic!("no nvidia_nccl_*.dist-info in {}", site.display()));
        let v: Vec<i32> = wheel.rsplit('-').next().unwrap().split('.').take(3).map(|x| x.parse().unwrap()).collect();
        assert_eq!(version, v[0] * 10000 + v[1] * 100 + v[2], "the loaded NCCL is not the wheel's ({wheel})");
        assert!(version >= 22800, "ferrotune needs NCCL 2.28 or later, found {version}");
    }
}

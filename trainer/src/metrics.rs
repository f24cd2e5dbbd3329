//! Metrics go through one small trait, so the training loop logs once and every sink (the terminal,
//! a JSONL file, TensorBoard) receives the same numbers. Rank 0 logs; other ranks pass `Null`.
//! Sinks never fail the run: a metrics write error is reported once and the run goes on. Also the
//! memory figures the loop logs (peak RSS on CPU, device memory in use on CUDA).

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub trait Logger {
    /// Scalars of one optimizer step (e.g. `train/loss`).
    fn scalars(&mut self, step: u64, values: &[(&str, f64)]);
    /// A text note (the resolved config, at start).
    fn text(&mut self, _tag: &str, _text: &str) {}
    /// Hyperparameters of the run and its final metrics (TensorBoard's HParams dashboard).
    fn hparams(&mut self, _hparams: &BTreeMap<String, Value>, _metrics: &[(&str, f64)]) {}
    /// The run starts after `step` completed steps (its checkpoint's step, or 0 for a fresh start):
    /// whatever an earlier attempt logged for later steps is stale, about to be logged again, and must
    /// not be shown twice.
    fn starts_after(&mut self, _step: u64) {}
    fn flush(&mut self) {}
}

/// Discards everything (non-zero ranks).
pub struct Null;
impl Logger for Null {
    fn scalars(&mut self, _: u64, _: &[(&str, f64)]) {}
}

/// One JSON object per line: {"step": N, "train/loss": x, ...}.
pub struct Jsonl {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    failed: bool,
}

impl Jsonl {
    /// Appends to `path` (a resumed run continues the same file).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Jsonl { file: std::io::BufWriter::new(file), path: path.to_path_buf(), failed: false })
    }

    /// Rewrites the file without the lines of steps after `step` (atomically: a crash leaves the old
    /// file or the new one), then appends to the new file.
    fn truncate_after(&mut self, step: u64) -> std::io::Result<()> {
        self.file.flush()?;
        let text = std::fs::read_to_string(&self.path)?;
        let after = |line: &str| {
            serde_json::from_str::<Value>(line).ok().and_then(|v| v.get("step")?.as_u64()).is_some_and(|s| s > step)
        };
        let kept: String = text.lines().filter(|l| !after(l)).flat_map(|l| [l, "\n"]).collect();
        if kept.len() == text.len() {
            return Ok(());
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, &self.path)?;
        let file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        self.file = std::io::BufWriter::new(file);
        Ok(())
    }
}

impl Logger for Jsonl {
    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in values {
            obj.insert((*k).into(), serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number));
        }
        if let Err(e) = writeln!(self.file, "{}", Value::Object(obj)).and_then(|()| self.file.flush()) {
            if !self.failed {
                tracing::warn!("cannot write metrics.jsonl ({e}); training goes on");
                self.failed = true;
            }
        }
    }

    fn starts_after(&mut self, step: u64) {
        if let Err(e) = self.truncate_after(step) {
            tracing::warn!(
                "cannot drop the steps after {step} from {} ({e}); they will appear twice",
                self.path.display()
            );
        }
    }
}

/// Sends everything to several sinks.
pub struct FanOut(pub Vec<Box<dyn Logger>>);

impl Logger for FanOut {
    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        self.0.iter_mut().for_each(|l| l.scalars(step, values));
    }
    fn text(&mut self, tag: &str, text: &str) {
        self.0.iter_mut().for_each(|l| l.text(tag, text));
    }
    fn hparams(&mut self, h: &BTreeMap<String, Value>, m: &[(&str, f64)]) {
        self.0.iter_mut().for_each(|l| l.hparams(h, m));
    }
    fn starts_after(&mut self, step: u64) {
        self.0.iter_mut().for_each(|l| l.starts_after(step));
    }
    fn flush(&mut self) {
        self.0.iter_mut().for_each(|l| l.flush());
    }
}

/// Peak resident memory of this process in bytes (Linux VmHWM), for CPU runs.
/// Starts the peak resident memory (VmHWM) over from the current resident memory (Linux: "5" to
/// /proc/self/clear_refs); elsewhere, or when refused, the peak keeps counting from the start.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Total memory of `device`: the GPU's (through the CUDA driver) or the host's MemTotal on CPU; None
/// when it cannot be read.
pub fn device_total_bytes(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cuda(ordinal) => {
            let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
            ctx.mem_get_info().ok().map(|(_, total)| total as u64)
        }
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
        }
    }
}

pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The memory figure logged as `train/peak_mem_gb`: on CPU the process's peak resident memory (VmHWM);
/// on CUDA the caching allocator's peak reserve (`torch.cuda.max_memory_reserved`; its peak of
/// allocated bytes is logged beside it as `train/peak_allocated_gb`) where ferrotune was built with the
/// allocator shim, else the highest device memory in use (total - free, what nvidia-smi shows: other
/// processes on the GPU too) seen at the samples taken so far, read through the CUDA driver. A device
/// that cannot be queried reports nothing rather than host memory.
pub struct PeakMemory {
    cuda: Option<std::sync::Arc<cudarc::driver::CudaContext>>,
    ordinal: usize,
    peak: u64,
}

/// The CUDA caching allocator's figures for one device, in bytes (`torch.cuda.memory_stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CudaMemory {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

#[cfg(ferrotune_cuda_stats)]
unsafe extern "C" {
    fn ferrotune_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
    fn ferrotune_cuda_reset_peak(device: i32) -> i32;
}

/// The allocator's figures for `cuda:ordinal`; None without a GPU, before the allocator has been used on
/// it, or when ferrotune was built against a libtorch without CUDA.
pub fn cuda_memory(ordinal: usize) -> Option<CudaMemory> {
    #[cfg(ferrotune_cuda_stats)]
    {
        let mut out = [0i64; 4];
        // SAFETY: `out` has the 4 slots the shim writes; the shim catches every C++ exception.
        if unsafe { ferrotune_cuda_memory_stats(ordinal as i32, out.as_mut_ptr()) } == 0 {
            let [allocated, peak_allocated, reserved, peak_reserved] = out.map(|v| v.max(0) as u64);
            return Some(CudaMemory { allocated, peak_allocated, reserved, peak_reserved });
        }
    }
    let _ = ordinal;
    None
}

/// Starts the allocator's peaks of `cuda:ordinal` again from its current figures (a no-op without it).
pub fn reset_cuda_peak(ordinal: usize) {
    #[cfg(ferrotune_cuda_stats)]
    // SAFETY: the shim catches every C++ exception (a bad ordinal included) and returns -1.
    unsafe {
        ferrotune_cuda_reset_peak(ordinal as i32);
    }
    let _ = ordinal;
}

/// Whether this build reads the CUDA caching allocator's statistics (see `cuda_memory`).
pub const CUDA_ALLOCATOR_STATS: bool = cfg!(ferrotune_cuda_stats);

impl PeakMemory {
    pub fn new(device: tch::Device) -> Self {
        let cuda = match device {
            tch::Device::Cuda(ordinal) => match cudarc::driver::CudaContext::new(ordinal) {
                Ok(ctx) => Some(ctx),
                Err(e) => {
                    tracing::warn!("cannot query cuda:{ordinal} memory ({e:?}); no memory figure will be logged");
                    None
                }
            },
            _ => None,
        };
        let ordinal = if let tch::Device::Cuda(n) = device { n } else { 0 };
        PeakMemory { cuda, ordinal, peak: 0 }
    }

    /// The allocator's figures of the run's GPU (None on CPU or without the shim).
    pub fn allocator(&self) -> Option<CudaMemory> {
        self.cuda.as_ref().and_then(|_| cuda_memory(self.ordinal))
    }

    /// Bytes (see the type), or `None` when unknown.
    pub fn sample(&mut self) -> Option<u64> {
        match &self.cuda {
            Some(_) if let Some(m) = self.allocator() => Some(m.peak_reserved),
            Some(ctx) => {
                let (free, total) = ctx.mem_get_info().ok()?;
                self.peak = self.peak.max((total - free) as u64);
                Some(self.peak)
            }
            None => peak_rss_bytes(),
        }
    }
}

//! What the machine a run is on can do, read at run time rather than assumed: the CPU's model and its
//! bf16 matrix units (AMX-BF16, AVX-512 BF16, from /proc/cpuinfo's flags), the CUDA devices the driver
//! sees (name, memory, compute capability, driver version), the libtorch and NCCL actually loaded, and
//! the measured matrix-product peak of a device and dtype (the MFU denominator), cached per machine under
//! `$FERROTUNE_HOME/peaks.json`. It does not choose dtypes or settings for a run.

use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The host CPU as /proc/cpuinfo describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Cpu {
    pub model: String,
    /// Logical CPUs the kernel lists.
    pub logical: usize,
    /// Threads libtorch's CPU kernels use (`torch.get_num_threads()`).
    pub torch_threads: i32,
    pub amx_bf16: bool,
    pub avx512_bf16: bool,
    pub avx512f: bool,
    pub avx2: bool,
}

impl Cpu {
    /// Reads /proc/cpuinfo (an empty model and no flags where it cannot be read).
    pub fn detect() -> Cpu {
        Cpu::from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    /// Parses the text of /proc/cpuinfo (the first processor's model name and flags).
    pub fn from_cpuinfo(text: &str) -> Cpu {
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let flags = field("flags");
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        Cpu {
            model: field("model name"),
            logical: text.lines().filter(|l| l.starts_with("processor")).count(),
            torch_threads: tch::get_num_threads(),
            amx_bf16: has("amx_bf16"),
            avx512_bf16: has("avx512_bf16"),
            avx512f: has("avx512f"),
            avx2: has("avx2"),
        }
    }

    /// Whether the CPU has bf16 matrix units (where bf16 products outrun fp32 ones).
    pub fn has_bf16_units(&self) -> bool {
        self.amx_bf16 || self.avx512_bf16
    }

    /// The widest matrix instructions it has: what decides its matrix-product peaks beside the model
    /// name, which virtual machines often shorten (`AMD EPYC` is said of AVX2 and AVX-512 hosts alike).
    pub fn isa(&self) -> &'static str {
        match (self.amx_bf16, self.avx512_bf16, self.avx512f, self.avx2) {
            (true, ..) => "AMX-BF16",
            (_, true, ..) => "AVX-512 BF16",
            (_, _, true, _) => "AVX-512",
            (.., true) => "AVX2",
            _ => "no AVX2",
        }
    }

    /// "AMX-BF16", "AVX-512 BF16" or "none (AVX2 only)" and the like, for logs and reports.
    pub fn bf16_units(&self) -> String {
        match (self.amx_bf16, self.avx512_bf16) {
            (true, true) => "AMX-BF16 and AVX-512 BF16".into(),
            (true, false) => "AMX-BF16".into(),
            (false, true) => "AVX-512 BF16".into(),
            _ if self.avx2 => "none (AVX2 only)".into(),
            _ => "none".into(),
        }
    }
}

/// Whether this machine's CPU has bf16 matrix units (AMX-BF16 or AVX-512 BF16): /proc/cpuinfo read once
/// per process, for choices made per operation (`kernels::applies`).
pub fn cpu_has_bf16_units() -> bool {
    static UNITS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNITS.get_or_init(|| Cpu::detect().has_bf16_units())
}

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, Serialize)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
    pub compute_capability: (i32, i32),
}

/// The CUDA devices the driver sees (empty when there is no driver or no device) and the driver's
/// CUDA version (e.g. 13000 for 13.0), or why they could not be read.
pub fn gpus() -> std::result::Result<(Vec<Gpu>, i32), String> {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to open the driver library; nothing is called when it is absent.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) on this machine".into());
    }
    result::init().map_err(|e| format!("cuInit: {e:?}"))?;
    let mut version = 0;
    // SAFETY: `version` is a valid out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| format!("cuDriverGetVersion: {e:?}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
    let mut out = vec![];
    for ordinal in 0..count as usize {
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e:?}"))?;
        out.push(Gpu {
            ordinal,
            name: ctx.name().map_err(|e| format!("cuda:{ordinal}: {e:?}"))?,
            total_bytes: ctx.total_mem().map_err(|e| format!("cuda:{ordinal}: {e:?}"))? as u64,
            compute_capability: ctx.compute_capability().map_err(|e| format!("cuda:{ordinal}: {e:?}"))?,
        });
    }
    Ok((out, version))
}

/// The libtorch this process has loaded: the directory of its `libtorch_cpu.so` (from /proc/self/maps)
/// and the version its Python package records beside it (`torch/version.py`), when it is there.
pub fn libtorch() -> (Option<PathBuf>, Option<String>) {
    // Touch libtorch so that it is mapped even before any tensor op.
    let _ = tch::get_num_threads();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf));
    let version = lib.as_ref().and_then(|l| std::fs::read_to_string(l.join("../version.py")).ok()).and_then(|v| {
        v.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|s| s.trim_matches(['\'', '"']).to_string()))
    });
    (lib, version)
}

/// A measured matrix-product rate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peak {
    /// FLOP/s of the best timed product (2 n^3 FLOPs each).
    pub flops: f64,
    /// The side of the square products timed.
    pub n: i64,
    /// Where the figure comes from (not stored in the cache).
    #[serde(skip)]
    pub source: PeakSource,
}

impl Peak {
    /// Seconds one product takes at this rate.
    fn product_secs(&self) -> f64 {
        2.0 * (self.n as f64).powi(3) / self.flops
    }

    /// What this start measured (FLOP/s), when it measured.
    pub fn now(&self) -> Option<f64> {
        match self.source {
            PeakSource::Measured => Some(self.flops),
            PeakSource::Cached { now } => Some(now),
            PeakSource::CachedUnmeasured => None,
        }
    }

    /// Where the figure comes from, in words, naming the cache file it was kept in: for logs and reports.
    pub fn origin(&self, cache: &Path) -> String {
        match self.source {
            PeakSource::Measured => format!("measured now: best of 3 products of {n}x{n}", n = self.n),
            PeakSource::Cached { now } => format!(
                "the best measured on this machine, cached in {}; {:.3} TFLOP/s measured now",
                cache.display(),
                now / 1e12
            ),
            PeakSource::CachedUnmeasured => format!(
                "measured earlier on this machine, cached in {}; a product takes too long here to measure at each start",
                cache.display()
            ),
        }
    }
}

/// Where a [`Peak`] comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum PeakSource {
    /// Measured now (and now the best on record).
    #[default]
    Measured,
    /// An earlier start's better reading, from the cache; `now` is what this start measured (FLOP/s).
    Cached { now: f64 },
    /// From the cache without a new measurement: one product takes over `SLOW_PRODUCT_SECS` here.
    CachedUnmeasured,
}

/// The key a peak is cached under: what decides it (CPU model, matrix instructions, CPUs and threads,
/// or GPU name; dtype; libtorch).
pub fn peak_key(device: Device, kind: Kind) -> String {
    let what = match device {
        Device::Cuda(n) => match gpus() {
            Ok((g, _)) => g.get(n).map_or(format!("cuda:{n}"), |g| g.name.clone()),
            Err(_) => format!("cuda:{n}"),
        },
        _ => cpu_key(&Cpu::detect()),
    };
    format!("{what} | {kind:?} | libtorch {} | probe 3", libtorch().1.unwrap_or_default())
}

/// A CPU's part of `peak_key`: two hosts that print the same model name but differ in matrix
/// instructions or CPU count are different machines.
fn cpu_key(cpu: &Cpu) -> String {
    format!("{} ({}, {} CPUs) x{} threads", cpu.model, cpu.isa(), cpu.logical, cpu.torch_threads)
}

/// A cached peak whose one product takes longer than this is not measured again at each start.
const SLOW_PRODUCT_SECS: f64 = 0.25;

/// The matrix-product peak of `device` in `kind`: measured now (`measure_peak`, under half a second)
/// and compared with `cache` (a JSON map of `peak_key`s), which keeps the best rate ever measured on
/// this machine: a probe that ran while other work held the cores reads low (a 2-core AMD EPYC read
/// 83 GFLOP/s in fp32 during a test run and 125-175 quiet), and a cached low peak would overstate every
/// later run's MFU. Where one product at the cached rate takes over `SLOW_PRODUCT_SECS` (bf16 on a CPU
/// without bf16 units: seconds a product), the cached figure stands unmeasured. A cache that cannot be
/// written is only a warning.
pub fn peak(device: Device, kind: Kind, cache: &Path) -> Result<Peak> {
    cached_peak(&peak_key(device, kind), device, kind, cache)
}

/// `peak` under a given cache key.
fn cached_peak(key: &str, device: Device, kind: Kind, cache: &Path) -> Result<Peak> {
    let key = key.to_string();
    let mut all: BTreeMap<String, Peak> =
        std::fs::read(cache).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    // An entry that is no rate (zero, negative, not finite: a hand-edited file) is measured over.
    let prev = all.get(&key).filter(|p| p.flops.is_finite() && p.flops > 0.0 && p.n > 0).cloned();
    if let Some(p) = prev.as_ref().filter(|p| p.product_secs() > SLOW_PRODUCT_SECS) {
        return Ok(Peak { source: PeakSource::CachedUnmeasured, ..p.clone() });
    }
    let p = measure_peak(device, kind)?;
    if let Some(best) = prev.filter(|b| b.flops >= p.flops) {
        return Ok(Peak { source: PeakSource::Cached { now: p.flops }, ..best });
    }
    all.insert(key, p.clone());
    // One temporary file per process: ranks and sweep trials may write the cache at once.
    let tmp = cache.with_extension(format!("json.{}.tmp", std::process::id()));
    let written = cache.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|_| {
        std::fs::write(&tmp, serde_json::to_vec_pretty(&all).expect("json"))?;
        std::fs::rename(&tmp, cache)
    });
    if let Err(e) = written {
        tracing::warn!("cannot cache the measured peak in {}: {e}", cache.display());
    }
    Ok(p)
}

/// Where peaks are cached: `$FERROTUNE_HOME/peaks.json`.
pub fn peak_cache() -> PathBuf {
    ferrotune_data::fixtures::home().join("peaks.json")
}

/// Times square matrix products of `kind` on `device` and returns the best rate: sides 1024 and 2048
/// on CPU (4096 and 8192 on CUDA), each warmed up once and then the best of 3, stopping early when
/// one product takes over 0.1 s. The best of several sides, because the rate is not monotonic in the
/// size: on a 2-core Xeon with AMX, bf16 ran 1.15 TFLOP/s at 1024 (in cache) and 0.70 at 2048-4096.
/// Under half a second on every CPU measured (fp32 at 2048 is the longest, ~80 ms a product).
pub fn measure_peak(device: Device, kind: Kind) -> Result<Peak> {
    if let Device::Cuda(n) = device {
        crate::train::usable_device(&format!("cuda:{n}"))?;
    }
    let sync = || {
        if let Device::Cuda(n) = device {
            tch::Cuda::synchronize(n as i64);
        }
    };
    let _guard = tch::no_grad_guard();
    let sides: &[i64] = if device.is_cuda() { &[4096, 8192] } else { &[1024, 2048] };
    let mut best = Peak { flops: 0.0, n: 0, source: PeakSource::Measured };
    for &n in sides {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        let mut secs = f64::INFINITY;
        for rep in 0..4 {
            sync();
            let t0 = Instant::now();
            let c = a.matmul(&b);
            sync();
            let took = t0.elapsed().as_secs_f64();
            drop(c);
            if rep > 0 {
                secs = secs.min(took); // the first product is the warm-up
            }
        }
        let flops = 2.0 * (n as f64).powi(3) / secs;
        if flops > best.flops {
            best = Peak { flops, n, source: PeakSource::Measured };
        }
        if secs > 0.1 {
            break;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_decide_the_bf16_units() {
        let amx = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\nprocessor\t: 1\n";
        let c = Cpu::from_cpuinfo(amx);
        assert_eq!(
            (c.model.as_str(), c.logical, c.amx_bf16, c.avx512_bf16),
            ("Intel(R) Xeon(R) Processor", 2, true, true)
        );
        assert!(c.has_bf16_units());
        let avx2 = Cpu::from_cpuinfo("model name : AMD EPYC\nflags : fpu avx2 fma\n");
        assert!(!avx2.has_bf16_units());
        assert_eq!(avx2.bf16_units(), "none (AVX2 only)");
        // A flag that only starts with the name is not the flag.
        assert!(!Cpu::from_cpuinfo("flags : avx512_bf16x amx_bf16_\n").has_bf16_units());
    }

    /// The probe measures a real rate (well above zero, below an absurd bound) at every start, and the
    /// cache keeps the best: a lower cached figure (a probe on a busy machine) is replaced, a higher
    /// one stands beside what was measured now, and one too slow to re-measure stands unmeasured.
    #[test]
    fn peak_is_measured_at_each_start_and_the_cache_keeps_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("peaks.json");
        // A fixed key: the real one names the torch thread count, which other tests may change.
        let key = format!("{} (test)", peak_key(Device::Cpu, Kind::Float));
        let t0 = Instant::now();
        let p = cached_peak(&key, Device::Cpu, Kind::Float, &cache).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        println!("fp32 CPU peak {:.1} GFLOP/s at n = {} in {secs:.2}s", p.flops / 1e9, p.n);
        assert!(p.source == PeakSource::Measured && p.flops > 1e9 && p.flops < 1e14, "{p:?}");
        let stored = || -> BTreeMap<String, Peak> { serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap() };
        // serde_json reads floats back to within an ulp or so, not always bit for bit.
        let same = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
        let set = |flops: f64, n: i64| {
            let all = BTreeMap::from([(key.clone(), Peak { flops, n, source: PeakSource::Measured })]);
            std::fs::write(&cache, serde_json::to_vec(&all).unwrap()).unwrap();
        };
        // A busy machine's low reading is replaced by this start's (n small enough that the low
        // rate still counts as quick to re-measure).
        set(p.flops / 100.0, 64);
        let low = cached_peak(&key, Device::Cpu, Kind::Float, &cache).unwrap();
        assert!(low.source == PeakSource::Measured && low.flops > p.flops / 10.0, "{low:?}");
        assert!(same(stored()[&key].flops, low.flops));
        // A better earlier reading stands, with now's beside it.
        set(p.flops * 100.0, 1024);
        let high = cached_peak(&key, Device::Cpu, Kind::Float, &cache).unwrap();
        let now_below = matches!(high.source, PeakSource::Cached { now } if now < high.flops);
        assert!(now_below && same(high.flops, p.flops * 100.0), "{high:?}");
        // An entry that is no rate is measured over.
        set(0.0, 1024);
        let zero = cached_peak(&key, Device::Cpu, Kind::Float, &cache).unwrap();
        assert!(zero.source == PeakSource::Measured && zero.flops > 1e9, "{zero:?}");
        // A product that takes seconds at the cached rate is not measured again.
        set(1e9, 2048);
        let t0 = Instant::now();
        let slow = cached_peak(&key, Device::Cpu, Kind::Float, &cache).unwrap();
        assert!(slow.source == PeakSource::CachedUnmeasured && same(slow.flops, 1e9), "{slow:?}");
        assert!(t0.elapsed().as_secs_f64() < 0.1);
    }

    /// Hosts that print the same model but differ in matrix instructions or CPUs do not share peaks.
    #[test]
    fn cpus_with_the_same_name_and_other_instructions_have_their_own_peaks() {
        let avx2 = Cpu::from_cpuinfo("processor : 0\nmodel name : AMD EPYC\nflags : fpu avx2 fma\n");
        let avx512 = Cpu::from_cpuinfo("processor : 0\nmodel name : AMD EPYC\nflags : avx2 avx512f avx512_bf16\n");
        let two = Cpu::from_cpuinfo("processor : 0\nmodel name : AMD EPYC\nflags : avx2\nprocessor : 1\n");
        assert_eq!((avx2.isa(), avx512.isa()), ("AVX2", "AVX-512 BF16"));
        let keys = [cpu_key(&avx2), cpu_key(&avx512), cpu_key(&two)];
        assert!(keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2], "{keys:?}");
    }
}

//! `ferrotune probe ...`: the machine report (`env`, JSON on stdout) and the single-run probes that
//! `scripts/gpu-check` compares with transformers and peft on the same device (`forward`, `step`,
//! `generate`, `rows`), plus a 1-rank NCCL all-reduce. Argument handling only: the computations are
//! `ferrotune_trainer::{hardware, probe}`.

use anyhow::{bail, ensure, Context, Result};
use ferrotune::cli::{ProbeCommand, ProbeDeviceArgs, ProbeEnvArgs};
use ferrotune_data::cache::TokenCache;
use ferrotune_trainer::dist::Collective;
use ferrotune_trainer::layerwise::Checkpointing;
use ferrotune_trainer::lora::LoraConfig;
use ferrotune_trainer::train::usable_device;
use ferrotune_trainer::{hardware, parse_kind, probe};
use serde_json::json;
use tch::{Device, Kind};

pub fn run(command: ProbeCommand) -> Result<()> {
    match command {
        ProbeCommand::Env(a) => env(a),
        ProbeCommand::Forward(a) => {
            let (kind, device) = on(&a.on)?;
            let f = &a.files;
            probe::forward(&f.model, &f.input, &f.out, &a.grads, kind, device).context("probe forward")
        }
        ProbeCommand::Step(a) => {
            let (kind, device) = on(&a.on)?;
            let lora = match (a.lora_r, a.adapter_out) {
                (None, _) => None,
                (Some(_), None) => {
                    bail!("--lora-r needs --adapter-out DIR (where the fresh adapters go for the reference)")
                }
                (Some(r), Some(dir)) => {
                    let target_modules = a.lora_targets.split(',').map(|s| s.trim().to_string()).collect();
                    Some((LoraConfig { r, alpha: a.lora_alpha, dropout: 0.0, target_modules }, dir))
                }
            };
            let checkpointing = match a.checkpointing.as_str() {
                "none" => Checkpointing::None,
                "full" => Checkpointing::Full,
                other => bail!("--checkpointing {other}: expected none or full"),
            };
            let args = probe::StepArgs {
                lr: a.lr,
                weight_decay: a.weight_decay,
                max_grad_norm: a.max_grad_norm,
                lora,
                checkpointing,
                seed: a.seed,
            };
            let f = &a.files;
            probe::step(&f.model, &f.input, &f.out, &args, kind, device).context("probe step")
        }
        ProbeCommand::Generate(a) => {
            let (kind, device) = on(&a.on)?;
            probe::generate(&a.model, &a.prompts, &a.out, a.max_new_tokens, kind, device).context("probe generate")
        }
        ProbeCommand::Allreduce(a) => allreduce(&a),
        ProbeCommand::Rows(a) => {
            let cache = TokenCache::open(&a.cache).with_context(|| format!("opening {}", a.cache.display()))?;
            probe::write_rows(&cache, a.seed, a.rows, &a.out).context("probe rows")
        }
        ProbeCommand::RunDir(a) => {
            let cfg = ferrotune_trainer::plan::RunConfig::load(Some(&a.config), &a.set)?;
            println!("{}", cfg.output.dir.join(&cfg.output.run_name).display());
            Ok(())
        }
    }
}

/// The dtype and device of a probe, the device checked to exist.
fn on(a: &ProbeDeviceArgs) -> Result<(Kind, Device)> {
    let device = usable_device(&a.device).context("--device")?;
    Ok((parse_kind(&a.dtype)?, device))
}

fn env(a: ProbeEnvArgs) -> Result<()> {
    let device = on(&ProbeDeviceArgs { device: a.device.clone(), dtype: "fp32".into() })?.1;
    let cpu = hardware::Cpu::detect();
    let (lib, torch_version) = hardware::libtorch();
    let (gpus, cuda) = match hardware::gpus() {
        Ok((g, v)) => (json!(g), json!({"driver_cuda_version": v})),
        Err(e) => (json!([]), json!({"error": e})),
    };
    let nccl = match ferrotune_trainer::dist::nccl::library() {
        Ok((v, file)) => json!({"version": v, "file": file}),
        Err(e) => json!({"error": e}),
    };
    let cache = hardware::peak_cache();
    let mut peaks = serde_json::Map::new();
    for (name, kind) in [("fp32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let p = if a.remeasure { hardware::measure_peak(device, kind) } else { hardware::peak(device, kind, &cache) };
        let p = p.with_context(|| format!("measuring the {name} matrix-product peak on {}", a.device))?;
        peaks.insert(name.into(), json!({"flops": p.flops, "n": p.n, "source": p.origin(&cache), "now": p.now()}));
    }
    let report = json!({
        "ferrotune": env!("CARGO_PKG_VERSION"),
        "device": a.device,
        "cpu": {
            "model": cpu.model, "logical": cpu.logical, "torch_threads": cpu.torch_threads,
            "isa": cpu.isa(), "bf16_units": cpu.bf16_units(), "has_bf16_units": cpu.has_bf16_units(),
        },
        // How bf16 attention of a short document runs on this device (attention::Path): `Grouped`,
        // `SdpaFp32` or `Sdpa`, for references that must compute it the same way (scripts/gpu-check).
        "short_bf16_attention": format!("{:?}", ferrotune_trainer::attention::Path::of(24, Kind::BFloat16, device)),
        "libtorch": {"version": torch_version, "dir": lib},
        "cuda": cuda,
        "cuda_available": tch::Cuda::is_available(),
        "gpus": gpus,
        "nccl": nccl,
        "cuda_allocator_stats": ferrotune_trainer::metrics::CUDA_ALLOCATOR_STATS,
        "matmul_peak": peaks,
        "peak_cache": cache,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A 1-rank communicator and an all-reduce of 0..n on the GPU: the sum of one rank is the buffer itself,
/// and the started (side-stream) path gives the same.
fn allreduce(a: &ProbeDeviceArgs) -> Result<()> {
    let (_, device) = on(a)?;
    ensure!(device.is_cuda(), "the NCCL probe needs --device cuda or cuda:N");
    let mut nccl = ferrotune_trainer::dist::nccl::Nccl::single(device)?;
    let n = 1 << 20;
    let want = tch::Tensor::arange(n, (Kind::Float, device));
    let t = want.copy();
    nccl.all_reduce_sum(&t)?;
    let blocking = f64::try_from((&t - &want).abs().max())?;
    let started = want.copy();
    nccl.start_all_reduce_sum(&started)?;
    nccl.wait_started()?;
    let side = f64::try_from((&started - &want).abs().max())?;
    let mut v = [1.5f64, -2.0];
    nccl.all_reduce_f64(&mut v)?;
    let (version, file) = ferrotune_trainer::dist::nccl::library().map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        json!({"nccl": version, "file": file, "elements": n, "max_diff_blocking": blocking, "max_diff_started": side, "f64": v})
    );
    ensure!(blocking == 0.0 && side == 0.0 && v == [1.5, -2.0], "a 1-rank all-reduce changed the buffer");
    Ok(())
}

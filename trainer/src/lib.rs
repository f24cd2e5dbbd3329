//! ferrotune's trainer crate: the Llama model in tch, checkpoint reading and writing, masked loss and
//! generation. It does not read conversation data (that is `ferrotune-data`) or spawn processes (that is
//! `ferrotune-launcher`).

pub mod adapter_base;
pub mod attention;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod config_layers;
pub mod disk;
pub mod dist;
pub mod error;
pub mod eval;
pub mod evaluation;
pub mod flops;
pub mod generate;
pub mod hardware;
pub mod interrupt;
pub mod kernels;
pub mod layerwise;
pub mod learner;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod optim_state;
pub mod plan;
pub mod probe;
pub mod profile;
pub mod resume;
pub mod rope;
pub mod run_data;
pub mod run_lock;
pub mod schedule;
pub mod sdp;
mod setup;
pub mod tensorboard;
pub mod train;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use model::Llama;

use std::path::Path;
use tch::{Device, Kind};

/// Reads `config.json` and the weights of the Hugging Face model directory `dir` into a new model.
pub fn load_model(dir: &Path, kind: Kind, device: Device) -> Result<Llama> {
    let config = LlamaConfig::from_dir(dir)?;
    let model = Llama::new(config, kind, device);
    weights::load(&model, dir)?;
    Ok(model)
}

/// Parses an explicit compute dtype name as used on the command line and in configs (`auto` is
/// resolved by [`resolve_dtype`], which knows the device).
pub fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "fp32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::Invalid(format!("unknown dtype `{other}`; expected auto, fp32 or bf16"))),
    }
}

/// The compute dtype of `name` on `device`, and why: an explicit fp32 or bf16 as given; `auto` is
/// bf16 where the hardware has bf16 matrix units (CUDA devices of compute capability 8.0 or later;
/// CPUs with AMX-BF16 or AVX-512 BF16, read from their flags) and fp32 elsewhere, where bf16 products
/// are emulated and slower than fp32 ones.
pub fn resolve_dtype(name: &str, device: Device) -> Result<(Kind, String)> {
    if name != "auto" {
        return Ok((parse_kind(name)?, format!("{name} as configured")));
    }
    let Device::Cuda(n) = device else { return Ok(auto_dtype(&hardware::Cpu::detect(), None)) };
    let gpu = hardware::gpus().ok().and_then(|(g, _)| g.into_iter().nth(n));
    // Only `ferrotune plan` finds no GPU (training checks the device first): it plans for a GPU this
    // host cannot see, and every current training GPU computes in bf16.
    let Some(g) = gpu else {
        let why = format!("auto: bf16, assumed for cuda:{n}, which this host cannot see to ask its compute capability");
        return Ok((Kind::BFloat16, why));
    };
    let gpu = Some((g.name, g.compute_capability));
    Ok(auto_dtype(&hardware::Cpu::detect(), gpu))
}

/// `auto`'s choice for a CPU, or for a GPU given as (name, compute capability).
pub fn auto_dtype(cpu: &hardware::Cpu, gpu: Option<(String, (i32, i32))>) -> (Kind, String) {
    match gpu {
        Some((name, (major, minor))) if major >= 8 => {
            (Kind::BFloat16, format!("auto: bf16, {name} (compute capability {major}.{minor}) has bf16 tensor cores"))
        }
        Some((name, (major, minor))) => (
            Kind::Float,
            format!("auto: fp32, {name} (compute capability {major}.{minor}) has no bf16 tensor cores (8.0 or later)"),
        ),
        None if cpu.has_bf16_units() => {
            (Kind::BFloat16, format!("auto: bf16, the CPU ({}) has bf16 matrix units: {}", cpu.model, cpu.bf16_units()))
        }
        None => (
            Kind::Float,
            format!(
                "auto: fp32, the CPU ({}) has no bf16 matrix units ({}), so bf16 would be slower than fp32",
                cpu.model,
                cpu.bf16_units()
            ),
        ),
    }
}

/// The name of a compute dtype as configs write it (fp32, bf16).
pub fn kind_name(kind: Kind) -> &'static str {
    if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "fp32"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_bf16_only_where_there_are_bf16_units() {
        let cpu = |flags: &str| hardware::Cpu::from_cpuinfo(&format!("model name : Test CPU\nflags : {flags}\n"));
        let (k, why) = auto_dtype(&cpu("avx2 avx512f amx_bf16 amx_tile"), None);
        assert_eq!(k, Kind::BFloat16);
        assert!(why.contains("Test CPU") && why.contains("AMX-BF16"), "{why}");
        assert_eq!(auto_dtype(&cpu("avx2 avx512_bf16"), None).0, Kind::BFloat16);
        let (k, why) = auto_dtype(&cpu("avx2 fma"), None);
        assert_eq!(k, Kind::Float);
        assert!(why.contains("AVX2 only") && why.contains("slower"), "{why}");
        // A GPU decides by its compute capability, whatever the host CPU has.
        assert_eq!(auto_dtype(&cpu("avx2"), Some(("NVIDIA H200".into(), (9, 0)))).0, Kind::BFloat16);
        let (k, why) = auto_dtype(&cpu("amx_bf16"), Some(("Tesla V100".into(), (7, 0))));
        assert_eq!(k, Kind::Float);
        assert!(why.contains("7.0"), "{why}");
        assert_eq!(resolve_dtype("bf16", Device::Cpu).unwrap().0, Kind::BFloat16);
        assert!(resolve_dtype("fp8", Device::Cpu).unwrap_err().to_string().contains("expected auto, fp32 or bf16"));
    }
}

//! ferrotune's trainer crate: the Llama model in tch, checkpoint reading and writing, masked loss and
//! generation. It does not read conversation data (that is `ferrotune-data`) or spawn processes (that is
//! `ferrotune-launcher`).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod config_layers;
pub mod dist;
pub mod error;
pub mod eval;
pub mod evaluation;
pub mod generate;
pub mod hardware;
pub mod interrupt;
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
pub mod resume;
pub mod rope;
pub mod run_data;
pub mod run_lock;
pub mod schedule;
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

/// Parses a compute dtype name as used on the command line and in configs.
pub fn parse_kind(name: &str) -> Result<Kind> {
    match name {
        "fp32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::Invalid(format!("unknown dtype `{other}`; expected fp32 or bf16"))),
    }
}

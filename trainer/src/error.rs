//! The trainer crate's error type: every failure names the file, config key or tensor it concerns and,
//! where the fix is likely, ends with a `hint:`. It is not used for programmer errors inside the tensor
//! math, which panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{}config key `{key}`: {msg}", if path.as_os_str().is_empty() { String::new() } else { format!("{}: ", path.display()) })]
    Config { path: PathBuf, key: String, msg: String },

    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    #[error("tensor `{tensor}` in {path}: {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error(transparent)]
    Store(#[from] ferrotune_launcher::store::StoreError),

    #[error("rank {rank}: {msg}")]
    Dist { rank: usize, msg: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| match ferrotune_data::paths::why_unusable(&path) {
            Some(why) => Error::Checkpoint { path, msg: why },
            None => Error::Io { path, source },
        }
    }
}

/// Reads and parses a JSON file, naming the file in both failure modes.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_owned(), source })
}

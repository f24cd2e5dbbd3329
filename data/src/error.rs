//! The data crate's error type. Every error names the file and, where it applies, the line and message
//! index, and says what to do next.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: {msg}")]
    At { path: PathBuf, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| match crate::paths::why_unusable(&path) {
            Some(why) => DataError::At { path, msg: why },
            None => DataError::Io { path, source },
        }
    }

    pub fn at(path: impl AsRef<Path>, msg: impl Into<String>) -> DataError {
        DataError::At { path: path.as_ref().to_owned(), msg: msg.into() }
    }
}

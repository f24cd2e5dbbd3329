//! A Hugging Face fast tokenizer (`tokenizer.json`) with the ids ferrotune needs to know about (BOS,
//! EOS, end-of-turn, pad). Text is encoded without adding special tokens: the chat template already
//! writes them. It does not render templates or assign roles.

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::Tokenizer {
                path,
                msg: "not found; hint: the model directory needs the tokenizer.json of a Hugging Face fast tokenizer"
                    .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| DataError::Tokenizer { path: path.clone(), msg: e.to_string() })?;
        Ok(Tokenizer { inner, path })
    }

    /// Token ids of `text`, special tokens written in the text recognised, none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// Id of a token given by its text (e.g. "<|im_end|>"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

//! A Hugging Face fast tokenizer (`tokenizer.json`) with the ids ferrotune needs to know about (BOS,
//! EOS, end-of-turn, pad). Text is encoded without adding special tokens: the chat template already
//! writes them. It does not render templates or assign roles.

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub special: SpecialTokens,
}

/// Special-token strings of tokenizer_config.json (each a string or an AddedToken object).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

impl SpecialTokens {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = read_config(dir)?;
        let token = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                o => o.get("content")?.as_str().map(str::to_owned),
            }
        };
        Ok(SpecialTokens { bos: token("bos_token"), eos: token("eos_token"), pad: token("pad_token") })
    }
}

/// `DIR/tokenizer_config.json` parsed (`null` when the file does not exist).
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(serde_json::Value::Null);
    }
    let text = std::fs::read_to_string(&path).map_err(DataError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| DataError::at(&path, format!("invalid JSON: {e}")))
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
        Ok(Tokenizer { inner, path, special: SpecialTokens::from_dir(dir)? })
    }

    /// Token ids of `text`, special tokens written in the text recognised, none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids with byte offsets into `text`, special tokens recognised, none added.
    pub fn encode_offsets(&self, text: &str) -> Result<Vec<(u32, (usize, usize))>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().iter().copied().zip(enc.get_offsets().iter().copied()).collect())
    }

    /// Ids with the tokenizer's own special tokens added (as transformers' add_special_tokens=True).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of `pad_token` from tokenizer_config.json, if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad.as_deref().and_then(|t| self.token_id(t))
    }

    /// The id of `eos_token` from tokenizer_config.json, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos.as_deref().and_then(|t| self.token_id(t))
    }

    /// Text of `ids` with special tokens kept (for showing what the model sees).
    pub fn decode_raw(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| DataError::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// Id of a token given by its text (e.g. "<|im_end|>"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

//! ferrotune's data crate: conversation formats, chat templates, tokenization, masking and packing. It
//! does not depend on tch; it produces token ids and labels that the trainer consumes.

pub mod builtin;
pub mod cache;
pub mod check;
pub mod coqa;
pub mod encode;
pub mod error;
pub mod fixtures;
pub mod loader;
pub mod mask;
pub mod pack;
pub mod paths;
pub mod prepare;
pub mod preview;
pub mod record;
pub mod rules;
pub mod source;
pub mod template;
pub mod tokenizer;

pub use error::{DataError, Result};
pub use template::{ChatTemplate, Message};
pub use tokenizer::Tokenizer;

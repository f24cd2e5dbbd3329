//! The `ferrotune` package's library: the command-line definition (`cli`) and the front binary's
//! helpers (`front`). It references no tch code, so the front binary `ferrotune` links no libtorch; the
//! commands that run models live in the `ferrotune-worker` binary (`src/bin/ferrotune-worker/`).

pub mod cli;
pub mod data_commands;
pub mod front;
pub mod launch;
pub mod logging;
pub mod report;
pub mod sweep;

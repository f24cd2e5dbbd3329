//! Where ferrotune keeps what it installs outside the clone (`FERROTUNE_HOME`, default
//! `~/.cache/ferrotune`): the Python environment with libtorch and the reference oracles, and the test
//! and demo fixtures that `scripts/fixtures.py` builds from PyPI packages. Tests, benches and scripts
//! call `ensure` to get a fixture, building it on first use under a file lock. It does not download
//! anything itself and is not used on the training path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Root of everything ferrotune caches outside the clone.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("FERROTUNE_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("ferrotune")
}

/// The Python interpreter of ferrotune's environment (made by `scripts/setup`).
pub fn python() -> PathBuf {
    home().join("venv").join("bin").join("python")
}

/// The repository root (this crate lives in `data/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("data/ has a parent").to_owned()
}

/// Path of fixture `name`, building it first if it is not there yet. Panics with a hint when the
/// Python environment is missing or the build fails: fixtures are test infrastructure.
pub fn ensure(name: &str) -> PathBuf {
    let dir = home().join("fixtures");
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).expect("create fixtures directory");
    let lock = std::fs::File::create(dir.join(format!(".{name}.lock"))).expect("create lock file");
    lock.lock().expect("lock fixture");
    if !out.exists() {
        let py = python();
        assert!(py.exists(), "{} not found; hint: run scripts/setup first", py.display());
        let status = Command::new(&py)
            .arg(repo_root().join("scripts").join("fixtures.py"))
            .arg(name)
            .arg(&out)
            .status()
            .expect("run scripts/fixtures.py");
        assert!(status.success(), "building fixture {name} failed ({status})");
    }
    out
}

//! What the front binary does before any model code runs: finds libtorch and the worker binary and
//! hands libtorch commands over to it (exec, same arguments), so that a missing libtorch is a clear
//! error instead of the dynamic loader's message. It links no libtorch itself.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Directory libtorch was linked from when ferrotune was built (the worker's run path).
pub const LIBTORCH_LIB: Option<&str> = option_env!("FERROTUNE_LIBTORCH_LIB");

pub const WORKER: &str = "ferrotune-worker";

/// Checks that libtorch is where the build found it (`dir`, normally `LIBTORCH_LIB`).
pub fn check_libtorch(dir: Option<&str>) -> Result<PathBuf> {
    check_libtorch_with(dir, std::env::var_os("LD_LIBRARY_PATH"))
}

/// `check_libtorch` with the loader path given.
fn check_libtorch_with(dir: Option<&str>, ld_library_path: Option<std::ffi::OsString>) -> Result<PathBuf> {
    let Some(dir) = dir else {
        bail!("this ferrotune was built without libtorch; hint: build it with scripts/setup (or scripts/cargo build --release)")
    };
    let dir = PathBuf::from(dir);
    if !dir.join("libtorch_cpu.so").exists() {
        // A build made for another host (../shared/device/build's `.device/run`) points the loader at that
        // host's libtorch through LD_LIBRARY_PATH, which the loader searches before the run path.
        let elsewhere = ld_library_path
            .map(|v| std::env::split_paths(&v).find(|d| d.join("libtorch_cpu.so").exists()))
            .unwrap_or_default();
        if let Some(found) = elsewhere {
            return Ok(found);
        }
        bail!(
            "libtorch is missing: ferrotune was built against {} (torch 2.13.0 from the Python environment), which no longer holds libtorch_cpu.so, and no directory of LD_LIBRARY_PATH holds one\nhint: run scripts/setup to reinstall it, or rebuild ferrotune against another torch 2.13.0 installation",
            dir.display()
        );
    }
    Ok(dir)
}

/// The worker binary beside the running one.
pub fn worker_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running ferrotune binary")?;
    let worker = exe.parent().unwrap_or(Path::new(".")).join(WORKER);
    if !worker.exists() {
        bail!(
            "{} not found next to {}; hint: install both binaries (cargo build --release builds them together)",
            WORKER,
            exe.display()
        );
    }
    Ok(worker)
}

/// Replaces this process with the worker, passing the same arguments. Returns only on failure.
pub fn exec_worker() -> Result<()> {
    use std::os::unix::process::CommandExt;
    check_libtorch(LIBTORCH_LIB)?;
    let worker = worker_path()?;
    let err = std::process::Command::new(&worker).args(std::env::args_os().skip(1)).exec();
    Err(err).with_context(|| format!("starting {}", worker.display()))
}

/// Restores the default action of SIGPIPE (the Rust runtime ignores it, so that a write to a closed
/// pipe becomes an error, and `println!` panics on it): like other Unix tools, `ferrotune inspect M |
/// head` then ends quietly when `head` stops reading.
pub fn quiet_broken_pipe() {
    // SAFETY: setting a signal's disposition to its default at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints the whole error chain and turns the result into the process exit code.
pub fn report(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_libtorch_is_a_clear_error() {
        let err = check_libtorch_with(Some("/nonexistent/torch/lib"), None).unwrap_err().to_string();
        assert!(err.starts_with("libtorch is missing: ferrotune was built against /nonexistent/torch/lib"), "{err}");
        assert!(err.contains("hint: run scripts/setup"), "{err}");
        assert!(check_libtorch(None).unwrap_err().to_string().contains("built without libtorch"));
        // The build's own libtorch passes.
        assert!(check_libtorch(LIBTORCH_LIB).is_ok());
        // A build for another host runs with that host's libtorch on LD_LIBRARY_PATH.
        let path = std::env::join_paths(["/nonexistent", LIBTORCH_LIB.unwrap()]).unwrap();
        let found = check_libtorch_with(Some("/nonexistent/torch/lib"), Some(path)).unwrap();
        assert_eq!(found, PathBuf::from(LIBTORCH_LIB.unwrap()));
    }
}

//! The lock that gives one run directory to one run at a time: rank 0 of `train` holds an exclusive
//! advisory lock (flock) on `RUN_DIR/.lock` from before anything is written until the process ends (the
//! kernel drops it on any exit, kill -9 included, so a stale lock never blocks a resume). A second
//! `train` or `--resume` of the same directory is refused naming the holder, whose pid, host, start
//! time and command line the file records. It does not stop other commands from reading the run.

use crate::error::{Error, Result};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub struct RunLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if missing), or says who holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir).map_err(Error::io(run_dir))?;
        let path = run_dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process (starting up)" } else { holder };
                return Err(Error::Checkpoint {
                    path: run_dir.to_owned(),
                    msg: format!(
                        "this run directory is in use by {holder}; hint: wait for that run to end (or stop it), or set output.run_name to start another run"
                    ),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path)(e)),
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let args: Vec<String> = std::env::args().collect();
        let text =
            format!("pid {} on {} since unix time {since}: {}\n", std::process::id(), host.trim(), args.join(" "));
        let written = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(text.as_bytes()));
        written.map_err(Error::io(&path))?;
        Ok(RunLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = RunLock::acquire(&run).unwrap();
        let err = RunLock::acquire(&run).err().expect("a second lock must be refused").to_string();
        assert!(err.contains(&format!("in use by pid {} on", std::process::id())), "{err}");
        assert!(err.contains("hint: wait for that run to end"), "{err}");
        drop(first);
        let again = RunLock::acquire(&run).unwrap();
        assert!(std::fs::read_to_string(&again.path).unwrap().starts_with(&format!("pid {}", std::process::id())));
    }
}

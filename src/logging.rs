//! Log output of both binaries: `tracing` events go to stderr through one subscriber (level from
//! `FERROTUNE_LOG`, e.g. `debug` or `ferrotune_trainer=debug`; default `info`), and progress bars are
//! made here so that a log line never tears a bar: while a bar is live, log lines are printed above it.
//! Bars draw only when stderr is a terminal (indicatif hides them otherwise), so logs redirected to a
//! file hold the log lines alone. Not here: what is logged (the commands and the trainer decide).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::sync::Mutex;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The bar currently drawn (at most one at a time), which log lines print above.
static LIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Installs the subscriber; call once at the start of `main`.
pub fn init() {
    let filter = EnvFilter::try_from_env("FERROTUNE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_writer(AboveBar)
        .try_init();
}

/// A bar of `len` units with `template` (indicatif syntax), registered so log lines print above it.
pub fn bar(len: u64, template: &str, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar.set_message(what.to_owned());
    *LIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
    bar
}

/// A byte-counting bar (tokenizing a file).
pub fn bytes_bar(what: &str) -> ProgressBar {
    bar(0, "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}", what)
}

/// A bar of optimizer steps with ETA; the caller's message carries the rate and the latest loss.
pub fn steps_bar(total: u64) -> ProgressBar {
    bar(total, "train [{bar:30}] step {pos}/{len} eta {eta} | {msg}", "")
}

/// Writer handed to the subscriber: each event is written whole, above the live bar if any.
struct AboveBar;

struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match LIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|b| !b.is_finished()) {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

impl<'a> MakeWriter<'a> for AboveBar {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(256))
    }
}

//! Ctrl-C during training: the first SIGINT asks the run to stop after the step in flight, with a
//! checkpoint, so it can `--resume`; a second one more than a second later exits at once (status 130).
//! Every rank's request is combined in the step's own all-reduce (`train::one_step`), so all ranks stop
//! after the same step even when the signal reaches them at different moments (a terminal sends it to
//! the launcher and every worker; the launcher forwards it too, within the second). The worker's `train`
//! command installs the handler; library callers of `train` are left alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static FIRST_NS: AtomicU64 = AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we own; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

extern "C" fn on_sigint(_: libc::c_int) {
    let now = monotonic_ns();
    if REQUESTED.swap(true, Ordering::SeqCst) {
        if now.saturating_sub(FIRST_NS.load(Ordering::SeqCst)) > 1_000_000_000 {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
        return;
    }
    FIRST_NS.store(now, Ordering::SeqCst);
    let msg = b"\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again to quit at once)\n";
    // SAFETY: write(2) is async-signal-safe; the buffer is static.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Installs the SIGINT handler (once per process).
pub fn install() {
    // SAFETY: the handler only touches atomics and async-signal-safe calls.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

/// Whether this process was asked to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

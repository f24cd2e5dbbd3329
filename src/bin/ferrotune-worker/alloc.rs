//! The worker's memory allocator: jemalloc, for the whole process (libtorch's CPU tensors included,
//! through the `override_allocator` build that defines `malloc`/`free` themselves), configured never to
//! hand freed pages back to the kernel so that they are reused without page faults.
//!
//! Why: training allocates and frees activations of many sizes interleaved with tensors that stay
//! (layer inputs, gradients). glibc's heap cannot give the holes back and keeps them resident: on CPU,
//! with SmolLM2-135M and rows of 2,048 tokens, peak resident memory was 3.07 GB with glibc against
//! 1.65 GB with this allocator under activation checkpointing, and 8.09 against 5.79 GB without, at the
//! same step time (README: "Memory"). Set MALLOC_CONF to change the options (jemalloc reads it after
//! the defaults below).

use tikv_jemallocator::Jemalloc;

#[global_allocator]
static GLOBAL: Jemalloc = Jemalloc;

/// jemalloc's compiled-in options (a C string it reads at start-up): decay disabled, so that freed
/// pages stay for reuse (the peak is what a run needs anyway).
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: &u8 = &b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0"[0];

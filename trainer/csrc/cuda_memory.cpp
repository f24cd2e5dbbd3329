// The CUDA caching allocator's own memory statistics (what torch.cuda.max_memory_allocated and
// max_memory_reserved report), which tch does not bind. It reaches the allocator through c10's
// device-agnostic DeviceAllocator interface (c10/core, as torch.accelerator.memory_stats does), so it
// needs neither CUDA headers nor libc10_cuda at build time. Compiled by trainer/build.rs when libtorch
// has that interface; trainer/src/metrics.rs calls it. No exception crosses into Rust: every failure
// (no GPU, no CUDA allocator registered, allocator not initialised, bad ordinal) returns -1.
#include <c10/core/CachingDeviceAllocator.h>
#include <cstdint>

extern "C" {

// out[0..4] = allocated current, allocated peak, reserved current, reserved peak (bytes) of `device`.
int ferrotune_cuda_memory_stats(int device, int64_t* out) {
  try {
    c10::DeviceAllocator* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (allocator == nullptr || !allocator->initialized()) return -1;
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    // Index 0 of every StatArray is StatType::AGGREGATE (all pools together).
    out[0] = stats.allocated_bytes[0].current;
    out[1] = stats.allocated_bytes[0].peak;
    out[2] = stats.reserved_bytes[0].current;
    out[3] = stats.reserved_bytes[0].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts the peaks again from the current figures (torch.cuda.reset_peak_memory_stats).
int ferrotune_cuda_reset_peak(int device) {
  try {
    c10::DeviceAllocator* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (allocator == nullptr || !allocator->initialized()) return -1;
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}
}

// Which fused kernels libtorch's scaled_dot_product_attention may pick on CUDA: the global flags that
// torch.backends.cuda.enable_cudnn_sdp sets, which tch does not bind. Read at every SDPA dispatch;
// present in CPU builds too (they only steer CUDA dispatch). Compiled by trainer/build.rs when
// ATen/Context.h declares them; trainer/src/sdp.rs calls it. No exception crosses into Rust.
#include <ATen/Context.h>

extern "C" {

// Allows (1) or forbids (0) the cuDNN attention backend; returns the flag as read back, -1 on failure.
int ferrotune_sdp_set_cudnn(int enabled) {
  try {
    at::globalContext().setSDPUseCuDNN(enabled != 0);
    return at::globalContext().userEnabledCuDNNSDP() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Whether the cuDNN attention backend is allowed: 1 or 0, -1 on failure.
int ferrotune_sdp_cudnn_enabled() {
  try {
    return at::globalContext().userEnabledCuDNNSDP() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
}

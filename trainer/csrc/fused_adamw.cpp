// libtorch's fused AdamW kernel (aten::_fused_adamw_, what torch.optim.AdamW(fused=True) calls: one
// pass over parameter, gradient and both moments instead of one pass per elementwise operation), which
// tch does not bind. Tensors arrive as tch's handles, which are `at::Tensor*`. Compiled by
// trainer/build.rs when libtorch's headers declare the operator; trainer/src/optim.rs calls it. No
// exception crosses into Rust: a failure returns -1 and leaves the message for
// ferrotune_fused_adamw_error.
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {
std::string last_error;
}

extern "C" {

const char* ferrotune_fused_adamw_error() { return last_error.c_str(); }

// One AdamW update of `n` parameters in place (decoupled weight decay, no amsgrad), reading the step
// count (bias corrections) from the 0-dimensional float tensor `step`, which the caller has advanced.
int ferrotune_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                          int64_t n, at::Tensor* step, double lr, double beta1, double beta2, double weight_decay,
                          double eps) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*step);
    }
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  } catch (...) {
    last_error = "unknown C++ exception";
    return -1;
  }
}

}  // extern "C"

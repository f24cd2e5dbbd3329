// RMSNorm on CPU in one pass forward and one backward, as a libtorch autograd function, computing what
// transformers' LlamaRMSNorm computes, rounding where it rounds:
//   forward   r = 1 / sqrt(mean(x32^2) + eps) per row;  y = T(w * T(x32 * r))
//   backward  gxn = T(gy * w);  gx = T(gxn * r + x32 * (2 / C) * (-0.5 * r^3 * sum(gxn * x32)));
//             gw = T(sum over rows of T(gy * T(x32 * r)))
// where T() rounds to the tensor's dtype (bf16: round to nearest even, as c10::BFloat16; fp32: nothing)
// and everything else is fp32. The composite it replaces (trainer/src/model.rs) runs some 8 kernels
// forward and 15 backward over the whole activation, saving an fp32 copy of it for backward; this one
// reads each row once (it stays in cache for the backward's second loop over it) and saves the input
// and one fp32 factor per row. Sums run in another order than libtorch's (16 lanes, rows in fixed blocks
// of 64 whatever the thread count, so results do not depend on it), so they differ in the last bits.
//
// Only contiguous fp32 and bf16 CPU tensors with a weight of the same dtype: the caller keeps the
// composite for everything else. The loops are plain C++ (common.h: target_clones, dtypes). Tensors
// arrive as tch's handles (`at::Tensor*`); the result is a new handle that Rust owns, or null with the
// message for ferrotune_kernel_error. Compiled by trainer/build.rs; trainer/src/kernels.rs calls it.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

using ft::BF16;
using ft::F32;
using ft::ptr;

constexpr int64_t LANES = 16;       // partial sums per row: what lets the compiler vectorize a sum
constexpr int64_t ROW_BLOCK = 64;   // rows per partial sum of the weight's gradient

// sum(x32^2) over one row of c.
template <class D>
FT_INLINE float sum_squares(const typename D::S* x, int64_t c) {
  float acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= c; i += LANES)
    for (int64_t j = 0; j < LANES; ++j) {
      float v = D::load(x[i + j]);
      acc[j] += v * v;
    }
  for (; i < c; ++i) acc[0] += D::load(x[i]) * D::load(x[i]);
  float s = 0.f;
  for (int64_t j = 0; j < LANES; ++j) s += acc[j];
  return s;
}

template <class D>
FT_INLINE void forward_rows(const typename D::S* x, const typename D::S* w, typename D::S* y, float* rstd,
                            int64_t c, float eps, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const typename D::S* xr = x + row * c;
    typename D::S* yr = y + row * c;
    float r = 1.f / std::sqrt(sum_squares<D>(xr, c) / float(c) + eps);
    rstd[row] = r;
    for (int64_t i = 0; i < c; ++i) yr[i] = D::store(D::load(w[i]) * D::round(D::load(xr[i]) * r));
  }
}

// Rows [begin, end): gx (when asked) and this block's partial sum of the weight's gradient (when asked).
template <class D>
FT_INLINE void backward_rows(const typename D::S* gy, const typename D::S* x, const typename D::S* w,
                             const float* rstd, typename D::S* gx, float* gw_part, int64_t c, int64_t begin,
                             int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const typename D::S* gr = gy + row * c;
    const typename D::S* xr = x + row * c;
    const float r = rstd[row];
    if (gw_part)
      for (int64_t i = 0; i < c; ++i) gw_part[i] += D::round(D::load(gr[i]) * D::round(D::load(xr[i]) * r));
    if (!gx) continue;
    float acc[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= c; i += LANES)
      for (int64_t j = 0; j < LANES; ++j)
        acc[j] += D::round(D::load(gr[i + j]) * D::load(w[i + j])) * D::load(xr[i + j]);
    for (; i < c; ++i) acc[0] += D::round(D::load(gr[i]) * D::load(w[i])) * D::load(xr[i]);
    float dot = 0.f;
    for (int64_t j = 0; j < LANES; ++j) dot += acc[j];
    // d/dvar of r = (var + eps)^-1/2 is -r^3 / 2; d/dx of mean(x^2) is 2x / C.
    const float k = (-0.5f * dot * (r * r * r)) / float(c) * 2.f;
    typename D::S* gxr = gx + row * c;
    for (int64_t j = 0; j < c; ++j) gxr[j] = D::store(D::round(D::load(gr[j]) * D::load(w[j])) * r + D::load(xr[j]) * k);
  }
}

FT_CLONES void forward_f32(const float* x, const float* w, float* y, float* rstd, int64_t c, float eps, int64_t b,
                           int64_t e) {
  forward_rows<F32>(x, w, y, rstd, c, eps, b, e);
}
FT_CLONES void forward_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, float* rstd, int64_t c, float eps,
                            int64_t b, int64_t e) {
  forward_rows<BF16>(x, w, y, rstd, c, eps, b, e);
}
FT_CLONES void backward_f32(const float* gy, const float* x, const float* w, const float* rstd, float* gx,
                            float* gw_part, int64_t c, int64_t b, int64_t e) {
  backward_rows<F32>(gy, x, w, rstd, gx, gw_part, c, b, e);
}
FT_CLONES void backward_bf16(const uint16_t* gy, const uint16_t* x, const uint16_t* w, const float* rstd,
                             uint16_t* gx, float* gw_part, int64_t c, int64_t b, int64_t e) {
  backward_rows<BF16>(gy, x, w, rstd, gx, gw_part, c, b, e);
}

struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    const int64_t c = x.size(-1), rows = x.numel() / c;
    at::Tensor y = at::empty_like(x);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      if (bf16)
        forward_bf16(ptr<uint16_t>(x), ptr<uint16_t>(w), ptr<uint16_t>(y), ptr<float>(rstd), c, float(eps), b, e);
      else
        forward_f32(ptr<float>(x), ptr<float>(w), ptr<float>(y), ptr<float>(rstd), c, float(eps), b, e);
    });
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor gy = grads[0].contiguous();
    const int64_t c = x.size(-1), rows = x.numel() / c;
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    at::Tensor gx = want_x ? at::empty_like(x) : at::Tensor();
    const int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    at::Tensor parts = want_w ? at::zeros({blocks, c}, x.options().dtype(at::kFloat)) : at::Tensor();
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        const int64_t b = blk * ROW_BLOCK, e = std::min(rows, b + ROW_BLOCK);
        float* part = want_w ? ptr<float>(parts) + blk * c : nullptr;
        if (bf16)
          backward_bf16(ptr<uint16_t>(gy), ptr<uint16_t>(x), ptr<uint16_t>(w), ptr<float>(rstd), ptr<uint16_t>(gx),
                        part, c, b, e);
        else
          backward_f32(ptr<float>(gy), ptr<float>(x), ptr<float>(w), ptr<float>(rstd), ptr<float>(gx), part, c, b, e);
      }
    });
    // Blocks summed in order: the same bits whatever the number of threads.
    at::Tensor gw = want_w ? parts.sum(0).to(w.scalar_type()) : at::Tensor();
    return {gx, gw, at::Tensor()};
  }
};

}  // namespace

extern "C" {

// y = RMSNorm(x) * w over the last dimension, with autograd; x (..., C) and w (C,) contiguous, both fp32
// or both bf16, on CPU. Returns a new tensor handle, or null with the message in ferrotune_kernel_error.
at::Tensor* ferrotune_rms_norm(at::Tensor* x, at::Tensor* w, double eps) {
  return ft::guard([&] {
    const auto kind = x->scalar_type();
    TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16, "rms_norm: x must be fp32 or bf16, not ", kind);
    TORCH_CHECK(w->scalar_type() == kind, "rms_norm: w is ", w->scalar_type(), ", x is ", kind);
    TORCH_CHECK(x->device().is_cpu() && w->device().is_cpu(), "rms_norm: CPU tensors only");
    TORCH_CHECK(x->dim() >= 1 && w->dim() == 1 && w->size(0) == x->size(-1) && x->size(-1) > 0,
                "rms_norm: w ", w->sizes(), " does not match x ", x->sizes());
    TORCH_CHECK(x->is_contiguous() && w->is_contiguous(), "rms_norm: x and w must be contiguous");
    return RmsNormFn::apply(*x, *w, eps);
  });
}

}  // extern "C"

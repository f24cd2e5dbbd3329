// The Llama MLP's gate on CPU, silu(a) * b, in one pass forward and one backward, as a libtorch autograd
// function computing what transformers' `act_fn(gate_proj(x)) * up_proj(x)` computes, rounding where
// libtorch's silu, mul and silu_backward kernels round:
//   forward   s = T(a / (1 + exp(-a)));  y = T(s * b)
//   backward  gb = T(gy * s);  gs = T(gy * b);  sig = 1 / (1 + exp(-a));  ga = T(gs * sig * (1 + a * (1 - sig)))
// where T() rounds to the tensor's dtype and everything else is fp32 (common.h). The composite runs
// silu and mul forward and three kernels backward, and autograd keeps silu's output for the product's
// backward beside a and b; this kernel saves a and b only and recomputes s (one exp) in its backward:
// a third less of the MLP's saved activations. exp is common.h's, not libtorch's Sleef: fp32 results
// may differ from the composite's in the last ulp, and in bf16 such a difference can flip a rounding.
//
// Only contiguous fp32 or bf16 CPU tensors of one shape and dtype: the caller keeps the composite for
// everything else. Tensors arrive as tch's handles; the result is a new handle that Rust owns, or null
// with the message for ferrotune_kernel_error. Compiled by trainer/build.rs; trainer/src/kernels.rs
// calls it.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

using ft::BF16;
using ft::F32;
using ft::ptr;

constexpr int64_t GRAIN = 1 << 14;  // elements per parallel task

// silu(x) rounded to the dtype, as libtorch's silu kernel computes it.
template <class D>
FT_INLINE float silu(float x) {
  return D::round(x / (1.0f + ft::exp(-x)));
}

// silu's backward at x from the product's gradient gs, as libtorch's silu_backward computes it.
FT_INLINE float silu_backward(float x, float gs) {
  const float sig = 1.0f / (1.0f + ft::exp(-x));
  return gs * sig * (1.0f + x * (1.0f - sig));
}

template <class D>
FT_INLINE void forward_range(const typename D::S* a, const typename D::S* b, typename D::S* y, int64_t begin,
                             int64_t end) {
  for (int64_t i = begin; i < end; ++i) y[i] = D::store(silu<D>(D::load(a[i])) * D::load(b[i]));
}

// ga and gb over [begin, end), each only when asked (null otherwise). The three cases are separate loops:
// a test inside the loop would keep the compiler from vectorizing it.
template <class D>
FT_INLINE void backward_range(const typename D::S* gy, const typename D::S* a, const typename D::S* b,
                              typename D::S* ga, typename D::S* gb, int64_t begin, int64_t end) {
  if (ga && gb) {
    for (int64_t i = begin; i < end; ++i) {
      const float x = D::load(a[i]), g = D::load(gy[i]);
      gb[i] = D::store(g * silu<D>(x));
      ga[i] = D::store(silu_backward(x, D::round(g * D::load(b[i]))));
    }
  } else if (ga) {
    for (int64_t i = begin; i < end; ++i)
      ga[i] = D::store(silu_backward(D::load(a[i]), D::round(D::load(gy[i]) * D::load(b[i]))));
  } else if (gb) {
    for (int64_t i = begin; i < end; ++i) gb[i] = D::store(D::load(gy[i]) * silu<D>(D::load(a[i])));
  }
}

FT_CLONES void forward_f32(const float* a, const float* b, float* y, int64_t s, int64_t e) {
  forward_range<F32>(a, b, y, s, e);
}
FT_CLONES void forward_bf16(const uint16_t* a, const uint16_t* b, uint16_t* y, int64_t s, int64_t e) {
  forward_range<BF16>(a, b, y, s, e);
}
FT_CLONES void backward_f32(const float* gy, const float* a, const float* b, float* ga, float* gb, int64_t s,
                            int64_t e) {
  backward_range<F32>(gy, a, b, ga, gb, s, e);
}
FT_CLONES void backward_bf16(const uint16_t* gy, const uint16_t* a, const uint16_t* b, uint16_t* ga,
                             uint16_t* gb, int64_t s, int64_t e) {
  backward_range<BF16>(gy, a, b, ga, gb, s, e);
}

struct SwigluFn : public torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor y = at::empty_like(a);
    const bool bf16 = a.scalar_type() == at::kBFloat16;
    at::parallel_for(0, a.numel(), GRAIN, [&](int64_t s, int64_t e) {
      if (bf16)
        forward_bf16(ptr<uint16_t>(a), ptr<uint16_t>(b), ptr<uint16_t>(y), s, e);
      else
        forward_f32(ptr<float>(a), ptr<float>(b), ptr<float>(y), s, e);
    });
    ctx->save_for_backward({a, b});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &b = saved[1];
    const at::Tensor gy = grads[0].contiguous();
    at::Tensor ga = ctx->needs_input_grad(0) ? at::empty_like(a) : at::Tensor();
    at::Tensor gb = ctx->needs_input_grad(1) ? at::empty_like(b) : at::Tensor();
    const bool bf16 = a.scalar_type() == at::kBFloat16;
    at::parallel_for(0, a.numel(), GRAIN, [&](int64_t s, int64_t e) {
      if (bf16)
        backward_bf16(ptr<uint16_t>(gy), ptr<uint16_t>(a), ptr<uint16_t>(b), ptr<uint16_t>(ga), ptr<uint16_t>(gb),
                      s, e);
      else
        backward_f32(ptr<float>(gy), ptr<float>(a), ptr<float>(b), ptr<float>(ga), ptr<float>(gb), s, e);
    });
    return {ga, gb};
  }
};

}  // namespace

extern "C" {

// y = silu(a) * b with autograd; a and b contiguous, of one shape, both fp32 or both bf16, on CPU.
// Returns a new tensor handle, or null with the message in ferrotune_kernel_error.
at::Tensor* ferrotune_swiglu(at::Tensor* a, at::Tensor* b) {
  return ft::guard([&] {
    const auto kind = a->scalar_type();
    TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16, "swiglu: a must be fp32 or bf16, not ", kind);
    TORCH_CHECK(b->scalar_type() == kind, "swiglu: b is ", b->scalar_type(), ", a is ", kind);
    TORCH_CHECK(a->device().is_cpu() && b->device().is_cpu(), "swiglu: CPU tensors only");
    TORCH_CHECK(a->sizes() == b->sizes(), "swiglu: a ", a->sizes(), " and b ", b->sizes(), " differ");
    TORCH_CHECK(a->is_contiguous() && b->is_contiguous(), "swiglu: a and b must be contiguous");
    return SwigluFn::apply(*a, *b);
  });
}

}  // extern "C"

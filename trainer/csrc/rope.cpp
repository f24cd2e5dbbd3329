// Rotary position embeddings on CPU, x * cos + rotate_half(x) * sin, in one pass forward and one
// backward, as a libtorch autograd function computing what transformers' apply_rotary_pos_emb computes
// in the model's dtype, rounding where libtorch's mul and add kernels round (bf16; nothing in fp32):
//   forward   y[i] = T(T(x[i] * cos[i]) + T(rot[i] * sin[i])),  rot = (-x[D/2:], x[:D/2])
//   backward  gx[i] = T(T(g[i] * cos[i]) + u[i]),  u = (T(g[D/2:] * sin[D/2:]), -T(g[:D/2] * sin[:D/2]))
// (the backward of the two products, the negation, the concatenation and the halves, summed as
// autograd sums a tensor's two gradients). Equal bit for bit to the composite in fp32 and bf16: no sum
// runs in another order and nothing is fused (common.h). The composite runs five kernels forward and
// six backward per tensor, with a concatenated copy each way.
//
// x is (B, H, T, D) in any layout (the projections' (B, T, H, D) seen transposed, as a rule); the result
// keeps a dense x's layout, and x with a last stride other than 1 is copied contiguous first. cos and
// sin are (B or 1, T, D), contiguous, of x's dtype, fp32 or bf16, on CPU: the caller keeps the composite
// for everything else. Tensors arrive as tch's handles; the result is a new handle that Rust owns, or
// null with the message for ferrotune_kernel_error. Compiled by trainer/build.rs; trainer/src/kernels.rs
// calls it.
#include "common.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

using ft::BF16;
using ft::F32;
using ft::ptr;

constexpr int64_t GRAIN = 256;  // rows of D per parallel task

// Where rows of a (B, H, T, D) tensor start: row r = (b * H + h) * T + t.
struct Rows {
  int64_t h, t, sb, sh, st;
};
Rows rows_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2)};
}

// Rows [begin, end) of y = x * cos + rotate_half(x) * sin (sign = 1), or of its backward gx from g
// (sign = -1: the rotation's transpose). cos and sin rows are (b or 0, t).
template <class D>
FT_INLINE void rotate_rows(const typename D::S* x, Rows xr, typename D::S* y, Rows yr, const typename D::S* cos,
                           const typename D::S* sin, int64_t table_rows, int64_t d, float sign, int64_t begin,
                           int64_t end) {
  const int64_t half = d / 2;
  // (b, h, t) of row `begin`, then stepped row by row: no division per row.
  int64_t b = begin / (xr.h * xr.t), h = (begin / xr.t) % xr.h, t = begin % xr.t;
  for (int64_t r = begin; r < end; ++r) {
    const typename D::S* xp = x + b * xr.sb + h * xr.sh + t * xr.st;
    typename D::S* yp = y + b * yr.sb + h * yr.sh + t * yr.st;
    const int64_t row = (table_rows == 1 ? 0 : b) * xr.t + t;
    const typename D::S* c = cos + row * d;
    const typename D::S* s = sin + row * d;
    if (++t == xr.t) {
      t = 0;
      if (++h == xr.h) h = 0, ++b;
    }
    if (sign > 0) {
      for (int64_t i = 0; i < half; ++i)
        yp[i] = D::store(D::round(D::load(xp[i]) * D::load(c[i])) +
                         D::round(-D::load(xp[i + half]) * D::load(s[i])));
      for (int64_t i = half; i < d; ++i)
        yp[i] = D::store(D::round(D::load(xp[i]) * D::load(c[i])) +
                         D::round(D::load(xp[i - half]) * D::load(s[i])));
    } else {
      for (int64_t i = 0; i < half; ++i)
        yp[i] = D::store(D::round(D::load(xp[i]) * D::load(c[i])) +
                         D::round(D::load(xp[i + half]) * D::load(s[i + half])));
      for (int64_t i = half; i < d; ++i)
        yp[i] = D::store(D::round(D::load(xp[i]) * D::load(c[i])) -
                         D::round(D::load(xp[i - half]) * D::load(s[i - half])));
    }
  }
}

FT_CLONES void rotate_f32(const float* x, Rows xr, float* y, Rows yr, const float* c, const float* s, int64_t n,
                          int64_t d, float sign, int64_t b, int64_t e) {
  rotate_rows<F32>(x, xr, y, yr, c, s, n, d, sign, b, e);
}
FT_CLONES void rotate_bf16(const uint16_t* x, Rows xr, uint16_t* y, Rows yr, const uint16_t* c, const uint16_t* s,
                           int64_t n, int64_t d, float sign, int64_t b, int64_t e) {
  rotate_rows<BF16>(x, xr, y, yr, c, s, n, d, sign, b, e);
}

// out (of x's shape) from x, forward (sign 1) or backward (sign -1).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, float sign) {
  // Rows of D must be contiguous; any other layout is walked as it is. empty_like keeps a dense input's
  // layout (and makes anything else contiguous), so the result's rows are contiguous too.
  const at::Tensor in = x.stride(3) == 1 ? x : x.contiguous();
  const at::Tensor out = at::empty_like(in);
  const Rows xr = rows_of(in), yr = rows_of(out);
  const int64_t n = in.size(0) * in.size(1) * in.size(2), d = in.size(3), table_rows = cos.size(0);
  const bool bf16 = in.scalar_type() == at::kBFloat16;
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    if (bf16)
      rotate_bf16(ptr<uint16_t>(in), xr, ptr<uint16_t>(out), yr, ptr<uint16_t>(cos), ptr<uint16_t>(sin), table_rows, d,
                  sign, b, e);
    else
      rotate_f32(ptr<float>(in), xr, ptr<float>(out), yr, ptr<float>(cos), ptr<float>(sin), table_rows, d, sign, b, e);
  });
  return out;
}

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rotate(x, cos, sin, 1.0f);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {rotate(grads[0], saved[0], saved[1], -1.0f), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// y = x * cos + rotate_half(x) * sin with autograd (for x; cos and sin are tables): x (B, H, T, D) in
// any layout, cos and sin (B or 1, T, D) contiguous, all fp32 or all bf16, on CPU. Returns a new
// tensor handle, or null with the message in ferrotune_kernel_error.
at::Tensor* ferrotune_rope(at::Tensor* x, at::Tensor* cos, at::Tensor* sin) {
  return ft::guard([&] {
    const auto kind = x->scalar_type();
    TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16, "rope: x must be fp32 or bf16, not ", kind);
    TORCH_CHECK(cos->scalar_type() == kind && sin->scalar_type() == kind, "rope: cos and sin must be ", kind);
    TORCH_CHECK(x->device().is_cpu() && cos->device().is_cpu() && sin->device().is_cpu(), "rope: CPU tensors only");
    TORCH_CHECK(x->dim() == 4 && x->size(3) % 2 == 0, "rope: x must be (B, H, T, D) with D even, not ", x->sizes());
    TORCH_CHECK(cos->dim() == 3 && cos->sizes() == sin->sizes() && cos->size(1) == x->size(2) &&
                    cos->size(2) == x->size(3) && (cos->size(0) == 1 || cos->size(0) == x->size(0)),
                "rope: cos ", cos->sizes(), " and sin ", sin->sizes(), " do not match x ", x->sizes());
    TORCH_CHECK(cos->is_contiguous() && sin->is_contiguous(), "rope: cos and sin must be contiguous");
    return RopeFn::apply(*x, *cos, *sin);
  });
}

}  // extern "C"

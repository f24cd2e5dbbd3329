// What ferrotune's CPU kernels (rms_norm.cpp, swiglu.cpp, rope.cpp) share: a dtype's storage and
// rounding (fp32 as is, bf16 as c10::BFloat16 rounds), the target_clones attribute that compiles a loop
// for x86-64-v4, v3 and baseline and picks one at load time, an exp for vectorized loops, and how an
// entry point hands a result or an error to Rust. Not a kernel itself; the error message lives in
// common.cpp.
//
// Every kernel file is compiled with -ffp-contract=off (trainer/build.rs): a product followed by a sum
// is rounded twice, as libtorch's own elementwise kernels round it, never fused into one FMA.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define FT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FT_CLONES
#endif
#define FT_INLINE __attribute__((always_inline)) inline

namespace ft {

// The message of the last failed entry point on this thread (common.cpp).
extern thread_local std::string last_error;

// A dtype's storage: fp32 as is, bf16 as its 16 bits (the top half of an fp32).
struct F32 {
  using S = float;
  static FT_INLINE float load(float v) { return v; }
  static FT_INLINE float store(float v) { return v; }
  static FT_INLINE float round(float v) { return v; }
};
struct BF16 {
  using S = uint16_t;
  static FT_INLINE float load(uint16_t b) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // c10::BFloat16's round_to_nearest_even, NaN to 0x7FC0.
  static FT_INLINE uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0x7FC0) : uint16_t(r);
  }
  // load(store(v)), without narrowing to 16 bits and back (cheaper in a vectorized loop).
  static FT_INLINE float round(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t r = v != v ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float f;
    std::memcpy(&f, &r, 4);
    return f;
  }
};

template <class T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// exp(x) in fp32 as Cephes' expf computes it (the method of Sleef's and most vector libraries):
// n = round(x / ln 2), g = x - n ln 2 in two parts, exp(g) by a degree-7 polynomial, times 2^n. Within
// 2 ulp of the true value on the normal range; inf above fp32's overflow, 0 below its smallest normal
// (where 1 + exp(x) is 1 anyway), NaN stays NaN. Plain arithmetic and one floor, so loops calling it
// vectorize (libm's expf does not).
FT_INLINE float exp(float x) {
  const float hi = 88.72283935546875f, lo = -87.33654475f;
  float c = x > hi ? hi : x;
  c = c < lo ? lo : c;
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  float g = c - n * 0.693359375f;
  g = g - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * g + 1.3981999507e-3f;
  p = p * g + 8.3334519073e-3f;
  p = p * g + 4.1665795894e-2f;
  p = p * g + 1.6666665459e-1f;
  p = p * g + 5.0000001201e-1f;
  const float y = p * g * g + g + 1.0f;
  // 2^n from its exponent bits; n reaches 128 just below the overflow threshold, past fp32's largest
  // power of two, so that one factor 2 is taken out (n runs from -126 up).
  const float top = n > 127.0f ? 127.0f : n;
  const int32_t bits = (int32_t(top) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  const float r = y * scale * (n > 127.0f ? 2.0f : 1.0f);
  return x > hi ? INFINITY : (x < lo ? 0.0f : r);
}

// Runs an entry point's body: its tensor as a new handle Rust owns, or null with the message kept for
// ferrotune_kernel_error. No exception crosses into Rust.
template <class F>
at::Tensor* guard(F&& body) {
  try {
    return new at::Tensor(body());
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return nullptr;
}

}  // namespace ft

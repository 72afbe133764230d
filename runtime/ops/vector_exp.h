// What the Mesa CPU kernels share: which vector loops this CPU runs (Isa, detect), and exp for vectors of
// floats (GCC vector extensions), compiled into each kernel's AVX2 / AVX-512 functions by inlining, so one
// formula serves every vector width.
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace mesa_ops {

enum class Isa { portable, avx2, avx512 };

// The widest loops this CPU has; MESA_OPS_PORTABLE / MESA_OPS_NO_AVX512 force narrower ones (the tests).
inline Isa detect() {
  if (std::getenv("MESA_OPS_PORTABLE") != nullptr) return Isa::portable;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && std::getenv("MESA_OPS_NO_AVX512") == nullptr) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::portable;
}

typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register
typedef int i16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));   // 8 floats: one AVX2 register
typedef int i8 __attribute__((vector_size(32)));

// exp(x) for x <= 0 (scores minus their row maximum): Cephes' range reduction and degree-5 polynomial,
// relative error ~2e-7; below -87 (and -inf, the masked keys) it returns 0.
template <class V, class I>
inline __attribute__((always_inline)) V exp_neg(V x) {
  const V lo = V{} - 87.0f;
  const I under = x < lo;
  x = x < lo ? lo : x;
  const V t = x * 1.44269504088896341f - 0.5f;  // round half down: x <= 0, so truncation toward zero of t
  const I ki = __builtin_convertvector(t, I);
  const V k = __builtin_convertvector(ki, V);
  V r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + (r + 1.0f);
  const I e = (ki + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  y = y * scale;
  I bits;
  std::memcpy(&bits, &y, sizeof(V));
  bits &= ~under;
  std::memcpy(&y, &bits, sizeof(V));
  return y;
}

// x[0, n) = exp(x) in place for x <= 0, L lanes at a time, the tail with std::exp.
template <class V, class I>
inline __attribute__((always_inline)) void exp_neg_inplace(float* x, long n) {
  constexpr long L = sizeof(V) / sizeof(float);
  long j = 0;
  for (; j + L <= n; j += L) {
    V v;
    std::memcpy(&v, x + j, sizeof(V));
    v = exp_neg<V, I>(v);
    std::memcpy(x + j, &v, sizeof(V));
  }
  for (; j < n; ++j) x[j] = std::exp(x[j]);
}

}  // namespace mesa_ops

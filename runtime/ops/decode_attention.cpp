// ai.mesa.cpu::GroupedDecodeAttention: one decode step of attention over an in-place KV cache, for ONNX
// Runtime's CPU execution provider (a custom-op library: runtime/README.md, "Mesa CPU kernels").
//
// Same inputs, attributes and outputs as the com.microsoft::GroupQueryAttention call it replaces in the
// decode branch of the `inplace` kernel (graph_ops/lower_attention.py), for one new token per row:
//   query [B, 1, H*d], key / value [B, 1, Hkv*d], past_key / past_value [B, Hkv, max_len, d] (keys already
//   rotated), seqlens_k [B] int32 (cached keys - 1 + 1 = the new token's index), total_sequence_length,
//   cos_cache / sin_cache [positions, d/2]; attributes num_heads, kv_num_heads (do_rotary, rotary_interleaved
//   and scale are accepted with GroupQueryAttention's meaning, only do_rotary=1 / interleaved 0 / default scale).
//   Outputs: attention [B, 1, H*d], present_key / present_value: the past buffers themselves when the caller
//   binds them as both (the new row is written at seqlens_k; nothing else is touched), else a full copy.
//
// Why it exists: ORT's CPU GroupQueryAttention computes each query head on its own, so the keys and
// values of a KV head are read once per query head (H/Hkv times per step). Here one task per (row, KV
// head) reads each cached key and value once for all the query heads that share it: a decode step
// costs one pass over the visible cache, which is what bounds decode at long context. The loops come in
// three forms (AVX-512 for d % 16 == 0, AVX2 for d % 8 == 0, both d <= 128; portable C++ otherwise), so
// the pass runs near the memory rate: AVX-512 reads 12k keys of model M at ~25 GB/s on 2 Xeon cores
// (runtime/README.md, "Mesa CPU kernels"), where a plain 2-thread streaming read peaks at ~30.
#define ORT_API_MANUAL_INIT  // not linked to onnxruntime: the API comes from the session that loads us
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "ops.h"
#include "vector_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kMaxGroup = 16;  // query heads per KV head handled by one task

struct Shapes {
  int64_t batch, heads, kv_heads, head_dim, max_len, positions;
};

// Rotate-half RoPE of one head vector at `pos` (GroupQueryAttention's non-interleaved rotary).
void rotate(const float* x, float* out, const float* cos, const float* sin, int64_t pos, int64_t d) {
  const int64_t half = d / 2;
  const float* c = cos + pos * half;
  const float* s = sin + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * c[i] - b * s[i];
    out[i + half] = b * c[i] + a * s[i];
  }
}

struct Task {
  Shapes sh;
  const float *q, *k, *v, *cos, *sin;
  const int32_t* seqlens;
  float *past_k, *past_v, *out;
  float scale;
  mesa_ops::Isa isa;  // the vector loops this CPU and head size allow (Kernel::Compute)
};

constexpr int64_t kBlock = 64;  // keys per block: a block's keys and values stay in L1 for all heads

// The three loops of one group's attention, in each vector form: scores[h][j] = q_h . K[j] (returns the
// row maxima in top), softmax in place (returns 1 / row sums in inv), acc[h] = sum_j p[h][j] V[j].
// The probabilities stay unnormalised; run_group scales the output by inv.

// portable form
void scores_portable(const float* q, int64_t G, const float* K, int64_t n, int64_t d, float* scores, float* top) {
  for (int64_t h = 0; h < G; ++h) {
    top[h] = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int64_t i = 0; i < d; ++i) dot += q[h * d + i] * K[j * d + i];
      scores[h * n + j] = dot;
      top[h] = std::max(top[h], dot);
    }
  }
}

void softmax_portable(float* scores, int64_t G, int64_t n, const float* top, float* inv) {
  for (int64_t h = 0; h < G; ++h) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += scores[h * n + j] = std::exp(scores[h * n + j] - top[h]);
    inv[h] = 1.0f / sum;
  }
}

void values_portable(const float* p, int64_t G, const float* V, int64_t n, int64_t d, float* acc) {
  for (int64_t j = 0; j < n; j += kBlock)
    for (int64_t h = 0; h < G; ++h)
      for (int64_t k = j; k < std::min(n, j + kBlock); ++k)
        for (int64_t i = 0; i < d; ++i) acc[h * d + i] += p[h * n + k] * V[k * d + i];
}

#if defined(__x86_64__)
#include <immintrin.h>

// Softmax rows with L-lane vectors (V, I: mesa_ops' vector types): exp(x - top) in place and its sum.
template <class V, class I>
inline __attribute__((always_inline)) void softmax_vec(float* scores, int64_t G, int64_t n, const float* top,
                                                        float* inv) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  for (int64_t h = 0; h < G; ++h) {
    float* x = scores + h * n;
    V acc{};
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      V y;
      std::memcpy(&y, x + j, sizeof(V));
      y = mesa_ops::exp_neg<V, I>(y - top[h]);
      acc += y;
      std::memcpy(x + j, &y, sizeof(V));
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < L; ++i) sum += acc[i];
    for (; j < n; ++j) sum += x[j] = std::exp(x[j] - top[h]);
    inv[h] = 1.0f / sum;
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// AVX2, d % 8 == 0: the dot products of 8 keys with one head, folded into one register whose lane j is
// key j's (three rounds of shuffle-and-add instead of a horizontal sum per key); four keys' FMA chains run
// interleaved, and the keys enter in the order that leaves the lanes sorted.
__attribute__((target("avx2,fma"))) inline __m256 dots8(const float* qh, const float* K, int64_t d) {
  __m256 v[8];
  for (int half = 0; half < 8; half += 4) {
    const float* k[4];
    for (int i = 0; i < 4; ++i) k[i] = K + (((half + i) >> 1) + 4 * ((half + i) & 1)) * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 x = _mm256_loadu_ps(qh + c);
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[0] + c), a0);
      a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[1] + c), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[2] + c), a2);
      a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[3] + c), a3);
    }
    v[half] = a0, v[half + 1] = a1, v[half + 2] = a2, v[half + 3] = a3;
  }
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)  // 128-bit halves: lanes 0-3 slot 2i's partials, 4-7 slot 2i+1's
    a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)  // pairs within a half
    b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                         _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}

__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, int64_t G, const float* K, int64_t n,
                                                       int64_t d, float* scores, float* top) {
  __m256 mx[kMaxGroup];
  for (int64_t h = 0; h < G; ++h) mx[h] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t full = n / 8 * 8;
  for (int64_t b = 0; b < full; b += kBlock) {
    const int64_t e = std::min(full, b + kBlock);
    for (int64_t h = 0; h < G; ++h)
      for (int64_t j = b; j < e; j += 8) {
        const __m256 s = dots8(q + h * d, K + j * d, d);
        _mm256_storeu_ps(scores + h * n + j, s);
        mx[h] = _mm256_max_ps(mx[h], s);
      }
  }
  for (int64_t h = 0; h < G; ++h) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx[h]);
    top[h] = *std::max_element(lanes, lanes + 8);
    for (int64_t j = full; j < n; ++j) {  // the last n % 8 keys one at a time
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i), _mm256_loadu_ps(K + j * d + i), a);
      scores[h * n + j] = hsum(a);
      top[h] = std::max(top[h], scores[h * n + j]);
    }
  }
}

__attribute__((target("avx2,fma"))) void softmax_avx2(float* scores, int64_t G, int64_t n, const float* top,
                                                        float* inv) {
  softmax_vec<mesa_ops::v8, mesa_ops::i8>(scores, G, n, top, inv);
}

// AVX2: the head's accumulator lives in registers across a block.
__attribute__((target("avx2,fma"))) void values_avx2(const float* p, int64_t G, const float* V, int64_t n,
                                                       int64_t d, float* acc) {
  const int64_t c = d / 8;
  for (int64_t b = 0; b < n; b += kBlock)
    for (int64_t h = 0; h < G; ++h) {
      __m256 a[16];
      for (int64_t i = 0; i < c; ++i) a[i] = _mm256_loadu_ps(acc + h * d + 8 * i);
      for (int64_t j = b; j < std::min(n, b + kBlock); ++j) {
        const __m256 w = _mm256_set1_ps(p[h * n + j]);
        const float* vj = V + j * d;
        for (int64_t i = 0; i < c; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * i), a[i]);
      }
      for (int64_t i = 0; i < c; ++i) _mm256_storeu_ps(acc + h * d + 8 * i, a[i]);
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12's own avx512fintrin.h: _mm512_undefined_ps reads itself to make garbage
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// AVX-512, d = 16 C (C <= 8). Scores: 16 keys per head at once, each key's C products summed into one
// register, then the 16 registers folded into one whose lane j is key j's dot product (four rounds of
// shuffle-and-add, no per-key horizontal sum); the keys enter in the order that leaves the lanes sorted.
template <int C>
__attribute__((target("avx512f"))) inline __m512 dots16(const __m512* qh, const float* K) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) {
    const float* k = K + (((i & 3) << 2) | (i >> 2)) * 16 * C;
    __m512 s = _mm512_mul_ps(qh[0], _mm512_loadu_ps(k));
    for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(qh[c], _mm512_loadu_ps(k + 16 * c), s);
    v[i] = s;
  }
  __m512 a[8], b[4], e[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 key 2i's partials, 8-15 key 2i+1's
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes: four partials of one key each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs within a lane
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

template <int C>
__attribute__((target("avx512f"))) void scores_avx512(const float* q, int64_t G, const float* K, int64_t n,
                                                        float* scores, float* top) {
  constexpr int64_t d = 16 * C;
  __m512 mx[kMaxGroup];
  for (int64_t h = 0; h < G; ++h) mx[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t full = n / 16 * 16;
  for (int64_t b = 0; b < full; b += kBlock) {
    const int64_t e = std::min(full, b + kBlock);
    for (int64_t h = 0; h < G; ++h) {
      __m512 qh[C];
      for (int c = 0; c < C; ++c) qh[c] = _mm512_loadu_ps(q + h * d + 16 * c);
      for (int64_t j = b; j < e; j += 16) {
        if (h == 0)  // the group's keys in address order (dots16 reads them shuffled): a few % faster
          for (int64_t l = 0; l < 16 * C; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(K + j * d + 16 * l), _MM_HINT_T0);
        const __m512 s = dots16<C>(qh, K + j * d);
        _mm512_storeu_ps(scores + h * n + j, s);
        mx[h] = _mm512_max_ps(mx[h], s);
      }
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    top[h] = _mm512_reduce_max_ps(mx[h]);
    for (int64_t j = full; j < n; ++j) {  // the last n % 16 keys one at a time
      __m512 s = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c)
        s = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + 16 * c), _mm512_loadu_ps(K + j * d + 16 * c), s);
      scores[h * n + j] = _mm512_reduce_add_ps(s);
      top[h] = std::max(top[h], scores[h * n + j]);
    }
  }
}

__attribute__((target("avx512f"))) void softmax_avx512(float* scores, int64_t G, int64_t n, const float* top,
                                                         float* inv) {
  softmax_vec<mesa_ops::v16, mesa_ops::i16>(scores, G, n, top, inv);
}

// Values: HB heads' accumulators (HB x C registers) across a block of keys, each value row loaded once
// for all of them.
template <int C, int HB>
__attribute__((target("avx512f"))) inline void values16(const float* p, int64_t n, const float* V, int64_t b,
                                                          int64_t e, float* acc) {
  constexpr int64_t d = 16 * C;
  __m512 a[HB][C];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) a[h][c] = _mm512_loadu_ps(acc + h * d + 16 * c);
  for (int64_t j = b; j < e; ++j) {
    __m512 v[C];
    for (int c = 0; c < C; ++c)  // 16 rows ahead: ~10 % faster at 12k keys than the hardware prefetch alone
      _mm_prefetch(reinterpret_cast<const char*>(V + (j + 16) * d + 16 * c), _MM_HINT_T0);
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(V + j * d + 16 * c);
    for (int h = 0; h < HB; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * n + j]);
      for (int c = 0; c < C; ++c) a[h][c] = _mm512_fmadd_ps(w, v[c], a[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + h * d + 16 * c, a[h][c]);
}

template <int C>
__attribute__((target("avx512f"))) void values_avx512(const float* p, int64_t G, const float* V, int64_t n,
                                                        float* acc) {
  constexpr int HB = 16 / C;  // at most 16 accumulator registers (C <= 8)
  constexpr int64_t d = 16 * C;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    int64_t h = 0;
    for (; h + HB <= G; h += HB) values16<C, HB>(p + h * n, n, V, b, e, acc + h * d);
    for (; h < G; ++h) values16<C, 1>(p + h * n, n, V, b, e, acc + h * d);
  }
}

template <int C>
void attend_avx512_c(const float* q, int64_t G, const float* K, const float* V, int64_t n, float* scores,
                     float* top, float* inv, float* acc) {
  scores_avx512<C>(q, G, K, n, scores, top);
  softmax_avx512(scores, G, n, top, inv);
  values_avx512<C>(scores, G, V, n, acc);
}

void attend_avx512(const float* q, int64_t G, const float* K, const float* V, int64_t n, int64_t d,
                   float* scores, float* top, float* inv, float* acc) {
  using F = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, float*, float*, float*);
  static const F by_c[8] = {attend_avx512_c<1>, attend_avx512_c<2>, attend_avx512_c<3>, attend_avx512_c<4>,
                            attend_avx512_c<5>, attend_avx512_c<6>, attend_avx512_c<7>, attend_avx512_c<8>};
  by_c[d / 16 - 1](q, G, K, V, n, scores, top, inv, acc);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// One (row, KV head): rotate and store the new key/value, then all G query heads of the group in one
// pass over the cache keys and one over its values, a block at a time.
void run_group(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const Shapes& s = t.sh;
  const int64_t b = static_cast<int64_t>(index) / s.kv_heads, g = static_cast<int64_t>(index) % s.kv_heads;
  const int64_t d = s.head_dim, G = s.heads / s.kv_heads, pos = t.seqlens[b], n = pos + 1;
  float* K = t.past_k + (b * s.kv_heads + g) * s.max_len * d;
  float* V = t.past_v + (b * s.kv_heads + g) * s.max_len * d;
  rotate(t.k + (b * s.kv_heads + g) * d, K + pos * d, t.cos, t.sin, pos, d);
  std::memcpy(V + pos * d, t.v + (b * s.kv_heads + g) * d, sizeof(float) * d);

  std::vector<float> q(G * d), acc(G * d, 0.0f);
  // the scores outlive the call in a per-thread buffer: a fresh 200 KB one per call is a fresh mmap,
  // page-faulted and zeroed every step
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(G * n)) scores.resize(G * n);
  float top[kMaxGroup], inv[kMaxGroup];
  for (int64_t h = 0; h < G; ++h) {
    rotate(t.q + (b * s.heads + g * G + h) * d, &q[h * d], t.cos, t.sin, pos, d);
    for (int64_t i = 0; i < d; ++i) q[h * d + i] *= t.scale;
  }
  switch (t.isa) {
#if defined(__x86_64__)
    case mesa_ops::Isa::avx512:
      attend_avx512(q.data(), G, K, V, n, d, scores.data(), top, inv, acc.data());
      break;
    case mesa_ops::Isa::avx2:
      scores_avx2(q.data(), G, K, n, d, scores.data(), top);
      softmax_avx2(scores.data(), G, n, top, inv);
      values_avx2(scores.data(), G, V, n, d, acc.data());
      break;
#endif
    default:
      scores_portable(q.data(), G, K, n, d, scores.data(), top);
      softmax_portable(scores.data(), G, n, top, inv);
      values_portable(scores.data(), G, V, n, d, acc.data());
  }
  float* out = t.out + (b * s.heads + g * G) * d;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] = acc[h * d + i] * inv[h];
}

struct Kernel {
  int64_t heads, kv_heads;
  float scale;
  mesa_ops::Isa isa = mesa_ops::detect();

  Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads = ki.GetAttribute<int64_t>("num_heads");
    kv_heads = ki.GetAttribute<int64_t>("kv_num_heads");
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxGroup)
      throw Ort::Exception("GroupedDecodeAttention: num_heads must be a multiple of kv_num_heads (at most 16x)",
                           ORT_INVALID_ARGUMENT);
    scale = 0.0f;
    try {
      scale = ki.GetAttribute<float>("scale");
    } catch (const Ort::Exception&) {
    }
    if (ki.GetAttribute<int64_t>("do_rotary") != 1 || ki.GetAttribute<int64_t>("rotary_interleaved") != 0)
      throw Ort::Exception("GroupedDecodeAttention: only do_rotary=1, rotary_interleaved=0", ORT_INVALID_ARGUMENT);
  }

  // The widest loops for this head size: AVX-512 needs d % 16 == 0, AVX2 d % 8 == 0, both d <= 128.
  mesa_ops::Isa loops(int64_t d) const {
    if (d > 128 || d % 8 != 0) return mesa_ops::Isa::portable;
    if (isa == mesa_ops::Isa::avx512 && d % 16 != 0) return mesa_ops::Isa::avx2;
    return isa;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
    auto past_k = ctx.GetInput(3), past_v = ctx.GetInput(4), seqlens = ctx.GetInput(5);
    auto cos = ctx.GetInput(7), sin = ctx.GetInput(8);
    const auto qs = query.GetTensorTypeAndShapeInfo().GetShape();
    const auto ps = past_k.GetTensorTypeAndShapeInfo().GetShape();
    const auto cs = cos.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 3 || qs[1] != 1 || ps.size() != 4)
      throw Ort::Exception("GroupedDecodeAttention: one new token per row, past as [B, Hkv, max_len, d]",
                           ORT_INVALID_ARGUMENT);
    Shapes sh{qs[0], heads, kv_heads, ps[3], ps[2], cs[0]};
    if (ps[0] != sh.batch || ps[1] != kv_heads || qs[2] != heads * sh.head_dim || cs[1] * 2 != sh.head_dim)
      throw Ort::Exception("GroupedDecodeAttention: inconsistent shapes", ORT_INVALID_ARGUMENT);
    const int32_t* lens = seqlens.GetTensorData<int32_t>();
    for (int64_t b = 0; b < sh.batch; ++b)
      if (lens[b] < 0 || lens[b] >= sh.max_len || lens[b] >= sh.positions)
        throw Ort::Exception("GroupedDecodeAttention: seqlens_k outside the cache", ORT_INVALID_ARGUMENT);

    auto out = ctx.GetOutput(0, qs);
    auto present_k = ctx.GetOutput(1, ps), present_v = ctx.GetOutput(2, ps);
    float* pk = present_k.GetTensorMutableData<float>();
    float* pv = present_v.GetTensorMutableData<float>();
    const size_t bytes = sizeof(float) * sh.batch * kv_heads * sh.max_len * sh.head_dim;
    // share-buffer mode when the caller bound past and present to one buffer; otherwise copy first
    if (pk != past_k.GetTensorData<float>()) std::memcpy(pk, past_k.GetTensorData<float>(), bytes);
    if (pv != past_v.GetTensorData<float>()) std::memcpy(pv, past_v.GetTensorData<float>(), bytes);

    Task task{sh, query.GetTensorData<float>(), key.GetTensorData<float>(), value.GetTensorData<float>(),
              cos.GetTensorData<float>(), sin.GetTensorData<float>(), lens, pk, pv,
              out.GetTensorMutableData<float>(),
              scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(sh.head_dim)),
              loops(sh.head_dim)};
    ctx.ParallelFor(run_group, static_cast<size_t>(sh.batch * kv_heads), 0, &task);
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return "GroupedDecodeAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 5 || i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* decode_attention_op() {
  static Op op;
  return &op;
}

// ai.mesa.cpu::TiledPrefillAttention: the attention of one prefill chunk, for ONNX Runtime's CPU execution
// provider (a custom-op library: runtime/README.md, "Mesa CPU kernels").
//
// Same inputs and attributes as the com.microsoft::GroupQueryAttention call it replaces in the prefill
// path of graph_ops/lower_attention.py (keys and queries already rotated, no do_rotary):
//   query [B, s, H*d], key / value [B, s, Hkv*d] (the chunk), past_key / past_value [B, Hkv, P, d] (the
//   visible cache rows), seqlens_k [B] int32 (total keys - 1 per row), total_sequence_length;
//   attributes num_heads, kv_num_heads (scale optional, GroupQueryAttention's default 1/sqrt(d)).
//   One output: attention [B, s, H*d]. Query i of row b sees the row's past (total - s keys) and the
//   chunk's keys 0..i: GroupQueryAttention's causal rule, which is the Mesa mask of a prefill step.
//
// Why it exists: ORT's CPU GroupQueryAttention materialises the probabilities of every query head over
// every key ([H, s, total] floats: 1 GB for a 4k chunk of model M) and streams them through memory three
// times (scores, softmax, values). Here one task takes a tile of query positions for all the query heads
// of one KV head, walks the keys a block at a time and keeps the scores of a block in cache with an
// online softmax (the flash-attention recurrence), so memory traffic is the K/V reads and the output.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "ops.h"
#include "vector_exp.h"

namespace {

constexpr int64_t kTile = 32;   // query positions per task (times the group's heads = rows of a tile)
constexpr int64_t kKeys = 64;   // keys per block: the scores of a block are rows x 64 floats
constexpr int kMaxGroup = 16;

// One matrix product C[M, N] (+)= A[M, K] B[K, N] over small row-major blocks, the form both halves of
// a block take: scores = Q K^T (B = the block's keys transposed) and acc += P V (B = the values).
// Vector forms: columns in panels of NV vectors of L floats, R rows of C in registers at a time.
template <class V, int L, int NV, int R>
inline __attribute__((always_inline)) void panel(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                 int64_t K, float* C, int64_t ldc, bool add) {
  V c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      if (add) std::memcpy(&c[r][v], C + r * ldc + v * L, sizeof(V));
      else c[r][v] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + v * L, sizeof(V));
    for (int r = 0; r < R; ++r) {
      const V a = A[r * lda + k] - V{};  // x - 0 folds to a splat, i.e. a broadcast load (x + 0 does not: -0)
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * ldc + v * L, &c[r][v], sizeof(V));
}

template <class V, int L, int NV, int R>
inline __attribute__((always_inline)) void gemm_vec(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                    int64_t M, int64_t N, int64_t K, float* C, int64_t ldc,
                                                    bool add) {
  constexpr int64_t W = L * NV;
  for (int64_t n = 0; n < N; n += W) {
    int64_t m = 0;
    for (; m + R <= M; m += R) panel<V, L, NV, R>(A + m * lda, lda, B + n, ldb, K, C + m * ldc + n, ldc, add);
    for (; m < M; ++m) panel<V, L, NV, 1>(A + m * lda, lda, B + n, ldb, K, C + m * ldc + n, ldc, add);
  }
}

// One row of a block's scores: mask keys >= seen, fold them into the running max / sum (the online
// softmax), leave exp(score - max) in p and rescale the row's accumulator o[0, d) by the max's change.
inline void soften(float* p, int64_t seen, float& top, float& sum, float* o, int64_t d) {
  float m = top;
  for (int64_t j = 0; j < seen; ++j) m = std::max(m, p[j]);
  float total = 0.0f;
  for (int64_t j = 0; j < kKeys; ++j) total += (p[j] = j < seen ? std::exp(p[j] - m) : 0.0f);
  if (m > top) {
    const float alpha = std::exp(top - m);
    sum *= alpha;
    for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
    top = m;
  }
  sum += total;
}

// Horizontal max / sum of a vector by halving (log2 L shuffles instead of L scalar steps).
template <class V>
inline __attribute__((always_inline)) float reduce_max(V x) {
  constexpr int L = sizeof(V) / sizeof(float);
  float lanes[L];
  std::memcpy(lanes, &x, sizeof(V));
  for (int w = L / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] = std::max(lanes[i], lanes[i + w]);
  return lanes[0];
}
template <class V>
inline __attribute__((always_inline)) float reduce_add(V x) {
  constexpr int L = sizeof(V) / sizeof(float);
  float lanes[L];
  std::memcpy(lanes, &x, sizeof(V));
  for (int w = L / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

template <class V, class I, int L>
inline __attribute__((always_inline)) void soften_vec(float* p, int64_t seen, float& top, float& sum, float* o,
                                                      int64_t d) {
  constexpr int NB = kKeys / L;
  const V ninf = V{} - std::numeric_limits<float>::infinity();
  V x[NB];
  for (int v = 0; v < NB; ++v) std::memcpy(&x[v], p + v * L, sizeof(V));
  if (seen < kKeys) {
    I lane;
    for (int i = 0; i < L; ++i) lane[i] = i;
    for (int v = 0; v < NB; ++v) x[v] = (lane + v * L) < static_cast<int>(seen) ? x[v] : ninf;
  }
  V mx = x[0];
  for (int v = 1; v < NB; ++v) mx = mx > x[v] ? mx : x[v];
  const float m = std::max(top, reduce_max(mx));
  V acc{};
  for (int v = 0; v < NB; ++v) {
    x[v] = mesa_ops::exp_neg<V, I>(x[v] - m);
    acc += x[v];
    std::memcpy(p + v * L, &x[v], sizeof(V));
  }
  if (m > top) {  // the row's max moved: rescale what was summed and accumulated under the old one
    const float alpha = std::exp(top - m);
    sum *= alpha;
    for (int64_t c = 0; c < d; c += L) {
      V y;
      std::memcpy(&y, o + c, sizeof(V));
      y *= alpha;
      std::memcpy(o + c, &y, sizeof(V));
    }
    top = m;
  }
  sum += reduce_add(acc);
}

void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N, int64_t K, float* C,
          int64_t ldc, bool add) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float s = add ? C[m * ldc + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += A[m * lda + k] * B[k * ldb + n];
      C[m * ldc + n] = s;
    }
}

#if defined(__x86_64__)
using mesa_ops::i16;
using mesa_ops::i8;
using mesa_ops::v16;
using mesa_ops::v8;

// AVX-512: a 6 x 64 block of C in 24 of the 32 zmm registers; AVX2: 6 x 16 in 12 of the 16 ymm.
__attribute__((target("avx512f"))) void gemm_avx512(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                    int64_t M, int64_t N, int64_t K, float* C, int64_t ldc,
                                                    bool add) {
  gemm_vec<v16, 16, 4, 6>(A, lda, B, ldb, M, N, K, C, ldc, add);
}
__attribute__((target("avx512f"))) void soften_avx512(float* p, int64_t seen, float& top, float& sum, float* o,
                                                      int64_t d) {
  soften_vec<v16, i16, 16>(p, seen, top, sum, o, d);
}
__attribute__((target("avx2,fma"))) void gemm_avx2(const float* A, int64_t lda, const float* B, int64_t ldb,
                                                   int64_t M, int64_t N, int64_t K, float* C, int64_t ldc,
                                                   bool add) {
  gemm_vec<v8, 8, 2, 6>(A, lda, B, ldb, M, N, K, C, ldc, add);
}
__attribute__((target("avx2,fma"))) void soften_avx2(float* p, int64_t seen, float& top, float& sum, float* o,
                                                     int64_t d) {
  soften_vec<v8, i8, 8>(p, seen, top, sum, o, d);
}
#endif

using mesa_ops::Isa;

struct Task {
  int64_t batch, s, heads, kv_heads, d, past_rows, tiles, ld;
  const float *q, *k, *v, *past_k, *past_v;
  const int32_t* seqlens;
  float *keys_t, *values, *out;  // keys_t [B*Hkv, ld/64, d, 64]: each head's key blocks transposed; values [B*Hkv, ld, d]
  float scale;
  Isa isa;  // the vector forms need d a multiple of 64 (AVX-512) / 16 (AVX2)

  void mm(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t M, int64_t N, int64_t K, float* C,
          int64_t ldc, bool add) const {
#if defined(__x86_64__)
    if (isa == Isa::avx512) return gemm_avx512(A, lda, B, ldb, M, N, K, C, ldc, add);
    if (isa == Isa::avx2) return gemm_avx2(A, lda, B, ldb, M, N, K, C, ldc, add);
#endif
    gemm(A, lda, B, ldb, M, N, K, C, ldc, add);
  }
  void soft(float* p, int64_t seen, float& top, float& sum, float* o) const {
#if defined(__x86_64__)
    if (isa == Isa::avx512) return soften_avx512(p, seen, top, sum, o, d);
    if (isa == Isa::avx2) return soften_avx2(p, seen, top, sum, o, d);
#endif
    soften(p, seen, top, sum, o, d);
  }
  int64_t past(int64_t b) const { return seqlens[b] + 1 - s; }  // row b's cached keys
};

// One (row, KV head): its keys (past, then the chunk's) transposed block by block into keys_t and its
// values gathered into one run, so every tile streams contiguous memory (a [d, 64] block is 16 KB for d = 64);
// the padding up to a whole block is zero.
void gather(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t b = static_cast<int64_t>(index) / t.kv_heads, g = static_cast<int64_t>(index) % t.kv_heads;
  const int64_t d = t.d, past = t.past(b), n = past + t.s;
  float* kt = t.keys_t + static_cast<int64_t>(index) * d * t.ld;
  float* vs = t.values + static_cast<int64_t>(index) * t.ld * d;
  const float* pk = t.past_k + (b * t.kv_heads + g) * t.past_rows * d;
  const float* pv = t.past_v + (b * t.kv_heads + g) * t.past_rows * d;
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = j < past ? pk + j * d : t.k + ((b * t.s + j - past) * t.kv_heads + g) * d;
    const float* vj = j < past ? pv + j * d : t.v + ((b * t.s + j - past) * t.kv_heads + g) * d;
    float* block = kt + j / kKeys * d * kKeys + j % kKeys;
    for (int64_t c = 0; c < d; ++c) block[c * kKeys] = kj[c];
    std::memcpy(vs + j * d, vj, sizeof(float) * d);
  }
  for (int64_t j = n; j % kKeys != 0; ++j)
    for (int64_t c = 0; c < d; ++c) kt[j / kKeys * d * kKeys + c * kKeys + j % kKeys] = 0.0f;
}

// One (row b, KV head g, tile of query positions): rows of the tile are (head h of the group, position i).
void run_tile(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t tile = static_cast<int64_t>(index) % t.tiles, bg = static_cast<int64_t>(index) / t.tiles;
  const int64_t b = bg / t.kv_heads, g = bg % t.kv_heads;
  const int64_t G = t.heads / t.kv_heads, d = t.d, i0 = tile * kTile, n_pos = std::min(kTile, t.s - i0);
  const int64_t rows = G * n_pos, past = t.past(b);

  std::vector<float> Q(rows * d), O(rows * d, 0.0f), S(rows * kKeys);
  std::vector<float> top(rows, -std::numeric_limits<float>::infinity()), sum(rows, 0.0f);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t i = 0; i < n_pos; ++i) {
      const float* src = t.q + ((b * t.s + i0 + i) * t.heads + g * G + h) * d;
      for (int64_t c = 0; c < d; ++c) Q[(h * n_pos + i) * d + c] = src[c] * t.scale;
    }
  const float* kt = t.keys_t + bg * d * t.ld;
  const float* vs = t.values + bg * t.ld * d;
  const int64_t first_diag = past + i0, keys = past + i0 + n_pos;  // keys below first_diag: seen by every row
  for (int64_t j0 = 0; j0 < keys; j0 += kKeys) {
    const int64_t n = std::min(kKeys, keys - j0);
    t.mm(Q.data(), d, kt + j0 * d, kKeys, rows, kKeys, d, S.data(), kKeys, false);
    for (int64_t r = 0; r < rows; ++r) {
      float* p = &S[r * kKeys];
      // query i sees keys <= past + i
      const int64_t seen = j0 + kKeys <= first_diag ? n : std::clamp<int64_t>(past + i0 + r % n_pos - j0 + 1, 0, n);
      if (seen == 0) {  // nothing visible here: weight 0 for the values (its running max came from key 0)
        std::fill(p, p + kKeys, 0.0f);
        continue;
      }
      t.soft(p, seen, top[r], sum[r], &O[r * d]);
    }
    t.mm(S.data(), kKeys, vs + j0 * d, d, rows, d, n, O.data(), d, true);
  }

  for (int64_t h = 0; h < G; ++h)
    for (int64_t i = 0; i < n_pos; ++i) {
      const int64_t r = h * n_pos + i;
      float* dst = t.out + ((b * t.s + i0 + i) * t.heads + g * G + h) * d;
      const float inv = 1.0f / sum[r];
      for (int64_t c = 0; c < d; ++c) dst[c] = O[r * d + c] * inv;
    }
}

struct Kernel {
  int64_t heads, kv_heads;
  float scale = 0.0f;
  Isa isa = mesa_ops::detect();

  Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads = ki.GetAttribute<int64_t>("num_heads");
    kv_heads = ki.GetAttribute<int64_t>("kv_num_heads");
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > kMaxGroup)
      throw Ort::Exception("TiledPrefillAttention: num_heads must be a multiple of kv_num_heads (at most 16x)",
                           ORT_INVALID_ARGUMENT);
    try {
      scale = ki.GetAttribute<float>("scale");
    } catch (const Ort::Exception&) {
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
    auto past_k = ctx.GetInput(3), past_v = ctx.GetInput(4), seqlens = ctx.GetInput(5);
    const auto qs = query.GetTensorTypeAndShapeInfo().GetShape();
    const auto ks = key.GetTensorTypeAndShapeInfo().GetShape();
    const auto ps = past_k.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 3 || ks.size() != 3 || ps.size() != 4 || qs[2] % heads != 0)
      throw Ort::Exception("TiledPrefillAttention: query/key as [B, s, N*d], past as [B, Hkv, P, d]",
                           ORT_INVALID_ARGUMENT);
    const int64_t B = qs[0], s = qs[1], d = qs[2] / heads;
    if (ks[0] != B || ks[1] != s || ks[2] != kv_heads * d || ps[0] != B || ps[1] != kv_heads || ps[3] != d)
      throw Ort::Exception("TiledPrefillAttention: inconsistent shapes", ORT_INVALID_ARGUMENT);
    const int32_t* lens = seqlens.GetTensorData<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t past = lens[b] + 1 - s;
      if (past < 0 || past > ps[2])
        throw Ort::Exception("TiledPrefillAttention: seqlens_k does not fit the chunk and past rows",
                             ORT_INVALID_ARGUMENT);
    }
    auto out = ctx.GetOutput(0, qs);
    if (B * s == 0) return;
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) keys = std::max<int64_t>(keys, lens[b] + 1);
    const int64_t ld = (keys + kKeys - 1) / kKeys * kKeys;  // keys rounded up to whole blocks
    // scratch, not zeroed: gather writes every element a tile reads (the key padding explicitly)
    std::unique_ptr<float[]> keys_t(new float[B * kv_heads * d * ld]), values(new float[B * kv_heads * ld * d]);
    const int64_t width = isa == Isa::avx512 ? 64 : 16;
    Task task{B, s, heads, kv_heads, d, ps[2], (s + kTile - 1) / kTile, ld,
              query.GetTensorData<float>(), key.GetTensorData<float>(), value.GetTensorData<float>(),
              past_k.GetTensorData<float>(), past_v.GetTensorData<float>(), lens, keys_t.get(), values.get(),
              out.GetTensorMutableData<float>(), scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(d)),
              d % width == 0 ? isa : Isa::portable};
    ctx.ParallelFor(gather, static_cast<size_t>(B * kv_heads), 0, &task);
    const size_t n = static_cast<size_t>(B * kv_heads * task.tiles);
    ctx.ParallelFor(run_tile, n, n, &task);  // one batch per tile: tiles near the end see more keys
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return "TiledPrefillAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 5 || i == 6) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* prefill_attention_op() {
  static Op op;
  return &op;
}

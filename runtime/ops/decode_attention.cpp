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
// costs one pass over the visible cache, which is what bounds decode at long context.
#define ORT_API_MANUAL_INIT  // not linked to onnxruntime: the API comes from the session that loads us
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "ops.h"
#include "vector_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
  bool vector;  // the AVX2 loops (CPU has them, d % 8 == 0, d <= 128, MESA_OPS_PORTABLE unset)
};

constexpr int64_t kBlock = 64;  // keys per block: a block's keys and values stay in L1 for all heads

// scores[h][j] = q_h . K[j] for the block's keys (portable form).
void scores_block(const float* q, int64_t G, const float* K, int64_t n, int64_t d, float* scores, int64_t stride) {
  for (int64_t h = 0; h < G; ++h)
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int64_t i = 0; i < d; ++i) dot += q[h * d + i] * K[j * d + i];
      scores[h * stride + j] = dot;
    }
}

// acc[h] += sum_j p[h][j] V[j] for the block's values (portable form).
void values_block(const float* p, int64_t G, const float* V, int64_t n, int64_t d, float* acc, int64_t stride) {
  for (int64_t h = 0; h < G; ++h)
    for (int64_t j = 0; j < n; ++j) {
      const float w = p[h * stride + j];
      for (int64_t i = 0; i < d; ++i) acc[h * d + i] += w * V[j * d + i];
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// d % 8 == 0: four keys at a time per head, four independent FMA chains.
__attribute__((target("avx2,fma"))) void scores_block_avx2(const float* q, int64_t G, const float* K, int64_t n,
                                                             int64_t d, float* scores, int64_t stride) {
  for (int64_t h = 0; h < G; ++h) {
    const float* qh = q + h * d;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 x = _mm256_loadu_ps(qh + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 2 * d + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 3 * d + i), a3);
      }
      float* out = scores + h * stride + j;
      out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
    }
    for (; j < n; ++j) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(K + j * d + i), a);
      scores[h * stride + j] = hsum(a);
    }
  }
}

// d % 8 == 0, d <= 128: the head's accumulator lives in registers across the block.
__attribute__((target("avx2,fma"))) void values_block_avx2(const float* p, int64_t G, const float* V, int64_t n,
                                                             int64_t d, float* acc, int64_t stride) {
  for (int64_t h = 0; h < G; ++h) {
    __m256 a[16];
    const int64_t c = d / 8;
    for (int64_t i = 0; i < c; ++i) a[i] = _mm256_loadu_ps(acc + h * d + 8 * i);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(p[h * stride + j]);
      const float* vj = V + j * d;
      for (int64_t i = 0; i < c; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * i), a[i]);
    }
    for (int64_t i = 0; i < c; ++i) _mm256_storeu_ps(acc + h * d + 8 * i, a[i]);
  }
}

// exp(x) for x <= 0 (softmax after subtracting the max): runtime/ops/vector_exp.h, 8 lanes at a time.
__attribute__((target("avx2,fma"))) void exp_avx2(float* x, int64_t n) {
  mesa_ops::exp_neg_inplace<mesa_ops::v8, mesa_ops::i8>(x, n);
}
#endif

// One (row, KV head): rotate and store the new key/value, then all G query heads of the group in one
// pass over the cache, a block of keys at a time (scores, then after all blocks softmax and values).
void run_group(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const Shapes& s = t.sh;
  const int64_t b = static_cast<int64_t>(index) / s.kv_heads, g = static_cast<int64_t>(index) % s.kv_heads;
  const int64_t d = s.head_dim, G = s.heads / s.kv_heads, pos = t.seqlens[b], n = pos + 1;
  float* K = t.past_k + (b * s.kv_heads + g) * s.max_len * d;
  float* V = t.past_v + (b * s.kv_heads + g) * s.max_len * d;
  rotate(t.k + (b * s.kv_heads + g) * d, K + pos * d, t.cos, t.sin, pos, d);
  std::memcpy(V + pos * d, t.v + (b * s.kv_heads + g) * d, sizeof(float) * d);

  std::vector<float> q(G * d), scores(G * n), acc(G * d, 0.0f);
  for (int64_t h = 0; h < G; ++h) {
    rotate(t.q + (b * s.heads + g * G + h) * d, &q[h * d], t.cos, t.sin, pos, d);
    for (int64_t i = 0; i < d; ++i) q[h * d + i] *= t.scale;
  }
  const bool fast = t.vector;
  for (int64_t j = 0; j < n; j += kBlock) {
    const int64_t m = std::min(kBlock, n - j);
#if defined(__x86_64__)
    if (fast) {
      scores_block_avx2(q.data(), G, K + j * d, m, d, &scores[j], n);
      continue;
    }
#endif
    scores_block(q.data(), G, K + j * d, m, d, &scores[j], n);
  }
  for (int64_t h = 0; h < G; ++h) {
    float* sc = &scores[h * n];
    const float top = *std::max_element(sc, sc + n);
    for (int64_t j = 0; j < n; ++j) sc[j] -= top;
#if defined(__x86_64__)
    if (fast) exp_avx2(sc, n);
    else
#endif
      for (int64_t j = 0; j < n; ++j) sc[j] = std::exp(sc[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += sc[j];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
  }
  for (int64_t j = 0; j < n; j += kBlock) {
    const int64_t m = std::min(kBlock, n - j);
#if defined(__x86_64__)
    if (fast) {
      values_block_avx2(&scores[j], G, V + j * d, m, d, acc.data(), n);
      continue;
    }
#endif
    values_block(&scores[j], G, V + j * d, m, d, acc.data(), n);
  }
  std::memcpy(t.out + (b * s.heads + g * G) * d, acc.data(), sizeof(float) * G * d);
}

struct Kernel {
  int64_t heads, kv_heads;
  float scale;
  bool vector = mesa_ops::detect() != mesa_ops::Isa::portable;  // AVX2 (an AVX-512 CPU has it too)

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
              vector && sh.head_dim % 8 == 0 && sh.head_dim <= 128};
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

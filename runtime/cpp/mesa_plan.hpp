// Mesa-Extrapolation's formulas for the C++ runner, restated from runtime/mesa.py (the one place that owns
// them; MESA_SPEC.md sections in brackets). Change a formula there first, then here: tests/test_cpp.py
// compares this runner's tokens and logits with the Python runtime and the published fixtures.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mesa {

// runtime.mesa.MesaParamError: a parameter set or prompt length the method rejects.
struct MesaParamError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int64_t SPLIT_REMAINDER_LIMIT = 200;  // DynamicSplit's absolute constant (published code)

struct Params {  // runtime.mesa.MesaParams (chunk_width = W0, already resolved: 0 means T in the manifest)
  int64_t train_length, first_chunk, first_chunk_cache, last_context, reserve_tokens, push_width, chunk_width;
};

// runtime.mesa.origin_params / graph_params: plain RoPE is the same formulas with T = max_len + 1.
inline Params graph_params(const Params& p, const std::string& method, int64_t max_len) {
  if (method == "origin") return Params{max_len + 1, 1, 0, 0, 0, 1, max_len + 1};
  return p;
}

// [2] dynamic_split: the chunk width W for a prompt of `L` tokens (published set_align_position).
inline int64_t dynamic_split(int64_t L, const Params& p) {
  const int64_t T = p.train_length, F = p.first_chunk, Fc = p.first_chunk_cache, C = p.last_context,
                G = p.reserve_tokens;
  if (L < T - G) return p.chunk_width;
  const int64_t X = L + G - C - F, D = T - F - Fc;
  if (D <= 0)
    throw MesaParamError("T - F - Fc = " + std::to_string(D) + " must be positive (T=" + std::to_string(T) +
                         ", F=" + std::to_string(F) + ", Fc=" + std::to_string(Fc) + ")");
  auto floordiv = [](int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
  };
  auto floormod = [&](int64_t a, int64_t b) { return a - floordiv(a, b) * b; };  // Python's divmod
  int64_t N = floordiv(X, D), M = floormod(X, D), W;
  if (M < SPLIT_REMAINDER_LIMIT) {
    W = D;
  } else {
    if (N + 1 == 0)
      throw MesaParamError("DynamicSplit divides by zero for L=" + std::to_string(L) + " (C + F too large for T)");
    W = floordiv(X, N + 1);
    if (W <= 0)
      throw MesaParamError("DynamicSplit gives chunk width " + std::to_string(W) + " for L=" + std::to_string(L));
    const int64_t MM = floormod(X, W);
    if (MM >= SPLIT_REMAINDER_LIMIT)
      throw MesaParamError("non reasonable setting: remainder " + std::to_string(MM) +
                           " >= " + std::to_string(SPLIT_REMAINDER_LIMIT) + " for L=" + std::to_string(L));
  }
  if (W + F >= T)
    throw MesaParamError("chunk width W=" + std::to_string(W) + " plus first chunk F=" + std::to_string(F) +
                         " must stay below T=" + std::to_string(T));
  return W;
}

// [3] Step: new tokens [start, stop) seeing cache[0:a] ++ cache[b:w] ++ new, w = start.
struct Step {
  int64_t start, stop, sink_len, window_start, chunk_width;
  const char* kind;
  int64_t write_pos() const { return start; }
  int64_t q() const { return stop - start; }
  int64_t kv_len() const { return sink_len + (write_pos() - window_start) + q(); }
};

constexpr int64_t kFullPrefillChunk = 1024;  // runtime.mesa.FULL_PREFILL_CHUNK

// [3] prefill_steps: first chunk, middle chunks (see the first chunk and themselves), last chunk.
inline std::vector<Step> prefill_steps(int64_t L, const Params& p, const std::string& method = "mesa") {
  if (L < 1) throw MesaParamError("a prompt needs at least one token");
  if (method == "origin") {  // runtime.mesa.FULL_PREFILL_CHUNK: full-attention calls, each sees all before it
    std::vector<Step> calls;
    for (int64_t s = 0; s < L; s += kFullPrefillChunk) calls.push_back(Step{s, std::min(s + kFullPrefillChunk, L), 0, 0, p.chunk_width, "full"});
    return calls;
  }
  if (method != "mesa") throw MesaParamError("unknown method '" + method + "'; choose one of mesa, origin");
  const int64_t W = dynamic_split(L, p), F = p.first_chunk;
  std::vector<Step> steps{Step{0, std::min(F, L), 0, 0, W, "first"}};
  for (int64_t s = F; s < L;) {
    if (s + W < L) {
      steps.push_back(Step{s, s + W, F, s, W, "middle"});
      s += W;
    } else {
      steps.push_back(Step{s, L, 0, 0, W, "last"});
      break;
    }
  }
  return steps;
}

// [5] key_positions: Stair PE, the RoPE position of key k of a call with S keys.
inline int64_t key_position(int64_t k, int64_t S, int64_t W, int64_t T, int64_t pw) {
  if (S <= T) return k;
  const int64_t A = S - (S - 1) % W;  // the anchor: keys from A on keep their index
  return k >= A ? k : (A - 1) - (A - 1 - k) / pw;
}

// runtime/decode_cache.py _anchor: 0 while positions are the identity (S <= T), else the stair anchor.
inline int64_t anchor(int64_t S, int64_t W, int64_t T) { return S <= T ? 0 : S - (S - 1) % W; }

// runtime.mesa.check_request: the prefill plan of a request, or MesaParamError saying why it cannot run.
inline std::vector<Step> check_request(int64_t L, int64_t max_new_tokens, int64_t max_len, const Params& p,
                                       const std::string& method) {
  if (L + max_new_tokens > max_len) {
    std::string asked = "prompt (" + std::to_string(L) + " tokens)";
    if (max_new_tokens) asked += " + max_new_tokens (" + std::to_string(max_new_tokens) + ")";
    throw MesaParamError(asked + " exceeds max_len " + std::to_string(max_len));
  }
  return prefill_steps(L, p, method);
}

}  // namespace mesa

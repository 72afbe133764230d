// mesa_engine.hpp: drive an exported Mesa-Extrapolation engine (export.py --target ort-cpu) from C++ through
// the ONNX Runtime C++ API. Header-only, C++17; needs onnxruntime_cxx_api.h and nlohmann/json.hpp. The directory
// contract is in mesa_artifact.hpp, the method's formulas in mesa_plan.hpp.
//
//   mesa::Engine engine("engines/llama2-7b-12k");            // model.onnx + mesa.json + rope.npy
//   mesa::KVCache cache = mesa::new_cache(engine, 4);        // static cache, allocated once: 4 sequences at once
//   auto rows = mesa::generate(engine, cache, {ids_a, ids_b}, opts, on_token);   // batched decode
//
// What the Python runtime does (runtime/batch_decoder.py InplaceDecoder, runtime/decode_cache.py,
// runtime/sampling.py), in the same order: a prompt is prefilled by its Mesa plan (mesa_plan.hpp) over a
// pre-RoPE buffer, its keys are then rotated at the Stair-PE positions of its first decode step and copied
// into its slot of the decode cache, and every decode call steps all running sequences at once, the graph
// appending each row's key and value in place (past_key_l/present_key_l bound to the same buffer). Before a
// step whose stair anchor moved, that row's cached keys are re-rotated. The cache is passed explicitly.
// Errors are exceptions carrying the Python runtime's messages (runtime/engine.py, runtime/artifact.py).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "mesa_artifact.hpp"
#include "mesa_plan.hpp"

namespace mesa {

// Python's repr() of a float, for messages that quote a setting (-1.0, 0.5, inf).
inline std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  std::string s(buf, std::to_chars(buf, buf + sizeof buf, x).ptr);
  return s.find_first_of(".e") == std::string::npos ? s + ".0" : s;
}

// ------------------------------------------------------------------------------------------ the engine

struct Engine {
  fs::path dir;
  Manifest m;
  Params steps;                 // the parameters steps run with (graph_params: origin is T = max_len + 1)
  std::vector<float> cos, sin;  // rope.npy: [max_len, head_dim / 2] each, the graph's own tables
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "mesa"};
  Ort::Session session{nullptr};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

  // --decode-kernel grouped engines: $MESA_OPS_LIBRARY, else libmesa_ops.so beside this executable (the build puts
  // both in build/cpp), as runtime/custom_ops.py finds it
  static void register_custom_ops(Ort::SessionOptions& opts) {
    const char* chosen = std::getenv("MESA_OPS_LIBRARY");
    std::error_code ec;
    const fs::path lib = chosen && *chosen ? fs::path(chosen) : fs::read_symlink("/proc/self/exe", ec).parent_path() / "libmesa_ops.so";
    if (!fs::is_regular_file(lib))
      throw LoadError("this engine runs attention on the Mesa CPU kernels (ai.mesa.cpu); build them with "
                      "`bash scripts/build_cpp.sh` or set MESA_OPS_LIBRARY to a libmesa_ops.so (" + lib.string() +
                      " is not a file)");
    try {
      opts.RegisterCustomOpsLibrary(lib.c_str());
    } catch (const Ort::Exception& e) {
      throw LoadError("ONNX Runtime cannot load " + lib.string() + ": " + e.what());
    }
  }

  explicit Engine(const fs::path& directory, int intra_op_threads = 0) : dir(directory), m(load_manifest(directory)) {
    const std::string D = show_dir(dir);
    if (m.dtype != "fp32")
      throw LoadError(m.dtype + " engines are not served by the C++ runner (fp32 only); export with --dtype fp32");
    Ort::SessionOptions opts;
    if (intra_op_threads > 0) opts.SetIntraOpNumThreads(intra_op_threads);
    if (m.custom_ops) register_custom_ops(opts);
    const std::string model = (dir / "model.onnx").string();
    try {
      session = Ort::Session(env, model.c_str(), opts);
    } catch (const Ort::Exception& e) {
      throw LoadError("ONNX Runtime cannot load " + show_dir(dir / "model.onnx") + ": " + e.what());
    }
    check_graph();
    if (!fs::is_regular_file(dir / "rope.npy"))
      throw LoadError(D + " is incomplete: rope.npy is missing; re-export the engine");
    const Npy rope = read_npy(dir / "rope.npy");
    const int64_t half = m.head_dim / 2, n = m.max_len * half;
    if (rope.shape != std::vector<int64_t>{2, m.max_len, half})
      throw LoadError(D + ": rope.npy is not [2, max_len, head_dim / 2]; re-export the engine");
    cos.assign(rope.data.begin(), rope.data.begin() + n);
    sin.assign(rope.data.begin() + n, rope.data.end());
    steps = graph_params(m.params, m.method, m.max_len);
  }

  // runtime/engine.py check_graph, in part: the graph's I/O names and the metadata the exporter bound it with
  // (method, max_len, params; not the contract hash).
  void check_graph() {
    auto mismatch = [&](const std::string& detail) {
      return LoadError(show_dir(dir) + ": mesa.json does not describe model.onnx (" + detail +
                       "); re-export the engine");
    };
    Ort::AllocatorWithDefaultOptions alloc;
    std::set<std::string> graph;
    for (size_t i = 0; i < session.GetInputCount(); ++i) graph.insert(session.GetInputNameAllocated(i, alloc).get());
    for (size_t i = 0; i < session.GetOutputCount(); ++i) graph.insert(session.GetOutputNameAllocated(i, alloc).get());
    if (!graph.count("decode_step"))
      throw LoadError(show_dir(dir) + " was exported for target " + m.target +
                      " without in-place decode; the C++ runner serves engines exported with --target ort-cpu");
    if (graph != expected_io(m.layers) || m.io != graph)
      throw mismatch("graph I/O " + py_list(graph) + ", manifest I/O " + py_list(m.io) + ", runtime expects " +
                     py_list(expected_io(m.layers)));
    Ort::ModelMetadata meta = session.GetModelMetadata();
    auto lookup = [&](const char* key) -> std::optional<std::string> {
      Ort::AllocatedStringPtr v = meta.LookupCustomMetadataMapAllocated(key, alloc);
      return v ? std::optional<std::string>(v.get()) : std::nullopt;
    };
    const auto method = lookup("mesa.method"), max_len = lookup("mesa.max_len"), params = lookup("mesa.params");
    if (!method || !max_len || !params)
      throw mismatch(
          "the graph carries no mesa.method, mesa.params, mesa.max_len metadata: "
          "exported before graphs were bound to manifests");
    const json graph_params = json::parse(*params, nullptr, false);
    for (const auto& [key, value] : m.params_json.items())
      if (!graph_params.is_object() || graph_params.value(key, json()) != value)
        throw mismatch("params." + key + " is " +
                       (graph_params.is_object() ? graph_params.value(key, json()).dump() : "None") +
                       " in the graph, " + value.dump() + " in the manifest");
    if (*method != m.method) throw mismatch("method is " + *method + " in the graph, " + m.method + " in the manifest");
    if (*max_len != std::to_string(m.max_len))
      throw mismatch("max_len is " + *max_len + " in the graph, " + std::to_string(m.max_len) + " in the manifest");
  }

  // runtime/engine.py _plans: a request's prefill plan, RequestError with runtime.mesa's message otherwise.
  std::vector<Step> plan(int64_t prompt_len, int64_t max_new_tokens) const {
    try {
      return check_request(prompt_len, max_new_tokens, m.max_len, m.params, m.method);
    } catch (const MesaParamError& e) { throw RequestError(e.what()); }
  }
};

// ------------------------------------------------------------------------------------------ the KV cache

struct Floats {  // zero-filled by calloc: pages of a large cache are not touched until written
  std::unique_ptr<float, void (*)(void*)> p{nullptr, std::free};
  explicit Floats(size_t n) : p(static_cast<float*>(std::calloc(n ? n : 1, sizeof(float))), std::free) {
    if (!p) throw std::bad_alloc();
  }
  float* data() const { return p.get(); }
};

// The static cache, allocated once (runtime/batch_decoder.py InplaceDecoder): one pre-RoPE prefill buffer
// (prefills run one at a time) and the decode cache of `slots` sequences, keys rotated at their Stair-PE
// positions. Both [layers, batch, kv_heads, max_len, head_dim], batch 1 and `slots`.
struct KVCache {
  int64_t layers, slots, kv_heads, max_len, head_dim;
  Floats pk, pv, k, v;
  std::vector<int64_t> length, chunk_width, anchor;  // per slot: keys cached, the W of its plan, its rotation's anchor

  KVCache(int64_t layers_, int64_t slots_, int64_t kv_heads_, int64_t max_len_, int64_t head_dim_)
      : layers(layers_), slots(slots_), kv_heads(kv_heads_), max_len(max_len_), head_dim(head_dim_), pk(size(1)),
        pv(size(1)), k(size(slots)), v(size(slots)), length(slots, 0), chunk_width(slots, 1), anchor(slots, 0) {}
  size_t size(int64_t batch) const { return size_t(layers * batch * kv_heads * max_len * head_dim); }
  // offset of row `pos` of (layer, slot, head) in a cache of `batch` slots
  size_t at(int64_t batch, int64_t layer, int64_t slot, int64_t head, int64_t pos) const {
    return size_t((((layer * batch + slot) * kv_heads + head) * max_len + pos) * head_dim);
  }
  void free(int64_t slot) { length[slot] = 0, anchor[slot] = 0, chunk_width[slot] = 1; }
};

inline KVCache new_cache(const Engine& e, int64_t slots) {
  if (slots < 1) throw RequestError("slots must be an integer >= 1, got " + std::to_string(slots));
  return KVCache(e.m.layers, slots, e.m.kv_heads, e.m.max_len, e.m.head_dim);
}

// RoPE (rotate-half) of one key x[head_dim] in place at position pos; sign -1 undoes it. The same float32
// operations as DecodeCache._rotate (build without FMA contraction to match numpy bit for bit).
inline void rotate(const Engine& e, float* x, int64_t pos, float sign) {
  const int64_t h = e.m.head_dim / 2;
  const float* c = e.cos.data() + pos * h;
  const float* s = e.sin.data() + pos * h;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h], si = sign * s[i];
    x[i] = x1 * c[i] - x2 * si;
    x[i + h] = x2 * c[i] + x1 * si;
  }
}

// ------------------------------------------------------------------------------------------ one step

struct StepOut {
  std::vector<Ort::Value> out;  // logits [B, n, vocab], new_keys, new_values [layers, B, kv_heads, q, head_dim]
  const float* logits() const { return out[0].GetTensorData<float>(); }
};

// One call of the step graph (runtime/backends.py OrtStep._run). k_cache/v_cache: `kv` of batch kv_batch;
// past_key_l/past_value_l and their presents: decode-cache rows [lo, lo + B), bound to the same buffers.
inline StepOut run_step(Engine& e, KVCache& c, const int64_t* ids, int64_t B, int64_t q, const Step& st, int64_t keep,
                        bool decode, const int32_t* seqlens, int32_t total, float* kc, float* vc, int64_t kv_batch,
                        int64_t lo) {
  std::vector<Ort::Value> keep_alive;
  Ort::IoBinding io(e.session);
  auto bind = [&](const char* name, Ort::Value v) {
    io.BindInput(name, v);
    keep_alive.push_back(std::move(v));
  };
  int64_t ids_shape[2] = {B, q};
  bind("input_ids", Ort::Value::CreateTensor<int64_t>(e.cpu, const_cast<int64_t*>(ids), size_t(B * q), ids_shape, 2));
  int64_t cache_shape[5] = {c.layers, kv_batch, c.kv_heads, c.max_len, c.head_dim};
  bind("k_cache", Ort::Value::CreateTensor<float>(e.cpu, kc, c.size(kv_batch), cache_shape, 5));
  bind("v_cache", Ort::Value::CreateTensor<float>(e.cpu, vc, c.size(kv_batch), cache_shape, 5));
  int64_t scalars[5] = {st.sink_len, st.window_start, st.write_pos(), st.chunk_width, keep};
  const char* names[5] = {"sink_len", "window_start", "write_pos", "chunk_width", "logits_to_keep"};
  for (int i = 0; i < 5; ++i) bind(names[i], Ort::Value::CreateTensor<int64_t>(e.cpu, &scalars[i], 1, nullptr, 0));
  bool flag = decode;
  bind("decode_step", Ort::Value::CreateTensor<bool>(e.cpu, &flag, 1, nullptr, 0));
  bind("seqlens_k", Ort::Value::CreateTensor<int32_t>(e.cpu, const_cast<int32_t*>(seqlens), size_t(B), &B, 1));
  bind("total_sequence_length", Ort::Value::CreateTensor<int32_t>(e.cpu, &total, 1, nullptr, 0));
  for (const char* name : {"logits", "new_keys", "new_values"}) io.BindOutput(name, e.cpu);
  int64_t rows_shape[4] = {B, c.kv_heads, c.max_len, c.head_dim};
  const size_t rows = size_t(B * c.kv_heads * c.max_len * c.head_dim);
  for (int64_t l = 0; l < c.layers; ++l)
    for (auto [kind, buf] : {std::pair{"key", c.k.data()}, std::pair{"value", c.v.data()}}) {
      const std::string suffix = std::string(kind) + "_" + std::to_string(l);
      Ort::Value view = Ort::Value::CreateTensor<float>(e.cpu, buf + c.at(c.slots, l, lo, 0, 0), rows, rows_shape, 4);
      io.BindInput(("past_" + suffix).c_str(), view);
      io.BindOutput(("present_" + suffix).c_str(), view);  // the same buffer: the graph appends in place
      keep_alive.push_back(std::move(view));
    }
  e.session.Run(Ort::RunOptions{nullptr}, io);
  std::vector<Ort::Value> out = io.GetOutputValues();
  out.resize(3);
  return StepOut{std::move(out)};
}

// ------------------------------------------------------------------------------------------ prefill, decode

// Prefill one prompt by its Mesa plan into the pre-RoPE buffer, then hand it to `slot` of the decode cache
// (DecodeCache.load: keys rotated at the positions of the first decode step, S = L + 1). Returns the logits of
// every prompt position [L, vocab] with all_logits, else of the last one [1, vocab].
inline std::vector<float> prefill(Engine& e, KVCache& c, int64_t slot, const std::vector<int64_t>& ids,
                                  bool all_logits) {
  const int64_t L = int64_t(ids.size()), V = e.m.vocab_size, d = c.head_dim;
  if (slot < 0 || slot >= c.slots)
    throw RequestError("slot " + std::to_string(slot) + " is not in the cache's " + std::to_string(c.slots));
  const std::vector<Step> plan = e.plan(L, 0);
  std::vector<float> logits;
  const int32_t zero = 0;
  for (const Step& st : plan) {
    const int64_t q = st.q(), keep = all_logits ? q : 1;
    StepOut o =
        run_step(e, c, ids.data() + st.start, 1, q, st, keep, false, &zero, 1, c.pk.data(), c.pv.data(), 1, slot);
    if (all_logits || &st == &plan.back()) logits.insert(logits.end(), o.logits(), o.logits() + keep * V);
    for (int w = 1; w <= 2; ++w) {  // new rows [layers, 1, kv_heads, q, d] -> buffer rows [write_pos, write_pos + q)
      const float* src = o.out[w].GetTensorData<float>();
      float* dst = (w == 1 ? c.pk : c.pv).data();
      for (int64_t l = 0; l < c.layers; ++l)
        for (int64_t h = 0; h < c.kv_heads; ++h)
          std::memcpy(dst + c.at(1, l, 0, h, st.write_pos()), src + ((l * c.kv_heads + h) * q) * d,
                      size_t(q * d) * sizeof(float));
    }
  }
  const int64_t W = plan.back().chunk_width, S = L + 1, T = e.steps.train_length, pw = e.steps.push_width;
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t h = 0; h < c.kv_heads; ++h) {
      std::memcpy(c.k.data() + c.at(c.slots, l, slot, h, 0), c.pk.data() + c.at(1, l, 0, h, 0),
                  size_t(L * d) * sizeof(float));
      std::memcpy(c.v.data() + c.at(c.slots, l, slot, h, 0), c.pv.data() + c.at(1, l, 0, h, 0),
                  size_t(L * d) * sizeof(float));
      for (int64_t k = 0; k < L; ++k)
        rotate(e, c.k.data() + c.at(c.slots, l, slot, h, k), key_position(k, S, W, T, pw), 1.f);
    }
  c.length[slot] = L, c.chunk_width[slot] = W, c.anchor[slot] = anchor(S, W, T);
  return logits;
}

// DecodeCache.prepare: before the slot's next decode step, re-rotate its keys if their positions move (the
// stair anchor moved, or S first passed T). Un-rotates at the old positions and rotates at the new ones, both
// from the engine's float32 tables (decode_cache.py says why not by the delta). True if it rotated.
inline bool prepare(const Engine& e, KVCache& c, int64_t slot) {
  const int64_t n = c.length[slot], W = c.chunk_width[slot], S = n + 1, T = e.steps.train_length,
                pw = e.steps.push_width;
  const int64_t a = anchor(S, W, T);
  if (a == c.anchor[slot]) return false;
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t h = 0; h < c.kv_heads; ++h)
      for (int64_t k = 0; k < n; ++k) {
        float* x = c.k.data() + c.at(c.slots, l, slot, h, k);
        rotate(e, x, key_position(k, n, W, T, pw), -1.f);  // the previous step had S = n keys
        rotate(e, x, key_position(k, S, W, T, pw), 1.f);
      }
  c.anchor[slot] = a;
  return true;
}

// One decode call over every slot of the cache (InplaceDecoder.decode): slots[i] consumes tokens[i] at its own
// position, anchor and log-n factor; the graph appends its key and value in place. Slots not stepping write a
// throw-away row at their own next position, which their next real step overwrites. Returns logits
// [slots.size(), vocab] in the order of `slots`.
inline std::vector<float> decode(Engine& e, KVCache& c, const std::vector<int64_t>& slots,
                                 const std::vector<int64_t>& tokens) {
  std::vector<int64_t> ids(size_t(c.slots), 0);
  std::vector<int32_t> seqlens(c.length.begin(), c.length.end());
  for (int64_t s = 0; s < c.slots; ++s)  // every row writes at its own next position, stepping or not
    if (c.length[s] >= c.max_len)
      throw RequestError("slot " + std::to_string(s) + " holds max_len " + std::to_string(c.max_len) +
                         " tokens: free it before the next decode step");
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t s = slots[i];
    if (s < 0 || s >= c.slots)
      throw RequestError("slot " + std::to_string(s) + " is not in the cache's " + std::to_string(c.slots));
    if (c.length[s] < 1) throw RequestError("slot " + std::to_string(s) + " holds no prompt: prefill it first");
    prepare(e, c, s);
    ids[size_t(s)] = tokens[i];
  }
  const int32_t total = *std::max_element(seqlens.begin(), seqlens.end()) + 1;
  const Step st{0, 1, 0, 0, 1, "decode"};  // the decode branch reads seqlens_k, not the step scalars
  StepOut o =
      run_step(e, c, ids.data(), c.slots, 1, st, 1, true, seqlens.data(), total, c.k.data(), c.v.data(), c.slots, 0);
  const int64_t V = e.m.vocab_size;
  std::vector<float> logits(slots.size() * size_t(V));
  for (size_t i = 0; i < slots.size(); ++i) {
    std::copy_n(o.logits() + slots[i] * V, V, logits.begin() + i * V);
    c.length[slots[i]] += 1;
  }
  return logits;
}

// ------------------------------------------------------------------------------------------ sampling

// runtime/sampling.py: temperature 0 is greedy (argmax); otherwise logits / temperature, cut to top_k and to
// the smallest set reaching top_p, sampled with a generator seeded with `seed`. The generator is
// std::mt19937_64, not numpy's PCG64: seeded runs repeat, but are not the Python runtime's draws.
struct Sampling {
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  std::optional<int64_t> seed;

  void check() const {  // Sampling.__post_init__'s messages, as runtime/engine.py wraps them
    std::string bad;
    if (!(temperature >= 0 && std::isfinite(temperature)))
      bad = "temperature must be >= 0 (0 = greedy), a finite number, got " + py_float(temperature);
    else if (top_k < 0) bad = "top_k must be >= 0 (0 = no limit), an integer, got " + std::to_string(top_k);
    else if (!(top_p > 0 && top_p <= 1)) bad = "top_p must be in (0, 1], got " + py_float(top_p);
    else if (seed && *seed < 0) bad = "seed must be >= 0, an integer (or None), got " + std::to_string(*seed);
    if (!bad.empty()) throw RequestError("bad generation settings: " + bad);
  }
};

inline int64_t pick(const float* logits, int64_t n, const Sampling& s, std::mt19937_64& rng) {
  if (s.temperature == 0) return std::max_element(logits, logits + n) - logits;
  std::vector<double> x(logits, logits + n);
  const double top = *std::max_element(x.begin(), x.end());
  for (double& v : x) v = (v - top) / s.temperature;  // shifted first: a tiny temperature gives -inf, never nan
  if (s.top_k > 0 && s.top_k < n) {
    std::vector<double> y = x;
    std::nth_element(y.begin(), y.begin() + (n - s.top_k), y.end());
    const double kth = y[size_t(n - s.top_k)];
    for (double& v : x)
      if (v < kth) v = -INFINITY;
  }
  const double top2 = *std::max_element(x.begin(), x.end());
  double sum = 0;
  for (double& v : x) sum += (v = std::exp(v - top2));
  for (double& v : x) v /= sum;
  if (s.top_p < 1) {
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[size_t(a)] > x[size_t(b)]; });
    double before = 0;  // probability of the more likely tokens; the most likely token always survives
    for (int64_t i : order) {
      const double p = x[size_t(i)];
      if (before >= s.top_p) x[size_t(i)] = 0;
      before += p;
    }
  }
  double total = 0;
  for (double& v : x) total += v;
  const double u = double(rng() >> 11) * 0x1.0p-53 * total;  // uniform [0, total), the same on every platform
  double cum = 0;
  for (int64_t i = 0; i < n; ++i)
    if ((cum += x[size_t(i)]) > u) return i;
  return n - 1;
}

// ------------------------------------------------------------------------------------------ generate

struct Options {
  int64_t max_new_tokens = 64;
  Sampling sampling;
  std::optional<std::vector<int64_t>> stop_tokens;  // none: the model's EOS ids; {}: never stop early
  bool return_logits = false;
};

struct Generation {  // runtime/engine.py Generation; decode_logits row t: the step that consumed tokens[t]
  std::vector<int64_t> tokens;
  std::string finish_reason = "length";  // "stop": the last token is a stop token
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  std::vector<float> prefill_logits, decode_logits;  // [L, vocab], [tokens - 1, vocab] with return_logits
};

using OnToken = std::function<void(size_t row, int64_t token)>;  // called as each token is chosen

// The checks of runtime/engine.py _ids and _request, with its messages, before anything runs.
inline void check_prompt(const Engine& e, const std::vector<int64_t>& ids) {
  if (ids.empty()) throw RequestError("empty prompt: give at least one token");
  for (int64_t t : ids)
    if (t < 0 || t >= e.m.vocab_size)
      throw RequestError("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                         std::to_string(e.m.vocab_size) + ")");
}

// Generate for a batch of prompts: each row by its own Mesa plan, all running rows decoding in one call per
// step. Rows beyond the cache's slots wait and take the slot of a finished row. A row's tokens are those it
// gets alone (each samples from its own generator seeded with `seed`). generate uses every slot of `c` and
// leaves them all free. Middle chunks run whole (the Python batcher may cut one into exact sub-steps of
// token_budget tokens between decode steps; the same computation).
inline std::vector<Generation> generate(Engine& e, KVCache& c, const std::vector<std::vector<int64_t>>& prompts,
                                        const Options& o, const OnToken& on_token = {}) {
  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
  if (prompts.empty()) throw RequestError("empty batch: give at least one prompt");
  for (const auto& ids : prompts) check_prompt(e, ids);
  if (o.max_new_tokens < 1)
    throw RequestError("max_new_tokens must be a positive integer, got " + std::to_string(o.max_new_tokens));
  o.sampling.check();
  const std::vector<int64_t> stop = o.stop_tokens.value_or(e.m.eos_token_ids);
  for (int64_t t : stop)
    if (t < 0 || t >= e.m.vocab_size)
      throw RequestError("stop_tokens: " + std::to_string(t) + " is not a token id in [0, " +
                         std::to_string(e.m.vocab_size) + ")");
  for (const auto& ids : prompts) e.plan(int64_t(ids.size()), o.max_new_tokens);

  const int64_t V = e.m.vocab_size;
  std::vector<Generation> out(prompts.size());
  std::vector<std::mt19937_64> rngs;
  for (size_t r = 0; r < prompts.size(); ++r)
    rngs.emplace_back(o.sampling.seed ? uint64_t(*o.sampling.seed) : std::random_device{}());
  struct Running {
    size_t row;
    int64_t slot, pending;
  };
  std::vector<Running> running;
  std::vector<int64_t> free_slots;
  for (int64_t s = c.slots - 1; s >= 0; --s) c.free(s), free_slots.push_back(s);  // lowest slot first (back)
  size_t next = 0;

  auto take = [&](size_t row, const float* logits, int64_t slot) {  // choose the row's next token; true: go on
    Generation& g = out[row];
    const int64_t t = pick(logits, V, o.sampling, rngs[row]);
    g.tokens.push_back(t);
    if (on_token) on_token(row, t);
    if (std::find(stop.begin(), stop.end(), t) != stop.end()) g.finish_reason = "stop";
    else if (int64_t(g.tokens.size()) < o.max_new_tokens) return true;
    c.free(slot), free_slots.push_back(slot);
    std::sort(free_slots.rbegin(), free_slots.rend());
    return false;
  };
  try {
    while (next < prompts.size() || !running.empty()) {
      while (next < prompts.size() && !free_slots.empty()) {  // prefill waiting rows into free slots
        const size_t row = next++;
        const int64_t slot = free_slots.back();
        free_slots.pop_back();
        const auto t = clock::now();
        std::vector<float> logits = prefill(e, c, slot, prompts[row], o.return_logits);
        Generation& g = out[row];
        g.prompt_tokens = int64_t(prompts[row].size()), g.prefill_seconds = seconds(t);
        if (o.return_logits) g.prefill_logits = logits;
        if (take(row, logits.data() + logits.size() - size_t(V), slot)) running.push_back({row, slot, g.tokens.back()});
      }
      if (running.empty()) continue;
      std::vector<int64_t> slots, tokens;
      for (const Running& r : running) slots.push_back(r.slot), tokens.push_back(r.pending);
      const auto t = clock::now();
      const std::vector<float> logits = decode(e, c, slots, tokens);
      const double took = seconds(t);
      std::vector<Running> still;
      for (size_t i = 0; i < running.size(); ++i) {
        Generation& g = out[running[i].row];
        g.decode_seconds += took;
        const float* row_logits = logits.data() + i * size_t(V);
        if (o.return_logits) g.decode_logits.insert(g.decode_logits.end(), row_logits, row_logits + V);
        if (take(running[i].row, row_logits, running[i].slot))
          still.push_back({running[i].row, running[i].slot, g.tokens.back()});
      }
      running.swap(still);
    }
  } catch (...) {  // a failed step (or callback) ends the request; the cache's slots are free for the next
    for (int64_t s = 0; s < c.slots; ++s) c.free(s);
    try {
      throw;
    } catch (const Ort::Exception& x) {  // as runtime/sequence.py reports a step that failed
      throw EngineError(std::string("the step failed: ") + x.what());
    }
  }
  return out;
}

}  // namespace mesa

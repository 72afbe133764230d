// mesa_artifact.hpp: the engine directory contract for the C++ runner (runtime/artifact.py): mesa.json read with
// nlohmann/json, rope.npy (and the CLI's logits) through a minimal .npy reader and writer, the step graph's I/O
// names, and the runtime's error types (runtime/errors.py). Messages are the Python runtime's.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mesa_plan.hpp"

namespace mesa {

namespace fs = std::filesystem;
using json = nlohmann::json;

// runtime/errors.py: one base, one type per thing a user can get wrong; what() is the whole message.
struct EngineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct LoadError : EngineError {  // directory missing or incomplete, a manifest that does not describe its graph
  using EngineError::EngineError;
};
struct RequestError : EngineError {  // a request the engine refuses
  using EngineError::EngineError;
};

// ------------------------------------------------------------------------------------------ .npy files

struct Npy {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// A little-endian float32 C-order .npy file (what numpy.save writes for rope.npy).
inline Npy read_npy(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw LoadError(path.string() + " is not a .npy file");
  uint32_t hlen = 0;
  unsigned char b[4] = {0, 0, 0, 0};
  f.read(reinterpret_cast<char*>(b), magic[6] == 1 ? 2 : 4);
  hlen = b[0] | b[1] << 8 | b[2] << 16 | uint32_t(b[3]) << 24;
  std::string header(hlen, ' ');
  f.read(header.data(), hlen);
  if (header.find("'descr': '<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    throw LoadError(path.string() + " must hold little-endian float32 in C order");
  Npy out;
  size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  size_t count = 1;
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) count *= out.shape.emplace_back(std::stoll(d));
  out.data.resize(count);
  if (!f.read(reinterpret_cast<char*>(out.data.data()), std::streamsize(count * sizeof(float))))
    throw LoadError(path.string() + " is truncated");
  return out;
}

inline void write_npy(const fs::path& path, const float* data, int64_t rows, int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');  // 10-byte preamble + header: 64-aligned
  std::ofstream f(path, std::ios::binary);
  const uint16_t n = uint16_t(header.size());
  f.write("\x93NUMPY\x01\x00", 8).write(reinterpret_cast<const char*>(&n), 2).write(header.data(), n);
  f.write(reinterpret_cast<const char*>(data), std::streamsize(rows * cols * sizeof(float)));
  if (!f) throw std::runtime_error("cannot write " + path.string());
}

// ------------------------------------------------------------------------------------------ the manifest

// The fields of mesa.json (runtime/artifact.py Manifest) this runner needs.
struct Manifest {
  std::string method, dtype, target;
  Params params;
  json params_json;
  int64_t max_len, vocab_size, layers, kv_heads, head_dim;
  std::vector<int64_t> eos_token_ids;
  std::set<std::string> io;  // input and output names
  bool custom_ops = false;   // passes include grouped_decode / tiled_prefill: the graph needs libmesa_ops.so
};

inline std::string show_dir(const fs::path& d) {  // as Python's Path prints it: no trailing separator
  std::string s = d.string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

inline Manifest load_manifest(const fs::path& dir) {  // runtime/artifact.py load_manifest, same messages
  const std::string D = show_dir(dir);
  if (!fs::is_directory(dir))
    throw LoadError("engine directory " + D + (fs::exists(dir) ? " is not a directory" : " does not exist"));
  const fs::path path = dir / "mesa.json";
  if (!fs::is_regular_file(path))
    throw LoadError(D + " has no mesa.json: not an engine directory, or an export that did not finish");
  Manifest m;
  try {
    std::ifstream f(path);
    const json j = json::parse(f);
    if (!j.is_object() || j.value("format", json()) != "mesa-engine")
      throw LoadError("not a mesa-engine manifest (format=" +
                      (j.is_object() && j.contains("format") ? j["format"].dump() : "None") + ")");
    if (j.value("format_version", json()) != 2)
      throw LoadError("engine format version " + j.value("format_version", json()).dump() +
                      " is not supported by this runtime (expects 2); re-export the engine");
    auto field = [&](const json& o, const std::string& name, const std::string& where) -> const json& {
      if (!o.contains(name)) throw LoadError("field " + where + name + " is missing");
      return o[name];
    };
    auto integer = [&](const json& o, const std::string& name, int64_t min, const std::string& where = "") {
      const json& v = field(o, name, where);
      if (!v.is_number_integer())
        throw LoadError("field " + where + name + ": " + v.dump() + " is not of type 'integer'");
      if (v.get<int64_t>() < min)
        throw LoadError("field " + where + name + ": " + v.dump() + " is less than the minimum of " +
                        std::to_string(min));
      return v.get<int64_t>();
    };
    auto text = [&](const std::string& name) { return field(j, name, "").get<std::string>(); };
    m.method = text("method"), m.dtype = text("dtype"), m.target = text("target");
    for (const auto& pass : j.value("passes", json::array()))
      if (pass.is_string() && (pass.get<std::string>() == "grouped_decode" || pass.get<std::string>() == "tiled_prefill"))
        m.custom_ops = true;
    if (m.method != "mesa" && m.method != "origin")
      throw LoadError("field method: '" + m.method + "' is not served by the C++ runner (it runs 'mesa' and 'origin' engines; serve the other methods with the Python runtime)");
    const json& p = field(j, "params", "");
    m.params_json = p;
    m.params = Params{integer(p, "train_length", 1, "params."),      integer(p, "first_chunk", 1, "params."),
                      integer(p, "first_chunk_cache", 0, "params."), integer(p, "last_context", 0, "params."),
                      integer(p, "reserve_tokens", 0, "params."),    integer(p, "push_width", 1, "params."),
                      integer(p, "chunk_width", 0, "params.")};
    if (m.params.chunk_width == 0) m.params.chunk_width = m.params.train_length;
    if (m.params.first_chunk >= m.params.train_length)
      throw LoadError("field params: first_chunk F=" + std::to_string(m.params.first_chunk) +
                      " must be below train_length T=" + std::to_string(m.params.train_length));
    m.max_len = integer(j, "max_len", 1), m.vocab_size = integer(j, "vocab_size", 1);
    m.layers = integer(j, "num_hidden_layers", 1), m.kv_heads = integer(j, "num_key_value_heads", 1);
    m.head_dim = integer(j, "head_dim", 1);
    m.eos_token_ids = field(field(j, "generation", ""), "eos_token_ids", "generation.").get<std::vector<int64_t>>();
    if (!field(j, "decode_model", "").is_null())  // int8-int4: decode steps run decode.onnx
      throw LoadError("field decode_model: engines whose decode steps run a graph of their own (--precision "
                      "int8-int4) are served by the Python runtime only; export with another --precision");
    for (const char* list : {"inputs", "outputs"})
      for (const json& t : field(j, list, "")) m.io.insert(t.at("name").get<std::string>());
  } catch (const json::exception& e) {  // not JSON, or a field of the wrong type
    throw LoadError(show_dir(path) + " is unreadable: " + e.what());
  } catch (const LoadError& e) { throw LoadError(show_dir(path) + " is unreadable: " + e.what()); }
  if (!fs::is_regular_file(dir / "model.onnx")) throw LoadError(D + " is incomplete: model.onnx is missing");
  return m;
}

// ------------------------------------------------------------------------------------------ the graph's I/O

// The graph's I/O (runtime/artifact.py STEP_INPUTS, STEP_OUTPUTS, decode_io) for an in-place-decode engine.
inline std::set<std::string> expected_io(int64_t layers) {
  std::set<std::string> io{
      "input_ids",      "k_cache", "v_cache",  "sink_len",   "window_start", "write_pos", "chunk_width",
      "logits_to_keep", "logits",  "new_keys", "new_values", "decode_step",  "seqlens_k", "total_sequence_length"};
  for (int64_t l = 0; l < layers; ++l)
    for (const char* kind : {"key", "value"})
      for (const char* side : {"past_", "present_"}) io.insert(side + std::string(kind) + "_" + std::to_string(l));
  return io;
}

inline std::string py_list(const std::set<std::string>& names) {  // Python's repr of a sorted list of str
  std::string s = "[";
  for (const auto& n : names) s += (s.size() > 1 ? ", '" : "'") + n + "'";
  return s + "]";
}

}  // namespace mesa

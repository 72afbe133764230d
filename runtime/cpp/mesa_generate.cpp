// mesa_generate: the C++ counterpart of `python -m runtime.generate DIR --input-ids-file F.json` (token ids only).
//
//   mesa_generate DIR --input-ids-file F.json [--max-new-tokens K] [--save-logits PREFIX]
//                 [--greedy | --temperature X --top-k K --top-p P --seed S] [--stop-token ID ... | --ignore-eos]
//                 [--slots N] [--threads N] [--stream]
//
// F.json holds a list of token ids, or a list of lists (a batch, decoded together). Prints each row's generated
// ids as a JSON list, one line per row; timings go to stderr. --save-logits (one prompt) writes PREFIX.prefill.npy
// [L, vocab] and PREFIX.decode.npy [steps, vocab], row t being the logits of the step that consumed generated
// token t. --slots: sequences decoding at once (default: every row; rows beyond wait for a free slot).
// --stream also writes {"row": r, "token": t} lines to stderr as tokens are chosen. Bad input: one
// `error: ...` line on stderr and exit code 2.
#include <cerrno>
#include <cstdio>
#include <iostream>

#include "mesa_engine.hpp"

namespace {

constexpr int EXIT_BAD_INPUT = 2;
const char* USAGE =
    "usage: mesa_generate DIR --input-ids-file F.json [--max-new-tokens K] [--save-logits PREFIX]\n"
    "                     [--greedy | --temperature X --top-k K --top-p P --seed S]\n"
    "                     [--stop-token ID ... | --ignore-eos] [--slots N] [--threads N] [--stream]\n";

struct BadInput : std::runtime_error {  // what runtime/generate.py reports as ValueError / OSError
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string dir, ids_file, save_logits;
  int64_t max_new_tokens = 64, threads = 0;
  std::optional<int64_t> slots;
  bool greedy = false, ignore_eos = false, stream = false;
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k, seed;
  std::optional<std::vector<int64_t>> stop_tokens;
};

template <class T>
T number(const std::string& flag, const std::string& text) {  // argparse's type=int / type=float
  T value{};
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end || text.empty())
    throw BadInput("argument " + flag + ": invalid " + (std::is_integral_v<T> ? "int" : "float") + " value: '" + text +
                   "'");
  return value;
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw BadInput("argument " + flag + ": expected one argument");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") std::cout << USAGE, std::exit(0);
    else if (flag == "--input-ids-file") a.ids_file = value();
    else if (flag == "--max-new-tokens") a.max_new_tokens = number<int64_t>(flag, value());
    else if (flag == "--save-logits") a.save_logits = value();
    else if (flag == "--temperature") a.temperature = number<double>(flag, value());
    else if (flag == "--top-k") a.top_k = number<int64_t>(flag, value());
    else if (flag == "--top-p") a.top_p = number<double>(flag, value());
    else if (flag == "--seed") a.seed = number<int64_t>(flag, value());
    else if (flag == "--stop-token") a.stop_tokens.emplace().push_back(number<int64_t>(flag, value()));
    else if (flag == "--threads") a.threads = number<int64_t>(flag, value());
    else if (flag == "--slots") a.slots = number<int64_t>(flag, value());
    else if (flag == "--greedy") a.greedy = true;
    else if (flag == "--ignore-eos") a.ignore_eos = true;
    else if (flag == "--stream") a.stream = true;
    else if (flag.rfind("--", 0) == 0) throw BadInput("unrecognized arguments: " + flag);
    else positional.push_back(flag);
  }
  if (positional.size() != 1)
    throw BadInput(positional.empty() ? "the following arguments are required: DIR"
                                      : "unrecognized arguments: " + positional[1]);
  if (a.ids_file.empty()) throw BadInput("the following arguments are required: --input-ids-file");
  a.dir = positional[0];
  return a;
}

// runtime/generate.py read_ids: a JSON list of ids, or a list of such lists (a batch).
std::vector<std::vector<int64_t>> read_ids(const std::string& path, bool& batched) {
  std::ifstream f(path);
  if (!f) throw BadInput("[Errno " + std::to_string(errno) + "] " + std::strerror(errno) + ": '" + path + "'");
  mesa::json ids;
  try {
    ids = mesa::json::parse(f);
  } catch (const mesa::json::parse_error& e) { throw BadInput(path + " is not JSON: " + e.what()); }
  batched =
      ids.is_array() && !ids.empty() && std::all_of(ids.begin(), ids.end(), [](const auto& r) { return r.is_array(); });
  const mesa::json rows = batched ? ids : mesa::json::array({ids});
  std::vector<std::vector<int64_t>> out;
  for (const auto& r : rows) {
    if (!r.is_array()) throw BadInput(path + " must hold a JSON list of token ids (or a list of lists)");
    auto& row = out.emplace_back();
    for (const auto& t : r) {
      if (!t.is_number_integer() || (t.is_number_unsigned() && t.get<uint64_t>() > uint64_t(INT64_MAX)))
        throw BadInput(path + ": token ids must be " + (t.is_number_integer() ? "int64" : "integers") + ", got " +
                       t.dump());
      row.push_back(t.get<int64_t>());
    }
  }
  return out;
}

void report(const mesa::Generation& g) {  // runtime/generate.py report
  char line[256];
  int n = std::snprintf(line, sizeof line, "prefill %lld tokens in %.3f s (%.0f tok/s)", (long long)g.prompt_tokens,
                        g.prefill_seconds, double(g.prompt_tokens) / std::max(g.prefill_seconds, 1e-9));
  const size_t steps = g.tokens.size() - 1;
  if (steps)
    std::snprintf(line + n, sizeof line - size_t(n), "; decode %zu steps, %.2f ms/token", steps,
                  1e3 * g.decode_seconds / double(steps));
  std::cerr << line << "\n";
}

int run(int argc, char** argv) {
  const Args a = parse(argc, argv);
  bool batched = false;
  const auto prompts = read_ids(a.ids_file, batched);
  mesa::Options o;
  std::vector<std::string> chosen;
  if (a.temperature) o.sampling.temperature = *a.temperature, chosen.push_back("--temperature");
  if (a.top_k) o.sampling.top_k = *a.top_k, chosen.push_back("--top-k");
  if (a.top_p) o.sampling.top_p = *a.top_p, chosen.push_back("--top-p");
  if (a.seed) o.sampling.seed = *a.seed, chosen.push_back("--seed");
  if (a.greedy && !chosen.empty()) {
    std::string list;
    for (const auto& c : chosen) list += (list.empty() ? "" : ", ") + c;
    throw BadInput("--greedy cannot be combined with " + list);
  }
  if (!chosen.empty() && !a.temperature) o.sampling.temperature = 1.0;
  o.max_new_tokens = a.max_new_tokens;
  o.stop_tokens = a.ignore_eos ? std::optional<std::vector<int64_t>>(std::vector<int64_t>{}) : a.stop_tokens;
  o.return_logits = !a.save_logits.empty();

  mesa::Engine engine(a.dir, int(a.threads));
  if (o.return_logits && batched) throw BadInput("--save-logits takes one prompt, not a batch");
  mesa::KVCache cache = mesa::new_cache(engine, a.slots.value_or(int64_t(prompts.size())));
  mesa::OnToken on_token;
  if (a.stream)
    on_token = [](size_t row, int64_t t) {
      std::cerr << "{\"row\": " << row << ", \"token\": " << t << "}" << std::endl;
    };
  const auto results = mesa::generate(engine, cache, prompts, o, on_token);
  for (const auto& g : results) report(g);
  if (o.return_logits) {
    const auto& g = results[0];
    const int64_t V = engine.m.vocab_size;
    try {
      mesa::write_npy(a.save_logits + ".prefill.npy", g.prefill_logits.data(), int64_t(g.prefill_logits.size()) / V, V);
      mesa::write_npy(a.save_logits + ".decode.npy", g.decode_logits.data(), int64_t(g.decode_logits.size()) / V, V);
    } catch (const std::runtime_error& e) { throw BadInput(e.what()); }
  }
  for (const auto& g : results) std::cout << mesa::json(g.tokens).dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BadInput& e) { std::cerr << "error: " << e.what() << "\n"; } catch (const mesa::EngineError& e) {
    std::cerr << "error: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return EXIT_BAD_INPUT;
}

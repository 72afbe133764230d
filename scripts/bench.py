"""Prefill / decode / memory benchmark of benchmark model "M" against full attention and onnxruntime-genai.

    python scripts/bench.py                       # full sweep, results in bench_out/
    python scripts/bench.py --quick               # 1k and 2k only, one repeat: a smoke run (~3 min)
    python scripts/bench.py --lengths 4096,12288 --methods ours,ort-genai
    python scripts/bench.py --report-only         # redo the table and plot from bench_out/bench.json

Model "M" is a random-weight Llama written with save_pretrained (vocab 32000, hidden 1024, intermediate
2816, 12 layers, 16 heads, 4 KV heads, max_position_embeddings 4096) plus a WordLevel tokenizer (the
onnxruntime-genai model builder insists on one). Every method runs on the same weights:

| method | what runs | attention |
|---|---|---|
| ours | the exported engine (`export.py --method mesa --target ort-cpu`, Mesa defaults for T = 4096) on ONNX Runtime CPU | Mesa schedule |
| ours-portable | the same export with `--target portable` (the MesaAttention function as is; opt-in) | Mesa schedule |
| transformers-sdpa | `LlamaForCausalLM`, attn_implementation="sdpa", `logits_to_keep=1`, DynamicCache | full causal |
| reference-mesa | our PyTorch reference decoder (export/reference.TorchStep) walked by runtime.scheduler | Mesa schedule |
| ort-genai | onnxruntime-genai, its model builder run offline on the same folder, fp32 CPU, GroupQueryAttention, static KV cache (past_present_share_buffer) | full causal |

Each (method, length) point runs in a fresh process, so its peak RSS (VmHWM, read in the child) is its
own: weights + caches + activations. Prefill seconds are the median of up to --repeats prompts (fewer when
one prefill exceeds --repeat-budget seconds; the JSON records how many ran). Decode ms/token is the mean of
--decode-tokens greedy steps after a prefill of the point's length, at the lengths in --decode-at.

FLOPs counted (multiply-add = 2 FLOPs), for a prompt of L tokens:
    linear    = L * layers * 2 * (h*(H*d) + 2*h*(Hkv*d) + (H*d)*h + 3*h*I)     projections + SwiGLU MLP
    lm_head   = 2 * h * vocab                                               logits of the last token only
    attention = layers * 4 * H * d * P                                      QK^T and PV
where P counts (query, key) pairs a query actually sees: L(L+1)/2 for full causal attention and, for the
Mesa schedule (runtime.mesa.prefill_steps), sum over steps of q*(a + w - b) + q(q+1)/2. Achieved GFLOP/s =
FLOPs / prefill seconds, shown next to an ONNX Runtime MatMul (2048x1024 @ 1024x2816) timed in this run.
The ONNX genai model is built from a copy of config.json with max_position_embeddings = --max-len so its
RoPE table covers long prompts (same weights; full attention beyond 4k is what "origin" does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
FULL_LENGTHS = (1024, 2048, 4096, 6144, 8192, 12288)
QUICK_LENGTHS = (1024, 2048)
DECODE_AT = (2048, 8192, 12288)
MAX_LEN = 16448  # 16k prompt + 64 generated tokens
METHODS = ("ours", "ours-portable", "transformers-sdpa", "reference-mesa", "ort-genai")
DEFAULT_METHODS = ("ours", "transformers-sdpa", "reference-mesa", "ort-genai")
FULL_ATTENTION = ("transformers-sdpa", "ort-genai")
LABELS = {"ours": "ours (ORT CPU, Mesa)", "ours-portable": "ours, portable graph (Mesa)", "transformers-sdpa": "transformers sdpa (full)",
          "reference-mesa": "PyTorch reference (Mesa)", "ort-genai": "onnxruntime-genai (GQA, full)"}


# ------------------------------------------------------------------------------------ FLOPs

def attention_pairs(steps) -> int:
    """(query, key) pairs the queries of a plan see: a step's q queries each see a + (w - b) cached
    keys plus the new keys up to themselves."""
    return sum(s.q * (s.sink_len + s.write_pos - s.window_start) + s.q * (s.q + 1) // 2 for s in steps)


def prefill_flops(cfg: dict, length: int, schedule: str, params=None) -> dict:
    """FLOPs of one prefill of `length` tokens under `schedule` ("full" or "mesa"); see the module doc."""
    from runtime import mesa

    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // H
    linear = length * layers * 2 * (h * H * d + 2 * h * Hkv * d + H * d * h + 3 * h * inter)
    pairs = length * (length + 1) // 2 if schedule == "full" else attention_pairs(mesa.prefill_steps(length, params))
    attention = layers * 4 * H * d * pairs
    lm_head = 2 * h * cfg["vocab_size"]
    return {"linear": linear, "attention": attention, "lm_head": lm_head, "total": linear + attention + lm_head,
            "pairs": pairs}


# ------------------------------------------------------------------------------ calibration

def copy_gbs(mib: int = 1024, runs: int = 5) -> float:
    """Memory copy rate, GB/s = bytes copied / second (numpy copyto of a 1 GiB buffer, best of runs): the
    rate a decode step's weight and K/V reads are compared with."""
    import numpy as np

    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def ort_matmul_gflops(m: int = 2048, k: int = 1024, n: int = 2816, runs: int = 10) -> float:
    """An ONNX Runtime CPU MatMul [m, k] @ [k, n] (weights as an initializer), median of `runs`."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "mm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m, k), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"A": a})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"A": a})
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def torch_matmul_gflops(m: int = 2048, k: int = 1024, n: int = 2816, runs: int = 10) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------ preparation

def make_model_m(folder: Path) -> Path:
    """Model M with save_pretrained plus a WordLevel tokenizer; reused when present."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    import transformers

    from scripts.harness import make_word_tokenizer

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL_M)).save_pretrained(folder)
    make_word_tokenizer(folder, MODEL_M["vocab_size"])
    return folder


def export_ours(model: Path, out: Path, max_len: int, target: str) -> Path:
    if (out / "mesa.json").is_file():
        return out
    from export.api import export_engine

    log(f"exporting {out.name}: model {model}, max_len {max_len}, method mesa, target {target}")
    export_engine(model, out, max_len=max_len, method="mesa", target=target)
    return out


def build_genai(model: Path, work: Path, max_len: int) -> Path:
    """onnxruntime-genai's model builder, offline, on the same weights (fp32, CPU)."""
    out = work / "genai_M"
    if (out / "genai_config.json").is_file():
        return out
    src = work / "model_M_genai_src"
    src.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (src / f.name).exists():
            (src / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = max_len  # RoPE cache and max_length cover long prompts
    (src / "config.json").write_text(json.dumps(config, indent=1))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(work / "genai_cache")]
    log("building the onnxruntime-genai model: " + " ".join(cmd[1:]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return out


# ---------------------------------------------------------------------------------- workers
# Each runs in its own process: python scripts/bench.py --worker '{"method": ..., "length": ...}'

def _prompt(length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(length).integers(3, vocab, length, dtype=np.int64)


def _repeat(prefill_once, spec) -> list[float]:
    """Prefill timings: at least one, up to spec['repeats'] while the point stays within its budget."""
    times = [prefill_once()]
    while len(times) < spec["repeats"] and sum(times) + times[-1] <= spec["repeat_budget"]:
        times.append(prefill_once())
    return times


def worker_ours(spec) -> dict:
    from scripts.harness import Engine

    eng = Engine(spec["engine"])
    ids = _prompt(spec["length"], eng.manifest.vocab_size)
    loaded = _rss()
    n_dec = spec["decode_tokens"] if spec["decode"] else 0
    times = _repeat(lambda: eng.run(ids, 1).prefill_seconds, spec)
    out = {"prefill_s": times, "rss_after_load_mib": loaded, "api": eng.api,
           "target": eng.manifest.target, "passes": eng.manifest.passes}
    if n_dec:
        run = eng.run(ids, n_dec + 1)
        out["decode_s"] = run.decode_seconds
    return out


def worker_transformers(spec) -> dict:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(spec["model"], attn_implementation="sdpa",
                                                          dtype=torch.float32).eval()
    ids = torch.from_numpy(_prompt(spec["length"], model.config.vocab_size))[None]
    loaded = _rss()

    @torch.inference_mode()
    def prefill():
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t, out

    times = _repeat(lambda: prefill()[0], spec)
    out = {"prefill_s": times, "rss_after_load_mib": loaded, "threads": torch.get_num_threads()}
    if spec["decode"]:
        with torch.inference_mode():
            _, res = prefill()
            past, tok, dec = res.past_key_values, res.logits[:, -1:].argmax(-1), []
            for _ in range(spec["decode_tokens"]):
                t = time.perf_counter()
                res = model(input_ids=tok, past_key_values=past, use_cache=True, logits_to_keep=1)
                tok, past = res.logits[:, -1:].argmax(-1), res.past_key_values
                dec.append(time.perf_counter() - t)
        out["decode_s"] = dec
    return out


def worker_reference(spec) -> dict:
    import numpy as np
    import torch

    from export import loading, onnx_export
    from export.reference import TorchStep
    from runtime import mesa, scheduler
    from runtime.kv_cache import CacheShape, KVCache

    path = Path(spec["model"])
    config = loading.load_config(path)
    params = loading.default_params(config)
    L = spec["length"]
    lm = onnx_export.build_model(path, config, params, "mesa", L + spec["decode_tokens"] + 8, "fp32")
    step = TorchStep(lm.model)
    a = lm.model.args
    cache = KVCache(CacheShape(a.num_hidden_layers, a.num_key_value_heads, lm.max_len, a.head_dim))
    ids = _prompt(L, a.vocab_size)
    plan = mesa.prefill_steps(L, params)
    loaded = _rss()

    def prefill():
        t = time.perf_counter()
        logits, seq = scheduler.prefill(step, ids, plan, cache, all_logits=False)
        return time.perf_counter() - t, logits, seq

    times = _repeat(lambda: prefill()[0], spec)
    out = {"prefill_s": times, "rss_after_load_mib": loaded, "threads": torch.get_num_threads()}
    if spec["decode"]:
        _, logits, seq = prefill()
        tok, dec = int(np.argmax(logits[-1])), []
        for _ in range(spec["decode_tokens"]):
            t = time.perf_counter()
            row = scheduler.decode(step, tok, seq, cache)
            dec.append(time.perf_counter() - t)
            tok = int(np.argmax(row))
        out["decode_s"] = dec
    return out


def worker_genai(spec) -> dict:
    import gc

    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(spec["genai"])
    ids = _prompt(spec["length"], 32000).astype(np.int32)
    loaded = _rss()
    n_dec = spec["decode_tokens"] if spec["decode"] else 0

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n_dec + 2, do_sample=False)
        return og.Generator(model, params)

    def prefill():
        gen = generator()
        t = time.perf_counter()
        gen.append_tokens(ids)  # runs the prompt; logits of its last token are ready
        elapsed = time.perf_counter() - t
        del gen
        gc.collect()
        return elapsed

    times = _repeat(prefill, spec)
    out = {"prefill_s": times, "rss_after_load_mib": loaded, "genai_version": og.__version__}
    if n_dec:
        gen = generator()
        gen.append_tokens(ids)
        gen.generate_next_token()  # picks the first token from the prompt's logits (no model run)
        dec = []
        for _ in range(n_dec):
            t = time.perf_counter()
            gen.generate_next_token()  # runs the model on the previous token, then picks
            dec.append(time.perf_counter() - t)
        out["decode_s"] = dec
    return out


WORKERS = {"ours": worker_ours, "ours-portable": worker_ours, "transformers-sdpa": worker_transformers, "reference-mesa": worker_reference,
           "ort-genai": worker_genai}


def _rss() -> float:
    from scripts.harness import peak_rss_mib

    return peak_rss_mib()


def run_worker(spec: dict) -> dict:
    res = WORKERS[spec["method"]](spec)
    res["peak_rss_mib"] = _rss()
    return res


# ------------------------------------------------------------------------------- the sweep

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spawn(spec: dict, timeout: float) -> dict:
    """One point in a fresh process; its last stdout line is the JSON result."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "loadavg_before": load}
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": f"{why}: {' | '.join(tail)}", "loadavg_before": load, "wall_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(loadavg_before=load, wall_s=wall)
    return res


def summarise(point: dict) -> dict:
    """Medians and rates of one point, from its raw timings."""
    if "prefill_s" not in point:
        return point
    point["prefill_median_s"] = statistics.median(point["prefill_s"])
    point["repeats"] = len(point["prefill_s"])
    if point.get("decode_s"):
        point["decode_ms_per_token"] = 1e3 * statistics.mean(point["decode_s"])
    point["gflops"] = point["flops"]["total"] / point["prefill_median_s"] / 1e9
    return point


def method_table(args, work: Path) -> dict[str, dict]:
    """method name -> how to run it (paths), preparing models and engines that are missing."""
    model = make_model_m(work / "model_M")
    table: dict[str, dict] = {}
    wanted = args.methods
    if "ours" in wanted:
        table["ours"] = {"engine": str(export_ours(model, work / "engine_M_mesa", args.max_len, "ort-cpu"))}
    if "ours-portable" in wanted:
        table["ours-portable"] = {"engine": str(export_ours(model, work / "engine_M_mesa_portable", args.max_len,
                                                            "portable"))}
    if "transformers-sdpa" in wanted:
        table["transformers-sdpa"] = {"model": str(model)}
    if "reference-mesa" in wanted:
        table["reference-mesa"] = {"model": str(model)}
    if "ort-genai" in wanted:
        try:
            table["ort-genai"] = {"genai": str(build_genai(model, work, args.max_len))}
        except (ImportError, subprocess.CalledProcessError) as e:
            log(f"onnxruntime-genai unavailable ({e}); pip install -e '.[bench]'")
    return table


def sweep(args) -> dict:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    from export import loading

    table = method_table(args, work)
    config = loading.load_config(work / "model_M")
    params = loading.default_params(config)
    log(f"Mesa parameters: {params.as_dict()}")
    cal = {"ort_matmul_gflops": [ort_matmul_gflops()], "torch_matmul_gflops": [torch_matmul_gflops()],
           "copy_gbs": [copy_gbs()]}
    log(f"ONNX Runtime MatMul {cal['ort_matmul_gflops'][0]:.1f} GFLOP/s, torch {cal['torch_matmul_gflops'][0]:.1f}")
    results = {"machine": machine(), "model": MODEL_M, "mesa_params": params.as_dict(), "max_len": args.max_len,
               "settings": {k: getattr(args, k) for k in ("lengths", "repeats", "repeat_budget", "decode_at",
                                                          "decode_tokens")},
               "calibration": cal, "points": []}
    out_json = work / "bench.json"
    t0 = time.perf_counter()
    for length in args.lengths:
        for method, paths in table.items():
            schedule = "full" if method in FULL_ATTENTION else "mesa"
            spec = {"method": method, "length": length, "repeats": args.repeats,
                    "repeat_budget": args.repeat_budget, "decode": length in args.decode_at,
                    "decode_tokens": args.decode_tokens, **paths}
            log(f"{method} at {length} tokens ...")
            point = spawn(spec, args.timeout)
            point.update(method=method, length=length, schedule=schedule,
                         flops=prefill_flops(MODEL_M, length, schedule, params))
            point = summarise(point)
            if "error" in point:
                log(f"  {method} {length}: {point['error']}")
            else:
                dec = f", decode {point['decode_ms_per_token']:.1f} ms/token" if "decode_ms_per_token" in point else ""
                log(f"  {method} {length}: prefill {point['prefill_median_s']:.2f} s (x{point['repeats']}), "
                    f"peak RSS {point['peak_rss_mib']:.0f} MiB{dec}")
            results["points"].append(point)
            out_json.write_text(json.dumps(results, indent=1))
    cal["ort_matmul_gflops"].append(ort_matmul_gflops())
    cal["torch_matmul_gflops"].append(torch_matmul_gflops())
    cal["copy_gbs"].append(copy_gbs())
    results["wall_s"] = time.perf_counter() - t0
    out_json.write_text(json.dumps(results, indent=1))
    return results


def machine() -> dict:
    import numpy
    import onnxruntime
    import torch
    import transformers

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime_genai

        info["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------- report

def _points(results) -> dict[tuple[str, int], dict]:
    return {(p["method"], p["length"]): p for p in results["points"]}


def targets(results) -> list[dict]:
    """The DESIGN.md targets for `ours` at the longest length measured (12k when present)."""
    pts = _points(results)
    ok = lambda p: p is not None and "error" not in p  # noqa: E731
    lengths = sorted({p["length"] for p in results["points"] if ok(p) and p["method"] == "ours"})
    if not lengths:
        return []
    L = 12288 if 12288 in lengths else lengths[-1]
    ours = pts.get(("ours", L))
    rows = []

    def row(name, value, goal, met, detail):
        rows.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

    for other in FULL_ATTENTION:
        p = pts.get((other, L))
        if ok(p):
            s = p["prefill_median_s"] / ours["prefill_median_s"]
            row(f"prefill speed-up over {other} at {L}", f"{s:.2f}x", ">= 1.5x", s >= 1.5,
                f"{ours['prefill_median_s']:.1f} s vs {p['prefill_median_s']:.1f} s")
    p = pts.get(("transformers-sdpa", L))
    if ok(p):
        r = ours["peak_rss_mib"] / p["peak_rss_mib"]
        row(f"peak RSS vs transformers-sdpa at {L}", f"{r:.2f}x", "<= 1.0x", r <= 1.0,
            f"{ours['peak_rss_mib']:.0f} MiB vs {p['peak_rss_mib']:.0f} MiB")
    half = pts.get(("ours", L // 2))
    if ok(half):
        r = ours["prefill_median_s"] / half["prefill_median_s"]
        row(f"time({L}) / time({L // 2})", f"{r:.2f}", "<= 2.2", r <= 2.2,
            f"{ours['prefill_median_s']:.1f} s / {half['prefill_median_s']:.1f} s")
    decoded = sorted(d for d in results["settings"]["decode_at"] if ok(pts.get(("ours", d)))
                     and "decode_ms_per_token" in pts[("ours", d)])
    if not decoded:
        return rows
    dl, ds = decoded[-1], decoded[0]
    a = pts[("ours", dl)]["decode_ms_per_token"]
    for other, goal in (("transformers-sdpa", 0.6), ("ort-genai", 0.5)):
        g = pts.get((other, dl))
        if ok(g) and "decode_ms_per_token" in g:
            b = g["decode_ms_per_token"]
            row(f"decode ms/token at {dl} context vs {other}", f"{a / b:.2f}x", f"<= {goal}x", a <= goal * b,
                f"{a:.1f} ms vs {b:.1f} ms")
    if ds != dl:
        r = a / pts[("ours", ds)]["decode_ms_per_token"]
        row(f"decode({dl}) / decode({ds})", f"{r:.2f}", "<= 1.4", r <= 1.4,
            f"{a:.1f} ms / {pts[('ours', ds)]['decode_ms_per_token']:.1f} ms (bytes read: "
            f"{decode_bytes(results['model'], dl) / decode_bytes(results['model'], ds):.2f}x)")
    rate = results["calibration"].get("copy_gbs")
    if rate:
        limit = decode_bytes(results["model"], dl) / (min(rate) * 1e9) * 1e3
        row(f"decode at {dl} vs the bytes-read limit", f"{a / limit:.2f}x", "<= 1.5x", a <= 1.5 * limit,
            f"{a:.1f} ms vs {limit:.1f} ms = {decode_bytes(results['model'], dl) / 1e6:.0f} MB at {min(rate):.1f} GB/s "
            f"(achieved {decode_bytes(results['model'], dl) / a / 1e6:.1f} GB/s)")
    return rows


def decode_bytes(cfg: dict, context: int) -> int:
    """Bytes a decode step must read (fp32): every weight once, and the K/V of `context` keys."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // H
    weights = layers * (h * H * d + 2 * h * Hkv * d + H * d * h + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    return 4 * (weights + layers * 2 * Hkv * d * context)


def markdown(results) -> str:
    pts = _points(results)
    methods = list(dict.fromkeys(p["method"] for p in results["points"]))
    lengths = sorted({p["length"] for p in results["points"]})
    cal = results["calibration"]
    m = results["machine"]

    def cell(method, L, key, fmt):
        p = pts.get((method, L))
        if p is None:
            return ""
        if "error" in p:
            return "fails" if "memory" in p["error"] else "—"
        return fmt.format(p[key]) if key in p else ""

    def table(title, key, fmt, only=None):
        cols = [L for L in lengths if only is None or L in only]
        lines = [f"**{title}**", "", "| method | " + " | ".join(f"{L}" for L in cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        for meth in methods:
            lines.append(f"| {LABELS.get(meth, meth)} | " + " | ".join(cell(meth, L, key, fmt) for L in cols) + " |")
        return "\n".join(lines) + "\n"

    out = [
        f"# Benchmark: model M, {m['cpu']}, {m['cores']} cores",
        "",
        f"onnxruntime {m['onnxruntime']}, onnxruntime-genai {m.get('onnxruntime_genai', 'n/a')}, torch {m['torch']}, "
        f"transformers {m['transformers']}. Random weights; Mesa parameters {results['mesa_params']}; "
        f"engine max_len {results['max_len']}. Same-run ONNX Runtime MatMul (2048x1024 @ 1024x2816): "
        + ", ".join(f"{x:.1f}" for x in cal["ort_matmul_gflops"]) + " GFLOP/s (start, end); torch matmul "
        + ", ".join(f"{x:.1f}" for x in cal["torch_matmul_gflops"]) + " GFLOP/s; memory copy "
        + ", ".join(f"{x:.1f}" for x in cal.get("copy_gbs", [])) + " GB/s.",
        "",
        table("Prefill seconds (median)", "prefill_median_s", "{:.2f}"),
        table("Peak RSS, MiB (fresh process per point)", "peak_rss_mib", "{:.0f}"),
        table("Decode ms/token", "decode_ms_per_token", "{:.1f}", set(results["settings"]["decode_at"])),
        table("Achieved GFLOP/s (counted FLOPs / prefill seconds)", "gflops", "{:.1f}"),
        "**Counted prefill FLOPs (TFLOP): full causal vs Mesa schedule**", "",
        "| length | full causal | Mesa | ratio |", "|---:|---:|---:|---:|",
    ]
    from runtime import mesa

    params = mesa.MesaParams(**results["mesa_params"])
    for L in lengths:
        f, me = prefill_flops(results["model"], L, "full"), prefill_flops(results["model"], L, "mesa", params)
        out.append(f"| {L} | {f['total'] / 1e12:.2f} | {me['total'] / 1e12:.2f} | {f['total'] / me['total']:.2f} |")
    out += ["", "**Targets (DESIGN.md, for `ours`)**", "", "| target | value | goal | met | measured |",
            "|---|---:|---:|:---:|---|"]
    for r in targets(results):
        out.append(f"| {r['target']} | {r['value']} | {r['goal']} | {'yes' if r['met'] else 'no'} | {r['detail']} |")
    for extra in results.get("extra_runs", []):
        out += ["", f"Points at {', '.join(map(str, extra['lengths']))} come from a second run right after this one "
                f"(ONNX Runtime MatMul " + ", ".join(f"{x:.1f}" for x in extra["calibration"]["ort_matmul_gflops"])
                + " GFLOP/s)."]
    reps = {p["repeats"] for p in results["points"] if "repeats" in p}
    errors = [f"- {p['method']} at {p['length']}: {p['error']}" for p in results["points"] if "error" in p]
    out += ["", f"Repeats per point: {min(reps) if reps else 0}-{max(reps) if reps else 0} (fewer when one prefill "
            f"exceeds the repeat budget of {results['settings']['repeat_budget']} s). Whole run: "
            f"{results.get('wall_s', 0) / 60:.1f} min."]
    if errors:
        out += ["", "Points that did not run:", *errors]
    return "\n".join(out) + "\n"


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m, ax_d) = plt.subplots(1, 3, figsize=(17, 4.8))
    methods = list(dict.fromkeys(p["method"] for p in results["points"]))
    for meth in methods:
        pts = sorted((p for p in results["points"] if p["method"] == meth and "error" not in p),
                     key=lambda p: p["length"])
        if not pts:
            continue
        xs = [p["length"] for p in pts]
        ax_t.plot(xs, [p["prefill_median_s"] for p in pts], "o-", label=LABELS.get(meth, meth))
        ax_m.plot(xs, [p["peak_rss_mib"] / 1024 for p in pts], "o-", label=LABELS.get(meth, meth))
        dec = [p for p in pts if "decode_ms_per_token" in p]
        if dec:
            ax_d.plot([p["length"] for p in dec], [p["decode_ms_per_token"] for p in dec], "o-",
                      label=LABELS.get(meth, meth))
    lengths = sorted({p["length"] for p in results["points"]})
    for ax, title, ylabel in ((ax_t, "Prefill time", "seconds"), (ax_m, "Peak RSS (fresh process)", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        subs = (1.0, 2.0, 5.0) if ax is ax_t else (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(lengths, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_d.set_xscale("log", base=2)
    decode_at = sorted(results["settings"]["decode_at"])
    ax_d.set_xticks(decode_at, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in decode_at])
    ax_d.set_ylim(bottom=0)
    ax_d.set_xlabel("context (tokens)")
    ax_d.set_ylabel("ms per generated token")
    ax_d.set_title("Decode")
    ax_d.grid(True, alpha=0.3)
    m = results["machine"]
    fig.suptitle(f"Model M (12 x 1024, random weights), fp32, {m['cpu']} ({m['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results, out: Path) -> None:
    (out / "bench.md").write_text(markdown(results))
    plot(results, out / "bench.png")
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


# -------------------------------------------------------------------------------------- CLI

def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench_out"), help="work and results folder (default bench_out/)")
    p.add_argument("--lengths", type=ints, default=None,
                   help=f"prompt lengths, comma separated (default {','.join(map(str, FULL_LENGTHS))}; "
                        "add 16384 for the 16k points, ~10 more minutes here)")
    p.add_argument("--quick", action="store_true", help="lengths 1024,2048, one repeat, decode at 2048")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(DEFAULT_METHODS),
                   help=f"comma separated subset of {','.join(METHODS)} (default: all but ours-portable)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per point (median)")
    p.add_argument("--repeat-budget", type=float, default=30.0,
                   help="stop repeating a point once another prefill would take it past this many seconds")
    p.add_argument("--decode-at", type=ints, default=list(DECODE_AT), help="lengths where decode is timed")
    p.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per decode point")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="max_len of the exported engines")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a point is abandoned")
    p.add_argument("--report-only", action="store_true", help="rewrite bench.md and bench.png from bench.json")
    p.add_argument("--merge", metavar="JSON", help="with --report-only: add the points of another run's bench.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "bench.json").read_text())
        if args.merge:
            other = json.loads(Path(args.merge).read_text())
            lengths = sorted({p["length"] for p in other["points"]})
            results["points"] = [p for p in results["points"] if p["length"] not in lengths] + other["points"]
            results.setdefault("extra_runs", []).append({"lengths": lengths, "calibration": other["calibration"],
                                                         "wall_s": other.get("wall_s")})
            results["settings"]["lengths"] = sorted({p["length"] for p in results["points"]})
            (out / "bench.json").write_text(json.dumps(results, indent=1))
        write_report(results, out)
        return 0
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        args.repeats, args.decode_at = 1, [2048]
    args.lengths = sorted(args.lengths or FULL_LENGTHS)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        print(f"error: unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    results = sweep(args)
    write_report(results, out)
    print((out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's workers: one (method, length) point each, run in a fresh process so its peak RSS
(VmHWM) is its own:

    python -m scripts.bench_workers '{"method": "ours", "length": 2048, ...}'   # prints one JSON line

| method | what runs | attention |
|---|---|---|
| ours | the exported engine (`export_engine(..., method="mesa", target="ort-cpu")`, Mesa defaults for T = 4096) on ONNX Runtime CPU | Mesa schedule |
| ours-grouped | the same export with `decode_kernel="grouped"` (decode steps on the Mesa CPU kernel, runtime/ops) | Mesa schedule |
| ours-kernels | the same export with both Mesa CPU kernels: `decode_kernel="grouped"`, `prefill_kernel="tiled"` | Mesa schedule |
| ours-portable | the same export with target "portable" (the MesaAttention function as is; opt-in) | Mesa schedule |
| transformers-sdpa | `LlamaForCausalLM`, attn_implementation="sdpa", `logits_to_keep=1`, DynamicCache | full causal |
| reference-mesa | our PyTorch reference decoder (export/reference.TorchStep) walked by runtime.scheduler | Mesa schedule |
| ort-genai | onnxruntime-genai, its model builder run offline on the same folder, fp32 CPU, GroupQueryAttention, static KV cache (past_present_share_buffer) | full causal |

The onnxruntime-genai model is built from a copy of config.json with max_position_embeddings = max_len
so its RoPE table covers long prompts (same weights; full attention beyond 4k is what "origin" does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Our engines with the Mesa CPU kernels: bench.py's method -> export options; folders are named by kernel_suffix
KERNEL_METHODS = {"ours-grouped": {"decode_kernel": "grouped"},
                  "ours-kernels": {"decode_kernel": "grouped", "prefill_kernel": "tiled"}}


def kernel_suffix(decode_kernel: str = "gqa", prefill_kernel: str = "gqa") -> str:
    """The engine-folder suffix of a kernel choice, one rule for every script so they reuse each other's engines."""
    named = {("gqa", "gqa"): "", ("grouped", "gqa"): "_grouped", ("grouped", "tiled"): "_kernels"}
    return named.get((decode_kernel, prefill_kernel), f"_{decode_kernel}_{prefill_kernel}")


def export_ours(model: Path, out: Path, max_len: int, target: str, precision: str | None = None,
                decode_kernel: str = "gqa", prefill_kernel: str = "gqa", int4_block_size: int | None = None) -> Path:
    """The engine in `out`, exported unless a readable one of this runtime's format is there already."""
    from export.api import export_engine
    from runtime.artifact import ArtifactError, load_manifest

    if (out / "mesa.json").is_file():
        try:
            load_manifest(out)
            return out
        except ArtifactError as e:
            log(f"re-exporting {out.name}: {e}")

    log(f"exporting {out.name}: model {model}, max_len {max_len}, method mesa, target {target}, "
        f"precision {precision or 'default'}, decode kernel {decode_kernel}, prefill kernel {prefill_kernel}"
        + (f", int4 blocks of {int4_block_size}" if int4_block_size else ""))
    export_engine(model, out, max_len=max_len, method="mesa", target=target, precision=precision, force=True,
                  decode_kernel=decode_kernel, prefill_kernel=prefill_kernel, int4_block_size=int4_block_size)
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
    out = {"prefill_s": times, "rss_after_load_mib": loaded, "api": "runtime.engine.MesaEngine",
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
    from runtime.kv_cache import KVCache

    path = Path(spec["model"])
    config = loading.load_config(path)
    params = mesa.default_params(config.max_position_embeddings)
    L = spec["length"]
    lm = onnx_export.build_model(path, config, params, "mesa", L + spec["decode_tokens"] + 8, "fp32")
    step = TorchStep(lm.model)
    a = lm.model.args
    cache = KVCache(lm.cache_shape)
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


WORKERS = {"ours": worker_ours, "ours-grouped": worker_ours, "ours-kernels": worker_ours, "ours-portable": worker_ours, "transformers-sdpa": worker_transformers, "reference-mesa": worker_reference,
           "ort-genai": worker_genai}


def _rss() -> float:
    from scripts.harness import peak_rss_mib

    return peak_rss_mib()


def run_worker(spec: dict) -> dict:
    res = WORKERS[spec["method"]](spec)
    res["peak_rss_mib"] = _rss()
    return res


if __name__ == "__main__":
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))

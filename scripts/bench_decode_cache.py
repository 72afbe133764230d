"""Decode cost at a fixed context must not grow with max_len: no step copies the whole KV cache.

Exports one small random Llama at max_len 4096 and 16384, prefills 2048 tokens by the Mesa plan,
then times decode steps at context 2048 (each repeat rewrites the same position, so the context stays
fixed) on both cache paths of runtime/backends.py, run here on CPU:

- ort-cpu: numpy cache, `session.run` (what the ort-cpu backend serves);
- IO binding + TensorScatter: the ort-cuda/tensorrt code path (cache as OrtValues, new rows written in
  place), run on CPUExecutionProvider.

For scale it also times what copying both caches once per step would add.

    python scripts/bench_decode_cache.py [--context 2048] [--steps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_LENS = (4096, 16384)
MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_checkpoint(directory: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).save_pretrained(directory)
    return directory


def export(checkpoint: Path, out: Path, max_len: int) -> Path:
    from export.cli import main

    if main(["--model", str(checkpoint), "--max-len", str(max_len), "--out", str(out), "--no-verify"]) != 0:
        raise SystemExit(f"export at max_len {max_len} failed")
    return out


def prefilled(step_fn, manifest, context: int):
    """A cache holding `context` prompt tokens, and the decode Sequence after them."""
    from runtime import mesa, scheduler
    from runtime.backends import CACHE_DTYPES
    from runtime.kv_cache import CacheShape

    shape = CacheShape(manifest.num_hidden_layers, manifest.num_key_value_heads, manifest.max_len, manifest.head_dim)
    cache = step_fn.new_cache(shape, CACHE_DTYPES[manifest.dtype])
    ids = np.random.default_rng(0).integers(0, manifest.vocab_size, context)
    _, seq = scheduler.prefill(step_fn, ids, mesa.prefill_steps(context, manifest.mesa_params), cache,
                               all_logits=False)
    return cache, seq


def decode_ms(step_fn, cache, seq, steps: int) -> list[float]:
    from runtime import scheduler

    context, times = seq.length, []
    for i in range(steps):
        seq.length = context  # same position every time: the context stays fixed
        start = time.perf_counter()
        scheduler.decode(step_fn, 7 + i % 50, seq, cache)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def copy_ms(manifest, steps: int) -> list[float]:
    shape = (manifest.num_hidden_layers, 1, manifest.num_key_value_heads, manifest.max_len, manifest.head_dim)
    src, dst = np.ones(shape, np.float32), np.empty(shape, np.float32)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        np.copyto(dst, src)
        np.copyto(dst, src)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=100, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds, alternating the engines")
    args = p.parse_args()

    import onnxruntime as ort

    from runtime.artifact import MODEL_FILE, load_manifest
    from runtime.backends import OrtDeviceStep, OrtStep

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "checkpoint")
        runs, manifests = {}, {}
        for max_len in MAX_LENS:
            engine = export(checkpoint, tmp / f"engine-{max_len}", max_len)
            manifests[max_len] = load_manifest(engine)
            session = ort.InferenceSession(str(engine / MODEL_FILE), providers=["CPUExecutionProvider"])
            for path, step_fn in (("ort-cpu (numpy cache, session.run)", OrtStep(session)),
                                  ("IO binding + TensorScatter (GPU path, on CPU)", OrtDeviceStep(session, "cpu"))):
                runs[path, max_len] = (step_fn, *prefilled(step_fn, manifests[max_len], args.context))

        copying = "copying both caches once (for scale)"
        times: dict = {key: [] for key in [*runs, *((copying, n) for n in MAX_LENS)]}
        for _ in range(args.rounds):
            for key, run in runs.items():
                times[key] += decode_ms(*run, args.steps)
            for n in MAX_LENS:
                times[copying, n] += copy_ms(manifests[n], args.steps)

    m = MODEL
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    mib = [2 * m["num_hidden_layers"] * m["num_key_value_heads"] * n * head_dim * 4 / 2**20 for n in MAX_LENS]
    print(f"\ndecode ms/token at context {args.context}, median of {args.rounds} x {args.steps} steps; model: "
          f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_key_value_heads']} kv heads x "
          f"{head_dim}, fp32, export target {manifests[MAX_LENS[0]].target}; cache K+V = "
          + ", ".join(f"{v:.0f} MiB at {n}" for v, n in zip(mib, MAX_LENS)))
    head = f"{'path':48s}" + "".join(f"{'max_len ' + str(n):>15s}" for n in MAX_LENS) + f"{'ratio':>8s}"
    print(head)
    print("-" * len(head))
    for path in dict.fromkeys(k[0] for k in times):
        med = [statistics.median(times[path, n]) for n in MAX_LENS]
        print(f"{path:48s}" + "".join(f"{v:15.3f}" for v in med) + f"{med[-1] / med[0]:8.2f}")


if __name__ == "__main__":
    main()

"""The prefill attention kernels side by side on one layer's chunk: ORT's GroupQueryAttention and the Mesa
CPU kernel (ai.mesa.cpu::TiledPrefillAttention, runtime/ops/prefill_attention.cpp).

    python scripts/bench_prefill_kernel.py [--shapes 512x3584,3896x4196,3996x100,4396x7892] [--runs 5]

Each shape is a chunk of s queries over P past keys (model M's heads: 16 query heads, 4 KV heads, head size
64), the call a Mesa prefill step makes per layer. Both kernels get the same random inputs in one process
and run in turn (gqa, tiled, gqa, ...); a figure is the median run. GFLOP/s counts QK^T and PV:
4 * heads * d * (s * P + s (s + 1) / 2). Needs the library (bash scripts/build_cpp.sh). Prints a markdown
table; --out writes it with the JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_limits import machine  # noqa: E402
from scripts.harness import one_node_session  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 64  # model M


def session(op: str, domain: str, s: int, P: int):
    from onnx import TensorProto

    f = TensorProto.FLOAT
    inputs = [("query", f, [1, s, HEADS * HEAD_DIM]), ("key", f, [1, s, KV_HEADS * HEAD_DIM]),
              ("value", f, [1, s, KV_HEADS * HEAD_DIM]), ("past_key", f, [1, KV_HEADS, P, HEAD_DIM]),
              ("past_value", f, [1, KV_HEADS, P, HEAD_DIM]), ("seqlens_k", TensorProto.INT32, [1]),
              ("total", TensorProto.INT32, [])]
    outputs = [("out", f, [1, s, HEADS * HEAD_DIM])]
    if domain == "com.microsoft":
        outputs += [("present_key", f, None), ("present_value", f, None)]
    return one_node_session(op, domain, inputs, outputs, num_heads=HEADS, kv_num_heads=KV_HEADS)


def measure(s: int, P: int, runs: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {"query": rng.standard_normal((1, s, HEADS * HEAD_DIM), np.float32),
             "key": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM), np.float32),
             "value": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM), np.float32),
             "past_key": rng.standard_normal((1, KV_HEADS, P, HEAD_DIM), np.float32),
             "past_value": rng.standard_normal((1, KV_HEADS, P, HEAD_DIM), np.float32),
             "seqlens_k": np.array([P + s - 1], np.int32), "total": np.array(P + s, np.int32)}
    kernels = {"gqa": session("GroupQueryAttention", "com.microsoft", s, P),
               "tiled": session("TiledPrefillAttention", "ai.mesa.cpu", s, P)}
    outs = {k: sess.run(["out"], feeds)[0] for k, sess in kernels.items()}  # warm-up, and the agreement
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(runs):
        for k, sess in kernels.items():
            t = time.perf_counter()
            sess.run(["out"], feeds)
            times[k].append(time.perf_counter() - t)
    flops = 4 * HEADS * HEAD_DIM * (s * P + s * (s + 1) / 2)
    row = {"s": s, "past": P, "max_abs_diff": float(np.abs(outs["gqa"] - outs["tiled"]).max())}
    for k, ts in times.items():
        row[f"{k}_ms"] = 1e3 * statistics.median(ts)
        row[f"{k}_gflops"] = flops / statistics.median(ts) / 1e9
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"One layer's prefill attention, model M's heads ({HEADS} / {KV_HEADS}, d {HEAD_DIM}), {m['cpu']}, "
             f"{m['cores']} cores; median of {result['runs']} interleaved runs.", "",
             "| chunk s | past keys P | gqa ms | tiled ms | gqa GFLOP/s | tiled GFLOP/s | tiled vs gqa | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['s']} | {r['past']} | {r['gqa_ms']:.1f} | {r['tiled_ms']:.1f} | {r['gqa_gflops']:.0f} | "
                     f"{r['tiled_gflops']:.0f} | {r['gqa_ms'] / r['tiled_ms']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def shapes(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are SxP pairs separated by commas, got {text!r}") from None
    if any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in pairs):
        raise argparse.ArgumentTypeError(f"shapes are SxP pairs with s >= 1 and P >= 0, got {text!r}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench_prefill_kernel.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=shapes, default=shapes("512x3584,3896x4196,3996x100,4396x7892"),
                   help="chunk x past keys, comma separated")
    p.add_argument("--runs", type=int, default=5, help="runs per kernel and shape")
    p.add_argument("--out", default=None, help="folder for prefill_kernel.md / .json")
    args = p.parse_args(argv)
    from runtime import custom_ops

    if custom_ops.library() is None:
        print("error: the Mesa CPU kernels are not built: bash scripts/build_cpp.sh", file=sys.stderr)
        return 2
    result = {"machine": machine(), "runs": args.runs, "rows": [measure(s, P, args.runs) for s, P in args.shapes]}
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill_kernel.md").write_text(text)
        (out / "prefill_kernel.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

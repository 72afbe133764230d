"""The two decode kernels side by side: ms per decode step of one sequence against context (model M, ORT CPU).

    python scripts/bench_decode_kernel.py [--contexts 2048,8192,12288,16384] [--steps 48] [--out DIR]

Model M exported twice for the ort-cpu target (scripts/bench.py's engines in --work): `--decode-kernel gqa`
(ONNX Runtime's GroupQueryAttention, which reads each KV head once per query head) and `--decode-kernel
grouped` (the Mesa CPU kernel, runtime/ops/decode_attention.cpp: once per step). Both are loaded in one
process; at each context each gets the same prompt, then the two sequences take decode steps in turn
(gqa, grouped, gqa, ...) so they share the machine's state step by step (ORT's thread spinning off, or one
session's idle threads would slow the other); a figure is the median step.
The limit: the bytes a step must read (scripts/bench_model.decode_bytes: weights + the context's K/V)
at the copy rate measured in the same run. Then the kernels alone: each as one ONNX node over 12 layers'
caches of model M's shape at each context (the new row written in place, as the engine binds them), the
12 calls of a step timed together, alternating; GB/s = the K/V bytes of the step / its median time.
Writes decode_kernel.json, .md and .png into --out.
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

from scripts.bench import ints  # noqa: E402
from scripts.bench_limits import copy_gbs, machine  # noqa: E402
from scripts.bench_model import MAX_LEN, MODEL_M, decode_bytes, make_model_m  # noqa: E402
from scripts.bench_workers import export_ours, log  # noqa: E402
from scripts.harness import one_node_session  # noqa: E402

KERNELS = ("gqa", "grouped")


def measure(engines: dict, context: int, steps: int) -> dict:
    ids = np.random.default_rng(context).integers(3, MODEL_M["vocab_size"], context).tolist()
    seqs = {k: e.sequence(ids) for k, e in engines.items()}
    try:
        for seq in seqs.values():
            seq.step()  # the prefill
        times = {k: [] for k in engines}
        for i in range(steps):
            for kernel, seq in seqs.items():
                seq.append([int(ids[i])])
                t = time.perf_counter()
                seq.step()
                times[kernel].append(time.perf_counter() - t)
    finally:
        for seq in seqs.values():
            seq.cancel()
    return {"context": context, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
            "steps": steps}


def kernel_session(kernel: str):
    """One decode-attention node of model M's shape over a cache of MAX_LEN slots, either kernel."""
    from onnx import TensorProto

    from runtime import custom_ops

    H, Hkv = MODEL_M["num_attention_heads"], MODEL_M["num_key_value_heads"]
    d, f = MODEL_M["hidden_size"] // H, TensorProto.FLOAT
    inputs = [("query", f, [1, 1, H * d]), ("key", f, [1, 1, Hkv * d]), ("value", f, [1, 1, Hkv * d]),
              ("past_key", f, [1, Hkv, MAX_LEN, d]), ("past_value", f, [1, Hkv, MAX_LEN, d]),
              ("seqlens_k", TensorProto.INT32, [1]), ("total", TensorProto.INT32, []),
              ("cos", f, [MAX_LEN, d // 2]), ("sin", f, [MAX_LEN, d // 2])]
    outputs = [("out", f, None), ("present_key", f, None), ("present_value", f, None)]
    op, domain = ("GroupQueryAttention", "com.microsoft") if kernel == "gqa" else \
        ("GroupedDecodeAttention", custom_ops.DOMAIN)
    return one_node_session(op, domain, inputs, outputs, num_heads=H, kv_num_heads=Hkv, do_rotary=1,
                            rotary_interleaved=0)


def measure_alone(context: int, runs: int) -> dict:
    """ms per step of each kernel alone: 12 calls, one per layer cache, the new row written in place."""
    import onnxruntime as ort

    layers, H = MODEL_M["num_hidden_layers"], MODEL_M["num_attention_heads"]
    Hkv, d = MODEL_M["num_key_value_heads"], MODEL_M["hidden_size"] // H
    rng = np.random.default_rng(context)
    table = rng.uniform(-1, 1, (MAX_LEN, d // 2)).astype(np.float32)  # any cos / sin: the time is the same
    feeds = {"query": rng.standard_normal((1, 1, H * d), np.float32),
             "key": rng.standard_normal((1, 1, Hkv * d), np.float32),
             "value": rng.standard_normal((1, 1, Hkv * d), np.float32),
             "seqlens_k": np.array([context - 1], np.int32), "total": np.array(context, np.int32),
             "cos": table, "sin": table}
    steps = {}
    for kernel in KERNELS:
        session, bindings = kernel_session(kernel), []
        for _ in range(layers):
            b = session.io_binding()
            for name, value in feeds.items():
                b.bind_cpu_input(name, value)
            for name in ("key", "value"):
                cache = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, Hkv, MAX_LEN, d), np.float32))
                b.bind_ortvalue_input(f"past_{name}", cache)
                b.bind_ortvalue_output(f"present_{name}", cache)
            b.bind_output("out")
            bindings.append(b)
        steps[kernel] = (session, bindings)
    times = {k: [] for k in KERNELS}
    for _ in range(runs):
        for kernel, (session, bindings) in steps.items():
            t = time.perf_counter()
            for b in bindings:
                session.run_with_iobinding(b)
            times[kernel].append(time.perf_counter() - t)
    kv = decode_bytes(MODEL_M, context) - decode_bytes(MODEL_M, 0)  # the step's K/V
    row = {"context": context, "kv_mb": kv / 1e6, "runs": runs}
    for k, v in times.items():
        row[f"{k}_ms"] = 1e3 * statistics.median(v)
        row[f"{k}_gbs"] = kv / statistics.median(v) / 1e9
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    for kernel in KERNELS:
        ax.plot(x, [r[f"{kernel}_ms"] for r in rows], "o-", label=f"--decode-kernel {kernel}")
    ax.plot(x, [r["limit_ms"] for r in rows], ":", color="grey", label="bytes read / same-run copy rate")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title("model M, one sequence, steps interleaved")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"model M, {m['cpu']}, {m['cores']} cores; copy rate {result['copy_gbs']:.1f} GB/s; median of "
             f"{result['rows'][0]['steps']} interleaved steps per kernel.", "",
             "| context | gqa ms | grouped ms | gqa / grouped | limit ms (bytes / copy rate) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['context']} | {r['gqa_ms']:.1f} | {r['grouped_ms']:.1f} | {r['gqa_ms'] / r['grouped_ms']:.2f}x | "
              f"{r['limit_ms']:.1f} |" for r in result["rows"]]
    rows = result["rows"]
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        lines += ["", f"decode({hi['context']}) / decode({lo['context']}): gqa {hi['gqa_ms'] / lo['gqa_ms']:.2f}, grouped "
                  f"{hi['grouped_ms'] / lo['grouped_ms']:.2f} (bytes read "
                  f"{decode_bytes(MODEL_M, hi['context']) / decode_bytes(MODEL_M, lo['context']):.2f}x)."]
    if result.get("alone"):
        lines += ["", f"The kernels alone: one step = 12 calls over 12 layers' caches (median of "
                  f"{result['alone'][0]['runs']} alternated steps; GB/s = the K/V read / the step's time).", "",
                  "| context | K/V MB | gqa ms | gqa GB/s | grouped ms | grouped GB/s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['context']} | {r['kv_mb']:.0f} | {r['gqa_ms']:.2f} | {r['gqa_gbs']:.1f} | "
                  f"{r['grouped_ms']:.2f} | {r['grouped_gbs']:.1f} |" for r in result["alone"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench_decode_kernel.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=ints, default=[2048, 8192, 12288, 16384])
    p.add_argument("--steps", type=int, default=48, help="decode steps per kernel and context")
    p.add_argument("--work", default=str(ROOT / "bench_out"), help="where model M and its engines live")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "decode_kernel"))
    args = p.parse_args(argv)
    from runtime import custom_ops
    from runtime.engine import MesaEngine

    if custom_ops.library() is None:
        print("error: the Mesa CPU kernels are not built; run bash scripts/build_cpp.sh", file=sys.stderr)
        return 2
    if max(args.contexts) + args.steps > MAX_LEN:
        print(f"error: contexts + steps must stay within the engines' max_len {MAX_LEN}", file=sys.stderr)
        return 2
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model_m(work / "model_M")
    dirs = {k: export_ours(model, work / ("engine_M_mesa" + ("" if k == "gqa" else f"_{k}")), MAX_LEN, "ort-cpu",
                           decode_kernel=k) for k in KERNELS}
    rate = copy_gbs()
    # two sessions take turns on the same cores: threads that spin after a run would slow the other one
    engines = {k: MesaEngine.load(d, backend="ort-cpu", session_options={"allow_spinning": False})
               for k, d in dirs.items()}
    rows = []
    try:
        for context in args.contexts:
            row = measure(engines, context, args.steps)
            row["limit_ms"] = decode_bytes(MODEL_M, context) / (rate * 1e9) * 1e3
            rows.append(row)
            log(f"context {context}: gqa {row['gqa_ms']:.1f} ms, grouped {row['grouped_ms']:.1f} ms "
                f"({row['gqa_ms'] / row['grouped_ms']:.2f}x), limit {row['limit_ms']:.1f} ms")
    finally:
        for e in engines.values():
            e.close()
    alone = []
    for context in args.contexts:
        alone.append(measure_alone(context, args.steps))
        log(f"alone at {context}: gqa {alone[-1]['gqa_ms']:.2f} ms, grouped {alone[-1]['grouped_ms']:.2f} ms "
            f"({alone[-1]['grouped_gbs']:.1f} GB/s)")
    result = {"machine": machine(), "copy_gbs": rate, "rows": rows, "alone": alone}
    (out / "decode_kernel.json").write_text(json.dumps(result, indent=1))
    (out / "decode_kernel.md").write_text(markdown(result))
    plot(result, out / "decode_kernel.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

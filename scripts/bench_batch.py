"""Batched decode: aggregate tokens/s of B sequences decoding together, model M, ONNX Runtime CPU.

    python scripts/bench_batch.py [--context 2048] [--batches 1,2,4,8] [--tokens 48] [--out bench_out/batch]

Uses model M exported for the ort-cpu target twice, with each decode kernel (gqa: ORT's GroupQueryAttention;
grouped: the Mesa CPU kernel, when scripts/build_cpp.sh has built it), exported once into --work. For each B, one engine with B slots gets B prompts of --context tokens in one generate() call;
the batcher prefills them and then steps every running row in one decode call. A figure is the median
duration of the decode calls that stepped all B rows (runtime.batcher keeps each call's row count and
seconds), so the prefills around them do not count: tokens/s = B / that median. The limit: a call reads
the weights once however many rows it steps, plus each row's own K/V.
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
from scripts.bench_limits import machine  # noqa: E402
from scripts.bench_model import make_model_m  # noqa: E402
from scripts.bench_workers import export_ours  # noqa: E402


def measure(engine_dir: Path, B: int, context: int, tokens: int) -> dict:
    from runtime.engine import MesaEngine

    with MesaEngine.load(engine_dir, backend="ort-cpu", slots=B) as engine:
        rng = np.random.default_rng(B)
        prompts = [rng.integers(3, engine.manifest.vocab_size, context).tolist() for _ in range(B)]
        t = time.perf_counter()
        engine.generate(prompts, max_new_tokens=tokens, stop_tokens=())
        wall = time.perf_counter() - t
        full = [s for rows, s in engine._batcher.decode_calls if rows == B]
        cache = engine.stats()["cache_bytes"]
    step = statistics.median(full)
    return {"batch": B, "context": context, "calls_with_all_rows": len(full), "step_ms": 1e3 * step,
            "tokens_per_s": B / step, "wall_s": wall, "cache_mib": cache / 2**20}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for kernel in dict.fromkeys(r["decode_kernel"] for r in rows):
        mine = [r for r in rows if r["decode_kernel"] == kernel]
        B, tps = [r["batch"] for r in mine], [r["tokens_per_s"] for r in mine]
        ax.plot(B, tps, "o-", label=f"ours, decode kernel {kernel}: B rows in one call")
        ax.plot(B, [tps[0] * b for b in B], ":", color=ax.lines[-1].get_color(), alpha=0.5,
                label=f"B x one sequence ({kernel})")
    ax.set_xlabel("sequences decoding together (B)")
    ax.set_ylabel("generated tokens / s (all rows)")
    ax.set_title(f"model M, {rows[0]['context']} tokens of context each")
    ax.set_xticks(sorted({r["batch"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench_batch.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batches", type=ints, default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per row")
    p.add_argument("--work", default=str(ROOT / "bench_out"), help="where model M and its engine live")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "batch"))
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model_m(work / "model_m")
    from runtime import custom_ops

    kernels = ["gqa"] + (["grouped"] if custom_ops.library() is not None else [])
    if len(kernels) == 1:
        print("decode kernel grouped skipped: the Mesa CPU kernels are not built (bash scripts/build_cpp.sh)",
              file=sys.stderr)
    engines = {k: export_ours(model, work / f"engine_batch_{args.context}_{k}", args.context + args.tokens + 64,
                              "ort-cpu", decode_kernel=k) for k in kernels}
    rows = []
    for B in args.batches:  # the kernels interleaved, so both see the machine in the same state
        for kernel, engine in engines.items():
            rows.append({"decode_kernel": kernel, **measure(engine, B, args.context, args.tokens)})
            r, one = rows[-1], next(x for x in rows if x["decode_kernel"] == kernel)
            print(f"{kernel} B={B}: {r['step_ms']:.1f} ms per call, {r['tokens_per_s']:.1f} tokens/s "
                  f"({r['tokens_per_s'] / one['tokens_per_s']:.2f}x one sequence)", flush=True)
    result = {"machine": machine(), "rows": rows}
    (out / "batch.json").write_text(json.dumps(result, indent=1))
    one = {r["decode_kernel"]: r for r in rows if r["batch"] == args.batches[0]}
    lines = ["| decode kernel | sequences B | ms per decode call | tokens/s (all rows) | vs B = 1 |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['decode_kernel']} | {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / one[r['decode_kernel']]['tokens_per_s']:.2f}x |" for r in rows]
    (out / "batch.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "batch.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

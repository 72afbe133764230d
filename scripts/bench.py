"""Prefill / decode / memory benchmark of benchmark model "M" against full attention and onnxruntime-genai.

    python scripts/bench.py                       # full sweep, results in bench_out/
    python scripts/bench.py --quick               # 1k and 2k only, one repeat: a smoke run (~3 min)
    python scripts/bench.py --lengths 4096,12288 --methods ours,ort-genai
    python scripts/bench.py --report-only         # redo the table and plot from bench_out/bench.json

Every method runs on model M (scripts/bench_model.py, with its FLOP and byte counts); each (method, length)
point runs in a fresh process (scripts/bench_workers.py, which lists what each method runs), so its peak
RSS (VmHWM) is its own: weights + caches + activations. Prefill seconds are the median of up to --repeats
prompts (fewer when one prefill exceeds --repeat-budget seconds; the JSON records how many ran). Decode
ms/token is the median of --decode-tokens greedy steps after a prefill of the point's length, at the lengths
in --decode-at. Achieved GFLOP/s = counted FLOPs / prefill seconds, shown next to the MatMul rates and the
memory copy rate measured in the same run (scripts/bench_limits.py). scripts/bench_report.py writes the
tables, the targets and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_limits import (  # noqa: E402
    copy_gbs,
    machine,
    ort_matmul_gflops,
    torch_matmul_gflops,
)
from scripts.bench_model import MAX_LEN, MODEL_M, make_model_m, prefill_flops  # noqa: E402
from scripts.bench_report import FULL_ATTENTION, write_report  # noqa: E402
from scripts.bench_workers import KERNEL_METHODS, build_genai, export_ours, kernel_suffix, log  # noqa: E402

FULL_LENGTHS = (1024, 2048, 4096, 6144, 8192, 12288)
QUICK_LENGTHS = (1024, 2048)
DECODE_AT = (2048, 8192, 12288)
METHODS = ("ours", "ours-grouped", "ours-kernels", "ours-portable", "transformers-sdpa", "reference-mesa", "ort-genai")
DEFAULT_METHODS = ("ours", "ours-kernels", "transformers-sdpa", "reference-mesa", "ort-genai")


# ------------------------------------------------------------------------------- the sweep

def spawn(spec: dict, timeout: float) -> dict:
    """One point in a fresh process; its last stdout line is the JSON result."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "scripts.bench_workers", json.dumps(spec)],
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
        point["decode_ms_per_token"] = 1e3 * statistics.median(point["decode_s"])
    point["gflops"] = point["flops"]["total"] / point["prefill_median_s"] / 1e9
    return point


def method_table(args, work: Path) -> dict[str, dict]:
    """method name -> how to run it (paths), preparing models and engines that are missing."""
    model = make_model_m(work / "model_M")
    table: dict[str, dict] = {}
    wanted = args.methods
    if "ours" in wanted:
        table["ours"] = {"engine": str(export_ours(model, work / "engine_M_mesa", args.max_len, "ort-cpu"))}
    for name, options in KERNEL_METHODS.items():
        if name not in wanted:
            continue
        from runtime import custom_ops

        if custom_ops.library() is None:
            log(f"{name} skipped: the Mesa CPU kernels are not built (bash scripts/build_cpp.sh)")
        else:
            folder = work / f"engine_M_mesa{kernel_suffix(**options)}"
            table[name] = {"engine": str(export_ours(model, folder, args.max_len, "ort-cpu", **options))}
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
    from runtime import mesa

    table = method_table(args, work)
    config = loading.load_config(work / "model_M")
    params = mesa.default_params(config.max_position_embeddings)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "bench.json").read_text())
        if args.merge:
            other = json.loads(Path(args.merge).read_text())
            lengths = sorted({p["length"] for p in other["points"]})
            results["points"] = [p for p in results["points"] if p["length"] not in lengths] + other["points"]
            runs = [r for r in results.get("extra_runs", []) if r["lengths"] != lengths]  # merging twice: once
            results["extra_runs"] = runs + [{"lengths": lengths, "calibration": other["calibration"],
                                             "wall_s": other.get("wall_s")}]
            results["settings"]["lengths"] = sorted({p["length"] for p in results["points"]})
            results["settings"]["decode_at"] = sorted({*results["settings"]["decode_at"],
                                                       *other["settings"]["decode_at"]})
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


if __name__ == "__main__":
    sys.exit(main())

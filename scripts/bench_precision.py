"""Quantized engines against fp32, side by side in one run: speed and accuracy per precision.

    python scripts/bench_precision.py                 # model M speed + error, trained-model passkey (~40 min)
    python scripts/bench_precision.py --quick         # short lengths, 10 prompts per passkey cell: a smoke run
    python scripts/bench_precision.py --skip-speed    # accuracy only
    python scripts/bench_precision.py --mesa-kernels  # every engine on the Mesa CPU kernels (scripts/build_cpp.sh)

1. Model M (scripts/bench_model.py, random weights) exported at every precision (`export.py --precision
   fp32 | int8 | int4 | int8-int4`, target ort-cpu). Speed: prefill seconds at --prefill-at (median of
   --repeats) and decode ms/token at --decode-at, each point in a fresh process (scripts/bench_workers.py),
   the precisions interleaved length by length so they share the machine's state. Accuracy: one prompt
   of --error-length tokens (past T, so it runs first, middle and last chunks) and 16 decode steps fed
   the same tokens; per phase, the median over rows of |logits - fp32 logits| / |fp32 logits| (L2 per
   row). Random weights are a worst case for quantization (no structure to preserve): reported, not gated.
2. The trained passkey model (tests/fixtures/trained, Mesa T=256, pw=16) at every precision: exact-match
   passkey accuracy at 256..2048 tokens, both filler modes, --n prompts per cell (scripts/passkey.py).

Writes precision.json, precision.md and precision.png into --out.
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

from scripts.bench import ints, spawn  # noqa: E402
from scripts.bench_limits import machine  # noqa: E402
from scripts.bench_model import MODEL_M, make_model_m  # noqa: E402
from export.api import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES  # noqa: E402
from scripts.bench_workers import KERNEL_METHODS, export_ours, kernel_suffix, log  # noqa: E402

PRECISIONS = ("fp32", "int8", "int4", "int8-int4")
PASSKEY_PARAMS = dict(train_length=256, first_chunk=16, first_chunk_cache=16, last_context=64, reserve_tokens=8,
                      chunk_width=256, push_width=16)
PASSKEY_LENGTHS = (256, 512, 1024, 2048)


def speed(args, engines: dict[str, Path]) -> list[dict]:
    points = []
    for length in sorted(set(args.prefill_at) | set(args.decode_at)):
        for precision, engine in engines.items():
            spec = {"method": "ours", "engine": str(engine), "length": length, "repeats": args.repeats,
                    "repeat_budget": 60.0, "decode": length in args.decode_at, "decode_tokens": args.decode_tokens}
            log(f"{precision} at {length} tokens ...")
            p = spawn(spec, args.timeout)
            p.update(precision=precision, length=length)
            if "prefill_s" in p:
                p["prefill_median_s"] = statistics.median(p["prefill_s"])
                if p.get("decode_s"):
                    p["decode_ms_per_token"] = 1e3 * statistics.median(p["decode_s"])
                log(f"  prefill {p['prefill_median_s']:.2f} s" + (f", decode {p['decode_ms_per_token']:.1f} ms/token"
                                                                  if "decode_ms_per_token" in p else ""))
            else:
                log(f"  {p.get('error')}")
            points.append(p)
    return points


def phase_logits(engine_dir: Path, ids: np.ndarray, fed: list[int]) -> dict[str, np.ndarray]:
    """Logits of every prompt row, grouped by the Mesa step that computed it, and of each decode step."""
    from runtime import mesa
    from runtime.engine import MesaEngine

    with MesaEngine.load(engine_dir) as engine, engine.sequence(ids, all_logits=True) as seq:
        prefill, decode = seq.step(), seq.feed(fed)
        params, method = engine.params, engine.manifest.method
    out: dict[str, list] = {}
    for step in mesa.prefill_steps(len(ids), params, method):
        out.setdefault(step.kind, []).append(prefill[step.start:step.stop])
    grouped = {k: np.concatenate(v) for k, v in out.items()}
    grouped["decode"] = decode
    return grouped


def logit_errors(engines: dict[str, Path], length: int, vocab: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    ids, fed = rng.integers(3, vocab, length), [int(t) for t in rng.integers(3, vocab, 16)]
    ref = phase_logits(engines["fp32"], ids, fed)
    errors = {}
    for precision, engine in engines.items():
        if precision == "fp32":
            continue
        log(f"logit error of {precision} at {length} tokens ...")
        got = phase_logits(engine, ids, fed)
        errors[precision] = {
            phase: float(np.median(np.linalg.norm(got[phase] - r, axis=-1) / np.linalg.norm(r, axis=-1)))
            for phase, r in ref.items()}
        errors[precision]["argmax_agreement"] = float(np.mean(
            [(got[p].argmax(-1) == r.argmax(-1)).mean() for p, r in ref.items()]))
    return errors


def block_suffix(precision: str, block_size: int) -> str:
    """Engines with int4 weights are cached per block size (an older folder may hold another one)."""
    return f"_b{block_size}" if "int4" in precision else ""


def passkey_accuracy(args, work: Path) -> list[dict]:
    from export import api
    from runtime.engine import MesaEngine
    from scripts import fixtures, passkey

    task = passkey.Task.load(fixtures.TRAINED / "task.json")
    engines = {}
    for precision in args.precisions:
        out = work / f"passkey_{precision}{block_suffix(precision, args.int4_block_size)}"
        if not (out / "mesa.json").is_file():
            api.export_engine(fixtures.TRAINED / "model", out, max_len=max(args.passkey_lengths) + 16,
                              params=PASSKEY_PARAMS, precision=precision, force=True, progress=False,
                              int4_block_size=args.int4_block_size if "int4" in precision else None)
        engines[precision] = MesaEngine.load(out)
    cells = passkey.run(engines, task, args.passkey_lengths, passkey.MODES, args.n, 0)
    for e in engines.values():
        e.close()
    return [c.row() for c in cells]


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"# Precision: model M and the trained passkey model, {m['cpu']}, {m['cores']} cores", "",
           f"CPU features: {', '.join(r['cpu_features']) or 'none of avx512_vnni / amx_int8 / avx_vnni'}."
           + (" Every engine on the Mesa CPU kernels (--decode-kernel grouped --prefill-kernel tiled)."
              if r.get("mesa_kernels") else "")
           + (f" int4 weights in blocks of {r['int4_block_size']}." if r.get("int4_block_size") else ""), ""]
    pts = {(p["precision"], p["length"]): p for p in r.get("speed", []) if "prefill_median_s" in p}
    if pts:
        lengths = sorted({L for _, L in pts})
        out += ["**Model M: prefill seconds and decode ms/token (ratio: fp32 / this precision, same run)**", "",
                "| precision | " + " | ".join(f"prefill {L}" for L in lengths) + " | " +
                " | ".join(f"decode at {L}" for L in lengths if any("decode_ms_per_token" in p for (q, LL), p in
                                                                  pts.items() if LL == L)) + " |"]
        dec_lengths = [L for L in lengths if any("decode_ms_per_token" in p for (q, LL), p in pts.items() if LL == L)]
        out.append("|---|" + "---:|" * (len(lengths) + len(dec_lengths)))
        for precision in r["precisions"]:
            cells = []
            for L in lengths:
                p, f = pts.get((precision, L)), pts.get(("fp32", L))
                cells.append(f"{p['prefill_median_s']:.2f} s ({f['prefill_median_s'] / p['prefill_median_s']:.2f}x)"
                             if p and f else "")
            for L in dec_lengths:
                p, f = pts.get((precision, L)), pts.get(("fp32", L))
                cells.append(f"{p['decode_ms_per_token']:.1f} ms ({f['decode_ms_per_token'] / p['decode_ms_per_token']:.2f}x)"
                             if p and f and "decode_ms_per_token" in p else "")
            out.append(f"| {precision} | " + " | ".join(cells) + " |")
        out.append("")
    if r.get("errors"):
        phases = [k for k in next(iter(r["errors"].values())) if k != "argmax_agreement"]
        out += [f"**Model M: relative logit error against fp32 per phase ({r['error_length']}-token prompt + 16 "
                "decode steps; random weights, a worst case)**", "",
                "| precision | " + " | ".join(phases) + " | argmax agreement |", "|---|" + "---:|" * (len(phases) + 1)]
        for precision, e in r["errors"].items():
            out.append(f"| {precision} | " + " | ".join(f"{e[p]:.3f}" for p in phases) + f" | {e['argmax_agreement']:.2f} |")
        out.append("")
    if r.get("passkey"):
        cells = r["passkey"]
        lengths = sorted({c["length"] for c in cells})
        out += [f"**Trained passkey model (Mesa pw=16): exact-match accuracy, {cells[0]['n']} prompts per cell**", "",
                "| filler, precision | " + " | ".join(map(str, lengths)) + " | largest gap to fp32 |",
                "|---|" + "---:|" * (len(lengths) + 1)]
        acc = {(c["mode"], c["engine"], c["length"]): c["accuracy"] for c in cells}
        for mode in dict.fromkeys(c["mode"] for c in cells):
            for precision in r["precisions"]:
                gap = max(abs(acc[(mode, precision, L)] - acc[(mode, "fp32", L)]) for L in lengths)
                out.append(f"| {mode}, {precision} | " + " | ".join(f"{acc[(mode, precision, L)]:.2f}" for L in lengths)
                           + f" | {gap:.2f} |")
    return "\n".join(out) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in r.get("speed", []) if "prefill_median_s" in p]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for precision in r["precisions"]:
        mine = sorted((p for p in pts if p["precision"] == precision), key=lambda p: p["length"])
        if mine:
            axes[0].plot([p["length"] for p in mine], [p["prefill_median_s"] for p in mine], "o-", label=precision)
            dec = [p for p in mine if "decode_ms_per_token" in p]
            axes[1].plot([p["length"] for p in dec], [p["decode_ms_per_token"] for p in dec], "o-", label=precision)
        cells = sorted((c for c in r.get("passkey", []) if c["engine"] == precision and c["mode"] == "random"),
                       key=lambda c: c["length"])
        if cells:
            axes[2].plot([c["length"] for c in cells], [c["accuracy"] for c in cells], "o-", label=precision)
    for ax, title, ylabel in ((axes[0], "Model M prefill", "seconds"), (axes[1], "Model M decode", "ms / token"),
                              (axes[2], "Trained model passkey (random filler)", "accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_features() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench_precision.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "bench_out"), help="where model M and the engines live")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "precision"))
    p.add_argument("--precisions", type=lambda s: s.split(","), default=list(PRECISIONS))
    p.add_argument("--prefill-at", type=ints, default=[4096, 12288])
    p.add_argument("--decode-at", type=ints, default=[2048, 8192])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--error-length", type=int, default=6144)
    p.add_argument("--n", type=int, default=100, help="passkey prompts per cell")
    p.add_argument("--passkey-lengths", type=ints, default=list(PASSKEY_LENGTHS))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="prefill/decode at 1k/2k, error at 5k, 10 passkey prompts")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-passkey", action="store_true")
    p.add_argument("--int4-block-size", type=int, choices=INT4_BLOCK_SIZES, default=INT4_BLOCK_SIZE,
                   help=f"weights per scale of the int4 engines (export.py --int4-block-size; default {INT4_BLOCK_SIZE})")
    p.add_argument("--mesa-kernels", action="store_true",
                   help="export every precision with --decode-kernel grouped --prefill-kernel tiled (the fp32 baseline "
                        "too, so the ratios compare quantization alone)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = set(args.precisions) - set(PRECISIONS) | ({"fp32"} - set(args.precisions))
    if unknown:
        print(f"error: --precisions must include fp32 and come from {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if args.quick:
        args.prefill_at, args.decode_at, args.repeats, args.error_length, args.n = [1024, 2048], [2048], 1, 5000, 10
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"machine": machine(), "cpu_features": cpu_features(), "precisions": args.precisions,
              "int4_block_size": args.int4_block_size,
              "error_length": args.error_length}
    if not args.skip_speed:
        model = make_model_m(work / "model_M")
        max_len = max(max(args.prefill_at), max(args.decode_at) + args.decode_tokens, args.error_length + 16) + 8
        kernels = KERNEL_METHODS["ours-kernels"] if args.mesa_kernels else {}
        engines = {p: export_ours(model, work / f"engine_M_{p}_{max_len}{kernel_suffix(**kernels)}"
                                         f"{block_suffix(p, args.int4_block_size)}", max_len,
                                  "ort-cpu", p, **kernels, int4_block_size=args.int4_block_size if "int4" in p else None)
                   for p in args.precisions}
        result["mesa_kernels"] = args.mesa_kernels
        result["speed"] = speed(args, engines)
        result["errors"] = logit_errors(engines, args.error_length, MODEL_M["vocab_size"])
    if not args.skip_passkey:
        result["passkey"] = passkey_accuracy(args, work)
    result["wall_s"] = time.perf_counter() - t0
    (out / "precision.json").write_text(json.dumps(result, indent=1))
    (out / "precision.md").write_text(markdown(result))
    plot(result, out / "precision.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's comparison, redone on this engine in one run: every method of runtime/methods.py exported
from the same checkpoints and measured side by side.

    python -m scripts.compare_methods --work /tmp/methods                 # both parts (about an hour on 2 cores)
    python -m scripts.compare_methods --work /tmp/methods --skip-cost     # passkey accuracy only
    python -m scripts.compare_methods --report-only                       # redraw from the saved JSON

1. Accuracy: the trained passkey fixture (tests/fixtures/trained, trained at T = 256) exported with each
   method at max_len 2056; exact-match accuracy of `--n` prompts per (method, length) cell with 95% Wilson
   intervals (scripts/passkey.py's prompts and scoring). Mesa runs the fixture's setting (F = Fc = 16,
   C = 64, G = 8, pw = 16); every other method its defaults for T = 256 (runtime/methods.py
   default_method, printed in the report).
2. Cost: model M (scripts/bench_model.py, T = 4096) exported with each method for ort-cpu at max_len
   16448; per prompt length, in a fresh process each (scripts/bench_workers.py): prefill seconds (one
   run), decode ms/token (median of `--decode-tokens` steps) and the process's peak RSS.

Results go to scripts/results/methods/ (methods.json, methods.md, accuracy.png, cost.png).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_workers import log  # noqa: E402

METHODS = ("mesa", "origin", "rerope", "leaky-rerope", "self-extend", "streaming-llm", "lm-infinite", "dynamic-ntk",
           "yarn")
TRAINED = ROOT / "tests" / "fixtures" / "trained"
TRAINED_MESA = {"train_length": 256, "first_chunk": 16, "first_chunk_cache": 16, "last_context": 64,
                "reserve_tokens": 8, "push_width": 16}
PASSKEY_LENGTHS = (256, 512, 1024, 2048)
PASSKEY_MAX_LEN = 2056
COST_LENGTHS = (4096, 8192, 12288, 16384)
RESULTS = ROOT / "scripts" / "results" / "methods"


def export_method(model: Path, out: Path, max_len: int, method: str, params: dict | None = None) -> dict:
    """Export (unless a readable engine is there) and return the manifest's method parameters."""
    from export.api import export_engine
    from runtime.artifact import ArtifactError, load_manifest

    try:
        m = load_manifest(out)
        if m.method == method and m.max_len == max_len:
            return _params(m)
    except ArtifactError:
        pass
    log(f"exporting {out.name}: {model.name}, --method {method}, max_len {max_len}")
    if params and method != "mesa":  # the other methods take T alone from the Mesa parameters
        params = {"train_length": params["train_length"]}
    with contextlib.redirect_stdout(io.StringIO()):
        m = export_engine(model, out, max_len=max_len, method=method, params=params, force=True, progress=False)
    return _params(m)


def _params(manifest) -> dict:
    """What the report lists: Mesa's parameters, another method's, none for origin (plain RoPE)."""
    return manifest.params if manifest.method == "mesa" else manifest.method_params


def accuracy(work: Path, methods, lengths, modes, n: int) -> list[dict]:
    from runtime.engine import MesaEngine
    from scripts import passkey

    task = passkey.Task.load(TRAINED / "task.json")
    rows = []
    for method in methods:
        out = work / "passkey" / method
        params = export_method(TRAINED / "model", out, PASSKEY_MAX_LEN, method, TRAINED_MESA)
        with MesaEngine.load(out, slots=4) as engine:
            for mode in modes:
                for L in lengths:
                    t = time.perf_counter()
                    hits = passkey.evaluate(engine, task, L, mode, n, batch=4)
                    cell = passkey.Cell(method, mode, L, n, hits).row()
                    cell.update(params=params, seconds=round(time.perf_counter() - t, 1))
                    rows.append(cell)
                    log(f"passkey {method} {mode} L={L}: {hits}/{n} ({cell['seconds']} s)")
    return rows


def cost(work: Path, methods, lengths, decode_tokens: int, timeout: float) -> list[dict]:
    from scripts.bench import spawn
    from scripts.bench_model import MAX_LEN, make_model_m

    model = make_model_m(work / "model_M")
    rows = []
    for method in methods:
        out = work / "cost" / method
        params = export_method(model, out, MAX_LEN, method)
        for L in lengths:
            spec = {"method": "ours", "engine": str(out), "length": L, "decode": True,
                    "decode_tokens": decode_tokens, "repeats": 1, "repeat_budget": 0}
            point = spawn(spec, timeout)
            row = {"method": method, "length": L, "params": params}
            if "error" in point:
                row["error"] = point["error"]
            else:
                row.update(prefill_s=round(point["prefill_s"][0], 2),
                           decode_ms=round(1e3 * statistics.median(point["decode_s"]), 1),
                           peak_rss_gib=round(point["peak_rss_mib"] / 1024, 2))
            rows.append(row)
            log(f"cost {method} L={L}: {row}")
    return rows


# ------------------------------------------------------------------------------------- report

def accuracy_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    out = ["| method, filler | " + " | ".join(str(L) for L in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for key in dict.fromkeys((r["engine"], r["mode"]) for r in rows):
        cells = {r["length"]: r for r in rows if (r["engine"], r["mode"]) == key}
        out.append(f"| {key[0]}, {key[1]} | " + " | ".join(
            f"{cells[L]['accuracy']:.2f} [{cells[L]['ci95'][0]:.2f}, {cells[L]['ci95'][1]:.2f}]" if L in cells else ""
            for L in lengths) + " |")
    return "\n".join(out)


def cost_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    head = " | ".join(f"{L // 1024}k prefill s / decode ms / RSS GiB" for L in lengths)
    out = [f"| method | {head} |", "|---" * (len(lengths) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["length"]: r for r in rows if r["method"] == method}
        out.append(f"| {method} | " + " | ".join(
            (f"{c['prefill_s']:.1f} / {c['decode_ms']:.0f} / {c['peak_rss_gib']:.2f}" if "error" not in c
             else c["error"][:40]) if (c := cells.get(L)) else "" for L in lengths) + " |")
    return "\n".join(out)


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    acc = results.get("accuracy") or []
    if acc:
        modes = list(dict.fromkeys(r["mode"] for r in acc))
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for method in dict.fromkeys(r["engine"] for r in acc):
                pts = sorted((r for r in acc if r["engine"] == method and r["mode"] == mode), key=lambda r: r["length"])
                x = [r["length"] for r in pts]
                y = [r["accuracy"] for r in pts]
                err = [[a - r["ci95"][0] for a, r in zip(y, pts)], [r["ci95"][1] - a for a, r in zip(y, pts)]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
            ax.set(xscale="log", xlabel="prompt length (trained at 256)", ylabel="passkey exact match",
                   title=f"trained fixture, {mode} filler", ylim=(-0.03, 1.03))
            ax.minorticks_off()
            ax.set_xticks(PASSKEY_LENGTHS, [str(L) for L in PASSKEY_LENGTHS])
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(folder / "accuracy.png", dpi=110)
        made.append("accuracy.png")
    rows = [r for r in results.get("cost") or [] if "error" not in r]
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for key, ax, label in (("prefill_s", axes[0], "prefill s"), ("decode_ms", axes[1], "decode ms/token"),
                               ("peak_rss_gib", axes[2], "peak RSS GiB")):
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["length"])
                ax.plot([r["length"] for r in pts], [r[key] for r in pts], marker="o", label=method)
            ax.set(xlabel="prompt length (model M, T = 4096)", ylabel=label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "cost.png", dpi=110)
        made.append("cost.png")
    plt.close("all")
    return made


def write_report(results: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "methods.json").write_text(json.dumps(results, indent=1))
    m = results.get("machine") or {}
    lines = [f"# Methods compared on this engine ({m.get('cpu', '?')}, {m.get('cores', '?')} cores)", "",
             "Written by `python -m scripts.compare_methods`; every number below comes from one run of it, "
             "unless a note says otherwise.", ""]
    lines += [f"Note: {n}" for n in results.get("notes", [])] + ([""] if results.get("notes") else [])
    if results.get("accuracy"):
        lines += ["## Passkey accuracy, trained fixture (T = 256), exact match [95% Wilson interval]", "",
                  accuracy_table(results["accuracy"]), "", "Parameters:", ""]
        for method, params in dict.fromkeys((r["engine"], json.dumps(r["params"])) for r in results["accuracy"]):
            lines.append(f"- {method}: " + ("plain RoPE, full attention" if method == "origin" else params))
        lines.append("")
    if results.get("cost"):
        lines += ["## Cost on model M (T = 4096), ort-cpu, fresh process per point", "",
                  cost_table(results["cost"]), ""]
    for png in plots(results, folder):
        lines.append(f"![{png}]({png})")
    path = folder / "methods.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _merge(old: list[dict] | None, key: str, methods, new: list[dict]) -> list[dict]:
    """The new rows, and the earlier run's rows of the methods not run now (in METHODS order)."""
    rows = [r for r in old or [] if r[key] not in methods] + new
    return sorted(rows, key=lambda r: METHODS.index(r[key]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/compare-methods"), help="engines and model M go here")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--n", type=int, default=100, help="passkey prompts per cell")
    p.add_argument("--lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS), help="passkey prompt lengths")
    p.add_argument("--modes", nargs="+", default=["random"], choices=("repeat", "random"), help="passkey filler")
    p.add_argument("--cost-lengths", type=int, nargs="+", default=list(COST_LENGTHS), help="model M prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per cost point")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per cost point")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--report-only", action="store_true", help="redraw the report from OUT/methods.json")
    p.epilog = ("A run of some --methods keeps the other methods' rows of OUT/methods.json (mark which rows "
                "came from which run when you quote them).")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.report_only:
        try:
            results = json.loads((args.out / "methods.json").read_text())
        except (OSError, ValueError) as e:
            print(f"error: cannot read {args.out / 'methods.json'}: {e}", file=sys.stderr)
            return 2
        print(write_report(results, args.out))
        return 0
    if max(args.lengths) + 5 > PASSKEY_MAX_LEN or min(args.lengths) < 16:
        print(f"error: passkey lengths must lie in [16, {PASSKEY_MAX_LEN - 5}]", file=sys.stderr)
        return 2
    from scripts.bench_limits import machine

    previous = {}
    if (args.out / "methods.json").is_file():  # a part skipped now keeps its earlier results
        previous = json.loads((args.out / "methods.json").read_text())
    results = {"machine": machine(), "accuracy": previous.get("accuracy"), "cost": previous.get("cost"),
               "notes": previous.get("notes", [])}
    if not args.skip_accuracy:
        results["accuracy"] = _merge(results["accuracy"], "engine", args.methods,
                                     accuracy(args.work, args.methods, args.lengths, args.modes, args.n))
    if not args.skip_cost:
        results["cost"] = _merge(results["cost"], "method", args.methods,
                                 cost(args.work, args.methods, args.cost_lengths, args.decode_tokens, args.timeout))
    print(write_report(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

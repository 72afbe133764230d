"""The headline demonstration: a model trained at 256 tokens, origin vs Mesa, through exported engines.

    python -m scripts.passkey_demo [--n 100] [--out scripts/results/passkey]

Exports tests/fixtures/trained/model with --method origin and with --method mesa (T=256, F=16, Fc=16,
C=64, G=8, W0=256, pw in 4/8/16/32), evaluates passkey retrieval at 256..2048 tokens in both filler
modes, and writes passkey.md (table), passkey.json (every cell with its 95% interval) and passkey.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from scripts import fixtures, passkey

REPO = Path(__file__).resolve().parents[1]
TRAINED = fixtures.TRAINED
MESA_PARAMS = dict(train_length=256, first_chunk=16, first_chunk_cache=16, last_context=64, reserve_tokens=8,
                   chunk_width=256)
PUSH_WIDTHS = (4, 8, 16, 32)


def export_all(model_dir: Path, out: Path, max_len: int, push_widths=PUSH_WIDTHS) -> dict[str, Path]:
    """Engines named like the table rows: origin, mesa pw=4, ..."""
    from export import api

    jobs = {"origin": dict(method="origin")}
    jobs.update({f"mesa pw={pw}": dict(method="mesa", params={**MESA_PARAMS, "push_width": pw}) for pw in push_widths})
    engines = {}
    for name, options in jobs.items():
        target = out / name.replace(" ", "_").replace("=", "")
        try:
            api.export_engine(model_dir, target, max_len=max_len, force=True, **options)
        except api.errors() as e:
            raise SystemExit(f"export of {name} failed: {e}") from None
        engines[name] = target
    return engines


def plot(cells: list[passkey.Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(c.mode for c in cells))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in dict.fromkeys(c.engine for c in cells):
            pts = sorted((c.length, c) for c in cells if c.mode == mode and c.engine == name)
            xs = [L for L, _ in pts]
            ys = [c.accuracy for _, c in pts]
            lo = [max(0.0, c.accuracy - passkey.wilson_interval(c.hits, c.n)[0]) for _, c in pts]
            hi = [max(0.0, passkey.wilson_interval(c.hits, c.n)[1] - c.accuracy) for _, c in pts]
            style = dict(color="black", linestyle="--") if name == "origin" else {}
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, **style)
        ax.axvline(256, color="grey", linewidth=0.8)
        ax.text(262, 0.03, "trained length", color="grey", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c.length for c in cells}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"passkey retrieval, {mode} filler")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy (95% CI)")
    axes[0][-1].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.passkey_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="prompts per cell")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 768, 1024, 2048])
    p.add_argument("--out", default=str(REPO / "scripts" / "results" / "passkey"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", action="store_true", help="redraw passkey.png from the --out folder's passkey.json")
    args = p.parse_args(argv)
    from runtime.engine import MesaEngine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        fields = ("engine", "mode", "length", "n", "hits")
        rows = json.loads((out / "passkey.json").read_text())
        plot([passkey.Cell(**{k: r[k] for k in fields}) for r in rows], out / "passkey.png")
        return 0
    task = passkey.Task.load(TRAINED / "task.json")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = export_all(TRAINED / "model", Path(tmp), max(args.lengths) + 8)
        engines = {name: MesaEngine.load(d) for name, d in dirs.items()}
        cells = passkey.run(engines, task, args.lengths, passkey.MODES, args.n, args.seed)
    (out / "passkey.md").write_text(passkey.table(cells) + "\n")
    (out / "passkey.json").write_text(json.dumps([c.row() for c in cells], indent=1))
    plot(cells, out / "passkey.png")
    print(passkey.table(cells))
    print(f"wrote {out}/passkey.md, passkey.json, passkey.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

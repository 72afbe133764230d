"""The benchmark's report: the DESIGN.md targets, the markdown tables and the plot, from bench.json."""

from __future__ import annotations

from pathlib import Path

from scripts.bench_model import decode_bytes, prefill_flops
from scripts.bench_workers import log

FULL_ATTENTION = ("transformers-sdpa", "ort-genai")
LABELS = {"ours": "ours (ORT CPU, Mesa)", "ours-grouped": "ours, Mesa CPU decode kernel",
          "ours-kernels": "ours, Mesa CPU kernels", "ours-portable": "ours, portable graph (Mesa)", "transformers-sdpa": "transformers sdpa (full)",
          "reference-mesa": "PyTorch reference (Mesa)", "ort-genai": "onnxruntime-genai (GQA, full)"}


def _points(results) -> dict[tuple[str, int], dict]:
    return {(p["method"], p["length"]): p for p in results["points"]}


def targets(results, method: str = "ours") -> list[dict]:
    """The DESIGN.md targets for `method` (ours, ours-grouped, ours-kernels) at the longest length measured (12k when present)."""
    pts = _points(results)
    if method != "ours":  # the same rows for another of our engines: its points stand in for ours
        pts = {k: p for k, p in pts.items() if k[0] != "ours"} | {("ours", L): p for (m, L), p in pts.items() if m == method}
    ok = lambda p: p is not None and "error" not in p  # noqa: E731
    lengths = sorted({p["length"] for p in results["points"] if ok(p) and p["method"] == method})
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
    for method in ("ours", "ours-grouped", "ours-kernels"):
        rows = targets(results, method)
        if not rows:
            continue
        out += ["", f"**Targets (DESIGN.md, for `{method}`)**", "", "| target | value | goal | met | measured |",
                "|---|---:|---:|:---:|---|"]
        for r in rows:
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

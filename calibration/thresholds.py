"""The paper's threshold analysis: do a layer's hidden states leave their trained range where plain RoPE fails?

    python -m calibration.thresholds CHECKPOINT_OR_ENGINE [--layer 2] [--lengths 64,128,...] [--out DIR]

Mesa-Extrapolation's argument (arXiv 2410.15859, section 3) is that extrapolation fails when the hidden
state of particular dimensions in an early layer crosses a threshold that it never crosses inside the
trained length, and that Stair PE keeps it below. This measures that on a checkpoint:

1. For each prompt length L (random token prompts, --prompts per length), the hidden state of the last
   prompt token at the output of decoder layer `--layer` (0-based index into model.layers; default 2),
   under plain RoPE (origin: full attention) and under Mesa (the engine's parameters, or the defaults),
   computed by the PyTorch reference decoder (export/model.py) walked through each method's real plan.
2. The dimensions: those whose origin value moves most between L = T and the longest length, in units
   of their spread over prompts at lengths <= T (--dims of them).
3. Per dimension, the threshold: the trained envelope, i.e. the most extreme value (in the direction it
   drifts) over all prompts at lengths <= T. The predicted failure length of origin is the first L > T
   whose mean crosses it; Mesa is checked against the same threshold.
4. A recommendation: among candidate push widths pw (W0 = T), the smallest whose Mesa hidden states stay
   inside every threshold at every length (the least positional compression that stays in range).

Writes thresholds.json, thresholds.md and thresholds.png into --out. An engine directory is read for its
Mesa parameters and the checkpoint path its manifest records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def hidden_states(path: Path, config, params, method: str, lengths: list[int], prompts: np.ndarray,
                  layer: int) -> np.ndarray:
    """[lengths, prompts, hidden]: the last prompt token's hidden state at the output of model.layers[layer],
    each prompt run by its method's plan (runtime.mesa.prefill_steps) on the PyTorch reference decoder."""
    from export import onnx_export
    from export.reference import TorchStep
    from runtime import mesa, scheduler
    from runtime.kv_cache import KVCache

    lm = onnx_export.build_model(path, config, params, method, max(lengths), "fp32")
    model, step = lm.model, TorchStep(lm.model)
    captured = []
    hook = model.model.layers[layer].register_forward_hook(lambda m, i, out: captured.append(out[0][0, -1]))
    cache_shape = lm.cache_shape
    g = mesa.graph_params(params, method, lm.max_len)
    out = np.zeros((len(lengths), len(prompts), model.args.hidden_size), np.float32)
    try:
        for i, L in enumerate(lengths):
            for j, ids in enumerate(prompts):
                captured.clear()
                scheduler.prefill(step, ids[:L], mesa.prefill_steps(L, g, method), KVCache(cache_shape),
                                  all_logits=False)
                out[i, j] = captured[-1].float().numpy()  # the last call holds the last token
    finally:
        hook.remove()
    return out


def pick_dims(origin: np.ndarray, lengths: list[int], T: int, n: int) -> list[int]:
    """The n dimensions whose origin mean moves most from L = T (or the longest L <= T) to the longest L,
    in units of their spread over prompts and lengths <= T."""
    inside = [i for i, L in enumerate(lengths) if L <= T]
    ref = origin[inside[-1]].mean(axis=0)
    spread = origin[inside].reshape(-1, origin.shape[-1]).std(axis=0) + 1e-6
    score = np.abs(origin[-1].mean(axis=0) - ref) / spread
    return [int(d) for d in np.argsort(-score)[:n]]


def thresholds(origin: np.ndarray, lengths: list[int], T: int, dims: list[int]) -> list[dict]:
    """Per dim: the drift direction, the trained envelope (threshold) and where origin's mean crosses it."""
    inside = [i for i, L in enumerate(lengths) if L <= T]
    rows = []
    for d in dims:
        sign = 1.0 if origin[-1, :, d].mean() >= origin[inside[-1], :, d].mean() else -1.0
        limit = float((sign * origin[inside, :, d]).max())
        mean = sign * origin[:, :, d].mean(axis=1)
        crossed = [L for L, m in zip(lengths, mean) if L > T and m > limit]
        rows.append({"dim": d, "direction": "up" if sign > 0 else "down", "threshold": sign * limit,
                     "origin_crosses_at": crossed[0] if crossed else None})
    return rows


def excursion(values: np.ndarray, rows: list[dict]) -> float:
    """The largest (mean - threshold) over lengths and dims, in the drift direction, relative to the
    threshold's magnitude: <= 0 means inside every trained envelope."""
    worst = -np.inf
    for r in rows:
        sign = 1.0 if r["direction"] == "up" else -1.0
        mean = sign * values[:, :, r["dim"]].mean(axis=1)
        worst = max(worst, float((mean - sign * r["threshold"]).max() / (abs(r["threshold"]) + 1e-6)))
    return worst


def analyse(source: str | Path, layer: int = 2, lengths: list[int] | None = None, n_prompts: int = 8,
            n_dims: int = 4, push_widths: list[int] | None = None, seed: int = 0, log=print) -> dict:
    from export import loading
    from runtime import mesa

    path, params = resolve(source)
    config = loading.load_config(path)
    T = params.train_length
    lengths = sorted(lengths or [T // 4, T // 2, 3 * T // 4, T, 3 * T // 2, 2 * T, 3 * T, 4 * T, 6 * T, 8 * T])
    if lengths[0] > T or lengths[-1] <= T:
        raise ValueError(f"--lengths must include lengths <= T={T} and beyond it, got {lengths}")
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"--layer {layer} is not a layer of this model (0..{config.num_hidden_layers - 1})")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(min(3, config.vocab_size - 1), config.vocab_size, (n_prompts, lengths[-1]))
    log(f"origin: hidden states of layer {layer} at {len(lengths)} lengths x {n_prompts} prompts")
    origin = hidden_states(path, config, params, "origin", lengths, prompts, layer)
    dims = pick_dims(origin, lengths, T, n_dims)
    rows = thresholds(origin, lengths, T, dims)
    curves = {"origin": origin}
    candidates = sorted(set(push_widths or [p for p in (2, 4, 8, 16, 32, 64) if p < T]) | {params.push_width})
    inside = {}
    for pw in candidates:
        p = mesa.MesaParams(**{**params.as_dict(), "push_width": pw})
        log(f"mesa pw={pw}: hidden states")
        curves[f"mesa pw={pw}"] = hidden_states(path, config, p, "mesa", lengths, prompts, layer)
        inside[pw] = excursion(curves[f"mesa pw={pw}"], rows)
    ok = [pw for pw in candidates if inside[pw] <= 0]
    return {"checkpoint": str(path), "layer": layer, "train_length": T, "params": params.as_dict(),
            "lengths": lengths, "prompts": n_prompts, "dims": rows,
            "origin_excursion": excursion(origin, rows), "mesa_excursion": {str(k): v for k, v in inside.items()},
            "recommended": {"push_width": min(ok) if ok else None, "chunk_width": T},
            "means": {name: v.mean(axis=1)[:, dims].tolist() for name, v in curves.items()}}


def resolve(source: str | Path):
    """(checkpoint path, Mesa parameters): an engine directory's recorded checkpoint and parameters, or a
    checkpoint (folder or alias) with its preset / default parameters."""
    from export import loading
    from runtime import mesa
    from runtime.artifact import MANIFEST, load_manifest

    source = Path(source)
    if (source / MANIFEST).is_file():
        m = load_manifest(source)
        path = Path(m.source["path"])
        if not path.is_dir():
            raise ValueError(f"{source} was exported from {path}, which is not here any more: give the checkpoint")
        return path, m.mesa_params
    path, alias = loading.resolve_model(str(source))
    config = loading.load_config(path)
    return path, mesa.default_params(config.max_position_embeddings, alias and alias.params)


def markdown(r: dict) -> str:
    lines = [f"Layer {r['layer']} (0-based), T = {r['train_length']}, {r['prompts']} random prompts per length; "
             f"Mesa parameters {r['params']}.", "",
             "| dim | drifts | threshold (trained envelope) | origin crosses at |", "|---:|---|---:|---:|"]
    for d in r["dims"]:
        lines.append(f"| {d['dim']} | {d['direction']} | {d['threshold']:.4g} | {d['origin_crosses_at'] or 'never'} |")
    lines += ["", "| engine | largest excursion past a threshold (relative; <= 0: inside) |", "|---|---:|",
              f"| origin | {r['origin_excursion']:.3f} |"]
    lines += [f"| mesa pw={pw} | {x:.3f} |" for pw, x in r["mesa_excursion"].items()]
    rec = r["recommended"]
    lines += ["", f"Recommended: push_width {rec['push_width']} with W0 = T = {rec['chunk_width']}" if rec["push_width"]
              else "No candidate push width keeps every dimension inside its trained envelope."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = r["dims"]
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    for k, (ax, d) in enumerate(zip(axes[0], dims)):
        for name, means in r["means"].items():
            ax.plot(r["lengths"], [m[k] for m in means], "o-" if name == "origin" else ".-", label=name,
                    lw=2 if name == "origin" else 1)
        ax.axhline(d["threshold"], color="k", ls="--", lw=1, label="threshold")
        ax.axvline(r["train_length"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"layer {r['layer']}, dim {d['dim']}")
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("hidden state (mean over prompts)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration.thresholds", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CHECKPOINT_OR_ENGINE", help="a checkpoint folder or alias, or an engine directory")
    p.add_argument("--layer", type=int, default=2, help="decoder layer whose output is read (0-based, default 2)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="prompt lengths, comma separated (default T/4 .. 8T)")
    p.add_argument("--prompts", type=int, default=8, help="random prompts per length (default 8)")
    p.add_argument("--dims", type=int, default=4, help="dimensions analysed (default 4)")
    p.add_argument("--push-widths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="candidate pw for the recommendation (default 2,4,...,64 below T)")
    p.add_argument("--out", default="thresholds_out", help="output folder (default thresholds_out/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from export.loading import ModelLoadError
    from runtime.artifact import ArtifactError
    from runtime.mesa import MesaParamError

    try:
        result = analyse(args.source, args.layer, args.lengths, args.prompts, args.dims, args.push_widths,
                         log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError, ModelLoadError, ArtifactError, MesaParamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thresholds.json").write_text(json.dumps(result, indent=1))
    (out / "thresholds.md").write_text(markdown(result))
    plot(result, out / "thresholds.png")
    print(markdown(result))
    print(f"wrote {out}/thresholds.json, thresholds.md, thresholds.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

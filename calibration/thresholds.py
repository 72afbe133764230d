"""The paper's threshold analysis: do a layer's hidden states leave their trained range where plain RoPE fails?

    python -m calibration.thresholds CHECKPOINT_OR_ENGINE [--layer 2] [--length 2048] [--out DIR]

Mesa-Extrapolation's argument (arXiv 2410.15859, section 3) is that extrapolation fails when the hidden
state of particular dimensions in an early layer crosses a threshold it never crosses inside the trained
length, and that Stair PE keeps it below. This measures that on a checkpoint:

1. --prompts random token prompts of --length tokens (default 8 T); the hidden state at the output of
   decoder layer `--layer` (0-based index into model.layers; default 2) at every position, under plain
   RoPE (origin: full attention) and under Mesa (the engine's parameters, or the defaults), computed by the
   PyTorch reference decoder (export/model.py) walked through each method's real plan (under Mesa a
   position's state is computed by the call its chunk belongs to, as the engine computes it).
2. Positions are binned (--bin tokens, default T/4) and averaged over prompts and the bin.
3. The dimensions: those whose origin mean moves most between the positions below T and those beyond 2T,
   in units of their spread over the bins below T (--dims of them).
4. Per dimension, the threshold: the most extreme binned mean below T, in the direction the dimension
   drifts. The predicted failure point of origin is the first bin past T whose mean crosses it; Mesa is
   held against the same threshold.
5. Mesa is judged where it acts: the positions of the prompt's last chunk (full context, stair positions,
   log-n > 1; its first and middle chunks see fewer than T keys at plain positions, inside the trained
   regime by construction), against origin at the same positions. A recommendation: among candidate
   push widths pw (W0 = T), the smallest that keeps every dimension inside its threshold there (the
   least positional compression that stays in range), or none.

Writes thresholds.json, thresholds.md and thresholds.png into --out. An engine directory is read for its
Mesa parameters and the checkpoint path its manifest records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def hidden_states(path: Path, config, params, method: str, prompts: np.ndarray, layer: int) -> np.ndarray:
    """[prompts, length, hidden]: the output of model.layers[layer] at every position of each prompt, run
    by its method's plan (runtime.mesa.prefill_steps) on the PyTorch reference decoder."""
    from export import onnx_export
    from export.reference import TorchStep
    from runtime import mesa, scheduler
    from runtime.kv_cache import KVCache

    n, length = prompts.shape
    lm = onnx_export.build_model(path, config, params, method, length, "fp32")
    model, step = lm.model, TorchStep(lm.model)
    captured = []
    hook = model.model.layers[layer].register_forward_hook(lambda m, i, out: captured.append(out[0][0].float()))
    plan = mesa.prefill_steps(length, mesa.graph_params(params, method, lm.max_len), method)
    out = np.zeros((n, length, model.args.hidden_size), np.float32)
    try:
        for j, ids in enumerate(prompts):
            captured.clear()
            scheduler.prefill(step, ids, plan, KVCache(lm.cache_shape), all_logits=False)
            out[j] = np.concatenate([c.numpy() for c in captured])  # the calls cover [0, length) in order
    finally:
        hook.remove()
    return out


def binned(states: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin starts, [bins, hidden] means over prompts and the positions of each bin)."""
    n, length, h = states.shape
    starts = np.arange(0, length - width + 1, width)
    return starts, np.stack([states[:, s:s + width].mean(axis=(0, 1)) for s in starts])


def pick_dims(starts: np.ndarray, origin: np.ndarray, T: int, n: int) -> list[int]:
    inside, far = starts + (starts[1] - starts[0]) <= T, starts >= 2 * T
    spread = origin[inside].std(axis=0) + 1e-6
    score = np.abs(origin[far].mean(axis=0) - origin[inside].mean(axis=0)) / spread
    return [int(d) for d in np.argsort(-score)[:n]]


def thresholds(starts: np.ndarray, origin: np.ndarray, T: int, dims: list[int]) -> list[dict]:
    """Per dim: the drift direction, the threshold (the trained range's extreme) and where origin crosses it."""
    width = int(starts[1] - starts[0])
    inside, beyond = starts + width <= T, starts >= T
    rows = []
    for d in dims:
        sign = 1.0 if origin[beyond, d].mean() >= origin[inside, d].mean() else -1.0
        limit = float((sign * origin[inside, d]).max())
        crossed = [int(s) for s, m in zip(starts[beyond], sign * origin[beyond, d]) if m > limit]
        rows.append({"dim": d, "direction": "up" if sign > 0 else "down", "threshold": sign * limit,
                     "origin_crosses_at": crossed[0] if crossed else None})
    return rows


def excursion(values: np.ndarray, rows: list[dict]) -> float:
    """The largest (mean - threshold) over `values` ([positions or bins, hidden]) and the dims, in the drift
    direction, relative to the threshold's magnitude: <= 0 means inside every threshold."""
    worst = -np.inf
    for r in rows:
        sign = 1.0 if r["direction"] == "up" else -1.0
        gap = (sign * values[:, r["dim"]] - sign * r["threshold"]).max()
        worst = max(worst, float(gap / (abs(r["threshold"]) + 1e-6)))
    return worst


def analyse(source: str | Path, layer: int = 2, length: int | None = None, n_prompts: int = 32, n_dims: int = 4,
            push_widths: list[int] | None = None, bin_width: int | None = None, seed: int = 0, log=print) -> dict:
    """The analysis; see the module docstring. Mesa is judged where its method acts: the positions of the
    prompt's last chunk (full context, stair positions, log-n > 1); its first and middle chunks are
    computed over fewer than T keys at plain positions, inside the trained regime by construction."""
    from export import loading
    from runtime import mesa

    path, params = resolve(source)
    config = loading.load_config(path)
    T = params.train_length
    length = length or 8 * T
    width = bin_width or max(1, T // 4)
    if length < 3 * T:
        raise ValueError(f"--length must be at least 3 T = {3 * T} (positions below T, and beyond 2 T, are compared)")
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"--layer {layer} is not a layer of this model (0..{config.num_hidden_layers - 1})")
    prompts = np.random.default_rng(seed).integers(min(3, config.vocab_size - 1), config.vocab_size, (n_prompts, length))
    log(f"origin: layer {layer} hidden states at {length} positions x {n_prompts} prompts")
    raw = hidden_states(path, config, params, "origin", prompts, layer)
    starts, origin = binned(raw, width)
    dims = pick_dims(starts, origin, T, n_dims)
    rows = thresholds(starts, origin, T, dims)
    candidates = sorted(set(push_widths or [p for p in (2, 4, 8, 16, 32, 64) if p < T]) | {params.push_width})
    first_last = mesa.prefill_steps(length, params)[-1].start  # DynamicSplit does not use pw: one last chunk for all
    curves = {"origin": origin}
    last_chunk = {"origin": raw[:, first_last:].mean(axis=0)}  # [positions, hidden]: mean over prompts
    for pw in candidates:
        p = mesa.MesaParams(**{**params.as_dict(), "push_width": pw})
        log(f"mesa pw={pw}: hidden states")
        states = hidden_states(path, config, p, "mesa", prompts, layer)
        curves[f"mesa pw={pw}"] = binned(states, width)[1]
        last_chunk[f"mesa pw={pw}"] = states[:, first_last:].mean(axis=0)
    excursions = {name: excursion(v, rows) for name, v in last_chunk.items()}
    ok = [pw for pw in candidates if excursions[f"mesa pw={pw}"] <= 0]
    return {"checkpoint": str(path), "layer": layer, "train_length": T, "params": params.as_dict(),
            "length": length, "bin": width, "prompts": n_prompts, "dims": rows, "last_chunk_start": first_last,
            "last_chunk_excursion": excursions,
            "recommended": {"push_width": min(ok) if ok else None, "chunk_width": T},
            "bins": starts.tolist(), "means": {name: v[:, dims].tolist() for name, v in curves.items()},
            "last_chunk_means": {name: v[:, dims].mean(axis=0).tolist() for name, v in last_chunk.items()}}


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
    lines = [f"Layer {r['layer']} (0-based), T = {r['train_length']}, {r['prompts']} random prompts of {r['length']} "
             f"tokens, positions in bins of {r['bin']}; Mesa parameters {r['params']}.", "",
             "| dim | drifts | threshold (trained range's extreme) | origin crosses at position |",
             "|---:|---|---:|---:|"]
    for d in r["dims"]:
        lines.append(f"| {d['dim']} | {d['direction']} | {d['threshold']:.4g} | {d['origin_crosses_at'] or 'never'} |")
    names = list(r["last_chunk_means"])
    lines += ["", f"The last chunk (positions {r['last_chunk_start']}..{r['length'] - 1}, where Mesa's stair positions act): "
              "mean hidden state per dim, and the largest excursion past a threshold (relative; <= 0: inside).", "",
              "| engine | " + " | ".join(f"dim {d['dim']}" for d in r["dims"]) + " | excursion |",
              "|---|" + "---:|" * (len(r["dims"]) + 1)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["last_chunk_means"][name])
                     + f" | {r['last_chunk_excursion'][name]:.3f} |")
    rec = r["recommended"]
    lines += ["", f"Recommended: push_width {rec['push_width']} with W0 = T = {rec['chunk_width']}" if rec["push_width"]
              else "No candidate push width keeps every dimension inside its threshold in the last chunk."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = r["dims"]
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    for k, (ax, d) in enumerate(zip(axes[0], dims)):
        for name, means in r["means"].items():
            ax.plot(r["bins"], [m[k] for m in means], "-", label=name, lw=2.2 if name == "origin" else 1)
        ax.axhline(d["threshold"], color="k", ls="--", lw=1, label="threshold")
        ax.axvline(r["train_length"], color="grey", ls=":", lw=1)
        ax.set_title(f"layer {r['layer']}, dim {d['dim']}")
        ax.set_xlabel("position")
    axes[0][0].set_ylabel(f"hidden state (mean over prompts, bins of {r['bin']})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration.thresholds", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CHECKPOINT_OR_ENGINE", help="a checkpoint folder or alias, or an engine directory")
    p.add_argument("--layer", type=int, default=2, help="decoder layer whose output is read (0-based, default 2)")
    p.add_argument("--length", type=int, default=None, help="prompt tokens (default 8 T; at least 3 T)")
    p.add_argument("--bin", type=int, default=None, help="positions averaged per point (default T/4)")
    p.add_argument("--prompts", type=int, default=32, help="random prompts (default 32)")
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
        result = analyse(args.source, args.layer, args.length, args.prompts, args.dims, args.push_widths, args.bin,
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

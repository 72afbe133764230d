"""Calibration data: activation statistics of an exported engine, per Mesa phase.

    python -m calibration.data ENGINE --text-file corpus.txt --lengths 512,2048 [--out DIR]
    python -m calibration.data ENGINE --ids-file prompts.json   # a JSON list of token-id lists

Mesa feeds the decoder layers in regimes a calibration set must cover separately: the first chunk and
the middle chunks (restricted context, plain positions, log-n = 1) and the last chunk and decode steps
(every earlier token, stair positions, log-n > 1). Each prompt runs through the engine's real Mesa plan
(runtime.mesa.prefill_steps, then decode steps on the in-place decode cache, exactly as MesaEngine runs
it) on a copy of model.onnx whose linear-layer inputs (every MatMul with a constant weight) are extra
graph outputs. For each such activation and each phase (first / middle / last / decode) it records the
largest |x|, a high percentile of |x| and the per-token spread (largest per-token max over the median
per-token max: how far outlier tokens sit above the rest).

What a quantizer learns from it (`clipping`): the fraction of activations that a static int8 scale
calibrated on one phase would clip in another. That is the measurement behind the int8 choice in
graph_ops/precision.py: activations are quantized per call (dynamic), not with static scales.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PHASES = ("first", "middle", "last", "decode")
PERCENTILE = 99.9


@dataclass
class Stats:
    """Running statistics of one activation in one phase (|x| over every element seen)."""

    calls: int = 0
    elements: int = 0
    lowest: float = float("inf")
    highest: float = float("-inf")
    absmax: float = 0.0
    percentile: list[float] = field(default_factory=list)  # per call: the PERCENTILE-th percentile of |x|
    token_spread: list[float] = field(default_factory=list)  # per call with > 1 token
    sample: list[float] = field(default_factory=list)  # a bounded random sample of |x|, for clipping estimates

    def add(self, x: np.ndarray, rng: np.random.Generator, keep: int = 4096) -> None:
        if x.size == 0:  # e.g. an empty window: nothing seen
            return
        x = x.astype(np.float32)
        with np.errstate(over="ignore"):  # attention masks hold float32's lowest value
            self._add(x, rng, keep)

    def _add(self, x: np.ndarray, rng: np.random.Generator, keep: int) -> None:
        a = np.abs(x).reshape(-1, x.shape[-1]) if x.ndim else np.abs(x).reshape(1, 1)  # [tokens, features]
        self.calls += 1
        self.lowest, self.highest = min(self.lowest, float(x.min())), max(self.highest, float(x.max()))
        self.elements += a.size
        self.absmax = max(self.absmax, float(a.max()))
        self.percentile.append(float(np.percentile(a, PERCENTILE)))
        per_token = a.max(axis=1)
        if len(per_token) > 1:
            self.token_spread.append(float(per_token.max() / max(np.median(per_token), 1e-30)))
        flat = a.reshape(-1)
        self.sample.extend(rng.choice(flat, size=min(keep, flat.size), replace=False).tolist())
        if len(self.sample) > keep:  # a bounded sample over all calls
            self.sample = rng.choice(np.asarray(self.sample), size=keep, replace=False).tolist()

    def summary(self) -> dict:
        return {"calls": self.calls, "elements": self.elements, "lowest": self.lowest, "highest": self.highest,
                "absmax": self.absmax,
                f"p{PERCENTILE:g}": float(np.median(self.percentile)) if self.percentile else 0.0,
                "token_spread": float(np.median(self.token_spread)) if self.token_spread else 1.0}


def linear_inputs(model) -> dict[str, str]:
    """activation tensor -> the modules it feeds (comma separated, from the exporter's name scopes, else the
    weight's name), for every MatMul whose second input is a constant: the linear layers (q/k/v/o
    projections, the MLP, lm_head)."""
    found: dict[str, list[str]] = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
            found.setdefault(node.inputs[0].name, []).append(_module(node))
    return {name: ",".join(modules) for name, modules in found.items()}


def _module(node) -> str:
    """model.layers.0.self_attn.q_proj for the MatMul of that nn.Linear (torch.onnx records the scopes)."""
    try:  # a Python list literal, e.g. "['', 'model.layers.0', ..., 'model.layers.0.self_attn.q_proj', 'linear']"
        return ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", ""))[-2]
    except (ValueError, SyntaxError, IndexError, TypeError):
        return node.inputs[1].name


def float_tensors(model) -> dict[str, str]:
    """Every float tensor a node of the main graph computes (what TensorRT's INT8 calibration table
    covers), each mapped to the op that computes it."""
    return {v.name: node.op_type for node in model.graph for v in node.outputs
            if v.name and v.dtype is not None and v.dtype.is_floating_point()}


def tapped_model(engine: Path, work: Path, every: bool = False) -> tuple[Path, dict[str, str]]:
    """A copy of the engine's model.onnx with every linear-layer input (or, `every`, every float tensor)
    as an extra graph output."""
    import onnx_ir as ir

    from runtime.artifact import MODEL_FILE

    model = ir.load(engine / MODEL_FILE)
    taps = float_tensors(model) if every else linear_inputs(model)
    outputs = {v.name for v in model.graph.outputs}
    taps = {k: v for k, v in taps.items() if k not in outputs}
    if not taps:
        raise ValueError(f"{engine / MODEL_FILE} has no MatMul with a constant weight: nothing to calibrate "
                         "(a quantized engine? calibrate its float export)")
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    for name in taps:
        model.graph.outputs.append(values[name])
    path = work / MODEL_FILE
    ir.save(model, path, external_data=MODEL_FILE + ".data")
    return path, taps


def collect(engine: str | Path, prompts: list[list[int]], decode_tokens: int = 8, seed: int = 0,
            progress=None, every: bool = False) -> dict:
    """Run every prompt by the engine's Mesa plan on a tapped copy of its graph: all but its last
    `decode_tokens` tokens as the prompt, those as decode steps (teacher forcing: real continuations,
    each consumed by a real decode step). Returns {"taps": {activation: weight}, "stats": {activation:
    {phase: summary}}, "samples": {activation: {phase: |x| sample}}, ...}."""
    from runtime import mesa
    from runtime.artifact import load_manifest
    from runtime.backends import OrtStep
    from runtime.batch_decoder import make_decoder
    from runtime.sequence import replay

    engine = Path(engine)
    manifest = load_manifest(engine)
    params = mesa.graph_params(manifest.mesa_params, manifest.method, manifest.max_len)
    rng = np.random.default_rng(seed)
    stats: dict[str, dict[str, Stats]] = {}
    for i, ids in enumerate(prompts):
        if len(ids) <= decode_tokens:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: it needs more than --decode-tokens {decode_tokens}")
        if len(ids) > manifest.max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the engine's max_len {manifest.max_len}")
        bad = [t for t in ids if not 0 <= t < manifest.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {manifest.vocab_size})")

    class Recorder(OrtStep):
        def _record(self, phase: str) -> None:
            for name, x in self.tapped.items():
                stats.setdefault(name, {}).setdefault(phase, Stats()).add(x, rng)

        def __call__(self, input_ids, step, logits_to_keep, cache):
            out = super().__call__(input_ids, step, logits_to_keep, cache)
            self._record("first" if step.kind == "full" else step.kind)  # origin: plain positions, every call sees all
            return out

        def decode(self, tokens, positions, first_row=0):
            out = super().decode(tokens, positions, first_row)
            self._record("decode")
            return out

    with tempfile.TemporaryDirectory() as tmp:
        path, taps = tapped_model(engine, Path(tmp), every)
        step = Recorder(path)
        step.taps = tuple(taps)
        for i, ids in enumerate(prompts):
            prompt, fed = np.asarray(ids[:-decode_tokens], np.int64), [int(t) for t in ids[-decode_tokens:]]
            decoder = make_decoder(step, manifest.cache_shape, 1, engine, params)
            replay(step, decoder, prompt, mesa.prefill_steps(len(prompt), params, manifest.method), fed)
            if progress is not None:
                progress(i + 1, len(prompts))
    return {"engine": str(engine), "method": manifest.method, "params": manifest.params, "taps": taps,
            "prompt_tokens": [len(p) for p in prompts], "decode_tokens": decode_tokens,
            "stats": {name: {ph: s.summary() for ph, s in by_phase.items()} for name, by_phase in stats.items()},
            "samples": {name: {ph: s.sample for ph, s in by_phase.items()} for name, by_phase in stats.items()}}


def clipping(data: dict, calibrated_on: tuple[str, ...] = ("first", "middle")) -> dict[str, dict[str, float]]:
    """Per phase, over every activation: the fraction of sampled |x| above the int8 range of a static
    scale calibrated on the phases `calibrated_on` (their largest |x|), and the median ratio of that
    phase's largest |x| to the calibrated one. {phase: {"clipped": f, "absmax_ratio": r}}."""
    out: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        clipped, total, ratios = 0, 0, []
        for name, by_phase in data["stats"].items():
            limit = max((by_phase[p]["absmax"] for p in calibrated_on if p in by_phase), default=0.0)
            if phase not in by_phase or limit == 0.0:
                continue
            sample = np.asarray(data["samples"][name][phase])
            clipped += int((sample > limit).sum())
            total += sample.size
            ratios.append(by_phase[phase]["absmax"] / limit)
        if total:
            out[phase] = {"clipped": clipped / total, "absmax_ratio": float(np.median(ratios))}
    return out


def phase_table(data: dict) -> str:
    """Markdown: per phase, the median over activations of absmax, the high percentile, the token spread,
    and what a static scale from the first and middle chunks would clip."""
    clip = clipping(data)
    lines = [f"| phase | activations | calls | median absmax | median p{PERCENTILE:g} | median token spread | "
             "absmax / first+middle absmax | clipped by a first+middle static scale |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in PHASES:
        rows = [by[phase] for by in data["stats"].values() if phase in by]
        if not rows:
            continue
        c = clip.get(phase, {"clipped": float("nan"), "absmax_ratio": float("nan")})
        lines.append(f"| {phase} | {len(rows)} | {rows[0]['calls']} | {np.median([r['absmax'] for r in rows]):.3g} | "
                     f"{np.median([r[f'p{PERCENTILE:g}'] for r in rows]):.3g} | "
                     f"{np.median([r['token_spread'] for r in rows]):.2f} | {c['absmax_ratio']:.2f} | "
                     f"{100 * c['clipped']:.3f}% |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- CLI

def read_prompts(engine: Path, args) -> list[list[int]]:
    """Token-id prompts from --ids-file, or --text-file cut into --lengths (the engine's tokenizer)."""
    if args.ids_file:
        prompts = json.loads(Path(args.ids_file).read_text(encoding="utf-8"))
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)
                and all(isinstance(t, int) and not isinstance(t, bool) for p in prompts for t in p)):
            raise ValueError(f"{args.ids_file} must be a JSON list of non-empty lists of token ids")
        return prompts
    from runtime.engine import load_tokenizer

    tokenizer = load_tokenizer(engine)
    if tokenizer is None:
        raise ValueError(f"{engine} has no tokenizer.json: give --ids-file instead of --text-file")
    ids = tokenizer.encode(Path(args.text_file).read_text(encoding="utf-8")).ids
    prompts = []
    for L in args.lengths:
        if len(ids) < L:
            raise ValueError(f"{args.text_file} has {len(ids)} tokens, fewer than --lengths {L}")
        prompts += [ids[s:s + L] for s in range(0, len(ids) - L + 1, L)][:args.per_length]
    return prompts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration.data", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", metavar="ENGINE", help="a float engine directory (model.onnx + mesa.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", metavar="F", help="text cut into prompts of --lengths tokens")
    src.add_argument("--ids-file", metavar="F.json", help="a JSON list of token-id prompts")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512],
                   help="prompt lengths for --text-file, comma separated (default 512); past the engine's T "
                        "they run middle chunks and stairs")
    p.add_argument("--per-length", type=int, default=4, help="prompts per length (default 4)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="each prompt's last tokens, run as decode steps (default 8)")
    p.add_argument("--out", metavar="DIR", help="write calibration.json (the statistics per activation and phase) and "
                                                "calibration.md (the table printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from runtime.artifact import ArtifactError
    from runtime.errors import EngineError

    engine = Path(args.engine)
    try:
        prompts = read_prompts(engine, args)
        from tqdm import tqdm

        with tqdm(total=len(prompts), desc="calibration prompts", file=sys.stderr) as bar:
            data = collect(engine, prompts, args.decode_tokens, progress=lambda done, total: bar.update())
    except (ValueError, OSError, EngineError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = phase_table(data)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps({k: v for k, v in data.items() if k != "samples"}, indent=1))
        (out / "calibration.md").write_text(table)
        print(f"wrote {out / 'calibration.json'} and {out / 'calibration.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

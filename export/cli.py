"""`python export.py`: a Hugging Face checkpoint in, a Mesa-Extrapolation ONNX engine directory out."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from collections import Counter
from pathlib import Path

EXIT_BAD_INPUT = 2

PARAM_FLAGS = (  # flag, MesaParams field, paper symbol, help
    ("--train-length", "train_length", "T", "length the model was trained at; Stair PE and log-n start beyond it"),
    ("--first-chunk", "first_chunk", "F", "tokens of the first chunk, kept visible to every middle chunk"),
    ("--first-chunk-cache", "first_chunk_cache", "Fc", "first-chunk budget used by DynamicSplit to size chunks"),
    ("--last-context", "last_context", "C", "tokens DynamicSplit reserves for the last chunk"),
    ("--reserve-tokens", "reserve_tokens", "G", "tokens you plan to generate (planning only, not a limit)"),
    ("--push-width", "push_width", "pw", "keys per stair step of Stair PE (larger = more compression)"),
    ("--chunk-width", "chunk_width", "W0", "starting chunk width W for short prompts (default T)"),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a Llama-family checkpoint (Llama, Mistral, Qwen2) to an ONNX engine that runs "
                    "Mesa-Extrapolation: chunked prefill plus Stair PE, so prompts can exceed the trained "
                    "length without fine-tuning. Unset Mesa parameters come from the alias preset, else from "
                    "the paper's general setting scaled to the model's trained length (see README).",
        epilog="example: python export.py --model llama2-7b --max-len 12288 --out engines/llama2-7b-12k",
    )
    p.add_argument("--model", required=True,
                   help="alias (llama2-7b, tinyllama-1.1b, ...), a local HF folder, or an HF id in the local cache")
    p.add_argument("--max-len", type=int, required=True,
                   help="longest sequence (prompt + generated tokens) the engine serves; sizes the KV cache")
    p.add_argument("--out", required=True, help="engine directory to write (refused if it exists, see --force)")
    p.add_argument("--method", choices=("mesa", "origin"), default="mesa",
                   help="mesa (default, the published method) or origin (plain RoPE, full attention)")
    for flag, _, sym, text in PARAM_FLAGS:
        p.add_argument(flag, type=int, default=None, metavar=sym, help=f"{sym}: {text}")
    p.add_argument("--target", choices=("portable", "ort-cpu", "ort-cuda", "tensorrt"), default="ort-cpu",
                   help="backend the graph passes optimise for: ort-cpu (default), ort-cuda, tensorrt, or portable "
                        "(no passes: the MesaAttention function runs as is on any ONNX Runtime)")
    p.add_argument("--quantize", choices=("none", "int4"), default="none",
                   help="int4: weight-only int4 MatMulNBits (ort-cpu; faster decode, approximate logits)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weight/activation type (default fp16 for ort-cuda and tensorrt, else fp32)")
    p.add_argument("--opset", type=int, default=24, choices=(24,),
                   help="ONNX opset of the model and of the MesaAttention function body")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an engine directory or empty (never anything else)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnx.checker pass and the ONNX Runtime smoke step against the reference")
    return p


def check_lengths(args, params) -> None:
    from runtime import mesa

    if args.max_len < 1:
        raise mesa.MesaParamError(f"--max-len must be above zero, got {args.max_len}")
    if args.method == "mesa":
        if args.max_len < params.first_chunk:
            raise mesa.MesaParamError(f"--max-len {args.max_len} is smaller than the first chunk F={params.first_chunk}")
        for n in range(1, args.max_len + 1):  # every prompt the engine may receive must have a plan
            try:
                mesa.dynamic_split(n, params)
            except mesa.MesaParamError as e:
                raise mesa.MesaParamError(f"Mesa parameters {params.as_dict()} fail for a prompt of {n} tokens: {e}") from None


def quiet_libraries() -> None:
    """torch.onnx logs every torchvision op it skips and deprecation notes; users need none of it."""
    import logging
    import warnings

    import torch  # noqa: F401  (configures its loggers on import; ours must come after)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) ends an export exactly like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.target in ("ort-cuda", "tensorrt") else "fp32")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return export(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def preflight_checks(args, out: Path):
    """Everything that can refuse the export, cheapest first, before the weights are read: (path, alias,
    config, params). The --out checks come before torch is even imported."""
    from export import commit, loading, preflight

    path, alias = loading.resolve_model(args.model)
    for line in commit.sweep(out):  # first: it may put back an engine a dead export had moved aside
        print(line, file=sys.stderr)
    preflight.check_out(out, args.force, path)
    quiet_libraries()
    config = loading.load_config(path)
    for w in loading.check_supported(config):
        print(f"warning: {w}", file=sys.stderr)
    overrides = {field: getattr(args, field) for _, field, _, _ in PARAM_FLAGS}
    params = loading.default_params(config, alias, overrides)
    head_dim = loading.rope_config(config).head_dim
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    preflight.check_memory(args.max_len, head_dim, config.num_hidden_layers, kv_heads, args.dtype)
    check_lengths(args, params)  # O(max_len): after the memory check has refused absurd lengths
    shapes = loading.tensor_shapes(path)
    preflight.check_disk(out, preflight.engine_bytes(shapes, args.dtype, args.max_len, head_dim))
    return path, alias, config, params


def export(args) -> int:
    from export import commit, loading, preflight
    from runtime import mesa

    out = Path(args.out).expanduser().resolve()
    staging = bar = None
    try:
        path, alias, config, params = preflight_checks(args, out)
        from tqdm import tqdm

        from export import onnx_export, verify
        from graph_ops import pipeline

        staging = commit.stage(out)
        bar = tqdm(total=5, desc="export", unit="stage", file=sys.stderr,
                   bar_format="{desc}: {n_fmt}/{total_fmt} {bar} [{elapsed}]")

        def stage(name: str) -> None:
            bar.set_description(f"export: {name}")
            commit.fault(name)

        stage("load")
        lm = onnx_export.build_model(path, config, params, args.method, args.max_len, args.dtype, alias)
        bar.update()
        stage("trace")
        model = onnx_export.trace(lm)
        bar.update()
        stage("passes")
        passes = pipeline.run_passes(model, args.target, args.quantize,
                                     progress=lambda name: bar.set_description(f"export: passes ({name})"))
        bar.update()

        manifest = onnx_export.make_manifest(lm, model, args.model, passes, target=args.target)
        ops = Counter(n.op_type for n in model.graph)
        smoke = None if args.no_verify else verify.reference_run(lm)
        stage("save")
        onnx_export.write_engine(staging.path, model, path)
        model = lm = None  # free the weights before ONNX Runtime loads its own copy
        gc.collect()
        bar.update()
        stage("verify")
        check = verify.check_quantized if args.quantize != "none" else verify.check_engine
        report = "skipped (--no-verify)" if smoke is None else check(staging.path, smoke)
        onnx_export.write_manifest(staging.path, manifest)  # last: only a verified directory gets one
        bar.update()
        commit.commit(staging, args.force)
        bar.close()
        print(summary(out, manifest, ops, report))
        return 0
    except KeyboardInterrupt:
        return _end(bar, f"interrupted: {_outcome(staging, out)}", 130)
    except Exception as e:
        # modules not imported yet cannot have raised their errors (and importing them costs seconds)
        failed = getattr(sys.modules.get("export.verify"), "VerificationError", ())
        known = (loading.ModelLoadError, mesa.MesaParamError, preflight.Refused, OSError,
                 getattr(sys.modules.get("graph_ops.pipeline"), "PassError", ()))
        if isinstance(e, failed):
            return _end(bar, f"error: verification failed, {_outcome(staging, out)}: {e}", EXIT_BAD_INPUT)
        if not isinstance(e, known):
            raise  # a bug: keep its traceback
        return _end(bar, f"error: {e}" + (f" ({_outcome(staging, out)})" if staging else ""), EXIT_BAD_INPUT)
    finally:
        if staging is not None:
            staging.discard()


def _outcome(staging, out: Path) -> str:
    """Asked of the filesystem, not of how far the code got, so it is true even for a signal mid-commit."""
    written = staging is not None and staging.published()
    return f"the engine was written to {out}" if written else f"nothing written to {out}"


def _end(bar, line: str, code: int) -> int:
    if bar is not None:
        bar.close()
    print(line, file=sys.stderr)
    return code


def summary(out: Path, manifest, ops: Counter, report: str) -> str:
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
    p = manifest.params
    lines = [
        f"wrote {out} ({size / 2**20:.1f} MiB)",
        f"  method {manifest.method}, max_len {manifest.max_len}, dtype {manifest.dtype}, opset {manifest.opset}",
        f"  Mesa: T={p['train_length']} F={p['first_chunk']} Fc={p['first_chunk_cache']} C={p['last_context']} "
        f"G={p['reserve_tokens']} pw={p['push_width']} W0={p['chunk_width']}",
        f"  ops: {top}",
        f"  largest relative distance any step uses: {manifest.largest_distance}",
        f"  verify: {report}",
    ]
    if manifest.method == "mesa" and manifest.largest_distance >= p["train_length"]:
        lines.append(f"warning: distances up to {manifest.largest_distance} reach T={p['train_length']}: the model "
                     "never saw them in training; a larger --push-width compresses more")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

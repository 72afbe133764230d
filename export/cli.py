"""`python export.py`: a Hugging Face checkpoint in, a Mesa-Extrapolation ONNX engine directory out."""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from pathlib import Path

from export.api import (DECODE_KERNELS, INT4_BLOCK_SIZE, INT4_BLOCK_SIZES, METHODS, PRECISIONS,  # noqa: F401
                        PREFILL_KERNELS, TARGETS, default_precision, quiet_libraries)

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
# The other methods' parameters (runtime/methods.py PARAMETERS; defaults from T and max_len there).
METHOD_FLAGS = (("--window", "window", int, "W"), ("--leaky-k", "k", float, "K"), ("--group", "group", int, "G"),
                ("--sink", "sink", int, "N"), ("--block", "block", int, "C"), ("--factor", "factor", float, "X"))


class _Examples(argparse.HelpFormatter):
    """Wraps the description as usual but keeps the examples' lines as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a Llama-family checkpoint (Llama, Mistral, Qwen2) to an ONNX engine that runs "
                    "Mesa-Extrapolation: chunked prefill plus Stair PE, so prompts can exceed the trained "
                    "length without fine-tuning. Unset Mesa parameters come from the alias preset, else from "
                    "the paper's general setting scaled to the model's trained length (see README).",
        epilog="examples:\n  python export.py --model llama2-7b --max-len 12288 --out engines/llama2-7b-12k\n"
               "  python export.py --model llama2-7b --max-len 12288 --out engines/llama2-7b-12k-rerope "
               "--method rerope --window 512",
        formatter_class=_Examples,
    )
    p.add_argument("--model", required=True,
                   help="alias (llama2-7b, tinyllama-1.1b, ...), a local HF folder, or an HF id in the local cache")
    p.add_argument("--max-len", type=int, required=True,
                   help="longest sequence (prompt + generated tokens) the engine serves; sizes the KV cache")
    p.add_argument("--out", required=True, help="engine directory to write (refused if it exists, see --force)")
    p.add_argument("--method", choices=METHODS, default="mesa",
                   help="mesa (default, the published method); origin (plain RoPE, full attention); or one of "
                        "the baselines the paper compares against, with their own flags below: rerope, "
                        "leaky-rerope, self-extend, streaming-llm, lm-infinite, dynamic-ntk, yarn "
                        "(runtime/methods.py cites each definition)")
    mesa_flags = p.add_argument_group("Mesa parameters (--train-length is also the T every other method starts from)")
    for flag, _, sym, text in PARAM_FLAGS:
        mesa_flags.add_argument(flag, type=int, default=None, metavar=sym, help=f"{sym}: {text}")
    from runtime.methods import PARAMETERS

    other = p.add_argument_group("parameters of the other methods (unset: the defaults runtime/methods.py "
                                 "derives from T and --max-len)")
    for flag, field, kind, sym in METHOD_FLAGS:
        other.add_argument(flag, type=kind, default=None, dest=f"method_{field}", metavar=sym, help=PARAMETERS[field])
    p.add_argument("--target", choices=TARGETS, default="ort-cpu",
                   help="backend the graph passes optimise for: ort-cpu (default), ort-cuda, tensorrt, or portable "
                        "(no passes: the MesaAttention function runs as is on any ONNX Runtime)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 | fp16 | bf16: a float engine of that type (default fp16 for ort-cuda and tensorrt, "
                        "else fp32). int8: MatMul weights int8 per channel, activations quantized per call "
                        "(faster prefill); int4: weights int4 in blocks along K (MatMulNBits; faster decode); "
                        "int8-int4: both in one engine, int8 for prefill steps and int4 for decode steps. "
                        "Quantized engines keep the rest in fp32, are for --target ort-cpu and give "
                        "approximate logits")
    p.add_argument("--int4-block-size", type=int, choices=INT4_BLOCK_SIZES, default=None, metavar="B",
                   help=f"int4 and int8-int4: weights per int4 scale along K, one of "
                        f"{', '.join(map(str, INT4_BLOCK_SIZES))} (default {INT4_BLOCK_SIZE}; smaller blocks are "
                        f"closer to fp32, larger ones decode faster: the scales are fewer bytes to read)")
    p.add_argument("--decode-kernel", choices=DECODE_KERNELS, default="gqa",
                   help="the in-place decode attention of --target ort-cpu: gqa (default; ONNX Runtime's "
                        "GroupQueryAttention) or grouped (the Mesa CPU kernel, runtime/ops: each KV head's cache read "
                        "once per step instead of once per query head; faster decode at long context and in batches; "
                        "build it first with `bash scripts/build_cpp.sh`; the engine then needs it wherever it runs)")
    p.add_argument("--prefill-kernel", choices=PREFILL_KERNELS, default="gqa",
                   help="the attention of prefill chunks for --target ort-cpu: gqa (default; ONNX Runtime's "
                        "GroupQueryAttention, which materialises every head's probabilities) or tiled (the Mesa CPU "
                        "kernel, runtime/ops: tiles of queries against blocks of keys with an online softmax; faster "
                        "long prefills on AVX-512 CPUs, measured in runtime/README.md; same library as grouped)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is an engine directory or empty (never anything else)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnx.checker pass and the ONNX Runtime smoke step against the reference")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, docker stop) ends an export exactly like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.precision = args.precision or default_precision(args.target)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return export(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def api_kwargs(args) -> dict:
    """export.api.export_engine's keyword arguments for parsed export.py arguments (all but model and out)."""
    return dict(max_len=args.max_len, method=args.method, params={f: getattr(args, f) for _, f, _, _ in PARAM_FLAGS},
                target=args.target, precision=args.precision, force=args.force,
                verify=not args.no_verify, decode_kernel=args.decode_kernel, prefill_kernel=args.prefill_kernel,
                int4_block_size=args.int4_block_size,
                method_params={f: getattr(args, f"method_{f}") for _, f, _, _ in METHOD_FLAGS})


def export(args) -> int:
    """Run export.api with the parsed arguments: the summary on stdout, a failure as one line on stderr."""
    from export import api, loading, preflight
    from runtime import mesa

    out = Path(args.out).expanduser().resolve()
    try:
        result = api.run_export(args.model, out, **api_kwargs(args))
    except KeyboardInterrupt as e:
        return _end(f"interrupted: {_outcome(e, out)}", 130)
    except Exception as e:
        # modules not imported yet cannot have raised their errors (and importing them costs seconds)
        failed = getattr(sys.modules.get("export.verify"), "VerificationError", ())
        known = (loading.ModelLoadError, mesa.MesaParamError, preflight.Refused, OSError,
                 getattr(sys.modules.get("graph_ops.pipeline"), "PassError", ()))
        if isinstance(e, failed):
            return _end(f"error: verification failed, {_outcome(e, out)}: {e}", EXIT_BAD_INPUT)
        if not isinstance(e, known):
            raise  # a bug: keep its traceback
        staged = getattr(e, "export_staged", False)
        return _end(f"error: {e}" + (f" ({_outcome(e, out)})" if staged else ""), EXIT_BAD_INPUT)
    print(summary(out, result.manifest, result.ops, result.verify))
    return 0


def _outcome(e: BaseException, out: Path) -> str:
    """What export.api found on the filesystem when `e` left it (see export_written there)."""
    return f"the engine was written to {out}" if getattr(e, "export_written", False) else f"nothing written to {out}"


def _end(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    return code


def summary(out: Path, manifest, ops: Counter, report: str) -> str:
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
    p = manifest.params
    lines = [
        f"wrote {out} ({size / 2**20:.1f} MiB)",
        f"  method {manifest.method}, max_len {manifest.max_len}, precision {manifest.precision}, opset {manifest.opset}",
        f"  Mesa: T={p['train_length']} F={p['first_chunk']} Fc={p['first_chunk_cache']} C={p['last_context']} "
        f"G={p['reserve_tokens']} pw={p['push_width']} W0={p['chunk_width']}" if manifest.method == "mesa" else
        f"  {manifest.method}: " + (" ".join(f"{k}={v}" for k, v in manifest.method_params.items()) or "plain RoPE"),
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

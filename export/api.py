"""The exporter as a library: a Hugging Face checkpoint in, a Mesa-Extrapolation engine directory out.

    from export.api import export_engine
    manifest = export_engine("tinyllama-1.1b", "engines/tiny-8k", max_len=8192)
    manifest = export_engine(path, out, max_len=4096, params={"push_width": 8}, target="portable", force=True)
    manifest = export_engine(path, out, max_len=12288, precision="int8-int4")   # int8 prefill, int4 decode

Failures raise (never print, never exit): loading.ModelLoadError (the checkpoint), mesa.MesaParamError
(the Mesa parameters or max_len), preflight.Refused (an unsafe `out`, too little memory or disk, an
option value that does not exist), pipeline.PassError (a graph pass), verify.VerificationError (the
engine does not reproduce the reference), OSError (the filesystem). Whatever leaves `export_engine`
(KeyboardInterrupt included) carries `export_staged` (an engine directory was being written) and
`export_written` (`out` holds the new engine: true only for an interrupt during the final commit).
`python export.py` (export/cli.py) is a thin wrapper over this module.
"""

from __future__ import annotations

import gc
import numbers
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.artifact import Manifest
from runtime.methods import INPLACE_METHODS, METHODS
TARGETS = ("portable", "ort-cpu", "ort-cuda", "tensorrt")  # graph_ops.pipeline.TARGETS (not imported: seconds)
# graph_ops.precision.PRECISIONS (not imported: seconds); fp* are float engines, int* quantize MatMul weights
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "int8-int4")
DECODE_KERNELS = ("gqa", "grouped")  # graph_ops.pipeline.DECODE_KERNELS (not imported: seconds)
PREFILL_KERNELS = ("gqa", "tiled")  # graph_ops.pipeline.PREFILL_KERNELS
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # graph_ops.precision.INT4_BLOCK_SIZES
INT4_BLOCK_SIZE = 128  # graph_ops.precision.INT4_BLOCK_SIZE: why this default
STAGES = ("load", "trace", "passes", "save", "verify")  # commit.fault points, in order


@dataclass
class ExportResult:
    manifest: Manifest
    out: Path
    ops: Counter  # op type -> node count of the exported graph
    verify: str  # what the verify step reports, or why it was skipped


def default_precision(target: str) -> str:
    return "fp16" if target in ("ort-cuda", "tensorrt") else "fp32"


def float_dtype(precision: str) -> str:
    """The float type of what a quantized engine keeps unquantized (all of a float engine)."""
    return "fp32" if precision.startswith("int") else precision


def export_engine(model: str | Path, out: str | Path, *, max_len: int, method: str = "mesa",
                  params: dict | None = None, target: str = "ort-cpu", precision: str | None = None,
                  force: bool = False, verify: bool = True, progress: bool = True,
                  method_params: dict | None = None, decode_kernel: str = "gqa",
                  prefill_kernel: str = "gqa", int4_block_size: int | None = None) -> Manifest:
    """Export `model` (an alias, a local HF folder, or an HF id in the local cache) to the engine directory
    `out` and return its manifest.

    max_len: longest sequence (prompt + generated tokens) the engine serves; method: one of METHODS
    (runtime/methods.py: mesa, origin, rerope, leaky-rerope, self-extend, streaming-llm, lm-infinite,
    dynamic-ntk, yarn); params: MesaParams fields overriding the alias preset / the default rule
    (mesa.default_params; train_length is also the T every other method starts from); method_params: the
    other methods' parameters over their defaults (methods.default_method);
    target: portable | ort-cpu | ort-cuda | tensorrt; precision: fp32 | fp16 | bf16 (a float engine of that
    type; default fp16 for ort-cuda and tensorrt, else fp32) or int8 | int4 | int8-int4 (MatMul weights
    quantized, the rest fp32; ort-cpu only; graph_ops/precision.py says how); decode_kernel: gqa (ORT's
    GroupQueryAttention) or grouped (the Mesa CPU kernel, runtime/ops: each KV head read once per step;
    ort-cpu, methods with the in-place decode cache, needs the library scripts/build_cpp.sh builds);
    prefill_kernel: gqa (ORT's GroupQueryAttention) or tiled (the Mesa CPU kernel: a prefill chunk's attention
    in tiles with an online softmax; ort-cpu, the same library); int4_block_size: weights per int4 scale along
    K for precision int4 and int8-int4, one of INT4_BLOCK_SIZES (default INT4_BLOCK_SIZE, 128: smaller blocks
    are closer to fp32 and slower to decode); force: replace `out` if it is an engine directory
    or empty; verify: check the engine against the PyTorch reference; progress: a bar on stderr."""
    return run_export(model, out, max_len=max_len, method=method, params=params, target=target, precision=precision,
                      force=force, verify=verify, progress=progress, method_params=method_params,
                      decode_kernel=decode_kernel, prefill_kernel=prefill_kernel,
                      int4_block_size=int4_block_size).manifest


def errors() -> tuple[type[Exception], ...]:
    """The exception types export_engine raises for an export that cannot be done (anything else is a bug).
    Imports graph_ops.pipeline and export.verify (seconds): the CLI, which must refuse in milliseconds, asks
    only the modules already loaded."""
    from export import loading, preflight, verify
    from graph_ops import pipeline
    from runtime import mesa

    return (loading.ModelLoadError, mesa.MesaParamError, preflight.Refused, pipeline.PassError,
            verify.VerificationError, OSError)


def quiet_libraries() -> None:
    """torch.onnx logs every torchvision op it skips and deprecation notes; users need none of it."""
    import logging
    import warnings

    import torch  # noqa: F401  (configures its loggers on import; ours must come after)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_options(method: str, target: str, precision: str, max_len, decode_kernel: str = "gqa",
                  prefill_kernel: str = "gqa", int4_block_size: int | None = None) -> None:
    from export.preflight import Refused

    for name, value, choices in (("method", method, METHODS), ("target", target, TARGETS),
                                 ("precision", precision, PRECISIONS), ("decode_kernel", decode_kernel, DECODE_KERNELS),
                                 ("prefill_kernel", prefill_kernel, PREFILL_KERNELS)):
        if value not in choices:
            raise Refused(f"{name} {value!r} is not one of {', '.join(choices)}")
    if precision.startswith("int") and target != "ort-cpu":
        raise Refused(f"precision {precision} is for target ort-cpu (onnxruntime.quantization's CPU kernels), "
                      f"not {target}")
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral):
        raise Refused(f"max_len must be an integer, got {max_len!r}")
    if int4_block_size is not None:
        if "int4" not in precision:
            raise Refused(f"an int4 block size is for precision int4 or int8-int4, not {precision}")
        if (isinstance(int4_block_size, bool) or not isinstance(int4_block_size, numbers.Integral)
                or int4_block_size not in INT4_BLOCK_SIZES):
            raise Refused(f"int4 block size {int4_block_size!r} is not one of {', '.join(map(str, INT4_BLOCK_SIZES))}")
    if decode_kernel == "grouped":
        check_grouped(method, target, precision)
    if prefill_kernel == "tiled":
        check_tiled(method, target, precision)


def check_grouped(method: str, target: str, precision: str = "fp32") -> None:
    """--decode-kernel grouped: an ort-cpu engine with the in-place decode cache, and the kernels built."""
    _check_kernel("--decode-kernel grouped", method, target, precision, INPLACE_METHODS, "the in-place decode cache")


def check_tiled(method: str, target: str, precision: str = "fp32") -> None:
    """--prefill-kernel tiled: an ort-cpu engine whose attention is lowered from MesaAttention, kernels built."""
    from runtime.methods import CLASSES

    lowered = tuple(m for m in METHODS if not (m in CLASSES and CLASSES[m].own_op))
    _check_kernel("--prefill-kernel tiled", method, target, precision, lowered,
                  "prefill attention on GroupQueryAttention")


def _check_kernel(flag: str, method: str, target: str, precision: str, methods: tuple[str, ...], why: str) -> None:
    from export.preflight import Refused
    from runtime import custom_ops

    if target != "ort-cpu" or method not in methods:
        raise Refused(f"{flag} is for --target ort-cpu engines of methods {', '.join(methods)} ({why}), "
                      f"not target {target} / method {method}")
    if float_dtype(precision) != "fp32":  # the kernels take float32 tensors (quantized engines keep attention fp32)
        raise Refused(f"{flag} runs float32 attention: use --precision fp32, int8, int4 or int8-int4, not {precision}")
    try:
        found = custom_ops.library()
    except custom_ops.CustomOpsError as e:
        raise Refused(str(e)) from None
    if found is None:
        raise Refused(f"{flag} needs the Mesa CPU kernels: build them with `bash scripts/build_cpp.sh` "
                      f"(build/cpp/libmesa_ops.so) or set {custom_ops.ENV}")


def check_lengths(max_len: int, method: str, params) -> None:
    from runtime import mesa

    if max_len < 1:
        raise mesa.MesaParamError(f"--max-len must be above zero, got {max_len}")
    if method == "mesa":
        mesa.check_every_length(max_len, params)


def other_method(method: str, params: dict | None, method_params: dict | None, rope, train_length: int,
                 max_len: int):
    """The runtime.methods.Method of an export (None for mesa and origin); MesaParamError for Mesa-only
    parameters given to another method, or a RoPE scaling the method would replace."""
    from runtime import mesa, methods

    mesa_only = sorted(k for k, v in (params or {}).items() if v is not None and k != "train_length")
    if method not in ("mesa", "origin") and mesa_only:
        raise mesa.MesaParamError(f"{', '.join(mesa_only)}: Mesa parameter(s), unused by --method {method} "
                                  "(its own flags are --window, --leaky-k, --group, --sink, --block, --factor)")
    if method in ("dynamic-ntk", "yarn") and rope.linear_factor != 1.0:
        raise mesa.MesaParamError(f"--method {method} replaces the checkpoint's linear RoPE scaling; "
                                  "export a checkpoint without rope_scaling")
    given = dict(method_params or {})
    if method == "dynamic-ntk":
        given.setdefault("rope_theta", rope.rope_theta)
    return methods.default_method(method, train_length, max_len, given)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def preflight_checks(model, out: Path, max_len: int, method: str, params: dict | None, force: bool, dtype: str,
                     log: Callable[[str], None] = _stderr, method_params: dict | None = None):
    """Everything that can refuse the export, cheapest first, before the weights are read: (path, alias,
    config, params, the runtime.methods.Method or None). The `out` checks come before torch is even imported."""
    from export import commit, loading, preflight
    from runtime import mesa

    path, alias = loading.resolve_model(str(model))
    for line in commit.sweep(out):  # first: it may put back an engine a dead export had moved aside
        log(line)
    preflight.check_out(out, force, path)
    quiet_libraries()
    config = loading.load_config(path)
    for w in loading.check_supported(config):
        log(f"warning: {w}")
    mesa_params = mesa.default_params(config.max_position_embeddings, alias and alias.params, params)
    rope = loading.rope_config(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    preflight.check_memory(max_len, rope.head_dim, config.num_hidden_layers, kv_heads, dtype)
    check_lengths(max_len, method, mesa_params)  # O(max_len): after the memory check has refused absurd lengths
    method_obj = other_method(method, params, method_params, rope, mesa_params.train_length, max_len)
    shapes = loading.tensor_shapes(path)
    preflight.check_disk(out, preflight.engine_bytes(shapes, dtype, max_len, rope.head_dim))
    return path, alias, config, mesa_params, method_obj


def run_export(model: str | Path, out: str | Path, *, max_len: int, method: str = "mesa", params: dict | None = None,
               target: str = "ort-cpu", precision: str | None = None, force: bool = False,
               verify: bool = True, progress: bool = True, log: Callable[[str], None] = _stderr,
               method_params: dict | None = None, decode_kernel: str = "gqa",
               prefill_kernel: str = "gqa", int4_block_size: int | None = None) -> ExportResult:
    """export_engine with what the CLI's summary needs (op counts, the verify report); `log` gets the
    warning lines and what the sweep of dead exports' leftovers did."""
    from export import commit

    precision = precision or default_precision(target)
    out = Path(out).expanduser().resolve()
    staging = bar = None
    try:
        check_options(method, target, precision, max_len, decode_kernel, prefill_kernel, int4_block_size)
        dtype = float_dtype(precision)
        max_len = int(max_len)  # numpy integers too; the manifest is JSON
        path, alias, config, mesa_params, method_obj = preflight_checks(model, out, max_len, method, params, force,
                                                                        dtype, log, method_params)
        from tqdm import tqdm

        from export import onnx_export
        from export import verify as verifying
        from graph_ops import pipeline

        staging = commit.stage(out)
        bar = tqdm(total=len(STAGES), desc="export", unit="stage", file=sys.stderr, disable=not progress,
                   bar_format="{desc}: {n_fmt}/{total_fmt} {bar} [{elapsed}]")

        def stage(name: str) -> None:
            bar.set_description(f"export: {name}")
            commit.fault(name)

        stage("load")
        lm = onnx_export.build_model(path, config, mesa_params, method, max_len, dtype, alias, method_obj)
        bar.update()
        stage("trace")
        graph = onnx_export.trace(lm)
        bar.update()
        stage("passes")
        passes, decode_graph = pipeline.export_graphs(
            graph, target, precision, progress=lambda name: bar.set_description(f"export: passes ({name})"),
            method=method, decode_kernel=decode_kernel, prefill_kernel=prefill_kernel,
            int4_block_size=INT4_BLOCK_SIZE if int4_block_size is None else int(int4_block_size))
        bar.update()

        manifest = onnx_export.make_manifest(lm, graph, str(model), passes, target, precision, decode_graph)
        ops = Counter(n.op_type for n in graph.graph)
        smoke = verifying.reference_run(lm) if verify else None
        stage("save")
        onnx_export.write_engine(staging.path, graph, path, decode_graph)
        graph = decode_graph = lm = None  # free the weights before ONNX Runtime loads its own copy
        gc.collect()
        bar.update()
        stage("verify")
        check = verifying.check_quantized if precision.startswith("int") else verifying.check_engine
        report = "skipped (--no-verify)" if smoke is None else check(staging.path, smoke)
        onnx_export.write_manifest(staging.path, manifest)  # last: only a verified directory gets one
        bar.update()
        commit.commit(staging, force)
        return ExportResult(manifest, out, ops, report)
    except BaseException as e:
        # asked of the filesystem, not of how far the code got, so it is true even for a signal mid-commit
        e.export_staged = staging is not None
        e.export_written = staging is not None and staging.published()
        raise
    finally:
        if bar is not None:
            bar.close()
        if staging is not None:
            staging.discard()

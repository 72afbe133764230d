"""The graph passes applied at export, per target backend.

`run_passes(model, target, precision)` rewrites the traced step graph in place and returns the names
of the passes it applied (the manifest records them); `export_graphs` also returns the decode graph of
`--precision int8-int4` (the same lowered float graph, quantized to int4 instead of int8). Each pass lives in its own file:

| pass | file | what it does |
|---|---|---|
| lower_attention[k] | lower_attention.py | MesaAttention -> visible rows + step positions + kernel k |
| fuse_step_positions | step_positions.py | one positions/scale/mask subgraph per step for all layers |
| inline_parts | inline_parts.py | the ai.mesa parts expanded into standard ops |
| cleanup | cleanup.py | constant folding, CSE, dead nodes, shape inference |
| quantize_int8 | precision.py | per-channel int8 MatMul weights, dynamic activations (ort-cpu, `--precision int8`) |
| quantize_int4[b] | precision.py | weight-only int4 MatMulNBits in blocks of b (ort-cpu, `--precision int4`) |
| check_half_precision | precision.py | GPU targets: warns when the weights are not fp16/bf16 |
| check_tensorrt_ops | tensorrt_ops.py | fails listing any op the TensorRT 10.15 parser lacks |

Targets:

- portable: no passes; ai.mesa::MesaAttention runs its ONNX function body on any ONNX Runtime.
- ort-cpu: kernel `ORT_CPU_KERNEL` = auto (chosen by measurement): contrib GroupQueryAttention for
  prefill chunks, ONNX Attention + RotaryEmbedding for decode steps, switched by an If per step.
- ort-cuda: at fp16/bf16 (its default) the `inplace` kernel, as ort-cpu: GroupQueryAttention over the
  in-place decode cache in device memory (runtime/device_cache.py); at fp32 ONNX Attention 23/24 +
  RotaryEmbedding 23 (registered by ORT's CUDA EP), rows one per call.
- tensorrt: the decomposed kernel (elementary ops only), checked against TensorRT's operator list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir

from runtime.methods import INPLACE_METHODS
from graph_ops import (cleanup, grouped_decode, inline_parts, lower_attention, mesa_op, methods_op, precision,
                       step_positions, tensorrt_ops, tiled_prefill)

logger = logging.getLogger(__name__)

TARGETS = ("portable", "ort-cpu", "ort-cuda", "tensorrt")
PRECISIONS = precision.PRECISIONS
# Measured (scripts/bench_passes.py, model M, 8k prompt, 2-core CPU, medians of 3): prefill / decode at 8k
# gqa 22.3 s / 119 ms, attention 28.6 s / 82 ms, auto 22.2 s / 85 ms (portable: 36.4 s / 102 ms).
ORT_CPU_KERNEL = "inplace"
# ort-cuda lowers with `inplace` where ORT's CUDA GroupQueryAttention has kernels (fp16, bf16); fp32 keeps
# `attention` (ONNX Attention + RotaryEmbedding, one row per call) rather than fall back to the CPU kernel.
CUDA_INPLACE_PRECISIONS = ("fp16", "bf16")
DECODE_KERNELS = ("gqa", "grouped")  # the in-place decode attention: ORT's GroupQueryAttention, the Mesa CPU kernel
PREFILL_KERNELS = ("gqa", "tiled")  # a prefill chunk's attention: ORT's GroupQueryAttention, the Mesa CPU kernel


class PassError(RuntimeError):
    pass


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[ir.Model], None]


def _lower(kernel: str) -> GraphPass:
    def run(model: ir.Model) -> None:
        lower_attention.lower_attention(model, kernel)
        left = [n.name for n in model.graph if n.domain == mesa_op.DOMAIN and n.op_type == "MesaAttention"]
        if left:
            raise PassError(f"lower_attention[{kernel}] could not lower {len(left)} MesaAttention node(s): "
                            f"{', '.join(left[:4])}")
    return GraphPass(f"lower_attention[{kernel}]", run)


def _fuse(model: ir.Model) -> None:
    step_positions.fuse_step_positions(model)


def _counting(name: str, rewrite: Callable[[ir.Model], int], found_nothing: str) -> "GraphPass":
    """A pass whose rewrite returns how many nodes it changed; none is an error."""
    def run(model: ir.Model) -> None:
        if not rewrite(model):
            raise PassError(f"{name} found {found_nothing}")

    return GraphPass(name, run)


def _check_half(model: ir.Model) -> None:
    report = precision.half_precision_report(model)
    if report != "ok":
        logger.warning("warning: %s", report)


FUSE = GraphPass("fuse_step_positions", _fuse)
INLINE = GraphPass("inline_parts", lambda m: inline_parts.inline_parts(m))
CLEANUP = GraphPass("cleanup", lambda m: cleanup.cleanup(m))
QUANTIZE_INT8 = _counting("quantize_int8", precision.quantize_int8, "no MatMul with constant weights")


def quantize_int4(block_size: int) -> GraphPass:
    return _counting(f"quantize_int4[{block_size}]", lambda m: precision.quantize_int4(m, block_size),
                     "no MatMul with constant weights")


CHECK_HALF = GraphPass("check_half_precision", _check_half)
def _check_tensorrt(model: ir.Model) -> None:
    try:
        tensorrt_ops.check_tensorrt(model)
    except tensorrt_ops.UnsupportedByTensorRT as e:
        raise PassError(str(e)) from None


CHECK_TENSORRT = GraphPass("check_tensorrt_ops", _check_tensorrt)
GROUPED_DECODE = _counting("grouped_decode", grouped_decode.grouped_decode, "no in-place decode attention to rewrite")
TILED_PREFILL = _counting("tiled_prefill", tiled_prefill.tiled_prefill, "no prefill attention to rewrite")

PIPELINES: dict[str, list[GraphPass]] = {
    "portable": [],
    "ort-cpu": [_lower(ORT_CPU_KERNEL), FUSE, INLINE, CLEANUP],
    "ort-cuda": [_lower("attention"), FUSE, INLINE, CLEANUP, CHECK_HALF],
    "tensorrt": [_lower("decomposed"), FUSE, INLINE, CLEANUP, CHECK_HALF, CHECK_TENSORRT],
}


def passes_for(target: str, precision_: str = "fp32", method: str = "mesa",
               decode_kernel: str = "gqa", prefill_kernel: str = "gqa",
               int4_block_size: int = precision.INT4_BLOCK_SIZE) -> list[GraphPass]:
    """The passes of the graph an engine's prefill steps run (and, but for int8-int4, its decode steps).
    Methods with an op of their own (graph_ops/methods_op.py) have no MesaAttention to lower or fuse; the
    others but INPLACE_METHODS lower with `auto` on ort-cpu. decode_kernel grouped adds grouped_decode
    (ort-cpu, INPLACE_METHODS); prefill_kernel tiled adds tiled_prefill (ort-cpu, MesaAttention methods);
    int4_block_size: the int4 weights' block size along K (precision.INT4_BLOCK_SIZES)."""
    if target not in PIPELINES:
        raise PassError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision_ not in PRECISIONS:
        raise PassError(f"unknown precision {precision_!r}; choose one of {', '.join(PRECISIONS)}")
    if decode_kernel not in DECODE_KERNELS:
        raise PassError(f"unknown decode kernel {decode_kernel!r}; choose one of {', '.join(DECODE_KERNELS)}")
    if prefill_kernel not in PREFILL_KERNELS:
        raise PassError(f"unknown prefill kernel {prefill_kernel!r}; choose one of {', '.join(PREFILL_KERNELS)}")
    if int4_block_size not in precision.INT4_BLOCK_SIZES:
        raise PassError(f"int4 block size {int4_block_size!r} is not one of "
                        f"{', '.join(map(str, precision.INT4_BLOCK_SIZES))}")
    passes = list(PIPELINES[target])
    if method in methods_op.OPS:
        passes = [p for p in passes if p is not FUSE and not p.name.startswith("lower_attention")]
    elif target == "ort-cpu" and method not in INPLACE_METHODS:
        passes[0] = _lower("auto")
    elif target == "ort-cuda" and method in INPLACE_METHODS and precision_ in CUDA_INPLACE_PRECISIONS:
        passes[0] = _lower("inplace")
    if decode_kernel == "grouped":
        if target != "ort-cpu" or method not in INPLACE_METHODS:
            raise PassError(f"decode kernel grouped is for target ort-cpu and methods {', '.join(INPLACE_METHODS)}")
        passes.append(GROUPED_DECODE)
    if prefill_kernel == "tiled":
        if target != "ort-cpu" or method in methods_op.OPS:
            raise PassError(f"prefill kernel tiled is for target ort-cpu and methods lowered from MesaAttention "
                            f"(not {', '.join(methods_op.OPS)})")
        passes.append(TILED_PREFILL)
    if precision_ in precision.QUANTIZED_PRECISIONS:
        if target != "ort-cpu":
            raise PassError(f"--precision {precision_} (onnxruntime.quantization's CPU kernels) is for --target ort-cpu")
        passes.append(QUANTIZE_INT8 if precision_.startswith("int8") else quantize_int4(int4_block_size))
    return passes


def _apply(model: ir.Model, passes: list[GraphPass], progress) -> list[str]:
    for p in passes:
        if progress is not None:
            progress(p.name)
        p.run(model)
    return [p.name for p in passes]


def run_passes(model: ir.Model, target: str, precision_: str = "fp32",
               progress: Callable[[str], None] | None = None, method: str = "mesa",
               decode_kernel: str = "gqa", prefill_kernel: str = "gqa",
               int4_block_size: int = precision.INT4_BLOCK_SIZE) -> list[str]:
    """Apply the target's pipeline to `model` in place; returns the names of the passes applied."""
    return _apply(model, passes_for(target, precision_, method, decode_kernel, prefill_kernel, int4_block_size),
                  progress)


def export_graphs(model: ir.Model, target: str, precision_: str = "fp32",
                  progress: Callable[[str], None] | None = None, method: str = "mesa",
                  decode_kernel: str = "gqa", prefill_kernel: str = "gqa",
                  int4_block_size: int = precision.INT4_BLOCK_SIZE) -> tuple[list[str], ir.Model | None]:
    """run_passes, and for int8-int4 the decode graph: the lowered float graph is copied before the int8
    pass and the copy quantized to int4 (weight traffic is what a decode step costs, MatMul rate what a
    prefill costs). Returns (the passes of `model`, then for int8-int4 the decode graph's int4 pass; the
    decode graph or None)."""
    if precision_ != "int8-int4":
        return run_passes(model, target, precision_, progress, method, decode_kernel, prefill_kernel,
                          int4_block_size), None
    passes = passes_for(target, precision_, method, decode_kernel, prefill_kernel, int4_block_size)
    names = _apply(model, passes[:-1], progress)
    decode = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    decode_names = _apply(decode, [quantize_int4(int4_block_size)], progress)
    return names + _apply(model, passes[-1:], progress) + decode_names, decode

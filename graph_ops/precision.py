"""Precision passes, and the precisions an engine can be exported at (`export.py --precision`).

| precision | weights | activations, KV cache | graphs |
|---|---|---|---|
| fp32 / fp16 / bf16 | that float type | same | model.onnx |
| int8 | MatMul weights int8, per output channel, symmetric | float32; each MatMul input quantized to uint8 per call (dynamic, per tensor) | model.onnx |
| int4 | MatMul weights int4, blocks of `INT4_BLOCK_SIZE` (128) along K (MatMulNBits) | float32 (int8 inside the kernel, accuracy_level 4) | model.onnx |
| int8-int4 | int8 for prefill steps, int4 for decode steps | as above | model.onnx (prefill), decode.onnx (decode) |

Quantized precisions keep everything but the MatMul weights in float32 (RMSNorm, RoPE, softmax, the
cache, logits) and are for the ort-cpu target. Both quantizers are onnxruntime.quantization's.

* `quantize_int8`: onnxruntime.quantization.quantize_dynamic, per-channel int8 weights; activations are
  quantized per call from their own range, so the two regimes Mesa feeds the layers (middle chunks at
  plain positions, the last chunk and decode at stair positions with log-n > 1) each get their own
  scales. calibration/data.py measures per phase why static scales would not do.
* `quantize_int4`: weight-only int4 — every MatMul whose right
  operand is a 2-D initializer becomes com.microsoft::MatMulNBits (symmetric, blocks of
  `block_size` along K with one fp32 scale each, accuracy_level 4 = int8 activations on the CPU kernel),
  through onnxruntime.quantization's MatMulNBitsQuantizer. Activations, the KV cache, RMSNorm, softmax
  and logits stay float32. Speed and accuracy per precision: scripts/bench_precision.py, in the README.
* fp16 / bf16 for the CUDA and TensorRT targets are produced at trace time (`--precision`, which those
  targets default to fp16): the decoder casts to float32 where it must (RMSNorm statistics, softmax,
  logits), which a blind graph-level float conversion would not. `half_precision_report` checks
  that an engine for those targets actually carries half weights.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

logger = logging.getLogger(__name__)

FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZED_PRECISIONS = ("int8", "int4", "int8-int4")
PRECISIONS = FLOAT_PRECISIONS + QUANTIZED_PRECISIONS
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits' block sizes along K
# Blocks of 128 (GPTQ's and AWQ's usual group size) by measurement, model M on a 2-core Intel Xeon (AMX),
# int8-int4 on the Mesa kernels: decode at 2k context 7.5 ms/token against 9.5 with blocks of 32 (fp32
# 26.4): the scales of 32-weight blocks are a quarter of the int4 bytes. The trained passkey model stays
# within 0.01 of fp32 at 256-2048 tokens with either (scripts/results/precision/).
INT4_BLOCK_SIZE = 128


def quantize_int8(model: ir.Model) -> int:
    """Per-channel int8 MatMul weights with dynamic uint8 activations, in place (quantize_dynamic works
    on files: the model goes through a temporary directory, external data included); returns the
    number of MatMuls quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # quantize_dynamic warns on the root logger about pre-processing
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            ir.save(model, src, external_data="float.onnx.data")
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
            quantized = ir.load(dst)
            ir.external_data.load_to_model(quantized)  # into memory before the directory goes
    finally:
        root.level = level
    ir.passes.common.TopologicalSortPass()(quantized)  # the quantizer appends its nodes after their users
    _replace(model, quantized)
    return sum(n.op_type == "MatMulInteger" or n.op_type == "DynamicQuantizeMatMul" for n in model.graph)


def _replace(model: ir.Model, new: ir.Model) -> None:
    model.graph = new.graph  # opset imports live on the graph
    model.functions.clear()
    model.functions.update(new.functions)


def quantize_int4(model: ir.Model, block_size: int = INT4_BLOCK_SIZE, accuracy_level: int = 4) -> int:
    """Weight-only int4 in place; returns the number of MatMulNBits nodes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(ir.serde.serialize_model(model), bits=4, block_size=block_size,
                                     is_symmetric=True, accuracy_level=accuracy_level,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    _replace(model, ir.serde.deserialize_model(quantizer.model.model))
    return sum(n.op_type == "MatMulNBits" for n in model.graph)


def weight_dtypes(model: ir.Model) -> dict[str, int]:
    """Bytes of initializers per dtype name (float tensors only)."""
    out: dict[str, int] = {}
    for v in model.graph.initializers.values():
        if v.dtype is not None and v.dtype.is_floating_point() and v.const_value is not None:
            out[v.dtype.name] = out.get(v.dtype.name, 0) + v.const_value.nbytes
    return out


def half_precision_report(model: ir.Model) -> str:
    """'ok' when most weight bytes are fp16/bf16; else a warning line (the graph still works)."""
    sizes = weight_dtypes(model)
    total = sum(sizes.values()) or 1
    half = sum(b for name, b in sizes.items() if name in ("FLOAT16", "BFLOAT16"))
    if half / total >= 0.5:
        return "ok"
    return (f"weights are {', '.join(sorted(sizes))}: GPU targets run fastest with --precision fp16 or bf16")

"""Precision passes.

* `quantize_int4` (ort-cpu, opt-in `--quantize int4`): weight-only int4 — every MatMul whose right
  operand is a 2-D initializer becomes com.microsoft::MatMulNBits (symmetric, blocks of
  `block_size` along K, accuracy_level 4 = int8 activations on the CPU kernel), through
  onnxruntime.quantization's MatMulNBitsQuantizer. Activations, the KV cache, RMSNorm, softmax and
  logits stay float32. Accuracy is measured by scripts/bench_passes.py (max |Δlogit| and greedy
  agreement against fp32) and reported in the README.
* fp16 / bf16 for the CUDA and TensorRT targets are produced at trace time (`--dtype`, which those
  targets default to fp16): the decoder casts to float32 where it must (RMSNorm statistics, softmax,
  logits), which a blind graph-level float conversion would not. `half_precision_report` checks
  that an engine for those targets actually carries half weights.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

logger = logging.getLogger(__name__)


def quantize_int4(model: ir.Model, block_size: int = 32, accuracy_level: int = 4) -> int:
    """Weight-only int4 in place; returns the number of MatMulNBits nodes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(ir.serde.serialize_model(model), bits=4, block_size=block_size,
                                     is_symmetric=True, accuracy_level=accuracy_level,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantized = ir.serde.deserialize_model(quantizer.model.model)
    model.graph = quantized.graph
    model.functions.clear()
    model.functions.update(quantized.functions)
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
    return (f"weights are {', '.join(sorted(sizes))}: GPU targets run fastest with --dtype fp16 or bf16")

"""What the TensorRT ONNX parser accepts, and a check that an engine for TensorRT uses nothing else.

Source: onnx/onnx-tensorrt `docs/operators.md`, the version whose header reads "TensorRT 10.15
supports operators in the inclusive range of opset 9 to opset 24" (the parser shipped with
TensorRT 10.15, also NVIDIA/TensorRT `parsers/onnx`). `SUPPORTED` lists every operator marked "Y"
in its support matrix, transcribed by hand; `RESTRICTIONS` keeps the restrictions this project's
graphs can run into. Operators marked "N" there (e.g. BitShift, Compress, Unique, the Sequence
ops, DynamicQuantizeLinear, MatMulInteger) are absent, and so is every non-default domain
(ai.mesa, com.microsoft): TensorRT inlines model-local functions, but the pipeline inlines them
itself so the check sees the final ops.

The tensorrt pipeline lowers MesaAttention with the `decomposed` kernel (graph_ops/lower_attention.py):
elementary ops only (Slice/Concat/Range/Mod/Div/Where/Gather/Split/MatMul/Softmax...), all of
which are listed here. TensorRT 10.15 also parses ONNX Attention and RotaryEmbedding (restrictions
below), an alternative once it can be tested on a GPU.
"""

from __future__ import annotations

import onnx_ir as ir

TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

RESTRICTIONS = {
    "Attention": "Q, K, V and attn_mask must be 4-D; no past_key/past_value/nonpad_kv_seqlen inputs, no "
                 "present_*/qk_matmul_output outputs",
    "RotaryEmbedding": "position_ids must be INT64",
    "Squeeze": "axes must be resolvable to a constant",
    "Unsqueeze": "axes must be resolvable to a constant",
    "ReduceMean": "axes must be an initializer",
    "CumSum": "axis must be a build-time constant",
    "TopK": "sorted must be 1; K < 3840",
    "If": "both branches' outputs must have the same rank and different names",
}
# ops whose `axes` input (index 1) must be a constant / initializer
_CONSTANT_AXES = ("Squeeze", "Unsqueeze", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                  "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")


class UnsupportedByTensorRT(ValueError):
    pass


def _is_constant(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def unsupported(model: ir.Model) -> list[str]:
    """Every reason the TensorRT parser would reject this graph (empty when it takes it as is)."""
    problems: set[str] = set()
    opset = model.opset_imports.get("", 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.add(f"opset {opset} outside TensorRT {TENSORRT_VERSION}'s {OPSET_RANGE}")
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            problems.add(f"{node.domain}::{node.op_type} (custom domain)")
        elif node.op_type not in SUPPORTED:
            problems.add(f"{node.op_type} (not in TensorRT {TENSORRT_VERSION}'s operator list)")
        elif node.op_type in _CONSTANT_AXES and len(node.inputs) > 1 and not _is_constant(node.inputs[1]):
            problems.add(f"{node.op_type} with computed axes ({RESTRICTIONS.get(node.op_type, 'axes must be constant')})")
    if model.functions:
        problems.add("model-local functions left: " + ", ".join(f"{d}::{n}" for d, n, _ in model.functions))
    return sorted(problems)


class CheckTensorRTPass(ir.passes.InPlacePass):
    """Fails, listing them, when the graph has ops the TensorRT ONNX parser does not support."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        problems = unsupported(model)
        if problems:
            raise UnsupportedByTensorRT("TensorRT cannot parse this graph: " + "; ".join(problems))
        return ir.passes.PassResult(model, modified=False)


def check_tensorrt(model: ir.Model) -> None:
    CheckTensorRTPass()(model)

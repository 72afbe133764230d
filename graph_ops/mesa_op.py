"""The `ai.mesa` op set: `MesaAttention`, its schema and its ONNX function body.

The body re-expresses runtime/mesa.py (Stair PE, log-n, the visible-key rule of the step scalars)
in standard ONNX ops so that any ONNX Runtime runs the exported file as is; tests check it against
runtime/mesa.py and the torch reference. Inputs (per layer; the cache tensors are shared):

| input | shape | meaning |
|---|---|---|
| q | [B, H, q, d] | queries of the new block, before RoPE |
| k, v | [B, Hkv, q, d] | keys (before RoPE) and values of the new block |
| k_cache, v_cache | [layers, B, Hkv, max_len, d] | the static cache, keys before RoPE |
| cos, sin | [max_len, d/2] | RoPE tables |
| sink_len, window_start, write_pos, chunk_width | int64 scalars | a, b, w, W of the step |

Attributes: `layer` (which cache layer), `train_length` (T), `push_width` (pw). Output [B, H, q, d].
Visible keys: cache[layer, :, :, 0:a] ++ cache[layer, :, :, b:w] ++ k — only these are read, so a
step costs O(visible keys), never O(max_len).

The body is written as three parts, each an `ai.mesa` function, so that graph passes can reuse
them without restating a formula (graph_ops/pipeline.py):

- `MesaCachedKV`: the visible cache rows of one layer (the a, b, w rule), as sink and window blocks;
- `MesaStepPositions`: everything of a step that no layer changes — the S = a + (w - b) + q key
  positions (Stair PE), their cos/sin rows, the log-n query scale and the [q, S] visibility mask;
- `MesaAttend`: rotary embedding, GQA attention under that mask.

`function_proto()` returns MesaAttention with the three inlined (one self-contained function, as
the exporter attaches it); `part_functions()` returns the parts for passes that call them.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT64, script
from onnxscript.values import Opset

OPSET = 24
DOMAIN = "ai.mesa"
op = Opset("", OPSET)
mesa_opset = Opset(DOMAIN, 1)

_TENSOR_INPUTS = ("q", "k", "v", "k_cache", "v_cache", "cos", "sin")
SCALAR_INPUTS = ("sink_len", "window_start", "write_pos", "chunk_width")
ATTRIBUTES = ("layer", "train_length", "push_width")

SCHEMA = OpSchema(
    "MesaAttention", DOMAIN, 1,
    doc=__doc__,
    inputs=[OpSchema.FormalParameter(n, "T") for n in _TENSOR_INPUTS]
    + [OpSchema.FormalParameter(n, "tensor(int64)") for n in SCALAR_INPUTS],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
    attributes=[OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ATTRIBUTES],
)
MesaAttentionOp = onnxscript.values.Op(mesa_opset, "MesaAttention", SCHEMA)


@script(opset=mesa_opset, default_opset=op)
def MesaCachedKV(k_cache, v_cache, sink_len: INT64, window_start: INT64, write_pos: INT64, layer: int):
    """The cache rows a step sees, as two blocks [B, Hkv, ., d]: sink cache[layer, :, :, 0:a] and window
    cache[layer, :, :, b:w], for keys and values. The visible keys are sink ++ window ++ new block
    (runtime.mesa.visible_ranges, sliced here as graph ops)."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    lay = op.Reshape(op.Constant(value_int=layer), one)
    lay_end = lay + one
    a = op.Reshape(sink_len, one)
    b = op.Reshape(window_start, one)
    w = op.Reshape(write_pos, one)
    axes = op.Constant(value_ints=[0, 3])
    sink_start = op.Concat(lay, zero, axis=0)
    sink_end = op.Concat(lay_end, a, axis=0)
    win_start = op.Concat(lay, b, axis=0)
    win_end = op.Concat(lay_end, w, axis=0)
    sink_k = op.Squeeze(op.Slice(k_cache, sink_start, sink_end, axes), zero)
    window_k = op.Squeeze(op.Slice(k_cache, win_start, win_end, axes), zero)
    sink_v = op.Squeeze(op.Slice(v_cache, sink_start, sink_end, axes), zero)
    window_v = op.Squeeze(op.Slice(v_cache, win_start, win_end, axes), zero)
    return sink_k, window_k, sink_v, window_v


@script(opset=mesa_opset, default_opset=op)
def MesaStepPositions(q, cos, sin, sink_len: INT64, window_start: INT64, write_pos: INT64, chunk_width: INT64,
                      train_length: int, push_width: int):
    """What every layer of a step shares. q [B, H, q, d] only gives B and q.

    Outputs: cos_k, sin_k [S, d/2] (rows of the S key positions), cos_q, sin_q [q, d/2] (the last q),
    scale [q, 1] (log-n, q's type), visible [q, S] bool, the positions as RotaryEmbedding's
    position_ids — key_ids [B, S], cached_ids [B, S - q] (the cache rows), query_ids [B, q] (the new
    block) — and total_len (S, int64 scalar)."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    s1 = op.Constant(value_int=1)
    nq = op.Squeeze(op.Shape(q, start=2, end=3), zero)
    S = sink_len + (write_pos - window_start) + nq

    # Stair PE (runtime.mesa.key_positions): identity when S <= T, else stairs below A = S - pp
    kidx = op.Range(op.Constant(value_int=0), S, s1)
    T = op.Constant(value_int=train_length)
    pw = op.Constant(value_int=push_width)
    pp = op.Mod(S - s1, chunk_width)
    A = S - pp
    stairs = (A - s1) - op.Div(A - s1 - kidx, pw)  # numerator >= 0 wherever it is used
    in_stairs = op.And(op.Greater(S, T), op.Less(kidx, A))
    pos = op.Where(in_stairs, stairs, kidx)

    cos_k = op.Gather(cos, pos, axis=0)
    sin_k = op.Gather(sin, pos, axis=0)
    first_q = S - nq
    cos_q = op.Slice(cos_k, op.Reshape(first_q, one), op.Reshape(S, one), zero)
    sin_q = op.Slice(sin_k, op.Reshape(first_q, one), op.Reshape(S, one), zero)

    # log-n: λ(i) = max(1, ln(i+1) / ln T) for the call indices of the queries
    qidx = op.Range(first_q, S, s1)
    ln_i = op.Log(op.Cast(qidx + s1, to=FLOAT.dtype))
    lam = op.Max(op.Div(ln_i, op.Log(op.Cast(T, to=FLOAT.dtype))), op.Constant(value_float=1.0))
    scale = op.CastLike(op.Unsqueeze(lam, op.Constant(value_ints=[-1])), q)

    # cached keys all visible; new key j visible to new query i iff j <= i (call indices)
    visible = op.LessOrEqual(op.Unsqueeze(kidx, zero), op.Unsqueeze(qidx, one))

    ids_shape = op.Concat(op.Shape(q, start=0, end=1), op.Reshape(S, one), axis=0)
    key_ids = op.Expand(op.Unsqueeze(pos, zero), ids_shape)
    cached_ids = op.Slice(key_ids, zero, op.Reshape(first_q, one), one)
    query_ids = op.Slice(key_ids, op.Reshape(first_q, one), op.Reshape(S, one), one)
    return cos_k, sin_k, cos_q, sin_q, scale, visible, key_ids, cached_ids, query_ids, S


@script(opset=mesa_opset, default_opset=op)
def MesaAttend(q, keys, values, cos_k, sin_k, cos_q, sin_q, scale, visible):
    """Attention of q [B, H, q, d] over the S visible keys/values [B, Hkv, S, d] (keys before RoPE)."""
    k1, k2 = op.Split(keys, axis=-1, num_outputs=2)
    keys_r = op.Concat(k1 * cos_k - k2 * sin_k, k2 * cos_k + k1 * sin_k, axis=-1)
    q1, q2 = op.Split(q, axis=-1, num_outputs=2)
    q_r = op.Concat(q1 * cos_q - q2 * sin_q, q2 * cos_q + q1 * sin_q, axis=-1)
    q_r = q_r * scale

    # GQA without copying keys: queries [B, Hkv, g, q, d] against keys [B, Hkv, 1, S, d]
    q5 = op.Reshape(q_r, op.Concat(op.Shape(keys, start=0, end=2), op.Constant(value_ints=[-1]),
                                   op.Shape(q, start=2, end=4), axis=0))
    k5 = op.Unsqueeze(keys_r, op.Constant(value_ints=[2]))
    v5 = op.Unsqueeze(values, op.Constant(value_ints=[2]))
    d = op.Cast(op.Shape(q, start=3, end=4), to=FLOAT.dtype)
    scores = op.Div(op.Cast(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])), to=FLOAT.dtype),
                    op.Sqrt(d))
    scores = op.Where(visible, scores, op.Constant(value_float=-3.4028234663852886e38))
    probs = op.CastLike(op.Softmax(scores, axis=-1), q)
    return op.Reshape(op.MatMul(probs, v5), op.Shape(q))


@script(opset=mesa_opset, default_opset=op)
def MesaAttention(q, k, v, k_cache, v_cache, cos, sin, sink_len: INT64, window_start: INT64,
                  write_pos: INT64, chunk_width: INT64, layer: int, train_length: int, push_width: int):
    sink_k, window_k, sink_v, window_v = MesaCachedKV(k_cache, v_cache, sink_len, window_start, write_pos,
                                                      layer=layer)
    keys = op.Concat(sink_k, window_k, k, axis=2)
    values = op.Concat(sink_v, window_v, v, axis=2)
    cos_k, sin_k, cos_q, sin_q, scale, visible, key_ids, cached_ids, query_ids, total_len = MesaStepPositions(
        q, cos, sin, sink_len, window_start, write_pos, chunk_width,
        train_length=train_length, push_width=push_width)
    return MesaAttend(q, keys, values, cos_k, sin_k, cos_q, sin_q, scale, visible)


PARTS = (MesaCachedKV, MesaStepPositions, MesaAttend)


def part_functions() -> list[ir.Function]:
    """The `ai.mesa` functions MesaAttention's body calls, for passes that emit calls to them."""
    return [ir.serde.deserialize_function(f.to_function_proto()) for f in PARTS]


def nested_function() -> ir.Function:
    """MesaAttention as written: calls to the parts, not yet inlined."""
    return ir.serde.deserialize_function(MesaAttention.to_function_proto())


def function_proto() -> onnx.FunctionProto:
    """MesaAttention with its parts inlined: one self-contained function (what the exporter attaches)."""
    outer = nested_function()
    holder = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": OPSET, DOMAIN: 1}), ir_version=10,
                      functions=[outer, *part_functions()])
    ir.passes.common.InlinePass()(holder)
    ir.passes.common.RemoveUnusedNodesPass()(holder)
    return ir.serde.serialize_function(holder.functions[outer.identifier()])


def mesa_attention_translation(q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos,
                               chunk_width, layer: int, train_length: int, push_width: int):
    """torch.onnx custom translation of torch.ops.mesa.attention: one ai.mesa::MesaAttention node."""
    return MesaAttentionOp(q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos,
                           chunk_width, layer=layer, train_length=train_length, push_width=push_width)

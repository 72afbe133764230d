"""The other methods' attention ops in ONNX: pair encodings (ReRoPE, Leaky-ReRoPE, Self-Extend,
LM-Infinite) and dynamic NTK, restating runtime/methods.py in standard ops.

Each op takes Mesa's step inputs (q, k, v before RoPE, the shared cache, the step scalars a, b, w) and
reads the visible cache rows with mesa_op's MesaCachedKV, so a call costs O(visible keys) as for Mesa:

| op | = parts | attributes |
|---|---|---|
| ReRoPEAttention | MesaCachedKV, CallPositions, ReRoPEPositions, PairAttend | layer, window, train_length |
| LeakyReRoPEAttention | ... LeakyReRoPEPositions ... | layer, window, train_length, k (float) |
| SelfExtendAttention | ... SelfExtendPositions ... | layer, window, group |
| LMInfiniteAttention | ... LMInfinitePositions ... | layer, train_length (the distance cap L) |
| DynamicNTKAttention | MesaCachedKV, CallPositions, DynamicNTKRope, mesa_op.MesaAttend | layer, train_length, factor, rope_theta; input chunk_width = the prompt length L |

Pair ops also take `inv_freq` [d/2] (the model's RoPE frequencies) and rotate at any, even fractional,
position: cos/sin = cos/sin(position x inv_freq), the product transformers' rotary embedding computes.
PairAttend runs the second encoding only where a call needs it: a decode step (one query) rotates each
far key to p2_k + (p1_q - p2_q) and makes one pass; a prefill chunk with no far pair makes one pass; any
other chunk computes both score matrices and picks per pair (as the reference implementations do).
"""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, INT64, script

from graph_ops.mesa_op import DOMAIN, OPSET, MesaAttend, MesaCachedKV, mesa_opset, op
from runtime import methods


@script(opset=mesa_opset, default_opset=op)
def CallPositions(q, sink_len: INT64, window_start: INT64, write_pos: INT64):
    """Absolute positions of the call's S keys (sink 0..a-1, window b..w-1, new w..w+q-1) and q
    queries (int64), the [q, S] distance i - j and the visibility mask (cached keys all, new ones causal)."""
    s1 = op.Constant(value_int=1)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    nq = op.Squeeze(op.Shape(q, start=2, end=3), zero)
    keys = op.Concat(op.Range(op.Constant(value_int=0), sink_len, s1), op.Range(window_start, write_pos, s1),
                     op.Range(write_pos, write_pos + nq, s1), axis=0)
    queries = op.Range(write_pos, write_pos + nq, s1)
    distance = op.Sub(op.Unsqueeze(queries, one), op.Unsqueeze(keys, zero))
    visible = op.GreaterOrEqual(distance, op.Constant(value_int=0))
    return keys, queries, distance, visible


@script(opset=mesa_opset, default_opset=op)
def LogN(queries: INT64, train_length: int):
    """Su's log-n scale [q]: max(1, ln(i + 1) / ln T) at absolute positions i."""
    ln_i = op.Log(op.Cast(queries + op.Constant(value_int=1), to=FLOAT.dtype))
    ln_t = op.Log(op.Cast(op.Constant(value_int=train_length), to=FLOAT.dtype))
    return op.Max(op.Div(ln_i, ln_t), op.Constant(value_float=1.0))


@script(opset=mesa_opset, default_opset=op)
def ReRoPEPositions(keys: INT64, queries: INT64, distance: INT64, window: int, train_length: int):
    """near: d < w; far pairs sit at distance w (query at w, key at 0)."""
    near = op.Less(distance, op.Constant(value_int=window))
    p2_k = op.CastLike(op.Mul(keys, op.Constant(value_int=0)), op.Constant(value_float=0.0))
    p2_q = op.Add(op.CastLike(op.Mul(queries, op.Constant(value_int=0)), op.Constant(value_float=0.0)),
                  op.Cast(op.Constant(value_int=window), to=FLOAT.dtype))
    return p2_k, p2_q, near, LogN(queries, train_length=train_length)


@script(opset=mesa_opset, default_opset=op)
def LeakyReRoPEPositions(keys: INT64, queries: INT64, distance: INT64, window: int, train_length: int, k: float):
    """near: d < w; far pairs at w + (d - w) / k: key at j / k, query at i / k + w (1 - 1/k)."""
    near = op.Less(distance, op.Constant(value_int=window))
    kf = op.Constant(value_float=k)
    w = op.Cast(op.Constant(value_int=window), to=FLOAT.dtype)
    p2_k = op.Div(op.Cast(keys, to=FLOAT.dtype), kf)
    one = op.Constant(value_float=1.0)
    p2_q = op.Add(op.Div(op.Cast(queries, to=FLOAT.dtype), kf), op.Mul(w, op.Sub(one, op.Div(one, kf))))
    return p2_k, p2_q, near, LogN(queries, train_length=train_length)


@script(opset=mesa_opset, default_opset=op)
def SelfExtendPositions(keys: INT64, queries: INT64, distance: INT64, window: int, group: int):
    """near: d < w_n; far pairs grouped: key at j // G, query at i // G + w_n - w_n // G; no scale."""
    wn = op.Constant(value_int=window)
    G = op.Constant(value_int=group)
    near = op.Less(distance, wn)
    p2_k = op.Cast(op.Div(keys, G), to=FLOAT.dtype)
    p2_q = op.Cast(op.Add(op.Div(queries, G), op.Sub(wn, op.Div(wn, G))), to=FLOAT.dtype)
    scale = op.CastLike(op.Mul(queries, op.Constant(value_int=0)) + op.Constant(value_int=1),
                        op.Constant(value_float=0.0))
    return p2_k, p2_q, near, scale


@script(opset=mesa_opset, default_opset=op)
def LMInfinitePositions(keys: INT64, queries: INT64, distance: INT64, train_length: int):
    """near: d < L; far pairs (only the global tokens, under the Λ mask) at distance L; no scale."""
    L = op.Constant(value_int=train_length)
    near = op.Less(distance, L)
    zeros_q = op.CastLike(op.Mul(queries, op.Constant(value_int=0)), op.Constant(value_float=0.0))
    p2_k = op.CastLike(op.Mul(keys, op.Constant(value_int=0)), op.Constant(value_float=0.0))
    return p2_k, op.Add(zeros_q, op.Cast(L, to=FLOAT.dtype)), near, op.Add(zeros_q, op.Constant(value_float=1.0))


@script(opset=mesa_opset, default_opset=op)
def Rotate(x, positions, inv_freq):
    """Rotate-half RoPE of x [..., N, d] at float positions [N]: cos/sin(positions x inv_freq)."""
    angles = op.Mul(op.Unsqueeze(positions, op.Constant(value_ints=[1])),
                    op.Unsqueeze(inv_freq, op.Constant(value_ints=[0])))
    cos = op.CastLike(op.Cos(angles), x)
    sin = op.CastLike(op.Sin(angles), x)
    x1, x2 = op.Split(x, axis=-1, num_outputs=2)
    return op.Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin, axis=-1)


@script(opset=mesa_opset, default_opset=op)
def Scores(q_r, keys_r, q):
    """GQA scores [B, Hkv, g, q, S] (float32) of rotated queries [B, H, q, d] and keys [B, Hkv, S, d]."""
    q5 = op.Reshape(q_r, op.Concat(op.Shape(keys_r, start=0, end=2), op.Constant(value_ints=[-1]),
                                   op.Shape(q, start=2, end=4), axis=0))
    k5 = op.Unsqueeze(keys_r, op.Constant(value_ints=[2]))
    d = op.Cast(op.Shape(q, start=3, end=4), to=FLOAT.dtype)
    return op.Div(op.Cast(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])), to=FLOAT.dtype), op.Sqrt(d))


@script(opset=mesa_opset, default_opset=op)
def PairAttend(q, keys, values, inv_freq, p1_k, p1_q, p2_k, p2_q, near: BOOL, scale, visible: BOOL):
    """Attention with two encodings: near pairs at p1 (absolute positions), the others at p2."""
    zero = op.Constant(value_ints=[0])
    nq = op.Shape(q, start=2, end=3)
    single = op.Equal(op.Squeeze(nq, zero), op.Constant(value_int=1))
    # one query: far keys rotated to p2_k + (p1_q - p2_q), so that one pass gives every pair its distance
    shifted = op.Add(p2_k, op.Sub(op.Gather(p1_q, op.Constant(value_int=0)), op.Gather(p2_q, op.Constant(value_int=0))))
    row_near = op.Gather(near, op.Constant(value_int=0), axis=0)
    k_pos = op.Where(op.And(single, op.Not(row_near)), shifted, p1_k)
    near_eff = op.Or(near, single)
    qs = op.Mul(q, op.CastLike(op.Unsqueeze(scale, op.Constant(value_ints=[-1])), q))
    s1 = Scores(Rotate(qs, p1_q, inv_freq), Rotate(keys, k_pos, inv_freq), q)
    any_far = op.ReduceMax(op.Cast(op.And(op.Not(near_eff), visible), to=INT64.dtype), keepdims=0)
    if op.Cast(any_far, to=BOOL.dtype):
        s2 = Scores(Rotate(qs, p2_q, inv_freq), Rotate(keys, p2_k, inv_freq), q)
        scores = op.Where(near_eff, s1, s2)
    else:
        scores = op.Identity(s1)
    scores = op.Where(visible, scores, op.Constant(value_float=-3.4028234663852886e38))
    probs = op.CastLike(op.Softmax(scores, axis=-1), q)
    v5 = op.Unsqueeze(values, op.Constant(value_ints=[2]))
    return op.Reshape(op.MatMul(probs, v5), op.Shape(q))


@script(opset=mesa_opset, default_opset=op)
def DynamicNTKRope(q, keys: INT64, queries: INT64, length: INT64, train_length: int, factor: float,
                   rope_theta: float):
    """cos/sin rows of the keys and queries with transformers' dynamic-NTK base: n = max(S, length, T)
    for S = the call's keys, base' = theta * (f n / T - (f - 1))^(d / (d - 2)), in float32 as
    transformers computes it."""
    d = op.Squeeze(op.Shape(q, start=3, end=4), op.Constant(value_ints=[0]))
    S = op.Add(op.ReduceMax(keys, keepdims=0), op.Constant(value_int=1))
    T = op.Constant(value_int=train_length)
    f = op.Constant(value_float=factor)
    Sf = op.Cast(op.Max(op.Max(S, length), T), to=FLOAT.dtype)
    df = op.Cast(d, to=FLOAT.dtype)
    ratio = op.Sub(op.Div(op.Mul(Sf, f), op.Cast(T, to=FLOAT.dtype)), op.Sub(f, op.Constant(value_float=1.0)))
    base = op.Mul(op.Constant(value_float=rope_theta),
                  op.Pow(ratio, op.Div(df, op.Sub(df, op.Constant(value_float=2.0)))))
    exps = op.Div(op.Cast(op.Range(op.Constant(value_int=0), d, op.Constant(value_int=2)), to=FLOAT.dtype), df)
    inv_freq = op.Div(op.Constant(value_float=1.0), op.Pow(base, exps))
    k_angles = op.Mul(op.Unsqueeze(op.Cast(keys, to=FLOAT.dtype), op.Constant(value_ints=[1])),
                      op.Unsqueeze(inv_freq, op.Constant(value_ints=[0])))
    q_angles = op.Mul(op.Unsqueeze(op.Cast(queries, to=FLOAT.dtype), op.Constant(value_ints=[1])),
                      op.Unsqueeze(inv_freq, op.Constant(value_ints=[0])))
    cos_k = op.CastLike(op.Cos(k_angles), q)
    sin_k = op.CastLike(op.Sin(k_angles), q)
    cos_q = op.CastLike(op.Cos(q_angles), q)
    sin_q = op.CastLike(op.Sin(q_angles), q)
    scale = op.CastLike(op.Unsqueeze(op.Cast(op.Mul(queries, op.Constant(value_int=0)) + op.Constant(value_int=1),
                                             to=FLOAT.dtype), op.Constant(value_ints=[-1])), q)
    return cos_k, sin_k, cos_q, sin_q, scale


@script(opset=mesa_opset, default_opset=op)
def VisibleKeys(q, k, v, k_cache, v_cache, sink_len: INT64, window_start: INT64, write_pos: INT64, layer: int):
    """The call's keys and values (sink ++ window ++ new, Mesa's MesaCachedKV rule) with CallPositions."""
    sink_k, window_k, sink_v, window_v = MesaCachedKV(k_cache, v_cache, sink_len, window_start, write_pos, layer=layer)
    keys = op.Concat(sink_k, window_k, k, axis=2)
    values = op.Concat(sink_v, window_v, v, axis=2)
    kp, qp, distance, visible = CallPositions(q, sink_len, window_start, write_pos)
    return keys, values, kp, qp, distance, visible


@script(opset=mesa_opset, default_opset=op)
def ReRoPEAttention(q, k, v, k_cache, v_cache, inv_freq, sink_len: INT64, window_start: INT64, write_pos: INT64,
                    layer: int, window: int, train_length: int):
    keys, values, kp, qp, distance, visible = VisibleKeys(q, k, v, k_cache, v_cache, sink_len, window_start,
                                                          write_pos, layer=layer)
    p2_k, p2_q, near, scale = ReRoPEPositions(kp, qp, distance, window=window, train_length=train_length)
    return PairAttend(q, keys, values, inv_freq, op.Cast(kp, to=FLOAT.dtype), op.Cast(qp, to=FLOAT.dtype),
                      p2_k, p2_q, near, scale, visible)


@script(opset=mesa_opset, default_opset=op)
def LeakyReRoPEAttention(q, k, v, k_cache, v_cache, inv_freq, sink_len: INT64, window_start: INT64,
                         write_pos: INT64, layer: int, window: int, train_length: int, k_factor: float):
    keys, values, kp, qp, distance, visible = VisibleKeys(q, k, v, k_cache, v_cache, sink_len, window_start,
                                                          write_pos, layer=layer)
    p2_k, p2_q, near, scale = LeakyReRoPEPositions(kp, qp, distance, window=window, train_length=train_length,
                                                   k=k_factor)
    return PairAttend(q, keys, values, inv_freq, op.Cast(kp, to=FLOAT.dtype), op.Cast(qp, to=FLOAT.dtype),
                      p2_k, p2_q, near, scale, visible)


@script(opset=mesa_opset, default_opset=op)
def SelfExtendAttention(q, k, v, k_cache, v_cache, inv_freq, sink_len: INT64, window_start: INT64,
                        write_pos: INT64, layer: int, window: int, group: int):
    keys, values, kp, qp, distance, visible = VisibleKeys(q, k, v, k_cache, v_cache, sink_len, window_start,
                                                          write_pos, layer=layer)
    p2_k, p2_q, near, scale = SelfExtendPositions(kp, qp, distance, window=window, group=group)
    return PairAttend(q, keys, values, inv_freq, op.Cast(kp, to=FLOAT.dtype), op.Cast(qp, to=FLOAT.dtype),
                      p2_k, p2_q, near, scale, visible)


@script(opset=mesa_opset, default_opset=op)
def LMInfiniteAttention(q, k, v, k_cache, v_cache, inv_freq, sink_len: INT64, window_start: INT64,
                        write_pos: INT64, layer: int, train_length: int):
    keys, values, kp, qp, distance, visible = VisibleKeys(q, k, v, k_cache, v_cache, sink_len, window_start,
                                                          write_pos, layer=layer)
    p2_k, p2_q, near, scale = LMInfinitePositions(kp, qp, distance, train_length=train_length)
    return PairAttend(q, keys, values, inv_freq, op.Cast(kp, to=FLOAT.dtype), op.Cast(qp, to=FLOAT.dtype),
                      p2_k, p2_q, near, scale, visible)


@script(opset=mesa_opset, default_opset=op)
def DynamicNTKAttention(q, k, v, k_cache, v_cache, sink_len: INT64, window_start: INT64, write_pos: INT64,
                        chunk_width: INT64, layer: int, train_length: int, factor: float, rope_theta: float):
    keys, values, kp, qp, distance, visible = VisibleKeys(q, k, v, k_cache, v_cache, sink_len, window_start,
                                                          write_pos, layer=layer)
    cos_k, sin_k, cos_q, sin_q, scale = DynamicNTKRope(q, kp, qp, chunk_width, train_length=train_length,
                                                       factor=factor, rope_theta=rope_theta)
    return MesaAttend(q, keys, values, cos_k, sin_k, cos_q, sin_q, scale, visible)


# method name -> its top-level op (what the exporter emits)
OPS = {"rerope": ReRoPEAttention, "leaky-rerope": LeakyReRoPEAttention, "self-extend": SelfExtendAttention,
       "lm-infinite": LMInfiniteAttention, "dynamic-ntk": DynamicNTKAttention}
PARTS = (MesaCachedKV, MesaAttend, CallPositions, VisibleKeys, LogN, ReRoPEPositions, LeakyReRoPEPositions, SelfExtendPositions,
         LMInfinitePositions, Rotate, Scores, PairAttend, DynamicNTKRope)


def function_proto(method: str) -> onnx.FunctionProto:
    """The method's op with its parts inlined: one self-contained function, as the exporter attaches it."""
    outer = ir.serde.deserialize_function(OPS[method].to_function_proto())
    parts = [ir.serde.deserialize_function(f.to_function_proto()) for f in PARTS]
    holder = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": OPSET, DOMAIN: 1}), ir_version=10,
                      functions=[outer, *parts])
    ir.passes.common.InlinePass()(holder)
    ir.passes.common.RemoveUnusedNodesPass()(holder)
    fn = holder.functions[outer.identifier()]
    fn.opset_imports.setdefault("", OPSET)  # an op that only called parts now holds their standard ops
    return ir.serde.serialize_function(fn)


def attrs(method) -> dict:
    """The ONNX attributes of a runtime.methods.Method's op (without `layer`)."""
    name = method.name
    if name == "rerope":
        return {"window": method.window, "train_length": method.train_length}
    if name == "leaky-rerope":
        return {"window": method.window, "train_length": method.train_length, "k_factor": float(method.k)}
    if name == "self-extend":
        return {"window": method.window, "group": method.group}
    if name == "lm-infinite":
        return {"train_length": method.train_length}
    raise ValueError(f"method {name} has no attention op of its own")


_INPUTS = ("q", "k", "v", "k_cache", "v_cache", "inv_freq", "sink_len", "window_start", "write_pos", "chunk_width")
_FLOAT_ATTRS = {"k_factor", "factor", "rope_theta"}


def _schema(fn) -> OpSchema:
    """An OpSchema read off a top-level function: its inputs, and its attributes typed int or float."""
    proto = fn.to_function_proto()
    inputs = [i for i in proto.input]
    return OpSchema(
        proto.name, DOMAIN, 1, doc=proto.doc_string or proto.name,
        inputs=[OpSchema.FormalParameter(n, "tensor(int64)" if n in _INPUTS[6:] else "T") for n in inputs],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.FLOAT if a in _FLOAT_ATTRS else OpSchema.AttrType.INT, "")
                    for a in proto.attribute])


NODES = {name: onnxscript.values.Op(mesa_opset, fn.name, _schema(fn)) for name, fn in OPS.items()}


def method_attention_translation(q, k, v, k_cache, v_cache, inv_freq, sink_len, window_start, write_pos,
                                 chunk_width, layer: int, method: str, params: str):
    """torch.onnx custom translation of torch.ops.mesa.method_attention: one ai.mesa node of the method."""
    m = methods.CLASSES[method](**json.loads(params))
    if method == "dynamic-ntk":
        return NODES[method](q, k, v, k_cache, v_cache, sink_len, window_start, write_pos, chunk_width, layer=layer,
                             train_length=m.train_length, factor=float(m.factor), rope_theta=float(m.rope_theta))
    return NODES[method](q, k, v, k_cache, v_cache, inv_freq, sink_len, window_start, write_pos, layer=layer,
                         **attrs(m))

"""Lower `ai.mesa::MesaAttention` to the attention kernel a backend runs fastest.

Each MesaAttention node becomes three parts (graph_ops/mesa_op.py holds every formula):

    sink_k, window_k, sink_v, window_v = ai.mesa::MesaCachedKV(cache, a, b, w; layer)   per layer
    cos_k, ..., visible, key_ids, ...  = ai.mesa::MesaStepPositions(q, cos, sin, a, b, w, W; T, pw)
    output                             = <kernel>(q, visible keys and values, step positions)

The MesaStepPositions calls of all layers are identical; graph_ops/step_positions.py merges them
into one per step (mask fusion) and graph_ops/inline_parts.py expands the parts into plain ops.

Kernels (one rule class, four variants):

- `attention`: ONNX RotaryEmbedding (opset 23, rotate-half, position_ids = the step's stair
  positions) on the S visible keys and the q queries, Mul by the log-n scale, then ONNX Attention
  (opset 23/24; GQA from the head counts of the 4-D inputs; the boolean [q, S] mask). Runs on ORT CPU
  and CUDA (both register Attention 23/24 and RotaryEmbedding 23).
- `gqa`: ORT's com.microsoft GroupQueryAttention: the rotated visible cache rows are its past, the
  rotated new block its key/value; its built-in causal rule (query i sees past + keys <= i) is
  exactly the Mesa mask, so no mask tensor is built at all. Queries are pre-rotated (its own rotary
  would use positions past+i, not stairs) and pre-scaled by log-n.
- `auto`: both, picked per step by an If on the block length: `attention` for single-token steps
  (decode), `gqa` for prefill chunks — each is the faster of the two there (README, measured).
- `inplace`: `gqa` for prefill chunks, and for decode steps GroupQueryAttention over a per-layer
  cache of keys already rotated at their stair positions (`past_key_{l}`, `past_value_{l}`), bound by
  the runtime as both past and present so ORT appends the new row in place (share-buffer mode) and
  reads only each row's own `seqlens_k` + 1 keys: no copy, no re-rotation, rows of different lengths
  in one call. The new key and query are rotated by GQA itself at position seqlens_k (= S - 1: under
  Stair PE the newest key keeps its index) and the query is pre-scaled by log-n of its row. An If on
  the `decode_step` input picks the branch; the prefill branch passes the per-layer caches through.
- `decomposed`: ai.mesa::MesaAttend, the explicit rotate-half / MatMul / Softmax form of the original
  body, for backends that should see nothing but elementary ops (TensorRT, see tensorrt_ops.py).

Key points a match must satisfy: the node carries the three int attributes; q and k are 4-D with
static head counts and head size (needed by the kernels' attributes and the reshapes).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_ops import mesa_op
from runtime.artifact import DECODE_CACHE, DECODE_INPUTS, DECODE_PRESENT

KERNELS = ("attention", "gqa", "auto", "inplace", "decomposed")

D = mesa_op.DOMAIN


def _static_dims(value: ir.Value, axes: tuple[int, ...]) -> list[int] | None:
    shape = value.shape
    if shape is None or shape.rank() != 4:
        return None
    dims = [shape[a] for a in axes]
    return dims if all(isinstance(x, int) for x in dims) else None


class LowerMesaAttention(pattern.RewriteRuleClassBase):
    def __init__(self, kernel: str, decode: "DecodeInputs | None" = None):
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        super().__init__(f"LowerMesaAttention[{kernel}]")
        self.kernel, self.decode = kernel, decode

    def pattern(self, op, q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos, chunk_width):
        return op.MesaAttention(q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos,
                                chunk_width, _domain=D, _outputs=["out"])

    def check(self, op, q, k, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attrs = out.producer().attributes
        for name in mesa_op.ATTRIBUTES:
            if name not in attrs or attrs[name].type != ir.AttributeType.INT:
                return result.fail(f"MesaAttention lacks the int attribute {name!r}", out.producer())
        if self.kernel != "decomposed":
            if _static_dims(q, (1, 3)) is None or _static_dims(k, (1, 3)) is None:
                return result.fail("q/k must be 4-D with static head count and head size", q)
        return result

    def rewrite(self, op, q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos, chunk_width,
                out, **_):
        attrs = out.producer().attributes
        layer, T, pw = (attrs[n].as_int() for n in mesa_op.ATTRIBUTES)
        sink_k, window_k, sink_v, window_v = op.MesaCachedKV(
            k_cache, v_cache, sink_len, window_start, write_pos, layer=layer, _domain=D, _outputs=4)
        (cos_k, sin_k, cos_q, sin_q, scale, visible, key_ids, cached_ids, query_ids, total_len) = \
            op.MesaStepPositions(q, cos, sin, sink_len, window_start, write_pos, chunk_width,
                                 train_length=T, push_width=pw, _domain=D, _outputs=10)
        if self.kernel == "decomposed":
            keys = op.Concat(sink_k, window_k, k, axis=2)
            values = op.Concat(sink_v, window_v, v, axis=2)
            return op.MesaAttend(q, keys, values, cos_k, sin_k, cos_q, sin_q, scale, visible, _domain=D)
        q_rot = op.Mul(op.RotaryEmbedding(q, cos, sin, query_ids, interleaved=0), scale)
        rows = (k, v, sink_k, window_k, sink_v, window_v, cos, sin)
        if self.kernel == "attention":
            return _attention(op, q_rot, *rows, key_ids, visible)
        heads, head_dim = _static_dims(q, (1, 3))
        kv_heads = _static_dims(k, (1, 3))[0]
        # GroupQueryAttention's lengths, from shared values only (CSE keeps one per step)
        batch = op.Shape(key_ids, start=0, end=1)  # key_ids [B, S]
        last_key = op.Sub(op.Shape(key_ids, start=1, end=2), op.Constant(value_ints=[1]))
        seqlens = op.Cast(op.Expand(last_key, batch), to=ir.DataType.INT32)  # [B]: S - 1 per row
        total = op.Cast(total_len, to=ir.DataType.INT32)
        gqa_args = (q_rot, *rows, cached_ids, query_ids, seqlens, total, heads, kv_heads, head_dim)
        if self.kernel == "gqa":
            return _gqa(op, *gqa_args)
        if self.kernel == "inplace":
            return self.decode.lower(op, layer, T, q, k, v, cos, sin, heads, kv_heads, head_dim,
                                     lambda b: _gqa(b, *gqa_args))
        # auto: single-token steps (decode) -> Attention, longer blocks (prefill chunks) -> GroupQueryAttention
        is_decode = op.Equal(op.Shape(query_ids, start=1, end=2), op.Constant(value_ints=[1]))
        decode = _branch("decode", lambda b: _attention(b, q_rot, *rows, key_ids, visible), q)
        prefill = _branch("prefill", lambda b: _gqa(b, *gqa_args), q)
        return op.If(is_decode, then_branch=decode, else_branch=prefill)


def _attention(op, q_rot, k, v, sink_k, window_k, sink_v, window_v, cos, sin, key_ids, visible):
    """ONNX RotaryEmbedding on the S visible keys, then ONNX Attention under the [q, S] mask."""
    keys = op.RotaryEmbedding(op.Concat(sink_k, window_k, k, axis=2), cos, sin, key_ids, interleaved=0)
    values = op.Concat(sink_v, window_v, v, axis=2)
    return op.Attention(q_rot, keys, values, visible)


def _gqa(op, q_rot, k, v, sink_k, window_k, sink_v, window_v, cos, sin, cached_ids, query_ids, seqlens, total,
         heads, kv_heads, head_dim):
    """com.microsoft GroupQueryAttention: rotated cache rows as its past, the rotated new block as key."""
    past_k = op.RotaryEmbedding(op.Concat(sink_k, window_k, axis=2), cos, sin, cached_ids, interleaved=0)
    past_v = op.Concat(sink_v, window_v, axis=2)
    new_k = op.RotaryEmbedding(k, cos, sin, query_ids, interleaved=0)  # new keys sit at the query positions
    flat = op.Constant(value_ints=[0, 0, -1])

    def bsh(x):  # [B, N, s, d] -> [B, s, N*d]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

    attn, _, _ = op.GroupQueryAttention(bsh(q_rot), bsh(new_k), bsh(v), past_k, past_v, seqlens, total,
                                        num_heads=heads, kv_num_heads=kv_heads, _domain="com.microsoft",
                                        _outputs=3)
    return op.Transpose(op.Reshape(attn, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])


class DecodeInputs:
    """The `inplace` kernel's graph inputs and, per layer, the present outputs it binds to them."""

    def __init__(self, graph: ir.Graph, k_cache: ir.Value):
        layers, _, kv_heads, max_len, head_dim = k_cache.shape
        self.graph = graph
        self.flag = self._input(DECODE_INPUTS[0], ir.DataType.BOOL, [])
        self.seqlens = self._input(DECODE_INPUTS[1], ir.DataType.INT32, ["batch"])
        self.total = self._input(DECODE_INPUTS[2], ir.DataType.INT32, [])
        rows = ["batch", kv_heads, max_len, head_dim]
        self.past = {(kind, layer): self._input(DECODE_CACHE.format(kind, layer), k_cache.dtype, rows)
                     for layer in range(layers) for kind in ("key", "value")}
        self.present: dict[tuple[str, int], ir.Value] = {}

    def _input(self, name: str, dtype: ir.DataType, dims: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
        self.graph.inputs.append(value)
        return value

    def lower(self, op, layer, T, q, k, v, cos, sin, heads, kv_heads, head_dim, prefill):
        past_k, past_v = self.past["key", layer], self.past["value", layer]

        def decode(b):
            # log-n of the one query of each row: λ = max(1, ln(S) / ln T), S = seqlens_k + 1
            S = b.Add(b.Cast(self.seqlens, to=ir.DataType.FLOAT), b.Constant(value_float=1.0))
            lam = b.Max(b.Div(b.Log(S), b.Log(b.Constant(value_float=float(T)))), b.Constant(value_float=1.0))
            scale = b.CastLike(b.Reshape(lam, b.Constant(value_ints=[-1, 1, 1])), q)
            flat = b.Constant(value_ints=[0, 0, -1])
            bsh = lambda x: b.Reshape(b.Transpose(x, perm=[0, 2, 1, 3]), flat)  # noqa: E731
            attn, pk, pv = b.GroupQueryAttention(
                b.Mul(bsh(q), scale), bsh(k), bsh(v), past_k, past_v, self.seqlens, self.total, cos, sin,
                num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                _domain="com.microsoft", _outputs=3)
            out = b.Transpose(b.Reshape(attn, b.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])
            return out, pk, pv

        def passthrough(b):  # prefill: the decode caches are untouched (bound in place, so no copy)
            return prefill(b), b.Identity(past_k), b.Identity(past_v)

        out, pk, pv = op.If(self.flag, then_branch=_branch("decode", decode, q, past_k),
                            else_branch=_branch("prefill", passthrough, q, past_k), _outputs=3)
        self.present["key", layer], self.present["value", layer] = pk, pv
        return out

    def add_outputs(self) -> None:
        for (kind, layer), value in sorted(self.present.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            value.name = DECODE_PRESENT.format(kind, layer)
            value.shape = self.past[kind, layer].shape
            value.dtype = self.past[kind, layer].dtype
            self.graph.outputs.append(value)


class _TapeOps:
    """`op.Name(*inputs, _domain=..., _outputs=n, **attributes)` over an onnx_ir Tape, for If branches."""

    def __init__(self):
        self.tape = ir.tape.Tape()

    def __getattr__(self, op_type: str):
        def emit(*inputs, _domain: str = "", _outputs: int = 1, **attributes):
            if _outputs == 1:
                return self.tape.op(op_type, list(inputs), attributes, domain=_domain)
            return self.tape.op_multi_out(op_type, list(inputs), attributes, num_outputs=_outputs, domain=_domain)
        return emit


def _branch(name: str, build, like: ir.Value, cache_like: ir.Value | None = None) -> ir.Graph:
    """A subgraph from `build(ops)`: one output shaped like `like`, or (that, cache, cache)."""
    b = _TapeOps()
    outs = build(b)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    for out, ref in zip(outs, [like, cache_like, cache_like]):
        out.dtype, out.shape = ref.dtype, ref.shape
    return ir.Graph(inputs=[], outputs=outs, nodes=b.tape.nodes, name=name)


def lower_attention(model: ir.Model, kernel: str = "attention") -> int:
    """Replace every MesaAttention by `kernel`; returns how many were replaced."""
    for fn in mesa_op.part_functions():
        model.functions.setdefault(fn.identifier(), fn)
    decode = None
    if kernel == "inplace":
        k_cache = next(v for v in model.graph.inputs if v.name == "k_cache")
        decode = DecodeInputs(model.graph, k_cache)
    count = pattern.RewriteRuleSet([LowerMesaAttention.rule(kernel, decode)]).apply_to_model(model)
    if decode is not None:
        decode.add_outputs()
    if kernel in ("gqa", "auto", "inplace") and count:
        model.opset_imports.setdefault("com.microsoft", 1)
    ir.passes.common.RemoveUnusedFunctionsPass()(model)
    return count

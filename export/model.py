"""The export-oriented decoder: a compact Llama (also Mistral, Qwen2) whose attention is one custom op.

One forward is one step of a Mesa schedule (DESIGN.md, "The step graph"): the new block's token ids,
the static KV cache (keys stored before RoPE), and the step scalars. It returns the logits of the
last `logits_to_keep` positions and the new block's K/V rows, which the caller writes into its cache
at `write_pos`. `torch.ops.mesa.attention` is the reference implementation of `ai.mesa::MesaAttention`;
the exporter swaps it for the ONNX function of graph_ops/mesa_function.py.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from runtime import mesa, methods


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    rope_theta: float = 10000.0
    linear_factor: float = 1.0  # rope_scaling {"rope_type": "linear", "factor": f}
    yarn: methods.YaRN | None = None  # --method yarn: frequencies and cos/sin scale of runtime.methods.YaRN


def inv_frequencies(rope: RopeConfig) -> Tensor:
    """[head_dim // 2] float32, with transformers' exact torch expressions (default, linear, yarn): a
    numpy pow can differ from torch's by one ulp, which grows with the position."""
    d = rope.head_dim
    pos_freqs = rope.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float) / d)
    if rope.yarn is not None:
        keep = torch.from_numpy(rope.yarn.extrapolation_weight(rope.rope_theta, d))
        return (1.0 / (rope.yarn.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return (1.0 / pos_freqs) / rope.linear_factor


def rope_tables(max_len: int, rope: RopeConfig) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, head_dim // 2], float32 (times YaRN's attention factor, as transformers)."""
    inv_freq = inv_frequencies(rope)
    angles = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    scale = rope.yarn.attention_factor if rope.yarn is not None else 1.0
    return angles.cos() * scale, angles.sin() * scale


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    attention_bias: bool = False  # Qwen2: q/k/v projections have biases
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config, rope: RopeConfig) -> "ModelArgs":
        heads = config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=rope.head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope=rope,
            attention_bias=bias,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


# ------------------------------------------------------------------------------ the custom op

def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotate-half RoPE with half-width tables: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _visible_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, step: mesa.Step):
    """A step's keys and values: cache[layer] sink ++ window ++ the new block (mesa.visible_ranges)."""
    kc, vc = k_cache[layer], v_cache[layer]
    (s0, s1), (w0, w1), _ = step.visible_ranges
    return (torch.cat((kc[:, :, s0:s1], kc[:, :, w0:w1], k), dim=2),
            torch.cat((vc[:, :, s0:s1], vc[:, :, w0:w1], v), dim=2))


def _attend(q_r: Tensor, k_r: Tensor, values: Tensor, visible: Tensor, pick=None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over visible pairs (GQA: keys repeated per group); `pick` = (near, q2_r,
    k2_r): pairs not near are scored by q2, k2 instead."""
    groups = q_r.shape[1] // k_r.shape[1]
    d = math.sqrt(q_r.shape[-1])
    scores = (q_r @ k_r.repeat_interleave(groups, dim=1).transpose(-1, -2)).float() / d
    if pick is not None:
        near, q2_r, k2_r = pick
        far = (q2_r @ k2_r.repeat_interleave(groups, dim=1).transpose(-1, -2)).float() / d
        scores = torch.where(torch.from_numpy(near), scores, far)
    scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    return scores.softmax(dim=-1).to(values.dtype) @ values.repeat_interleave(groups, dim=1)


@torch.library.custom_op("mesa::attention", mutates_args=())
def mesa_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
    sink_len: Tensor, window_start: Tensor, write_pos: Tensor, chunk_width: Tensor,
    layer: int, train_length: int, push_width: int,
) -> Tensor:
    """Attention of one step (MESA_SPEC §4). q [B,H,q,d], k/v [B,Hkv,q,d] before RoPE;
    k_cache/v_cache [layers,B,Hkv,max_len,d]; returns [B,H,q,d]."""
    a, b, w, W = (int(t) for t in (sink_len, window_start, write_pos, chunk_width))
    keys, values = _visible_kv(k, v, k_cache, v_cache, layer, mesa.Step(w, w + q.shape[2], a, b, W))
    m, nq = keys.shape[2], q.shape[2]
    pos = torch.from_numpy(mesa.key_positions(m, W, train_length, push_width))
    cos_k, sin_k = cos[pos], sin[pos]
    scale = torch.from_numpy(mesa.logn_scale(np.arange(m - nq, m), train_length)).to(q.dtype)
    queries = apply_rope(q, cos_k[m - nq:], sin_k[m - nq:]) * scale[:, None]
    # cached keys are all visible; new key j is visible to new query i iff j <= i
    visible = torch.arange(m)[None, :] <= torch.arange(m - nq, m)[:, None]
    return _attend(queries, apply_rope(keys, cos_k, sin_k), values, visible)


@mesa_attention.register_fake
def _(q, k, v, k_cache, v_cache, cos, sin, sink_len, window_start, write_pos, chunk_width,
      layer, train_length, push_width):
    return torch.empty_like(q)


def _rotate_at(x: Tensor, positions: np.ndarray, inv_freq: Tensor) -> Tensor:
    angles = torch.from_numpy(np.asarray(positions, np.float32))[:, None] * inv_freq[None, :]
    return apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


@torch.library.custom_op("mesa::method_attention", mutates_args=())
def method_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, inv_freq: Tensor,
    sink_len: Tensor, window_start: Tensor, write_pos: Tensor, chunk_width: Tensor, layer: int, method: str,
    params: str,
) -> Tensor:
    """Attention of one step for the methods of runtime/methods.py with an op of their own (pair
    methods, dynamic-ntk); the reference of graph_ops/methods_op.py. Same tensors as mesa::attention."""
    m = _method(method, params)
    a, b, w = (int(t) for t in (sink_len, window_start, write_pos))
    step = mesa.Step(w, w + q.shape[2], a, b, 1)
    keys, values = _visible_kv(k, v, k_cache, v_cache, layer, step)
    kp, qp = methods.call_positions(step)
    visible = torch.from_numpy(qp[:, None] >= kp[None, :])
    if isinstance(m, methods.DynamicNTK):
        inv = _dynamic_inv_freq(m, max(int(kp.max()) + 1, int(chunk_width)), q.shape[-1])
        return _attend(_rotate_at(q, qp, inv), _rotate_at(keys, kp, inv), values, visible)
    e = m.encode(step)
    qs = q * torch.from_numpy(e.scale).to(q.dtype)[:, None]
    if q.shape[2] == 1:  # decode: one pass, far keys rotated to their method distance
        return _attend(_rotate_at(qs, e.p1_q, inv_freq), _rotate_at(keys, methods.single_pass_key_positions(e),
                                                                     inv_freq), values, visible)
    pick = None
    if not e.near[qp[:, None] >= kp[None, :]].all():
        pick = (e.near, _rotate_at(qs, e.p2_q, inv_freq), _rotate_at(keys, e.p2_k, inv_freq))
    return _attend(_rotate_at(qs, e.p1_q, inv_freq), _rotate_at(keys, e.p1_k, inv_freq), values, visible, pick)


@functools.cache
def _method(name: str, params: str) -> methods.Method:
    """The op's method from its attributes (parsed once, not per layer and step)."""
    return methods.CLASSES[name](**json.loads(params))


def _dynamic_inv_freq(m: methods.DynamicNTK, length: int, d: int) -> Tensor:
    """transformers' dynamic-NTK frequencies for a sequence of `length` tokens: the default frequencies of
    base' (computed in float32, as transformers does from a tensor seq_len)."""
    seq = torch.tensor(max(length, m.train_length), dtype=torch.int64)
    base = m.rope_theta * ((m.factor * seq / m.train_length) - (m.factor - 1)) ** (d / (d - 2))
    return inv_frequencies(RopeConfig(head_dim=d, rope_theta=base))


@method_attention.register_fake
def _(q, k, v, k_cache, v_cache, inv_freq, sink_len, window_start, write_pos, chunk_width, layer, method, params):
    return torch.empty_like(q)


# ------------------------------------------------------------------------------ the decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, mesa_attrs: tuple[int, int], method: methods.Method | None = None):
        super().__init__()
        h, kv, d, bias = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=False)
        self.shape = (h, kv, d)
        self.layer = layer
        self.train_length, self.push_width = mesa_attrs
        self.method = method if method is not None and method.own_op else None  # else mesa::attention
        self.method_json = json.dumps(method.as_dict(), sort_keys=True) if self.method else ""

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, rope: tuple[Tensor, Tensor, Tensor],
                scalars: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        B, n, _ = x.shape
        h, kv, d = self.shape
        q = self.q_proj(x).view(B, n, h, d).transpose(1, 2)
        k = self.k_proj(x).view(B, n, kv, d).transpose(1, 2)
        v = self.v_proj(x).view(B, n, kv, d).transpose(1, 2)
        cos, sin, inv_freq = rope
        if self.method is not None:
            out = torch.ops.mesa.method_attention(q, k, v, k_cache, v_cache, inv_freq, *scalars,
                                                  self.layer, self.method.name, self.method_json)
        else:
            out = torch.ops.mesa.attention(q, k, v, k_cache, v_cache, cos, sin, *scalars,
                                           self.layer, self.train_length, self.push_width)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, h * d)), k, v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, mesa_attrs: tuple[int, int], method=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer, mesa_attrs, method)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, k_cache, v_cache, rope, scalars):
        attn, k, v = self.self_attn(self.input_layernorm(x), k_cache, v_cache, rope, scalars)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Backbone(nn.Module):  # named like HF's `model.` prefix so checkpoints load by name
    def __init__(self, args: ModelArgs, mesa_attrs: tuple[int, int], method=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, mesa_attrs, method) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MesaDecoder(nn.Module):
    """forward(input_ids, k_cache, v_cache, sink_len, window_start, write_pos, chunk_width, logits_to_keep)
    -> (logits [B, logits_to_keep, vocab], new_keys, new_values [layers, B, Hkv, q, d])."""

    def __init__(self, args: ModelArgs, max_len: int, train_length: int, push_width: int,
                 method: methods.Method | None = None):
        super().__init__()
        self.args, self.max_len = args, max_len
        self.model = Backbone(args, (train_length, push_width), method)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.reset_rope_tables()

    def reset_rope_tables(self) -> None:
        """RoPE cos/sin for [0, max_len) (the exported initializers); call again after a meta-device build."""
        with torch.device("cpu"):
            cos, sin = rope_tables(self.max_len, self.args.rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        with torch.device("cpu"):
            self.register_buffer("rope_inv_freq", inv_frequencies(self.args.rope), persistent=False)

    def forward(self, input_ids: Tensor, k_cache: Tensor, v_cache: Tensor, sink_len: Tensor,
                window_start: Tensor, write_pos: Tensor, chunk_width: Tensor, logits_to_keep: Tensor):
        scalars = (sink_len, window_start, write_pos, chunk_width)
        x = self.model.embed_tokens(input_ids)
        rope = (self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype), self.rope_inv_freq)
        new_k, new_v = [], []
        for layer in self.model.layers:
            x, k, v = layer(x, k_cache, v_cache, rope, scalars)
            new_k.append(k)
            new_v.append(v)
        n = logits_to_keep.item()
        torch._check(n >= 1)
        torch._check(n <= x.shape[1])
        x = x.narrow(1, x.shape[1] - n, n)
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, torch.stack(new_k), torch.stack(new_v)

    def load_hf_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """HF names map 1:1; rotary buffers are ours; a tied lm_head reuses the embedding."""
        sd = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

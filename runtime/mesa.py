"""Mesa-Extrapolation: the one module that owns the method's formulas.

Everything else (the torch reference, the ONNX function body, the runtime scheduler, the tests)
imports these functions; no formula is written twice. Pure Python + numpy, so serving needs no torch.
The behaviour is that of the published code as restated in runtime/MESA_SPEC.md (section numbers below).

| paper | published `position_set` field | here |
|---|---|---|
| T  | train_length          | `train_length` |
| F  | first_chunk           | `first_chunk` |
| Fc | first_chunk_cache     | `first_chunk_cache` (only used by DynamicSplit) |
| C  | last_context          | `last_context` (only used by DynamicSplit) |
| G  | max_token_len         | `reserve_tokens` (only used by DynamicSplit; not a generation limit) |
| pw | push_width            | `push_width` |
| W  | context_window_length | `chunk_width` = W0, the starting value; DynamicSplit may override it per prompt |

Step scalars (DESIGN.md, "The step graph"): a call sees `cache[0:a] ++ cache[b:w] ++ new_block`
with a = `sink_len`, b = `window_start`, w = `write_pos`; its m = a + (w - b) + q keys get
positions `key_positions(m, W, ...)`, its q queries the last q of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Method = Literal["mesa", "origin"]
METHODS: tuple[str, ...] = ("mesa", "origin")

# DynamicSplit accepts a split whose remainder is below this many tokens (an absolute constant in the
# published code, not scaled by T).
SPLIT_REMAINDER_LIMIT = 200


class MesaParamError(ValueError):
    """Mesa parameters that the published method rejects (its asserts) or that make no sense."""


@dataclass(frozen=True)
class MesaParams:
    train_length: int  # T
    first_chunk: int  # F
    first_chunk_cache: int  # Fc
    last_context: int  # C
    reserve_tokens: int  # G
    push_width: int  # pw
    chunk_width: int = 0  # W0; 0 means "= T", as the published experiment script sets it

    def __post_init__(self):
        for name in ("train_length", "first_chunk", "push_width"):
            if int(getattr(self, name)) < 1:
                raise MesaParamError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("first_chunk_cache", "last_context", "reserve_tokens", "chunk_width"):
            if int(getattr(self, name)) < 0:
                raise MesaParamError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chunk_width == 0:
            object.__setattr__(self, "chunk_width", self.train_length)
        if self.first_chunk >= self.train_length:
            raise MesaParamError(
                f"first_chunk F={self.first_chunk} must be below train_length T={self.train_length}"
            )

    def as_dict(self) -> dict:
        return {k: int(getattr(self, k)) for k in self.__dataclass_fields__}


def origin_params(max_len: int) -> MesaParams:
    """Plain RoPE as a special case of the formulas: with T = max_len + 1 no call ever has S > T
    (positions are the identity) and ln(i+1) < ln T for every query, so the log-n factor is exactly 1."""
    return MesaParams(train_length=max_len + 1, first_chunk=1, first_chunk_cache=0, last_context=0,
                      reserve_tokens=0, push_width=1)


def graph_params(params: MesaParams, method: Method, max_len: int) -> MesaParams:
    """The parameters an engine's steps run with: origin is the same formulas with T = max_len + 1."""
    return origin_params(max_len) if method == "origin" else params


# ---------------------------------------------------------------------------------------- §2

def dynamic_split(prompt_len: int, p: MesaParams) -> int:
    """The chunk width W for a prompt of `prompt_len` tokens (published `set_align_position`)."""
    T, F, Fc, C, G = p.train_length, p.first_chunk, p.first_chunk_cache, p.last_context, p.reserve_tokens
    if prompt_len < T - G:
        return p.chunk_width
    X = prompt_len + G - C - F
    D = T - F - Fc
    if D <= 0:
        raise MesaParamError(f"T - F - Fc = {D} must be positive (T={T}, F={F}, Fc={Fc})")
    N, M = divmod(X, D)
    if M < SPLIT_REMAINDER_LIMIT:
        W = D
    else:
        if N + 1 == 0:
            raise MesaParamError(f"DynamicSplit divides by zero for L={prompt_len} (C + F too large for T)")
        W = X // (N + 1)
        if W <= 0:
            raise MesaParamError(f"DynamicSplit gives chunk width {W} for L={prompt_len}")
        N, MM = divmod(X, W)
        if MM >= SPLIT_REMAINDER_LIMIT:
            raise MesaParamError(f"non reasonable setting: remainder {MM} >= {SPLIT_REMAINDER_LIMIT} for L={prompt_len}")
    if W + F >= T:
        raise MesaParamError(f"chunk width W={W} plus first chunk F={F} must stay below T={T}")
    return W


# ---------------------------------------------------------------------------------------- §3

@dataclass(frozen=True)
class Step:
    """One call of the decoder stack: new tokens [start, stop) seeing cache[0:a] ++ cache[b:w] ++ new."""

    start: int
    stop: int
    sink_len: int  # a
    window_start: int  # b
    chunk_width: int  # W, the modulus of the stair positions
    kind: str = field(default="decode", compare=False)

    @property
    def write_pos(self) -> int:  # w: the new block's keys land at their absolute indices
        return self.start

    @property
    def q(self) -> int:
        return self.stop - self.start

    @property
    def kv_len(self) -> int:  # m = S of the call
        return self.sink_len + (self.write_pos - self.window_start) + self.q

    def scalars(self) -> dict[str, int]:
        return {"sink_len": self.sink_len, "window_start": self.window_start,
                "write_pos": self.write_pos, "chunk_width": self.chunk_width}


def prefill_steps(prompt_len: int, p: MesaParams, method: Method = "mesa") -> list[Step]:
    """The calls the published code makes for a prompt: first chunk, middle chunks, last chunk."""
    if prompt_len < 1:
        raise MesaParamError("a prompt needs at least one token")
    if method == "origin":
        return [Step(0, prompt_len, 0, 0, p.chunk_width, "full")]
    if method != "mesa":
        raise MesaParamError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    W = dynamic_split(prompt_len, p)
    F = p.first_chunk
    steps = [Step(0, min(F, prompt_len), 0, 0, W, "first")]
    s = F
    while s < prompt_len:
        if s + W < prompt_len:  # middle chunk: sees the first chunk and itself only
            steps.append(Step(s, s + W, F, s, W, "middle"))
            s += W
        else:  # last chunk: sees every earlier token
            steps.append(Step(s, prompt_len, 0, 0, W, "last"))
            break
    return steps


def decode_step(pos: int, chunk_width: int) -> Step:
    """The call that consumes the token at absolute index `pos`, with the W its prefill chose."""
    return Step(pos, pos + 1, 0, 0, chunk_width, "decode")


# ---------------------------------------------------------------------------------------- §5

def key_positions(kv_len: int, chunk_width: int, train_length: int, push_width: int) -> np.ndarray:
    """Stair PE: the RoPE position of each of the S = kv_len keys of one call (int64 [S])."""
    S, W, T, pw = kv_len, chunk_width, train_length, push_width
    k = np.arange(S, dtype=np.int64)
    if S <= T:
        return k
    pp = (S - 1) % W
    A = S - pp
    return np.where(k >= A, k, (A - 1) - (A - 1 - k) // pw)


def max_distance(kv_len, chunk_width: int, train_length: int, push_width: int):
    """The largest query-key position distance of a call with S = kv_len keys (scalar or array):
    S - 1 without stairs, else pp + floor((A - 1) / pw) from the newest query to key 0."""
    S = np.asarray(kv_len, dtype=np.int64)
    pp = (S - 1) % chunk_width
    return np.where(S <= train_length, S - 1, pp + (S - pp - 1) // push_width)


# ---------------------------------------------------------------------------------------- §6

def logn_scale(query_index: np.ndarray | int, train_length: int) -> np.ndarray:
    """λ(i) = max(1, ln(i+1) / ln T) in float32, i = the query's index inside its call."""
    i1 = np.asarray(query_index, dtype=np.float32) + np.float32(1)
    ratio = np.log(i1) / np.float32(math.log(train_length))
    return np.maximum(ratio, np.float32(1)).astype(np.float32)


# ------------------------------------------------------------------------------ §11, manifest

def largest_distance(max_len: int, p: MesaParams, method: Method = "mesa") -> int:
    """The largest relative distance any step of any request up to max_len tokens uses.

    A prompt of length L runs with W = dynamic_split(L); its last chunk and decode steps have
    S in [L, max_len]; its first and middle chunks stay below T. Exact, vectorised per distinct W.
    """
    if method == "origin":
        return max_len - 1
    S = np.arange(1, max_len + 1, dtype=np.int64)
    first_len_for_w: dict[int, int] = {}
    for L in range(1, max_len + 1):
        try:
            W = dynamic_split(L, p)
        except MesaParamError:
            continue  # such prompts are refused at request time
        first_len_for_w.setdefault(W, L)
    best = 0
    for W, L in first_len_for_w.items():
        best = max(best, int(max_distance(S[L - 1:], W, p.train_length, p.push_width).max()))
    # first/middle chunks: S = F + q <= F + W < T
    return best


def check_request(prompt_len: int, max_new_tokens: int, max_len: int, p: MesaParams,
                  method: Method = "mesa") -> list[Step]:
    """The prefill plan of a request, or MesaParamError saying why it cannot run."""
    if prompt_len + max_new_tokens > max_len:
        asked = f"prompt ({prompt_len} tokens)" + (f" + max_new_tokens ({max_new_tokens})" if max_new_tokens else "")
        raise MesaParamError(f"{asked} exceeds max_len {max_len}")
    return prefill_steps(prompt_len, p, method)


__all__ = [
    "METHODS", "MesaParamError", "MesaParams", "SPLIT_REMAINDER_LIMIT", "Step",
    "check_request", "decode_step", "dynamic_split", "graph_params", "key_positions", "largest_distance", "logn_scale",
    "max_distance", "origin_params", "prefill_steps",
]

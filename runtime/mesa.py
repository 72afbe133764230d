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

# Full-attention prefill call size (origin; runtime/methods.py's full-attention methods): the calls see every
# earlier token, so the split changes no logit, and a 16k prompt in 1024-token calls runs 1.4x faster in
# half the peak memory of one 16k call on ORT CPU (scripts/README.md, "Methods compared").
FULL_PREFILL_CHUNK = 1024

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


# ------------------------------------------------------------------------- presets, default rule

_PUBLISHED = "published code (github.com/soacker/Mesa-Extrapolation @84a9189)"
# The published `PositionSet` class defaults, i.e. the paper's general setting; they go with its T = 2048.
GENERAL = {"first_chunk": 100, "first_chunk_cache": 100, "last_context": 512, "reserve_tokens": 50, "push_width": 50}
GENERAL_T = 2048


@dataclass(frozen=True)
class Preset:
    params: dict  # MesaParams field -> value; chunk_width left out means W0 = T
    source: str  # where the numbers come from


def _general(T: int, why: str) -> Preset:
    return Preset({"train_length": T, **GENERAL}, (
        f"no published setting for this model: the paper's general setting (F=Fc=100, C=512, G=50, pw=50, "
        f"the published PositionSet defaults) with T={T} = {why}; W0 = T"))


# Keyed by the exporter's model aliases (export/loading.py ALIASES).
PRESETS: dict[str, Preset] = {
    "llama2-7b": Preset({"train_length": 2048, **GENERAL}, (
        f"{_PUBLISHED}: the experiment script runs Llama-2 with T=2048 although Llama-2 is trained at 4096; "
        "its utils.get_model has no branch for the base model, so the PositionSet defaults apply "
        "(F=Fc=100, C=512, G=50, pw=50); W0 = T = 2048 as the script sets it for llama2-7b-chat and vicuna "
        "(the class default W would be 1800; MESA_SPEC section 11 fixes W0 = T)")),
    "llama2-7b-chat": Preset({
        "train_length": 2048, "first_chunk": 100, "first_chunk_cache": 100, "last_context": 800,
        "reserve_tokens": 50, "push_width": 20}, (
        f"{_PUBLISHED}: utils.get_model's 'llama2-7b-chat' branch sets train_length=2048 (Llama-2 is trained "
        "at 4096; the script uses 2048), context_window_length=2048 (W0 = T), last_context=800, push_width=20; "
        "F=Fc=100 and G=50 are the PositionSet defaults")),
    "vicuna-7b": Preset({
        "train_length": 2048, "first_chunk": 100, "first_chunk_cache": 100, "last_context": 1024,
        "reserve_tokens": 50, "push_width": 200}, (
        f"{_PUBLISHED}: utils.get_model's 'vicuna' branch sets train_length=2048 (vicuna-7b-v1.5 is Llama-2 "
        "based, trained at 4096; the script uses 2048), context_window_length=2048 (W0 = T), last_context=1024, "
        "push_width=200; F=Fc=100 and G=50 are the PositionSet defaults")),
    "tinyllama-1.1b": _general(2048, "TinyLlama's pre-training sequence length (config max_position_embeddings=2048)"),
    "llama3-8b": _general(8192, "Llama 3's pre-training sequence length (config max_position_embeddings=8192)"),
    "mistral-7b": _general(
        8192, "the training context length in the Mistral 7B paper (arXiv 2310.06825, Table 1: context_len "
        "8192, window 4096); its config's max_position_embeddings=32768 is not a trained length"),
    "qwen2-7b": _general(
        32768, "the context Qwen2 was pre-trained up to (Qwen2 technical report, arXiv 2407.10671: extended "
        "from 4096 to 32768 at the end of pre-training); longer serving lengths in its config rely on YaRN"),
}


def default_params(max_position_embeddings: int, preset: dict | None = None,
                   overrides: dict | None = None) -> MesaParams:
    """The Mesa parameters for an export: per field, `overrides` (None values ignored) beat the
    preset, which beats this rule, derived from T alone:

        T  = overrides' or the preset's train_length, else the config's max_position_embeddings
        s  = min(1, T / 2048)
        F  = Fc = max(1, round(100 s))   C = round(512 s)   G = round(50 s)   pw = max(1, round(50 s))
        W0 = T

    That is the paper's general setting (the published PositionSet defaults, which go with T = 2048) for
    every T >= 2048 — the same numbers the presets without a published setting use — and the same setting
    shrunk in proportion for smaller T (tiny test models), where F = Fc = 100 would not fit. DynamicSplit
    then always works: W <= T - F - Fc, so W + F < T as long as Fc >= 1 and F + Fc < T, which is checked.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(MesaParams.__dataclass_fields__))
    if unknown:
        raise MesaParamError(f"unknown Mesa parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(MesaParams.__dataclass_fields__)}")
    preset = preset or {}
    T = int(given.get("train_length", preset.get("train_length", max_position_embeddings)))
    s = min(1.0, T / GENERAL_T)
    rule = {"train_length": T, "first_chunk": max(1, round(100 * s)), "first_chunk_cache": max(1, round(100 * s)),
            "last_context": round(512 * s), "reserve_tokens": round(50 * s), "push_width": max(1, round(50 * s)),
            "chunk_width": 0}
    p = MesaParams(**{k: int(v) for k, v in {**rule, **preset, **given}.items()})
    if p.first_chunk + p.first_chunk_cache >= p.train_length:  # DynamicSplit's D = T - F - Fc must be > 0
        raise MesaParamError(f"first_chunk F={p.first_chunk} + first_chunk_cache Fc={p.first_chunk_cache} "
                             f"must stay below train_length T={p.train_length}")
    return p


def origin_params(max_len: int) -> MesaParams:
    """Plain RoPE as a special case of the formulas: with T = max_len + 1 no call ever has S > T
    (positions are the identity) and ln(i+1) < ln T for every query, so the log-n factor is exactly 1."""
    return MesaParams(train_length=max_len + 1, first_chunk=1, first_chunk_cache=0, last_context=0,
                      reserve_tokens=0, push_width=1)


def graph_params(params: MesaParams, method: str, max_len: int) -> MesaParams:
    """The parameters an engine's steps run with: every method but mesa runs the formulas with
    T = max_len + 1 (plain positions inside each call; runtime/methods.py says what else changes)."""
    return params if method == "mesa" else origin_params(max_len)


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

    @property
    def visible_ranges(self) -> tuple[tuple[int, int], ...]:
        """The visibility rule of a call, as absolute key index ranges [lo, hi): the sink cache[0:a], the
        window cache[b:w] and the q new keys [w, w + q). Cached keys are seen by every query; new key j
        by new query i iff j <= i (causal). The ONNX parts (graph_ops/mesa_op.py) slice the same ranges."""
        return visible_ranges(self.sink_len, self.window_start, self.write_pos, self.q)

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs this call's queries see: each sees a + (w - b) cached keys plus the new
        keys up to itself."""
        cached = self.sink_len + self.write_pos - self.window_start
        return self.q * cached + self.q * (self.q + 1) // 2

    def scalars(self) -> dict[str, int]:
        return {"sink_len": self.sink_len, "window_start": self.window_start,
                "write_pos": self.write_pos, "chunk_width": self.chunk_width}


def visible_ranges(sink_len: int, window_start: int, write_pos: int, q: int) -> tuple[tuple[int, int], ...]:
    """The key index ranges [lo, hi) a call with scalars a, b, w and q new tokens sees, in order."""
    return ((0, sink_len), (window_start, write_pos), (write_pos, write_pos + q))


def prefill_steps(prompt_len: int, p: MesaParams, method: Method = "mesa") -> list[Step]:
    """The calls the published code makes for a prompt: first chunk, middle chunks, last chunk. origin:
    plain causal attention in calls of FULL_PREFILL_CHUNK tokens, each seeing every earlier token."""
    if prompt_len < 1:
        raise MesaParamError("a prompt needs at least one token")
    if method == "origin":
        return full_attention_steps(prompt_len, p.chunk_width)
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


def full_attention_steps(prompt_len: int, chunk_width: int, chunk: int | None = None) -> list[Step]:
    """Calls of `chunk` tokens (default FULL_PREFILL_CHUNK), each seeing every earlier token: cache[0:s]
    is the window (a = 0, b = 0). chunk_width is carried as given."""
    if prompt_len < 1:
        raise MesaParamError("a prompt needs at least one token")
    chunk = chunk or FULL_PREFILL_CHUNK
    return [Step(s, min(s + chunk, prompt_len), 0, 0, chunk_width, "full") for s in range(0, prompt_len, chunk)]


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

def chunk_widths(max_len: int, p: MesaParams) -> tuple[dict[int, int], list[tuple[int, str]]]:
    """One pass over every prompt length 1..max_len: (each chunk width W DynamicSplit gives, mapped to
    the shortest prompt that runs with it; the (length, reason) of every prompt it refuses)."""
    first_len: dict[int, int] = {}
    refused: list[tuple[int, str]] = []
    for L in range(1, max_len + 1):
        try:
            first_len.setdefault(dynamic_split(L, p), L)
        except MesaParamError as e:
            refused.append((L, str(e)))
    return first_len, refused


def check_every_length(max_len: int, p: MesaParams) -> None:
    """An engine must have a plan for every prompt it may receive: MesaParamError naming the first
    prompt length these parameters leave without one."""
    if max_len < p.first_chunk:
        raise MesaParamError(f"max_len {max_len} is smaller than the first chunk F={p.first_chunk}")
    _, refused = chunk_widths(max_len, p)
    if refused:
        L, why = refused[0]
        raise MesaParamError(f"Mesa parameters {p.as_dict()} fail for a prompt of {L} tokens: {why}")


def largest_distance(max_len: int, p: MesaParams, method: Method = "mesa") -> int:
    """The largest relative distance any step of any request up to max_len tokens uses.

    A prompt of length L runs with W = dynamic_split(L); its last chunk and decode steps have
    S in [L, max_len]; its first and middle chunks stay below T. Exact, vectorised per distinct W.
    """
    if method == "origin":
        return max_len - 1
    S = np.arange(1, max_len + 1, dtype=np.int64)
    first_len_for_w, _ = chunk_widths(max_len, p)  # refused prompts never run, so they add no distance
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
    "GENERAL", "GENERAL_T", "METHODS", "MesaParamError", "MesaParams", "PRESETS", "Preset", "SPLIT_REMAINDER_LIMIT",
    "Step", "check_every_length", "check_request", "chunk_widths", "decode_step", "default_params", "dynamic_split",
    "full_attention_steps", "graph_params", "key_positions", "largest_distance", "logn_scale",
    "visible_ranges",
    "max_distance", "origin_params", "prefill_steps",
]

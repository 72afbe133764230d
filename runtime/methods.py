"""The context-extension methods beside Mesa, one module for their formulas (Mesa's are runtime/mesa.py).

Each method is a frozen dataclass that says which calls a request makes (`prefill_steps`, `decode_step`,
the same `mesa.Step` scalars a, b, w every engine takes) and how a call's query-key pairs are encoded;
graph_ops/methods_op.py restates the encodings in ONNX, export/model.py runs them in torch, and
tests/test_methods.py checks both against a plain-torch restatement written from the papers.

| method | source | parameters (symbol) | a call's queries see | RoPE |
|---|---|---|---|---|
| rerope | Su, "ReRoPE" (kexue.fm/archives/9708; bojone/rerope rerope_patch.py) | window w, train_length T | every earlier key | relative distance d < w as is, else w; log-n: max(1, ln(i+1)/ln T), i the absolute position |
| leaky-rerope | same post and repository (leaky_rerope_patch.py) | w, k, T | every earlier key | d < w as is, else w + (d - w)/k; log-n as rerope |
| self-extend | Jin et al., "LLM Maybe LongLM" (arXiv 2401.01325), Algorithm 1 | group G, neighbor window w_n | every earlier key | d < w_n as is, else (i // G + w_n - w_n // G) - j // G |
| streaming-llm | Xiao et al., "Efficient Streaming LMs with Attention Sinks" (arXiv 2309.17453) | sink n_s, window R, block c | the n_s sink tokens, the R tokens before the block, the block up to itself | positions inside the call (the cache index, not the text position), as the paper does |
| lm-infinite | Han et al., "LM-Infinite" (arXiv 2308.16137) | n_global, window R, block c, distance cap L | Λ-shaped: the n_global first tokens, the R before the block, the block | d as is below L, else L |
| dynamic-ntk | transformers `rope_type="dynamic"` (_compute_dynamic_ntk_parameters) | factor f, T | every earlier key | base' = base (f S/T - (f - 1))^(d/(d-2)) for a call of S > T keys |
| yarn | Peng et al., "YaRN" (arXiv 2309.00071), as transformers `rope_type="yarn"` | factor s, original length T, beta_fast, beta_slow | every earlier key | per-frequency blend of interpolation and extrapolation, cos/sin times attention_factor |

i, j are the absolute positions of a query and a key, d = i - j. Pair methods (rerope, leaky-rerope,
self-extend, lm-infinite) give every call two encodings: `near` pairs (d below the method's window) use
RoPE at the absolute positions (p1), the others rotate the query to p2_q and the key to p2_k so that
p2_q - p2_k is the method's distance. A decode step needs only one pass: with one query, each far key
can be rotated to p2_k + (p1_q - p2_q) instead (`single_pass_key_positions`). Prefill of full-attention
methods runs in chunks of PREFILL_CHUNK tokens, which changes no logit (the encodings depend only on
absolute positions); dynamic-ntk's base depends on the sequence length, so its prefill chunks carry the
prompt length L in the `chunk_width` scalar (unused otherwise by non-Mesa methods) and every chunk uses
the base of max(S, L): the logits of one forward over the prompt, as transformers computes it.

What these methods leave as they are: the static cache holds max_len rows per sequence for every method;
streaming-llm and lm-infinite read only their sink + window (O(window) compute per token) but do not
shrink that allocation (no ring buffer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from runtime import mesa
from runtime.mesa import MesaParamError, Step

METHODS: tuple[str, ...] = ("mesa", "origin", "rerope", "leaky-rerope", "self-extend", "streaming-llm",
                            "lm-infinite", "dynamic-ntk", "yarn")
PREFILL_CHUNK = mesa.FULL_PREFILL_CHUNK  # full-attention prefill call size (the logits do not depend on it)
# Methods whose cached keys keep their positions from step to step, which the in-place decode cache needs;
# the others (the call's own positions: streaming-llm) lower MesaAttention with `auto` on ort-cpu.
INPLACE_METHODS: tuple[str, ...] = ("mesa", "origin", "yarn")


def _full_prefill(prompt_len: int, width: int = 1) -> list[Step]:
    return mesa.full_attention_steps(prompt_len, width, PREFILL_CHUNK)  # read here: tests change it


class _Windowed:
    """Calls of the windowed methods (fields sink, window, block): blocks of c tokens, then single tokens,
    each seeing cache[0:n_s] and the `window` tokens before it."""

    def prefill_steps(self, prompt_len: int) -> list[Step]:
        if prompt_len < 1:
            raise MesaParamError("a prompt needs at least one token")
        return [self._call(s, min(s + self.block, prompt_len), "window") for s in range(0, prompt_len, self.block)]

    def decode_step(self, pos: int) -> Step:
        return self._call(pos, pos + 1, "decode")

    def _call(self, start: int, stop: int, kind: str) -> Step:
        a = min(self.sink, start)
        return Step(start, stop, a, max(a, start - self.window), 1, kind)


def _positive(**values) -> None:
    for name, v in values.items():
        if v < 1:
            raise MesaParamError(f"{name} must be >= 1, got {v}")


@dataclass(frozen=True)
class Method:
    """What every method answers; subclasses add their parameters as fields."""

    name: ClassVar[str]
    own_op: ClassVar[bool] = False  # an attention op of its own (graph_ops/methods_op.py), not MesaAttention

    def prefill_steps(self, prompt_len: int) -> list[Step]:
        return _full_prefill(prompt_len)

    def decode_step(self, pos: int) -> Step:
        return Step(pos, pos + 1, 0, 0, 1, "decode")

    def largest_distance(self, max_len: int) -> int:
        """The largest relative position any pair of any request up to max_len tokens is encoded at."""
        return max_len - 1

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, max_len: int) -> None:
        """MesaParamError when these parameters cannot serve an engine of max_len tokens."""


# ------------------------------------------------------------------------------ pair methods

def call_positions(step: Step) -> tuple[np.ndarray, np.ndarray]:
    """Absolute positions (int64) of a call's keys (sink, window, new block) and of its queries."""
    (s0, s1), (w0, w1), (n0, n1) = step.visible_ranges
    keys = np.concatenate([np.arange(s0, s1), np.arange(w0, w1), np.arange(n0, n1)]).astype(np.int64)
    return keys, np.arange(n0, n1, dtype=np.int64)


@dataclass(frozen=True)
class PairEncoding:
    """A call's two encodings: RoPE positions p1 (absolute) for near pairs, p2 for the others."""

    p1_k: np.ndarray  # [S] float32
    p1_q: np.ndarray  # [q]
    p2_k: np.ndarray  # [S]
    p2_q: np.ndarray  # [q]
    near: np.ndarray  # [q, S] bool
    scale: np.ndarray  # [q] float32, multiplies the queries (log-n, or 1)


def single_pass_key_positions(e: PairEncoding) -> np.ndarray:
    """One query: each far key rotated so that p1_q - key position = p2_q - p2_k (its method distance)."""
    assert e.p1_q.shape == (1,)
    return np.where(e.near[0], e.p1_k, e.p2_k + (e.p1_q[0] - e.p2_q[0])).astype(np.float32)


def _rerope_scale(queries: np.ndarray, train_length: int) -> np.ndarray:
    """Su's log-n: max(1, ln(i + 1) / ln T) with i the absolute position (not Mesa's call index)."""
    return np.maximum(np.log(queries.astype(np.float32) + 1) / np.float32(math.log(train_length)),
                      np.float32(1)).astype(np.float32)


@dataclass(frozen=True)
class ReRoPE(Method):
    window: int  # w
    train_length: int  # T, for log-n
    name: ClassVar[str] = "rerope"
    own_op: ClassVar[bool] = True  # two encodings per call: PairAttend

    def __post_init__(self):
        _positive(window=self.window, train_length=self.train_length)

    def far_positions(self, keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(keys.shape, np.float32), np.full(queries.shape, self.window, np.float32)

    def scale(self, queries: np.ndarray) -> np.ndarray:
        return _rerope_scale(queries, self.train_length)

    def near(self, d: np.ndarray) -> np.ndarray:
        return d < self.window

    def encode(self, step: Step) -> PairEncoding:
        keys, queries = call_positions(step)
        d = queries[:, None] - keys[None, :]
        p2_k, p2_q = self.far_positions(keys, queries)
        return PairEncoding(keys.astype(np.float32), queries.astype(np.float32), p2_k, p2_q, self.near(d),
                            self.scale(queries))

    def largest_distance(self, max_len: int) -> int:
        return int(min(max_len - 1, self.window))

    def check(self, max_len: int) -> None:
        if self.window >= self.train_length:
            raise MesaParamError(f"window w={self.window} must stay below train_length T={self.train_length}")


@dataclass(frozen=True)
class LeakyReRoPE(ReRoPE):
    k: float = 16.0  # far distances grow 1/k as fast
    name: ClassVar[str] = "leaky-rerope"

    def __post_init__(self):
        super().__post_init__()
        if not self.k > 1:
            raise MesaParamError(f"leaky factor k must be > 1, got {self.k}")

    def far_positions(self, keys, queries):
        k = np.float32(self.k)
        return ((keys.astype(np.float32) / k).astype(np.float32),
                (queries.astype(np.float32) / k + np.float32(self.window * (1 - 1 / self.k))).astype(np.float32))

    def largest_distance(self, max_len: int) -> int:
        d = max_len - 1  # the far distance w + (d - w) / k grows with d
        return int(math.ceil(self.window + (d - self.window) / self.k)) if d >= self.window else d


@dataclass(frozen=True)
class SelfExtend(ReRoPE):
    """window = the neighbor window w_n; group = G. train_length is unused (no log-n)."""

    group: int = 1
    name: ClassVar[str] = "self-extend"

    def __post_init__(self):
        super().__post_init__()
        _positive(group=self.group)

    def far_positions(self, keys, queries):
        G, wn = self.group, self.window
        return ((keys // G).astype(np.float32), (queries // G + wn - wn // G).astype(np.float32))

    def scale(self, queries):
        return np.ones(queries.shape, np.float32)

    def largest_distance(self, max_len: int) -> int:
        i = max_len - 1
        return int(max(min(i, self.window - 1), i // self.group + self.window - self.window // self.group))

    def check(self, max_len: int) -> None:
        if self.largest_distance(max_len) >= self.train_length:
            raise MesaParamError(
                f"self-extend with G={self.group}, w_n={self.window} reaches distance "
                f"{self.largest_distance(max_len)} at max_len {max_len}, beyond train_length T={self.train_length}: "
                f"raise --group to at least {math.ceil((max_len - self.window) / (self.train_length - self.window))}")


@dataclass(frozen=True)
class LMInfinite(_Windowed, ReRoPE):
    """window = the recent tokens R before a block; sink = n_global; cap = the distance limit L
    (train_length doubles as L: the paper sets it to the pre-training length); block = c."""

    sink: int = 10
    block: int = 64
    name: ClassVar[str] = "lm-infinite"

    def __post_init__(self):
        super().__post_init__()
        _positive(sink=self.sink, block=self.block)

    def near(self, d):
        return d < self.train_length

    def far_positions(self, keys, queries):
        return np.zeros(keys.shape, np.float32), np.full(queries.shape, self.train_length, np.float32)

    def scale(self, queries):
        return np.ones(queries.shape, np.float32)

    def largest_distance(self, max_len: int) -> int:
        return int(min(max_len - 1, self.train_length))

    def check(self, max_len: int) -> None:
        if self.window + self.block > self.train_length:
            raise MesaParamError(f"window R={self.window} + block c={self.block} must not exceed the distance limit "
                                 f"L={self.train_length}: the local branch would see distances it caps")


# ------------------------------------------------------------------------- window and RoPE methods

@dataclass(frozen=True)
class StreamingLLM(_Windowed, Method):
    """Runs the Mesa op with plain positions (T = max_len + 1): positions are the call's own indices."""

    sink: int  # n_s
    window: int  # R
    block: int  # c
    name: ClassVar[str] = "streaming-llm"

    def __post_init__(self):
        _positive(sink=self.sink, window=self.window, block=self.block)

    def largest_distance(self, max_len: int) -> int:
        return int(min(max_len - 1, self.sink + self.window + self.block - 1))


@dataclass(frozen=True)
class DynamicNTK(Method):
    """base' = rope_theta (f n / T - (f - 1))^(d / (d - 2)), n = max(S, L, T) for a call of S keys in a
    prompt of L tokens (L = the step's chunk_width; 1 for decode steps), d = head_dim."""

    factor: float  # f
    train_length: int  # T (transformers: max_position_embeddings)
    rope_theta: float = 10000.0  # the model's base
    name: ClassVar[str] = "dynamic-ntk"
    own_op: ClassVar[bool] = True  # the base computed per call: DynamicNTKAttention

    def __post_init__(self):
        _positive(train_length=self.train_length)
        if not self.factor >= 1:
            raise MesaParamError(f"dynamic-ntk factor must be >= 1, got {self.factor}")

    def prefill_steps(self, prompt_len: int) -> list[Step]:
        return _full_prefill(prompt_len, prompt_len)  # every chunk computes with the base of L



@dataclass(frozen=True)
class YaRN(Method):
    factor: float  # s
    original_max_position_embeddings: int  # T
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # 0: 0.1 ln(s) + 1, the paper's (and transformers') default
    name: ClassVar[str] = "yarn"

    def __post_init__(self):
        _positive(original_max_position_embeddings=self.original_max_position_embeddings)
        if not self.factor >= 1:
            raise MesaParamError(f"yarn factor must be >= 1, got {self.factor}")
        if self.attention_factor == 0:
            object.__setattr__(self, "attention_factor", 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0)

    def extrapolation_weight(self, rope_theta: float, head_dim: int) -> np.ndarray:
        """[d/2] float32: how much of each frequency is kept as is (1) rather than divided by s (0):
        1 - clamp((i - low) / (high - low)), the correction range from beta_fast/beta_slow rotations."""
        def correction_dim(rotations):
            return (head_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
                    / (2 * math.log(rope_theta)))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # as the reference, against a zero-width ramp
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        return (1 - ramp).astype(np.float32)


CLASSES: dict[str, type[Method]] = {c.name: c for c in (ReRoPE, LeakyReRoPE, SelfExtend, StreamingLLM, LMInfinite,
                                                        DynamicNTK, YaRN)}
# The flags export.py offers (flag, field, the methods that take it, help); defaults below.
PARAMETERS = {
    "window": "rerope / leaky-rerope: w; self-extend: neighbor window w_n; streaming-llm / lm-infinite: recent tokens R",
    "k": "leaky-rerope: far distances grow 1/k as fast",
    "group": "self-extend: group size G",
    "sink": "streaming-llm: attention-sink tokens n_s; lm-infinite: n_global",
    "block": "streaming-llm / lm-infinite: prefill block c (a query sees R to R + c - 1 recent tokens)",
    "factor": "dynamic-ntk: f; yarn: the scale s",
}


def default_method(name: str, train_length: int, max_len: int, given: dict | None = None) -> Method | None:
    """A method's parameters: `given` (None values ignored) over defaults derived from T and max_len.

    rerope / leaky-rerope: w = T/8 (Su's 512 at 4096), k = 16; self-extend: w_n = T/4 (the paper's 1024
    at 4096), G the smallest group that keeps every distance below T; streaming-llm: n_s = 4, c = T/4,
    R = T - n_s - c (every call's positions stay below T); lm-infinite: n_global = 10, c = T/4,
    R = T - c, L = T; dynamic-ntk: f = 2; yarn: s = max_len / T, T = the trained length.
    None for mesa and origin, whose parameters are runtime.mesa.MesaParams."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if name in ("mesa", "origin"):
        if given:
            raise MesaParamError(f"method {name} takes no parameter {', '.join(sorted(given))}")
        return None
    if name not in CLASSES:
        raise MesaParamError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    T = int(train_length)
    c = max(1, T // 4)
    rules = {
        "rerope": {"window": max(1, T // 8), "train_length": T},
        "leaky-rerope": {"window": max(1, T // 8), "train_length": T, "k": 16.0},
        "self-extend": {"window": max(1, T // 4), "train_length": T},
        "streaming-llm": {"sink": 4, "block": c, "window": max(1, T - 4 - c)},
        "lm-infinite": {"sink": 10, "block": c, "window": max(1, T - c), "train_length": T},
        "dynamic-ntk": {"factor": 2.0, "train_length": T},
        "yarn": {"factor": max(1.0, max_len / T), "original_max_position_embeddings": T},
    }[name]
    cls = CLASSES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise MesaParamError(f"method {name} takes no parameter {', '.join(unknown)} (it takes: "
                             f"{', '.join(sorted(known)) or 'none'})")
    values = {**rules, **given}
    if name == "self-extend" and "group" not in values:
        wn = values["window"]
        values["group"] = max(1, math.ceil((max_len - wn) / max(1, T - wn))) if max_len > T else 1
        while SelfExtend(**values).largest_distance(max_len) >= T and values["group"] < max_len:
            values["group"] += 1
    try:
        m = cls(**values)
    except TypeError as e:
        raise MesaParamError(f"method {name}: {e}") from None
    m.check(max_len)
    return m


def method_from_manifest(name: str, params: dict) -> Method | None:
    """The Method of an engine (None for mesa and origin, whose parameters are runtime.mesa.MesaParams)."""
    return CLASSES[name](**params) if name in CLASSES else None


def prefill_steps(prompt_len: int, params: mesa.MesaParams, name: str, method: Method | None) -> list[Step]:
    """The calls of a prompt under any method: Mesa's chunk plan, origin's full-attention calls, or the method's."""
    return mesa.prefill_steps(prompt_len, params, name) if method is None else method.prefill_steps(prompt_len)


def decode_step(pos: int, chunk_width: int, method: Method | None) -> Step:
    return mesa.decode_step(pos, chunk_width) if method is None else method.decode_step(pos)


def check_request(prompt_len: int, max_new_tokens: int, max_len: int, params: mesa.MesaParams, name: str,
                  method: Method | None) -> list[Step]:
    """The prefill plan of a request, or MesaParamError saying why it cannot run."""
    if method is None:
        return mesa.check_request(prompt_len, max_new_tokens, max_len, params, name)
    mesa.check_request(prompt_len, max_new_tokens, max_len, params, "origin")  # the length rule alone
    return method.prefill_steps(prompt_len)


__all__ = ["CLASSES", "DynamicNTK", "LMInfinite", "LeakyReRoPE", "METHODS", "Method", "PARAMETERS",
           "PREFILL_CHUNK", "PairEncoding", "ReRoPE", "SelfExtend", "StreamingLLM", "YaRN", "call_positions",
           "check_request", "decode_step", "default_method", "method_from_manifest", "prefill_steps",
           "single_pass_key_positions"]

"""Choosing the next token from one row of logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _whole(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _real(x) -> bool:
    return _whole(x) or isinstance(x, (float, np.floating))


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy (argmax); top_k, top_p and seed are then unused
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p
    seed: int | None = None  # None draws fresh entropy: runs are then not repeatable

    def __post_init__(self):
        """ValueError naming the setting for anything but finite numbers in range (bools and strings
        included: float("0.5") or int(True) would hide a caller's mistake); stores plain float / int."""
        if not (_real(self.temperature) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), a finite number, got {self.temperature!r}")
        if not (_whole(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be >= 0 (0 = no limit), an integer, got {self.top_k!r}")
        if not (_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.seed is None or _whole(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be >= 0, an integer (or None), got {self.seed!r}")
        for name, cast in (("temperature", float), ("top_k", int), ("top_p", float)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token for one row of logits [vocab]."""
    if s.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64)
    x = (x - x.max()) / s.temperature  # shifted first: a tiny temperature then gives -inf, never inf - inf = nan
    if 0 < s.top_k < x.size:
        x[x < np.partition(x, -s.top_k)[-s.top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # probability of the more likely tokens
        p[order[before >= s.top_p]] = 0  # the most likely token always survives (before = 0)
        p /= p.sum()
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), p.size - 1))

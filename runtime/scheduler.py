"""Runs one sequence through a Mesa schedule on any backend.

A backend is a callable `step(input_ids [1, q] int64, step: mesa.Step, logits_to_keep: int,
cache) -> (logits [1, n, vocab], new_k, new_v)`; the scheduler walks the plan from runtime.mesa and
writes each step's new K/V rows into the cache at the step's write position. The cache is a KVCache
or any object with its `write(pos, new_k, new_v)` (device_cache.DeviceKVCache keeps it on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime import mesa, methods
from runtime.kv_cache import KVCache

StepFn = Callable[[np.ndarray, mesa.Step, int, KVCache], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Sequence:
    """What decoding needs to know after the prefill: how many tokens are cached and the W chosen."""

    length: int
    chunk_width: int
    method: methods.Method | None = None  # a method of runtime/methods.py (its own decode step); None: Mesa's


def prefill_step(step_fn: StepFn, ids: np.ndarray, step: mesa.Step, logits_to_keep: int, cache: KVCache) -> np.ndarray:
    """One step of a plan over the prompt `ids` [1, L]: run it, write its rows; returns logits [n, vocab]."""
    logits, k, v = step_fn(ids[:, step.start:step.stop], step, logits_to_keep, cache)
    cache.write(step.write_pos, k, v)
    return logits[0]


def prefill(step_fn: StepFn, input_ids: np.ndarray, steps: list[mesa.Step], cache: KVCache,
            all_logits: bool = True, on_step: Callable[[mesa.Step], None] | None = None,
            method: methods.Method | None = None) -> tuple[np.ndarray, Sequence]:
    """Run the prompt by its plan. Returns logits [L, vocab] (or [1, vocab] for the last position)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    out = []
    for step in steps:
        last = step is steps[-1]
        logits = prefill_step(step_fn, ids, step, step.q if all_logits else 1, cache)
        if all_logits or last:  # a chunk whose logits nobody reads still computes one row: the graph keeps >= 1
            out.append(logits)
        if on_step is not None:
            on_step(step)
    return np.concatenate(out, axis=0), Sequence(steps[-1].stop, steps[-1].chunk_width, method)


def decode(step_fn: StepFn, token: int, seq: Sequence, cache: KVCache) -> np.ndarray:
    """Consume one token at position seq.length; returns its logits [vocab] and advances seq."""
    step = methods.decode_step(seq.length, seq.chunk_width, seq.method)
    logits, k, v = step_fn(np.array([[token]], dtype=np.int64), step, 1, cache)
    cache.write(step.write_pos, k, v)
    seq.length += 1
    return logits[0, -1]


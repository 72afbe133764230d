"""The caches behind the batcher, and how a batch of sequences takes one decode step.

| decoder | engines | prefill writes to | a decode step of B sequences |
|---|---|---|---|
| InplaceDecoder | `inplace` kernel (ort-cpu target) | one pre-RoPE buffer, then rotated into the decode cache | one call over a range of decode-cache rows |
| RowDecoder | every other graph (portable, ort-cuda, tensorrt) | the sequence's own pre-RoPE slot | B calls, one per row (runtime.scheduler) |

Cache memory: InplaceDecoder holds slots x (K + V) of the decode cache plus one prefill buffer (prefills
run one at a time); RowDecoder holds slots x (K + V). Both report it as `nbytes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import mesa, scheduler
from runtime.artifact import ROPE_FILE
from runtime.decode_cache import DecodeCache
from runtime.kv_cache import CacheShape


def make_decoder(step_fn, shape: CacheShape, slots: int, directory: Path, params: mesa.MesaParams,
                 dtype=np.float32):
    """The decoder an engine's graph calls for: in-place when it has the decode inputs."""
    if getattr(step_fn, "inplace", False):
        return InplaceDecoder(step_fn, shape, slots, np.load(Path(directory) / ROPE_FILE), params, dtype)
    return RowDecoder(step_fn, shape, slots, dtype)


class InplaceDecoder:
    def __init__(self, step_fn, shape: CacheShape, slots: int, rope: np.ndarray, params: mesa.MesaParams,
                 dtype=np.float32):
        self.step_fn, self.slots, self.cache_max_len = step_fn, slots, shape.max_len
        self.cache = DecodeCache(shape.layers, slots, shape.kv_heads, shape.max_len, shape.head_dim, rope, params,
                                 dtype)
        self.prefill = step_fn.new_cache(shape, dtype)
        step_fn.decode_cache = self.cache
        self.prefill_needs_slot = False  # prefills share one buffer; a slot is needed only to decode
        self.rotations = 0  # anchor jumps re-rotated so far (all slots)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + self.prefill.k.nbytes + self.prefill.v.nbytes

    def prefill_cache(self, work):
        return self.prefill

    def finish_prefill(self, work) -> None:
        self.cache.load(work.slot, self.prefill.k[:, 0], self.prefill.v[:, 0], work.length, work.chunk_width,
                        self.prefill.release_layer)

    def decode(self, batch) -> np.ndarray:
        """One call over every slot: the traced graph takes its batch size from the cache input, so the
        decode cache itself is bound there. Rows that are not stepping (free, or paused) write a throw-away
        row at their own next position, which their next real step overwrites; their logits are dropped.
        Decode reads each row's weights once per call, so idle rows cost little (their attention covers
        only their own cached keys: none for a free slot)."""
        tokens = np.zeros(self.slots, dtype=np.int64)
        positions = self.cache.length.copy()
        for w in batch:
            self.rotations += self.cache.prepare(w.slot)
            tokens[w.slot] = w.pending
        logits = self.step_fn.decode(tokens, positions)
        for w in batch:
            self.cache.advance(w.slot)
        return logits[[w.slot for w in batch]]

    def free(self, work) -> None:
        self.cache.free(work.slot)


class RowDecoder:
    """Engines without in-place decode: each slot is a whole pre-RoPE cache and rows step one by one."""

    def __init__(self, step_fn, shape: CacheShape, slots: int, dtype=np.float32):
        self.step_fn, self.slots, self.cache_max_len = step_fn, slots, shape.max_len
        self.caches = [step_fn.new_cache(shape, dtype) for _ in range(slots)]
        self.prefill_needs_slot = True

    @property
    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.caches if hasattr(c.k, "nbytes"))

    def prefill_cache(self, work):
        return self.caches[work.slot]

    def finish_prefill(self, work) -> None:
        pass

    def decode(self, batch) -> np.ndarray:
        return np.stack([scheduler.decode(self.step_fn, w.pending, scheduler.Sequence(w.length, w.chunk_width),
                                          self.caches[w.slot]) for w in batch])

    def free(self, work) -> None:
        pass

"""The caches behind the batcher, and how a batch of sequences takes one decode step.

| decoder | engines | prefill writes to | a decode step of B sequences |
|---|---|---|---|
| InplaceDecoder | `inplace` kernel (ort-cpu target; ort-cuda at half precision) | one pre-RoPE buffer, then rotated into the decode cache | one call over a range of decode-cache rows |
| RowDecoder | every other graph (portable, fp32 ort-cuda, tensorrt) | the sequence's own pre-RoPE slot | B calls, one per row (runtime.scheduler) |

Cache memory: InplaceDecoder holds slots x (K + V) of the decode cache plus `slots` pre-RoPE prefill
buffers (several prompts can be part-way through their prefill: the batcher runs the shortest first);
the buffers are anonymous memory maps, so a buffer costs memory only for the prompt tokens written into
it, and those pages go back to the system layer by layer as the keys move into the decode cache.
On a device (OrtDeviceStep: its memory is allocated in full) InplaceDecoder keeps one prefill buffer, so
prompts prefill one after another. RowDecoder holds slots x (K + V). Both report the address space as
`nbytes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime import mesa, methods, scheduler
from runtime.artifact import ROPE_FILE
from runtime.kv_cache import CacheShape


def make_decoder(step_fn, shape: CacheShape, slots: int, directory: Path, params: mesa.MesaParams,
                 dtype=np.float32, decode_fn=None, method: methods.Method | None = None):
    """The decoder an engine's graph calls for: in-place when it has the decode inputs. `decode_fn` runs
    the decode steps when they have a graph of their own (int8-int4 engines); prefill runs `step_fn`.
    `method`: a runtime/methods.py method, whose decode steps RowDecoder takes (None: Mesa's)."""
    if getattr(step_fn, "inplace", False):
        return InplaceDecoder(step_fn, shape, slots, np.load(Path(directory) / ROPE_FILE), params, dtype, decode_fn)
    return RowDecoder(step_fn, shape, slots, dtype, decode_fn, method)


class InplaceDecoder:
    def __init__(self, step_fn, shape: CacheShape, slots: int, rope: np.ndarray, params: mesa.MesaParams,
                 dtype=np.float32, decode_fn=None):
        self.step_fn, self.slots, self.cache_max_len = step_fn, slots, shape.max_len
        self.decode_fn = decode_fn or step_fn
        self.cache = step_fn.new_decode_cache(shape, slots, rope, params, dtype)
        # host buffers cost only what is written (anonymous maps): one per slot; device memory is real: one
        buffers = min(slots, getattr(step_fn, "prefill_buffers", None) or slots)
        self.prefills = [step_fn.new_cache(shape, dtype) for _ in range(buffers)]
        self._free_buffers = list(range(buffers))
        self._buffer: dict = {}  # work -> index of the prefill buffer it writes
        step_fn.decode_cache = self.decode_fn.decode_cache = self.cache
        self.prefill_needs_slot = False  # prefills write their own buffer; a slot is needed only to decode
        self.rotations = 0  # anchor jumps re-rotated so far (all slots)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + sum(b.nbytes for b in self.prefills)

    def can_prefill(self, work) -> bool:
        return work in self._buffer or bool(self._free_buffers)

    def prefill_cache(self, work):
        if work not in self._buffer:
            self._buffer[work] = self._free_buffers.pop(0)
        return self.prefills[self._buffer[work]]

    def finish_prefill(self, work) -> None:
        buffer = self.prefills[self._buffer[work]]
        self.cache.load(work.slot, buffer, work.length, work.chunk_width)
        self._free_buffers.append(self._buffer.pop(work))

    def drop(self, work) -> None:
        """A sequence that ends before its prefill finished: its buffer's pages go back, the buffer is free."""
        if work in self._buffer:
            self.prefills[self._buffer[work]].release()
            self._free_buffers.append(self._buffer.pop(work))

    def decode(self, batch) -> np.ndarray:
        """One call over the rows from the lowest to the highest stepping slot (the batcher hands out the
        lowest free slot, so these stay packed). Rows inside that range that are not stepping (free, or
        paused) write a throw-away row at their own next position, which their next real step
        overwrites; their logits are dropped."""
        lo, hi = min(w.slot for w in batch), max(w.slot for w in batch) + 1
        tokens = np.zeros(hi - lo, dtype=np.int64)
        positions = self.cache.length[lo:hi].copy()
        for w in batch:
            self.rotations += self.cache.prepare(w.slot)
            tokens[w.slot - lo] = w.pending
        logits = self.decode_fn.decode(tokens, positions, lo)
        for w in batch:
            self.cache.advance(w.slot)
        return logits[[w.slot - lo for w in batch]]

    def free(self, work) -> None:
        self.cache.free(work.slot)


class RowDecoder:
    """Engines without in-place decode: each slot is a whole pre-RoPE cache and rows step one by one."""

    def __init__(self, step_fn, shape: CacheShape, slots: int, dtype=np.float32, decode_fn=None, method=None):
        self.step_fn, self.slots, self.cache_max_len, self.method = step_fn, slots, shape.max_len, method
        self.decode_fn = decode_fn or step_fn
        self.caches = [step_fn.new_cache(shape, dtype) for _ in range(slots)]
        self.prefill_needs_slot = True

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def can_prefill(self, work) -> bool:
        return True  # a prefill writes its sequence's own slot

    def prefill_cache(self, work):
        return self.caches[work.slot]

    def finish_prefill(self, work) -> None:
        pass

    def drop(self, work) -> None:
        pass

    def decode(self, batch) -> np.ndarray:
        return np.stack([scheduler.decode(self.decode_fn, w.pending, scheduler.Sequence(w.length, w.chunk_width, self.method),
                                          self.caches[w.slot]) for w in batch])

    def free(self, work) -> None:
        pass

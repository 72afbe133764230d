"""The static KV cache: allocated once, written in place, keys stored before RoPE."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    max_len: int
    head_dim: int

    def full(self, batch: int = 1) -> tuple[int, ...]:
        return (self.layers, batch, self.kv_heads, self.max_len, self.head_dim)


class KVCache:
    """One sequence's cache: k, v of shape [layers, 1, kv_heads, max_len, head_dim].

    The arrays live in anonymous memory maps: zero-filled, and a page costs memory only once written, so
    `release_layer` can hand a layer's pages back to the system (the prefill buffer does, layer by layer,
    while its keys move into the decode cache, so the two never both hold a long prompt in full)."""

    def __init__(self, shape: CacheShape, dtype=np.float32):
        self.shape = shape
        self.k, self._k_map = _zeros(shape.full(), dtype)
        self.v, self._v_map = _zeros(shape.full(), dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def release_layer(self, layer: int) -> None:
        """Drop layer `layer`'s pages of k and v; they read as zeros afterwards."""
        for array, mm in ((self.k, self._k_map), (self.v, self._v_map)):
            size = array[layer].nbytes
            start = -(-layer * size // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the layer only
            stop = (layer + 1) * size // mmap.PAGESIZE * mmap.PAGESIZE
            if stop > start:
                mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def release(self) -> None:
        """Drop every layer's pages (a prefill that ended early)."""
        for layer in range(self.shape.layers):
            self.release_layer(layer)

    def write(self, pos: int, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Store the rows of one step ([layers, 1, kv_heads, q, head_dim]) at [pos, pos + q)."""
        q = new_k.shape[3]
        if pos + q > self.shape.max_len:
            raise ValueError(f"cache holds {self.shape.max_len} positions; cannot write [{pos}, {pos + q})")
        self.k[:, :, :, pos:pos + q] = new_k
        self.v[:, :, :, pos:pos + q] = new_v


def _zeros(shape: tuple[int, ...], dtype) -> tuple[np.ndarray, mmap.mmap]:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mm = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape))).reshape(shape), mm
